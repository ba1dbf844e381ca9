"""Megatron distributed checkpoints (`megatron.core.dist_checkpointing`) read WITHOUT megatron, and written
with it.

What such a checkpoint directory holds (megatron-core `dist_checkpointing/serialization.py` and
`strategies/{torch,common,zarr}.py`; NeMo 1.x `.nemo` archives keep it as `model_weights/`, NeMo 2.0
checkpoints as `weights/`):

    metadata.json     {"sharded_backend": "torch_dist" | "zarr", "sharded_backend_version": 1,
                       "common_backend": "torch", "common_backend_version": 1}
    common.pt         torch.save of everything that is not sharded (may be empty)
    torch_dist:       .metadata + __<rank>_<i>.distcp, written by torch.distributed.checkpoint (DCP): every
                      ShardedTensor key is ONE global tensor (all TP shards and pipeline stages together),
                      stored as chunks with their offsets; ShardedObjects (e.g. `..._extra_state`) are byte
                      entries named `<key>/shard_<offsets>_<shape>`.
    zarr (older):     one directory per key (`.zarray` json + raw chunk files "i.j.k"), uncompressed
                      (megatron created the arrays with compressor=None); bf16 is spelled "bfloat16".

Megatron's transformer layers checkpoint as ONE tensor per weight stacked over the layers of the whole
model (`decoder.layers.self_attention.linear_qkv.weight` of shape [num_layers, ...]; the layer offset of a
pipeline stage is applied at save time), under the Transformer Engine names (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`) whatever the layer spec. The stacked gate/up weight of the SwiGLU MLP is
the TP-independent `cat(gate, up)` (megatron's swiglu sharded factory saves each rank's two halves at
their global offsets), and the fused QKV weight is the per-query-group layout of TP=1: a global tensor
does not depend on the TP size it was written at.

Reading goes through `torch.distributed.checkpoint` on the CPU (`no_dist=True`: no process group, no
megatron import); each requested key is loaded into a tensor of its global shape, DCP assembling the
chunks. Writing uses megatron-core's own `dist_checkpointing.save` (a single-process gloo group is
enough), so the files are what megatron writes.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from nemo_sdsearch.models.megatron.hf_mapping import MG_LAYERS, unstack_layers

CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"


def backend(path) -> dict:
    """The parsed metadata.json of a dist checkpoint directory (FileNotFoundError / ValueError if not one)."""
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a Megatron distributed checkpoint (no {CONFIG_FILE})")
    meta = json.loads(f.read_text())
    if not isinstance(meta, dict) or "sharded_backend" not in meta:
        raise ValueError(f"{f} is not a Megatron dist-checkpoint {CONFIG_FILE}: {meta!r}")
    return meta


def is_dist_checkpoint(path) -> bool:
    try:
        backend(path)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return False
    return True


def tensor_shapes(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (global shape, dtype)} of every tensor in the checkpoint (objects left out)."""
    path = Path(path)
    kind = backend(path)["sharded_backend"]
    if kind == "torch_dist":
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = FileSystemReader(str(path)).read_metadata()
        return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata)}
    if kind == "zarr":
        out = {}
        for sub in sorted(path.iterdir()):
            if (sub / ".zarray").is_file():
                meta = json.loads((sub / ".zarray").read_text())
                out[sub.name] = (tuple(meta["shape"]), _zarr_dtype(meta["dtype"], sub)[1])
        return out
    raise NotImplementedError(f"{path}: sharded backend {kind!r} (known: torch_dist, zarr)")


