//! Weight scaling (CAST's learnable per-row, per-column-block scale) on contiguous slices.
//!
//! A sparse weight W with R output rows and C inputs gets a scale A of shape `[R, n]`; input
//! column c of row r belongs to block `j = c / (C / n)` and the layer computes with
//! `W_s[r, c] = W[r, c] · A[r, j]`. Scaling is element-wise, so the zeros (and the N:M
//! pattern) of W are those of W_s.
//!
//! Two memory layouts, as for masks:
//! * [`ScaleLayout::RowsOut`] — `nn.Linear`: W is `[R, C]` (row r contiguous).
//! * [`ScaleLayout::RowsIn`] — GPT-2 `Conv1D`: W is `[C, R]` (input c is a contiguous row).
//!
//! Backward: `∂L/∂W = ∂L/∂W_s · A` (the forward applied to the gradient) and
//! `∂L/∂A[r, j] = Σ_{c in block j} ∂L/∂W_s[r, c] · W[r, c]`.

use crate::error::{CastError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// W is `[R, C]`.
    RowsOut,
    /// W is `[C, R]`.
    RowsIn,
}

/// Geometry of one scaled weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleShape {
    pub rows: usize,
    pub cols: usize,
    pub groups: usize,
    pub layout: ScaleLayout,
}

impl ScaleShape {
    /// From the weight's 2-d shape; `cols` (the input dimension) must be divisible by `groups`.
    pub fn new(shape: &[i64], groups: i64, layout: ScaleLayout) -> Result<Self> {
        if shape.len() != 2 {
            return Err(CastError::value(
                "weight",
                format!("weight scaling needs a 2-d weight, got shape {shape:?}"),
            ));
        }
        let (rows, cols) = match layout {
            ScaleLayout::RowsOut => (shape[0], shape[1]),
            ScaleLayout::RowsIn => (shape[1], shape[0]),
        };
        if groups < 1 || cols % groups != 0 {
            return Err(CastError::value(
                "groups",
                format!("expected a divisor of the input dimension {cols} (>= 1), got {groups}"),
            ));
        }
        Ok(ScaleShape {
            rows: rows as usize,
            cols: cols as usize,
            groups: groups as usize,
            layout,
        })
    }

