//! cast-rs: the Rust core of CAST (Continuous Adaptive Sparse Trainer) for PyTorch.
//!
//! * [`nm`]: N:M masks (selection, packing) on plain slices.
//! * [`nm_linear`]: compressed N:M weights and the CPU kernels of an N:M linear layer
//!   (`layout`, `pack`, `check`, `dispatch`, and the `portable` and `x86` kernels).
//! * [`adams`]: the fused AdamS optimizer step on contiguous f32, bf16 and fp16 slices
//!   (`hyper`, `scalars`, the element loops `tile` / `avx512` / `lowp` / `f16c`, `driver`).
//! * [`scaling`]: weight scaling `W · A` and the gradient of the scale, on slices.
//! * `generic` (feature `python`): the same kernels from tch tensor ops, for any dtype/device.
//! * [`half`]: bf16 / fp16 ⇄ f32 conversions, bit-exact with torch's (for the fused bf16 path).
//! * [`checks`]: every argument rule of the entry points, on tensor metadata (pure Rust):
//!   `meta`, `aliasing`, `mask`, `scale`, `step`.
//! * `ops` (feature `python`): the entry points on libtorch tensors (check, pick the path, run);
//!   `nm_ops`: those of the compressed N:M layers.
//! * `bindings` (feature `python`): the thin pyo3 layer, `cast_rs._cast_rs`.
//! * `capi` (feature `python`): the C ABI that the `csrc/` PyTorch operators call.
//! * [`error`]: the error type every entry point returns; [`simd`] and [`parallel`]: the
//!   run-time choice of vector instructions and the thread pool the kernels run on.
//!
//! The slice kernels know nothing of Python or libtorch, so `cargo test` runs them without
//! either (the default build has no `python` feature).

pub mod adams;
pub mod checks;
pub mod error;
pub mod half;
pub mod nm;
pub mod nm_linear;
pub mod parallel;
pub mod scaling;
pub mod simd;

#[cfg(feature = "python")]
mod bindings;
#[cfg(feature = "python")]
mod capi;
#[cfg(feature = "python")]
pub mod generic;
#[cfg(feature = "python")]
mod nm_ops;
#[cfg(feature = "python")]
pub mod ops;
#[cfg(feature = "python")]
mod py_error;
