//! Between a dense row-major weight and its compressed form: [`compress`] (refusing a weight
//! that is not N:M) and [`decompress`] / [`decompress_into`] (for `state_dict` round trips,
//! the dense fallback and tests).

use super::check::{check_buffers, check_index};
use super::elem::NmElem;
use super::layout::{NmLayout, ROW_BLOCK};
use super::pieces::in_pieces;
use crate::error::{CastError, Result};

/// Compresses a dense row-major `[rows, cols]` weight that is exactly N:M (at most N nonzeros
/// in every group of M). Returns `(values, index)` in the layout of the `nm_linear` module docs.
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
