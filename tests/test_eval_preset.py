"""`sdsearch eval --preset search_r1`: Search-R1's evaluation budgets in one flag (eval/run_config.py PRESETS,
docs/search_r1.md), over the run's settings and the defaults, explicit flags still winning; and the information
cap it sets (`--max-obs-tokens`, Search-R1's max_obs_length) cutting each search's information block."""

import json
from pathlib import Path

import pytest
from scripted import ScriptedTurns

from nemo_sdsearch.cli import main
from nemo_sdsearch.eval import run_config

# Search-R1's values (PeterGriffinJin/Search-R1 train_grpo.sh: max_turns=2, data.max_response_length=500,
# data.max_prompt_length=4096, data.max_obs_length=500, retriever.topk=3; its prompt and EM), written out here
# so that a changed preset fails
SEARCH_R1 = {"max_turns": 2, "max_new_tokens": 500, "max_context": 4096 + 500, "topk": 3, "max_obs_tokens": 500,
             "instruction": "search_r1", "chat_template": "auto", "normalization": "squad"}


def test_the_preset_sets_search_r1s_budgets_over_the_run_and_under_the_flags():
    run = run_config.TrainedRun(Path("/runs/x"), {"max_turns": 4, "max_new_tokens": 96, "max_context": 1024,
                                                  "topk": 5, "instruction": "default", "normalization": "unicode",
                                                  "chat_template": "none", "retriever": "bm25"},
                                None, "run (none)")
    got = run_config.resolve({}, run, preset="search_r1")
    assert {k: got[k].value for k in SEARCH_R1} == SEARCH_R1
    assert all(got[k].source.startswith("--preset search_r1 (") for k in SEARCH_R1)
    assert "max_obs_length=500" in got["max_obs_tokens"].source and "max_turns=2" in got["max_turns"].source
    assert got["retriever"].value == "bm25" and got["retriever"].source == "run rollout.retriever"  # not preset
    # explicit flags override the preset
    flagged = run_config.resolve({"max_turns": 3, "max_obs_tokens": 64, "normalization": "unicode"}, run,
                                 preset="search_r1")
    assert (flagged["max_turns"].value, flagged["max_turns"].source) == (3, "--max-turns")
    assert (flagged["max_obs_tokens"].value, flagged["max_obs_tokens"].source) == (64, "--max-obs-tokens")
    assert flagged["normalization"].value == "unicode" and flagged["topk"].value == 3
    # without the preset: the run's values, and no information cap
    plain = run_config.resolve({}, run)
    assert (plain["max_turns"].value, plain["topk"].value, plain["max_obs_tokens"].value) == (4, 5, 0)


def test_sdsearch_eval_preset_search_r1(micro_model_dir, tmp_path, monkeypatch):
    """The CLI end to end (the micro model, two bundled test questions): the engine runs with the preset's
    settings except the budgets given as flags (kept small here), and results.json records each one's source."""
    from nemo_sdsearch.eval import harness

    seen = {}
    real = harness.evaluate
    monkeypatch.setattr(harness, "evaluate", lambda engine, datasets, **kw: (seen.setdefault("cfg", engine.cfg),
                                                                             real(engine, datasets, **kw))[1])
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(micro_model_dir[0]), "--preset", "search_r1", "--max-new-tokens", "16",
                 "--max-context", "600", "--limit", "2", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    c = seen["cfg"]
    assert (c.max_turns, c.topk, c.max_obs_tokens, c.normalization, c.max_new_tokens, c.max_context) == \
        (2, 3, 500, "squad", 16, 600)
    s = json.loads((out / "results.json").read_text())["settings"]
    assert s["max_obs_tokens"]["value"] == 500 and s["max_obs_tokens"]["from"].startswith("--preset search_r1")
    assert s["instruction"]["value"] == "search_r1" and s["max_new_tokens"] == {"value": 16, "from": "--max-new-tokens"}


class _LongPassages:
    def search(self, queries, topk=3):
        from nemo_sdsearch.retrieval import Document

        return [[Document(id=str(i), contents=f"\"Title {i}\"\n" + "long text " * 40) for i in range(topk)]
                for _ in queries]


@pytest.mark.parametrize("cap", [0, 60])
def test_max_obs_tokens_cuts_each_information_block(char_tokenizer, cap):
    from nemo_sdsearch.core.qa import QA
    from nemo_sdsearch.core.spans import SpanType
    from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine

    engine = RolloutEngine(ScriptedTurns(char_tokenizer, lambda row, q: ["<search> x </search>", "<answer> y </answer>"]),
                           _LongPassages(), RolloutConfig(max_turns=1, max_new_tokens=40, max_context=8000,
                                                          max_obs_tokens=cap))
    (t,) = engine.run([QA("q", "Q?", ["y"])])
    info = [i for i, s in enumerate(t.span_types) if s == SpanType.INFORMATION]
    text = char_tokenizer.decode([t.token_ids[i] for i in info])
    assert t.answer == "y" and text.rstrip().endswith("</information>")
    if cap:
        assert len(info) == cap     # cut to the cap, its closing tag kept
    else:
        assert len(info) > 3 * 400  # all three passages (3 x 40 x "long text ")
