//! Compressed N:M weights and the kernels of an N:M linear layer on a CPU (issue 11).
//!
//! Token-by-token decoding is memory-bound: every weight is read once per token. A dense f32
//! weight costs 4 bytes; a 2:4 weight stored compressed costs its kept values (half of them)
//! plus their positions, 2.125 bytes per dense weight in f32 (1.125 in bf16).
//!
//! ## Layout ([`NmLayout`])
//!
//! `W` is `[rows, cols]` (an `nn.Linear` weight: output rows, N:M groups of M consecutive
//! inputs along a row). Rows are taken in **blocks of 16** (the last block padded with zero
//! rows), so that one 16-lane vector load serves 16 output rows at once. Within a block, the
//! kept values are stored slot by slot: slot `t = k·N + j` is the `j`-th kept weight of group
//! `k` of each of the 16 rows:
//!
//! ```text
//! values[(block · kept + t) · 16 + lane]   = W[16·block + lane, M·k + pos]   (kept = cols/M · N)
//! index word (block · kept + t), lane bits = pos (0 ≤ pos < M), idx_bits bits per lane
//! ```
//!
//! That is the f32 order; bf16 values interleave each pair of slots lane by lane so that one
//! load gives two slots ([`NmLayout::value_offset`]). The index is the same for both.
//!
//! `idx_bits` is 2 for M ≤ 4 (one `u32` word per slot: 16 lanes × 2 bits) and 4 for
//! 4 < M ≤ 8 (two `u32` words per slot). Within a group the kept positions are stored in
//! increasing order; a group with fewer than N nonzeros (a kept weight that is exactly 0)
//! fills its slots with zero values at the lowest free positions.
//!
//! ## Kernels
//!
//! `y[b, r] = Σ_c x[b, c] · W[r, c]` (+ bias) for a batch of `b` input rows. For each block
//! and group the kernel broadcasts the group's M inputs across the vector, picks each lane's
//! input with one permute (`vpermps`) from the lane's index bits, and accumulates value ×
//! input with an FMA, for up to 8 batch rows at a time (the values, the expensive stream, are
//! loaded once per 8 rows). Accumulation is in f32: even and odd slots in two FMA chains (so
//! that batch 1 does not wait out the FMA latency on every slot), added at the end. Every
//! dispatch level (AVX-512, AVX2, portable) sums in that order, so all give the same bits.

use crate::error::{CastError, Result};

/// Output rows per block: the f32 lanes of one AVX-512 vector.
pub const ROW_BLOCK: usize = 16;

/// Shape of a compressed N:M weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NmLayout {
    pub rows: usize,
    pub cols: usize,
    pub n: usize,
    pub m: usize,
}

impl NmLayout {
    /// Checks `1 ≤ n < m ≤ 8` and that `cols` is a multiple of `m`.
    pub fn new(rows: usize, cols: usize, n: usize, m: usize) -> Result<Self> {
        if !(2..=8).contains(&m) || n == 0 || n >= m {
            return Err(CastError::value(
                "pattern",
                format!("expected N:M with 1 <= N < M <= 8, got {n}:{m}"),
            ));
        }
        if !cols.is_multiple_of(m) {
            return Err(CastError::value(
                "weight",
                format!("its {cols} input columns are not a multiple of M = {m}"),
            ));
        }
        Ok(NmLayout { rows, cols, n, m })
    }

    /// Bits of one position index: 2 for M ≤ 4, 4 for M ≤ 8.
    pub fn idx_bits(&self) -> usize {
        if self.m <= 4 {
            2
        } else {
            4
        }
    }

    /// `u32` index words per slot (16 lanes × `idx_bits`).
    pub fn words_per_slot(&self) -> usize {
        ROW_BLOCK * self.idx_bits() / 32
    }

    pub fn blocks(&self) -> usize {
        self.rows.div_ceil(ROW_BLOCK)
    }

    pub fn groups(&self) -> usize {
        self.cols / self.m
    }

    /// Kept weights per row.
    pub fn kept(&self) -> usize {
        self.groups() * self.n
    }

    /// Length of the values array (padding rows included).
    pub fn values_len(&self) -> usize {
        self.blocks() * self.kept() * ROW_BLOCK
    }

    /// Length of the index array in `u32` words.
    pub fn index_len(&self) -> usize {
        self.blocks() * self.kept() * self.words_per_slot()
    }

    /// Offset in `values` of lane `lane` of slot `t` (`0 ≤ t < kept`) of block `block`.
    ///
    /// 4-byte values (f32) are slot-major: `(block · kept + t) · 16 + lane`. 2-byte values
    /// (bf16, `paired`) interleave each **pair of slots** `(2i, 2i + 1)` of a block lane by
    /// lane: `(block · kept + 2i) · 16 + 2 · lane + (t mod 2)`, so that one 32-bit word holds a
    /// lane's two values (the low half is slot 2i) and one 64-byte load gives both slots as
    /// f32 with a shift and a mask (instead of two widening loads). An odd last slot of a
    /// block stays plain. The values array has the same length either way.
    #[inline(always)]
    pub fn value_offset(&self, paired: bool, block: usize, t: usize, lane: usize) -> usize {
        let kept = self.kept();
        if paired && (t | 1) < kept {
            (block * kept + (t & !1)) * ROW_BLOCK + 2 * lane + (t & 1)
        } else {
            (block * kept + t) * ROW_BLOCK + lane
        }
    }

    /// Position of lane `lane` of slot `slot` (global slot number `block · kept + t`).
    #[inline(always)]
    fn position(&self, index: &[u32], slot: usize, lane: usize) -> usize {
        let bits = self.idx_bits();
        let bit = lane * bits;
        let word = index[slot * self.words_per_slot() + bit / 32];
        ((word >> (bit % 32)) & ((1 << bits) - 1)) as usize
    }
}

