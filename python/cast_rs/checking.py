"""Checking that a model is N:M (:func:`check_nm`) and keeping it so while it trains further
(:func:`keep_nm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Any, Tuple, Union

import torch
from torch import nn

from . import _dtensor
from ._markers import original_weight
from ._mask_guard import MaskGuard
from .nm import Pattern, format_pattern, parse_pattern
from .reports import Table
from .layers import SPARSE_MODULE_ATTR, effective_full_weight, find_layers, layer_kind

__all__ = ["check_nm", "keep_nm", "NMReport", "NMRow"]


@dataclass
class NMRow:
    name: str
    shape: Tuple[int, ...]
    dim: int
    groups: int
    violating_groups: int
    zero_fraction: float
    nonfinite: int = 0  # NaN / inf entries: such a weight is not a usable N:M weight


class NMReport(Table):
    """Result of :func:`check_nm`: ``.ok`` and one row per checked tensor."""

    headers = ("layer", "shape", "group dim", "groups", "violating", "zero %", "non-finite")
    pattern: str = ""

    def _rows(self) -> List[Sequence[Any]]:
        return [(r.name, r.shape, r.dim, r.groups, r.violating_groups, 100 * r.zero_fraction, r.nonfinite) for r in self]

    @property
    def ok(self) -> bool:
        """Something was checked, every group has at most N nonzeros and every value is finite."""
        return len(self) > 0 and all(r.violating_groups == 0 and r.nonfinite == 0 for r in self)

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "NOT N:M"
        self.title = f"check_nm {self.pattern}: {verdict}"
        return super().__str__()


def count_violations(w: torch.Tensor, n: int, m: int, dim: int) -> Tuple[int, int]:
    """``(groups with more than n nonzeros, groups)`` of ``w``, groups of m along ``dim``."""
    nz = w.detach() != 0
    if dim == -1:
        per_group = nz.reshape(-1, m).sum(-1)
    else:
        per_group = nz.reshape(w.shape[0] // m, m, -1).sum(1)
    return int((per_group > n).sum()), per_group.numel()


def _nonfinite(w: torch.Tensor) -> int:
    return int((~torch.isfinite(w.detach())).sum())


def check_nm(model_or_tensor: Union[nn.Module, torch.Tensor], pattern: Pattern = "2:4", *, dim: int = -1) -> NMReport:
    """Check that weights are N:M: at most N nonzeros in every group of M.

    For a tensor: one row, groups along ``dim`` (-1 or 0). For a model: the layers that
    :func:`sparsify` made sparse (they carry a marker, also after ``finalize``); a model that
    was never sparsified (e.g. a finalized state dict loaded into a fresh model) has the layers
    that ``sparsify`` would pick checked: every ``nn.Linear`` / ``Conv1D`` whose input
    dimension M divides, except the output head and heads tied to an embedding. ``report.ok``
    is True when every checked group passes and every checked value is finite (and something
    was checked).
    """
    n, m = parse_pattern(pattern)
    report = NMReport()
    report.pattern = format_pattern((n, m))
    if isinstance(model_or_tensor, torch.Tensor):
        t = _dtensor.full(model_or_tensor)
        d = -1 if dim in (-1, t.dim() - 1) else 0
        size = t.shape[-1] if d == -1 else t.shape[0]
        if t.dim() == 0 or size % m:
            raise ValueError(f"tensor: shape {tuple(t.shape)} cannot hold {n}:{m} groups along dim {dim}")
        bad, groups = count_violations(t, n, m, d)
        report.append(NMRow("tensor", tuple(t.shape), d, groups, bad, float((t == 0).float().mean()), _nonfinite(t)))
        return report
    if not isinstance(model_or_tensor, nn.Module):
        raise TypeError(f"model_or_tensor: expected an nn.Module or a torch.Tensor, got {type(model_or_tensor).__name__}")
    for name, mod, d in _nm_layers(model_or_tensor, (n, m)):
        w = effective_full_weight(mod)  # scaled, if still parametrized; gathered if DTensor
        bad, groups = count_violations(w, n, m, d)
        report.append(NMRow(name, tuple(w.shape), d, groups, bad, float((w.detach() == 0).float().mean()), _nonfinite(w)))
    return report


def _nm_layers(model: nn.Module, pattern: Tuple[int, int]) -> List[Tuple[str, nn.Module, int]]:
    """(name, module, group dim) of the layers that are meant to be N:M: those :func:`sparsify`
    made sparse (they carry a marker, also after ``finalize`` and in a deep copy), else what
    ``sparsify`` would pick by default: every Linear / Conv1D whose input dimension M divides,
    except heads tied to an embedding."""
    marked = [(name, mod) for name, mod in model.named_modules() if getattr(mod, SPARSE_MODULE_ATTR, None)]
    if marked:
        return [(name, mod, layer_kind(mod)[1]) for name, mod in marked if layer_kind(mod)]
    picked, _ = find_layers(model, pattern)
    return [(name, mod, d) for name, mod, _, d in picked]


def keep_nm(model: nn.Module, pattern: Pattern = "2:4") -> MaskGuard:
    """Keep an exactly N:M model N:M while it is trained further: after every optimizer step
    (any ``torch.optim`` optimizer) masked weights are set back to 0, and their gradients are
    masked as they are accumulated. :meth:`SparseModel.finalize` does this by itself; call
    ``keep_nm`` for a model that ``finalize`` did not touch: a fresh model loaded with finalized
    weights, or a ``copy.deepcopy`` of a finalized one. The layers are those :func:`check_nm`
    checks, and each keeps the support it has now.

    Returns the guard; ``guard.release()`` lets the weights become dense again. Raises
    ``ValueError`` if the model is not exactly N:M (finalize it first).
    """
    n, m = parse_pattern(pattern)
    report = check_nm(model, (n, m))
    if not report.ok:
        raise ValueError(f"keep_nm: the model is not exactly {n}:{m} (finalize it first):\n{report}")
    return MaskGuard([(original_weight(mod), (n, m), d) for _, mod, d in _nm_layers(model, (n, m))])
