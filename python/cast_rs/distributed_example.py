"""CAST with several processes: ``torchrun --nproc-per-node 2 -m cast_rs distributed``.

The MLP of ``python -m cast_rs example`` (32-256-256-8) learns a fixed random "teacher"
network. Every rank first trains the same dense model (identical, seeded), then the CAST phase
runs distributed: ``sparsify`` → ``fully_shard`` (``--mode fsdp``, the default) or
``DistributedDataParallel`` (``--mode ddp``) → ``AdamS``, each rank taking its slice of every
global batch. Then ``finalize`` and ``check_nm`` on every rank; rank 0 prints the results and,
with ``--save PATH``, writes the finalized weights as a plain state dict (the original
architecture's keys; ``load_state_dict`` into ``_mlp()`` works).

Started without ``torchrun`` it runs as a world of one process. Backend: NCCL with one GPU per
rank when CUDA is available, gloo on CPU otherwise.
"""

from __future__ import annotations

import copy
import gc
import os
import socket
import time
from typing import Optional

import torch
from torch import nn

from .example import _mlp
from .nm import parse_pattern
from .optim import AdamS
from .checking import check_nm
from .export import plain_state_dict
from .sparsity import sparsify

GLOBAL_BATCH = 256


def _init_process_group() -> torch.device:
    import torch.distributed as dist

    if "RANK" not in os.environ:  # not started by torchrun: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def main(mode: str = "fsdp", steps: int = 600, pattern: str = "2:4", save: Optional[str] = None, seed: int = 0) -> int:
    import torch.distributed as dist

    if mode not in ("fsdp", "ddp"):
        raise ValueError(f"mode: expected 'fsdp' or 'ddp', got {mode!r}")
    parse_pattern(pattern)  # a bad pattern fails before the process group starts
    device = _init_process_group()
    try:
        code = _run(mode, steps, pattern, save, seed, device)
        dist.barrier()  # every rank is done before any tears the group down
        return code
    finally:
        # The model, its DeviceMesh and the last collectives' work objects all hold the gloo
        # group. They must be gone (they are _run's locals; gc breaks FSDP's reference cycles)
        # so that destroy_process_group really destroys it now, joining its worker threads.
        # Otherwise the group outlives main() and a worker thread releases a tensor while the
        # interpreter shuts down: "terminate called without an active exception" (SIGABRT),
        # about once in 20 runs here.
        gc.collect()
        dist.destroy_process_group()


def _run(mode: str, steps: int, pattern: str, save: Optional[str], seed: int, device: torch.device) -> int:
    import torch.distributed as dist

    n, m = parse_pattern(pattern)
    rank, world = dist.get_rank(), dist.get_world_size()
    if GLOBAL_BATCH % world:
        raise ValueError(f"world size {world} must divide the global batch of {GLOBAL_BATCH}")
    per = GLOBAL_BATCH // world

    # Data and the dense starting point: identical on every rank (same seeds).
    torch.manual_seed(seed)
    teacher = _mlp(256).to(device)
    x_train, x_val = torch.randn(4096, 32, device=device), torch.randn(1024, 32, device=device)
    with torch.no_grad():
        y_train, y_val = teacher(x_train), teacher(x_val)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch() -> torch.Tensor:
        return torch.randint(0, x_train.shape[0], (GLOBAL_BATCH,), generator=gen).to(device)

    def val_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x_val), y_val))

    dense = _mlp(256).to(device)
    opt = torch.optim.AdamW(dense.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = batch()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(dense(x_train[idx]), y_train[idx]).backward()
        opt.step()
    dense_loss = val_loss(dense)

    # CAST, distributed.
    model = copy.deepcopy(dense)
    sparse = sparsify(model, (n, m), exclude=["4"])  # before wrapping; the output layer stays dense
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        trained = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
    opt = AdamS(trained.parameters(), lr=1e-3, l1_decay=1e-2, total_steps=steps)  # after fully_shard
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = batch()[rank * per : (rank + 1) * per]  # this rank's slice of the global batch
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(trained(x_train[idx]), y_train[idx]).backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    report = sparse.finalize()  # every rank
    exact = check_nm(model, (n, m)).ok  # every rank
    cast_loss = val_loss(trained)

    if save:
        if mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = plain_state_dict(
                get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            )
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, save)
    if rank == 0:
        print(
            f"cast-rs distributed example: {world} process(es), {mode.upper()}, {device.type}; "
            f"MLP 32-256-256-8, {pattern} on its hidden weights, {steps} steps, global batch {GLOBAL_BATCH}"
        )
        label = f"CAST {pattern} ({mode})"
        print(f"{'dense':<22}val MSE {dense_loss:.5f}")
        print(
            f"{label:<22}val MSE {cast_loss:.5f}   {cast_loss / dense_loss:.2f}x dense   "
            f"exact {pattern}: {'yes' if exact else 'NO'}   {seconds:.1f} s"
        )
        print(f"finalize cut {100 * report.total_l1_removed_fraction:.2f}% of the sparse layers' L1 mass")
        if save:
            print(f"saved the finalized weights (plain state dict) to {save}")
    return 0 if exact else 1
