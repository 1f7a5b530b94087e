//! Element loops of the fused AdamS step for bf16 / fp16 storage (issue 12), not yet called
//! by the step driver (`adams::adams_step_f32` handles f32 only; wiring these in, with the
//! dtype dispatch in `ops`/`checks`, is the next step).
//!
//! Storage is the parameter's dtype (as torch's fused AdamW keeps its state); the arithmetic
//! is the f32 loops' ([`crate::adams`]) operation for operation, on values converted exactly
//! from the stored dtype; each stored value (θ, μ, v) is rounded once, to nearest even
//! ([`crate::half`]). μ and v enter the θ update unrounded, as in torch's kernel. So each loop
//! here equals its f32 twin followed by one rounding of every output, which the tests check
//! bit for bit.

use crate::adams::{sign, StepScalars};
use crate::half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// A 16-bit floating storage type, converted exactly to f32 and rounded back once.
pub trait LowPrecision: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

/// bfloat16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// IEEE binary16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl LowPrecision for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16(f32_to_bf16(x))
    }
}

impl LowPrecision for F16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F16(f32_to_f16(x))
    }
}

/// Dense AdamW on 16-bit storage (see [`crate::adams`] for the formula).
#[inline(always)]
pub fn dense_tile_lp<E: LowPrecision>(
    theta: &mut [E],
    grad: &[E],
    mu: &mut [E],
    v: &mut [E],
    sc: &StepScalars,
) {
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    let (grad, mu, v) = (&grad[..n], &mut mu[..n], &mut v[..n]);
    for i in 0..n {
        let mut th = theta[i].to_f32();
        if decay {
            th *= sc.wd_factor;
        }
        let g = grad[i].to_f32();
        let m_old = mu[i].to_f32();
        let m = m_old + b1c * (g - m_old);
        mu[i] = E::from_f32(m);
        let vv = v[i].to_f32() * b2 + (b2c * g) * g;
        v[i] = E::from_f32(vv);
        let denom = vv.sqrt() * sc.inv_bc2_sqrt + eps;
        theta[i] = E::from_f32(th + (-sc.step_size * m) / denom);
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
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    let (grad, mu, v, keep) = (&grad[..n], &mut mu[..n], &mut v[..n], &keep[..n]);
    for i in 0..n {
        let mut th = theta[i].to_f32();
        if decay {
            th *= sc.wd_factor;
        }
        let g = grad[i].to_f32();
        let m_old = mu[i].to_f32();
        let m = m_old + b1c * (g - m_old);
        mu[i] = E::from_f32(m);
        let decayed = sc.one_minus_alpha * m + sc.alpha_l1 * sign(th);
        let mt = if keep[i] != 0 { m } else { decayed };
        let vv = v[i].to_f32() * b2 + (b2c * mt) * mt;
        v[i] = E::from_f32(vv);
        let denom = vv.sqrt() * sc.inv_bc2_sqrt + eps;
        theta[i] = E::from_f32(th + (-sc.step_size * mt) / denom);
    }
}

/// The f32 twins, for the tests: the same loops on f32 copies, then one rounding per output.
#[cfg(test)]
fn twin<E: LowPrecision>(
    theta: &[E],
    grad: &[E],
    mu: &[E],
    v: &[E],
    keep: Option<&[u8]>,
    sc: &StepScalars,
) -> (Vec<E>, Vec<E>, Vec<E>) {
    use crate::adams::{dense_tile, sparse_tile};
    let f = |xs: &[E]| xs.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let (mut t, g, mut m, mut vv) = (f(theta), f(grad), f(mu), f(v));
    match keep {
        None => dense_tile(&mut t, &g, &mut m, &mut vv, sc),
        Some(k) => sparse_tile(&mut t, &g, &mut m, &mut vv, k, sc),
    }
    let r = |xs: Vec<f32>| xs.into_iter().map(E::from_f32).collect::<Vec<E>>();
    (r(t), r(m), r(vv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adams::AdamsHyper;

    /// Deterministic pseudo-random f32 in [-1, 1) (xorshift).
    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                scale * ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    }

    fn check<E: LowPrecision + PartialEq + std::fmt::Debug>() {
        let n = 1003; // not a multiple of any vector width
        let h = AdamsHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            l1_decay: 0.05,
        };
        let lp = |xs: Vec<f32>| xs.into_iter().map(E::from_f32).collect::<Vec<E>>();
        let keep: Vec<u8> = (0..n).map(|i| (i % 4 < 2) as u8).collect();
        for step in [1.0, 2.0, 7.0, 100.0] {
            let sc = StepScalars::new(&h, step, Some(50.0), 10);
            let theta = lp(values(1, n, 1.0));
            let grad = lp(values(2, n, 0.1));
            let mu = lp(values(3, n, 0.01));
            let v = lp(values(4, n, 1e-4).into_iter().map(f32::abs).collect());
            for mask in [None, Some(&keep[..])] {
                let (want_t, want_m, want_v) = twin(&theta, &grad, &mu, &v, mask, &sc);
                let (mut t, mut m, mut vv) = (theta.clone(), mu.clone(), v.clone());
                match mask {
                    None => dense_tile_lp(&mut t, &grad, &mut m, &mut vv, &sc),
                    Some(k) => sparse_tile_lp(&mut t, &grad, &mut m, &mut vv, k, &sc),
                }
                assert_eq!(t, want_t, "theta, step {step}, mask {}", mask.is_some());
                assert_eq!(m, want_m, "exp_avg, step {step}");
                assert_eq!(vv, want_v, "exp_avg_sq, step {step}");
                // The step moved something (the comparison is not vacuous).
                assert!(t.iter().zip(&theta).any(|(a, b)| a != b));
            }
        }
    }

    #[test]
    fn bf16_loops_equal_the_f32_loops_rounded_once() {
        check::<Bf16>();
    }

    #[test]
    fn f16_loops_equal_the_f32_loops_rounded_once() {
        check::<F16>();
    }
}
