//! Element loops of the fused AdamS step on bf16 / fp16 storage.
//!
//! Storage is the parameter's dtype, state included (as `torch.optim.AdamW(fused=True)` keeps
//! it); values are converted exactly to f32, the arithmetic is f32, and each stored value
//! (θ, μ, v) is rounded once, to nearest even ([`crate::half`]). μ and v enter the θ update
//! unrounded. The order of operations is that of torch's fused CPU AdamW kernel for these
//! dtypes (`FusedAdamKernel.cpp`, as compiled in the AVX2 / AVX-512 builds torch ships):
//!
//! ```text
//! θ  ← θ · f32(1 − γ·wd)
//! μ  ← fma(1 − β1, g − μ, μ)                    (its lerp_, fused multiply-add)
//! v  ← fma((1 − β2)·x, x, v·β2)                 (the compiler contracts this one)
//! θ  ← θ + (−γ/(1 − β1^s))·μ̃ / (sqrt(v) / f32(sqrt(1 − β2^s)) + ε)
//! ```
//!
//! with x = g for dense tensors and x = μ̃ (the f32 loops' μ̃, see [`crate::adams`]) for sparse
//! ones. The f32 fast path follows `AdamW(foreach=False)` instead (no FMA, a multiply by
//! 1 / sqrt(1 − β2^s)); the 16-bit path follows the fused kernel because that is what a bf16
//! user compares against, and because one rounding to 8 (bf16) or 11 (fp16) bits hides the
//! difference almost always but not always: matching the operations makes dense bf16/fp16
//! groups bit-identical to `AdamW(fused=True)` (tested).
//!
//! `f32::mul_add` is a single FMA instruction inside [`crate::simd::dispatch`] (AVX2+FMA,
//! AVX-512) and a correctly rounded library call on the baseline target: the same result.
//!
//! The AVX-512 BF16 conversion `vcvtneps2bf16` is deliberately not used for f32 → bf16: it
//! flushes subnormal inputs to zero (measured on an AVX-512 BF16 CPU: 1e-39 gives 0x0000 where
//! round-to-nearest-even gives 0x000B), and torch's own conversion (`c10::BFloat16`, scalar
//! and vectorised) rounds them, so a dense bf16 group would stop being bit-identical to
//! `AdamW(fused=True)` wherever a weight or a moment falls below 1.2e-38 (v often does). The
//! integer rounding vectorises to a few instructions per 16 values and the loop is
//! memory-bound: the sparse bf16 step costs 0.98–1.03x fused AdamW without it.
//!
//! The fp16 loops with the F16C instructions are in `f16c`.

use super::scalars::{sign, StepScalars};
use crate::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use crate::nm::{Bf16Bits, F16Bits};

/// A 16-bit floating storage type, converted exactly to f32 and rounded back once.
pub trait LowPrecision: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl LowPrecision for Bf16Bits {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16Bits(f32_to_bf16(x))
    }
}

impl LowPrecision for F16Bits {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F16Bits(f32_to_f16(x))
    }
}

/// The per-element arithmetic, in f32: returns (θ', μ', v') before rounding. `keep` is
/// `None` for a dense tensor (plain AdamW), `Some(flag)` for a sparse one.
#[inline(always)]
fn element(
    th: f32,
    g: f32,
    m_old: f32,
    v_old: f32,
    keep: Option<bool>,
    sc: &StepScalars,
) -> (f32, f32, f32) {
    let th = if sc.decay { th * sc.wd_factor } else { th };
    let m = sc.b1c.mul_add(g - m_old, m_old);
    let (x, mt, ss) = match keep {
        None => (g, m, sc.step_size),
        Some(k) => {
            // Both sides computed, then a select: the keep flags of a 2:4 tensor alternate
            // unpredictably, and a branch on them would mispredict half the time.
            let decayed = sc.one_minus_alpha * m + sc.alpha_l1 * sign(th);
            let (mt, ss) = if k {
                (m, sc.step_size)
            } else {
                (decayed, sc.masked_step_size)
            };
            (mt, mt, ss)
        }
    };
    let vv = (sc.b2c * x).mul_add(x, v_old * sc.b2);
    let denom = vv.sqrt() / sc.bc2_sqrt + sc.eps;
    (th + (-ss * mt) / denom, m, vv)
}

/// Dense AdamW on 16-bit storage.
#[inline(always)]
pub fn dense_tile_lp<E: LowPrecision>(
    theta: &mut [E],
    grad: &[E],
    mu: &mut [E],
    v: &mut [E],
    sc: &StepScalars,
) {
    let n = theta.len();
    let (grad, mu, v) = (&grad[..n], &mut mu[..n], &mut v[..n]);
    for i in 0..n {
        let (t, m, vv) = element(
            theta[i].to_f32(),
            grad[i].to_f32(),
            mu[i].to_f32(),
            v[i].to_f32(),
            None,
            sc,
        );
        mu[i] = E::from_f32(m);
        v[i] = E::from_f32(vv);
        theta[i] = E::from_f32(t);
    }
}

/// Sparse AdamS on 16-bit storage, with keep flags (0/1 bytes) for this tile.
#[inline(always)]
pub fn sparse_tile_lp<E: LowPrecision>(
    theta: &mut [E],
    grad: &[E],
    mu: &mut [E],
    v: &mut [E],
    keep: &[u8],
    sc: &StepScalars,
) {
    let n = theta.len();
    let (grad, mu, v, keep) = (&grad[..n], &mut mu[..n], &mut v[..n], &keep[..n]);
    for i in 0..n {
        let (t, m, vv) = element(
            theta[i].to_f32(),
            grad[i].to_f32(),
            mu[i].to_f32(),
            v[i].to_f32(),
            Some(keep[i] != 0),
            sc,
        );
        mu[i] = E::from_f32(m);
        v[i] = E::from_f32(vv);
        theta[i] = E::from_f32(t);
    }
}
