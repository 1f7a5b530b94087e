//! The entry points of an N:M linear layer: check the buffers, pick the kernel this CPU runs
//! ([`Kernel`]), and drive it block by block and 8 batch rows at a time, on the calling thread
//! or on the thread pool.

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::check::check_call;
use super::elem::{Bf16, NmElem};
use super::layout::{NmLayout, ROW_BLOCK};
use super::pieces::in_pieces;
use super::portable::block_portable;
#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::error::Result;

/// `y = x · Wᵀ (+ bias)` for a compressed N:M weight `W` (int8 values: `W = q · scales[row]`,
/// `scales` required; float values: `scales` None) and `batch` input rows `x` (`[batch, cols]`,
/// row-major) into `y` (`[batch, rows]`), with the best kernel this CPU has, on the calling
/// thread ([`nm_linear_parallel`] splits the row blocks over the thread pool). Memory-safe
/// whatever the index holds (the vector kernels pick inputs inside a register holding the group, the
/// portable one is bounds-checked), but positions of M or more give wrong sums, so an index
/// not made by [`compress`] should pass [`check_index`].
#[allow(clippy::too_many_arguments)]
pub fn nm_linear<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    check_call(layout, values, index, scales, bias, x, batch, y)?;
    run_blocks(
        layout,
        values,
        index,
        scales,
        bias,
        x,
        batch,
        y,
        0,
        layout.blocks(),
        level(),
    );
    Ok(())
}

/// Which kernel ran (tests run each one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
    Avx512,
}

/// The best kernel for this CPU (`CAST_RS_NO_SIMD` forces the portable one).
pub fn level() -> Kernel {
    match crate::simd::level() {
        crate::simd::Level::Avx512 => Kernel::Avx512,
        crate::simd::Level::Avx2 => Kernel::Avx2,
        crate::simd::Level::Baseline => Kernel::Portable,
    }
}

/// Row blocks `[b0, b1)` of a call with kernel `kernel` (which the CPU must support). `y`
/// is the whole output; only the rows of these blocks are written.
#[allow(clippy::too_many_arguments)]
pub fn run_blocks<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    b0: usize,
    b1: usize,
    kernel: Kernel,
) {
    assert!(y.len() >= batch * layout.rows && b1 <= layout.blocks());
    // SAFETY: `y` is exclusively borrowed and long enough (asserted).
    unsafe {
        run_blocks_raw(
            layout,
            values,
            index,
            scales,
            bias,
            x,
            batch,
            y.as_mut_ptr(),
            b0,
            b1,
            kernel,
        )
    }
}

/// [`run_blocks`] writing through a raw pointer, so that threads can fill disjoint row
/// blocks of one output.
///
/// # Safety
/// `y` must be valid for writes of `batch · rows` f32; no other thread may access the rows
/// of blocks `[b0, b1)` of any batch row meanwhile; buffers as checked by [`check_call`].
#[allow(clippy::too_many_arguments)]
unsafe fn run_blocks_raw<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: *mut f32,
    b0: usize,
    b1: usize,
    kernel: Kernel,
) {
    let cols = layout.cols;
    let mut b0 = b0;
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 && batch == 1 && layout.is_2_4() {
        // Batch 1 on AVX2: two row blocks per pass (two memory streams, `block_avx2_24`);
        // an odd last block goes through the one-block loop below.
        let mut acc = [0f32; 2 * ROW_BLOCK];
        while b0 + 2 <= b1 {
            // SAFETY: AVX2 + FMA (the caller picks Avx2 only where the CPU has them), a 2:4
            // layout, blocks b0 and b0 + 1 in range, buffers checked by `check_call`.
            unsafe {
                x86::block_avx2_24::<E, 2, 1, 0, 2>(layout, values, index, x, b0, &mut acc);
                store_sums(layout, scales, bias, y, 0, b0, &acc[..ROW_BLOCK]);
                store_sums(layout, scales, bias, y, 0, b0 + 1, &acc[ROW_BLOCK..]);
            }
            b0 += 2;
        }
    }
    let block_kernel = |b: usize, nb: usize, block: usize, acc: &mut [f32]| {
        let xs = &x[b * cols..(b + nb) * cols];
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                // SAFETY: the caller only picks Avx512 on a CPU that has it (`level`);
                // buffer lengths were checked (`check_call`).
                unsafe { x86::block_avx512(layout, values, index, xs, nb, block, acc) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // SAFETY: as above, for AVX2 + FMA.
                unsafe { x86::block_avx2(layout, values, index, xs, nb, block, acc) }
            }
            _ => block_portable(layout, values, index, xs, nb, block, acc),
        }
    };
    // SAFETY: the caller's contract, forwarded.
    unsafe { for_chunks(layout, scales, bias, batch, y, b0, b1, block_kernel) }
}

