"""CPU inference with compressed 2:4 weights (cast_rs.NMLinear) against dense PyTorch.

    ./run bench inference                 # layers, then end-to-end decoding
    ./run bench inference --layers        # the layer table only
    ./run bench inference --e2e           # the decoding table only
    ./run bench inference --crossover     # batches 1-256 on one shape: where 2:4 stops paying
    ./run bench inference --quick         # fewer rounds, the small model only (a smoke run)

**Layers.** For each weight shape (out, in) and dtype (float32, bfloat16), at batch 1, 4 and
16, on 1 thread and on all threads: the compressed 2:4 layer against `F.linear` on the same
dtype (the dense masked weight) and against `F.linear` in float32. Every contender cycles
through its own copies of the weight, enough of them to exceed the last-level cache twice over,
so memory, not cache, is measured; contenders are timed in interleaved rounds (the order
rotated each round) and the table gives medians with the interquartile range. GB/s is the
weight bytes read per second (values and positions for the compressed layer).

**End to end.** Greedy decoding with a KV cache (Hugging Face `generate`) of a GPT-2-small
shaped model (12 layers, width 768) and a Llama-shaped model of about 1.1 B parameters (22
layers, width 2048, MLP 5632; TinyLlama's shape), random weights pruned to 2:4 by magnitude
(speed does not depend on the values), dense against `cast_rs.compress`-ed, float32 and
bfloat16: tokens per second and the peak resident memory of the decoding (after the
conversion, its freed memory trimmed and the peak counter reset), each configuration in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import cast_rs

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (768, 3072), (3072, 768)]
LLC_BYTES = 32 * 2**20  # this machine's L3 (lscpu); copies cover at least twice that


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return LLC_BYTES


def nm_weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    return w * cast_rs.nm_mask(w, "2:4")


def interleaved(contenders: dict, rounds: int) -> dict:
    """Seconds per call of each contender: (median, q1, q3), from interleaved rounds after 2
    warm-up rounds."""
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds + 2):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            contenders[name]()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[k] = (statistics.median(v), q[0], q[2])
    return out


class Rotating:
    """Calls `fn(copy)` on the next of its copies each time."""

    def __init__(self, copies, fn):
        self.copies, self.fn, self.i = copies, fn, 0

    def __call__(self):
        c = self.copies[self.i]
        self.i = (self.i + 1) % len(self.copies)
        return self.fn(c)


def weight_copies(out_f: int, in_f: int, dtype: torch.dtype, llc: int):
    """Enough random 2:4 weights (float32) that even the smallest format's copies cover twice
    the last-level cache, and their compressed layers in ``dtype``."""
    copies = max(2, -(-2 * llc // (out_f * in_f * 4 // 2)))
    ws = [nm_weight(out_f, in_f, s) for s in range(copies)]
    layers = []
    for w in ws:
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        layers.append(cast_rs.NMLinear.from_dense(lin, dtype=dtype))
    return ws, layers


def layer_section(rounds: int, threads_list, shapes) -> None:
    llc = llc_bytes()
    print(
        f"\n## Layers: 2:4 compressed vs F.linear (medians of {rounds} interleaved rounds, [q1-q3] in ms; "
        f"each contender cycles through copies of its weight covering >= 2x the {llc // 2**20} MiB LLC)\n"
    )
    print(
        "| shape (out, in) | dtype | batch | threads | compressed ms | F.linear same dtype ms | F.linear f32 ms "
        "| vs same dtype | vs f32 | compressed GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            ws, layers = weight_copies(out_f, in_f, dtype, llc)
            # Every contender has copies of its own (F.linear f32 and F.linear on float32 read
            # the same values, but must not read the same memory: the second would hit cache).
            dense_same = [w.to(dtype).clone() for w in ws]
            dense_f32 = [w.clone() for w in ws]
            nbytes = layers[0].nbytes
            for batch in (1, 4, 16):
                x32 = torch.randn(batch, in_f)
                x = x32.to(dtype)
                for threads in threads_list:
                    torch.set_num_threads(threads)
                    with torch.no_grad():
                        med = interleaved(
                            {
                                "nm": Rotating(layers, lambda layer, x=x: layer(x)),
                                "same": Rotating(dense_same, lambda w, x=x: F.linear(x, w)),
                                "f32": Rotating(dense_f32, lambda w, x32=x32: F.linear(x32, w)),
                            },
                            rounds,
                        )
                    nm, same, f32 = med["nm"], med["same"], med["f32"]
                    name = "f32" if dtype == torch.float32 else "bf16"
                    print(
                        f"| ({out_f}, {in_f}) | {name} | {batch} | {threads} | {nm[0] * 1e3:.3f} "
                        f"[{nm[1] * 1e3:.3f}-{nm[2] * 1e3:.3f}] | {same[0] * 1e3:.3f} | {f32[0] * 1e3:.3f} "
                        f"| **{same[0] / nm[0]:.2f}x** | {f32[0] / nm[0]:.2f}x | {nbytes / nm[0] / 1e9:.1f} |",
                        flush=True,
                    )
            del ws, dense_same, dense_f32, layers


def crossover_section(rounds: int, threads_list, shape=(4096, 4096)) -> None:
    """Where 2:4 stops paying: the compressed layer against ``F.linear`` on the same dtype at
    batches 1 to 256 on one shape (the operator runs its kernels at every batch)."""
    llc = llc_bytes()
    out_f, in_f = shape
    print(
        f"\n## Crossover: ({out_f}, {in_f}), compressed 2:4 vs F.linear by batch (medians of {rounds} "
        f"interleaved rounds; copies cover >= 2x the {llc // 2**20} MiB LLC)\n"
    )
    print("| dtype | threads | batch | compressed ms | F.linear ms | compressed vs F.linear |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        ws, layers = weight_copies(out_f, in_f, dtype, llc)
        dense = [w.to(dtype).clone() for w in ws]
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch in (1, 4, 8, 16, 24, 32, 48, 64, 128, 256):
                x = torch.randn(batch, in_f).to(dtype)
                with torch.no_grad():
                    med = interleaved(
                        {
                            "nm": Rotating(layers, lambda layer, x=x: layer(x)),
                            "same": Rotating(dense, lambda w, x=x: F.linear(x, w)),
                        },
                        rounds,
                    )
                k, d = med["nm"][0], med["same"][0]
                name = "f32" if dtype == torch.float32 else "bf16"
                print(f"| {name} | {threads} | {batch} | {k * 1e3:.3f} | {d * 1e3:.3f} | **{d / k:.2f}x** |", flush=True)
        del ws, dense, layers


def llama_1b_config():
    """The Llama shape of the end-to-end runs: about 1.1 B parameters (TinyLlama's)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


def e2e_child(kind: str, dtype_name: str, compressed: bool, new_tokens: int, threads: int) -> dict:
    """One decoding measurement (run in its own process so that peak memory is its own)."""
    import resource

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    dtype = torch.float32 if dtype_name == "f32" else torch.bfloat16
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    else:
        model = LlamaForCausalLM(llama_1b_config())
    model = model.to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    cast_rs.baselines.magnitude_prune(model, "2:4")  # every layer sparsify would pick
    weight_bytes = None
    if compressed:
        report = cast_rs.compress(model)
        weight_bytes = (report.dense_bytes, report.compressed_bytes)
    # Peak memory of the decoding itself: the dense weights the conversion started from are
    # freed, then the kernel's peak-RSS counter is reset (Linux: clear_refs 5).
    import gc

    gc.collect()
    try:  # return the freed heap pages to the OS (glibc keeps them resident otherwise)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    prompt = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    assert out.shape[1] == 16 + new_tokens
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    return dict(params=params, tokens_per_s=new_tokens / dt, peak_rss=rss, weight_bytes=weight_bytes)


def e2e_section(kinds, new_tokens: int, threads: int) -> None:
    print(
        f"\n## End to end: greedy decoding with a KV cache (16-token prompt, {new_tokens} new tokens, "
        f"{threads} threads), random weights pruned to 2:4\n"
    )
    print(
        "| model | dtype | dense tok/s | compressed tok/s | speed-up | dense peak RSS | compressed peak RSS "
        "| converted layers' bytes (compressed / dense) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        for dtype_name in ("f32", "bf16"):
            res = {}
            for compressed in (False, True):
                cmd = [sys.executable, __file__, "--child", json.dumps([kind, dtype_name, compressed, new_tokens, threads])]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"child {kind} {dtype_name} compressed={compressed} failed")
                res[compressed] = json.loads(proc.stdout.strip().splitlines()[-1])
            d, c = res[False], res[True]
            dense_b, comp_b = c["weight_bytes"]
            label = f"{kind} ({d['params'] / 1e6:.0f} M)"
            print(
                f"| {label} | {dtype_name} | {d['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} "
                f"| **{c['tokens_per_s'] / d['tokens_per_s']:.2f}x** | {d['peak_rss'] / 2**30:.2f} GiB "
                f"| {c['peak_rss'] / 2**30:.2f} GiB | {comp_b / dense_b:.3f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", action="store_true", help="only the layer table")
    ap.add_argument("--e2e", action="store_true", help="only the end-to-end table")
    ap.add_argument(
        "--crossover",
        action="store_true",
        help="only the crossover table (batches 1-256 on (4096, 4096): where the kernel stops paying)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds, small shapes and model")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per layer row (default 30)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per decoding run (default 64)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(e2e_child(*json.loads(a.child))))
        return
    all_threads = os.cpu_count() or 1
    threads_list = sorted({1, torch.get_num_threads(), all_threads})
    print(f"torch {torch.__version__}, cast-rs {cast_rs.__version__}, {all_threads} CPUs")
    both = not (a.layers or a.e2e or a.crossover)
    if a.layers or both:
        shapes = SHAPES[3:] if a.quick else SHAPES
        layer_section(a.rounds or (5 if a.quick else 30), threads_list, shapes)
    if a.crossover or both:
        crossover_section(a.rounds or (3 if a.quick else 15), threads_list, (768, 3072) if a.quick else (4096, 4096))
    if a.e2e or both:
        e2e_section(["gpt2"] if a.quick else ["gpt2", "llama"], a.tokens or (8 if a.quick else 64), all_threads)


if __name__ == "__main__":
    main()
