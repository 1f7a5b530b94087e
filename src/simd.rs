//! Run-time choice of the vector instruction set.
//!
//! The kernels are plain scalar Rust, written so that LLVM can vectorise them. Compiled for
//! the baseline x86-64 target they get SSE2 only; [`dispatch`] runs a kernel inside a function
//! compiled for AVX-512 or AVX2 when the CPU has it, so the inlined loops are vectorised 16 or
//! 8 lanes wide. Every variant performs the same IEEE operations in the same order (Rust never
//! contracts `a * b + c` into an FMA; an explicit `mul_add` is one FMA instruction here and a
//! correctly rounded library call on the baseline), so results do not depend on the variant
//! that ran. The AVX2 level requires FMA and F16C too (every AVX2 CPU has them in practice).

#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest level this CPU supports (detected once).
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::env::var_os("CAST_RS_NO_SIMD").is_some() {
                Level::Baseline
            } else if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                Level::Avx512
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                Level::Avx2
            } else {
                Level::Baseline
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Baseline
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled for the best available instruction set. `f` should be a closure around
/// `#[inline(always)]` kernels so that they are inlined into the feature-enabled function.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: the CPU supports the enabled features (checked by `level`).
            Level::Avx512 => return unsafe { run_avx512(f) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { run_avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}
