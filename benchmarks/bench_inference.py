"""CPU inference with compressed 2:4 weights (cast_rs.NMLinear) against dense PyTorch.

    ./run bench inference                 # layers, then end-to-end decoding
    ./run bench inference --layers        # the layer table only
    ./run bench inference --e2e           # the decoding table only
    ./run bench inference --crossover     # batches 1-512 on one shape: where 2:4 stops paying
    ./run bench inference --quick         # fewer rounds, the small model only (a smoke run)
    ./run bench inference --e2e --llamacpp  # and llama.cpp on the same weights (installs llama-cpp-python)

**Host.** The CPU model, logical CPUs, the kernel each kind of 2:4 call runs, the last-level
cache (from sysfs, else `getconf LEVEL3_CACHE_SIZE`, else `lscpu -B`, else `--llc-mib`; when
none gives it, the layer, int8 and crossover tables refuse to run rather than guess, since
their weight copies must exceed it) and the ISA flags that matter; then the host's read bandwidth: a sum,
a dot product and a matrix-vector product over a buffer of max(4x the last-level cache, 512 MiB),
on 1 thread and on all, the medians in GB/s (the fastest is the reference).

**Layers.** For each weight shape (out, in) and dtype (float32, bfloat16), at batch 1, 4 and
16, on 1 thread and on all threads: the compressed 2:4 layer against `F.linear` on the same
dtype (the dense masked weight) and against `F.linear` in float32. Every contender cycles
through its own copies of the weight, enough of them that the copies in its own format exceed
the last-level cache twice over (a compressed copy is half a dense one or less, so it gets more
copies), so memory, not cache, is measured; contenders are timed in interleaved rounds (the order
rotated each round) and the table gives medians with the interquartile range. GB/s is the
weight bytes read per second (values and positions for the compressed layer, the dense weight
for F.linear), and % BW that as a share of the host's read bandwidth at the row's threads.
Then int8 2:4 (`compress(model, dtype=torch.int8)`'s layer, float32 or bfloat16 activations)
against the bfloat16 2:4 layer and dense float32 `F.linear`, at batch 1 and 4.

**End to end.** Greedy decoding with a KV cache (Hugging Face `generate`) of a GPT-2-small
shaped model (12 layers, width 768) and a Llama-shaped model of about 1.1 B parameters (22
layers, width 2048, MLP 5632; TinyLlama's shape), random weights pruned to 2:4 by magnitude
(speed does not depend on the values), dense against `cast_rs.compress`-ed, float32 and
bfloat16: tokens per second and the peak resident memory of the decoding (after the
conversion, its freed memory trimmed and the peak counter reset), each configuration in its own process.

**llama.cpp** (`--llamacpp`): the same Llama weights written as F32, BF16 and Q8_0 GGUF files
(benchmarks/gguf_export.py), decoded by llama.cpp (llama-cpp-python) from the same prompt ids
with the same threads, greedy, timed and measured the same way (its own process; warm-up, then
the prompt's pass and the new tokens). A check first: on a two-layer Llama, llama.cpp's greedy
tokens from the F32 file must equal PyTorch's (the run stops otherwise). With --quick, that
two-layer Llama is also the model of the side-by-side table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import cast_rs
from _e2e_models import PROMPT_TOKENS, build_model, greedy  # benchmarks/ is on sys.path when run
from _rss import peak_rss, reset_peak_rss

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (768, 3072), (3072, 768)]
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _size_bytes(text: str) -> int | None:
    """ "32768K", "32 MiB", "33554432 (1 instance)", "1M" -> bytes (None if unreadable)."""
    m = re.match(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\b", text, re.IGNORECASE)
    if not m:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]
    return int(float(m.group(1)) * scale) or None


def _llc_sysfs() -> tuple[int, str] | None:
    """The largest cache level in /sys/devices/system/cpu/cpu*/cache/index*, summed over its
    instances (one per distinct set of CPUs sharing it: a CCX, a socket)."""
    caches: dict[int, dict[str, int]] = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(index, "size")) as f:
                size = _size_bytes(f.read())
            try:
                with open(os.path.join(index, "shared_cpu_list")) as f:
                    shared = f.read().strip()
            except OSError:
                shared = index
        except (OSError, ValueError):
            continue
        if size:
            caches.setdefault(level, {})[shared] = size
    if not caches:
        return None
    level = max(caches)
    sizes = list(caches[level].values())
    each = f"{sizes[0] // 2**20} MiB" if len(set(sizes)) == 1 else "sizes vary"
    return sum(sizes), f"sysfs L{level}, {len(sizes)} instance(s) of {each}"


def _llc_getconf() -> tuple[int, str] | None:
    try:
        out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True, timeout=10).stdout
        size = int(out.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return (size, "getconf LEVEL3_CACHE_SIZE") if size > 0 else None


def _llc_lscpu() -> tuple[int, str] | None:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    levels = {}
    for line in out.splitlines():
        m = re.match(r"\s*L(\d)\w* cache:\s*(.*)", line)
        if m and (size := _size_bytes(m.group(2))):
            levels[int(m.group(1))] = size  # lscpu gives the total over the instances
    if not levels:
        return None
    level = max(levels)
    return levels[level], f"lscpu -B L{level}"


_LLC: list = []


def llc_bytes() -> tuple[int | None, str]:
    """The last-level cache in bytes (all its instances) and where that came from: sysfs, then
    ``getconf LEVEL3_CACHE_SIZE``, then ``lscpu -B``; (None, reason) if none of them answers."""
    if not _LLC:
        found = _llc_sysfs() or _llc_getconf() or _llc_lscpu()
        _LLC.append(found or (None, "unknown: sysfs, getconf and lscpu gave no cache size"))
    return _LLC[0]


def set_llc_mib(mib: float) -> None:
    """The last-level cache size given on the command line (--llc-mib), used instead of the OS's."""
    _LLC[:] = [(int(mib * 2**20), "given with --llc-mib")]


