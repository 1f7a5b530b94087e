"""Which weights are N:M: the per-parameter marker and the registry that restores it.

:func:`cast_rs.sparsify` marks each chosen weight with ``NM_ATTR = (n, m, dim)`` so that
``AdamS(model.parameters())`` needs no parameter groups. FSDP2's ``fully_shard`` replaces
every parameter with a new DTensor ``nn.Parameter`` and attributes do not carry over, so the
spec is also kept on the *module* (which survives sharding) and AdamS re-marks the current
weights of every live sparsified module when it is constructed (:func:`remark_weights`).
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

#: Attribute that :func:`cast_rs.sparsify` sets on a parameter to mark it N:M: a tuple
#: ``(n, m, dim)`` with ``dim`` -1 (groups along the last dimension) or 0.
NM_ATTR = "_cast_rs_nm"

#: The same spec, on the module that owns the weight.
MODULE_SPEC_ATTR = "_cast_rs_nm_spec"

_SPARSE_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def original_weight(module: nn.Module) -> torch.Tensor:
    """The weight the optimizer trains (the parametrization's original when scaled)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def mark(module: nn.Module, spec: Tuple[int, int, int]) -> None:
    setattr(original_weight(module), NM_ATTR, spec)
    setattr(module, MODULE_SPEC_ATTR, spec)
    _SPARSE_MODULES.add(module)


def unmark(module: nn.Module) -> None:
    w = original_weight(module)
    if hasattr(w, NM_ATTR):
        delattr(w, NM_ATTR)
    if hasattr(module, MODULE_SPEC_ATTR):
        delattr(module, MODULE_SPEC_ATTR)
    _SPARSE_MODULES.discard(module)


def module_spec(module: nn.Module) -> Optional[Tuple[int, int, int]]:
    return getattr(module, MODULE_SPEC_ATTR, None)


def remark_weights() -> None:
    """Put the marker back on the current weight of every sparsified module (a no-op unless
    something, such as ``fully_shard``, replaced the parameter objects)."""
    for module in list(_SPARSE_MODULES):
        spec = getattr(module, MODULE_SPEC_ATTR, None)
        if spec is None:
            continue
        w = original_weight(module)
        if getattr(w, NM_ATTR, None) != spec:
            setattr(w, NM_ATTR, spec)
