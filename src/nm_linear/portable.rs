//! The portable kernel: plain Rust for any CPU (and `CAST_RS_NO_SIMD`), summing in the order
//! of the vector kernels so that every kernel gives the same bits.

use super::elem::NmElem;
use super::layout::{NmLayout, ROW_BLOCK};

/// The portable kernel: one block, `nb` batch rows, into `acc[bb · 16 + lane]`.
///
/// Every output sums its even slots and its odd slots in two separate FMA chains and adds
/// the two at the end: the order of the vector kernels, where two independent chains keep
/// the FMA unit busy at batch 1 (one chain waits out the FMA latency on every slot).
pub(super) fn block_portable<E: NmElem>(
    layout: &NmLayout,
    values: &[E],
    index: &[u32],
    xs: &[f32],
    nb: usize,
    block: usize,
    acc: &mut [f32],
) {
    let (n, m, cols, kept) = (layout.n, layout.m, layout.cols, layout.kept());
    let mut even = [0f32; ROW_BLOCK * 8];
    let mut odd = [0f32; ROW_BLOCK * 8];
    for t in 0..kept {
        let slot = block * kept + t;
        let base = (t / n) * m;
        let chain = if t % 2 == 0 { &mut even } else { &mut odd };
        for lane in 0..ROW_BLOCK {
            let w = values[layout.value_offset(E::PAIRED, block, t, lane)].to_f32();
            let c = base + layout.position(index, slot, lane);
            for bb in 0..nb {
                let a = &mut chain[bb * ROW_BLOCK + lane];
                *a = w.mul_add(xs[bb * cols + c], *a);
            }
        }
    }
    for (i, a) in acc[..nb * ROW_BLOCK].iter_mut().enumerate() {
        *a = even[i] + odd[i];
    }
}
