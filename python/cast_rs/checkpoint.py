"""Save and load N:M models without losing them: compressed or finalized, Hugging Face or not.

A checkpoint records what it holds in a ``quantization_config`` section of its
``config.json`` (Hugging Face's extension point for models whose layers are not plain
``nn.Linear``)::

    "quantization_config": {
        "quant_method": "cast_rs",        # which library rebuilds the layers
        "format": "cast_rs.nm",           # the layout of the stored tensors
        "format_version": 1,              # NMLinear.LAYOUT_VERSION
        "pattern": "2:4",
        "compressed": true,               # NMLinear buffers (values, index) or dense N:M weights
        "values_dtype": "bfloat16",       # compressed: the stored values' dtype (or "int8", with
                                          # one float32 scale per output row)
        "modules": ["model.layers.0.self_attn.q_proj", ...]
    }

* **Hugging Face models** get the section by themselves: :func:`cast_rs.compress` and
  :meth:`cast_rs.SparseModel.finalize` set ``model.config.quantization_config``, so
  ``model.save_pretrained(d)`` writes it, and ``from_pretrained(d)`` (any ``Auto*`` class, with
  ``cast_rs`` imported) rebuilds the layers through the quantizer cast-rs registers with
  ``transformers`` (:mod:`cast_rs._hf_quantizer`): compressed layers as :class:`~cast_rs.NMLinear`
  built on the meta device and filled from the file, with no dense weight allocated; finalized
  dense layers loaded as they are and guarded (:func:`cast_rs.keep_nm`), so more training keeps
  them N:M. Without ``cast_rs`` imported, ``transformers`` logs that it does not know
  ``quant_method "cast_rs"`` and loads the file as a dense model: a compressed checkpoint's
  layers then come back random (``import cast_rs`` first; :func:`load_compressed` does).
* **Any other** ``nn.Module``: :func:`save_compressed` writes ``model.safetensors`` and a
  ``config.json`` holding the section; :func:`load_compressed` rebuilds it into a skeleton of
  the same model (best built on the meta device, so nothing dense is allocated).

Loading checks the record before anything is built (an unknown format version, a pattern or
dtype NMLinear cannot hold, a recorded module the model does not have or that is not a
Linear / Conv1D of a matching shape: a ``ValueError`` naming it), and every NMLinear checks its
entries (shape, pattern, dtype) before it copies anything.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from .checking import check_nm
from .inference import compressed_record
from ._rebuild import after_load, swap_in_nm_linear
from .layers import SPARSE_MODULE_ATTR, parameter_aliases
from .nm import format_pattern, parse_pattern
from ._record import QUANT_METHOD, check_record, make_record, set_record

__all__ = ["save_compressed", "load_compressed", "checkpoint_record"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"

PathLike = Union[str, "os.PathLike[str]"]


def checkpoint_record(model: nn.Module) -> Dict[str, Any]:
    """The ``quantization_config`` section describing ``model`` as it is now: its
    :class:`~cast_rs.NMLinear` layers if it has any (``compressed: true``), else the layers
    ``sparsify`` made N:M, which must be exactly N:M (finalized; ``compressed: false``).

    Raises ``ValueError`` for a model with neither (there is nothing to record: compress or
    finalize it first), with NMLinear layers of different patterns or dtypes, or with marked
    layers that are not exactly N:M."""
    record = compressed_record(model)
    if record is not None:
        return record
    marked = [(name, mod) for name, mod in model.named_modules() if getattr(mod, SPARSE_MODULE_ATTR, None)]
    if not marked:
        raise ValueError(
            "model: nothing N:M to record (no NMLinear layer and no layer made sparse by cast_rs.sparsify); "
            "finalize the model (sparse.finalize()) and, for CPU inference, cast_rs.compress(model) first"
        )
    pattern = _marked_pattern(marked)
    report = check_nm(model, pattern)
    if not report.ok:
        raise ValueError(f"model: its sparse layers are not exactly {format_pattern(pattern)} (finalize it first):\n{report}")
    return make_record(format_pattern(pattern), False, None, [name for name, _ in marked])


def _marked_pattern(marked: List[Any]) -> tuple:
    patterns = {parse_pattern(getattr(mod, SPARSE_MODULE_ATTR)) for _, mod in marked}
    if len(patterns) > 1:
        raise ValueError(f"model: its sparse layers mix patterns {sorted(map(format_pattern, patterns))}")
    return patterns.pop()


def save_compressed(model: nn.Module, directory: PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Save a compressed (or finalized) model with the record that rebuilds it.

    A Hugging Face model: ``model.save_pretrained(directory, **save_pretrained_kwargs)`` with the
    record in its config (``from_pretrained`` and :func:`load_compressed` read it back). Any
    other module: ``directory/model.safetensors`` (shared tensors stored once, as
    ``safetensors.torch.save_model`` does) and ``directory/config.json`` with the record;
    :func:`load_compressed` rebuilds it into a skeleton of the model. Returns the directory.

    Raises ``ValueError`` when the model has nothing N:M to record (see
    :func:`checkpoint_record`)."""
    directory = Path(directory)
    record = checkpoint_record(model)
    if hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_dict"):
        set_record(model, record)
        model.save_pretrained(directory, **save_pretrained_kwargs)
        return directory
    if save_pretrained_kwargs:
        raise TypeError(f"save_compressed: {sorted(save_pretrained_kwargs)} apply to Hugging Face models only")
    safetensors_torch = _safetensors()
    directory.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_model(model, str(directory / _WEIGHTS), metadata={"format": "pt"})
    (directory / _CONFIG).write_text(json.dumps({"quantization_config": record}, indent=2) + "\n")
    return directory


