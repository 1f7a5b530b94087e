"""AdamS's hyperparameters: turning what a user passes into plain Python numbers, and their
ranges.

Users pass NumPy scalars, 0-d tensors (``lr``, ``betas``) and the like, as they do to
``torch.optim``; a group is stored with plain ``float`` / ``int`` values so that
``state_dict()`` and the kernels see plain types. Each range is checked here, before any
parameter or state is written; the kernels check them again at their entry (so that a direct
``torch.ops.cast_rs.adams_step_`` call is safe too).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

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


def _lr(group: Dict[str, Any], where: str) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):  # a tensor lr stays a tensor (torch.optim allows it)
        if lr.numel() != 1:
            raise ValueError(f"{where}lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        value: Optional[float] = float(lr)
    else:
        value = real(lr)
        if value is not None:
            group["lr"] = value
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}lr: expected a finite number >= 0, got {group['lr']!r}")


def _betas(group: Dict[str, Any], where: str) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas: expected a pair (beta1, beta2), got {betas!r}")
    plain = []
    for i, b in enumerate(betas):
        value = float(b) if isinstance(b, torch.Tensor) else real(b)
        if value is None or not 0.0 <= value < 1.0:
            raise ValueError(f"{where}betas[{i}]: expected a number in [0, 1), got {betas[i]!r}")
        plain.append(b if isinstance(b, torch.Tensor) else value)
    group["betas"] = tuple(plain)


def _number(
    key: str, ok: Callable[[float], bool], expected: str, optional: bool = False
) -> Callable[[Dict[str, Any], str], None]:
    """A check of a real-valued key: converted to float, refused unless ``ok``; ``optional``
    keys may be absent (groups saved before they existed get their default)."""

    def check(group: Dict[str, Any], where: str) -> None:
        if optional and key not in group:
            return
        value = real(group[key])
        if value is None or not ok(value):
            raise ValueError(f"{where}{key}: expected {expected}, got {group[key]!r}")
        group[key] = value

    return check


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


def _pattern(group: Dict[str, Any], where: str) -> None:
    if group["pattern"] is not None:
        parse_pattern(group["pattern"], param=f"{where}pattern")


def _finite_nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0


_CHECKS = (
    _lr,
    _betas,
    _number("eps", _finite_nonneg, "a finite number >= 0"),
    _number("weight_decay", _finite_nonneg, "a finite number >= 0"),
    _number("l1_decay", _finite_nonneg, "a finite number >= 0"),
    _total_steps,
    _l1_mode,
    _number(
        "ramp_end",
        lambda x: 0.0 < x <= 1.0,
        "a number in (0, 1] (the fraction of total_steps at which the decay is fully on)",
        optional=True,
    ),
    _number(
        "masked_lr_scale",
        lambda x: math.isfinite(x) and x > 0.0,
        "a finite number > 0 (the masked weights' lr relative to the kept weights')",
        optional=True,
    ),
    _mask_interval,
    _pattern,
)


def check_group(group: Dict[str, Any], where: str) -> None:
    """Check a group's hyperparameters in place, storing plain numbers; ``where`` prefixes the
    parameter's name in messages (``"param_groups[1]: "``)."""
    for check in _CHECKS:
        check(group, where)
