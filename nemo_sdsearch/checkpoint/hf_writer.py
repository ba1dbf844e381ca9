"""A Hugging Face model directory written from a weight stream (`Actor.iter_weights`), one shard at a time.

The output is what `save_pretrained(safe_serialization=True, max_shard_size=...)` writes and
`AutoModelForCausalLM.from_pretrained` loads: config.json (its dtype set to the weights' dtype),
generation_config.json, the weights as `model.safetensors` or, when they exceed `max_shard_size`,
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (`metadata.total_size`,
`metadata.total_parameters`, the name -> file `weight_map`), and the tokenizer when one is given.
A tied `lm_head.weight` is left out (it is the embedding), as HF files do.

Shards are cut as `huggingface_hub.split_torch_state_dict_into_shards` (what `save_pretrained` calls) cuts
them, in stream order: a tensor is added to the current shard unless that would take it past
`max_shard_size`, which closes the shard; a tensor larger than `max_shard_size` on its own is a shard of
its own (written at once; the current shard stays open). Given the stream in `state_dict` order (as
`Actor.iter_weights` streams it), the files and the weight map are those `save_pretrained` writes.
Default size "5GB" (5 * 10**9 bytes): the default of huggingface_hub's splitter and of transformers 4.x's
`save_pretrained`, the shard size of most published checkpoints (transformers 5 raised its own to "50GB").

Only the current shard (plus at most one oversized tensor) is resident: each tensor is moved to the CPU as
it arrives and a shard is dropped once written. The shard count is known only at the end, so shards are
written under temporary names and renamed last; config.json is written last too.
"""

from __future__ import annotations

import copy
import json
import re
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import torch

from nemo_sdsearch.core.files import atomic_write_text, durable_replace

MAX_SHARD_SIZE = "5GB"
SHARD_BYTES = 5 * 10**9  # MAX_SHARD_SIZE in bytes
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_shard_size(size: int | str) -> int:
    """Bytes of a shard size: an int, or a number with a unit as `save_pretrained` takes it ("5GB" =
    5 * 10**9, "500MB", "1.5GB"; also "2GiB" = 2 * 2**30). Case-insensitive; must be at least 1 byte."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a size such as '5GB' or a number of bytes, got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if unit not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size: use bytes or a number with a unit "
                             f"({', '.join(u for u in ('KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'))}), "
                             f"e.g. '5GB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return n


def save_hf_checkpoint_from_stream(weights, out_dir, hf_config, tokenizer=None,
                                   max_shard_size: int | str = MAX_SHARD_SIZE, write: bool | None = None, *,
                                   shard_bytes: int | None = None, generation_config=None) -> Path | None:
    """Write `weights` (a weight stream of (HF name, tensor) pairs, or a Mapping) as a HF model directory.

    `max_shard_size`: as `save_pretrained`'s ("5GB", "500MB", "2GiB" or bytes); `shard_bytes` (bytes) is
    the older spelling of the same and wins when given.
    `generation_config`: the source model's generation config (a `GenerationConfig`, a dict, or a
    directory / file holding `generation_config.json`), written as is: it keeps what the model config
    cannot say (an Instruct model's EOS list `[151645, 151643]`); default: derived from `hf_config`.
    `write`: whether this process writes; default: rank 0 of the default process group (or the only
    process). In a distributed run EVERY rank calls this with its stream (the stream is a collective);
    the other ranks drain it, keeping nothing, and return None. Returns the directory on the writer."""
    limit = parse_shard_size(shard_bytes if shard_bytes is not None else max_shard_size)
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
    totals = {"size": 0, "params": 0}
    dtypes: set[torch.dtype] = set()
    n_shards = 0

    def flush(shard: list) -> None:
        nonlocal n_shards
        for name, numel, nbytes, dtype in _save_shard(shard, _temporary(out, n_shards), save_file):
            if name in weight_map:
                raise ValueError(f"the weight stream repeats {name}")
            weight_map[name] = n_shards
            totals["size"] += nbytes
            totals["params"] += numel
            if dtype.is_floating_point:
                dtypes.add(dtype)
        n_shards += 1

    current: list = []
    size = 0
    for name, tensor in on_cpu:
        n = tensor.numel() * tensor.element_size()
        if n > limit:  # a shard of its own; the current shard stays open (as huggingface_hub splits)
            flush([(name, tensor)])
        else:
            if current and size + n > limit:
                flush(current)
                current, size = [], 0  # only the current shard is resident
            current.append((name, tensor))
            size += n
        del name, tensor
    if current:
        flush(current)
        current = []
    if not n_shards:
        raise ValueError("the weight stream is empty: nothing to write")
    names = [SINGLE_FILE] if n_shards == 1 else \
        [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    for i, name in enumerate(names):
        durable_replace(_temporary(out, i), out / name)
    if n_shards > 1:
        index = {"metadata": {"total_parameters": totals["params"], "total_size": totals["size"]},
                 "weight_map": {k: names[weight_map[k]] for k in sorted(weight_map)}}
        atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_configs(out, hf_config, dtypes, generation_config)
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


def _generation_config(source):
    from transformers import GenerationConfig

    if isinstance(source, GenerationConfig):
        return source
    if isinstance(source, Mapping):
        return GenerationConfig.from_dict(dict(source))
    path = Path(source)
    if path.is_dir():
        path = path / "generation_config.json"
    return GenerationConfig.from_dict(json.loads(path.read_text()))


def _write_configs(out: Path, hf_config, dtypes: set[torch.dtype], generation_config=None) -> None:
    """config.json (dtype and architectures filled in, as `save_pretrained` does) and generation_config.json
    (the given one, else derived from the config)."""
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = copy.deepcopy(hf_config)
    if len(dtypes) == 1:
        cfg.dtype = next(iter(dtypes))
    if not getattr(cfg, "architectures", None) and cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    cfg.save_pretrained(str(out))
    gen = GenerationConfig.from_model_config(cfg) if generation_config is None else _generation_config(generation_config)
    gen.save_pretrained(str(out))
