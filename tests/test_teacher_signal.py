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


def test_t_interval_and_within_group_directions(ts):
    m, h = ts.mean_ci([1.0, 3.0, 2.0])
    assert m == 2.0 and h == pytest.approx(4.3027 * 1.0 / 3 ** 0.5, rel=1e-4)   # t_0.975(2) = 4.3027 (tables)
    # group 0: correct queries (traj 0) +1 and +3 per token, wrong (traj 1) -1: direction 3; group 1 has no
    # wrong attempt with a query: left out; per query sums differ from per-token means
    scored = [{"traj": 0, "per_token": 1.0, "log_ratio": 2.0}, {"traj": 0, "per_token": 3.0, "log_ratio": 9.0},
              {"traj": 1, "per_token": -1.0, "log_ratio": -4.0}, {"traj": 2, "per_token": 5.0, "log_ratio": 5.0}]
    correct = [True, False, True, False]
    assert ts.group_directions(scored, correct, 2, "per_token") == {0: 3.0}
    assert ts.group_directions(scored, correct, 2, "per_query") == {0: 9.5}
    assert ts.paired({0: 3.0, 1: 1.0}, {0: 1.0, 2: 7.0}) == [2.0]


def test_label_swap_blocks_differ_only_in_the_labels(ts):
    """The contrast's two blocks list the same attempts in the same order; only correct/wrong change."""
    from types import SimpleNamespace

    from nemo_sdsearch.algorithms.sd_search import rollout_hindsight_blocks
    from nemo_sdsearch.core.trajectory import Trajectory

    trajs = []
    for k, (em, qs) in enumerate([(0.0, ["a b"]), (1.0, ["c d"]), (0.0, ["e f"]), (1.0, ["g h"])]):
        t = Trajectory.start(f"q{k // 2}", "Q?", ["x"], [1, 2])
        t.queries, t.answer = list(qs), "x" if em else "y"
        trajs.append(t)
    sd = SimpleNamespace(include_answers=False, include_gold=False, max_hindsight_tokens=1000,
                         hindsight_members="group", hindsight_source="own", hindsight_order="group")
    true = rollout_hindsight_blocks(trajs, 2, sd, lambda s: len(s.split()))
    swapped = rollout_hindsight_blocks(trajs, 2, sd, lambda s: len(s.split()), outcomes=ts.flipped(trajs))
    assert true[0] == 'Hindsight from 2 attempts at this question:\nAttempt 1 (wrong): search "a b"\nAttempt 2 (correct): search "c d"'
    assert swapped[0] == true[0].replace("wrong", "X").replace("correct", "wrong").replace("X", "correct")
    assert [t.exact_match for t in trajs] == [0.0, 1.0, 0.0, 1.0]   # the originals are untouched
    assert ts.mixed_groups(trajs + [trajs[0], trajs[0]], 2) == trajs   # an all-wrong group is left out
    others = rollout_hindsight_blocks(trajs, 2, dict_ns(sd, hindsight_members="others"), lambda s: len(s.split()),
                                      outcomes=ts.flipped(trajs))
    assert others[0] == 'Hindsight from 1 attempts at this question:\nAttempt 1 (wrong): search "c d"'


def dict_ns(ns, **kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(ns), **kw})


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
    scored = ts.score_queries(c.actor, trajs, ["unused"] * len(trajs), lambda q, b: prompt_of[q], cfg.sd,
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
    moved = ts.score_queries(c.actor, trajs, [blocks[i // 2] for i in range(len(trajs))],
                             lambda q, b: enc(prompts.teacher(q, b)), cfg.sd, c.tok.pad_token_id)
    close_components(c)
    assert len(moved) == len(scored)
    assert max(abs(q["log_ratio"]) for q in moved) > 1e-3


def test_the_bench_prints_its_target_lines_and_figures(ts, tmp_path, capsys):
    out = tmp_path / "signal.json"
    assert ts.main(["--smoke", "--questions", "6", "--synthetic", "3", "--out", str(out), "rollout.group_size=3"]) == 0
    r = json.loads(out.read_text())
    assert r["questions"] == 6 and r["group_size"] == 3 and 0 <= r["mixed_groups"] <= 6
    printed = capsys.readouterr().out
    assert printed.count("TARGET ") >= 1
    if r["mixed_groups"] >= 2:   # the smoke run's draw: every contrast over the mixed groups, both units
        assert printed.count("TARGET ") == 4
        for unit in ("per_token", "per_query"):
            a = r["analysis"][unit]
            assert set(a) == {"direction/real", "direction/other_question", "direction/labels_true",
                              "direction/labels_swapped", "read/real-other_question", "label_effect/true-swapped"}
            assert all(v["groups"] <= r["mixed_groups"] for v in a.values())
        assert r["targets"]["label_effect"] == (r["analysis"]["per_token"]["label_effect/true-swapped"]["lower"] > 0)
        assert r["synthetic_label_effect"]["groups"] == 3 and "demonstration format" in printed
    else:
        assert "no mixed groups" in printed and r["targets"] == {"label_effect": False, "read": False}
