"""A Hugging Face model directory written from a weight stream (`Actor.iter_weights`), one shard at a time.

The output is what `save_pretrained(safe_serialization=True)` writes and `AutoModelForCausalLM.from_pretrained`
loads: config.json (its dtype set to the weights' dtype), generation_config.json, the weights as
`model.safetensors` or, when they exceed one shard, `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json` (total size, name -> file map), and the tokenizer when one is given.
A tied `lm_head.weight` is left out (it is the embedding), as HF files do.

Only the current shard is resident: each tensor is moved to the CPU as it arrives, a shard is written
once the next tensor would not fit into `shard_bytes`, then dropped. The shard count is known only at
the end, so shards are written under temporary names and renamed last; config.json is written last too.
"""

from __future__ import annotations

import copy
import json
import os
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import torch

from nemo_sdsearch.rollout.generator import iter_buckets

SHARD_BYTES = 5 << 30  # 5 GiB, the shard size of most published checkpoints
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def save_hf_checkpoint_from_stream(weights, out_dir, hf_config, tokenizer=None, shard_bytes: int = SHARD_BYTES,
                                   write: bool | None = None) -> Path | None:
    """Write `weights` (a weight stream of (HF name, tensor) pairs, or a Mapping) as a HF model directory.

    `write`: whether this process writes; default: rank 0 of the default process group (or the only
    process). In a distributed run EVERY rank calls this with its stream (the stream is a collective);
    the other ranks drain it, keeping nothing, and return None. Returns the directory on the writer."""
    if write is None:
        write = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    items = weights.items() if isinstance(weights, Mapping) else weights
    if not write:  # take part in the stream's collectives, dropping every tensor at once
        deque(items, maxlen=0)
        return None
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), *out.glob("model*.safetensors.tmp"), out / INDEX_FILE]:
        old.unlink(missing_ok=True)  # a previous save with another shard count must not be mixed in
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    on_cpu = ((name, t.detach().to("cpu").contiguous()) for name, t in items if not (tied and name == "lm_head.weight"))
    weight_map: dict[str, int] = {}
    total_size = total_params = 0
    dtypes: set[torch.dtype] = set()
    n_shards = 0
    for shard in iter_buckets(on_cpu, shard_bytes):
        for name, numel, nbytes, dtype in _save_shard(shard, _temporary(out, n_shards), save_file):
            if name in weight_map:
                raise ValueError(f"the weight stream repeats {name}")
            weight_map[name] = n_shards
            total_size += nbytes
            total_params += numel
            if dtype.is_floating_point:
                dtypes.add(dtype)
        n_shards += 1
        del shard  # only the current shard is resident
    if not n_shards:
        raise ValueError("the weight stream is empty: nothing to write")
    names = [SINGLE_FILE] if n_shards == 1 else \
        [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    for i, name in enumerate(names):
        os.replace(_temporary(out, i), out / name)
    if n_shards > 1:
        index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
                 "weight_map": {k: names[weight_map[k]] for k in sorted(weight_map)}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_configs(out, hf_config, dtypes)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _save_shard(shard: list, path: Path, save_file) -> list[tuple[str, int, int, torch.dtype]]:
    """Write one shard; (name, elements, bytes, dtype) of its tensors."""
    tensors = dict(shard)
    if len(tensors) != len(shard):
        raise ValueError(f"the weight stream repeats a name ({[n for n, _ in shard]})")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return [(n, t.numel(), t.numel() * t.element_size(), t.dtype) for n, t in shard]


def _temporary(out: Path, i: int) -> Path:
    return out / f"model-{i + 1:05d}.safetensors.tmp"


def _write_configs(out: Path, hf_config, dtypes: set[torch.dtype]) -> None:
    """config.json (dtype and architectures filled in, as `save_pretrained` does) and generation_config.json."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = copy.deepcopy(hf_config)
    if len(dtypes) == 1:
        cfg.dtype = next(iter(dtypes))
    if not getattr(cfg, "architectures", None) and cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    cfg.save_pretrained(str(out))
    GenerationConfig.from_model_config(cfg).save_pretrained(str(out))
