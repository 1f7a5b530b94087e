//! The fused AdamS step on contiguous CPU slices (the fast path): f32 here, bf16 / fp16
//! through the loops of [`crate::adams_lp`] ([`StepElem`] picks them).
//!
//! One pass over memory per tensor: each tile of a few thousand elements (whole N:M blocks)
//! first refreshes or unpacks its mask bits, then runs one vectorisable element loop that
//! updates μ, v and θ. The tile stays in L1/L2 between the two, so θ is read from RAM once.
//!
//! Per element, with keep flag m (always 1 in a dense tensor), step s, α = min(1, s / T):
//!
//! ```text
//! θ  ← θ · (1 − γ·wd)                                  (decoupled weight decay, AdamW)
//! μ  ← μ + (1 − β1)·(g − μ)                            (= β1·μ + (1 − β1)·g, as torch's lerp_)
//! μ̃  = μ                        if m = 1
//! μ̃  = (1 − α)·μ + α·λ·sign(θ)  if m = 0
//! v  ← β2·v + (1 − β2)·x²,  x = μ̃ for sparse tensors, x = g for dense ones (plain AdamW)
//! θ  ← θ − (γ / (1 − β1^s)) · μ̃ / (sqrt(v) · (1 / sqrt(1 − β2^s)) + ε)
//! ```
//!
//! The operation order mirrors `torch.optim.AdamW`'s single-tensor code so dense tensors agree
//! with it to rounding. The mask of a sparse tensor is recomputed from θ (before any update of
//! this step) when `refresh` is set.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::adams_lp::{dense_tile_lp, f16_tile_f16c, sparse_tile_lp, KeepFlags};
use crate::error::{Arg, CastError, Result};
use crate::nm::{
    keep_flags, pack_bits, packed_len, unpack_flags, Bf16Bits, F16Bits, GroupLayout, MaskKey,
};

/// Hyper-parameters shared by every tensor of one call (one param group).
#[derive(Debug, Clone, Copy)]
pub struct AdamsHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// λ, the L1 decay target of masked-out weights.
    pub l1_decay: f64,
    /// r: a masked-out weight's step is r times a kept weight's (lr·r instead of lr). 1 is
    /// the paper's AdamS; r > 1 lets the masked weights reach zero sooner while the kept
    /// weights keep the gentler rate (docs/sparsity_tax.md, finding 25).
    pub masked_lr_scale: f64,
}

impl AdamsHyper {
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |name: &'static str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(CastError::value(
                    name,
                    format!("expected a finite value >= 0, got {x}"),
                ))
            }
        };
        finite_nonneg("lr", self.lr)?;
        finite_nonneg("eps", self.eps)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("l1_decay", self.l1_decay)?;
        if !(self.masked_lr_scale.is_finite() && self.masked_lr_scale > 0.0) {
            return Err(CastError::value(
                "masked_lr_scale",
                format!("expected a finite value > 0, got {}", self.masked_lr_scale),
            ));
        }
        for (name, b) in [("betas[0]", self.beta1), ("betas[1]", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(CastError::value(
                    name,
                    format!("expected a value in [0, 1), got {b}"),
                ));
            }
        }
        Ok(())
    }
}

/// One hyperparameter per tensor, for `k` tensors: `values` (one finite value >= 0 each) when
/// given, else the group's `default` for all. `name` is the argument's name in errors, which
/// name the offending entry (AdamS's relative λ: `l1_decays`; weight-scale parameters, which
/// take no weight decay: `weight_decays`).
pub fn per_tensor(
    name: &'static str,
    values: Option<Vec<f64>>,
    default: f64,
    k: usize,
) -> Result<Vec<f64>> {
    match values {
        None => Ok(vec![default; k]),
        Some(v) => {
            if v.len() != k {
                return Err(CastError::value(
                    name,
                    format!("expected {k} entries (one per parameter), got {}", v.len()),
                ));
            }
            for (i, &x) in v.iter().enumerate() {
                if !(x.is_finite() && x >= 0.0) {
                    return Err(CastError::value(
                        Arg::at(name, i),
                        format!("expected a finite value >= 0, got {x}"),
                    ));
                }
            }
            Ok(v)
        }
    }
}

