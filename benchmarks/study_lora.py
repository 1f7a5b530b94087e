"""LoRA on a 2:4 model, adapted to a new corpus: plain peft LoRA, masked LoRA (cast_rs.lora) and
full fine-tuning with the mask fixed (docs/lora.md is its report).

    ./run bench study_lora run [--steps 300] [--ranks 4 16 64] [--lora-lr 1e-3 3e-3]
                               [--full-lr 3e-4 1e-3] [--batch 16] [--threads 1]
    ./run bench study_lora table

The 2:4 model: the demo's dense checkpoint (cast_rs/data/demo_dense.pt, TinyGPT trained on the
Python standard library) made 2:4 with the demo's CAST recipe (400 steps, suggest_adams,
distillation, finalize), cached in ``results/lora/sparse_small_stdlib_400.pt``. Every method then
trains on the English prose corpus of the sparsity-tax study (Vim's manuals) for the same steps
on the same batches (AdamW, betas (0.9, 0.999), no weight decay, clipping at 1, 10 % warmup and
cosine to 0, cross-entropy): LoRA on qkv / proj / fc1 / fc2 with ``lora_alpha = 2r`` (plain and
masked, each rank and learning rate), and full fine-tuning of every parameter with the 2:4 mask
held by ``cast_rs.keep_nm``. For each run: validation perplexity on the new corpus (prose) and
the old one (stdlib); for LoRA, the merged model's N:M check (masked: ``merge_lora``; plain:
``merge_and_unload``, then ``reproject`` onto the 2:4 masks, with the perplexities after it and
the update energy it dropped). One JSON line per run in ``results/lora/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import cast_rs
from cast_rs.demo import SHIPPED_DENSE, Batches, DemoConfig, _cosine, evaluate, from_state, load_dense, train_cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_tax import corpus  # noqa: E402  (the study's corpora: stdlib and prose)

OUT = Path("results/lora")
TARGETS = ["qkv", "proj", "fc1", "fc2"]
EVAL_WINDOWS = 192


def sparse_start(threads: int) -> Dict[str, torch.Tensor]:
    """The 2:4 model every run starts from (made once, cached)."""
    path = OUT / "sparse_small_stdlib_400.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    cfg = DemoConfig()
    state, _ = load_dense(SHIPPED_DENSE)
    tr, va, _ = corpus("stdlib")
    model, teacher = from_state(cfg.model, state), from_state(cfg.model, state, frozen=True)
    torch.manual_seed(cfg.seed)
    handle, _, _, lr = train_cast(
        model, cfg, Batches(tr, cfg.batch, cfg.model.context, cfg.seed + 1), teacher, lr=None, l1_decay=cfg.l1_decay,
        mask_interval=cfg.mask_interval, show=False,
    )  # fmt: skip
    handle.finalize()
    assert cast_rs.check_nm(model, "2:4").ok
    print(f"[start] CAST 2:4, {cfg.steps} steps (lr {lr:.3g}): stdlib val ppl {evaluate(model, va, EVAL_WINDOWS, 128):.4f}")
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def train(model, params, batches: Batches, steps: int, lr: float) -> float:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _cosine(opt, steps, round(0.1 * steps))
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        x, y = batches.get(s)
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


def run_one(method: str, rank: int, lr: float, state, data, a) -> Dict:
    import peft

    (tr_new, va_new), (_, va_old) = data
    cfg = DemoConfig()
    ev = lambda m, va: evaluate(m, va, EVAL_WINDOWS, cfg.model.context)  # noqa: E731
    batches = Batches(tr_new, a.batch, cfg.model.context, a.seed)
    model = from_state(cfg.model, state)
    rec: Dict = {"method": method, "rank": rank, "lr": lr, "steps": a.steps, "batch": a.batch, "seed": a.seed}
    torch.manual_seed(a.seed)
    if method == "full":
        guard = cast_rs.keep_nm(model, "2:4")
        rec["seconds"] = train(model, [p for p in model.parameters()], batches, a.steps, lr)
        guard.release()
        rec["nm_ok"] = cast_rs.check_nm(model, "2:4").ok
        rec["ppl_new"], rec["ppl_old"] = ev(model, va_new), ev(model, va_old)
        return rec
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    pm = cast_rs.lora(model, config) if method == "masked" else peft.get_peft_model(model, config)
    rec["seconds"] = train(pm, [p for p in pm.parameters() if p.requires_grad], batches, a.steps, lr)
    rec["ppl_new"], rec["ppl_old"] = ev(pm, va_new), ev(pm, va_old)
    probe = batches.get(10**6)[0][:4]
    with torch.no_grad():
        adapted = pm(probe)
    if method == "masked":
        merged = cast_rs.merge_lora(pm)
        rec["nm_ok"] = cast_rs.check_nm(merged, "2:4").ok
        with torch.no_grad():
            rec["merged_equal"] = bool(torch.equal(merged(probe), adapted))
        return rec
    report = cast_rs.check_lora(pm)
    rec["off_mask_energy_predicted"] = report.off_mask_energy
    merged = pm.merge_and_unload()
    nm = cast_rs.check_nm(merged, "2:4")
    rec["nm_ok"] = nm.ok
    rec["violating_fraction"] = sum(r.violating_groups for r in nm) / sum(r.groups for r in nm)
    rp = cast_rs.reproject(merged, state)
    rec["reproject_energy_lost"] = rp.energy_lost
    rec["reproject_nm_ok"] = cast_rs.check_nm(merged, "2:4").ok
    rec["reproject_ppl_new"], rec["reproject_ppl_old"] = ev(merged, va_new), ev(merged, va_old)
    return rec


def cmd_run(a) -> None:
    state = sparse_start(a.threads)
    tr_new, va_new, desc_new = corpus("prose")
    tr_old, va_old, desc_old = corpus("stdlib")
    print(f"new corpus: {desc_new}\nold corpus: {desc_old}")
    cfg = DemoConfig()
    start = from_state(cfg.model, state)
    base = {"ppl_new": evaluate(start, va_new, EVAL_WINDOWS, 128), "ppl_old": evaluate(start, va_old, EVAL_WINDOWS, 128)}
    print(f"2:4 start: prose ppl {base['ppl_new']:.4f}, stdlib ppl {base['ppl_old']:.4f}")
    jobs = [("full", 0, lr) for lr in a.full_lr]
    jobs += [(m, r, lr) for r in a.ranks for m in ("plain", "masked") for lr in a.lora_lr]
    for method, rank, lr in jobs:
        rec = run_one(method, rank, lr, state, ((tr_new, va_new), (tr_old, va_old)), a)
        rec.update(start=base, threads=torch.get_num_threads(), torch=torch.__version__.split("+")[0])
        with open(OUT / "runs.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        extra = ""
        if method == "plain":
            extra = f"  reprojected: prose {rec['reproject_ppl_new']:.4f} (energy lost {100 * rec['reproject_energy_lost']:.1f}%)"
        print(
            f"{method:<6} r={rank:<3} lr={lr:<7g} prose {rec['ppl_new']:.4f}  stdlib {rec['ppl_old']:.4f}  "
            f"N:M after merge {rec['nm_ok']}{extra}  ({rec['seconds']:.0f}s)",
            flush=True,
        )


def gain(start: float, ppl: float) -> float:
    """Drop in validation cross-entropy (nats per byte) from the 2:4 start."""
    return math.log(start) - math.log(ppl)


def cmd_table(a) -> None:
    rows = [json.loads(line) for line in open(OUT / "runs.jsonl")]
    rows = [r for r in rows if r["steps"] == a.steps]
    start = rows[0]["start"]
    print(f"2:4 start: prose ppl {start['ppl_new']:.4f}, stdlib ppl {start['ppl_old']:.4f}; {a.steps} steps\n")
    print(
        "| method | rank | lr | prose ppl (new) | stdlib ppl (old) | merged exact 2:4 | plain + re-projection: prose ppl | update energy dropped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["method"] != "full", r["rank"], r["method"], r["lr"])):
        rp = f"{r['reproject_ppl_new']:.4f}" if "reproject_ppl_new" in r else "-"
        en = f"{100 * r['reproject_energy_lost']:.1f} %" if "reproject_energy_lost" in r else "-"
        nm = "yes" if r["nm_ok"] else f"no ({100 * r['violating_fraction']:.0f} % of groups violate)"
        print(
            f"| {r['method']} | {r['rank'] or '-'} | {r['lr']:g} | {r['ppl_new']:.4f} | {r['ppl_old']:.4f} | {nm} | {rp} | {en} |"
        )
    best: Dict[tuple, Dict] = {}
    for r in rows:
        key = (r["method"], r["rank"])
        if key not in best or r["ppl_new"] < best[key]["ppl_new"]:
            best[key] = r
    print("\nBest learning rate of each (method, rank), on the new corpus's validation perplexity:\n")
    print(
        "| rank | plain LoRA gain | masked LoRA gain | masked / plain | plain + re-projection gain | re-projected / plain | full FT (mask fixed) gain |"
    )
    print("|---|---|---|---|---|---|---|")
    full = min((r for r in rows if r["method"] == "full"), key=lambda r: r["ppl_new"], default=None)
    ranks: List[int] = sorted({r["rank"] for r in rows if r["method"] != "full"})
    for rank in ranks:
        p, m = best.get(("plain", rank)), best.get(("masked", rank))
        if p is None or m is None:
            continue
        gp, gm = gain(start["ppl_new"], p["ppl_new"]), gain(start["ppl_new"], m["ppl_new"])
        gr = gain(start["ppl_new"], p["reproject_ppl_new"])
        gf = f"{gain(start['ppl_new'], full['ppl_new']):.4f}" if full else "-"
        print(f"| {rank} | {gp:.4f} | {gm:.4f} | {100 * gm / gp:.1f} % | {gr:.4f} | {100 * gr / gp:.1f} % | {gf} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    r.add_argument("--lora-lr", type=float, nargs="+", default=[1e-3, 3e-3])
    r.add_argument("--full-lr", type=float, nargs="+", default=[3e-4, 1e-3])
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table")
    t.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    cmd_run(a) if a.cmd == "run" else cmd_table(a)


if __name__ == "__main__":
    main()
