"""The project's own checkpoint formats around the Megatron actor: HF directories, Megatron weight
directories, sdsearch training archives, and Megatron distributed checkpoints of the training state.
(NeMo's own formats, `.nemo` 1.x archives and NeMo 2.0 directories, are in `nemo_format`.)

Megatron weight directory (what `sdsearch convert --to megatron` writes; a TP/PP job loads its own file):

    model_config.yaml                          format tag, the HF config (dict), the parallel layout
    model_weights/mp_rank_{tp:02d}_{pp:03d}.safetensors   one Megatron state dict per (tp, pp) rank
    tokenizer/                                 the tokenizer files of the source model, when it had them

sdsearch training archive (`sdsearch convert --to sdsearch-archive`; before NeMo's own layout was
supported this project wrote it under the name `.nemo`, and such files still read): exactly that tree in
an uncompressed tar (per-rank files, not one consolidated file: a TP job reads only its own member). It
is this project's layout, NOT loadable by NeMo's tools: for NeMo use `--to nemo` (`nemo_format`).
Import back to HF is bit-exact: every conversion step is a copy, a concatenation or a slice.

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
import os
import shutil
import tarfile
from dataclasses import asdict
from pathlib import Path

import torch

from nemo_sdsearch.models.megatron.builder import ModelLayout

FORMAT = "nemo_sdsearch/megatron-qwen2"
CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "model_weights"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "tokenizer.model")
MODEL_PREFIX = "model."   # sharded-tensor keys of the model in a training-state checkpoint
# copied along with the tokenizer when present (not weights, not config.json)
EXTRA_FILES = ("generation_config.json",)


def rank_file(tp_rank: int, pp_rank: int = 0) -> str:
    return f"{WEIGHTS_DIR}/mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


# --------------------------------------------------------------------------------------------------
# HF directories
# --------------------------------------------------------------------------------------------------
def read_hf_dir(path) -> tuple[object, dict[str, torch.Tensor]]:
    """(config, state dict) of a local HF causal-LM directory (safetensors, sharded or not, or .bin)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path))
    state: dict[str, torch.Tensor] = {}
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif index.exists():
        from safetensors.torch import load_file

        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(path / name)))
    elif (path / "pytorch_model.bin").exists():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors, safetensors index or pytorch_model.bin")
    return config, state


