"""NeMo's own checkpoint formats for Megatron GPT-family models (Qwen2 / Qwen2.5, Qwen3 dense and Llama), read into HF
and written from HF. NeMo is not a dependency: the layouts below were built from NeMo's source and are
read with plain torch (and megatron-core to write the weights).

Formats read (`read_nemo`):

* **NeMo 1.x `.nemo`** (`MegatronGPTModel.save_to`, `NLPSaveRestoreConnector`): a tar (uncompressed, or
  gzip in old files; members named `./...`) or the same tree unpacked in a directory, holding
  `model_config.yaml` (the model section of NeMo's Hydra config: `num_layers`, `hidden_size`,
  `ffn_hidden_size`, `num_attention_heads`, `num_query_groups`, `kv_channels`, `layernorm_epsilon`,
  `rotary_base`, `share_embeddings_and_output_weights`, `override_vocab_size`, `tokenizer`, ...) and
  the weights as either
    - `model_weights/`: a Megatron distributed checkpoint (torch_dist or zarr, see `dist_ckpt`) whose
      keys are `model.` + megatron-core's GPTModel sharded keys (`model.decoder.layers.<name>` stacked
      over layers, `model.embedding.word_embeddings.weight`, ...): TP and PP shards are stored as one
      global tensor per key, so any TP/PP layout reads the same way; or
    - the older per-rank form: `model_weights.ckpt` (TP=PP=1), `mp_rank_{tp:02d}/model_weights.ckpt`
      (PP=1) or `tp_rank_{tp:02d}_pp_rank_{pp:03d}/model_weights.ckpt`, each a `torch.save` of the rank's
      `MegatronGPTModel.state_dict()` (`model.decoder.layers.{local i}.…`, `model.module.` with
      megatron_amp_O2; local-spec or Transformer Engine names; `_extra_state` entries), merged here
      over TP (column / row parallel rules, SwiGLU fc1 halves per rank) and PP (stage layer offsets).
* **NeMo 2.0 checkpoint directory** (`nemo.lightning`: `context/` + `weights/`): `context/model.yaml`
  (`_target_: ...Qwen2Model` / `...Qwen3Model` / `...LlamaModel`, `config:` with megatron TransformerConfig field
  names: `num_layers`, `ffn_hidden_size`, `num_query_groups`, `add_qkv_bias`, `qk_layernorm`, `kv_channels`,
  `rotary_base`, `seq_length` (Qwen3Config: `max_position_embeddings`),
  `share_embeddings_and_output_weights`, Llama 3.1's `scale_factor` / `low_freq_factor` /
  `high_freq_factor` / `old_context_len`, ...), `context/nemo_tokenizer/` (the HF tokenizer files), and
  `weights/` a dist checkpoint whose keys carry `module.` (one per wrapper) instead of `model.`.

Format written (`save_nemo1`): the NeMo 1.x dist-checkpoint `.nemo` (tar of `model_config.yaml`, with the
keys and values NeMo's `convert_qwen2_hf_to_nemo.py` / `convert_llama_hf_to_nemo.py` write, and
`model_weights/`, written by megatron-core's `dist_checkpointing.save` under `model.` keys exactly as
`MegatronGPTModel.sharded_state_dict` names them), plus the tokenizer files as NeMo artifacts
(`<32 hex>_<name>` at the archive root, `nemo:` references in the tokenizer section).

HF <-> Megatron key mapping (NeMo `scripts/checkpoint_converters/convert_{qwen2,llama}_{hf_to_nemo,
nemo_to_hf}.py` and NeMo 2.0 `collections/llm/gpt/model/{qwen2,llama}.py` importers/exporters with
`lightning/io/state.py` `TransformFns.merge_qkv / split_qkv / merge_fc1 / split_fc1 / prune_padding`):

| HF | Megatron (global, TE names) |
|---|---|
| model.embed_tokens.weight | embedding.word_embeddings.weight (rows beyond the HF vocab: padding, pruned) |
| layers.i.input_layernorm.weight | decoder.layers.i.self_attention.linear_qkv.layer_norm_weight |
| self_attn.{q,k,v}_proj.weight (+ .bias: Qwen2) | …self_attention.linear_qkv.{weight,bias}: per query group [q heads, k, v] |
| self_attn.o_proj.weight | …self_attention.linear_proj.weight |
| self_attn.{q,k}_norm.weight (Qwen3) | …self_attention.{q,k}_layernorm.weight |
| layers.i.post_attention_layernorm.weight | decoder.layers.i.mlp.linear_fc1.layer_norm_weight |
| mlp.gate_proj / mlp.up_proj | …mlp.linear_fc1.weight = cat(gate, up) |
| mlp.down_proj.weight | …mlp.linear_fc2.weight |
| model.norm.weight | decoder.final_layernorm.weight |
| lm_head.weight (untied) | output_layer.weight |

The family: `qkv_bias` -> Qwen2, `qk_layernorm` -> Qwen3 (NeMo 2.0's Qwen3Config; a NeMo 1.x model_config.yaml
with `qk_layernorm: true`, no bias and rmsnorm / swiglu is the same architecture), neither -> Llama.

The local layer spec names the two norms `input_layernorm.weight` / `pre_mlp_layernorm.weight` in a
per-rank state dict; they are mapped to the TE names. Every step is a copy, a concatenation or a slice:
NeMo -> HF -> NeMo is bit-exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_sdsearch.core.files import atomic_path
from nemo_sdsearch.models.families import (FAMILIES, LLAMA, QWEN2, QWEN3, check_supported, hf_config_class,
                                              rope_config)
from nemo_sdsearch.models.megatron.hf_mapping import fuse_qkv, split_qkv
MODEL_CONFIG = "model_config.yaml"
MODEL_WEIGHTS = "model_weights"          # NeMo 1.x dist checkpoint directory (ckpt_to_dir("model_weights.ckpt"))
LEGACY_WEIGHTS = "model_weights.ckpt"    # NeMo 1.x per-rank torch.save files
NEMO2_CONTEXT, NEMO2_WEIGHTS, NEMO2_MODEL_YAML = "context", "weights", "model.yaml"
NEMO2_TOKENIZER = "nemo_tokenizer"
NEMO1_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
HF_CONFIG_KEY = "sdsearch_hf_config"     # our addition to model_config.yaml (NeMo ignores unknown keys)
TOKENIZER_FILES_KEY = "sdsearch_files"   # tokenizer file name -> nemo: artifact (our addition)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "tokenizer.model",
                   "generation_config.json")

# global Megatron names (a dist checkpoint's keys without the model./module. prefix, layers unstacked)
EMBED = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER = "decoder.layers."
IN_NORM = "self_attention.linear_qkv.layer_norm_weight"
QKV_W, QKV_B = "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"
PROJ = "self_attention.linear_proj.weight"
Q_NORM, K_NORM = "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
FC1, FC2 = "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"
LOCAL_SPEC_NAMES = {"input_layernorm.weight": IN_NORM, "pre_mlp_layernorm.weight": MLP_NORM}
TE_TO_LOCAL = {v: k for k, v in LOCAL_SPEC_NAMES.items()}
# not weights: fp8 / TE metadata and the RoPE buffer some converters stored
_IGNORED = re.compile(r"(_extra_state$|_extra_state/|rotary_pos_emb\.inv_freq$)")


# --------------------------------------------------------------------------------------------------
# the architecture, and its three spellings (HF config, NeMo 1.x model_config.yaml, NeMo 2.0 model.yaml)
# --------------------------------------------------------------------------------------------------
@dataclass
class GPTSpec:
    """What the weight mapping and the configs need to know about a Qwen2 / Qwen3 / Llama model."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    layernorm_epsilon: float
    rotary_base: float
    max_position_embeddings: int
    tied: bool
    vocab_size: int | None = None          # the HF vocabulary; None: the embedding rows
    init_method_std: float = 0.02
    rope_scaling: dict | None = None       # HF form: {"rope_type": "linear"|"llama3", "factor": ...}
    extra: dict = field(default_factory=dict)  # HF config fields NeMo does not carry (token ids...)

    @property
    def qkv_bias(self) -> bool:
        return FAMILIES[self.family].qkv_bias

    @property
    def qk_layernorm(self) -> bool:
        return FAMILIES[self.family].qk_layernorm

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels


