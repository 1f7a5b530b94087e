"""The record a cast-rs checkpoint carries in ``config.json``'s ``quantization_config`` (see
:mod:`cast_rs.checkpoint` for the format): building it, checking it, and putting it in a
Hugging Face model's config. Imports nothing of cast-rs's layers, so that ``compress`` and
``finalize`` (which know their layers) can record them."""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .nm import parse_pattern

QUANT_METHOD = "cast_rs"
FORMAT = "cast_rs.nm"
#: The checkpoint's layout: NMLinear's buffers as ``NMLinear.LAYOUT_VERSION`` describes them,
#: under the recorded module names (bump both together).
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_record(pattern: str, compressed: bool, values_dtype: Optional[str], modules: List[str]) -> Dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pattern": pattern,
        "compressed": compressed,
        "values_dtype": values_dtype,
        "modules": modules,
    }


def check_record(record: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the field if ``record`` is not a checkpoint section this
    version of cast-rs can load."""
    where = "quantization_config"
    if record.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where}.quant_method: expected {QUANT_METHOD!r}, got {record.get('quant_method')!r}")
    if record.get("format") != FORMAT:
        raise ValueError(f"{where}.format: expected {FORMAT!r}, got {record.get('format')!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}.format_version: this cast-rs reads version {FORMAT_VERSION}, the checkpoint is version "
            f"{record.get('format_version')!r} (use the cast-rs that wrote it)"
        )
    try:
        parse_pattern(record.get("pattern"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}.pattern: {error}") from None
    if not isinstance(record.get("compressed"), bool):
        raise ValueError(f"{where}.compressed: expected true or false, got {record.get('compressed')!r}")
    if record["compressed"] and record.get("values_dtype") not in DTYPES:
        raise ValueError(f"{where}.values_dtype: expected one of {sorted(DTYPES)}, got {record.get('values_dtype')!r}")
    modules = record.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{where}.modules: expected a non-empty list of module names, got {modules!r}")


#: Makes the ``quantization_config`` object of a Hugging Face model from a record:
#: ``cast_rs._hf_quantizer`` sets it when it registers with ``transformers``.
config_factory: Optional[Callable[[nn.Module, Dict[str, Any]], Any]] = None


def set_record(model: nn.Module, record: Dict[str, Any]) -> None:
    """Put the record in a Hugging Face model's config (``save_pretrained`` writes it). Other
    modules, and a config that holds another library's ``quantization_config``, are left as
    they are."""
    if not is_hf_model(model):
        return
    held = getattr(model.config, "quantization_config", None)
    if held is not None and _quant_method(held) != QUANT_METHOD:
        return
    # The config class is transformers' kind (cast_rs._hf_quantizer), registered here when
    # transformers' quantizers load, which happens before any of its models can exist; a plain
    # dict, which save_pretrained writes the same, only if that registration never ran.
    factory = config_factory
    model.config.quantization_config = factory(model, record) if factory is not None else dict(record)


def is_hf_model(model: nn.Module) -> bool:
    """A ``transformers`` model (its config a ``PretrainedConfig``); False while ``transformers``
    is not imported, as no such model can exist then."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(getattr(model, "config", None), transformers.PretrainedConfig)


def unmark_hf_model(model: nn.Module) -> None:
    """Drop a cast-rs record from a Hugging Face config (``release_mask``: the model may become
    dense again, so a saved copy must not claim it is N:M)."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and _quant_method(qc) == QUANT_METHOD:
        del config.quantization_config


def _quant_method(qc: Any) -> Optional[str]:
    return qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
