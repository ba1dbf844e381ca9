"""No FutureWarning / DeprecationWarning from our own calls into transformers, peft or megatron-core.

A routine upgrade of those libraries must not be the first to tell us that an argument or API we use is
going away: each deprecation they announce for something we call fails here, while the old and the new
spelling still both work.

How: the representative code paths below (loading the embedded model, a TorchGenerator rollout, an
HFActor train step, a peft LoRA wrap + rollout + merge, a megatron-core GPTModel built, run and trained
on CPU) run in ONE fresh spawned process (world size 1, gloo), each under
`warnings.catch_warnings(record=True)` + `simplefilter("always")`. A fresh process because libraries
warn once per process (warning registries, `warn_once` caches, import-time warnings): run after other
tests, a path could stay silent here. `simplefilter("always")` inside the recording also overrides
pyproject's `filterwarnings = ["ignore::DeprecationWarning"]` and any `-W` flags.

Which recorded warnings count as OURS (the rule; third-party internal warnings do not fail the test):
  a FutureWarning or DeprecationWarning (or a subclass) that either
  (a) is attributed to our code: `w.filename` is under nemo_sdsearch/ or tests/ (the library's
      `stacklevel` points at our call), or
  (b) is raised from inside transformers, peft or megatron and its message names (in backticks or
      quotes, or as `name=`) an argument or API we use: a keyword argument we pass anywhere in
      nemo_sdsearch/, a method we call on an object there, a name we import from those libraries
      (all read from our source with `ast`), or a cache keyword we pass dynamically (`DYNAMIC_NAMES`).
      Needed because transformers' decorators often attribute the warning to their own wrapper
      (e.g. `past_key_values` was reported at transformers/utils/output_capturing.py), or
  (c) is attributed to torch's nn.Module call machinery (torch/nn/modules/module.py: `model(...)` dispatching
      to a library's forward) and its message names such an API: transformers 5.25 reports the
      `past_key_values` deprecation of `Qwen2ForCausalLM.forward` there.
  The canary (`_deprecated_call`: the model called with the spelling transformers deprecates) must come out as
  ours: if the recording or the rule stopped seeing a real deprecated call, every check here would pass
  vacuously.
  Anything else (e.g. peft calling a deprecated transformers property on its own) is library-internal:
  it is printed by `test_report_library_internal_warnings` for information, never failed on.
"""

from __future__ import annotations

import ast
import re
import warnings
from functools import lru_cache
from pathlib import Path

import pytest

from _mp import run_workers  # noqa: E402 - tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_DIRS = (ROOT / "nemo_sdsearch", ROOT / "tests")
LIBS = ("transformers", "peft", "megatron")
# Keywords we pass through `**{name: value}` (invisible to the AST scan): the torch generator's KV cache
# (`rollout.torch_generator._cache_kwarg`).
DYNAMIC_NAMES = {"cache", "past_key_values"}
PATHS = ["load_embedded_model", "torch_generator_rollout", "hf_actor_train_step", "peft_lora_wrap_and_merge",
         "megatron_gpt_model"]


# --------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def our_api_names() -> frozenset[str]:
    """Keyword arguments we pass, methods we call, and names we import from transformers/peft/megatron,
    anywhere in nemo_sdsearch/."""
    names = set(DYNAMIC_NAMES)
    for path in (ROOT / "nemo_sdsearch").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBS:
                names.update(a.name for a in node.names)
    return frozenset(names)


def library_of(filename: str) -> str | None:
    """'transformers' / 'peft' / 'megatron' when the file is inside that package, else None."""
    parts = Path(filename).parts
    for lib in LIBS:
        if lib in parts and ("site-packages" in parts or "dist-packages" in parts
                             or (lib == "megatron" and "core" in parts)):
            return lib
    return None


def is_module_call(filename: str) -> bool:
    """torch's nn.Module call machinery, where a warning from a forward called as `model(...)` can land."""
    return Path(filename).parts[-4:] == ("torch", "nn", "modules", "module.py")


def is_ours(filename: str) -> bool:
    p = Path(filename).resolve()
    return any(p.is_relative_to(d) for d in OUR_DIRS)


_NAMED = re.compile(r"`([^`]+)`|'([A-Za-z_][\w.]*)'|\"([A-Za-z_][\w.]*)\"|\b([A-Za-z_]\w*)=")


