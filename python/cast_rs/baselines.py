"""Baselines to compare CAST against, on the same Rust N:M mask kernel and layer rules.

* :func:`magnitude_prune` — one-shot: keep the N largest |W| per group.
* :func:`wanda_prune` — one-shot Wanda: score ``|W| · ‖X_c‖₂`` with the input-channel norms
  of calibration activations (collected with forward hooks).
* :func:`sparsegpt_prune` — one-shot SparseGPT (Frantar & Alistarh 2023): per layer, the
  calibration Hessian ``H = 2·X·Xᵀ``, then column by column the N:M selection by the OBS
  saliency ``w² / [H⁻¹]_qq`` and the OBS update of the columns not yet visited.
* :class:`SRSTE` — sparse-refined straight-through training: the forward pass uses
  ``W ⊙ m`` with ``m`` recomputed from W at every forward, the gradient goes straight through
  to the dense W, plus ``λ_W · (1 − m) ⊙ W``; works with any optimizer.
* :class:`FixedMask` — the recipe practitioners use (NVIDIA ModelOpt's "sparsity-aware
  training", llm-compressor's constant pruning): prune once (magnitude, Wanda or SparseGPT),
  then fine-tune with the mask held fixed, with any optimizer and any loss (distillation
  included).

Each takes the same ``include`` / ``exclude`` / ``include_head`` rules as
:func:`cast_rs.sparsify` (the output head stays dense by default) and marks the pruned layers
so that :func:`cast_rs.check_nm` checks them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._mask_guard import MaskGuard
from .nm import Pattern, format_pattern, nm_mask, parse_pattern
from .layers import SPARSE_MODULE_ATTR, Rules, find_layers

if TYPE_CHECKING:
    from .checking import NMReport

__all__ = ["magnitude_prune", "wanda_prune", "sparsegpt_prune", "sparsegpt_nm", "SRSTE", "FixedMask"]


@torch.no_grad()
def magnitude_prune(
    model: nn.Module, pattern: Pattern = "2:4", *, include: Rules = None, exclude: Rules = None, include_head: bool = False
) -> List[str]:
    """One-shot magnitude N:M pruning in place. Returns the pruned layer names."""
    n, m = parse_pattern(pattern)
    picked, _ = find_layers(model, (n, m), include=include, exclude=exclude, include_head=include_head)
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
    include_head: bool = False,
) -> List[str]:
    """One-shot Wanda N:M pruning (Sun et al. 2023) in place. Returns the pruned layer names.

    Args:
        calibration: batches to run through the model (e.g. a few token batches).
        forward: how to run a batch (default ``model(batch)``).
        include_head: also prune the output head (default: it stays dense).

    Every chosen layer's input activations are collected with a forward hook as the running
    sum of squares per input channel over all calibration tokens; the score of weight
    ``W[r, c]`` is ``|W[r, c]| · ‖X_c‖₂`` and the mask keeps the N best-scoring weights of each
    group of M along the input dimension. All layers are scored from the same dense pass.
    """
    n, m = parse_pattern(pattern)
    picked, _ = find_layers(model, (n, m), include=include, exclude=exclude, include_head=include_head)
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

    def __init__(
        self,
        model: nn.Module,
        pattern: Pattern = "2:4",
        *,
        decay: float = 2e-4,
        include: Rules = None,
        exclude: Rules = None,
        include_head: bool = False,
    ) -> None:
        if not decay >= 0:
            raise ValueError(f"decay: expected a value >= 0, got {decay}")
        self.model = model
        self.pattern = parse_pattern(pattern)
        n, m = self.pattern
        picked, self.skipped = find_layers(model, (n, m), include=include, exclude=exclude, include_head=include_head)
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


@torch.no_grad()
def sparsegpt_nm(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern = "2:4",
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M solver for one weight: ``(pruned weight, keep mask)``; inputs unchanged.

    Args:
        weight: ``[rows, columns]``, groups of M along the columns (an ``nn.Linear`` weight).
        hessian: ``[columns, columns]``, ``2·X·Xᵀ`` of the layer's inputs (any positive scale).
        blocksize: columns per lazy batch update (a multiple of M); changes only rounding.
        percdamp: dampening added to the diagonal, as a fraction of its mean.

    The algorithm (Frantar & Alistarh 2023, with their N:M selection): with ``U`` the upper
    Cholesky factor of ``(H + δI)⁻¹``, the columns are visited in order; at the first column
    of each group of M, the M − N weights of the group with the smallest saliency
    ``w² / U[q, q]²`` (``U[q, q]²`` is ``[H⁻¹]_qq`` once the earlier columns are fixed) are
    pruned; each visited column's error ``(w − q) / U[i, i]`` is spread over the columns not yet
    visited along row ``i`` of ``U`` (the optimal-brain-surgeon update). Columns that never saw
    an input (zero diagonal) are pruned to zero. Computed in float64 when ``hessian`` is
    float64, else in float32, as the reference implementation.

    Raises:
        ValueError: shapes, pattern, ``blocksize`` or ``percdamp`` out of range, or a Hessian
            that is not positive definite after dampening (non-finite inputs, for example).
    """
    n, m = parse_pattern(pattern)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight: expected a 2-D floating-point [rows, columns] tensor, got {getattr(weight, 'shape', type(weight).__name__)}"
        )
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"weight: expected a column count divisible by M={m}, got {cols}")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian: expected shape ({cols}, {cols}), got {tuple(getattr(hessian, 'shape', ()))}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % m:
        raise ValueError(f"blocksize: expected a positive multiple of M={m}, got {blocksize!r}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp: expected a finite number >= 0, got {percdamp!r}")
    dt = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    w_all = weight.detach().to(dt).clone()
    h = hessian.detach().to(dt).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w_all[:, dead] = 0
    h.diagonal().add_(percdamp * torch.diagonal(h).mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0 or not bool(torch.isfinite(h).all()):
        raise ValueError(
            "hessian: not positive definite after dampening (non-finite or degenerate "
            "calibration inputs?); raise percdamp or check the calibration data"
        )
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    cut = m - n
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w_all[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        for i in range(i2 - i1):
            if i % m == 0:
                saliency = w1[:, i : i + m].square() / d1[i : i + m].square().unsqueeze(0)
                drop = torch.topk(saliency, cut, dim=1, largest=False).indices
                pruned[:, i1 + i : i1 + i + m].scatter_(1, drop, True)
            w = w1[:, i]
            q = w.masked_fill(pruned[:, i1 + i], 0)
            q1[:, i] = q
            err = (w - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w_all[:, i1:i2] = q1
        w_all[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w_all.to(weight.dtype), ~pruned


def _input_sums(
    model: nn.Module, layers: List[Tuple[str, nn.Module, int]], batches: List[Any], run: Callable[[nn.Module, Any], Any]
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``Σ x·xᵀ / tokens`` of each layer's inputs over the calibration batches (float64), and
    the order in which the layers first ran."""
    acc: Dict[str, torch.Tensor] = {}
    count: Dict[str, int] = {}
    order: List[str] = []
    hooks = []
    for name, mod, in_dim in layers:

        def hook(module: nn.Module, args: Tuple[Any, ...], _name: str = name, _in: int = in_dim) -> None:
            x = args[0].detach().reshape(-1, _in).double()
            if _name not in acc:
                acc[_name] = torch.zeros(_in, _in, dtype=torch.float64, device=x.device)
                count[_name] = 0
                order.append(_name)
            acc[_name] += x.T @ x
            count[_name] += x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: 2 * v / count[k] for k, v in acc.items()}, order


@torch.no_grad()
def sparsegpt_prune(
    model: nn.Module,
    calibration: Iterable[Any],
    pattern: Pattern = "2:4",
    *,
    include: Rules = None,
    exclude: Rules = None,
    include_head: bool = False,
    forward: Optional[Callable[[nn.Module, Any], Any]] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    sequential: bool = True,
) -> List[str]:
    """One-shot SparseGPT N:M pruning (Frantar & Alistarh 2023) in place. Returns the pruned
    layer names, in the order they were pruned.

    Args:
        calibration: batches to run through the model (a few token batches); iterated once per
            layer when ``sequential``.
        forward: how to run a batch (default ``model(batch)``).
        blocksize, percdamp: as :func:`sparsegpt_nm` (the reference implementation's 128, 0.01).
        sequential: True (default, as the reference implementation): the layers are pruned in
            the order the model runs them, each from a calibration pass through the model with
            the layers before it already pruned, so later layers correct earlier layers' error
            (one calibration pass per layer). False: every layer from one dense pass.

    The kept weights change (the OBS update), unlike magnitude or Wanda pruning. On an error
    (for example a layer that no calibration batch reaches) the model is left as it was.
    """
    n, m = parse_pattern(pattern)
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential: expected a bool, got {sequential!r}")
    picked, _ = find_layers(model, (n, m), include=include, exclude=exclude, include_head=include_head)
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration: expected at least one batch")
    run = forward or (lambda mdl, b: mdl(b))
    layers = {name: (mod, dim, mod.weight.shape[-1] if dim == -1 else mod.weight.shape[0]) for name, mod, _, dim in picked}
    todo = [(name, mod, in_dim) for name, (mod, _, in_dim) in layers.items()]
    hess, order = _input_sums(model, todo, batches, run)
    missing = [name for name in layers if name not in hess]
    if missing:
        raise ValueError(f"calibration: layer {missing[0]!r} received no input from the calibration batches")
    saved = {name: mod.weight.detach().clone() for name, (mod, _, _) in layers.items()}
    done: List[str] = []
    try:
        for k, name in enumerate(order):
            if sequential and k > 0:
                hess, _ = _input_sums(model, [(name, layers[name][0], layers[name][2])], batches, run)
            mod, dim, _ = layers[name]
            w = mod.weight
            mat = w.detach() if dim == -1 else w.detach().T
            try:
                new, _keep = sparsegpt_nm(mat, hess[name].float(), (n, m), blocksize=blocksize, percdamp=percdamp)
            except ValueError as err:
                raise ValueError(f"sparsegpt_prune: layer {name!r}: {err}") from None
            w.copy_(new if dim == -1 else new.T)
            setattr(mod, SPARSE_MODULE_ATTR, format_pattern((n, m)))
            done.append(name)
    except BaseException:
        for name, w0 in saved.items():
            mod = layers[name][0]
            mod.weight.copy_(w0)
            if name in done and hasattr(mod, SPARSE_MODULE_ATTR):
                delattr(mod, SPARSE_MODULE_ATTR)
        raise
    return done


class FixedMask:
    """Prune once, then train with the mask held fixed: the recipe most 2:4 models are made with
    today (NVIDIA ModelOpt's sparsity-aware training; llm-compressor's constant pruning).

    ``FixedMask(model, "2:4", score="sparsegpt", calibration=batches)`` prunes the chosen layers
    in place (``score``: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``; the last two need
    ``calibration`` and take ``forward``; ``prune_options`` go to :func:`sparsegpt_prune`) and
    holds their support: while the model trains, with **any** ``torch.optim`` optimizer and
    any loss (:func:`cast_rs.distill_loss` for distillation), the pruned weights' gradients are
    zeroed as they accumulate and the weights are set back to zero after every optimizer step
    (the guard of :func:`cast_rs.keep_nm`). The forward pass is the sparse model's from the
    first step. :meth:`finalize` checks the model is exact N:M; :meth:`release` lets the
    weights become dense again.
    """

    SCORES = ("magnitude", "wanda", "sparsegpt")

    def __init__(
        self,
        model: nn.Module,
        pattern: Pattern = "2:4",
        *,
        score: str = "magnitude",
        calibration: Optional[Iterable[Any]] = None,
        forward: Optional[Callable[[nn.Module, Any], Any]] = None,
        include: Rules = None,
        exclude: Rules = None,
        include_head: bool = False,
        **prune_options: Any,
    ) -> None:
        if score not in self.SCORES:
            raise ValueError(f"score: expected one of {', '.join(self.SCORES)}, got {score!r}")
        if score == "magnitude":
            if calibration is not None or forward is not None or prune_options:
                raise ValueError("calibration / forward / prune options: not used by score='magnitude'")
        elif calibration is None:
            raise ValueError(f"calibration: score={score!r} needs calibration batches")
        elif score == "wanda" and prune_options:
            raise ValueError(f"prune options {sorted(prune_options)}: not used by score='wanda'")
        self.model = model
        self.pattern = parse_pattern(pattern)
        self.score = score
        rules: Dict[str, Any] = dict(include=include, exclude=exclude, include_head=include_head)
        dims = {name: dim for name, _, _, dim in find_layers(model, self.pattern, **rules)[0]}
        if score == "magnitude":
            self.layers = magnitude_prune(model, self.pattern, **rules)
        elif score == "wanda":
            self.layers = wanda_prune(model, calibration, self.pattern, forward=forward, **rules)
        else:
            self.layers = sparsegpt_prune(model, calibration, self.pattern, forward=forward, **rules, **prune_options)
        mods = dict(model.named_modules())
        self.guard = MaskGuard([(mods[name].weight, self.pattern, dims[name]) for name in self.layers])

    def finalize(self) -> "NMReport":
        """The exact N:M check of the pruned layers (:func:`cast_rs.check_nm`). The guard stays:
        training further keeps the mask until :meth:`release`."""
        from .checking import check_nm

        report = check_nm(self.model, self.pattern)
        if not report.ok:
            raise RuntimeError(f"FixedMask: the model is no longer exactly {format_pattern(self.pattern)}:\n{report}")
        return report

    def release(self) -> None:
        """Stop holding the mask (the weights may then become dense again)."""
        self.guard.release()
