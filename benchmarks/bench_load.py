"""Peak memory while loading a compressed checkpoint: ``./run bench load``.

A Llama-shaped model of about 1.1 B parameters (22 layers, width 2048, MLP 5632, vocabulary
32000; TinyLlama's shape, the same model as ``./run bench inference --e2e``) with random
weights pruned to 2:4 by magnitude is compressed (``cast_rs.compress``) and saved with
``save_pretrained``. A fresh process then imports torch, transformers and cast_rs, records its
resident memory, loads the checkpoint with ``AutoModelForCausalLM.from_pretrained`` and reports
the peak resident memory the load added (``ru_maxrss``, which counts every page the process
touched, the file's mapped pages included). The loaded tensors may still be pages of the mapped
file that nothing has read, so the model then greedily decodes a few tokens (which must be the
ones the saved model decoded), reading every weight, and the peak through that is the figure set
against the checkpoint's size on disk.

Nothing is downloaded; the checkpoint is written to a temporary directory (about 1.3 GB in
bfloat16, 2.4 GB in float32) and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPT = [1, 450, 4996, 17354, 1701, 29916]
NEW_TOKENS = 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_child(directory: str, dtype_name: str) -> None:
    import torch
    from _e2e_models import llama_1b_config
    from transformers import LlamaForCausalLM

    import cast_rs

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_1b_config())
    # Random weights without transformers' per-module init (minutes on one core for 1.1 B).
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.model.rotary_emb.inv_freq.copy_(
            1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
        )
    model.eval()
    cast_rs.baselines.magnitude_prune(model, "2:4")
    report = cast_rs.compress(model)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0].tolist()
    model.save_pretrained(directory)
    json.dump(
        {"tokens": tokens, "dense_bytes": report.dense_bytes, "compressed_bytes": report.compressed_bytes},
        open(os.path.join(directory, "bench_expected.json"), "w"),
    )


def load_child(directory: str) -> None:
    import resource

    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    import cast_rs

    torch.set_num_threads(1)
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = AutoModelForCausalLM.from_pretrained(directory)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = _rss_bytes()
    layers = sum(isinstance(m, cast_rs.NMLinear) for m in model.modules())
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
    largest_layer = max((m.nbytes for m in model.modules() if isinstance(m, cast_rs.NMLinear)), default=0)
    with torch.no_grad():
        tokens = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    peak_decoded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "rss_before": before,
                "peak_added": peak - max(before, peak_before),
                "peak_added_decoded": peak_decoded - max(before, peak_before),
                "rss_added_after": after - before,
                "nm_layers": layers,
                "model_bytes": model_bytes,
                "largest_layer_bytes": largest_layer,
                "tokens": tokens[0].tolist(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", action="append", choices=["bfloat16", "float32"], help="default: both")
    ap.add_argument("--child", nargs=3, metavar=("ROLE", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        role, directory, dtype_name = a.child
        (write_child if role == "write" else load_child)(*((directory, dtype_name) if role == "write" else (directory,)))
        return
    from bench_lora import host

    print(host())
    print(
        "\n| values | checkpoint on disk | model in memory | peak RSS added by from_pretrained | ... and by the first "
        f"{NEW_TOKENS} tokens (every weight read) | ratio to checkpoint | ratio to model + largest layer | same tokens |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for dtype_name in a.dtype or ["bfloat16", "float32"]:
        directory = tempfile.mkdtemp(prefix="cast_rs_bench_load_")
        try:
            subprocess.run([sys.executable, __file__, "--child", "write", directory, dtype_name], check=True, env=env)
            expected = json.load(open(os.path.join(directory, "bench_expected.json")))
            disk = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
            out = subprocess.run(
                [sys.executable, __file__, "--child", "load", directory, dtype_name],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
            got = json.loads(out.stdout.strip().splitlines()[-1])
            gib = 2**30
            print(
                f"| {dtype_name} | {disk / gib:.3f} GiB | {got['model_bytes'] / gib:.3f} GiB | "
                f"{got['peak_added'] / gib:.3f} GiB | {got['peak_added_decoded'] / gib:.3f} GiB | "
                f"**{got['peak_added_decoded'] / disk:.3f}x** | "
                f"{got['peak_added_decoded'] / (got['model_bytes'] + got['largest_layer_bytes']):.3f}x | "
                f"{'yes' if got['tokens'] == expected['tokens'] else 'NO'} |",
                flush=True,
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
