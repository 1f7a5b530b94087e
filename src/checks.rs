//! Argument checks of the kernel entry points, on tensor *metadata* ([`Meta`]): dtypes,
//! shapes, devices, memory ranges. Pure Rust (no libtorch, no Python), so `cargo test`
//! covers every rule; the entry points (`ops`, used by both the pyo3 functions and the C ABI
//! of the `csrc/` operators) describe their tensors as [`Meta`] and call these functions
//! before touching any data. Everything is checked before anything is written.
//!
//! The order of the checks is part of the contract: with several problems in one call, the
//! first one reported is stable (the hostile-input tests pin the messages).

use crate::adams::{per_tensor, AdamsHyper};
use crate::error::{Arg, CastError, Result};
use crate::nm::{packed_len, GroupDim, GroupLayout, NmPattern};
use crate::scaling::{ScaleLayout, ScaleShape};

/// A tensor's element type, as far as the checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    BF16,
    U8,
    I8,
    I16,
    I32,
    I64,
    Bool,
    Other,
}

impl Dtype {
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::BF16)
    }

    /// The torch spelling, as users see it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "torch.float32",
            Dtype::F64 => "torch.float64",
            Dtype::F16 => "torch.float16",
            Dtype::BF16 => "torch.bfloat16",
            Dtype::U8 => "torch.uint8",
            Dtype::I8 => "torch.int8",
            Dtype::I16 => "torch.int16",
            Dtype::I32 => "torch.int32",
            Dtype::I64 => "torch.int64",
            Dtype::Bool => "torch.bool",
            Dtype::Other => "an unsupported dtype",
        }
    }
}

/// A tensor's device. (`Debug` prints as libtorch's Rust binding does: `Cpu`, `Cuda(0)`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    Cpu,
    Cuda(usize),
    Mps,
    Vulkan,
}

/// What the checks need to know about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub dtype: Dtype,
    pub dev: Dev,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
    /// Address of the first element, and `numel × element size` bytes from there.
    pub start: usize,
    pub nbytes: usize,
    pub contiguous: bool,
    pub sparse: bool,
}

impl Meta {
    /// The byte range `[start, start + nbytes)` used by the aliasing checks.
    pub fn range(&self) -> (usize, usize) {
        (self.start, self.start + self.nbytes)
    }