_EXTRA_HF_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def spec_from_hf(hf_config) -> GPTSpec:
    if getattr(hf_config, "model_type", None) is None:
        raise ValueError("a HF config without model_type: NeMo conversion supports qwen2, qwen3 and llama")
    family = check_supported(hf_config).name
    theta, scaling = rope_config(hf_config)
    heads = hf_config.num_attention_heads
    return GPTSpec(
        family=family, num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_channels=int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads),
        layernorm_epsilon=float(hf_config.rms_norm_eps), rotary_base=theta,
        max_position_embeddings=int(hf_config.max_position_embeddings),
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)), vocab_size=hf_config.vocab_size,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)), rope_scaling=scaling,
        extra={k: getattr(hf_config, k) for k in _EXTRA_HF_KEYS if getattr(hf_config, k, None) is not None})


def hf_config_from_spec(spec: GPTSpec, vocab_size: int):
    """A transformers Qwen2Config / Qwen3Config / LlamaConfig (`vocab_size`: the HF vocabulary)."""
    kw = dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
              num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
              num_key_value_heads=spec.num_query_groups, max_position_embeddings=spec.max_position_embeddings,
              rms_norm_eps=spec.layernorm_epsilon, rope_theta=spec.rotary_base, tie_word_embeddings=spec.tied,
              initializer_range=spec.init_method_std, hidden_act="silu", **spec.extra)
    default_hd = spec.hidden_size // spec.num_attention_heads
    if spec.kv_channels != default_hd:
        kw["head_dim"] = spec.kv_channels
    if spec.rope_scaling:
        kw["rope_scaling"] = dict(spec.rope_scaling)
    if spec.family == QWEN2 and spec.rope_scaling:
        raise NotImplementedError("RoPE scaling on a Qwen2-family (qkv_bias) NeMo model")
    if spec.family == QWEN3:
        kw["head_dim"] = spec.kv_channels  # Qwen3Config's default is 128, not hidden / heads
    cls = hf_config_class(spec.family)
    if spec.family == LLAMA:
        return cls(attention_bias=False, mlp_bias=False, **kw)
    return cls(use_sliding_window=False, **kw)


def _check(cond: bool, where, msg: str) -> None:
    if not cond:
        raise NotImplementedError(f"{where}: {msg}")


