//! Tests of the bf16 / fp16 loops: every element against the step written out independently,
//! and the F16C tiles (byte flags and packed bits) against the portable loops.

use crate::adams::hyper::AdamsHyper;
use crate::adams::lowp::{dense_tile_lp, sparse_tile_lp, LowPrecision};
use crate::adams::scalars::StepScalars;
use crate::nm::{Bf16Bits, F16Bits};

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
    use crate::adams::elem::StepElem;
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