/// Per-tensor scalars of one step, derived once from the step number.
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    pub step_size: f32,
    /// The step size of masked-out weights: lr·r / (1 − β1^s). Equal to `step_size` bit for
    /// bit when r = 1 (lr·1 is lr exactly), so the paper's update is unchanged.
    pub masked_step_size: f32,
    /// 1 / sqrt(1 − β2^s): a multiply instead of a per-element divide (within 1 ulp of
    /// torch's `sqrt(v) / bias_correction2_sqrt`).
    pub inv_bc2_sqrt: f32,
    /// sqrt(1 − β2^s), for the 16-bit loops, which divide as torch's fused kernel does.
    pub bc2_sqrt: f32,
    pub wd_factor: f32,
    /// α·λ and 1 − α for the decay of masked-out weights.
    pub alpha_l1: f32,
    pub one_minus_alpha: f32,
    pub refresh: bool,
    /// Step-independent constants of the element loops, in the loops' f32.
    pub b1c: f32,
    pub b2: f32,
    pub b2c: f32,
    pub eps: f32,
    /// Whether decoupled weight decay is on (`wd_factor` applies).
    pub decay: bool,
}

impl StepScalars {
    /// `step` is s (already incremented, ≥ 1). `total_steps`/`mask_interval` matter only for
    /// sparse tensors.
    pub fn new(h: &AdamsHyper, step: f64, total_steps: Option<f64>, mask_interval: u64) -> Self {
        let bc1 = 1.0 - h.beta1.powf(step);
        let bc2 = 1.0 - h.beta2.powf(step);
        let alpha = match total_steps {
            Some(t) if t > 0.0 => (step / t).min(1.0),
            _ => 1.0,
        };
        let s = step.max(1.0) as u64;
        StepScalars {
            step_size: (h.lr / bc1) as f32,
            masked_step_size: (h.lr * h.masked_lr_scale / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            wd_factor: (1.0 - h.lr * h.weight_decay) as f32,
            alpha_l1: (alpha * h.l1_decay) as f32,
            one_minus_alpha: (1.0 - alpha) as f32,
            refresh: mask_interval > 0 && (s - 1).is_multiple_of(mask_interval),
            b1c: (1.0 - h.beta1) as f32,
            b2: h.beta2 as f32,
            b2c: (1.0 - h.beta2) as f32,
            eps: h.eps as f32,
            decay: h.weight_decay != 0.0,
        }
    }
}

/// An element type of the fast path: its element loops. The mask of a sparse tensor is
/// computed from θ through [`MaskKey`] (the magnitude order, on the stored values).
pub trait StepElem: MaskKey {
    fn dense_tile(
        theta: &mut [Self],
        grad: &[Self],
        mu: &mut [Self],
        v: &mut [Self],
        sc: &StepScalars,
    );
    fn sparse_tile(
        theta: &mut [Self],
        grad: &[Self],
        mu: &mut [Self],
        v: &mut [Self],
        keep: &[u8],
        sc: &StepScalars,
    );
    /// The sparse loop reading the packed mask bits directly, where a specialised one exists
    /// and the CPU runs it; `false` (nothing done) otherwise.
    #[inline(always)]
    fn sparse_tile_bits(
        _theta: &mut [Self],
        _grad: &[Self],
        _mu: &mut [Self],
        _v: &mut [Self],
        _bits: &[u8],
        _sc: &StepScalars,
    ) -> bool {
        false
    }
}

impl StepElem for f32 {
    #[inline(always)]
    fn dense_tile(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        sc: &StepScalars,
    ) {
        dense_tile(theta, grad, mu, v, sc)
    }
    #[inline(always)]
    fn sparse_tile(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        keep: &[u8],
        sc: &StepScalars,
    ) {
        sparse_tile(theta, grad, mu, v, keep, sc)
    }
    #[inline(always)]
    fn sparse_tile_bits(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        bits: &[u8],
        sc: &StepScalars,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::level() == crate::simd::Level::Avx512 {
            // SAFETY: AVX-512F is present (checked by `simd::level`); the slice and mask
            // lengths it reads are asserted inside it.
            unsafe { avx512::sparse_tile_bits(theta, grad, mu, v, bits, sc) };
            return true;
        }
        let _ = (theta, grad, mu, v, bits, sc);
        false
    }
}

impl StepElem for Bf16Bits {
    #[inline(always)]
    fn dense_tile(
        theta: &mut [Bf16Bits],
        grad: &[Bf16Bits],
        mu: &mut [Bf16Bits],
        v: &mut [Bf16Bits],
        sc: &StepScalars,
    ) {
        dense_tile_lp(theta, grad, mu, v, sc)
    }
    #[inline(always)]
    fn sparse_tile(
        theta: &mut [Bf16Bits],
        grad: &[Bf16Bits],
        mu: &mut [Bf16Bits],
        v: &mut [Bf16Bits],
        keep: &[u8],
        sc: &StepScalars,
    ) {
        sparse_tile_lp(theta, grad, mu, v, keep, sc)
    }
}

impl StepElem for F16Bits {
    // F16C converts 8 values per instruction where the portable conversion takes about ten
    // operations per value; the tail (and a CPU without F16C) uses the portable loops.
    #[inline(always)]
    fn dense_tile(
        theta: &mut [F16Bits],
        grad: &[F16Bits],
        mu: &mut [F16Bits],
        v: &mut [F16Bits],
        sc: &StepScalars,
    ) {
        let d = f16_tile_f16c(theta, grad, mu, v, KeepFlags::Dense, sc);
        dense_tile_lp(&mut theta[d..], &grad[d..], &mut mu[d..], &mut v[d..], sc)
    }
    #[inline(always)]
    fn sparse_tile(
        theta: &mut [F16Bits],
        grad: &[F16Bits],
        mu: &mut [F16Bits],
        v: &mut [F16Bits],
        keep: &[u8],
        sc: &StepScalars,
    ) {
        let d = f16_tile_f16c(theta, grad, mu, v, KeepFlags::Bytes(keep), sc);
        sparse_tile_lp(
            &mut theta[d..],
            &grad[d..],
            &mut mu[d..],
            &mut v[d..],
            &keep[d..],
            sc,
        )
    }
    /// The F16C loop reads the packed bits as lane masks (no unpacking pass); the tail of
    /// fewer than 8 elements takes the portable loop with its flags unpacked.
    #[inline(always)]
    fn sparse_tile_bits(
        theta: &mut [F16Bits],
        grad: &[F16Bits],
        mu: &mut [F16Bits],
        v: &mut [F16Bits],
        bits: &[u8],
        sc: &StepScalars,
    ) -> bool {
        if crate::simd::level() == crate::simd::Level::Baseline {
            return false;
        }
        let n = theta.len();
        let d = f16_tile_f16c(theta, grad, mu, v, KeepFlags::Bits(bits), sc);
        if d < n {
            // Fewer than 8 flags (d is a multiple of 8): unpacked on the stack.
            let mut tail = [0u8; 8];
            for (i, flag) in (d..n).zip(tail.iter_mut()) {
                *flag = (bits[i / 8] >> (i % 8)) & 1;
            }
            sparse_tile_lp(
                &mut theta[d..],
                &grad[d..],
                &mut mu[d..],
                &mut v[d..],
                &tail[..n - d],
                sc,
            );
        }
        true
    }
}

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

#[inline(always)]
pub(crate) fn sign(x: f32) -> f32 {
    // As torch.sign (which the generic path uses): +1, -1, and +0 for ±0 and for NaN.
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Element loop of a dense tensor: plain AdamW.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_tile(
    theta: &mut [f32],
    grad: &[f32],
    mu: &mut [f32],
    v: &mut [f32],
    sc: &StepScalars,
) {
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    let (grad, mu, v) = (&grad[..n], &mut mu[..n], &mut v[..n]);
    for i in 0..n {
        let mut th = theta[i];
        if decay {
            th *= sc.wd_factor;
        }
        let g = grad[i];
        let m_old = mu[i];
        let m = m_old + b1c * (g - m_old);
        mu[i] = m;
        let vv = v[i] * b2 + (b2c * g) * g;
        v[i] = vv;
        let denom = vv.sqrt() * sc.inv_bc2_sqrt + eps;
        theta[i] = th + (-sc.step_size * m) / denom;
    }
}

/// Element loop of a sparse tensor: AdamS with keep flags (0/1 bytes) for this tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_tile(
    theta: &mut [f32],
    grad: &[f32],
    mu: &mut [f32],
    v: &mut [f32],
    keep: &[u8],
    sc: &StepScalars,
) {
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    let (grad, mu, v, keep) = (&grad[..n], &mut mu[..n], &mut v[..n], &keep[..n]);
    for i in 0..n {
        let mut th = theta[i];
        if decay {
            th *= sc.wd_factor;
        }
        let g = grad[i];
        let m_old = mu[i];
        let m = m_old + b1c * (g - m_old);
        mu[i] = m;
        let decayed = sc.one_minus_alpha * m + sc.alpha_l1 * sign(th);
        let (mt, ss) = if keep[i] != 0 {
            (m, sc.step_size)
        } else {
            (decayed, sc.masked_step_size)
        };
        let vv = v[i] * b2 + (b2c * mt) * mt;
        v[i] = vv;
        let denom = vv.sqrt() * sc.inv_bc2_sqrt + eps;
        theta[i] = th + (-ss * mt) / denom;
    }
}

/// The sparse element loop with AVX-512 intrinsics, reading the packed mask bits directly as
/// lane masks (no unpacking). The operations and their order are exactly those of
/// [`sparse_tile`], so the results are bit-identical to it.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::StepScalars;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F; `grad`, `mu`, `v` must be at least `theta.len()` long
    /// and `bits` at least `ceil(theta.len() / 8)` bytes.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sparse_tile_bits(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        bits: &[u8],
        sc: &StepScalars,
    ) {
        let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
        let n = theta.len();
        assert!(grad.len() >= n && mu.len() >= n && v.len() >= n && bits.len() * 8 >= n);
        let (vb1c, vb2, vb2c, veps) = (
            _mm512_set1_ps(b1c),
            _mm512_set1_ps(b2),
            _mm512_set1_ps(b2c),
            _mm512_set1_ps(eps),
        );
        let (vwd, vinv, vneg, vneg_masked) = (
            _mm512_set1_ps(sc.wd_factor),
            _mm512_set1_ps(sc.inv_bc2_sqrt),
            _mm512_set1_ps(-sc.step_size),
            _mm512_set1_ps(-sc.masked_step_size),
        );
        let (v1ma, val1) = (
            _mm512_set1_ps(sc.one_minus_alpha),
            _mm512_set1_ps(sc.alpha_l1),
        );
        let (zero, neg_val1) = (_mm512_setzero_ps(), _mm512_set1_ps(-sc.alpha_l1));
        let full = n / 16;
        let (tp, gp, mp, vp) = (
            theta.as_mut_ptr(),
            grad.as_ptr(),
            mu.as_mut_ptr(),
            v.as_mut_ptr(),
        );
        for c in 0..full {
            let o = c * 16;
            // SAFETY: o + 16 <= n for every full chunk; all slices hold at least n elements
            // (asserted above) and 2c + 1 < ceil(n / 8) mask bytes.
            unsafe {
                let keep: __mmask16 = u16::from_le_bytes([
                    *bits.get_unchecked(2 * c),
                    *bits.get_unchecked(2 * c + 1),
                ]);
                let mut th = _mm512_loadu_ps(tp.add(o));
                if decay {
                    th = _mm512_mul_ps(th, vwd);
                }
                let g = _mm512_loadu_ps(gp.add(o));
                let m_old = _mm512_loadu_ps(mp.add(o));
                let m = _mm512_add_ps(m_old, _mm512_mul_ps(vb1c, _mm512_sub_ps(g, m_old)));
                _mm512_storeu_ps(mp.add(o), m);
                // sign: +1 / -1, and +0 elsewhere (±0, NaN), as `sign`.
                // αλ·sign(θ) without the multiply: ±αλ exactly, and αλ·0 == +0 because αλ
                // is finite and >= 0 (validated), so the scalar path agrees bit for bit.
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(th, zero);
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(th, zero);
                let sgn_l1 =
                    _mm512_mask_blend_ps(lt, _mm512_mask_blend_ps(gt, zero, val1), neg_val1);
                let decayed = _mm512_add_ps(_mm512_mul_ps(v1ma, m), sgn_l1);
                let mt = _mm512_mask_blend_ps(keep, decayed, m);
                let vv = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_loadu_ps(vp.add(o)), vb2),
                    _mm512_mul_ps(_mm512_mul_ps(vb2c, mt), mt),
                );
                _mm512_storeu_ps(vp.add(o), vv);
                let denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vv), vinv), veps);
                let neg_ss = _mm512_mask_blend_ps(keep, vneg_masked, vneg);
                let upd = _mm512_div_ps(_mm512_mul_ps(neg_ss, mt), denom);
                _mm512_storeu_ps(tp.add(o), _mm512_add_ps(th, upd));
            }
        }
        // Tail (< 16 elements): the scalar tile, on unpacked flags.
        let tail = full * 16;
        if tail < n {
            let mut flags = [0u8; 16];
            let flags = &mut flags[..n - tail];
            crate::nm::unpack_flags(&bits[tail / 8..], flags);
            super::sparse_tile(
                &mut theta[tail..],
                &grad[tail..n],
                &mut mu[tail..n],
                &mut v[tail..n],
                flags,
                sc,
            );
        }
    }
}

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

