"""AdamS's call into the fused kernel: the arguments of one group, the λ of ``l1_mode =
"relative"``, and the call itself (with its errors named after the user's parameters).

The kernel is the operator ``torch.ops.cast_rs.adams_step_`` (``csrc/``, then ``src/adams``):
it validates every argument of a call before it writes anything and updates parameters and
state in place; it is stateless apart from what it is handed.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _dtensor
from ._cast_rs import CastError
from ._adams_hyper import DEFAULT_COOLDOWN, DEFAULT_RAMP_END, DEFAULT_WARMUP, kernel_hyper
from ._adams_state import Spec, param_name


def kernel_args(
    group: Dict[str, Any],
    locals_: List[torch.Tensor],
    grads: List[torch.Tensor],
    specs: List[Optional[Spec]],
    states: List[Dict[str, Any]],
    force_generic: bool,
    sharded: bool = False,
) -> Tuple[tuple, Dict[str, Any]]:
    """The kernel's positional and keyword arguments for one group (``sharded``: some
    parameter is a DTensor, whose state tensors are DTensors whose local shards are stepped)."""
    total = group["total_steps"]
    ramp = float(group.get("ramp_end", DEFAULT_RAMP_END))
    if sharded:
        local, local_mask = _dtensor.local, _dtensor.local_mask
        exp_avgs = [local(st["exp_avg"]) for st in states]
        exp_avg_sqs = [local(st["exp_avg_sq"]) for st in states]
        masks = [local_mask(st["mask"]) if spec is not None else None for st, spec in zip(states, specs)]
    else:
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        masks = [st["mask"] if spec is not None else None for st, spec in zip(states, specs)]
    args = (
        locals_,
        grads,
        exp_avgs,
        exp_avg_sqs,
        masks,
        specs,
        [st["step"] for st in states],  # incremented by the kernel on success
    )
    kwargs = dict(
        hyper=kernel_hyper(group, lr=float(group["lr"]) * lr_factor(group, states)),
        # α = min(1, s / (ramp_end·T)): the kernel ramps over ramp_end·T steps.
        total_steps=None if total is None else max(1.0, ramp * float(total)),
        mask_interval=int(group["mask_interval"]),
        force_generic=force_generic,
    )
    return args, kwargs


def lr_factor(group: Dict[str, Any], states: List[Dict[str, Any]]) -> float:
    """AdamS's own ramps of the learning rate for this step s, on top of the group's lr as a
    scheduler set it: the warmup min(1, s / (warmup · T)) times the cooldown
    clamp((T − s + 1) / (cooldown · T), 1 / (cooldown · T), 1) (each 1 when off; past T the
    cooldown stays at its last step's value rather than stop training)."""
    warmup = float(group.get("warmup", DEFAULT_WARMUP))
    cooldown = float(group.get("cooldown", DEFAULT_COOLDOWN))
    if (warmup <= 0.0 and cooldown <= 0.0) or not states:
        return 1.0
    s, total = float(states[0]["step"]) + 1.0, float(group["total_steps"])
    factor = min(1.0, s / (warmup * total)) if warmup > 0.0 else 1.0
    if cooldown > 0.0:
        span = cooldown * total
        factor *= min(1.0, max(total - s + 1.0, 1.0) / span)
    return factor


def relative_l1(
    group: Dict[str, Any], params: List[torch.Tensor], specs: List[Optional[Spec]], states: List[Dict[str, Any]]
) -> List[float]:
    """λ of each tensor in ``l1_mode="relative"``: ``l1_decay`` × RMS of the bias-corrected
    momentum after this step's update, (re)measured at mask-refresh steps and kept in
    ``state["l1_decay"]`` in between (written by the caller once the step succeeded).
    For a DTensor the RMS is over the whole tensor (a collective), so every rank uses the
    same λ."""
    beta1 = float(group["betas"][0])
    kappa, k = float(group["l1_decay"]), int(group["mask_interval"])
    out = []
    for p, spec, st in zip(params, specs, states):
        if spec is None:
            out.append(0.0)
            continue
        s = float(st["step"]) + 1.0
        if "l1_decay" in st and (int(s) - 1) % k != 0:
            out.append(st["l1_decay"])
            continue
        mu = torch.lerp(st["exp_avg"], p.grad, 1.0 - beta1)
        # A DTensor's norm is a collective (a partial sum over the shards), made whole here.
        norm = _dtensor.full(torch.linalg.vector_norm(mu, dtype=torch.float64))
        rms = float(norm) / math.sqrt(max(1, mu.numel()))
        lam = kappa * rms / (1.0 - beta1**s)
        out.append(lam if math.isfinite(lam) else 0.0)
    return out


# The kernel's per-parameter list arguments, and how an error names them for a user.
_STATE_NAME = {
    "params": "",
    "grads": " gradient",
    "exp_avgs": " state 'exp_avg'",
    "exp_avg_sqs": " state 'exp_avg_sq'",
    "masks": " state 'mask'",
    "steps": " state 'step'",
}

#: One cached ``keep`` tensor per sparse parameter (the packed mask's storage and version it
#: was made from), or None for a parameter the last step took on the fast path: see
#: :func:`run_kernel`.
KeepCache = Dict[torch.Tensor, Optional[Tuple[torch.Tensor, int, int]]]


_ADAMS_STEP = torch.ops.cast_rs.adams_step_.default


def run_kernel(
    keep_cache: KeepCache, group: Dict[str, Any], gi: int, indices: List[int], args: tuple, kwargs: Dict[str, Any]
) -> Tuple[int, int, List[Optional[int]]]:
    """One kernel call: ``(tensors on the fast path, on the generic path, mask flips)``.

    Its errors name the parameter (``param_groups[g]['params'][i]`` or its name) instead of
    the kernel's per-call argument lists (``grads[3]``): the kernel's exceptions carry the
    failing argument as data (``param``, ``index``, ``detail``, ``other_param``,
    ``other_index``; see ``src/error.rs``).

    ``keep_cache``: the generic path's ``keep`` tensors (1 where the mask keeps a weight, 0
    where it removes it, in the parameter's dtype), kept between steps so that a step need
    not unpack every packed mask. A cache, never state: an entry is used only while the packed
    mask it was made from is unchanged (same storage, same version counter). The operator
    fills the tensors it is handed in place (an empty one: none cached).
    """
    # Keyed by the parameter itself (args[0] holds the local tensors, which for a DTensor
    # are new objects at every step).
    params, locals_, masks = [group["params"][i] for i in indices], args[0], args[4]
    cache: List[Optional[torch.Tensor]] = []
    # Which path a tensor takes follows from its device, dtype and layout, which do not change
    # between steps: when every sparse tensor took the fast path last time, no cache is passed
    # (an empty list, the operator's "none"), which keeps the common CPU step free of it.
    if any(bits is not None and keep_cache.get(p, ()) is not None for p, bits in zip(params, masks)):
        for p, pl, bits in zip(params, locals_, masks):
            entry = keep_cache.get(p) if bits is not None else None
            fresh = entry is not None and entry[1] == bits.data_ptr() and entry[2] == bits._version
            if bits is None:
                cache.append(None)
            else:
                cache.append(entry[0] if fresh else torch.empty(0, dtype=pl.dtype, device=pl.device))
    patterns = [v for spec in args[5] for v in (spec if spec is not None else (0, 0, 0))]
    try:
        flips, fast = _ADAMS_STEP(*args[:5], patterns, args[6], cache, **kwargs)
    except (ValueError, TypeError, CastError) as e:
        named = _named(e, group, gi, indices)
        if named is e:
            raise
        raise named from e
    took_fast = fast.tolist()
    # With no cache passed (every sparse tensor was on the fast path) and every tensor on the
    # fast path again, the cache's entries (None) are already right.
    if not kwargs.get("validate_only", False) and (cache or not all(took_fast)):
        for j, (p, bits) in enumerate(zip(params, masks)):
            if bits is None:
                continue
            keep = cache[j] if cache else None
            if took_fast[j]:
                keep_cache[p] = None
            elif keep is not None and keep.numel():
                keep_cache[p] = (keep, bits.data_ptr(), bits._version)
            else:
                keep_cache.pop(p, None)
    n_fast = sum(took_fast)
    return n_fast, len(params) - n_fast, [None if f < 0 else f for f in flips.tolist()]


def _named(e: Exception, group: Dict[str, Any], gi: int, indices: List[int]) -> Exception:
    """``e`` with the kernel's argument (``grads[3]``) replaced by the parameter's name; ``e``
    itself when it names no per-parameter argument."""

    def name(arg: Optional[str], k: Optional[int]) -> Optional[str]:
        if arg not in _STATE_NAME or k is None or k >= len(indices):
            return None
        return param_name(group, gi, indices[k]) + _STATE_NAME[arg]

    who = name(getattr(e, "param", None), getattr(e, "index", None))
    if who is None:
        return e
    detail: str = e.detail  # type: ignore[attr-defined]
    if "{other}" in detail:
        other = name(e.other_param, e.other_index)  # type: ignore[attr-defined]
        detail = detail.replace("{other}", other or f"{e.other_param}[{e.other_index}]")  # type: ignore[attr-defined]
    return type(e)(f"{who}: {detail}")
