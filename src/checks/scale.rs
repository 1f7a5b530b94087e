//! The arguments of weight scaling `W · A` and of its backward.

use super::meta::Meta;
use crate::error::{CastError, Result};
use crate::scaling::{ScaleLayout, ScaleShape};

/// Weight scaling `W · A`: `dim` -1 (`[out, in]`) or 0 (`[in, out]`), `A` of shape
/// `[rows, groups]`, one floating dtype and one device.
pub fn scale_args(w: &Meta, a: &Meta, groups: i64, dim: i64) -> Result<ScaleShape> {
    let layout = match dim {
        -1 | 1 => ScaleLayout::RowsOut,
        0 => ScaleLayout::RowsIn,
        _ => {
            return Err(CastError::value(
                "dim",
                format!("expected -1 (nn.Linear [out, in]) or 0 (Conv1D [in, out]), got {dim}"),
            ))
        }
    };
    let s = ScaleShape::new(&w.size, groups, layout)?;
    if a.size != [s.rows as i64, s.groups as i64] {
        return Err(CastError::value(
            "scale",
            format!(
                "expected shape [{}, {}], got {:?}",
                s.rows, s.groups, a.size
            ),
        ));
    }
    if !w.dtype.is_float() || a.dtype != w.dtype {
        return Err(CastError::type_(
            "scale",
            format!(
                "expected floating tensors of one dtype, got weight {} and scale {}",
                w.dtype.name(),
                a.dtype.name()
            ),
        ));
    }
    if a.dev != w.dev {
        return Err(CastError::value(
            "scale",
            format!(
                "expected device {:?} (the weight's), got {:?}",
                w.dev, a.dev
            ),
        ));
    }
    Ok(s)
}

/// The incoming gradient of weight scaling: the weight's shape, dtype and device.
pub fn scale_grad_args(g: &Meta, w: &Meta) -> Result<()> {
    if g.size != w.size || g.dtype != w.dtype || g.dev != w.dev {
        return Err(CastError::value(
            "grad",
            format!(
                "expected the weight's shape {:?} and dtype {}, got {:?} {}",
                w.size,
                w.dtype.name(),
                g.size,
                g.dtype.name()
            ),
        ));
    }
    Ok(())
}
