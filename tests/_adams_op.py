"""The AdamS operator, ``torch.ops.cast_rs.adams_step_``, called with patterns as ``(n, m, dim)``
tuples (``None`` for a dense parameter) and an optional in/out ``mask_cache`` list (the generic
path's unpacked masks: tensors, empty for none cached, ``None`` for dense parameters), as
``cast_rs.AdamS`` calls it. Returns ``(tensors on the fast path, on the generic path, flips)``
with ``None`` where a mask was not refreshed.

The operator takes AdamS's scalar hyperparameters as one list, ``hyper``, in the order of
``cast_rs._cast_rs.ADAMS_HYPER``; :func:`op_kwargs` builds it from named ones (``lr=...,
beta1=...``), which :func:`adams_step` takes."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from cast_rs import _cast_rs

#: The scalars a call may leave out (the optimizer's defaults).
_OPTIONAL = {"weight_decay": 0.0, "masked_lr_scale": 1.0}


def op_kwargs(**kw):
    """The operator's keyword arguments from named scalars: ``lr``, ``beta1``, ... (see
    ``ADAMS_HYPER``) become the ``hyper`` list; every other keyword is passed as given."""
    hyper = []
    for name in _cast_rs.ADAMS_HYPER:
        if name in kw:
            hyper.append(kw.pop(name))
        else:
            hyper.append(_OPTIONAL[name])
    return dict(kw, hyper=hyper)


def adams_step(
    params, grads, exp_avgs, exp_avg_sqs, masks, patterns, steps, *, mask_cache=None, **kw
) -> Tuple[int, int, List[Optional[int]]]:
    flat = [v for p in patterns for v in (p if p is not None else (0, 0, 0))]
    cache = mask_cache if mask_cache is not None else []
    flips, fast = torch.ops.cast_rs.adams_step_(
        params, grads, exp_avgs, exp_avg_sqs, masks, flat, steps, cache, **op_kwargs(**kw)
    )
    n_fast = int(fast.sum())
    return n_fast, len(params) - n_fast, [None if f < 0 else f for f in flips.tolist()]
