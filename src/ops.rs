//! The kernel entry points on libtorch tensors: check (through [`crate::checks`]), pick the
//! path (the slice kernels for contiguous CPU tensors of their dtype, the generic tch ops
//! otherwise), run. No Python here: the pyo3 functions (`bindings`) and the C ABI of the
//! `csrc/` PyTorch operators (`capi`) are thin callers of these, so both see the same checks,
//! the same errors and the same numbers.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::{Device, Kind, Tensor};

use crate::adams::{adams_step_fused, AdamsTensor, StepElem, StepScalars};
use crate::checks::{self, Dev, Dtype, Meta, StepConfig, StepMeta, StepPlan};
use crate::error::{CastError, Result};
use crate::generic::{self, torch_err, GenericScalars};
use crate::nm;
use crate::scaling::{self, ScaleShape};

/// Runs `f`, turning a panic into `CastError::Internal` so none crosses an FFI boundary.
pub fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
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

fn dtype(k: Kind) -> Dtype {
    match k {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Bool => Dtype::Bool,
        _ => Dtype::Other,
    }
}

fn dev(d: Device) -> Dev {
    match d {
        Device::Cpu => Dev::Cpu,
        Device::Cuda(i) => Dev::Cuda(i),
        Device::Mps => Dev::Mps,
        Device::Vulkan => Dev::Vulkan,
    }
}

/// The metadata of `t` for the checks.
pub fn meta(t: &Tensor) -> Meta {
    let sparse = t.is_sparse();
    let (start, nbytes) = if sparse {
        // A sparse tensor has no strided data pointer; it is refused before any range is used.
        (0, 0)
    } else {
        (
            t.data_ptr() as usize,
            t.numel() * t.kind().elt_size_in_bytes(),
        )
    };
    Meta {
        dtype: dtype(t.kind()),
        dev: dev(t.device()),
        size: t.size(),
        stride: if sparse { vec![] } else { t.stride() },
        start,
        nbytes,
        contiguous: !sparse && t.is_contiguous(),
        sparse,
    }
}

/// # Safety
/// `t` must be a contiguous CPU tensor of element type `T`, and no other live slice may
/// cover its memory while the returned one is used.
// The `&mut` comes from the tensor's storage, which a `Tensor` handle shares like an `Rc`;
// exclusivity is the caller's obligation (the aliasing checks), not the borrow checker's.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn slice_mut<T>(t: &Tensor) -> &mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: the caller guarantees contiguity, type and exclusivity; `t` keeps the storage
    // alive for 'a; `numel > 0` so the pointer is non-null and aligned for T.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}

/// The two forms of a mask the entry points return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskForm {
    /// `torch.bool`, the tensor's shape.
    Bool,
    /// `uint8`, `ceil(numel / 8)` bytes, one bit per weight.
    Packed,
}

/// The N:M mask of `x` (groups along `dim`: -1 / last, or 0).
pub fn nm_mask(
    x: &Tensor,
    n: i64,
    m: i64,
    dim: i64,
    force_generic: bool,
    form: MaskForm,
) -> Result<Tensor> {
    let xm = meta(x);
    let (pattern, gdim, layout) = checks::mask_args(&xm, n, m, dim)?;
    guarded(|| {
        let e = torch_err("nm_mask");
        if !force_generic && checks::fast_eligible(&[&xm], Dtype::F32) {
            let out = match form {
                MaskForm::Bool => Tensor::f_empty(xm.size.as_slice(), (Kind::Bool, Device::Cpu)),
                MaskForm::Packed => Tensor::f_zeros(
                    [nm::packed_len(layout.numel) as i64],
                    (Kind::Uint8, Device::Cpu),
                ),
            }
            .map_err(&e)?;
            // SAFETY: `x` is a contiguous CPU f32 tensor (checked) and `out` a fresh contiguous
            // bool/uint8 tensor (bools are written as 0/1 only); distinct.
            let (xs, os) = unsafe { (slice_mut::<f32>(x), slice_mut::<u8>(&out)) };
            match form {
                MaskForm::Bool => nm::nm_keep(xs, &layout, os)?,
                MaskForm::Packed => nm::nm_mask_packed(xs, &layout, os)?,
            }
            Ok(out)
        } else {
            let keep = generic::nm_keep_tensor(x, pattern, gdim)?;
            match form {
                MaskForm::Bool => Ok(keep),
                MaskForm::Packed => generic::pack_mask(&keep),
            }
        }
    })
}

