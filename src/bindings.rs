//! The Python binding layer (`cast_rs._cast_rs`): argument checking, tensor extraction,
//! path selection (fast slice kernels vs generic tch ops), GIL release and error mapping.
//! No numerics live here.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

use crate::adams::{adams_step_f32, per_tensor, AdamsHyper, AdamsTensor, StepScalars};
use crate::error::CastError;
use crate::generic::{self, GenericScalars};
use crate::nm::{self, GroupDim, GroupLayout, MaskKey, NmPattern};
use crate::scaling::{self, ScaleLayout, ScaleShape};

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

impl From<CastError> for PyErr {
    fn from(e: CastError) -> PyErr {
        match e {
            CastError::Value { .. } => PyValueError::new_err(e.to_string()),
            CastError::Type { .. } => PyTypeError::new_err(e.to_string()),
            _ => PyCastError::new_err(e.to_string()),
        }
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

/// Runs `f`, turning a panic into `CastError::Internal` so none crosses into Python.
fn guarded<T>(f: impl FnOnce() -> Result<T, CastError>) -> Result<T, CastError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(CastError::Internal(msg))
        }
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// The torch spelling of a dtype, as users see it.
fn kind_name(k: Kind) -> String {
    let s = match k {
        Kind::Float => "torch.float32",
        Kind::Double => "torch.float64",
        Kind::Half => "torch.float16",
        Kind::BFloat16 => "torch.bfloat16",
        Kind::Uint8 => "torch.uint8",
        Kind::Int8 => "torch.int8",
        Kind::Int16 => "torch.int16",
        Kind::Int => "torch.int32",
        Kind::Int64 => "torch.int64",
        Kind::Bool => "torch.bool",
        other => return format!("{other:?}"),
    };
    s.to_string()
}

/// Byte range of a tensor's data, for the aliasing check.
fn byte_range(t: &Tensor) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    let len = t.numel() * t.kind().elt_size_in_bytes();
    (start, start + len)
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 != a.1 && b.0 != b.1
}

/// True when two elements of `t` may share memory (an `expand()`ed view, a stride-0 or
/// interleaved layout): an in-place update would then depend on evaluation order. Sufficient
/// test: with the dims of size > 1 sorted by stride, each stride must reach past the previous
/// dim's whole extent. (A few exotic non-overlapping layouts are refused too.)
fn self_overlapping(t: &Tensor) -> bool {
    let mut dims: Vec<(i64, i64)> = t
        .stride()
        .into_iter()
        .zip(t.size())
        .filter(|&(_, size)| size > 1)
        .collect();
    dims.sort_unstable();
    let mut extent = 1i64;
    for (stride, size) in dims {
        if stride < extent {
            return true;
        }
        extent = stride.saturating_mul(size);
    }
    false
}

/// # Safety
/// `t` must be a contiguous CPU tensor of element type `T`, and no other live slice may
/// cover its memory while the returned one is used.
unsafe fn slice_mut<'a, T>(t: &'a Tensor) -> &'a mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: the caller guarantees contiguity, type and exclusivity; `t` keeps the storage
    // alive for 'a; `numel > 0` so the pointer is non-null and aligned for T.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}

fn pattern_layout(
    n: i64,
    m: i64,
    dim: i64,
    shape: &[i64],
    param: &str,
) -> Result<(NmPattern, GroupDim, GroupLayout), CastError> {
    let pattern = NmPattern::new(n, m)?;
    let gdim = GroupDim::from_dim(dim, shape.len()).map_err(|e| match e {
        CastError::Value { msg, .. } => CastError::value(param, msg),
        other => other,
    })?;
    let layout = GroupLayout::new(pattern, shape, gdim, param)?;
    Ok((pattern, gdim, layout))
}

fn fast_eligible(ts: &[&Tensor], kind: Kind) -> bool {
    ts.iter()
        .all(|t| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous())
}

/// The two forms of a torch tensor's mask that the bindings return.
#[derive(Clone, Copy)]
enum MaskForm {
    /// `torch.bool`, the tensor's shape.
    Bool,
    /// `uint8`, `ceil(numel / 8)` bytes, one bit per weight.
    Packed,
}

