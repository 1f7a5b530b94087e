"""Model surgery for existing training loops: ``sparsify`` → train → ``finalize``.

(Checking a model, :func:`~cast_rs.check_nm` and :func:`~cast_rs.keep_nm`, lives in
``checking``; leaving cast-rs's structures, ``export_semi_structured`` and
``plain_state_dict``, in ``export``.)

Which layers become N:M, and which stay dense with their reason in ``SparseModel.skipped``,
is decided by :mod:`cast_rs.layers` (:func:`~cast_rs.layers.find_layers`): ``nn.Linear`` and
GPT-2-style ``Conv1D`` layers whose input dimension M divides, except the output head (unless
``include_head=True``), layers tied to an embedding and those the ``include`` / ``exclude``
rules leave out.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _dtensor
from ._cast_rs import CastError
from ._mask_guard import MaskGuard
from ._record import make_record, set_record, unmark_hf_model
from ._markers import NM_ATTR, mark, module_spec, original_weight, unmark
from .layers import SPARSE_MODULE_ATTR, Rules, SkippedLayer, find_layers
from .nm import Pattern, format_pattern, nm_mask, parse_pattern
from .reports import Table
from .scaling import WeightScale, scale_weight

__all__ = [
    "sparsify",
    "SparseModel",
    "SparseLayer",
    "FinalizeReport",
    "SparsityStats",
]


@dataclass
class SparseLayer:
    """One layer that ``sparsify`` made N:M."""

    name: str
    kind: str
    shape: Tuple[int, ...]
    dim: int
    pattern: str
    scaling_groups: int
    module: nn.Module = field(repr=False, compare=False)

    @property
    def weight(self) -> torch.Tensor:
        return original_weight(self.module)


class LayerTable(Table):
    headers = ("layer", "type", "shape", "group dim", "pattern", "scale groups")
    title = "sparse layers"

    def _rows(self) -> List[Sequence[Any]]:
        return [
            (l.name, l.kind, l.shape, "in (last)" if l.dim == -1 else "in (dim 0)", l.pattern, l.scaling_groups or "-")
            for l in self
        ]


class SkippedTable(Table):
    headers = ("layer", "type", "shape", "reason")
    title = "left dense"

    def _rows(self) -> List[Sequence[Any]]:
        return [(s.name, s.kind, s.shape, s.reason) for s in self]


@dataclass
class LayerFinal:
    name: str
    shape: Tuple[int, ...]
    l1_removed: float
    l1_removed_fraction: float
    kept_fraction: float


class FinalizeReport(Table):
    """What ``SparseModel.finalize`` did, one row per layer; ``total_l1_removed_fraction``."""

    headers = ("layer", "shape", "L1 removed", "L1 removed %", "nonzero %")
    title = "finalize"

    def _rows(self) -> List[Sequence[Any]]:
        return [(r.name, r.shape, r.l1_removed, 100 * r.l1_removed_fraction, 100 * r.kept_fraction) for r in self]

    @property
    def total_l1_removed_fraction(self) -> float:
        removed = sum(r.l1_removed for r in self)
        total = sum(r.l1_removed / r.l1_removed_fraction if r.l1_removed_fraction > 0 else 0.0 for r in self)
        return removed / total if total > 0 else 0.0


@dataclass
class LayerStats:
    name: str
    sparse_ratio: float
    mask_flip_rate: Optional[float]


class SparsityStats(Table):
    """``‖W⊙m‖₁ / ‖W‖₁`` per layer (→ 1 as masked weights reach 0) and the last flip rate."""

    headers = ("layer", "sparse weight ratio", "last mask flip rate")
    title = "sparsity"
    overall: float = float("nan")

    def _rows(self) -> List[Sequence[Any]]:
        rows = [(r.name, r.sparse_ratio, "-" if r.mask_flip_rate is None else r.mask_flip_rate) for r in self]
        rows.append(("(all)", self.overall, "-"))
        return rows


def _integer_arg(x) -> Optional[int]:
    """``x`` as an int if it is an integer (Python, NumPy or a whole float), else None."""
    try:
        v = operator.index(x)
    except TypeError:
        return int(x) if isinstance(x, float) and x.is_integer() else None
    return int(v)


def _positive_finite(x) -> bool:
    """Whether ``x`` is a finite Python number > 0 (bool is not a number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


#: AdamS's ``warmup`` in :meth:`SparseModel.suggest_adams`: a linear learning-rate ramp over the
#: first 5 % of ``total_steps`` (measured against none in loops without a warmup of their own:
#: docs/sparsity_tax.md, "Against the recipe practitioners use").
SUGGESTED_WARMUP = 0.05

#: AdamS's ``cooldown`` in :meth:`SparseModel.suggest_adams` for a run at the whole dense lr: a
#: linear learning-rate ramp down over the last 10 % of ``total_steps`` (less in shorter runs,
#: none at half the dense lr; measured: docs/sparsity_tax.md, "A cooldown").
SUGGESTED_COOLDOWN = 0.1


def _adams_from_floor(floor: float, dense_lr: float) -> Dict[str, float]:
    """:meth:`SparseModel.suggest_adams`'s rule from the travel floor (also used by the study's
    report, benchmarks/study_tax.py, which has the floors but not the models)."""
    # total_steps / (2 T½) = dense_lr / (4 floor): the floor falls as 1/T and is dense_lr/2 at T½.
    # A floor of 0 (the weights the masks remove are already zero, e.g. a one-shot pruned start)
    # is a run infinitely longer than T½: the whole dense lr.
    ratio = dense_lr / (4.0 * floor) if floor > 0 else math.inf
    lr = dense_lr * min(1.0, max(0.5, ratio))
    # Only the kept weights are slowed to spare a well-trained model the shake of near-sign
    # steps; the masked ones are on their way to zero and keep at least the dense lr.
    return {"lr": lr, "masked_lr_scale": max(floor, dense_lr) / lr}


class SparseModel:
    """Handle returned by :func:`sparsify`: the layers, what was skipped, stats, finalize."""

    def __init__(self, model: nn.Module, pattern: Tuple[int, int], layers: List[SparseLayer], skipped: List[SkippedLayer]):
        self.model = model
        self.pattern = pattern
        self.layers = LayerTable(layers)
        self.skipped = SkippedTable(skipped)
        self.finalized = False
        self._mask_guard: Optional[MaskGuard] = None

    def __repr__(self) -> str:
        return (
            f"SparseModel({format_pattern(self.pattern)}, {len(self.layers)} sparse layers, "
            f"{len(self.skipped)} left dense{', finalized' if self.finalized else ''})\n{self.layers}\n{self.skipped}"
        )

    def sparse_parameters(self) -> List[torch.Tensor]:
        """The N:M weights (what AdamS treats as sparse)."""
        return [l.weight for l in self.layers]

    def scale_parameters(self) -> List[torch.Tensor]:
        """The weight-scaling parameters (dense, trained by the same optimizer)."""
        return [l.module.parametrizations.weight[0].scale for l in self.layers if l.scaling_groups and not self.finalized]

    @torch.no_grad()
    def stats(self, optimizer: Optional[torch.optim.Optimizer] = None) -> SparsityStats:
        """Sparse weight ratio per layer and overall; with ``optimizer`` (an AdamS), the mask
        flip rate of each layer's last refresh."""
        n, m = self.pattern
        out = SparsityStats()
        kept_total = total = 0.0
        for layer in self.layers:
            w = _dtensor.full(layer.weight.detach())
            keep = nm_mask(w, (n, m), dim=layer.dim)
            kept = float(w.abs().mul(keep).sum(dtype=torch.float64))
            tot = float(w.abs().sum(dtype=torch.float64))
            kept_total += kept
            total += tot
            flip = None
            if optimizer is not None:
                flip = optimizer.state.get(layer.weight, {}).get("mask_flip_rate")
            out.append(LayerStats(layer.name, kept / tot if tot > 0 else 1.0, flip))
        out.overall = kept_total / total if total > 0 else 1.0
        return out

    @torch.no_grad()
    def suggest_lr(
        self,
        total_steps: int,
        *,
        dense_lr: Optional[float] = None,
        quantile: float = 0.99,
        schedule_sum: float = 0.5,
        masked_lr_scale: float = 1.0,
    ) -> float:
        """A learning rate for :class:`AdamS` on this model: at least what the weights its masks
        remove need to travel to zero, and, given ``dense_lr``, half of that.

        Once the L1 decay has taken over, AdamS moves a masked weight toward zero by about
        ``lr_s`` per step whatever λ is (μ̃ is normalised by ``sqrt(v)``), so the masked
        weights can reach zero within the run only if::

            Σ_s lr_s = schedule_sum · lr · total_steps  >=  q,
            q = the ``quantile`` of |w| over the weights the current N:M masks remove

        which gives the floor ``q / (schedule_sum · total_steps)`` (divided by
        ``masked_lr_scale`` when you give AdamS one: the masked weights then step
        ``lr · masked_lr_scale``). ``schedule_sum`` is your
        schedule's mean learning rate relative to its peak: 0.5 for a cosine or linear decay
        to 0 (a linear warmup keeps it at 0.5), 1 for a constant rate. Without ``dense_lr``
        this returns the floor; with it, ``max(floor, dense_lr / 2)``, where ``dense_lr`` is
        the AdamW learning rate you would continue training the dense model with.

        Why half the dense rate: AdamS's steps are near-sign (v averages μ̃², not g²), so a
        kept weight moves about ``lr`` per step where AdamW's noise-dominated steps are a
        quarter to a half of it; a smaller lr shakes a well-trained model less, but the
        kept weights still have to re-fit. Evidence (docs/sparsity_tax.md, "Half the dense
        learning rate"; 2:4, cosine to 0, dense AdamW lr 1e-3): at 400 steps the floor is 5.2e-4 on both
        study models and lr 5e-4 beat 1e-3 on all four model × corpus settings; at 1000 steps
        the floor (2.1e-4) was far too low (small model, stdlib +3.4 % against +1.5 % at 5e-4
        and +1.3 % at 1e-3; prose +3.8 % against +1.9 % at 1e-3): the floor is a floor, not
        the optimum, once the run is long. Two models and a handful of learning rates: a
        starting point, not a law. :meth:`suggest_adams` is the better rule at both ends: in
        short runs (floor above ``dense_lr / 2``) this method raises every weight's lr to the
        floor, which shakes the kept weights, where ``suggest_adams`` gives the floor to the
        masked weights only; in runs twice as long as the one whose floor is
        ``dense_lr / 2``, and longer, ``suggest_adams`` gives the kept weights the whole dense
        lr (docs/sparsity_tax.md, "Long runs want the dense learning rate"). Call it
        after :func:`sparsify` and before training (on a finalized model the masked weights
        are already zero).
        """
        if not _positive_finite(masked_lr_scale):
            raise CastError(f"masked_lr_scale: expected a finite number > 0 (as given to AdamS), got {masked_lr_scale!r}")
        if dense_lr is not None and not _positive_finite(dense_lr):
            raise CastError(f"dense_lr: expected a positive number (the dense AdamW lr) or None, got {dense_lr!r}")
        floor = self._travel_floor("suggest_lr", total_steps, quantile, schedule_sum) / float(masked_lr_scale)
        if dense_lr is None and floor == 0.0:
            raise CastError(
                "suggest_lr: the weights the N:M masks remove are already zero (the model is already "
                f"{format_pattern(self.pattern)}), so there is no travel floor; pass dense_lr"
            )
        return floor if dense_lr is None else max(floor, float(dense_lr) / 2.0)

    @torch.no_grad()
    def suggest_adams(
        self, total_steps: int, *, dense_lr: float, quantile: float = 0.99, schedule_sum: float = 0.5
    ) -> Dict[str, float]:
        """``lr``, ``masked_lr_scale``, ``warmup`` and ``cooldown`` for :class:`AdamS`: the kept
        weights at half the dense learning rate for short runs and at the whole of it for long
        ones, the masked weights at the dense lr (faster if that cannot take them to zero
        within the run), AdamS's own learning-rate warmup over the first 5 % of the run, and in
        long runs its own cooldown over the last 10 %.

        With ``floor`` :meth:`suggest_lr`'s travel floor (``suggest_lr(total_steps)``: the lr at
        which the masked weights can reach zero in ``total_steps``) and ``T½`` the run length at
        which the floor is half the dense lr (the floor falls as 1/T, so
        ``total_steps / T½ = dense_lr / (2 · floor)``)::

            lr = dense_lr · clip(total_steps / (2 · T½), 1/2, 1)
            masked_lr_scale = max(floor, dense_lr) / lr
            warmup = 0.05                      (SUGGESTED_WARMUP)
            cooldown = 0.1 · (2 · lr / dense_lr − 1)   (SUGGESTED_COOLDOWN)

        that is half the dense lr up to ``T½``, the dense lr from ``2 · T½`` on, linear in the
        run length between; the masked weights step at the dense lr, or at the floor in runs
        too short for the dense lr to take them to zero, so ``masked_lr_scale`` is 2 at half
        the dense lr and 1 (the paper's update) from ``2 · T½`` on; the cooldown goes with the
        kept weights' lr, none at half the dense lr, 10 % of the run at the whole of it. Use
        it as::

            optimizer = cast_rs.AdamS(model.parameters(), total_steps=T,
                                      **sparse.suggest_adams(T, dense_lr=1e-3))

        Why: AdamS's steps are near-sign (v averages the blended momentum's square, not g²), so
        from the first step every kept weight of a well-trained model moves by about ``lr``; a
        short run cannot repair that shake, a long one can and then needs the dense lr to
        re-fit. The masked weights need no such care (they are on their way to zero, and the
        sooner they get there the longer the sparse model has to recover), so only the kept
        weights' lr is lowered. The warmup removes the first-step shake, which is what kept the
        whole dense lr from paying in training loops without a warmup of their own; it ramps on
        top of the loop's schedule, so a loop that warms up already ramps a little longer. The
        cooldown is the same cure at the other end: near-sign steps keep every kept weight
        moving by about the lr until the last step, so a schedule that ends on a floor hands
        that noise to ``finalize``; it paid at the whole dense lr and not at half of it. The
        evidence (both study models and corpora, 100 to 3000 steps, the study's loop and a plain
        user's loop, against SR-STE and SparseGPT + fixed-mask fine-tuning) is in the
        sparsity-tax report, docs/sparsity_tax.md. Call it after :func:`sparsify` and before
        training.
        """
        if not _positive_finite(dense_lr):
            raise CastError(f"dense_lr: expected a positive number (the dense AdamW lr), got {dense_lr!r}")
        hp = _adams_from_floor(self._travel_floor("suggest_adams", total_steps, quantile, schedule_sum), float(dense_lr))
        share = hp["lr"] / float(dense_lr)  # 1/2 to 1
        return {**hp, "warmup": SUGGESTED_WARMUP, "cooldown": SUGGESTED_COOLDOWN * (2.0 * share - 1.0)}

    def _travel_floor(self, caller: str, total_steps: int, quantile: float, schedule_sum: float) -> float:
        """q / (schedule_sum · total_steps), q = the ``quantile`` of |w| over the weights the
        current masks remove: the lr at which they can reach zero within the run (suggest_lr)."""
        if self.finalized:
            raise CastError(f"{caller}: the model is finalized; its masked weights are already zero")
        steps = _integer_arg(total_steps)
        if steps is None or steps < 1:
            raise CastError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
        if not (isinstance(quantile, (int, float)) and 0.0 < float(quantile) <= 1.0):
            raise CastError(f"quantile: expected a number in (0, 1], got {quantile!r}")
        if not (isinstance(schedule_sum, (int, float)) and 0.0 < float(schedule_sum) <= 1.0):
            raise CastError(f"schedule_sum: expected a number in (0, 1], got {schedule_sum!r}")
        n, m = self.pattern
        removed = []
        for layer in self.layers:
            w = _dtensor.full(layer.weight.detach()).float()
            removed.append(w[~nm_mask(w, (n, m), dim=layer.dim)].abs().flatten())
        mags = torch.cat(removed) if removed else torch.zeros(0)
        if mags.numel() == 0:
            raise CastError(f"{caller}: this model has no sparse weights")
        limit = 1 << 24  # torch.quantile's input limit: an even subsample beyond it
        if mags.numel() > limit:
            mags = mags[:: -(-mags.numel() // limit)]
        q = float(torch.quantile(mags, float(quantile)))
        return q / (float(schedule_sum) * steps)

    def _check_finite(self) -> None:
        """Refuse to finalize a layer whose weight or scale is not finite (before any write)."""
        for layer in self.layers:
            mod = layer.module
            tensors = [("weight", layer.weight)]
            if parametrize.is_parametrized(mod, "weight"):
                tensors.append(("weight scale", mod.parametrizations.weight[0].scale))
            for what, t in tensors:
                bad = int((~torch.isfinite(_dtensor.full(t.detach()))).sum())
                if bad:
                    raise ValueError(
                        f"finalize: layer {layer.name!r}: its {what} holds {bad} non-finite value(s) (NaN or inf); "
                        "the model diverged or was corrupted: nothing was finalized"
                    )

    @torch.no_grad()
    def finalize(self) -> FinalizeReport:
        """Make every sparse layer exactly N:M and plain again.

        For each layer: mask W with its final N:M mask (recomputed from W), fold the scale into
        W (W ← W·A), remove the parametrization and the marker. Parameter names and shapes are
        then those the model had before :func:`sparsify`, so its ``state_dict`` loads into the
        original architecture. Returns a per-layer report (L1 mass cut, nonzero fraction).

        FSDP2 (DTensor weights): call it on every rank. Each layer's weight is gathered (one
        layer at a time), masked and scaled, and each rank writes back its shard. The
        parametrization cannot be removed from a ``fully_shard``-ed module (FSDP2 swaps the
        module's class), so it stays with its scale set to ones: the layer computes with the
        exact N:M weight and keeps working under FSDP2. :func:`plain_state_dict` turns a full
        state dict of such a model into the original architecture's keys.

        **The mask stays fixed afterwards.** Training the finalized model further (fine-tuning)
        keeps every sparse layer exactly N:M with no extra call: after each step of any
        ``torch.optim`` optimizer the masked weights are set back to 0, and their gradients are
        masked as they accumulate (see ``cast_rs._mask_guard``). :meth:`release_mask` ends this.

        Raises:
            ValueError: a sparse layer's weight (or its scale) holds a NaN or an infinity, named
                with its count; nothing is changed. A non-finite weight would survive the mask
                (NaN ranks largest) and make the exact N:M model compute NaN.
        """
        if self.finalized:
            raise RuntimeError("finalize: this SparseModel is already finalized")
        n, m = self.pattern
        self._check_finite()
        report = FinalizeReport()
        for layer in self.layers:
            mod = layer.module
            w = layer.weight
            sharded = _dtensor.is_dtensor(w)
            wf = _dtensor.full(w.detach())
            keep = nm_mask(wf, (n, m), dim=layer.dim)
            absw = wf.abs()
            total = float(absw.sum(dtype=torch.float64))
            removed = float(absw.masked_fill(keep, 0).sum(dtype=torch.float64))
            final = wf * keep
            if parametrize.is_parametrized(mod, "weight"):
                ws = mod.parametrizations.weight[0]
                final = scale_weight(final, _dtensor.full(ws.scale.detach()), ws.groups, ws.dim)
                if sharded:
                    _dtensor.local(ws.scale).fill_(1)
                else:
                    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            if sharded:
                _dtensor.write_full(w, final)
            else:
                mod.weight.copy_(final)
            unmark(mod)
            setattr(mod, SPARSE_MODULE_ATTR, format_pattern(self.pattern))
            report.append(
                LayerFinal(
                    layer.name,
                    tuple(final.shape),
                    removed,
                    removed / total if total > 0 else 0.0,
                    float((final != 0).float().mean()),
                )
            )
        self.finalized = True
        self._mask_guard = MaskGuard([(original_weight(l.module), (n, m), l.dim) for l in self.layers])
        # A Hugging Face model records its N:M layers in its config, so that save_pretrained /
        # from_pretrained give back a model whose masks are guarded (cast_rs.checkpoint).
        set_record(self.model, make_record(format_pattern(self.pattern), False, None, [l.name for l in self.layers]))
        return report

    @property
    def mask_fixed(self) -> bool:
        """True after :meth:`finalize` until :meth:`release_mask`: further training keeps N:M."""
        return self._mask_guard is not None and self._mask_guard.active

    def release_mask(self) -> None:
        """Let the finalized weights change freely again (the masked ones may become nonzero
        with the next optimizer step). Only after :meth:`finalize`."""
        if not self.finalized:
            raise RuntimeError("release_mask: the model is not finalized; before finalize the mask is AdamS's to move")
        if self._mask_guard is not None:
            self._mask_guard.release()
        unmark_hf_model(self.model)


def sparsify(
    model: nn.Module,
    pattern: Pattern = "2:4",
    *,
    include: Rules = None,
    exclude: Rules = None,
    scaling_groups: Optional[int] = 2,
    include_head: bool = False,
) -> SparseModel:
    """Prepare ``model`` (in place) for CAST sparse training and return its :class:`SparseModel`.

    Each chosen layer's weight is marked N:M (so ``cast_rs.AdamS(model.parameters(), ...)``
    treats it as sparse along the right dimension without param groups) and, unless
    ``scaling_groups`` is 0/None, gets a learnable weight scale (``WeightScale``, ``[out, n]``,
    initialised to ones) as a ``torch.nn.utils.parametrize`` parametrization. The forward pass
    stays dense during training. When n does not divide a layer's input dimension, the layer
    uses gcd(n, input dim) groups (shown in ``.layers``).

    Args:
        model: any ``nn.Module``; Hugging Face models included.
        pattern: ``"N:M"`` or ``(N, M)``.
        include: if given, only layers matching one of these rules (names, globs,
            ``re.compile(...)`` or ``"re:<regex>"``, module types).
        exclude: layers matching any of these rules stay dense.
        scaling_groups: n, the scale's column blocks per row (default 2); 0 or None: no scaling.
        include_head: also sparsify the model's output head (:func:`output_heads`; tied or
            not). Default False: the head stays dense and is listed in ``.skipped``.

    Raises:
        ValueError: a bad pattern or ``scaling_groups``, or an ``include`` rule that selects no
            layer (a name that matches no module, or only layers that stay dense).

    Take the teacher for distillation (``copy.deepcopy(model)``) before calling this, and build
    the optimizer after it: the scales are new parameters, which an optimizer built earlier does
    not hold (AdamS refuses such a weight at its first step, before writing anything).
    """
    n, m = parse_pattern(pattern)
    if scaling_groups is not None and (
        not isinstance(scaling_groups, int) or isinstance(scaling_groups, bool) or scaling_groups < 0
    ):
        raise ValueError(f"scaling_groups: expected an int >= 0 or None, got {scaling_groups!r}")
    for p in model.parameters():
        if hasattr(p, NM_ATTR):
            raise RuntimeError("sparsify: this model is already sparsified (a weight is already marked N:M)")
    if any(module_spec(mod) is not None for mod in model.modules()):
        raise RuntimeError("sparsify: this model is already sparsified (a layer is already marked N:M)")
    picked, skipped = find_layers(model, (n, m), include=include, exclude=exclude, include_head=include_head)
    layers: List[SparseLayer] = []
    for name, mod, kind, dim in picked:
        w = mod.weight
        in_dim = w.shape[-1] if dim == -1 else w.shape[0]
        out_dim = w.shape[0] if dim == -1 else w.shape[-1]
        groups = 0
        if scaling_groups:
            groups = math.gcd(int(scaling_groups), int(in_dim))
        if _dtensor.is_dtensor(w):
            raise RuntimeError(
                f"sparsify: layer {name!r} is already sharded (DTensor weight); call sparsify before "
                "fully_shard so that FSDP2 also shards and reduces the weight-scale parameters"
            )
        if groups:
            parametrize.register_parametrization(
                mod, "weight", WeightScale(out_dim, groups, dim, device=w.device, dtype=w.dtype), unsafe=False
            )
        mark(mod, (n, m, dim))
        setattr(mod, SPARSE_MODULE_ATTR, format_pattern((n, m)))
        layers.append(SparseLayer(name, kind, tuple(w.shape), dim, format_pattern((n, m)), groups, mod))
    return SparseModel(model, (n, m), layers, skipped)
