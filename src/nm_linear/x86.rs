//! The x86-64 kernels of one row block: AVX-512 (f32 or bf16 values, f32 inputs), AVX-512
//! BF16 (`vdpbf16ps`, bf16 values and inputs) and AVX2 + FMA. Each is called only where the
//! CPU has its instructions (`dispatch::level`, `bf16_dot_kernel`).

use super::elem::{Bf16, NmElem};
use super::layout::{NmLayout, ROW_BLOCK};
use std::arch::x86_64::*;

/// How far ahead (bytes, at batch 1) the kernels prefetch their value stream.
/// At batch 1 these kernels outrun the memory system's own look-ahead: a weight streamed from
/// memory took about three times as long as one in the L2 cache, and prefetching 2-4 KiB
/// ahead instead of 128-256 bytes made the streamed case 15-25 % faster (interleaved A/B in
/// one process; `examples/nm_linear_timing.rs`). With NB batch rows a slot takes about NB
/// times as long, so the distance is divided by NB, the same time ahead (undivided, it made
/// products of 128 and more bf16 rows slower). f32 values: see [`f32_prefetch`].
const PREFETCH_AHEAD: usize = 3072;

/// [`PREFETCH_AHEAD`] for `nb` batch rows, in elements of `E`.
#[inline(always)]
fn prefetch_ahead<E>(nb: usize) -> usize {
    PREFETCH_AHEAD / (nb * std::mem::size_of::<E>())
}

/// Whether the f32-value kernels prefetch (both cache lines of a slot pair,
/// [`PREFETCH_AHEAD`] / NB bytes ahead, into L2): on Intel CPUs, not on others.
///
/// A pair of f32 slots is two whole cache lines. On AMD EPYC the hardware prefetcher follows
/// that stream by itself: a software prefetch was neutral or slower there, and without one a
/// batch-1 call read at 88-99 % of `F.linear`'s rate. On an Intel Xeon (480 MiB L3) the same
/// call read at 56-65 % of the host's read bandwidth against `F.linear`'s 87-95 %: one
/// stream's look-ahead stops at each 4 KiB page there. Prefetching both lines 3 KiB ahead
/// into L2 took one thread from 11.6 to 16.1 GB/s and two from 21.7 to 29.1 GB/s (into L1:
/// 14.8; one line of the two: 14.9; 1.5 or 4 KiB ahead: 14.6-15.7). The bf16 and int8
/// kernels, with their shorter pairs, were within 5 % either way there, so they keep one
/// prefetch into L1 everywhere. Decided once, from the CPUID vendor string.
pub fn f32_prefetch() -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(|| {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU. (`__cpuid` is a safe function in
        // newer Rust, an unsafe one in older: the block compiles with both.)
        #[allow(unused_unsafe)]
        let id = unsafe { __cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&id.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&id.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&id.ecx.to_le_bytes());
        &vendor == b"GenuineIntel"
    })
}