    /// True when two elements may share memory (an `expand()`ed view, a stride-0 or
    /// interleaved layout): an in-place update would then depend on evaluation order.
    /// Sufficient test: with the dims of size > 1 sorted by stride, each stride must reach
    /// past the previous dim's whole extent. (A few exotic non-overlapping layouts are
    /// refused too.)
    pub fn self_overlapping(&self) -> bool {
        let mut dims: Vec<(i64, i64)> = self
            .stride
            .iter()
            .copied()
            .zip(self.size.iter().copied())
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
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 != a.1 && b.0 != b.1
}

/// True when every tensor is a contiguous CPU tensor of `dtype`: the slice kernels' input.
pub fn fast_eligible(ts: &[&Meta], dtype: Dtype) -> bool {
    ts.iter()
        .all(|t| t.dev == Dev::Cpu && t.dtype == dtype && t.contiguous)
}

/// The first pair of buffers that share memory, checking every pair in the listed order
/// (used within one parameter, where the list is short). The later buffer is blamed.
pub fn first_shared_pair(bufs: &[(Arg, (usize, usize))]) -> Result<()> {
    for a in 0..bufs.len() {
        for b in a + 1..bufs.len() {
            if overlaps(bufs[a].1, bufs[b].1) {
                return Err(CastError::aliased(bufs[b].0.clone(), bufs[a].0.clone()));
            }
        }
    }
    Ok(())
}

/// Whether any two of many buffers share memory, by a sweep over the ranges sorted by start
/// (O(n log n), for all the buffers of a call). Empty ranges never overlap.
pub fn first_shared_sweep(mut bufs: Vec<((usize, usize), Arg)>) -> Result<()> {
    bufs.retain(|(r, _)| r.0 != r.1);
    bufs.sort_by_key(|b| b.0);
    let mut reach: Option<&((usize, usize), Arg)> = None;
    for r in &bufs {
        if let Some(prev) = reach {
            if r.0 .0 < prev.0 .1 {
                return Err(CastError::aliased(r.1.clone(), prev.1.clone()));
            }
        }
        if reach.is_none_or(|p| r.0 .1 > p.0 .1) {
            reach = Some(r);
        }
    }
    Ok(())
}

/// `(n, m)` and `dim` against a tensor of `shape`; every value error is blamed on `param`
/// (the tensor), as the group dimension is a property of it.
pub fn pattern_layout(
    n: i64,
    m: i64,
    dim: i64,
    shape: &[i64],
    param: &Arg,
) -> Result<(NmPattern, GroupDim, GroupLayout)> {
    let pattern = NmPattern::new(n, m)?;
    let gdim = GroupDim::from_dim(dim, shape.len()).map_err(|e| e.for_param(param))?;
    let layout = GroupLayout::new(pattern, shape, gdim, &param.to_string())
        .map_err(|e| e.for_param(param))?;
    Ok((pattern, gdim, layout))
}

/// `nm_mask(x, n, m, dim)`: a floating tensor whose group dimension M divides.
pub fn mask_args(x: &Meta, n: i64, m: i64, dim: i64) -> Result<(NmPattern, GroupDim, GroupLayout)> {
    if !x.dtype.is_float() {
        return Err(CastError::type_(
            "x",
            format!(
                "expected a floating-point tensor, got dtype {}",
                x.dtype.name()
            ),
        ));
    }
    pattern_layout(n, m, dim, &x.size, &Arg::from("x"))
}

/// `unpack_mask(bits, shape)`: `bits` holds `ceil(numel / 8)` bytes.
pub fn unpack_args(bits: &Meta, shape: &[i64]) -> Result<()> {
    if bits.dtype != Dtype::U8 {
        return Err(CastError::type_(
            "bits",
            format!("expected a uint8 tensor, got {}", bits.dtype.name()),
        ));
    }
    if shape.iter().any(|&d| d < 0) {
        return Err(CastError::value(
            "shape",
            format!("dimensions must be >= 0, got {shape:?}"),
        ));
    }
    let numel: i64 = shape.iter().product();
    let want = packed_len(numel as usize) as i64;
    if bits.size != [want] {
        return Err(CastError::value(
            "bits",
            format!(
                "expected a 1-d tensor of {want} bytes for shape {shape:?}, got shape {:?}",
                bits.size
            ),
        ));
    }
    Ok(())
}

/// Weight scaling `W · A`: `dim` -1 (`[out, in]`) or 0 (`[in, out]`), `A` of shape
/// `[rows, groups]`, one floating dtype and one device.
pub fn scale_args(w: &Meta, a: &Meta, groups: i64, dim: i64) -> Result<ScaleShape> {
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
    let s = ScaleShape::new(&w.size, groups, layout)?;
    if a.size != [s.rows as i64, s.groups as i64] {
        return Err(CastError::value(
            "scale",
            format!(
                "expected shape [{}, {}], got {:?}",
                s.rows, s.groups, a.size
            ),
        ));
    }
    if !w.dtype.is_float() || a.dtype != w.dtype {
        return Err(CastError::type_(
            "scale",
            format!(
                "expected floating tensors of one dtype, got weight {} and scale {}",
                w.dtype.name(),
                a.dtype.name()
            ),
        ));
    }
    if a.dev != w.dev {
        return Err(CastError::value(
            "scale",
            format!(
                "expected device {:?} (the weight's), got {:?}",
                w.dev, a.dev
            ),
        ));
    }
    Ok(s)
}

/// The incoming gradient of weight scaling: the weight's shape, dtype and device.
pub fn scale_grad_args(g: &Meta, w: &Meta) -> Result<()> {
    if g.size != w.size || g.dtype != w.dtype || g.dev != w.dev {
        return Err(CastError::value(
            "grad",
            format!(
                "expected the weight's shape {:?} and dtype {}, got {:?} {}",
                w.size,
                w.dtype.name(),
                g.size,
                g.dtype.name()
            ),
        ));
    }
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A contiguous tensor of `size` at address `start`.
    fn meta(dtype: Dtype, size: &[i64], start: usize) -> Meta {
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1].max(1);
        }
        let elt = match dtype {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            _ => 1,
        };
        Meta {
            dtype,
            dev: Dev::Cpu,
            size: size.to_vec(),
            stride,
            start,
            nbytes: size.iter().product::<i64>() as usize * elt,
            contiguous: true,
            sparse: false,
        }
    }

    fn cfg() -> StepConfig {
        StepConfig {
            hyper: AdamsHyper {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                l1_decay: 0.1,
                masked_lr_scale: 1.0,
            },
            total_steps: Some(100.0),
            mask_interval: 1,
            l1_decays: None,
            weight_decays: None,
            force_generic: false,
        }
    }

    /// A sparse 2:4 parameter of shape [4, 8] whose buffers start at `base`, 1 KiB apart.
    fn sparse(base: usize) -> StepMeta {
        StepMeta {
            param: meta(Dtype::F32, &[4, 8], base),
            grad: meta(Dtype::F32, &[4, 8], base + 1024),
            exp_avg: meta(Dtype::F32, &[4, 8], base + 2048),
            exp_avg_sq: meta(Dtype::F32, &[4, 8], base + 3072),
            mask: Some(meta(Dtype::U8, &[4], base + 4096)),
            pattern: Some((2, 4, -1)),
            step: meta(Dtype::F32, &[], base + 5120),
            steps_done: Some(0.0),
        }
    }

    fn err(r: Result<Vec<StepPlan>>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn a_valid_call_plans_the_fast_path_and_step_one() {
        let plans = step_args(&cfg(), &[sparse(0), sparse(1 << 20)]).unwrap();
        assert_eq!(plans.len(), 2);
        assert!(plans
            .iter()
            .all(|p| p.fast == Some(Dtype::F32) && p.step == 1.0 && p.mask.is_some()));
        let mut c = cfg();
        c.force_generic = true;
        assert!(step_args(&c, &[sparse(0)])
            .unwrap()
            .iter()
            .all(|p| p.fast.is_none()));
    }

    #[test]
    fn sixteen_bit_params_take_their_fast_path_and_others_the_generic_one() {
        for (d, want) in [
            (Dtype::BF16, Some(Dtype::BF16)),
            (Dtype::F16, Some(Dtype::F16)),
            (Dtype::F64, None),
        ] {
            let mut t = sparse(0);
            for m in [&mut t.param, &mut t.grad, &mut t.exp_avg, &mut t.exp_avg_sq] {
                *m = meta(d, &[4, 8], m.start);
            }
            assert_eq!(
                step_args(&cfg(), &[t.clone()]).unwrap()[0].fast,
                want,
                "{d:?}"
            );
            // A state buffer in another dtype is an error, not a silent generic step.
            t.exp_avg = meta(Dtype::F32, &[4, 8], t.exp_avg.start);
            assert!(err(step_args(&cfg(), &[t])).contains("exp_avgs"));
        }
    }

    #[test]
    fn per_parameter_errors_carry_the_argument_and_index() {
        let mut t = sparse(0);
        t.grad.dtype = Dtype::F64;
        let e = step_args(&cfg(), &[sparse(1 << 20), t]).unwrap_err();
        assert_eq!(e.param(), Some(&Arg::at("grads", 1)));
        assert!(e
            .to_string()
            .contains("expected dtype torch.float32 (the parameter's), got torch.float64"));

        let mut t = sparse(0);
        t.exp_avg_sq.size = vec![4, 4];
        assert!(err(step_args(&cfg(), &[t])).starts_with("exp_avg_sqs[0]: expected shape [4, 8]"));

        let mut t = sparse(0);
        t.mask = None;
        assert_eq!(
            err(step_args(&cfg(), &[t])),
            "masks[0]: a sparse parameter needs a packed mask tensor"
        );

        let mut t = sparse(0);
        t.steps_done = None;
        assert!(err(step_args(&cfg(), &[t])).starts_with("steps[0]: expected a one-element"));
    }

    #[test]
    fn the_pattern_is_checked_against_the_parameter() {
        let mut t = sparse(0);
        t.pattern = Some((2, 3, -1));
        assert!(err(step_args(&cfg(), &[t]))
            .starts_with("params[0]: 2:3 groups run along the last dimension"));
        let mut t = sparse(0);
        t.pattern = Some((2, 4, 1)); // dim 1 of a 2-d tensor is its last: fine
        assert!(step_args(&cfg(), &[t]).is_ok());
        let mut t = sparse(0);
        t.pattern = Some((4, 4, -1));
        assert!(err(step_args(&cfg(), &[t])).starts_with("pattern: N must satisfy"));
        let mut c = cfg();
        c.total_steps = None;
        assert!(err(step_args(&c, &[sparse(0)])).starts_with("total_steps: required for sparse"));
    }

    #[test]
    fn aliasing_within_and_across_parameters_is_refused() {
        let mut t = sparse(0);
        t.exp_avg.start = t.param.start + 16; // overlaps params[0]
        let e = step_args(&cfg(), &[t]).unwrap_err();
        assert_eq!(
            e,
            CastError::aliased(Arg::at("exp_avgs", 0), Arg::at("params", 0))
        );

        // Parameter 1's gradient overlaps parameter 0's exp_avg: only the sweep sees it.
        let a = sparse(0);
        let mut b = sparse(1 << 20);
        b.grad.start = a.exp_avg.start + 64;
        let e = step_args(&cfg(), &[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(
            e,
            CastError::aliased(Arg::at("grads", 1), Arg::at("exp_avgs", 0))
        );
        // The generic path works on whole tensors, not slices: not refused there.
        let mut c = cfg();
        c.force_generic = true;
        assert!(step_args(&c, &[a, b]).is_ok());
    }

    #[test]
    fn self_overlapping_layouts_are_refused_for_written_buffers() {
        let mut t = sparse(0);
        t.exp_avg.stride = vec![0, 1]; // expand()ed rows
        assert!(err(step_args(&cfg(), &[t])).starts_with("exp_avgs[0]: elements overlap in memory"));
        // A read-only gradient may be expanded.
        let mut t = sparse(0);
        t.grad.stride = vec![0, 1];
        t.grad.contiguous = false;
        assert!(step_args(&cfg(), &[t]).is_ok());
        let transposed = Meta {
            stride: vec![1, 4],
            ..meta(Dtype::F32, &[4, 8], 0)
        };
        assert!(!transposed.self_overlapping());
    }

    #[test]
    fn scalar_arguments_and_list_lengths() {
        let mut c = cfg();
        c.mask_interval = 0;
        assert!(err(step_args(&c, &[sparse(0)])).starts_with("mask_interval:"));
        let mut c = cfg();
        c.total_steps = Some(0.5);
        assert!(err(step_args(&c, &[sparse(0)])).starts_with("total_steps: expected a number >= 1"));
        let mut c = cfg();
        c.l1_decays = Some(vec![0.1, -1.0]);
        assert!(err(step_args(&c, &[sparse(0), sparse(1 << 20)])).starts_with("l1_decays[1]:"));
        assert_eq!(
            step_call_args(&cfg(), 2, &[("grads", 1)])
                .unwrap_err()
                .to_string(),
            "grads: expected 2 entries (one per parameter), got 1"
        );
        let mut c = cfg();
        c.hyper.beta1 = 1.0;
        assert!(err(step_args(&c, &[sparse(0)])).starts_with("betas[0]:"));
    }

    #[test]
    fn sweep_finds_overlaps_regardless_of_order() {
        let r = |s: usize, e: usize, i: usize| ((s, e), Arg::at("params", i));
        assert!(first_shared_sweep(vec![r(0, 10, 0), r(20, 30, 1), r(10, 20, 2)]).is_ok());
        // A long range hiding a later short one.
        let e = first_shared_sweep(vec![r(0, 100, 0), r(10, 20, 1), r(50, 60, 2)]).unwrap_err();
        assert_eq!(
            e,
            CastError::aliased(Arg::at("params", 1), Arg::at("params", 0))
        );
        assert!(first_shared_sweep(vec![r(5, 5, 0), r(0, 10, 1)]).is_ok());
    }

    #[test]
    fn mask_unpack_and_scale_arguments() {
        let x = meta(Dtype::I64, &[4, 8], 0);
        assert_eq!(
            mask_args(&x, 2, 4, -1).unwrap_err().to_string(),
            "x: expected a floating-point tensor, got dtype torch.int64"
        );
        let x = meta(Dtype::BF16, &[4, 8], 0);
        assert!(mask_args(&x, 2, 4, 0).is_ok());
        assert!(mask_args(&x, 2, 8, 0)
            .unwrap_err()
            .to_string()
            .starts_with("x: 2:8 groups run along the dimension 0"));
        assert!(mask_args(&x, 2, 4, 5)
            .unwrap_err()
            .to_string()
            .starts_with("x: groups run along"));

        assert!(unpack_args(&meta(Dtype::U8, &[4], 0), &[4, 8]).is_ok());
        assert!(unpack_args(&meta(Dtype::U8, &[5], 0), &[4, 8])
            .unwrap_err()
            .to_string()
            .starts_with("bits: expected a 1-d tensor of 4 bytes"));
        assert!(unpack_args(&meta(Dtype::Bool, &[4], 0), &[4, 8])
            .unwrap_err()
            .to_string()
            .starts_with("bits: expected a uint8"));

        let w = meta(Dtype::F32, &[6, 8], 0);
        let s = scale_args(&w, &meta(Dtype::F32, &[6, 2], 0), 2, -1).unwrap();
        assert_eq!((s.rows, s.cols, s.groups), (6, 8, 2));
        let s = scale_args(&w, &meta(Dtype::F32, &[8, 3], 0), 3, 0).unwrap();
        assert_eq!((s.rows, s.cols, s.groups), (8, 6, 3));
        assert!(scale_args(&w, &meta(Dtype::F64, &[6, 2], 0), 2, -1)
            .unwrap_err()
            .to_string()
            .starts_with("scale: expected floating tensors of one dtype"));
        assert!(scale_args(&w, &meta(Dtype::F32, &[6, 2], 0), 2, 2)
            .unwrap_err()
            .to_string()
            .starts_with("dim:"));
        assert!(scale_args(&w, &meta(Dtype::F32, &[6, 3], 0), 3, -1)
            .unwrap_err()
            .to_string()
            .starts_with("groups:"));
        assert!(scale_grad_args(&meta(Dtype::F32, &[8, 6], 0), &w)
            .unwrap_err()
            .to_string()
            .starts_with("grad:"));
    }
}
