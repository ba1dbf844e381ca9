"""HF state dict <-> megatron-core GPTModel state dicts, at any tensor / pipeline parallel size, for the Qwen2,
Qwen3 and Llama families (`checkpoint.families`; the module keeps its old name, the mapping was Qwen2-only).

The Megatron layout (Megatron-Bridge's Qwen2 / Qwen3 / Llama mappings are the reference; this is our own code):

| HF | Megatron (local spec; TE spec name in brackets) | TP split |
|---|---|---|
| model.embed_tokens.weight [V, H] | embedding.word_embeddings.weight [Vp/tp, H] | rows padded V -> Vp with zeros, split on dim 0 |
| layers.i.input_layernorm.weight | decoder.layers.i.input_layernorm.weight [self_attention.linear_qkv.layer_norm_weight] | replicated |
| self_attn.{q,k,v}_proj.weight (+ .bias: Qwen2) | self_attention.linear_qkv.{weight,bias} | fused per query group (below), split on dim 0 |
| self_attn.o_proj.weight | self_attention.linear_proj.weight | dim 1 (row parallel) |
| self_attn.{q,k}_norm.weight [head_dim] (Qwen3) | self_attention.{q,k}_layernorm.weight (both specs) | replicated |
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

Megatron -> HF goes one HF tensor at a time (`HFTensorSource`): q/k/v and gate/up are cut from each
rank's shard BEFORE the TP concatenation, so a live model streams its weights (`iter_hf_weights`: one
all-gather per tensor, at pp > 1 one broadcast from its stage) without ever assembling the whole model;
the offline conversion (`merge_stage`, `megatron_to_hf`) runs the same per-tensor recipe on saved shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from nemo_sdsearch.models.families import check_supported, family_of
from nemo_sdsearch.models.megatron.builder import DEFAULT_VOCAB_DIVISOR, ModelLayout, head_dim, layout_for

HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
MG_EMBED = "embedding.word_embeddings.weight"
MG_NORM = "decoder.final_layernorm.weight"
MG_OUTPUT = "output_layer.weight"
MG_LAYERS = "decoder.layers."


def unstack_layers(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of a Megatron distributed checkpoint as per-layer state-dict entries. Megatron checkpoints the
    transformer layers stacked: one [num_layers, ...] tensor per weight, `decoder.layers.<rest>` (under TE-style
    names, norms as linear_qkv/linear_fc1.layer_norm_weight, whatever the spec); such a tensor becomes
    `decoder.layers.{i}.<rest>` for every layer i (copies: the stacked tensor can be freed). Any other name (one
    layer's already, or outside the layers) comes back as it is."""
    rest = name[len(MG_LAYERS):]
    if name.startswith(MG_LAYERS) and not rest.split(".")[0].isdigit():
        return {f"{MG_LAYERS}{i}.{rest}": value[i].clone() for i in range(value.shape[0])}
    return {name: value}


