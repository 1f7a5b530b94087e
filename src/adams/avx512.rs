//! The sparse element loop with AVX-512 intrinsics, reading the packed mask bits directly as
//! lane masks (no unpacking). The operations and their order are exactly those of
//! `tile::sparse_tile`, so the results are bit-identical to it.
//!
//! Compiled on x86-64 only; run only where `simd::level` reports AVX-512.

use super::scalars::StepScalars;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX-512F; `grad`, `mu`, `v` must be at least `theta.len()` long
/// and `bits` at least `ceil(theta.len() / 8)` bytes.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn sparse_tile_bits(
    theta: &mut [f32],
    grad: &[f32],
    mu: &mut [f32],
    v: &mut [f32],
    bits: &[u8],
    sc: &StepScalars,
) {
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    assert!(grad.len() >= n && mu.len() >= n && v.len() >= n && bits.len() * 8 >= n);
    let (vb1c, vb2, vb2c, veps) = (
        _mm512_set1_ps(b1c),
        _mm512_set1_ps(b2),
        _mm512_set1_ps(b2c),
        _mm512_set1_ps(eps),
    );
    let (vwd, vinv, vneg, vneg_masked) = (
        _mm512_set1_ps(sc.wd_factor),
        _mm512_set1_ps(sc.inv_bc2_sqrt),
        _mm512_set1_ps(-sc.step_size),
        _mm512_set1_ps(-sc.masked_step_size),
    );
    let (v1ma, val1) = (
        _mm512_set1_ps(sc.one_minus_alpha),
        _mm512_set1_ps(sc.alpha_l1),
    );
    let (zero, neg_val1) = (_mm512_setzero_ps(), _mm512_set1_ps(-sc.alpha_l1));
    let full = n / 16;
    let (tp, gp, mp, vp) = (
        theta.as_mut_ptr(),
        grad.as_ptr(),
        mu.as_mut_ptr(),
        v.as_mut_ptr(),
    );
    for c in 0..full {
        let o = c * 16;
        // SAFETY: o + 16 <= n for every full chunk; all slices hold at least n elements
        // (asserted above) and 2c + 1 < ceil(n / 8) mask bytes.
        unsafe {
            let keep: __mmask16 =
                u16::from_le_bytes([*bits.get_unchecked(2 * c), *bits.get_unchecked(2 * c + 1)]);
            let mut th = _mm512_loadu_ps(tp.add(o));
            if decay {
                th = _mm512_mul_ps(th, vwd);
            }
            let g = _mm512_loadu_ps(gp.add(o));
            let m_old = _mm512_loadu_ps(mp.add(o));
            let m = _mm512_add_ps(m_old, _mm512_mul_ps(vb1c, _mm512_sub_ps(g, m_old)));
            _mm512_storeu_ps(mp.add(o), m);
            // sign: +1 / -1, and +0 elsewhere (±0, NaN), as `sign`.
            // αλ·sign(θ) without the multiply: ±αλ exactly, and αλ·0 == +0 because αλ
            // is finite and >= 0 (validated), so the scalar path agrees bit for bit.
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(th, zero);
            let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(th, zero);
            let sgn_l1 = _mm512_mask_blend_ps(lt, _mm512_mask_blend_ps(gt, zero, val1), neg_val1);
            let decayed = _mm512_add_ps(_mm512_mul_ps(v1ma, m), sgn_l1);
            let mt = _mm512_mask_blend_ps(keep, decayed, m);
            let vv = _mm512_add_ps(
                _mm512_mul_ps(_mm512_loadu_ps(vp.add(o)), vb2),
                _mm512_mul_ps(_mm512_mul_ps(vb2c, mt), mt),
            );
            _mm512_storeu_ps(vp.add(o), vv);
            let denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vv), vinv), veps);
            let neg_ss = _mm512_mask_blend_ps(keep, vneg_masked, vneg);
            let upd = _mm512_div_ps(_mm512_mul_ps(neg_ss, mt), denom);
            _mm512_storeu_ps(tp.add(o), _mm512_add_ps(th, upd));
        }
    }
    // Tail (< 16 elements): the scalar tile, on unpacked flags.
    let tail = full * 16;
    if tail < n {
        let mut flags = [0u8; 16];
        let flags = &mut flags[..n - tail];
        crate::nm::unpack_flags(&bits[tail / 8..], flags);
        super::tile::sparse_tile(
            &mut theta[tail..],
            &grad[tail..n],
            &mut mu[tail..n],
            &mut v[tail..n],
            flags,
            sc,
        );
    }
}
