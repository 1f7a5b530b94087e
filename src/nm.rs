//! N:M projection: which N of every M weights are kept.
//!
//! Definitions (shared by the fast path here and the generic tch path in `generic.rs`):
//!
//! * A group is M weights that are consecutive along the *group dimension*: the last
//!   dimension (`nn.Linear` weights, `[out, in]`) or dimension 0 (GPT-2 `Conv1D`, `[in, out]`).
//! * The N kept weights of a group are those of largest magnitude. NaN counts as larger than
//!   any number (including ±inf), all NaNs are equal, `-0.0 == +0.0`, and ties go to the lower
//!   index along the group dimension. So every group keeps exactly N weights, whatever the
//!   values are.
//! * A packed mask holds one bit per weight: bit `i % 8` (LSB first) of byte `i / 8` is the
//!   weight with row-major (logical, `reshape(-1)`) index `i`. Its length is `ceil(numel / 8)`
//!   bytes; trailing bits of the last byte are zero.
//!
//! Memory layout seen by the kernels: a contiguous tensor is a sequence of *blocks* of `M * s`
//! elements, where `s` (the stride of the group dimension) is 1 for last-dimension groups and
//! `numel / shape[0]` for dimension-0 groups. Block `b` holds `s` groups; group `g` of a block
//! is the elements `g, g + s, ..., g + (M-1) s` of the block. Blocks never straddle a group,
//! so work split on block boundaries is independent.

use crate::error::{CastError, Result};

/// Largest supported M: a group's ranks are computed with M² comparisons in registers.
pub const MAX_M: usize = 32;

/// A validated N:M pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NmPattern {
    pub n: usize,
    pub m: usize,
}

impl NmPattern {
    /// `1 <= n < m <= 32`.
    pub fn new(n: i64, m: i64) -> Result<Self> {
        if m < 2 || m > MAX_M as i64 {
            return Err(CastError::value(
                "pattern",
                format!("M must be in 2..={MAX_M}, got {n}:{m}"),
            ));
        }
        if n < 1 || n >= m {
            return Err(CastError::value(
                "pattern",
                format!("N must satisfy 1 <= N < M (N = M would keep everything), got {n}:{m}"),
            ));
        }
        Ok(NmPattern {
            n: n as usize,
            m: m as usize,
        })
    }
}

/// Which dimension the groups run along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupDim {
    /// The last dimension (`nn.Linear` `[out, in]`).
    Last,
    /// Dimension 0 (GPT-2 `Conv1D` `[in, out]`).
    First,
}

impl GroupDim {
    /// From a Python-style `dim`: `-1` / `ndim-1` is the last dimension, `0` the first.
    pub fn from_dim(dim: i64, ndim: usize) -> Result<Self> {
        let nd = ndim as i64;
        if ndim == 0 {
            return Err(CastError::value(
                "x",
                "N:M groups need a tensor with at least one dimension, got a 0-d tensor",
            ));
        }
        let d = if dim < 0 { dim + nd } else { dim };
        if d == nd - 1 {
            Ok(GroupDim::Last)
        } else if d == 0 {
            Ok(GroupDim::First)
        } else {
            Err(CastError::value(
                "dim",
                format!("groups run along the first or the last dimension; got dim={dim} for a {ndim}-d tensor"),
            ))
        }
    }
}

/// Pattern plus the memory geometry of one contiguous tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    pub pattern: NmPattern,
    /// Distance in elements between consecutive members of a group (1 for last-dim groups).
    pub stride: usize,
    pub numel: usize,
}

impl GroupLayout {
    /// Checks that the group dimension of `shape` is divisible by M.
    pub fn new(pattern: NmPattern, shape: &[i64], dim: GroupDim, param: &str) -> Result<Self> {
        if shape.is_empty() {
            return Err(CastError::value(
                param.to_string(),
                "N:M groups need a tensor with at least one dimension, got a 0-d tensor",
            ));
        }
        let numel: i64 = shape.iter().product();
        let (len, stride) = match dim {
            GroupDim::Last => (shape[shape.len() - 1], 1i64),
            GroupDim::First => (shape[0], if shape[0] == 0 { 0 } else { numel / shape[0] }),
        };
        if len % pattern.m as i64 != 0 {
            let which = match dim {
                GroupDim::Last => "last dimension",
                GroupDim::First => "dimension 0",
            };
            return Err(CastError::value(
                param.to_string(),
                format!(
                    "{}:{} groups run along the {which}, whose size {len} is not divisible by M={} (shape {:?})",
                    pattern.n, pattern.m, pattern.m, shape
                ),
            ));
        }
        Ok(GroupLayout {
            pattern,
            stride: stride.max(1) as usize,
            numel: numel as usize,
        })
    }

