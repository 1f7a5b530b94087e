"""The AdamS operator, ``torch.ops.cast_rs.adams_step_``, called with patterns as ``(n, m, dim)``
tuples (``None`` for a dense parameter) and an optional in/out ``mask_cache`` list (the generic
path's unpacked masks: tensors, empty for none cached, ``None`` for dense parameters), as
``cast_rs.AdamS`` calls it. Returns ``(tensors on the fast path, on the generic path, flips)``
with ``None`` where a mask was not refreshed."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def adams_step(
    params, grads, exp_avgs, exp_avg_sqs, masks, patterns, steps, *, mask_cache=None, **kw
) -> Tuple[int, int, List[Optional[int]]]:
    flat = [v for p in patterns for v in (p if p is not None else (0, 0, 0))]
    cache = mask_cache if mask_cache is not None else []
    flips, fast = torch.ops.cast_rs.adams_step_(params, grads, exp_avgs, exp_avg_sqs, masks, flat, steps, cache, **kw)
    n_fast = int(fast.sum())
    return n_fast, len(params) - n_fast, [None if f < 0 else f for f in flips.tolist()]
