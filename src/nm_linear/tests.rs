//! Tests of the compressed layer: round trips, every kernel against an f64 reference and
//! against each other (bit for bit), the bf16 layouts and kernels, int8 values (quantization,
//! kernels), the thread-pool split, and the refusals.

use super::{
    bf16_dot_kernel, check_call, check_index, compress, compress_int8, decompress, decompress_into,
    dequantize_into, kernel_paths, level, nm_linear, nm_linear_bf16_parallel,
    nm_linear_int8_bf16_parallel, nm_linear_parallel, row_scale, run_blocks, Bf16, Kernel, NmElem,
    NmLayout,
};

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }
}

/// A random exactly-N:M weight: in each group, N random positions get random values
/// (a few of them exactly 0, to exercise the zero-filled slots).
fn nm_weight(rows: usize, cols: usize, n: usize, m: usize, rng: &mut Rng) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        for k in 0..cols / m {
            let mut order: Vec<usize> = (0..m).collect();
            for i in (1..m).rev() {
                let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
                order.swap(i, j);
            }
            for &p in &order[..n] {
                let v = rng.next();
                w[r * cols + k * m + p] = if v.abs() < 0.05 { 0.0 } else { v };
            }
        }
    }
    w
}

fn kernels() -> Vec<Kernel> {
    let mut ks = vec![Kernel::Portable];
    if matches!(level(), Kernel::Avx2 | Kernel::Avx512) {
        ks.push(Kernel::Avx2);
    }
    if level() == Kernel::Avx512 {
        ks.push(Kernel::Avx512);
    }
    ks
}

/// f64 reference: y = x · Wᵀ + bias (`W` in f32, or in f64 for dequantized int8 weights).
fn reference<W: Copy + Into<f64>>(
    w: &[W],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    bias: &[f32],
) -> Vec<f64> {
    let mut y = vec![0f64; batch * rows];
    for b in 0..batch {
        for r in 0..rows {
            let mut s = bias[r] as f64;
            for c in 0..cols {
                s += w[r * cols + c].into() * x[b * cols + c] as f64;
            }
            y[b * rows + r] = s;
        }
    }
    y
}

/// Asserts that `y` is within f32 summation rounding of the f64 reference: each of the
/// kept + 1 additions (products and bias) rounds once, by at most 2^-24 of a partial sum,
/// itself at most Σ|w·x| + |bias|.
fn assert_within_rounding<W: Copy + Into<f64>>(
    l: &NmLayout,
    w: &[W],
    x: &[f32],
    bias: &[f32],
    batch: usize,
    y: &[f32],
    what: &str,
) {
    let (rows, cols) = (l.rows, l.cols);
    let want = reference(w, rows, cols, x, batch, bias);
    for (i, (&got, &exact)) in y.iter().zip(&want).enumerate() {
        let (b, r) = (i / rows, i % rows);
        let mass: f64 = (0..cols)
            .map(|c| (w[r * cols + c].into() * x[b * cols + c] as f64).abs())
            .sum::<f64>()
            + bias[r].abs() as f64;
        let tol = (l.kept() as f64 + 2.0) * mass * f32::EPSILON as f64 / 2.0 + 1e-30;
        assert!(
            (got as f64 - exact).abs() <= tol,
            "{what} [{i}]: {got} vs {exact}"
        );
    }
}

fn run_with<E: NmElem>(
    kernel: Kernel,
    l: &NmLayout,
    v: &[E],
    idx: &[u32],
    bias: &[f32],
    x: &[f32],
    batch: usize,
) -> Vec<f32> {
    run_scaled(kernel, l, v, idx, None, bias, x, batch)
}

#[allow(clippy::too_many_arguments)]
fn run_scaled<E: NmElem>(
    kernel: Kernel,
    l: &NmLayout,
    v: &[E],
    idx: &[u32],
    scales: Option<&[f32]>,
    bias: &[f32],
    x: &[f32],
    batch: usize,
) -> Vec<f32> {
    let mut y = vec![f32::NAN; batch * l.rows];
    check_call(l, v, idx, scales, Some(bias), x, batch, &y).unwrap();
    run_blocks(
        l,
        v,
        idx,
        scales,
        Some(bias),
        x,
        batch,
        &mut y,
        0,
        l.blocks(),
        kernel,
    );
    y
}