/// Shared body of `nm_mask_tensor` / `nm_mask_packed`: validate, then the fast path for
/// contiguous f32 CPU tensors or the generic tch path.
fn mask_tensor(
    py: Python<'_>,
    x: Tensor,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
    form: MaskForm,
) -> PyResult<PyTensor> {
    if !is_float(x.kind()) {
        return Err(CastError::type_(
            "x",
            format!(
                "expected a floating-point tensor, got dtype {}",
                kind_name(x.kind())
            ),
        )
        .into());
    }
    let shape = x.size();
    let (pattern, gdim, layout) = pattern_layout(n, m, dim, &shape, "x")?;
    let out = py.allow_threads(move || {
        guarded(|| {
            let e = generic::torch_err("nm_mask");
            if !force_generic && fast_eligible(&[&x], Kind::Float) {
                let out = match form {
                    MaskForm::Bool => Tensor::f_empty(shape.as_slice(), (Kind::Bool, Device::Cpu)),
                    MaskForm::Packed => Tensor::f_zeros(
                        [nm::packed_len(layout.numel) as i64],
                        (Kind::Uint8, Device::Cpu),
                    ),
                }
                .map_err(&e)?;
                // SAFETY: `x` is a contiguous CPU f32 tensor (checked) and `out` a fresh
                // contiguous bool/uint8 tensor (bools are written as 0/1 only); distinct.
                let (xs, os) = unsafe { (slice_mut::<f32>(&x), slice_mut::<u8>(&out)) };
                match form {
                    MaskForm::Bool => nm::nm_keep(xs, &layout, os)?,
                    MaskForm::Packed => nm::nm_mask_packed(xs, &layout, os)?,
                }
                Ok(out)
            } else {
                let keep = generic::nm_keep_tensor(&x, pattern, gdim)?;
                match form {
                    MaskForm::Bool => Ok(keep),
                    MaskForm::Packed => generic::pack_mask(&keep),
                }
            }
        })
    })?;
    Ok(PyTensor(out))
}

