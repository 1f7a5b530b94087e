//! The AMX kernel: 2:4 bf16 (or int8) weights times bf16 inputs, 16 batch rows at a time.
//!
//! Beyond a few batch rows (a prompt, a batch of requests) the vector kernels are
//! compute-bound, and on CPUs with AMX (Advanced Matrix Extensions) torch's dense bf16
//! product uses its tile instructions and wins. This kernel uses them too: for each row block
//! and each 32 input columns it expands the compressed weight into one dense bf16 tile in L1
//! (16 output rows × 32 inputs, in the pair-interleaved order `tdpbf16ps` reads), then
//! multiplies it with up to four 16-row tiles of the inputs. The weight is read compressed
//! from memory and expanded once per 64 batch rows. Every row block reads the inputs again,
//! so they have to stay in L2: a larger batch runs in slices of rows that do
//! ([`batch_slice`]), each slice over every row block (the weight read from memory once per
//! slice), with its inputs in tile order ([`pack_tiles`]).
//!
//! Expansion: a slot pair of a 2:4 group holds, per output row, the group's two kept values
//! (low and high half of one 32-bit lane) and their positions `p0 < p1`. The tile rows for
//! inputs (4k, 4k + 1) and (4k + 2, 4k + 3) are one byte shuffle each of the pair's 64 bytes:
//! each lane's code `p0 + 4·p1` picks its shuffle control from a 16-entry table (zero bytes
//! where a position is not kept).
//!
//! `tdpbf16ps` multiplies bf16 pairs exactly in f32 and adds them into the f32 sums; the
//! order of the additions is the hardware's (not the other kernels'), and denormal inputs
//! and outputs are flushed to zero, as `vdpbf16ps` does: results agree with the other
//! kernels within the f32 summation bound, not bit for bit.
//!
//! Linux hands out the tile state per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`); [`amx_available`] asks once. The instructions are written as
//! inline assembly: Rust's AMX intrinsics are not stable.

use super::elem::Bf16;
use super::layout::{NmLayout, ROW_BLOCK};
use std::arch::asm;
use std::arch::x86_64::*;

/// Batch rows of one input tile (and of one output tile).
pub const TILE_ROWS: usize = 16;
/// Input columns per tile step: a tile row is 64 bytes, 32 bf16.
const TILE_K: usize = 32;
/// Output tiles (of 16 batch rows each) that share one expanded weight tile.
pub const MAX_TILES: usize = 4;

/// The bytes of bf16 inputs a slice of the batch may span: half of a 2 MiB L2, so that the
/// slice's inputs stay there while every row block reads them (the weights streaming
/// through beside them).
pub const SLICE_BYTES: usize = 1 << 20;

/// Batch rows per slice for rows of `cols` inputs: the multiple of 64 (one weight tile's
/// four input tiles) whose inputs fit in [`SLICE_BYTES`], at least 64.
pub fn batch_slice(cols: usize) -> usize {
    let group = TILE_ROWS * MAX_TILES;
    (SLICE_BYTES / (2 * cols.max(1)) / group * group).max(group)
}

