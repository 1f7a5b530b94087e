"""The tests' tiny Hugging Face Llama configuration (random init, nothing downloaded)."""


def tiny_llama_config(**overrides):
    """2 layers of width 32 (MLP 64), 4 attention heads sharing 2 key/value heads, a vocabulary
    of 96 and 32 positions; ``overrides`` change any field."""
    import transformers

    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)
