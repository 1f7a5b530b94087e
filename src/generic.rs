//! The generic path: the same kernels as `nm` and `adams`, written with tch tensor ops, so
//! they run for every floating dtype (f64, bf16, f16, ...), any strides and any device
//! (CUDA included). Used whenever the fast path's conditions do not hold (or when forced,
//! which is how the tests prove both paths agree on CPU).
//!
//! Op order mirrors the fast path (`crate::adams`), which mirrors torch's AdamW, so for f32 on CPU
//! the two paths agree to rounding.

use tch::{Device, Kind, Tensor};

use crate::adams::AdamsHyper;
use crate::error::{CastError, Result};
use crate::nm::{GroupDim, NmPattern};

pub(crate) fn torch_err(context: &str) -> impl Fn(tch::TchError) -> CastError + '_ {
    move |e| CastError::Torch {
        context: context.to_string(),
        msg: e.to_string(),
    }
}

/// `[A, B, M]` view of `x` whose last axis is the members of one group.
fn grouped(x: &Tensor, pattern: NmPattern, dim: GroupDim) -> Result<(Tensor, i64, i64)> {
    let e = torch_err("nm_mask");
    let shape = x.size();
    let numel: i64 = shape.iter().product();
    let m = pattern.m as i64;
    let (a, b) = match dim {
        GroupDim::Last => (numel / m, 1),
        // Not numel / shape[0]: an empty local shard (FSDP2) has shape[0] == 0.
        GroupDim::First => (shape[0] / m, shape[1..].iter().product()),
    };
    let g = x
        .f_reshape([a, m, b])
        .map_err(&e)?
        .f_transpose(1, 2)
        .map_err(&e)?;
    Ok((g, a, b))
}

/// Boolean N:M mask of `x` (same shape), by a stable descending sort of |x| in each group:
/// NaN sorts above everything, equal magnitudes keep index order, so the rule is the fast
/// path's exactly. The caller has validated the layout.
pub fn nm_keep_tensor(x: &Tensor, pattern: NmPattern, dim: GroupDim) -> Result<Tensor> {
    let e = torch_err("nm_mask");
    let shape = x.size();
    if x.numel() == 0 {
        return Tensor::f_zeros(shape.as_slice(), (Kind::Bool, x.device())).map_err(&e);
    }
    let (g, a, b) = grouped(x, pattern, dim)?;
    let key = g.f_abs().map_err(&e)?;
    let (_, order) = key.f_sort_stable(true, -1, true).map_err(&e)?;
    let top = order.f_narrow(-1, 0, pattern.n as i64).map_err(&e)?;
    let mut keep =
        Tensor::f_zeros([a, b, pattern.m as i64], (Kind::Uint8, x.device())).map_err(&e)?;
    let _ = keep.f_scatter_value_(-1, &top, 1).map_err(&e)?;
    keep.f_transpose(1, 2)
        .map_err(&e)?
        .f_reshape(shape.as_slice())
        .map_err(&e)?
        .f_to_kind(Kind::Bool)
        .map_err(&e)
}

/// Packs a boolean tensor into bits, row-major, LSB first: `ceil(numel / 8)` bytes.
pub fn pack_mask(keep: &Tensor) -> Result<Tensor> {
    let e = torch_err("pack_mask");
    let numel = keep.numel() as i64;
    let pad = (8 - numel % 8) % 8;
    let flat = keep
        .f_reshape([-1])
        .map_err(&e)?
        .f_to_kind(Kind::Uint8)
        .map_err(&e)?
        .f_constant_pad_nd([0, pad])
        .map_err(&e)?
        .f_reshape([-1, 8])
        .map_err(&e)?;
    let weights = Tensor::f_from_slice(&[1u8, 2, 4, 8, 16, 32, 64, 128])
        .map_err(&e)?
        .f_to_device(keep.device())
        .map_err(&e)?;
    flat.f_mul(&weights)
        .map_err(&e)?
        .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Uint8)
        .map_err(&e)
}

/// Inverse of [`pack_mask`]: a boolean tensor of `shape`.
pub fn unpack_mask(bits: &Tensor, shape: &[i64]) -> Result<Tensor> {
    let e = torch_err("unpack_mask");
    let numel: i64 = shape.iter().product();
    let shifts = Tensor::f_arange(8, (Kind::Uint8, bits.device())).map_err(&e)?;
    bits.f_unsqueeze(-1)
        .map_err(&e)?
        .f_bitwise_right_shift(&shifts)
        .map_err(&e)?
        .f_bitwise_and(1)
        .map_err(&e)?
        .f_reshape([-1])
        .map_err(&e)?
        .f_narrow(0, 0, numel)
        .map_err(&e)?
        .f_reshape(shape)
        .map_err(&e)?
        .f_to_kind(Kind::Bool)
        .map_err(&e)
}

