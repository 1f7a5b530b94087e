"""Worker for tests/test_distributed.py, started with ``torchrun --standalone --nproc-per-node 2``
(gloo, CPU). Also imported by the test for the single-process reference run.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_worker.py SCENARIO OUT_DIR

Scenarios:
  ddp          DDP training; saves per-rank parameters and masks; finalize + check_nm.
  fsdp         FSDP2 (fully_shard) training; a DCP checkpoint after CKPT_STEP steps; saves
               the gathered parameters and masks, then finalize + check_nm + plain_state_dict.
  fsdp_resume  FSDP2 run that loads the DCP checkpoint of ``fsdp`` and trains to the end.
  fsdp_split   a dim-0 (Conv1D) 2:4 layer whose shards would split groups: AdamS must refuse.
  fsdp_relative  FSDP2 training with l1_mode="relative" (λ from the whole tensor's momentum).
  fsdp_gpt2    a Hugging Face GPT-2 (random init) under FSDP2: train, finalize, check_nm, and a
               full state dict for the original architecture.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Dict, Tuple

import torch
from torch import nn
import torch.nn.functional as F

GLOBAL_BATCH = 8
STEPS = 12
CKPT_STEP = 7  # a DCP checkpoint between mask refreshes (mask_interval 3: refreshes 1, 4, 7, 10)
LR = 1e-2


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a Linear with its weight stored [in, out] (groups along dim 0)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


class Net(nn.Module):
    """Under FSDP2 with 2 ranks: fc1 and conv shard evenly, head (9 rows) unevenly (5 + 4), and
    gate (1 row) leaves rank 1 an empty shard."""

    def __init__(self, conv_in: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, conv_in)
        self.conv = Conv1D(24, conv_in)
        self.head = nn.Linear(24, 9)
        self.gate = nn.Linear(24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.fc1(x))))
        return self.head(h) * torch.sigmoid(self.gate(h))


def build(conv_in: int = 32) -> Tuple[nn.Module, "object"]:
    import cast_rs

    torch.manual_seed(0)
    model = Net(conv_in)
    sparse = cast_rs.sparsify(model, "2:4")
    return model, sparse


#: AdamS settings of the ``fsdp_relative`` scenario (and of its single-process reference).
RELATIVE = dict(l1_mode="relative", l1_decay=3.0, ramp_end=0.5)


def make_optimizer(model: nn.Module, **overrides):
    import cast_rs

    kw = dict(lr=LR, total_steps=STEPS, mask_interval=3, l1_decay=0.05)
    kw.update(overrides)
    return cast_rs.AdamS(model.parameters(), **kw)


def batch(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: a function of the step only (no RNG state carried)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=g)
    y = torch.randint(0, 8, (GLOBAL_BATCH,), generator=g)
    return x, y


def train(model: nn.Module, opt, first: int, last: int, rank: int = 0, world: int = 1) -> None:
    """Steps first..last (1-based, inclusive); each rank takes its slice of the global batch."""
    per = GLOBAL_BATCH // world
    for step in range(first, last + 1):
        x, y = batch(step)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    from cast_rs._dtensor import full

    return {name: full(p.detach()).clone() for name, p in model.named_parameters()}


def full_masks(model: nn.Module, opt) -> Dict[str, torch.Tensor]:
    from cast_rs._dtensor import full

    names = {p: name for name, p in model.named_parameters()}
    return {names[p]: full(keep).clone() for p, keep in opt.masks().items()}


def reference(steps: int = STEPS) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], nn.Module, "object"]:
    """Single process over the global batch: what every distributed run must match."""
    model, sparse = build()
    opt = make_optimizer(model)
    train(model, opt, 1, steps)
    return full_params(model), full_masks(model, opt), model, sparse


def reference_relative() -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, float]]:
    """The single-process run of ``fsdp_relative``: parameters, masks and λ by name."""
    model, _ = build()
    opt = make_optimizer(model, **RELATIVE)
    train(model, opt, 1, STEPS)
    return full_params(model), full_masks(model, opt), relative_l1(model, opt)


def relative_l1(model: nn.Module, opt) -> Dict[str, float]:
    """λ of each sparse parameter (``l1_mode="relative"``), by parameter name."""
    return {name: opt.state[p]["l1_decay"] for name, p in model.named_parameters() if "l1_decay" in opt.state.get(p, {})}


# ------------------------------------------------------------------------------- scenarios


def run_ddp(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import cast_rs

    model, sparse = build()
    ddp = DDP(model)
    opt = make_optimizer(ddp)
    train(ddp, opt, 1, STEPS, rank, world)
    params, masks = full_params(model), full_masks(model, opt)
    # Masks identical on every rank: compare with rank 0's through a broadcast.
    same = True
    for name in sorted(masks):
        theirs = masks[name].to(torch.uint8).clone()
        dist.broadcast(theirs, src=0)
        same &= torch.equal(theirs.bool(), masks[name])
    sparse.finalize()
    ok = cast_rs.check_nm(model, "2:4").ok
    torch.save({"params": params, "masks": masks, "masks_equal_rank0": same, "check_nm": ok}, os.path.join(out, f"rank{rank}.pt"))


def _shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.conv, model.head, model.gate):
        fully_shard(layer)
    fully_shard(model)


def _dcp_state(model: nn.Module, opt) -> Dict[str, object]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def run_fsdp(rank: int, world: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import cast_rs
    from cast_rs._dtensor import is_dtensor

    model, sparse = build()
    _shard(model)
    opt = make_optimizer(model)
    p = model.fc1.parametrizations.weight.original
    info = {
        "weight_is_dtensor": is_dtensor(p),
        "weight_local_shape": tuple(p.to_local().shape),
    }
    train(model, opt, 1, CKPT_STEP, rank, world)
    st = opt.state[p]
    info["state_types"] = {k: type(v).__name__ for k, v in st.items()}
    info["mask_shape"] = tuple(st["mask"].shape)
    info["mask_local_bytes"] = st["mask"].to_local().numel()
    dcp.save(_dcp_state(model, opt), checkpoint_id=os.path.join(out, "dcp"))
    train(model, opt, CKPT_STEP + 1, STEPS, rank, world)
    params, masks = full_params(model), full_masks(model, opt)
    stats = sparse.stats(opt)
    info["stats_overall"] = stats.overall
    info["flip_rates"] = [row.mask_flip_rate for row in stats]
    report = sparse.finalize()
    ok = cast_rs.check_nm(model, "2:4").ok
    x, _ = batch(0)
    logits = model(x)  # the finalized model still runs under FSDP2
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = cast_rs.plain_state_dict(sd)
        torch.save(
            {
                "params": params,
                "masks": masks,
                "check_nm": ok,
                "info": info,
                "plain": plain,
                "logits": logits.detach(),
                "finalize_rows": len(report),
            },
            os.path.join(out, "fsdp.pt"),
        )


def run_fsdp_relative(rank: int, world: int, out: str) -> None:
    """FSDP2 with l1_mode="relative": λ must be measured over the whole tensor, not the shard."""
    model, _ = build()
    _shard(model)
    opt = make_optimizer(model, **RELATIVE)
    train(model, opt, 1, STEPS, rank, world)
    params, masks = full_params(model), full_masks(model, opt)
    if rank == 0:
        torch.save({"params": params, "masks": masks, "l1": relative_l1(model, opt)}, os.path.join(out, "relative.pt"))


def run_fsdp_resume(rank: int, world: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model, sparse = build()
    _shard(model)
    opt = make_optimizer(model)
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=os.path.join(out, "dcp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, CKPT_STEP + 1, STEPS, rank, world)
    params, masks = full_params(model), full_masks(model, opt)
    if rank == 0:
        torch.save({"params": params, "masks": masks}, os.path.join(out, "fsdp_resume.pt"))


def run_fsdp_split(rank: int, world: int, out: str) -> None:
    import cast_rs

    model, sparse = build(conv_in=20)  # dim 0 of 20 rows → 10 per rank: splits groups of 4
    _shard(model)
    try:
        make_optimizer(model)
        message = None
    except cast_rs.CastError as e:
        message = str(e)
    with open(os.path.join(out, f"split{rank}.txt"), "w") as f:
        f.write(repr(message))


GPT2_STEPS = 6


def build_gpt2():
    import transformers

    import cast_rs

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    sparse = cast_rs.sparsify(model, "2:4")
    return model, sparse


def gpt2_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2000 + step))


def train_gpt2(model: nn.Module, opt, rank: int = 0, world: int = 1) -> None:
    per = 4 // world
    for step in range(1, GPT2_STEPS + 1):
        ids = gpt2_batch(step)[rank * per : (rank + 1) * per]
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def reference_gpt2(world: int = 2):
    """One process computing the gradient FSDP2 computes with `world` ranks: the mean of the
    per-rank gradients, each on its slice of the global batch. The loss is scaled by 1/world
    (a power of two, so every backward value is the rank's gradient scaled exactly) and
    accumulated in rank order; a sum of two float32 terms is exact-rounded and commutative,
    so this reproduces the reduce-scatter's `(g0 + g1) / 2` bit for bit. A single backward
    over the whole batch would not: its sums run in another order, and AdamS's near-sign
    steps turn a last-bit difference in a near-zero gradient into a step of up to ±lr."""
    import cast_rs

    model, sparse = build_gpt2()
    opt = cast_rs.AdamS(model.parameters(), lr=3e-3, total_steps=GPT2_STEPS, mask_interval=2)
    per = 4 // world
    for step in range(1, GPT2_STEPS + 1):
        batch = gpt2_batch(step)
        for rank in range(world):
            ids = batch[rank * per : (rank + 1) * per]
            (model(ids, labels=ids).loss / world).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sparse.finalize()
    return model


def run_fsdp_gpt2(rank: int, world: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    import cast_rs
    from cast_rs.optim import NM_ATTR

    model, sparse = build_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = cast_rs.AdamS(model.parameters(), lr=3e-3, total_steps=GPT2_STEPS, mask_interval=2)
    sparse_params = sum(1 for group in opt.param_groups for p in group["params"] if getattr(p, NM_ATTR, None) is not None)
    train_gpt2(model, opt, rank, world)
    sparse.finalize()
    ok = cast_rs.check_nm(model, "2:4").ok
    logits = model(gpt2_batch(0)).logits.detach()
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(
            {"plain": cast_rs.plain_state_dict(sd), "check_nm": ok, "logits": logits, "sparse_params": sparse_params},
            os.path.join(out, "gpt2.pt"),
        )


def main() -> None:
    import torch.distributed as dist

    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        scenarios = {
            "ddp": run_ddp,
            "fsdp": run_fsdp,
            "fsdp_resume": run_fsdp_resume,
            "fsdp_split": run_fsdp_split,
            "fsdp_gpt2": run_fsdp_gpt2,
            "fsdp_relative": run_fsdp_relative,
        }
        scenarios[scenario](rank, world, out)
        # The scenario's FSDP modules hold reference cycles: collect them (and the gloo work
        # objects they keep) before the group is destroyed. Otherwise a gloo thread can drop the
        # last one during interpreter shutdown and abort the rank ("terminate called without an
        # active exception", ~4 % of runs; the example's fix, commit 6ddd6f1).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