/// The loop every kernel shares: for each block of `[b0, b1)` and each chunk of up to 8
/// batch rows, `kernel(b, nb, block, acc)` sums batch rows `b..b + nb` of the block into
/// `acc[bb · 16 + lane]`, and the chunk's rows are written into `y`: `acc + bias`, or for
/// int8 values `acc · scale + bias` in one FMA (the row's scale applied once per output, by
/// the same instruction whichever kernel summed, so every kernel still gives the same bits).
///
/// # Safety
/// As [`run_blocks_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn for_chunks(
    layout: &NmLayout,
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    batch: usize,
    y: *mut f32,
    b0: usize,
    b1: usize,
    mut kernel: impl FnMut(usize, usize, usize, &mut [f32]),
) {
    let mut acc = [0f32; ROW_BLOCK * 8];
    for block in b0..b1 {
        let mut b = 0;
        while b < batch {
            let nb = (batch - b).min(8);
            let acc = &mut acc[..ROW_BLOCK * nb];
            kernel(b, nb, block, acc);
            // SAFETY: the caller's contract, forwarded (b + nb ≤ batch).
            unsafe { store_sums(layout, scales, bias, y, b, block, acc) };
            b += nb;
        }
    }
}

/// Writes the sums of block `block` for batch rows `b..b + acc.len() / 16` into `y`:
/// `acc[bb · 16 + lane] + bias`, or for int8 values `acc · scale + bias` in one FMA.
///
/// # Safety
/// As [`run_blocks_raw`], for these batch rows.
unsafe fn store_sums(
    layout: &NmLayout,
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    y: *mut f32,
    b: usize,
    block: usize,
    acc: &[f32],
) {
    let rows_here = ROW_BLOCK.min(layout.rows - block * ROW_BLOCK);
    for bb in 0..acc.len() / ROW_BLOCK {
        for lane in 0..rows_here {
            let r = block * ROW_BLOCK + lane;
            let add = bias.map_or(0.0, |bv| bv[r]);
            let sum = acc[bb * ROW_BLOCK + lane];
            let out = match scales {
                Some(s) => sum.mul_add(s[r], add),
                None => sum + add,
            };
            // SAFETY: in bounds (r < rows, b + bb < batch); these rows are this call's (the
            // caller's contract).
            unsafe { *y.add((b + bb) * layout.rows + r) = out };
        }
    }
}

/// [`nm_linear`] on the crate's thread pool (torch's, in the extension): the row blocks are
/// cut into a few pieces per thread, handed out dynamically; the calling thread works too.
#[allow(clippy::too_many_arguments)]
pub fn nm_linear_parallel<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    check_call(layout, values, index, scales, bias, x, batch, y)?;
    let kernel = level();
    in_pieces(layout, y, |b0, b1, out| {
        // SAFETY: `y` is borrowed for the whole call and long enough (checked); pieces cover
        // disjoint block ranges, so no two threads write the same element.
        unsafe {
            run_blocks_raw(
                layout, values, index, scales, bias, x, batch, out, b0, b1, kernel,
            )
        }
    });
    Ok(())
}

/// Whether [`nm_linear_bf16_parallel`] runs its `vdpbf16ps` kernel for `layout`: a CPU with
/// AVX-512 BF16 (and the AVX-512 level, so `CAST_RS_NO_SIMD` turns it off) and an even N,
/// so that a pair of slots never straddles two groups.
pub fn bf16_dot_kernel(layout: &NmLayout) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let cpu = *BF16.get_or_init(|| std::arch::is_x86_feature_detected!("avx512bf16"));
        cpu && level() == Kernel::Avx512 && layout.n.is_multiple_of(2)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = layout;
        false
    }
}

/// What [`kernel_paths`] names the AVX-512 kernels of narrow (bf16, int8) values.
const NARROW_AVX512: &str = "avx512 (vpermps + FMA; software prefetch into L1)";

