"""Rebuilding a model's N:M layers from a cast-rs record (``quantization_config``, see
:mod:`cast_rs.checkpoint`): empty :class:`~cast_rs.NMLinear` layers swapped in before a loader
fills them, and the checks and guard once it has. Used by :func:`cast_rs.load_compressed` and
by the ``transformers`` quantizer (:mod:`cast_rs._hf_quantizer`)."""

from __future__ import annotations

from typing import Any, Dict, Union

import torch
from torch import nn

from .checking import check_nm, keep_nm
from .inference import NMLinear
from .layers import SPARSE_MODULE_ATTR, layer_kind
from .nm import format_pattern, parse_pattern
from ._record import DTYPES, check_record, set_record


def swap_in_nm_linear(model: nn.Module, record: Dict[str, Any], device: Union[str, torch.device] = "meta") -> None:
    """Replace each recorded ``nn.Linear`` / ``Conv1D`` of ``model`` by an empty
    :class:`~cast_rs.NMLinear` of the same shape (on ``device``) for a loader to fill. Every
    module is checked before any is replaced."""
    check_record(record)
    n, m = parse_pattern(record["pattern"])
    dtype = DTYPES[record["values_dtype"]]
    modules = dict(model.named_modules())
    plan = []
    for name in record["modules"]:
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"quantization_config.modules: the model has no module {name!r} (a different architecture?)")
        if isinstance(mod, NMLinear):
            plan.append((name, None))
            continue
        kind = layer_kind(mod)
        if kind is None or not name:
            raise ValueError(
                f"quantization_config.modules: {name!r} is a {type(mod).__name__}, expected an nn.Linear or a Hugging "
                "Face Conv1D to rebuild as NMLinear"
            )
        out_f, in_f = mod.weight.shape if kind[0] == "Linear" else mod.weight.shape[::-1]
        if in_f % m:
            raise ValueError(f"quantization_config.modules: {name!r} has {in_f} inputs, not a multiple of M = {m}")
        plan.append((name, (in_f, out_f, mod.bias is not None)))
    for name, shape in plan:
        if shape is None:
            continue
        in_f, out_f, bias = shape
        with torch.device(device):
            new = NMLinear(in_f, out_f, bias=bias, pattern=(n, m), dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)


def after_load(model: nn.Module, record: Dict[str, Any]) -> None:
    """Finish a load: a compressed model must have every NMLinear filled (nothing left on the
    meta device); a finalized dense one is checked to be N:M and guarded."""
    if record["compressed"]:
        for name, mod in model.named_modules():
            if isinstance(mod, NMLinear):
                mod.check_loaded_layout(name)
                buffers = (("values", mod.values), ("index", mod.index), ("scales", mod.scales), ("bias", mod.bias))
                for buf_name, buf in buffers:
                    if buf is not None and buf.is_meta:
                        raise ValueError(f"checkpoint: NMLinear {name!r} has no {buf_name!r} in the file (truncated?)")
        set_record(model, record)
        return
    pattern = parse_pattern(record["pattern"])
    modules = dict(model.named_modules())
    for name in record["modules"]:
        mod = modules.get(name)
        if mod is None or layer_kind(mod) is None:
            raise ValueError(f"quantization_config.modules: the model has no Linear / Conv1D {name!r}")
        setattr(mod, SPARSE_MODULE_ATTR, format_pattern(pattern))
    report = check_nm(model, pattern)
    if not report.ok:
        raise ValueError(
            f"checkpoint: recorded as finalized {format_pattern(pattern)}, but its layers are not: something made them "
            "dense after finalize (a plain LoRA merged with peft's merge_and_unload, or training with the mask "
            "guard released) before it was saved. cast_rs.reproject(merged, masks_from=<the finalized model>) "
            "puts a merged model back on its N:M support before saving; cast_rs.lora adapters merge without leaving "
            f"it:\n{report}"
        )
    guard = keep_nm(model, pattern)
    model._cast_rs_mask_guard = guard
    set_record(model, record)
