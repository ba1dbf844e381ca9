"""Launching the Megatron backend: process groups from the torchrun environment (a launch that cannot give
them fails with a ConfigError naming the key), the actor and frozen reference shards built from a HF
directory read tensor by tensor, and the choice of parameter dtype. The recipe never sees any of it (algorithms/setup.py calls it)."""

from __future__ import annotations

import os

import torch

from nemo_sdsearch.models.weights_reader import hf_tensor_reader  # noqa: F401  (where the launch reads shards from)


def init_megatron_parallel(cfg) -> str | None:
    """Process groups from the torchrun environment and Megatron's TP groups; a launch that cannot give
    them fails with a ConfigError naming the key. Returns this rank's device (None: the default)."""
    from nemo_sdsearch.config import ConfigError
    from nemo_sdsearch.models.megatron.builder import init_parallel

    m = cfg.megatron
    tp, pp = m.tensor_parallel, m.pipeline_parallel
    mp = tp * pp
    launch = (f"launch with `torchrun --nproc-per-node {mp} $(which sdsearch) train actor=megatron "
              f"megatron.tensor_parallel={tp} megatron.pipeline_parallel={pp} ...` (or --nproc-per-node a "
              f"multiple of {mp}: data parallel)")
    if m.sequence_parallel and tp > 1 and not torch.cuda.is_available():
        raise ConfigError("config key megatron.sequence_parallel: sequence parallelism needs GPUs "
                          "(NCCL reduce-scatter); set it to false on CPU")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    else:
        env = os.environ.get("WORLD_SIZE")
        if mp > 1 and (env is None or "MASTER_PORT" not in os.environ):
            raise ConfigError(f"config key megatron.tensor_parallel: tensor_parallel={tp} x pipeline_parallel="
                              f"{pp} needs {mp} processes "
                              f"but this one was not started by torchrun (no WORLD_SIZE/MASTER_PORT in the "
                              f"environment): {launch}")
        world = int(env or 1)
    if world % mp:
        raise ConfigError(f"config key megatron.tensor_parallel: tensor_parallel={tp} x pipeline_parallel={pp} "
                          f"does not divide the {world} processes of this launch: {launch}")
    init_parallel(tp, pp, seed=cfg.trainer.seed, timeout_minutes=m.dist_timeout_minutes)
    if torch.cuda.is_available() and cfg.model.device is None:
        return f"cuda:{torch.cuda.current_device()}"
    return None


def megatron_dtype(cfg) -> torch.dtype:
    d = cfg.megatron.dtype
    if d == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[d]


def build_megatron_actor(hf_config, hf_weights, cfg, frozen: bool = False):
    """This rank's megatron-core shard of a HF model as a `MegatronActor`. `hf_weights`: a state dict or a
    `get(name)` reader (`hf_tensor_reader`: only this rank's tensors are read). frozen: no gradient, no
    optimizer (the reference policy of the k3 KL)."""
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import build_gpt_model

    m = cfg.megatron
    overrides = {}
    if m.sequence_parallel and m.tensor_parallel > 1:
        overrides["sequence_parallel"] = True
    if m.activation_checkpointing:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(hf_config, dtype=megatron_dtype(cfg), vocab_divisor=m.make_vocab_size_divisible_by,
                            **overrides)
    # auto: Megatron's mixed-precision optimizer on GPU (fp32 main weights; sharded over DP when
    # megatron.distributed_optimizer), torch AdamW over fp32 shards on CPU. The frozen reference has none (any dtype).
    optimizer = "none" if frozen else "auto"
    actor = MegatronActor(model, hf_config, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                          betas=cfg.optim.betas, grad_clip=cfg.optim.grad_clip, optimizer=optimizer,
                          distributed_optimizer=m.distributed_optimizer, teacher_window=m.teacher_window)
    actor.load_hf_weights(hf_weights)
    return actor