def _mg_layer_names(te: bool) -> dict[str, str]:
    """Megatron names (relative to decoder.layers.i.) for the pieces of one layer."""
    return {
        "input_norm": "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
        "qkv_w": "self_attention.linear_qkv.weight",
        "qkv_b": "self_attention.linear_qkv.bias",
        "proj": "self_attention.linear_proj.weight",
        "q_norm": "self_attention.q_layernorm.weight",
        "k_norm": "self_attention.k_layernorm.weight",
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


def _read_chunk(get, name: str, n: int, rank: int, dim: int = 0, rows: int | None = None) -> torch.Tensor:
    """Rank `rank`'s 1/n of HF tensor `name` along `dim` (its rows first zero-padded to `rows` when given). A
    reader with `part`/`shape` (models.weights_reader.SafetensorsReader) reads only that part."""
    if not hasattr(get, "part"):
        t = get(name)
        return _chunk(_pad_rows(t, rows) if rows else t, n, rank, dim)
    shape = get.shape(name)
    size = rows if rows else shape[dim]
    if size % n:
        raise ValueError(f"cannot split dim {dim} of size {size} into {n} equal shards")
    start, stop = rank * (size // n), (rank + 1) * (size // n)
    if not rows:
        return get.part(name, dim, start, stop)
    real = min(stop, shape[0])  # padding rows past the real vocabulary are zeros, never read
    t = get.part(name, 0, min(start, real), real)
    return _pad_rows(t, stop - start) if t.shape[0] < stop - start else t


def _read_qkv(get, names: tuple[str, str, str], nh: int, ng: int, hd: int, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of the fused QKV weight (or bias): its ng/tp whole query groups. A reader with `part`
    reads only those groups' rows of q, k and v."""
    if not hasattr(get, "part"):
        return _chunk(fuse_qkv(*(get(n) for n in names), nh, ng, hd), tp, rank)
    if ng % tp:
        raise ValueError(f"cannot split {ng} query groups into {tp} tensor-parallel shards")
    groups, per = ng // tp, nh // ng
    q = get.part(names[0], 0, rank * groups * per * hd, (rank + 1) * groups * per * hd)
    k, v = (get.part(n, 0, rank * groups * hd, (rank + 1) * groups * hd) for n in names[1:])
    return fuse_qkv(q, k, v, nh // tp, groups, hd)


# --------------------------------------------------------------------------------------------------
# HF -> Megatron
# --------------------------------------------------------------------------------------------------
def megatron_shard(get: Callable[[str], torch.Tensor], hf_config, layout: ModelLayout, tp_rank: int = 0,
                   pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The Megatron state dict of one (tp_rank, pp_rank), reading HF tensors by name through `get`
    (a dict's `__getitem__`, or a safetensors reader with `part`: then only this rank's parts of the tensors it
    needs are read, plus the replicated norm weights)."""
    fam = check_supported(hf_config)
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
        out[MG_EMBED] = _read_chunk(get, HF_EMBED, tp, tp_rank, rows=layout.padded_vocab_size)
    for local in range(per_stage):
        i = pp_rank * per_stage + local
        pre = f"decoder.layers.{local}."

        def g(name: str, i: int = i) -> torch.Tensor:
            return get(_hf_layer(i, name))

        def qkv(kind: str, i: int = i) -> tuple[str, str, str]:
            return tuple(_hf_layer(i, f"self_attn.{x}_proj.{kind}") for x in "qkv")

        def part(name: str, dim: int = 0, i: int = i) -> torch.Tensor:
            return _read_chunk(get, _hf_layer(i, name), tp, tp_rank, dim)

        out[pre + names["input_norm"]] = g("input_layernorm.weight").clone()
        out[pre + names["qkv_w"]] = _read_qkv(get, qkv("weight"), nh, ng, hd, tp, tp_rank)
        if fam.qkv_bias:
            out[pre + names["qkv_b"]] = _read_qkv(get, qkv("bias"), nh, ng, hd, tp, tp_rank)
        out[pre + names["proj"]] = part("self_attn.o_proj.weight", dim=1)
        if fam.qk_layernorm:  # per head, the same on every rank
            out[pre + names["q_norm"]] = g("self_attn.q_norm.weight").clone()
            out[pre + names["k_norm"]] = g("self_attn.k_norm.weight").clone()
        out[pre + names["mlp_norm"]] = g("post_attention_layernorm.weight").clone()
        out[pre + names["fc1"]] = torch.cat([part("mlp.gate_proj.weight"), part("mlp.up_proj.weight")], 0)
        out[pre + names["fc2"]] = part("mlp.down_proj.weight", dim=1)
    if last:
        out[MG_NORM] = get(HF_NORM).clone()
        if not layout.tied:
            out[MG_OUTPUT] = _read_chunk(get, HF_LM_HEAD, tp, tp_rank, rows=layout.padded_vocab_size)
        elif pp > 1:  # the last stage's copy of the tied embedding
            out[MG_OUTPUT] = _read_chunk(get, HF_EMBED, tp, tp_rank, rows=layout.padded_vocab_size)
    return out


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], hf_config, tp: int = 1, pp: int = 1, te: bool = False,
                   vocab_divisor: int = DEFAULT_VOCAB_DIVISOR) -> list[dict[str, torch.Tensor]]:
    """Per-rank Megatron state dicts (index `pp_rank * tp + tp_rank`) of a HF Qwen2 / Qwen3 / Llama state dict."""
    layout = layout_for(hf_config, tp, pp, te, vocab_divisor)
    return [megatron_shard(hf_state.__getitem__, hf_config, layout, t, p) for p in range(pp) for t in range(tp)]


# --------------------------------------------------------------------------------------------------
# Megatron -> HF, one HF tensor at a time
# --------------------------------------------------------------------------------------------------
def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _qkv_part(t: torch.Tensor, j: int, n_heads: int, n_groups: int, hd: int) -> torch.Tensor:
    """q (j=0), k (1) or v (2) rows of a fused QKV shard (its `n_groups` whole query groups)."""
    return split_qkv(t, n_heads, n_groups, hd)[j]


def _fc1_part(t: torch.Tensor, j: int) -> torch.Tensor:
    """gate (j=0) or up (1) rows of a rank's fc1 shard, which is cat(gate slice, up slice)."""
    return torch.chunk(t, 2, 0)[j]


@dataclass(frozen=True)
class HFTensorSource:
    """How one HF tensor is assembled from the TP shards of its pipeline stage: each TP rank contributes
    `part(its Megatron tensor mg_name)`; the parts are concatenated in TP rank order on `dim` (None: the
    tensor is replicated, TP rank 0's part is it), then cut to the first `rows` rows (the vocabulary
    padding). Every step is a view, a concatenation or a slice: the conversion is bit-exact.

    Because each rank's QKV shard holds whole query groups and its fc1 shard is cat(gate slice, up
    slice), q / k / v and gate / up are cut from each shard BEFORE the TP concatenation: one HF tensor
    needs only its own parts, never the whole fused tensor."""

    name: str
    mg_name: str
    part: Callable[[torch.Tensor], torch.Tensor] = _whole
    dim: int | None = None
    rows: int | None = None

    def shape(self, local: torch.Tensor, tp: int) -> tuple[int, ...]:
        """The HF shape, from this rank's Megatron tensor (no data is touched)."""
        shape = list(self.part(local.to("meta")).shape)
        if self.dim is not None:
            shape[self.dim] *= tp
        if self.rows is not None:
            shape[0] = min(shape[0], self.rows)
        return tuple(shape)

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The HF tensor from the TP ranks' parts: a new contiguous tensor (never a view of a shard)."""
        fresh = self.dim is not None and len(parts) > 1
        full = torch.cat(parts, self.dim) if fresh else parts[0]
        if self.rows is not None and self.rows < full.shape[0]:
            full, fresh = full[:self.rows], False
        return full if fresh else full.clone(memory_format=torch.contiguous_format)


def stage_sources(hf_config, tp: int, te: bool, pp_rank: int = 0, pp: int = 1, first: bool = True,
                  last: bool = True, vocab_size: int | None = None) -> list[HFTensorSource]:
    """The HF tensors of one pipeline stage (`first`: it holds the embedding; `last`: the final norm and
    the output layer), in the order `<Family>ForCausalLM.state_dict()` lists them. A tied `lm_head.weight`
    is not among them (it is `model.embed_tokens.weight`, and HF files leave it out)."""
    fam = family_of(hf_config)
    nh, ng, hd = hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim(hf_config)
    if nh % tp or ng % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={nh} and num_key_value_heads={ng}")
    V = vocab_size or hf_config.vocab_size
    per_stage = hf_config.num_hidden_layers // pp
    names = _mg_layer_names(te)
    out: list[HFTensorSource] = []
    if first:
        out.append(HFTensorSource(HF_EMBED, MG_EMBED, dim=0, rows=V))
    for local in range(per_stage):
        i, pre = pp_rank * per_stage + local, f"decoder.layers.{local}."

        def add(hf: str, mg: str, part=_whole, dim: int | None = None, i: int = i, pre: str = pre) -> None:
            out.append(HFTensorSource(_hf_layer(i, hf), pre + names[mg], part, dim))

        for j, proj in enumerate("qkv"):
            part = partial(_qkv_part, j=j, n_heads=nh // tp, n_groups=ng // tp, hd=hd)
            add(f"self_attn.{proj}_proj.weight", "qkv_w", part, 0)
            if fam.qkv_bias:
                add(f"self_attn.{proj}_proj.bias", "qkv_b", part, 0)
        add("self_attn.o_proj.weight", "proj", dim=1)
        if fam.qk_layernorm:
            add("self_attn.q_norm.weight", "q_norm")
            add("self_attn.k_norm.weight", "k_norm")
        add("mlp.gate_proj.weight", "fc1", partial(_fc1_part, j=0), 0)
        add("mlp.up_proj.weight", "fc1", partial(_fc1_part, j=1), 0)
        add("mlp.down_proj.weight", "fc2", dim=1)
        add("input_layernorm.weight", "input_norm")
        add("post_attention_layernorm.weight", "mlp_norm")
    if last:
        out.append(HFTensorSource(HF_NORM, MG_NORM))
        if not getattr(hf_config, "tie_word_embeddings", False):
            out.append(HFTensorSource(HF_LM_HEAD, MG_OUTPUT, dim=0, rows=V))
    return out


def _is_te(states) -> bool:
    return any(k.endswith("linear_qkv.layer_norm_weight") for s in states for k in s)


def _local(state: Mapping[str, torch.Tensor], src: HFTensorSource, pp_rank: int) -> torch.Tensor:
    try:
        return state[src.mg_name]
    except KeyError:
        raise KeyError(f"stage {pp_rank} has no {src.mg_name} (needed for {src.name}): layer count, pp or "
                       "layer spec mismatch") from None


def merge_stage(tp_states: list[Mapping[str, torch.Tensor]], hf_config, pp_rank: int = 0, pp: int = 1,
                vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """HF tensors of one pipeline stage from its `tp` Megatron shards (layer names made global)."""
    s0 = tp_states[0]
    sources = stage_sources(hf_config, len(tp_states), _is_te(tp_states), pp_rank, pp, first=MG_EMBED in s0,
                            last=MG_NORM in s0, vocab_size=vocab_size)
    return {src.name: src.assemble([src.part(_local(s, src, pp_rank))
                                    for s in (tp_states if src.dim is not None else tp_states[:1])])
            for src in sources}


def megatron_to_hf(per_rank_states: list[Mapping[str, torch.Tensor]], hf_config, pp: int = 1,
                   include_tied_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """A HF state dict from per-rank Megatron state dicts (index `pp_rank * tp + tp_rank`).
    With tied embeddings `lm_head.weight` is the same tensor as `model.embed_tokens.weight` (as in
    `<Family>ForCausalLM.state_dict()`), unless `include_tied_lm_head=False` (as `save_pretrained` writes)."""
    check_supported(hf_config)
    if len(per_rank_states) % pp:
        raise ValueError(f"{len(per_rank_states)} rank states do not split into pp={pp} stages")
    tp = len(per_rank_states) // pp
    out: dict[str, torch.Tensor] = {}
    for p in range(pp):  # stages in order: the keys come in `state_dict()` order
        out.update(merge_stage(per_rank_states[p * tp:(p + 1) * tp], hf_config, p, pp))
    return _with_tied_lm_head(out, hf_config, include_tied_lm_head)


def _with_tied_lm_head(state: dict, hf_config, include: bool = True) -> dict:
    if include and getattr(hf_config, "tie_word_embeddings", False) and HF_EMBED in state:
        state[HF_LM_HEAD] = state[HF_EMBED]
    return state


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


def iter_hf_weights(model, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of a live sharded GPTModel, one at a time, in `<Family>ForCausalLM.state_dict()` order
    (a tied `lm_head.weight` left out), each a new tensor on the model's device.

    Every rank of the model-parallel group (tp x pp) must iterate the stream to its end, in step: each
    tensor is made by collectives. Its stage's TP ranks all-gather their parts of that one tensor
    (replicated tensors: broadcast from TP rank 0), then at pp > 1 the stage broadcasts it over the
    pipeline group, so EVERY rank of the group receives every tensor; a rank that does not consume the
    weights drops each one at once. Transient memory: the tensor and its TP parts."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    mine = local_weights(model)
    check_supported(hf_config)
    sources = stage_sources(hf_config, tp, _is_te([mine]), pp_rank, pp, first=MG_EMBED in mine,
                            last=MG_NORM in mine)
    device = next(iter(mine.values())).device
    tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None

    def gather(src: HFTensorSource) -> torch.Tensor:
        part = src.part(_local(mine, src, pp_rank))
        if tp == 1:
            return src.assemble([part])
        if src.dim is None:  # replicated: TP rank 0's copy, so every rank yields the same values
            full = src.assemble([part])
            torch.distributed.broadcast(full, src=ps.get_tensor_model_parallel_src_rank(), group=tp_group)
            return full
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(tp)]
        torch.distributed.all_gather(parts, part, group=tp_group)
        return src.assemble(parts)

    if pp == 1:
        for src in sources:
            tensor = gather(src)
            yield src.name, tensor
            del tensor  # the consumer may have dropped it: hold nothing while making the next one
        return
    # pp > 1: the stages tell each other what they hold (names, shapes, dtypes), then stream in stage order
    pp_group = ps.get_pipeline_model_parallel_group()
    metas: list = [None] * pp
    torch.distributed.all_gather_object(
        metas, [(s.name, s.shape(_local(mine, s, pp_rank), tp), mine[s.mg_name].dtype) for s in sources],
        group=pp_group)
    for stage, meta in enumerate(metas):
        owner = torch.distributed.get_global_rank(pp_group, stage)
        for i, (name, shape, dtype) in enumerate(meta):
            tensor = gather(sources[i]) if stage == pp_rank else torch.empty(shape, dtype=dtype, device=device)
            torch.distributed.broadcast(tensor, src=owner, group=pp_group)
            yield name, tensor
            del tensor


def gather_megatron_to_hf(model, hf_config, include_tied_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The full HF state dict of a live sharded GPTModel on every rank (`iter_hf_weights` collected; with
    tied embeddings `lm_head.weight` is `model.embed_tokens.weight`, as in `state_dict()`). Holds the whole
    model: refit and the final checkpoint consume the stream instead."""
    return _with_tied_lm_head(dict(iter_hf_weights(model, hf_config)), hf_config, include_tied_lm_head)