/// One unpaired slot's 16 values (at element offset `off`) as f32.
#[inline(always)]
unsafe fn load16<E: NmElem>(values: &[E], off: usize) -> __m512 {
    let p = values.as_ptr().add(off);
    if std::mem::size_of::<E>() == 4 {
        _mm512_loadu_ps(p as *const f32)
    } else if std::mem::size_of::<E>() == 1 {
        // int8 → f32: sign-extended to 32 bits, then converted (exact: |q| ≤ 127).
        let b = _mm_loadu_si128(p as *const __m128i);
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
    } else {
        // bf16 → f32: the bits, widened and shifted into the high half.
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// The two slots of a pair (at element offset `off`) as f32: f32 and int8 take two loads
/// (int8 slots are not paired); bf16 pairs are interleaved (`value_offset`), so one load, a
/// shift (the low halves, the first slot) and a mask (the high halves, the second slot).
#[inline(always)]
unsafe fn load_pair<E: NmElem>(values: &[E], off: usize) -> (__m512, __m512) {
    let p = values.as_ptr().add(off);
    if std::mem::size_of::<E>() == 4 {
        let p = p as *const f32;
        (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(ROW_BLOCK)))
    } else if !E::PAIRED {
        (load16(values, off), load16(values, off + ROW_BLOCK))
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
        let shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        _mm512_srlv_epi32(w, shifts)
    } else {
        let lo = _mm256_set1_epi32(*index.get_unchecked(2 * slot) as i32);
        let hi = _mm256_set1_epi32(*index.get_unchecked(2 * slot + 1) as i32);
        let w = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        let shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
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
    // Prefetch the value stream PREFETCH_AHEAD / NB bytes ahead (the stream that sets the
    // speed); f32 values only where `f32_prefetch` says, both lines of the pair, into L2.
    // (`wrapping_add`: the address may lie past the end, which a prefetch tolerates.)
    let wide = std::mem::size_of::<E>() == 4;
    let wide_prefetch = wide && f32_prefetch();
    let ahead = prefetch_ahead::<E>(NB);
    let prefetch = |t: usize| {
        let p = values.as_ptr().wrapping_add(off(t) + ahead) as *const i8;
        if wide_prefetch {
            _mm_prefetch::<_MM_HINT_T1>(p);
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64));
        } else if !wide {
            _mm_prefetch::<_MM_HINT_T0>(p)
        }
    };
    let mut even = [_mm512_setzero_ps(); NB];
    let mut odd = [_mm512_setzero_ps(); NB];
    let mut xg = [_mm512_setzero_ps(); NB];
    if layout.is_2_4() {
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
    let lane_shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // The pair (t, t + 1): its 32 values (interleaved, `value_offset`) and the control
    // that picks each lane's two inputs. Neighbouring fields' bits above a position are
    // either masked or select a copy of the same input (the group repeats with period 4
    // or 8 words).
    let pair = |t: usize| -> (__m512i, __m512i) {
        let slot = first + t;
        _mm_prefetch::<_MM_HINT_T0>(
            values
                .as_ptr()
                .wrapping_add(slot * ROW_BLOCK + prefetch_ahead::<Bf16>(NB))
                as *const i8,
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
    if layout.is_2_4() {
        // 2:4, the pattern that matters: a kernel without the general loop's bookkeeping.
        // Up to 2 rows, both halves of the block in one pass (four chains per row); 3 or 4
        // rows, one half per pass (the second reads the block's values from cache).
        let mut b = 0;
        while b < nb {
            let rows = (nb - b).min(4);
            let (xs_b, acc_b) = (&xs[b * layout.cols..], &mut acc[b * ROW_BLOCK..]);
            match rows {
                1 => block_avx2_24::<E, 1, 1, 0, 2>(layout, values, index, xs_b, block, acc_b),
                2 => block_avx2_24::<E, 1, 2, 0, 2>(layout, values, index, xs_b, block, acc_b),
                _ => {
                    type Pass<E> = unsafe fn(&NmLayout, &[E], &[u32], &[f32], usize, &mut [f32]);
                    let (lo, hi): (Pass<E>, Pass<E>) = if rows == 3 {
                        (
                            block_avx2_24::<E, 1, 3, 0, 1>,
                            block_avx2_24::<E, 1, 3, 1, 1>,
                        )
                    } else {
                        (
                            block_avx2_24::<E, 1, 4, 0, 1>,
                            block_avx2_24::<E, 1, 4, 1, 1>,
                        )
                    };
                    lo(layout, values, index, xs_b, block, acc_b);
                    hi(layout, values, index, xs_b, block, acc_b);
                }
            }
            b += rows;
        }
        return;
    }
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

/// Slot `t`'s 8 values of half `half` (lanes `8·half..8·half + 8`) as f32, for unpaired
/// values (f32 or int8), or both slots of the pair starting at `t` for paired bf16.
#[inline(always)]
unsafe fn load_half_pair<E: NmElem>(values: &[E], off: usize, half: usize) -> (__m256, __m256) {
    let p = values.as_ptr().add(off);
    let bytes = std::mem::size_of::<E>();
    if E::PAIRED {
        // bf16 pairs: lane l's word holds slot t (low half) and slot t + 1 (high half).
        let v = _mm256_loadu_si256(p.add(16 * half) as *const __m256i);
        let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
            _mm256_castsi256_ps(_mm256_and_si256(v, high)),
        )
    } else if bytes == 1 {
        // int8: 8 bytes per slot half, sign-extended and converted (exact).
        let q = |o: usize| {
            let b = _mm_loadl_epi64(p.add(o) as *const __m128i);
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
        };
        (q(8 * half), q(ROW_BLOCK + 8 * half))
    } else {
        let p = p as *const f32;
        (
            _mm256_loadu_ps(p.add(8 * half)),
            _mm256_loadu_ps(p.add(ROW_BLOCK + 8 * half)),
        )
    }
}

/// [`block_avx2`] for 2:4: `NQ` row blocks from `block` on, `NB ≤ 4` batch rows, halves
/// `H0..H0 + NH` of each block's 16 lanes, in one pass. Sums of block `block + q`, batch row
/// `bb`, go to `acc[(q · NB + bb) · 16 + lane]`. A pair of slots is one group of 4 inputs; per
/// lane, slot `t` of the pair sums into the even chain and slot `t + 1` into the odd one, as in
/// every other kernel (same bits).
///
/// Two blocks (`NQ = 2`, at batch 1) read their values as two streams side by side: a single
/// sequential stream kept an AMD EPYC (AVX2) at about 15 GB/s, where `F.linear` read its dense
/// weight at 19-22; two streams read at 19, and the input group and the loop are shared. bf16
/// values are also prefetched [`PREFETCH_AHEAD`] / NB bytes ahead into L1 (on two streams,
/// 17.6 to 19.1-19.7 GB/s there, in interleaved in-process A/Bs); f32 values are not (one line
/// of the pair 3 KiB ahead: 19.4 to 12.6 GB/s; both lines: 18.3), nor int8 ones (within noise:
/// that kernel is bound by its instructions).
///
/// # Safety
/// AVX2 and FMA available; a 2:4 layout; buffers as checked by `check_call`, `xs` holding `NB`
/// rows; `block + NQ ≤ layout.blocks()`; `acc.len() ≥ NQ · NB · 16`; `H0 + NH ≤ 2`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block_avx2_24<
    E: NmElem,
    const NQ: usize,
    const NB: usize,
    const H0: usize,
    const NH: usize,
>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    xs: &[f32],
    block: usize,
    acc: &mut [f32],
) {
    let (cols, kept) = (layout.cols, layout.kept());
    let firsts: [usize; NQ] = std::array::from_fn(|q| (block + q) * kept);
    let mut even = [[[_mm256_setzero_ps(); NH]; NB]; NQ];
    let mut odd = [[[_mm256_setzero_ps(); NH]; NB]; NQ];
    // Lane l of half h takes bits [2(8h + l), 2(8h + l) + 2) of the slot's word (not masked:
    // `vpermilps` reads the 2 low bits). The group fills both 128-bit halves, so the in-lane
    // permute picks the input: cheaper than the lane-crossing `vpermps` (about a quarter
    // more int8 weights per ns from cache on an AMD EPYC). Constant shifts (H0 is
    // a parameter of the instance): with run-time ones the compiler guards each shift
    // against counts of 32 or more with a blend.
    let mut shifts = [_mm256_setzero_si256(); NH];
    for h in 0..NH {
        let b = 16 * (H0 + h) as i32;
        shifts[h] = _mm256_setr_epi32(b, b + 2, b + 4, b + 6, b + 8, b + 10, b + 12, b + 14);
    }
    let ahead = prefetch_ahead::<E>(NB);
    for k in 0..kept / 2 {
        let t = 2 * k;
        let mut xg = [_mm256_setzero_ps(); NB];
        for bb in 0..NB {
            xg[bb] = _mm256_broadcast_ps(&*(xs.as_ptr().add(bb * cols + 4 * k) as *const __m128));
        }
        for q in 0..NQ {
            let off = (firsts[q] + t) * ROW_BLOCK;
            if E::PAIRED && H0 == 0 {
                // bf16 values (a second pass, H0 = 1, reads them from cache). (`wrapping_add`:
                // the address may lie past the end, which a prefetch tolerates.)
                let p = values.as_ptr().wrapping_add(off + ahead);
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            }
            let i0 = _mm256_set1_epi32(*index.get_unchecked(firsts[q] + t) as i32);
            let i1 = _mm256_set1_epi32(*index.get_unchecked(firsts[q] + t + 1) as i32);
            for h in 0..NH {
                let (w0, w1) = load_half_pair(values, off, H0 + h);
                let p0 = _mm256_srlv_epi32(i0, shifts[h]);
                let p1 = _mm256_srlv_epi32(i1, shifts[h]);
                for bb in 0..NB {
                    let (a, c) = (&mut even[q][bb][h], &mut odd[q][bb][h]);
                    *a = _mm256_fmadd_ps(w0, _mm256_permutevar_ps(xg[bb], p0), *a);
                    *c = _mm256_fmadd_ps(w1, _mm256_permutevar_ps(xg[bb], p1), *c);
                }
            }
        }
    }
    for q in 0..NQ {
        for bb in 0..NB {
            for h in 0..NH {
                _mm256_storeu_ps(
                    acc.as_mut_ptr()
                        .add((q * NB + bb) * ROW_BLOCK + 8 * (H0 + h)),
                    _mm256_add_ps(even[q][bb][h], odd[q][bb][h]),
                );
            }
        }
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
    let paired = E::PAIRED;
    let bytes = std::mem::size_of::<E>();
    for half in 0..2 {
        let lane0 = 8 * half;
        // Slot t's 8 values of this half as f32 (unpaired slot, or the first of a pair).
        let load8 = |t: usize| -> __m256 {
            let p = values.as_ptr().add((first + t) * ROW_BLOCK + lane0);
            if bytes == 2 {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else if bytes == 1 {
                // int8: 8 bytes, sign-extended and converted (exact).
                let b = _mm_loadl_epi64(p as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
            } else {
                _mm256_loadu_ps(p as *const f32)
            }
        };
        // Both slots of the pair starting at t (see `load_pair`).
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
                    odd[bb] = _mm256_fmadd_ps(w1, _mm256_permutevar8x32_ps(xg[bb], p1), odd[bb]);
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