def load_tensors(path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The global tensors `keys` of a dist checkpoint (CPU, the stored dtype)."""
    path = Path(path)
    keys = list(keys)
    kind = backend(path)["sharded_backend"]
    if kind == "zarr":
        return {k: _read_zarr(path / k) for k in keys}
    if kind != "torch_dist":
        raise NotImplementedError(f"{path}: sharded backend {kind!r} (known: torch_dist, zarr)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    shapes = tensor_shapes(path)
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise KeyError(f"{path}: no tensor {missing[0]!r} in the checkpoint ({len(shapes)} tensors)")
    state = {k: torch.empty(shapes[k][0], dtype=shapes[k][1]) for k in keys}
    if state:
        import warnings

        with warnings.catch_warnings():  # "torch.distributed is disabled ...": no process group is the point
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return state


MODEL_ROOTS = ("embedding.", "decoder.", "output_layer.")   # a GPTModel's own sharded keys


def load_model_tensors(path, prefix: str, roots: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` (e.g. 'model.' in NeMo 1.x, 'module.' in NeMo 2.0, '' in Megatron-LM /
    Megatron-Bridge checkpoints), the prefix removed, layer-stacked tensors split into per-layer entries
    `decoder.layers.{i}.<name>`. `roots`: keep only names (after the prefix) starting with one of these
    (`MODEL_ROOTS` where the model keys carry no prefix and the optimizer state, `optimizer.…`, sits
    next to them). `_extra_state` objects are left out."""
    shapes = tensor_shapes(path)
    keys = [k for k in shapes if k.startswith(prefix) and not k.endswith("_extra_state")
            and (roots is None or k[len(prefix):].startswith(tuple(roots)))]
    if not keys:
        raise KeyError(f"{path}: no tensor under {prefix!r} (keys: {sorted(shapes)[:5]} ...)")
    out: dict[str, torch.Tensor] = {}
    for key in keys:  # one key at a time: only one stacked tensor is transient on top of the output
        out.update(unstack_layers(key[len(prefix):], load_tensors(path, [key])[key]))
    return out


# --------------------------------------------------------------------------------------------------
# zarr (read-only; megatron-core dropped the writer)
# --------------------------------------------------------------------------------------------------
_ZARR_DTYPES = {"<f4": torch.float32, "<f2": torch.float16, "<f8": torch.float64, "<i8": torch.int64,
                "<i4": torch.int32, "|u1": torch.uint8, "|i1": torch.int8, "|b1": torch.bool,
                "bfloat16": torch.bfloat16}


def _zarr_dtype(code: str, where) -> tuple[str, torch.dtype]:
    if code not in _ZARR_DTYPES:
        raise NotImplementedError(f"{where}: zarr dtype {code!r} (known: {sorted(_ZARR_DTYPES)})")
    return code, _ZARR_DTYPES[code]


def _read_zarr(d: Path) -> torch.Tensor:
    import numpy as np

    f = d / ".zarray"
    if not f.is_file():
        raise KeyError(f"{d}: no zarr array")
    meta = json.loads(f.read_text())
    if meta.get("compressor") is not None or meta.get("filters"):
        raise NotImplementedError(f"{f}: compressed/filtered zarr arrays are not supported (megatron wrote "
                                  "them uncompressed)")
    if meta.get("order", "C") != "C":
        raise NotImplementedError(f"{f}: order {meta['order']!r}")
    code, dtype = _zarr_dtype(meta["dtype"], f)
    np_dtype = np.dtype("<i2") if dtype == torch.bfloat16 else np.dtype(code)
    shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    sep = meta.get("dimension_separator", ".")
    out = np.empty(shape, dtype=np_dtype)
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
    for idx in itertools.product(*grid):
        name = sep.join(map(str, idx)) if idx else "0"
        raw = (d / name).read_bytes()
        block = np.frombuffer(raw, dtype=np_dtype).reshape(chunks)
        dst = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
        out[dst] = block[tuple(slice(0, sl.stop - sl.start) for sl in dst)]
    t = torch.from_numpy(out)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def write_zarr_array(d, tensor: torch.Tensor, chunks: tuple[int, ...] | None = None) -> None:
    """A zarr v2 array as megatron's zarr strategy wrote it (uncompressed, C order, '.' separated chunk
    names, bf16 as 'bfloat16'). For tests: megatron-core no longer writes zarr checkpoints."""
    import numpy as np

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    codes = {v: k for k, v in _ZARR_DTYPES.items()}
    t = tensor.detach().cpu().contiguous()
    code = codes[t.dtype]
    arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    chunks = tuple(chunks or t.shape)
    meta = {"chunks": list(chunks), "compressor": None, "dtype": code, "fill_value": None, "filters": None,
            "order": "C", "shape": list(t.shape), "zarr_format": 2}
    (d / ".zarray").write_text(json.dumps(meta, indent=4, sort_keys=True))
    for idx in itertools.product(*[range(math.ceil(s / c)) for s, c in zip(t.shape, chunks)]):
        block = np.zeros(chunks, dtype=arr.dtype)
        src = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, t.shape))
        block[tuple(slice(0, sl.stop - sl.start) for sl in src)] = arr[src]
        (d / (".".join(map(str, idx)) if idx else "0")).write_bytes(block.tobytes())


# --------------------------------------------------------------------------------------------------
# writing (megatron-core)
# --------------------------------------------------------------------------------------------------
def sharded_model_state(state: Mapping[str, torch.Tensor], prefix: str, num_layers: int) -> dict:
    """The sharded state dict megatron's GPTModel produces for these GLOBAL (TP=1, PP=1) weights, as one
    rank holding everything: per-layer tensors `decoder.layers.{i}.<name>` become shards of the stacked
    key `<prefix>decoder.layers.<name>` at layer offset i (megatron's `prepend_axis_num=1`), the other
    tensors their own key; each linear layer gets the `_extra_state` object megatron's local layer spec
    checkpoints (None), so a model that expects them finds them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    out: dict = {}
    extra: set[tuple[int, str]] = set()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        if name.startswith(MG_LAYERS):
            idx, rest = name[len(MG_LAYERS):].split(".", 1)
            i = int(idx)
            out[prefix + name] = ShardedTensor.from_rank_offsets(prefix + MG_LAYERS + rest, t, (0, i, num_layers),
                                                                 replica_id=0, prepend_axis_num=1)
            module = rest.rsplit(".", 1)[0]
            if module.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")):
                extra.add((i, module))
        else:
            out[prefix + name] = ShardedTensor.from_rank_offsets(prefix + name, t, replica_id=0)
    for i, module in sorted(extra):
        key = f"{prefix}{MG_LAYERS}{module}._extra_state"
        out[f"{prefix}{MG_LAYERS}{i}.{module}._extra_state"] = ShardedObject(key, None, (num_layers,), (i,),
                                                                              replica_id=0)
    return out


def save_model(directory, state: Mapping[str, torch.Tensor], prefix: str, num_layers: int) -> Path:
    """Write GLOBAL weights as a megatron dist checkpoint (torch_dist) under `prefix`, with megatron-core's
    `dist_checkpointing.save`. Starts (and ends) a single-process gloo group when none is running."""
    from megatron.core import dist_checkpointing

    from nemo_sdsearch.models.megatron.cpu_compat import apply_cpu_compat

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    started = not torch.distributed.is_initialized()
    if started:
        import os

        from nemo_sdsearch.models.megatron.builder import init_single_process_group

        if not torch.cuda.is_available():
            apply_cpu_compat()  # dist_checkpointing calls torch.cuda.synchronize
        init_single_process_group("gloo")
        os.environ.setdefault("RANK", "0")
    try:
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("save_model writes from one process; call it outside a multi-process job")
        dist_checkpointing.save(sharded_model_state(state, prefix, num_layers), str(directory))
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return directory
