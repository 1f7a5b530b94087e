//! Element loops of the fused AdamS step on bf16 / fp16 storage (issue 12).
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
//! flushes subnormal inputs to zero (measured on this machine's CPU: 1e-39 gives 0x0000 where
//! round-to-nearest-even gives 0x000B), and torch's own conversion (`c10::BFloat16`, scalar
//! and vectorised) rounds them, so a dense bf16 group would stop being bit-identical to
//! `AdamW(fused=True)` wherever a weight or a moment falls below 1.2e-38 (v often does). The
//! integer rounding vectorises to a few instructions per 16 values and the loop is
//! memory-bound: the sparse bf16 step costs 0.98–1.03x fused AdamW without it.

use crate::adams::{sign, StepScalars};
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

/// Where the keep flags of a tile come from.
#[derive(Clone, Copy)]
pub enum KeepFlags<'a> {
    /// A dense tensor (plain AdamW).
    Dense,
    /// One byte per element, nonzero where kept.
    Bytes(&'a [u8]),
    /// The packed mask, one bit per element (LSB first), the tile starting on a whole byte.
    Bits(&'a [u8]),
}

/// fp16 tiles with the F16C conversion instructions, 8 elements at a time: widened to f32
/// (`vcvtph2ps`, exact), stepped by [`element`]'s operations written out in AVX2/FMA
/// intrinsics ([`avx2_lanes`]), rounded back (`vcvtps2ph`, round to nearest even: the bits of
/// `half::f32_to_f16` for every non-NaN value; a NaN stays a NaN). Returns how many leading
/// elements it did (a multiple of 8); the caller does the rest. Does nothing on a CPU without
/// F16C (the baseline `simd` level).
///
/// Why intrinsics: LLVM vectorised the dense form of the 8-lane loop over [`element`], but
/// not the sparse one (the byte keep flags, the sign and the select): the sparse fp16 step
/// cost 1.9x `AdamW(fused=True)` fp16 where the dense one cost 0.84x.
#[inline(always)]
pub fn f16_tile_f16c(
    theta: &mut [F16Bits],
    grad: &[F16Bits],
    mu: &mut [F16Bits],
    v: &mut [F16Bits],
    keep: KeepFlags<'_>,
    sc: &StepScalars,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if crate::simd::level() == crate::simd::Level::Baseline {
            return 0;
        }
        let n = theta.len();
        assert!(
            grad.len() >= n
                && mu.len() >= n
                && v.len() >= n
                && match keep {
                    KeepFlags::Dense => true,
                    KeepFlags::Bytes(k) => k.len() >= n,
                    KeepFlags::Bits(b) => b.len() * 8 >= n,
                }
        );
        // Lane j of a group of 8 tests bit j of its mask byte (LSB first, as packed).
        // SAFETY: AVX is present (every non-baseline `simd` level requires AVX2).
        let lane_bits = unsafe { _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128) };
        let full = n / 8 * 8;
        let mut o = 0;
        while o < full {
            // SAFETY: F16C, AVX2 and FMA are present (every non-baseline `simd` level requires
            // them, and the callers run inside `simd::dispatch`, compiled for them); o + 8 <= n
            // and every slice holds at least n elements (asserted; the bits at least n / 8
            // bytes), so each 16-byte load and store, the 8-byte load of keep flags and the
            // byte of bits at o / 8 stay inside their slices; F16Bits is a repr(transparent)
            // u16.
            unsafe {
                let widen =
                    |p: *const F16Bits| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let t = widen(theta.as_ptr().add(o));
                let g = widen(grad.as_ptr().add(o));
                let m = widen(mu.as_ptr().add(o));
                let vv = widen(v.as_ptr().add(o));
                let k = match keep {
                    KeepFlags::Dense => None,
                    KeepFlags::Bytes(k) => {
                        let bytes = _mm_loadl_epi64(k.as_ptr().add(o) as *const __m128i);
                        Some(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
                            _mm256_cvtepu8_epi32(bytes),
                            _mm256_setzero_si256(),
                        )))
                    }
                    KeepFlags::Bits(b) => {
                        let byte = _mm256_set1_epi32(i32::from(*b.get_unchecked(o / 8)));
                        Some(_mm256_castsi256_ps(_mm256_cmpeq_epi32(
                            _mm256_and_si256(byte, lane_bits),
                            lane_bits,
                        )))
                    }
                };
                let (t, m, vv) = avx2_lanes(t, g, m, vv, k, sc);
                let narrow = |p: *mut F16Bits, x: __m256| {
                    _mm_storeu_si128(
                        p as *mut __m128i,
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x),
                    );
                };
                narrow(mu.as_mut_ptr().add(o), m);
                narrow(v.as_mut_ptr().add(o), vv);
                narrow(theta.as_mut_ptr().add(o), t);
            }
            o += 8;
        }
        full
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (theta, grad, mu, v, keep, sc);
        0
    }
}

