//! The arguments of an AdamS step call: the scalars and list lengths first, then each
//! parameter's dtypes, shapes, devices, pattern, mask and memory layout, then aliasing across
//! the whole call; the result is one [`StepPlan`] per parameter.

use super::aliasing::{first_shared_pair, first_shared_sweep};
use super::mask::pattern_layout;
use super::meta::{fast_eligible, Dev, Dtype, Meta};
use crate::adams::{per_tensor, AdamsHyper};
use crate::error::{Arg, CastError, Result};
use crate::nm::{packed_len, GroupDim, GroupLayout, NmPattern};

/// The scalar arguments of one AdamS step call (one param group).
#[derive(Debug, Clone)]
pub struct StepConfig {
    pub hyper: AdamsHyper,
    /// The ramp length `T` (α = min(1, s / T)); required when any tensor is sparse.
    pub total_steps: Option<f64>,
    pub mask_interval: u64,
    /// λ per tensor (AdamS's relative mode), else the group's `l1_decay` for every tensor.
    pub l1_decays: Option<Vec<f64>>,
    /// Weight decay per tensor (0 for weight-scale parameters), else the group's.
    pub weight_decays: Option<Vec<f64>>,
    pub force_generic: bool,
}

/// One parameter's tensors in a step call, as metadata.
#[derive(Debug, Clone)]
pub struct StepMeta {
    pub param: Meta,
    pub grad: Meta,
    pub exp_avg: Meta,
    pub exp_avg_sq: Meta,
    /// The packed mask, for a sparse parameter.
    pub mask: Option<Meta>,
    /// `(n, m, dim)` for a sparse parameter.
    pub pattern: Option<(i64, i64, i64)>,
    pub step: Meta,
    /// The completed steps the counter holds, when it holds exactly one number.
    pub steps_done: Option<f64>,
}

/// What the step kernels need to know about one parameter, once it passed the checks.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    /// s, the step being taken (completed steps + 1).
    pub step: f64,
    pub mask: Option<(NmPattern, GroupDim, GroupLayout)>,
    /// The dtype of the slice kernel this parameter takes (contiguous CPU buffers of one
    /// dtype among f32, bf16 and fp16); `None`: the generic tch path.
    pub fast: Option<Dtype>,
    /// This tensor's hyper-parameters: the group's, with its own λ and weight decay.
    pub hyper: AdamsHyper,
}