def names_in(message: str) -> set[str]:
    """Identifiers a warning message names: `x`, 'x', "x" or x= ; `a.b(...)` also gives `b`. (`classify` leaves
    out a library's own name: `megatron-core` in a message names the package, not a call of ours, even though
    `megatron=` is a keyword we pass to dataclasses.replace.)"""
    out = set()
    for m in _NAMED.finditer(message):
        text = next(g for g in m.groups() if g)
        ident = re.match(r"[A-Za-z_][\w.]*", text.strip())
        if ident:
            dotted = ident.group(0).strip(".")
            out.add(dotted)
            out.add(dotted.rsplit(".", 1)[-1])
    return out


def classify(rec: dict, api: frozenset[str]) -> str | None:
    """'ours' / 'library' for a FutureWarning or DeprecationWarning record, None for other warnings."""
    if not rec["deprecation"]:
        return None
    if is_ours(rec["filename"]):
        return "ours"
    if (library_of(rec["filename"]) or is_module_call(rec["filename"])) and (names_in(rec["message"]) - set(LIBS)) & api:
        return "ours"
    return "library"


def fmt(rec: dict) -> str:
    return f"{rec['category']}: {rec['message']}  [{rec['filename']}:{rec['lineno']}]"


# --------------------------------------------------------------------------------------------------
# the code paths (run in the spawned process)
# --------------------------------------------------------------------------------------------------
def _load():
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.world.assets import default_model_dir

    return load_model_and_tokenizer(default_model_dir(), device="cpu")


def _rollout(model, tok):
    from nemo_sdsearch.rollout.generator import SamplingParams
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator

    prompts = [tok.encode("Question: where was the founder of the city born? " * 2 + s) for s in ("a", "bb")]
    session = TorchGenerator(model, tok).open(prompts, seed=0)
    turns = {}

    def on_turn(done):  # one environment insert per row, then stop: exercises the per-row prefill too
        env = {}
        for r in done:
            turns[r] = turns.get(r, 0) + 1
            env[r] = tok.encode("<information>Doc 1</information>") if turns[r] == 1 else None
        return env

    session.run(lambda r: SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9), on_turn)
    assert len(turns) == 2


def _batch(tok):
    from nemo_sdsearch.models.base import SequenceBatch, positions_from_mask

    batch = SequenceBatch.from_lists([tok.encode("Who founded the city?"), tok.encode("It was 1870.")],
                                     pad_id=tok.pad_token_id)
    return batch, positions_from_mask(batch.attention_mask.bool())


def _hf_train_step(model, tok):
    from nemo_sdsearch.models.hf import HFActor

    actor = HFActor(model, lr=1e-4)
    batch, (rows, cols) = _batch(tok)
    stats = actor.train_step(lambda i: -actor.logprobs_at(batch, rows, cols).mean(), 1)
    assert not stats["skipped"]


def _peft(model, tok):
    from types import SimpleNamespace

    import torch

    from nemo_sdsearch.algorithms.search_e1 import add_lora

    cfg = SimpleNamespace(search_e1=SimpleNamespace(lora_r=4, lora_alpha=8))  # the fields add_lora reads
    peft_model = add_lora(model, cfg)
    batch, (rows, cols) = _batch(tok)
    from nemo_sdsearch.models.hf import HFScorer

    scorer = HFScorer(peft_model)
    loss = -scorer.logprobs_at(batch, rows, cols).mean()
    loss.backward()
    with peft_model.disable_adapter(), torch.no_grad():
        scorer.logits_at(batch, rows, cols)
    _rollout(peft_model, tok)
    merged = peft_model.merge_and_unload()
    assert not hasattr(merged, "peft_config")


def _megatron(model, tok):
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    init_parallel(1)
    try:
        actor = MegatronActor.from_hf(model, lr=1e-4)
        batch, (rows, cols) = _batch(tok)
        actor.logits_at(batch, rows, cols)
        stats = actor.train_step(lambda i: -actor.logprobs_at(batch, rows, cols).mean(), 1)
        assert not stats["skipped"]
    finally:
        teardown_parallel()


def _deprecated_call(model, tok):
    """The canary: the model called with the KV-cache keyword transformers deprecates (`past_key_values=` where
    the forward takes `cache`, 5.24 on). False where this transformers deprecates nothing of the kind."""
    import inspect

    import torch
    from transformers import DynamicCache

    if "cache" not in inspect.signature(model.model.forward).parameters:
        return False
    with torch.no_grad():
        model(torch.tensor([tok.encode("Who founded it?")]), past_key_values=DynamicCache(config=model.config),
              use_cache=True)
    return True