/// [`element`] on 8 lanes: the same IEEE operations in the same order (one FMA where it has
/// a `mul_add`, separate multiplies and adds elsewhere), so every lane is bit-identical to
/// it. `keep` is `None` for a dense tensor, else all-ones lanes where the weight is kept.
///
/// # Safety
/// The CPU must have AVX2 and FMA (the caller runs inside `simd::dispatch` above baseline).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn avx2_lanes(
    th: std::arch::x86_64::__m256,
    g: std::arch::x86_64::__m256,
    m_old: std::arch::x86_64::__m256,
    v_old: std::arch::x86_64::__m256,
    keep: Option<std::arch::x86_64::__m256>,
    sc: &StepScalars,
) -> (
    std::arch::x86_64::__m256,
    std::arch::x86_64::__m256,
    std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;
    let splat = |x: f32| _mm256_set1_ps(x);
    let th = if sc.decay {
        _mm256_mul_ps(th, splat(sc.wd_factor))
    } else {
        th
    };
    let m = _mm256_fmadd_ps(splat(sc.b1c), _mm256_sub_ps(g, m_old), m_old);
    let (x, mt, neg_ss) = match keep {
        None => (g, m, splat(-sc.step_size)),
        Some(k) => {
            // sign(θ) as torch.sign: +1, -1, and +0 for ±0 and NaN (ordered compares).
            let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(th, _mm256_setzero_ps());
            let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(th, _mm256_setzero_ps());
            let sg = _mm256_or_ps(
                _mm256_and_ps(pos, splat(1.0)),
                _mm256_and_ps(neg, splat(-1.0)),
            );
            let decayed = _mm256_add_ps(
                _mm256_mul_ps(splat(sc.one_minus_alpha), m),
                _mm256_mul_ps(splat(sc.alpha_l1), sg),
            );
            let mt = _mm256_blendv_ps(decayed, m, k);
            let neg_ss = _mm256_blendv_ps(splat(-sc.masked_step_size), splat(-sc.step_size), k);
            (mt, mt, neg_ss)
        }
    };
    let vv = _mm256_fmadd_ps(
        _mm256_mul_ps(splat(sc.b2c), x),
        x,
        _mm256_mul_ps(v_old, splat(sc.b2)),
    );
    let denom = _mm256_add_ps(
        _mm256_div_ps(_mm256_sqrt_ps(vv), splat(sc.bc2_sqrt)),
        splat(sc.eps),
    );
    let step = _mm256_div_ps(_mm256_mul_ps(neg_ss, mt), denom);
    (_mm256_add_ps(th, step), m, vv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adams::AdamsHyper;

    /// Deterministic pseudo-random f32 in [-scale, scale) (xorshift).
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

    /// The same step written independently: f64 for the fused multiply-adds (the product of
    /// two f32 is exact in f64, so `(a·b + c)` rounded to f64 then f32 differs from a true
    /// FMA only on a double-rounding tie, which these inputs do not hit: checked by equality).
    #[allow(clippy::too_many_arguments)] // one element's whole step, written out flat
    fn reference(
        th: f32,
        g: f32,
        m: f32,
        v: f32,
        keep: Option<bool>,
        h: &AdamsHyper,
        s: f64,
        a: f64,
    ) -> [f32; 3] {
        let fma = |x: f32, y: f32, z: f32| (x as f64 * y as f64 + z as f64) as f32;
        let th = if h.weight_decay != 0.0 {
            th * (1.0 - h.lr * h.weight_decay) as f32
        } else {
            th
        };
        let m2 = fma((1.0 - h.beta1) as f32, g - m, m);
        let mt = match keep {
            Some(false) => {
                let sg = if th > 0.0 {
                    1.0
                } else if th < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                (1.0 - a) as f32 * m2 + (a * h.l1_decay) as f32 * sg
            }
            _ => m2,
        };
        let x = if keep.is_none() { g } else { mt };
        let v2 = fma((1.0 - h.beta2) as f32 * x, x, v * h.beta2 as f32);
        let den = v2.sqrt() / (1.0 - h.beta2.powf(s)).sqrt() as f32 + h.eps as f32;
        let ss = match keep {
            Some(false) => (h.lr * h.masked_lr_scale / (1.0 - h.beta1.powf(s))) as f32,
            _ => (h.lr / (1.0 - h.beta1.powf(s))) as f32,
        };
        [th + (-ss * mt) / den, m2, v2]
    }

    /// The hyper-parameters of these tests: weight decay and L1 decay on, and masked weights
    /// stepping 3x the kept ones (so that the select of the two step sizes is checked; r = 1
    /// makes them equal bit for bit, `adams::tests`).
    fn test_hyper() -> AdamsHyper {
        AdamsHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            l1_decay: 0.05,
            masked_lr_scale: 3.0,
        }
    }

    /// Keep flags of a 2:4 tensor: the first two of every group of four.
    fn keep_2_of_4(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 4 < 2) as u8).collect()
    }

    fn check<E: LowPrecision + std::fmt::Debug>(bits: fn(E) -> u16) {
        let n = 1003; // not a multiple of any vector width
        let h = test_hyper();
        let lp = |xs: Vec<f32>| xs.into_iter().map(E::from_f32).collect::<Vec<E>>();
        let keep = keep_2_of_4(n);
        for step in [1.0, 2.0, 7.0, 100.0] {
            let sc = StepScalars::new(&h, step, Some(50.0), 10);
            let alpha = (step / 50.0f64).min(1.0);
            let theta = lp(values(1, n, 1.0));
            let grad = lp(values(2, n, 0.1));
            let mu = lp(values(3, n, 0.01));
            let v = lp(values(4, n, 1e-4).into_iter().map(f32::abs).collect());
            for sparse in [false, true] {
                let (mut t, mut m, mut vv) = (theta.clone(), mu.clone(), v.clone());
                crate::simd::dispatch(|| {
                    if sparse {
                        sparse_tile_lp(&mut t, &grad, &mut m, &mut vv, &keep, &sc)
                    } else {
                        dense_tile_lp(&mut t, &grad, &mut m, &mut vv, &sc)
                    }
                });
                for i in 0..n {
                    let k = sparse.then_some(keep[i] != 0);
                    let want = reference(
                        theta[i].to_f32(),
                        grad[i].to_f32(),
                        mu[i].to_f32(),
                        v[i].to_f32(),
                        k,
                        &h,
                        step,
                        alpha,
                    );
                    let got = [t[i], m[i], vv[i]].map(bits);
                    assert_eq!(
                        got,
                        want.map(|x| bits(E::from_f32(x))),
                        "element {i}, step {step}, sparse {sparse}"
                    );
                }
                // The step moved something (the comparison is not vacuous).
                assert!(t.iter().zip(&theta).any(|(a, b)| bits(*a) != bits(*b)));
            }
        }
    }

    #[test]
    fn bf16_loops_equal_the_written_out_step() {
        check::<Bf16Bits>(|x| x.0);
    }

    #[test]
    fn f16c_tiles_equal_the_portable_loops() {
        use crate::adams::StepElem;
        let n = 1003;
        let h = test_hyper();
        let lp = |xs: Vec<f32>| xs.into_iter().map(F16Bits::from_f32).collect::<Vec<_>>();
        let keep = keep_2_of_4(n);
        // Values down to fp16 subnormals and up to its overflow range.
        let mut theta = lp(values(1, n, 1.0));
        theta[5] = F16Bits(0x0001);
        theta[6] = F16Bits(0x7BFF);
        // Signed zero and the smallest negative subnormal: sign() is +0, and -1.
        theta[8] = F16Bits(0x8000);
        theta[9] = F16Bits(0x8001);
        let grad = lp(values(2, n, 0.1));
        let mu = lp(values(3, n, 0.01));
        let v = lp(values(4, n, 1e-4).into_iter().map(f32::abs).collect());
        for step in [1.0, 7.0] {
            let sc = StepScalars::new(&h, step, Some(50.0), 10);
            for sparse in [false, true] {
                let (mut t1, mut m1, mut v1) = (theta.clone(), mu.clone(), v.clone());
                let (mut t2, mut m2, mut v2) = (theta.clone(), mu.clone(), v.clone());
                if sparse {
                    sparse_tile_lp(&mut t1, &grad, &mut m1, &mut v1, &keep, &sc);
                    crate::simd::dispatch(|| {
                        F16Bits::sparse_tile(&mut t2, &grad, &mut m2, &mut v2, &keep, &sc)
                    });
                } else {
                    dense_tile_lp(&mut t1, &grad, &mut m1, &mut v1, &sc);
                    crate::simd::dispatch(|| {
                        F16Bits::dense_tile(&mut t2, &grad, &mut m2, &mut v2, &sc)
                    });
                }
                assert_eq!((t1, m1, v1), (t2, m2, v2), "step {step}, sparse {sparse}");
            }
            // The packed-bits loop (1003 elements: 125 bytes of lane masks and a 3-element
            // tail) against the portable loop with byte flags.
            let bits: Vec<u8> = keep
                .chunks(8)
                .map(|c| {
                    c.iter()
                        .enumerate()
                        .fold(0u8, |b, (j, &k)| b | ((k != 0) as u8) << j)
                })
                .collect();
            let (mut t1, mut m1, mut v1) = (theta.clone(), mu.clone(), v.clone());
            let (mut t2, mut m2, mut v2) = (theta.clone(), mu.clone(), v.clone());
            sparse_tile_lp(&mut t1, &grad, &mut m1, &mut v1, &keep, &sc);
            let took = crate::simd::dispatch(|| {
                F16Bits::sparse_tile_bits(&mut t2, &grad, &mut m2, &mut v2, &bits, &sc)
            });
            assert_eq!(took, crate::simd::level() != crate::simd::Level::Baseline);
            if took {
                assert_eq!((t1, m1, v1), (t2, m2, v2), "step {step}, packed bits");
            }
        }
    }

    #[test]
    fn f16_loops_equal_the_written_out_step() {
        check::<F16Bits>(|x| x.0);
    }
}
