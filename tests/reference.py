"""Plain-PyTorch reference implementations, written from ../shared/design/cast-method.md.

Nothing here imports cast_rs: these are what the Rust kernels are checked against.

* :func:`ref_nm_mask` — the N:M rule, by a stable sort of magnitudes.
* :func:`brute_nm_mask` — the same rule with Python loops, for tiny inputs (ties, NaN).
* :class:`RefAdamS` — AdamS one parameter at a time with bool masks.
* :func:`foreach_adams_step` — what a researcher would write for speed without a custom
  kernel (foreach ops, float masks, a separate topk mask pass); the benchmark's baseline.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


def _grouped(x: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """[A, B, M] view: the last axis runs over one group."""
    if dim == -1 or dim == x.dim() - 1:
        return x.reshape(-1, 1, m)
    return x.reshape(x.shape[0] // m, m, -1).transpose(1, 2)


def ref_nm_mask(x: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Keep the n largest |x| per group of m; NaN largest; ties to the lower index."""
    g = _grouped(x, m, dim)
    key = g.abs().double()
    key = torch.where(torch.isnan(key), torch.full_like(key, math.inf), key)
    # Rank with an explicit tie-breaker so no sort stability is assumed: NaN above inf.
    nan = torch.isnan(g.abs().double())
    ki, kj = key.unsqueeze(-1), key.unsqueeze(-2)  # [..., i, j]
    ni, nj = nan.unsqueeze(-1), nan.unsqueeze(-2)
    idx = torch.arange(m, device=x.device)
    lower = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j]: j < i
    j_beats_i = (nj & ~ni) | ((nj == ni) & ((kj > ki) | ((kj == ki) & lower)))
    keep = j_beats_i.sum(-1) < n
    if dim == -1 or dim == x.dim() - 1:
        return keep.reshape(x.shape)
    return keep.transpose(1, 2).reshape(x.shape)


def brute_nm_mask(values: List[float], n: int, m: int) -> List[bool]:
    """1-d list, groups of m consecutive values, by sorting with an explicit key."""
    out = []
    for start in range(0, len(values), m):
        grp = values[start : start + m]

        def key(j: int, grp: List[float] = grp) -> Tuple[int, float, int]:
            v = grp[j]
            return (0 if math.isnan(v) else 1, -abs(v) if not math.isnan(v) else 0.0, j)

        kept = set(sorted(range(m), key=key)[:n])
        out.extend(j in kept for j in range(m))
    return out


class RefAdamS(torch.optim.Optimizer):
    """AdamS exactly as the spec states it, one tensor at a time, masks as bool tensors.

    ``specs`` maps a parameter to ``(n, m, dim)``; other parameters get AdamW.
    Arithmetic follows torch.optim.AdamW's single-tensor order so float32 results are
    comparable to rounding.
    """

    def __init__(
        self,
        params,
        specs: Dict[torch.Tensor, Tuple[int, int, int]],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        l1_decay=1e-3,
        total_steps=100,
        mask_interval=10,
        l1_mode="absolute",
        ramp_end=1.0,
        masked_lr_scale=1.0,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                l1_decay=l1_decay,
                total_steps=total_steps,
                mask_interval=mask_interval,
                l1_mode=l1_mode,
                ramp_end=ramp_end,
                masked_lr_scale=masked_lr_scale,
            ),
        )
        self.specs = specs

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            wd, lam, T, k = group["weight_decay"], group["l1_decay"], group["total_steps"], group["mask_interval"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                s = st["step"]
                spec = self.specs.get(p)
                if spec is not None and (s - 1) % k == 0:
                    st["mask"] = ref_nm_mask(p, *spec)
                p.mul_(1 - lr * wd)
                mu, v = st["exp_avg"], st["exp_avg_sq"]
                mu.lerp_(g, 1 - b1)
                if spec is None:
                    mt = mu
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                else:
                    alpha = min(1.0, s / max(1.0, group["ramp_end"] * T))
                    if group["l1_mode"] == "relative":
                        if (s - 1) % k == 0:
                            # κ × RMS of the bias-corrected momentum, re-measured at refreshes.
                            rms = float(mu.double().square().mean().sqrt())
                            st["l1_decay"] = lam * rms / (1 - b1**s)
                        lam_t = st["l1_decay"]
                    else:
                        lam_t = lam
                    decayed = mu * (1 - alpha) + torch.sign(p) * (alpha * lam_t)
                    mt = torch.where(st["mask"], mu, decayed)
                    v.mul_(b2).addcmul_(mt, mt, value=1 - b2)
                bc1 = 1 - b1**s
                bc2_sqrt = math.sqrt(1 - b2**s)
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                r = group["masked_lr_scale"]
                if spec is not None and r != 1.0:
                    # Masked weights step lr·r, kept ones lr.
                    step_size = torch.where(st["mask"], lr / bc1, lr * r / bc1)
                    p.sub_(step_size * mt / denom)
                else:
                    p.addcdiv_(mt, denom, value=-lr / bc1)


def topk_nm_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The usual researcher's N:M mask along the last dim: topk of |x| per group, as float."""
    g = x.detach().abs().reshape(-1, m)
    idx = g.topk(n, dim=-1).indices
    return torch.zeros_like(g).scatter_(-1, idx, 1.0).reshape(x.shape)


def foreach_adams_step(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    mus: List[torch.Tensor],
    vs: List[torch.Tensor],
    masks: List[torch.Tensor],
    step: int,
    *,
    lr: float,
    betas=(0.9, 0.999),
    eps=1e-8,
    l1_decay=1e-3,
    total_steps=100,
    mask_interval=10,
    n: int = 2,
    m: int = 4,
) -> None:
    """AdamS for a list of sparse tensors with foreach ops and float masks (in place)."""
    b1, b2 = betas
    if (step - 1) % mask_interval == 0:
        for i, p in enumerate(params):
            masks[i] = topk_nm_mask(p, n, m)
    alpha = min(1.0, step / total_steps)
    torch._foreach_lerp_(mus, grads, 1 - b1)
    signs = torch._foreach_sign(params)
    decayed = torch._foreach_mul(mus, 1 - alpha)
    torch._foreach_add_(decayed, torch._foreach_mul(signs, alpha * l1_decay))
    inv = torch._foreach_neg(masks)
    torch._foreach_add_(inv, 1.0)
    mt = torch._foreach_mul(mus, masks)
    torch._foreach_addcmul_(mt, decayed, inv)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, mt, mt, value=1 - b2)
    bc1 = 1 - b1**step
    bc2_sqrt = math.sqrt(1 - b2**step)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, mt, denom, value=-lr / bc1)


