"""AdamS's hyperparameters: turning what a user passes into plain Python numbers, and the
ranges of the options that only the optimizer knows.

Users pass NumPy scalars, 0-d tensors (``lr``, ``betas``) and the like, as they do to
``torch.optim``; a group is stored with plain ``float`` / ``int`` values so that
``state_dict()`` and the kernels see plain types. The ranges of the kernel's scalars (``lr``,
``betas``, ``eps``, ``weight_decay``, ``l1_decay``, ``masked_lr_scale``) are the Rust side's
rule, asked here when a group is built (``_cast_rs.check_adams_hyper``, the same check the
kernel applies at every step, with the same message); ``ramp_end``, ``l1_mode``,
``total_steps``, ``mask_interval`` and ``pattern`` are turned into what the kernel takes here,
so their rules live here.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import _cast_rs
from .nm import parse_pattern

#: The accepted values of ``l1_mode`` (see :class:`cast_rs.AdamS`).
L1_MODES = ("absolute", "relative")

#: Default λ (``l1_decay``). The paper's LLaMA2-7B value is 4e-7 with the advice "the same
#: order of magnitude as the gradient". On the demo's small GPT (docs/sparsity_tax.md) the best
#: values at lr 1e-3 were 0.1–1.0 (1e-3 recovered only 85% of the pruning gap): a λ well above
#: the gradient moments makes the decay overtake the gradient early in the α ramp, which a
#: short run needs. 0.1 is the low end of that optimum; tune it per model.
DEFAULT_L1_DECAY = 0.1

#: How ``l1_decay`` is read: ``"absolute"`` (λ itself, as the paper) or ``"relative"`` (λ of
#: each sparse tensor = ``l1_decay`` × the RMS of its bias-corrected gradient momentum,
#: measured at every mask refresh; scale-free).
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
#: ``warmup``: AdamS's own linear learning-rate warmup over ``warmup · total_steps`` steps, on
#: top of any scheduler. 0 (off) is the paper's AdamS; opt-in while it is being measured.
DEFAULT_WARMUP = 0.0
#: ``cooldown``: AdamS's own linear learning-rate cooldown to zero over the last
#: ``cooldown · total_steps`` steps, on top of any scheduler. 0 (off) is the paper's AdamS.
DEFAULT_COOLDOWN = 0.0


def real(x: Any) -> Optional[float]:
    """``x`` as a Python float if it is a real number (int, float, or a NumPy scalar such as
    ``np.float32``, which ``numbers.Real`` covers), else None. bool is not a number here."""
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        return float(x)
    return None


def integer(x: Any) -> Optional[int]:
    """``x`` as a Python int if it is an integer (int or a NumPy integer scalar), else None."""
    if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)):
        return int(x)
    return None


def _as_number(group: Dict[str, Any], key: str, where: str, keep_tensor: bool = False) -> float:
    """``group[key]`` as a float (stored as one unless it is a tensor kept as such)."""
    value = group[key]
    if isinstance(value, torch.Tensor) and keep_tensor:
        if value.numel() != 1:
            raise ValueError(f"{where}{key}: a tensor {key} must have one element, got shape {tuple(value.shape)}")
        return float(value)
    number = real(value)
    if number is None:
        raise TypeError(f"{where}{key}: expected a number, got {value!r}")
    group[key] = number
    return number


def _betas(group: Dict[str, Any], where: str) -> Tuple[float, float]:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
    plain = []
    for i, b in enumerate(betas):
        value = float(b) if isinstance(b, torch.Tensor) and b.numel() == 1 else real(b)
        if value is None:
            raise TypeError(f"{where}betas[{i}]: expected a number, got {b!r}")
        plain.append(value)
    group["betas"] = tuple(b if isinstance(b, torch.Tensor) else v for b, v in zip(betas, plain))
    return plain[0], plain[1]


#: The value a group without the setting gets (groups saved before it existed): the paper's
#: update for the settings added since.
ABSENT = {"masked_lr_scale": DEFAULT_MASKED_LR_SCALE}


def kernel_hyper(group: Dict[str, Any], lr: Optional[float] = None) -> List[float]:
    """The kernel's scalar hyperparameters of ``group`` as one list in the order of
    ``_cast_rs.ADAMS_HYPER`` (the operator's ``hyper``), ``lr`` replacing the group's when
    given. A group's ``betas`` are the list's ``beta1`` and ``beta2``."""
    out = []
    for name in _cast_rs.ADAMS_HYPER:
        if name == "lr" and lr is not None:
            out.append(lr)
        elif name in ("beta1", "beta2"):
            out.append(float(group["betas"][name == "beta2"]))
        else:
            out.append(float(group[name] if name in group else ABSENT[name]))
    return out


def _kernel_scalars(group: Dict[str, Any], where: str) -> None:
    """Convert the kernel's scalars and check their ranges with the kernel's own rule."""
    _as_number(group, "lr", where, keep_tensor=True)
    _betas(group, where)
    for name in _cast_rs.ADAMS_HYPER:
        if name not in ("lr", "beta1", "beta2") and name in group:
            _as_number(group, name, where)
    try:
        _cast_rs.check_adams_hyper(kernel_hyper(group))
    except ValueError as e:
        if not where:
            raise
        named = type(e)(f"{where}{e}")
        for field in ("param", "index", "detail", "other_param", "other_index"):
            setattr(named, field, getattr(e, field, None))
        raise named from None


def _total_steps(group: Dict[str, Any], where: str) -> None:
    t = group["total_steps"]
    if t is not None:
        value = integer(t)
        if value is None or value < 1:
            raise ValueError(f"{where}total_steps: expected a positive int or None, got {t!r}")
        group["total_steps"] = value


def _mask_interval(group: Dict[str, Any], where: str) -> None:
    k = group["mask_interval"]
    value = integer(k)
    if value is None or value < 1:
        raise ValueError(f"{where}mask_interval: expected a positive int, got {k!r}")
    group["mask_interval"] = value


def _l1_mode(group: Dict[str, Any], where: str) -> None:
    if "l1_mode" in group and group["l1_mode"] not in L1_MODES:
        raise ValueError(f"{where}l1_mode: expected one of {', '.join(map(repr, L1_MODES))}, got {group['l1_mode']!r}")


def _ramp_end(group: Dict[str, Any], where: str) -> None:
    # Absent from groups saved before it existed: those get the paper's ramp (1).
    if "ramp_end" not in group:
        return
    value = real(group["ramp_end"])
    if value is None or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{where}ramp_end: expected a number in (0, 1] (the fraction of total_steps at which the decay is "
            f"fully on), got {group['ramp_end']!r}"
        )
    group["ramp_end"] = value


def _run_fraction(group: Dict[str, Any], where: str, key: str, what: str) -> None:
    """Checks a ramp given as a fraction of total_steps (``warmup``, ``cooldown``)."""
    # Absent from groups saved before it existed: those have none (0).
    if key not in group:
        return
    value = real(group[key])
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}{key}: expected a number in [0, 1) ({what}), got {group[key]!r}")
    if value > 0.0 and group.get("total_steps") is None:
        raise ValueError(f"{where}{key}: {value} is a fraction of total_steps, so total_steps must be given")
    group[key] = value


def _warmup(group: Dict[str, Any], where: str) -> None:
    _run_fraction(group, where, "warmup", "the fraction of total_steps over which AdamS ramps its learning rate up")


def _cooldown(group: Dict[str, Any], where: str) -> None:
    what = "the fraction of total_steps at the end of the run over which AdamS ramps its learning rate down"
    _run_fraction(group, where, "cooldown", what)


def _pattern(group: Dict[str, Any], where: str) -> None:
    if group["pattern"] is not None:
        parse_pattern(group["pattern"], param=f"{where}pattern")


_CHECKS = (_kernel_scalars, _total_steps, _l1_mode, _ramp_end, _warmup, _cooldown, _mask_interval, _pattern)


_PLAIN = (float, int, str, bool, type(None))


def snapshot(group: Dict[str, Any]) -> Optional[tuple]:
    """The group's settings as an immutable value (types included, so ``np.float32(1e-3)`` and
    ``1e-3`` differ), for skipping :func:`check_group` while a group is unchanged; None when a
    setting can change without the group changing (a tensor ``lr`` or ``betas``, a list), so
    that such a group is checked at every step."""
    out = []
    for key, value in group.items():
        if key == "params" or key == "param_names":
            continue
        kind = type(value)
        if kind is tuple:
            if not all(type(v) is float for v in value):
                return None
        elif kind not in _PLAIN:
            return None
        out.append((key, kind, value))
    return tuple(out)


def check_group(group: Dict[str, Any], where: str) -> None:
    """Check a group's hyperparameters in place, storing plain numbers; ``where`` prefixes the
    parameter's name in messages (``"param_groups[1]: "``)."""
    for check in _CHECKS:
        check(group, where)
