//! [`StepElem`]: which element loops each storage type of the fast path runs (f32: the
//! loops of `tile`, or `avx512` on packed bits; bf16: `lowp`; fp16: `f16c`, then `lowp` for
//! the tail), so that the driver is written once for all of them.

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::f16c::{f16_tile_f16c, KeepFlags};
use super::lowp::{dense_tile_lp, sparse_tile_lp};
use super::scalars::StepScalars;
use super::tile::{dense_tile, sparse_tile};
use crate::nm::{Bf16Bits, F16Bits, MaskKey};

/// An element type of the fast path: its element loops. The mask of a sparse tensor is
/// computed from θ through [`MaskKey`] (the magnitude order, on the stored values).
pub trait StepElem: MaskKey {
    fn dense_tile(
        theta: &mut [Self],
        grad: &[Self],
        mu: &mut [Self],
        v: &mut [Self],
        sc: &StepScalars,
    );
    fn sparse_tile(
        theta: &mut [Self],
        grad: &[Self],
        mu: &mut [Self],
        v: &mut [Self],
        keep: &[u8],
        sc: &StepScalars,
    );
    /// The sparse loop reading the packed mask bits directly, where a specialised one exists
    /// and the CPU runs it; `false` (nothing done) otherwise.
    #[inline(always)]
    fn sparse_tile_bits(
        _theta: &mut [Self],
        _grad: &[Self],
        _mu: &mut [Self],
        _v: &mut [Self],
        _bits: &[u8],
        _sc: &StepScalars,
    ) -> bool {
        false
    }
}

impl StepElem for f32 {
    #[inline(always)]
    fn dense_tile(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        sc: &StepScalars,
    ) {
        dense_tile(theta, grad, mu, v, sc)
    }
    #[inline(always)]
    fn sparse_tile(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        keep: &[u8],
        sc: &StepScalars,
    ) {
        sparse_tile(theta, grad, mu, v, keep, sc)
    }
    #[inline(always)]
    fn sparse_tile_bits(
        theta: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        v: &mut [f32],
        bits: &[u8],
        sc: &StepScalars,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::level() == crate::simd::Level::Avx512 {
            // SAFETY: AVX-512F is present (checked by `simd::level`); the slice and mask
            // lengths it reads are asserted inside it.
            unsafe { avx512::sparse_tile_bits(theta, grad, mu, v, bits, sc) };
            return true;
        }
        let _ = (theta, grad, mu, v, bits, sc);
        false
    }
}

impl StepElem for Bf16Bits {
    #[inline(always)]
    fn dense_tile(
        theta: &mut [Bf16Bits],
        grad: &[Bf16Bits],
        mu: &mut [Bf16Bits],
        v: &mut [Bf16Bits],
        sc: &StepScalars,
    ) {
        dense_tile_lp(theta, grad, mu, v, sc)
    }
    #[inline(always)]
    fn sparse_tile(
        theta: &mut [Bf16Bits],
        grad: &[Bf16Bits],
        mu: &mut [Bf16Bits],
        v: &mut [Bf16Bits],
        keep: &[u8],
        sc: &StepScalars,
    ) {
        sparse_tile_lp(theta, grad, mu, v, keep, sc)
    }
}

impl StepElem for F16Bits {
    // F16C converts 8 values per instruction where the portable conversion takes about ten
    // operations per value; the tail (and a CPU without F16C) uses the portable loops.
    #[inline(always)]
    fn dense_tile(
        theta: &mut [F16Bits],
        grad: &[F16Bits],
        mu: &mut [F16Bits],
        v: &mut [F16Bits],
        sc: &StepScalars,
    ) {
        let d = f16_tile_f16c(theta, grad, mu, v, KeepFlags::Dense, sc);
        dense_tile_lp(&mut theta[d..], &grad[d..], &mut mu[d..], &mut v[d..], sc)
    }
    #[inline(always)]
    fn sparse_tile(
        theta: &mut [F16Bits],
        grad: &[F16Bits],
        mu: &mut [F16Bits],
        v: &mut [F16Bits],
        keep: &[u8],
        sc: &StepScalars,
    ) {
        let d = f16_tile_f16c(theta, grad, mu, v, KeepFlags::Bytes(keep), sc);
        sparse_tile_lp(
            &mut theta[d..],
            &grad[d..],
            &mut mu[d..],
            &mut v[d..],
            &keep[d..],
            sc,
        )
    }
    /// The F16C loop reads the packed bits as lane masks (no unpacking pass); the tail of
    /// fewer than 8 elements takes the portable loop with its flags unpacked.
    #[inline(always)]
    fn sparse_tile_bits(
        theta: &mut [F16Bits],
        grad: &[F16Bits],
        mu: &mut [F16Bits],
        v: &mut [F16Bits],
        bits: &[u8],
        sc: &StepScalars,
    ) -> bool {
        if crate::simd::level() == crate::simd::Level::Baseline {
            return false;
        }
        let n = theta.len();
        let d = f16_tile_f16c(theta, grad, mu, v, KeepFlags::Bits(bits), sc);
        if d < n {
            // Fewer than 8 flags (d is a multiple of 8): unpacked on the stack.
            let mut tail = [0u8; 8];
            for (i, flag) in (d..n).zip(tail.iter_mut()) {
                *flag = (bits[i / 8] >> (i % 8)) & 1;
            }
            sparse_tile_lp(
                &mut theta[d..],
                &grad[d..],
                &mut mu[d..],
                &mut v[d..],
                &tail[..n - d],
                sc,
            );
        }
        true
    }
}
