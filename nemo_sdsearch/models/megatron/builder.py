"""Process groups and a megatron-core `GPTModel` for the Qwen2, Qwen3 and Llama families, built from a HF config.

Shared by the three (`checkpoint.families` says what differs): RMSNorm (eps = `rms_norm_eps`), SwiGLU MLP
(`gated_linear_unit` with SiLU, no MLP bias), grouped-query attention (`num_query_groups =
num_key_value_heads`, `kv_channels = head_dim`), no bias on the linear layers (`add_bias_linear=False`), RoPE
with `rotary_base = rope_theta` in the non-interleaved (rotate-half) layout HF uses, tied or untied
input/output embeddings, and the vocabulary padded to a multiple of `make_vocab_size_divisible_by * tp`
(the padded rows are zero and their logits are never used: see `actor.MegatronActor`). Qwen2 adds a bias
on the fused QKV projection (`add_qkv_bias=True`); Qwen3 a per-head RMSNorm on queries and keys before RoPE
(`qk_layernorm=True`, layer spec built with `qk_layernorm=True`); Llama 3.1 / 3.2 the llama3 RoPE scaling
(`rope_scaling=True`, `rope_scaling_factor`), older long-context Llamas linear scaling
(`seq_len_interpolation_factor`).

The layer spec is Megatron's local spec (`get_gpt_layer_local_spec`) unless Transformer Engine is
importable and the model goes to CUDA, in which case it is the TE spec (norms fused into
`linear_qkv` / `linear_fc1`; `checkpoint.qwen2` handles both naming schemes).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch

from nemo_sdsearch.core.vocab import pad_vocab_size
from nemo_sdsearch.models.families import check_supported, megatron_rope_kwargs
from nemo_sdsearch.models.megatron.cpu_compat import apply_cpu_compat

DEFAULT_VOCAB_DIVISOR = 128
# How long a rank waits in a collective before its process group gives up (NCCL and gloo alike). Ranks
# legitimately wait for minutes: a replica's ranks while its leader generates a step's rollouts, every rank
# while a checkpoint is written. Torch's NCCL default (10 min) can kill a healthy 7B step; no limit at all
# leaves a job whose peer died hanging until the wall-clock limit. Override per job with the environment.
DIST_TIMEOUT_ENV = "SDSEARCH_DIST_TIMEOUT_MINUTES"
DEFAULT_DIST_TIMEOUT_MINUTES = 30.0


# --------------------------------------------------------------------------------------------------
# process groups
# --------------------------------------------------------------------------------------------------
def init_single_process_group(backend: str, timeout: datetime.timedelta | None = None) -> None:
    """A process group of this process alone over an in-memory store: no port is bound and nothing is left in
    the environment (a MASTER_PORT set here would be inherited by child processes, which would then try to
    listen on the port this process's store still holds)."""
    kw = {} if timeout is None else {"timeout": timeout}
    torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                         **kw)


def dist_timeout_minutes(minutes: float | None = None) -> float:
    """The process-group timeout: `minutes` if given, else $SDSEARCH_DIST_TIMEOUT_MINUTES, else 30."""
    if minutes is None:
        raw = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
        try:
            minutes = float(raw) if raw else DEFAULT_DIST_TIMEOUT_MINUTES
        except ValueError:
            raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
    if not (minutes > 0 and math.isfinite(minutes)):
        raise ValueError(f"the process-group timeout must be a positive number of minutes, not {minutes!r} "
                         f"(${DIST_TIMEOUT_ENV})")
    return float(minutes)


def init_parallel(tp: int, pp: int = 1, backend: str | None = None, seed: int = 1234,
                  timeout_minutes: float | None = None) -> None:
    """Initialise torch.distributed from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; LOCAL_RANK picks the GPU) and Megatron's model-parallel groups (TP x PP, the rest is
    data parallel). Without those variables it starts a single-process group. The backend is gloo on
    CPU and nccl on CUDA unless given. On CPU, `cpu_compat.apply_cpu_compat()` is applied first.
    Also seeds Megatron's tensor-parallel RNG tracker (`model_parallel_cuda_manual_seed(seed)`), which
    seeds the CUDA generator with `seed` - on CPU that is the default CPU generator. Calling it again
    re-creates the model-parallel groups (e.g. to switch from tp=2 to tp=1 in the same processes).
    Every group (the default one and Megatron's) times out after `dist_timeout_minutes(timeout_minutes)`."""
    from megatron.core import parallel_state, tensor_parallel

    minutes = dist_timeout_minutes(timeout_minutes)
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        alone = "MASTER_PORT" not in os.environ
        if alone and os.environ["WORLD_SIZE"] != "1":
            raise ValueError("MASTER_PORT is not set: launch multi-process runs with torchrun "
                             "(or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself)")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = backend or ("nccl" if cuda else "gloo")
        if alone:  # one process without a launcher: an in-memory store, no port
            init_single_process_group(backend, datetime.timedelta(minutes=minutes))
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            torch.distributed.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                                 world_size=int(os.environ["WORLD_SIZE"]),
                                                 timeout=datetime.timedelta(minutes=minutes))
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp*pp = {tp}*{pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             distributed_timeout_minutes=math.ceil(minutes))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _make_replica_wait_group(minutes)


_REPLICA_WAIT_GROUP = None