/// Boolean N:M mask of a torch tensor (same shape, `torch.bool`).
#[pyfunction]
#[pyo3(signature = (x, n, m, dim=-1, force_generic=false))]
fn nm_mask_tensor(
    py: Python<'_>,
    x: TensorArg,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<PyTensor> {
    mask_tensor(py, x.0, n, m, dim, force_generic, MaskForm::Bool)
}

/// Packed N:M mask of a torch tensor: `uint8` of `ceil(numel / 8)` bytes.
#[pyfunction]
#[pyo3(signature = (x, n, m, dim=-1, force_generic=false))]
fn nm_mask_packed(
    py: Python<'_>,
    x: TensorArg,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<PyTensor> {
    mask_tensor(py, x.0, n, m, dim, force_generic, MaskForm::Packed)
}

/// Unpacks a packed mask into a boolean tensor of `shape`.
#[pyfunction]
fn unpack_mask(py: Python<'_>, bits: TensorArg, shape: Vec<i64>) -> PyResult<PyTensor> {
    let bits = bits.0;
    if bits.kind() != Kind::Uint8 {
        return Err(CastError::type_(
            "bits",
            format!("expected a uint8 tensor, got {}", kind_name(bits.kind())),
        )
        .into());
    }
    if shape.iter().any(|&d| d < 0) {
        return Err(
            CastError::value("shape", format!("dimensions must be >= 0, got {shape:?}")).into(),
        );
    }
    let numel: i64 = shape.iter().product();
    if bits.size() != [nm::packed_len(numel as usize) as i64] {
        return Err(CastError::value(
            "bits",
            format!(
                "expected a 1-d tensor of {} bytes for shape {shape:?}, got shape {:?}",
                nm::packed_len(numel as usize),
                bits.size()
            ),
        )
        .into());
    }
    let out = py.allow_threads(move || guarded(|| generic::unpack_mask(&bits, &shape)))?;
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
    let (_, _, layout) = pattern_layout(n, m, dim, &shape, "x")?;
    let xs = x
        .as_slice()
        .map_err(|_| CastError::value("x", "expected a C-contiguous array"))?;
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
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, masks, patterns, steps, *, lr, beta1, beta2, eps, weight_decay, l1_decay, total_steps, mask_interval, force_generic=false, validate_only=false, l1_decays=None, weight_decays=None))]
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
) -> PyResult<(usize, usize, Vec<Option<u64>>)> {
    let k = params.len();
    // λ per tensor (AdamS's relative mode), or the group's `l1_decay` for every tensor; weight
    // decay per tensor (0 for weight-scale parameters), or the group's for every tensor.
    let l1s = per_tensor("l1_decays", l1_decays, l1_decay, k)?;
    let wds = per_tensor("weight_decays", weight_decays, weight_decay, k)?;
    for (name, len) in [
        ("grads", grads.len()),
        ("exp_avgs", exp_avgs.len()),
        ("exp_avg_sqs", exp_avg_sqs.len()),
        ("masks", masks.len()),
        ("patterns", patterns.len()),
        ("steps", steps.len()),
    ] {
        if len != k {
            return Err(CastError::value(
                name,
                format!("expected {k} entries (one per parameter), got {len}"),
            )
            .into());
        }
    }
    let h = AdamsHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        l1_decay,
    };
    h.validate()?;
    if mask_interval == 0 {
        return Err(CastError::value("mask_interval", "expected an integer >= 1, got 0").into());
    }
    if let Some(t) = total_steps {
        if !(t.is_finite() && t >= 1.0) {
            return Err(CastError::value(
                "total_steps",
                format!("expected a number >= 1, got {t}"),
            )
            .into());
        }
    }

    struct Job {
        p: Tensor,
        g: Tensor,
        mu: Tensor,
        v: Tensor,
        mask: Option<(Tensor, NmPattern, GroupDim, GroupLayout)>,
        /// The state's step counter (completed steps) and s, the step being taken.
        step_t: Tensor,
        step: f64,
        fast: bool,
        /// This tensor's hyper-parameters: the group's, with its own λ and weight decay.
        h: AdamsHyper,
    }
    let mut jobs = Vec::with_capacity(k);
    let it = params
        .into_iter()
        .zip(grads)
        .zip(exp_avgs)
        .zip(exp_avg_sqs)
        .zip(masks)
        .zip(patterns)
        .zip(steps);
    for (i, ((((((p, g), mu), v), mask), pattern), step_t)) in it.enumerate() {
        let (p, g, mu, v, step_t) = (p.0, g.0, mu.0, v.0, step_t.0);
        let step = read_step(&step_t).map(|done| done + 1.0).ok_or_else(|| {
            CastError::value(
                format!("steps[{i}]"),
                format!(
                    "expected a one-element step counter, got shape {:?}",
                    step_t.size()
                ),
            )
        })?;
        let pk = p.kind();
        if !is_float(pk) {
            return Err(CastError::type_(
                format!("params[{i}]"),
                format!(
                    "expected a floating-point parameter, got dtype {}",
                    kind_name(pk)
                ),
            )
            .into());
        }
        let shape = p.size();
        for (name, t) in [("grads", &g), ("exp_avgs", &mu), ("exp_avg_sqs", &v)] {
            if t.is_sparse() {
                return Err(CastError::type_(
                    format!("{name}[{i}]"),
                    "sparse gradients are not supported (use a dense gradient)",
                )
                .into());
            }
            if t.kind() != pk {
                return Err(CastError::type_(
                    format!("{name}[{i}]"),
                    format!(
                        "expected dtype {} (the parameter's), got {}",
                        kind_name(pk),
                        kind_name(t.kind())
                    ),
                )
                .into());
            }
            if t.size() != shape {
                return Err(CastError::value(
                    format!("{name}[{i}]"),
                    format!(
                        "expected shape {shape:?} (the parameter's), got {:?}",
                        t.size()
                    ),
                )
                .into());
            }
            if t.device() != p.device() {
                return Err(CastError::value(
                    format!("{name}[{i}]"),
                    format!(
                        "expected device {:?} (the parameter's), got {:?}",
                        p.device(),
                        t.device()
                    ),
                )
                .into());
            }
        }
        if !(step.is_finite() && step >= 1.0) {
            return Err(CastError::value(
                format!("steps[{i}]"),
                format!("expected a step number >= 1, got {step}"),
            )
            .into());
        }
        let mask = match (pattern, mask) {
            (None, None) => None,
            (Some((n, m, dim)), Some(bits)) => {
                let bits = bits.0;
                let (pat, gdim, layout) =
                    pattern_layout(n, m, dim, &shape, &format!("params[{i}]"))?;
                if total_steps.is_none() {
                    return Err(CastError::value(
                        "total_steps",
                        "required for sparse (N:M) parameters: the decay ramps up over total_steps",
                    )
                    .into());
                }
                if bits.kind() != Kind::Uint8
                    || bits.size() != [nm::packed_len(layout.numel) as i64]
                    || bits.device() != p.device()
                {
                    return Err(CastError::value(
                        format!("masks[{i}]"),
                        format!(
                            "expected a uint8 tensor of shape [{}] on {:?}, got {} {:?} on {:?}",
                            nm::packed_len(layout.numel),
                            p.device(),
                            kind_name(bits.kind()),
                            bits.size(),
                            bits.device()
                        ),
                    )
                    .into());
                }
                Some((bits, pat, gdim, layout))
            }
            (Some(_), None) => {
                return Err(CastError::value(
                    format!("masks[{i}]"),
                    "a sparse parameter needs a packed mask tensor",
                )
                .into())
            }
            (None, Some(_)) => {
                return Err(CastError::value(
                    format!("masks[{i}]"),
                    "a dense parameter takes no mask (pass None)",
                )
                .into())
            }
        };
        // Aliasing between any two buffers of one parameter would make the update depend on
        // evaluation order (and break the fast path's exclusive slices).
        let mut ranges = vec![
            ("params", byte_range(&p)),
            ("grads", byte_range(&g)),
            ("exp_avgs", byte_range(&mu)),
            ("exp_avg_sqs", byte_range(&v)),
        ];
        if let Some((bits, ..)) = &mask {
            ranges.push(("masks", byte_range(bits)));
        }
        let written = [
            ("params", &p),
            ("exp_avgs", &mu),
            ("exp_avg_sqs", &v),
            ("steps", &step_t),
        ];
        let mask_t = mask.as_ref().map(|(b, ..)| ("masks", b));
        for (name, t) in written.into_iter().chain(mask_t) {
            if self_overlapping(t) {
                return Err(CastError::value(
                    format!("{name}[{i}]"),
                    format!(
                        "elements overlap in memory (size {:?}, stride {:?}, e.g. an expand()ed \
                         view); it is updated in place, so it needs its own storage (.clone())",
                        t.size(),
                        t.stride()
                    ),
                )
                .into());
            }
        }
        for a in 0..ranges.len() {
            for b in a + 1..ranges.len() {
                if overlaps(ranges[a].1, ranges[b].1) {
                    return Err(CastError::value(
                        format!("{}[{i}]", ranges[b].0),
                        format!(
                            "shares memory with {}[{i}]; each buffer must be its own tensor",
                            ranges[a].0
                        ),
                    )
                    .into());
                }
            }
        }
        let fast = !force_generic
            && fast_eligible(&[&p, &g, &mu, &v], Kind::Float)
            && mask
                .as_ref()
                .is_none_or(|(b, ..)| b.is_contiguous() && b.device() == Device::Cpu);
        jobs.push(Job {
            p,
            g,
            mu,
            v,
            mask,
            step_t,
            step,
            fast,
            h: AdamsHyper {
                l1_decay: l1s[i],
                weight_decay: wds[i],
                ..h
            },
        });
    }
    // Across parameters too: the fast path hands out one `&mut` slice per buffer, so no two
    // buffers of the whole call may overlap (a sweep over ranges sorted by start).
    let mut fast_ranges: Vec<(usize, usize, String)> = Vec::new();
    for (i, j) in jobs.iter().enumerate().filter(|(_, j)| j.fast) {
        for (name, t) in [
            ("params", &j.p),
            ("grads", &j.g),
            ("exp_avgs", &j.mu),
            ("exp_avg_sqs", &j.v),
        ] {
            let r = byte_range(t);
            fast_ranges.push((r.0, r.1, format!("{name}[{i}]")));
        }
        if let Some((b, ..)) = &j.mask {
            let r = byte_range(b);
            fast_ranges.push((r.0, r.1, format!("masks[{i}]")));
        }
    }
    fast_ranges.retain(|r| r.0 != r.1);
    fast_ranges.sort();
    let mut reach: Option<&(usize, usize, String)> = None;
    for r in &fast_ranges {
        if let Some(prev) = reach {
            if r.0 < prev.1 {
                return Err(CastError::value(
                    r.2.clone(),
                    format!(
                        "shares memory with {}; each buffer must be its own tensor",
                        prev.2
                    ),
                )
                .into());
            }
        }
        if reach.is_none_or(|p| r.1 > p.1) {
            reach = Some(r);
        }
    }

    let n_fast = jobs.iter().filter(|j| j.fast).count();
    let n_generic = k - n_fast;
    if validate_only {
        // Everything a real call would check has been checked; nothing was written.
        return Ok((n_fast, n_generic, vec![None; k]));
    }
    let flips = py.allow_threads(move || {
        guarded(|| {
            let mut fast_tensors = Vec::with_capacity(n_fast);
            for j in jobs.iter().filter(|j| j.fast) {
                // SAFETY: each tensor is a contiguous CPU tensor of the right type (checked
                // above); the buffers of one parameter were checked pairwise disjoint and the
                // parameters of the call pairwise disjoint; state tensors are per parameter.
                let t = unsafe {
                    AdamsTensor {
                        theta: slice_mut::<f32>(&j.p),
                        grad: slice_mut::<f32>(&j.g),
                        exp_avg: slice_mut::<f32>(&j.mu),
                        exp_avg_sq: slice_mut::<f32>(&j.v),
                        mask: j
                            .mask
                            .as_ref()
                            .map(|(b, _, _, layout)| (slice_mut::<u8>(b), *layout)),
                        scalars: StepScalars::new(&j.h, j.step, total_steps, mask_interval),
                    }
                };
                fast_tensors.push(t);
            }
            let fast_flips = adams_step_f32(fast_tensors, &h)?;
            let mut flips = vec![None; jobs.len()];
            let fast_idx = jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| j.fast)
                .map(|(i, _)| i);
            for (i, f) in fast_idx.zip(fast_flips) {
                flips[i] = f;
            }
            for (i, j) in jobs.iter_mut().enumerate().filter(|(_, j)| !j.fast) {
                let sc = GenericScalars::new(&j.h, j.step, total_steps, mask_interval);
                let mask = j.mask.as_mut().map(|(b, pat, gdim, _)| (b, *pat, *gdim));
                flips[i] = generic::adams_step_tensor(
                    &mut j.p, &j.g, &mut j.mu, &mut j.v, mask, &j.h, &sc,
                )?;
            }
            for j in jobs.iter_mut() {
                write_step(&mut j.step_t, j.step)?;
            }
            Ok(flips)
        })
    })?;
    Ok((n_fast, n_generic, flips))
}

