"""The project's own checkpoint formats around the Megatron actor: HF directories written, Megatron weight
directories and sdsearch training archives.
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

Training-state checkpoints (resume) and the `model_config.yaml` format tag are the Megatron actor's own:
`models/megatron/training_state.py`; HF directories are read by `models/weights_reader.py`.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import torch

from nemo_sdsearch.core.files import atomic_path
from nemo_sdsearch.models.megatron.builder import ModelLayout
from nemo_sdsearch.models.megatron.training_state import CONFIG_FILE, FORMAT, WEIGHTS_DIR, dump_meta, model_meta, parse_meta

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "tokenizer.model")
# copied along with the tokenizer when present (not weights, not config.json)
EXTRA_FILES = ("generation_config.json",)


def rank_file(tp_rank: int, pp_rank: int = 0) -> str:
    return f"{WEIGHTS_DIR}/mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


# --------------------------------------------------------------------------------------------------
# HF directories
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Megatron weight directories and sdsearch training archives
# --------------------------------------------------------------------------------------------------
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
    (out / CONFIG_FILE).write_text(dump_meta(model_meta(hf_config, layout)))
    if tokenizer_src is not None:
        copy_tokenizer(tokenizer_src, out / TOKENIZER_DIR)
    return out


def load_megatron_dir(path) -> tuple[object, list[dict], ModelLayout]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path} is not a Megatron weight directory (no {CONFIG_FILE})")
    hf_config, layout = parse_meta((path / CONFIG_FILE).read_text(), path)
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
        # never leave a half-written archive under the final name
        with atomic_path(path, path.name + ".partial") as partial, tarfile.open(partial, "w") as tar:
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    tar.add(f, arcname=str(f.relative_to(tmp)))
    return path


def load_sdsearch_archive(path, ranks: list[tuple[int, int]] | None = None) -> tuple[object, list[dict], ModelLayout]:
    """(HF config, per-rank Megatron state dicts, layout) of an sdsearch training archive, read straight
    from the tar; `ranks` = [(tp_rank, pp_rank), ...] reads only those members (all by default)."""
    from safetensors.torch import load as load_bytes

    path = Path(path)
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is not an sdsearch training archive (not a tar file)")
    with tarfile.open(path, "r") as tar:
        hf_config, layout = parse_meta(tar.extractfile(CONFIG_FILE).read().decode(), path)
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
