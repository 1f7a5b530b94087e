//! The Python form of [`CastError`]: the exception type `cast_rs.CastError` and the exception
//! object for an error (class, message and the failing argument as fields). Used by the pyo3
//! module (`bindings`) and by the C ABI (`capi`), so the operators' route and the module's
//! raise the same object.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::{Arg, CastError};

/// The Python exception type, in its own module so that it can be named `CastError` like the
/// Rust error enum it carries, and registered as `cast_rs.CastError` (where users import it
/// from), which is the name tracebacks show.
mod py_exception {
    use pyo3::create_exception;
    use pyo3::exceptions::PyException;

    create_exception!(
        cast_rs,
        CastError,
        PyException,
        "Base class of cast-rs errors that are not ValueError or TypeError."
    );
}
pub use py_exception::CastError as PyCastError;

/// The exception for `e`, with the failing argument as data: `param` and `index` (`None`
/// when the argument is not a list entry), `detail` (the message after `param: `) and, for
/// two buffers sharing memory, `other_param` / `other_index` (`{other}` in `detail`).
pub fn to_pyerr(py: Python<'_>, e: CastError) -> PyErr {
    let err = match e {
        CastError::Value { .. } | CastError::Aliased { .. } => PyValueError::new_err(e.to_string()),
        CastError::Type { .. } => PyTypeError::new_err(e.to_string()),
        _ => PyCastError::new_err(e.to_string()),
    };
    let value = err.value(py);
    let (param, index) = split(e.param());
    let (other, other_index) = split(match &e {
        CastError::Aliased { other, .. } => Some(other),
        _ => None,
    });
    // Setting attributes on a fresh exception object cannot fail short of memory exhaustion;
    // the message is complete without them, so a failure is not worth masking the error.
    let _ = value.setattr("param", param);
    let _ = value.setattr("index", index);
    let _ = value.setattr("detail", e.detail());
    let _ = value.setattr("other_param", other);
    let _ = value.setattr("other_index", other_index);
    err
}

fn split(a: Option<&Arg>) -> (Option<String>, Option<usize>) {
    match a {
        Some(a) => (Some(a.name.to_string()), a.index),
        None => (None, None),
    }
}