def _make_replica_wait_group(minutes: float) -> None:
    """A gloo group over this rank's data-parallel replica (its tp x pp ranks), next to Megatron's NCCL one: the
    replica's waits (its ranks waiting in a broadcast while the leader generates, the refit's hand-offs) go
    through it, so a waiting rank sleeps on the CPU instead of spinning an NCCL kernel on a GPU that a
    TensorRT-LLM worker decodes on. Collective over the world (every rank creates every replica's group)."""
    global _REPLICA_WAIT_GROUP
    from megatron.core import parallel_state

    if torch.distributed.get_world_size() == 1:
        _REPLICA_WAIT_GROUP = None
        return
    mine = torch.distributed.get_process_group_ranks(parallel_state.get_model_parallel_group())
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, list(mine))
    for ranks in sorted({tuple(r) for r in every}):
        group = torch.distributed.new_group(list(ranks), backend="gloo", timeout=datetime.timedelta(minutes=minutes))
        if torch.distributed.get_rank() in ranks:
            _REPLICA_WAIT_GROUP = group


def replica_wait_group():
    """The gloo group of this rank's replica (`_make_replica_wait_group`); None in one process."""
    return _REPLICA_WAIT_GROUP


def teardown_parallel() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
def head_dim(hf_config) -> int:
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


def check_model(hf_config):
    """The `families.Family` of a HF config, refusing what the Megatron mapping does not compute exactly
    (another model_type, sliding windows, attention / MLP biases outside Qwen2's QKV bias, activations other
    than SiLU, RoPE scalings megatron-core 0.16 cannot express)."""
    fam = check_supported(hf_config)
    megatron_rope_kwargs(hf_config)
    return fam


def use_te_spec(spec: str = "auto") -> bool:
    """'local', 'te', or 'auto' (TE when importable and CUDA is available)."""
    if spec == "local":
        return False
    if spec == "te":
        return True
    if spec != "auto":
        raise ValueError(f"layer spec {spec!r}: choose auto, local or te")
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config_from_hf(hf_config, tp: int = 1, pp: int = 1, dtype=torch.float32, te: bool = False,
                               **overrides):
    """A megatron `TransformerConfig` equivalent to a HF Qwen2 / Qwen3 / Llama config."""
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    fam = check_model(hf_config)
    if hf_config.num_attention_heads % tp or hf_config.num_key_value_heads % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={hf_config.num_attention_heads} and "
                         f"num_key_value_heads={hf_config.num_key_value_heads}")
    if hf_config.num_hidden_layers % pp:
        raise ValueError(f"pp={pp} must divide num_hidden_layers={hf_config.num_hidden_layers}")
    cuda = torch.cuda.is_available()
    kw = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=fam.qkv_bias,
        qk_layernorm=fam.qk_layernorm,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        # the fused kernels need CUDA (and apex/TE); the unfused paths are exact
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # RL batches change length every step; the pipeline schedules must then exchange shapes.
        # Quirk (0.16): variable_seq_lengths is rejected with the default MoE dispatcher ("allgather")
        # even for dense models, so name the alltoall one (unused: these models have no experts).
        variable_seq_lengths=pp > 1,
        moe_token_dispatcher_type="alltoall",
        attention_backend=AttnBackend.auto if te else AttnBackend.local,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


@dataclass
class ModelLayout:
    """What a checkpoint needs to know about how a model was built and sharded."""

    tp: int = 1
    pp: int = 1
    vocab_size: int = 0          # HF vocab (embedding rows in the HF checkpoint)
    padded_vocab_size: int = 0   # Megatron embedding rows (all TP ranks together)
    tied: bool = True
    te_spec: bool = False


def layout_for(hf_config, tp: int = 1, pp: int = 1, te: bool = False,
               divisor: int = DEFAULT_VOCAB_DIVISOR) -> ModelLayout:
    return ModelLayout(tp=tp, pp=pp, vocab_size=hf_config.vocab_size,
                       padded_vocab_size=pad_vocab_size(hf_config.vocab_size, tp, divisor),
                       tied=bool(getattr(hf_config, "tie_word_embeddings", False)), te_spec=te)


def build_gpt_model(hf_config, tp: int | None = None, pp: int | None = None, dtype=torch.float32,
                    spec: str = "auto", pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None, vocab_divisor: int = DEFAULT_VOCAB_DIVISOR, **config_overrides):
    """A megatron-core `GPTModel` for this rank's pipeline stage and tensor shard (random weights; load
    real ones with `checkpoint.qwen2.load_hf_into_megatron`). `tp`/`pp` default to the initialised
    parallel state; `pre_process`/`post_process` default to whether this rank is the first/last stage.
    Returns the model on CUDA when available, else on the CPU."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)

    tp = tp or parallel_state.get_tensor_model_parallel_world_size()
    pp = pp or parallel_state.get_pipeline_model_parallel_world_size()
    te = use_te_spec(spec)
    config = transformer_config_from_hf(hf_config, tp, pp, dtype, te=te, **config_overrides)
    qk = config.qk_layernorm
    layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk) if te else \
        get_gpt_layer_local_spec(qk_layernorm=qk, normalization="RMSNorm")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=pad_vocab_size(hf_config.vocab_size, tp, vocab_divisor),
        max_sequence_length=int(hf_config.max_position_embeddings),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        **megatron_rope_kwargs(hf_config),
        vp_stage=vp_stage,
    )
    model.layout = layout_for(hf_config, tp, pp, te, vocab_divisor)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