#[test]
fn round_trip_and_every_kernel_against_the_dense_reference() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for &(n, m) in &[(2, 4), (1, 4), (3, 4), (1, 2), (2, 8), (4, 8), (3, 6)] {
        for &(rows, cols) in &[(16, 8 * m), (37, 4 * m), (5, m), (64, 32 * m)] {
            let l = NmLayout::new(rows, cols, n, m).unwrap();
            let w = nm_weight(rows, cols, n, m, &mut rng);
            let (v, idx) = compress(&l, &w).unwrap();
            assert_eq!(
                decompress(&l, &v, &idx).unwrap(),
                w,
                "{n}:{m} {rows}x{cols} round trip"
            );
            check_index(&l, &idx).unwrap();
            let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
            for batch in [1usize, 2, 3, 6, 8, 11, 16] {
                let x: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
                let mut first: Option<Vec<f32>> = None;
                for k in kernels() {
                    let y = run_with(k, &l, &v, &idx, &bias, &x, batch);
                    let what = format!("{k:?} {n}:{m} {rows}x{cols} b{batch}");
                    assert_within_rounding(&l, &w, &x, &bias, batch, &y, &what);
                    // Every kernel sums in the same order with FMAs: identical results.
                    match &first {
                        None => first = Some(y),
                        Some(f) => assert_eq!(f, &y, "{k:?} differs from the portable kernel"),
                    }
                }
                // bf16 values (stored in interleaved slot pairs, an odd last slot plain):
                // every kernel equals the f32 layer on the bf16-rounded weight, bit for bit.
                let wb: Vec<Bf16> = w.iter().map(|&v| Bf16::from_f32(v)).collect();
                let wr: Vec<f32> = wb.iter().map(|b| b.to_f32()).collect();
                let (vb, idxb) = compress(&l, &wb).unwrap();
                assert_eq!(
                    decompress(&l, &vb, &idxb).unwrap(),
                    wb,
                    "{n}:{m} bf16 round trip"
                );
                let (vr, idxr) = compress(&l, &wr).unwrap();
                assert_eq!(idxb, idxr);
                let want = run_with(Kernel::Portable, &l, &vr, &idxr, &bias, &x, batch);
                for k in kernels() {
                    let y = run_with(k, &l, &vb, &idxb, &bias, &x, batch);
                    assert_eq!(y, want, "{k:?} {n}:{m} {rows}x{cols} b{batch} bf16");
                }
            }
        }
    }
}

#[test]
fn bf16_pairs_interleave_lane_by_lane() {
    // One block of 16 rows, 2:4 over 8 columns: slots 0, 1 (group 0) and 2, 3 (group 1).
    let l = NmLayout::new(16, 8, 2, 4).unwrap();
    let w: Vec<f32> = (0..16 * 8)
        .map(|i| {
            if i % 4 == 1 || i % 4 == 2 {
                i as f32
            } else {
                0.0
            }
        })
        .collect();
    let wb: Vec<Bf16> = w.iter().map(|&v| Bf16::from_f32(v)).collect();
    let (v32, _) = compress(&l, &w).unwrap();
    let (vb, _) = compress(&l, &wb).unwrap();
    // f32: slot-major, 16 lanes per slot. Row r keeps columns 1 and 2 of each group.
    assert_eq!(&v32[..3], &[1.0, 9.0, 17.0]); // slot 0, lanes 0..3: W[r, 1]
    assert_eq!(v32[16], 2.0); // slot 1, lane 0: W[0, 2]
                              // bf16: a lane's two slots side by side (W[0, 1], W[0, 2], W[1, 1], W[1, 2], ...).
    let got: Vec<f32> = vb[..4].iter().map(|b| b.to_f32()).collect();
    assert_eq!(got, [1.0, 2.0, 9.0, 10.0]);
    assert_eq!(vb[32].to_f32(), 5.0); // the next pair (slots 2, 3): W[0, 5]
}

