"""bench/teacher_signal.py: the teacher-student log-ratio per search query (is the hindsight teacher read?)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "teacher_signal.py"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("teacher_signal", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_query_spans_are_the_runs_of_the_mask(ts):
    F, T = False, True
    assert ts.query_spans([F, T, T, F, T, F, F, T]) == [(1, 3), (4, 5), (7, 8)]
    assert ts.query_spans([F, F]) == []
    assert ts.query_spans([T, T]) == [(0, 2)]


def test_difference_interval_adds_the_variances(ts):
    d, h = ts.diff_ci([1.0, 3.0], [0.0, 0.0, 0.0])
    assert d == pytest.approx(2.0)
    assert h == pytest.approx(1.96 * (2.0 / 2) ** 0.5)  # var 2 over 2 values; the constant group adds none


def test_a_teacher_that_sees_the_student_prompt_has_zero_log_ratio_at_every_query(ts):
    """With the teacher prompt equal to the student's, every query's log-ratio and JSD are 0, and every query
    the rollout made is scored once (the shift aligns the teacher twin of each query token)."""
    from nemo_sdsearch.algorithms.setup import build_components, close_components
    from nemo_sdsearch.config import load_config

    cfg = load_config("tiny_cpu", ["model.threads=1", "rollout.group_size=2", "grpo.kl_coef=0"])
    c = build_components(cfg)
    questions = c.data["train"][:4]
    trajs = c.engines["train"].run(questions, n_samples=2, seed=0)
    prompt_of = {t.question: t.token_ids[:t.prompt_length] for t in trajs}
    scored = ts.score_queries(c.actor, trajs, ["unused"] * 4, 2, lambda q, b: prompt_of[q], cfg.sd,
                              c.tok.pad_token_id, micro=3)
    assert sum(len(t.queries) for t in trajs) == len(scored) > 0
    for t_index, t in enumerate(trajs):
        assert sorted(q["query"] for q in scored if q["traj"] == t_index) == list(range(len(t.queries)))
    assert max(abs(q["log_ratio"]) for q in scored) < 1e-4  # fp32 model, other padding: rounding only
    assert max(q["jsd"] for q in scored) < 1e-6

    # a real hindsight block shifts the teacher: the log-ratios move off zero
    blocks = [f'Hindsight from 2 attempts at this question:\nAttempt 1 (correct): search "{q.question}"' for q in questions]
    from nemo_sdsearch.algorithms.setup import make_prompt_format

    prompts = make_prompt_format(cfg, c.tok)
    enc = lambda s: c.tok.encode(s, add_special_tokens=False)  # noqa: E731
    moved = ts.score_queries(c.actor, trajs, blocks, 2, lambda q, b: enc(prompts.teacher(q, b)), cfg.sd,
                             c.tok.pad_token_id)
    close_components(c)
    assert len(moved) == len(scored)
    assert max(abs(q["log_ratio"]) for q in moved) > 1e-3


def test_the_bench_writes_real_control_and_paired_figures(ts, tmp_path):
    out = tmp_path / "signal.json"
    assert ts.main(["--questions", "3", "--out", str(out), "model.threads=1", "rollout.group_size=2"]) == 0
    r = json.loads(out.read_text())
    assert r["questions"] == 3 and r["group_size"] == 2
    assert r["real"]["queries"] == r["control"]["queries"] == r["read"]["queries"] > 0
    for name in ("real", "control", "read"):
        split = r[name]["attempt correct / wrong"]
        assert split["good_n"] + split["bad_n"] == r[name]["queries"]  # every query's attempt is one or the other
    assert r["real"]["mean_jsd_per_token"] >= 0
