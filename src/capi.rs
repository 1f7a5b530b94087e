//! The C ABI that the `csrc/` PyTorch operators call (`csrc/cast_rs_ops.cpp` declares the
//! same functions). Tensors cross as `at::Tensor*` (tch's `C_tensor`): inputs are borrowed
//! (a shallow clone, so the caller keeps its own reference), outputs are handed over as a
//! `new at::Tensor` that the caller moves from and deletes.
//!
//! Every function returns a status ([`OK`], [`VALUE_ERROR`], [`TYPE_ERROR`] or
//! [`OTHER_ERROR`]) and, on failure, stores a message in `*message` that the caller frees
//! with [`cast_rs_free_message`], and keeps the error itself for this thread. In a Python
//! process the C++ side then asks [`cast_rs_set_python_error`] to make it the current Python
//! exception, the same object (class, message, `param` / `index` / `detail` / `other_*`
//! fields) that the rest of the package raises, and throws it through pybind11; without
//! Python it throws `c10::ValueError`, `c10::TypeError` or `c10::Error`. Panics are caught
//! before they reach the C++ caller.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::mem::ManuallyDrop;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::adams::AdamsHyper;
use crate::checks::StepConfig;
use crate::error::{CastError, Result};
use crate::generic::ForeachScalars;
use crate::ops::{self, guarded, MaskForm, StepTensors};

extern "C" {
    /// Defined in `csrc/cast_rs_ops.cpp`; calling it keeps that object file, and so its
    /// static operator registrations, in the extension.
    fn cast_rs_operators_linked() -> i32;
}

/// True once the `csrc/` operators are part of the extension (always, when it links).
pub fn operators_linked() -> bool {
    // SAFETY: a C function without arguments or side effects.
    unsafe { cast_rs_operators_linked() == 1 }
}

pub const OK: i32 = 0;
pub const VALUE_ERROR: i32 = 1;
pub const TYPE_ERROR: i32 = 2;
pub const OTHER_ERROR: i32 = 3;

/// Reports `r`: `OK`, or the error's class with its message in `*message`.
///
/// # Safety
/// `message` must be null or valid for one pointer write.
unsafe fn status(r: Result<()>, message: *mut *mut c_char) -> i32 {
    let e = match r {
        Ok(()) => return OK,
        Err(e) => e,
    };
    let code = match e {
        CastError::Value { .. } | CastError::Aliased { .. } => VALUE_ERROR,
        CastError::Type { .. } => TYPE_ERROR,
        _ => OTHER_ERROR,
    };
    if !message.is_null() {
        // Interior NULs cannot come from our messages; replace them rather than fail.
        let text = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
        // SAFETY: `message` is non-null and valid for a write (the caller's contract).
        unsafe { *message = text.into_raw() };
    }
    LAST_ERROR.with(|last| *last.borrow_mut() = Some(e));
    code
}

thread_local! {
    /// The error of this thread's last failed call, for [`cast_rs_set_python_error`].
    static LAST_ERROR: RefCell<Option<CastError>> = const { RefCell::new(None) };
}

/// Makes this thread's last error the current Python exception, built as the Python API
/// builds it (`py_error::to_pyerr`: `ValueError` / `TypeError` / `cast_rs.CastError` with the
/// failing argument as fields). Returns 1 when it did, 0 when there was no error to raise.
///
/// # Safety
/// The caller holds the GIL of an initialized interpreter.
#[no_mangle]
pub unsafe extern "C" fn cast_rs_set_python_error() -> i32 {
    let Some(e) = LAST_ERROR.with(|last| last.borrow_mut().take()) else {
        return 0;
    };
    let raised = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the caller holds the GIL (this function's contract).
        let py = unsafe { pyo3::Python::assume_gil_acquired() };
        crate::py_error::to_pyerr(py, e).restore(py);
    }));
    i32::from(raised.is_ok())
}