def known_llc() -> int:
    """The last-level cache in bytes; exits, naming --llc-mib, when neither the OS nor the
    command line says it: any fixed rotation could fit in some CPU's cache (L3 caches reach
    1 GiB), and then the layer tables would time the cache, not memory."""
    llc, source = llc_bytes()
    if not llc:
        raise SystemExit(
            f"the last-level cache size is {source}: the layer, int8 and crossover tables and the "
            "bandwidth measurement need it (their weight copies must exceed it); pass --llc-mib N "
            "(the last-level cache of the CPU, all instances, in MiB), or run --e2e alone"
        )
    return llc


def rotation_bytes() -> int:
    """Bytes of weight copies a contender cycles through: twice the last-level cache."""
    return 2 * known_llc()


def rotation_note() -> str:
    return f"weight copies covering >= 2x the {known_llc() / 2**20:.0f} MiB last-level cache"


def host_info() -> dict:
    """CPU model, logical CPUs, last-level cache and the ISA flags that matter here. A VM may
    report only "AMD EPYC" as its model name, so the CPU family and model numbers follow it
    (they tell the core generation: the same machine kind has been Zen 3, 4 and 5)."""
    model, flags, numbers = "unknown", set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if numbers:
        model += f" (family {numbers.get('cpu family', '?')}, model {numbers.get('model', '?')})"
    llc, source = llc_bytes()
    return dict(model=model, cpus=os.cpu_count() or 1, llc=llc, llc_source=source, isa=[f for f in ISA_FLAGS if f in flags])


