"""cast-rs checkpoints through Hugging Face ``transformers``' quantizer extension point.

``transformers`` rebuilds a quantized model from ``config.json``'s ``quantization_config``:
its ``quant_method`` picks a registered config class and an ``HfQuantizer``, which swaps the
model's layers on the meta device before any weight is read. cast-rs registers
``quant_method = "cast_rs"`` (see :mod:`cast_rs.checkpoint` for the record and when this module
is imported):

* a **compressed** model (``compressed: true``): the recorded layers are built as
  :class:`~cast_rs.NMLinear` on the meta device, so the loader fills their ``values`` /
  ``index`` (and int8 ``scales``) buffers straight from the file and no dense weight of theirs
  is ever allocated; the model is inference-only (``is_trainable`` is false, as ``NMLinear`` has no backward);
* a **finalized, dense** model (``compressed: false``): the layers load as they are and are
  then guarded (:func:`cast_rs.keep_nm`), so further training keeps their N:M support. Such a
  model is not "quantized" for ``transformers`` after loading (the quantizer detaches itself,
  so ``.float()``, ``.to(dtype)`` and the ``Trainer`` work as on any model), but its config
  keeps the record, so saving it again keeps the mark.

This module imports ``transformers``; only :mod:`cast_rs.checkpoint` imports it.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import _record as _rec
from . import _rebuild
from .inference import NMLinear


#: config -> the model it describes (kept outside the config's __dict__, which transformers
#: serialises and deep-copies: a copy describes no live model and keeps its recorded dtype).
_FOLLOWED: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


class CastRsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` section of a cast-rs checkpoint (see
    :func:`cast_rs.checkpoint.record`): format name and version, pattern, whether the layers are
    stored compressed, the stored values' dtype and the layers."""

    def __init__(
        self,
        format: str = _rec.FORMAT,
        format_version: int = _rec.FORMAT_VERSION,
        pattern: str = "2:4",
        compressed: bool = True,
        values_dtype: Optional[str] = None,
        modules: Optional[List[str]] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = _rec.QUANT_METHOD
        self.format = format
        self.format_version = int(format_version)
        self.pattern = pattern
        self.compressed = bool(compressed)
        self.values_dtype = values_dtype
        self.modules = list(modules or [])
        _rec.check_record(self.to_dict())

    __hash__ = object.__hash__  # identity: the key of _FOLLOWED

    def follow(self, model: nn.Module) -> None:
        """Keep ``values_dtype`` true to ``model``'s NMLinear layers when it is converted later
        (``model.to(torch.bfloat16)`` re-lays them out): read at every ``to_dict``, which is
        what ``save_pretrained`` writes."""
        _FOLLOWED[self] = weakref.ref(model)

    def to_dict(self) -> Dict[str, Any]:
        held = _FOLLOWED.get(self)
        model = held() if held is not None else None
        if model is not None and self.compressed:
            dtypes = {mod.values.dtype for mod in model.modules() if isinstance(mod, NMLinear)}
            if len(dtypes) == 1:
                self.values_dtype = _rec.dtype_name(dtypes.pop())
        return {
            "quant_method": self.quant_method,
            "format": self.format,
            "format_version": self.format_version,
            "pattern": self.pattern,
            "compressed": self.compressed,
            "values_dtype": self.values_dtype,
            "modules": list(self.modules),
        }


class CastRsQuantizer(HfQuantizer):
    """Rebuilds a cast-rs checkpoint's N:M layers while ``from_pretrained`` loads it (module
    docstring)."""

    requires_calibration = True  # the checkpoint already holds the N:M model: nothing to compute

    @property
    def _compressed(self) -> bool:
        return bool(self.quantization_config.compressed)

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if not self._compressed:
            return
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        bad = [d for d in devices if d is not None and str(d) not in ("cpu", "meta") and not str(d).startswith("cpu")]
        if bad:
            raise ValueError(
                f"device_map: a compressed cast-rs checkpoint runs on the CPU (NMLinear), got {bad[0]!r}; load it "
                "without device_map, or save the model finalized but not compressed for GPUs"
            )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self._compressed and dtype == torch.float16:
            raise TypeError(
                "dtype: a compressed cast-rs checkpoint cannot be loaded as float16 (the compressed kernels take "
                "float32 or bfloat16 activations); leave dtype out or pass torch.bfloat16 / torch.float32"
            )
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self._compressed:
            _rebuild.swap_in_nm_linear(model, self.quantization_config.to_dict(), device="meta")
            # Some models' _init_weights write a child layer's .weight from its parent (GPT-2's
            # scaled c_proj init), which NMLinear does not have; while loading, each gets a meta
            # stand-in that transformers' initializers skip (it is marked initialized).
            for mod in model.modules():
                if isinstance(mod, NMLinear):
                    stand_in = torch.empty(mod.out_features, mod.in_features, device="meta")
                    stand_in._is_hf_initialized = True
                    mod.__dict__["weight"] = stand_in
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for mod in model.modules():
            if isinstance(mod, NMLinear):
                mod.__dict__.pop("weight", None)
        _rebuild.after_load(model, self.quantization_config.to_dict())
        if not self._compressed:
            # A dense N:M model is an ordinary model that keeps a guard: not "quantized" for
            # transformers (which would refuse .float(), .to(dtype) and plain training).
            model.__dict__.pop("hf_quantizer", None)
            model.__dict__.pop("quantization_method", None)
            model.__dict__.pop("is_quantized", None)
            for module in model.modules():
                if hasattr(getattr(module, "config", None), "_is_quantized"):
                    module.config._is_quantized = False
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return not self._compressed

    @property
    def is_qat_trainable(self) -> bool:
        return not self._compressed

    @property
    def is_compileable(self) -> bool:
        return True


def _config_for(model: nn.Module, record: Dict[str, Any]) -> CastRsConfig:
    """The config object a Hugging Face model holds for ``record`` (:func:`cast_rs._record.set_record`)."""
    config = CastRsConfig(**{k: v for k, v in record.items() if k != "quant_method"})
    config.follow(model)
    return config


def register() -> None:
    """Register the config class and the quantizer with ``transformers``, and the config
    factory with :mod:`cast_rs._record` (idempotent)."""
    _rec.config_factory = _config_for
    if _rec.QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(_rec.QUANT_METHOD)(CastRsConfig)
    if _rec.QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(_rec.QUANT_METHOD)(CastRsQuantizer)
