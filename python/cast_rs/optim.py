"""AdamS: the sparsity-aware optimizer of CAST, as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.optim import Optimizer

from . import _adams_kernel, _adams_state, _dtensor
from ._adams_hyper import (
    DEFAULT_COOLDOWN,
    DEFAULT_L1_DECAY,
    DEFAULT_L1_MODE,
    DEFAULT_MASKED_LR_SCALE,
    DEFAULT_RAMP_END,
    DEFAULT_WARMUP,
    L1_MODES,
    check_group,
    snapshot,
)
from ._config import generic_path_forced
from ._markers import NM_ATTR, remark_weights, weight_scales

__all__ = ["AdamS", "DEFAULT_L1_DECAY", "DEFAULT_L1_MODE", "DEFAULT_MASKED_LR_SCALE", "DEFAULT_RAMP_END", "L1_MODES", "NM_ATTR"]

_ParamsT = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, torch.Tensor]]]


class AdamS(Optimizer):
    r"""AdamS (CAST, arXiv 2509.25996): Adam that pulls masked-out weights of N:M sparse
    tensors to zero with an L1 decay ramped in over training.

    Dense parameters (groups without a ``pattern``, parameters not marked by
    :func:`cast_rs.sparsify`) get exactly :class:`torch.optim.AdamW`. For a sparse tensor,
    with learning rate :math:`\gamma`, L1 decay :math:`\lambda`, step :math:`s` and
    :math:`T` = ``total_steps``:

    .. code-block:: text

        if (s - 1) % mask_interval == 0:
            m ← N:M mask of θ (per group of M along the group dim: the N largest |θ|)
        θ  ← θ · (1 − γ·weight_decay)                   (decoupled, as AdamW; default 0)
        μ  ← β1·μ + (1 − β1)·g                          (stored: average of raw gradients)
        α  = min(1, s / (ramp_end·T))                   (decay ramp 0 → 1; ramp_end = 1: s/T)
        μ̃  = μ                          where m = 1
        μ̃  = (1 − α)·μ + α·λ·sign(θ)    where m = 0    (torch.sign: 0 for ±0 and NaN)
        v  ← β2·v + (1 − β2)·μ̃²                         (from μ̃, every element)
        γ' = γ                          where m = 1
        γ' = γ · masked_lr_scale        where m = 0    (default 1: the paper's update)
        θ  ← θ − γ' · (μ̃ / (1 − β1^s)) / (sqrt(v / (1 − β2^s)) + ε)

    μ̃ is used for this step only. Kept weights follow Adam; masked-out weights are driven to
    zero, at about ``lr`` per step late in training whatever their gradient, so the learning
    rate schedule decides how far they can travel. The forward pass stays dense: the mask is
    optimizer metadata. Call :meth:`cast_rs.SparseModel.finalize` (or multiply by
    :func:`cast_rs.nm_mask`) at the end to make the weights exactly N:M.

    Args:
        params: parameters, named parameters, or param-group dicts. A group may set any of
            the keyword arguments below, ``pattern`` included.
        lr: learning rate γ (default 1e-3). A float or a 0-d tensor.
        betas: (β1, β2), default (0.9, 0.999).
        eps: ε, default 1e-8.
        weight_decay: decoupled (AdamW) weight decay, default 0, applied to every parameter of
            the group except the weight-scale parameters that :func:`cast_rs.sparsify` adds
            (``WeightScale.scale``, initialised to 1): decaying them toward 0 would shrink the
            layer's output, so they never take weight decay, whatever group they are in (the
            Hugging Face ``Trainer`` puts them in its decay group).
        l1_decay: λ, the decay target of masked-out weights (default
            :data:`DEFAULT_L1_DECAY`). Pick it around the magnitude of the gradient
            moments of the sparse weights: it sets *when* the decay overtakes the gradient.
        total_steps: T, the planned number of optimizer steps; required when any parameter is
            sparse. Steps beyond T keep α = 1.
        mask_interval: refresh masks every this many steps (default 10), at steps 1,
            1 + interval, ...
        l1_mode: ``"absolute"`` (default): λ = ``l1_decay``, the paper's formulation.
            ``"relative"``: λ of each sparse tensor = ``l1_decay`` × the RMS of its
            bias-corrected gradient momentum μ̂, measured at every mask refresh (kept in
            ``state["l1_decay"]``). Scale-free: a typical masked weight's decay overtakes its
            momentum at α ≈ 1 / (1 + l1_decay), whatever the model's gradient scale.
        ramp_end: α = min(1, s / (ramp_end · total_steps)): the fraction of the run after
            which the decay is fully on (default 1.0, the paper's s / T; smaller values leave
            the sparse model the rest of the run to train on its own).
        masked_lr_scale: r > 0, the masked-out weights' learning rate relative to the kept
            weights' (default :data:`DEFAULT_MASKED_LR_SCALE` = 1, the paper's AdamS). Not in
            the paper; opt-in. Once the decay has taken over, a masked weight moves toward zero
            by about ``lr·r`` per step, so r > 1 lets the masked weights reach zero sooner
            (leaving the sparse model more of the run to recover) while the kept weights keep
            a gentler rate. Measured (docs/sparsity_tax.md, "Faster-moving masked weights"; small GPT,
            2:4, lr 5e-4 with a 10 % warmup): r = 2 lowered the tax by 0.25-0.30 point at 400
            steps and by 0.01-0.10 at 1000; r = 4 was no better than 2. A lever for short
            runs; not measured on a larger model yet. Dense parameters ignore it. On the
            generic path a sparse tensor with r != 1 takes the ``_foreach_*`` route instead
            of ``_fused_adamw_``: 1.8-2.4x the step time there (``./run bench optimizer``);
            the CPU fast path costs the same as r = 1.
        warmup: w in [0, 1): AdamS ramps its learning rate linearly over the first
            ``w · total_steps`` steps, γ_s = γ · min(1, s / (w · T)), on top of whatever a
            scheduler sets (default 0: none, the paper's AdamS; not in the paper, opt-in).
            Why: AdamS's steps are near-sign (v averages μ̃², not g²), so from the first step
            every kept weight of a well-trained model moves by about γ, which a loop without
            a warmup feels as a jump of the loss in the first tens of steps. Needs
            ``total_steps``.
        cooldown: c in [0, 1): AdamS ramps its learning rate linearly down over the last
            ``c · total_steps`` steps, γ_s = γ · (T − s + 1) / (c · T) there, on top of
            whatever a scheduler sets and of ``warmup`` (default 0: none, the paper's AdamS;
            not in the paper). Past T it stays at its last step's value. Why: near-sign steps
            keep every kept weight moving by about γ until the end, so a schedule that ends
            on a floor (cosine to lr/10, constant) leaves the sparse model that much noise
            when :meth:`~cast_rs.SparseModel.finalize` takes it; AdamW's smaller steps feel
            the floor less. Needs ``total_steps``.
        pattern: ``"N:M"`` / ``(N, M)`` to make every parameter of the group N:M along its
            last dimension, or None (dense). A parameter marked by :func:`cast_rs.sparsify`
            is sparse along its marked dimension whatever the group says.

    State per parameter: ``step`` (0-d float32 tensor), ``exp_avg`` (μ), ``exp_avg_sq`` (v),
    and for a sparse parameter ``mask``: a ``uint8`` tensor of ``ceil(numel/8)`` bytes, one
    bit per weight (see :func:`cast_rs.nm_mask_packed`), and ``mask_flip_rate``: the fraction
    of N:M groups whose mask changed at the last refresh (a float; absent until the second
    refresh, since the first mask has nothing to change from). All of it is in ``state_dict()``, so
    a resumed run is bit-identical to an uninterrupted one.

    Kernels: contiguous CPU tensors of float32, bfloat16 or float16 take the Rust fast path
    (one fused pass, parallel, GIL released); everything else (fp64, non-contiguous, CUDA)
    takes the generic path: per (device, dtype) group a fixed number of multi-tensor ATen
    calls whatever the number of parameters (torch's ``_fused_adamw_`` on the blended momentum
    μ̃, after a ``lerp``, a ``sign``, a ``mul`` and one or two ``lerp`` over the sparse tensors;
    ``_foreach_*``
    calls for non-contiguous ones), with no host synchronisation except one transfer of the
    mask-flip counts at a refresh step. Masks are recomputed per tensor at refresh steps. The
    generic path keeps, for each sparse parameter, a cached ``keep`` tensor (1 where the mask
    keeps the weight, 0 where it removes it, in the parameter's dtype; not in ``state_dict()``) so that a step
    need not unpack the 1-bit masks: one parameter-sized buffer per sparse tensor. In
    float32 the two paths agree to a few roundings (tested). For bf16/fp16 the fast path
    keeps the state in the parameter's dtype and computes in float32 with one rounding per
    stored value, in the order of ``AdamW(fused=True)``, so a dense bf16 group is bit-identical
    to it; the generic path rounds μ and μ̃ to the dtype between its calls.

    Distributed: under DDP parameters are plain tensors and every rank computes the same
    update. FSDP2 (``fully_shard``) parameters are DTensors: each rank steps its local shard,
    so the optimizer state is sharded like the parameters (``exp_avg``/``exp_avg_sq`` are
    DTensors, the packed ``mask`` a ``uint8`` DTensor of shape ``[d0, numel/d0/8]``) and
    ``torch.distributed.checkpoint`` saves it per rank. A sparse parameter must be sharded
    along dim 0 with its N:M groups whole on each rank; anything else is refused with a
    ``CastError`` (see ``cast_rs._dtensor``). Construct AdamS after ``fully_shard``: it puts
    the N:M markers of :func:`cast_rs.sparsify` back on the new DTensor parameters.
    """

    def __init__(
        self,
        params: _ParamsT,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        l1_decay: float = DEFAULT_L1_DECAY,
        total_steps: Optional[int] = None,
        mask_interval: int = 10,
        pattern: Union[str, Tuple[int, int], None] = None,
        l1_mode: str = DEFAULT_L1_MODE,
        ramp_end: float = DEFAULT_RAMP_END,
        masked_lr_scale: float = DEFAULT_MASKED_LR_SCALE,
        warmup: float = DEFAULT_WARMUP,
        cooldown: float = DEFAULT_COOLDOWN,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            l1_decay=l1_decay,
            total_steps=total_steps,
            mask_interval=mask_interval,
            pattern=pattern,
            l1_mode=l1_mode,
            ramp_end=ramp_end,
            masked_lr_scale=masked_lr_scale,
            warmup=warmup,
            cooldown=cooldown,
        )
        check_group(defaults, where="")
        # Tensors stepped on the (fast, generic) kernel path so far: for tests and diagnostics.
        self._kernel_calls = [0, 0]
        # The generic path's cached `keep` tensors (_adams_kernel.run_kernel): not state.
        self._keep_cache: _adams_kernel.KeepCache = {}
        # Per group index: (the group, its settings when they last passed check_group).
        self._hyper_checked: Dict[int, Tuple[Dict[str, Any], Optional[tuple]]] = {}
        # fully_shard (FSDP2) replaces parameters and drops sparsify's markers: restore them.
        remark_weights()
        super().__init__(params, defaults)
        if not any(_adams_state.param_spec(p, g) is not None for g in self.param_groups for p in g["params"]):
            warnings.warn(
                "cast_rs.AdamS: no parameter is sparse (no group has a `pattern` and none was "
                "marked by cast_rs.sparsify), so AdamS acts as plain AdamW.",
                UserWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- groups and state
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            where = f"param_groups[{gi}]: " if gi else ""
            check_group(group, where)
            _adams_state.check_new_group(group, gi, where)
        except Exception:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._keep_cache = {}
        _adams_state.restore_loaded_masks(self.param_groups, self.state)

    # ----------------------------------------------------------------- step
    # The step calls the Rust kernels, which dynamo cannot trace; until they are registered
    # PyTorch operators (csrc/), a compiled function calling step() runs it eagerly (one graph
    # break) instead of failing in collect_group. The step is one fused kernel call per group,
    # so compiling it would gain little.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        All groups are validated before any parameter or state is written, so an error leaves
        the model and the optimizer as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        for gi, group in enumerate(self.param_groups):
            self._check_hyper(gi, group)
            plans.append(_adams_state.collect_group(group, gi, self.state, self.param_groups))
        created: List[Tuple[torch.Tensor, Tuple[bool, bool]]] = []  # state this call creates: undone on error
        first_fill: set = set()  # ids of sparse parameters whose first mask this call computes
        try:
            calls = self._prepare_calls(plans, created, first_fill)
            results = self._validate_calls(calls)
        except Exception:
            for p, (had_state, had_mask) in created:
                if not had_state:
                    self.state.pop(p, None)
                elif not had_mask:
                    self.state[p].pop("mask", None)
            raise
        for ci, (gi, group, indices, (args, kwargs)) in enumerate(calls):
            if ci < len(results):
                out = results[ci]
            else:
                out = _adams_kernel.run_kernel(self._keep_cache, group, gi, indices, args, kwargs)
            self._record(plans[gi], kwargs, out, first_fill)
        return loss

    def _check_hyper(self, gi: int, group: Dict[str, Any]) -> None:
        """:func:`check_group` unless the group is unchanged since it last passed (a scheduler
        changing ``lr`` is a change). The kernel checks its scalars' ranges at every call as well."""
        last = self._hyper_checked.get(gi)
        snap = snapshot(group)
        if snap is not None and last is not None and last[0] is group and last[1] == snap:
            return
        check_group(group, f"param_groups[{gi}]: ")
        self._hyper_checked[gi] = (group, snapshot(group))

    def _prepare_calls(self, plans: List[_adams_state.GroupPlan], created: list, first_fill: set) -> list:
        """The kernel call of every group with parameters to step, creating their missing state
        (recorded in ``created`` so that the caller can undo it)."""
        force_generic = generic_path_forced()
        scale_ids = None  # ids of cast-rs weight-scale parameters, looked up when needed
        calls = []
        for gi, (group, plan) in enumerate(zip(self.param_groups, plans)):
            if not plan.params:
                continue
            states = []
            for p, pl, spec in zip(plan.params, plan.locals_, plan.specs):
                had_mask = "mask" in self.state.get(p, ())
                created.append((p, (p in self.state, had_mask)))
                st = _adams_state.state_for(self.state[p], p, pl, spec)
                if spec is not None and not had_mask and float(st["step"]) == 0.0:
                    first_fill.add(id(p))
                states.append(st)
            args, kwargs = _adams_kernel.kernel_args(
                group, plan.locals_, plan.grads, plan.specs, states, force_generic, plan.sharded
            )
            if group.get("l1_mode", DEFAULT_L1_MODE) == "relative" and any(sp is not None for sp in plan.specs):
                kwargs["l1_decays"] = _adams_kernel.relative_l1(group, plan.params, plan.specs, states)
            weight_decay = float(group["weight_decay"])
            if weight_decay != 0.0:
                if scale_ids is None:
                    scale_ids = {id(sc) for sc in weight_scales().values()}
                if any(id(p) in scale_ids for p in plan.params):
                    # Weight-scale parameters take no weight decay: it would pull the
                    # scales (initialised to 1) toward 0, shrinking the layer's output.
                    kwargs["weight_decays"] = [0.0 if id(p) in scale_ids else weight_decay for p in plan.params]
            calls.append((gi, group, plan.indices, (args, kwargs)))
        return calls

    def _validate_calls(self, calls: list) -> list:
        """The kernel validates everything of its group before writing; with several groups,
        first validate them all so that an error in a later group cannot leave an earlier one
        stepped. With one group the call itself is validated and run: its result is returned."""
        if len(calls) > 1:
            for gi, group, indices, (args, kwargs) in calls:
                _adams_kernel.run_kernel(self._keep_cache, group, gi, indices, args, dict(kwargs, validate_only=True))
            return []
        if calls:
            gi, group, indices, (args, kwargs) = calls[0]
            return [_adams_kernel.run_kernel(self._keep_cache, group, gi, indices, args, kwargs)]
        return []

    def _record(self, plan: _adams_state.GroupPlan, kwargs: Dict[str, Any], out: tuple, first_fill: set) -> None:
        """After a group's successful step: kernel-path counts, relative λ, mask flip rates."""
        fast, generic, flips = out
        self._kernel_calls[0] += fast
        self._kernel_calls[1] += generic
        lambdas = kwargs.get("l1_decays")
        for j, (p, pl, spec, changed) in enumerate(zip(plan.params, plan.locals_, plan.specs, flips)):
            if lambdas is not None and spec is not None:
                self.state[p]["l1_decay"] = lambdas[j]
            if changed is not None and id(p) not in first_fill:
                # Of this rank's groups, for a sharded parameter. The first mask has no
                # earlier one to differ from (the kernel compares it with all zeros), so
                # there is no flip rate until the second refresh.
                self.state[p]["mask_flip_rate"] = changed / max(1, pl.numel() // spec[1])

    # ----------------------------------------------------------------- helpers
    def masks(self) -> Dict[torch.Tensor, torch.Tensor]:
        """Current boolean masks of the sparse parameters that have state, keyed by parameter.

        These are the masks of the last refresh (not recomputed now). For a DTensor
        parameter the mask is a boolean DTensor sharded like it.
        """
        from .nm import unpack_mask

        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "mask" in st:
                    if _dtensor.is_dtensor(p):
                        pl = p.to_local()
                        keep = unpack_mask(st["mask"].to_local().reshape(-1), pl.shape)
                        from torch.distributed.tensor import DTensor

                        out[p] = DTensor.from_local(
                            keep, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                        )
                    else:
                        out[p] = unpack_mask(st["mask"], p.shape)
        return out
