//! Buffers that share memory: an in-place update of one would change another, and the fast
//! path hands out one `&mut` slice per buffer, so a call with overlapping buffers is refused.

use crate::error::{Arg, CastError, Result};

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 != a.1 && b.0 != b.1
}

/// The first pair of buffers that share memory, checking every pair in the listed order
/// (used within one parameter, where the list is short). The later buffer is blamed.
pub fn first_shared_pair(bufs: &[(Arg, (usize, usize))]) -> Result<()> {
    for a in 0..bufs.len() {
        for b in a + 1..bufs.len() {
            if overlaps(bufs[a].1, bufs[b].1) {
                return Err(CastError::aliased(bufs[b].0.clone(), bufs[a].0.clone()));
            }
        }
    }
    Ok(())
}

/// Whether any two of many buffers share memory, by a sweep over the ranges sorted by start
/// (O(n log n), for all the buffers of a call). Empty ranges never overlap.
pub fn first_shared_sweep(mut bufs: Vec<((usize, usize), Arg)>) -> Result<()> {
    bufs.retain(|(r, _)| r.0 != r.1);
    bufs.sort_by_key(|b| b.0);
    let mut reach: Option<&((usize, usize), Arg)> = None;
    for r in &bufs {
        if let Some(prev) = reach {
            if r.0 .0 < prev.0 .1 {
                return Err(CastError::aliased(r.1.clone(), prev.1.clone()));
            }
        }
        if reach.is_none_or(|p| r.0 .1 > p.0 .1) {
            reach = Some(r);
        }
    }
    Ok(())
}