/// The checks that need only the scalars and the list lengths, before any tensor is looked
/// at. `lens` are the lengths of the per-parameter lists other than `params` (`k` entries).
pub fn step_call_args(
    cfg: &StepConfig,
    k: usize,
    lens: &[(&'static str, usize)],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let h = &cfg.hyper;
    let l1s = per_tensor("l1_decays", cfg.l1_decays.clone(), h.l1_decay, k)?;
    let wds = per_tensor(
        "weight_decays",
        cfg.weight_decays.clone(),
        h.weight_decay,
        k,
    )?;
    for &(name, len) in lens {
        if len != k {
            return Err(CastError::value(
                name,
                format!("expected {k} entries (one per parameter), got {len}"),
            ));
        }
    }
    h.validate()?;
    if cfg.mask_interval == 0 {
        return Err(CastError::value(
            "mask_interval",
            "expected an integer >= 1, got 0",
        ));
    }
    if let Some(t) = cfg.total_steps {
        if !(t.is_finite() && t >= 1.0) {
            return Err(CastError::value(
                "total_steps",
                format!("expected a number >= 1, got {t}"),
            ));
        }
    }
    Ok((l1s, wds))
}

/// Every check of one AdamS step call: scalars, then each parameter's dtypes, shapes,
/// devices, pattern, mask and memory layout, then aliasing across the whole call.
pub fn step_args(cfg: &StepConfig, tensors: &[StepMeta]) -> Result<Vec<StepPlan>> {
    let (l1s, wds) = step_call_args(cfg, tensors.len(), &[])?;
    step_plans(cfg, &l1s, &wds, tensors)
}

/// The per-parameter half of [`step_args`], for a caller that already ran [`step_call_args`]
/// (with its list lengths) and holds the per-tensor λ and weight decays it returned.
pub fn step_plans(
    cfg: &StepConfig,
    l1s: &[f64],
    wds: &[f64],
    tensors: &[StepMeta],
) -> Result<Vec<StepPlan>> {
    let k = tensors.len();
    let mut plans = Vec::with_capacity(k);
    for (i, t) in tensors.iter().enumerate() {
        let step = t.steps_done.map(|done| done + 1.0).ok_or_else(|| {
            CastError::value(
                Arg::at("steps", i),
                format!(
                    "expected a one-element step counter, got shape {:?}",
                    t.step.size
                ),
            )
        })?;
        let p = &t.param;
        if !p.dtype.is_float() {
            return Err(CastError::type_(
                Arg::at("params", i),
                format!(
                    "expected a floating-point parameter, got dtype {}",
                    p.dtype.name()
                ),
            ));
        }
        for (name, b) in [
            ("grads", &t.grad),
            ("exp_avgs", &t.exp_avg),
            ("exp_avg_sqs", &t.exp_avg_sq),
        ] {
            if b.sparse {
                return Err(CastError::type_(
                    Arg::at(name, i),
                    "sparse gradients are not supported (use a dense gradient)",
                ));
            }
            if b.dtype != p.dtype {
                return Err(CastError::type_(
                    Arg::at(name, i),
                    format!(
                        "expected dtype {} (the parameter's), got {}",
                        p.dtype.name(),
                        b.dtype.name()
                    ),
                ));
            }
            if b.size != p.size {
                return Err(CastError::value(
                    Arg::at(name, i),
                    format!(
                        "expected shape {:?} (the parameter's), got {:?}",
                        p.size, b.size
                    ),
                ));
            }
            if b.dev != p.dev {
                return Err(CastError::value(
                    Arg::at(name, i),
                    format!(
                        "expected device {:?} (the parameter's), got {:?}",
                        p.dev, b.dev
                    ),
                ));
            }
        }
        if !(step.is_finite() && step >= 1.0) {
            return Err(CastError::value(
                Arg::at("steps", i),
                format!("expected a step number >= 1, got {step}"),
            ));
        }
        let mask = match (t.pattern, &t.mask) {
            (None, None) => None,
            (Some((n, m, dim)), Some(bits)) => {
                let layout = pattern_layout(n, m, dim, &p.size, &Arg::at("params", i))?;
                if cfg.total_steps.is_none() {
                    return Err(CastError::value(
                        "total_steps",
                        "required for sparse (N:M) parameters: the decay ramps up over total_steps",
                    ));
                }
                let want = packed_len(layout.2.numel) as i64;
                if bits.dtype != Dtype::U8 || bits.size != [want] || bits.dev != p.dev {
                    return Err(CastError::value(
                        Arg::at("masks", i),
                        format!(
                            "expected a uint8 tensor of shape [{want}] on {:?}, got {} {:?} on {:?}",
                            p.dev,
                            bits.dtype.name(),
                            bits.size,
                            bits.dev
                        ),
                    ));
                }
                Some(layout)
            }
            (Some(_), None) => {
                return Err(CastError::value(
                    Arg::at("masks", i),
                    "a sparse parameter needs a packed mask tensor",
                ))
            }
            (None, Some(_)) => {
                return Err(CastError::value(
                    Arg::at("masks", i),
                    "a dense parameter takes no mask (pass None)",
                ))
            }
        };
        // Aliasing between any two buffers of one parameter would make the update depend on
        // evaluation order (and break the fast path's exclusive slices).
        let mut written: Vec<(&'static str, &Meta)> = vec![
            ("params", p),
            ("exp_avgs", &t.exp_avg),
            ("exp_avg_sqs", &t.exp_avg_sq),
            ("steps", &t.step),
        ];
        if let (Some(bits), Some(_)) = (&t.mask, &mask) {
            written.push(("masks", bits));
        }
        for (name, b) in written {
            if b.self_overlapping() {
                return Err(CastError::value(
                    Arg::at(name, i),
                    format!(
                        "elements overlap in memory (size {:?}, stride {:?}, e.g. an expand()ed \
                         view); it is updated in place, so it needs its own storage (.clone())",
                        b.size, b.stride
                    ),
                ));
            }
        }
        first_shared_pair(&own_buffers(t, i))?;
        let fast = (!cfg.force_generic
            && matches!(p.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
            && fast_eligible(&[p, &t.grad, &t.exp_avg, &t.exp_avg_sq], p.dtype)
            && t.mask
                .as_ref()
                .is_none_or(|b| b.contiguous && b.dev == Dev::Cpu))
        .then_some(p.dtype);
        plans.push(StepPlan {
            step,
            mask,
            fast,
            hyper: AdamsHyper {
                l1_decay: l1s[i],
                weight_decay: wds[i],
                ..cfg.hyper
            },
        });
    }
    // Across parameters too: the fast path hands out one `&mut` slice per buffer, so no two
    // buffers of the whole call may overlap.
    let fast_buffers = tensors
        .iter()
        .enumerate()
        .filter(|(i, _)| plans[*i].fast.is_some())
        .flat_map(|(i, t)| own_buffers(t, i).into_iter().map(|(a, r)| (r, a)))
        .collect();
    first_shared_sweep(fast_buffers)?;
    Ok(plans)
}

/// The data buffers of parameter `i` (the step counter is apart: it is a scalar the kernel
/// writes last, not a slice).
fn own_buffers(t: &StepMeta, i: usize) -> Vec<(Arg, (usize, usize))> {
    let mut v = vec![
        (Arg::at("params", i), t.param.range()),
        (Arg::at("grads", i), t.grad.range()),
        (Arg::at("exp_avgs", i), t.exp_avg.range()),
        (Arg::at("exp_avg_sqs", i), t.exp_avg_sq.range()),
    ];
    if let Some(b) = &t.mask {
        v.push((Arg::at("masks", i), b.range()));
    }
    v
}
