"""Checkpoints of the Megatron trainers users train with, read into HF: Megatron-LM, Megatron-Bridge and
NeMo-RL (whose Megatron policy saves through Megatron-Bridge). Read with plain torch (`dist_ckpt`), no
megatron import; the weights go through `nemo_format`'s GPTSpec -> HF mapping, so every family it knows
converts.

Layouts (verified against the sources named in docs/nemo.md, "Megatron-LM, Megatron-Bridge and NeMo-RL"):

* **Megatron-LM** (`megatron/training/checkpointing.py`, `--ckpt-format torch_dist`, the default):

      <save>/latest_checkpointed_iteration.txt   "7" (or "release")
      <save>/iter_0000007/                        `iter_{:07d}` (`release/` for a release checkpoint)
          metadata.json, .metadata, __*_*.distcp  megatron's dist checkpoint (`dist_checkpointing.save`)
          common.pt                               the non-sharded part: `args` (the argparse.Namespace of
                                                  the run), `checkpoint_version` 3.0, `iteration`,
                                                  `opt_param_scheduler`, ...
          tokenizer/                              `save_tokenizer_assets` (HF: save_pretrained), optional

  The model's sharded keys carry no prefix (`embedding.word_embeddings.weight`, `decoder.layers.<name>`
  stacked over layers, `decoder.final_layernorm.weight`, `output_layer.weight`); the optimizer's sit next
  to them under `optimizer.`. The architecture is read from `args` (`core_transformer_config_from_args`
  names: num_layers, hidden_size, ffn_hidden_size, num_attention_heads, group_query_attention +
  num_query_groups, kv_channels, norm_epsilon, normalization, swiglu, add_bias_linear, add_qkv_bias,
  qk_layernorm, position_embedding_type, rotary_base, rotary_percent, untie_embeddings_and_output_weights,
  max_position_embeddings, use_rope_scaling + rope_scaling_factor, rotary_seq_len_interpolation_factor,
  num_experts); the tokenizer from `tokenizer/`, else `args.tokenizer_model` when it names a local directory.
* **Megatron-Bridge** (`megatron/bridge/training/checkpointing.py`): the same `iter_N/` dist checkpoint
  (same un-prefixed model keys; common.pt holds no `args`) plus `run_config.yaml` (the ConfigContainer:
  `model:` is the model provider, a TransformerConfig with its fields by name, functions as
  `{_target_: torch.nn.functional.silu, _call_: false}`; `tokenizer:` has `tokenizer_model`),
  `train_state.pt` and `tokenizer/`; the root holds `latest_train_state.pt` and, for Megatron-LM
  compatibility, `latest_checkpointed_iteration.txt`.
* **NeMo-RL** (`nemo_rl/utils/checkpoint.py`, `algorithms/{grpo,sft}.py`, the Megatron policy worker):
  `step_N/` with `training_info.json`, `config.yaml` (the master config: `policy.model_name`,
  `policy.tokenizer.name`) and `policy/weights/` = a Megatron-Bridge checkpoint root
  (`policy/tokenizer/` when the worker saved one).

`common.pt` is a pickle: it is read with `torch.load(weights_only=True)`, allowing `argparse.Namespace`
and, for the enum / dataclass values megatron puts in `args` (`AttnBackend`, ...), inert stand-ins for
classes under `megatron.` / `transformer_engine.` that record their arguments and run no code; anything
else fails with a message.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"
BRIDGE_TRACKER = "latest_train_state.pt"
RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
TOKENIZER_DIR = "tokenizer"
NEMO_RL_CONFIG, NEMO_RL_INFO = "config.yaml", "training_info.json"
NEMO_RL_WEIGHTS, NEMO_RL_TOKENIZER = Path("policy") / "weights", Path("policy") / "tokenizer"
_ITER = re.compile(r"^iter_(\d+)$")
_STUB_PREFIXES = ("megatron.", "transformer_engine.")

KINDS = ("megatron-lm", "megatron-bridge", "nemo-rl")


class TokenizerRequired(ValueError):
    """The checkpoint holds no tokenizer and none was given."""


# --------------------------------------------------------------------------------------------------
# where the weights are
# --------------------------------------------------------------------------------------------------
def _is_dist(path: Path) -> bool:
    from nemo_sdsearch.checkpoint import dist_ckpt

    return path.is_dir() and dist_ckpt.is_dist_checkpoint(path)


def _latest_iteration(root: Path) -> Path | None:
    """The iteration directory a checkpoint root points at: its tracker file (Megatron-LM's, also written
    by Megatron-Bridge), else the highest `iter_N`."""
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            sub = root / "release"
        elif text.isdigit():
            sub = root / f"iter_{int(text):07d}"
        else:
            raise ValueError(f"{tracker}: {text!r} is neither an iteration number nor 'release'")
        if not sub.is_dir():
            raise FileNotFoundError(f"{tracker} names iteration {text}, but {sub} does not exist")
        return sub
    iters = sorted((int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _ITER.match(d.name)))
    return iters[-1][1] if iters else None


def locate(path) -> tuple[str, Path, Path | None] | None:
    """(kind, iteration directory, NeMo-RL step directory or None) of a Megatron-LM / Megatron-Bridge /
    NeMo-RL checkpoint given as its root, an `iter_N` directory or a NeMo-RL `step_N` directory; None if
    `path` is none of them."""
    path = Path(path)
    if not path.is_dir():
        return None
    step = None
    if (path / NEMO_RL_WEIGHTS).is_dir() and ((path / NEMO_RL_CONFIG).is_file() or (path / NEMO_RL_INFO).is_file()):
        step, path = path, path / NEMO_RL_WEIGHTS
    if _is_dist(path):
        it = path
    elif (path / TRACKER).is_file() or (path / BRIDGE_TRACKER).is_file() or any(_ITER.match(d.name) for d in path.iterdir()):
        it = _latest_iteration(path)
        if it is None:
            return None
        if not _is_dist(it):
            if any(d.name.startswith("mp_rank_") for d in it.iterdir()):
                raise NotImplementedError(
                    f"{it}: a Megatron-LM checkpoint in the legacy 'torch' format (mp_rank_*/model_optim_rng.pt); "
                    "only torch_dist is read: re-save it with Megatron-LM's --ckpt-format torch_dist "
                    "(e.g. load it with --ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
            return None
    else:
        return None
    if step is not None:
        return "nemo-rl", it, step
    if (it / RUN_CONFIG).is_file():
        return "megatron-bridge", it, None
    if (it / "common.pt").is_file():
        return "megatron-lm", it, None
    return None


# --------------------------------------------------------------------------------------------------
# common.pt, safely
# --------------------------------------------------------------------------------------------------
def _stub(name: str) -> type:
    """An inert stand-in for the class `name` (an enum or config class megatron pickled into `args`)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{name}{self.args!r}>"

    module, _, qual = name.rpartition(".")
    return type(qual, (), {"__init__": __init__, "__setstate__": __setstate__, "__repr__": __repr__,
                           "__module__": module, "stand_in_for": name})


