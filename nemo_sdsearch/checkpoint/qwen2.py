"""HF Qwen2 state dict <-> megatron-core GPTModel state dicts, at any tensor / pipeline parallel size.

The Megatron layout (Megatron-Bridge's Qwen2 mapping is the reference; this is our own code):

| HF | Megatron (local spec; TE spec name in brackets) | TP split |
|---|---|---|
| model.embed_tokens.weight [V, H] | embedding.word_embeddings.weight [Vp/tp, H] | rows padded V -> Vp with zeros, split on dim 0 |
| layers.i.input_layernorm.weight | decoder.layers.i.input_layernorm.weight [self_attention.linear_qkv.layer_norm_weight] | replicated |
| self_attn.{q,k,v}_proj.{weight,bias} | self_attention.linear_qkv.{weight,bias} | fused per query group (below), split on dim 0 |
| self_attn.o_proj.weight | self_attention.linear_proj.weight | dim 1 (row parallel) |
| layers.i.post_attention_layernorm.weight | decoder.layers.i.pre_mlp_layernorm.weight [mlp.linear_fc1.layer_norm_weight] | replicated |
| mlp.gate_proj / mlp.up_proj | mlp.linear_fc1.weight | per rank: cat(gate shard, up shard) on dim 0 |
| mlp.down_proj.weight | mlp.linear_fc2.weight | dim 1 (row parallel) |
| model.norm.weight | decoder.final_layernorm.weight | replicated |
| lm_head.weight (untied) | output_layer.weight | padded, dim 0 |

QKV fusion: Megatron's `linear_qkv` output rows are grouped by query group g = 0..G-1 (G = num KV
heads); each group holds its `n_heads/G` query heads, then its key head, then its value head:
`[q_g0_h0, .., q_g0_h{r-1}, k_g0, v_g0, q_g1_h0, ..]`, each `head_dim` rows. Column-parallel
splitting of that tensor into `tp` contiguous chunks gives each rank `G/tp` whole groups, exactly the
heads its attention computes. The QKV bias is fused the same way.

Gate/up fusion: Megatron's SwiGLU splits each rank's local fc1 output in two halves,
`silu(first) * second`, so rank r must hold `cat(gate[r-th slice], up[r-th slice])`; the full (TP=1)
tensor is `cat(gate, up)`. Concatenating first and then chunking would give rank 0 all of gate.

Tied embeddings: with PP=1 the output layer has no weight of its own (the embedding is used); with
PP>1 the last stage keeps a copy in `output_layer.weight` (Megatron keeps the two in sync).

Pipeline stages hold layers `[s*L/pp, (s+1)*L/pp)` renumbered from 0 (even split only). Per-rank lists
are ordered by `rank = pp_rank * tp + tp_rank` (Megatron's default order with data parallel size 1).
`_extra_state` entries (Transformer Engine / fp8 metadata; None in the local spec) are not weights and
are neither produced nor required.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from nemo_sdsearch.models.megatron.builder import (DEFAULT_VOCAB_DIVISOR, ModelLayout, check_qwen2, head_dim,
                                                   layout_for)

HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
MG_EMBED = "embedding.word_embeddings.weight"
MG_NORM = "decoder.final_layernorm.weight"
MG_OUTPUT = "output_layer.weight"


def _mg_layer_names(te: bool) -> dict[str, str]:
    """Megatron names (relative to decoder.layers.i.) for the pieces of one layer."""
    return {
        "input_norm": "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
        "qkv_w": "self_attention.linear_qkv.weight",
        "qkv_b": "self_attention.linear_qkv.bias",
        "proj": "self_attention.linear_proj.weight",
        "mlp_norm": "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
        "fc1": "mlp.linear_fc1.weight",
        "fc2": "mlp.linear_fc2.weight",
    }


def _hf_layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


# --------------------------------------------------------------------------------------------------
# QKV interleave
# --------------------------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_groups: int, hd: int) -> torch.Tensor:
    """HF q/k/v (weights [*, H] or biases [*]) -> Megatron's per-query-group [q.., k, v] layout."""
    rest = q.shape[1:]
    per = n_heads // n_groups
    q = q.reshape(n_groups, per * hd, *rest)
    k = k.reshape(n_groups, hd, *rest)
    v = v.reshape(n_groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(n_groups * (per + 2) * hd, *rest)


def split_qkv(qkv: torch.Tensor, n_heads: int, n_groups: int, hd: int):
    """Inverse of `fuse_qkv` (on the full, TP-gathered tensor)."""
    rest = qkv.shape[1:]
    per = n_heads // n_groups
    x = qkv.reshape(n_groups, (per + 2) * hd, *rest)
    q, k, v = torch.split(x, [per * hd, hd, hd], dim=1)
    return (q.reshape(n_heads * hd, *rest), k.reshape(n_groups * hd, *rest), v.reshape(n_groups * hd, *rest))


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    pad = w.new_zeros((rows - w.shape[0], *w.shape[1:]))
    return torch.cat([w, pad], 0)


def _chunk(t: torch.Tensor, n: int, rank: int, dim: int = 0) -> torch.Tensor:
    if t.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {t.shape[dim]} into {n} equal shards")
    return torch.chunk(t, n, dim=dim)[rank].clone()


# --------------------------------------------------------------------------------------------------
# HF -> Megatron
# --------------------------------------------------------------------------------------------------
def megatron_shard(get: Callable[[str], torch.Tensor], hf_config, layout: ModelLayout, tp_rank: int = 0,
                   pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The Megatron state dict of one (tp_rank, pp_rank), reading HF tensors by name through `get`
    (a dict's `__getitem__`, or a lazy safetensors reader: only the tensors this rank needs are read)."""
    check_qwen2(hf_config)
    tp, pp = layout.tp, layout.pp
    L = hf_config.num_hidden_layers
    if L % pp:
        raise ValueError(f"pp={pp} must divide num_hidden_layers={L}")
    per_stage = L // pp
    nh, ng, hd = hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config)
    names = _mg_layer_names(layout.te_spec)
    out: dict[str, torch.Tensor] = {}
    first, last = pp_rank == 0, pp_rank == pp - 1
    if first:
        out[MG_EMBED] = _chunk(_pad_rows(get(HF_EMBED), layout.padded_vocab_size), tp, tp_rank)
    for local in range(per_stage):
        i = pp_rank * per_stage + local
        pre = f"decoder.layers.{local}."

        def g(name: str, i: int = i) -> torch.Tensor:
            return get(_hf_layer(i, name))

        out[pre + names["input_norm"]] = g("input_layernorm.weight").clone()
        out[pre + names["qkv_w"]] = _chunk(fuse_qkv(g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                                    g("self_attn.v_proj.weight"), nh, ng, hd), tp, tp_rank)
        out[pre + names["qkv_b"]] = _chunk(fuse_qkv(g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"),
                                                    g("self_attn.v_proj.bias"), nh, ng, hd), tp, tp_rank)
        out[pre + names["proj"]] = _chunk(g("self_attn.o_proj.weight"), tp, tp_rank, dim=1)
        out[pre + names["mlp_norm"]] = g("post_attention_layernorm.weight").clone()
        out[pre + names["fc1"]] = torch.cat([_chunk(g("mlp.gate_proj.weight"), tp, tp_rank),
                                             _chunk(g("mlp.up_proj.weight"), tp, tp_rank)], 0)
        out[pre + names["fc2"]] = _chunk(g("mlp.down_proj.weight"), tp, tp_rank, dim=1)
    if last:
        out[MG_NORM] = get(HF_NORM).clone()
        if not layout.tied:
            out[MG_OUTPUT] = _chunk(_pad_rows(get(HF_LM_HEAD), layout.padded_vocab_size), tp, tp_rank)
        elif pp > 1:  # the last stage's copy of the tied embedding
            out[MG_OUTPUT] = _chunk(_pad_rows(get(HF_EMBED), layout.padded_vocab_size), tp, tp_rank)
    return out


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], hf_config, tp: int = 1, pp: int = 1, te: bool = False,
                   vocab_divisor: int = DEFAULT_VOCAB_DIVISOR) -> list[dict[str, torch.Tensor]]:
    """Per-rank Megatron state dicts (index `pp_rank * tp + tp_rank`) of a HF Qwen2 state dict."""
    layout = layout_for(hf_config, tp, pp, te, vocab_divisor)
    return [megatron_shard(hf_state.__getitem__, hf_config, layout, t, p) for p in range(pp) for t in range(tp)]


