"""The embedded default: the shipped warm-started model searches, and search is what answers the test
world (a different world from the training one)."""

import json

import pytest

from nemo_sdsearch.cli import main


@pytest.mark.slow
def test_shipped_model_answers_with_search_and_not_without(tmp_path):
    """Issue 2's targets on the whole bundled test world (300 questions, greedy, so the numbers are fixed
    for the shipped weights): EM at least 0.30 with retrieval, at most 0.05 without."""
    out_with, out_without = tmp_path / "with", tmp_path / "without"
    common = ["eval", "--quiet", "--threads", "2"]
    assert main(common + ["--out", str(out_with)]) == 0
    assert main(common + ["--no-retrieval", "--out", str(out_without)]) == 0
    with_search = json.loads((out_with / "results.json").read_text())["scores"]["tiny-world-test"]
    without = json.loads((out_without / "results.json").read_text())["scores"]["tiny-world-test"]
    assert with_search["all"]["n"] == 300 and without["all"]["n"] == 300
    assert with_search["all"]["em"] >= 0.30
    assert without["all"]["em"] <= 0.05
    assert with_search["all"]["searches"] >= 1.0
    assert set(with_search) == {"all", "single_hop", "bridge", "comparison"}
    # every kind is answered, the two-search kinds included
    assert all(with_search[k]["em"] > 0.2 for k in ("single_hop", "bridge", "comparison"))


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