/// A packed mask unpacked into a boolean tensor of `shape`.
///
/// Contiguous CPU bits take a table lookup per byte (`nm::unpack_flags`); any other tensor
/// the generic tensor ops. The masked LoRA layer unpacks its mask in every forward and
/// backward pass, where three elementwise tensor passes cost several percent of a step.
pub fn unpack_mask(bits: &Tensor, shape: &[i64]) -> Result<Tensor> {
    let bm = meta(bits);
    checks::unpack_args(&bm, shape)?;
    guarded(|| {
        if !checks::fast_eligible(&[&bm], Dtype::U8) {
            return generic::unpack_mask(bits, shape);
        }
        let out =
            Tensor::f_empty(shape, (Kind::Bool, Device::Cpu)).map_err(torch_err("unpack_mask"))?;
        // SAFETY: `bits` is a contiguous CPU uint8 tensor (checked), `out` a fresh contiguous
        // bool tensor written with 0/1 bytes only; distinct.
        let (bs, os) = unsafe { (slice_mut::<u8>(bits), slice_mut::<u8>(&out)) };
        // `unpack_args` checked that `bits` holds packed_len(numel) bytes.
        nm::unpack_flags(bs, os);
        Ok(out)
    })
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
) -> Result<()> {
    // SAFETY: guaranteed by the caller.
    unsafe { scaling::scale_forward::<T>(slice_mut(w), slice_mut(a), s, slice_mut(out)) }
}

/// The dtype of the scaling fast path for these tensors, if they qualify.
fn scale_fast_dtype(ts: &[&Meta], force_generic: bool) -> Option<Dtype> {
    let d = ts[0].dtype;
    (!force_generic && matches!(d, Dtype::F32 | Dtype::F64) && checks::fast_eligible(ts, d))
        .then_some(d)
}

/// `W · A` (weight scaling forward). `dim` is the weight's group dimension: -1 for
/// `[out, in]`, 0 for `[in, out]`.
pub fn scale_forward(
    w: &Tensor,
    a: &Tensor,
    groups: i64,
    dim: i64,
    force_generic: bool,
) -> Result<Tensor> {
    let (wm, am) = (meta(w), meta(a));
    let s = checks::scale_args(&wm, &am, groups, dim)?;
    guarded(|| match scale_fast_dtype(&[&wm, &am], force_generic) {
        Some(d) => {
            let out = Tensor::f_empty(w.size(), (w.kind(), Device::Cpu))
                .map_err(torch_err("scale_forward"))?;
            // SAFETY: contiguous CPU tensors of dtype `d` (checked); `out` is fresh.
            unsafe {
                match d {
                    Dtype::F32 => scale_forward_fast::<f32>(w, a, &s, &out)?,
                    _ => scale_forward_fast::<f64>(w, a, &s, &out)?,
                }
            }
            Ok(out)
        }
        None => generic::scale_forward_tensor(w, a, &s),
    })
}

/// Gradients of weight scaling: `(∂L/∂W, ∂L/∂A)` from `∂L/∂W_s`: `gw = g · A`,
/// `ga = Σ g · W` over each block.
pub fn scale_backward(
    g: &Tensor,
    w: &Tensor,
    a: &Tensor,
    groups: i64,
    dim: i64,
    force_generic: bool,
) -> Result<(Tensor, Tensor)> {
    let (gm, wm, am) = (meta(g), meta(w), meta(a));
    let s = checks::scale_args(&wm, &am, groups, dim)?;
    checks::scale_grad_args(&gm, &wm)?;
    guarded(|| match scale_fast_dtype(&[&gm, &wm, &am], force_generic) {
        Some(d) => {
            let e = torch_err("scale_backward");
            let gw = Tensor::f_empty(w.size(), (w.kind(), Device::Cpu)).map_err(&e)?;
            let ga = Tensor::f_empty(a.size(), (w.kind(), Device::Cpu)).map_err(&e)?;
            // SAFETY: contiguous CPU tensors of dtype `d` (checked); the outputs are fresh.
            unsafe {
                match d {
                    Dtype::F32 => {
                        scaling::scale_forward::<f32>(
                            slice_mut(g),
                            slice_mut(a),
                            &s,
                            slice_mut(&gw),
                        )?;
                        scaling::scale_grad_scale::<f32>(
                            slice_mut(g),
                            slice_mut(w),
                            &s,
                            slice_mut(&ga),
                        )?;
                    }
                    _ => {
                        scaling::scale_forward::<f64>(
                            slice_mut(g),
                            slice_mut(a),
                            &s,
                            slice_mut(&gw),
                        )?;
                        scaling::scale_grad_scale::<f64>(
                            slice_mut(g),
                            slice_mut(w),
                            &s,
                            slice_mut(&ga),
                        )?;
                    }
                }
            }
            Ok((gw, ga))
        }
        None => Ok((
            generic::scale_forward_tensor(g, a, &s)?,
            generic::scale_grad_scale_tensor(g, w, &s)?,
        )),
    })
}

