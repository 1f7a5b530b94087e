"""Training step time: masked N:M LoRA (``cast_rs.lora``) against plain peft LoRA, same model.

    ./run bench lora [--model small|wide] [--ranks 4 16 64] [--dtypes float32 bfloat16]
                     [--batch 16] [--reps 7] [--steps 5] [--threads 1]

A finalized 2:4 copy of the demo's TinyGPT (random weights: the time does not depend on them)
gets LoRA on every N:M layer (qkv, proj, fc1, fc2) twice, from the same weights: peft's plain
LoRA (``get_peft_model``) and the masked one (``cast_rs.lora``). One step is zero_grad, forward,
cross-entropy, backward and an AdamW step on the adapters. The two are timed interleaved
(``--reps`` rounds of ``--steps`` steps each, after warm-up steps), and the median step times and
their ratio are printed side by side with the host's CPU model, cores and L3 cache.

Where the time goes: the masked forward forms ``W + (s·B·A)⊙M`` and runs one matmul; its
backward needs ``G = gᵀx`` (tokens × out × in) for the masked adapter gradients, a matmul that
plain LoRA does not run (its adapter gradients go through the rank-r factors). So on the
adapted layers the masked step does about 3 matmuls of that size where plain LoRA does 2.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import cast_rs
from cast_rs.demo import GPTConfig, TinyGPT

MODELS = {
    "small": GPTConfig(),  # the demo's: width 128, 4 layers
    "wide": GPTConfig(width=512, layers=4, heads=8),
}
TARGETS = ["qkv", "proj", "fc1", "fc2"]


def host() -> str:
    """CPU model, logical / physical cores, L3 cache, and torch's thread count."""
    model = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    l3 = "?"
    physical = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        l3 = fields.get("L3 cache", "?")
        cores, sockets = fields.get("Core(s) per socket"), fields.get("Socket(s)")
        if cores and sockets:
            physical = str(int(cores) * int(sockets))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    return (
        f"host: {model}; {os.cpu_count()} logical CPUs, {physical} physical cores; L3 {l3}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)"
    )


def sparse_model(c: GPTConfig, dtype: torch.dtype) -> TinyGPT:
    torch.manual_seed(0)
    model = TinyGPT(c)
    sp = cast_rs.sparsify(model, "2:4", scaling_groups=0)
    sp.finalize()
    sp.release_mask()  # the base is frozen under LoRA: no step hook to time
    return model.to(dtype)


def adapted(base: TinyGPT, masked: bool, rank: int):
    import peft

    model = copy.deepcopy(base)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    pm = cast_rs.lora(model, config) if masked else peft.get_peft_model(model, config)
    torch.manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # nonzero updates: the same work as mid-training
            torch.nn.init.normal_(p, std=0.02)
    return pm


def stepper(pm, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    pm.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = pm(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()

    return step


def measure(steps: Dict[str, Callable[[], None]], reps: int, k: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per step of each, timed interleaved (rounds of k steps)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - t0) / k)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=sorted(MODELS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    c = MODELS[a.model]
    print(host())
    print(
        f"model {a.model} (width {c.width}, {c.layers} layers, context {c.context}), 2:4 on {'/'.join(TARGETS)}; "
        f"batch {a.batch} x {c.context} tokens; median of {a.reps} interleaved rounds of {a.steps} steps"
    )
    print(f"{'dtype':<9} {'rank':>4}  {'plain peft ms':>13}  {'masked ms':>9}  {'masked / plain':>14}")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, c.vocab, (a.batch, c.context), generator=g)
    y = torch.randint(0, c.vocab, (a.batch, c.context), generator=g)
    for dname in a.dtypes:
        base = sparse_model(c, getattr(torch, dname))
        for r in a.ranks:
            steps = {"plain": stepper(adapted(base, False, r), x, y), "masked": stepper(adapted(base, True, r), x, y)}
            t = measure(steps, a.reps, a.steps)
            print(
                f"{dname:<9} {r:>4}  {1e3 * t['plain']:>13.1f}  {1e3 * t['masked']:>9.1f}  {t['masked'] / t['plain']:>14.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
