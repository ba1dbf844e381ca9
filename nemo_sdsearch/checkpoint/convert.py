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
| megatron-lm | Megatron-LM torch_dist checkpoint (root with `latest_checkpointed_iteration.txt`, or `iter_N/`) | yes | - |
| megatron-bridge | Megatron-Bridge checkpoint (root or `iter_N/` with `run_config.yaml`) | yes | - |
| nemo-rl | NeMo-RL Megatron policy checkpoint (`step_N/` with `policy/weights/`) | yes | - |

Everything goes through a HF state dict in memory. NeMo and Megatron-LM / Bridge / NeMo-RL sources: the
families of `nemo_format` (`megatron_lm` reads the last three); the Megatron / sdsearch-archive outputs:
Qwen2 family (`qwen2`).

The tokenizer: the source's own, or `tokenizer=` (`--tokenizer DIR`, a HF tokenizer directory), which wins
and also fills the bos / eos / pad ids the source's config lacks (a real `.nemo` names its tokenizer by a
hub id or a path that is not on the machine: without it the HF output has no EOS id and `generate` never
stops). Megatron-LM / Bridge / NeMo-RL checkpoints without a tokenizer need it (an error says so); NeMo
sources without one convert with a loud warning. A `generation_config.json` of the source (an Instruct
model's EOS list) is kept.
"""

from __future__ import annotations

import shutil
import tarfile
import warnings
from pathlib import Path

import torch

from nemo_sdsearch.checkpoint import formats, megatron_lm, nemo_format
from nemo_sdsearch.checkpoint.formats import TOKENIZER_DIR
from nemo_sdsearch.models.megatron.training_state import CONFIG_FILE, FORMAT, WEIGHTS_DIR, training_state_to_megatron
from nemo_sdsearch.models.weights_reader import read_hf_dir

OUTPUTS = ("hf", "megatron", "nemo", "sdsearch-archive")
MEGATRON_EXTRA = "pip install -c constraints.txt -e '.[megatron]'"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG = "generation_config.json"


class MissingDependency(ImportError):
    """An optional dependency (megatron-core) that this conversion needs is not installed."""


def require_megatron(what: str) -> None:
    """Raise `MissingDependency` naming the `.[megatron]` extra when megatron-core cannot be imported."""
    try:
        import megatron.core  # noqa: F401
        import megatron.core.dist_checkpointing  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"{what} needs megatron-core, which is not installed ({e}): install it with "
                                f"`{MEGATRON_EXTRA}`") from e


def _tagged(path: Path) -> bool:
    import yaml

    meta = yaml.safe_load((path / CONFIG_FILE).read_text())
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def detect_format(src) -> str:
    """'hf', 'nemo', 'nemo2', 'megatron', 'sdsearch-archive', 'training', 'megatron-lm',
    'megatron-bridge' or 'nemo-rl'."""
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
    found = megatron_lm.locate(src)
    if found is not None:
        return found[0]
    raise FileNotFoundError(f"{src}: not a HF model directory (config.json), a NeMo checkpoint (.nemo, unpacked .nemo "
                            f"directory, NeMo 2.0 context/ + weights/), a Megatron weight directory ({CONFIG_FILE} + "
                            f"{WEIGHTS_DIR}/), an sdsearch training archive, a training checkpoint, a Megatron-LM / "
                            f"Megatron-Bridge checkpoint (root with {megatron_lm.TRACKER}, or iter_N/) or a NeMo-RL "
                            f"step directory (policy/weights/)")


def read_any(src, tokenizer_out=None, tokenizer=None) -> tuple[object, dict[str, torch.Tensor], Path | None]:
    """(HF config, HF state dict, directory holding the tokenizer files or None) of any supported source.
    For archives the tokenizer is extracted to `tokenizer_out` (when given). `tokenizer`: a HF tokenizer
    directory that replaces the source's and fills the bos / eos / pad ids its config lacks."""
    from nemo_sdsearch.models.megatron.hf_mapping import megatron_to_hf

    src = Path(src)
    if tokenizer is not None and not megatron_lm._has_tokenizer(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: not a tokenizer directory (no tokenizer.json, "
                                "tokenizer_config.json, vocab.json, tokenizer.model, ...)")
    kind = detect_format(src)
    if kind in megatron_lm.KINDS:
        hf_config, state, tok, _ = megatron_lm.read(src, tokenizer_out, tokenizer)
        return hf_config, state, tok
    if kind == "hf":
        hf_config, state = read_hf_dir(src)
        tok = src
    elif kind in ("nemo", "nemo2"):
        ckpt = nemo_format.read_nemo(src, tokenizer_out)
        hf_config, state = ckpt.hf_config, ckpt.hf_state
        tok = Path(tokenizer_out) if ckpt.tokenizer_files else None
        if tok is None and tokenizer is None:
            warnings.warn(f"{src}: the NeMo checkpoint's tokenizer is not on this machine (model_config.yaml names "
                          "a hub id or a missing path): the HF output gets no tokenizer and no bos / eos / pad ids, "
                          "so `generate` will not stop at EOS. Pass --tokenizer DIR (the model's HF tokenizer "
                          "directory).", UserWarning, stacklevel=2)
    else:
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
        state = megatron_to_hf(states, hf_config, pp=layout.pp)
    if tokenizer is not None:
        source_gen = tok / GENERATION_CONFIG if tok is not None else None
        tok = Path(tokenizer)
        if (source_gen is not None and source_gen.is_file() and not (tok / GENERATION_CONFIG).is_file()
                and tokenizer_out is not None):   # keep the source's generation config (its EOS list)
            merged = Path(tokenizer_out).with_name(Path(tokenizer_out).name + "_given")
            formats.copy_tokenizer(tok, merged)
            shutil.copyfile(source_gen, merged / GENERATION_CONFIG)
            tok = merged
        _fill_token_ids(hf_config, tok)
    return hf_config, state, tok


def _fill_token_ids(hf_config, tok_dir) -> None:
    """Set the bos / eos / pad ids the config lacks from the tokenizer in `tok_dir` (its
    generation_config.json first: an Instruct model's EOS list)."""
    ids = {}
    gen = Path(tok_dir) / GENERATION_CONFIG
    if gen.is_file():
        import json

        data = json.loads(gen.read_text())
        ids = {k: data[k] for k in TOKEN_IDS if data.get(k) is not None}
    for k, v in nemo_format._token_ids(tok_dir).items():
        ids.setdefault(k, v)
    for k, v in ids.items():
        if getattr(hf_config, k, None) is None:
            setattr(hf_config, k, v)


def _read_training_state(src):
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    started = not torch.distributed.is_initialized()
    if started:
        init_parallel(1)
    try:
        return training_state_to_megatron(src)
    finally:
        if started:
            teardown_parallel()


def convert(src, to: str, out, tp: int = 1, pp: int = 1, te_spec: bool = False, tokenizer=None) -> dict:
    """Convert any readable source to `to` in OUTPUTS at `out` (tp/pp: the layout of a Megatron
    directory or sdsearch archive; for `nemo`, the tensor/pipeline parallel sizes recorded in
    model_config.yaml: NeMo's dist checkpoint itself loads at any layout). `tokenizer`: a HF tokenizer
    directory for the output (`--tokenizer`; needed where the source holds none)."""
    import tempfile

    if to not in OUTPUTS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(OUTPUTS)}")
    kind = detect_format(src)
    if to == "nemo":
        require_megatron("--to nemo (the weights are written by megatron-core's dist_checkpointing.save)")
    if kind == "training":
        require_megatron(f"reading the training checkpoint {src}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_config, state, tok = read_any(src, tokenizer_out=Path(tmp) / "tokenizer", tokenizer=tokenizer)
        if to == "hf":
            formats.write_hf_dir(out, hf_config, state, tokenizer_src=tok)
        elif to == "nemo":  # NeMo loads an HF tokenizer from tokenizer.type: the source directory when lasting
            if tokenizer is not None:
                name = str(Path(tokenizer).resolve())
            else:
                name = str(Path(src).resolve()) if kind == "hf" else (getattr(hf_config, "_name_or_path", None) or None)
            nemo_format.save_nemo1(out, hf_config, state, tokenizer_src=tok, tp=tp, pp=pp, tokenizer_name=name)
        else:
            from nemo_sdsearch.models.megatron.hf_mapping import hf_to_megatron
            from nemo_sdsearch.models.megatron.builder import layout_for

            layout = layout_for(hf_config, tp, pp, te_spec)
            per_rank = hf_to_megatron(state, hf_config, tp, pp, te_spec)
            save = formats.save_sdsearch_archive if to == "sdsearch-archive" else formats.save_megatron_dir
            save(out, per_rank, hf_config, layout, tok)
    return {"from": kind, "to": to, "out": str(out), "tensors": len(state), "tp": tp, "pp": pp,
            "tokenizer": tok is not None, "model_type": getattr(hf_config, "model_type", None)}