/// Which kernel runs a layer of `layout` on this CPU, per kind of call: `(call, kernel)`
/// pairs for float32 values, bfloat16 values with float32 inputs, bfloat16 values with
/// bfloat16 inputs, and int8 values (any inputs; sums in f32). What benchmarks
/// print beside their figures, since the same machine kind can land on different CPUs.
pub fn kernel_paths(layout: &NmLayout) -> [(&'static str, &'static str); 4] {
    // The AVX-512 kernels prefetch the narrow values into L1, and f32 values into L2 only
    // where `x86::f32_prefetch` says so (the AVX2 and portable ones leave it to the hardware).
    let (float, narrow) = match level() {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if x86::f32_prefetch() => (
            "avx512 (vpermps + FMA; software prefetch into L2)",
            NARROW_AVX512,
        ),
        Kernel::Avx512 => (
            "avx512 (vpermps + FMA; hardware prefetch only)",
            NARROW_AVX512,
        ),
        Kernel::Avx2 if layout.is_2_4() => {
            let avx2_24 = "avx2 (vpermilps + FMA; two row blocks per pass at batch 1)";
            (avx2_24, avx2_24)
        }
        Kernel::Avx2 => ("avx2 (vpermps + FMA)", "avx2 (vpermps + FMA)"),
        Kernel::Portable => ("portable (scalar)", "portable (scalar)"),
    };
    #[cfg(target_arch = "x86_64")]
    let amx = amx::amx_kernel(layout);
    #[cfg(not(target_arch = "x86_64"))]
    let amx = false;
    // (The row count is AMX_MIN_BATCH; a test keeps the two equal.)
    let int8 = if amx {
        // (AMX runs only where the AVX-512 kernels do.)
        concat!(
            "avx512 (vpermps + FMA; software prefetch into L1)",
            "; amx (tdpbf16ps, bfloat16 inputs) from 5 batch rows"
        )
    } else {
        narrow
    };
    let bf16_inputs = match (bf16_dot_kernel(layout), amx) {
        (true, true) => {
            "avx512_bf16 (vdpbf16ps; software prefetch into L1); amx (tdpbf16ps) from 5 batch rows"
        }
        (true, false) => "avx512_bf16 (vdpbf16ps; software prefetch into L1)",
        _ => narrow,
    };
    [
        ("float32", float),
        ("bfloat16 values, float32 inputs", narrow),
        ("bfloat16 values, bfloat16 inputs", bf16_inputs),
        ("int8 values", int8),
    ]
}

/// [`nm_linear_parallel`] for bf16 weights **and bf16 inputs** (a bf16 model's activations).
///
/// With [`bf16_dot_kernel`], `vdpbf16ps` multiplies each lane's two kept values of a slot pair
/// by their two inputs in one instruction: a product of two bf16 is exact in f32, and each of
/// the two additions into the f32 sum rounds once, as an FMA does (measured on a CPU with
/// AVX-512 BF16: the instruction adds the products one after the other, not fused), so the error bound is the
/// f32 kernels'; the order differs (a pair's second slot, then its first), so results are
/// not bit-identical to them. Inputs or outputs below f32's normal range are flushed to zero
/// by the instruction (bf16 shares f32's exponent range, so only values under 1.2e-38).
/// Without it, the inputs are widened to f32 and [`nm_linear_parallel`] runs.
pub fn nm_linear_bf16_parallel(
    layout: &NmLayout,
    values: &[Bf16],
    index: &[u32],
    bias: Option<&[f32]>,
    x: &[Bf16],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    check_call(layout, values, index, None, bias, x, batch, y)?;
    if !bf16_dot_kernel(layout) {
        return widened_parallel(layout, values, index, None, bias, x, batch, y);
    }
    #[cfg(target_arch = "x86_64")]
    {
        // From AMX_MIN_BATCH rows on, the whole batch on AMX where it runs.
        if on_amx(layout, batch) {
            // SAFETY: `on_amx` said yes; buffers checked by `check_call`.
            unsafe { amx_parallel(layout, values, index, None, bias, x, batch, y) };
            return Ok(());
        }
        in_pieces(layout, y, |b0, b1, out| {
            let cols = layout.cols;
            let block_kernel = |b: usize, nb: usize, block: usize, acc: &mut [f32]| {
                let xs = &x[b * cols..(b + nb) * cols];
                // SAFETY: the CPU features and an even N were checked (`bf16_dot_kernel`),
                // the buffer lengths by `check_call`.
                unsafe { x86::block_dpbf16(layout, values, index, xs, nb, block, acc) }
            };
            // SAFETY: as in `nm_linear_parallel`: `y` is borrowed for the whole call and long
            // enough; pieces write disjoint block ranges.
            unsafe { for_chunks(layout, None, bias, batch, out, b0, b1, block_kernel) }
        });
    }
    Ok(())
}

/// [`nm_linear_parallel`] for int8 weights (`scales` one per row) and **bf16 inputs**: from
/// [`AMX_MIN_BATCH`] rows on AMX where the CPU has it, the int8 values widened to bf16 in the
/// weight tiles (exact: |q| ≤ 127), so every product is exact in f32 as in the other
/// kernels and the sums keep the f32 summation bound; the row's scale is applied to each sum
/// as the other int8 kernels do. Fewer rows, or no AMX: the inputs are widened to f32 and
/// [`nm_linear_parallel`] runs (its bits).
#[allow(clippy::too_many_arguments)]
pub fn nm_linear_int8_bf16_parallel(
    layout: &NmLayout,
    values: &[i8],
    index: &[u32],
    scales: &[f32],
    bias: Option<&[f32]>,
    x: &[Bf16],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    check_call(layout, values, index, Some(scales), bias, x, batch, y)?;
    #[cfg(target_arch = "x86_64")]
    {
        if on_amx(layout, batch) {
            // SAFETY: `on_amx` said yes; buffers checked by `check_call`.
            unsafe { amx_parallel(layout, values, index, Some(scales), bias, x, batch, y) };
            return Ok(());
        }
    }
    widened_parallel(layout, values, index, Some(scales), bias, x, batch, y)
}

