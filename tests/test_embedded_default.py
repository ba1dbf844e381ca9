"""The embedded default: the shipped warm-started model searches, and search is what answers the test
world (a different world from the training one)."""

import json

import pytest

from nemo_sdsearch.cli import main


@pytest.mark.slow
def test_shipped_model_answers_with_search_and_not_without(tmp_path):
    """Issue 2's targets on the bundled test world (greedy, so the numbers are fixed for the shipped
    weights): EM at least 0.30 with retrieval on all 300 questions (0.397), at most 0.05 without on the first
    40 (0.000 on all 300; the no-retrieval rollouts search to the turn limit, so they cost twice as much: 40
    keep the suite's time down and still cannot score 0.05 by luck at the shipped policy's 0.000)."""
    out_with, out_without = tmp_path / "with", tmp_path / "without"
    common = ["eval", "--quiet", "--threads", "2"]
    assert main(common + ["--out", str(out_with)]) == 0
    assert main(common + ["--no-retrieval", "--limit", "40", "--out", str(out_without)]) == 0
    results = json.loads((out_with / "results.json").read_text())
    with_search = results["scores"]["tiny-world-test"]
    without = json.loads((out_without / "results.json").read_text())["scores"]["tiny-world-test"]
    assert with_search["all"]["n"] == 300 and without["all"]["n"] == 40
    assert with_search["all"]["em"] >= 0.30
    assert without["all"]["em"] <= 0.05
    assert with_search["all"]["searches"] >= 1.0
    assert set(with_search) == {"all", "single_hop", "bridge", "comparison"}
    # every kind is answered, the two-search kinds included
    assert all(with_search[k]["em"] > 0.2 for k in ("single_hop", "bridge", "comparison"))
    # Issue 16: room to improve the queries. The ideal query finds every hop's evidence (tests/test_world.py);
    # the shipped policy's first query finds it for about half the questions (0.527), and it answers well when
    # it did (0.709 EM) and rarely when it did not (0.049). The evaluation records what each search retrieved.
    preds = results["predictions"]["tiny-world-test"]
    rows = [(p["first_query_hit"], p["em"]) for p in preds]
    hit, miss = [em for first, em in rows if first], [em for first, em in rows if not first]
    assert len(hit) / len(rows) == with_search["all"]["first_query_hit"]
    assert 0.3 <= len(hit) / len(rows) <= 0.8
    assert sum(hit) / len(hit) >= 0.6 and sum(miss) / len(miss) <= 0.2


def test_shipped_assets_are_complete():
    from transformers import AutoConfig, AutoTokenizer

    from nemo_sdsearch.world.assets import default_model_dir

    d = default_model_dir()
    record = json.loads((d / "warmstart.json").read_text())
    assert record["steps"] > 0 and record["config"]["model"] == "tiny"
    cfg = AutoConfig.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(tok)
    assert (d / "model.safetensors").stat().st_size < 20 * 2**20  # small enough to ship