    /// Elements in one block (`M * stride`).
    pub fn block(&self) -> usize {
        self.pattern.m * self.stride
    }

    /// The smallest piece of work that is whole blocks and whole mask bytes.
    pub fn unit(&self) -> usize {
        lcm(self.block(), 8)
    }
}

pub fn packed_len(numel: usize) -> usize {
    numel.div_ceil(8)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(crate) fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

/// A totally ordered magnitude key: larger key = kept first.
///
/// For IEEE floats, the bit pattern with the sign cleared orders exactly like the magnitude,
/// and every NaN pattern is above +inf; clamping NaNs to one value makes them all equal.
pub trait MaskKey: Copy + Send + Sync {
    type Key: Copy + Ord;
    fn key(self) -> Self::Key;
}

impl MaskKey for f32 {
    type Key = u32;
    #[inline(always)]
    fn key(self) -> u32 {
        (self.to_bits() & 0x7fff_ffff).min(0x7f80_0001)
    }
}

impl MaskKey for f64 {
    type Key = u64;
    #[inline(always)]
    fn key(self) -> u64 {
        (self.to_bits() & 0x7fff_ffff_ffff_ffff).min(0x7ff0_0000_0000_0001)
    }
}

/// 16-bit floats (bf16 and f16) given as raw bits: the same sign-cleared order holds.
/// `repr(transparent)`: a `&mut [u16]` of tensor storage may be viewed as a slice of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub u16);

impl MaskKey for Bf16Bits {
    type Key = u16;
    #[inline(always)]
    fn key(self) -> u16 {
        (self.0 & 0x7fff).min(0x7f81)
    }
}

impl MaskKey for F16Bits {
    type Key = u16;
    #[inline(always)]
    fn key(self) -> u16 {
        (self.0 & 0x7fff).min(0x7c01)
    }
}

// Selection: element i of a group is kept when fewer than n members beat it, where j beats i
// if key_j > key_i, or key_j == key_i and j < i. That is exactly "the n largest, ties to the
// lower index", computed with M² branch-free comparisons, which vectorise across groups.

#[inline(always)]
fn beats<K: Ord>(kj: K, ki: K, j: usize, i: usize) -> u32 {
    ((kj > ki) | ((kj == ki) & (j < i))) as u32
}

/// Last-dimension layout (groups are `M` consecutive elements), `M` known at compile time.
/// The loop over groups is what LLVM vectorises (interleaved loads/stores).
#[inline(always)]
fn keep_contiguous_const<T: MaskKey, const M: usize>(x: &[T], n: usize, keep: &mut [u8]) {
    let n = n as u32;
    for (xg, kg) in x.chunks_exact(M).zip(keep.chunks_exact_mut(M)) {
        let keys: [T::Key; M] = core::array::from_fn(|j| xg[j].key());
        for i in 0..M {
            let mut beaten = 0u32;
            for j in 0..M {
                beaten += beats(keys[j], keys[i], j, i);
            }
            kg[i] = (beaten < n) as u8;
        }
    }
}

/// Dimension-0 layout: in a block of `M * s` elements, group g is `g, g + s, ..., g + (M-1)s`.
/// The loop over g reads `M` contiguous rows side by side, so it vectorises directly.
#[inline(always)]
fn keep_strided_const<T: MaskKey, const M: usize>(x: &[T], n: usize, s: usize, keep: &mut [u8]) {
    let n = n as u32;
    for (xb, kb) in x.chunks_exact(M * s).zip(keep.chunks_exact_mut(M * s)) {
        for g in 0..s {
            let keys: [T::Key; M] = core::array::from_fn(|j| xb[g + j * s].key());
            for i in 0..M {
                let mut beaten = 0u32;
                for j in 0..M {
                    beaten += beats(keys[j], keys[i], j, i);
                }
                kb[g + i * s] = (beaten < n) as u8;
            }
        }
    }
}

/// Any M (up to 32) and stride, with run-time loop bounds.
#[inline(always)]
fn keep_dyn<T: MaskKey>(x: &[T], n: usize, m: usize, s: usize, keep: &mut [u8]) {
    let mut keys = [x[0].key(); MAX_M];
    for (xb, kb) in x.chunks_exact(m * s).zip(keep.chunks_exact_mut(m * s)) {
        for g in 0..s {
            for (j, k) in keys[..m].iter_mut().enumerate() {
                *k = xb[g + j * s].key();
            }
            for i in 0..m {
                let mut beaten = 0u32;
                for j in 0..m {
                    beaten += beats(keys[j], keys[i], j, i);
                }
                kb[g + i * s] = (beaten < n as u32) as u8;
            }
        }
    }
}

#[inline(always)]
fn keep_flags_impl<T: MaskKey>(x: &[T], layout: &GroupLayout, keep: &mut [u8]) {
    let (n, m, s) = (layout.pattern.n, layout.pattern.m, layout.stride);
    match (m, s) {
        (4, 1) => keep_contiguous_const::<T, 4>(x, n, keep),
        (8, 1) => keep_contiguous_const::<T, 8>(x, n, keep),
        (16, 1) => keep_contiguous_const::<T, 16>(x, n, keep),
        (4, _) => keep_strided_const::<T, 4>(x, n, s, keep),
        (8, _) => keep_strided_const::<T, 8>(x, n, s, keep),
        (16, _) => keep_strided_const::<T, 16>(x, n, s, keep),
        _ => keep_dyn(x, n, m, s, keep),
    }
}

/// Writes 0/1 keep flags for `x`, which must be a whole number of blocks of `layout`.
/// Sequential: callers parallelise over pieces. Inlined so that it is compiled with the
/// caller's vector instruction set (see `simd`).
#[inline(always)]
pub fn keep_flags<T: MaskKey>(x: &[T], layout: &GroupLayout, keep: &mut [u8]) {
    debug_assert_eq!(x.len(), keep.len());
    debug_assert_eq!(x.len() % layout.block(), 0);
    if !x.is_empty() {
        keep_flags_impl(x, layout, keep)
    }
}

/// Packs 0/1 flags into bits (LSB first). `bits.len() == ceil(flags.len() / 8)`.
#[inline(always)]
pub fn pack_bits(flags: &[u8], bits: &mut [u8]) {
    debug_assert_eq!(bits.len(), packed_len(flags.len()));
    let full = flags.len() / 8;
    for (byte, f) in bits[..full].iter_mut().zip(flags.chunks_exact(8)) {
        // Byte i (0 or 1) sits at bit 8i; multiplying by Σ 2^(56 - 7i) moves it to bit 56 + i
        // with no overlapping partial products (so no carries): the top byte is the packed bits.
        let word = u64::from_le_bytes(f.try_into().unwrap());
        *byte = ((word & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8;
    }
    if full < bits.len() {
        let mut b = 0u8;
        for (i, &v) in flags[full * 8..].iter().enumerate() {
            b |= (v & 1) << i;
        }
        bits[full] = b;
    }
}

/// 0/1 bytes of every possible mask byte, LSB first (2 KiB, stays in L1).
static UNPACK_LUT: [[u8; 8]; 256] = {
    let mut t = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            t[b][i] = ((b >> i) & 1) as u8;
            i += 1;
        }
        b += 1;
    }
    t
};

/// Expands bits (LSB first) into `out.len()` 0/1 bytes.
#[inline(always)]
pub fn unpack_flags(bits: &[u8], out: &mut [u8]) {
    debug_assert!(bits.len() >= packed_len(out.len()));
    let full = out.len() / 8;
    for (o, &byte) in out.chunks_exact_mut(8).zip(&bits[..full]) {
        o.copy_from_slice(&UNPACK_LUT[byte as usize]);
    }
    let rest = &mut out[full * 8..];
    if !rest.is_empty() {
        rest.copy_from_slice(&UNPACK_LUT[bits[full] as usize][..rest.len()]);
    }
}

/// Work size for parallel loops: whole units, a few hundred KiB of input.
pub(crate) fn chunk_len(unit: usize, numel: usize) -> usize {
    const TARGET: usize = 1 << 16;
    let units = (TARGET / unit).max(1);
    let chunk = units * unit;
    // Small tensors: still leave work for each thread.
    let threads = crate::parallel::num_threads().max(1);
    if numel / chunk < threads * 2 && numel > unit * threads * 2 {
        (numel / (threads * 2)).div_ceil(unit) * unit
    } else {
        chunk
    }
}

fn check_len(layout: &GroupLayout, got: usize, what: &str, expected: usize) -> Result<()> {
    let _ = layout;
    if got != expected {
        return Err(CastError::value(
            what.to_string(),
            format!("expected {expected} elements, got {got}"),
        ));
    }
    Ok(())
}

/// N:M mask of `x` as one 0/1 byte per element (a `bool` tensor / numpy array), in parallel.
pub fn nm_keep<T: MaskKey>(x: &[T], layout: &GroupLayout, out: &mut [u8]) -> Result<()> {
    check_len(layout, x.len(), "x", layout.numel)?;
    check_len(layout, out.len(), "out", layout.numel)?;
    let c = chunk_len(layout.unit(), x.len());
    let pieces: Vec<_> = x.chunks(c).zip(out.chunks_mut(c)).collect();
    crate::parallel::for_each(pieces, |(xc, oc)| {
        crate::simd::dispatch(
            #[inline(always)]
            || keep_flags(xc, layout, oc),
        )
    });
    Ok(())
}

/// N:M mask of `x`, packed one bit per element, in parallel.
pub fn nm_mask_packed<T: MaskKey>(x: &[T], layout: &GroupLayout, bits: &mut [u8]) -> Result<()> {
    check_len(layout, x.len(), "x", layout.numel)?;
    check_len(layout, bits.len(), "mask", packed_len(layout.numel))?;
    let c = chunk_len(layout.unit(), x.len());
    let pieces: Vec<_> = x.chunks(c).zip(bits.chunks_mut(c / 8)).collect();
    crate::parallel::for_each(pieces, |(xc, bc)| {
        let mut flags = vec![0u8; xc.len()];
        crate::simd::dispatch(
            #[inline(always)]
            || {
                keep_flags(xc, layout, &mut flags);
                pack_bits(&flags, bc);
            },
        )
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay(n: i64, m: i64, shape: &[i64], dim: GroupDim) -> GroupLayout {
        GroupLayout::new(NmPattern::new(n, m).unwrap(), shape, dim, "x").unwrap()
    }

    /// Obviously-correct reference: sort indices by (key desc, index asc), keep the first n.
    fn reference(x: &[f32], n: usize, m: usize, stride: usize) -> Vec<u8> {
        let mut keep = vec![0u8; x.len()];
        let block = m * stride;
        for b in 0..x.len() / block {
            for g in 0..stride {
                let idx: Vec<usize> = (0..m).map(|j| b * block + g + j * stride).collect();
                let mut order: Vec<usize> = (0..m).collect();
                order.sort_by(|&a, &c| {
                    let (ka, kc) = (x[idx[a]].key(), x[idx[c]].key());
                    kc.cmp(&ka).then(a.cmp(&c))
                });
                for &o in &order[..n] {
                    keep[idx[o]] = 1;
                }
            }
        }
        keep
    }

    /// A small deterministic generator so tests need no extra crate.
    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn pattern_validation() {
        assert!(NmPattern::new(2, 4).is_ok());
        assert!(NmPattern::new(31, 32).is_ok());
        for (n, m) in [(4, 4), (0, 4), (5, 4), (1, 1), (2, 33), (-1, 4)] {
            assert!(
                matches!(NmPattern::new(n, m), Err(CastError::Value { .. })),
                "{n}:{m}"
            );
        }
    }

    #[test]
    fn layout_rejects_indivisible_dims() {
        let p = NmPattern::new(2, 4).unwrap();
        assert!(GroupLayout::new(p, &[3, 6], GroupDim::Last, "w").is_err());
        assert!(GroupLayout::new(p, &[6, 8], GroupDim::First, "w").is_err());
        assert!(GroupLayout::new(p, &[], GroupDim::Last, "w").is_err());
        let l = GroupLayout::new(p, &[8, 6], GroupDim::First, "w").unwrap();
        assert_eq!((l.stride, l.block(), l.unit()), (6, 24, 24));
    }

    #[test]
    fn exactly_n_kept_and_matches_reference() {
        let mut seed = 7u64;
        for &(n, m) in &[
            (1usize, 2usize),
            (2, 4),
            (1, 4),
            (3, 4),
            (2, 8),
            (4, 8),
            (5, 12),
            (8, 16),
            (3, 32),
        ] {
            for &(rows, dim) in &[(3usize, GroupDim::Last), (m * 2, GroupDim::First)] {
                let cols = m * 5;
                let (r, c) = if dim == GroupDim::Last {
                    (rows, cols)
                } else {
                    (m * 2, 7)
                };
                let x: Vec<f32> = (0..r * c).map(|_| lcg(&mut seed)).collect();
                let l = lay(n as i64, m as i64, &[r as i64, c as i64], dim);
                let mut keep = vec![0u8; x.len()];
                nm_keep(&x, &l, &mut keep).unwrap();
                assert_eq!(keep, reference(&x, n, m, l.stride), "{n}:{m} {dim:?}");
                assert_eq!(
                    keep.iter().map(|&k| k as usize).sum::<usize>(),
                    x.len() / m * n
                );
            }
        }
    }

    #[test]
    fn ties_zeros_and_nan() {
        let l = lay(2, 4, &[5, 4], GroupDim::Last);
        let x = [
            1.0f32,
            1.0,
            1.0,
            1.0, // all equal: lowest indices win
            0.0,
            -0.0,
            0.0,
            0.0, // signed zeros are equal
            f32::NAN,
            5.0,
            f32::INFINITY,
            -2.0, // NaN is the largest, then inf
            -3.0,
            3.0,
            f32::NAN,
            f32::NAN, // two NaNs beat the rest, both kept
            1e-45,
            -1e-45,
            0.0,
            3e-45, // subnormals order like any magnitude
        ];
        let mut keep = vec![0u8; 20];
        nm_keep(&x, &l, &mut keep).unwrap();
        assert_eq!(
            keep,
            vec![1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1]
        );
    }

    #[test]
    fn packed_matches_flags_and_pads_with_zero() {
        let mut seed = 3u64;
        // 3 * 12 = 36 elements: 5 bytes, the last one half-used.
        let x: Vec<f32> = (0..36).map(|_| lcg(&mut seed)).collect();
        let l = lay(2, 4, &[3, 12], GroupDim::Last);
        let mut keep = vec![0u8; 36];
        nm_keep(&x, &l, &mut keep).unwrap();
        let mut bits = vec![0xffu8; packed_len(36)];
        nm_mask_packed(&x, &l, &mut bits).unwrap();
        assert_eq!(bits[4] >> 4, 0, "padding bits must be zero");
        let mut back = vec![9u8; 36];
        unpack_flags(&bits, &mut back);
        assert_eq!(back, keep);
    }

    #[test]
    fn large_parallel_matches_reference() {
        let mut seed = 11u64;
        let x: Vec<f32> = (0..512 * 1024).map(|_| lcg(&mut seed)).collect();
        let l = lay(2, 4, &[512, 1024], GroupDim::Last);
        let mut keep = vec![0u8; x.len()];
        nm_keep(&x, &l, &mut keep).unwrap();
        assert_eq!(keep, reference(&x, 2, 4, 1));
        let l0 = lay(2, 4, &[512, 1024], GroupDim::First);
        nm_keep(&x, &l0, &mut keep).unwrap();
        assert_eq!(keep, reference(&x, 2, 4, 1024));
    }

    #[test]
    fn f64_and_half_keys_order_like_magnitudes() {
        assert!(f64::NAN.key() > f64::INFINITY.key());
        assert_eq!((-0.0f64).key(), 0.0f64.key());
        assert!(2.0f64.key() > (-1.5f64).key());
        // bf16 bits of 1.0 = 0x3f80, -2.0 = 0xc000, NaN = 0x7fc0, inf = 0x7f80
        assert!(Bf16Bits(0xc000).key() > Bf16Bits(0x3f80).key());
        assert!(Bf16Bits(0x7fc0).key() > Bf16Bits(0x7f80).key());
        assert_eq!(Bf16Bits(0xffc1).key(), Bf16Bits(0x7fc0).key());
        // f16: 1.0 = 0x3c00, inf = 0x7c00, NaN = 0x7e00
        assert!(F16Bits(0x7e00).key() > F16Bits(0x7c00).key());
        assert!(F16Bits(0x7c00).key() > F16Bits(0x3c00).key());
    }
}