    pub fn block(&self) -> usize {
        self.cols / self.groups
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// f32 and f64: the element types of the fast path.
pub trait Real:
    Copy + Send + Sync + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self>
{
    const ZERO: Self;
}
impl Real for f32 {
    const ZERO: f32 = 0.0;
}
impl Real for f64 {
    const ZERO: f64 = 0.0;
}

fn check(s: &ScaleShape, w: usize, a: usize, out: usize) -> Result<()> {
    if w != s.numel() || out != s.numel() {
        return Err(CastError::value(
            "weight",
            format!("expected {} elements, got {w} (output {out})", s.numel()),
        ));
    }
    if a != s.rows * s.groups {
        return Err(CastError::value(
            "scale",
            format!(
                "expected {} elements ([{}, {}]), got {a}",
                s.rows * s.groups,
                s.rows,
                s.groups
            ),
        ));
    }
    Ok(())
}

/// Rows handed to one parallel task: about 64K elements.
fn rows_per_task(row_len: usize) -> usize {
    ((1usize << 16) / row_len.max(1)).max(1)
}

/// `out = W · A` broadcast (the forward; also `∂L/∂W` when `w` is the incoming gradient).
pub fn scale_forward<T: Real>(w: &[T], a: &[T], s: &ScaleShape, out: &mut [T]) -> Result<()> {
    check(s, w.len(), a.len(), out.len())?;
    if s.numel() == 0 {
        return Ok(());
    }
    let (block, n) = (s.block(), s.groups);
    match s.layout {
        ScaleLayout::RowsOut => {
            let rt = rows_per_task(s.cols);
            let pieces: Vec<_> = w
                .chunks(rt * s.cols)
                .zip(out.chunks_mut(rt * s.cols))
                .enumerate()
                .collect();
            crate::parallel::for_each(pieces, |(t, (wc, oc))| {
                for (k, (wr, or)) in wc
                    .chunks_exact(s.cols)
                    .zip(oc.chunks_exact_mut(s.cols))
                    .enumerate()
                {
                    let r = t * rt + k;
                    for j in 0..n {
                        let aj = a[r * n + j];
                        let span = j * block..(j + 1) * block;
                        for (o, &x) in or[span.clone()].iter_mut().zip(&wr[span]) {
                            *o = x * aj;
                        }
                    }
                }
            });
        }
        ScaleLayout::RowsIn => {
            // Row c of W is input c: it scales every output r by A[r, c / block].
            let rt = rows_per_task(s.rows);
            let pieces: Vec<_> = w
                .chunks(rt * s.rows)
                .zip(out.chunks_mut(rt * s.rows))
                .enumerate()
                .collect();
            crate::parallel::for_each(pieces, |(t, (wc, oc))| {
                for (k, (wr, or)) in wc
                    .chunks_exact(s.rows)
                    .zip(oc.chunks_exact_mut(s.rows))
                    .enumerate()
                {
                    let j = (t * rt + k) / block;
                    for (r, (o, &x)) in or.iter_mut().zip(wr).enumerate() {
                        *o = x * a[r * n + j];
                    }
                }
            });
        }
    }
    Ok(())
}

/// `grad_a[r, j] = Σ_{c in block j} g[r, c] · w[r, c]`, summed in index order within a block.
pub fn scale_grad_scale<T: Real>(g: &[T], w: &[T], s: &ScaleShape, grad_a: &mut [T]) -> Result<()> {
    check(s, w.len(), grad_a.len(), g.len())?;
    let (block, n) = (s.block(), s.groups);
    match s.layout {
        ScaleLayout::RowsOut => {
            let rt = rows_per_task(s.cols);
            let pieces: Vec<_> = g
                .chunks(rt * s.cols)
                .zip(w.chunks(rt * s.cols))
                .zip(grad_a.chunks_mut(rt * n))
                .collect();
            crate::parallel::for_each(pieces, |((gc, wc), ac)| {
                for ((gr, wr), ar) in gc
                    .chunks_exact(s.cols)
                    .zip(wc.chunks_exact(s.cols))
                    .zip(ac.chunks_exact_mut(n))
                {
                    for (j, aj) in ar.iter_mut().enumerate() {
                        let span = j * block..(j + 1) * block;
                        let mut acc = T::ZERO;
                        for (&x, &y) in gr[span.clone()].iter().zip(&wr[span]) {
                            acc = acc + x * y;
                        }
                        *aj = acc;
                    }
                }
            });
        }
        ScaleLayout::RowsIn => {
            // Reduce over the input rows of each block: one task per block j builds column j.
            let mut cols: Vec<Vec<T>> = vec![Vec::new(); n];
            let pieces: Vec<_> = cols.iter_mut().enumerate().collect();
            crate::parallel::for_each(pieces, |(j, col)| {
                let mut acc = vec![T::ZERO; s.rows];
                for c in j * block..(j + 1) * block {
                    let (gr, wr) = (
                        &g[c * s.rows..(c + 1) * s.rows],
                        &w[c * s.rows..(c + 1) * s.rows],
                    );
                    for ((a, &x), &y) in acc.iter_mut().zip(gr).zip(wr) {
                        *a = *a + x * y;
                    }
                }
                *col = acc;
            });
            for (j, col) in cols.iter().enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    grad_a[r * n + j] = v;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn forward_and_grads_match_definition_in_both_layouts() {
        let mut seed = 9;
        let (r, c, n) = (5usize, 12usize, 3usize);
        let w: Vec<f64> = (0..r * c).map(|_| lcg(&mut seed)).collect(); // [R, C]
        let a: Vec<f64> = (0..r * n).map(|_| lcg(&mut seed)).collect();
        let g: Vec<f64> = (0..r * c).map(|_| lcg(&mut seed)).collect();
        let s = ScaleShape::new(&[r as i64, c as i64], n as i64, ScaleLayout::RowsOut).unwrap();
        let mut out = vec![0.0; r * c];
        scale_forward(&w, &a, &s, &mut out).unwrap();
        let mut ga = vec![0.0; r * n];
        scale_grad_scale(&g, &w, &s, &mut ga).unwrap();
        for rr in 0..r {
            for cc in 0..c {
                assert_eq!(out[rr * c + cc], w[rr * c + cc] * a[rr * n + cc / 4]);
            }
            for j in 0..n {
                let want: f64 = (j * 4..j * 4 + 4)
                    .map(|cc| g[rr * c + cc] * w[rr * c + cc])
                    .sum();
                assert!((ga[rr * n + j] - want).abs() < 1e-12);
            }
        }
        // The same weight stored transposed ([C, R], Conv1D) gives the transposed result.
        let t = |x: &[f64]| -> Vec<f64> {
            (0..c)
                .flat_map(|cc| (0..r).map(move |rr| (cc, rr)))
                .map(|(cc, rr)| x[rr * c + cc])
                .collect()
        };
        let (wt, gt) = (t(&w), t(&g));
        let st = ScaleShape::new(&[c as i64, r as i64], n as i64, ScaleLayout::RowsIn).unwrap();
        let mut out_t = vec![0.0; r * c];
        scale_forward(&wt, &a, &st, &mut out_t).unwrap();
        assert_eq!(out_t, t(&out));
        let mut ga_t = vec![0.0; r * n];
        scale_grad_scale(&gt, &wt, &st, &mut ga_t).unwrap();
        for (x, y) in ga_t.iter().zip(&ga) {
            assert!((x - y).abs() < 1e-12);
        }
    }

    #[test]
    fn rejects_bad_groups_and_shapes() {
        assert!(ScaleShape::new(&[4, 6], 4, ScaleLayout::RowsOut).is_err());
        assert!(ScaleShape::new(&[4, 6], 0, ScaleLayout::RowsOut).is_err());
        assert!(ScaleShape::new(&[4, 6, 2], 2, ScaleLayout::RowsOut).is_err());
        let s = ScaleShape::new(&[4, 6], 2, ScaleLayout::RowsOut).unwrap();
        let mut out = vec![0f32; 24];
        assert!(scale_forward(&[0f32; 24], &[1f32; 7], &s, &mut out).is_err());
    }
}
