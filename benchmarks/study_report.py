"""The sparsity tax study's records, tables and plots (``benchmarks/study_tax.py`` runs the
study; its ``table``, ``report``, ``plot`` and ``plot-length`` commands are these).

Reads ``runs.jsonl`` (one JSON line per run) from the study's directory, or the records shipped
with the report (``docs/sparsity_tax_runs.jsonl``); ``benchmarks/fill_study_tables.py`` writes
the report's tables into docs/sparsity_tax.md and the README.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cast_rs.demo import GPTConfig
from cast_rs.sparsity import _adams_from_floor

#: Where runs, dense starts and checkpoints go; CAST_RS_STUDY_DIR moves them (for example out
#: of a work tree that is cleaned between uses).
OUT = Path(os.environ.get("CAST_RS_STUDY_DIR", "results/study"))
#: The records of the runs behind docs/sparsity_tax.md (a copy of results/study/runs.jsonl),
#: read by table/report/plot when there is no results/ of its own.
SHIPPED_RECORDS = Path(__file__).resolve().parent.parent / "docs" / "sparsity_tax_runs.jsonl"


def records() -> Path:
    own = OUT / "runs.jsonl"
    return own if own.exists() else SHIPPED_RECORDS


MODELS = {
    "small": GPTConfig(),  # the demo's: 4 layers, width 128 (0.84 M parameters)
    "large": GPTConfig(width=256, layers=8, heads=8),  # ~6.4 M parameters
}


def parse_method(spec: str) -> Tuple[str, Dict[str, str]]:
    name, _, rest = spec.partition(":")
    kv = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, kv


def cmd_table(a) -> None:
    rows = [json.loads(l) for l in open(records())]
    keyf = lambda r: (r["model"], r["corpus"], r["pretrain_steps"], r["steps"], r.get("pattern", "2:4"), r.get("seed", 0))  # noqa: E731
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        if a.model and r["model"] != a.model or a.corpus and r["corpus"] != a.corpus:
            continue
        groups.setdefault(keyf(r), []).append(r)
    for k, rs in sorted(groups.items()):
        dc = [r["ppl"] for r in rs if r["method"] == "dense_continued"]
        base = dc[-1] if dc else None
        print(
            f"\n### model {k[0]}, corpus {k[1]}, dense {k[2]} steps, sparse {k[3]} steps, {k[4]}, seed {k[5]}  (dense ppl {rs[0]['dense']:.4f})"
        )
        print("| method | val ppl | tax vs dense_continued | CAST: ppl before finalize | CAST: sparse weight ratio |")
        print("|---|---|---|---|---|")
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        for r in rs:
            tax = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base and r["method"] != "dense_continued" else "-"
            print(
                f"| {r['method']} | {r['ppl']:.4f} | {tax} | {fmt(r.get('ppl_dense_forward'))} | {fmt(r.get('sparse_ratio'))} |"
            )


def _rows(model=None, corpus=None, steps=None, pattern="2:4", tag=None, seed=0, loop="study") -> List[Dict]:
    """Records of one setting; ``seed`` (of the sparse-training batches; the dense start is the
    same) defaults to 0, the seed of every table, so other seeds never replace a table entry;
    ``seed=None`` takes every seed."""
    out = []
    for line in open(records()):
        r = json.loads(line)
        if (
            (model and r["model"] != model)
            or (corpus and r["corpus"] != corpus)
            or (steps and r["steps"] != steps)
            or r.get("pattern", "2:4") != pattern
            or (tag and r.get("tag") != tag)
            or (seed is not None and r.get("seed", 0) != seed)
            or (loop is not None and r.get("loop", "study") != loop)
        ):
            continue
        out.append(r)
    return out


def _same_method(r: Dict, method: str) -> bool:
    """Whether record ``r`` ran ``method``: the specs are equal once an explicit ``lr`` equal to
    the run's default lr is dropped (``cast:l1=0.1,lr=1e-3`` is ``cast:l1=0.1`` at lr 1e-3)."""

    def canon(spec: str):
        name, kv = parse_method(spec)
        if "lr" in kv and float(kv["lr"]) == float(r.get("lr_default", 1e-3)):
            del kv["lr"]
        return name, kv

    return canon(r["method"]) == canon(method)


def _last(rows: List[Dict], method: str) -> Optional[Dict]:
    hits = [r for r in rows if _same_method(r, method)]
    return hits[-1] if hits else None


