"""The sparsity tax study: CAST against SR-STE and the fixed-mask recipe from well-trained
dense models (docs/sparsity_tax.md is its report).

    ./run bench study_tax pretrain --model small --corpus stdlib --steps 3000
    ./run bench study_tax run --model small --corpus stdlib --steps 400 \
        --method dense_continued --method srste --method "cast:lr=1e-3,l1=0.1"
    ./run bench study_tax table [--model small] [--corpus stdlib]

Every run starts from a cached dense checkpoint (``results/study/dense_<model>_<corpus>_<P>.pt``,
made by ``pretrain``; resumable) and appends one JSON line per method to
``results/study/runs.jsonl`` (a method already recorded there with the same arguments is
skipped unless ``--rerun``): final validation perplexity (after ``finalize`` for sparse
methods, checked exact N:M), and a validation curve along training (for CAST both the dense
forward and the hard-projected model at each point). A run saves its state every 50 steps
(``results/study/run_<key>.ckpt``) and the same command resumes it, bit-identically, after an
interruption.

A CAST method is ``cast:key=value,...``; keys (defaults = the library's AdamS as specified):

    lr        learning rate (the dense methods' lr unless given)
    l1        λ; with mode=rel it is κ, relative to each tensor's RMS gradient momentum
    mode      abs (the paper's absolute λ) | rel (scale-free)
    ramp      fraction of the run at which α reaches 1 (1.0 = the paper's s/T)
    interval  mask refresh interval (10)
    eta       distillation weight (1/3)
    scale     weight-scaling groups (2; 0 = off)
    opt       lib (cast_rs.AdamS) | ref (the plain-PyTorch research optimizer below, which has
              the extra knobs; with default knobs it takes the same steps as lib)
    vsrc      mutilde (paper: v from μ̃ for every element) | grad (v from g² where m = 1)
    warm      AdamS's own warmup (a fraction of the run; default 0: none)
    cool      AdamS's own cooldown (``AdamS(cooldown=...)``): its lr falls linearly toward 0 over
              the last ``cool`` of the run, on top of the loop's schedule (default 0: none; the
              first cool runs used the research optimizer's copy of it, the same update)
    suggest   1: lr and mlr from ``sparse.suggest_adams(steps, dense_lr=--lr)`` (the documented
              default; overrides lr / mlr)
    init      dense (default) | sparsegpt: start AdamS from the SparseGPT one-shot 2:4 model
              (pruned weights zero, kept ones OBS-corrected; ``calib`` batches as for ``fixed``)
    score     mag (default: the mask keeps the largest |W|) | act: the mask keeps the largest
              |W_ij|·‖x_j‖, Wanda's activation-aware score, with ‖x_j‖ the RMS of the layer's
              j-th input over the training batches (a running average, decay ``xdecay``, 0.9);
              runs the research optimizer (``opt=ref``)

The practitioners' recipe, one-shot then fine-tuning with the mask held fixed
(``cast_rs.baselines.FixedMask``; AdamW, same loop and distillation):
``fixed:score=magnitude|wanda|sparsegpt[,lr=...,calib=4]`` (``calib``: calibration batches
of the training set, drawn with their own seed, for Wanda and SparseGPT).

``--loop`` sets the training loop every method of the run shares: ``study`` (AdamW/AdamS betas
(0.9, 0.95), gradient clipping at 1, cosine to 0, no warmup: the loop of every run before the
practitioners' comparison) or ``user`` (each optimizer's default betas (0.9, 0.999), no
clipping, cosine to lr/10, no warmup: a plain user's loop); either followed by overrides,
``user,clip=1,warmup=0.05,floor=0,beta2=0.95``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import cast_rs
from cast_rs import baselines, check_nm, distill_loss, sparsify
from cast_rs.demo import Batches, GPTConfig, TinyGPT, _cosine, _no_decay_groups, evaluate, load_corpus
from cast_rs.nm import nm_mask

from study_report import (  # noqa: E402  (benchmarks/ is on sys.path when run)
    MODELS,
    OUT,
    cmd_plot,
    cmd_plot_length,
    cmd_report,
    cmd_table,
    parse_method,
)


def prose_files() -> List[str]:
    """English prose shipped by a Debian package installed here: Vim's user and reference manuals."""
    import glob

    files = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    if not files:
        raise SystemExit("corpus 'prose' needs Vim's manuals (/usr/share/vim/vim*/doc/*.txt, Debian package vim-runtime)")
    return files