def print_host(info: dict) -> None:
    llc = f"{info['llc'] / 2**20:.0f} MiB ({info['llc_source']})" if info["llc"] else info["llc_source"]
    print(
        f"host: {info['model']}, {info['cpus']} logical CPUs, last-level cache {llc}, ISA: {' '.join(info['isa']) or 'none of ' + ' '.join(ISA_FLAGS)}"
    )
    kernels = cast_rs._cast_rs.nm_linear_kernels()
    print("2:4 kernels: " + "; ".join(f"{call}: {kernel}" for call, kernel in kernels.items()))


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def read_bandwidth(threads_list, runs: int = 7) -> tuple[dict, int]:
    """STREAM-style read bandwidth over a float32 buffer of max(4x the last-level cache,
    512 MiB) (at most a quarter of the available memory), per thread count: bytes / median
    seconds of ``runs`` runs (after one warm-up) of ``buf.sum()``, ``torch.dot(buf, buf)`` and
    ``torch.mv`` of the buffer as a [rows, 4096] matrix (one read of the buffer each; the
    matrix-vector product reads several rows side by side, which on some hosts one sequential
    stream does not match). Returns ({threads: {"sum": GB/s, "dot": GB/s, "mv": GB/s}}, bytes)."""
    want = max(4 * known_llc(), 512 * 2**20)
    avail = mem_available()
    nbytes = min(want, avail // 4) if avail else want
    buf = torch.ones(nbytes // 4)  # written once: every page is resident
    buf = buf[: buf.numel() // 4096 * 4096]
    nbytes = buf.numel() * 4
    mat, vec = buf.view(-1, 4096), torch.ones(4096)
    kernels = {"sum": buf.sum, "dot": lambda: torch.dot(buf, buf), "mv": lambda: torch.mv(mat, vec)}
    out = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        out[threads] = {}
        for name, fn in kernels.items():
            fn()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[threads][name] = nbytes / statistics.median(times) / 1e9
    return out, nbytes


def bandwidth_section(threads_list) -> dict:
    """The host's read bandwidth table; returns {threads: GB/s} (the fastest of the kernels)."""
    bw, nbytes = read_bandwidth(threads_list)
    print(
        f"\n## Host read bandwidth ({nbytes / 2**20:.0f} MiB of float32, median of 7 runs; "
        f"the fastest kernel is the reference for the layer tables' % BW)\n"
    )
    print("| threads | torch.sum GB/s | torch.dot(x, x) GB/s | torch.mv GB/s | read GB/s |")
    print("|---|---|---|---|---|")
    for threads, r in bw.items():
        print(
            f"| {threads} | {r['sum']:.1f} | {r['dot']:.1f} | {r['mv']:.1f} | **{max(r.values()):.1f}** |",
            flush=True,
        )
    return {threads: max(r.values()) for threads, r in bw.items()}


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


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_bytes(c) -> int:
    """Bytes a call reads of weight ``c``: a dense tensor, or a compressed layer's values,
    positions (and int8 scales)."""
    if isinstance(c, torch.Tensor):
        return tensor_bytes(c)
    return tensor_bytes(*(t for t in (c.values, c.index, c.scales) if t is not None))


def weight_copies(out_f: int, in_f: int, rotation: int, make) -> list:
    """``make(w)`` for enough random 2:4 weights ``w`` (float32, seeds 0, 1, ...) that the
    copies cover ``rotation`` bytes of the format ``make`` returns (each contender counts its
    own: a compressed int8 copy is a sixth of a dense float32 one, so it needs six times as
    many copies to stay out of the cache)."""
    first = make(nm_weight(out_f, in_f, 0))
    n = max(2, -(-rotation // layer_bytes(first)))
    return [first] + [make(nm_weight(out_f, in_f, s)) for s in range(1, n)]


def compressed_layer(dtype: torch.dtype):
    """``make`` for weight_copies: the NMLinear of a float32 2:4 weight, with values in ``dtype``."""

    def make(w: torch.Tensor):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        return cast_rs.NMLinear.from_dense(lin, dtype=dtype)

    return make


def layer_section(rounds: int, threads_list, shapes, bandwidth: dict) -> None:
    """``bandwidth``: the host's read GB/s by thread count (bandwidth_section)."""
    rotation = rotation_bytes()
    print(
        f"\n## Layers: 2:4 compressed vs F.linear (medians of {rounds} interleaved rounds, [q1-q3] in ms; "
        f"each contender cycles through {rotation_note()})\n"
    )
    print(
        "GB/s: the weight bytes a call reads (compressed: values and positions; F.linear: the dense "
        "weight in the same dtype) per second; % BW: that as a share of the host's read bandwidth "
        "at the row's thread count.\n"
    )
    print(
        "| shape (out, in) | dtype | batch | threads | compressed ms | F.linear same dtype ms | F.linear f32 ms "
        "| vs same dtype | vs f32 | compressed GB/s | compressed % BW | F.linear same dtype GB/s | F.linear % BW |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            # Every contender has copies of its own (F.linear f32 and F.linear on float32 read
            # the same values, but must not read the same memory: the second would hit cache).
            layers = weight_copies(out_f, in_f, rotation, compressed_layer(dtype))
            dense_same = weight_copies(out_f, in_f, rotation, lambda w, dtype=dtype: w.to(dtype))
            dense_f32 = weight_copies(out_f, in_f, rotation, lambda w: w)
            nbytes, dense_nbytes = layer_bytes(layers[0]), layer_bytes(dense_same[0])
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
                    nm_gbs, dense_gbs, host = nbytes / nm[0] / 1e9, dense_nbytes / same[0] / 1e9, bandwidth[threads]
                    print(
                        f"| ({out_f}, {in_f}) | {name} | {batch} | {threads} | {nm[0] * 1e3:.3f} "
                        f"[{nm[1] * 1e3:.3f}-{nm[2] * 1e3:.3f}] | {same[0] * 1e3:.3f} | {f32[0] * 1e3:.3f} "
                        f"| **{same[0] / nm[0]:.2f}x** | {f32[0] / nm[0]:.2f}x | {nm_gbs:.1f} | {100 * nm_gbs / host:.0f} % "
                        f"| {dense_gbs:.1f} | {100 * dense_gbs / host:.0f} % |",
                        flush=True,
                    )
            del dense_same, dense_f32, layers


def int8_section(rounds: int, threads_list, shapes, bandwidth: dict) -> None:
    """int8 2:4 (``compress(model, dtype=torch.int8)``'s layers) against the 2:4 layer with
    bfloat16 values and against dense float32 ``F.linear``, batch 1 and 4."""
    rotation = rotation_bytes()
    print(
        f"\n## Layers: int8 2:4 vs bf16 2:4 and dense f32 (medians of {rounds} interleaved rounds, ms; each "
        f"contender cycles through {rotation_note()})\n"
    )
    print(
        "int8 2:4: int8 values with a float32 scale per output row, 2-bit positions (0.625 bytes per dense weight); "
        "activations f32 (the int8 row's own) or bf16 (both 2:4 rows get the same bf16 input).\n"
    )
    print(
        "| shape (out, in) | activations | batch | threads | int8 2:4 ms | bf16 2:4 ms | F.linear f32 ms "
        "| vs bf16 2:4 | vs F.linear f32 | int8 GB/s | int8 % BW |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        q8 = weight_copies(out_f, in_f, rotation, compressed_layer(torch.int8))
        b16 = weight_copies(out_f, in_f, rotation, compressed_layer(torch.bfloat16))
        f32 = weight_copies(out_f, in_f, rotation, lambda w: w)
        nbytes = layer_bytes(q8[0])
        for act in (torch.float32, torch.bfloat16):
            for batch in (1, 4):
                x32 = torch.randn(batch, in_f)
                x = x32.to(act)
                xb = x32.to(torch.bfloat16)
                for threads in threads_list:
                    torch.set_num_threads(threads)
                    with torch.no_grad():
                        med = interleaved(
                            {
                                "q8": Rotating(q8, lambda layer, x=x: layer(x)),
                                "b16": Rotating(b16, lambda layer, xb=xb: layer(xb)),
                                "f32": Rotating(f32, lambda w, x32=x32: F.linear(x32, w)),
                            },
                            rounds,
                        )
                    q, b, d = med["q8"][0], med["b16"][0], med["f32"][0]
                    gbs = nbytes / q / 1e9
                    print(
                        f"| ({out_f}, {in_f}) | {'f32' if act == torch.float32 else 'bf16'} | {batch} | {threads} "
                        f"| {q * 1e3:.3f} | {b * 1e3:.3f} | {d * 1e3:.3f} | **{b / q:.2f}x** | **{d / q:.2f}x** "
                        f"| {gbs:.1f} | {100 * gbs / bandwidth[threads]:.0f} % |",
                        flush=True,
                    )
        del q8, b16, f32


def crossover_section(rounds: int, threads_list, shape=(4096, 4096)) -> None:
    """Where 2:4 stops paying: the compressed layer against ``F.linear`` on the activations'
    dtype at batches 1 to 512 on one shape (the operator runs its kernels at every batch):
    float32 and bfloat16 2:4 layers, and int8 2:4 with bfloat16 activations against dense
    bfloat16 (a prompt's prefill in an int8 model)."""
    rotation = rotation_bytes()
    out_f, in_f = shape
    print(
        f"\n## Crossover: ({out_f}, {in_f}), compressed 2:4 vs F.linear by batch (medians of {rounds} "
        f"interleaved rounds; each contender cycles through {rotation_note()})\n"
    )
    print("| dtype | threads | batch | compressed ms | F.linear ms | compressed vs F.linear |")
    print("|---|---|---|---|---|---|")
    runs = (
        ("f32", torch.float32, torch.float32),
        ("bf16", torch.bfloat16, torch.bfloat16),
        ("int8 (bf16 act.)", torch.int8, torch.bfloat16),
    )
    for name, values, dtype in runs:
        layers = weight_copies(out_f, in_f, rotation, compressed_layer(values))
        dense = weight_copies(out_f, in_f, rotation, lambda w, dtype=dtype: w.to(dtype))
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch in (1, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512):
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
                print(f"| {name} | {threads} | {batch} | {k * 1e3:.3f} | {d * 1e3:.3f} | **{d / k:.2f}x** |", flush=True)
        del dense, layers


def e2e_child(kind: str, dtype_name: str, compressed, new_tokens: int, threads: int) -> dict:
    """One decoding measurement (run in its own process so that peak memory is its own).
    ``compressed``: False (dense), True (2:4 values in the model's dtype) or ``"int8"`` (int8
    2:4 values with per-row scales; activations stay in the model's dtype)."""
    torch.set_num_threads(threads)
    model, params, prompt = build_model(kind, dtype_name)
    weight_bytes = bytes_per_weight = None
    if compressed:
        if compressed == "int8":
            dtype = model.dtype
            report = cast_rs.compress(model, dtype=torch.int8)
            model.to(dtype)  # the activations (and bias) in the model's dtype; the int8 values stay
        else:
            report = cast_rs.compress(model)
        weight_bytes = (report.dense_bytes, report.compressed_bytes)
        bytes_per_weight = report.bytes_per_weight
    # Peak memory of the decoding itself: the dense weights the conversion started from are
    # freed, then the peak counter is reset.
    reset_peak_rss()
    with torch.no_grad():
        greedy(model, prompt, 4)  # warm-up
        t0 = time.perf_counter()
        out = greedy(model, prompt, new_tokens)  # the prompt's pass (prefill) included, as in llama.cpp's rows
        dt = time.perf_counter() - t0
    assert out.shape[1] == PROMPT_TOKENS + new_tokens
    return dict(
        params=params,
        tokens_per_s=new_tokens / dt,
        peak_rss=peak_rss(),
        weight_bytes=weight_bytes,
        bytes_per_weight=bytes_per_weight,
        prompt=prompt[0].tolist(),
        tokens=out[0, PROMPT_TOKENS:].tolist(),
    )


def run_child(args: list, what: str) -> dict:
    """``python <args>`` in a child process; its last stdout line, parsed as JSON."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def e2e_section(kinds, new_tokens: int, threads: int, results: dict | None = None) -> dict:
    """The PyTorch table; returns the measurements by (kind, dtype name, compressed)."""
    results = {} if results is None else results
    print(
        f"\n## End to end: greedy decoding with a KV cache ({PROMPT_TOKENS}-token prompt, {new_tokens} new tokens, "
        f"{threads} threads), random weights pruned to 2:4\n"
    )
    print(
        "| model | dtype | dense tok/s | compressed tok/s | speed-up | dense peak RSS | compressed peak RSS "
        "| converted layers' bytes (compressed / dense) | int8 2:4 tok/s | int8 speed-up | int8 peak RSS "
        "| int8 bytes / dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        for dtype_name in ("f32", "bf16"):
            res = {}
            for compressed in (False, True, "int8"):
                spec = json.dumps([kind, dtype_name, compressed, new_tokens, threads])
                res[compressed] = run_child([__file__, "--child", spec], f"child {kind} {dtype_name} compressed={compressed}")
                results[kind, dtype_name, compressed] = res[compressed]
            d, c, q = res[False], res[True], res["int8"]
            dense_b, comp_b = c["weight_bytes"]
            label = f"{kind} ({d['params'] / 1e6:.0f} M)"
            print(
                f"| {label} | {dtype_name} | {d['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} "
                f"| **{c['tokens_per_s'] / d['tokens_per_s']:.2f}x** | {d['peak_rss'] / 2**30:.2f} GiB "
                f"| {c['peak_rss'] / 2**30:.2f} GiB | {comp_b / dense_b:.3f} | {q['tokens_per_s']:.1f} "
                f"| **{q['tokens_per_s'] / d['tokens_per_s']:.2f}x** | {q['peak_rss'] / 2**30:.2f} GiB "
                f"| {q['weight_bytes'][1] / q['weight_bytes'][0]:.3f} |",
                flush=True,
            )
    return results


def llamacpp_section(kind: str, new_tokens: int, threads: int, results: dict) -> None:
    """llama.cpp (llama-cpp-python) on the same weights as the PyTorch rows: first a check on a
    two-layer Llama that its greedy tokens equal PyTorch's (fails loudly otherwise), then the
    model as F32, BF16 and Q8_0 GGUF files (benchmarks/gguf_export.py; a temporary directory,
    deleted after), each timed in its own process like e2e_child."""
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    export = os.path.join(here, "gguf_export.py")
    import gguf_export

    chk = run_child([export, "check", "16"], "the llama.cpp equivalence check")
    print(
        f"\nllama.cpp equivalence check (2-layer Llama, width 512, 8 heads sharing 1 key/value head, float32, "
        f"same random 2:4 weights and prompt ids): "
        f"greedy tokens {len(chk['llama_cpp'])}/{len(chk['pytorch'])} equal to PyTorch's; "
        f"largest |logit difference| after the prompt {chk['max_logit_diff']:.1e} with llama.cpp's float16 KV cache "
        f"(as timed), {chk['max_logit_diff_f32_kv']:.1e} with a float32 one (largest |logit| {chk['max_logit']:.2f})"
    )
    for dtype_name in ("f32", "bf16"):
        for compressed in (False, True, "int8"):  # every PyTorch row of the table below
            if (kind, dtype_name, compressed) not in results:
                spec = json.dumps([kind, dtype_name, compressed, new_tokens, threads])
                results[kind, dtype_name, compressed] = run_child(
                    [__file__, "--child", spec], f"child {kind} {dtype_name} compressed={compressed}"
                )
    rows = {}
    with tempfile.TemporaryDirectory(prefix="cast_rs_gguf_") as tmp:
        t0 = time.perf_counter()
        files = run_child([export, "write", kind, tmp], f"writing {kind} as GGUF")
        written = time.perf_counter() - t0
        if files["prompt"] != results[kind, "f32", False]["prompt"]:
            raise SystemExit("the GGUF export's prompt ids differ from the PyTorch run's")
        for ftype in ("F32", "BF16", "Q8_0"):
            spec = [files["paths"][ftype], files["prompt"], new_tokens, threads]
            try:
                rows[ftype] = run_child([export, "time", json.dumps(spec)], f"llama.cpp {ftype}")
            except SystemExit as e:
                # llama.cpp's repacked CPU-specific kernels (its AMX matrix product for Q8_0 on
                # AMX CPUs) can crash where its plain ones run: measure those, and say so.
                print(f"{e}; timed again with llama.cpp's extra buffer types off", file=sys.stderr, flush=True)
                rows[ftype] = run_child([export, "time", json.dumps(spec + [False])], f"llama.cpp {ftype}")
                rows[ftype]["fallback"] = str(e)
            os.remove(files["paths"][ftype])
    params = results[kind, "f32", False]["params"]

    def same_tokens(tokens: list, ref: list) -> str:
        k = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
        return f"{k}/{len(ref)}" if k == len(ref) else f"first {k}/{len(ref)}"

    print(
        f"\n## Side by side with llama.cpp: {kind} ({params / 1e6:.0f} M), the same random 2:4 weights and prompt ids "
        f"({PROMPT_TOKENS}-token prompt, {new_tokens} new tokens, {threads} threads, greedy)\n"
    )
    print(
        "| runtime | weights | bytes per weight | tok/s | vs PyTorch dense f32 | peak RSS "
        "| greedy tokens equal to PyTorch dense (f32 for Q8_0) |"
    )
    print("|---|---|---|---|---|---|---|")
    base = results[kind, "f32", False]["tokens_per_s"]
    for dtype_name, ftype in (("f32", "F32"), ("bf16", "BF16"), (None, "Q8_0")):
        ref = results[kind, dtype_name or "f32", False]["tokens"]
        if dtype_name:
            for compressed in (False, True, "int8"):
                r = results[kind, dtype_name, compressed]
                bpw = r["bytes_per_weight"] if compressed else (4.0 if dtype_name == "f32" else 2.0)
                name = {False: "PyTorch dense", True: "cast_rs 2:4 (compress)", "int8": "cast_rs int8 2:4"}[compressed]
                weights = f"int8, {dtype_name} activations" if compressed == "int8" else dtype_name
                print(
                    f"| {name} | {weights} | {bpw:.4g} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x "
                    f"| {r['peak_rss'] / 2**30:.2f} GiB | {same_tokens(r['tokens'], ref)} |"
                )
        r = rows[ftype]
        note = " (extra buffer types off)" if "fallback" in r else ""
        print(
            f"| llama.cpp | {ftype} GGUF{note} | {gguf_export.BYTES_PER_WEIGHT[ftype]:.4g} | {r['tokens_per_s']:.1f} "
            f"| {r['tokens_per_s'] / base:.2f}x | {r['peak_rss'] / 2**30:.2f} GiB | {same_tokens(r['tokens'], ref)} |",
            flush=True,
        )
    for r in rows.values():
        if "fallback" in r:
            print(
                f"\n{r['fallback']} with its default settings (on AMX CPUs a crash in its AMX "
                f"matrix product, ggml_backend_amx_mul_mat); the row is llama.cpp with use_extra_bufts=False, its "
                f"weights as stored and its AVX-512 kernels instead of the repacked ones."
            )
    sizes = ", ".join(f"{t} {n / 2**30:.2f} GiB" for t, n in files["sizes"].items())
    print(
        "\ngreedy tokens equal: random weights give logits with tiny margins, so a greedy path leaves the "
        "reference at the first small numerical difference (llama.cpp keeps its KV cache in float16; bfloat16 and "
        "Q8_0 round differently); the check above, not this column, is the evidence that the models compute the "
        "same function."
    )
    print(
        f"\nbytes per weight: storage of the linear layers' weights (cast_rs: the compress report's, values and "
        f"positions; Q8_0: 32 int8 + one fp16 scale per 32). GGUF files ({sizes}) written in {written:.0f} s, "
        f"deleted after. llama-cpp-python {rows['F32']['version']}: {rows['F32']['system_info']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", action="store_true", help="only the layer table")
    ap.add_argument("--e2e", action="store_true", help="only the end-to-end table")
    ap.add_argument(
        "--crossover",
        action="store_true",
        help="only the crossover table (batches 1-512 on (4096, 4096): where the kernel stops paying)",
    )
    ap.add_argument(
        "--llamacpp",
        action="store_true",
        help="with the end-to-end table, llama.cpp (llama-cpp-python; ./run installs it) on the same weights "
        "as F32, BF16 and Q8_0 GGUF files",
    )
    ap.add_argument(
        "--llc-mib",
        type=float,
        default=None,
        help="the last-level cache size in MiB, where the OS does not tell it (sysfs, getconf, lscpu)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: few rounds, small shapes and model")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per layer row (default 30)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per decoding run (default 64)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(e2e_child(*json.loads(a.child))))
        return
    if a.llc_mib is not None:
        if not a.llc_mib > 0:
            raise SystemExit(f"--llc-mib: expected a size in MiB > 0, got {a.llc_mib}")
        set_llc_mib(a.llc_mib)
    all_threads = os.cpu_count() or 1
    threads_list = sorted({1, torch.get_num_threads(), all_threads})
    print(f"torch {torch.__version__}, cast-rs {cast_rs.__version__}, {all_threads} CPUs")
    print_host(host_info())
    both = not (a.layers or a.e2e or a.crossover)
    if a.layers or a.crossover or both:
        known_llc()  # refuse before any work when the cache size is unknown
    # The read bandwidth is the layer tables' reference, and context for the others where the
    # cache size (its buffer's floor) is known.
    bandwidth = bandwidth_section(threads_list) if (a.layers or both or llc_bytes()[0]) else {}
    if a.layers or both:
        shapes = SHAPES[3:] if a.quick else SHAPES
        layer_section(a.rounds or (5 if a.quick else 30), threads_list, shapes, bandwidth)
        int8_section(a.rounds or (5 if a.quick else 30), threads_list, shapes, bandwidth)
    if a.crossover or both:
        crossover_section(a.rounds or (3 if a.quick else 15), threads_list, (768, 3072) if a.quick else (4096, 4096))
    if a.e2e or both:
        new_tokens = a.tokens or (8 if a.quick else 64)
        results = e2e_section(["gpt2"] if a.quick else ["gpt2", "llama"], new_tokens, all_threads)
        if a.llamacpp:  # the quick run: the two-layer Llama instead of the 1.1 B one
            llamacpp_section("llama_small" if a.quick else "llama", new_tokens, all_threads, results)


if __name__ == "__main__":
    main()
