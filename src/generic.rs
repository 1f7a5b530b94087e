//! The generic path: the same kernels as `nm` and `adams`, written with tch tensor ops, so
//! they run for every floating dtype (f64, bf16, f16, ...), any strides and any device
//! (CUDA included). Used whenever the fast path's conditions do not hold (or when forced,
//! which is how the tests prove both paths agree on CPU).
//!
//! Op order mirrors the fast path (`adams.rs`), which mirrors torch's AdamW, so for f32 on CPU
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
            step_size: h.lr / (1.0 - h.beta1.powf(step)),
            inv_bc2_sqrt: 1.0 / (1.0 - h.beta2.powf(step)).sqrt(),
            alpha,
            refresh: mask_interval > 0 && (s - 1).is_multiple_of(mask_interval),
        }
    }
}

/// One AdamS step of one tensor with tensor ops. `mask` is the packed mask and the group
/// layout of a sparse tensor. Validation is the caller's: this only fails on libtorch errors.
#[allow(clippy::too_many_arguments)]
pub fn adams_step_tensor(
    p: &mut Tensor,
    g: &Tensor,
    mu: &mut Tensor,
    v: &mut Tensor,
    mask: Option<(&mut Tensor, NmPattern, GroupDim)>,
    h: &AdamsHyper,
    sc: &GenericScalars,
) -> Result<Option<u64>> {
    let e = torch_err("adams_step (generic path)");
    let mut flips = None;
    // The new mask is computed before anything is written.
    let mask = match mask {
        Some((bits, pattern, dim)) => {
            if sc.refresh {
                let keep = nm_keep_tensor(p, pattern, dim)?;
                let old = unpack_mask(bits, &p.size())?;
                let changed = old.f_ne_tensor(&keep).map_err(&e)?;
                let (g, _, _) = grouped(&changed, pattern, dim)?;
                let n = g
                    .f_any_dim(-1, false)
                    .map_err(&e)?
                    .f_sum(Kind::Int64)
                    .map_err(&e)?
                    .f_int64_value(&[])
                    .map_err(&e)?;
                flips = Some(n as u64);
                let packed = pack_mask(&keep)?;
                bits.f_copy_(&packed).map_err(&e)?;
                Some(keep)
            } else {
                Some(unpack_mask(bits, &p.size())?)
            }
        }
        None => None,
    };
    if h.weight_decay != 0.0 {
        let _ = p.f_mul_scalar_(1.0 - h.lr * h.weight_decay).map_err(&e)?;
    }
    let _ = mu.f_lerp_(g, 1.0 - h.beta1).map_err(&e)?;
    let (mt, second) = match &mask {
        Some(keep) => {
            let decayed = mu
                .f_mul_scalar(1.0 - sc.alpha)
                .map_err(&e)?
                .f_add(
                    &p.f_sign()
                        .map_err(&e)?
                        .f_mul_scalar(sc.alpha * h.l1_decay)
                        .map_err(&e)?,
                )
                .map_err(&e)?;
            let mt = mu.f_where_self(keep, &decayed).map_err(&e)?;
            (mt.shallow_clone(), mt)
        }
        None => (mu.shallow_clone(), g.shallow_clone()),
    };
    let _ = v.f_mul_scalar_(h.beta2).map_err(&e)?;
    let _ = v
        .f_add_(
            &second
                .f_mul_scalar(1.0 - h.beta2)
                .map_err(&e)?
                .f_mul(&second)
                .map_err(&e)?,
        )
        .map_err(&e)?;
    let denom = v
        .f_sqrt()
        .map_err(&e)?
        .f_mul_scalar(sc.inv_bc2_sqrt)
        .map_err(&e)?
        .f_add_scalar_(h.eps)
        .map_err(&e)?;
    let update = mt
        .f_mul_scalar(-sc.step_size)
        .map_err(&e)?
        .f_div(&denom)
        .map_err(&e)?;
    let _ = p.f_add_(&update).map_err(&e)?;
    Ok(flips)
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