#[test]
fn bf16_values_compute_in_f32() {
    let mut rng = Rng(99);
    let (rows, cols, n, m) = (40, 64, 2, 4);
    let l = NmLayout::new(rows, cols, n, m).unwrap();
    let w32 = nm_weight(rows, cols, n, m, &mut rng);
    let w: Vec<Bf16> = w32.iter().map(|&v| Bf16::from_f32(v)).collect();
    let (v, idx) = compress(&l, &w).unwrap();
    assert_eq!(decompress(&l, &v, &idx).unwrap(), w);
    let wr: Vec<f32> = w.iter().map(|b| b.to_f32()).collect();
    let (v32, idx32) = compress(&l, &wr).unwrap();
    assert_eq!(idx, idx32);
    let bias = vec![0.5f32; rows];
    for batch in [1usize, 5, 16] {
        let x: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
        // The bf16 layer equals the f32 layer on the bf16-rounded weights, bit for bit.
        let want = run_with(Kernel::Portable, &l, &v32, &idx32, &bias, &x, batch);
        for k in kernels() {
            let mut y = vec![0f32; batch * rows];
            run_blocks(
                &l,
                &v,
                &idx,
                None,
                Some(&bias),
                &x,
                batch,
                &mut y,
                0,
                l.blocks(),
                k,
            );
            assert_eq!(y, want, "{k:?} batch {batch}");
        }
    }
}

/// `v` rounded to bf16, and those bf16 values back in f32 (exactly).
fn bf16_and_f32(v: &[f32]) -> (Vec<Bf16>, Vec<f32>) {
    let b: Vec<Bf16> = v.iter().map(|&v| Bf16::from_f32(v)).collect();
    let f = b.iter().map(|b| b.to_f32()).collect();
    (b, f)
}

#[test]
fn bf16_inputs_against_the_dense_reference() {
    let mut rng = Rng(0x5eed_bf16);
    let mut used_dot = false;
    for &(n, m) in &[(2, 4), (2, 3), (2, 8), (4, 8), (2, 6), (1, 4), (3, 8)] {
        for &(rows, cols) in &[(16, 8 * m), (37, 4 * m), (5, m), (64, 32 * m)] {
            let l = NmLayout::new(rows, cols, n, m).unwrap();
            let (w, wf) = bf16_and_f32(&nm_weight(rows, cols, n, m, &mut rng));
            let (v, idx) = compress(&l, &w).unwrap();
            let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
            used_dot |= bf16_dot_kernel(&l);
            for batch in [1usize, 2, 3, 6, 8, 11, 16] {
                let random: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
                let (x, xf) = bf16_and_f32(&random);
                let mut y = vec![f32::NAN; batch * rows];
                nm_linear_bf16_parallel(&l, &v, &idx, Some(&bias), &x, batch, &mut y).unwrap();
                let mut f32_path = vec![0f32; batch * rows];
                nm_linear(&l, &v, &idx, None, Some(&bias), &xf, batch, &mut f32_path).unwrap();
                // Products of bf16 are exact in f32 and each addition rounds once (as in
                // the f32 kernels), so the same bound holds in the dot kernel's order.
                let what = format!("dot {n}:{m} {rows}x{cols} b{batch}");
                assert_within_rounding(&l, &wf, &xf, &bias, batch, &y, &what);
                if !bf16_dot_kernel(&l) {
                    // Without the dot kernel the inputs are widened: the f32 path's bits.
                    assert_eq!(y, f32_path, "{n}:{m} fallback");
                }
            }
        }
    }
    if !used_dot {
        eprintln!(
            "bf16_inputs_against_the_dense_reference: this CPU has no AVX-512 BF16 (or \
             CAST_RS_NO_SIMD is set): only the widening fallback was tested"
        );
    }
}

