"""A small CAST training run that checkpoints and resumes; the child process of test_resume.py.

    python tests/_resume_worker.py DIR [--steps 60] [--ckpt-every 7] [--hang-after N]

Builds the model deterministically (seed 0; the dense teacher is copied before ``sparsify``),
trains with ``cast_rs.AdamS`` + a cosine LR schedule + ``distill_loss`` on data drawn per step
from a generator seeded with the step index (so the data never depends on RNG state carried
across a kill), and every ``--ckpt-every`` steps writes ``DIR/ckpt.pt`` atomically (a temp file,
then ``os.replace``): model, optimizer and scheduler state, the step and the torch RNG state
(dropout draws from it). If ``DIR/ckpt.pt`` exists at start, it rebuilds the model the same way,
loads everything and continues from the step after; it prints ``resumed from step S``.

After each step it prints ``step N`` (flushed). With ``--hang-after N`` it stops after step N
and sleeps, mid-run, for the parent to SIGKILL it. At the end it writes ``DIR/final.pt``: the
model and optimizer state before ``finalize``, the model state after it, the scheduler state
and the kernel-path counters.

The kernel path is the process's: ``CAST_RS_FORCE_GENERIC=1`` forces the generic one.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch import nn

import cast_rs


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.GELU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, 16),
    )
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sparse = cast_rs.sparsify(model, "2:4")
    return model, teacher, sparse


def batch(step: int):
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(32, 32, generator=g)
    y = torch.randint(0, 16, (32,), generator=g)
    return x, y


def save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ckpt-every", type=int, default=7)
    ap.add_argument("--hang-after", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T = args.steps
    ckpt = os.path.join(args.dir, "ckpt.pt")

    model, teacher, sparse = build()
    optimizer = cast_rs.AdamS(model.parameters(), lr=1e-2, total_steps=T, mask_interval=3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T, eta_min=1e-4)
    start = 1
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start = state["step"] + 1
        print(f"resumed from step {state['step']}", flush=True)

    model.train()
    for step in range(start, T + 1):
        x, y = batch(step)
        optimizer.zero_grad()
        with torch.no_grad():
            t_logits = teacher(x)
        cast_rs.distill_loss(model(x), t_logits, y).backward()
        optimizer.step()
        scheduler.step()
        if step % args.ckpt_every == 0 and step < T:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "rng": torch.get_rng_state(),
                },
                ckpt,
            )
        print(f"step {step}", flush=True)
        if step == args.hang_after:
            while True:  # mid-run: steps after the last checkpoint are only in memory
                time.sleep(60)

    pre_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre_opt = copy.deepcopy(optimizer.state_dict())
    sparse.finalize()
    assert cast_rs.check_nm(model, "2:4").ok
    save_atomic(
        {
            "model_before_finalize": pre_model,
            "optimizer": pre_opt,
            "model": model.state_dict(),
            "scheduler": scheduler.state_dict(),
            "lr": [g["lr"] for g in optimizer.param_groups],
            "rng": torch.get_rng_state(),
            "kernel_calls": list(optimizer._kernel_calls),
            "generic_forced": cast_rs.generic_path_forced(),
        },
        os.path.join(args.dir, "final.pt"),
    )
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
