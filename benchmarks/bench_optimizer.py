"""Optimizer-step and mask-kernel speed, side by side in one run (medians and ratios).

    ./run bench optimizer [--tensors 24] [--size 1024] [--steps 30]

* cast_rs.AdamS (2:4 on every tensor; Rust fused step, mask refresh every 10 steps)
* torch.optim.AdamW(fused=True): the memory-bandwidth yardstick (same 28 bytes per weight)
* plain-PyTorch AdamS (foreach ops, float masks, topk mask pass): what one writes without
  a kernel (tests/reference.py: foreach_adams_step)
* bf16 (and with --fp16 also fp16) parameters: AdamS on its fused 16-bit path vs
  AdamW(fused=True) and AdamW(foreach=True) on the same dtype
* AdamS with masked_lr_scale=2 (masked weights step 2·lr) on the fast and generic paths: the
  fast path selects the step size per element; the generic path then leaves `_fused_adamw_`
  for its `_foreach_*` route
* the generic path forced (float32): AdamS vs AdamW(foreach=True), torch's multi-tensor path,
  and the ATen operations one step launches for 10 and 100 parameters (torch profiler)
* N:M mask: cast_rs.nm_mask vs a torch.topk-based mask

Timings are wall-clock medians over the measured steps, after warm-up, in this process;
the machine's thread count applies to all (torch threads and the Rust pool alike). Every
optimizer runs with weight decay 0.01 (AdamW's default; AdamS's is 0), so all of them do the
same decoupled-decay work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import cast_rs  # noqa: E402
from reference import foreach_adams_step, topk_nm_mask  # noqa: E402


WD = 0.01  # torch.optim.AdamW's default weight decay, given to every AdamS here as well


def timed(fn, steps: int, warmup: int = 3) -> list:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(contenders: dict, rounds: int, every: dict | None = None) -> dict:
    """Median seconds per call of each contender, timed in interleaved rounds (one call of
    each per round, the order rotated every round) after 3 warm-up rounds, so drift in the
    machine's speed (a shared VM) and the after-effects of one step on the next (allocator,
    thread-pool state) hit them alike. ``every[name] = k`` runs a slow one every k-th round."""
    every = every or {}
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds + 3):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if r % every.get(name, 1):
                continue
            t0 = time.perf_counter()
            contenders[name]()
            if r >= 3:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def lowp_section(shape, tensors: int, rounds: int, dtype: torch.dtype) -> None:
    """AdamS on bf16/fp16 parameters (fused 16-bit path) vs torch's AdamW on the same dtype."""

    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for _ in range(tensors)]
        for p in ps:
            p.grad = (torch.randn(shape) * 1e-2).to(dtype)
        return ps

    adams = cast_rs.AdamS(params(), lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=10_000, mask_interval=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "acts as AdamW": intended here
        dense = cast_rs.AdamS(params(), lr=1e-3, weight_decay=WD)
    fused = torch.optim.AdamW(params(), lr=1e-3, weight_decay=WD, fused=True)
    foreach = torch.optim.AdamW(params(), lr=1e-3, weight_decay=WD, foreach=True)
    med = interleaved({"adams": adams.step, "dense": dense.step, "fused": fused.step, "foreach": foreach.step}, rounds)
    assert adams._kernel_calls[1] == 0 and dense._kernel_calls[1] == 0, "must run on the fused 16-bit path"
    name = str(dtype).replace("torch.", "")
    print(f"\n{name} parameters ({tensors} x {shape[0]}x{shape[1]}), state in {name}   median ms   vs fused   vs foreach")
    for key, label in (
        ("adams", f"cast_rs.AdamS (2:4, fused {name})"),
        ("dense", "cast_rs.AdamS, dense (= AdamW)"),
        ("fused", "torch AdamW(fused=True)"),
        ("foreach", "torch AdamW(foreach=True)"),
    ):
        print(f"{label:<40}{med[key] * 1e3:9.1f}   {med[key] / med['fused']:6.2f}x   {med[key] / med['foreach']:7.2f}x")


def generic_section(shape, tensors: int, rounds: int) -> None:
    """The generic (tensor-op) path, forced on float32 CPU tensors: the path CUDA tensors take."""

    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(shape)) for _ in range(tensors)]
        for p in ps:
            p.grad = torch.randn(shape) * 1e-2
        return ps

    adams = cast_rs.AdamS(params(), lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=10_000, mask_interval=10)
    adams_r2 = cast_rs.AdamS(
        params(), lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=10_000, mask_interval=10, masked_lr_scale=2.0
    )

    def generic_step():
        with cast_rs.force_generic_path():
            adams.step()

    def generic_step_r2():
        with cast_rs.force_generic_path():
            adams_r2.step()

    foreach = torch.optim.AdamW(params(), lr=1e-3, weight_decay=WD, foreach=True)
    fused = torch.optim.AdamW(params(), lr=1e-3, weight_decay=WD, fused=True)
    med = interleaved({"adams": generic_step, "adams_r2": generic_step_r2, "foreach": foreach.step, "fused": fused.step}, rounds)
    assert adams._kernel_calls[0] == 0 and adams_r2._kernel_calls[0] == 0, "must run on the generic path"
    print(f"\ngeneric path forced, float32 ({tensors} x {shape[0]}x{shape[1]})   median ms   vs foreach   vs fused")
    for key, label in (
        ("adams", "cast_rs.AdamS (2:4, generic path)"),
        ("adams_r2", "  the same, masked_lr_scale=2"),
        ("foreach", "torch AdamW(foreach=True)"),
        ("fused", "torch AdamW(fused=True)"),
    ):
        print(f"{label:<40}{med[key] * 1e3:9.1f}   {med[key] / med['foreach']:8.2f}x   {med[key] / med['fused']:6.2f}x")