def clone_state(opt: torch.optim.Optimizer) -> Dict:
    """Deep copy of an optimizer's state_dict (tensors cloned)."""
    sd = opt.state_dict()
    return {
        "state": {
            k: {kk: (vv.clone() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()} for k, v in sd["state"].items()
        },
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


def ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float32 CPU tensor (NumPy's, the SSE/AVX sqrt
    instruction). ``torch.sqrt`` on CPU is not: with this machine's torch 2.13 build about 15 %
    of random float32 inputs come out one unit in the last place away from it, so a bit-exact
    comparison against a kernel that uses the instruction (torch's fused AdamW, cast-rs) must
    not take its square roots from torch."""
    return torch.from_numpy(np.sqrt(x.contiguous().numpy()))


def ref_adams_lowp_step(
    p: torch.Tensor,
    g: torch.Tensor,
    mu: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    s: int,
    *,
    lr: float,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    l1_decay=0.0,
    alpha=1.0,
    masked_lr_scale=1.0,
) -> None:
    """One AdamS (``keep`` a bool mask) or AdamW (``keep=None``) step on bf16/fp16 storage, in
    place, as the fused CPU kernel defines it: values widened exactly to float32, float32
    arithmetic in the order of torch's fused AdamW kernel, one round-to-nearest-even per stored
    value (``copy_``), μ and v unrounded in the θ update.

    The square root is IEEE's (see ``ieee_sqrt``). The two fused multiply-adds are emulated in
    float64: the product of two float32 is exact
    there, so the only possible difference from a true FMA is a double-rounding tie (about one
    in 2^29 operations); the tests' inputs are fixed, so they either hit one or they never do.
    """
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731  (a scalar rounded once, as the kernel's)
    fma = lambda a, b, c: (a.double() * b.double() + c.double()).float()  # noqa: E731
    b1, b2 = betas
    th, gf, m, vf = p.float(), g.float(), mu.float(), v.float()
    if weight_decay != 0.0:
        th = th * f(1 - lr * weight_decay)
    m2 = fma(f(1 - b1), gf - m, m)
    if keep is None:
        mt, x = m2, gf
    else:
        decayed = f(1 - alpha) * m2 + f(alpha * l1_decay) * torch.sign(th)
        x = mt = torch.where(keep, m2, decayed)
    v2 = fma(f(1 - b2) * x, x, vf * f(b2))
    denom = ieee_sqrt(v2) / f(math.sqrt(1 - b2**s)) + f(eps)
    neg_step = f(-lr / (1 - b1**s))
    if keep is not None:
        # The masked weights' step size, rounded once as the kernel's (lr·r / (1 − β1^s)).
        neg_step = torch.where(keep, neg_step, f(-(lr * masked_lr_scale) / (1 - b1**s)))
    th2 = th + (neg_step * mt) / denom
    p.copy_(th2)
    mu.copy_(m2)
    v.copy_(v2)


def ref_sparsegpt_nm(
    w: torch.Tensor, h: torch.Tensor, n: int, m: int, percdamp: float = 0.01
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M pruning written as textbook optimal brain surgeon, in float64: column by
    column, the inverse of the Hessian block of the columns not yet fixed is recomputed
    explicitly (no Cholesky factor, no lazy block updates). At the first column of each group,
    the M − N weights with the smallest saliency ``w_k² / [inv(H[k:, k:])]_00`` are pruned; the
    visited column's error is spread by ``inv(H[j:, j:])[0, :] / inv(H[j:, j:])[0, 0]``.
    Returns ``(weight, keep)``."""
    W = w.double().clone()
    H = h.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        inv_j = torch.linalg.inv(H[j:, j:])
        if j % m == 0:
            diag = torch.stack([torch.linalg.inv(H[k:, k:])[0, 0] for k in range(j, j + m)])
            saliency = W[:, j : j + m].square() / diag.unsqueeze(0)
            for r in range(rows):
                for k in sorted(range(m), key=lambda k: (float(saliency[r, k]), k))[: m - n]:
                    pruned[r, j + k] = True
        q = W[:, j].masked_fill(pruned[:, j], 0)
        W[:, j:] -= ((W[:, j] - q) / inv_j[0, 0]).unsqueeze(1) * inv_j[0, :].unsqueeze(0)
    return W, ~pruned