/// The AMX kernel (16-row tiles, up to four per weight tile, the last one short where the
/// batch is not a multiple of 16; beyond 64 rows from inputs in tile order; batches whose
/// inputs exceed `SLICE_BYTES` in slices) against the f64 reference, with the f32
/// summation bound: `tdpbf16ps` multiplies bf16 exactly in f32 and rounds each addition
/// once, like the other kernels (the additions of the expanded zeros are exact).
#[test]
fn amx_tiles_against_the_dense_reference() {
    #[cfg(target_arch = "x86_64")]
    {
        use super::amx::amx_kernel;
        let mut rng = Rng(0x5eed_a3c5);
        let mut ran = false;
        for &(rows, cols) in &[(16, 32), (37, 64), (64, 256), (20, 96)] {
            let l = NmLayout::new(rows, cols, 2, 4).unwrap();
            let (w, wf) = bf16_and_f32(&nm_weight(rows, cols, 2, 4, &mut rng));
            let (v, idx) = compress(&l, &w).unwrap();
            let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
            ran |= amx_kernel(&l);
            for batch in [16usize, 17, 32, 48, 64, 80, 100, 131] {
                let random: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
                let (x, xf) = bf16_and_f32(&random);
                let mut y = vec![f32::NAN; batch * rows];
                nm_linear_bf16_parallel(&l, &v, &idx, Some(&bias), &x, batch, &mut y).unwrap();
                let what = format!("amx {rows}x{cols} b{batch}");
                assert_within_rounding(&l, &wf, &xf, &bias, batch, &y, &what);
            }
        }
        // Batch slices: rows of 8192 inputs take slices of 64 rows, of 1024 inputs 512
        // rows: 520 and 600 rows are a slice of 512 and one of 8 or 88 (a short last tile).
        use super::amx::batch_slice;
        assert_eq!(
            (batch_slice(8192), batch_slice(4096), batch_slice(1024)),
            (64, 128, 512)
        );
        let (rows, cols) = (40, 1024);
        let l = NmLayout::new(rows, cols, 2, 4).unwrap();
        let (w, wf) = bf16_and_f32(&nm_weight(rows, cols, 2, 4, &mut rng));
        let (v, idx) = compress(&l, &w).unwrap();
        let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
        for batch in [520usize, 600] {
            let random: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
            let (x, xf) = bf16_and_f32(&random);
            let mut y = vec![f32::NAN; batch * rows];
            nm_linear_bf16_parallel(&l, &v, &idx, Some(&bias), &x, batch, &mut y).unwrap();
            assert_within_rounding(
                &l,
                &wf,
                &xf,
                &bias,
                batch,
                &y,
                &format!("amx slices b{batch}"),
            );
        }
        // int8 values with bf16 inputs: on AMX from AMX_MIN_BATCH rows, the integers widened
        // to bf16 exactly, so the same bound holds against the exact weight q · s (the
        // scale's FMA is one more rounding, inside the bound's + 2). Below AMX_MIN_BATCH
        // rows, or without AMX: the inputs widened to f32, the f32-input kernels' bits.
        for &(rows, cols) in &[(16, 32), (37, 64), (20, 96)] {
            let l = NmLayout::new(rows, cols, 2, 4).unwrap();
            let w = nm_weight(rows, cols, 2, 4, &mut rng);
            let (q, idx, scales) = compress_int8(&l, &w).unwrap();
            let (_, exact) = int8_dense(&l, &q, &idx, &scales);
            let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
            for batch in [1usize, 4, 5, 16, 33, 64, 100] {
                let random: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
                let (x, xf) = bf16_and_f32(&random);
                let mut y = vec![f32::NAN; batch * rows];
                nm_linear_int8_bf16_parallel(&l, &q, &idx, &scales, Some(&bias), &x, batch, &mut y)
                    .unwrap();
                let what = format!("int8 amx {rows}x{cols} b{batch}");
                assert_within_rounding(&l, &exact, &xf, &bias, batch, &y, &what);
                if batch < super::AMX_MIN_BATCH || !amx_kernel(&l) {
                    let mut widened = vec![f32::NAN; batch * rows];
                    nm_linear_parallel(
                        &l,
                        &q,
                        &idx,
                        Some(&scales),
                        Some(&bias),
                        &xf,
                        batch,
                        &mut widened,
                    )
                    .unwrap();
                    assert_eq!(y, widened, "{what}: not the f32-input kernels' bits");
                }
            }
        }
        // Not the 2:4 pattern, or not whole 32-column steps: never AMX.
        assert!(!amx_kernel(&NmLayout::new(16, 48, 2, 4).unwrap()));
        assert!(!amx_kernel(&NmLayout::new(16, 64, 4, 8).unwrap()));
        if !ran {
            eprintln!(
                "amx_tiles_against_the_dense_reference: no AMX here (CPU, OS permission, \
                 CAST_RS_NO_AMX or CAST_RS_NO_SIMD): these batches ran on the other kernels"
            );
        }
    }
}