/// Changed groups straight from the packed masks, when every group is whole bytes or an
/// aligned bit field of one byte (last-dimension groups, M in {2, 4, 8, 16, 32}), or when
/// dim-0 groups have rows of whole bytes (stride a multiple of 8); padding bits are zero in
/// both. `None` for other layouts.
#[inline(always)]
fn changed_groups_packed(old: &[u8], new: &[u8], layout: &GroupLayout) -> Option<u64> {
    if layout.stride != 1 {
        return changed_groups_packed_rows(old, new, layout);
    }
    let m = layout.pattern.m;
    match m {
        2 | 4 | 8 => {
            // OR-fold each m-bit field onto its lowest bit, keep those bits, count them.
            let low: u64 = match m {
                2 => 0x5555_5555_5555_5555,
                4 => 0x1111_1111_1111_1111,
                _ => 0x0101_0101_0101_0101,
            };
            let fold = |mut x: u64| {
                let mut shift = 1;
                while shift < m {
                    x |= x >> shift;
                    shift *= 2;
                }
                (x & low).count_ones() as u64
            };
            let mut count = 0u64;
            let (oc, nc) = (old.chunks_exact(8), new.chunks_exact(8));
            let (orest, nrest) = (oc.remainder(), nc.remainder());
            for (a, b) in oc.zip(nc) {
                count += fold(
                    u64::from_le_bytes(a.try_into().unwrap())
                        ^ u64::from_le_bytes(b.try_into().unwrap()),
                );
            }
            for (&a, &b) in orest.iter().zip(nrest) {
                count += fold((a ^ b) as u64);
            }
            Some(count)
        }
        16 | 32 => Some(
            old.chunks(m / 8)
                .zip(new.chunks(m / 8))
                .filter(|(a, b)| a != b)
                .count() as u64,
        ),
        _ => None,
    }
}

