//! The Python binding layer (`cast_rs._cast_rs`): tensor extraction, GIL release and error
//! mapping around the entry points of [`crate::ops`], which own the checks and the choice of
//! path. No numerics and no argument rules live here.

use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::adams::AdamsHyper;
use crate::checks::{self, StepConfig};
use crate::error::{Arg, CastError};
use crate::nm::{self, MaskKey};
use crate::ops::{self, guarded, MaskForm, StepTensors};

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
use py_exception::CastError as PyCastError;

/// The exception for `e`, with the failing argument as data: `param` and `index` (`None`
/// when the argument is not a list entry), `detail` (the message after `param: `) and, for
/// two buffers sharing memory, `other_param` / `other_index` (`{other}` in `detail`).
fn to_pyerr(py: Python<'_>, e: CastError) -> PyErr {
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

impl From<CastError> for PyErr {
    fn from(e: CastError) -> PyErr {
        Python::with_gil(|py| to_pyerr(py, e))
    }
}

/// A tensor argument: pyo3-tch's conversion, after refusing `meta` tensors, which have no
/// data and which tch would report as MPS tensors (its device enum has no meta).
struct TensorArg(Tensor);

impl<'py> FromPyObject<'py> for TensorArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let meta = ob
            .getattr(pyo3::intern!(ob.py(), "is_meta"))
            .and_then(|v| v.extract::<bool>())
            .unwrap_or(false);
        if meta {
            // A TypeError, so that pyo3 prefixes the argument's name.
            return Err(PyTypeError::new_err(
                "a 'meta' tensor has no data; cast-rs needs tensors on the CPU or a CUDA device \
                 (materialize the model first, e.g. model.to_empty(device='cpu'), then load weights)",
            ));
        }
        Ok(TensorArg(ob.extract::<PyTensor>()?.0))
    }
}

/// The entries of `adams_step`'s `mask_cache` list: `k` tensors or `None`s.
fn cache_entries(list: &Bound<'_, PyList>, k: usize) -> PyResult<Vec<Option<Tensor>>> {
    if list.len() != k {
        return Err(PyValueError::new_err(format!(
            "mask_cache: expected {k} entries (one per parameter), got {}",
            list.len()
        )));
    }
    list.iter()
        .map(|item| {
            if item.is_none() {
                Ok(None)
            } else {
                Ok(Some(item.extract::<TensorArg>()?.0))
            }
        })
        .collect()
}

// The `text_signature`s spell out `dim=-1`: pyo3 0.24 renders only literal defaults in the
// generated `__text_signature__` and writes `dim=...` for `-1` (a negation, not a literal),
// which stubtest reports as differing from `_cast_rs.pyi`. Keep them equal to `signature`.

/// Boolean N:M mask of a torch tensor (same shape, `torch.bool`).
#[pyfunction]
#[pyo3(signature = (x, n, m, dim=-1, force_generic=false))]
#[pyo3(text_signature = "(x, n, m, dim=-1, force_generic=False)")]
fn nm_mask_tensor(
    py: Python<'_>,
    x: TensorArg,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<PyTensor> {
    let out =
        py.allow_threads(move || ops::nm_mask(&x.0, n, m, dim, force_generic, MaskForm::Bool))?;
    Ok(PyTensor(out))
}

/// Packed N:M mask of a torch tensor: `uint8` of `ceil(numel / 8)` bytes.
#[pyfunction]
#[pyo3(signature = (x, n, m, dim=-1, force_generic=false))]
#[pyo3(text_signature = "(x, n, m, dim=-1, force_generic=False)")]
fn nm_mask_packed(
    py: Python<'_>,
    x: TensorArg,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<PyTensor> {
    let out =
        py.allow_threads(move || ops::nm_mask(&x.0, n, m, dim, force_generic, MaskForm::Packed))?;
    Ok(PyTensor(out))
}

/// Unpacks a packed mask into a boolean tensor of `shape`.
#[pyfunction]
fn unpack_mask(py: Python<'_>, bits: TensorArg, shape: Vec<i64>) -> PyResult<PyTensor> {
    let out = py.allow_threads(move || ops::unpack_mask(&bits.0, &shape))?;
    Ok(PyTensor(out))
}

fn keep_numpy<'py, T: MaskKey + numpy::Element>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, T>,
    n: i64,
    m: i64,
    dim: i64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    let shape: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
    let (_, _, layout) = checks::pattern_layout(n, m, dim, &shape, &Arg::from("x"))?;
    let xs = x
        .as_slice()
        .map_err(|_| CastError::value("x", "expected a C-contiguous array"))?;
    // SAFETY: an uninitialised array, fully written by the kernel before Python sees it.
    let out = unsafe { PyArrayDyn::<bool>::new(py, x.shape(), false) };
    {
        // SAFETY: `out` was just created, is C-contiguous and not shared yet; bool is one byte
        // and the kernel writes only 0 and 1, which are valid bools.
        let os: &mut [bool] = unsafe { out.as_slice_mut() }
            .map_err(|_| CastError::Internal("new array not contiguous".into()))?;
        let os: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(os.as_mut_ptr() as *mut u8, os.len()) };
        py.allow_threads(|| guarded(|| nm::nm_keep(xs, &layout, os)))?;
    }
    Ok(out)
}

/// Boolean N:M mask of a C-contiguous float32/float64 numpy array.
#[pyfunction]
#[pyo3(signature = (x, n, m, dim=-1))]
#[pyo3(text_signature = "(x, n, m, dim=-1)")]
fn nm_mask_numpy<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    n: i64,
    m: i64,
    dim: i64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'py, f32>>() {
        keep_numpy(py, a, n, m, dim)
    } else if let Ok(a) = x.extract::<PyReadonlyArrayDyn<'py, f64>>() {
        keep_numpy(py, a, n, m, dim)
    } else {
        Err(CastError::type_("x", "expected a float32 or float64 numpy array").into())
    }
}

