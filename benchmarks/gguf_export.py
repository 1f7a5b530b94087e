"""llama.cpp beside cast_rs (bench_inference.py --llamacpp): the end-to-end model written as GGUF
with the ``gguf`` package, and llama.cpp (``llama-cpp-python``) decoding it.

Not a benchmark of its own; bench_inference.py runs each step in a child process:

    python benchmarks/gguf_export.py write KIND DIR   # F32, BF16 and Q8_0 GGUF files of the model
    python benchmarks/gguf_export.py check N          # llama.cpp's greedy tokens == PyTorch's (small Llama)
    python benchmarks/gguf_export.py time SPEC        # one llama.cpp decoding measurement (imports no torch)

The model is built exactly as bench_inference.e2e_child builds it (seed 0, random weights, pruned
to 2:4 by magnitude; the F32 file from the float32 model, the BF16 file from the bfloat16 one,
Q8_0 quantized from the F32 file by llama.cpp's own llama_model_quantize). The query and key
projections are permuted as llama.cpp's convert_hf_to_gguf.py does for Hugging Face Llama
checkpoints (LlamaModel.permute: llama.cpp rotates adjacent pairs, Hugging Face rotates the two
halves of each head). There is no real tokenizer: the vocabulary is a stand-in of 32000 tokens
(<unk>, <s>, </s>, the 256 byte tokens, then dummies); token ids are fed directly.
"""

from __future__ import annotations

import json
import os
import sys
import time

from _rss import peak_rss, reset_peak_rss  # benchmarks/ is on sys.path when run; imports no torch

# llama_ftype values (llama.h) and their storage per weight
FTYPES = {"F32": 0, "BF16": 32, "Q8_0": 7}
BYTES_PER_WEIGHT = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32}  # Q8_0: 32 int8 and one fp16 scale per block
EOS_ID = 2


def permute(w, n_head: int, n_head_kv: int | None):
    """convert_hf_to_gguf.py's LlamaModel.permute (q: n_head, n_head; k: n_head, n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stand_in_vocab(n: int):
    """SentencePiece-style tokens, scores and types: <unk>, <s>, </s>, <0x00>..<0xFF>, dummies."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"tok{i}" for i in range(len(tokens), n)]
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(n - 259)]
    return tokens[:n], scores[:n], types[:n]


