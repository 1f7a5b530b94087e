//! int8 values: symmetric per-output-row quantization of an N:M weight, the one place where a
//! weight becomes int8 ([`compress_int8`]), and its way back ([`dequantize_into`]).
//!
//! Row `r` gets the scale `s_r = max_c |W[r, c]| / 127` (in f32; its kept weights are the row's
//! only nonzeros), and each kept weight the value `q = round_half_even(W / s_r)` clamped to
//! [-127, 127] ([`NmElem::from_f32`] for `i8`). A row whose scale would be 0 (all its weights
//! zero, or so small that `max / 127` underflows) gets the scale 1 and, as its weights round to
//! 0, all-zero values: no scale is 0, so nothing divides by zero and the row computes 0 (+ bias)
//! as the f32 layer does. The kernels sum `q · x` in f32 and multiply by `s_r` once per output.

use super::check::check_scales;
use super::elem::NmElem;
use super::layout::{NmLayout, ROW_BLOCK};
use super::pack::{compress, decompress};
use crate::error::{CastError, Result};

/// The scale of a row whose largest |weight| is `max` (finite): `max / 127`, or 1 where that is
/// 0 (see the module docs).
pub fn row_scale(max: f32) -> f32 {
    let s = max / 127.0;
    if s == 0.0 {
        1.0
    } else {
        s
    }
}

/// Compresses and quantizes a dense row-major `[rows, cols]` f32 weight that is exactly N:M:
/// `(values, index, scales)`, the values in the f32 slot order (padding rows 0), the index as
/// [`compress`] writes it, one scale per row. Refuses a weight that is not N:M (as
/// [`compress`]) or holds a non-finite value (it has no int8 scale).
pub fn compress_int8(layout: &NmLayout, dense: &[f32]) -> Result<(Vec<i8>, Vec<u32>, Vec<f32>)> {
    let (values, index) = compress(layout, dense)?;
    if let Some(i) = dense.iter().position(|v| !v.is_finite()) {
        return Err(CastError::value(
            "weight",
            format!(
                "row {}, column {} holds {}; int8 quantization needs finite weights",
                i / layout.cols,
                i % layout.cols,
                dense[i]
            ),
        ));
    }
    let (rows, kept) = (layout.rows, layout.kept());
    let scales: Vec<f32> = (0..rows)
        .map(|r| {
            let (block, lane) = (r / ROW_BLOCK, r % ROW_BLOCK);
            let max = (0..kept)
                .map(|t| values[layout.value_offset(false, block, t, lane)].abs())
                .fold(0f32, f32::max);
            row_scale(max)
        })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            // Slot-major: element i is lane i % 16 of block i / (16 · kept).
            let r = i / (ROW_BLOCK * kept) * ROW_BLOCK + i % ROW_BLOCK;
            if r < rows {
                i8::from_f32(v / scales[r])
            } else {
                0
            }
        })
        .collect();
    Ok((q, index, scales))
}

/// The dense `[rows, cols]` f32 weight `q · s_r` of int8 values (one rounding per weight, as
/// `q.float() * s[:, None]` in torch), into `dense` (every element written).
pub fn dequantize_into(
    layout: &NmLayout,
    values: &[i8],
    index: &[u32],
    scales: &[f32],
    dense: &mut [f32],
) -> Result<()> {
    check_scales::<i8>(layout, Some(scales), true)?;
    if dense.len() != layout.rows * layout.cols {
        return Err(CastError::value(
            "out",
            format!(
                "expected {} x {} elements, got {}",
                layout.rows,
                layout.cols,
                dense.len()
            ),
        ));
    }
    let q = decompress(layout, values, index)?;
    let cols = layout.cols.max(1);
    for (i, (d, &v)) in dense.iter_mut().zip(&q).enumerate() {
        *d = v.to_f32() * scales[i / cols];
    }
    Ok(())
}