/// A stored weight element: f32, or bf16 as its bits.
pub trait NmElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    /// Stored as interleaved pairs of slots ([`NmLayout::value_offset`]): the 2-byte types.
    const PAIRED: bool;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    fn is_zero(self) -> bool;
}

impl NmElem for f32 {
    const ZERO: Self = 0.0;
    const PAIRED: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn is_zero(self) -> bool {
        self == 0.0
    }
}

/// bf16 bits (what torch stores for `torch.bfloat16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl NmElem for Bf16 {
    const ZERO: Self = Bf16(0);
    const PAIRED: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    fn from_f32(x: f32) -> Self {
        Bf16(crate::half::f32_to_bf16(x))
    }
    fn is_zero(self) -> bool {
        self.0 & 0x7fff == 0
    }
}

/// Compresses a dense row-major `[rows, cols]` weight that is exactly N:M (at most N nonzeros
/// in every group of M). Returns `(values, index)` in the layout of the module docs.
pub fn compress<E: NmElem>(layout: &NmLayout, dense: &[E]) -> Result<(Vec<E>, Vec<u32>)> {
    let NmLayout { rows, cols, n, m } = *layout;
    if dense.len() != rows * cols {
        return Err(CastError::value(
            "weight",
            format!(
                "expected {} elements ({rows} x {cols}), got {}",
                rows * cols,
                dense.len()
            ),
        ));
    }
    let kept = layout.kept();
    let bits = layout.idx_bits();
    let wps = layout.words_per_slot();
    let mut values = vec![E::ZERO; layout.values_len()];
    let mut index = vec![0u32; layout.index_len()];
    let mut pos = [0usize; 8];
    for r in 0..rows {
        let (block, lane) = (r / ROW_BLOCK, r % ROW_BLOCK);
        for k in 0..layout.groups() {
            let group = &dense[r * cols + k * m..r * cols + (k + 1) * m];
            let mut taken = 0;
            for (p, v) in group.iter().enumerate() {
                if !v.is_zero() {
                    if taken == n {
                        return Err(CastError::value(
                            "weight",
                            format!(
                                "not {n}:{m}: row {r}, group {k} (columns {}..{}) has more than \
                                 {n} nonzeros; finalize the model (or project it with nm_mask) first",
                                k * m,
                                (k + 1) * m
                            ),
                        ));
                    }
                    pos[taken] = p;
                    taken += 1;
                }
            }
            // Fill the remaining slots with zero weights at the lowest free positions, then
            // keep the slots in increasing position order.
            let mut p = 0;
            while taken < n {
                if !pos[..taken].contains(&p) {
                    pos[taken] = p;
                    taken += 1;
                }
                p += 1;
            }
            pos[..n].sort_unstable();
            for (j, &p) in pos[..n].iter().enumerate() {
                let slot = block * kept + k * n + j;
                values[layout.value_offset(E::PAIRED, block, k * n + j, lane)] = group[p];
                let bit = lane * bits;
                index[slot * wps + bit / 32] |= (p as u32) << (bit % 32);
            }
        }
    }
    Ok((values, index))
}

/// The dense row-major `[rows, cols]` weight of a compressed one (the inverse of
/// [`compress`], for `state_dict` round trips and tests).
pub fn decompress<E: NmElem>(layout: &NmLayout, values: &[E], index: &[u32]) -> Result<Vec<E>> {
    let mut dense = vec![E::ZERO; layout.rows * layout.cols];
    decompress_into(layout, values, index, &mut dense)?;
    Ok(dense)
}

/// [`decompress`] into `dense` (`rows · cols` elements, every one written), on the thread
/// pool: the index is checked first ([`check_index`]: nothing is written if a position is out
/// of range), then each piece zeroes its rows and scatters its blocks' values slot by slot,
/// reading the values in storage order.
pub fn decompress_into<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    dense: &mut [E],
) -> Result<()> {
    check_buffers(layout, values.len(), index.len())?;
    let NmLayout { rows, cols, n, m } = *layout;
    if dense.len() != rows * cols {
        return Err(CastError::value(
            "out",
            format!("expected {rows} x {cols} elements, got {}", dense.len()),
        ));
    }
    check_index(layout, index)?;
    let kept = layout.kept();
    in_pieces(layout, dense, |b0, b1, out| {
        let (r0, r1) = (b0 * ROW_BLOCK, (b1 * ROW_BLOCK).min(rows));
        // SAFETY: `dense` is borrowed for the whole call and holds `rows · cols` elements;
        // pieces own disjoint row ranges [r0, r1).
        let piece = unsafe { std::slice::from_raw_parts_mut(out.add(r0 * cols), (r1 - r0) * cols) };
        // Row by row: the 16 rows of a block lie `cols` elements apart, and writing all of
        // them slot by slot keeps 16 lines of one L1 set busy whenever a row is a multiple of
        // 4 KiB (most shapes), which evicts on every store (measured: 3x slower).
        let (bits, wps) = (layout.idx_bits(), layout.words_per_slot());
        let mask = (1u32 << bits) - 1;
        for block in b0..b1 {
            let lanes = ROW_BLOCK.min(rows - block * ROW_BLOCK);
            for lane in 0..lanes {
                let row_start = (block * ROW_BLOCK + lane - r0) * cols;
                let row = &mut piece[row_start..row_start + cols];
                row.fill(E::ZERO); // (here, not all rows first: the row is then in cache)
                let bit = lane * bits;
                let (mut k, mut j) = (0, 0); // slot t is the j-th kept weight of group k
                for t in 0..kept {
                    let slot = block * kept + t;
                    let p = ((index[slot * wps + bit / 32] >> (bit % 32)) & mask) as usize;
                    // (`value_offset`, with its arithmetic spelled out for this loop.)
                    let v = if E::PAIRED && (t | 1) < kept {
                        (block * kept + (t & !1)) * ROW_BLOCK + 2 * lane + (t & 1)
                    } else {
                        slot * ROW_BLOCK + lane
                    };
                    row[k * m + p] = values[v];
                    (k, j) = if j + 1 == n { (k + 1, 0) } else { (k, j + 1) };
                }
            }
        }
    });
    Ok(())
}

