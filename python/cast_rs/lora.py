"""LoRA on an N:M model that stays N:M: masked adapters with Hugging Face ``peft``.

A plain LoRA update ``ΔW = s·B·A`` is dense: merged into a finalized 2:4 weight it fills every
group, and masking it back by hand drops about half of its energy. :func:`lora` gives each N:M
layer peft's LoRA with the update masked to the layer's own N:M pattern, ``ΔW = (s·B·A)⊙M``,
in the forward pass too, so training sees exactly the model the merge produces::

    peft_model = cast_rs.lora(model, r=16, lora_alpha=32)   # or lora(model, LoraConfig(...))
    ...  train peft_model (your loop, or the HF Trainer)  ...
    peft_model.save_pretrained(path)                        # peft's files, as usual
    merged = cast_rs.merge_lora(peft_model)                 # = merge_and_unload(), checked N:M
    assert cast_rs.check_nm(merged, "2:4").ok

The adapters are peft's (``lora_A`` / ``lora_B``, same state-dict keys and files), so peft's
save and load, ``disable_adapter()``, ``set_adapter``, ``merge_and_unload()`` and the Trainer
work as with plain LoRA. Load a saved masked adapter with :func:`load_lora` (or give
``PeftModel.from_pretrained`` the config from :func:`lora_config`): peft's own loader would
make plain layers, which compute an unmasked update.

A plain peft adapter on an N:M model is not N:M once merged. :func:`check_lora` reports which
adapted layers would lose N:M and how much of the update lies off the mask;
:func:`merge_lora` refuses to merge such adapters unless asked to re-project them onto the
mask; :func:`reproject` restores N:M in a model that was already merged, against the N:M
weights it started from, and measures the update energy it drops.

Needs ``peft`` (``pip install peft``); ``import cast_rs`` does not.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._cast_rs import CastError
from .checking import _nm_layers, check_nm, count_violations
from .layers import SPARSE_MODULE_ATTR, layer_kind
from .nm import Pattern, format_pattern, nm_mask, parse_pattern
from .reports import Table

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig, PeftModel

__all__ = [
    "lora",
    "lora_config",
    "load_lora",
    "check_lora",
    "merge_lora",
    "reproject",
    "LoraReport",
    "LoraRow",
    "ReprojectReport",
    "ReprojectRow",
]


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is a test dependency
        raise ImportError("cast_rs.lora needs Hugging Face peft: pip install peft") from error
    return peft


def _register(config: "LoraConfig", n: int, m: int) -> "LoraConfig":
    from ._lora_layer import PATTERN_ATTR, NMLoraLinear

    peft = _peft()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config: expected a peft.LoraConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)
    mapping: Dict[type, type] = {nn.Linear: NMLoraLinear}
    try:
        from transformers.pytorch_utils import Conv1D

        mapping[Conv1D] = NMLoraLinear
    except ImportError:  # pragma: no cover - transformers comes with peft
        pass
    config._register_custom_module(mapping)
    setattr(config, PATTERN_ATTR, (n, m))
    return config


def lora_config(config: "LoraConfig", pattern: Pattern = "2:4") -> "LoraConfig":
    """A copy of ``config`` that makes masked N:M LoRA layers: peft's ``LoraConfig`` with
    :class:`~cast_rs._lora_layer.NMLoraLinear` registered for ``nn.Linear`` and ``Conv1D``
    (``LoraConfig._register_custom_module``). Use it where peft takes a config
    (``get_peft_model``, ``PeftModel.from_pretrained(..., config=...)``,
    ``peft_model.add_adapter``); :func:`lora` and :func:`load_lora` call it for you.

    Each targeted layer whose weight is exactly N:M gets the masked update; a targeted dense
    layer (an output head) gets plain LoRA. The registration is not saved in
    ``adapter_config.json`` (peft does not save custom modules): load with :func:`load_lora`.
    """
    n, m = parse_pattern(pattern)
    return _register(config, n, m)


def _check_model(model: nn.Module, n: int, m: int, caller: str) -> List[str]:
    """The names of the model's N:M layers; raise unless they are exactly N:M."""
    from ._markers import module_spec

    if any(module_spec(mod) is not None for mod in model.modules()):
        raise CastError(f"{caller}: the model is still being sparsified (sparsify without finalize): finalize it first")
    report = check_nm(model, (n, m))
    if not report.ok:
        raise CastError(
            f"{caller}: the model is not exactly {n}:{m} (finalize it first, or cast_rs.reproject a model a plain "
            f"LoRA merge made dense):\n{report}"
        )
    return [name for name, _, _ in _nm_layers(model, (n, m))]