/// [`nm_linear_parallel`] on bf16 inputs widened to f32 (exactly): the fallback of the
/// bf16-input entry points, with the f32-input kernels' bits.
#[allow(clippy::too_many_arguments)]
fn widened_parallel<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[Bf16],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    nm_linear_parallel(layout, values, index, scales, bias, &x32, batch, y)
}

/// Whether a call of `batch` rows with bf16 inputs runs on AMX: from [`AMX_MIN_BATCH`] rows,
/// where `amx::amx_kernel` says the CPU and the layout allow it.
#[cfg(target_arch = "x86_64")]
fn on_amx(layout: &NmLayout, batch: usize) -> bool {
    batch >= AMX_MIN_BATCH && amx::amx_kernel(layout)
}

/// The whole call on AMX, its row blocks on the thread pool ([`in_pieces`]).
///
/// # Safety
/// [`on_amx`]`(layout, batch)`; buffers as checked by `check_call`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn amx_parallel<E: amx::AmxValues + Sync>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[Bf16],
    batch: usize,
    y: &mut [f32],
) {
    // Beyond one 64-row group every row block re-reads the inputs: in tile order then.
    let packed =
        (batch > amx::TILE_ROWS * amx::MAX_TILES).then(|| amx::pack_tiles(x, batch, layout.cols));
    in_pieces(layout, y, |b0, b1, out| {
        // SAFETY: the caller's contract; `out` is `y`, borrowed for the whole call, and the
        // pieces write disjoint block ranges.
        unsafe {
            amx_blocks(
                layout,
                values,
                index,
                scales,
                bias,
                x,
                packed.as_deref(),
                batch,
                out,
                b0,
                b1,
            )
        }
    });
}

/// Batch rows from which [`nm_linear_bf16_parallel`] runs on AMX (`amx::block_amx`) where the
/// CPU has it. Below, expanding the weight tiles costs more than `vdpbf16ps` does: on a Xeon
/// with AMX, (4096, 4096) on one thread took about 2.0 ms on AMX from 2 to 16 rows, and
/// 1.7 / 2.0 / 2.8 / 3.1 ms with `vdpbf16ps` at 2 / 4 / 6 / 8 rows.
pub const AMX_MIN_BATCH: usize = 5;

/// The `tiled` batch rows of blocks `[b0, b1)` on AMX: up to 64 rows (four tiles, the last
/// one possibly short) per expanded weight tile; a batch whose inputs do not stay in L2 in
/// slices of `amx::batch_slice` rows, each over every block. `packed`: the same inputs in
/// tile order (`amx::pack_tiles`), read instead of `x`.
///
/// # Safety
/// `amx::amx_kernel(layout)`; buffers as checked by `check_call`; `y` as in
/// [`run_blocks_raw`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn amx_blocks<E: amx::AmxValues>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[Bf16],
    packed: Option<&[Bf16]>,
    tiled: usize,
    y: *mut f32,
    b0: usize,
    b1: usize,
) {
    let cols = layout.cols;
    let group = amx::TILE_ROWS * amx::MAX_TILES;
    let mut acc = [0f32; ROW_BLOCK * amx::TILE_ROWS * amx::MAX_TILES];
    let slice = amx::batch_slice(cols);
    for s0 in (0..tiled).step_by(slice) {
        let s1 = (s0 + slice).min(tiled);
        for block in b0..b1 {
            for b in (s0..s1).step_by(group) {
                let rows = (s1 - b).min(group);
                let tiles = rows.div_ceil(amx::TILE_ROWS);
                let last_rows = rows - (tiles - 1) * amx::TILE_ROWS;
                let inputs = match packed {
                    Some(xp) => amx::TileInputs::packed(xp, cols, b / amx::TILE_ROWS),
                    None => amx::TileInputs::row_major(&x[b * cols..(b + rows) * cols], cols),
                };
                // SAFETY: the caller's contract; `inputs` addresses these rows (`x` or its
                // packed copy, `b` a multiple of 16), `acc` has room for their tiles.
                unsafe {
                    amx::block_amx(
                        layout, values, index, inputs, tiles, last_rows, block, &mut acc,
                    );
                    store_sums(layout, scales, bias, y, b, block, &acc[..ROW_BLOCK * rows]);
                }
            }
        }
    }
}