/// A borrowed input tensor.
///
/// # Safety
/// `p` must point to a live `at::Tensor` (non-null).
unsafe fn borrow(p: *const C_tensor) -> Result<Tensor> {
    if p.is_null() {
        return Err(CastError::Internal("null tensor pointer".into()));
    }
    // SAFETY: `p` points to a live at::Tensor; the shallow clone is our own reference.
    Ok(unsafe { Tensor::clone_from_ptr(p as *mut C_tensor) })
}

/// An output tensor, handed over to the caller, who deletes it.
fn give(t: Tensor) -> *mut C_tensor {
    let mut t = ManuallyDrop::new(t);
    t.as_mut_ptr()
}

/// # Safety
/// `ps` must point to `k` tensor pointers (each as for [`borrow`], or null where `nullable`).
unsafe fn borrow_list(
    ps: *const *const C_tensor,
    k: usize,
    nullable: bool,
) -> Result<Vec<Option<Tensor>>> {
    if k == 0 {
        return Ok(vec![]);
    }
    if ps.is_null() {
        return Err(CastError::Internal("null tensor list".into()));
    }
    // SAFETY: `ps` points to `k` pointers (the caller's contract).
    let ps = unsafe { std::slice::from_raw_parts(ps, k) };
    ps.iter()
        .map(|&p| {
            if p.is_null() && nullable {
                Ok(None)
            } else {
                // SAFETY: as for `borrow`.
                unsafe { borrow(p) }.map(Some)
            }
        })
        .collect()
}

/// Frees a message returned by any function of this module.
///
/// # Safety
/// `message` must be null or a pointer stored by this module and not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cast_rs_free_message(message: *mut c_char) {
    if !message.is_null() {
        // SAFETY: it came from `CString::into_raw` in `status`.
        drop(unsafe { CString::from_raw(message) });
    }
}

