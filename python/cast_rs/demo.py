"""``cast-rs demo``: CAST against the baselines on a small byte-level GPT trained on real text.

Corpus: the Python standard library's own source files (``sysconfig.get_paths()["stdlib"]``),
which ship with every Python: real text that nobody here wrote. Files are split into train and
validation deterministically by a CRC32 of their relative path (1 in 10 to validation).
``--data PATH...`` uses your own text files instead (split the same way; a single file is split
90/10 by position).

Dense start: the default model starts from a dense checkpoint shipped with the package
(``cast_rs/data/demo_dense.pt``: 3000 AdamW steps on the standard library of Python 3.11, so
well trained that more dense training barely improves it and the table measures
sparsification, not extra training). ``benchmarks/pretrain_demo.py`` (``./run bench
pretrain_demo``) re-runs its recipe and compares bit for bit; ``--from-scratch`` or ``--pretrain-steps N`` trains
the dense model here instead (``--quick`` always does, on its smaller model).

Pipeline (every method starts from the same dense checkpoint and, when it trains, gets the same
number of steps on the same batches):

=====================  ==============================================================
dense                  the pretrained dense model
dense_continued        dense AdamW + distillation from the dense model, no sparsity
magnitude              one-shot magnitude 2:4 of the dense model
wanda                  one-shot Wanda 2:4 (calibration: training batches)
sparsegpt              one-shot SparseGPT 2:4 (calibration: training batches)
srste                  SR-STE 2:4 + distillation, AdamW
sparsegpt_fixed        SparseGPT 2:4, then AdamW + distillation with the mask held fixed
                       (ModelOpt's sparsity-aware training, llm-compressor's constant pruning)
dense_then_magnitude   dense_continued, then one-shot magnitude 2:4
cast                   CAST 2:4: sparsify (weight scaling) + AdamS + distillation, finalize
=====================  ==============================================================

Sparse methods are checked with ``check_nm`` before their perplexity counts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import sysconfig
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import TqdmWarning

with warnings.catch_warnings():  # in Jupyter without ipywidgets it falls back to text bars, and says so
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

from . import baselines
from .distill import distill_loss
from .optim import DEFAULT_L1_DECAY, AdamS
from .checking import check_nm
from .sparsity import sparsify

__all__ = ["DemoConfig", "TinyGPT", "load_corpus", "run_demo", "format_results", "plot_results"]

METHODS = (
    "dense",
    "dense_continued",
    "magnitude",
    "wanda",
    "sparsegpt",
    "srste",
    "sparsegpt_fixed",
    "dense_then_magnitude",
    "cast",
)
#: The methods that train the sparse model for the same steps as dense_continued: their
#: perplexity over dense_continued's is the sparsity tax.
TRAINED_SPARSE = ("srste", "sparsegpt_fixed", "dense_then_magnitude", "cast")


# ----------------------------------------------------------------------------- corpus


def _stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts):
            continue
        files.append(path)
    return files


def load_corpus(
    paths: Optional[Sequence[str]] = None, max_train_bytes: int = 6_000_000, max_val_bytes: int = 600_000
) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, validation bytes, description) as uint8 tensors."""
    if paths:
        files = []
        for p in paths:
            pp = Path(p)
            if pp.is_dir():
                files.extend(sorted(f for f in pp.rglob("*") if f.is_file()))
            elif pp.is_file():
                files.append(pp)
            else:
                raise FileNotFoundError(f"--data: {p} does not exist")
        root = None
        desc = f"{len(files)} user file(s)"
    else:
        files = _stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        desc = f"Python {sys.version.split()[0]} standard library sources ({len(files)} files)"
    if not files:
        raise ValueError("no input files found")
    if len(files) == 1:
        data = files[0].read_bytes()
        cut = int(len(data) * 0.9)
        train, val = data[:cut], data[cut:]
    else:
        train_parts, val_parts = [], []
        for f in files:
            rel = str(f.relative_to(root)) if root else str(f)
            (val_parts if zlib.crc32(rel.encode()) % 10 == 0 else train_parts).append(f.read_bytes())
        if not val_parts:  # few files: move one to validation
            val_parts.append(train_parts.pop())
        train, val = b"\n\n".join(train_parts), b"\n\n".join(val_parts)
    train, val = train[:max_train_bytes], val[:max_val_bytes]
    if len(train) < 4096 or len(val) < 1024:
        raise ValueError(f"corpus too small: {len(train)} train / {len(val)} validation bytes")
    to_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return to_t(train), to_t(val), f"{desc}: {len(train) / 1e6:.1f} MB train, {len(val) / 1e6:.2f} MB validation"