fn scale_shape(w: &Tensor, a: &Tensor, groups: i64, dim: i64) -> Result<ScaleShape, CastError> {
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
    let s = ScaleShape::new(&w.size(), groups, layout)?;
    if a.size() != [s.rows as i64, s.groups as i64] {
        return Err(CastError::value(
            "scale",
            format!(
                "expected shape [{}, {}], got {:?}",
                s.rows,
                s.groups,
                a.size()
            ),
        ));
    }
    if !is_float(w.kind()) || a.kind() != w.kind() {
        return Err(CastError::type_(
            "scale",
            format!(
                "expected floating tensors of one dtype, got weight {} and scale {}",
                kind_name(w.kind()),
                kind_name(a.kind())
            ),
        ));
    }
    if a.device() != w.device() {
        return Err(CastError::value(
            "scale",
            format!(
                "expected device {:?} (the weight's), got {:?}",
                w.device(),
                a.device()
            ),
        ));
    }
    Ok(s)
}

/// Fast-path scaling forward on element type `T`.
///
/// # Safety
/// All tensors must be contiguous CPU tensors of element type `T`, `out` distinct from the
/// inputs.
unsafe fn scale_forward_fast<T: scaling::Real>(
    w: &Tensor,
    a: &Tensor,
    s: &ScaleShape,
    out: &Tensor,
) -> Result<(), CastError> {
    // SAFETY: guaranteed by the caller.
    unsafe { scaling::scale_forward::<T>(slice_mut(w), slice_mut(a), s, slice_mut(out)) }
}

