"""`sdsearch convert`: between HF directories, NeMo's checkpoints (1.x `.nemo`, 2.0 directories), this
project's Megatron weight directories, sdsearch training archives and training checkpoints.

| kind | what | read | write (`--to`) |
|---|---|---|---|
| hf | HF model directory (config.json + safetensors / .bin) | yes | `hf` |
| nemo | NeMo 1.x `.nemo` (tar or unpacked directory): dist-checkpoint or per-rank weights, any TP/PP | yes | `nemo` (dist-checkpoint form) |
| nemo2 | NeMo 2.0 checkpoint directory (`context/` + `weights/`) | yes | - |
| megatron | our Megatron weight directory (per-rank safetensors) | yes | `megatron` |
| sdsearch-archive | our training archive (tar of a Megatron weight directory; formerly written as `.nemo`) | yes | `sdsearch-archive` |
| training | our training-state checkpoint (`megatron_step_*`) | yes | - |

Everything goes through a HF state dict in memory. NeMo sources: Qwen2 and Llama families
(`nemo_format`); the Megatron / sdsearch-archive outputs: Qwen2 family (`qwen2`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch

from nemo_sdsearch.checkpoint import formats, nemo_format
from nemo_sdsearch.checkpoint.formats import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_DIR

OUTPUTS = ("hf", "megatron", "nemo", "sdsearch-archive")


def _tagged(path: Path) -> bool:
    import yaml

    meta = yaml.safe_load((path / CONFIG_FILE).read_text())
    return isinstance(meta, dict) and meta.get("format") == formats.FORMAT


def detect_format(src) -> str:
    """'hf', 'nemo', 'nemo2', 'megatron', 'sdsearch-archive' or 'training'."""
    src = Path(src)
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise ValueError(f"{src} is a file but not a tar archive (.nemo or sdsearch training archive)")
        if formats.is_sdsearch_archive(src):
            return "sdsearch-archive"
        if nemo_format.detect(src) == "nemo1":
            return "nemo"
        raise ValueError(f"{src}: a tar without a NeMo model_config.yaml (num_layers, ...) or our format tag")
    if (src / "config.json").exists():
        return "hf"
    if nemo_format.detect(src) == "nemo2":
        return "nemo2"
    if (src / CONFIG_FILE).exists():
        if _tagged(src):
            if (src / WEIGHTS_DIR).is_dir():
                return "megatron"
            if (src / "metadata.json").exists():
                return "training"
        elif nemo_format.detect(src) == "nemo1":
            return "nemo"
    raise FileNotFoundError(f"{src}: not a HF model directory (config.json), a NeMo checkpoint (.nemo, unpacked .nemo "
                            f"directory, NeMo 2.0 context/ + weights/), a Megatron weight directory ({CONFIG_FILE} + "
                            f"{WEIGHTS_DIR}/), an sdsearch training archive or a training checkpoint")


def read_any(src, tokenizer_out=None) -> tuple[object, dict[str, torch.Tensor], Path | None]:
    """(HF config, HF state dict, directory holding the tokenizer files or None) of any supported source.
    For archives the tokenizer is extracted to `tokenizer_out` (when given)."""
    from nemo_sdsearch.checkpoint.qwen2 import megatron_to_hf

    src = Path(src)
    kind = detect_format(src)
    if kind == "hf":
        hf_config, state = formats.read_hf_dir(src)
        return hf_config, state, src
    if kind in ("nemo", "nemo2"):
        ckpt = nemo_format.read_nemo(src, tokenizer_out)
        return ckpt.hf_config, ckpt.hf_state, Path(tokenizer_out) if ckpt.tokenizer_files else None
    tok = None
    if kind == "sdsearch-archive":
        hf_config, states, layout = formats.load_sdsearch_archive(src)
        if tokenizer_out is not None and formats.extract_archive_tokenizer(src, tokenizer_out):
            tok = Path(tokenizer_out)
    elif kind == "megatron":
        hf_config, states, layout = formats.load_megatron_dir(src)
        tok = src / TOKENIZER_DIR if (src / TOKENIZER_DIR).is_dir() else None
    else:
        hf_config, states, layout = _read_training_state(src)
    return hf_config, megatron_to_hf(states, hf_config, pp=layout.pp), tok


def _read_training_state(src):
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    started = not torch.distributed.is_initialized()
    if started:
        init_parallel(1)
    try:
        return formats.training_state_to_megatron(src)
    finally:
        if started:
            teardown_parallel()


def convert(src, to: str, out, tp: int = 1, pp: int = 1, te_spec: bool = False) -> dict:
    """Convert any readable source to `to` in OUTPUTS at `out` (tp/pp: the layout of a Megatron
    directory or sdsearch archive; for `nemo`, the tensor/pipeline parallel sizes recorded in
    model_config.yaml: NeMo's dist checkpoint itself loads at any layout)."""
    import tempfile

    from nemo_sdsearch.checkpoint.qwen2 import hf_to_megatron
    from nemo_sdsearch.models.megatron.builder import layout_for

    if to not in OUTPUTS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(OUTPUTS)}")
    kind = detect_format(src)
    with tempfile.TemporaryDirectory() as tmp:
        hf_config, state, tok = read_any(src, tokenizer_out=Path(tmp) / "tokenizer")
        if to == "hf":
            formats.write_hf_dir(out, hf_config, state, tokenizer_src=tok)
        elif to == "nemo":  # NeMo loads an HF tokenizer from tokenizer.type: the source directory when lasting
            name = str(Path(src).resolve()) if kind == "hf" else (getattr(hf_config, "_name_or_path", None) or None)
            nemo_format.save_nemo1(out, hf_config, state, tokenizer_src=tok, tp=tp, pp=pp, tokenizer_name=name)
        else:
            layout = layout_for(hf_config, tp, pp, te_spec)
            per_rank = hf_to_megatron(state, hf_config, tp, pp, te_spec)
            save = formats.save_sdsearch_archive if to == "sdsearch-archive" else formats.save_megatron_dir
            save(out, per_rank, hf_config, layout, tok)
    return {"from": kind, "to": to, "out": str(out), "tensors": len(state), "tp": tp, "pp": pp,
            "tokenizer": tok is not None, "model_type": getattr(hf_config, "model_type", None)}