#[test]
fn parallel_equals_one_piece() {
    let mut rng = Rng(7);
    let (rows, cols) = (1000, 256);
    let l = NmLayout::new(rows, cols, 2, 4).unwrap();
    let w = nm_weight(rows, cols, 2, 4, &mut rng);
    let (v, idx) = compress(&l, &w).unwrap();
    // 63 blocks: decompress runs in several pieces too.
    assert_eq!(decompress(&l, &v, &idx).unwrap(), w);
    for batch in [1usize, 4, 16] {
        let x: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
        let mut one = vec![0f32; batch * rows];
        let mut par = vec![f32::NAN; batch * rows];
        nm_linear(&l, &v, &idx, None, None, &x, batch, &mut one).unwrap();
        nm_linear_parallel(&l, &v, &idx, None, None, &x, batch, &mut par).unwrap();
        assert_eq!(one, par);
    }
}

#[test]
fn not_nm_and_bad_shapes_are_refused() {
    let l = NmLayout::new(2, 8, 2, 4).unwrap();
    let mut w = vec![0f32; 16];
    w[0] = 1.0;
    w[1] = 1.0;
    w[2] = 1.0; // three nonzeros in a 2:4 group
    let e = compress(&l, &w).unwrap_err().to_string();
    assert!(e.contains("not 2:4") && e.contains("row 0, group 0"), "{e}");
    assert!(NmLayout::new(2, 6, 2, 4)
        .unwrap_err()
        .to_string()
        .contains("multiple of M = 4"));
    assert!(NmLayout::new(2, 8, 4, 4).is_err() && NmLayout::new(2, 18, 2, 9).is_err());
    let (v, idx) = compress(&l, &[0f32; 16]).unwrap();
    let mut y = vec![0f32; 2];
    let e = nm_linear(&l, &v, &idx, None, None, &[0f32; 7], 1, &mut y)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("input: expected 1 x 8"), "{e}");
    let mut bad = idx.clone();
    bad[0] = u32::MAX; // positions 3 are fine for M = 4; use M = 3 to make them invalid
    let l3 = NmLayout::new(2, 6, 1, 3).unwrap();
    let (_, idx3) = compress(&l3, &[0f32; 12]).unwrap();
    let mut bad3 = idx3.clone();
    bad3[0] = u32::MAX;
    assert!(check_index(&l3, &bad3).is_err());
    let mut out = vec![7f32; 12];
    let e = decompress_into(&l3, &vec![0f32; l3.values_len()], &bad3, &mut out).unwrap_err();
    assert!(e.to_string().starts_with("index: slot 0, lane 0"), "{e}");
    assert_eq!(out, vec![7f32; 12], "nothing written after a refused index");
    assert!(check_index(&l, &bad).is_ok());
}

/// The per-row int8 quantization, written out directly on the dense weight: `(q, scales)`.
fn quantize_reference(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let scales: Vec<f32> = (0..rows)
        .map(|r| {
            let max = w[r * cols..(r + 1) * cols]
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            if max / 127.0 == 0.0 {
                1.0
            } else {
                max / 127.0
            }
        })
        .collect();
    let q = (0..rows * cols)
        .map(|i| {
            let v = (w[i] / scales[i / cols]).round_ties_even();
            v.clamp(-127.0, 127.0) as i8
        })
        .collect();
    (q, scales)
}

#[test]
fn int8_quantization_is_symmetric_per_row() {
    let mut rng = Rng(0x1a7_8b17);
    for &(n, m) in &[(2, 4), (1, 4), (4, 8), (3, 6)] {
        let (rows, cols) = (37, 8 * m);
        let l = NmLayout::new(rows, cols, n, m).unwrap();
        let mut w = nm_weight(rows, cols, n, m, &mut rng);
        w[3 * cols..4 * cols].fill(0.0); // a zero row: scale 1, all values 0
        w[5 * cols..6 * cols].fill(0.0);
        for c in (0..cols).step_by(m) {
            w[5 * cols + c] = 1e-44; // subnormal: max / 127 underflows to 0
        }
        let (q, idx, scales) = compress_int8(&l, &w).unwrap();
        let (want_q, want_scales) = quantize_reference(&w, rows, cols);
        assert_eq!(scales, want_scales, "{n}:{m} scales");
        assert_eq!((scales[3], scales[5]), (1.0, 1.0));
        assert_eq!(decompress(&l, &q, &idx).unwrap(), want_q, "{n}:{m} values");
        assert!(q.iter().all(|&v| v != i8::MIN));
        // The largest |weight| of each nonzero row is ±127.
        let dq = decompress(&l, &q, &idx).unwrap();
        for r in (0..rows).filter(|&r| r != 3 && r != 5) {
            let top = dq[r * cols..(r + 1) * cols].iter().map(|v| v.abs()).max();
            assert_eq!(top, Some(127), "row {r}");
        }
        // The same index as the f32 layout; dequantized: q · s, one rounding each.
        assert_eq!(compress(&l, &w).unwrap().1, idx);
        let mut deq = vec![f32::NAN; rows * cols];
        dequantize_into(&l, &q, &idx, &scales, &mut deq).unwrap();
        for (i, &d) in deq.iter().enumerate() {
            assert_eq!(d, want_q[i] as f32 * want_scales[i / cols]);
        }
    }
    assert_eq!(row_scale(127.0), 1.0);
    assert_eq!(i8::from_f32(2.5), 2); // half to even
    assert_eq!(i8::from_f32(-3.5), -4);
    assert_eq!(i8::from_f32(300.0), 127);
    assert_eq!(i8::from_f32(-300.0), -127);
}

