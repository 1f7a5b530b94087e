"""The models of the end-to-end decoding runs (bench_inference.py --e2e, and the same weights as
GGUF for llama.cpp in gguf_export.py): their configs, how they are built and how they decode."""

from __future__ import annotations

import torch

import cast_rs


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


def llama_small_config():
    """A two-layer Llama for the llama.cpp equivalence check and the quick run: width 512, the
    1.1 B model's head layout (head size 64, 8 query heads per key/value head), its MLP ratio
    and its 32000-token vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=1,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


PROMPT_TOKENS = 16


def build_model(kind: str, dtype_name: str):
    """The end-to-end model: seed 0, random weights in ``dtype_name``, pruned to 2:4 by
    magnitude; and the prompt, drawn right after (the same ids in every process). Returns
    (model, dense parameter count, prompt [1, PROMPT_TOKENS])."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if dtype_name == "f32" else torch.bfloat16
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    else:
        model = LlamaForCausalLM(llama_1b_config() if kind == "llama" else llama_small_config())
    model = model.to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    cast_rs.baselines.magnitude_prune(model, "2:4")  # every layer sparsify would pick
    prompt = torch.randint(0, 1000, (1, PROMPT_TOKENS))
    return model, params, prompt


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Hugging Face greedy decoding with a KV cache, exactly ``new_tokens`` tokens (the end of
    sequence token is suppressed until then: min_new_tokens)."""
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
