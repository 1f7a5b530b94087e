//! Tests of the fast path, by storage type: `step` the f32 step, `lowp` the bf16 / fp16
//! loops.

mod lowp;
mod step;