def aten_ops_per_step(step, warmup: int = 2) -> int:
    """ATen operator calls the step makes itself: top-level ``aten::*`` profiler events (not
    the ops an operator runs inside, e.g. the per-tensor fallback of a ``_foreach_*`` op on
    CPU, which a CUDA build replaces with one multi-tensor kernel)."""
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not _aten_parent(e))


def _aten_parent(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def op_count_section() -> None:
    """ATen ops per step for 10 and 100 sparse parameters: AdamS on the generic path (forced)
    vs AdamW(foreach=True), and AdamS's fused path (one Rust call, no ATen kernels)."""
    rows = {}
    for k in (10, 100):

        def params(k=k):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(k)]
            for p in ps:
                p.grad = torch.randn(64, 64) * 1e-2
            return ps

        adams_g = cast_rs.AdamS(params(), lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=10_000, mask_interval=10_000)
        adams_f = cast_rs.AdamS(params(), lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=10_000, mask_interval=10_000)
        foreach = torch.optim.AdamW(params(), lr=1e-3, weight_decay=WD, foreach=True)

        def generic_step(adams_g=adams_g):
            with cast_rs.force_generic_path():
                adams_g.step()

        rows[k] = (aten_ops_per_step(generic_step), aten_ops_per_step(foreach.step), aten_ops_per_step(adams_f.step))
    print("\nATen ops per step (profiler; no mask refresh)   10 params   100 params")
    for i, label in enumerate(
        ("cast_rs.AdamS, generic path (forced)", "torch AdamW(foreach=True)", "cast_rs.AdamS, fused CPU path")
    ):
        print(f"{label:<48}{rows[10][i]:8d}   {rows[100][i]:10d}")
    print(f"-> AdamS generic / AdamW foreach at 100 params: {rows[100][0] / rows[100][1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40, help="timed rounds (default 40)")
    ap.add_argument("--fp16", action="store_true", help="also time float16 parameters")
    ap.add_argument("--lowp-tensors", type=int, default=8, help="tensors in the bf16/fp16 and generic-path sections (default 8)")
    args = ap.parse_args()
    shape = (args.size, args.size)
    numel = args.tensors * args.size * args.size
    print(
        f"{args.tensors} float32 weights of {shape[0]}x{shape[1]} ({numel / 1e6:.1f} M weights), all 2:4; "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{cast_rs._cast_rs.num_threads()} cast-rs threads; {args.steps} interleaved rounds"
    )

    def params():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(shape)) for _ in range(args.tensors)]
        for p in ps:
            p.grad = torch.randn(shape) * 1e-2
        return ps

    T = 10_000
    # All optimizers live side by side and are timed in interleaved rounds (one step of each
    # per round), so drift in the machine's speed (a shared VM) hits them alike.
    ps_adams = params()
    adams = cast_rs.AdamS(ps_adams, lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=T, mask_interval=10)
    ps_r2 = params()
    adams_r2 = cast_rs.AdamS(ps_r2, lr=1e-3, weight_decay=WD, pattern="2:4", total_steps=T, mask_interval=10, masked_lr_scale=2.0)
    ps_dense = params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "acts as AdamW": intended here
        adams_dense = cast_rs.AdamS(ps_dense, lr=1e-3, weight_decay=WD)
    ps_adamw = params()
    adamw = torch.optim.AdamW(ps_adamw, lr=1e-3, weight_decay=WD, fused=True)
    ps = params()
    grads = [p.grad for p in ps]
    mus = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    masks = [torch.ones_like(p) for p in ps]
    counter = [0]

    # The tensors are default arguments rather than closure variables: the `del` below frees
    # them for the later sections, and a closure over names deleted later is an undefined name
    # to linters (ruff F821).
    @torch.no_grad()
    def plain_step(ps=ps, grads=grads, mus=mus, vs=vs, masks=masks):
        counter[0] += 1
        foreach_adams_step(ps, grads, mus, vs, masks, counter[0], lr=1e-3, total_steps=T, mask_interval=10)

    contenders = {
        "adams": adams.step,
        "adams_r2": adams_r2.step,
        "dense": adams_dense.step,
        "adamw": adamw.step,
        "plain": plain_step,
    }
    # The plain-PyTorch step is 10x slower: a third of the rounds is plenty for its median.
    med = interleaved(contenders, args.steps, every={"plain": 3})
    assert adams._kernel_calls[1] == 0 and adams_r2._kernel_calls[1] == 0, "benchmark must run on the fast path"
    # contenders holds plain_step (and with it the tensors bound to it) and the optimizers' steps.
    del contenders, plain_step
    del ps_adams, ps_adamw, ps_dense, adams_dense, ps, grads, mus, vs, masks, adams, adamw, ps_r2, adams_r2

    gbps = numel * 28 / med["adams"] / 1e9
    print("\nfloat32 optimizer step              median ms   vs fused AdamW")
    print(f"cast_rs.AdamS (2:4, fast path)      {med['adams'] * 1e3:9.1f}   {med['adams'] / med['adamw']:6.2f}x")
    print(f"  the same, masked_lr_scale=2       {med['adams_r2'] * 1e3:9.1f}   {med['adams_r2'] / med['adamw']:6.2f}x")
    print(f"cast_rs.AdamS, dense (= AdamW)      {med['dense'] * 1e3:9.1f}   {med['dense'] / med['adamw']:6.2f}x")
    print(f"torch AdamW(fused=True)             {med['adamw'] * 1e3:9.1f}   {1.0:6.2f}x")
    print(f"plain-PyTorch AdamS (foreach)       {med['plain'] * 1e3:9.1f}   {med['plain'] / med['adamw']:6.2f}x")
    print(
        f"-> cast_rs.AdamS is {med['plain'] / med['adams']:.1f}x faster than plain-PyTorch AdamS and takes "
        f"{med['adams'] / med['adamw']:.2f}x the time of fused AdamW ({gbps:.1f} GB/s of the 28 B/weight traffic)"
    )

    for dtype in [torch.bfloat16] + ([torch.float16] if args.fp16 else []):
        lowp_section(shape, args.lowp_tensors, args.steps, dtype)
    generic_section(shape, args.lowp_tensors, max(10, args.steps // 2))
    op_count_section()

    # Mask kernel, on the same 24 tensors (one refresh of the whole model).
    torch.manual_seed(1)
    ws = [torch.randn(shape) for _ in range(args.tensors)]
    t_rs = timed(lambda: [cast_rs.nm_mask(w, "2:4") for w in ws], max(5, args.steps // 3))
    t_packed = timed(lambda: [cast_rs.nm_mask_packed(w, "2:4") for w in ws], max(5, args.steps // 3))
    t_topk = timed(lambda: [topk_nm_mask(w, 2, 4) for w in ws], max(5, args.steps // 3))
    for w in ws[:2]:
        assert torch.equal(cast_rs.nm_mask(w, "2:4"), topk_nm_mask(w, 2, 4).bool())  # no ties in randn
    m_rs, m_packed, m_topk = (statistics.median(t) for t in (t_rs, t_packed, t_topk))
    print("\n2:4 mask of all tensors               median ms   speed-up vs topk")
    print(f"cast_rs.nm_mask (bool)                {m_rs * 1e3:9.1f}   {m_topk / m_rs:6.1f}x")
    print(f"cast_rs.nm_mask_packed (1 bit/weight) {m_packed * 1e3:9.1f}   {m_topk / m_packed:6.1f}x")
    print(f"torch.topk-based mask (float)         {m_topk * 1e3:9.1f}   {1.0:6.1f}x")


if __name__ == "__main__":
    main()
