"""Parallel layout checks and a per-GPU memory estimate, run when a config is loaded, before any GPU
is touched. An impossible layout (a tensor-parallel size that does not divide the attention heads or
the key/value groups, a pipeline size that does not divide the layers, more model-parallel ranks than
GPUs, ...) or a layout whose estimate does not fit the GPU fails with a `ConfigError` naming the key.

Memory model (bytes per GPU; P = parameters, M = tp x pp model-parallel ranks, dp = data-parallel size):

    training (Megatron, bf16 mixed precision, Adam):
      weights bf16              2 P / M
      main gradients fp32       4 P / M
      optimizer fp32            12 P / M / (dp if distributed optimizer else 1)   (master copy, m, v)
      reference policy bf16     2 P / M            (only when grpo.kl_coef > 0)
      activations               micro_batch x seq x hidden x layers/pp x c / tp
                                c = 34 bytes per element without recomputation, 2 with full
                                activation checkpointing (Korthikanti et al. 2022, no attention scores
                                stored: flash attention)
      selected-row logits fp32  micro_batch x seq x vocab/tp x 4 x 2 (student and teacher; an upper
                                bound: only policy positions are computed)
    generation (TensorRT-LLM, co-located, asleep during the update when trtllm.sleep_while_training;
    the training state other than activations and logits stays resident while it generates):
      weights bf16              2 P / gen_tp
      KV cache                  trtllm.kv_cache_fraction x free memory

The estimate is a planning tool, not a guarantee: fragmentation, NCCL buffers and the CUDA context
(about 1-2 GiB) come on top; `cluster.memory_headroom` leaves room for them.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


def _config_error(key: str, msg: str):
    from nemo_sdsearch.config import ConfigError

    return ConfigError(f"config key {key}: {msg}")


def parameter_count(arch) -> int:
    h, L, ffn, V = arch.hidden_size, arch.num_layers, arch.ffn_hidden_size, arch.vocab_size
    head_dim = h // arch.num_attention_heads
    kv = arch.num_kv_heads * head_dim
    attn = h * h + 2 * h * kv + h * h + (h + 2 * kv)  # q, k, v, o (+ QKV bias)
    mlp = 3 * h * ffn
    per_layer = attn + mlp + 2 * h
    embed = V * h * (1 if arch.tied_embeddings else 2)
    return L * per_layer + embed + h


@dataclass
class MemoryEstimate:
    params: int
    tp: int
    pp: int
    dp: int
    train_gib: dict
    generation_gib: dict

    @property
    def train_total(self) -> float:
        return sum(self.train_gib.values())

    @property
    def generation_total(self) -> float:
        return sum(self.generation_gib.values())

    def peak(self, sleep_while_training: bool) -> float:
        """Training state (weights, gradients, optimizer, reference) stays resident while generating;
        activations and logits exist only during the update, generation memory only while generating
        when the generator sleeps during the update."""
        transient = self.train_gib["activations"] + self.train_gib["selected-row logits fp32"]
        if sleep_while_training:
            return max(self.train_total, self.train_total - transient + self.generation_total)
        return self.train_total + self.generation_total

    def table(self) -> str:
        rows = [f"parameters {self.params / 1e9:.2f} B; layout tp={self.tp} pp={self.pp} dp={self.dp}"]
        rows += [f"  train  {k:28s} {v:7.2f} GiB" for k, v in self.train_gib.items()]
        rows += [f"  train  {'total':28s} {self.train_total:7.2f} GiB"]
        rows += [f"  gen    {k:28s} {v:7.2f} GiB" for k, v in self.generation_gib.items()]
        rows += [f"  gen    {'total':28s} {self.generation_total:7.2f} GiB"]
        return "\n".join(rows)


def memory_estimate(cfg) -> MemoryEstimate:
    a, m, c = cfg.arch, cfg.megatron, cfg.cluster
    P = parameter_count(a)
    tp, pp = m.tensor_parallel, m.pipeline_parallel
    world = max(1, c.nodes * max(1, c.gpus_per_node))
    dp = max(1, world // (tp * pp))
    M = tp * pp
    seq = cfg.rollout.max_context
    mb = cfg.grpo.micro_batch_size
    train = {
        "weights bf16": 2 * P / M / GIB,
        "main gradients fp32": 4 * P / M / GIB,
        "optimizer fp32 (master, m, v)": 12 * P / M / (dp if m.distributed_optimizer else 1) / GIB,
    }
    if cfg.grpo.kl_coef > 0:
        train["reference policy bf16"] = 2 * P / M / GIB
    per_elem = 2 if m.activation_checkpointing else 34
    train["activations"] = mb * seq * a.hidden_size * (a.num_layers / pp) * per_elem / tp / GIB
    train["selected-row logits fp32"] = mb * seq * a.vocab_size / tp * 4 * 2 / GIB
    gen_tp = cfg.trtllm.tensor_parallel
    gen = {}
    if cfg.generator == "trtllm":
        gen["weights bf16"] = 2 * P / gen_tp / GIB
        gen["KV cache"] = cfg.trtllm.kv_cache_fraction * c.gpu_memory_gib
    return MemoryEstimate(P, tp, pp, dp, train, gen)


def check_layout(cfg) -> None:
    """Raise ConfigError for an impossible parallel layout or one whose memory estimate does not fit."""
    a, m, c = cfg.arch, cfg.megatron, cfg.cluster
    tp, pp = m.tensor_parallel, m.pipeline_parallel
    for key, v in (("megatron.tensor_parallel", tp), ("megatron.pipeline_parallel", pp),
                   ("trtllm.tensor_parallel", cfg.trtllm.tensor_parallel), ("cluster.nodes", c.nodes)):
        if v < 1:
            raise _config_error(key, f"must be >= 1, got {v}")
    if m.dtype not in ("auto", "bf16", "fp32"):
        raise _config_error("megatron.dtype", f"must be auto, bf16 or fp32, got {m.dtype!r}")
    if cfg.actor == "hf" and (tp > 1 or pp > 1):
        raise _config_error("megatron.tensor_parallel", "tensor/pipeline parallelism needs actor=megatron")
    if cfg.generator == "trtllm" and c.gpus_per_node == 0:
        raise _config_error("generator", "trtllm needs GPUs (set cluster.gpus_per_node)")
    if c.gpus_per_node:
        world = c.nodes * c.gpus_per_node
        if tp > c.gpus_per_node:
            raise _config_error("megatron.tensor_parallel", f"{tp} exceeds the {c.gpus_per_node} GPUs of one node "
                                "(tensor parallelism must stay inside a node)")
        if world % (tp * pp):
            raise _config_error("megatron.tensor_parallel", f"tp x pp = {tp * pp} does not divide the "
                                f"{world} GPUs ({c.nodes} nodes x {c.gpus_per_node})")
        dp = world // (tp * pp)
        rollouts = cfg.trainer.questions_per_step * cfg.rollout.group_size
        if rollouts % dp:
            raise _config_error("trainer.questions_per_step", f"{rollouts} rollouts per step do not split over "
                                f"{dp} data-parallel ranks")
        if cfg.trtllm.tensor_parallel > c.gpus_per_node:
            raise _config_error("trtllm.tensor_parallel", f"exceeds the {c.gpus_per_node} GPUs of one node")
    if a.num_attention_heads:
        if a.num_attention_heads % tp:
            raise _config_error("megatron.tensor_parallel", f"{tp} does not divide the {a.num_attention_heads} "
                                "attention heads")
        if a.num_kv_heads and a.num_kv_heads % tp:
            raise _config_error("megatron.tensor_parallel", f"{tp} does not divide the {a.num_kv_heads} key/value "
                                "groups (megatron-core needs num_query_groups % tp == 0)")
        g = cfg.trtllm.tensor_parallel
        if cfg.generator == "trtllm" and a.num_attention_heads % g:
            raise _config_error("trtllm.tensor_parallel", f"{g} does not divide the {a.num_attention_heads} heads")
    if a.num_layers and a.num_layers % pp:
        raise _config_error("megatron.pipeline_parallel", f"{pp} does not divide the {a.num_layers} layers")
    if c.gpus_per_node and a.hidden_size and a.num_layers and a.vocab_size and a.num_attention_heads:
        est = memory_estimate(cfg)
        budget = c.gpu_memory_gib * c.memory_headroom
        peak = est.peak(cfg.trtllm.sleep_while_training)
        if peak > budget:
            raise _config_error("megatron.tensor_parallel", f"estimated {peak:.1f} GiB per GPU exceeds "
                                f"{budget:.1f} GiB ({c.memory_headroom:.0%} of {c.gpu_memory_gib:g} GiB):\n{est.table()}")
