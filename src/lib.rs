//! cast-rs: the Rust core of CAST (Continuous Adaptive Sparse Trainer) for PyTorch.
//!
//! * [`nm`]: N:M masks (selection, packing) on plain slices.
//! * [`adams`]: the fused AdamS optimizer step on contiguous `f32` slices.
//! * `generic` (feature `python`): the same kernels from tch tensor ops, for any dtype/device.
//! * `bindings` (feature `python`): the thin pyo3 layer, `cast_rs._cast_rs`.
//!
//! The slice kernels know nothing of Python or libtorch, so `cargo test` runs them without
//! either (the default build has no `python` feature).

pub mod adams;
pub mod error;
pub mod nm;
pub mod parallel;
pub mod scaling;
pub mod simd;

#[cfg(feature = "python")]
mod bindings;
#[cfg(feature = "python")]
pub mod generic;