/// Step-dependent scalars in f64 (tch converts them to the tensor's type per op).
pub struct GenericScalars {
    /// The step being taken (1 for the first).
    pub step: f64,
    pub step_size: f64,
    /// 1 / sqrt(1 − β2^s), as the fast path (a multiply, not a divide).
    pub inv_bc2_sqrt: f64,
    pub alpha: f64,
    pub refresh: bool,
}

impl GenericScalars {
    pub fn new(h: &AdamsHyper, step: f64, total_steps: Option<f64>, mask_interval: u64) -> Self {
        let alpha = match total_steps {
            Some(t) if t > 0.0 => (step / t).min(1.0),
            _ => 1.0,
        };
        let s = step.max(1.0) as u64;
        GenericScalars {
            step,
            step_size: h.lr / (1.0 - h.beta1.powf(step)),
            inv_bc2_sqrt: 1.0 / (1.0 - h.beta2.powf(step)).sqrt(),
            alpha,
            refresh: mask_interval > 0 && (s - 1).is_multiple_of(mask_interval),
        }
    }
}

/// One parameter of a generic-path step call: where it sits in the call's lists and its
/// hyperparameters and step scalars. `mask` is the layout of a sparse tensor.
pub struct GenericItem {
    pub index: usize,
    pub hyper: AdamsHyper,
    pub scalars: GenericScalars,
    pub mask: Option<(NmPattern, GroupDim)>,
}

/// The buffers of a step call, one entry per parameter of the call.
pub struct GenericBuffers<'a> {
    pub params: &'a [Tensor],
    pub grads: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
    pub exp_avg_sqs: &'a [Tensor],
    /// Packed masks (written at a refresh).
    pub masks: &'a mut [Option<Tensor>],
    /// The `keep` tensor of each sparse parameter (1 where its mask keeps the weight, 0 where
    /// it removes it, in the parameter's dtype). In: a cache from the previous step (ignored when its shape,
    /// dtype or device do not match). Out: the one this step used, to cache for the next.
    pub keeps: &'a mut [Option<Tensor>],
}

/// A generic-path tensor's scalars for the multi-tensor step (`CastForeachScalars` in
/// `csrc/adams_foreach.h`), which the operator runs after this crate has checked the call,
/// stepped the fast-path tensors and refreshed the masks that were due.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ForeachScalars {
    pub step: f64,
    pub weight_decay: f64,
    pub decay: f64,
    pub l1: f64,
    pub alpha: f64,
    pub step_size: f64,
    pub inv_bc2_sqrt: f64,
    pub masked_lr_scale: f64,
}

/// The `keep` tensor of a sparse parameter for this step, refreshing its mask first when
/// the step is a refresh step. Returns the number-of-changed-groups tensor (0-d, on the
/// parameter's device) of a refresh, left on the device so that all of a call's counts come
/// back to the host in one transfer.
fn keep_for_step(
    p: &Tensor,
    bits: &mut Tensor,
    cached: Option<Tensor>,
    pattern: NmPattern,
    dim: GroupDim,
    refresh: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let e = torch_err("adams_step (generic path)");
    let cached = cached.filter(|d| {
        d.size() == p.size()
            && d.kind() == p.kind()
            && d.device() == p.device()
            && d.is_contiguous()
    });
    if !refresh {
        let d = match cached {
            Some(d) => d,
            None => unpack_mask(bits, &p.size())?
                .f_to_kind(p.kind())
                .map_err(&e)?
                .f_contiguous()
                .map_err(&e)?,
        };
        return Ok((d, None));
    }
    // The new mask is computed before anything is written.
    let keep = nm_keep_tensor(p, pattern, dim)?;
    let old = unpack_mask(bits, &p.size())?;
    let changed = old.f_ne_tensor(&keep).map_err(&e)?;
    let (grouped_changed, _, _) = grouped(&changed, pattern, dim)?;
    let count = grouped_changed
        .f_any_dim(-1, false)
        .map_err(&e)?
        .f_sum(Kind::Int64)
        .map_err(&e)?;
    bits.f_copy_(&pack_mask(&keep)?).map_err(&e)?;
    let d = match cached {
        Some(mut d) => {
            d.f_copy_(&keep).map_err(&e)?;
            d
        }
        // Contiguous like the cached one (`keep` of an N:M along another dim is a transposed
        // view): the keep tensor's layout picks the route (`_fused_adamw_` or the `_foreach_`
        // calls, which round differently), so a fresh one must not take another route than a
        // cached one.
        None => keep
            .f_to_kind(p.kind())
            .map_err(&e)?
            .f_contiguous()
            .map_err(&e)?,
    };
    Ok((d, Some(count)))
}

