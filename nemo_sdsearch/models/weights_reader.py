"""Reading a Hugging Face directory's weights one tensor (or one part of a tensor) at a time, so that a rank that
builds its shard of a model never holds, or even reads, the whole model; and, where a whole model is wanted (a
conversion, a single-process Megatron load), the directory's config and state dict at once (`read_hf_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class SafetensorsReader:
    """Tensors of a local HF directory's safetensors files (sharded or not), read one at a time: `reader(name)`
    is a whole tensor, `reader.part(name, dim, start, stop)` only rows (dim 0) or columns (dim 1) start:stop
    of it (safetensors' get_slice: the other bytes are never read). `bytes_read` counts what was read."""

    def __init__(self, path, where: dict | None):
        self.path, self.where = path, where
        self.bytes_read = 0
        self._handles: dict = {}

    def _file(self, name: str):
        from safetensors import safe_open

        file = "model.safetensors" if self.where is None else self.where.get(name)
        if file is None:
            raise KeyError(f"{name} is not in {self.path / 'model.safetensors.index.json'}")
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
        return self._handles[file]

    def names(self) -> list[str]:
        if self.where is not None:
            return list(self.where)
        return list(self._file("").keys())

    def __call__(self, name: str) -> torch.Tensor:
        t = self._file(name).get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        sl = self._file(name).get_slice(name)
        t = sl[start:stop] if dim == 0 else sl[:, start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t


def hf_tensor_reader(model_dir):
    """(HF config, SafetensorsReader) of a local HF directory: a rank building its shard reads only its own
    parts of the tensors (`checkpoint.qwen2.megatron_shard`), never the whole model."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(model_dir)
    config = AutoConfig.from_pretrained(str(path))
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        where = None
    elif index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors or model.safetensors.index.json: actor=megatron "
                                "reads its shards tensor by tensor from safetensors (convert .bin weights with "
                                "transformers' save_pretrained(safe_serialization=True))")
    return config, SafetensorsReader(path, where)


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