/// Whether this process may run [`block_amx`]: a CPU with AMX-TILE and AMX-BF16, the AVX-512
/// level (so `CAST_RS_NO_SIMD` turns it off), `CAST_RS_NO_AMX` unset, and Linux granting the
/// tile state. Decided once.
pub fn amx_available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| {
        if std::env::var_os("CAST_RS_NO_AMX").is_some()
            || super::dispatch::level() != super::dispatch::Kernel::Avx512
        {
            return false;
        }
        // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512 (checked above).
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { __cpuid_count(7, 0) };
        let (bf16, tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        bf16 && tile && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when Linux grants the AMX
/// tile data to this process (all its threads).
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call with integer arguments; it touches no memory of ours, and
    // the registers the kernel clobbers (rcx, r11) are declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Whether [`block_amx`] can run a layer of `layout` here: AMX ([`amx_available`]), the 2:4
/// pattern, and whole 32-column tile steps.
pub fn amx_kernel(layout: &NmLayout) -> bool {
    layout.is_2_4() && layout.cols.is_multiple_of(TILE_K) && amx_available()
}

/// The tile configuration (`ldtilecfg`'s 64-byte record, palette 1): tiles 0-3 the output
/// sums of up to four 16-row input tiles (the last one `last_rows` rows), 4 a whole input
/// tile, 5 the expanded weight tile, 6 a last input tile of `last_rows` rows; rows of 64
/// bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

fn tile_config(tiles: usize, last_rows: usize) -> TileConfig {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    for t in 0..7 {
        colsb[t] = 64;
        rows[t] = TILE_ROWS as u8;
    }
    rows[tiles - 1] = last_rows as u8;
    rows[6] = last_rows as u8;
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
}

/// `vpshufb` controls by code `p0 + 4·p1` (a lane's two positions): the 4 bytes of the
/// lane's 32-bit word in the tile row for inputs (`first`, `first + 1`): the bytes of the
/// kept value at each of the two positions (bytes 0-1: the slot of `p0`, 2-3: of `p1`), or
/// zero (`0x80`) where neither is kept.
const fn shuffle_table(first: u32) -> [u32; 16] {
    let mut t = [0u32; 16];
    let mut code = 0;
    while code < 16 {
        let (p0, p1) = ((code % 4) as u32, (code / 4) as u32);
        let mut word = 0u32;
        let mut half = 0;
        while half < 2 {
            let c = first + half;
            let (lo, hi) = if p0 == c {
                (0, 1)
            } else if p1 == c {
                (2, 3)
            } else {
                (0x80, 0x80)
            };
            word |= (lo | (hi << 8)) << (16 * half);
            half += 1;
        }
        t[code] = word;
        code += 1;
    }
    t
}

const ROWS01: [u32; 16] = shuffle_table(0);
const ROWS23: [u32; 16] = shuffle_table(2);

/// Where [`block_amx`] finds its input tiles: the tile of batch rows `16·j..16·j + 16` and
/// input columns `kc..kc + 32` starts at byte `ptr + j·tile_bytes + (kc / 32)·step_bytes`,
/// its rows `row_stride` bytes apart.
#[derive(Clone, Copy)]
pub struct TileInputs {
    ptr: *const u8,
    tile_bytes: usize,
    step_bytes: usize,
    row_stride: usize,
}

impl TileInputs {
    /// Row-major inputs of `cols` bf16 per row, from `x`'s first row.
    pub fn row_major(x: &[Bf16], cols: usize) -> Self {
        Self {
            ptr: x.as_ptr() as *const u8,
            tile_bytes: TILE_ROWS * cols * 2,
            step_bytes: TILE_K * 2,
            row_stride: cols * 2,
        }
    }

    /// Inputs packed by [`pack_tiles`] for rows of `cols`, from tile `first_tile` on.
    pub fn packed(xp: &[Bf16], cols: usize, first_tile: usize) -> Self {
        let tile_bytes = cols / TILE_K * TILE_BYTES;
        Self {
            ptr: (xp.as_ptr() as *const u8).wrapping_add(first_tile * tile_bytes),
            tile_bytes,
            step_bytes: TILE_BYTES,
            row_stride: TILE_K * 2,
        }
    }
}

/// Bytes of one input tile: 16 rows of 32 bf16.
const TILE_BYTES: usize = TILE_ROWS * TILE_K * 2;

/// `batch` rows of `cols` bf16 (`cols` a multiple of 32) in tile order: for each 16-row tile
/// and each 32 columns, the tile's 1 KiB contiguous (rows past `batch` zero).
///
/// Why: row-major rows of a power-of-two size (8 KiB for 4096 inputs) all fall in the same
/// few cache sets, so the 16 rows of a tile compete for the ways of one L1 set and, beyond
/// 128 batch rows, of a few L2 sets, and every row block's tile loads miss. Packed, a
/// tile load reads one contiguous KiB. Worth its copy when several 64-row groups re-read the
/// inputs for every row block.
pub fn pack_tiles(x: &[Bf16], batch: usize, cols: usize) -> Vec<Bf16> {
    debug_assert!(cols.is_multiple_of(TILE_K) && x.len() >= batch * cols);
    let steps = cols / TILE_K;
    let mut xp = vec![Bf16(0); batch.div_ceil(TILE_ROWS) * steps * TILE_ROWS * TILE_K];
    for (r, row) in x[..batch * cols].chunks_exact(cols).enumerate() {
        let (tile, i) = (r / TILE_ROWS, r % TILE_ROWS);
        for (s, piece) in row.chunks_exact(TILE_K).enumerate() {
            let at = ((tile * steps + s) * TILE_ROWS + i) * TILE_K;
            xp[at..at + TILE_K].copy_from_slice(piece);
        }
    }
    xp
}

/// The weight values [`block_amx`] expands into bf16 tiles: bf16, or int8 widened exactly
/// (an int8 times an f32 scale is the weight; the scale is applied to the sums, as the other
/// int8 kernels do).
pub trait AmxValues: Copy {
    /// The 32 values of the slot pair starting at global slot `slot` (even) as bf16, in the
    /// pair-interleaved order of bf16 values (lane l: the first slot's value in the low half
    /// of 32-bit word l, the second's in the high half).
    ///
    /// # Safety
    /// AVX-512F available; `values` holds the pair (`check_call`).
    unsafe fn pair_bf16(values: &[Self], slot: usize) -> __m512i;
}

impl AmxValues for Bf16 {
    #[inline(always)]
    unsafe fn pair_bf16(values: &[Self], slot: usize) -> __m512i {
        // bf16 pairs are stored interleaved (`NmLayout::value_offset`): one load.
        _mm512_loadu_si512(values.as_ptr().add(slot * ROW_BLOCK) as *const __m512i)
    }
}

impl AmxValues for i8 {
    #[inline(always)]
    unsafe fn pair_bf16(values: &[Self], slot: usize) -> __m512i {
        // int8 slots are stored one after the other. Each is widened to f32 (exact), and
        // an f32 of at most 7 significant bits has a zero low half: its high half is the
        // same number in bf16. Ternary-logic table 0xF8 is A | (B & C).
        let p = values.as_ptr().add(slot * ROW_BLOCK);
        let widen = |q: *const i8| {
            _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                q as *const __m128i,
            ))))
        };
        let (first, second) = (widen(p), widen(p.add(ROW_BLOCK)));
        _mm512_ternarylogic_epi32::<0xF8>(
            _mm512_srli_epi32::<16>(first),
            second,
            _mm512_set1_epi32(0xffff_0000_u32 as i32),
        )
    }
}

