"""DTensor (FSDP2, ``torch.distributed.tensor``) support: local shards for the kernels.

The kernels read a tensor's own storage, which a DTensor wrapper does not have, so AdamS
steps the *local shard* of each DTensor parameter (``p.to_local()``, a view of the same
storage). That is exact for Adam and for the N:M projection as long as every N:M group lies
whole on one rank:

* placements may be ``Shard(d)`` (plain, not strided) or ``Replicate()``; a ``Partial``
  parameter is refused;
* a sparse parameter may be sharded only along dim 0 (FSDP2's default). Groups along the last
  dimension (``nn.Linear``) are then always whole; groups along dim 0 (``Conv1D``) are whole
  only when this rank's rows start and end on a multiple of M, which is checked on every rank
  and refused otherwise (never silently treated as dense);
* the packed mask of a sharded parameter is kept as a ``uint8`` DTensor of global shape
  ``[d0, numel / d0 / 8]`` with the parameter's placements, so each rank's bytes are exactly
  its shard's packed mask and ``torch.distributed.checkpoint`` saves and reloads per-rank
  masks like any other sharded state. That needs ``numel / d0`` (the size of one dim-0 slice)
  to be a multiple of 8, which is also checked.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional, Tuple

import torch


def is_dtensor(t: Any) -> bool:
    # Importing torch.distributed.tensor costs ~0.7 s; a DTensor can only exist once it has
    # been imported, so look it up instead of importing it with cast_rs.
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of its storage: writes land in the DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def local_mask(bits: torch.Tensor) -> torch.Tensor:
    """The flat packed mask the kernel takes: the local ``[rows, width]`` shard of a DTensor
    mask, flattened; a plain mask is already flat (no view made on the step's hot path)."""
    return bits.to_local().reshape(-1) if is_dtensor(bits) else bits


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective: call on every rank)."""
    return t.full_tensor() if is_dtensor(t) else t


def local_offset(t: torch.Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of DTensor ``t``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(shape), tuple(offset)


def _placements_text(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(pl) for pl in t.placements) + ")"


def check_grad(p: torch.Tensor, g: torch.Tensor, name: str) -> None:
    """The gradient of DTensor ``p`` must be a DTensor on the same mesh with the same
    placements (FSDP2 reduce-scatters it so). Raises ``CastError``."""
    from ._cast_rs import CastError

    if not is_dtensor(g):
        raise CastError(f"{name}: the parameter is a DTensor but its gradient is a {type(g).__name__}")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise CastError(
            f"{name}: gradient placements {_placements_text(g)} differ from the parameter's "
            f"{_placements_text(p)} (AdamS needs both sharded the same way)"
        )


def check_sharding(p: torch.Tensor, spec: Optional[Tuple[int, int, int]], name: str) -> None:
    """Validate how DTensor ``p`` is sharded for a local-shard step (``spec``: its N:M spec
    or None). Raises ``CastError`` naming the parameter; writes nothing."""
    from torch.distributed.tensor import Replicate, Shard

    from ._cast_rs import CastError

    for pl in p.placements:
        if not (type(pl) is Shard or type(pl) is Replicate):
            raise CastError(
                f"{name}: DTensor placement {pl} is not supported; AdamS steps local shards of "
                f"Shard(d) / Replicate() parameters (got placements {_placements_text(p)})"
            )
    if spec is None:
        return
    n, m, dim = spec
    gdim = p.dim() - 1 if dim == -1 else 0
    shard_dims = sorted({pl.dim % p.dim() for pl in p.placements if type(pl) is Shard})
    if any(d != 0 for d in shard_dims):
        raise CastError(
            f"{name}: a {n}:{m} sparse DTensor parameter must be sharded along dim 0 only "
            f"(FSDP2's default), got placements {_placements_text(p)}; drop the shard_placement_fn "
            "for this parameter"
        )
    if not shard_dims:
        return
    row = math.prod(p.shape[1:])
    if row % 8:
        raise CastError(
            f"{name}: a {n}:{m} parameter sharded along dim 0 needs each dim-0 slice to hold a "
            f"multiple of 8 weights (its packed mask is sharded with it), got {row} for shape "
            f"{tuple(p.shape)}"
        )
    if gdim == 0:
        shape, offset = local_offset(p)
        if offset[0] % m or shape[0] % m:
            world = p.device_mesh.size()
            raise CastError(
                f"{name}: sharding splits {n}:{m} groups: groups run along dim 0 (size {p.shape[0]}) "
                f"and this rank holds rows {offset[0]}..{offset[0] + shape[0]} of it "
                f"({world} shards), which is not on a multiple of M={m}. Pick a world size for which "
                f"ceil({p.shape[0]} / world size) is a multiple of {m}, or leave this layer dense"
            )


def mask_like(p: torch.Tensor, local_bits: torch.Tensor) -> torch.Tensor:
    """Wrap this rank's packed mask of the local shard of ``p`` as a ``uint8`` DTensor of
    global shape ``[d0, numel/d0/8]`` sharded like ``p`` (see the module docstring)."""
    from torch.distributed.tensor import DTensor, Shard

    if not any(type(pl) is Shard for pl in p.placements):
        # Replicated everywhere: every rank holds the same whole mask.
        return DTensor.from_local(local_bits, p.device_mesh, p.placements, run_check=False)
    d0 = p.shape[0]
    width = math.prod(p.shape[1:]) // 8
    rows = p.to_local().shape[0]
    return DTensor.from_local(
        local_bits.reshape(rows, width),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=torch.Size((d0, width)),
        stride=(width, 1),
    )


def write_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor ``value`` into DTensor ``p``'s local shard."""
    shape, offset = local_offset(p)
    piece = value
    for d, (size, start) in enumerate(zip(shape, offset)):
        piece = piece.narrow(d, start, size)
    p.to_local().copy_(piece)
