"""A short, self-contained sparsification run: ``python -m cast_rs example``.

A small MLP is first trained (dense) to imitate a fixed random "teacher" network on data
made here. Then, from that dense checkpoint and with the same number of steps:

* one-shot magnitude N:M: keep the N largest |w| of every group, no training;
* dense AdamW, then magnitude N:M: extra training that ignores sparsity;
* CAST: ``sparsify`` (marks the weights, adds weight scaling), AdamS training that pulls the
  masked-out weights to zero, then ``finalize`` (exact N:M, scale folded) and ``check_nm``.

The two hidden ``nn.Linear`` weights (32→256, 256→256) are N:M along their input dimension;
the output layer and the biases stay dense.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List, Tuple

import torch
from torch import nn
from tqdm import TqdmWarning

with warnings.catch_warnings():  # in Jupyter without ipywidgets it falls back to text bars, and says so
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

from .nm import nm_mask, parse_pattern
from .optim import AdamS
from .checking import check_nm
from .sparsity import sparsify


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 8))


def _sparse_weights(model: nn.Sequential, m: int) -> List[nn.Parameter]:
    """The two hidden weights (the layers CAST makes sparse; the output layer stays dense)."""
    return [model[0].weight, model[2].weight]


@torch.no_grad()
def _project(model: nn.Module, n: int, m: int) -> float:
    """Zero the masked-out weights; return the share of L1 mass removed."""
    removed = total = 0.0
    for w in _sparse_weights(model, m):
        keep = nm_mask(w, (n, m))
        removed += float(w[~keep].abs().sum())
        total += float(w.abs().sum())
        w.mul_(keep)
    return removed / max(total, 1e-30)


def _is_exact(model: nn.Module, n: int, m: int) -> bool:
    for w in _sparse_weights(model, m):
        if bool(((w.detach().reshape(-1, m) != 0).sum(-1) > n).any()):
            return False
    return True


def run_example(pattern: str = "2:4", steps: int = 600, width: int = 256, seed: int = 0) -> Dict[str, Tuple[float, float, bool]]:
    n, m = parse_pattern(pattern)
    torch.manual_seed(seed)
    teacher = _mlp(width)
    x_train, x_val = torch.randn(4096, 32), torch.randn(1024, 32)
    with torch.no_grad():
        y_train, y_val = teacher(x_train), teacher(x_val)

    def val_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x_val), y_val))

    def train(model: nn.Module, opt: torch.optim.Optimizer, n_steps: int, desc: str) -> None:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps)
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in tqdm(range(n_steps), desc=desc, leave=False):
            idx = torch.randint(0, x_train.shape[0], (256,), generator=gen)
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()

    results: Dict[str, Tuple[float, float, bool]] = {}
    dense = _mlp(width)
    t0 = time.perf_counter()
    train(dense, torch.optim.AdamW(dense.parameters(), lr=3e-3), steps, "dense")
    results["dense"] = (val_loss(dense), time.perf_counter() - t0, False)

    one_shot = _mlp(width)
    one_shot.load_state_dict(dense.state_dict())
    t0 = time.perf_counter()
    _project(one_shot, n, m)
    results[f"one-shot magnitude {n}:{m}"] = (val_loss(one_shot), time.perf_counter() - t0, _is_exact(one_shot, n, m))

    cont = _mlp(width)
    cont.load_state_dict(dense.state_dict())
    t0 = time.perf_counter()
    train(cont, torch.optim.AdamW(cont.parameters(), lr=1e-3), steps, "dense AdamW")
    results["dense, trained on (no sparsity)"] = (val_loss(cont), time.perf_counter() - t0, False)
    _project(cont, n, m)
    results[f"dense AdamW, then magnitude {n}:{m}"] = (val_loss(cont), time.perf_counter() - t0, _is_exact(cont, n, m))

    sparse = _mlp(width)
    sparse.load_state_dict(dense.state_dict())
    handle = sparsify(sparse, (n, m), exclude=["4"])  # the 8-wide output layer stays dense
    opt = AdamS(sparse.parameters(), lr=1e-3, l1_decay=1e-2, total_steps=steps)
    t0 = time.perf_counter()
    train(sparse, opt, steps, f"AdamS {n}:{m}")
    report = handle.finalize()
    exact = check_nm(sparse, (n, m)).ok
    results[f"CAST: AdamS + scaling {n}:{m}"] = (val_loss(sparse), time.perf_counter() - t0, exact)
    cut = report.total_l1_removed_fraction
    results["_l1_cut"] = (cut, 0.0, True)
    return results


def main(pattern: str = "2:4", steps: int = 600, seed: int = 0) -> None:
    print(
        f"cast-rs example: an MLP (32-256-256-8) imitating a random teacher; {pattern} on its hidden weights; {steps} steps per method"
    )
    res = run_example(pattern=pattern, steps=steps, seed=seed)
    cut = res.pop("_l1_cut")[0]
    dense_loss = res["dense"][0]
    print(f"\n{'method':<40} {'val MSE':>10} {'vs dense':>9} {'exact N:M':>10} {'seconds':>8}")
    for name, (loss, secs, exact) in res.items():
        dense_row = name.startswith("dense") and "magnitude" not in name
        rel = "" if name == "dense" else f"{loss / dense_loss:8.2f}x"
        ex = "-" if dense_row else ("yes" if exact else "NO")
        print(f"{name:<40} {loss:>10.5f} {rel:>9} {ex:>10} {secs:>8.1f}")
    print(f"\nfinalize cut {100 * cut:.2f}% of the sparse layers' L1 mass (the masked-out weights AdamS had driven to ~0).")
