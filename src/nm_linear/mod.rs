//! Compressed N:M weights and the kernels of an N:M linear layer on a CPU.
//!
//! Token-by-token decoding is memory-bound: every weight is read once per token. A dense f32
//! weight costs 4 bytes; a 2:4 weight stored compressed costs its kept values (half of them)
//! plus their positions, 2.125 bytes per dense weight in f32 (1.125 in bf16; int8 with one f32
//! scale per output row: 0.625 + 4 / cols).
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
//! That is the f32 order, which int8 values share (one byte each); bf16 values interleave each
//! pair of slots lane by lane so that one load gives two slots ([`NmLayout::value_offset`]).
//! The index is the same for all three. int8 values come with one f32 scale per output row
//! (`quant`: symmetric per-row quantization, `W = q · scale`).
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
//! int8 values are widened to f32 exactly (`vpmovsxbd` + `vcvtdq2ps`, 16 or 8 at a time) and
//! summed the same way; the row's scale multiplies the sum once, in the output loop all
//! kernels share (`y = fma(Σ q·x, scale, bias)`).
//!
//! ## Files
//!
//! * `layout`: [`NmLayout`], the shape of a compressed weight and where each value and
//!   position is stored.
//! * `elem`: [`NmElem`], the stored element types (f32, [`Bf16`], i8).
//! * `check`: the buffer-length and index checks every entry point runs first.
//! * `pack`: [`compress`] and [`decompress`] between the dense weight and the layout.
//! * `quant`: [`compress_int8`] (the per-row int8 quantization) and [`dequantize_into`].
//! * `pieces`: the split of the row blocks over the thread pool.
//! * `dispatch`: the entry points ([`nm_linear`], [`nm_linear_parallel`],
//!   [`nm_linear_bf16_parallel`]): pick the kernel this CPU runs, drive it block by block.
//! * `portable`: the kernel in plain Rust (any CPU, and the reference the others equal).
//! * `x86`: the AVX-512, AVX-512 BF16 and AVX2 kernels (x86-64 only).
//! * `amx`: the AMX kernel for bf16 inputs to bf16 or int8 2:4 weights from a few batch rows
//!   on (x86-64 CPUs with AMX, on Linux).

#[cfg(target_arch = "x86_64")]
pub mod amx;
mod check;
mod dispatch;
mod elem;
mod layout;
mod pack;
mod pieces;
mod portable;
mod quant;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use check::{check_call, check_index, check_scales};
pub use dispatch::{
    bf16_dot_kernel, kernel_paths, level, nm_linear, nm_linear_bf16_parallel,
    nm_linear_int8_bf16_parallel, nm_linear_parallel, run_blocks, Kernel, AMX_MIN_BATCH,
};
pub use elem::{Bf16, NmElem};
pub use layout::{NmLayout, ROW_BLOCK};
pub use pack::{compress, decompress, decompress_into};
pub use quant::{compress_int8, dequantize_into, row_scale};

#[cfg(test)]
mod tests;
