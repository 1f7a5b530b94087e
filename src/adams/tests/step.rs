//! Tests of the f32 step: against a scalar f64 reference (dense, sparse on both group
//! layouts, masked-weight step scale), the AVX-512 loop against the scalar one, the mask
//! refresh and its change counts, and the checks.

#[cfg(target_arch = "x86_64")]
use crate::adams::avx512;
use crate::adams::changed_groups::{changed_groups, changed_groups_packed};
use crate::adams::driver::{adams_step_fused, AdamsTensor};
use crate::adams::hyper::{per_tensor, AdamsHyper};
use crate::adams::scalars::StepScalars;
use crate::adams::tile::sparse_tile;
use crate::nm::{pack_bits, packed_len, unpack_flags, GroupDim, GroupLayout, NmPattern};

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

#[test]
fn hyper_from_values_follows_fields_and_checks() {
    let h = AdamsHyper::from_values(&[1e-3, 0.9, 0.999, 1e-8, 0.1, 0.5, 2.0]).unwrap();
    assert_eq!(
        [
            h.lr,
            h.beta1,
            h.beta2,
            h.eps,
            h.weight_decay,
            h.l1_decay,
            h.masked_lr_scale
        ],
        [1e-3, 0.9, 0.999, 1e-8, 0.1, 0.5, 2.0]
    );
    assert_eq!(AdamsHyper::FIELDS[6], "masked_lr_scale");
    let e = AdamsHyper::from_values(&[1e-3; 6]).unwrap_err().to_string();
    assert!(
        e.starts_with("hyper: expected 7 values (lr, beta1,") && e.ends_with("got 6"),
        "{e}"
    );
    let e = AdamsHyper::from_values(&[1e-3, 0.9, 1.0, 1e-8, 0.0, 0.1, 1.0])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("betas[1]:"), "{e}");
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
