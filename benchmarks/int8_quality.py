"""What int8 2:4 weights cost in quality: the demo's CAST 2:4 model, compressed four ways.

    .venv/bin/python benchmarks/int8_quality.py                 # the demo's default settings
    .venv/bin/python benchmarks/int8_quality.py --quick         # the demo's --quick model (seconds)
    .venv/bin/python benchmarks/int8_quality.py --json out.json

Reproduces the CAST run of ``cast-rs demo`` (``python/cast_rs/demo.py``: the shipped dense
checkpoint, ``DemoConfig``'s steps, learning rate, warmup, L1 decay and batches, distillation
from the dense model, ``finalize``), then measures validation perplexity (the demo's windows,
its ``eval_windows`` of ``context`` bytes) of:

- the finalized model as it is (float32 ``nn.Linear``, the reference);
- ``cast_rs.compress(model)``: float32 2:4 values, float32 activations (the same numbers up to
  summation order);
- ``model.to(torch.bfloat16)`` then ``compress``: bfloat16 values and activations;
- ``compress(model, dtype=torch.int8)``: int8 values with a float32 scale per output row,
  float32 activations;
- the same int8 model after ``model.to(torch.bfloat16)``: bfloat16 activations.

Logits are scored in float32 whatever the model's dtype (a bfloat16 softmax would add its own
error). The tied output head (the embedding) stays dense in every variant, as ``sparsify``
leaves it. One torch thread by default (the CAST run's bits depend on the thread count).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

import cast_rs
from cast_rs.demo import Batches, DemoConfig, dense_start, from_state, load_corpus, train_cast


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor, windows: int, context: int) -> float:
    """The demo's validation perplexity (``cast_rs.demo.evaluate``'s windows), logits in float32."""
    model.eval()
    starts = torch.linspace(0, val.numel() - context - 2, windows).long()
    total, count = 0.0, 0
    for chunk in starts.split(32):
        seq = val[chunk.unsqueeze(1) + torch.arange(context + 1)].long()
        logits = model(seq[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), reduction="sum"))
        count += seq[:, 1:].numel()
    return math.exp(total / count)


def weight_error(model: nn.Module, reference: nn.Module) -> float:
    """RMS of (stored weight - finalized weight) over the compressed layers, relative to the
    finalized weights' RMS (kept weights only: the zeros are exact in every variant)."""
    ref = dict(reference.named_modules())
    num = den = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, cast_rs.NMLinear):
            w = ref[name].weight.detach().double()
            kept = w != 0
            d = mod.dense_weight().double()
            num += float((d - w)[kept].square().sum())
            den += float(w[kept].square().sum())
    return math.sqrt(num / den)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's --quick model (pretrained here, seconds)")
    ap.add_argument("--steps", type=int, default=None, help="CAST steps (default: the demo's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    t0 = time.perf_counter()
    # As run_demo: the same seed, corpus, batches (CAST trains on the continued-training ones)
    # and dense start.
    torch.manual_seed(cfg.seed)
    train_data, val_data, desc = load_corpus()
    c = cfg.model
    print(f"corpus: {desc}")
    batches = Batches(train_data, cfg.batch, c.context, cfg.seed)
    cont_batches = Batches(train_data, cfg.batch, c.context, cfg.seed + 1)
    dense = dense_start(cfg, train_data, batches, show=False)
    state = copy.deepcopy(dense.state_dict())
    teacher = from_state(c, state, frozen=True)
    model = from_state(c, state)
    handle, _, _, lr = train_cast(
        model, cfg, cont_batches, teacher, lr=cfg.cast_lr, l1_decay=cfg.l1_decay, mask_interval=cfg.mask_interval, show=False
    )
    handle.finalize()
    assert cast_rs.check_nm(model, cfg.pattern).ok
    model.eval()
    print(f"CAST {cfg.pattern}: {cfg.steps} steps, AdamS lr {lr:.3g}, finalized ({time.perf_counter() - t0:.0f} s)")

    ppl = lambda m: perplexity(m, val_data, cfg.eval_windows, c.context)  # noqa: E731
    rows: Dict[str, Dict] = {}

    def record(name: str, m: nn.Module, report=None) -> None:
        rows[name] = {
            "val_ppl": ppl(m),
            "bytes_per_weight": None if report is None else report.bytes_per_weight,
            "weight_rel_rms_error": None if report is None else weight_error(m, model),
        }

    record("dense (pretrained, float32)", dense)
    record("CAST 2:4 finalized, float32 nn.Linear", model)
    f32 = copy.deepcopy(model)
    record("compressed float32", f32, cast_rs.compress(f32))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    record("compressed bfloat16 (values and activations)", bf16, cast_rs.compress(bf16))
    q8 = copy.deepcopy(model)
    report = cast_rs.compress(q8, dtype=torch.int8)
    record("compressed int8, float32 activations", q8, report)
    record("compressed int8, bfloat16 activations", q8.to(torch.bfloat16), report)

    base = rows["compressed float32"]["val_ppl"]
    print(f"\nvalidation perplexity ({cfg.eval_windows} windows of {c.context} bytes; {args.threads} torch thread(s)):")
    print(f"{'model':<46} {'val ppl':>8} {'vs f32 2:4':>10} {'bytes/weight':>12} {'weight rel. RMS err':>19}")
    for name, r in rows.items():
        bpw = "-" if r["bytes_per_weight"] is None else f"{r['bytes_per_weight']:.3f}"
        err = "-" if r["weight_rel_rms_error"] is None else f"{r['weight_rel_rms_error']:.2e}"
        print(f"{name:<46} {r['val_ppl']:>8.4f} {100 * (r['val_ppl'] / base - 1):>+9.3f}% {bpw:>12} {err:>19}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        out = {"config": {"quick": args.quick, "steps": cfg.steps, "threads": args.threads, "cast_lr": lr}, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