DEFAULT_CAST = "cast:l1=0.1"  # AdamS's defaults (l1_decay 0.1, absolute), at the study's lr 1e-3
# CAST at lr 5e-4: what suggest_lr(T, dense_lr=1e-3) gives at 400 steps (5.2e-4) and from 1000
# steps on (5e-4) on both study models (docs/guides/hyperparameters.md).
SUGGESTED_CAST = "cast:l1=0.1,lr=5e-4"
# The 99th percentile of |w| over the weights the 2:4 masks remove, per dense start (P3000):
# suggest_lr's travel floor is Q99 / (0.5 T); measured with sparse.suggest_lr(400) * 200.
Q99 = {("small", "stdlib"): 0.10318, ("small", "prose"): 0.10420, ("large", "stdlib"): 0.10435, ("large", "prose"): 0.10502}


def _suggested_adams_run(rows: List[Dict], model: str, corp: str, steps: int, dense_lr: float = 1e-3):
    """The CAST run (λ 0.1, no warmup) nearest to ``suggest_adams(steps, dense_lr)``'s lr on this
    setting with the masked weights at max(lr, travel floor), what it suggested when the study's
    own loop was run (it now gives them at least the dense lr): (run or None, {"lr",
    "masked_lr_scale"})."""
    floor = Q99[(model, corp)] / (0.5 * steps)
    lr = _adams_from_floor(floor, dense_lr)["lr"]
    want = {"lr": lr, "masked_lr_scale": max(1.0, floor / lr)}
    best, dist = None, 0.1  # within 10 % in lr and in masked_lr_scale (log distance)
    for r in rows:
        name, kv = parse_method(r["method"])
        if name != "cast" or kv.get("l1") != "0.1" or set(kv) - {"l1", "lr", "mlr"}:
            continue
        d = abs(math.log(float(kv.get("lr", r.get("lr_default", 1e-3))) / want["lr"])) + abs(
            math.log(float(kv.get("mlr", 1.0)) / want["masked_lr_scale"])
        )
        if d <= dist:
            best, dist = r, d
    return best, want


def _length_rows(model: str, corp: str):
    """(steps, dense_continued, SR-STE, CAST lr 1e-3, CAST at suggest_lr) for every length of one
    setting that has dense_continued, SR-STE and at least one of the CAST runs. The issue's
    lengths and 400 (the 150-step runs have their own table, "short")."""
    out = []
    for steps in sorted({r["steps"] for r in _rows(model, corp)} & {100, 300, 400, 600, 1000, 2000, 3000}):
        rs = _rows(model, corp, steps)
        dc, sr, cd, cs = (_last(rs, m) for m in ("dense_continued", "srste", DEFAULT_CAST, SUGGESTED_CAST))
        if dc and sr and (cd or cs):
            out.append((steps, dc, sr, cd, cs))
    return out