/// The dense integers of a compressed int8 weight, and the exact weight the layer holds:
/// q · s in f64 (7 + 24 bits, exact).
fn int8_dense(l: &NmLayout, q: &[i8], idx: &[u32], scales: &[f32]) -> (Vec<i8>, Vec<f64>) {
    let dq = decompress(l, q, idx).unwrap();
    let exact = dq
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 * scales[i / l.cols] as f64)
        .collect();
    (dq, exact)
}

#[test]
fn int8_every_kernel_against_the_dense_reference() {
    let mut rng = Rng(0x8b17_5eed);
    for &(n, m) in &[(2, 4), (1, 4), (4, 8), (3, 6), (1, 2)] {
        for &(rows, cols) in &[(16, 8 * m), (37, 4 * m), (5, m), (70, 32 * m)] {
            let l = NmLayout::new(rows, cols, n, m).unwrap();
            let w = nm_weight(rows, cols, n, m, &mut rng);
            let (q, idx, scales) = compress_int8(&l, &w).unwrap();
            let (dq, exact) = int8_dense(&l, &q, &idx, &scales);
            // The integers as f32 values with unit scales: the f32 kernel's bits, since the
            // int8 kernels widen exactly and fma(S, 1, b) rounds as S + b.
            let qf: Vec<f32> = dq.iter().map(|&v| v as f32).collect();
            let (vq, idxq) = compress(&l, &qf).unwrap();
            let ones = vec![1f32; rows];
            let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
            for batch in [1usize, 2, 3, 6, 8, 9, 17] {
                let x: Vec<f32> = (0..batch * cols).map(|_| rng.next()).collect();
                let what = format!("{n}:{m} {rows}x{cols} b{batch}");
                let want = run_scaled(
                    Kernel::Portable,
                    &l,
                    &q,
                    &idx,
                    Some(&scales),
                    &bias,
                    &x,
                    batch,
                );
                // Σ q·x in the f32 kernels' order (kept + 1 roundings of at most u·Σ|q·x|),
                // then one FMA with the scale and the bias (one rounding of u·|y|): within
                // (kept + 2)·u·(Σ|s·q·x| + |b|) of the exact value, the f32 kernels' bound.
                assert_within_rounding(&l, &exact, &x, &bias, batch, &want, &what);
                for k in kernels() {
                    let y = run_scaled(k, &l, &q, &idx, Some(&scales), &bias, &x, batch);
                    assert_eq!(y, want, "{k:?} {what}: not the portable kernel's bits");
                    let unit = run_scaled(k, &l, &q, &idx, Some(&ones), &bias, &x, batch);
                    let f32_layer = run_with(k, &l, &vq, &idxq, &bias, &x, batch);
                    assert_eq!(unit, f32_layer, "{k:?} {what}: unit scales");
                }
                let mut par = vec![f32::NAN; batch * rows];
                nm_linear_parallel(
                    &l,
                    &q,
                    &idx,
                    Some(&scales),
                    Some(&bias),
                    &x,
                    batch,
                    &mut par,
                )
                .unwrap();
                let mut one = vec![f32::NAN; batch * rows];
                nm_linear(
                    &l,
                    &q,
                    &idx,
                    Some(&scales),
                    Some(&bias),
                    &x,
                    batch,
                    &mut one,
                )
                .unwrap();
                assert_eq!(par, one, "{what}: parallel");
            }
        }
    }
}

