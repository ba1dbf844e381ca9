"""Evaluation under a trained run's settings (`sdsearch eval --run DIR`).

`sdsearch train` writes its resolved config to `DIR/config.json` at start and the trained weights to
`DIR/final` at the end (a Search-E1 run: the model named in `DIR/search_e1_state.json`). An evaluation of
that model must use the rollout budgets and the prompt it was trained with: this module reads them from the
run and resolves every evaluation setting as

    explicit flag  >  --preset (a paper's evaluation budgets: PRESETS)  >  the run's config.json  >  the schema
    default (nemo_sdsearch.config)

recording where each value came from, so the printed table and results.md state it.

Taken from the run: rollout.max_turns, max_new_tokens, max_context, topk, max_concurrent_rows, retriever
(with cluster.retrieval_url for `http`), reward.normalization (the EM definition), prompt.instruction and
prompt.chat_template, and data.test_files (the questions, when the run trained on files). Evaluation is
greedy (temperature 0), as the run's own dev and test evaluations are. The stop strings (`</search>`,
`</answer>`, EOS) are fixed in the rollout engine, the same for training and evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RunDirError(ValueError):
    """A --run directory that is missing, not a training run, or whose config.json is invalid."""


@dataclass(frozen=True)
class Spec:
    name: str              # the evaluation setting (RolloutConfig field or prompt key)
    key: str               # the training config key it comes from
    flag: str              # the `sdsearch eval` flag that overrides it
    kind: type             # int | str
    required: bool = True  # False: a run config without it falls back to the default (an older run)
    nullable: bool = False


# The settings a run fixes, in the order the table shows them.
SPECS: tuple[Spec, ...] = (
    Spec("max_new_tokens", "rollout.max_new_tokens", "--max-new-tokens", int),
    Spec("max_context", "rollout.max_context", "--max-context", int),
    Spec("max_turns", "rollout.max_turns", "--max-turns", int),
    Spec("topk", "rollout.topk", "--topk", int),
    Spec("max_concurrent_rows", "rollout.max_concurrent_rows", "--max-concurrent-rows", int, required=False),
    Spec("retriever", "rollout.retriever", "--retriever", str),
    Spec("retrieval_url", "cluster.retrieval_url", "--retrieval-url", str, required=False, nullable=True),
    Spec("normalization", "reward.normalization", "--em", str),
    Spec("instruction", "prompt.instruction", "--instruction", str),
    Spec("chat_template", "prompt.chat_template", "--chat-template", str),
)
BUDGETS = ("max_new_tokens", "max_context", "max_turns", "topk", "max_obs_tokens")

# `sdsearch eval --preset NAME`: a paper's evaluation settings, over the run's (explicit flags still win):
# setting -> (value, where the paper's code sets it). max_obs_tokens is an evaluation setting only (no training
# key: 0, no cap, without the preset or --max-obs-tokens). docs/search_r1.md has the table.
PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    # Search-R1 (PeterGriffinJin/Search-R1: train_grpo.sh / train_ppo.sh; the validation that produced its
    # table runs the same generation config, greedy: verl/trainer/ppo/ray_trainer.py `_validate`)
    "search_r1": {
        "max_turns": (2, "max_turns=2: searching turns, then a final turn without search"),
        "max_new_tokens": (500, "data.max_response_length=500: tokens per generation call (one turn)"),
        "max_context": (4596, "data.max_prompt_length=4096 (the context a turn is generated from) + a "
                              "500-token turn"),
        "topk": (3, "retriever.topk=3"),
        "max_obs_tokens": (500, "data.max_obs_length=500: tokens of one search's information block"),
        "instruction": ("search_r1", "its prompt (make_prefix in scripts/data_process/nq_search.py)"),
        "chat_template": ("auto", "verl's RLHFDataset: the tokenizer's chat template when it has one"),
        "normalization": ("squad", "its EM (verl/utils/reward_score/qa_em.py normalize_answer)"),
    },
}


@dataclass
class Setting:
    value: Any
    source: str    # "--flag", "run <key>" or "default"

    def as_dict(self) -> dict:
        return {"value": self.value, "from": self.source}


@dataclass
class TrainedRun:
    """What `sdsearch eval` takes from a run directory."""
    directory: Path
    values: dict[str, Any]                              # setting name -> value (only those present)
    model: Path | None                                  # the trained model; None: the run has none yet
    model_source: str
    test_files: list[str] = field(default_factory=list)
    algorithm: str | None = None


def defaults() -> dict[str, Any]:
    """The schema defaults (nemo_sdsearch.config): what `sdsearch eval` uses without a run or a flag."""
    from nemo_sdsearch.config import ClusterSection, PromptSection, RewardSection, RolloutSection

    sections = {"rollout": RolloutSection(), "cluster": ClusterSection(), "reward": RewardSection(),
                "prompt": PromptSection()}
    out = {}
    for s in SPECS:
        section, name = s.key.split(".")
        out[s.name] = getattr(sections[section], name)
    return out


def _lookup(raw: dict, key: str) -> tuple[bool, Any]:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check(spec: Spec, value: Any, where: str) -> Any:
    """The value of `spec.key` in a run config, checked as the training config checks it."""
    from nemo_sdsearch.config import CHOICES, RANGES

    bad = lambda why: RunDirError(f"{where}: {spec.key} {why}, got {value!r}")
    if value is None:
        if spec.nullable:
            return None
        raise bad("must not be null")
    if spec.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad("must be an integer")
    if spec.kind is str and not isinstance(value, str):
        raise bad("must be a string")
    if spec.key in RANGES and not RANGES[spec.key].holds(value):
        raise bad(RANGES[spec.key].describe())
    if spec.key in CHOICES and value not in CHOICES[spec.key]:
        raise bad(f"must be one of {', '.join(CHOICES[spec.key])}")
    return value


def load_run(run_dir: str | Path) -> TrainedRun:
    """Read and check `run_dir/config.json`; find the trained model. Raises RunDirError with the reason."""
    d = Path(run_dir)
    if not d.exists():
        raise RunDirError(f"--run {d}: no such directory")
    if not d.is_dir():
        raise RunDirError(f"--run {d}: not a directory (give the run's directory, trainer.out_dir)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        hint = (f"; {d / 'final'} exists, so --run {d} looks right but its config.json was removed"
                if (d / "final").is_dir() else "")
        raise RunDirError(f"--run {d}: no config.json, so not a `sdsearch train` run directory (train writes "
                          f"config.json into trainer.out_dir when it starts){hint}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{cfg_path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{cfg_path}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise RunDirError(f"{cfg_path}: not a training config (a JSON object), got {type(raw).__name__}")
    if "rollout" not in raw and ("model_type" in raw or "architectures" in raw):
        raise RunDirError(f"{cfg_path} is a Hugging Face model config, not a training run's: give the run "
                          f"directory (the parent of final/) to --run, or this directory to --model")
    values = {}
    for spec in SPECS:
        present, value = _lookup(raw, spec.key)
        if not present:
            if spec.required:
                raise RunDirError(f"{cfg_path}: no {spec.key}, so not a config written by `sdsearch train` "
                                  f"(or one too old to evaluate under; give {spec.flag} instead)")
            continue
        values[spec.name] = _check(spec, value, str(cfg_path))
    _, test_files = _lookup(raw, "data.test_files")
    if test_files is None:
        test_files = []
    if not isinstance(test_files, list) or not all(isinstance(f, str) for f in test_files):
        raise RunDirError(f"{cfg_path}: data.test_files must be a list of file names, got {test_files!r}")
    _, algorithm = _lookup(raw, "algorithm")
    model, source = _trained_model(d)
    return TrainedRun(d, values, model, source, list(test_files), algorithm)


def _trained_model(d: Path) -> tuple[Path | None, str]:
    if (d / "final" / "config.json").is_file():
        return d / "final", "run final/"
    state = d / "search_e1_state.json"
    if state.is_file():
        try:
            final = json.loads(state.read_text()).get("final_model")
        except (json.JSONDecodeError, OSError, AttributeError):
            final = None
        if final and (Path(final) / "config.json").is_file():
            return Path(final), "run search_e1_state.json final_model"
    return None, "run (none)"


def resolve(flags: dict[str, Any], run: TrainedRun | None, preset: str | None = None) -> dict[str, Setting]:
    """Every setting of SPECS: the flag when given (not None), else the preset's (`PRESETS[preset]`), else the
    run's value, else the default; and max_obs_tokens (flag, else the preset's, else 0: no cap)."""
    base = defaults()
    chosen = PRESETS[preset] if preset else {}
    out: dict[str, Setting] = {}
    for spec in SPECS:
        if flags.get(spec.name) is not None:
            out[spec.name] = Setting(flags[spec.name], spec.flag)
        elif spec.name in chosen:
            out[spec.name] = Setting(chosen[spec.name][0], f"--preset {preset} ({chosen[spec.name][1]})")
        elif run is not None and spec.name in run.values:
            out[spec.name] = Setting(run.values[spec.name], f"run {spec.key}")
        else:
            note = " (not in the run's config)" if run is not None else ""
            out[spec.name] = Setting(base[spec.name], "default" + note)
    # the retriever: --no-retrieval > --retrieval-url (the http client; as before, it wins over
    # --retriever) > --retriever > the run's rollout.retriever (http: with the run's cluster.retrieval_url)
    if flags.get("no_retrieval"):
        out["retriever"] = Setting(None, "--no-retrieval")
        out["retrieval_url"] = Setting(None, "unused (--no-retrieval)")
    elif flags.get("retrieval_url") is not None:
        out["retriever"] = Setting("http", "--retrieval-url")
    elif out["retriever"].value == "http":
        if not out["retrieval_url"].value:
            raise RunDirError(f"retriever http ({out['retriever'].source}) needs the retrieval service and "
                              f"cluster.retrieval_url is empty; give --retrieval-url URL, or --retriever "
                              f"bm25/dense")
    else:
        out["retrieval_url"] = Setting(None, f"unused ({out['retriever'].value} retriever)")
    if flags.get("max_obs_tokens") is not None:
        out["max_obs_tokens"] = Setting(flags["max_obs_tokens"], "--max-obs-tokens")
    elif "max_obs_tokens" in chosen:
        value, where = chosen["max_obs_tokens"]
        out["max_obs_tokens"] = Setting(value, f"--preset {preset} ({where})")
    else:
        out["max_obs_tokens"] = Setting(0, "default (no cap: information is cut only to fit max_context)")
    ctx, new = out["max_context"], out["max_new_tokens"]
    if ctx.value <= new.value:
        raise RunDirError(f"max_context {ctx.value} ({ctx.source}) must exceed max_new_tokens {new.value} "
                          f"({new.source})")
    return out


def as_record(settings: dict[str, Setting]) -> dict[str, dict]:
    """{name: {"value", "from"}}: what EvalReport.settings holds (results.json, results.md)."""
    return {name: s.as_dict() for name, s in settings.items()}


def budgets_line(settings: dict[str, Setting]) -> str:
    """One line: the rollout budgets used and their sources."""
    return "rollout budgets: " + ", ".join(f"{k}={settings[k].value} ({settings[k].source})" for k in BUDGETS)