def copy_tokenizer(src, dst) -> list[str]:
    """Copy the tokenizer (and generation config) files found in `src` to `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES + EXTRA_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_hf_dir(out, hf_config, state: dict[str, torch.Tensor], tokenizer_src=None) -> Path:
    """A directory `AutoModelForCausalLM.from_pretrained` loads (`hf_writer.save_hf_checkpoint_from_stream`:
    config, safetensors shards, a tied `lm_head.weight` left out) and the tokenizer files of `tokenizer_src`."""
    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    gen = Path(tokenizer_src) / "generation_config.json" if tokenizer_src is not None else None
    out = save_hf_checkpoint_from_stream(state, out, hf_config, write=True,
                                         generation_config=gen if gen is not None and gen.is_file() else None)
    if tokenizer_src is not None:
        copy_tokenizer(tokenizer_src, out)
    return out


def hf_config_from_dict(d: dict):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", "qwen2")
    return AutoConfig.for_model(model_type, **d)


# --------------------------------------------------------------------------------------------------
# Megatron weight directories and sdsearch training archives
# --------------------------------------------------------------------------------------------------
def _meta(hf_config, layout: ModelLayout) -> dict:
    return {"format": FORMAT, "version": 1, "layout": asdict(layout),
            "weights": {"per_rank": f"{WEIGHTS_DIR}/mp_rank_{{tp:02d}}_{{pp:03d}}.safetensors"},
            "hf_config": hf_config.to_dict()}


def _dump_yaml(meta: dict) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(meta)), sort_keys=False)


def _parse_meta(text: str, where) -> tuple[object, ModelLayout]:
    import yaml

    meta = yaml.safe_load(text)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {CONFIG_FILE} is not a {FORMAT} config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    return hf_config_from_dict(meta["hf_config"]), ModelLayout(**meta["layout"])


def save_megatron_dir(out, per_rank_states: list[dict], hf_config, layout: ModelLayout, tokenizer_src=None) -> Path:
    """Write per-rank Megatron state dicts (index pp_rank * tp + tp_rank) as a Megatron weight directory."""
    from safetensors.torch import save_file

    out = Path(out)
    if len(per_rank_states) != layout.tp * layout.pp:
        raise ValueError(f"{len(per_rank_states)} rank states for tp={layout.tp} x pp={layout.pp}")
    (out / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    for p in range(layout.pp):
        for t in range(layout.tp):
            tensors = {k: v.detach().cpu().contiguous() for k, v in per_rank_states[p * layout.tp + t].items()}
            save_file(tensors, str(out / rank_file(t, p)), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(_dump_yaml(_meta(hf_config, layout)))
    if tokenizer_src is not None:
        copy_tokenizer(tokenizer_src, out / TOKENIZER_DIR)
    return out


def load_megatron_dir(path) -> tuple[object, list[dict], ModelLayout]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} is not a Megatron weight directory (no {CONFIG_FILE})")
    hf_config, layout = _parse_meta((path / CONFIG_FILE).read_text(), path)
    states = [load_file(str(path / rank_file(t, p))) for p in range(layout.pp) for t in range(layout.tp)]
    return hf_config, states, layout


def save_sdsearch_archive(path, per_rank_states: list[dict], hf_config, layout: ModelLayout,
                          tokenizer_src=None) -> Path:
    """An sdsearch training archive (uncompressed tar of a Megatron weight directory; not NeMo's format)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        save_megatron_dir(tmp, per_rank_states, hf_config, layout, tokenizer_src)
        partial = path.with_name(path.name + ".partial")
        with tarfile.open(partial, "w") as tar:
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    tar.add(f, arcname=str(f.relative_to(tmp)))
        os.replace(partial, path)  # never leave a half-written archive under the final name
    return path


def load_sdsearch_archive(path, ranks: list[tuple[int, int]] | None = None) -> tuple[object, list[dict], ModelLayout]:
    """(HF config, per-rank Megatron state dicts, layout) of an sdsearch training archive, read straight
    from the tar; `ranks` = [(tp_rank, pp_rank), ...] reads only those members (all by default)."""
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is not an sdsearch training archive (not a tar file)")
    with tarfile.open(path, "r") as tar:
        hf_config, layout = _parse_meta(tar.extractfile(CONFIG_FILE).read().decode(), path)
        wanted = ranks or [(t, p) for p in range(layout.pp) for t in range(layout.tp)]
        states = [load_bytes(tar.extractfile(rank_file(t, p)).read()) for t, p in wanted]
    return hf_config, states, layout


def is_sdsearch_archive(path) -> bool:
    """A tar whose model_config.yaml carries this project's format tag (NeMo's archives have none)."""
    import yaml

    path = Path(path)
    if not (path.is_file() and tarfile.is_tarfile(path)):
        return False
    with tarfile.open(path, "r:*") as tar:
        try:
            member = tar.getmember(CONFIG_FILE)
        except KeyError:
            return False
        meta = yaml.safe_load(tar.extractfile(member).read().decode())
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def extract_archive_tokenizer(path, out) -> list[str]:
    """Write the tokenizer files stored in an sdsearch training archive to `out`."""
    copied = []
    with tarfile.open(path, "r") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith(TOKENIZER_DIR + "/"):
                name = Path(m.name).name
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / name).write_bytes(tar.extractfile(m).read())
                copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------
# Training state: megatron.core.dist_checkpointing
# --------------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
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
        (directory / CONFIG_FILE).write_text(_dump_yaml(_meta(actor.hf_config, actor.model.layout)))
    torch.distributed.barrier()
    return directory


def load_training_state(directory, actor) -> dict:
    """Collective: restore model shards, optimizer and (same layout only) RNG into `actor`; returns
    the `extra` dict given at save time."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    _, saved = _parse_meta((directory / CONFIG_FILE).read_text(), directory)
    layout = actor.model.layout
    if saved.padded_vocab_size != layout.padded_vocab_size:
        raise ValueError(f"{directory}: saved padded vocabulary {saved.padded_vocab_size} != this model's "
                         f"{layout.padded_vocab_size}; build the model with a vocab divisor that matches")
    same_layout = (saved.tp, saved.pp) == (layout.tp, layout.pp)
    template = _sharded_training_state(actor, loading=True)
    if not same_layout:
        template.pop("rng_state")
    loaded = dist_checkpointing.load(template, str(directory))
    from nemo_sdsearch.checkpoint.qwen2 import load_shard

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
    hf_config, layout = _parse_meta((directory / CONFIG_FILE).read_text(), directory)
    if layout.pp != 1:
        raise NotImplementedError("reading a pp > 1 training checkpoint without a model (layer renumbering)")
    plain = dist_checkpointing.load_plain_tensors(str(directory))
    state: dict[str, torch.Tensor] = {}
    layers = "decoder.layers."
    for key, value in plain.items():
        if not key.startswith(MODEL_PREFIX) or not isinstance(value, torch.Tensor) or key.endswith("_extra_state"):
            continue
        key = key[len(MODEL_PREFIX):]
        rest = key[len(layers):]
        if key.startswith(layers) and not rest.split(".")[0].isdigit():
            # Megatron checkpoints the layers stacked: one [num_layers, ...] tensor per weight, under
            # TE-style names (norms as linear_qkv/linear_fc1.layer_norm_weight) whatever the spec.
            for i in range(value.shape[0]):
                state[f"{layers}{i}.{rest}"] = value[i].clone()
        else:
            state[key] = value
    return hf_config, [state], replace(layout, tp=1, pp=1)