# ------------------------------------------------------------------------------ model


@dataclass
class GPTConfig:
    vocab: int = 256
    context: int = 128
    width: int = 128
    layers: int = 4
    heads: int = 4


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.ln2 = nn.LayerNorm(c.width)
        self.fc1 = nn.Linear(c.width, 4 * c.width)
        self.fc2 = nn.Linear(4 * c.width, c.width)
        self.heads = c.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small GPT over bytes (pre-LayerNorm blocks, tied input/output embedding)."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Embedding(c.context, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


# --------------------------------------------------------------------------- training


@dataclass
class DemoConfig:
    """Defaults of the demo (docs/sparsity_tax.md says how they were chosen)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    batch: int = 32
    pretrain_steps: int = 3000  # the shipped checkpoint's; trained here with from_scratch
    pretrain_lr: float = 3e-3
    from_scratch: bool = False  # pretrain here even when the shipped dense checkpoint fits
    steps: int = 400  # per trained method, after pretraining
    lr: float = 1e-3  # continued training: dense_continued and SR-STE (each's better lr in the study)
    # AdamS's learning rate; None: ``sparse.suggest_adams(steps, dense_lr=lr)``, what the docs
    # tell users to do; at the demo's 400 steps that is half the dense lr (which beat the full
    # one at 400 steps on every study setting, docs/sparsity_tax.md, "Half the dense learning
    # rate"), with masked_lr_scale 2: the masked weights step at the dense lr. A given lr runs
    # the paper's update (masked_lr_scale 1).
    cast_lr: Optional[float] = None
    # Linear learning-rate warmup over this fraction of `steps`, then cosine to 0, for every
    # trained method (dense continued, SR-STE, CAST): it tempers AdamS's near-sign first
    # steps on a well-trained model (docs/sparsity_tax.md, "A warmup helps CAST").
    warmup: float = 0.1
    l1_decay: float = DEFAULT_L1_DECAY  # AdamS's documented default (docs/sparsity_tax.md)
    mask_interval: int = 10
    scaling_groups: int = 2
    srste_decay: float = 2e-4
    eval_windows: int = 192  # final validation: windows of `context` bytes
    curve_points: int = 6  # validation points along each trained run (full validation set)
    calib_batches: int = 8  # Wanda and SparseGPT
    seed: int = 0
    pattern: str = "2:4"

    def warmup_steps(self) -> int:
        """Warmup steps of each trained method: ``round(warmup · steps)``."""
        return round(self.warmup * self.steps)

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(
            model=GPTConfig(context=64, width=64, layers=2),
            batch=16,
            pretrain_steps=150,
            steps=60,
            eval_windows=48,
            curve_points=3,
            calib_batches=2,
            from_scratch=True,
        )


class Batches:
    """Deterministic random windows: batch i is the same for every method."""

    def __init__(self, data: torch.Tensor, batch: int, context: int, seed: int) -> None:
        self.data, self.batch, self.context, self.seed = data, batch, context, seed

    def get(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        starts = torch.randint(0, self.data.numel() - self.context - 1, (self.batch,), generator=g)
        idx = starts.unsqueeze(1) + torch.arange(self.context + 1)
        chunk = self.data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, windows: int, context: int) -> float:
    """Validation perplexity over `windows` evenly spaced windows (dense forward as-is)."""
    was = model.training
    model.eval()
    starts = torch.linspace(0, val.numel() - context - 2, windows).long()
    total, count = 0.0, 0
    for chunk in starts.split(32):
        idx = chunk.unsqueeze(1) + torch.arange(context + 1)
        seq = val[idx].long()
        logits = model(seq[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), reduction="sum"))
        count += seq[:, 1:].numel()
    model.train(was)
    return math.exp(total / count)


def _cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Batches,
    steps: int,
    *,
    desc: str,
    teacher: Optional[nn.Module] = None,
    warmup: int = 0,
    eval_fn: Optional[Callable[[], float]] = None,
    curve_points: int = 0,
    show: bool = True,
) -> List[Tuple[int, float]]:
    """Train for `steps`; returns [(step, val ppl)] at `curve_points` evenly spaced steps."""
    sched = _cosine(opt, steps, warmup)
    marks = {round(steps * (k + 1) / curve_points) for k in range(curve_points)} if curve_points else set()
    curve = []
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not show, mininterval=1.0)
    for s in bar:
        x, y = batches.get(s)
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = distill_loss(logits, t_logits, y)
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (s + 1) in marks and eval_fn is not None:
            curve.append((s + 1, eval_fn()))
            bar.set_postfix(val_ppl=f"{curve[-1][1]:.3f}")
    return curve


def _no_decay_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "scale" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(cfg: DemoConfig, batches: Batches, show: bool = True) -> TinyGPT:
    """Dense pretraining of the demo model (AdamW, warmup + cosine)."""
    model = TinyGPT(cfg.model)
    opt = torch.optim.AdamW(_no_decay_groups(model, 0.1), lr=cfg.pretrain_lr, betas=(0.9, 0.95))
    train(model, opt, batches, cfg.pretrain_steps, desc="dense pretraining", warmup=max(1, cfg.pretrain_steps // 20), show=show)
    return model


#: The dense checkpoint shipped with the package (see the module docstring).
SHIPPED_DENSE = Path(__file__).resolve().parent / "data" / "demo_dense.pt"


def corpus_digest(data: torch.Tensor) -> str:
    """sha256 of a corpus tensor's bytes (names the training text a checkpoint saw)."""
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def pretrain_meta(cfg: DemoConfig, train_data: torch.Tensor) -> Dict:
    """What a dense checkpoint of :func:`pretrain` depends on, stored beside its weights."""
    return {
        "model": asdict(cfg.model),
        "pretrain_steps": cfg.pretrain_steps,
        "pretrain_lr": cfg.pretrain_lr,
        "batch": cfg.batch,
        "seed": cfg.seed,
        "corpus_sha256": corpus_digest(train_data),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "python": sys.version.split()[0],
    }


