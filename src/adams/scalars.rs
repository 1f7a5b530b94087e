//! The scalars of one step of one tensor, derived once from the hyper-parameters and the step
//! number, and the `sign` of θ: what every element loop (f32, bf16 / fp16, the intrinsics)
//! reads, so they live apart from any one loop.

use super::hyper::AdamsHyper;

/// Per-tensor scalars of one step, derived once from the step number.
#[derive(Debug, Clone, Copy)]
pub struct StepScalars {
    pub step_size: f32,
    /// The step size of masked-out weights: lr·r / (1 − β1^s). Equal to `step_size` bit for
    /// bit when r = 1 (lr·1 is lr exactly), so the paper's update is unchanged.
    pub masked_step_size: f32,
    /// 1 / sqrt(1 − β2^s): a multiply instead of a per-element divide (within 1 ulp of
    /// torch's `sqrt(v) / bias_correction2_sqrt`).
    pub inv_bc2_sqrt: f32,
    /// sqrt(1 − β2^s), for the 16-bit loops, which divide as torch's fused kernel does.
    pub bc2_sqrt: f32,
    pub wd_factor: f32,
    /// α·λ and 1 − α for the decay of masked-out weights.
    pub alpha_l1: f32,
    pub one_minus_alpha: f32,
    pub refresh: bool,
    /// Step-independent constants of the element loops, in the loops' f32.
    pub b1c: f32,
    pub b2: f32,
    pub b2c: f32,
    pub eps: f32,
    /// Whether decoupled weight decay is on (`wd_factor` applies).
    pub decay: bool,
}

impl StepScalars {
    /// `step` is s (already incremented, ≥ 1). `total_steps`/`mask_interval` matter only for
    /// sparse tensors.
    pub fn new(h: &AdamsHyper, step: f64, total_steps: Option<f64>, mask_interval: u64) -> Self {
        let bc1 = 1.0 - h.beta1.powf(step);
        let bc2 = 1.0 - h.beta2.powf(step);
        let alpha = match total_steps {
            Some(t) if t > 0.0 => (step / t).min(1.0),
            _ => 1.0,
        };
        let s = step.max(1.0) as u64;
        StepScalars {
            step_size: (h.lr / bc1) as f32,
            masked_step_size: (h.lr * h.masked_lr_scale / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            wd_factor: (1.0 - h.lr * h.weight_decay) as f32,
            alpha_l1: (alpha * h.l1_decay) as f32,
            one_minus_alpha: (1.0 - alpha) as f32,
            refresh: mask_interval > 0 && (s - 1).is_multiple_of(mask_interval),
            b1c: (1.0 - h.beta1) as f32,
            b2: h.beta2 as f32,
            b2c: (1.0 - h.beta2) as f32,
            eps: h.eps as f32,
            decay: h.weight_decay != 0.0,
        }
    }
}

#[inline(always)]
pub(crate) fn sign(x: f32) -> f32 {
    // As torch.sign (which the generic path uses): +1, -1, and +0 for ±0 and for NaN.
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
