"""AdamS: the sparsity-aware optimizer of CAST, as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.optim import Optimizer

from . import _cast_rs, _dtensor
from ._tensor_args import check_plain_tensor
from ._config import generic_path_forced
from ._markers import NM_ATTR, remark_weights, weight_scales
from .nm import format_pattern, group_dim_size, nm_mask_packed, parse_pattern

__all__ = ["AdamS", "DEFAULT_L1_DECAY", "DEFAULT_L1_MODE", "DEFAULT_MASKED_LR_SCALE", "DEFAULT_RAMP_END", "L1_MODES", "NM_ATTR"]

#: Default λ (``l1_decay``). The paper's LLaMA2-7B value is 4e-7 with the advice "the same
#: order of magnitude as the gradient". On the demo's small GPT (docs/sparsity_tax.md) the best
#: values at lr 1e-3 were 0.1–1.0 (1e-3 recovered only 85% of the pruning gap): a λ well above
#: the gradient moments makes the decay overtake the gradient early in the α ramp, which a
#: short run needs. 0.1 is the low end of that optimum; tune it per model.
DEFAULT_L1_DECAY = 0.1

#: How ``l1_decay`` is read: ``"absolute"`` (λ itself, as the paper) or ``"relative"`` (λ of
#: each sparse tensor = ``l1_decay`` × the RMS of its bias-corrected gradient momentum,
#: measured at every mask refresh; scale-free).
L1_MODES = ("absolute", "relative")
DEFAULT_L1_MODE = "absolute"
#: α = min(1, s / (ramp_end · total_steps)): the fraction of the run after which the decay is
#: fully on (1.0: the paper's s / T).
DEFAULT_RAMP_END = 1.0
#: r = ``masked_lr_scale``: a masked-out weight's step is r times a kept weight's (lr·r). 1.0 is
#: the paper's AdamS. Not part of the paper; opt-in. On the study's small model (2:4, 400
#: steps, lr 5e-4 with a warmup) r = 2 lowered the sparsity tax by 0.25-0.30 point on every
#: seed and both corpora; at 1000 steps by 0.01-0.10 (docs/sparsity_tax.md, "Faster-moving
#: masked weights").
DEFAULT_MASKED_LR_SCALE = 1.0

_ParamsT = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]], Iterable[Tuple[str, torch.Tensor]]]


def _real(x: Any) -> Optional[float]:
    """``x`` as a Python float if it is a real number (int, float, or a NumPy scalar such as
    ``np.float32``, which ``numbers.Real`` covers), else None. bool is not a number here."""
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        return float(x)
    return None


def _integer(x: Any) -> Optional[int]:
    """``x`` as a Python int if it is an integer (int or a NumPy integer scalar), else None."""
    if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)):
        return int(x)
    return None


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
        )
        self._validate_hyper(defaults, where="")
        # Tensors stepped on the (fast, generic) kernel path so far: for tests and diagnostics.
        self._kernel_calls = [0, 0]
        # The generic path's `keep` tensors (1 where the mask keeps a weight, 0 where it removes
        # it, in the parameter's dtype), kept between steps so that a step need not unpack every packed
        # mask (see _cast_rs.adams_step's mask_cache). A cache, never state: not in
        # state_dict(), and an entry is used only while the packed mask it was made from is
        # unchanged (same storage, same version counter).
        self._keep_cache: Dict[torch.Tensor, Tuple[torch.Tensor, int, int]] = {}
        # fully_shard (FSDP2) replaces parameters and drops sparsify's markers: restore them.
        remark_weights()
        super().__init__(params, defaults)
        if not any(self._param_spec(p, g) is not None for g in self.param_groups for p in g["params"]):
            warnings.warn(
                "cast_rs.AdamS: no parameter is sparse (no group has a `pattern` and none was "
                "marked by cast_rs.sparsify), so AdamS acts as plain AdamW.",
                UserWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- validation
    @staticmethod
    def _validate_hyper(group: Dict[str, Any], where: str) -> None:
        """Check a group's hyperparameters; NumPy scalars are accepted (as torch's optimizers
        do) and stored as Python numbers, so ``state_dict`` and the kernels see plain types."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"{where}lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
            value = float(lr)
        else:
            value = _real(lr)
            if value is not None:
                group["lr"] = value
        if value is None or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}lr: expected a finite number >= 0, got {group['lr']!r}")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
        plain = []
        for i, b in enumerate(betas):
            value = float(b) if isinstance(b, torch.Tensor) else _real(b)
            if value is None or not 0.0 <= value < 1.0:
                raise ValueError(f"{where}betas[{i}]: expected a number in [0, 1), got {betas[i]!r}")
            plain.append(b if isinstance(b, torch.Tensor) else value)
        group["betas"] = tuple(plain)
        for key in ("eps", "weight_decay", "l1_decay"):
            value = _real(group[key])
            if value is None or not math.isfinite(value) or value < 0:
                raise ValueError(f"{where}{key}: expected a finite number >= 0, got {group[key]!r}")
            group[key] = value
        t = group["total_steps"]
        if t is not None:
            value = _integer(t)
            if value is None or value < 1:
                raise ValueError(f"{where}total_steps: expected a positive int or None, got {t!r}")
            group["total_steps"] = value
        if group.get("l1_mode", DEFAULT_L1_MODE) not in L1_MODES:
            raise ValueError(f"{where}l1_mode: expected one of {', '.join(map(repr, L1_MODES))}, got {group['l1_mode']!r}")
        r = group.get("ramp_end", DEFAULT_RAMP_END)
        value = _real(r)
        if value is None or not 0.0 < value <= 1.0:
            raise ValueError(
                f"{where}ramp_end: expected a number in (0, 1] (the fraction of total_steps at which "
                f"the decay is fully on), got {r!r}"
            )
        if "ramp_end" in group:
            group["ramp_end"] = value
        # Absent from groups saved before it existed: those get the paper's update (1).
        r = group.get("masked_lr_scale", DEFAULT_MASKED_LR_SCALE)
        value = _real(r)
        if value is None or not (math.isfinite(value) and value > 0.0):
            raise ValueError(
                f"{where}masked_lr_scale: expected a finite number > 0 (the masked weights' lr "
                f"relative to the kept weights'), got {r!r}"
            )
        if "masked_lr_scale" in group:
            group["masked_lr_scale"] = value
        k = group["mask_interval"]
        value = _integer(k)
        if value is None or value < 1:
            raise ValueError(f"{where}mask_interval: expected a positive int, got {k!r}")
        group["mask_interval"] = value
        if group["pattern"] is not None:
            parse_pattern(group["pattern"], param=f"{where}pattern")

    @staticmethod
    def _param_spec(p: torch.Tensor, group: Dict[str, Any]) -> Optional[Tuple[int, int, int]]:
        """(n, m, dim) of a sparse parameter, None for a dense one."""
        marked = getattr(p, NM_ATTR, None)
        if marked is not None:
            return marked
        if group.get("pattern") is not None:
            n, m = parse_pattern(group["pattern"])
            return (n, m, -1)
        return None

    @staticmethod
    def _param_name(group: Dict[str, Any], gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"parameter {names[i]!r}"
        return f"param_groups[{gi}]['params'][{i}]"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            where = f"param_groups[{gi}]: " if gi else ""
            self._validate_hyper(group, where)
            if group["pattern"] is not None:
                group["pattern"] = format_pattern(parse_pattern(group["pattern"]))
            any_sparse = False
            for i, p in enumerate(group["params"]):
                name = self._param_name(group, gi, i)
                if not p.is_floating_point():
                    raise TypeError(f"{name}: AdamS needs floating-point parameters, got dtype {p.dtype}")
                spec = self._param_spec(p, group)
                if spec is None:
                    continue
                any_sparse = True
                n, m, dim = spec
                size = group_dim_size(tuple(p.shape), dim)
                where_dim = "last dimension" if dim == -1 else "dimension 0"
                if size is None:
                    raise ValueError(f"{name}: a {n}:{m} parameter needs at least one dimension, got a 0-d tensor")
                if size % m:
                    raise ValueError(
                        f"{name}: {n}:{m} groups run along the {where_dim}, whose size {size} is not "
                        f"divisible by M={m} (shape {tuple(p.shape)}); put it in a group with pattern=None"
                    )
                if _dtensor.is_dtensor(p):
                    _dtensor.check_sharding(p, spec, name)
            if any_sparse and group["total_steps"] is None:
                raise ValueError(
                    f"{where}total_steps: required when a group has sparse (N:M) parameters "
                    "(the L1 decay ramps in over total_steps); pass total_steps=<planned optimizer steps>"
                )
        except Exception:
            self.param_groups.pop()
            raise

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._keep_cache = {}
        # torch casts every non-"step" state tensor of a float parameter to the parameter's
        # dtype; the packed mask is bytes, so restore it (0..255 survive float exactly).
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st or "mask" not in st:
                    continue
                local_bits = _dtensor.local(st["mask"])
                weights = _dtensor.local(p).numel()
                expected = (weights + 7) // 8
                if local_bits.numel() != expected:
                    raise ValueError(
                        f"state_dict: mask of {self._param_name(group, gi, i)} has {local_bits.numel()} bytes, "
                        f"expected {expected} for {weights} weights"
                    )
                flat = local_bits.to(dtype=torch.uint8, device=p.device).reshape(expected)
                st["mask"] = _dtensor.mask_like(p, flat) if _dtensor.is_dtensor(p) else flat

    def _init_group(
        self, group: Dict[str, Any], gi: int
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[Optional[Tuple[int, int, int]]], List[torch.Tensor], List[int]]:
        """Collect and validate the parameters with gradients. Writes nothing.

        Returns (params, local gradients, specs, local parameters, indices in the group): the
        local tensors are the parameters / gradients themselves, or the local shards of
        DTensors.

        This runs every step, so the common case is kept to a few attribute reads per
        parameter; messages are only built when something is wrong.
        """
        params, grads, specs, locals_, indices = [], [], [], [], []
        scale_lookup = None  # (weight scales, ids of this optimizer's parameters), built once if needed
        group_spec = None
        if group.get("pattern") is not None:
            n, m = parse_pattern(group["pattern"])
            group_spec = (n, m, -1)
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            spec = getattr(p, NM_ATTR, None) or group_spec
            pl = p
            if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
                if _dtensor.is_dtensor(p):
                    name = self._param_name(group, gi, i)
                    _dtensor.check_grad(p, g, name)
                    _dtensor.check_sharding(p, spec, name)
                    pl, g = p.to_local(), g.to_local()
                else:
                    check_plain_tensor(p, self._param_name(group, gi, i))
            if type(g) is not torch.Tensor:
                check_plain_tensor(g, self._param_name(group, gi, i) + " gradient")
            if g.is_sparse or g.dtype != pl.dtype or g.shape != pl.shape or g.device != pl.device or not pl.is_floating_point():
                self._raise_bad_grad(group, gi, i, pl, g)
            if spec is not None:
                st = self.state.get(p)
                if st is None or "mask" not in st:  # sparse for the first time
                    if scale_lookup is None:
                        scale_lookup = (weight_scales(), {id(q) for g_ in self.param_groups for q in g_["params"]})
                    self._check_scale_is_optimized(group, gi, i, p, *scale_lookup)
                size = group_dim_size(tuple(p.shape), spec[2])
                if size is None or size % spec[1]:
                    name = self._param_name(group, gi, i)
                    raise ValueError(f"{name}: shape {tuple(p.shape)} cannot hold {spec[0]}:{spec[1]} groups along dim {spec[2]}")
                if group["total_steps"] is None:
                    raise ValueError(
                        "total_steps: required when a group has sparse (N:M) parameters; "
                        "pass total_steps=<planned optimizer steps>"
                    )
            st = self.state.get(p)
            if st:
                mu = st.get("exp_avg")
                if mu is not None and (mu.shape != p.shape or mu.dtype != p.dtype):
                    name = self._param_name(group, gi, i)
                    raise ValueError(f"{name}: optimizer state 'exp_avg' does not match the parameter (shape/dtype)")
            params.append(p)
            grads.append(g)
            specs.append(spec)
            locals_.append(pl)
            indices.append(i)
        return params, grads, specs, locals_, indices

    def _check_scale_is_optimized(
        self, group: Dict[str, Any], gi: int, i: int, p: torch.Tensor, scales: Dict[int, torch.Tensor], held: set
    ) -> None:
        """A weight that :func:`cast_rs.sparsify` gave a learnable scale must be optimized with
        that scale: when ``sparsify`` ran after the optimizer was built, the scale is not in
        it and would silently stay 1 while its gradients pile up. Refused, before any write.
        ``scales``: :func:`weight_scales`; ``held``: ids of this optimizer's parameters."""
        scale = scales.get(id(p))
        if scale is None or not scale.requires_grad or id(scale) in held:
            return
        raise ValueError(
            f"{self._param_name(group, gi, i)}: this N:M weight's scale (WeightScale.scale, added by "
            "cast_rs.sparsify) is not among this optimizer's parameters: sparsify ran after the optimizer "
            "was built, so the scale would never train. Build the optimizer after sparsify (or add "
            "sparse.scale_parameters() with optimizer.add_param_group), or freeze the scale "
            "(scale.requires_grad_(False)) to train without it."
        )

    def _raise_bad_grad(self, group: Dict[str, Any], gi: int, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        name = self._param_name(group, gi, i)
        if not p.is_floating_point():
            raise TypeError(f"{name}: AdamS needs floating-point parameters, got dtype {p.dtype}")
        if g.is_sparse:
            raise TypeError(f"{name}: AdamS does not support sparse gradients (got a {g.layout} gradient)")
        if g.dtype != p.dtype:
            raise TypeError(f"{name}: gradient dtype {g.dtype} differs from the parameter's {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{name}: gradient shape {tuple(g.shape)} differs from the parameter's {tuple(p.shape)}")
        raise ValueError(f"{name}: gradient is on {g.device}, the parameter on {p.device}")

    def _state_for(self, p: torch.Tensor, pl: torch.Tensor, spec: Optional[Tuple[int, int, int]]) -> Dict[str, Any]:
        """The state of ``p`` (``pl``: its local tensor), created on first use. For a DTensor
        the moments are DTensors like ``p`` and the mask is sharded with it."""
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if spec is not None and "mask" not in st:
            n, m, dim = spec
            if float(st["step"]) == 0.0:
                # Step 1 is always a refresh step: the kernel fills it.
                bits = torch.zeros((pl.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
            else:
                # Became sparse mid-run (marked after some steps): start from its current mask.
                bits = nm_mask_packed(pl.detach(), (n, m), dim)
            st["mask"] = _dtensor.mask_like(p, bits) if pl is not p else bits
        return st

    # ----------------------------------------------------------------- step
    # The step calls the Rust kernels, which dynamo cannot trace; until they are registered
    # PyTorch operators (csrc/), a compiled function calling step() runs it eagerly (one graph
    # break) instead of failing in _init_group. The step is one fused kernel call per group,
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
            self._validate_hyper(group, f"param_groups[{gi}]: ")
            plans.append(self._init_group(group, gi))

        force_generic = generic_path_forced()
        created = []  # parameters whose state (or mask) this call creates: undone on error
        first_fill = set()  # ids of sparse parameters whose first mask this call computes
        scale_ids = None  # ids of cast-rs weight-scale parameters, looked up when needed
        calls = []
        try:
            for gi, (group, (params, grads, specs, locals_, indices)) in enumerate(zip(self.param_groups, plans)):
                if not params:
                    continue
                states = []
                for p, pl, spec in zip(params, locals_, specs):
                    had_mask = "mask" in self.state.get(p, ())
                    created.append((p, (p in self.state, had_mask)))
                    st = self._state_for(p, pl, spec)
                    if spec is not None and not had_mask and float(st["step"]) == 0.0:
                        first_fill.add(id(p))
                    states.append(st)
                args, kwargs = self._kernel_args(group, locals_, grads, specs, states, force_generic)
                lambdas = None
                if group.get("l1_mode", DEFAULT_L1_MODE) == "relative" and any(sp is not None for sp in specs):
                    lambdas = self._relative_l1(group, params, specs, states)
                    kwargs["l1_decays"] = lambdas
                if kwargs["weight_decay"] != 0.0:
                    if scale_ids is None:
                        scale_ids = {id(sc) for sc in weight_scales().values()}
                    if any(id(p) in scale_ids for p in params):
                        # Weight-scale parameters take no weight decay: it would pull the
                        # scales (initialised to 1) toward 0, shrinking the layer's output.
                        kwargs["weight_decays"] = [0.0 if id(p) in scale_ids else kwargs["weight_decay"] for p in params]
                calls.append((gi, group, indices, (args, kwargs)))
            # The kernel validates everything of its group before writing; with several
            # groups, first validate them all so that an error in a later group cannot leave
            # an earlier one stepped.
            results = []
            if len(calls) > 1:
                for gi, group, indices, (args, kwargs) in calls:
                    self._run_kernel(gi, group, indices, args, dict(kwargs, validate_only=True))
            elif calls:  # one group: the call validates before it writes
                gi, group, indices, (args, kwargs) = calls[0]
                results.append(self._run_kernel(gi, group, indices, args, kwargs))
        except Exception:
            for p, (had_state, had_mask) in created:
                if not had_state:
                    self.state.pop(p, None)
                elif not had_mask:
                    self.state[p].pop("mask", None)
            raise
        for ci, (gi, group, indices, (args, kwargs)) in enumerate(calls):
            if ci < len(results):
                fast, generic, flips = results[ci]
            else:
                fast, generic, flips = self._run_kernel(gi, group, indices, args, kwargs)
            self._kernel_calls[0] += fast
            self._kernel_calls[1] += generic
            params, _, specs, locals_, _ = plans[gi]
            lambdas = kwargs.get("l1_decays")
            for j, (p, pl, spec, changed) in enumerate(zip(params, locals_, specs, flips)):
                if lambdas is not None and spec is not None:
                    self.state[p]["l1_decay"] = lambdas[j]
                if changed is not None and id(p) not in first_fill:
                    # Of this rank's groups, for a sharded parameter. The first mask has no
                    # earlier one to differ from (the kernel compares it with all zeros), so
                    # there is no flip rate until the second refresh.
                    self.state[p]["mask_flip_rate"] = changed / max(1, pl.numel() // spec[1])
        return loss

    @staticmethod
    def _kernel_args(
        group: Dict[str, Any],
        locals_: List[torch.Tensor],
        grads: List[torch.Tensor],
        specs: List[Optional[Tuple[int, int, int]]],
        states: List[Dict[str, Any]],
        force_generic: bool,
    ) -> Tuple[tuple, Dict[str, Any]]:
        local = _dtensor.local
        beta1, beta2 = (float(b) for b in group["betas"])
        total = group["total_steps"]
        ramp = float(group.get("ramp_end", DEFAULT_RAMP_END))
        args = (
            locals_,
            grads,
            [local(st["exp_avg"]) for st in states],
            [local(st["exp_avg_sq"]) for st in states],
            [_dtensor.local_mask(st["mask"]) if spec is not None else None for st, spec in zip(states, specs)],
            specs,
            [st["step"] for st in states],  # incremented by the kernel on success
        )
        kwargs = dict(
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            l1_decay=float(group["l1_decay"]),
            # α = min(1, s / (ramp_end·T)): the kernel ramps over ramp_end·T steps.
            total_steps=None if total is None else max(1.0, ramp * float(total)),
            mask_interval=int(group["mask_interval"]),
            force_generic=force_generic,
            masked_lr_scale=float(group.get("masked_lr_scale", DEFAULT_MASKED_LR_SCALE)),
        )
        return args, kwargs

    @staticmethod
    def _relative_l1(
        group: Dict[str, Any],
        params: List[torch.Tensor],
        specs: List[Optional[Tuple[int, int, int]]],
        states: List[Dict[str, Any]],
    ) -> List[float]:
        """λ of each tensor in ``l1_mode="relative"``: ``l1_decay`` × RMS of the bias-corrected
        momentum after this step's update, (re)measured at mask-refresh steps and kept in
        ``state["l1_decay"]`` in between (written by the caller once the step succeeded).
        For a DTensor the RMS is over the whole tensor (a collective), so every rank uses the
        same λ."""
        beta1 = float(group["betas"][0])
        kappa, k = float(group["l1_decay"]), int(group["mask_interval"])
        out = []
        for p, spec, st in zip(params, specs, states):
            if spec is None:
                out.append(0.0)
                continue
            s = float(st["step"]) + 1.0
            if "l1_decay" in st and (int(s) - 1) % k != 0:
                out.append(st["l1_decay"])
                continue
            mu = torch.lerp(st["exp_avg"], p.grad, 1.0 - beta1)
            # A DTensor's norm is a collective (a partial sum over the shards), made whole here.
            norm = _dtensor.full(torch.linalg.vector_norm(mu, dtype=torch.float64))
            rms = float(norm) / math.sqrt(max(1, mu.numel()))
            lam = kappa * rms / (1.0 - beta1**s)
            out.append(lam if math.isfinite(lam) else 0.0)
        return out

    # The kernel's per-parameter list arguments, and how an error names them for a user.
    _STATE_NAME = {
        "params": "",
        "grads": " gradient",
        "exp_avgs": " state 'exp_avg'",
        "exp_avg_sqs": " state 'exp_avg_sq'",
        "masks": " state 'mask'",
        "steps": " state 'step'",
    }

    def _run_kernel(self, gi: int, group: Dict[str, Any], indices: List[int], args: tuple, kwargs: Dict[str, Any]):
        """One kernel call; its errors name the parameter (``param_groups[g]['params'][i]`` or
        its name) instead of the kernel's per-call argument lists (``grads[3]``). The kernel's
        exceptions carry the failing argument as data (``param``, ``index``, ``detail``,
        ``other_param``, ``other_index``; see ``src/error.rs``)."""
        # Keyed by the parameter itself (args[0] holds the local tensors, which for a DTensor
        # are new objects at every step).
        params, masks = [group["params"][i] for i in indices], args[4]
        cache = None
        if not kwargs.get("validate_only", False):
            store = self.__dict__.setdefault("_keep_cache", {})
            cache = []
            for p, bits in zip(params, masks):
                entry = store.get(p) if bits is not None else None
                fresh = entry is not None and entry[1] == bits.data_ptr() and entry[2] == bits._version
                cache.append(entry[0] if fresh else None)
            kwargs = dict(kwargs, mask_cache=cache)
        try:
            out = _cast_rs.adams_step(*args, **kwargs)
        except (ValueError, TypeError, _cast_rs.CastError) as e:

            def name(arg: Optional[str], k: Optional[int]) -> Optional[str]:
                if arg not in self._STATE_NAME or k is None or k >= len(indices):
                    return None
                return self._param_name(group, gi, indices[k]) + self._STATE_NAME[arg]

            who = name(getattr(e, "param", None), getattr(e, "index", None))
            if who is None:
                raise
            detail: str = e.detail  # type: ignore[union-attr]
            if "{other}" in detail:
                other = name(e.other_param, e.other_index)  # type: ignore[union-attr]
                detail = detail.replace("{other}", other or f"{e.other_param}[{e.other_index}]")  # type: ignore[union-attr]
            raise type(e)(f"{who}: {detail}") from e
        if cache is not None:
            for p, bits, keep in zip(params, masks, cache):
                if keep is None:
                    store.pop(p, None)
                else:
                    store[p] = (keep, bits.data_ptr(), bits._version)
        return out

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
