//! The checks every entry point runs before any kernel: buffer lengths against the layout,
//! and index positions below M (the kernels index the broadcast group with them).

use super::elem::NmElem;
use super::layout::{NmLayout, ROW_BLOCK};
use crate::error::{CastError, Result};

pub(super) fn check_buffers(layout: &NmLayout, values: usize, index: usize) -> Result<()> {
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