/// `acc[(16·j + i)·16 + lane] = Σ_c x[16·j + i, c] · W[16·block + lane, c]` for `tiles`
/// tiles of batch rows, 16 each but the last, which has `last_rows`, read where `inputs`
/// says.
///
/// # Safety
/// [`amx_kernel`]`(layout)`; `values` and `index` as checked by `check_call`; `inputs`
/// addresses readable tiles of these rows over all `cols` inputs; `1 ≤ tiles ≤ MAX_TILES`,
/// `1 ≤ last_rows ≤ 16`; `acc` holds `256 · tiles` f32.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn block_amx<E: AmxValues>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    inputs: TileInputs,
    tiles: usize,
    last_rows: usize,
    block: usize,
    acc: &mut [f32],
) {
    debug_assert!((1..=MAX_TILES).contains(&tiles) && acc.len() >= 256 * tiles);
    debug_assert!((1..=TILE_ROWS).contains(&last_rows));
    let config = tile_config(tiles, last_rows);
    // The last input tile: tile 6 when it is short, else tile 4 like the others.
    let short = last_rows < TILE_ROWS;
    let (cols, kept) = (layout.cols, layout.kept());
    let first = block * kept;
    let lane_shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // vpshufb works within 128-bit lanes: lane l's bytes start at 4·(l mod 4) there.
    let lane_bytes = _mm512_set4_epi32(0x0c0c_0c0c, 0x0808_0808, 0x0404_0404, 0);
    let rows01 = _mm512_loadu_si512(ROWS01.as_ptr() as *const __m512i);
    let rows23 = _mm512_loadu_si512(ROWS23.as_ptr() as *const __m512i);
    #[repr(C, align(64))]
    struct Tile([u32; 256]);
    let mut wt = Tile([0; 256]);
    let stride = inputs.row_stride;
    // SAFETY: the caller's contract: AMX is granted to this process; the tile registers are
    // used only inside this function (configured here, released before returning).
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    for kc in (0..cols).step_by(TILE_K) {
        // The weight tile of inputs kc..kc + 32: 8 groups, two tile rows each.
        for g in 0..TILE_K / 4 {
            let slot = first + 2 * (kc / 4 + g);
            let w = E::pair_bf16(values, slot);
            let p0 = _mm512_srlv_epi32(
                _mm512_set1_epi32(*index.get_unchecked(slot) as i32),
                lane_shift,
            );
            let p1 = _mm512_srlv_epi32(
                _mm512_set1_epi32(*index.get_unchecked(slot + 1) as i32),
                lane_shift,
            );
            // (p0 & 3) | (p1 << 2); vpermd reads the code's 4 low bits.
            let code = _mm512_ternarylogic_epi32::<0xEC>(
                p0,
                _mm512_slli_epi32::<2>(p1),
                _mm512_set1_epi32(3),
            );
            let c01 = _mm512_add_epi8(_mm512_permutexvar_epi32(code, rows01), lane_bytes);
            let c23 = _mm512_add_epi8(_mm512_permutexvar_epi32(code, rows23), lane_bytes);
            let out = wt.0.as_mut_ptr().add(32 * g) as *mut __m512i;
            _mm512_store_si512(out, _mm512_shuffle_epi8(w, c01));
            _mm512_store_si512(out.add(1), _mm512_shuffle_epi8(w, c23));
        }
        let xk = inputs.ptr.wrapping_add(kc / TILE_K * inputs.step_bytes);
        let tile_bytes = inputs.tile_bytes;
        // SAFETY: the weight tile is 16 rows of 64 bytes; each input tile is 16 rows (the last
        // `last_rows`) of 64 bytes at `stride` apart, where `inputs` says (the caller's
        // contract; kc + 32 ≤ cols).
        unsafe {
            asm!("tileloadd tmm5, [{0} + {1}*1]", in(reg) wt.0.as_ptr(), in(reg) 64usize, options(nostack, readonly));
            // Tile j's inputs start 16·j rows down; the last tile uses tile 6 when short.
            macro_rules! dot {
                ($c:literal, $j:expr) => {
                    if $j + 1 == tiles && short {
                        asm!(concat!("tileloadd tmm6, [{0} + {1}*1]\n", "tdpbf16ps tmm", $c, ", tmm6, tmm5"),
                             in(reg) xk.wrapping_add($j * tile_bytes), in(reg) stride, options(nostack, readonly));
                    } else {
                        asm!(concat!("tileloadd tmm4, [{0} + {1}*1]\n", "tdpbf16ps tmm", $c, ", tmm4, tmm5"),
                             in(reg) xk.wrapping_add($j * tile_bytes), in(reg) stride, options(nostack, readonly));
                    }
                };
            }
            dot!("0", 0);
            if tiles > 1 {
                dot!("1", 1);
            }
            if tiles > 2 {
                dot!("2", 2);
            }
            if tiles > 3 {
                dot!("3", 3);
            }
        }
    }
    let out = acc.as_mut_ptr() as *mut u8;
    // SAFETY: `acc` holds 256·tiles f32: tile j's 16 rows of 64 bytes at 1024·j bytes.
    unsafe {
        asm!("tilestored [{0} + {1}*1], tmm0", in(reg) out, in(reg) 64usize, options(nostack));
        if tiles > 1 {
            asm!("tilestored [{0} + {1}*1], tmm1", in(reg) out.add(1024), in(reg) 64usize, options(nostack));
        }
        if tiles > 2 {
            asm!("tilestored [{0} + {1}*1], tmm2", in(reg) out.add(2048), in(reg) 64usize, options(nostack));
        }
        if tiles > 3 {
            asm!("tilestored [{0} + {1}*1], tmm3", in(reg) out.add(3072), in(reg) 64usize, options(nostack));
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}
