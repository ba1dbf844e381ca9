"""Tiny Qwen2-architecture model configs (grouped-query attention, RMSNorm, SwiGLU, RoPE, tied embeddings)."""

from __future__ import annotations

TINY_CONFIGS = {
    # The embedded default: ~3.4M parameters, trains from scratch on 2 CPU cores.
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=8,
                 num_key_value_heads=4),
    # For unit tests: builds and runs in milliseconds.
    "micro": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2),
}


def qwen2_config(name: str, vocab_size: int, eos_token_id: int, pad_token_id: int, max_positions: int = 1024):
    from transformers import Qwen2Config

    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=max_positions, rope_theta=10000.0,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=eos_token_id,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, **TINY_CONFIGS[name])
