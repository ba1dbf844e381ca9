"""The embedded default: the shipped warm-started model searches, and search is what answers the test
world (a different world from the training one)."""

import json

import pytest

from nemo_sdsearch.cli import main


@pytest.mark.slow
def test_shipped_model_answers_with_search_and_not_without(tmp_path):
    out_with, out_without = tmp_path / "with", tmp_path / "without"
    common = ["eval", "--limit", "40", "--quiet", "--threads", "2"]
    assert main(common + ["--out", str(out_with)]) == 0
    assert main(common + ["--no-retrieval", "--out", str(out_without)]) == 0
    with_search = json.loads((out_with / "results.json").read_text())["scores"]["tiny-world-test"]
    without = json.loads((out_without / "results.json").read_text())["scores"]["tiny-world-test"]
    # The shipped warm start does not yet reach the 0.30 EM target of issue 2 (see its note); what it must
    # show is that search is what answers: never worse with passages, at most chance without them.
    assert with_search["all"]["em"] >= without["all"]["em"]
    assert without["all"]["em"] <= 0.05
    assert with_search["all"]["searches"] >= 1.0
    assert set(with_search) == {"all", "single_hop", "bridge", "comparison"}


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
