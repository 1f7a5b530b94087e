"""Finalized weights stay N:M while the model is trained further (fine-tuning after CAST).

After :meth:`cast_rs.SparseModel.finalize` the masked weights are exactly zero, but nothing in
an optimizer knows that: Adam's momentum left over from sparse training, or any gradient at a
pruned position, moves them again, and one more ``step()`` used to break every group. The
guard that ``finalize`` installs keeps each finalized weight's mask fixed:

* after every optimizer step of **any** ``torch.optim.Optimizer`` (AdamS included), through
  torch's global step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``),
  the masked weights are set back to exactly 0. This covers what a gradient mask cannot:
  optimizer state from before ``finalize``, decay terms, an optimizer the user wrote.
* when a gradient is accumulated into a guarded weight (a plain tensor; FSDP2's sharded
  DTensor weights rely on the step hook alone), its masked entries are zeroed, so gradient
  clipping, logged gradient norms and new optimizer moments see the sparse model, and a
  hand-written update ``w -= lr * w.grad`` keeps the zeros too.

Masks are stored packed, one bit per weight (as AdamS's state), and unpacked for each use:
a transient bool tensor per layer, instead of a resident byte per weight.

:meth:`cast_rs.SparseModel.release_mask` removes the guard (the weights may then become dense
again). The guard holds its weights weakly; once they are all gone it drops its masks at the
next optimizer step and its hook is removed when another guard is created. Not
covered: a ``copy.deepcopy`` of a finalized model or a fresh model loaded with finalized
weights (their parameters are new objects); :func:`cast_rs.keep_nm` guards those.
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _dtensor
from .nm import nm_mask_packed, unpack_mask


def _grad_hook(bits: torch.Tensor) -> Callable[[torch.Tensor], None]:
    # A closure over the packed mask only: the parameter owns the hook, and the hook must not
    # keep the guard (or the parameter) alive.
    @torch.compiler.disable
    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            p.grad.masked_fill_(~unpack_mask(bits, p.grad.shape), 0)

    return hook


class MaskGuard:
    """Keeps the given weights at their current N:M support (see the module docstring).

    ``layers``: ``(weight, (n, m), dim)`` for each finalized weight; its mask is taken from the
    weight as it is now (exactly N:M after ``finalize``), per local shard for a DTensor."""

    def __init__(self, layers: List[Tuple[torch.Tensor, Tuple[int, int], int]]) -> None:
        _remove_inert_guards()
        self._entries: List[Tuple["weakref.ref[torch.Tensor]", torch.Tensor]] = []
        self._handles = []
        for w, pattern, dim in layers:
            local = _dtensor.local(w.detach())
            if local.numel() == 0:  # an FSDP2 rank can hold an empty shard
                continue
            bits = nm_mask_packed(local, pattern, dim)
            self._entries.append((weakref.ref(w), bits))
            if not _dtensor.is_dtensor(w) and w.requires_grad:
                self._handles.append(w.register_post_accumulate_grad_hook(_grad_hook(bits)))
        # The global hook registry holds the guard (not the SparseModel handle, which users
        # drop: `sparsify(model).finalize()`); the guard holds its weights weakly, goes inert
        # at the first step after they are all gone, and the next guard removes its hook.
        self._handles.append(register_optimizer_step_post_hook(lambda optimizer, args, kwargs: self._after_step()))
        self.active = True
        _GUARDS.append(self)

    # A compiled optimizer step (torch.compile of a function calling step()) runs the global
    # hooks inside the traced region: this one calls the Rust unpacker, so it runs eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def _after_step(self) -> None:
        alive = False
        for ref, bits in self._entries:
            w = ref()
            if w is None:
                continue
            alive = True
            local = _dtensor.local(w)
            local.masked_fill_(~unpack_mask(bits, local.shape), 0)
        if not alive:
            # Inert from now on: drop the masks. The hook itself cannot be removed here (torch
            # is iterating over the hook registry); the next guard created removes it.
            self._entries.clear()
            self.active = False

    def release(self) -> None:
        """Remove every hook; the weights are free to become dense again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._entries.clear()
        self.active = False
        if self in _GUARDS:
            _GUARDS.remove(self)


#: Every guard with hooks installed (inert ones until the next guard is created).
_GUARDS: List[MaskGuard] = []


def _remove_inert_guards() -> None:
    for guard in list(_GUARDS):
        if not guard.active:
            guard.release()