fn check_buffers(layout: &NmLayout, values: usize, index: usize) -> Result<()> {
    if values != layout.values_len() {
        return Err(CastError::value(
            "values",
            format!(
                "expected {} elements for {layout:?}, got {values}",
                layout.values_len()
            ),
        ));
    }
    if index != layout.index_len() {
        return Err(CastError::value(
            "index",
            format!(
                "expected {} words for {layout:?}, got {index}",
                layout.index_len()
            ),
        ));
    }
    Ok(())
}

/// `y[b, r] = Σ_c x[b, c] · W[r, c] + bias[r]` for `batch` rows of `x` (`[batch, cols]`,
/// row-major) into `y` (`[batch, rows]`), with the best kernel this CPU has, on the calling
/// thread ([`nm_linear_parallel`] splits the row blocks over the thread pool). Memory-safe
/// whatever the index holds (the vector kernels pick inputs inside a register holding the group, the
/// portable one is bounds-checked), but positions of M or more give wrong sums, so an index
/// not made by [`compress`] should pass [`check_index`].
pub fn nm_linear<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    check_call(layout, values, index, bias, x, batch, y)?;
    run_blocks(
        layout,
        values,
        index,
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

/// Checks every buffer length of a call.
pub fn check_call<E: NmElem, X: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    bias: Option<&[f32]>,
    x: &[X],
    batch: usize,
    y: &[f32],
) -> Result<()> {
    check_buffers(layout, values.len(), index.len())?;
    if x.len() != batch * layout.cols {
        return Err(CastError::value(
            "input",
            format!(
                "expected {batch} x {} elements, got {}",
                layout.cols,
                x.len()
            ),
        ));
    }
    if y.len() != batch * layout.rows {
        return Err(CastError::value(
            "out",
            format!(
                "expected {batch} x {} elements, got {}",
                layout.rows,
                y.len()
            ),
        ));
    }
    if let Some(b) = bias {
        if b.len() != layout.rows {
            return Err(CastError::value(
                "bias",
                format!("expected {} elements, got {}", layout.rows, b.len()),
            ));
        }
    }
    Ok(())
}

/// Every index lane holds a position below M (the kernels index the broadcast group with it).
pub fn check_index(layout: &NmLayout, index: &[u32]) -> Result<()> {
    if index.len() != layout.index_len() {
        return Err(CastError::value(
            "index",
            format!("expected {} words, got {}", layout.index_len(), index.len()),
        ));
    }
    if 1 << layout.idx_bits() == layout.m {
        return Ok(()); // 2-bit positions and M = 4: every pattern is a position
    }
    let slots = layout.blocks() * layout.kept();
    for slot in 0..slots {
        for lane in 0..ROW_BLOCK {
            if layout.position(index, slot, lane) >= layout.m {
                return Err(CastError::value(
                    "index",
                    format!(
                        "slot {slot}, lane {lane}: position out of range for M = {}",
                        layout.m
                    ),
                ));
            }
        }
    }
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
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: *mut f32,
    b0: usize,
    b1: usize,
    kernel: Kernel,
) {
    let cols = layout.cols;
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
    unsafe { for_chunks(layout, bias, batch, y, b0, b1, block_kernel) }
}

/// The loop every kernel shares: for each block of `[b0, b1)` and each chunk of up to 8
/// batch rows, `kernel(b, nb, block, acc)` sums batch rows `b..b + nb` of the block into
/// `acc[bb · 16 + lane]`, and the chunk's rows (plus bias) are written into `y`.
///
/// # Safety
/// As [`run_blocks_raw`].
unsafe fn for_chunks(
    layout: &NmLayout,
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
            let rows_here = ROW_BLOCK.min(layout.rows - block * ROW_BLOCK);
            for bb in 0..nb {
                for lane in 0..rows_here {
                    let r = block * ROW_BLOCK + lane;
                    let add = bias.map_or(0.0, |bv| bv[r]);
                    // SAFETY: in bounds (r < rows, b + bb < batch); these rows are this
                    // call's (the caller's contract).
                    unsafe {
                        *y.add((b + bb) * layout.rows + r) = acc[bb * ROW_BLOCK + lane] + add
                    };
                }
            }
            b += nb;
        }
    }
}