def practitioners_table() -> None:
    """CAST against one-shot + fixed-mask fine-tuning (the recipe 2:4 models are made with
    today), every method in the plain user's loop (``--loop user``) and its variations (one
    change each: ``user,clip=1`` ...), one row per run, the tax against ``dense_continued`` of
    the same loop."""
    print(
        "#### practitioners (the user's loop: each optimizer's default betas, no clipping, cosine to lr/10, "
        "no warmup, and one change at a time; tax against dense_continued at lr 1e-3 in the same loop)\n"
    )
    print(
        "A tag after the loop marks runs made elsewhere than the untagged ones (another host: its own "
        "dense start and its own dense_continued, so its taxes compare only with each other).\n"
    )
    print("| model | corpus | sparse steps | seed | loop | method | lr | one-shot ppl | val ppl | tax |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [r for r in _rows(seed=None, loop=None) if r.get("loop", "study").startswith("user")]
    setting = lambda r: (r["model"], r["corpus"], r["steps"], r.get("seed", 0), r["loop"], r.get("tag") or "")  # noqa: E731
    order = lambda k: (k[5], k[0], k[1], k[2], k[3], k[4] != "user", k[4])  # noqa: E731
    for key in sorted({setting(r) for r in rows}, key=order):
        model, corp, steps, seed, loop, tag = key
        rs = [r for r in rows if setting(r) == key]
        dc = _last(rs, "dense_continued")
        if dc is None:
            continue
        for r in sorted(rs, key=lambda r: r["ppl"]):
            if r["method"] == "dense_continued" and r is not dc:
                continue  # a repeat of the reference (a resumed run recorded twice): one row
            name, kv = parse_method(r["method"])
            lr = r.get("suggested", {}).get("lr") or float(kv.get("lr", r.get("lr_default", 1e-3)))
            one = f"{r['ppl_one_shot']:.4f}" if "ppl_one_shot" in r else "-"
            tax = "-" if r is dc else f"{100 * (r['ppl'] / dc['ppl'] - 1):+.2f}%"
            print(
                f"| {model} | {corp} | {steps} | {seed} | `{loop}`{f' ({tag})' if tag else ''} | `{r['method']}` | {lr:.3g} | {one} | "
                f"{r['ppl']:.4f} | {tax} |"
            )
    print()


def cmd_report(a) -> None:  # noqa: C901 (one report, a branch per table)
    """The markdown tables of docs/sparsity_tax.md, from runs.jsonl."""
    practitioners_table()
    default, suggested = DEFAULT_CAST, SUGGESTED_CAST
    print("#### main\n")
    print(
        "| model | corpus | sparse steps | dense | dense_continued | magnitude | SR-STE (tax) "
        "| CAST at suggest_adams's lr, no warmup (tax) | CAST lr 1e-3 (tax) | CAST lr 5e-4 (tax) | CAST best tried (tax) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, corp, steps in itertools.product(MODELS, ("stdlib", "prose"), (400, 1000, 2000)):
        rs = _rows(model, corp, steps)
        dc, sr, cd, cs = (_last(rs, m) for m in ("dense_continued", "srste", default, suggested))
        if not dc:
            continue
        ad, _ = _suggested_adams_run(rs, model, corp, steps)
        mag = _last(_rows(model, corp), "magnitude")
        tax = lambda r, dc=dc: f"{r['ppl']:.4f} ({100 * (r['ppl'] / dc['ppl'] - 1):+.2f}%)" if r else "-"  # noqa: E731
        # A warmup changes the schedule, so its CAST run is compared with dense_continued
        # and SR-STE under the same warmup (the causes table), not here.
        # opt=ref is the study's research optimizer, not the library: "best tried" is what a
        # user can set (mlr = AdamS's masked_lr_scale).
        casts = [r for r in rs if r["method"].startswith("cast") and not any(k in r["method"] for k in ("warmup=", "opt=ref"))]
        best = min(casts, key=lambda r: r["ppl"]) if casts else None
        best_name = f" `{best['method']}`" if best else ""
        print(
            f"| {model} | {corp} | {steps} | {dc['dense']:.4f} | {dc['ppl']:.4f} | {mag['ppl'] if mag else float('nan'):.4f} | "
            f"{tax(sr)} | {tax(ad)} | {tax(cd)} | {tax(cs)} | {tax(best)}{best_name} |"
        )
    print(
        "\n#### targets (the two targets at suggest_adams(T, dense_lr=1e-3)'s lr and masked_lr_scale "
        "without the 5 % warmup it has since added, in the study's loop; every model, corpus, length and seed measured)\n"
    )
    print(
        "| model | corpus | sparse steps | seed | suggest_adams: run | CAST tax | SR-STE tax | lead (points) "
        "| tax <= 2 % | lead >= 1 point |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, corp in itertools.product(MODELS, ("stdlib", "prose")):
        for steps, seed in sorted({(r["steps"], r.get("seed", 0)) for r in _rows(model, corp, seed=None)}):
            rs = _rows(model, corp, steps, seed=seed)
            dc, sr = _last(rs, "dense_continued"), _last(rs, "srste")
            ad, want = _suggested_adams_run(rs, model, corp, steps)
            if not (dc and sr and ad):
                continue
            ct, st = (100 * (r["ppl"] / dc["ppl"] - 1) for r in (ad, sr))
            print(
                f"| {model} | {corp} | {steps} | {seed} | lr {want['lr']:.2g}, r {want['masked_lr_scale']:.3g}: "
                f"`{ad['method']}` | {ct:+.2f}% | {st:+.2f}% | {st - ct:.2f} | {'yes' if ct <= 2 else 'no'} "
                f"| {'yes' if st - ct >= 1 else 'no'} |"
            )
    print("\n#### causes (small, stdlib, 400 steps)\n")
    rs = _rows("small", "stdlib", 400)
    dc = _last(rs, "dense_continued")
    print(
        "| run | val ppl after finalize | tax | ppl before finalize | sparse weight ratio | ppl at step 10 (dense fwd / projected) |"
    )
    print("|---|---|---|---|---|---|")
    seen = set()
    for r in rs:
        if r["method"] in seen or r["method"] in ("magnitude",):
            continue
        seen.add(r["method"])
        r = _last(rs, r["method"])
        c10 = dict(map(tuple, r.get("curve", [])))
        p10 = dict(map(tuple, r.get("projected_curve", [])))
        early = f"{c10.get(10, float('nan')):.2f}" + (f" / {p10[10]:.2f}" if 10 in p10 else "")
        before = f"{r['ppl_dense_forward']:.4f}" if "ppl_dense_forward" in r else "-"
        ratio = f"{r['sparse_ratio']:.4f}" if "sparse_ratio" in r else "-"
        tx = f"{100 * (r['ppl'] / dc['ppl'] - 1):+.2f}%" if r["method"] != "dense_continued" else "-"
        print(f"| `{r['method']}` | {r['ppl']:.4f} | {tx} | {before} | {ratio} | {early} |")
    print("\n#### length (small, stdlib)\n")
    print(
        "| sparse steps | dense_continued | gain over dense | SR-STE | SR-STE tax | CAST lr 1e-3 | CAST tax "
        "| CAST lr 5e-4 | CAST tax | suggest_adams(T, dense_lr=1e-3): run | CAST tax |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for steps, dc, sr, cd, cs in _length_rows("small", "stdlib"):
        pct = lambda r, dc=dc: f"{100 * (r['ppl'] / dc['ppl'] - 1):+.2f}%" if r else "-"  # noqa: E731
        tx = lambda r, pct=pct: f"{r['ppl']:.4f} | {pct(r)}" if r else "- | -"  # noqa: E731
        ad, want = _suggested_adams_run(_rows("small", "stdlib", steps), "small", "stdlib", steps)
        spec = f"lr {want['lr']:.3g}, r {want['masked_lr_scale']:.3g}: " + (f"`{ad['method']}`" if ad else "not run")
        print(
            f"| {steps} | {dc['ppl']:.4f} | {100 * (1 - dc['ppl'] / dc['dense']):.2f}% | {tx(sr)} | {tx(cd)} | {tx(cs)} "
            f"| {spec} | {pct(ad)} |"
        )
    print("\n#### seeds (small model; the seed of the sparse-training batches)\n")
    print(
        "| corpus | sparse steps | seed | dense_continued | SR-STE tax | CAST lr 1e-3 tax (lead, points) "
        "| CAST lr 5e-4 = suggest_lr tax (lead, points) |"
    )
    print("|---|---|---|---|---|---|---|")
    for corp, steps, seed in itertools.product(("stdlib", "prose"), (400, 1000), (0, 1, 2)):
        rs = _rows("small", corp, steps, seed=seed)
        dc, sr, cd, cs = (_last(rs, m) for m in ("dense_continued", "srste", default, suggested))
        if not (dc and sr and (cd or cs)):
            continue
        tax = lambda r, dc=dc: 100 * (r["ppl"] / dc["ppl"] - 1) if r else None  # noqa: E731
        st = tax(sr)
        cell = lambda x, st=st: f"{x:+.2f}% ({st - x:.2f})" if x is not None else "-"  # noqa: E731
        print(f"| {corp} | {steps} | {seed} | {dc['ppl']:.4f} | {st:+.2f}% | {cell(tax(cd))} | {cell(tax(cs))} |")
    print(
        "\n#### mlr (small model, lr 5e-4: the masked weights' step mlr times the kept weights' "
        "(AdamS's masked_lr_scale); warmup = 10 % of the steps; tax against dense_continued without warmup)\n"
    )
    labels = ("no warmup", "warmup", "mlr 2", "warmup, mlr 2", "warmup, mlr 4")
    print("| corpus | sparse steps | seed | dense_continued | SR-STE tax | " + " | ".join(f"CAST {v} tax" for v in labels) + " |")
    print("|---|---|---|---|---|" + "---|" * len(labels))
    for corp, steps, seed in itertools.product(("stdlib", "prose"), (400, 1000), (0, 1, 2)):
        w = steps // 10
        variants = (
            suggested,
            f"{suggested},warmup={w}",
            f"{suggested},mlr=2",
            f"{suggested},mlr=2,warmup={w}",
            f"{suggested},mlr=4,warmup={w}",
        )
        rs = _rows("small", corp, steps, seed=seed)
        dc, sr = _last(rs, "dense_continued"), _last(rs, "srste")
        runs = [_last(rs, m) for m in variants]
        if not (dc and sum(r is not None for r in runs[1:]) >= 1):
            continue
        tax = lambda r, dc=dc: f"{100 * (r['ppl'] / dc['ppl'] - 1):+.2f}%" if r else "-"  # noqa: E731
        print(f"| {corp} | {steps} | {seed} | {dc['ppl']:.4f} | {tax(sr)} | " + " | ".join(tax(r) for r in runs) + " |")
    print("\n#### N:M patterns (small, stdlib, 400 steps)\n")
    print("| pattern | magnitude | SR-STE | SR-STE tax | CAST | CAST tax |")
    print("|---|---|---|---|---|---|")
    dc = _last(_rows("small", "stdlib", 400), "dense_continued")
    for pat in ("1:4", "2:4", "2:8", "4:8"):
        rs = _rows("small", "stdlib", 400, pattern=pat)
        mag, sr, cd = (_last(rs, m) for m in ("magnitude", "srste", default))
        if not (sr and cd and dc):
            continue
        print(
            f"| {pat} | {mag['ppl'] if mag else float('nan'):.4f} | {sr['ppl']:.4f} | {100 * (sr['ppl'] / dc['ppl'] - 1):+.2f}% | "
            f"{cd['ppl']:.4f} | {100 * (cd['ppl'] / dc['ppl'] - 1):+.2f}% |"
        )
    print("\n#### warmup (400 steps, a 40-step linear warmup for every trained method: the demo's schedule)\n")
    print("| model | corpus | dense_continued | SR-STE | SR-STE tax | CAST defaults | CAST tax | CAST lead (points) |")
    print("|---|---|---|---|---|---|---|---|")
    for model, corp in itertools.product(MODELS, ("stdlib", "prose")):
        rs = _rows(model, corp, 400)
        dc, sr, cd = (_last(rs, m) for m in ("dense_continued:warmup=40", "srste:warmup=40", default + ",warmup=40"))
        if not (dc and sr and cd):
            continue
        st, ct = (100 * (r["ppl"] / dc["ppl"] - 1) for r in (sr, cd))
        print(
            f"| {model} | {corp} | {dc['ppl']:.4f} | {sr['ppl']:.4f} | {st:+.2f}% | {cd['ppl']:.4f} | {ct:+.2f}% | {st - ct:.2f} |"
        )
    print("\n#### large (every run on the large model, 400 steps; tax against dense_continued without warmup)\n")
    print("| run | stdlib | stdlib tax | prose | prose tax | ppl at step 10 (stdlib / prose) |")
    print("|---|---|---|---|---|---|")
    by = {c: _rows("large", c, 400) for c in ("stdlib", "prose")}
    methods = []
    for c in by:
        for r in by[c]:
            if r["method"] not in methods and r["method"] != "magnitude":
                methods.append(r["method"])
    dcs = {c: _last(by[c], "dense_continued") for c in by}
    for meth in methods:
        cells, early = [], []
        for c in by:
            r, dc = _last(by[c], meth), dcs[c]
            if r is None or dc is None:
                cells += ["-", "-"]
                early.append("-")
                continue
            cells += [f"{r['ppl']:.4f}", "-" if meth == "dense_continued" else f"{100 * (r['ppl'] / dc['ppl'] - 1):+.2f}%"]
            early.append(f"{dict(map(tuple, r.get('curve', []))).get(10, float('nan')):.2f}")
        print(f"| `{meth}` | " + " | ".join(cells) + f" | {' / '.join(early)} |")
    print(
        "\n#### short (runs shorter than 400 steps: suggest_lr raises every weight's lr to the floor, "
        "suggest_adams keeps the kept weights at 5e-4 and gives the masked ones the floor; tax against "
        "dense_continued; lead = SR-STE's tax minus CAST's at suggest_adams)\n"
    )
    print(
        "| model | corpus | sparse steps | dense_continued | SR-STE tax | CAST lr 1e-3 tax | CAST at suggest_lr "
        "(= floor) | tax | CAST at suggest_adams (lr 5e-4, masked_lr_scale) | tax "
        "| lead over SR-STE (points), batch seeds 0 / 1 / 2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def lead(model, corp, steps, seed):
        rs = _rows(model, corp, steps, seed=seed)
        dc, sr = _last(rs, "dense_continued"), _last(rs, "srste")
        ad, _ = _suggested_adams_run(rs, model, corp, steps)
        if not (dc and sr and ad):
            return "-"
        return f"{100 * (sr['ppl'] - ad['ppl']) / dc['ppl']:.2f}"

    for model, corp, steps in itertools.product(MODELS, ("stdlib", "prose"), (100, 150, 300)):
        rs = _rows(model, corp, steps)
        dc, sr, cd = (_last(rs, m) for m in ("dense_continued", "srste", DEFAULT_CAST))
        # suggest_lr's runs: lr above 5e-4 and no mlr (every weight at the floor).
        floor_runs = [
            (r, kv)
            for r, (name, kv) in ((r, parse_method(r["method"])) for r in rs)
            if name == "cast" and set(kv) == {"l1", "lr"} and kv["l1"] == "0.1" and float(kv["lr"]) > 5e-4
        ]
        ad, _ = _suggested_adams_run(rs, model, corp, steps)
        if not (dc and ad):
            continue
        tax = lambda r, dc=dc: 100 * (r["ppl"] / dc["ppl"] - 1)  # noqa: E731
        fmt = lambda r, tax=tax: f"{tax(r):+.2f}%" if r else "-"  # noqa: E731
        fl, fl_kv = floor_runs[-1] if floor_runs else (None, {"lr": "-"})
        seeds = " / ".join(lead(model, corp, steps, k) for k in (0, 1, 2))
        print(
            f"| {model} | {corp} | {steps} | {dc['ppl']:.4f} | {fmt(sr)} | {fmt(cd)} | "
            f"{fl_kv['lr']} | {fmt(fl)} | r = {parse_method(ad['method'])[1]['mlr']} | {fmt(ad)} | {seeds} |"
        )


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def cmd_plot(a) -> None:
    """Validation perplexity along training for the chosen runs of one setting (PNG)."""
    plt = _pyplot()
    rows = [json.loads(l) for l in open(records())]
    rows = [
        r
        for r in rows
        if r["model"] == a.model
        and r["corpus"] == a.corpus
        and r["steps"] == a.steps
        and r["pretrain_steps"] == a.pretrain_steps
        and r.get("curve")
        and (not a.tag or r.get("tag") == a.tag)
        and (not a.method or r["method"] in a.method)
    ]
    if not rows:
        raise SystemExit("no matching runs")
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        xs, ys = zip(*([(0, r["dense"])] + r["curve"]))
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=f"{r['method']} (final {r['ppl']:.3f})")
        if r.get("projected_curve"):
            xs, ys = zip(*r["projected_curve"])
            ax.plot(xs, ys, ls=":", marker="x", ms=3, color=line.get_color(), label=f"{r['method']} hard-projected")
    ax.axhline(rows[0]["dense"], color="gray", ls="--", lw=0.8, label="dense start")
    ax.set_xlabel("sparse-training step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{a.model} model, {a.corpus}, dense {a.pretrain_steps} steps")
    ax.legend(fontsize=7)
    _save(fig, a.out)


def cmd_plot_length(a) -> None:
    """The tax over dense_continued against the number of sparse-training steps (PNG): one panel
    per model x corpus with at least two lengths, SR-STE and CAST (lr 1e-3 and suggest_lr's)."""
    plt = _pyplot()
    settings = [(m, c) for m, c in itertools.product(MODELS, ("stdlib", "prose")) if len(_length_rows(m, c)) >= 2]
    if not settings:
        raise SystemExit("no setting has runs at two lengths")
    cols = min(2, len(settings))
    nrows = (len(settings) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(settings) :]:
        ax.set_visible(False)
    for ax, (model, corp) in zip(axes.flat, settings):
        rows = _length_rows(model, corp)
        for k, label, style in (
            (2, "SR-STE (AdamW, lr 1e-3)", "s-"),
            (3, "CAST, lr 1e-3", "o-"),
            (4, "CAST, lr 5e-4 (suggest_lr)", "o--"),
        ):
            pts = [(row[0], 100 * (row[k]["ppl"] / row[1]["ppl"] - 1)) for row in rows if row[k]]
            if pts:
                ax.plot(*zip(*pts), style, ms=4, label=label)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(2, color="gray", ls=":", lw=0.8, label="2 % (the issue's target)")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([r[0] for r in rows])
        ax.set_xticklabels([str(r[0]) for r in rows])
        ax.set_xlabel("sparse-training steps")
        ax.set_ylabel("tax over dense_continued (%)")
        ax.set_title(f"{model} model, {corp}, 2:4")
        ax.legend(fontsize=7)
    _save(fig, a.out)