/// The tensors of one AdamS step call (one param group), one entry per parameter.
pub struct StepTensors {
    pub params: Vec<Tensor>,
    pub grads: Vec<Tensor>,
    pub exp_avgs: Vec<Tensor>,
    pub exp_avg_sqs: Vec<Tensor>,
    /// The packed mask of each sparse parameter, `None` for a dense one.
    pub masks: Vec<Option<Tensor>>,
    /// `(n, m, dim)` of each sparse parameter, `None` for a dense one.
    pub patterns: Vec<Option<(i64, i64, i64)>>,
    /// Completed-step counters (one element each), incremented on success.
    pub steps: Vec<Tensor>,
    /// The generic path's cached `keep` tensors (see [`generic::GenericBuffers`]), one entry
    /// per parameter (`None`: none cached); empty when the caller keeps no cache.
    pub keeps: Vec<Option<Tensor>>,
}

/// What a step call did.
#[derive(Debug)]
pub struct StepOutcome {
    /// Tensors updated by the slice kernel and by the generic path.
    pub n_fast: usize,
    pub n_generic: usize,
    /// For tensors whose mask was refreshed: the number of N:M groups whose mask changed.
    pub flips: Vec<Option<u64>>,
    /// The `keep` tensor each sparse generic-path parameter used (for the caller to cache
    /// and pass back next step); `None` for the others.
    pub keeps: Vec<Option<Tensor>>,
    /// Per parameter: stepped by the slice kernel (true) or the generic path.
    pub fast: Vec<bool>,
    /// Per parameter: the scalars of its multi-tensor step (`generic::prepare_foreach`) for a
    /// generic-path parameter, which the caller still has to step (with `keeps`); `None` for
    /// the others.
    pub foreach: Vec<Option<generic::ForeachScalars>>,
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

fn write_step(t: &mut Tensor, value: f64) -> Result<()> {
    if t.device() == Device::Cpu && t.kind() == Kind::Float {
        // SAFETY: as in `read_step`; the counter is not aliased by any kernel buffer.
        unsafe { *(t.data_ptr() as *mut f32) = value as f32 };
        return Ok(());
    }
    t.f_fill_(value)
        .map(|_| ())
        .map_err(torch_err("step counter"))
}

/// The buffers of a step call, for the slice kernels.
struct FastBuffers<'a> {
    params: &'a [Tensor],
    grads: &'a [Tensor],
    exp_avgs: &'a [Tensor],
    exp_avg_sqs: &'a [Tensor],
    masks: &'a [Option<Tensor>],
}

/// Runs the slice kernel of element type `E` on the parameters planned for it (`dtype`),
/// recording their mask flips.
fn step_fast<E: StepElem>(
    dtype: Dtype,
    plans: &[StepPlan],
    b: &FastBuffers<'_>,
    cfg: &StepConfig,
    flips: &mut [Option<u64>],
) -> Result<()> {
    let mine: Vec<usize> = (0..plans.len())
        .filter(|&i| plans[i].fast == Some(dtype))
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    let mut tensors = Vec::with_capacity(mine.len());
    for &i in &mine {
        let plan = &plans[i];
        // SAFETY: each tensor is a contiguous CPU tensor of `dtype`, whose elements `E`
        // represents (f32, or `repr(transparent)` u16 bits); the buffers of one parameter
        // were checked pairwise disjoint and those of the call's fast-path parameters disjoint
        // by the sweep; state tensors are per parameter.
        let tensor = unsafe {
            AdamsTensor {
                theta: slice_mut::<E>(&b.params[i]),
                grad: slice_mut::<E>(&b.grads[i]),
                exp_avg: slice_mut::<E>(&b.exp_avgs[i]),
                exp_avg_sq: slice_mut::<E>(&b.exp_avg_sqs[i]),
                mask: match (&b.masks[i], plan.mask) {
                    (Some(m), Some((_, _, layout))) => Some((slice_mut::<u8>(m), layout)),
                    _ => None,
                },
                scalars: StepScalars::new(
                    &plan.hyper,
                    plan.step,
                    cfg.total_steps,
                    cfg.mask_interval,
                ),
            }
        };
        tensors.push(tensor);
    }
    for (i, f) in mine.into_iter().zip(adams_step_fused(tensors, &cfg.hyper)?) {
        flips[i] = f;
    }
    Ok(())
}