def lora(
    model: nn.Module,
    config: Optional["LoraConfig"] = None,
    *,
    pattern: Pattern = "2:4",
    adapter_name: str = "default",
    **lora_kwargs: Any,
) -> "PeftModel":
    """Add masked LoRA adapters to a finalized N:M ``model`` (``peft.get_peft_model``).

    Every targeted N:M layer computes ``x (W + (s·B·A)⊙M)ᵀ + b`` with ``M`` its weight's N:M
    mask; merged, the update keeps ``W``'s support, so the model stays exactly N:M with the same
    mask. Targeted dense layers get plain LoRA.

    Args:
        model: a model whose N:M layers are exactly N:M (after ``finalize``, or loaded from a
            finalized checkpoint).
        config: a ``peft.LoraConfig``; without it, one is built from ``lora_kwargs``
            (``r``, ``lora_alpha``, ...) with ``target_modules`` the model's N:M layers.
        pattern: the model's N:M pattern.
        adapter_name: as peft's.

    Returns:
        peft's ``PeftModel``.

    Raises:
        CastError: the model is not exactly N:M, or still being sparsified; a LoRA variant
            (DoRA, ...) or an ``init_lora_weights`` that rewrites the base weight.
    """
    peft = _peft()
    n, m = parse_pattern(pattern)
    names = _check_model(model, n, m, "lora")
    if config is None:
        lora_kwargs.setdefault("target_modules", names)
        config = peft.LoraConfig(**lora_kwargs)
    elif lora_kwargs:
        raise TypeError(f"lora: give either config or LoraConfig keyword arguments, not both ({sorted(lora_kwargs)})")
    peft_model = peft.get_peft_model(model, _register(config, n, m), adapter_name=adapter_name)
    if not any(getattr(mod, "nm_masked", False) for mod in peft_model.modules()):
        warnings.warn(
            f"lora: the config targets none of the model's {n}:{m} layers ({', '.join(names[:4])}...): "
            "every adapter is plain LoRA on a dense layer",
            stacklevel=2,
        )
    return peft_model


