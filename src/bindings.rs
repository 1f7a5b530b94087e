//! The Python module `cast_rs._cast_rs`: module set-up, the exception type, the constants the
//! Python layer reads, and the rules a caller asks without a tensor (AdamS's scalar ranges,
//! whether a shape holds an N:M pattern, which N:M linear kernel this CPU runs). Every kernel is reached through the PyTorch operators (`torch.ops.cast_rs.*`,
//! `csrc/`). No numerics and no argument rules live here.

use pyo3::prelude::*;

use crate::adams::AdamsHyper;
use crate::error::CastError;
use crate::nm;
use crate::py_error::{to_pyerr, PyCastError};

impl From<CastError> for PyErr {
    fn from(e: CastError) -> PyErr {
        Python::with_gil(|py| to_pyerr(py, e))
    }
}

/// The ranges of AdamS's scalar hyperparameters (`AdamsHyper::validate`, the rule the kernel
/// applies at every step), for the optimizer to check a group when it is built, with the same
/// messages. `values` in the order of `ADAMS_HYPER` (`AdamsHyper::FIELDS`). No tensor: the
/// values only.
#[pyfunction]
fn check_adams_hyper(values: Vec<f64>) -> PyResult<()> {
    AdamsHyper::from_values(&values)?;
    Ok(())
}

/// Whether a tensor of `shape` holds `n:m` groups along `dim` (`checks::pattern_layout`, the
/// rule every kernel applies), for the optimizer to check a parameter before it makes state
/// for it. Errors name `shape`. No tensor: the shape only.
#[pyfunction]
fn check_nm_shape(shape: Vec<i64>, n: i64, m: i64, dim: i64) -> PyResult<()> {
    crate::checks::pattern_layout(n, m, dim, &shape, &crate::error::Arg::from("shape"))?;
    Ok(())
}

/// Number of threads the fast path uses.
#[pyfunction]
fn num_threads() -> usize {
    crate::parallel::num_threads()
}

/// The N:M linear kernel each kind of call runs on this CPU, for pattern `n:m` and layers
/// whose inputs are a multiple of 32·m (every large layer): `{call: kernel}` (the benchmarks
/// print it beside their figures).
#[pyfunction]
#[pyo3(signature = (n = 2, m = 4))]
fn nm_linear_kernels(
    n: usize,
    m: usize,
) -> PyResult<std::collections::BTreeMap<&'static str, &'static str>> {
    let layout = crate::nm_linear::NmLayout::new(crate::nm_linear::ROW_BLOCK, 32 * m, n, m)?;
    Ok(crate::nm_linear::kernel_paths(&layout)
        .into_iter()
        .collect())
}

#[pymodule]
fn _cast_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Importing torch first makes libtorch's Python bindings ready before any tensor is
    // wrapped (tch-rs PR #723: without it, wrapping tensors can segfault).
    m.py().import("torch")?;
    crate::parallel::record_parent();
    // The operators (torch.ops.cast_rs.*) registered themselves when this library loaded.
    m.add("OPERATORS", crate::capi::operators_linked())?;
    m.add("CastError", m.py().get_type::<PyCastError>())?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(check_adams_hyper, m)?)?;
    m.add_function(wrap_pyfunction!(check_nm_shape, m)?)?;
    m.add_function(wrap_pyfunction!(nm_linear_kernels, m)?)?;
    // The pattern limit, defined once (nm::MAX_M) and read by the Python layer.
    m.add("MAX_M", nm::MAX_M)?;
    // The order of the operator's `hyper` list, defined once (AdamsHyper::FIELDS).
    m.add(
        "ADAMS_HYPER",
        pyo3::types::PyTuple::new(m.py(), AdamsHyper::FIELDS)?,
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