def _record(fn, *args):
    """(records, error) of running fn under a full warnings recording."""
    import traceback

    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            out, err = fn(*args), None
        except Exception:  # report, so that the other paths still run
            out, err = None, traceback.format_exc()
    recs = [{"category": w.category.__name__, "message": str(w.message), "filename": w.filename,
             "lineno": w.lineno, "deprecation": issubclass(w.category, (FutureWarning, DeprecationWarning))}
            for w in ws]
    return out, recs, err


def _worker(rank, world):
    import importlib.util

    import torch

    torch.manual_seed(0)
    res = {}
    loaded, res["load_embedded_model"], err = _record(_load)
    if err:
        return {p: ([], err) for p in PATHS}
    res["load_embedded_model"] = (res["load_embedded_model"], None)
    model, tok = loaded
    for name, fn in [("torch_generator_rollout", _rollout), ("hf_actor_train_step", _hf_train_step),
                     ("peft_lora_wrap_and_merge", _peft)]:
        model, tok = _load()  # a fresh copy each (the train step and LoRA change the model)
        _, recs, err = _record(fn, model, tok)
        res[name] = (recs, err)
    if importlib.util.find_spec("megatron.core") is None:
        res["megatron_gpt_model"] = None
    else:
        model, tok = _load()
        _, recs, err = _record(_megatron, model, tok)
        res["megatron_gpt_model"] = (recs, err)
    model, tok = _load()   # last: whatever it triggers once per process cannot hide a warning from a path above
    res["canary"] = _record(_deprecated_call, model, tok)
    return res


@pytest.fixture(scope="module")
def recorded():
    return run_workers(_worker, 1, timeout=300)[0]


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_no_deprecation_warnings_from_our_calls(recorded, path):
    if recorded[path] is None:
        pytest.skip("megatron-core is not installed")
    recs, err = recorded[path]
    assert err is None, f"{path} failed:\n{err}"
    api = our_api_names()
    ours = sorted({fmt(r) for r in recs if classify(r, api) == "ours"})
    assert not ours, f"{path}: deprecations from our calls:\n" + "\n".join(ours)


def test_a_deprecated_call_is_caught_and_library_warnings_are_reported(recorded):
    """The recording and the rule see a real deprecated call as ours (the canary); the library-internal
    deprecations seen are listed for information (run with -s or -rP to read them)."""
    api = our_api_names()
    seen = sorted({fmt(r) for k, v in recorded.items() if k != "canary" and v for r in v[0]
                   if classify(r, api) == "library"})
    for line in seen:
        print("[library-internal deprecation, not ours]", line)
    ran, recs, err = recorded["canary"]
    assert err is None, err
    if not ran:
        pytest.skip("this transformers does not deprecate past_key_values: no canary")
    caught = [r for r in recs if r["deprecation"] and "past_key_values" in names_in(r["message"])]
    assert caught, "the canary's deprecated call left no FutureWarning in the recording"
    assert all(classify(r, api) == "ours" for r in caught), [fmt(r) for r in caught]


def test_the_rule():
    """The attribution rule on the warning that motivated this file (transformers 5.24)."""
    api = our_api_names()
    site = "/x/lib/python3.11/site-packages"
    rec = {"category": "FutureWarning", "deprecation": True, "lineno": 361,
           "filename": f"{site}/transformers/utils/output_capturing.py",
           "message": "`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                      "`Qwen2Model.forward`. Use `cache` instead."}
    assert classify(rec, api) == "ours"
    peft_internal = dict(rec, filename=f"{site}/transformers/modeling_utils.py",
                         message="`is_gradient_checkpointing` is deprecated and will be removed in v6. "
                                 "Use `is_activation_checkpointing` instead.")
    assert classify(peft_internal, api) == "library"
    assert classify(dict(peft_internal, filename=str(ROOT / "nemo_sdsearch/models/hf.py")), api) == "ours"
    assert classify(dict(rec, deprecation=False, category="UserWarning"), api) is None
    # transformers 5.25 attributes the same warning to torch's nn.Module call machinery: still ours
    assert classify(dict(rec, filename=f"{site}/torch/nn/modules/module.py"), api) == "ours"
    # torch's own deprecations elsewhere are not, even when they name something we call (`compile`: re.compile)
    torch_internal = dict(rec, filename=f"{site}/torch/jit/_script.py",
                          message="`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.")
    assert "compile" in api and classify(torch_internal, api) == "library"
    # a module.py warning that names nothing we use stays the library's
    hooks = dict(rec, filename=f"{site}/torch/nn/modules/module.py",
                 message="Using a non-full backward hook when the forward contains multiple autograd Nodes is deprecated")
    assert classify(hooks, api) == "library"
