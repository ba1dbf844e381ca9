"""The dense decoder families the Megatron actor and the converters support, and what differs between them.

| family (HF `model_type`) | QKV bias | q/k RMSNorm (per head, before RoPE) | head_dim | RoPE scaling |
|---|---|---|---|---|
| `qwen2` (Qwen2 / Qwen2.5) | yes | no | hidden / heads | none |
| `qwen3` (Qwen3 dense) | no | yes: `self_attn.{q,k}_norm.weight` [head_dim] | explicit (`head_dim`, e.g. 128) | none |
| `llama` (Llama 2, 3, 3.1, 3.2) | no | no | hidden / heads unless given | none, `linear`, `llama3` |

Everything else is shared: RMSNorm (`rms_norm_eps`), SwiGLU MLP without bias, grouped-query attention,
RoPE in the rotate-half layout, tied or untied embeddings. In megatron-core terms: `add_qkv_bias` and
`qk_layernorm` of the TransformerConfig, `kv_channels = head_dim`, and the layer spec built with
`qk_layernorm=True` for Qwen3 (local and TE specs both name the norms `self_attention.q_layernorm.weight` /
`k_layernorm.weight`; they are replicated across tensor-parallel ranks: each rank's heads are whole heads).

RoPE scaling (`rope_config`): HF's `llama3` rule (Llama 3.1 / 3.2) is what megatron-core's
`RotaryEmbedding._apply_scaling` computes, but megatron-core 0.16's `GPTModel` passes it only
`rope_scaling_factor`: `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings` stay at
Llama 3.1's 1, 4 and 8192. A `llama3` config with other values is refused (`megatron_rope_kwargs`) rather than
run with the wrong frequencies. HF's `linear` scaling (inv_freq / factor) is megatron's
`seq_len_interpolation_factor` (positions / factor). Other kinds (yarn, dynamic, longrope, ...) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN2, QWEN3, LLAMA = "qwen2", "qwen3", "llama"


@dataclass(frozen=True)
class Family:
    name: str
    qkv_bias: bool
    qk_layernorm: bool
    hf_config_class: str          # transformers class name
    nemo2_target: str             # NeMo 2.0 model config class


FAMILIES: dict[str, Family] = {
    QWEN2: Family(QWEN2, qkv_bias=True, qk_layernorm=False, hf_config_class="Qwen2Config",
                  nemo2_target="nemo.collections.llm.gpt.model.qwen2.Qwen2Config"),
    QWEN3: Family(QWEN3, qkv_bias=False, qk_layernorm=True, hf_config_class="Qwen3Config",
                  nemo2_target="nemo.collections.llm.gpt.model.qwen3.Qwen3Config"),
    LLAMA: Family(LLAMA, qkv_bias=False, qk_layernorm=False, hf_config_class="LlamaConfig",
                  nemo2_target="nemo.collections.llm.gpt.model.llama.LlamaConfig"),
}
SUPPORTED = tuple(FAMILIES)

# megatron-core 0.16's GPTModel -> RotaryEmbedding(rope_scaling=True, rope_scaling_factor=f) fixes these
MEGATRON_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def family_of(hf_config) -> Family:
    """The family of a HF config (`model_type`; a config without one is taken as Qwen2, as before)."""
    mt = getattr(hf_config, "model_type", None) or QWEN2
    if mt not in FAMILIES:
        raise ValueError(f"model_type {mt!r}: the Megatron builder and the converters support "
                         f"{', '.join(SUPPORTED)} (Qwen2 / Qwen2.5, Qwen3 dense, Llama 2 / 3.x)")
    return FAMILIES[mt]


def check_supported(hf_config) -> Family:
    """Refuse, with the reason, what the Megatron mapping would not compute exactly; returns the family."""
    fam = family_of(hf_config)
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r}: the {fam.name} mapping is SwiGLU (silu)")
    layer_types = getattr(hf_config, "layer_types", None) or []
    if getattr(hf_config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(f"{fam.name} sliding-window attention is not supported by the Megatron mapping")
    if fam.name != QWEN2 and getattr(hf_config, "attention_bias", False):
        raise NotImplementedError(f"{fam.name} with attention_bias=True (biases on q/k/v and o_proj): not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError(f"{fam.name} with mlp_bias=True: not supported")
    if int(getattr(hf_config, "pretraining_tp", 1) or 1) != 1:
        raise NotImplementedError("pretraining_tp != 1 (HF's sliced Llama linear layers): not supported")
    rope_config(hf_config)
    return fam


def rope_config(hf_config) -> tuple[float, dict | None]:
    """(rope_theta, scaling) of a HF config, scaling None or in HF's form {"rope_type": "linear", "factor"} /
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}. transformers 5 keeps everything in `rope_parameters`, 4.x has
    `rope_theta` and `rope_scaling` (`type` in old files)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(merged["factor"])}
    if kind == "llama3":
        orig = merged.get("original_max_position_embeddings") or hf_config.max_position_embeddings
        return theta, {"rope_type": "llama3", "factor": float(merged["factor"]),
                       "low_freq_factor": float(merged["low_freq_factor"]),
                       "high_freq_factor": float(merged["high_freq_factor"]),
                       "original_max_position_embeddings": int(orig)}
    raise NotImplementedError(f"RoPE scaling {kind!r} is not supported (default, linear and llama3 are)")


def megatron_rope_kwargs(hf_config) -> dict:
    """`GPTModel` keyword arguments for the RoPE of a HF config (megatron-core 0.16)."""
    theta, scaling = rope_config(hf_config)
    kw = {"rotary_base": theta}
    if scaling is None:
        return kw
    if scaling["rope_type"] == "linear":
        return {**kw, "seq_len_interpolation_factor": scaling["factor"]}
    other = {k: scaling[k] for k in MEGATRON_LLAMA3_FIXED}
    if other != MEGATRON_LLAMA3_FIXED:
        raise NotImplementedError(
            f"llama3 RoPE scaling with {other}: megatron-core 0.16's GPTModel only passes the factor to its "
            f"RotaryEmbedding, the other fields are fixed at {MEGATRON_LLAMA3_FIXED} (Llama 3.1 / 3.2's values)")
    return {**kw, "rope_scaling": True, "rope_scaling_factor": scaling["factor"]}


def hf_config_class(family: str):
    import transformers

    return getattr(transformers, FAMILIES[family].hf_config_class)
