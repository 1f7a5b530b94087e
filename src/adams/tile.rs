//! The f32 element loops of one tile: plain AdamW for a dense tensor, AdamS with keep flags
//! (0/1 bytes) for a sparse one. Plain scalar Rust that LLVM vectorises inside
//! `simd::dispatch`; the reference the intrinsics loops must equal bit for bit.

use super::scalars::{sign, StepScalars};

/// Element loop of a dense tensor: plain AdamW.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_tile(
    theta: &mut [f32],
    grad: &[f32],
    mu: &mut [f32],
    v: &mut [f32],
    sc: &StepScalars,
) {
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    let (grad, mu, v) = (&grad[..n], &mut mu[..n], &mut v[..n]);
    for i in 0..n {
        let mut th = theta[i];
        if decay {
            th *= sc.wd_factor;
        }
        let g = grad[i];
        let m_old = mu[i];
        let m = m_old + b1c * (g - m_old);
        mu[i] = m;
        let vv = v[i] * b2 + (b2c * g) * g;
        v[i] = vv;
        let denom = vv.sqrt() * sc.inv_bc2_sqrt + eps;
        theta[i] = th + (-sc.step_size * m) / denom;
    }
}

/// Element loop of a sparse tensor: AdamS with keep flags (0/1 bytes) for this tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_tile(
    theta: &mut [f32],
    grad: &[f32],
    mu: &mut [f32],
    v: &mut [f32],
    keep: &[u8],
    sc: &StepScalars,
) {
    let (b1c, b2, b2c, eps, decay) = (sc.b1c, sc.b2, sc.b2c, sc.eps, sc.decay);
    let n = theta.len();
    let (grad, mu, v, keep) = (&grad[..n], &mut mu[..n], &mut v[..n], &keep[..n]);
    for i in 0..n {
        let mut th = theta[i];
        if decay {
            th *= sc.wd_factor;
        }
        let g = grad[i];
        let m_old = mu[i];
        let m = m_old + b1c * (g - m_old);
        mu[i] = m;
        let decayed = sc.one_minus_alpha * m + sc.alpha_l1 * sign(th);
        let (mt, ss) = if keep[i] != 0 {
            (m, sc.step_size)
        } else {
            (decayed, sc.masked_step_size)
        };
        let vv = v[i] * b2 + (b2c * mt) * mt;
        v[i] = vv;
        let denom = vv.sqrt() * sc.inv_bc2_sqrt + eps;
        theta[i] = th + (-ss * mt) / denom;
    }
}