def write_gguf(model, path: str, ftype: str) -> None:
    """A Hugging Face LlamaForCausalLM (float32 or bfloat16) as a GGUF file of ``ftype`` "F32"
    or "BF16" (1-D norm weights float32, as llama.cpp's converter keeps them)."""
    import gguf
    import torch

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    assert rope.get("rope_type", "default") == "default", rope

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("cast-rs bench Llama (random 2:4 weights)")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FTYPES[ftype])
    tokens, scores, types = stand_in_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if t.dim() == 1 or ftype == "F32":
            w.add_tensor(name, t.float().numpy())
        else:  # BF16: the bits as they are (uint8 bytes; the writer derives the shape)
            w.add_tensor(name, t.to(torch.bfloat16).view(torch.uint8).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)

    m = model.model
    add("token_embd.weight", m.embed_tokens.weight)
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.attn_q.weight", permute(a.q_proj.weight.detach(), n_head, n_head))
        add(f"blk.{i}.attn_k.weight", permute(a.k_proj.weight.detach(), n_head, n_kv))
        add(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        add(f"blk.{i}.ffn_gate.weight", f.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", f.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", f.down_proj.weight)
    add("output_norm.weight", m.norm.weight)
    add("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q8_0(src: str, dst: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, the llama-quantize tool's code) to Q8_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = FTYPES["Q8_0"]
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> Q8_0) returned {rc}")


def write_all(kind: str, out_dir: str) -> dict:
    """F32 and Q8_0 files from the float32 model, BF16 from the bfloat16 one (each built as
    e2e_child builds it). Returns the paths, the prompt and the weights' count."""
    import gc

    from _e2e_models import build_model  # benchmarks/ is on sys.path when run

    paths = {t: os.path.join(out_dir, f"{kind}-{t}.gguf") for t in FTYPES}
    model, params, prompt = build_model(kind, "f32")
    write_gguf(model, paths["F32"], "F32")
    del model
    gc.collect()
    quantize_q8_0(paths["F32"], paths["Q8_0"])
    model, _, prompt_bf16 = build_model(kind, "bf16")
    assert prompt_bf16.tolist() == prompt.tolist()
    write_gguf(model, paths["BF16"], "BF16")
    return dict(paths=paths, prompt=prompt[0].tolist(), params=params, sizes={t: os.path.getsize(p) for t, p in paths.items()})


def llama_greedy(llm, prompt: list, new_tokens: int) -> list:
    """Greedy decoding through llama-cpp-python's low-level eval: the prompt in one batch, then
    one token at a time; argmax of the last logits with the end-of-sequence token suppressed
    (as Hugging Face's min_new_tokens does on the PyTorch side). ``new_tokens`` tokens from the
    prompt's pass and new_tokens - 1 single-token passes, as Hugging Face's generate."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()
    llm.reset()  # n_tokens = 0: eval drops the KV cache from there, the prompt is computed again
    llm.eval(prompt)
    out = []
    for i in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()
        logits[EOS_ID] = -np.inf
        tok = int(np.argmax(logits))
        out.append(tok)
        if i < new_tokens - 1:
            llm.eval([tok])
    return out


def load_llama(path: str, threads: int, n_ctx: int, extra_bufts: bool = True, **kw):
    """llama.cpp on all ``threads`` (prompt and generation), weights read into memory (no mmap,
    so that they count in the resident set as PyTorch's do), batches up to 32 tokens, its
    default float16 KV cache. ``extra_bufts=False``: llama.cpp's ``use_extra_bufts`` off, so it
    keeps the weights as stored instead of repacking them for its CPU-specific kernels (on AMX
    CPUs its AMX matrix product for Q8_0); llama-cpp-python's ``Llama`` takes no such argument,
    so its default model parameters are patched for the load."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if not extra_bufts:
        defaults = lib.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_bufts
    return Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=32,
        n_ubatch=32,
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=False,
        logits_all=False,
        verbose=False,
        **kw,
    )


def time_child(path: str, prompt: list, new_tokens: int, threads: int, extra_bufts: bool = True) -> dict:
    """One llama.cpp measurement, as e2e_child's: load, trim and reset the peak-RSS counter,
    a 4-token warm-up, then ``new_tokens`` timed (prompt pass included)."""
    import llama_cpp

    llm = load_llama(path, threads, n_ctx=max(256, len(prompt) + new_tokens + 16), extra_bufts=extra_bufts)
    reset_peak_rss()
    llama_greedy(llm, prompt, 4)  # warm-up
    t0 = time.perf_counter()
    tokens = llama_greedy(llm, prompt, new_tokens)
    dt = time.perf_counter() - t0
    return dict(
        tokens_per_s=new_tokens / dt,
        peak_rss=peak_rss(),
        tokens=tokens,
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        version=llama_cpp.__version__,
    )


def last_logits(llm, prompt: list):
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()


def check(new_tokens: int) -> dict:
    """The small Llama (_e2e_models.llama_small_config) in float32: PyTorch's greedy tokens
    and llama.cpp's (as timed: float16 KV cache) on the F32 GGUF file of the same weights, for
    the same prompt ids; also the largest difference of the logits after the prompt, with that
    KV cache and with a float32 one."""
    import tempfile

    import llama_cpp
    import numpy as np
    import torch

    from _e2e_models import build_model, greedy

    model, _, prompt = build_model("llama_small", "f32")
    with torch.no_grad():
        want = greedy(model, prompt, new_tokens)[0, prompt.shape[1] :].tolist()
        ref_logits = model(prompt).logits[0, -1].numpy()
    with tempfile.TemporaryDirectory(prefix="cast_rs_gguf_check_") as tmp:
        path = os.path.join(tmp, "small-F32.gguf")
        write_gguf(model, path, "F32")
        llm = load_llama(path, os.cpu_count() or 1, n_ctx=256)
        got = llama_greedy(llm, prompt[0].tolist(), new_tokens)
        logits = last_logits(llm, prompt[0].tolist())
        del llm
        f32 = llama_cpp.GGML_TYPE_F32
        llm = load_llama(path, os.cpu_count() or 1, n_ctx=256, type_k=f32, type_v=f32)
        logits_f32_kv = last_logits(llm, prompt[0].tolist())
        del llm
    return dict(
        pytorch=want,
        llama_cpp=got,
        max_logit_diff=float(np.abs(logits - ref_logits).max()),
        max_logit_diff_f32_kv=float(np.abs(logits_f32_kv - ref_logits).max()),
        max_logit=float(np.abs(ref_logits).max()),
    )


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "write":
        out = write_all(args[0], args[1])
    elif cmd == "check":
        out = check(int(args[0]))
        if out["pytorch"] != out["llama_cpp"]:
            print(json.dumps(out))
            raise SystemExit("llama.cpp's greedy tokens differ from PyTorch's on the same weights")
    elif cmd == "time":
        out = time_child(*json.loads(args[0]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
