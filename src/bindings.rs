//! The Python module `cast_rs._cast_rs`: module set-up, the exception type, the constants the
//! Python layer reads, and the AdamS step's entry (until the operator takes its mask cache).
//! Every other kernel is reached through the PyTorch operators (`torch.ops.cast_rs.*`,
//! `csrc/`). No numerics and no argument rules live here.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use pyo3_tch::PyTensor;
use tch::Tensor;

use crate::adams::AdamsHyper;
use crate::checks::StepConfig;
use crate::error::CastError;
use crate::nm;
use crate::ops::{self, StepTensors};
use crate::py_error::{to_pyerr, PyCastError};

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

/// The ranges of AdamS's scalar hyperparameters (`AdamsHyper::validate`, the rule the kernel
/// applies at every step), for the optimizer to check a group when it is built, with the same
/// messages. No tensor: the values only.
#[pyfunction]
#[pyo3(signature = (*, lr, beta1, beta2, eps, weight_decay, l1_decay, masked_lr_scale))]
#[allow(clippy::too_many_arguments)]
fn check_adams_hyper(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    l1_decay: f64,
    masked_lr_scale: f64,
) -> PyResult<()> {
    AdamsHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        l1_decay,
        masked_lr_scale,
    }
    .validate()?;
    Ok(())
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
    m.add_function(wrap_pyfunction!(adams_step, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(check_adams_hyper, m)?)?;
    // The pattern limit, defined once (nm::MAX_M) and read by the Python layer.
    m.add("MAX_M", nm::MAX_M)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