/// `nm_mask` (`packed = false`: bool, the input's shape) or `nm_mask_packed` (`true`).
///
/// # Safety
/// `x` points to a live tensor, `out` is valid for one pointer write, `message` as in
/// [`status`].
#[no_mangle]
pub unsafe extern "C" fn cast_rs_nm_mask(
    x: *const C_tensor,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
    packed: bool,
    out: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let x = unsafe { borrow(x) }?;
        let form = if packed {
            MaskForm::Packed
        } else {
            MaskForm::Bool
        };
        let t = ops::nm_mask(&x, n, m, dim, force_generic, form)?;
        // SAFETY: `out` is valid for a write (the caller's contract).
        unsafe { *out = give(t) };
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// `unpack_mask(bits, shape)` with `shape` given as `ndim` dimensions.
///
/// # Safety
/// `bits` points to a live tensor, `shape` to `ndim` values (or is anything when `ndim` is
/// 0), `out` and `message` as in [`cast_rs_nm_mask`].
#[no_mangle]
pub unsafe extern "C" fn cast_rs_unpack_mask(
    bits: *const C_tensor,
    shape: *const i64,
    ndim: usize,
    out: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let bits = unsafe { borrow(bits) }?;
        let shape: &[i64] = if ndim == 0 {
            &[]
        } else {
            // SAFETY: `shape` points to `ndim` values (the caller's contract).
            unsafe { std::slice::from_raw_parts(shape, ndim) }
        };
        let t = ops::unpack_mask(&bits, shape)?;
        // SAFETY: as above.
        unsafe { *out = give(t) };
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// Weight scaling forward, `W · A`.
///
/// # Safety
/// As [`cast_rs_nm_mask`].
#[no_mangle]
pub unsafe extern "C" fn cast_rs_scale_forward(
    weight: *const C_tensor,
    scale: *const C_tensor,
    groups: i64,
    dim: i64,
    force_generic: bool,
    out: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let (w, a) = unsafe { (borrow(weight)?, borrow(scale)?) };
        let t = ops::scale_forward(&w, &a, groups, dim, force_generic)?;
        // SAFETY: as above.
        unsafe { *out = give(t) };
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// Weight scaling backward: `(∂L/∂W, ∂L/∂A)`.
///
/// # Safety
/// As [`cast_rs_nm_mask`], with two outputs.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cast_rs_scale_backward(
    grad: *const C_tensor,
    weight: *const C_tensor,
    scale: *const C_tensor,
    groups: i64,
    dim: i64,
    force_generic: bool,
    grad_weight: *mut *mut C_tensor,
    grad_scale: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let (g, w, a) = unsafe { (borrow(grad)?, borrow(weight)?, borrow(scale)?) };
        let (gw, ga) = ops::scale_backward(&g, &w, &a, groups, dim, force_generic)?;
        // SAFETY: as above.
        unsafe {
            *grad_weight = give(gw);
            *grad_scale = give(ga);
        }
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// The scalars of one AdamS step call (mirrored by `CastStepScalars` in the C++ source).
#[repr(C)]
pub struct CastStepScalars {
    /// `hyper_len` values in the order of `AdamsHyper::FIELDS` (the operator's `hyper` list).
    pub hyper: *const f64,
    pub hyper_len: usize,
    /// Used when `has_total_steps`.
    pub total_steps: f64,
    pub has_total_steps: bool,
    pub mask_interval: i64,
    pub force_generic: bool,
}

/// One AdamS step over `k` parameters. `masks[i]` is null for a dense parameter;
/// `patterns` holds `(n, m, dim)` per parameter, `n = 0` for a dense one; `l1_decays` and
/// `weight_decays` are null or hold `k` values; `flips` receives `k` values: the number of
/// N:M groups whose mask changed for tensors refreshed at this step, else -1; `fast` receives
/// `k` flags: stepped by the slice kernel (else the generic path).
///
/// The generic-path tensors (`fast[i]` false) are left for the caller to step with one
/// multi-tensor call per (device, dtype) (`cast_rs_adams_foreach`, `csrc/adams_foreach.cpp`):
/// `foreach_scalars[i]` receives their scalars, `foreach_keeps[i]` a new tensor (the caller
/// deletes it) holding the `keep` tensor of a sparse one (null for a dense one), and
/// `foreach_hyper` the call's `lr, beta1, beta2, eps`.
///
/// `keep_cache` (null, or `k` entries, each null or a tensor) is the generic path's cache of
/// unpacked masks, kept by the caller between steps: an empty tensor means "none cached". On
/// success each given entry is set, in place, to the `keep` tensor this step used (sharing
/// its storage) or emptied when the parameter did not use one, so the caller passes the same
/// tensors back next step. With `validate_only` everything is checked and nothing written.
///
/// # Safety
/// Every list pointer points to `k` entries (tensor entries as for [`borrow`], masks and
/// cache entries may be null), `scalars` to one struct whose `hyper` points to `hyper_len`
/// values (or `hyper_len` is 0), `flips`, `fast`, `foreach_scalars` and `foreach_keeps` are
/// valid for `k` writes and `foreach_hyper` for 4, `message` as in [`status`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cast_rs_adams_step(
    k: usize,
    params: *const *const C_tensor,
    grads: *const *const C_tensor,
    exp_avgs: *const *const C_tensor,
    exp_avg_sqs: *const *const C_tensor,
    masks: *const *const C_tensor,
    patterns: *const i64,
    steps: *const *const C_tensor,
    keep_cache: *const *const C_tensor,
    scalars: *const CastStepScalars,
    l1_decays: *const f64,
    weight_decays: *const f64,
    validate_only: bool,
    flips: *mut i64,
    fast: *mut bool,
    foreach_scalars: *mut ForeachScalars,
    foreach_keeps: *mut *mut C_tensor,
    foreach_hyper: *mut f64,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY (whole block): the caller's contract on every pointer.
        unsafe {
            let cache = if keep_cache.is_null() {
                None
            } else {
                Some(borrow_list(keep_cache, k, true)?)
            };
            let list = |ps| -> Result<Vec<Tensor>> {
                Ok(borrow_list(ps, k, false)?.into_iter().flatten().collect())
            };
            let floats =
                |p: *const f64| (!p.is_null()).then(|| std::slice::from_raw_parts(p, k).to_vec());
            let pats = if k == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(patterns, 3 * k)
            };
            let sc = &*scalars;
            let mask_interval = u64::try_from(sc.mask_interval).map_err(|_| {
                CastError::value(
                    "mask_interval",
                    format!("expected an integer >= 1, got {}", sc.mask_interval),
                )
            })?;
            let tensors = StepTensors {
                params: list(params)?,
                grads: list(grads)?,
                exp_avgs: list(exp_avgs)?,
                exp_avg_sqs: list(exp_avg_sqs)?,
                masks: borrow_list(masks, k, true)?,
                patterns: pats
                    .chunks(3)
                    .map(|p| (p[0] != 0).then_some((p[0], p[1], p[2])))
                    .collect(),
                steps: list(steps)?,
                keeps: match &cache {
                    Some(entries) => entries
                        .iter()
                        .map(|e| {
                            e.as_ref()
                                .filter(|t| t.numel() > 0)
                                .map(Tensor::shallow_clone)
                        })
                        .collect(),
                    None => Vec::new(),
                },
            };
            let cfg = StepConfig {
                hyper: AdamsHyper::from_values(if sc.hyper_len == 0 {
                    &[]
                } else {
                    std::slice::from_raw_parts(sc.hyper, sc.hyper_len)
                })?,
                total_steps: sc.has_total_steps.then_some(sc.total_steps),
                mask_interval,
                l1_decays: floats(l1_decays),
                weight_decays: floats(weight_decays),
                force_generic: sc.force_generic,
            };
            let outcome = ops::adams_step(tensors, &cfg, validate_only)?;
            // The generic-path tensors' keep tensors, handed over below once nothing can fail.
            let handed: Vec<Option<Tensor>> = (0..k)
                .map(|i| {
                    outcome.foreach[i].and(outcome.keeps[i].as_ref().map(Tensor::shallow_clone))
                })
                .collect();
            if let (Some(entries), false) = (cache, validate_only) {
                store_keeps(entries, outcome.keeps)?;
            }
            if k > 0 {
                let out = std::slice::from_raw_parts_mut(flips, k);
                for (o, f) in out.iter_mut().zip(&outcome.flips) {
                    *o = f.map_or(-1, |v| v as i64);
                }
                std::slice::from_raw_parts_mut(fast, k).copy_from_slice(&outcome.fast);
                let scalars_out = std::slice::from_raw_parts_mut(foreach_scalars, k);
                let keeps_out = std::slice::from_raw_parts_mut(foreach_keeps, k);
                for (i, keep) in handed.into_iter().enumerate() {
                    scalars_out[i] = outcome.foreach[i].unwrap_or_default();
                    keeps_out[i] = keep.map_or(std::ptr::null_mut(), give);
                }
            }
            let h = &cfg.hyper;
            std::slice::from_raw_parts_mut(foreach_hyper, 4)
                .copy_from_slice(&[h.lr, h.beta1, h.beta2, h.eps]);
        }
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// `nm_compress(weight, n, m) -> (values, index)`.
///
/// # Safety
/// As [`cast_rs_nm_mask`], with two outputs.
#[no_mangle]
pub unsafe extern "C" fn cast_rs_nm_compress(
    weight: *const C_tensor,
    n: i64,
    m: i64,
    values: *mut *mut C_tensor,
    index: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let w = unsafe { borrow(weight) }?;
        let (v, i) = ops::nm_compress(&w, n, m)?;
        // SAFETY: as above.
        unsafe {
            *values = give(v);
            *index = give(i);
        }
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// `nm_compress_int8(weight, n, m) -> (values, index, scales)`.
///
/// # Safety
/// As [`cast_rs_nm_mask`], with three outputs.
#[no_mangle]
pub unsafe extern "C" fn cast_rs_nm_compress_int8(
    weight: *const C_tensor,
    n: i64,
    m: i64,
    values: *mut *mut C_tensor,
    index: *mut *mut C_tensor,
    scales: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let w = unsafe { borrow(weight) }?;
        let (v, i, s) = ops::nm_compress_int8(&w, n, m)?;
        // SAFETY: as above.
        unsafe {
            *values = give(v);
            *index = give(i);
            *scales = give(s);
        }
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// A borrowed optional input: null for None.
///
/// # Safety
/// `p` is null or points to a live tensor.
unsafe fn borrow_optional(p: *const C_tensor) -> Result<Option<Tensor>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: non-null, so a live tensor (the caller's contract).
        unsafe { borrow(p) }.map(Some)
    }
}

/// `nm_decompress(values, index, rows, cols, n, m, scales?) -> weight`; `scales` may be null.
///
/// # Safety
/// As [`cast_rs_nm_mask`]; `scales` is null or points to a live tensor.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cast_rs_nm_decompress(
    values: *const C_tensor,
    index: *const C_tensor,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
    scales: *const C_tensor,
    out: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let (v, i, s) = unsafe { (borrow(values)?, borrow(index)?, borrow_optional(scales)?) };
        let t = ops::nm_decompress(&v, &i, rows, cols, n, m, s.as_ref())?;
        // SAFETY: as above.
        unsafe { *out = give(t) };
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// `nm_linear(input, values, index, bias?, rows, cols, n, m, scales?) -> output`; `bias` and
/// `scales` may be null.
///
/// # Safety
/// As [`cast_rs_nm_mask`]; `bias` and `scales` are null or point to live tensors.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cast_rs_nm_linear(
    input: *const C_tensor,
    values: *const C_tensor,
    index: *const C_tensor,
    bias: *const C_tensor,
    rows: i64,
    cols: i64,
    n: i64,
    m: i64,
    scales: *const C_tensor,
    out: *mut *mut C_tensor,
    message: *mut *mut c_char,
) -> i32 {
    let r = guarded(|| {
        // SAFETY: the caller's contract.
        let (x, v, i) = unsafe { (borrow(input)?, borrow(values)?, borrow(index)?) };
        // SAFETY: the caller's contract.
        let (b, s) = unsafe { (borrow_optional(bias)?, borrow_optional(scales)?) };
        let t = ops::nm_linear(&x, &v, &i, b.as_ref(), rows, cols, n, m, s.as_ref())?;
        // SAFETY: as above.
        unsafe { *out = give(t) };
        Ok(())
    });
    // SAFETY: the caller's contract.
    unsafe { status(r, message) }
}

/// Puts each step's `keep` tensor into the caller's cache entry (sharing its storage), or
/// empties the entry when the parameter used none. An entry that already is the step's
/// `keep` (a cache hit, the common case) is left alone: no libtorch call per parameter.
fn store_keeps(entries: Vec<Option<Tensor>>, keeps: Vec<Option<Tensor>>) -> Result<()> {
    let torch = |e: tch::TchError| CastError::Torch {
        context: "keep_cache".into(),
        msg: e.to_string(),
    };
    for (entry, keep) in entries.into_iter().zip(keeps) {
        let Some(mut entry) = entry else { continue };
        // Both calls return the entry itself, already updated in place.
        match keep {
            Some(t) if t.data_ptr() == entry.data_ptr() && t.size() == entry.size() => {}
            Some(t) => drop(entry.f_set_source_tensor_(&t).map_err(torch)?),
            None if entry.numel() == 0 => {}
            None => drop(entry.f_resize_([0i64]).map_err(torch)?),
        }
    }
    Ok(())
}