def save_dense(path: Path, state: Dict[str, torch.Tensor], meta: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "meta": meta, "state_dict": state}, path)


def load_dense(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(state_dict, meta) of a checkpoint written by :func:`save_dense`."""
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != 1:
        raise ValueError(f"{path}: not a cast-rs demo dense checkpoint")
    return blob["state_dict"], blob["meta"]


def from_state(c: GPTConfig, state: Dict[str, torch.Tensor], frozen: bool = False) -> TinyGPT:
    """A model loaded from a dense checkpoint; ``frozen``: eval mode, no gradients (a teacher)."""
    m = TinyGPT(c)
    m.load_state_dict(state)
    if frozen:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return m


def train_cast(
    m: nn.Module,
    cfg: DemoConfig,
    batches: Batches,
    teacher: nn.Module,
    *,
    lr: Optional[float],
    l1_decay: float,
    mask_interval: int,
    eval_fn: Optional[Callable[[], float]] = None,
    show: bool = True,
    log: Callable[[str], None] = print,
):
    """CAST on ``m`` in place: sparsify, AdamS with distillation. ``lr=None`` takes ``lr``,
    ``masked_lr_scale``, ``warmup`` and ``cooldown`` from ``suggest_adams(cfg.steps, dense_lr=cfg.lr)``; a
    given ``lr`` runs the paper's update (``masked_lr_scale`` 1, no AdamS warmup or cooldown). Returns (handle, optimizer, curve, lr used);
    the caller finalizes."""
    handle = sparsify(m, cfg.pattern, scaling_groups=cfg.scaling_groups)
    hp = {"lr": lr, "masked_lr_scale": 1.0}
    if lr is None:
        hp = handle.suggest_adams(cfg.steps, dense_lr=cfg.lr)
        lr = hp["lr"]
        log(
            f"CAST: AdamS lr {lr:.3g}, masked_lr_scale {hp['masked_lr_scale']:.3g}, warmup {hp['warmup']:g}, "
            f"cooldown {hp['cooldown']:.3g} "
            f"= suggest_adams({cfg.steps}, dense_lr={cfg.lr:g})"
        )
    opt = AdamS(
        m.parameters(),
        betas=(0.9, 0.95),
        l1_decay=l1_decay,
        total_steps=cfg.steps,
        mask_interval=mask_interval,
        **hp,
    )
    curve = train(
        m,
        opt,
        batches,
        cfg.steps,
        desc="CAST (AdamS)",
        teacher=teacher,
        eval_fn=eval_fn,
        curve_points=cfg.curve_points if eval_fn else 0,
        show=show,
        warmup=cfg.warmup_steps(),
    )
    return handle, opt, curve, lr


def dense_start(
    cfg: DemoConfig,
    train_data: torch.Tensor,
    batches: Batches,
    *,
    user_data: bool = False,
    show: bool = True,
    log: Callable[[str], None] = print,
) -> TinyGPT:
    """The dense model every method starts from: the shipped checkpoint when it fits (default
    model, default corpus, not ``cfg.from_scratch``), else :func:`pretrain` here."""
    if not cfg.from_scratch and not user_data and SHIPPED_DENSE.exists():
        state, meta = load_dense(SHIPPED_DENSE)
        if meta["model"] == asdict(cfg.model) and meta["seed"] == cfg.seed:
            cfg.pretrain_steps = meta["pretrain_steps"]
            log(
                f"dense start: shipped checkpoint ({meta['pretrain_steps']} AdamW steps, lr {meta['pretrain_lr']}, "
                f"batch {meta['batch']}, Python {meta['python']} standard library; --from-scratch to pretrain here)"
            )
            if meta["corpus_sha256"] != corpus_digest(train_data):
                log(
                    f"  note: this Python's standard library differs from the one the checkpoint was trained on "
                    f"(Python {meta['python']}): the figures will differ a little from the README's"
                )
            return from_state(cfg.model, state)
    log(f"dense start: pretraining here ({cfg.pretrain_steps} AdamW steps)")
    return pretrain(cfg, batches, show)


def run_demo(
    cfg: DemoConfig,
    data: Optional[Sequence[str]] = None,
    show: bool = True,
    log: Callable[[str], None] = print,
    keep_models: Optional[Dict[str, nn.Module]] = None,
) -> Dict[str, Dict]:
    """Runs the whole pipeline; returns {method: {val_ppl, train_steps, seconds, exact_nm, curve}}.
    ``keep_models``, if given, receives the dense model (``"dense"``) and the finalized CAST
    model (``"cast"``)."""
    torch.manual_seed(cfg.seed)
    train_data, val_data, desc = load_corpus(data)
    log(f"corpus: {desc}")
    c = cfg.model
    batches = Batches(train_data, cfg.batch, c.context, cfg.seed)
    cont_batches = Batches(train_data, cfg.batch, c.context, cfg.seed + 1)
    evaluate_full = lambda m: evaluate(m, val_data, cfg.eval_windows, c.context)  # noqa: E731
    results: Dict[str, Dict] = {}

    def record(name: str, model: nn.Module, steps: int, seconds: float, sparse: bool, curve=None) -> None:
        exact = None
        if sparse:
            report = check_nm(model, cfg.pattern)
            exact = report.ok
            if not exact:
                raise RuntimeError(f"{name}: the final model is not exactly {cfg.pattern}:\n{report}")
        ppl = evaluate_full(model)
        # Curves start at the dense checkpoint (step 0) and use the same validation windows.
        start = [(0, results["dense"]["val_ppl"])] if curve and "dense" in results else []
        results[name] = {
            "val_ppl": ppl,
            "train_steps": steps,
            "seconds": round(seconds, 2),
            "exact_nm": exact,
            "curve": start + (curve or []),
        }
        log(f"  {name:<22} val ppl {results[name]['val_ppl']:.4f}   ({seconds:.0f} s)")

    # 1. dense pretraining
    with torch.random.fork_rng():  # counting parameters must not shift the seeded init
        n_params = sum(p.numel() for p in TinyGPT(c).parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters, {c.layers} layers, width {c.width}, context {c.context}")
    t0 = time.perf_counter()
    model = dense_start(cfg, train_data, batches, user_data=bool(data), show=show, log=log)
    record("dense", model, cfg.pretrain_steps, time.perf_counter() - t0, False)
    dense_state = copy.deepcopy(model.state_dict())
    fresh = lambda: from_state(c, dense_state)  # noqa: E731
    teacher = from_state(c, dense_state, frozen=True)

    # 2. one-shot baselines
    t0 = time.perf_counter()
    m = fresh()
    baselines.magnitude_prune(m, cfg.pattern)
    record("magnitude", m, 0, time.perf_counter() - t0, True)
    t0 = time.perf_counter()
    m = fresh()
    calib = [batches.get(10_000 + i)[0] for i in range(cfg.calib_batches)]
    baselines.wanda_prune(m, calib, cfg.pattern)
    record("wanda", m, 0, time.perf_counter() - t0, True)
    t0 = time.perf_counter()
    m = fresh()
    baselines.sparsegpt_prune(m, calib, cfg.pattern)
    sparsegpt_secs = time.perf_counter() - t0
    record("sparsegpt", m, 0, sparsegpt_secs, True)
    sparsegpt_state = copy.deepcopy(m.state_dict())

    def fit(m: nn.Module, desc: str) -> List[Tuple[int, float]]:
        """Train ``m`` as every AdamW method here is: the dense lr, the same batches, schedule
        and distillation."""
        opt = torch.optim.AdamW(_no_decay_groups(m, 0.0), lr=cfg.lr, betas=(0.9, 0.95))
        return train(
            m,
            opt,
            cont_batches,
            cfg.steps,
            desc=desc,
            teacher=teacher,
            eval_fn=lambda: evaluate_full(m),
            curve_points=cfg.curve_points,
            show=show,
            warmup=cfg.warmup_steps(),
        )

    # 3. dense continued (also gives dense_then_magnitude)
    t0 = time.perf_counter()
    m = fresh()
    curve = fit(m, "dense continued")
    secs = time.perf_counter() - t0
    record("dense_continued", m, cfg.steps, secs, False, curve)
    t0 = time.perf_counter()
    baselines.magnitude_prune(m, cfg.pattern)
    record("dense_then_magnitude", m, cfg.steps, secs + time.perf_counter() - t0, True)

    # 4. SR-STE
    t0 = time.perf_counter()
    m = fresh()
    srste = baselines.SRSTE(m, cfg.pattern, decay=cfg.srste_decay)
    curve = fit(m, "SR-STE")
    srste.finalize()
    record("srste", m, cfg.steps, time.perf_counter() - t0, True, curve)

    # 5. SparseGPT once, then fine-tuning with the mask held fixed (at the dense lr, its best)
    # From the SparseGPT model above: on an exact N:M model the magnitude score keeps its nonzeros.
    t0 = time.perf_counter()
    m = from_state(c, sparsegpt_state)
    fixed = baselines.FixedMask(m, cfg.pattern, score="magnitude")
    curve = fit(m, "SparseGPT + fixed mask")
    fixed.finalize()
    fixed.release()
    record("sparsegpt_fixed", m, cfg.steps, sparsegpt_secs + time.perf_counter() - t0, True, curve)

    # 6. CAST
    t0 = time.perf_counter()
    m = fresh()
    handle, opt, curve, cast_lr = train_cast(
        m,
        cfg,
        cont_batches,
        teacher,
        lr=cfg.cast_lr,
        l1_decay=cfg.l1_decay,
        mask_interval=cfg.mask_interval,
        eval_fn=lambda: evaluate_full(m),
        show=show,
        log=log,
    )
    stats = handle.stats(opt)
    fin = handle.finalize()
    record("cast", m, cfg.steps, time.perf_counter() - t0, True, curve)
    results["cast"]["lr"] = cast_lr
    results["cast"]["masked_lr_scale"] = opt.param_groups[0]["masked_lr_scale"]
    results["cast"]["sparse_weight_ratio_before_finalize"] = stats.overall
    results["cast"]["l1_removed_at_finalize"] = fin.total_l1_removed_fraction
    if keep_models is not None:
        keep_models["dense"] = teacher
        keep_models["cast"] = m
    return {k: results[k] for k in METHODS}


@torch.no_grad()
def greedy_bytes(model: "TinyGPT", prompt: bytes, new: int) -> Tuple[bytes, float]:
    """Greedy continuation of ``prompt`` by ``new`` bytes with a KV cache (as a decoder runs:
    after the prompt, every layer sees one row per token). ``len(prompt) + new`` must fit the
    model's context. Returns the bytes and the decoding speed in tokens per second."""
    c = model.config
    if len(prompt) + new > c.context:
        raise ValueError(f"prompt + new: at most {c.context} bytes (the model's context)")
    caches: List[Tuple[List[torch.Tensor], List[torch.Tensor]]] = [([], []) for _ in model.blocks]

    def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
        t = tokens.shape[1]
        x = model.tok(tokens) + model.pos(torch.arange(start, start + t))
        for blk, (ks, vs) in zip(model.blocks, caches):
            b, _, d = x.shape
            q, k, v = blk.qkv(blk.ln1(x)).view(b, t, 3, blk.heads, d // blk.heads).permute(2, 0, 3, 1, 4)
            ks.append(k)
            vs.append(v)
            kk, vv = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
            a = F.scaled_dot_product_attention(q, kk, vv, is_causal=start == 0 and t > 1)
            x = x + blk.proj(a.transpose(1, 2).reshape(b, t, d))
            x = x + blk.fc2(F.gelu(blk.fc1(blk.ln2(x))))
        return model.head(model.ln(x))[:, -1]

    idx = torch.tensor([list(prompt)], dtype=torch.long)
    logits = step(idx, 0)
    out: List[int] = []
    t0 = time.perf_counter()
    for i in range(new):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        if i + 1 < new:
            logits = step(nxt, len(prompt) + i)
    return bytes(out), new / (time.perf_counter() - t0)


def inference_showcase(models: Dict[str, nn.Module], cfg: DemoConfig, log: Callable[[str], None] = print) -> Dict:
    """Converts the finalized CAST model with :func:`cast_rs.compress` and generates a short
    sample with it and with the dense model from the same prompt (tokens per second for both).
    The demo model is tiny (0.8 M parameters, 128-wide layers): its speed is set by per-call
    overhead, not by reading weights, so it says little about 2:4 speed; ``./run bench
    inference`` measures the real shapes."""
    from .inference import compress

    sparse = copy.deepcopy(models["cast"]).eval()
    dense = models["dense"].eval()
    report = compress(sparse, cfg.pattern)
    prompt = b"import os\n\ndef "
    context = cfg.model.context
    with torch.no_grad():
        probe = torch.tensor([list(b"def main():\n    return 0\n")])
        agree = float((sparse(probe) - models["cast"](probe)).abs().max())
    new = context - len(prompt)
    text_dense, tps_dense = greedy_bytes(dense, prompt, new)
    text_sparse, tps_sparse = greedy_bytes(sparse, prompt, new)
    log(
        f"\nCPU inference: the CAST model converted with cast_rs.compress ({len(report.layers)} layers, "
        f"{report.dense_bytes / 1024:.0f} KiB -> {report.compressed_bytes / 1024:.0f} KiB of weights; "
        f"logits within {agree:.1e} of the finalized model)"
    )
    for name, text, tps in (("dense", text_dense, tps_dense), ("CAST 2:4, compressed", text_sparse, tps_sparse)):
        shown = (prompt + text).decode("utf-8", errors="replace")
        log(f"--- {name}: {tps:.0f} tokens/s (greedy, KV cache, batch 1)\n{shown}")
    log(
        "(This 0.8 M-parameter model is too small for 2:4 to pay off: its speed is per-call overhead. "
        "`./run bench inference` measures real layer shapes and a 1.1 B-parameter model.)"
    )
    return {
        "tokens_per_s_dense": tps_dense,
        "tokens_per_s_compressed": tps_sparse,
        "max_logit_diff": agree,
        "dense_bytes": report.dense_bytes,
        "compressed_bytes": report.compressed_bytes,
        "sample_dense": text_dense.decode("utf-8", errors="replace"),
        "sample_compressed": text_sparse.decode("utf-8", errors="replace"),
    }


def format_results(results: Dict[str, Dict]) -> str:
    dense = results["dense"]["val_ppl"]
    cont = results["dense_continued"]["val_ppl"]
    mag = results["magnitude"]["val_ppl"]
    rows = []
    for name in METHODS:
        r = results[name]
        ppl = r["val_ppl"]
        change = f"{100 * (ppl / dense - 1):+.1f}%" if name != "dense" else "-"
        # The sparsity tax: against the dense model trained for the same steps (trained methods).
        tax = f"{100 * (ppl / cont - 1):+.2f}%" if name in TRAINED_SPARSE else "-"
        recovered = f"{100 * (mag - ppl) / (mag - dense):.1f}%" if name not in ("dense", "magnitude") and mag > dense else "-"
        exact = "-" if r["exact_nm"] is None else ("yes" if r["exact_nm"] else "NO")
        rows.append((name, f"{ppl:.4f}", change, tax, recovered, exact, r["train_steps"], f"{r['seconds']:.0f}"))
    from .reports import format_table

    return format_table(
        ("method", "val ppl", "vs dense", "tax vs dense_continued", "gap recovered", "exact 2:4", "steps", "seconds"), rows
    )


def plot_results(results: Dict[str, Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"dense_continued": "tab:blue", "srste": "tab:orange", "sparsegpt_fixed": "tab:olive", "cast": "tab:green"}
    for name, col in colors.items():
        curve = results[name].get("curve") or []
        if curve:
            xs, ys = zip(*curve)
            ax1.plot(xs, ys, marker="o", color=col, label=name + (" (dense forward, before finalize)" if name == "cast" else ""))
    ax1.axhline(results["dense"]["val_ppl"], color="gray", ls="--", label="dense checkpoint (step 0)")
    ax1.set_xlabel("continued-training step")
    ax1.set_ylabel("validation perplexity")
    ax1.set_title("validation perplexity during training")
    ax1.legend(fontsize=8)
    names = list(METHODS)
    vals = [results[n]["val_ppl"] for n in names]
    bars = ax2.bar(
        range(len(names)),
        vals,
        color=["gray", "tab:blue", "tab:red", "tab:purple", "tab:pink", "tab:orange", "tab:olive", "tab:brown", "tab:green"],
    )
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("validation perplexity")
    ax2.set_title("final validation perplexity (2:4 methods checked exact)")
    lo = min(vals)
    ax2.set_ylim(lo * 0.95, max(vals) * 1.02)
    for b, v in zip(bars, vals):
        ax2.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    for key in ("steps", "pretrain_steps", "lr", "cast_lr", "l1_decay", "warmup", "seed", "batch"):
        v = getattr(args, key, None)
        if v is not None:
            setattr(cfg, key, v)
    if getattr(args, "from_scratch", False) or getattr(args, "pretrain_steps", None) is not None:
        cfg.from_scratch = True
    t0 = time.perf_counter()
    print(
        f"cast-rs demo ({'quick' if args.quick else 'default'} settings): CAST 2:4 vs baselines; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    models: Dict[str, nn.Module] = {}
    results = run_demo(cfg, data=args.data, show=not args.no_progress, keep_models=models)
    print()
    print(format_results(results))
    c = results["cast"]
    print(
        f"\nCAST: sparse weight ratio before finalize {c['sparse_weight_ratio_before_finalize']:.4f}; "
        f"finalize cut {100 * c['l1_removed_at_finalize']:.2f}% of the sparse layers' L1 mass."
    )
    inference = inference_showcase(models, cfg)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        out = {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()}
        out["_config"] = asdict(cfg)
        out["_inference"] = inference
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_results(results, args.plot)
        print(f"wrote {args.plot}")
    return 0