def load_lora(
    model: nn.Module,
    path: str,
    *,
    pattern: Pattern = "2:4",
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> "PeftModel":
    """Load a masked adapter saved with ``save_pretrained`` onto the N:M ``model`` it was
    trained on (``PeftModel.from_pretrained`` with :func:`lora_config`'s config). ``kwargs``
    go to ``from_pretrained``. Raises ``CastError`` if the model is not exactly N:M."""
    peft = _peft()
    n, m = parse_pattern(pattern)
    _check_model(model, n, m, "load_lora")
    config = _register(peft.LoraConfig.from_pretrained(path), n, m)
    config.inference_mode = not is_trainable
    return peft.PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


# ---------------------------------------------------------------------- checking adapters


@dataclass
class LoraRow:
    name: str
    adapter: str
    base: str  # "2:4" or "dense"
    masked: bool
    active: bool
    off_mask_energy: float  # ‖ΔW⊙(1-M)‖² / ‖ΔW‖² of the update as trained (0 for masked adapters)
    update_norm: float  # ‖ΔW‖ as merged


class LoraReport(Table):
    """Result of :func:`check_lora`: one row per (adapted layer, adapter). ``ok`` is False when
    a plain (unmasked) adapter sits on an N:M layer: merging it would make the layer dense."""

    headers = ("layer", "adapter", "base", "update", "active", "energy off mask %", "‖ΔW‖")
    title = "check_lora"

    def _rows(self) -> List[Sequence[Any]]:
        return [
            (
                r.name,
                r.adapter,
                r.base,
                "masked" if r.masked else "plain",
                "yes" if r.active else "no",
                100 * r.off_mask_energy,
                r.update_norm,
            )
            for r in self
        ]

    def plain_on_nm(self, active_only: bool = True) -> List[LoraRow]:
        """The rows whose merge would break N:M."""
        return [r for r in self if r.base != "dense" and not r.masked and (r.active or not active_only)]

    @property
    def ok(self) -> bool:
        return not self.plain_on_nm()

    @property
    def off_mask_energy(self) -> float:
        """Of the plain adapters on N:M layers, the share of their updates' total energy
        (squared Frobenius norm) that lies off the masks: what re-projection drops."""
        rows = self.plain_on_nm()
        total = sum(r.update_norm**2 for r in rows)
        return sum(r.off_mask_energy * r.update_norm**2 for r in rows) / total if total > 0 else 0.0

    def __str__(self) -> str:
        self.title = "check_lora: " + (
            "OK" if self.ok else f"{len(self.plain_on_nm())} plain adapter(s) on N:M layers: merging them breaks N:M"
        )
        return super().__str__()


def _lora_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and hasattr(mod, "lora_A"):
            yield name, mod


def _is_nm(w: torch.Tensor, n: int, m: int, dim: int) -> bool:
    size = w.shape[-1] if dim == -1 else w.shape[0]
    return w.dim() == 2 and size % m == 0 and count_violations(w, n, m, dim)[0] == 0


def _base_mask(mod: nn.Module, n: int, m: int) -> Optional[Tuple[torch.Tensor, int]]:
    """(bool mask in the stored layout, group dim) of an adapted layer's N:M base, else None."""
    if getattr(mod, "nm_masked", False):
        return mod.nm_mask(), layer_kind(mod.get_base_layer())[1]
    base = mod.get_base_layer()
    kind = layer_kind(base)
    if kind is None or mod.merged:
        return None
    w = base.weight.detach()
    if not _is_nm(w, n, m, kind[1]):
        if getattr(base, SPARSE_MODULE_ATTR, None):
            raise CastError(
                f"layer of {type(base).__name__} marked N:M is not N:M any more (was a plain adapter merged?): "
                "cast_rs.reproject restores it"
            )
        return None
    return nm_mask(w, (n, m), dim=kind[1]), kind[1]


@torch.no_grad()
def check_lora(model: nn.Module, pattern: Pattern = "2:4") -> LoraReport:
    """Which adapted layers of a peft ``model`` sit on N:M weights, whether their adapters are
    masked, and for plain ones how much of the update lies off the N:M mask (what merging and
    re-projecting would drop). ``report.ok`` is False if merging the active adapters would
    break N:M. Call it before merging (a merged plain adapter has overwritten its base)."""
    n, m = parse_pattern(pattern)
    report = LoraReport()
    for name, mod in _lora_layers(model):
        found = _base_mask(mod, n, m)
        active = set(mod.active_adapters)
        for adapter in mod.lora_A:
            plain = _plain_delta(mod, adapter)
            masked = bool(getattr(mod, "nm_masked", False))
            if found is None:
                report.append(LoraRow(name, adapter, "dense", False, adapter in active, 0.0, float(plain.norm())))
                continue
            mask = found[0]
            total = float(plain.square().sum(dtype=torch.float64))
            off = float(plain.masked_fill(mask, 0).square().sum(dtype=torch.float64))
            merged = plain * mask if masked else plain
            report.append(
                LoraRow(
                    name,
                    adapter,
                    format_pattern((n, m)),
                    masked,
                    adapter in active,
                    0.0 if masked or total == 0 else off / total,
                    float(merged.norm()),
                )
            )
    return report


def _plain_delta(mod: nn.Module, adapter: str) -> torch.Tensor:
    """``s·B·A`` in the base weight's stored layout, float32 or wider."""
    a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    cdt = torch.promote_types(a.dtype, torch.float32)
    delta = torch.mm(b.to(cdt) * mod.scaling[adapter], a.to(cdt))
    return delta.t() if getattr(mod, "fan_in_fan_out", False) else delta


def merge_lora(model: "PeftModel", *, reproject: bool = False, pattern: Pattern = "2:4", safe_merge: bool = True) -> nn.Module:
    """``model.merge_and_unload()``, checked: the merged model's N:M layers are exactly N:M.

    Masked adapters (:func:`lora`) merge exactly. A plain adapter on an N:M layer would make it
    dense: without ``reproject`` this raises ``CastError`` before anything changes, naming the
    layers and the share of the update re-projection would drop; with ``reproject=True`` such
    layers are merged and then masked back to their N:M pattern (a ``UserWarning`` says how
    much update energy that dropped). Returns the base model with the adapters merged.
    """
    n, m = parse_pattern(pattern)
    report = check_lora(model, (n, m))
    bad = report.plain_on_nm()
    if bad and not reproject:
        names = sorted({r.name for r in bad})
        raise CastError(
            f"merge_lora: {len(names)} layer(s) have plain (unmasked) LoRA adapters on {n}:{m} weights "
            f"({', '.join(names[:4])}{'...' if len(names) > 4 else ''}); merged, they would be dense, not {n}:{m}. "
            f"Masking the merged weights back (merge_lora(model, reproject=True)) drops "
            f"{100 * report.off_mask_energy:.1f}% of their update's energy; adapters trained with cast_rs.lora lose "
            f"nothing.\n{report}"
        )
    plain_masks: List[Tuple[torch.Tensor, torch.Tensor]] = []
    nm_weights: List[Tuple[str, torch.Tensor, int]] = []
    bad_names = {r.name for r in bad}
    for name, mod in _lora_layers(model):
        found = _base_mask(mod, n, m)
        if found is None:
            continue
        w = mod.get_base_layer().weight
        nm_weights.append((name, w, found[1]))
        if name in bad_names:
            plain_masks.append((w, found[0]))
    merged = model.merge_and_unload(safe_merge=safe_merge)
    with torch.no_grad():
        for w, mask in plain_masks:
            w.mul_(mask)
    for name, w, dim in nm_weights:
        if count_violations(w, n, m, dim)[0]:  # pragma: no cover - would be a bug in the masked merge
            raise CastError(f"merge_lora: layer {name!r} is not {n}:{m} after merging")
    if plain_masks:
        warnings.warn(
            f"merge_lora: re-projected {len(plain_masks)} layer(s) with plain LoRA adapters onto their {n}:{m} masks, "
            f"dropping {100 * report.off_mask_energy:.1f}% of their update's energy",
            stacklevel=2,
        )
    return merged


# ---------------------------------------------------------------------- re-projection


@dataclass
class ReprojectRow:
    name: str
    shape: Tuple[int, ...]
    was_violating: int  # groups with more than N nonzeros before
    energy_lost: float  # ‖(W - W₀)⊙(1-M)‖² / ‖W - W₀‖²
    update_norm: float  # ‖W - W₀‖


class ReprojectReport(Table):
    """What :func:`reproject` did, per layer; ``energy_lost``: over all layers, the share of
    the update's energy (``‖W - W₀‖²``) the masks removed."""

    headers = ("layer", "shape", "violating groups before", "update energy lost %", "‖W - W₀‖")
    title = "reproject"

    def _rows(self) -> List[Sequence[Any]]:
        return [(r.name, r.shape, r.was_violating, 100 * r.energy_lost, r.update_norm) for r in self]

    @property
    def energy_lost(self) -> float:
        total = sum(r.update_norm**2 for r in self)
        return sum(r.energy_lost * r.update_norm**2 for r in self) / total if total > 0 else 0.0


@torch.no_grad()
def reproject(
    model: nn.Module, masks_from: Union[nn.Module, Mapping[str, torch.Tensor]], pattern: Pattern = "2:4"
) -> ReprojectReport:
    """Make ``model`` N:M again, in place, with the masks of the N:M weights it started from.

    For a model into which a plain LoRA adapter was merged (``merge_and_unload()``): each layer
    that is N:M in ``masks_from`` (the N:M model the adapter was trained on, or its
    ``state_dict``; same layer names) has its weight multiplied by that weight's N:M mask. The
    report gives, per layer, the share of the update ``W - W₀`` the mask removed.

    Raises:
        CastError: ``masks_from`` has no N:M layer in common with ``model``, or shapes differ.
    """
    n, m = parse_pattern(pattern)
    if isinstance(masks_from, nn.Module):
        ref = {name + ".weight": mod.weight.detach() for name, mod in masks_from.named_modules() if layer_kind(mod)}
    elif isinstance(masks_from, Mapping):
        ref = dict(masks_from)
    else:
        raise TypeError(f"masks_from: expected an nn.Module or a state_dict, got {type(masks_from).__name__}")
    report = ReprojectReport()
    for name, mod in model.named_modules():
        kind = layer_kind(mod)
        w0 = ref.get(name + ".weight")
        if kind is None or not isinstance(w0, torch.Tensor):
            continue
        w = mod.weight
        if tuple(w0.shape) != tuple(w.shape):
            raise CastError(f"masks_from: layer {name!r} has shape {tuple(w0.shape)}, the model's is {tuple(w.shape)}")
        w0 = w0.to(w.device)
        if not _is_nm(w0, n, m, kind[1]):
            continue
        keep = nm_mask(w0, (n, m), dim=kind[1])
        before = count_violations(w, n, m, kind[1])[0]
        delta = w.detach().to(torch.float64) - w0.to(torch.float64)
        total = float(delta.square().sum())
        lost = float(delta.masked_fill(keep, 0).square().sum())
        w.mul_(keep)
        report.append(ReprojectRow(name, tuple(w.shape), before, lost / total if total > 0 else 0.0, total**0.5))
    if not report:
        raise CastError(f"masks_from: no layer of it is {n}:{m} under the same name in the model")
    return report