# --------------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------------
def _is_te(states) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for s in states for k in s)


def merge_stage(tp_states: list[Mapping[str, torch.Tensor]], hf_config, pp_rank: int = 0, pp: int = 1,
                vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """HF tensors of one pipeline stage from its `tp` Megatron shards (layer names made global)."""
    nh, ng, hd = hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config)
    V = vocab_size or hf_config.vocab_size
    L = hf_config.num_hidden_layers
    per_stage = L // pp
    te = _is_te(tp_states)
    names = _mg_layer_names(te)
    s0 = tp_states[0]

    def cat0(key: str) -> torch.Tensor:
        return torch.cat([s[key] for s in tp_states], 0)

    def cat1(key: str) -> torch.Tensor:
        return torch.cat([s[key] for s in tp_states], 1)

    out: dict[str, torch.Tensor] = {}
    if MG_EMBED in s0:
        out[HF_EMBED] = cat0(MG_EMBED)[:V].clone()
    for local in range(per_stage):
        pre = f"decoder.layers.{local}."
        if pre + names["qkv_w"] not in s0:
            raise KeyError(f"stage {pp_rank} has no {pre + names['qkv_w']}: layer count or pp mismatch")
        i = pp_rank * per_stage + local

        def h(name: str, i: int = i) -> str:
            return _hf_layer(i, name)

        out[h("input_layernorm.weight")] = s0[pre + names["input_norm"]].clone()
        for suffix, key in (("weight", names["qkv_w"]), ("bias", names["qkv_b"])):
            q, k, v = split_qkv(cat0(pre + key), nh, ng, hd)
            out[h(f"self_attn.q_proj.{suffix}")] = q.clone()
            out[h(f"self_attn.k_proj.{suffix}")] = k.clone()
            out[h(f"self_attn.v_proj.{suffix}")] = v.clone()
        out[h("self_attn.o_proj.weight")] = cat1(pre + names["proj"])
        out[h("post_attention_layernorm.weight")] = s0[pre + names["mlp_norm"]].clone()
        halves = [torch.chunk(s[pre + names["fc1"]], 2, 0) for s in tp_states]
        out[h("mlp.gate_proj.weight")] = torch.cat([a for a, _ in halves], 0)
        out[h("mlp.up_proj.weight")] = torch.cat([b for _, b in halves], 0)
        out[h("mlp.down_proj.weight")] = cat1(pre + names["fc2"])
    if MG_NORM in s0:
        out[HF_NORM] = s0[MG_NORM].clone()
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        if not tied:
            out[HF_LM_HEAD] = cat0(MG_OUTPUT)[:V].clone()
    return out