/// One AdamS / AdamW step over a param group. See `cast_rs.AdamS` for the algorithm.
///
/// `patterns[i]` is `(n, m, dim)` for a sparse tensor (then `masks[i]` is its packed mask)
/// or `None` for a dense one. Everything is validated before anything is written.
/// Returns `(tensors on the fast path, tensors on the generic path, flips)` where `flips[i]`
/// is the number of N:M groups whose mask changed, for tensors refreshed at this step.
///
/// `mask_cache` (optional, in/out): a list with one entry per parameter, the generic path's
/// cached `keep` tensor of a sparse parameter (1 where its mask keeps the weight, 0 where it
/// removes it, in the parameter's dtype) or `None`. On success each entry is replaced by the tensor that step
/// used (`None` for a parameter not on the generic path), to pass back at the next step; the
/// caller must drop an entry whenever the packed mask changes by other means.
///
/// `masked_lr_scale` (default 1, the paper's AdamS): the masked-out weights' step is this
/// many times the kept weights' (lr·r).
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, masks, patterns, steps, *, lr, beta1, beta2, eps, weight_decay, l1_decay, total_steps, mask_interval, force_generic=false, validate_only=false, l1_decays=None, weight_decays=None, mask_cache=None, masked_lr_scale=1.0))]
#[allow(clippy::too_many_arguments)]
fn adams_step(
    py: Python<'_>,
    params: Vec<TensorArg>,
    grads: Vec<TensorArg>,
    exp_avgs: Vec<TensorArg>,
    exp_avg_sqs: Vec<TensorArg>,
    masks: Vec<Option<TensorArg>>,
    patterns: Vec<Option<(i64, i64, i64)>>,
    steps: Vec<TensorArg>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    l1_decay: f64,
    total_steps: Option<f64>,
    mask_interval: u64,
    force_generic: bool,
    validate_only: bool,
    l1_decays: Option<Vec<f64>>,
    weight_decays: Option<Vec<f64>>,
    mask_cache: Option<Bound<'_, PyList>>,
    masked_lr_scale: f64,
) -> PyResult<(usize, usize, Vec<Option<u64>>)> {
    let k = params.len();
    let unwrap = |v: Vec<TensorArg>| v.into_iter().map(|t| t.0).collect::<Vec<_>>();
    let tensors = StepTensors {
        params: unwrap(params),
        grads: unwrap(grads),
        exp_avgs: unwrap(exp_avgs),
        exp_avg_sqs: unwrap(exp_avg_sqs),
        masks: masks.into_iter().map(|m| m.map(|t| t.0)).collect(),
        patterns,
        steps: unwrap(steps),
        keeps: match &mask_cache {
            Some(list) => cache_entries(list, k)?,
            None => Vec::new(),
        },
    };
    let cfg = StepConfig {
        hyper: AdamsHyper {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            l1_decay,
            masked_lr_scale,
        },
        total_steps,
        mask_interval,
        l1_decays,
        weight_decays,
        force_generic,
    };
    let out = py.allow_threads(move || ops::adams_step(tensors, &cfg, validate_only))?;
    if let (Some(list), false) = (&mask_cache, validate_only) {
        for (i, d) in out.keeps.into_iter().enumerate() {
            list.set_item(i, d.map(PyTensor))?;
        }
    }
    Ok((out.n_fast, out.n_generic, out.flips))
}

/// `W · A` (weight scaling forward). `dim` is the weight's group dimension: -1 for
/// `[out, in]`, 0 for `[in, out]`.
#[pyfunction]
#[pyo3(signature = (w, a, groups, dim=-1, force_generic=false))]
#[pyo3(text_signature = "(w, a, groups, dim=-1, force_generic=False)")]
fn scale_forward(
    py: Python<'_>,
    w: TensorArg,
    a: TensorArg,
    groups: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<PyTensor> {
    let out =
        py.allow_threads(move || ops::scale_forward(&w.0, &a.0, groups, dim, force_generic))?;
    Ok(PyTensor(out))
}

/// Gradients of weight scaling: `(∂L/∂W, ∂L/∂A)` from `∂L/∂W_s`.
#[pyfunction]
#[pyo3(signature = (grad, w, a, groups, dim=-1, force_generic=false))]
#[pyo3(text_signature = "(grad, w, a, groups, dim=-1, force_generic=False)")]
fn scale_backward(
    py: Python<'_>,
    grad: TensorArg,
    w: TensorArg,
    a: TensorArg,
    groups: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<(PyTensor, PyTensor)> {
    let (gw, ga) = py.allow_threads(move || {
        ops::scale_backward(&grad.0, &w.0, &a.0, groups, dim, force_generic)
    })?;
    Ok((PyTensor(gw), PyTensor(ga)))
}

/// Number of threads the fast path uses.
#[pyfunction]
fn num_threads() -> usize {
    crate::parallel::num_threads()
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
    m.add_function(wrap_pyfunction!(nm_mask_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask_packed, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_mask, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask_numpy, m)?)?;
    m.add_function(wrap_pyfunction!(adams_step, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(scale_forward, m)?)?;
    m.add_function(wrap_pyfunction!(scale_backward, m)?)?;
    // The pattern limit, defined once (nm::MAX_M) and read by the Python layer.
    m.add("MAX_M", nm::MAX_M)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