def spec_from_nemo1(cfg: Mapping, where="model_config.yaml") -> GPTSpec:
    """The architecture of a NeMo 1.x `model_config.yaml` (MegatronGPTModel), with NeMo's defaults for
    absent keys (`megatron_base_model.build_transformer_config` / `megatron_gpt_model.model_provider_func`:
    bias True, qkv_bias False, share_embeddings_and_output_weights True, rotary_base 10000, ...)."""
    def get(key, default=None):
        v = cfg.get(key, default)
        return default if v is None else v

    _check(str(get("normalization", "layernorm")).lower() == "rmsnorm", where,
           f"normalization {cfg.get('normalization')!r} (Qwen2 / Llama use rmsnorm)")
    _check(get("activation", "gelu") in ("fast-swiglu", "swiglu"), where,
           f"activation {cfg.get('activation')!r} (Qwen2 / Llama use fast-swiglu)")
    _check(get("position_embedding_type", "learned_absolute") == "rope", where,
           f"position_embedding_type {cfg.get('position_embedding_type')!r} (rope expected)")
    _check(float(get("rotary_percentage", 1.0)) == 1.0, where, "rotary_percentage != 1")
    _check(not get("rotary_interleaved", False), where, "rotary_interleaved")
    _check(not get("bias", True), where, "bias: true (biases on every linear layer: not Qwen2 / Qwen3 / Llama)")
    qkv_bias, qk_norm = bool(get("qkv_bias", False)), bool(get("qk_layernorm", False))
    _check(not (qkv_bias and qk_norm), where, "qkv_bias and qk_layernorm together (neither Qwen2 nor Qwen3)")
    _check(not get("layernorm_zero_centered_gamma", False), where, "layernorm_zero_centered_gamma")
    _check(not get("num_moe_experts", None), where, "mixture of experts")
    _check(not get("apply_embedding_scaling", False), where, "apply_embedding_scaling (Gemma)")
    _check(get("transformer_block_type", "pre_ln") == "pre_ln", where, "transformer_block_type != pre_ln")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    scaling = None
    if get("seq_len_interpolation_factor", None):
        scaling = {"rope_type": "linear", "factor": float(cfg["seq_len_interpolation_factor"])}
    if get("scale_positional_embedding", False):
        scaling = {"rope_type": "llama3", "factor": float(get("scale_factor", 8)),
                   "low_freq_factor": float(get("low_freq_factor", 1)),
                   "high_freq_factor": float(get("high_freq_factor", 4)),
                   "original_max_position_embeddings": int(get("old_context_len", 8192))}
    return GPTSpec(
        family=QWEN2 if qkv_bias else QWEN3 if qk_norm else LLAMA, num_layers=int(cfg["num_layers"]), hidden_size=hidden,
        ffn_hidden_size=int(cfg["ffn_hidden_size"]), num_attention_heads=heads,
        num_query_groups=int(get("num_query_groups", heads)), kv_channels=int(get("kv_channels", hidden // heads)),
        layernorm_epsilon=float(get("layernorm_epsilon", 1e-5)), rotary_base=float(get("rotary_base", 10000)),
        max_position_embeddings=int(get("max_position_embeddings", get("encoder_seq_length", 2048))),
        tied=bool(get("share_embeddings_and_output_weights", True)),
        vocab_size=int(cfg["override_vocab_size"]) if get("override_vocab_size", None) else None,
        init_method_std=float(get("init_method_std", 0.02)), rope_scaling=scaling)


def _precision(dtype: torch.dtype):
    return {torch.bfloat16: "bf16", torch.float16: 16}.get(dtype, 32)


def nemo1_config(spec: GPTSpec, tp: int, pp: int, dtype: torch.dtype, tokenizer: dict,
                 rows: int, hf_config=None) -> dict:
    """model_config.yaml of a NeMo 1.x MegatronGPTModel: the model section NeMo's HF converters write
    (`examples/nlp/language_modeling/conf/megatron_{qwen2,llama}_config.yaml` with the architecture keys
    set as `convert_{qwen2,llama}_hf_to_nemo.py: load_config` sets them), the vocabulary as
    `override_vocab_size` (the embedding rows, no further padding), `precision` from the weights' dtype."""
    base = 128
    while rows % base:
        base //= 2
    cfg = {
        "mcore_gpt": True,
        "micro_batch_size": 1,
        "global_batch_size": 8,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "encoder_seq_length": spec.max_position_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.ffn_hidden_size,
        "num_attention_heads": spec.num_attention_heads,
        "init_method_std": spec.init_method_std,
        "use_scaled_init_method": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "ffn_dropout": 0.0,
        "kv_channels": None if spec.kv_channels == spec.hidden_size // spec.num_attention_heads else spec.kv_channels,
        "apply_query_key_layer_scaling": False,
        "normalization": "rmsnorm",
        "layernorm_epsilon": spec.layernorm_epsilon,
        "do_layer_norm_weight_decay": False,
        "make_vocab_size_divisible_by": base,
        "pre_process": True,
        "post_process": True,
        "persist_layer_norm": True,
        "bias": False,
        "qkv_bias": spec.qkv_bias,
        "qk_layernorm": spec.qk_layernorm,
        "activation": "fast-swiglu",
        "headscale": False,
        "transformer_block_type": "pre_ln",
        "openai_gelu": False,
        "normalize_attention_scores": True,
        "position_embedding_type": "rope",
        "rotary_percentage": 1.0,
        "rotary_base": spec.rotary_base,
        "attention_type": "multihead",
        "share_embeddings_and_output_weights": spec.tied,
        "num_query_groups": spec.num_query_groups,
        "override_vocab_size": rows,
        "tokenizer": tokenizer,
        "native_amp_init_scale": 4294967296,
        "native_amp_growth_interval": 1000,
        "hysteresis": 2,
        "fp32_residual_connection": False,
        "fp16_lm_cross_entropy": False,
        "megatron_amp_O2": False,
        "grad_allreduce_chunk_size_mb": 125,
        "grad_div_ar_fusion": True,
        "gradient_accumulation_fusion": False,
        "bias_activation_fusion": True,
        "bias_dropout_add_fusion": False,
        "masked_softmax_fusion": True,
        "get_attention_mask_from_fusion": True,
        "apply_rope_fusion": False,
        "seed": 1234,
        "use_cpu_initialization": False,
        "onnx_safe": False,
        "gradient_as_bucket_view": True,
        "sequence_parallel": False,
        "transformer_engine": True,
        "fp8": False,
        "dist_ckpt_format": "torch_dist",
        "precision": _precision(dtype),
        "target": NEMO1_TARGET,
    }
    sc = spec.rope_scaling or {}
    if sc.get("rope_type") == "linear":
        cfg["seq_len_interpolation_factor"] = sc["factor"]
    elif sc.get("rope_type") == "llama3":
        cfg.update(scale_positional_embedding=True, scale_factor=sc["factor"], low_freq_factor=sc["low_freq_factor"],
                   high_freq_factor=sc["high_freq_factor"], old_context_len=sc["original_max_position_embeddings"])
    if hf_config is not None:
        cfg[HF_CONFIG_KEY] = json.loads(hf_config.to_json_string(use_diff=False))
    return cfg


def spec_from_nemo2(model_yaml: Mapping, where="context/model.yaml") -> GPTSpec:
    """The architecture of a NeMo 2.0 `context/model.yaml` (`config:` = the model's GPTConfig dataclass,
    serialized with all its fields)."""
    cfg = model_yaml.get("config") or {}
    target = str(cfg.get("_target_", "")) + " " + str(model_yaml.get("_target_", ""))
    act = cfg.get("activation_func")
    act = act.get("_target_", "") if isinstance(act, Mapping) else str(act or "")

    def get(key, default=None):
        v = cfg.get(key, default)
        return default if v is None else v

    _check(str(get("normalization", "LayerNorm")).lower() == "rmsnorm", where, f"normalization {cfg.get('normalization')!r}")
    _check(bool(get("gated_linear_unit", False)) and act.endswith("silu"), where,
           f"activation {act!r} / gated_linear_unit {cfg.get('gated_linear_unit')!r} (SwiGLU expected)")
    _check(get("position_embedding_type", "rope") == "rope", where, "position_embedding_type != rope")
    _check(float(get("rotary_percent", 1.0)) == 1.0, where, "rotary_percent != 1")
    _check(not get("rotary_interleaved", False), where, "rotary_interleaved")
    _check(not get("add_bias_linear", True), where, "add_bias_linear (biases on every linear layer)")
    _check(not get("layernorm_zero_centered_gamma", False), where, "layernorm_zero_centered_gamma")
    _check(not get("num_moe_experts", None), where, "mixture of experts")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    scaling = None
    if get("seq_len_interpolation_factor", None):
        scaling = {"rope_type": "linear", "factor": float(cfg["seq_len_interpolation_factor"])}
    if "scale_factor" in cfg and "old_context_len" in cfg:   # Llama31Config (NeMo 2.0 applies llama3 scaling)
        scaling = {"rope_type": "llama3", "factor": float(cfg["scale_factor"]),
                   "low_freq_factor": float(get("low_freq_factor", 1.0)),
                   "high_freq_factor": float(get("high_freq_factor", 4.0)),
                   "original_max_position_embeddings": int(get("old_context_len", 8192))}
    qkv_bias, qk_norm = bool(get("add_qkv_bias", False)), bool(get("qk_layernorm", False))
    _check(not (qkv_bias and qk_norm), where, "add_qkv_bias and qk_layernorm together (neither Qwen2 nor Qwen3)")
    family = QWEN2 if qkv_bias else QWEN3 if qk_norm else LLAMA
    low = target.lower()
    if family != QWEN3 and "qwen3" in low:
        raise NotImplementedError(f"{where}: a Qwen3 model without qk_layernorm")
    if family != QWEN2 and "qwen2" in low:
        raise NotImplementedError(f"{where}: a Qwen2 model without add_qkv_bias")
    return GPTSpec(
        family=family, num_layers=int(cfg["num_layers"]), hidden_size=hidden,
        ffn_hidden_size=int(cfg["ffn_hidden_size"]), num_attention_heads=heads,
        num_query_groups=int(get("num_query_groups", heads)), kv_channels=int(get("kv_channels", hidden // heads)),
        layernorm_epsilon=float(get("layernorm_epsilon", 1e-5)), rotary_base=float(get("rotary_base", 10000)),
        max_position_embeddings=int(get("max_position_embeddings", get("seq_length", 2048))),
        tied=bool(get("share_embeddings_and_output_weights", False)),
        vocab_size=int(cfg["vocab_size"]) if get("vocab_size", None) else None,
        init_method_std=float(get("init_method_std", 0.02)), rope_scaling=scaling)


# --------------------------------------------------------------------------------------------------
# HF <-> global Megatron state (TP=1, PP=1, TE names, per-layer keys)
# --------------------------------------------------------------------------------------------------
def _hf(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def hf_to_global(hf_state: Mapping[str, torch.Tensor], spec: GPTSpec, rows: int | None = None) -> dict[str, torch.Tensor]:
    """Global Megatron weights of a HF Qwen2 / Qwen3 / Llama state dict (`rows`: embedding rows, zero-padded)."""
    nh, ng, hd = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels

    def pad(t):
        if rows is None or rows == t.shape[0]:
            return t.clone()
        if rows < t.shape[0]:
            raise ValueError(f"cannot pad {t.shape[0]} vocabulary rows to {rows}")
        return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])

    out = {EMBED: pad(hf_state["model.embed_tokens.weight"])}
    for i in range(spec.num_layers):
        pre, g = f"{LAYER}{i}.", (lambda n, i=i: hf_state[_hf(i, n)])
        out[pre + IN_NORM] = g("input_layernorm.weight").clone()
        out[pre + QKV_W] = fuse_qkv(g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                    g("self_attn.v_proj.weight"), nh, ng, hd)
        if spec.qkv_bias:
            out[pre + QKV_B] = fuse_qkv(g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"),
                                        g("self_attn.v_proj.bias"), nh, ng, hd)
        out[pre + PROJ] = g("self_attn.o_proj.weight").clone()
        if spec.qk_layernorm:
            out[pre + Q_NORM] = g("self_attn.q_norm.weight").clone()
            out[pre + K_NORM] = g("self_attn.k_norm.weight").clone()
        out[pre + MLP_NORM] = g("post_attention_layernorm.weight").clone()
        out[pre + FC1] = torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")], 0)
        out[pre + FC2] = g("mlp.down_proj.weight").clone()
    out[FINAL_NORM] = hf_state["model.norm.weight"].clone()
    if not spec.tied:
        out[OUTPUT] = pad(hf_state["lm_head.weight"])
    return out


def expected_shapes(spec: GPTSpec, rows: int) -> dict[str, tuple[int, ...]]:
    H, F = spec.hidden_size, spec.ffn_hidden_size
    out = {EMBED: (rows, H), FINAL_NORM: (H,)}
    for i in range(spec.num_layers):
        pre = f"{LAYER}{i}."
        out.update({pre + IN_NORM: (H,), pre + QKV_W: (spec.qkv_rows, H), pre + PROJ: (H, spec.num_attention_heads * spec.kv_channels),
                    pre + MLP_NORM: (H,), pre + FC1: (2 * F, H), pre + FC2: (H, F)})
        if spec.qkv_bias:
            out[pre + QKV_B] = (spec.qkv_rows,)
        if spec.qk_layernorm:
            out[pre + Q_NORM] = out[pre + K_NORM] = (spec.kv_channels,)
    if not spec.tied:
        out[OUTPUT] = (rows, H)
    return out


def check_global(state: Mapping[str, torch.Tensor], spec: GPTSpec, where) -> int:
    """Every weight the architecture needs is there with its shape, and nothing else; returns the
    embedding rows."""
    if EMBED not in state:
        raise KeyError(f"{where}: no {EMBED} (keys: {sorted(state)[:6]} ...)")
    rows = state[EMBED].shape[0]
    want = expected_shapes(spec, rows)
    state = dict(state)
    if spec.tied:
        state.pop(OUTPUT, None)  # a pipeline-parallel last stage's copy of the tied embedding
    missing = sorted(set(want) - set(state))
    unknown = sorted(set(state) - set(want))
    if missing or unknown:
        raise KeyError(f"{where}: the weights do not match a {spec.family} model with {spec.num_layers} layers"
                       f"{' (qkv bias)' if spec.qkv_bias else ''}{' (q/k layernorm)' if spec.qk_layernorm else ''}: missing {missing[:4]}, unexpected {unknown[:4]}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{where}: {k} has shape {tuple(state[k].shape)}, the config says {shape}")
    return rows


def global_to_hf(state: Mapping[str, torch.Tensor], spec: GPTSpec, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """HF state dict (in `*ForCausalLM.state_dict()` order, a tied lm_head left out) of global weights."""
    nh, ng, hd = spec.num_attention_heads, spec.num_query_groups, spec.kv_channels
    V = vocab_size or state[EMBED].shape[0]
    out = {"model.embed_tokens.weight": state[EMBED][:V].clone()}
    for i in range(spec.num_layers):
        pre = f"{LAYER}{i}."
        q, k, v = split_qkv(state[pre + QKV_W], nh, ng, hd)
        bias = split_qkv(state[pre + QKV_B], nh, ng, hd) if spec.qkv_bias else None
        for j, name in enumerate("qkv"):
            out[_hf(i, f"self_attn.{name}_proj.weight")] = (q, k, v)[j].clone()
            if bias is not None:
                out[_hf(i, f"self_attn.{name}_proj.bias")] = bias[j].clone()
        out[_hf(i, "self_attn.o_proj.weight")] = state[pre + PROJ].clone()
        if spec.qk_layernorm:
            out[_hf(i, "self_attn.q_norm.weight")] = state[pre + Q_NORM].clone()
            out[_hf(i, "self_attn.k_norm.weight")] = state[pre + K_NORM].clone()
        gate, up = torch.chunk(state[pre + FC1], 2, 0)
        out[_hf(i, "mlp.gate_proj.weight")] = gate.clone()
        out[_hf(i, "mlp.up_proj.weight")] = up.clone()
        out[_hf(i, "mlp.down_proj.weight")] = state[pre + FC2].clone()
        out[_hf(i, "input_layernorm.weight")] = state[pre + IN_NORM].clone()
        out[_hf(i, "post_attention_layernorm.weight")] = state[pre + MLP_NORM].clone()
    out["model.norm.weight"] = state[FINAL_NORM].clone()
    if not spec.tied:
        out["lm_head.weight"] = state[OUTPUT][:V].clone()
    return out


# --------------------------------------------------------------------------------------------------
# per-rank Megatron state dicts (the legacy .nemo form, a live TP x PP model) <-> global
# --------------------------------------------------------------------------------------------------
_COLUMN = (EMBED, OUTPUT, QKV_W, QKV_B)        # split on dim 0
_ROW = (PROJ, FC2)                              # split on dim 1


def _kind(name: str) -> str:
    base = name[len(LAYER):].split(".", 1)[1] if name.startswith(LAYER) else name
    if base == FC1:
        return "fc1"
    if base in _COLUMN:
        return "column"
    if base in _ROW:
        return "row"
    return "replicated"


def stage_layers(num_layers: int, pp: int) -> list[range]:
    if num_layers % pp:
        raise ValueError(f"pp={pp} must divide num_layers={num_layers}")
    n = num_layers // pp
    return [range(p * n, (p + 1) * n) for p in range(pp)]


def split_global(state: Mapping[str, torch.Tensor], spec: GPTSpec, tp: int = 1, pp: int = 1,
                 local_names: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per-rank Megatron state dicts (index pp_rank * tp + tp_rank) of global weights, as megatron-core's
    GPTModel holds them: column-parallel tensors split on dim 0 (each rank's fc1 = cat(its gate slice,
    its up slice)), row-parallel on dim 1, layers renumbered from 0 on every stage, the embedding on the
    first stage, final norm and output layer on the last (with tied embeddings and pp > 1 the last stage
    keeps a copy of the embedding as output_layer.weight). `local_names`: the local spec's norm names."""
    stages = stage_layers(spec.num_layers, pp)
    out = []
    for p in range(pp):
        for t in range(tp):
            rank: dict[str, torch.Tensor] = {}

            def put(name: str, value: torch.Tensor, t: int = t, rank: dict = rank) -> None:
                kind = _kind(name)
                if kind == "column":
                    value = _chunk(value, tp, t, 0)
                elif kind == "row":
                    value = _chunk(value, tp, t, 1)
                elif kind == "fc1":
                    gate, up = torch.chunk(value, 2, 0)
                    value = torch.cat([_chunk(gate, tp, t, 0), _chunk(up, tp, t, 0)])
                else:
                    value = value.clone()
                if local_names and name.startswith(LAYER):
                    idx, rest = name[len(LAYER):].split(".", 1)
                    name = f"{LAYER}{idx}.{TE_TO_LOCAL.get(rest, rest)}"
                rank[name] = value

            if p == 0:
                put(EMBED, state[EMBED])
            for local, i in enumerate(stages[p]):
                for key in [k for k in state if k.startswith(f"{LAYER}{i}.")]:
                    put(f"{LAYER}{local}.{key[len(f'{LAYER}{i}.'):]}", state[key])
            if p == pp - 1:
                put(FINAL_NORM, state[FINAL_NORM])
                if not spec.tied:
                    put(OUTPUT, state[OUTPUT])
                elif pp > 1:
                    put(OUTPUT, state[EMBED])
            out.append(rank)
    return out


def _chunk(t: torch.Tensor, n: int, i: int, dim: int) -> torch.Tensor:
    if t.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {t.shape[dim]} into {n} equal shards")
    return torch.chunk(t, n, dim)[i].clone()


def merge_ranks(ranks: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Global weights of per-rank Megatron state dicts {(tp_rank, pp_rank): state} (prefix already
    removed; local-spec or TE names; `_extra_state` / inv_freq entries dropped). The layer offset of a
    stage is the number of layers of the stages before it."""
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if missing:
        raise FileNotFoundError(f"per-rank weights missing for (tp_rank, pp_rank) {missing}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for p in range(pp):
        shards = [_normalise({k: v for k, v in ranks[(t, p)].items() if not _IGNORED.search(k)}) for t in range(tp)]
        n_layers = len({k[len(LAYER):].split(".", 1)[0] for k in shards[0] if k.startswith(LAYER)})
        for name in shards[0]:
            parts = [s[name] for s in shards]
            kind = _kind(name)
            if kind == "column":
                value = torch.cat(parts, 0)
            elif kind == "row":
                value = torch.cat(parts, 1)
            elif kind == "fc1":
                halves = [torch.chunk(x, 2, 0) for x in parts]
                value = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                value = parts[0]
            if name.startswith(LAYER):
                idx, rest = name[len(LAYER):].split(".", 1)
                name = f"{LAYER}{offset + int(idx)}.{rest}"
            if name in out:
                if name in (EMBED, OUTPUT):  # a tied embedding's copy on another stage: keep the first
                    continue
                raise ValueError(f"{name} appears on more than one pipeline stage")
            out[name] = value
        offset += n_layers
    return out


def _normalise(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith(LAYER):
            idx, rest = k[len(LAYER):].split(".", 1)
            k = f"{LAYER}{idx}.{LOCAL_SPEC_NAMES.get(rest, rest)}"
        out[k] = v
    return out


def _strip_prefix(state: Mapping, where) -> dict[str, torch.Tensor]:
    """Remove NeMo 1.x's `model.` (`model.module.` with megatron_amp_O2) from a per-rank state dict."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):  # a Lightning .ckpt
        state = state["state_dict"]
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            raise NotImplementedError(f"{where}: a pre-megatron-core NeMo GPT checkpoint (model.language_model.*): "
                                      "convert it with NeMo's scripts/checkpoint_converters/convert_gpt_nemo_to_mcore.py first")
        for prefix in ("model.module.", "model."):
            if k.startswith(prefix):
                out[k[len(prefix):]] = v
                break
        else:
            raise KeyError(f"{where}: unexpected key {k!r} (NeMo GPT weights start with 'model.')")
    return out


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
@dataclass
class NemoCheckpoint:
    kind: str                                  # nemo1-dist, nemo1-legacy, nemo2
    hf_config: object
    hf_state: dict[str, torch.Tensor]
    tokenizer_files: list[str]                 # written to the tokenizer directory given to read_nemo
    info: dict = field(default_factory=dict)


def detect(path) -> str | None:
    """'nemo1' (a NeMo 1.x .nemo tar or its unpacked directory), 'nemo2' (a NeMo 2.0 checkpoint
    directory) or None. Our own archives (model_config.yaml with a `format:` tag) are not NeMo's."""
    path = Path(path)
    if path.is_dir():
        if (path / NEMO2_CONTEXT).is_dir() and (path / NEMO2_WEIGHTS).is_dir():
            return "nemo2"
        if (path / MODEL_CONFIG).is_file() and _is_nemo1_config((path / MODEL_CONFIG).read_text()):
            return "nemo1"
        return None
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if _member(m.name) == MODEL_CONFIG:
                    return "nemo1" if _is_nemo1_config(tar.extractfile(m).read().decode()) else None
    return None


def _is_nemo1_config(text: str) -> bool:
    import yaml

    cfg = yaml.safe_load(text)
    return isinstance(cfg, dict) and "format" not in cfg and "num_layers" in cfg


def _member(name: str) -> str:
    return name.removeprefix("./").lstrip("/")


_RANK_DIR = re.compile(r"^(?:mp_rank_(\d{2})|tp_rank_(\d{2})_pp_rank_(\d{3}))/" + re.escape(LEGACY_WEIGHTS) + "$")


def _safe_torch_load(data: bytes | Path, where):
    """torch.load with weights_only (NeMo's `_extra_state` entries are io.BytesIO, allowed explicitly)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # the message names the file and what to do
        raise ValueError(f"{where}: cannot read it with torch.load(weights_only=True) ({e}); it holds more than "
                         "tensors. Load it yourself in a trusted environment.") from e


def read_nemo(path, tokenizer_out=None) -> NemoCheckpoint:
    """A NeMo 1.x `.nemo` (tar or unpacked directory) or a NeMo 2.0 checkpoint directory as a HF config
    and state dict; the tokenizer files found in it are written to `tokenizer_out` (when given)."""
    path = Path(path)
    kind = detect(path)
    if kind == "nemo2":
        return _read_nemo2(path, tokenizer_out)
    if kind != "nemo1":
        raise ValueError(f"{path} is not a NeMo checkpoint (.nemo tar / directory with {MODEL_CONFIG}, or a NeMo 2.0 "
                         f"directory with {NEMO2_CONTEXT}/ and {NEMO2_WEIGHTS}/)")
    if path.is_dir():
        return _read_nemo1_tree(path, path, tokenizer_out)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            for m in members:
                m.name = _member(m.name)
            members = [m for m in members if m.name and not m.name.startswith("..")]
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kw)
        return _read_nemo1_tree(Path(tmp), path, tokenizer_out)


def _read_nemo1_tree(root: Path, where: Path, tokenizer_out) -> NemoCheckpoint:
    import yaml

    from nemo_sdsearch.checkpoint import dist_ckpt

    cfg = yaml.safe_load((root / MODEL_CONFIG).read_text())
    spec = spec_from_nemo1(cfg, f"{where}:{MODEL_CONFIG}")
    weights = root / MODEL_WEIGHTS
    if weights.is_dir() and dist_ckpt.is_dist_checkpoint(weights):
        kind = "nemo1-dist"
        shapes = dist_ckpt.tensor_shapes(weights)
        if any(k.startswith("model.language_model.") for k in shapes):
            raise NotImplementedError(f"{where}: a pre-megatron-core NeMo GPT checkpoint (model.language_model.*)")
        state = _normalise(dist_ckpt.load_model_tensors(weights, "model."))
        state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
    else:
        kind = "nemo1-legacy"
        ranks: dict[tuple[int, int], dict] = {}
        for f in sorted(root.rglob(LEGACY_WEIGHTS)):
            rel = f.relative_to(root).as_posix()
            if rel == LEGACY_WEIGHTS:
                ranks[(0, 0)] = _strip_prefix(_safe_torch_load(f, f"{where}:{rel}"), f"{where}:{rel}")
                continue
            m = _RANK_DIR.match(rel)
            if m:
                t, p = (int(m.group(1)), 0) if m.group(1) is not None else (int(m.group(2)), int(m.group(3)))
                ranks[(t, p)] = _strip_prefix(_safe_torch_load(f, f"{where}:{rel}"), f"{where}:{rel}")
        if not ranks:
            raise FileNotFoundError(f"{where}: neither {MODEL_WEIGHTS}/ (dist checkpoint) nor {LEGACY_WEIGHTS} files")
        state = merge_ranks(ranks)
    rows = check_global(state, spec, where)
    hf_extra = cfg.get(HF_CONFIG_KEY) or {}
    vocab = int(hf_extra.get("vocab_size") or spec.vocab_size or rows)
    spec.extra = {k: hf_extra[k] for k in _EXTRA_HF_KEYS if hf_extra.get(k) is not None}
    tok_files = _nemo1_tokenizer(root, cfg.get("tokenizer") or {}, tokenizer_out)
    if not spec.extra and tok_files:
        spec.extra = _token_ids(tokenizer_out)
    hf_config = hf_config_from_spec(spec, vocab)
    info = {"format": kind, "tp": cfg.get("tensor_model_parallel_size", 1), "pp": cfg.get("pipeline_model_parallel_size", 1),
            "precision": cfg.get("precision"), "family": spec.family}
    return NemoCheckpoint(kind, hf_config, global_to_hf(state, spec, vocab), tok_files, info)


def _artifact(root: Path, ref) -> Path | None:
    if isinstance(ref, str) and ref.startswith("nemo:"):
        f = root / ref[len("nemo:"):]
        return f if f.is_file() else None
    return None


def _nemo1_tokenizer(root: Path, tok: Mapping, out) -> list[str]:
    """Tokenizer files of a NeMo 1.x archive: our file map, else NeMo's artifacts (tokenizer.model,
    vocab_file, merge_file) under their usual names, plus the files of `tokenizer.type` when it names a
    local directory."""
    if out is None:
        return []
    out = Path(out)
    found: dict[str, Path] = {}
    for name, ref in (tok.get(TOKENIZER_FILES_KEY) or {}).items():
        f = _artifact(root, ref)
        if f is not None and "/" not in name:
            found[name] = f
    if not found:
        src = tok.get("type")
        if isinstance(src, str) and Path(src).is_dir():
            found.update({n: Path(src) / n for n in TOKENIZER_FILES if (Path(src) / n).is_file()})
        canonical = {"model": "tokenizer.model", "vocab_file": None, "merge_file": "merges.txt"}
        for key, default_name in canonical.items():
            f = _artifact(root, tok.get(key))
            if f is not None:
                base = f.name.split("_", 1)[1] if re.match(r"^[0-9a-f]{32}_", f.name) else f.name
                found[default_name or base] = f
    for name, f in found.items():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / name)
    return sorted(found)


def _token_ids(tok_dir) -> dict:
    """bos / eos / pad ids of a HF tokenizer directory (for the HF config), best effort."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception:  # noqa: BLE001 - a tokenizer transformers cannot load just gives no ids
        return {}
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def _read_nemo2(path: Path, tokenizer_out) -> NemoCheckpoint:
    import yaml

    from nemo_sdsearch.checkpoint import dist_ckpt

    ctx, weights = path / NEMO2_CONTEXT, path / NEMO2_WEIGHTS
    model_yaml = ctx / NEMO2_MODEL_YAML
    if not model_yaml.is_file():
        raise FileNotFoundError(f"{path}: no {NEMO2_CONTEXT}/{NEMO2_MODEL_YAML} (NeMo 2.0 writes it next to io.json; "
                                "an older checkpoint can be re-saved with NeMo to get one)")
    spec = spec_from_nemo2(yaml.safe_load(model_yaml.read_text()), model_yaml)
    shapes = dist_ckpt.tensor_shapes(weights)
    anchor = next((k for k in shapes if k.endswith(FINAL_NORM)), None)
    if anchor is None:
        raise KeyError(f"{weights}: no {FINAL_NORM} tensor (keys: {sorted(shapes)[:5]} ...)")
    prefix = anchor[:-len(FINAL_NORM)]
    if prefix.replace("module.", ""):
        raise KeyError(f"{weights}: unexpected key prefix {prefix!r} (NeMo 2.0 uses 'module.')")
    state = _normalise(dist_ckpt.load_model_tensors(weights, prefix))
    state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
    rows = check_global(state, spec, path)
    vocab = spec.vocab_size or rows
    tok_files: list[str] = []
    if tokenizer_out is not None:
        for d in (ctx / NEMO2_TOKENIZER, ctx):
            for name in TOKENIZER_FILES:
                if (d / name).is_file() and name not in tok_files:
                    Path(tokenizer_out).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(d / name, Path(tokenizer_out) / name)
                    tok_files.append(name)
        if tok_files:
            spec.extra = _token_ids(tokenizer_out)
    info = {"format": "nemo2", "family": spec.family, "prefix": prefix}
    return NemoCheckpoint("nemo2", hf_config_from_spec(spec, vocab), global_to_hf(state, spec, vocab),
                          sorted(tok_files), info)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _artifact_name(data: bytes, name: str) -> str:
    """NeMo names an artifact `<uuid4 hex (32 chars)>_<file name>`; a content hash keeps ours reproducible."""
    return f"{hashlib.sha256(data).hexdigest()[:32]}_{name}"


def tokenizer_section(tokenizer_src, name_or_path: str | None) -> tuple[dict, dict[str, bytes]]:
    """The `tokenizer:` section of model_config.yaml and the artifact files (name -> bytes) to pack.
    NeMo's HF tokenizers load from `type` (a hub name or a path) with `vocab_file` / `merge_file` /
    `model` artifacts when present; every tokenizer file also goes in as an artifact, listed under
    `sdsearch_files` so that this reader restores the whole HF tokenizer directory."""
    section = {"library": "huggingface", "type": name_or_path, "use_fast": True, "model": None,
               "vocab_file": None, "merge_file": None, "delimiter": None, "sentencepiece_legacy": False}
    files: dict[str, bytes] = {}
    if tokenizer_src is None:
        return section, files
    src = Path(tokenizer_src)
    mapping = {}
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            data = (src / name).read_bytes()
            art = _artifact_name(data, name)
            files[art] = data
            mapping[name] = f"nemo:{art}"
    for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt"), ("model", "tokenizer.model")):
        if name in mapping:
            section[key] = mapping[name]
    if "tokenizer.model" in mapping and "tokenizer.json" not in mapping:
        section.update(library="sentencepiece", type=None)
    section[TOKENIZER_FILES_KEY] = mapping
    return section, files


def pack_nemo(path, root) -> Path:
    """Tar a NeMo 1.x tree as NeMo does (`tarfile.open(path, "w:")`, `tar.add(root, arcname=".")`),
    atomically (a `.partial` file, fsynced, renamed last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, path.name + ".partial") as partial:
        with tarfile.open(partial, "w:") as tar:
            tar.add(str(root), arcname=".")
    return path


def save_nemo1(path, hf_config, hf_state: Mapping[str, torch.Tensor], tokenizer_src=None, tp: int = 1,
               pp: int = 1, tokenizer_name: str | None = None) -> Path:
    """A NeMo 1.x `.nemo` (dist-checkpoint form) of a HF Qwen2 / Qwen3 / Llama model. `tp` / `pp` become
    `tensor_model_parallel_size` / `pipeline_model_parallel_size` (the weights themselves are global: NeMo
    loads them at any layout); the embedding is padded (zero rows) only when `tp` does not divide the
    vocabulary. `tokenizer_name`: what NeMo's `tokenizer.type` names (a hub name or a lasting path; by
    default the HF config's `_name_or_path`); the tokenizer files of `tokenizer_src` go in as artifacts."""
    from nemo_sdsearch.checkpoint import dist_ckpt

    spec = spec_from_hf(hf_config)
    if spec.num_attention_heads % tp or spec.num_query_groups % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={spec.num_attention_heads} and "
                         f"num_query_groups={spec.num_query_groups}")
    stage_layers(spec.num_layers, pp)
    V = hf_config.vocab_size
    rows = V if V % tp == 0 else -(-V // tp) * tp
    state = hf_to_global(hf_state, spec, rows)
    dtype = state[EMBED].dtype
    name = tokenizer_name or getattr(hf_config, "_name_or_path", None) or None
    tok_cfg, artifacts = tokenizer_section(tokenizer_src, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        root = Path(tmp) / "nemo"
        root.mkdir()
        dist_ckpt.save_model(root / MODEL_WEIGHTS, state, "model.", spec.num_layers)
        _write_yaml(root / MODEL_CONFIG, nemo1_config(spec, tp, pp, dtype, tok_cfg, rows, hf_config))
        for art, data in artifacts.items():
            (root / art).write_bytes(data)
        pack_nemo(path, root)
    return path


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))