/// A raw output pointer that may cross threads (each thread writes its own row blocks).
struct OutPtr<T>(*mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: used only by `in_pieces`, whose pieces write disjoint row blocks.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    // A method (not `.0`) so that a closure captures the whole `Sync` wrapper.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Runs `piece(b0, b1, out)` over disjoint ranges of the row blocks on the crate's thread
/// pool (torch's, in the extension), `out` pointing at `y`: a few pieces per thread, handed
/// out dynamically; the calling thread works too. One piece, on this thread, when there is
/// one thread or little work. A piece may write only the rows of its blocks.
fn in_pieces<T: Send>(layout: &NmLayout, y: &mut [T], piece: impl Fn(usize, usize, *mut T) + Sync) {
    let blocks = layout.blocks();
    let threads = crate::parallel::num_threads().max(1);
    // Enough pieces to balance (4 per thread), each at least 4 blocks (64 rows) so that a
    // piece streams a useful stretch of the weight.
    let pieces = (threads * 4).min(blocks.div_ceil(4)).max(1);
    if pieces == 1 || threads == 1 {
        piece(0, blocks, y.as_mut_ptr());
        return;
    }
    let per = blocks.div_ceil(pieces);
    let ranges: Vec<(usize, usize)> = (0..blocks)
        .step_by(per)
        .map(|b0| (b0, (b0 + per).min(blocks)))
        .collect();
    let out = OutPtr(y.as_mut_ptr());
    crate::parallel::for_each(ranges, |(b0, b1)| piece(b0, b1, out.get()));
}

/// [`nm_linear`] on the crate's thread pool (torch's, in the extension): the row blocks are
/// cut into a few pieces per thread, handed out dynamically; the calling thread works too.
pub fn nm_linear_parallel<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    bias: Option<&[f32]>,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<()> {
    check_call(layout, values, index, bias, x, batch, y)?;
    let kernel = level();
    in_pieces(layout, y, |b0, b1, out| {
        // SAFETY: `y` is borrowed for the whole call and long enough (checked); pieces cover
        // disjoint block ranges, so no two threads write the same element.
        unsafe { run_blocks_raw(layout, values, index, bias, x, batch, out, b0, b1, kernel) }
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

/// [`nm_linear_parallel`] for bf16 weights **and bf16 inputs** (a bf16 model's activations).
///
/// With [`bf16_dot_kernel`], `vdpbf16ps` multiplies each lane's two kept values of a slot pair
/// by their two inputs in one instruction: a product of two bf16 is exact in f32, and each of
/// the two additions into the f32 sum rounds once, as an FMA does (measured on this CPU: the
/// instruction adds the products one after the other, not fused), so the error bound is the
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
    check_call(layout, values, index, bias, x, batch, y)?;
    if !bf16_dot_kernel(layout) {
        let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        return nm_linear_parallel(layout, values, index, bias, &x32, batch, y);
    }
    #[cfg(target_arch = "x86_64")]
    in_pieces(layout, y, |b0, b1, out| {
        let cols = layout.cols;
        let block_kernel = |b: usize, nb: usize, block: usize, acc: &mut [f32]| {
            let xs = &x[b * cols..(b + nb) * cols];
            // SAFETY: the CPU features and an even N were checked (`bf16_dot_kernel`), the
            // buffer lengths by `check_call`.
            unsafe { x86::block_dpbf16(layout, values, index, xs, nb, block, acc) }
        };
        // SAFETY: as in `nm_linear_parallel`: `y` is borrowed for the whole call and long
        // enough; pieces write disjoint block ranges.
        unsafe { for_chunks(layout, bias, batch, out, b0, b1, block_kernel) }
    });
    Ok(())
}

/// The portable kernel: one block, `nb` batch rows, into `acc[bb · 16 + lane]`.
///
/// Every output sums its even slots and its odd slots in two separate FMA chains and adds
/// the two at the end: the order of the vector kernels, where two independent chains keep
/// the FMA unit busy at batch 1 (one chain waits out the FMA latency on every slot).
fn block_portable<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    xs: &[f32],
    nb: usize,
    block: usize,
    acc: &mut [f32],
) {
    let (n, m, cols, kept) = (layout.n, layout.m, layout.cols, layout.kept());
    let mut even = [0f32; ROW_BLOCK * 8];
    let mut odd = [0f32; ROW_BLOCK * 8];
    for t in 0..kept {
        let slot = block * kept + t;
        let base = (t / n) * m;
        let chain = if t % 2 == 0 { &mut even } else { &mut odd };
        for lane in 0..ROW_BLOCK {
            let w = values[layout.value_offset(E::PAIRED, block, t, lane)].to_f32();
            let c = base + layout.position(index, slot, lane);
            for bb in 0..nb {
                let a = &mut chain[bb * ROW_BLOCK + lane];
                *a = w.mul_add(xs[bb * cols + c], *a);
            }
        }
    }
    for (i, a) in acc[..nb * ROW_BLOCK].iter_mut().enumerate() {
        *a = even[i] + odd[i];
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Bf16, NmElem, NmLayout, ROW_BLOCK};
    use std::arch::x86_64::*;

    /// One unpaired slot's 16 values (at element offset `off`) as f32.
    #[inline(always)]
    unsafe fn load16<E: NmElem>(values: &[E], off: usize) -> __m512 {
        let p = values.as_ptr().add(off);
        if std::mem::size_of::<E>() == 4 {
            _mm512_loadu_ps(p as *const f32)
        } else {
            // bf16 → f32: the bits, widened and shifted into the high half.
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// The two slots of a pair (at element offset `off`) as f32: f32 takes two loads; bf16
    /// pairs are interleaved (`value_offset`), so one load, a shift (the low halves, the
    /// first slot) and a mask (the high halves, the second slot).
    #[inline(always)]
    unsafe fn load_pair<E: NmElem>(values: &[E], off: usize) -> (__m512, __m512) {
        let p = values.as_ptr().add(off);
        if std::mem::size_of::<E>() == 4 {
            let p = p as *const f32;
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(ROW_BLOCK)))
        } else {
            let v = _mm512_loadu_si512(p as *const __m512i);
            let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, high)),
            )
        }
    }

    /// Lane positions of slot `slot`: lane l's field is bits [l·b, l·b + b) of the slot's
    /// words. Not masked: `vpermps` reads only the low 4 bits, and the group vector repeats
    /// with period 4 (M ≤ 4) or 8 (M ≤ 8) (`group16`), so the neighbouring field's bits that
    /// land above the lane's own select a copy of the same input.
    #[inline(always)]
    unsafe fn positions16(index: &[u32], slot: usize, bits: usize) -> __m512i {
        if bits == 2 {
            let w = _mm512_set1_epi32(*index.get_unchecked(slot) as i32);
            let shifts =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            _mm512_srlv_epi32(w, shifts)
        } else {
            let lo = _mm256_set1_epi32(*index.get_unchecked(2 * slot) as i32);
            let hi = _mm256_set1_epi32(*index.get_unchecked(2 * slot + 1) as i32);
            let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let shifts =
                _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
            _mm512_srlv_epi32(w, shifts)
        }
    }

    /// The group's M inputs repeated across the vector with period 4 (M ≤ 4, zero-padded)
    /// or 8 (M ≤ 8), so that a permute by a position < M picks input `position`.
    #[inline(always)]
    unsafe fn group16(x: &[f32], start: usize, m: usize) -> __m512 {
        let p = x.as_ptr().add(start);
        if m == 4 {
            _mm512_broadcast_f32x4(_mm_loadu_ps(p))
        } else if m < 4 {
            let mut buf = [0f32; 4];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
            _mm512_broadcast_f32x4(_mm_loadu_ps(buf.as_ptr()))
        } else {
            let mut buf = [0f32; 8];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
            _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(
                buf.as_ptr(),
            ))))
        }
    }

    /// # Safety
    /// AVX-512F/BW/VL/DQ available; buffers as checked by `check_call`; `1 ≤ nb ≤ 8`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub unsafe fn block_avx512<E: NmElem>(
        layout: &NmLayout,
        values: &[E],
        index: &[u32],
        xs: &[f32],
        nb: usize,
        block: usize,
        acc: &mut [f32],
    ) {
        // One instance per batch width, so that the accumulators live in registers (a
        // run-time width leaves them in memory, and every FMA waits on a store).
        let f = match nb {
            1 => block_avx512_nb::<E, 1>,
            2 => block_avx512_nb::<E, 2>,
            3 => block_avx512_nb::<E, 3>,
            4 => block_avx512_nb::<E, 4>,
            5 => block_avx512_nb::<E, 5>,
            6 => block_avx512_nb::<E, 6>,
            7 => block_avx512_nb::<E, 7>,
            8 => block_avx512_nb::<E, 8>,
            _ => unreachable!("batch chunks have 1 to 8 rows"),
        };
        f(layout, values, index, xs, block, acc)
    }

    /// [`block_avx512`] for `NB` batch rows.
    ///
    /// # Safety
    /// As `block_avx512`.
    // Batch rows index several arrays in step: index loops read best here.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn block_avx512_nb<E: NmElem, const NB: usize>(
        layout: &NmLayout,
        values: &[E],
        index: &[u32],
        xs: &[f32],
        block: usize,
        acc: &mut [f32],
    ) {
        let (n, m, cols, kept) = (layout.n, layout.m, layout.cols, layout.kept());
        let bits = layout.idx_bits();
        let first = block * kept;
        // Element offset of slot t's values (of the pair, for an even t).
        let off = |t: usize| (first + t) * ROW_BLOCK;
        // Prefetch the value stream a few slots ahead (the stream that sets the speed).
        // (`wrapping_add`: the address may lie past the end, which a prefetch tolerates.)
        let prefetch = |t: usize| {
            _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add(off(t + 8)) as *const i8)
        };
        let mut even = [_mm512_setzero_ps(); NB];
        let mut odd = [_mm512_setzero_ps(); NB];
        let mut xg = [_mm512_setzero_ps(); NB];
        if n == 2 && m == 4 {
            // 2:4: a pair of slots is one group.
            for k in 0..kept / 2 {
                let t = 2 * k;
                for bb in 0..NB {
                    xg[bb] = group16(xs, bb * cols + 4 * k, 4);
                }
                prefetch(t);
                let (w0, w1) = load_pair(values, off(t));
                let p0 = positions16(index, first + t, 2);
                let p1 = positions16(index, first + t + 1, 2);
                for bb in 0..NB {
                    even[bb] = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(p0, xg[bb]), even[bb]);
                    odd[bb] = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(p1, xg[bb]), odd[bb]);
                }
            }
        } else {
            // Any N:M: slots in pairs (t, t + 1); slot t is the j-th kept weight of group k.
            let (mut k, mut j, mut t) = (0, 0, 0);
            while t < kept {
                let pair = t + 1 < kept;
                prefetch(t);
                let (w0, w1) = if pair {
                    load_pair(values, off(t))
                } else {
                    (load16(values, off(t)), _mm512_setzero_ps())
                };
                if j == 0 {
                    for bb in 0..NB {
                        xg[bb] = group16(xs, bb * cols + k * m, m);
                    }
                }
                let p0 = positions16(index, first + t, bits);
                for bb in 0..NB {
                    even[bb] = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(p0, xg[bb]), even[bb]);
                }
                (k, j) = if j + 1 == n { (k + 1, 0) } else { (k, j + 1) };
                if pair {
                    if j == 0 {
                        for bb in 0..NB {
                            xg[bb] = group16(xs, bb * cols + k * m, m);
                        }
                    }
                    let p1 = positions16(index, first + t + 1, bits);
                    for bb in 0..NB {
                        odd[bb] = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(p1, xg[bb]), odd[bb]);
                    }
                    (k, j) = if j + 1 == n { (k + 1, 0) } else { (k, j + 1) };
                }
                t += 2;
            }
        }
        for bb in 0..NB {
            _mm512_storeu_ps(
                acc.as_mut_ptr().add(bb * ROW_BLOCK),
                _mm512_add_ps(even[bb], odd[bb]),
            );
        }
    }

    /// Word-selection and shift constants (compile-time) that turn a slot pair's four index words (M > 4:
    /// 4 bits per lane and slot) into the 32 `vpermw` indices of [`block_dpbf16`] (word 2l:
    /// lane l's position in the pair's first slot, word 2l + 1: in its second): as 16-bit
    /// chunks c0..c7, c0..c3 hold the first slot's lanes four at a time, c4..c7 the second's.
    const PAIR_INDEX: ([u16; 32], [u16; 32]) = {
        let (mut sel, mut shift) = ([0u16; 32], [0u16; 32]);
        let mut l = 0;
        while l < 16 {
            sel[2 * l] = (l / 4) as u16;
            sel[2 * l + 1] = (4 + l / 4) as u16;
            shift[2 * l] = (4 * (l % 4)) as u16;
            shift[2 * l + 1] = (4 * (l % 4)) as u16;
            l += 1;
        }
        (sel, shift)
    };

    /// A group's M bf16 inputs repeated across the 32 words with period 4 (M ≤ 4,
    /// zero-padded) or 8 (M ≤ 8).
    #[inline(always)]
    unsafe fn group32_bf16(x: &[Bf16], start: usize, m: usize) -> __m512i {
        let p = x.as_ptr().add(start);
        if m == 4 {
            _mm512_set1_epi64((p as *const i64).read_unaligned())
        } else if m < 4 {
            let mut buf = [0u16; 4];
            std::ptr::copy_nonoverlapping(p as *const u16, buf.as_mut_ptr(), m);
            _mm512_set1_epi64(i64::from_ne_bytes(
                std::mem::transmute::<[u16; 4], [u8; 8]>(buf),
            ))
        } else {
            let mut buf = [0u16; 8];
            std::ptr::copy_nonoverlapping(p as *const u16, buf.as_mut_ptr(), m);
            _mm512_broadcast_i32x4(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
        }
    }

    /// # Safety
    /// AVX-512F/BW/VL/DQ and AVX-512 BF16 available; N even; buffers as checked by
    /// `check_call` (`xs` holds `nb` rows of `cols` bf16); `1 ≤ nb ≤ 8`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
    pub unsafe fn block_dpbf16(
        layout: &NmLayout,
        values: &[Bf16],
        index: &[u32],
        xs: &[Bf16],
        nb: usize,
        block: usize,
        acc: &mut [f32],
    ) {
        // One instance per batch width (registers) and input selection: M ≤ 4 picks a
        // lane's two inputs with a byte shuffle (`vpshufb`, cheap), M > 4 with a word permute
        // (`vpermw`, slower here, but its control needs no table).
        let f = |rows| {
            if layout.idx_bits() == 2 {
                by_width::<true>(rows)
            } else {
                by_width::<false>(rows)
            }
        };
        // At most 4 rows per pass: two chains per row, the group and the constants fill
        // the registers (8 rows would spill); a second pass reads the block from cache.
        f(nb.min(4))(layout, values, index, xs, block, acc);
        if nb > 4 {
            let cols = layout.cols;
            f(nb - 4)(
                layout,
                values,
                index,
                &xs[4 * cols..],
                block,
                &mut acc[4 * ROW_BLOCK..],
            );
        }
    }

    type DotKernel = unsafe fn(&NmLayout, &[Bf16], &[u32], &[Bf16], usize, &mut [f32]);

    fn by_width<const SHUFFLE: bool>(nb: usize) -> DotKernel {
        match nb {
            1 => block_dpbf16_nb::<1, SHUFFLE>,
            2 => block_dpbf16_nb::<2, SHUFFLE>,
            3 => block_dpbf16_nb::<3, SHUFFLE>,
            4 => block_dpbf16_nb::<4, SHUFFLE>,
            _ => unreachable!("passes have 1 to 4 rows"),
        }
    }

    /// `vpshufb` control for M ≤ 4, by 4-bit code `p0 + 4·p1` (a lane's two positions): the
    /// bytes of inputs p0 and p1 (two bytes each) from a 128-bit lane holding the group.
    const SHUFFLE_BY_CODE: [u32; 16] = {
        let mut t = [0u32; 16];
        let mut c = 0;
        while c < 16 {
            let (p0, p1) = ((c % 4) as u32, (c / 4) as u32);
            t[c] = (2 * p0) | ((2 * p0 + 1) << 8) | ((2 * p1) << 16) | ((2 * p1 + 1) << 24);
            c += 1;
        }
        t
    };

    /// One slot pair into one chain: per batch row, pick each lane's two inputs (`vpermw`)
    /// and add both products (`vdpbf16ps`).
    #[inline(always)]
    unsafe fn dot_pair<const NB: usize, const SHUFFLE: bool>(
        w: __m512i,
        select: __m512i,
        xg: &[__m512i; NB],
        chain: &mut [__m512; NB],
    ) {
        for bb in 0..NB {
            let picked = if SHUFFLE {
                _mm512_shuffle_epi8(xg[bb], select)
            } else {
                _mm512_permutexvar_epi16(select, xg[bb])
            };
            // SAFETY (of the transmutes): both are 64 bytes of plain bits.
            chain[bb] = _mm512_dpbf16_ps(
                chain[bb],
                std::mem::transmute::<__m512i, __m512bh>(w),
                std::mem::transmute::<__m512i, __m512bh>(picked),
            );
        }
    }

    /// [`block_dpbf16`] for `NB` batch rows. Slot pairs alternate between two chains, as
    /// the even and odd slots do in the f32-input kernels.
    ///
    /// # Safety
    /// As `block_dpbf16`.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
    unsafe fn block_dpbf16_nb<const NB: usize, const SHUFFLE: bool>(
        layout: &NmLayout,
        values: &[Bf16],
        index: &[u32],
        xs: &[Bf16],
        block: usize,
        acc: &mut [f32],
    ) {
        let (n, m, cols, kept) = (layout.n, layout.m, layout.cols, layout.kept());
        let wps = layout.words_per_slot();
        let first = block * kept;
        let sel = _mm512_loadu_si512(PAIR_INDEX.0.as_ptr() as *const __m512i);
        let shift = _mm512_loadu_si512(PAIR_INDEX.1.as_ptr() as *const __m512i);
        let by_code = _mm512_loadu_si512(SHUFFLE_BY_CODE.as_ptr() as *const __m512i);
        let lane_shift =
            _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        // The pair (t, t + 1): its 32 values (interleaved, `value_offset`) and the control
        // that picks each lane's two inputs. Neighbouring fields' bits above a position are
        // either masked or select a copy of the same input (the group repeats with period 4
        // or 8 words).
        let pair = |t: usize| -> (__m512i, __m512i) {
            let slot = first + t;
            _mm_prefetch::<_MM_HINT_T0>(
                values.as_ptr().wrapping_add((slot + 8) * ROW_BLOCK) as *const i8
            );
            let w = _mm512_loadu_si512(values.as_ptr().add(slot * ROW_BLOCK) as *const __m512i);
            let words = index.as_ptr().add(slot * wps);
            if SHUFFLE {
                // Lane l's code p0 + 4·p1 from the pair's two index words, then its shuffle
                // control from the table (`vpermd` reads the code's 4 low bits).
                let p0 = _mm512_srlv_epi32(_mm512_set1_epi32(*words as i32), lane_shift);
                let p1 = _mm512_srlv_epi32(_mm512_set1_epi32(*words.add(1) as i32), lane_shift);
                // (p0 & 3) | (p1 << 2): ternary-logic table 0xEC is (A & C) | B.
                let code = _mm512_ternarylogic_epi32::<0xEC>(
                    p0,
                    _mm512_slli_epi32::<2>(p1),
                    _mm512_set1_epi32(3),
                );
                (w, _mm512_permutexvar_epi32(code, by_code))
            } else {
                // The pair's 4 index words as 16-bit chunks, each lane's two fields moved
                // into words 2l and 2l + 1 (`PAIR_INDEX`).
                let q = _mm512_broadcast_i32x4(_mm_loadu_si128(words as *const __m128i));
                (
                    w,
                    _mm512_srlv_epi16(_mm512_permutexvar_epi16(sel, q), shift),
                )
            }
        };
        let mut even = [_mm512_setzero_ps(); NB];
        let mut odd = [_mm512_setzero_ps(); NB];
        let mut xg = [_mm512_setzero_si512(); NB];
        // Slot t is the j-th kept weight of group k (j even: N is even, pairs stay in a group).
        // The even and odd bodies are written out: folded into one closure over the chain,
        // the accumulators spilled (measured: batch 4 and 16 ran at 0.35-0.6x).
        let (mut k, mut j, mut t) = (0, 0, 0);
        while t < kept {
            if j == 0 {
                for bb in 0..NB {
                    xg[bb] = group32_bf16(xs, bb * cols + k * m, m);
                }
            }
            let (w, idx) = pair(t);
            dot_pair::<NB, SHUFFLE>(w, idx, &xg, &mut even);
            (k, j) = if j + 2 == n { (k + 1, 0) } else { (k, j + 2) };
            t += 2;
            if t < kept {
                if j == 0 {
                    for bb in 0..NB {
                        xg[bb] = group32_bf16(xs, bb * cols + k * m, m);
                    }
                }
                let (w, idx) = pair(t);
                dot_pair::<NB, SHUFFLE>(w, idx, &xg, &mut odd);
                (k, j) = if j + 2 == n { (k + 1, 0) } else { (k, j + 2) };
                t += 2;
            }
        }
        for bb in 0..NB {
            _mm512_storeu_ps(
                acc.as_mut_ptr().add(bb * ROW_BLOCK),
                _mm512_add_ps(even[bb], odd[bb]),
            );
        }
    }

    /// # Safety
    /// AVX2 and FMA available; buffers as checked by `check_call`; `1 ≤ nb ≤ 8`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_avx2<E: NmElem>(
        layout: &NmLayout,
        values: &[E],
        index: &[u32],
        xs: &[f32],
        nb: usize,
        block: usize,
        acc: &mut [f32],
    ) {
        // One instance per batch width (registers, as in `block_avx512`); AVX2's 16 vector
        // registers hold the chains of at most 4 rows, so wider chunks run as two.
        let f = |rows: usize| match rows {
            1 => block_avx2_nb::<E, 1>,
            2 => block_avx2_nb::<E, 2>,
            3 => block_avx2_nb::<E, 3>,
            4 => block_avx2_nb::<E, 4>,
            _ => unreachable!("AVX2 chunks have 1 to 4 rows"),
        };
        let first = nb.min(4);
        f(first)(layout, values, index, xs, block, acc);
        if nb > 4 {
            let (cols, rest) = (layout.cols, nb - 4);
            f(rest)(
                layout,
                values,
                index,
                &xs[4 * cols..],
                block,
                &mut acc[4 * ROW_BLOCK..],
            );
        }
    }

    /// [`block_avx2`] for `NB ≤ 4` batch rows: the 16 lanes as two halves of 8, one after
    /// the other (the second pass reads the block's values from cache).
    ///
    /// # Safety
    /// As `block_avx2`.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2_nb<E: NmElem, const NB: usize>(
        layout: &NmLayout,
        values: &[E],
        index: &[u32],
        xs: &[f32],
        block: usize,
        acc: &mut [f32],
    ) {
        let (n, m, cols, kept) = (layout.n, layout.m, layout.cols, layout.kept());
        let bits = layout.idx_bits();
        let first = block * kept;
        let paired = std::mem::size_of::<E>() == 2;
        for half in 0..2 {
            let lane0 = 8 * half;
            // Slot t's 8 values of this half as f32 (unpaired slot, or the first of a pair).
            let load8 = |t: usize| -> __m256 {
                let p = values.as_ptr().add((first + t) * ROW_BLOCK + lane0);
                if paired {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                } else {
                    _mm256_loadu_ps(p as *const f32)
                }
            };
            // Both slots of the pair starting at t (see `x86::load_pair`).
            let load_pair8 = |t: usize| -> (__m256, __m256) {
                if paired {
                    let p = values.as_ptr().add((first + t) * ROW_BLOCK + 2 * lane0);
                    let v = _mm256_loadu_si256(p as *const __m256i);
                    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
                    (
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                        _mm256_castsi256_ps(_mm256_and_si256(v, high)),
                    )
                } else {
                    (load8(t), load8(t + 1))
                }
            };
            // Lane positions (not masked: `vpermps` reads 3 bits, and the group repeats
            // with period 4 for M ≤ 4, as in `positions16`).
            let positions8 = |slot: usize| -> __m256i {
                if bits == 2 {
                    let w = _mm256_set1_epi32(*index.get_unchecked(slot) as i32);
                    let b = 16 * half as i32;
                    let shifts =
                        _mm256_setr_epi32(b, b + 2, b + 4, b + 6, b + 8, b + 10, b + 12, b + 14);
                    _mm256_srlv_epi32(w, shifts)
                } else {
                    let w = _mm256_set1_epi32(*index.get_unchecked(2 * slot + half) as i32);
                    _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28))
                }
            };
            let group8 = |start: usize| -> __m256 {
                let p = xs.as_ptr().add(start);
                if m == 4 {
                    _mm256_broadcast_ps(&*(p as *const __m128))
                } else if m < 4 {
                    let mut buf = [0f32; 4];
                    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                    _mm256_broadcast_ps(&*(buf.as_ptr() as *const __m128))
                } else {
                    let mut buf = [0f32; 8];
                    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), m);
                    _mm256_loadu_ps(buf.as_ptr())
                }
            };
            let mut even = [_mm256_setzero_ps(); NB];
            let mut odd = [_mm256_setzero_ps(); NB];
            let mut xg = [_mm256_setzero_ps(); NB];
            let (mut k, mut j, mut t) = (0, 0, 0);
            while t < kept {
                let pair = t + 1 < kept;
                let (w0, w1) = if pair {
                    load_pair8(t)
                } else {
                    (load8(t), _mm256_setzero_ps())
                };
                if j == 0 {
                    for bb in 0..NB {
                        xg[bb] = group8(bb * cols + k * m);
                    }
                }
                let p0 = positions8(first + t);
                for bb in 0..NB {
                    even[bb] = _mm256_fmadd_ps(w0, _mm256_permutevar8x32_ps(xg[bb], p0), even[bb]);
                }
                (k, j) = if j + 1 == n { (k + 1, 0) } else { (k, j + 1) };
                if pair {
                    if j == 0 {
                        for bb in 0..NB {
                            xg[bb] = group8(bb * cols + k * m);
                        }
                    }
                    let p1 = positions8(first + t + 1);
                    for bb in 0..NB {
                        odd[bb] =
                            _mm256_fmadd_ps(w1, _mm256_permutevar8x32_ps(xg[bb], p1), odd[bb]);
                    }
                    (k, j) = if j + 1 == n { (k + 1, 0) } else { (k, j + 1) };
                }
                t += 2;
            }
            for bb in 0..NB {
                _mm256_storeu_ps(
                    acc.as_mut_ptr().add(bb * ROW_BLOCK + lane0),
                    _mm256_add_ps(even[bb], odd[bb]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// f64 reference: y = x · Wᵀ + bias.
    fn reference(
        w: &[f32],
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
                    s += w[r * cols + c] as f64 * x[b * cols + c] as f64;
                }
                y[b * rows + r] = s;
            }
        }
        y
    }

    /// Asserts that `y` is within f32 summation rounding of the f64 reference: each of the
    /// kept + 1 additions (products and bias) rounds once, by at most 2^-24 of a partial sum,
    /// itself at most Σ|w·x| + |bias|.
    fn assert_within_rounding(
        l: &NmLayout,
        w: &[f32],
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
                .map(|c| (w[r * cols + c] as f64 * x[b * cols + c] as f64).abs())
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
        let mut y = vec![f32::NAN; batch * l.rows];
        check_call(l, v, idx, Some(bias), x, batch, &y).unwrap();
        run_blocks(
            l,
            v,
            idx,
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
                for batch in [1usize, 3, 8, 11, 16] {
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

    #[test]
    fn bf16_inputs_against_the_dense_reference() {
        let mut rng = Rng(0x5eed_bf16);
        let mut used_dot = false;
        for &(n, m) in &[(2, 4), (2, 3), (2, 8), (4, 8), (2, 6), (1, 4), (3, 8)] {
            for &(rows, cols) in &[(16, 8 * m), (37, 4 * m), (5, m), (64, 32 * m)] {
                let l = NmLayout::new(rows, cols, n, m).unwrap();
                let w: Vec<Bf16> = nm_weight(rows, cols, n, m, &mut rng)
                    .iter()
                    .map(|&v| Bf16::from_f32(v))
                    .collect();
                let wf: Vec<f32> = w.iter().map(|b| b.to_f32()).collect();
                let (v, idx) = compress(&l, &w).unwrap();
                let bias: Vec<f32> = (0..rows).map(|_| rng.next()).collect();
                used_dot |= bf16_dot_kernel(&l);
                for batch in [1usize, 3, 8, 11, 16] {
                    let x: Vec<Bf16> = (0..batch * cols)
                        .map(|_| Bf16::from_f32(rng.next()))
                        .collect();
                    let xf: Vec<f32> = x.iter().map(|b| b.to_f32()).collect();
                    let mut y = vec![f32::NAN; batch * rows];
                    nm_linear_bf16_parallel(&l, &v, &idx, Some(&bias), &x, batch, &mut y).unwrap();
                    let mut f32_path = vec![0f32; batch * rows];
                    nm_linear(&l, &v, &idx, Some(&bias), &xf, batch, &mut f32_path).unwrap();
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
            nm_linear(&l, &v, &idx, None, &x, batch, &mut one).unwrap();
            nm_linear_parallel(&l, &v, &idx, None, &x, batch, &mut par).unwrap();
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
        let e = nm_linear(&l, &v, &idx, None, &[0f32; 7], 1, &mut y)
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
}