/// One AdamS / AdamW step over a param group (see `cast_rs.AdamS` for the algorithm), but for
/// the multi-tensor step of the generic-path parameters, which the outcome describes
/// (`foreach`, `keeps`) for the caller (the operator, `csrc/`) to run.
/// Everything is checked before anything is written; with `validate_only` nothing is.
pub fn adams_step(t: StepTensors, cfg: &StepConfig, validate_only: bool) -> Result<StepOutcome> {
    let k = t.params.len();
    let (l1s, wds) = checks::step_call_args(
        cfg,
        k,
        &[
            ("grads", t.grads.len()),
            ("exp_avgs", t.exp_avgs.len()),
            ("exp_avg_sqs", t.exp_avg_sqs.len()),
            ("masks", t.masks.len()),
            ("patterns", t.patterns.len()),
            ("steps", t.steps.len()),
        ],
    )?;
    let metas: Vec<StepMeta> = (0..k)
        .map(|i| StepMeta {
            param: meta(&t.params[i]),
            grad: meta(&t.grads[i]),
            exp_avg: meta(&t.exp_avgs[i]),
            exp_avg_sq: meta(&t.exp_avg_sqs[i]),
            mask: t.masks[i].as_ref().map(meta),
            pattern: t.patterns[i],
            step: meta(&t.steps[i]),
            steps_done: read_step(&t.steps[i]),
        })
        .collect();
    let plans = checks::step_plans(cfg, &l1s, &wds, &metas)?;
    let fast: Vec<bool> = plans.iter().map(|p| p.fast.is_some()).collect();
    let n_fast = fast.iter().filter(|&&f| f).count();
    if validate_only {
        return Ok(StepOutcome {
            n_fast,
            n_generic: k - n_fast,
            flips: vec![None; k],
            keeps: (0..k).map(|_| None).collect(),
            fast,
            foreach: vec![None; k],
        });
    }
    // The generic path writes through libtorch (in-place ops on shared tensor handles) and
    // the fast path through raw slices, so only the masks and counters need `mut` here.
    let StepTensors {
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        mut masks,
        mut steps,
        keeps,
        ..
    } = t;
    let mut keeps: Vec<Option<Tensor>> = if keeps.len() == k {
        keeps
    } else {
        (0..k).map(|_| None).collect()
    };
    let total = cfg.total_steps;
    let interval = cfg.mask_interval;
    guarded(|| {
        let mut flips = vec![None; k];
        let bufs = FastBuffers {
            params: &params,
            grads: &grads,
            exp_avgs: &exp_avgs,
            exp_avg_sqs: &exp_avg_sqs,
            masks: &masks,
        };
        step_fast::<f32>(Dtype::F32, &plans, &bufs, cfg, &mut flips)?;
        step_fast::<nm::Bf16Bits>(Dtype::BF16, &plans, &bufs, cfg, &mut flips)?;
        step_fast::<nm::F16Bits>(Dtype::F16, &plans, &bufs, cfg, &mut flips)?;
        let items: Vec<generic::GenericItem> = plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.fast.is_none())
            .map(|(i, plan)| generic::GenericItem {
                index: i,
                hyper: plan.hyper,
                scalars: GenericScalars::new(&plan.hyper, plan.step, total, interval),
                mask: plan.mask.map(|(pat, gdim, _)| (pat, gdim)),
            })
            .collect();
        for (i, plan) in plans.iter().enumerate() {
            if plan.fast.is_some() {
                keeps[i] = None;
            }
        }
        let mut foreach = vec![None; k];
        if !items.is_empty() {
            let scalars = generic::prepare_foreach(
                &items,
                generic::GenericBuffers {
                    params: &params,
                    grads: &grads,
                    exp_avgs: &exp_avgs,
                    exp_avg_sqs: &exp_avg_sqs,
                    masks: &mut masks,
                    keeps: &mut keeps,
                },
                &mut flips,
            )?;
            for (it, sc) in items.iter().zip(scalars) {
                foreach[it.index] = Some(sc);
            }
        }
        for (s, plan) in steps.iter_mut().zip(&plans) {
            write_step(s, plan.step)?;
        }
        Ok(StepOutcome {
            n_fast,
            n_generic: k - n_fast,
            flips,
            keeps: std::mem::take(&mut keeps),
            fast: fast.clone(),
            foreach,
        })
    })
}

// The compressed N:M layers' entry points (nm_compress, nm_compress_int8, nm_decompress,
// nm_linear) are in `nm_ops`; re-exported so that every caller reaches them through `ops`.
pub use crate::nm_ops::{nm_compress, nm_compress_int8, nm_decompress, nm_linear};
