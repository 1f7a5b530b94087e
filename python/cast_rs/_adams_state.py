"""AdamS's parameters and state: which parameters are sparse, what a step may take, and the
per-parameter state it creates.

Everything here reads or creates state; nothing steps. The checks run every step on every
parameter with a gradient, so the common case is kept to a few attribute reads per parameter
and messages are only built when something is wrong.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _cast_rs, _dtensor
from ._markers import NM_ATTR, weight_scales
from ._tensor_args import check_plain_tensor
from .nm import format_pattern, nm_mask_packed, parse_pattern

Spec = Tuple[int, int, int]  # (n, m, dim) of a sparse parameter


def param_name(group: Dict[str, Any], gi: int, i: int) -> str:
    """How an error names parameter ``i`` of group ``gi``: its name if the group has names."""
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    return f"param_groups[{gi}]['params'][{i}]"


def param_spec(p: torch.Tensor, group: Dict[str, Any]) -> Optional[Spec]:
    """(n, m, dim) of a sparse parameter, None for a dense one."""
    marked = getattr(p, NM_ATTR, None)
    if marked is not None:
        return marked
    if group.get("pattern") is not None:
        n, m = parse_pattern(group["pattern"])
        return (n, m, -1)
    return None


def check_new_group(group: Dict[str, Any], gi: int, where: str) -> None:
    """A group being added: floating-point parameters, N:M groups that fit each sparse
    parameter's shape (and sharding), ``total_steps`` when anything is sparse. Normalises
    ``pattern`` to ``"N:M"``."""
    if group["pattern"] is not None:
        group["pattern"] = format_pattern(parse_pattern(group["pattern"]))
    any_sparse = False
    for i, p in enumerate(group["params"]):
        name = param_name(group, gi, i)
        if not p.is_floating_point():
            raise TypeError(f"{name}: AdamS needs floating-point parameters, got dtype {p.dtype}")
        spec = param_spec(p, group)
        if spec is None:
            continue
        any_sparse = True
        check_sparse_shape(name, p, spec, "; put it in a group with pattern=None")
        if _dtensor.is_dtensor(p):
            _dtensor.check_sharding(p, spec, name)
    if any_sparse and group["total_steps"] is None:
        raise ValueError(
            f"{where}total_steps: required when a group has sparse (N:M) parameters "
            "(the L1 decay ramps in over total_steps); pass total_steps=<planned optimizer steps>"
        )


def restore_loaded_masks(param_groups: List[Dict[str, Any]], state: Dict[torch.Tensor, Dict[str, Any]]) -> None:
    """After ``Optimizer.load_state_dict``: torch casts every non-"step" state tensor of a float
    parameter to the parameter's dtype; the packed mask is bytes, so restore it (0..255 survive
    float exactly) and check its length."""
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            st = state.get(p)
            if not st or "mask" not in st:
                continue
            local_bits = _dtensor.local(st["mask"])
            weights = _dtensor.local(p).numel()
            expected = (weights + 7) // 8
            if local_bits.numel() != expected:
                raise ValueError(
                    f"state_dict: mask of {param_name(group, gi, i)} has {local_bits.numel()} bytes, "
                    f"expected {expected} for {weights} weights"
                )
            flat = local_bits.to(dtype=torch.uint8, device=p.device).reshape(expected)
            st["mask"] = _dtensor.mask_like(p, flat) if _dtensor.is_dtensor(p) else flat


class GroupPlan:
    """The parameters of one group that have gradients, validated: the parameters, their
    local gradients and tensors (the tensors themselves, or a DTensor's local shard), their
    specs and their indices in the group."""

    __slots__ = ("params", "grads", "specs", "locals_", "indices", "sharded")

    def __init__(self) -> None:
        self.params: List[torch.Tensor] = []
        self.grads: List[torch.Tensor] = []
        self.specs: List[Optional[Spec]] = []
        self.locals_: List[torch.Tensor] = []
        self.indices: List[int] = []
        self.sharded = False  # any DTensor parameter (its state is DTensors too)


def collect_group(
    group: Dict[str, Any], gi: int, state: Dict[torch.Tensor, Dict[str, Any]], all_groups: List[Dict[str, Any]]
) -> GroupPlan:
    """Collect and validate the parameters with gradients of group ``gi``. Writes nothing."""
    plan = GroupPlan()
    scale_lookup = None  # (weight scales, ids of this optimizer's parameters), built once if needed
    group_spec = None
    if group.get("pattern") is not None:
        n, m = parse_pattern(group["pattern"])
        group_spec = (n, m, -1)
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        spec = getattr(p, NM_ATTR, None) or group_spec
        pl = p
        if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
            if _dtensor.is_dtensor(p):
                name = param_name(group, gi, i)
                _dtensor.check_grad(p, g, name)
                _dtensor.check_sharding(p, spec, name)
                pl, g = p.to_local(), g.to_local()
                plan.sharded = True
            else:
                check_plain_tensor(p, param_name(group, gi, i))
        if type(g) is not torch.Tensor:
            check_plain_tensor(g, param_name(group, gi, i) + " gradient")
        # A sparse gradient cannot reach the kernel (the operator has no sparse registration),
        # so it is refused here; dtype, shape and device of gradients and state are the
        # kernel's rule, checked there before it writes anything.
        if g.is_sparse or not pl.is_floating_point():
            raise_bad_grad(param_name(group, gi, i), pl, g)
        if spec is not None:
            st = state.get(p)
            if st is None or "mask" not in st:  # sparse for the first time: its mask is made here
                if scale_lookup is None:
                    scale_lookup = (weight_scales(), {id(q) for g_ in all_groups for q in g_["params"]})
                check_scale_is_optimized(param_name(group, gi, i), p, *scale_lookup)
                check_sparse_shape(param_name(group, gi, i), p, spec)
        plan.params.append(p)
        plan.grads.append(g)
        plan.specs.append(spec)
        plan.locals_.append(pl)
        plan.indices.append(i)
    return plan


def check_sparse_shape(name: str, p: torch.Tensor, spec: Spec, advice: str = "") -> None:
    """Raise, naming the parameter, unless ``p`` holds ``spec``'s N:M groups (the kernels' own
    rule, ``nm.rs``); ``advice`` is appended to the message."""
    try:
        _cast_rs.check_nm_shape(tuple(p.shape), *spec)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {getattr(e, 'detail', e)}{advice}") from None


def check_scale_is_optimized(name: str, p: torch.Tensor, scales: Dict[int, torch.Tensor], held: set) -> None:
    """A weight that :func:`cast_rs.sparsify` gave a learnable scale must be optimized with
    that scale: when ``sparsify`` ran after the optimizer was built, the scale is not in
    it and would silently stay 1 while its gradients pile up. Refused, before any write.
    ``scales``: :func:`weight_scales`; ``held``: ids of this optimizer's parameters."""
    scale = scales.get(id(p))
    if scale is None or not scale.requires_grad or id(scale) in held:
        return
    raise ValueError(
        f"{name}: this N:M weight's scale (WeightScale.scale, added by "
        "cast_rs.sparsify) is not among this optimizer's parameters: sparsify ran after the optimizer "
        "was built, so the scale would never train. Build the optimizer after sparsify (or add "
        "sparse.scale_parameters() with optimizer.add_param_group), or freeze the scale "
        "(scale.requires_grad_(False)) to train without it."
    )


def raise_bad_grad(name: str, p: torch.Tensor, g: torch.Tensor) -> None:
    if not p.is_floating_point():
        raise TypeError(f"{name}: AdamS needs floating-point parameters, got dtype {p.dtype}")
    raise TypeError(f"{name}: AdamS does not support sparse gradients (got a {g.layout} gradient)")


def state_for(st: Dict[str, Any], p: torch.Tensor, pl: torch.Tensor, spec: Optional[Spec]) -> Dict[str, Any]:
    """Fill ``st``, the state of ``p`` (``pl``: its local tensor), on first use. For a DTensor
    the moments are DTensors like ``p`` and the mask is sharded with it."""
    if len(st) == 0:
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if spec is not None and "mask" not in st:
        n, m, dim = spec
        if float(st["step"]) == 0.0:
            # Step 1 is always a refresh step: the kernel fills it.
            bits = torch.zeros((pl.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
        else:
            # Became sparse mid-run (marked after some steps): start from its current mask.
            bits = nm_mask_packed(pl.detach(), (n, m), dim)
        st["mask"] = _dtensor.mask_like(p, bits) if pl is not p else bits
    return st