def megatron_to_hf(per_rank_states: list[Mapping[str, torch.Tensor]], hf_config, pp: int = 1,
                   include_tied_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """A HF Qwen2 state dict from per-rank Megatron state dicts (index `pp_rank * tp + tp_rank`).
    With tied embeddings `lm_head.weight` is the same tensor as `model.embed_tokens.weight` (as in
    `Qwen2ForCausalLM.state_dict()`), unless `include_tied_lm_head=False` (as `save_pretrained` writes)."""
    check_qwen2(hf_config)
    if len(per_rank_states) % pp:
        raise ValueError(f"{len(per_rank_states)} rank states do not split into pp={pp} stages")
    tp = len(per_rank_states) // pp
    out: dict[str, torch.Tensor] = {}
    for p in range(pp):
        out.update(merge_stage(per_rank_states[p * tp:(p + 1) * tp], hf_config, p, pp))
    if getattr(hf_config, "tie_word_embeddings", False) and include_tied_lm_head:
        out[HF_LM_HEAD] = out[HF_EMBED]
    return _hf_order(out, hf_config)


def _hf_order(state: dict, hf_config) -> dict:
    """Keys in the order `Qwen2ForCausalLM.state_dict()` lists them (deterministic files)."""
    order = [HF_EMBED]
    for i in range(hf_config.num_hidden_layers):
        order += [_hf_layer(i, n) for n in (
            "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
            "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
            "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    order += [HF_NORM, HF_LM_HEAD]
    return {k: state[k] for k in order if k in state}


# --------------------------------------------------------------------------------------------------
# live sharded models (inside an initialised Megatron parallel state)
# --------------------------------------------------------------------------------------------------
def _model_layout(model, hf_config) -> ModelLayout:
    layout = getattr(model, "layout", None)
    if layout is None:
        from megatron.core import parallel_state as ps

        layout = layout_for(hf_config, ps.get_tensor_model_parallel_world_size(),
                            ps.get_pipeline_model_parallel_world_size())
    return layout


def load_hf_into_megatron(model, hf_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor], hf_config) -> None:
    """Copy HF weights into this rank's shard of a live GPTModel (built by `build_gpt_model`)."""
    from megatron.core import parallel_state as ps

    layout = _model_layout(model, hf_config)
    get = hf_state if callable(hf_state) else hf_state.__getitem__
    shard = megatron_shard(get, hf_config, layout, ps.get_tensor_model_parallel_rank(),
                           ps.get_pipeline_model_parallel_rank())
    load_shard(model, shard)


def load_shard(model, shard: Mapping[str, torch.Tensor]) -> None:
    """`load_state_dict` that only tolerates missing `_extra_state` entries and checks shapes."""
    own = model.state_dict()
    for k, v in shard.items():
        if k not in own:
            raise KeyError(f"checkpoint tensor {k} has no place in the model (layer spec or layout mismatch)")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(dict(shard), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"missing {missing}, unexpected {unexpected}")


def local_weights(model) -> dict[str, torch.Tensor]:
    """This rank's Megatron state dict without `_extra_state` entries (detached)."""
    return {k: v.detach() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


def gather_megatron_to_hf(model, hf_config, include_tied_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The full HF state dict of a live sharded GPTModel, on every rank: the TP shards are all-gathered
    (tensor collectives on the TP group), then the pipeline stages are exchanged (object all-gather on
    the PP group, on the CPU)."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    mine = local_weights(model)
    if tp > 1:
        group = ps.get_tensor_model_parallel_group()
        shards: list[dict] = [{} for _ in range(tp)]
        for k, v in mine.items():
            parts = [torch.empty_like(v) for _ in range(tp)]
            torch.distributed.all_gather(parts, v.contiguous(), group=group)
            for r in range(tp):
                shards[r][k] = parts[r]
    else:
        shards = [mine]
    stage = merge_stage(shards, hf_config, ps.get_pipeline_model_parallel_rank(), pp)
    if pp > 1:
        stages = [None] * pp
        torch.distributed.all_gather_object(stages, {k: v.cpu() for k, v in stage.items()},
                                            group=ps.get_pipeline_model_parallel_group())
        device = next(iter(stage.values())).device
        stage = {k: v.to(device) for s in stages for k, v in s.items()}
    if getattr(hf_config, "tie_word_embeddings", False) and include_tied_lm_head:
        stage[HF_LM_HEAD] = stage[HF_EMBED]
    return _hf_order(stage, hf_config)
