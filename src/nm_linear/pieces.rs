//! Splitting the row blocks of one call over the crate's thread pool: disjoint block ranges,
//! a few per thread, each written through a raw pointer to the shared output.

use super::layout::NmLayout;

/// A raw output pointer that may cross threads (each thread writes its own row blocks).
struct OutPtr<T>(*mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: used only by `in_pieces`, whose pieces write disjoint row blocks.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    // A method (not `.0`) so that a closure captures the whole `Sync` wrapper.
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Runs `piece(b0, b1, out)` over disjoint ranges of the row blocks on the crate's thread
/// pool (torch's, in the extension), `out` pointing at `y`: a few pieces per thread, handed
/// out dynamically; the calling thread works too. One piece, on this thread, when there is
/// one thread or little work. A piece may write only the rows of its blocks.
pub(super) fn in_pieces<T: Send>(
    layout: &NmLayout,
    y: &mut [T],
    piece: impl Fn(usize, usize, *mut T) + Sync,
) {
    let blocks = layout.blocks();
    let threads = crate::parallel::num_threads().max(1);
    // Enough pieces to balance (4 per thread), each at least 4 blocks (64 rows) so that a
    // piece streams a useful stretch of the weight.
    let pieces = (threads * 4).min(blocks.div_ceil(4)).max(1);
    if pieces == 1 || threads == 1 {
        piece(0, blocks, y.as_mut_ptr());
        return;
    }
    let per = blocks.div_ceil(pieces);
    let ranges: Vec<(usize, usize)> = (0..blocks)
        .step_by(per)
        .map(|b0| (b0, (b0 + per).min(blocks)))
        .collect();
    let out = OutPtr(y.as_mut_ptr());
    crate::parallel::for_each(ranges, |(b0, b1)| piece(b0, b1, out.get()));
}
