//! Quick timing of the slice kernels without Python: `cargo run --release --example kernel_timing`.
//! (The side-by-side comparison with torch is `./run bench`.)
use std::time::Instant;

use _cast_rs::adams::{adams_step_fused, AdamsHyper, AdamsTensor, StepScalars};
use _cast_rs::nm::{nm_keep, nm_mask_packed, packed_len, GroupDim, GroupLayout, NmPattern};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let (rows, cols, k) = (1024usize, 1024usize, 24usize);
    let n = rows * cols;
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut th: Vec<Vec<f32>> = (0..k).map(|_| (0..n).map(|_| rnd()).collect()).collect();
    let g: Vec<Vec<f32>> = (0..k)
        .map(|_| (0..n).map(|_| rnd() * 0.01).collect())
        .collect();
    let mut mu = vec![vec![0f32; n]; k];
    let mut v = vec![vec![0f32; n]; k];
    let mut bits = vec![vec![0u8; packed_len(n)]; k];
    let mut keep = vec![vec![0u8; n]; k];
    let h = AdamsHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        l1_decay: 1e-3,
        masked_lr_scale: 1.0,
    };
    for (label, dim) in [("last", GroupDim::Last), ("dim0", GroupDim::First)] {
        let layout = GroupLayout::new(
            NmPattern::new(2, 4).unwrap(),
            &[rows as i64, cols as i64],
            dim,
            "w",
        )
        .unwrap();
        for (name, interval, sparse) in [
            ("dense", 10u64, false),
            ("sparse no refresh", 1_000_000, true),
            ("sparse refresh", 1, true),
        ] {
            let mut ts = vec![];
            for s in 2..16 {
                let t0 = Instant::now();
                let tensors: Vec<AdamsTensor> = th
                    .iter_mut()
                    .zip(&g)
                    .zip(mu.iter_mut())
                    .zip(v.iter_mut())
                    .zip(bits.iter_mut())
                    .map(|((((t, g), m), v), b)| AdamsTensor {
                        theta: t,
                        grad: g,
                        exp_avg: m,
                        exp_avg_sq: v,
                        mask: if sparse {
                            Some((b.as_mut_slice(), layout))
                        } else {
                            None
                        },
                        scalars: StepScalars::new(&h, s as f64, Some(100.0), interval),
                    })
                    .collect();
                adams_step_fused(tensors, &h).unwrap();
                ts.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            println!(
                "{label} adams {name:<18} {:7.2} ms",
                median(ts[4..].to_vec())
            );
        }
        let mut ts = vec![];
        for _ in 0..10 {
            let t0 = Instant::now();
            for (t, kp) in th.iter().zip(keep.iter_mut()) {
                nm_keep(t, &layout, kp).unwrap();
            }
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        println!("{label} nm_keep (bool)           {:7.2} ms", median(ts));
        let mut ts = vec![];
        for _ in 0..10 {
            let t0 = Instant::now();
            for (t, b) in th.iter().zip(bits.iter_mut()) {
                nm_mask_packed(t, &layout, b).unwrap();
            }
            ts.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        println!("{label} nm_mask_packed           {:7.2} ms", median(ts));
    }
}
