//! The fused AdamS step on contiguous CPU slices (the fast path): f32, and bf16 / fp16
//! storage ([`StepElem`] picks each type's element loops).
//!
//! One pass over memory per tensor: each tile of a few thousand elements (whole N:M blocks)
//! first refreshes or unpacks its mask bits, then runs one vectorisable element loop that
//! updates μ, v and θ. The tile stays in L1/L2 between the two, so θ is read from RAM once.
//!
//! Per element, with keep flag m (always 1 in a dense tensor), step s, α = min(1, s / T):
//!
//! ```text
//! θ  ← θ · (1 − γ·wd)                                  (decoupled weight decay, AdamW)
//! μ  ← μ + (1 − β1)·(g − μ)                            (= β1·μ + (1 − β1)·g, as torch's lerp_)
//! μ̃  = μ                        if m = 1
//! μ̃  = (1 − α)·μ + α·λ·sign(θ)  if m = 0
//! v  ← β2·v + (1 − β2)·x²,  x = μ̃ for sparse tensors, x = g for dense ones (plain AdamW)
//! θ  ← θ − (γ / (1 − β1^s)) · μ̃ / (sqrt(v) · (1 / sqrt(1 − β2^s)) + ε)
//! ```
//!
//! The operation order mirrors `torch.optim.AdamW`'s single-tensor code so dense tensors agree
//! with it to rounding. The mask of a sparse tensor is recomputed from θ (before any update of
//! this step) when `refresh` is set.
//!
//! The step is split by job, one file each:
//!
//! * `hyper`: the hyper-parameters of one call ([`AdamsHyper`]) and their ranges, and
//!   per-tensor values ([`per_tensor`]).
//! * `scalars`: the per-tensor scalars of one step ([`StepScalars`]) and the `sign` that
//!   every element loop shares.
//! * `tile`: the f32 element loops (dense AdamW, sparse AdamS on keep flags).
//! * `avx512` (x86-64): the sparse f32 loop in AVX-512 intrinsics, on the packed mask bits.
//! * `lowp`: the element loops on bf16 / fp16 storage, in the order of torch's fused AdamW.
//! * `f16c`: fp16 tiles with the F16C conversions and AVX2/FMA intrinsics.
//! * `elem`: [`StepElem`], the loops each storage type runs.
//! * `changed_groups`: how many N:M groups changed their mask at a refresh.
//! * `driver`: [`adams_step_fused`]: the checks, the split into parallel pieces and tiles,
//!   the mask refresh.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod changed_groups;
mod driver;
mod elem;
mod f16c;
mod hyper;
mod lowp;
mod scalars;
mod tile;

pub use driver::{adams_step_fused, AdamsTensor};
pub use elem::StepElem;
pub use f16c::{f16_tile_f16c, KeepFlags};
pub use hyper::{per_tensor, AdamsHyper};
pub use lowp::{dense_tile_lp, sparse_tile_lp, LowPrecision};
pub use scalars::StepScalars;

#[cfg(test)]
mod tests;
