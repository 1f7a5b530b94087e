//! One AdamS step over the tensors of a param group: every check first, then the tensors cut
//! into pieces for the thread pool, each piece into tiles of whole N:M blocks whose mask is
//! refreshed (or unpacked) right before the element loop runs on it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::changed_groups::{changed_groups, changed_groups_packed};
use super::elem::StepElem;
use super::hyper::AdamsHyper;
use super::scalars::StepScalars;
use crate::error::{Arg, CastError, Result};
use crate::nm::{keep_flags, pack_bits, packed_len, unpack_flags, GroupLayout};

/// One tensor's buffers for the fast path.
pub struct AdamsTensor<'a, E = f32> {
    pub theta: &'a mut [E],
    pub grad: &'a [E],
    pub exp_avg: &'a mut [E],
    pub exp_avg_sq: &'a mut [E],
    /// Packed mask and layout of a sparse tensor; `None` for a dense one.
    pub mask: Option<(&'a mut [u8], GroupLayout)>,
    pub scalars: StepScalars,
}

impl<E> AdamsTensor<'_, E> {
    pub fn validate(&self, index: usize) -> Result<()> {
        let n = self.theta.len();
        let check = |what: &str, len: usize| {
            if len != n {
                Err(CastError::value(
                    Arg::at(what.to_string(), index),
                    format!("expected {n} elements (the parameter's), got {len}"),
                ))
            } else {
                Ok(())
            }
        };
        check("grads", self.grad.len())?;
        check("exp_avgs", self.exp_avg.len())?;
        check("exp_avg_sqs", self.exp_avg_sq.len())?;
        if let Some((bits, layout)) = &self.mask {
            check("layout", layout.numel)?;
            if bits.len() != packed_len(n) {
                return Err(CastError::value(
                    Arg::at("masks", index),
                    format!(
                        "expected {} packed bytes for {n} weights, got {}",
                        packed_len(n),
                        bits.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

const TILE_TARGET: usize = 4096;

/// A contiguous piece of one tensor, processed by one parallel task.
struct Piece<'a, E> {
    theta: &'a mut [E],
    grad: &'a [E],
    mu: &'a mut [E],
    v: &'a mut [E],
    mask: Option<(&'a mut [u8], GroupLayout)>,
    tile: usize,
    scalars: StepScalars,
    /// Groups whose mask changed at this refresh, summed over the tensor's pieces.
    flips: &'a AtomicU64,
}

/// Runs a piece with the widest vector instructions this CPU has (see `simd`).
fn run_piece<E: StepElem>(p: Piece<'_, E>) {
    crate::simd::dispatch(
        #[inline(always)]
        || run_piece_impl(p),
    )
}

#[inline(always)]
fn run_piece_impl<E: StepElem>(p: Piece<'_, E>) {
    let sc = p.scalars;
    match p.mask {
        None => {
            // Dense: no tiling needed, the loop is purely element-wise.
            E::dense_tile(p.theta, p.grad, p.mu, p.v, &sc)
        }
        Some((bits, layout)) => {
            // No mask to compute: one pass over the whole piece, reading the bits as lane
            // masks where a specialised loop exists (pieces start on whole mask bytes).
            if !sc.refresh && E::sparse_tile_bits(p.theta, p.grad, p.mu, p.v, bits, &sc) {
                return;
            }
            let tile = p.tile;
            let mut flags = vec![0u8; tile];
            let mut old = if sc.refresh {
                vec![0u8; tile]
            } else {
                Vec::new()
            };
            let mut new_bits = if sc.refresh {
                vec![0u8; tile / 8 + 1]
            } else {
                Vec::new()
            };
            let mut flips = 0u64;
            let tiles = p
                .theta
                .chunks_mut(tile)
                .zip(p.grad.chunks(tile))
                .zip(p.mu.chunks_mut(tile))
                .zip(p.v.chunks_mut(tile))
                .zip(bits.chunks_mut(tile / 8));
            for ((((th, g), mu), v), b) in tiles {
                let len = th.len();
                if sc.refresh {
                    keep_flags(th, &layout, &mut flags[..len]);
                    let fresh = &mut new_bits[..b.len()];
                    pack_bits(&flags[..len], fresh);
                    flips += match changed_groups_packed(b, fresh, &layout) {
                        Some(n) => n,
                        None => {
                            unpack_flags(b, &mut old[..len]);
                            changed_groups(&old[..len], &flags[..len], &layout)
                        }
                    };
                    b.copy_from_slice(fresh);
                }
                // The slices have equal lengths and `b` holds ceil(len / 8) mask bytes.
                if E::sparse_tile_bits(th, g, mu, v, b, &sc) {
                    continue;
                }
                if !sc.refresh {
                    unpack_flags(b, &mut flags[..len]);
                }
                E::sparse_tile(th, g, mu, v, &flags[..len], &sc);
            }
            if flips > 0 {
                p.flips.fetch_add(flips, Ordering::Relaxed);
            }
        }
    }
}

/// One AdamS step over several tensors (one param group), in parallel across all of them.
///
/// Everything is validated before anything is written: on `Err`, no buffer has changed.
/// Returns, per tensor, the number of N:M groups whose mask changed if its mask was refreshed
/// at this step (`None` for dense tensors and steps without a refresh).
pub fn adams_step_fused<E: StepElem>(
    tensors: Vec<AdamsTensor<'_, E>>,
    h: &AdamsHyper,
) -> Result<Vec<Option<u64>>> {
    h.validate()?;
    for (i, t) in tensors.iter().enumerate() {
        t.validate(i)?;
    }
    let counters: Vec<AtomicU64> = tensors.iter().map(|_| AtomicU64::new(0)).collect();
    let refreshed: Vec<bool> = tensors
        .iter()
        .map(|t| t.mask.is_some() && t.scalars.refresh)
        .collect();
    let mut pieces: Vec<Piece<'_, E>> = Vec::new();
    for (t, flips) in tensors.into_iter().zip(&counters) {
        let n = t.theta.len();
        if n == 0 {
            continue;
        }
        match t.mask {
            None => {
                let c = crate::nm::chunk_len(8, n);
                let it = t
                    .theta
                    .chunks_mut(c)
                    .zip(t.grad.chunks(c))
                    .zip(t.exp_avg.chunks_mut(c))
                    .zip(t.exp_avg_sq.chunks_mut(c));
                for (((theta, grad), mu), v) in it {
                    pieces.push(Piece {
                        theta,
                        grad,
                        mu,
                        v,
                        mask: None,
                        tile: c,
                        scalars: t.scalars,
                        flips,
                    });
                }
            }
            Some((bits, layout)) => {
                let unit = layout.unit();
                let tile = (TILE_TARGET / unit).max(1) * unit;
                let c = crate::nm::chunk_len(tile, n);
                let it = t
                    .theta
                    .chunks_mut(c)
                    .zip(t.grad.chunks(c))
                    .zip(t.exp_avg.chunks_mut(c))
                    .zip(t.exp_avg_sq.chunks_mut(c))
                    .zip(bits.chunks_mut(c / 8));
                for ((((theta, grad), mu), v), b) in it {
                    pieces.push(Piece {
                        theta,
                        grad,
                        mu,
                        v,
                        mask: Some((b, layout)),
                        tile,
                        scalars: t.scalars,
                        flips,
                    });
                }
            }
        }
    }
    crate::parallel::for_each(pieces, run_piece);
    Ok(counters
        .iter()
        .zip(refreshed)
        .map(|(c, r)| r.then(|| c.load(Ordering::Relaxed)))
        .collect())
}
