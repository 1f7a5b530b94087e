//! Argument checks of the kernel entry points, on tensor *metadata* ([`Meta`]): dtypes,
//! shapes, devices, memory ranges. Pure Rust (no libtorch, no Python), so `cargo test`
//! covers every rule; the entry points (`ops`, used by both the pyo3 functions and the C ABI
//! of the `csrc/` operators) describe their tensors as [`Meta`] and call these functions
//! before touching any data. Everything is checked before anything is written.
//!
//! The order of the checks is part of the contract: with several problems in one call, the
//! first one reported is stable (the hostile-input tests pin the messages).
//!
//! One file per kind of rule:
//!
//! * `meta`: what the checks know of a tensor ([`Meta`], [`Dtype`], [`Dev`]), and which
//!   tensors the slice kernels take ([`fast_eligible`]).
//! * `aliasing`: buffers that share memory ([`first_shared_pair`], [`first_shared_sweep`]).
//! * `mask`: the N:M pattern against a tensor, `nm_mask` and `unpack_mask`.
//! * `scale`: weight scaling and its gradient.
//! * `step`: an AdamS step call, from its scalars to each parameter's [`StepPlan`].

mod aliasing;
mod mask;
mod meta;
mod scale;
mod step;

pub use aliasing::{first_shared_pair, first_shared_sweep};
pub use mask::{mask_args, pattern_layout, unpack_args};
pub use meta::{fast_eligible, Dev, Dtype, Meta};
pub use scale::{scale_args, scale_grad_args};
pub use step::{step_args, step_call_args, step_plans, StepConfig, StepMeta, StepPlan};

#[cfg(test)]
mod tests;