/// Dim-0 groups (`stride` = row length `s`): a block is M rows of `s` bits and group `g` is
/// bit `g` of every row. With `s % 8 == 0` rows are whole bytes, so OR-ing the M rows' XORs
/// byte by byte leaves one bit per changed group: no unpacking into flags.
fn changed_groups_packed_rows(old: &[u8], new: &[u8], layout: &GroupLayout) -> Option<u64> {
    let (m, s) = (layout.pattern.m, layout.stride);
    if s == 0 || s % 8 != 0 {
        return None;
    }
    let row = s / 8;
    let mut count = 0u64;
    for (ob, nb) in old.chunks_exact(m * row).zip(new.chunks_exact(m * row)) {
        for k in 0..row {
            let mut acc = 0u8;
            for j in 0..m {
                acc |= ob[j * row + k] ^ nb[j * row + k];
            }
            count += acc.count_ones() as u64;
        }
    }
    Some(count)
}

/// Number of groups (whole blocks of `layout` in `old`/`new`) whose keep flags differ.
fn changed_groups(old: &[u8], new: &[u8], layout: &GroupLayout) -> u64 {
    let (m, s) = (layout.pattern.m, layout.stride);
    let mut count = 0u64;
    for (ob, nb) in old.chunks_exact(m * s).zip(new.chunks_exact(m * s)) {
        for g in 0..s {
            count += (0..m).any(|j| ob[g + j * s] != nb[g + j * s]) as u64;
        }
    }
    count
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nm::{GroupDim, NmPattern};

    #[test]
    fn per_tensor_defaults_checks_length_and_values() {
        assert_eq!(
            per_tensor("l1_decays", None, 0.25, 3).unwrap(),
            vec![0.25; 3]
        );
        assert_eq!(
            per_tensor("l1_decays", Some(vec![0.0, 2.0]), 0.25, 2).unwrap(),
            vec![0.0, 2.0]
        );
        let e = per_tensor("weight_decays", Some(vec![1.0]), 0.25, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("weight_decays") && e.contains("expected 2 entries"),
            "{e}"
        );
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let e = per_tensor("l1_decays", Some(vec![1.0, bad]), 0.25, 2)
                .unwrap_err()
                .to_string();
            assert!(e.contains("l1_decays[1]"), "{e}");
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Straightforward scalar reference in f64 arithmetic, one element at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference_step(
        th: &mut [f64],
        g: &[f64],
        mu: &mut [f64],
        v: &mut [f64],
        keep: Option<&[u8]>,
        h: &AdamsHyper,
        s: f64,
        t: f64,
    ) {
        let alpha = (s / t).min(1.0);
        for i in 0..th.len() {
            th[i] *= 1.0 - h.lr * h.weight_decay;
            mu[i] = h.beta1 * mu[i] + (1.0 - h.beta1) * g[i];
            let (mt, x, lr) = match keep {
                None => (mu[i], g[i], h.lr),
                Some(k) if k[i] == 1 => (mu[i], mu[i], h.lr),
                Some(_) => {
                    let sg = if th[i] > 0.0 {
                        1.0
                    } else if th[i] < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    let d = (1.0 - alpha) * mu[i] + alpha * h.l1_decay * sg;
                    (d, d, h.lr * h.masked_lr_scale)
                }
            };
            v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * x * x;
            let denom = (v[i] / (1.0 - h.beta2.powf(s))).sqrt() + h.eps;
            th[i] -= lr * (mt / (1.0 - h.beta1.powf(s))) / denom;
        }
    }

    fn run(sparse: bool, shape: [usize; 2], dim: GroupDim, steps: usize) {
        run_scaled(sparse, shape, dim, steps, 1.0)
    }

    /// `masked_lr_scale` = `r`.
    fn run_scaled(sparse: bool, shape: [usize; 2], dim: GroupDim, steps: usize, r: f64) {
        let h = AdamsHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            l1_decay: 0.05,
            masked_lr_scale: r,
        };
        let total = 20.0;
        let interval = 3;
        let n = shape[0] * shape[1];
        let mut seed = 42u64;
        let mut th: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let mut mu = vec![0f32; n];
        let mut v = vec![0f32; n];
        let mut bits = vec![0u8; packed_len(n)];
        let mut th64: Vec<f64> = th.iter().map(|&x| x as f64).collect();
        let mut mu64 = vec![0f64; n];
        let mut v64 = vec![0f64; n];
        // Dense tensors need no layout; any divisible shape serves for the type.
        let layout = if sparse {
            GroupLayout::new(
                NmPattern::new(2, 4).unwrap(),
                &[shape[0] as i64, shape[1] as i64],
                dim,
                "w",
            )
            .unwrap()
        } else {
            GroupLayout::new(
                NmPattern::new(2, 4).unwrap(),
                &[n as i64 * 4],
                GroupDim::Last,
                "w",
            )
            .unwrap()
        };
        let mut keep_ref = vec![0u8; n];
        for s in 1..=steps {
            let g: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 0.1).collect();
            let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
            let scalars = StepScalars::new(&h, s as f64, Some(total), interval);
            if sparse && scalars.refresh {
                // The reference mask comes from the fast path's own f32 θ so that both
                // sides decay the same weights; mask correctness is tested in nm.rs.
                crate::nm::nm_keep(&th, &layout, &mut keep_ref).unwrap();
            }
            let t = AdamsTensor {
                theta: &mut th,
                grad: &g,
                exp_avg: &mut mu,
                exp_avg_sq: &mut v,
                mask: if sparse {
                    Some((&mut bits, layout))
                } else {
                    None
                },
                scalars,
            };
            adams_step_fused(vec![t], &h).unwrap();
            reference_step(
                &mut th64,
                &g64,
                &mut mu64,
                &mut v64,
                sparse.then_some(&keep_ref[..]),
                &h,
                s as f64,
                total,
            );
        }
        // A masked weight's μ̃ = (1 − α)μ + αλ·sign(θ) can cancel to ~0, where sqrt(v) is
        // comparable to ε and f32 vs f64 rounding changes the step (by at most ~lr/(1 − β1)).
        // So: almost every element must agree tightly, and every element within a few lr.
        let mut loose = 0;
        for i in 0..n {
            let d = (th[i] as f64 - th64[i]).abs();
            let tight = d <= 1e-5 + 1e-4 * th64[i].abs()
                && (mu[i] as f64 - mu64[i]).abs() <= 1e-6 + 1e-4 * mu64[i].abs()
                && (v[i] as f64 - v64[i]).abs() <= 1e-12 + 1e-3 * v64[i].abs();
            loose += !tight as usize;
            assert!(
                d <= 30.0 * h.lr * r.max(1.0),
                "θ[{i}] {} vs {}",
                th[i],
                th64[i]
            );
        }
        assert!(
            loose * 1000 <= n,
            "{loose} of {n} elements differ beyond rounding"
        );
        if sparse {
            let mut unpacked = vec![0u8; n];
            unpack_flags(&bits, &mut unpacked);
            assert_eq!(unpacked, keep_ref);
        }
    }

    #[test]
    fn dense_matches_reference() {
        run(false, [37, 53], GroupDim::Last, 30);
    }

    #[test]
    fn sparse_last_dim_matches_reference() {
        run(true, [33, 64], GroupDim::Last, 30);
        run(true, [300, 1024], GroupDim::Last, 12);
    }

    #[test]
    fn sparse_dim0_matches_reference() {
        run(true, [64, 33], GroupDim::First, 30);
    }

    #[test]
    fn masked_lr_scale_matches_reference() {
        // Masked weights stepping 2.5x (and 0.5x) the kept weights' lr, on both group
        // layouts; a dense tensor ignores it.
        run_scaled(true, [33, 64], GroupDim::Last, 30, 2.5);
        run_scaled(true, [64, 33], GroupDim::First, 30, 0.5);
        run_scaled(false, [37, 53], GroupDim::Last, 30, 2.5);
    }

    #[test]
    fn masked_lr_scale_one_is_the_paper_step_bit_for_bit() {
        let h = AdamsHyper {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            l1_decay: 0.1,
            masked_lr_scale: 1.0,
        };
        for s in [1.0, 7.0, 1000.0] {
            let sc = StepScalars::new(&h, s, Some(100.0), 10);
            assert_eq!(sc.masked_step_size.to_bits(), sc.step_size.to_bits());
        }
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = AdamsHyper {
                masked_lr_scale: bad,
                ..h
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("masked_lr_scale:"), "{e}");
        }
    }

    #[test]
    fn avx512_tile_is_bit_identical_to_scalar_tile() {
        if crate::simd::level() != crate::simd::Level::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512 (the scalar tile is what runs here)");
            return;
        }
        let h = AdamsHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            l1_decay: 0.03,
            masked_lr_scale: 2.0, // the blend of the two step sizes is exercised too
        };
        let mut seed = 5u64;
        let n = 4096 + 13; // a tail that is not a multiple of 16
        let mut th: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        th[0] = 0.0;
        th[1] = -0.0;
        th[2] = f32::NAN;
        th[3] = f32::INFINITY;
        th[4] = 1e-40; // subnormal
        let g: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 0.1).collect();
        let mu0: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * 0.01).collect();
        let v0: Vec<f32> = (0..n).map(|_| lcg(&mut seed).abs() * 1e-4).collect();
        let bits: Vec<u8> = (0..packed_len(n))
            .map(|_| (lcg(&mut seed) * 1e6) as i64 as u8)
            .collect();
        let mut flags = vec![0u8; n];
        unpack_flags(&bits, &mut flags);
        let sc = StepScalars::new(&h, 7.0, Some(20.0), 10);
        let (mut th_a, mut mu_a, mut v_a) = (th.clone(), mu0.clone(), v0.clone());
        sparse_tile(&mut th_a, &g, &mut mu_a, &mut v_a, &flags, &sc);
        let (mut th_b, mut mu_b, mut v_b) = (th.clone(), mu0.clone(), v0.clone());
        // SAFETY: AVX-512 checked above; equal lengths.
        unsafe { avx512::sparse_tile_bits(&mut th_b, &g, &mut mu_b, &mut v_b, &bits, &sc) };
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&th_a, &th_b) && same(&mu_a, &mu_b) && same(&v_a, &v_b));
    }

    #[test]
    fn masked_weights_shrink_late_in_training() {
        // With α = 1 and no gradient, a masked weight moves towards 0 by about lr per step.
        let h = AdamsHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            l1_decay: 1e-3,
            masked_lr_scale: 1.0,
        };
        let mut th = vec![1.0f32, 0.5, -0.5, -1.0];
        let (mut mu, mut v, mut bits) = (vec![0f32; 4], vec![0f32; 4], vec![0u8; 1]);
        let layout =
            GroupLayout::new(NmPattern::new(2, 4).unwrap(), &[1, 4], GroupDim::Last, "w").unwrap();
        for s in 1..=10 {
            let t = AdamsTensor {
                theta: &mut th,
                grad: &[0.0; 4],
                exp_avg: &mut mu,
                exp_avg_sq: &mut v,
                mask: Some((&mut bits, layout)),
                scalars: StepScalars::new(&h, s as f64, Some(1.0), 10),
            };
            adams_step_fused(vec![t], &h).unwrap();
        }
        assert_eq!(bits[0], 0b1001);
        assert_eq!(
            (th[0], th[3]),
            (1.0, -1.0),
            "kept weights without gradient stay put"
        );
        // μ = 0, so μ̃ = λ·sign(θ) and v̂ = λ²: each step moves a masked weight by
        // lr / (1 − β1^s) (the spec applies μ's bias correction to μ̃ as well).
        let travel: f32 = (1..=10).map(|s| 1e-2 / (1.0 - 0.9f32.powi(s))).sum();
        assert!(
            (th[1] - (0.5 - travel)).abs() < 1e-4 && (th[2] + 0.5 - travel).abs() < 1e-4,
            "{th:?}"
        );
    }

    #[test]
    fn refresh_reports_changed_groups() {
        let h = AdamsHyper {
            lr: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            l1_decay: 0.0,
            masked_lr_scale: 1.0,
        };
        let layout =
            GroupLayout::new(NmPattern::new(2, 4).unwrap(), &[2, 8], GroupDim::Last, "w").unwrap();
        // 4 groups; the stored mask says "keep the first two" everywhere; θ agrees in groups
        // 0 and 2 only.
        let mut th = vec![
            9.0f32, 8.0, 1.0, 0.0, 0.0, 1.0, 8.0, 9.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 3.0, 3.0,
        ];
        let (mut mu, mut v) = (vec![0f32; 16], vec![0f32; 16]);
        let mut bits = vec![0b0011_0011u8, 0b0011_0011];
        let t = AdamsTensor {
            theta: &mut th,
            grad: &[0.0; 16],
            exp_avg: &mut mu,
            exp_avg_sq: &mut v,
            mask: Some((&mut bits, layout)),
            scalars: StepScalars::new(&h, 1.0, Some(10.0), 10),
        };
        assert_eq!(adams_step_fused(vec![t], &h).unwrap(), vec![Some(2)]);
        assert_eq!(bits, vec![0b1100_0011, 0b1100_0011]);
    }

    #[test]
    fn packed_and_flag_group_counts_agree() {
        let mut seed = 17u64;
        let cases = [2usize, 4, 8, 16, 32]
            .into_iter()
            .map(|m| ([3, (m * 5) as i64], GroupDim::Last, m))
            .chain(
                [(4usize, 8i64), (4, 24), (2, 16), (8, 8), (3, 32)]
                    .into_iter()
                    .map(
                        // dim-0 groups, rows of whole bytes
                        |(m, cols)| ([(m * 3) as i64, cols], GroupDim::First, m),
                    ),
            );
        for (shape, dim, m) in cases {
            let layout =
                GroupLayout::new(NmPattern::new(1, m as i64).unwrap(), &shape, dim, "w").unwrap();
            let n = (shape[0] * shape[1]) as usize;
            let a: Vec<u8> = (0..n).map(|_| (lcg(&mut seed) > 0.0) as u8).collect();
            let b: Vec<u8> = a
                .iter()
                .map(|&x| if lcg(&mut seed) > 0.7 { 1 - x } else { x })
                .collect();
            let (mut pa, mut pb) = (vec![0u8; packed_len(n)], vec![0u8; packed_len(n)]);
            pack_bits(&a, &mut pa);
            pack_bits(&b, &mut pb);
            assert_eq!(
                changed_groups_packed(&pa, &pb, &layout),
                Some(changed_groups(&a, &b, &layout)),
                "M={m} shape={shape:?} {dim:?}"
            );
        }
    }

    #[test]
    fn bad_lengths_leave_buffers_untouched() {
        let h = AdamsHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            l1_decay: 0.0,
            masked_lr_scale: 1.0,
        };
        let mut th = vec![1.0f32; 8];
        let (mut mu, mut v) = (vec![0f32; 8], vec![0f32; 7]);
        let good = AdamsTensor {
            theta: &mut th,
            grad: &[1.0; 8],
            exp_avg: &mut mu,
            exp_avg_sq: &mut v,
            mask: None,
            scalars: StepScalars::new(&h, 1.0, None, 10),
        };
        let err = adams_step_fused(vec![good], &h).unwrap_err();
        assert!(err.to_string().contains("exp_avg_sqs[0]"), "{err}");
        assert_eq!(th, vec![1.0; 8]);
        let bad = AdamsHyper { beta1: 1.0, ..h };
        assert!(bad.validate().unwrap_err().to_string().contains("betas[0]"));
    }
}
