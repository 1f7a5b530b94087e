"""Leaving cast-rs's structures: hardware 2:4 tensors for a finalized model
(:func:`export_semi_structured`) and a finalized model's state dict under the original
architecture's keys (:func:`plain_state_dict`)."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from . import _dtensor
from .checking import check_nm
from .nm import Pattern, parse_pattern
from .sparsity import SPARSE_MODULE_ATTR

__all__ = ["export_semi_structured", "plain_state_dict"]


def export_semi_structured(model: nn.Module, pattern: Pattern = "2:4") -> List[str]:
    """Replace exact 2:4 fp16/bf16 ``nn.Linear`` weights on CUDA by
    ``torch.sparse.to_sparse_semi_structured`` tensors (hardware 2:4 kernels). Returns the
    names of the converted layers.

    Needs a CUDA GPU with 2:4 sparse tensor cores (compute capability >= 8.0), weights in
    float16 or bfloat16, and the pattern 2:4; raises ``CastError`` otherwise. ``Conv1D``
    layers are not converted (transpose them into ``nn.Linear`` first).
    """
    from ._cast_rs import CastError

    n, m = parse_pattern(pattern)
    if (n, m) != (2, 4):
        raise CastError(f"export_semi_structured: hardware semi-structured sparsity is 2:4 only, got {n}:{m}")
    linears = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and getattr(mod, SPARSE_MODULE_ATTR, None)
    ]
    if not linears:
        raise CastError("export_semi_structured: no finalized sparse nn.Linear layer found (run sparsify(...).finalize() first)")
    devices = {mod.weight.device.type for _, mod in linears}
    if devices != {"cuda"} or not torch.cuda.is_available():
        raise CastError(
            "export_semi_structured: needs the sparse layers on a CUDA GPU with 2:4 sparse tensor cores "
            f"(compute capability >= 8.0); this model's sparse weights are on {sorted(devices)} "
            f"(torch.cuda.is_available() = {torch.cuda.is_available()}). Move the model with .cuda().half() first."
        )
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        raise CastError(f"export_semi_structured: needs compute capability >= 8.0, this GPU has {major}.x")
    bad = [name for name, mod in linears if mod.weight.dtype not in (torch.float16, torch.bfloat16)]
    if bad:
        raise CastError(f"export_semi_structured: weights must be float16 or bfloat16; {bad} are not (use .half())")
    report = check_nm(model, "2:4")
    if not report.ok:
        raise CastError(f"export_semi_structured: the model is not exactly 2:4:\n{report}")
    from torch.sparse import to_sparse_semi_structured

    done = []
    for name, mod in linears:
        mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
        done.append(name)
    return done


_ORIGINAL_SUFFIX = ".parametrizations.weight.original"
_SCALE_SUFFIX = ".parametrizations.weight.0.scale"


def plain_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a full state dict of a finalized model that still carries weight-scale
    parametrizations (a ``fully_shard``-ed model: see :meth:`SparseModel.finalize`) onto the
    original architecture's keys: ``<layer>.parametrizations.weight.original`` becomes
    ``<layer>.weight`` and the all-ones ``<layer>.parametrizations.weight.0.scale`` is dropped.

    Gather the state dict first, e.g. ``get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True, cpu_offload=True))``. Raises ``ValueError``
    when a scale is not all ones (the model was not finalized) or a value is still a DTensor.
    Keys of other layers are copied unchanged.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _dtensor.is_dtensor(value):
            raise ValueError(
                f"state_dict[{key!r}]: a DTensor (a sharded state dict); gather a full one with "
                "StateDictOptions(full_state_dict=True)"
            )
        if key.endswith(_SCALE_SUFFIX):
            if not bool((value == 1).all()):
                raise ValueError(
                    f"state_dict[{key!r}]: the weight scale is not all ones; call SparseModel.finalize() "
                    "before converting (it folds the scale into the weight)"
                )
            continue
        if key.endswith(_ORIGINAL_SUFFIX):
            key = key[: -len(_ORIGINAL_SUFFIX)] + ".weight"
        out[key] = value
    return out