def corpus(name: str):
    if name == "stdlib":
        return load_corpus()
    if name == "prose":
        return load_corpus(prose_files())
    raise SystemExit(f"unknown corpus {name!r}")


# ------------------------------------------------------------------ research optimizer


class ResearchAdamS(torch.optim.Optimizer):
    """AdamS in plain PyTorch with the knobs under study. ``specs``: param -> (n, m, dim).

    With ramp=1, mode='abs', vsrc='mutilde' this is the specified AdamS (same order of
    operations as the library up to rounding)."""

    def __init__(
        self,
        params,
        specs,
        lr,
        betas,
        eps=1e-8,
        l1=0.1,
        mode="abs",
        ramp=1.0,
        total_steps=1,
        interval=10,
        vsrc="mutilde",
        mlr=1.0,
        warm=0.0,
        score="mag",
        cool=0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.specs, self.l1, self.mode, self.ramp, self.T = specs, l1, mode, ramp, total_steps
        # mlr: the masked weights' step is mlr times the kept weights' (1 = AdamS as specified).
        self.interval, self.vsrc, self.mlr = interval, vsrc, mlr
        # warm: the library's AdamS(warmup=...), a linear ramp of lr over warm·T steps.
        # score: "act" ranks a group's weights by |W_ij|·‖x_j‖ (state "xsq": the running mean
        # of x_j², written by the forward hooks of :meth:`track_inputs`).
        self.warm, self.score = warm, score
        # cool: lr times min(1, (T - s + 1) / (cool·T)) over the run's last cool·T steps.
        self.cool = cool

    def mask_score(self, p: torch.Tensor) -> torch.Tensor:
        """What the N:M mask of ``p`` ranks: |W|, or |W|·‖x‖ along the input dimension."""
        if self.score != "act":
            return p
        xsq = self.state[p].get("xsq")
        return p if xsq is None else p.abs() * xsq.sqrt()

    def track_inputs(self, handle, decay: float = 0.9) -> None:
        """Forward pre-hooks on the sparse layers: a running mean of each input feature's x²
        over training forwards (kept in the optimizer state, so a checkpoint carries it)."""
        for layer in handle.layers:
            p = layer.weight

            def hook(mod, args, p=p):
                if not mod.training:
                    return
                x = args[0].detach()
                sq = x.reshape(-1, x.shape[-1]).float().square().mean(0)
                st = self.state[p]
                st["xsq"] = sq if "xsq" not in st else st["xsq"].mul_(decay).add_(sq, alpha=1 - decay)

            layer.module.register_forward_pre_hook(hook)

    @torch.no_grad()
    def project(self) -> None:
        """Zero every sparse weight outside the mask the optimizer's score gives now (so a
        later magnitude projection, ``finalize``, keeps the same weights)."""
        for p, (n, m, dim) in self.specs.items():
            p.mul_(nm_mask(self.mask_score(p), (n, m), dim=dim))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    st["mu"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                s = st["step"]
                mu, v = st["mu"], st["v"]
                mu.mul_(b1).add_(g, alpha=1 - b1)
                spec = self.specs.get(p)
                if spec is None:
                    mt = mu
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                else:
                    n, m, dim = spec
                    if (s - 1) % self.interval == 0:
                        st["keep"] = nm_mask(self.mask_score(p), (n, m), dim=dim)
                        # rel: λ = κ · RMS of the bias-corrected momentum, measured at refreshes.
                        st["lam"] = self.l1 * float(mu.square().mean().sqrt()) / (1 - b1**s)
                    keep = st["keep"]
                    alpha = min(1.0, s / max(1.0, self.ramp * self.T))
                    lam = st["lam"] if self.mode == "rel" else self.l1
                    mt = torch.where(keep, mu, (1 - alpha) * mu + alpha * lam * p.sign())
                    src = torch.where(keep, g, mt) if self.vsrc == "grad" else mt
                    v.mul_(b2).addcmul_(src, src, value=1 - b2)
                    if self.mlr != 1.0:
                        mt = torch.where(keep, mt, self.mlr * mt)
                denom = (v / (1 - b2**s)).sqrt().add_(eps)
                lr_s = lr * min(1.0, s / (self.warm * self.T)) if self.warm > 0 else lr
                if self.cool > 0:
                    lr_s *= max(0.0, min(1.0, (self.T - s + 1) / (self.cool * self.T)))
                p.addcdiv_(mt, denom, value=-lr_s / (1 - b1**s))


# ------------------------------------------------------------------ runs


def dense_path(model: str, corp: str, steps: int) -> Path:
    return OUT / f"dense_{model}_{corp}_{steps}.pt"


def _save_ckpt(path: Path, model: nn.Module, opt, sched, step: int, **extra) -> None:
    """Save a training run's state after ``step`` steps (``extra``: anything else it needs to
    go on). Written to a temporary file and renamed, so a run killed while saving keeps its
    previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, **extra}, tmp)
    tmp.replace(path)


def _load_ckpt(path: Path, model: nn.Module, opt, sched) -> Dict:
    """Restore what :func:`_save_ckpt` saved into ``model``, ``opt`` and ``sched``; returns the
    whole record (``step`` and the extras)."""
    z = torch.load(path, weights_only=False)
    model.load_state_dict(z["model"]), opt.load_state_dict(z["opt"]), sched.load_state_dict(z["sched"])
    return z


def pretrain(model: str, corp: str, steps: int, batch: int, lr: float, seed: int = 0) -> Path:
    """Dense AdamW pretraining (warmup 5%, cosine to 0), checkpointed every 250 steps."""
    OUT.mkdir(parents=True, exist_ok=True)
    final = dense_path(model, corp, steps)
    if final.exists():
        return final
    tr, va, desc = corpus(corp)
    c = MODELS[model]
    torch.manual_seed(seed)
    m = TinyGPT(c)
    opt = torch.optim.AdamW(_no_decay_groups(m, 0.1), lr=lr, betas=(0.9, 0.95))
    sched = _cosine(opt, steps, max(1, steps // 20))
    b = Batches(tr, batch, c.context, seed)
    ck = OUT / f"pretrain_{model}_{corp}_{steps}.ckpt"
    start = _load_ckpt(ck, m, opt, sched)["step"] if ck.exists() else 0
    t0 = time.perf_counter()
    for s in range(start, steps):
        x, y = b.get(s)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        if (s + 1) % 250 == 0 or s + 1 == steps:
            ppl = evaluate(m, va, 192, c.context)
            print(
                f"[pretrain {model}/{corp}] step {s + 1}/{steps} loss {loss.item():.4f} val ppl {ppl:.4f} "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
            _save_ckpt(ck, m, opt, sched, s + 1)
    torch.save(m.state_dict(), final)
    ck.unlink(missing_ok=True)
    return final


#: The training loops compared (see the module docstring); warmup is a fraction of the run.
LOOPS = {
    "study": {"beta2": 0.95, "clip": 1.0, "warmup": 0.0, "floor": 0.0},
    "user": {"beta2": 0.999, "clip": 0.0, "warmup": 0.0, "floor": 0.1},
}


def parse_loop(spec: str) -> Dict[str, float]:
    name, _, rest = spec.partition(",")
    if name not in LOOPS:
        raise SystemExit(f"--loop: expected one of {sorted(LOOPS)} (then ,key=value overrides), got {spec!r}")
    loop = dict(LOOPS[name])
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in loop:
            raise SystemExit(f"--loop: unknown key {key!r} (expected {sorted(loop)})")
        loop[key] = float(value)
    return loop


def cosine_floor(opt, steps: int, warmup: int, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine from lr to ``floor`` · lr."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        t = min(1.0, (s - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


@torch.no_grad()
def projected_eval(model: nn.Module, handle, ev) -> float:
    """Validation ppl of the model with every sparse weight hard-projected (then restored)."""
    saved = []
    for layer in handle.layers:
        w = layer.weight
        saved.append(w.detach().clone())
        w.mul_(nm_mask(w, handle.pattern, dim=layer.dim))
    ppl = ev(model)
    for layer, w0 in zip(handle.layers, saved):
        layer.weight.copy_(w0)
    return ppl


def run_method(  # noqa: C901 (one research loop, a branch per method)
    spec: str,
    state,
    c: GPTConfig,
    tr,
    va,
    steps: int,
    batch: int,
    lr: float,
    pattern: str,
    points: int,
    seed: int,
    state_key: str = "",
    loop: str = "study",
) -> Dict:
    name, kv = parse_method(spec)
    lp = parse_loop(loop)
    betas = (0.9, lp["beta2"])
    n, m_ = cast_rs.nm.parse_pattern(pattern)
    ev = lambda mod: evaluate(mod, va, 192, c.context)  # noqa: E731
    fresh = lambda: _load(c, state)  # noqa: E731
    teacher = _load(c, state)
    teacher.eval().requires_grad_(False)
    batches = Batches(tr, batch, c.context, seed + 1)
    rec: Dict = {"method": spec, "steps": steps, "pattern": pattern}
    if loop != "study":
        rec["loop"] = loop
    t0 = time.perf_counter()
    if name == "magnitude":
        model = fresh()
        baselines.magnitude_prune(model, pattern)
        assert check_nm(model, pattern).ok
        rec["ppl"] = ev(model)
        return rec
    model = fresh()

    def calibration() -> List[torch.Tensor]:
        """``calib`` batches of the training set for Wanda / SparseGPT, drawn with their own seed."""
        cb = Batches(tr, batch, c.context, seed + 7919)
        return [cb.get(i)[0] for i in range(int(kv.get("calib", 4)))]

    eta = float(kv.get("eta", 1 / 3))
    run_lr = float(kv.get("lr", lr))
    handle = srste = fixed = None
    if name == "dense_continued":
        opt = torch.optim.AdamW(_no_decay_groups(model, 0.0), lr=run_lr, betas=betas)
    elif name == "srste":
        srste = baselines.SRSTE(model, pattern, decay=float(kv.get("decay", 2e-4)))
        opt = torch.optim.AdamW(_no_decay_groups(model, 0.0), lr=run_lr, betas=betas)
    elif name == "fixed":
        score = kv.get("score", "magnitude")
        calib = None if score == "magnitude" else calibration()
        fixed = baselines.FixedMask(model, pattern, score=score, calibration=calib)
        rec["ppl_one_shot"] = ev(model)
        opt = torch.optim.AdamW(_no_decay_groups(model, 0.0), lr=run_lr, betas=betas)
    elif name == "cast":
        if kv.get("init", "dense") == "sparsegpt":
            baselines.sparsegpt_prune(model, calibration(), pattern)
            rec["ppl_one_shot"] = ev(model)
        elif kv.get("init", "dense") != "dense":
            raise SystemExit(f"unknown init {kv['init']!r} (dense | sparsegpt)")
        handle = sparsify(model, pattern, scaling_groups=int(kv.get("scale", 2)))
        T = steps
        common = dict(l1=float(kv.get("l1", 0.1)), ramp=float(kv.get("ramp", 1.0)), interval=int(kv.get("interval", 10)))
        mlr = float(kv.get("mlr", 1.0))
        if kv.get("suggest") == "1":
            sug = handle.suggest_adams(steps, dense_lr=lr)
            run_lr, mlr = sug["lr"], sug["masked_lr_scale"]
            rec["suggested"] = sug
        # mlr = the library's masked_lr_scale (the mlr runs recorded before it existed used
        # ResearchAdamS's equivalent knob, docs/sparsity_tax.md says which).
        score = kv.get("score", "mag")
        if score not in ("mag", "act"):
            raise SystemExit(f"unknown score {score!r} (mag | act)")
        cool = float(kv.get("cool", 0.0))
        if kv.get("opt", "lib") == "lib" and kv.get("vsrc", "mutilde") == "mutilde" and score == "mag":
            opt = cast_rs.AdamS(
                model.parameters(),
                lr=run_lr,
                betas=betas,
                l1_decay=common["l1"],
                total_steps=T,
                mask_interval=common["interval"],
                ramp_end=common["ramp"],
                l1_mode="relative" if kv.get("mode", "abs") == "rel" else "absolute",
                masked_lr_scale=mlr,
                warmup=float(kv.get("warm", 0.0)),
                cooldown=cool,
            )
        else:
            specs = {l.weight: (n, m_, l.dim) for l in handle.layers}
            opt = ResearchAdamS(
                model.parameters(),
                specs,
                lr=run_lr,
                betas=betas,
                total_steps=T,
                mode=kv.get("mode", "abs"),
                vsrc=kv.get("vsrc", "mutilde"),
                mlr=mlr,
                warm=float(kv.get("warm", 0.0)),
                score=score,
                cool=cool,
                **common,
            )
            if score == "act":
                opt.track_inputs(handle, decay=float(kv.get("xdecay", 0.9)))
    else:
        raise SystemExit(f"unknown method {name!r}")
    warmup = int(kv["warmup"]) if "warmup" in kv else round(lp["warmup"] * steps)
    sched = cosine_floor(opt, steps, warmup, lp["floor"])
    marks = {round(steps * (k + 1) / points) for k in range(points)} | {10, 30}
    curve, proj_curve = [], []
    # Resumable: a session may end mid-run (a large-model run of 2000 steps takes hours), so the
    # run's whole state is saved every CKPT_EVERY steps and picked up by the same command. The
    # batches are a function of the step index and AdamS/AdamW/LambdaLR resume bit-identically
    # (tests/test_resume.py), so a resumed run records what an uninterrupted one would.
    ck = _run_ckpt_path(rec, state_key, lr, batch, seed, eta, loop)
    start, spent = 0, 0.0
    if ck.exists():
        z = _load_ckpt(ck, model, opt, sched)
        if z.get("points", points) != points:
            raise SystemExit(
                f"{ck} was saved by a run with --points {z['points']}, not {points}: "
                "rerun with that value (or delete the file to start over)"
            )
        start, spent, curve, proj_curve = z["step"], z["seconds"], z["curve"], z["projected_curve"]
        print(f"[{spec}] resuming at step {start}/{steps} from {ck}", flush=True)
    model.train()
    for s in range(start, steps):
        x, y = batches.get(s)
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = distill_loss(logits, t_logits, y, eta=eta)
        loss.backward()
        if lp["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), lp["clip"])
        opt.step()
        sched.step()
        if s + 1 in marks:
            curve.append((s + 1, ev(model)))
            if handle is not None:
                proj_curve.append((s + 1, projected_eval(model, handle, ev)))
        if (s + 1) % CKPT_EVERY == 0 and s + 1 < steps:
            _save_ckpt(
                ck,
                model,
                opt,
                sched,
                s + 1,
                seconds=spent + time.perf_counter() - t0,
                curve=curve,
                projected_curve=proj_curve,
                points=points,
            )
    rec["curve"] = curve
    if proj_curve:
        rec["projected_curve"] = proj_curve
    if handle is not None:
        rec["sparse_ratio"] = handle.stats(None).overall
        rec["ppl_dense_forward"] = ev(model)
        if isinstance(opt, ResearchAdamS) and opt.score == "act":
            opt.project()  # finalize's magnitude projection then keeps the score's weights
        fin = handle.finalize()
        rec["l1_cut"] = fin.total_l1_removed_fraction
    if srste is not None:
        srste.finalize()
    if fixed is not None:
        fixed.finalize()
        fixed.release()
    if handle is not None or srste is not None or fixed is not None:
        rep = check_nm(model, pattern)
        assert rep.ok, str(rep)
    rec["ppl"] = ev(model)
    rec["seconds"] = round(spent + time.perf_counter() - t0, 1)
    if start:
        rec["resumed_at"] = start
    ck.unlink(missing_ok=True)
    return rec


#: Steps between a run's checkpoints (about 2.5 minutes on the large model, 15 s on the small).
CKPT_EVERY = 50


def _run_ckpt_path(rec: Dict, state_key: str, lr: float, batch: int, seed: int, eta: float, loop: str = "study") -> Path:
    """Where a run's checkpoint lives: one file per (dense start, method, steps, pattern, lr,
    batch, seed, loop), so only the same command resumes it (``--points``, which only sets where
    the curve is measured, is checked when resuming instead)."""
    parts = [state_key, rec["method"], rec["steps"], rec["pattern"], lr, batch, seed, eta]
    key = json.dumps(parts if loop == "study" else parts + [loop])
    return OUT / f"run_{hashlib.sha256(key.encode()).hexdigest()[:16]}.ckpt"


def _load(c: GPTConfig, state) -> TinyGPT:
    m = TinyGPT(c)
    m.load_state_dict(state)
    return m


def recorded_run(a, spec: str, runs: Path) -> Dict | None:
    """The record in ``runs`` (a runs.jsonl) of the run ``run`` would make for ``spec`` with
    arguments ``a``: same model, corpus, dense start, steps, method, pattern, lr, batch, seed,
    tag and loop (``--points`` and ``--threads`` only change how it is measured). None when
    there is none."""
    if not runs.exists():
        return None
    want = {
        "model": a.model,
        "corpus": a.corpus,
        "pretrain_steps": a.pretrain_steps,
        "steps": a.steps,
        "method": spec,
        "pattern": a.pattern,
        "lr_default": a.lr,
        "batch": a.batch,
        "seed": a.seed,
        "tag": a.tag,
    }
    with open(runs) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("loop", "study") == a.loop and all(rec.get(k) == v for k, v in want.items()):
                return rec
    return None


def cmd_run(a) -> None:
    c = MODELS[a.model]
    path = dense_path(a.model, a.corpus, a.pretrain_steps)
    if not path.exists():
        raise SystemExit(f"no dense checkpoint {path}: run `pretrain` first")
    state = torch.load(path)
    tr, va, _ = corpus(a.corpus)
    dense = evaluate(_load(c, state), va, 192, c.context)
    for spec in a.method:
        done = None if a.rerun else recorded_run(a, spec, OUT / "runs.jsonl")
        if done is not None:
            print(f"{spec}: already recorded (ppl {done['ppl']:.4f}), skipped; --rerun runs it again", flush=True)
            continue
        torch.manual_seed(a.seed)
        rec = run_method(
            spec, state, c, tr, va, a.steps, a.batch, a.lr, a.pattern, a.points, a.seed, state_key=path.name, loop=a.loop
        )
        rec.update(
            model=a.model,
            corpus=a.corpus,
            pretrain_steps=a.pretrain_steps,
            dense=dense,
            lr_default=a.lr,
            batch=a.batch,
            threads=torch.get_num_threads(),
            tag=a.tag,
            seed=a.seed,
        )
        with open(OUT / "runs.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"{a.model}/{a.corpus}/P{a.pretrain_steps}/S{a.steps} {spec:<40} ppl {rec['ppl']:.4f} "
            f"(dense {dense:.4f}, {100 * (rec['ppl'] / dense - 1):+.2f}%)  {rec.get('seconds', 0)}s",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain")
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    r = sub.add_parser("run")
    r.add_argument("--model", default="small", choices=sorted(MODELS))
    r.add_argument("--corpus", default="stdlib")
    r.add_argument("--pretrain-steps", type=int, default=3000)
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--pattern", default="2:4")
    r.add_argument("--points", type=int, default=4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tag", default="")
    r.add_argument("--method", action="append", required=True)
    r.add_argument("--loop", default="study", help="study | user, then ,key=value overrides (module docstring)")
    r.add_argument("--rerun", action="store_true", help="run methods already recorded in runs.jsonl again (default: skip them)")
    t = sub.add_parser("table")
    t.add_argument("--model")
    t.add_argument("--corpus")
    pl = sub.add_parser("plot")
    pl.add_argument("--model", default="small")
    pl.add_argument("--corpus", default="stdlib")
    pl.add_argument("--pretrain-steps", type=int, default=3000)
    pl.add_argument("--steps", type=int, default=400)
    pl.add_argument("--tag", default="")
    pl.add_argument("--method", action="append")
    pl.add_argument("--out", default="results/study/curves.png")
    pll = sub.add_parser("plot-length")
    pll.add_argument("--out", default="results/study/tax_vs_length.png")
    rp = sub.add_parser("report")
    for q in (p, r, t, pl, pll, rp):
        q.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if a.cmd == "pretrain":
        pretrain(a.model, a.corpus, a.steps, a.batch, a.lr)
    elif a.cmd == "run":
        cmd_run(a)
    elif a.cmd == "plot":
        cmd_plot(a)
    elif a.cmd == "plot-length":
        cmd_plot_length(a)
    elif a.cmd == "report":
        cmd_report(a)
    else:
        cmd_table(a)


if __name__ == "__main__":
    main()