def load_compressed(directory: PathLike, model: Optional[nn.Module] = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load what :func:`save_compressed` (or ``save_pretrained`` of a compressed or finalized
    Hugging Face model) wrote.

    Without ``model``: a Hugging Face checkpoint, loaded with the class its config names
    (``architectures[0]``) and ``from_pretrained(directory, **from_pretrained_kwargs)``. With
    ``model``: a skeleton of the saved module (same class and sizes; build it under
    ``torch.device("meta")`` so no dense weight is allocated): the recorded layers are replaced
    by NMLinear and every tensor is taken from the file (``load_state_dict(assign=True)``,
    weights shared in the skeleton shared again); the model is returned, on the CPU.

    Raises ``ValueError`` when the directory holds no cast-rs record, the record does not fit
    the model, or the file's tensors do not (missing or unexpected keys, shapes)."""
    directory = Path(directory)
    config = _read_config(directory)
    record = config["quantization_config"]
    if model is None:
        return _load_hf(directory, config, from_pretrained_kwargs)
    if from_pretrained_kwargs:
        raise TypeError(f"load_compressed: {sorted(from_pretrained_kwargs)} apply to Hugging Face checkpoints only")
    safetensors_torch = _safetensors()
    weights = directory / _WEIGHTS
    if not weights.is_file():
        raise ValueError(f"directory: no {_WEIGHTS} in {str(directory)!r}")
    shared = _shared_groups(model)
    if record["compressed"]:
        swap_in_nm_linear(model, record, device="meta")
    state = safetensors_torch.load_file(str(weights))
    # Names the file left out because they share a tensor with one it kept.
    for group in shared:
        kept = [name for name in group if name in state]
        if kept:
            for name in group:
                state.setdefault(name, state[kept[0]])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"model: the file does not match this skeleton (missing {sorted(missing)[:4]}, unexpected "
            f"{sorted(unexpected)[:4]}); build the model that was saved"
        )
    _retie(model, shared)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"model: {left[:4]} were not in the file and are still on the meta device")
    after_load(model, record)
    return model


def _shared_groups(model: nn.Module) -> List[List[str]]:
    """Names (state-dict keys) of parameters that are one object in ``model``: tied weights."""
    groups = {tuple(names) for names in parameter_aliases(model).values() if len(names) > 1}
    return [list(names) for names in groups]


def _retie(model: nn.Module, groups: List[List[str]]) -> None:
    # load_state_dict(assign=True) gives each name its own tensor; a tie is one Parameter.
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, first)


def _read_config(directory: Path) -> Dict[str, Any]:
    """``config.json`` of a saved model that holds a cast-rs record (checked)."""
    path = directory / _CONFIG
    if not path.is_file():
        raise ValueError(f"directory: no {_CONFIG} in {str(directory)!r} (not a saved model)")
    config = json.loads(path.read_text())
    record = config.get("quantization_config")
    if not isinstance(record, dict) or record.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"directory: {str(directory)!r} holds no cast-rs checkpoint (its config.json has no quantization_config "
            f"with quant_method {QUANT_METHOD!r}); load a plain model with its own from_pretrained"
        )
    check_record(record)
    return config


def _load_hf(directory: Path, config: Dict[str, Any], kwargs: Dict[str, Any]) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ImportError("load_compressed: this checkpoint needs transformers (pip install transformers)") from None
    register_with_transformers()
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise ValueError(
            f"directory: config.json names no transformers class ({arch!r}); pass a skeleton as model= or call the "
            "model class's from_pretrained yourself (with cast_rs imported)"
        )
    return cls.from_pretrained(directory, **kwargs)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("cast-rs checkpoints are safetensors files: pip install safetensors") from None
    return safetensors.torch


# ---------------------------------------------------------------------------------------------
# Registration with transformers: when cast_rs is imported after transformers, now; otherwise
# as soon as transformers' quantizer registry is imported (a post-import hook), so that
# ``import cast_rs`` does not import transformers (a second of start-up) for users who never use
# it, and ``from_pretrained`` still knows "cast_rs" whatever the import order.

_HF_REGISTRY = "transformers.quantizers.auto"


def register_with_transformers() -> None:
    """Register cast-rs's quantization config and quantizer with ``transformers`` (idempotent;
    ``import cast_rs`` arranges it, this is for code that manipulates the registries)."""
    from ._hf_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``transformers.quantizers.auto`` is about to load, wraps its
    loader so that cast-rs registers right after the module has run."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != _HF_REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        _remove_hook()
        register_with_transformers()


_HOOK = _RegisterAfterImport()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install_transformers_hook() -> None:
    """Called by ``import cast_rs``."""
    if _HF_REGISTRY in sys.modules:
        register_with_transformers()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
