"""The Megatron actor's training state on disk, and the `model_config.yaml` that describes a Megatron checkpoint
(the HF config and the parallel layout; the project's Megatron weight directories, `checkpoint/formats.py`, carry
the same file).

Training state (resume): `save_training_state` / `load_training_state` write and read a
`megatron.core.dist_checkpointing` checkpoint (torch_dist backend) of the model shards, the optimizer
state (the plain torch AdamW on CPU through Megatron's `optim_state_to_sharding_state`; Megatron's
DistributedOptimizer through its own `sharded_state_dict` on GPU), the RNG states of every rank, and a
small dict of plain values (step counters...). It works on CPU with gloo once `cpu_compat` is applied
(`torch.cuda.synchronize` is the only CUDA call on that path). Model and optimizer tensors are saved as
global tensors with their shard offsets, so a checkpoint written at one TP size loads at another (the
padded vocabulary size must match; it is recorded in `model_config.yaml` next to the checkpoint).
RNG states are restored only when the layout is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from nemo_sdsearch.models.megatron.builder import ModelLayout
from nemo_sdsearch.models.megatron.hf_mapping import load_shard, unstack_layers
from nemo_sdsearch.rng import host_rng_state, set_host_rng_state

FORMAT = "nemo_sdsearch/megatron-qwen2"
CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
MODEL_PREFIX = "model."   # sharded-tensor keys of the model in a training-state checkpoint


def hf_config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", "qwen2")
    return AutoConfig.for_model(model_type, **d)


def model_meta(hf_config, layout: ModelLayout) -> dict:
    return {"format": FORMAT, "version": 1, "layout": asdict(layout),
            "weights": {"per_rank": f"{WEIGHTS_DIR}/mp_rank_{{tp:02d}}_{{pp:03d}}.safetensors"},
            "hf_config": hf_config.to_dict()}


def dump_meta(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(meta)), sort_keys=False)


def parse_meta(text: str, where) -> tuple[object, ModelLayout]:
    import yaml

    meta = yaml.safe_load(text)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {CONFIG_FILE} is not a {FORMAT} config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    return hf_config_from_dict(meta["hf_config"]), ModelLayout(**meta["layout"])


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {**host_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    set_host_rng_state(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _init_adam_state(optimizer) -> None:
    """Give every parameter an (empty) AdamW state so that a load template has the right structure."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sharded_training_state(actor, loading: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    model_sd = actor.model.sharded_state_dict(prefix=MODEL_PREFIX)
    if actor.ddp is not None:  # Megatron's (distributed) optimizer knows its own sharding
        optim_sd = actor.optimizer.sharded_state_dict(model_sd, is_loading=loading)
    else:
        if loading:
            _init_adam_state(actor.optimizer)
        params = [p for g in actor.optimizer.param_groups for p in g["params"]]
        optim_sd = actor.optimizer.state_dict()
        # AdamW's per-parameter step counter is a scalar (not shaped like the parameter): keep one copy
        # as a plain value (it goes to common.pt); optim_state_to_sharding_state drops excluded keys
        steps = {float(st["step"]) for st in optim_sd["state"].values() if "step" in st}
        if len(steps) > 1:
            raise ValueError(f"optimizer parameters disagree on the step count: {sorted(steps)}")
        optim_sd["common_step"] = steps.pop() if steps else 0.0
        optim_state_to_sharding_state(optim_sd, get_param_id_to_sharded_param_map(model_sd, params),
                                      exclude_keys=("step",))
    pp, tp, dp = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                  ps.get_data_parallel_world_size())
    rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    rng = ShardedObject("rng_state", _rng_state(), (pp, tp, dp), rank, replica_id=0)
    return {"model": model_sd, "optimizer": optim_sd, "rng_state": rng}


def save_training_state(directory, actor, extra: dict | None = None) -> Path:
    """Collective (every rank calls it): a dist checkpoint of model shards + optimizer + RNG, plus
    `extra` plain values (same on every rank) and `model_config.yaml` (HF config + layout)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = _sharded_training_state(actor, loading=False)
    state["extra"] = dict(extra or {})
    dist_checkpointing.save(state, str(directory))
    if torch.distributed.get_rank() == 0:
        (directory / CONFIG_FILE).write_text(dump_meta(model_meta(actor.hf_config, actor.model.layout)))
    torch.distributed.barrier()
    return directory


def load_training_state(directory, actor) -> dict:
    """Collective: restore model shards, optimizer and (same layout only) RNG into `actor`; returns
    the `extra` dict given at save time."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    _, saved = parse_meta((directory / CONFIG_FILE).read_text(), directory)
    layout = actor.model.layout
    if saved.padded_vocab_size != layout.padded_vocab_size:
        raise ValueError(f"{directory}: saved padded vocabulary {saved.padded_vocab_size} != this model's "
                         f"{layout.padded_vocab_size}; build the model with a vocab divisor that matches")
    same_layout = (saved.tp, saved.pp) == (layout.tp, layout.pp)
    template = _sharded_training_state(actor, loading=True)
    if not same_layout:
        template.pop("rng_state")
    loaded = dist_checkpointing.load(template, str(directory))
    load_shard(actor.model, {k[len(MODEL_PREFIX):]: v for k, v in loaded["model"].items()
                             if not k.endswith("_extra_state")})
    optim_sd = loaded["optimizer"]
    if actor.ddp is None:
        step = float(optim_sd.pop("common_step"))
        for st in optim_sd["state"].values():
            st["step"] = torch.tensor(step, dtype=torch.float32)
    actor.optimizer.load_state_dict(optim_sd)
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return dict(loaded.get("extra", {}))


def training_state_to_megatron(directory) -> tuple[object, list[dict], ModelLayout]:
    """Read the model weights of a training-state checkpoint as ONE full Megatron state dict (a TP=1,
    PP=1 layout with the saved padded vocabulary), without building a model. Needs an initialised
    process group (a single-process gloo group is enough: `builder.init_parallel(1)`)."""
    from dataclasses import replace

    from megatron.core import dist_checkpointing

    directory = Path(directory)
    hf_config, layout = parse_meta((directory / CONFIG_FILE).read_text(), directory)
    if layout.pp != 1:
        raise NotImplementedError("reading a pp > 1 training checkpoint without a model (layer renumbering)")
    plain = dist_checkpointing.load_plain_tensors(str(directory))
    state: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        if not key.startswith(MODEL_PREFIX) or not isinstance(value, torch.Tensor) or key.endswith("_extra_state"):
            continue
        state.update(unstack_layers(key[len(MODEL_PREFIX):], value))  # the layers are stored stacked
    return hf_config, [state], replace(layout, tp=1, pp=1)
