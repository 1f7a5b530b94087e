//! The hyper-parameters of one AdamS step call (one param group) and the ranges they must
//! lie in, checked before any buffer is touched; and the per-tensor values (λ, weight decay)
//! that may replace the group's.

use crate::error::{Arg, CastError, Result};

/// Hyper-parameters shared by every tensor of one call (one param group).
#[derive(Debug, Clone, Copy)]
pub struct AdamsHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// λ, the L1 decay target of masked-out weights.
    pub l1_decay: f64,
    /// r: a masked-out weight's step is r times a kept weight's (lr·r instead of lr). 1 is
    /// the paper's AdamS; r > 1 lets the masked weights reach zero sooner while the kept
    /// weights keep the gentler rate (the study behind it: docs/sparsity_tax.md).
    pub masked_lr_scale: f64,
}

impl AdamsHyper {
    /// The order in which a caller hands the hyperparameters over as one list of numbers
    /// ([`AdamsHyper::from_values`]): the operator `adams_step_` takes them as `float[] hyper`
    /// and the Python optimizer builds that list from these names, so a new hyperparameter is
    /// added here (and in the kernels that use it), not in every layer between.
    pub const FIELDS: [&'static str; 7] = [
        "lr",
        "beta1",
        "beta2",
        "eps",
        "weight_decay",
        "l1_decay",
        "masked_lr_scale",
    ];

    /// The hyperparameters from `values`, in the order of [`AdamsHyper::FIELDS`], checked
    /// ([`AdamsHyper::validate`]).
    pub fn from_values(values: &[f64]) -> Result<Self> {
        let [lr, beta1, beta2, eps, weight_decay, l1_decay, masked_lr_scale] =
            <[f64; 7]>::try_from(values).map_err(|_| {
                CastError::value(
                    "hyper",
                    format!(
                        "expected {} values ({}), got {}",
                        Self::FIELDS.len(),
                        Self::FIELDS.join(", "),
                        values.len()
                    ),
                )
            })?;
        let h = AdamsHyper {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            l1_decay,
            masked_lr_scale,
        };
        h.validate()?;
        Ok(h)
    }

    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |name: &'static str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(CastError::value(
                    name,
                    format!("expected a finite value >= 0, got {x}"),
                ))
            }
        };
        finite_nonneg("lr", self.lr)?;
        finite_nonneg("eps", self.eps)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("l1_decay", self.l1_decay)?;
        if !(self.masked_lr_scale.is_finite() && self.masked_lr_scale > 0.0) {
            return Err(CastError::value(
                "masked_lr_scale",
                format!("expected a finite value > 0, got {}", self.masked_lr_scale),
            ));
        }
        for (name, b) in [("betas[0]", self.beta1), ("betas[1]", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(CastError::value(
                    name,
                    format!("expected a value in [0, 1), got {b}"),
                ));
            }
        }
        Ok(())
    }
}

/// One hyperparameter per tensor, for `k` tensors: `values` (one finite value >= 0 each) when
/// given, else the group's `default` for all. `name` is the argument's name in errors, which
/// name the offending entry (AdamS's relative λ: `l1_decays`; weight-scale parameters, which
/// take no weight decay: `weight_decays`).
pub fn per_tensor(
    name: &'static str,
    values: Option<Vec<f64>>,
    default: f64,
    k: usize,
) -> Result<Vec<f64>> {
    match values {
        None => Ok(vec![default; k]),
        Some(v) => {
            if v.len() != k {
                return Err(CastError::value(
                    name,
                    format!("expected {k} entries (one per parameter), got {}", v.len()),
                ));
            }
            for (i, &x) in v.iter().enumerate() {
                if !(x.is_finite() && x >= 0.0) {
                    return Err(CastError::value(
                        Arg::at(name, i),
                        format!("expected a finite value >= 0, got {x}"),
                    ));
                }
            }
            Ok(v)
        }
    }
}