/// Fast-path scaling backward on element type `T`: `gw = g · A`, `ga = Σ g · W`.
///
/// # Safety
/// As [`scale_forward_fast`]; `gw` and `ga` are fresh outputs.
unsafe fn scale_backward_fast<T: scaling::Real>(
    g: &Tensor,
    w: &Tensor,
    a: &Tensor,
    s: &ScaleShape,
    gw: &Tensor,
    ga: &Tensor,
) -> Result<(), CastError> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        scaling::scale_forward::<T>(slice_mut(g), slice_mut(a), s, slice_mut(gw))?;
        scaling::scale_grad_scale::<T>(slice_mut(g), slice_mut(w), s, slice_mut(ga))
    }
}

/// `W · A` (weight scaling forward). `dim` is the weight's group dimension: -1 for
/// `[out, in]`, 0 for `[in, out]`.
#[pyfunction]
#[pyo3(signature = (w, a, groups, dim=-1, force_generic=false))]
fn scale_forward(
    py: Python<'_>,
    w: TensorArg,
    a: TensorArg,
    groups: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<PyTensor> {
    let (w, a) = (w.0, a.0);
    let s = scale_shape(&w, &a, groups, dim)?;
    let out = py.allow_threads(move || {
        guarded(|| {
            let kind = w.kind();
            if !force_generic
                && matches!(kind, Kind::Float | Kind::Double)
                && fast_eligible(&[&w, &a], kind)
            {
                let out = Tensor::f_empty(w.size(), (kind, Device::Cpu))
                    .map_err(generic::torch_err("scale_forward"))?;
                // SAFETY: contiguous CPU tensors of `kind` (checked); `out` is fresh.
                unsafe {
                    match kind {
                        Kind::Float => scale_forward_fast::<f32>(&w, &a, &s, &out)?,
                        _ => scale_forward_fast::<f64>(&w, &a, &s, &out)?,
                    }
                }
                Ok(out)
            } else {
                generic::scale_forward_tensor(&w, &a, &s)
            }
        })
    })?;
    Ok(PyTensor(out))
}

/// Gradients of weight scaling: `(∂L/∂W, ∂L/∂A)` from `∂L/∂W_s`.
#[pyfunction]
#[pyo3(signature = (grad, w, a, groups, dim=-1, force_generic=false))]
fn scale_backward(
    py: Python<'_>,
    grad: TensorArg,
    w: TensorArg,
    a: TensorArg,
    groups: i64,
    dim: i64,
    force_generic: bool,
) -> PyResult<(PyTensor, PyTensor)> {
    let (g, w, a) = (grad.0, w.0, a.0);
    let s = scale_shape(&w, &a, groups, dim)?;
    if g.size() != w.size() || g.kind() != w.kind() || g.device() != w.device() {
        return Err(CastError::value(
            "grad",
            format!(
                "expected the weight's shape {:?} and dtype {}, got {:?} {}",
                w.size(),
                kind_name(w.kind()),
                g.size(),
                kind_name(g.kind())
            ),
        )
        .into());
    }
    let (gw, ga) = py.allow_threads(move || {
        guarded(|| {
            let kind = w.kind();
            if !force_generic
                && matches!(kind, Kind::Float | Kind::Double)
                && fast_eligible(&[&g, &w, &a], kind)
            {
                let e = generic::torch_err("scale_backward");
                let gw = Tensor::f_empty(w.size(), (kind, Device::Cpu)).map_err(&e)?;
                let ga = Tensor::f_empty(a.size(), (kind, Device::Cpu)).map_err(&e)?;
                // SAFETY: contiguous CPU tensors of `kind` (checked); outputs are fresh.
                unsafe {
                    match kind {
                        Kind::Float => scale_backward_fast::<f32>(&g, &w, &a, &s, &gw, &ga)?,
                        _ => scale_backward_fast::<f64>(&g, &w, &a, &s, &gw, &ga)?,
                    }
                }
                Ok((gw, ga))
            } else {
                Ok((
                    generic::scale_forward_tensor(&g, &a, &s)?,
                    generic::scale_grad_scale_tensor(&g, &w, &s)?,
                ))
            }
        })
    })?;
    Ok((PyTensor(gw), PyTensor(ga)))
}

/// Completed steps held in a one-element counter tensor (torch keeps `state["step"]` as a
/// 0-d float32 CPU tensor; that case is read directly, others through libtorch).
fn read_step(t: &Tensor) -> Option<f64> {
    if t.numel() != 1 {
        return None;
    }
    if t.device() == Device::Cpu && t.kind() == Kind::Float {
        // SAFETY: a CPU float32 tensor with one element: its data pointer is a valid f32.
        return Some(unsafe { *(t.data_ptr() as *const f32) } as f64);
    }
    t.f_reshape([0i64; 0]).ok()?.f_double_value(&[]).ok()
}

fn write_step(t: &mut Tensor, value: f64) -> Result<(), CastError> {
    if t.device() == Device::Cpu && t.kind() == Kind::Float {
        // SAFETY: as in `read_step`; the counter is not aliased by any kernel buffer.
        unsafe { *(t.data_ptr() as *mut f32) = value as f32 };
        return Ok(());
    }
    t.f_fill_(value)
        .map(|_| ())
        .map_err(generic::torch_err("step counter"))
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
    m.add("CastError", m.py().get_type::<PyCastError>())?;
    m.add_function(wrap_pyfunction!(nm_mask_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask_packed, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_mask, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask_numpy, m)?)?;
    m.add_function(wrap_pyfunction!(adams_step, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(scale_forward, m)?)?;
    m.add_function(wrap_pyfunction!(scale_backward, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
