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

/// The row scales of values of type `E`: int8 values take one f32 scale per output row (the
/// kernels need them: `required`; expanding the stored integers does not), float values none
/// (their scale is in the values, and a scale would be silently ignored).
pub fn check_scales<E: NmElem>(
    layout: &NmLayout,
    scales: Option<&[f32]>,
    required: bool,
) -> Result<()> {
    match scales {
        None if E::QUANTIZED && required => Err(CastError::value(
            "scales",
            format!(
                "int8 values need their scales: one float32 per output row ([{}]), got none",
                layout.rows
            ),
        )),
        Some(_) if !E::QUANTIZED => Err(CastError::value(
            "scales",
            "only int8 values take scales; these values are float32 or bfloat16 (pass None)",
        )),
        Some(s) if s.len() != layout.rows => Err(CastError::value(
            "scales",
            format!(
                "expected {} elements (one per output row), got {}",
                layout.rows,
                s.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks every buffer length of a call, and that int8 values come with their scales.
#[allow(clippy::too_many_arguments)]
pub fn check_call<E: NmElem, X: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    scales: Option<&[f32]>,
    bias: Option<&[f32]>,
    x: &[X],
    batch: usize,
    y: &[f32],
) -> Result<()> {
    check_buffers(layout, values.len(), index.len())?;
    check_scales::<E>(layout, scales, true)?;
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
