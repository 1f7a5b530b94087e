"""Baselines to compare CAST against, on the same Rust N:M mask kernel and layer rules.

* :func:`magnitude_prune` — one-shot: keep the N largest |W| per group.
* :func:`wanda_prune` — one-shot Wanda: score ``|W| · ‖X_c‖₂`` with the input-channel norms
  of calibration activations (collected with forward hooks).
* :class:`SRSTE` — sparse-refined straight-through training: the forward pass uses
  ``W ⊙ m`` with ``m`` recomputed from W at every forward, the gradient goes straight through
  to the dense W, plus ``λ_W · (1 − m) ⊙ W``; works with any optimizer.

Each takes the same ``include`` / ``exclude`` rules as :func:`cast_rs.sparsify` and marks the
pruned layers so that :func:`cast_rs.check_nm` checks them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nm import Pattern, format_pattern, nm_mask, parse_pattern
from .sparsity import SPARSE_MODULE_ATTR, Rules, find_layers

__all__ = ["magnitude_prune", "wanda_prune", "SRSTE"]


@torch.no_grad()
def magnitude_prune(model: nn.Module, pattern: Pattern = "2:4", *, include: Rules = None, exclude: Rules = None) -> List[str]:
    """One-shot magnitude N:M pruning in place. Returns the pruned layer names."""
    n, m = parse_pattern(pattern)
    picked, _ = find_layers(model, (n, m), include=include, exclude=exclude)
    for _name, mod, _, dim in picked:
        w = mod.weight
        w.mul_(nm_mask(w, (n, m), dim=dim))
        setattr(mod, SPARSE_MODULE_ATTR, format_pattern((n, m)))
    return [name for name, *_ in picked]


@torch.no_grad()
def wanda_prune(
    model: nn.Module,
    calibration: Iterable[Any],
    pattern: Pattern = "2:4",
    *,
    include: Rules = None,
    exclude: Rules = None,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> List[str]:
    """One-shot Wanda N:M pruning (Sun et al. 2023) in place. Returns the pruned layer names.

    Args:
        calibration: batches to run through the model (e.g. a few token batches).
        forward: how to run a batch (default ``model(batch)``).

    Every chosen layer's input activations are collected with a forward hook as the running
    sum of squares per input channel over all calibration tokens; the score of weight
    ``W[r, c]`` is ``|W[r, c]| · ‖X_c‖₂`` and the mask keeps the N best-scoring weights of each
    group of M along the input dimension. All layers are scored from the same dense pass.
    """
    n, m = parse_pattern(pattern)
    picked, _ = find_layers(model, (n, m), include=include, exclude=exclude)
    sq: Dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod, _, dim in picked:
        in_dim = mod.weight.shape[-1] if dim == -1 else mod.weight.shape[0]

        def hook(module: nn.Module, args: Tuple[Any, ...], _name: str = name, _in: int = in_dim) -> None:
            x = args[0].detach().reshape(-1, _in).float()
            acc = sq.setdefault(_name, torch.zeros(_in, dtype=torch.float64, device=x.device))
            acc += x.pow(2).sum(0).double()

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        batches = 0
        for batch in calibration:
            (forward or (lambda mdl, b: mdl(b)))(model, batch)
            batches += 1
        if batches == 0:
            raise ValueError("calibration: expected at least one batch")
    finally:
        for h in hooks:
            h.remove()
    for name, mod, _, dim in picked:
        w = mod.weight
        norm = sq[name].sqrt().to(w.dtype)
        score = w.abs() * (norm.unsqueeze(0) if dim == -1 else norm.unsqueeze(1))
        w.mul_(nm_mask(score, (n, m), dim=dim))
        setattr(mod, SPARSE_MODULE_ATTR, format_pattern((n, m)))
    return [name for name, *_ in picked]


class _MaskSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, n: int, m: int, dim: int, decay: float) -> torch.Tensor:
        keep = nm_mask(w.detach(), (n, m), dim=dim)
        ctx.save_for_backward(w, keep)
        ctx.decay = decay
        return w * keep

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        w, keep = ctx.saved_tensors
        # Straight through to the dense weight, plus the SR-STE refinement on pruned weights.
        return grad + ctx.decay * (~keep) * w, None, None, None, None


class _SRSTEMask(nn.Module):
    def __init__(self, n: int, m: int, dim: int, decay: float) -> None:
        super().__init__()
        self.n, self.m, self.dim, self.decay = n, m, dim, decay

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _MaskSTE.apply(w, self.n, self.m, self.dim, self.decay)


class SRSTE:
    """SR-STE (Zhou et al. 2021) on a model, in place.

    ``SRSTE(model, "2:4", decay=2e-4)`` reparametrizes every chosen weight so that the forward
    pass uses ``W ⊙ m(W)`` (mask recomputed at every forward) and the backward pass gives the
    dense W the gradient ``∂L/∂(W⊙m) + decay · (1 − m) ⊙ W``. Train with any optimizer over
    ``model.parameters()``; call :meth:`finalize` to leave exact N:M plain weights.
    """

    def __init__(self, model: nn.Module, pattern: Pattern = "2:4", *, decay: float = 2e-4,
                 include: Rules = None, exclude: Rules = None) -> None:
        if not decay >= 0:
            raise ValueError(f"decay: expected a value >= 0, got {decay}")
        self.model = model
        self.pattern = parse_pattern(pattern)
        n, m = self.pattern
        picked, self.skipped = find_layers(model, (n, m), include=include, exclude=exclude)
        self.layers = []
        for name, mod, _, dim in picked:
            parametrize.register_parametrization(mod, "weight", _SRSTEMask(n, m, dim, decay))
            self.layers.append((name, mod, dim))

    @torch.no_grad()
    def finalize(self) -> List[str]:
        """Apply the final masks and remove the reparametrization. Returns the layer names."""
        n, m = self.pattern
        for _name, mod, dim in self.layers:
            w = mod.parametrizations.weight.original
            keep = nm_mask(w, (n, m), dim=dim)
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight.mul_(keep)
            setattr(mod, SPARSE_MODULE_ATTR, format_pattern((n, m)))
        return [name for name, *_ in self.layers]
