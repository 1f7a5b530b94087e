//! [`NmLayout`]: the shape of a compressed N:M weight (rows in blocks of 16, the kept values
//! slot by slot, the positions as 2- or 4-bit fields) and the offsets of each value and
//! position in its arrays. The format itself is described in the `nm_linear` module docs.

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

    /// Whether the pattern is 2:4, the one the kernels specialise for (a slot pair is a group).
    pub fn is_2_4(&self) -> bool {
        self.n == 2 && self.m == 4
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
    pub(super) fn position(&self, index: &[u32], slot: usize, lane: usize) -> usize {
        let bits = self.idx_bits();
        let bit = lane * bits;
        let word = index[slot * self.words_per_slot() + bit / 32];
        ((word >> (bit % 32)) & ((1 << bits) - 1)) as usize
    }
}