/// The generic-path half of a step call that needs this crate: the masks due for a refresh are
/// recomputed (per tensor; the counts of changed groups go to `flips`, brought to the host in
/// one transfer) and every sparse tensor gets its `keep` tensor in `b.keeps`. Returns each
/// generic-path tensor's scalars, in the order of `items`: the multi-tensor step itself
/// (`csrc/adams_foreach.cpp`: torch's `_fused_adamw_` and a few `_foreach_*` calls per
/// (device, dtype) group) is the operator's, which runs it when this returns, so that the C++
/// and Rust halves of a call meet once. Validation is the caller's: this only fails on
/// libtorch errors.
pub fn prepare_foreach(
    items: &[GenericItem],
    b: GenericBuffers<'_>,
    flips: &mut [Option<u64>],
) -> Result<Vec<ForeachScalars>> {
    let e = torch_err("adams_step (generic path)");
    let mut counts: Vec<(usize, Tensor)> = Vec::new();
    for it in items {
        let i = it.index;
        match (it.mask, b.masks[i].as_mut()) {
            (Some((pattern, dim)), Some(bits)) => {
                let cached = b.keeps[i].take();
                let (d, count) =
                    keep_for_step(&b.params[i], bits, cached, pattern, dim, it.scalars.refresh)?;
                b.keeps[i] = Some(d);
                if let Some(c) = count {
                    counts.push((i, c));
                }
            }
            _ => b.keeps[i] = None,
        }
    }
    if !counts.is_empty() {
        let on_device: Vec<&Tensor> = counts.iter().map(|(_, c)| c).collect();
        let host = Tensor::f_stack(&on_device, 0)
            .map_err(&e)?
            .f_to_device(Device::Cpu)
            .map_err(&e)?;
        let values = Vec::<i64>::try_from(&host).map_err(&e)?;
        for ((i, _), n) in counts.iter().zip(values) {
            flips[*i] = Some(n.max(0) as u64);
        }
    }
    Ok(items
        .iter()
        .map(|it| ForeachScalars {
            step: it.scalars.step,
            weight_decay: it.hyper.weight_decay,
            decay: 1.0 - it.hyper.lr * it.hyper.weight_decay,
            l1: it.hyper.l1_decay,
            alpha: it.scalars.alpha,
            step_size: it.scalars.step_size,
            inv_bc2_sqrt: it.scalars.inv_bc2_sqrt,
            masked_lr_scale: it.hyper.masked_lr_scale,
        })
        .collect())
}

pub fn is_cpu(t: &Tensor) -> bool {
    t.device() == Device::Cpu
}

/// `A` broadcast to the weight's shape (see `scaling.rs` for the layouts).
fn expand_scale(a: &Tensor, s: &crate::scaling::ScaleShape) -> Result<Tensor> {
    use crate::scaling::ScaleLayout;
    let e = torch_err("weight scaling");
    let (r, c, n, b) = (
        s.rows as i64,
        s.cols as i64,
        s.groups as i64,
        s.block() as i64,
    );
    match s.layout {
        ScaleLayout::RowsOut => a
            .f_unsqueeze(-1)
            .map_err(&e)?
            .f_expand([r, n, b], false)
            .map_err(&e)?
            .f_reshape([r, c])
            .map_err(&e),
        ScaleLayout::RowsIn => a
            .f_transpose(0, 1)
            .map_err(&e)?
            .f_unsqueeze(1)
            .map_err(&e)?
            .f_expand([n, b, r], false)
            .map_err(&e)?
            .f_reshape([c, r])
            .map_err(&e),
    }
}

/// Generic-path `W · A` (also `∂L/∂W` when `w` is the incoming gradient).
pub fn scale_forward_tensor(
    w: &Tensor,
    a: &Tensor,
    s: &crate::scaling::ScaleShape,
) -> Result<Tensor> {
    w.f_mul(&expand_scale(a, s)?)
        .map_err(torch_err("weight scaling"))
}

/// Generic-path `∂L/∂A`, shape `[R, n]`.
pub fn scale_grad_scale_tensor(
    g: &Tensor,
    w: &Tensor,
    s: &crate::scaling::ScaleShape,
) -> Result<Tensor> {
    use crate::scaling::ScaleLayout;
    let e = torch_err("weight scaling");
    let (r, n, b) = (s.rows as i64, s.groups as i64, s.block() as i64);
    let prod = g.f_mul(w).map_err(&e)?;
    match s.layout {
        ScaleLayout::RowsOut => prod
            .f_reshape([r, n, b])
            .map_err(&e)?
            .f_sum_dim_intlist([-1i64].as_slice(), false, None::<Kind>)
            .map_err(&e),
        ScaleLayout::RowsIn => prod
            .f_reshape([n, b, r])
            .map_err(&e)?
            .f_sum_dim_intlist([1i64].as_slice(), false, None::<Kind>)
            .map_err(&e)?
            .f_transpose(0, 1)
            .map_err(&e)?
            .f_contiguous()
            .map_err(&e),
    }
}
