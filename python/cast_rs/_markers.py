"""Which weights are N:M: the per-parameter marker and the registry that restores it.

:func:`cast_rs.sparsify` marks each chosen weight with ``NM_ATTR = (n, m, dim)`` so that
``AdamS(model.parameters())`` needs no parameter groups. FSDP2's ``fully_shard`` replaces
every parameter with a new DTensor ``nn.Parameter`` and attributes do not carry over, so the
spec is also kept on the *module* (which survives sharding) and AdamS re-marks the current
weights of every live sparsified module when it is constructed (:func:`remark_weights`).
``copy.deepcopy`` of a sparsified model drops the parameter markers too (``Parameter``'s
deepcopy does not copy attributes); the module's spec registers the copy, so AdamS re-marks it.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

#: Attribute that :func:`cast_rs.sparsify` sets on a parameter to mark it N:M: a tuple
#: ``(n, m, dim)`` with ``dim`` -1 (groups along the last dimension) or 0.
NM_ATTR = "_cast_rs_nm"

#: The same spec, on the module that owns the weight.
MODULE_SPEC_ATTR = "_cast_rs_nm_spec"

_SPARSE_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _ModuleSpec:
    """The ``(n, m, dim)`` kept on a module. Deep-copying the module copies this object, which
    then registers the copy (the copy's parameters have lost their markers)."""

    __slots__ = ("spec", "owner")

    def __init__(self, spec: Tuple[int, int, int], owner: Optional[nn.Module]) -> None:
        self.spec = tuple(spec)
        self.owner = weakref.ref(owner) if owner is not None else None

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_ModuleSpec":
        old = self.owner() if self.owner is not None else None
        # copy.deepcopy records the module's replica in memo before copying its __dict__.
        new = memo.get(id(old)) if old is not None else None
        if isinstance(new, nn.Module):
            _SPARSE_MODULES.add(new)
        return _ModuleSpec(self.spec, new if isinstance(new, nn.Module) else None)

    def __reduce__(self):  # pickling keeps the spec; the unpickled module is not registered
        return (_ModuleSpec, (self.spec, None))


def original_weight(module: nn.Module) -> torch.Tensor:
    """The weight the optimizer trains (the parametrization's original when scaled)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def mark(module: nn.Module, spec: Tuple[int, int, int]) -> None:
    setattr(original_weight(module), NM_ATTR, tuple(spec))
    setattr(module, MODULE_SPEC_ATTR, _ModuleSpec(spec, module))
    _SPARSE_MODULES.add(module)


def unmark(module: nn.Module) -> None:
    w = original_weight(module)
    if hasattr(w, NM_ATTR):
        delattr(w, NM_ATTR)
    if hasattr(module, MODULE_SPEC_ATTR):
        delattr(module, MODULE_SPEC_ATTR)
    _SPARSE_MODULES.discard(module)


def module_spec(module: nn.Module) -> Optional[Tuple[int, int, int]]:
    held = getattr(module, MODULE_SPEC_ATTR, None)
    return held.spec if isinstance(held, _ModuleSpec) else None


def remark_weights() -> None:
    """Put the marker back on the current weight of every sparsified module (a no-op unless
    something, such as ``fully_shard``, replaced the parameter objects)."""
    for module in list(_SPARSE_MODULES):
        spec = module_spec(module)
        if spec is None:
            continue
        w = original_weight(module)
        if getattr(w, NM_ATTR, None) != spec:
            setattr(w, NM_ATTR, spec)


def weight_scales() -> Dict[int, torch.Tensor]:
    """``id(weight) -> scale parameter`` for every live sparsified module with a weight scale
    (the current parameter objects, also after ``fully_shard`` replaced them)."""
    out: Dict[int, torch.Tensor] = {}
    for module in list(_SPARSE_MODULES):
        if parametrize.is_parametrized(module, "weight"):
            chain = module.parametrizations.weight
            scale = getattr(chain[0], "scale", None)
            if isinstance(scale, torch.Tensor):
                out[id(chain.original)] = scale
    return out
