//! How many N:M groups changed their mask at a refresh (reported per tensor by the step):
//! straight from the packed masks where the layout allows it, else from unpacked flags.

use crate::nm::GroupLayout;

/// Changed groups straight from the packed masks, when every group is whole bytes or an
/// aligned bit field of one byte (last-dimension groups, M in {2, 4, 8, 16, 32}), or when
/// dim-0 groups have rows of whole bytes (stride a multiple of 8); padding bits are zero in
/// both. `None` for other layouts.
#[inline(always)]
pub(super) fn changed_groups_packed(old: &[u8], new: &[u8], layout: &GroupLayout) -> Option<u64> {
    if layout.stride != 1 {
        return changed_groups_packed_rows(old, new, layout);
    }
    let m = layout.pattern.m;
    match m {
        2 | 4 | 8 => {
            // OR-fold each m-bit field onto its lowest bit, keep those bits, count them.
            let low: u64 = match m {
                2 => 0x5555_5555_5555_5555,
                4 => 0x1111_1111_1111_1111,
                _ => 0x0101_0101_0101_0101,
            };
            let fold = |mut x: u64| {
                let mut shift = 1;
                while shift < m {
                    x |= x >> shift;
                    shift *= 2;
                }
                (x & low).count_ones() as u64
            };
            let mut count = 0u64;
            let (oc, nc) = (old.chunks_exact(8), new.chunks_exact(8));
            let (orest, nrest) = (oc.remainder(), nc.remainder());
            for (a, b) in oc.zip(nc) {
                count += fold(
                    u64::from_le_bytes(a.try_into().unwrap())
                        ^ u64::from_le_bytes(b.try_into().unwrap()),
                );
            }
            for (&a, &b) in orest.iter().zip(nrest) {
                count += fold((a ^ b) as u64);
            }
            Some(count)
        }
        16 | 32 => Some(
            old.chunks(m / 8)
                .zip(new.chunks(m / 8))
                .filter(|(a, b)| a != b)
                .count() as u64,
        ),
        _ => None,
    }
}

/// Dim-0 groups (`stride` = row length `s`): a block is M rows of `s` bits and group `g` is
/// bit `g` of every row. With `s % 8 == 0` rows are whole bytes, so OR-ing the M rows' XORs
/// byte by byte leaves one bit per changed group: no unpacking into flags.
fn changed_groups_packed_rows(old: &[u8], new: &[u8], layout: &GroupLayout) -> Option<u64> {
    let (m, s) = (layout.pattern.m, layout.stride);
    if s == 0 || s % 8 != 0 {
        return None;
    }
    let row = s / 8;
    let mut count = 0u64;
    for (ob, nb) in old.chunks_exact(m * row).zip(new.chunks_exact(m * row)) {
        for k in 0..row {
            let mut acc = 0u8;
            for j in 0..m {
                acc |= ob[j * row + k] ^ nb[j * row + k];
            }
            count += acc.count_ones() as u64;
        }
    }
    Some(count)
}

/// Number of groups (whole blocks of `layout` in `old`/`new`) whose keep flags differ.
pub(super) fn changed_groups(old: &[u8], new: &[u8], layout: &GroupLayout) -> u64 {
    let (m, s) = (layout.pattern.m, layout.stride);
    let mut count = 0u64;
    for (ob, nb) in old.chunks_exact(m * s).zip(new.chunks_exact(m * s)) {
        for g in 0..s {
            count += (0..m).any(|j| ob[g + j * s] != nb[g + j * s]) as u64;
        }
    }
    count
}