#[test]
fn int8_refusals_name_the_argument() {
    let l = NmLayout::new(3, 8, 2, 4).unwrap();
    let mut w = vec![0f32; 24];
    w[9] = f32::NAN;
    let e = compress_int8(&l, &w).unwrap_err().to_string();
    assert!(e.starts_with("weight: row 1, column 1 holds NaN"), "{e}");
    w[9] = 1.0;
    w[10] = 1.0;
    w[11] = 1.0;
    let e = compress_int8(&l, &w).unwrap_err().to_string();
    assert!(e.contains("not 2:4") && e.contains("row 1, group 0"), "{e}");
    let (q, idx, scales) = compress_int8(&l, &[0f32; 24]).unwrap();
    let (x, mut y) = (vec![0f32; 8], vec![0f32; 3]);
    let e = nm_linear(&l, &q, &idx, None, None, &x, 1, &mut y).unwrap_err();
    assert!(e.to_string().starts_with("scales: int8 values need"), "{e}");
    let e = nm_linear(&l, &q, &idx, Some(&scales[..2]), None, &x, 1, &mut y).unwrap_err();
    assert!(
        e.to_string().starts_with("scales: expected 3 elements"),
        "{e}"
    );
    let (v, idx32) = compress(&l, &[0f32; 24]).unwrap();
    let e = nm_linear(&l, &v, &idx32, Some(&scales), None, &x, 1, &mut y).unwrap_err();
    assert!(e.to_string().starts_with("scales: only int8 values"), "{e}");
    let mut out = vec![0f32; 24];
    let e = dequantize_into(&l, &q, &idx, &scales[..1], &mut out).unwrap_err();
    assert!(e.to_string().starts_with("scales: expected 3"), "{e}");
}

#[test]
fn kernel_paths_name_the_dispatched_kernel_for_each_call() {
    let even = NmLayout::new(16, 8, 2, 4).unwrap();
    let odd = NmLayout::new(16, 8, 3, 4).unwrap();
    let paths = kernel_paths(&even);
    let base = paths[0].1;
    assert_eq!(
        base.split(' ').next().unwrap(),
        match level() {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    );
    let narrow = paths[1].1;
    assert_eq!(narrow.split(' ').next(), base.split(' ').next());
    // AVX2: 2:4 has its own kernel (in-lane input selection, two row blocks at batch 1).
    assert_eq!(
        base.contains("two row blocks"),
        level() == Kernel::Avx2,
        "{base}"
    );
    if level() == Kernel::Avx2 {
        assert_eq!(kernel_paths(&odd)[0].1, "avx2 (vpermps + FMA)");
    }
    assert_eq!(paths[3].1, narrow);
    // f32 values are prefetched into L2 exactly where the kernel does it.
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        base.contains("into L2"),
        level() == Kernel::Avx512 && super::x86::f32_prefetch()
    );
    // AMX tiles from AMX_MIN_BATCH rows, where amx_kernel says so (2:4, whole 32 columns).
    #[cfg(target_arch = "x86_64")]
    {
        let amx_layout = NmLayout::new(16, 64, 2, 4).unwrap();
        let named = kernel_paths(&amx_layout)[2].1;
        assert_eq!(
            named.contains(&format!(
                "amx (tdpbf16ps) from {} batch rows",
                super::AMX_MIN_BATCH
            )),
            super::amx::amx_kernel(&amx_layout),
            "{named}"
        );
        // int8 values: AMX for bf16 inputs from the same row count, beside the vector kernel.
        let int8 = kernel_paths(&amx_layout)[3].1;
        assert!(int8.starts_with(kernel_paths(&amx_layout)[1].1), "{int8}");
        assert_eq!(
            int8.contains(&format!(
                "amx (tdpbf16ps, bfloat16 inputs) from {} batch rows",
                super::AMX_MIN_BATCH
            )),
            super::amx::amx_kernel(&amx_layout),
            "{int8}"
        );
        assert!(
            !paths[2].1.contains("amx") && !paths[3].1.contains("amx"),
            "8 columns are not a whole tile step"
        );
    }
    // vdpbf16ps only where bf16_dot_kernel says so (never for an odd N).
    assert_eq!(paths[2].1 != narrow, bf16_dot_kernel(&even));
    let odd_paths = kernel_paths(&odd);
    assert_eq!(odd_paths[2].1, odd_paths[1].1);
}
