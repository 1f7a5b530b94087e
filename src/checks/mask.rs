//! The arguments of the mask entry points: an N:M pattern and group dimension against a
//! tensor's shape (shared with the step), `nm_mask` and `unpack_mask`.

use super::meta::{Dtype, Meta};
use crate::error::{Arg, CastError, Result};
use crate::nm::{packed_len, GroupDim, GroupLayout, NmPattern};

/// `(n, m)` and `dim` against a tensor of `shape`; every value error is blamed on `param`
/// (the tensor), as the group dimension is a property of it.
pub fn pattern_layout(
    n: i64,
    m: i64,
    dim: i64,
    shape: &[i64],
    param: &Arg,
) -> Result<(NmPattern, GroupDim, GroupLayout)> {
    let pattern = NmPattern::new(n, m)?;
    let gdim = GroupDim::from_dim(dim, shape.len()).map_err(|e| e.for_param(param))?;
    let layout = GroupLayout::new(pattern, shape, gdim, &param.to_string())
        .map_err(|e| e.for_param(param))?;
    Ok((pattern, gdim, layout))
}

/// `nm_mask(x, n, m, dim)`: a floating tensor whose group dimension M divides.
pub fn mask_args(x: &Meta, n: i64, m: i64, dim: i64) -> Result<(NmPattern, GroupDim, GroupLayout)> {
    if !x.dtype.is_float() {
        return Err(CastError::type_(
            "x",
            format!(
                "expected a floating-point tensor, got dtype {}",
                x.dtype.name()
            ),
        ));
    }
    pattern_layout(n, m, dim, &x.size, &Arg::from("x"))
}

/// `unpack_mask(bits, shape)`: `bits` holds `ceil(numel / 8)` bytes.
pub fn unpack_args(bits: &Meta, shape: &[i64]) -> Result<()> {
    if bits.dtype != Dtype::U8 {
        return Err(CastError::type_(
            "bits",
            format!("expected a uint8 tensor, got {}", bits.dtype.name()),
        ));
    }
    if shape.iter().any(|&d| d < 0) {
        return Err(CastError::value(
            "shape",
            format!("dimensions must be >= 0, got {shape:?}"),
        ));
    }
    let numel: i64 = shape.iter().product();
    let want = packed_len(numel as usize) as i64;
    if bits.size != [want] {
        return Err(CastError::value(
            "bits",
            format!(
                "expected a 1-d tensor of {want} bytes for shape {shape:?}, got shape {:?}",
                bits.size
            ),
        ));
    }
    Ok(())
}
