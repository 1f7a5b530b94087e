"""Argument checks shared by the entry points that hand tensors to the Rust extension."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ._cast_rs import CastError

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def check_plain_tensor(t: torch.Tensor, name: str) -> None:
    """Refuse tensor subclasses (DTensor, fake/functional tensors, ...): the kernels read a
    tensor's own storage, which a subclass wrapper does not have. (AdamS, ``finalize``,
    ``stats`` and ``check_nm`` handle FSDP2's DTensor parameters themselves; for these
    functions pass ``t.to_local()`` for a local shard or ``t.full_tensor()``.)"""
    if type(t) not in _PLAIN:
        kind = type(t).__name__
        hint = " (pass .to_local() for the local shard or .full_tensor() for the whole tensor)" if kind == "DTensor" else ""
        raise CastError(f"{name}: {kind} tensors are not supported, only plain torch.Tensor / nn.Parameter{hint}")


def tracing(t: torch.Tensor) -> bool:
    """True while ``t`` is traced (``torch.compile``, ``torch.export``, fake tensors), when
    its type is the tracer's and :func:`check_plain_tensor` does not apply."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or isinstance(t, FakeTensor)