_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)")


def load_common(path) -> dict:
    """`common.pt` of a dist checkpoint with `torch.load(weights_only=True)`: plain values, tensors,
    `argparse.Namespace`, and inert stand-ins for `megatron.*` / `transformer_engine.*` classes."""
    import argparse

    path = Path(path)
    allowed: list = [argparse.Namespace]
    stubbed: set[str] = set()
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                data = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            m = _UNSUPPORTED.search(str(e))
            name = m.group(1) if m else None
            if name is None or not name.startswith(_STUB_PREFIXES) or name in stubbed or len(stubbed) > 64:
                raise ValueError(f"{path}: cannot read it with torch.load(weights_only=True): it holds "
                                 f"{name or 'an object'} that is not a plain value ({str(e).splitlines()[0]}). "
                                 "Load it yourself in a trusted environment.") from e
            stubbed.add(name)
            allowed.append((_stub(name), name))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a dict ({type(data).__name__})")
    return data


# --------------------------------------------------------------------------------------------------
# the architecture
# --------------------------------------------------------------------------------------------------
def args_to_config(args: dict, where) -> dict:
    """Megatron-LM `args` as the TransformerConfig / GPTModel fields NeMo 2.0's model.yaml and
    Megatron-Bridge's run_config.yaml spell (Megatron-LM's `core_transformer_config_from_args`), with
    Megatron-LM's argument defaults for absent keys."""
    def get(key, default=None):
        v = args.get(key, default)
        return default if v is None else v

    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if args.get(key) is None:
            raise KeyError(f"{where}: args has no {key}")
    heads, hidden = int(args["num_attention_heads"]), int(args["hidden_size"])
    swiglu = bool(get("swiglu", False))
    cfg = {
        "num_layers": int(args["num_layers"]), "hidden_size": hidden,
        "ffn_hidden_size": int(get("ffn_hidden_size", 4 * hidden)), "num_attention_heads": heads,
        "num_query_groups": int(get("num_query_groups", heads)) if get("group_query_attention", False) else heads,
        "kv_channels": int(get("kv_channels", hidden // heads)),
        "layernorm_epsilon": float(get("norm_epsilon", get("layernorm_epsilon", 1e-5))),
        "normalization": get("normalization", "LayerNorm"),
        "gated_linear_unit": swiglu,
        "activation_func": {"_target_": "torch.nn.functional.silu" if swiglu else "torch.nn.functional.gelu"},
        "add_bias_linear": bool(get("add_bias_linear", True)),
        "add_qkv_bias": bool(get("add_qkv_bias", False)),
        "qk_layernorm": bool(get("qk_layernorm", False)),
        "position_embedding_type": get("position_embedding_type", "learned_absolute"),
        "rotary_base": float(get("rotary_base", 10000)),
        "rotary_percent": float(get("rotary_percent", 1.0)),
        "rotary_interleaved": bool(get("rotary_interleaved", False)),
        "seq_length": int(get("max_position_embeddings", get("seq_length", 2048))),
        "share_embeddings_and_output_weights": not bool(get("untie_embeddings_and_output_weights", False)),
        "num_moe_experts": get("num_experts"),
        "init_method_std": float(get("init_method_std", 0.02)),
        "seq_len_interpolation_factor": get("rotary_seq_len_interpolation_factor"),
    }
    if get("use_rope_scaling", False):   # megatron-core rope_utils.apply_rope_scaling's defaults (Llama 3.1)
        cfg.update(scale_factor=float(get("rope_scaling_factor", 8.0)), low_freq_factor=1.0, high_freq_factor=4.0,
                   old_context_len=8192)
    return cfg


def _spec(config: dict, where):
    from nemo_sdsearch.checkpoint.nemo_format import spec_from_nemo2

    return spec_from_nemo2({"config": config}, where)


# --------------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------------
def _has_tokenizer(d) -> bool:
    from nemo_sdsearch.checkpoint.formats import TOKENIZER_FILES

    return d is not None and Path(d).is_dir() and any((Path(d) / n).is_file() for n in TOKENIZER_FILES)


def _find_tokenizer(it: Path, step: Path | None, named: list) -> Path | None:
    for d in (it / TOKENIZER_DIR, step / NEMO_RL_TOKENIZER if step is not None else None,
              *(Path(n) for n in named if isinstance(n, str) and n)):
        if _has_tokenizer(d):
            return Path(d)
    return None


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def read(path, tokenizer_out=None, tokenizer=None) -> tuple[object, dict[str, torch.Tensor], Path | None, dict]:
    """(HF config, HF state dict, tokenizer directory, info) of a Megatron-LM / Megatron-Bridge / NeMo-RL
    checkpoint. `tokenizer`: a HF tokenizer directory (wins over the checkpoint's); without one and with
    none in the checkpoint, `TokenizerRequired` (the HF output would have no tokenizer and no EOS id).
    The tokenizer files are copied to `tokenizer_out` when given."""
    import yaml

    from nemo_sdsearch.checkpoint import dist_ckpt
    from nemo_sdsearch.checkpoint.nemo_format import _IGNORED, _normalise, _token_ids, check_global, global_to_hf

    found = locate(path)
    if found is None:
        raise FileNotFoundError(f"{path}: not a Megatron-LM / Megatron-Bridge checkpoint (iter_N/ with metadata.json, "
                                f"or a root with {TRACKER} / iter_N/) or a NeMo-RL step directory ({NEMO_RL_WEIGHTS}/)")
    kind, it, step = found
    named: list = []
    if kind == "megatron-lm":
        common = load_common(it / "common.pt")
        args = common.get("args")
        if args is None:
            raise ValueError(f"{it}/common.pt holds no 'args' (a Megatron-LM checkpoint saved without them; "
                             f"a Megatron-Bridge one has {RUN_CONFIG})")
        args = vars(args) if not isinstance(args, dict) else args
        spec = _spec(args_to_config(args, f"{it}/common.pt"), f"{it}/common.pt args")
        named.append(args.get("tokenizer_model"))
        info = {"iteration": common.get("iteration"), "checkpoint_version": common.get("checkpoint_version"),
                "tp": args.get("tensor_model_parallel_size"), "pp": args.get("pipeline_model_parallel_size")}
    else:
        run = yaml.safe_load((it / RUN_CONFIG).read_text()) or {}
        model = run.get("model")
        if not isinstance(model, dict):
            raise KeyError(f"{it / RUN_CONFIG}: no model: section")
        spec = _spec(model, f"{it / RUN_CONFIG}:model")
        tok_cfg = run.get("tokenizer") or {}
        named += [tok_cfg.get("tokenizer_model"), model.get("hf_model_id")]
        info = {"iteration": _iteration_of(it), "tp": model.get("tensor_model_parallel_size"),
                "pp": model.get("pipeline_model_parallel_size")}
        if step is not None and (step / NEMO_RL_CONFIG).is_file():
            policy = (yaml.safe_load((step / NEMO_RL_CONFIG).read_text()) or {}).get("policy") or {}
            named += [(policy.get("tokenizer") or {}).get("name"), policy.get("model_name")]
            info["step"] = step.name
    state = _normalise(dist_ckpt.load_model_tensors(it, "", roots=dist_ckpt.MODEL_ROOTS))
    state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
    rows = check_global(state, spec, it)
    vocab = spec.vocab_size or rows
    tok = Path(tokenizer) if tokenizer is not None else _find_tokenizer(it, step, named)
    if tok is None:
        raise TokenizerRequired(
            f"{path}: the checkpoint holds no tokenizer ({it / TOKENIZER_DIR}/ is absent"
            f"{'' if not [n for n in named if n] else ', and ' + ', '.join(repr(n) for n in named if n) + ' is not a local tokenizer directory'}): "
            "pass --tokenizer DIR (the HF tokenizer directory of the model it was trained from)")
    if not _has_tokenizer(tok):
        raise FileNotFoundError(f"--tokenizer {tok}: no tokenizer files there (tokenizer.json, tokenizer_config.json, ...)")
    if tokenizer_out is not None:
        from nemo_sdsearch.checkpoint.formats import copy_tokenizer

        copy_tokenizer(tok, tokenizer_out)
        tok = Path(tokenizer_out)
    spec.extra = {**_token_ids(tok), **spec.extra}
    from nemo_sdsearch.checkpoint.nemo_format import hf_config_from_spec

    info.update(format=kind, family=spec.family, iteration_dir=str(it))
    return hf_config_from_spec(spec, vocab), global_to_hf(state, spec, vocab), tok, info


def _iteration_of(it: Path) -> int | None:
    m = _ITER.match(it.name)
    return int(m.group(1)) if m else None


__all__ = ["KINDS", "TokenizerRequired", "args_to_config", "load_common", "locate", "read"]
