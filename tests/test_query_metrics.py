"""Query-level metrics everywhere (issue 16): the rollout engine records what each search retrieved, the
training rows get env/first_query_hit, env/evidence_hit_per_search and env/evidence_recall (whole-batch sums
over the replicas), the evaluation harness and the sharded greedy evaluation during training report them per
dataset and kind, the end-of-run table gives test EM and first-query hit with standard errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.retrieval import BM25Retriever
from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine
from scripted import Replica, ScriptedTurns

QUERY_KEYS = ("env/first_query_hit", "env/evidence_hit_per_search", "env/evidence_recall")


def ByQuestion(tokenizer, turns):
    """Replays fixed turn texts per question (found in the row's prompt): `turns(question) -> [text, ...]`."""
    return ScriptedTurns(tokenizer, lambda row, question: turns(question))


@pytest.fixture(scope="module")
def world(bundle):
    """Test-world questions (evidence metadata), the question objects by text, and BM25 over the test world."""
    qs = bundle.test[:12]
    return {"qas": [QA.from_flashrag(q.to_flashrag()) for q in qs], "by_text": {q.question.strip(): q for q in qs},
            "retriever": BM25Retriever(bundle.test_world.passages)}


def ideal_then_answer(world, first=lambda q: q.hops[0].query):
    """Search `first(q)`, then every other hop's ideal query, then answer the gold answer."""
    def turns(text):
        q = world["by_text"][text]
        queries = [first(q)] + [h.query for h in q.hops[1:]]
        return [f"<search> {x} </search>" for x in queries] + [f"<answer> {q.golden_answers[0]} </answer>"]
    return turns


def test_engine_records_what_each_search_retrieved(char_tokenizer, world):
    r = world["retriever"]
    engine = RolloutEngine(ByQuestion(char_tokenizer, ideal_then_answer(world, lambda q: q.hops[0].entity)), r,
                           RolloutConfig(max_turns=3, max_new_tokens=120, max_context=20000, topk=3))
    trajs = engine.run(world["qas"])
    for t in trajs:
        assert t.queries and len(t.retrieved_ids) == len(t.queries)
        assert t.retrieved_ids == [[d.id for d in docs] for docs in r.search(t.queries, 3)]
        assert all(len(ids) == 3 for ids in t.retrieved_ids)
    # retrieval off: one empty list per search
    off = RolloutEngine(ByQuestion(char_tokenizer, ideal_then_answer(world)), r,
                        RolloutConfig(max_turns=3, max_new_tokens=120, max_context=20000, retrieval=False))
    for t in off.run(world["qas"][:3]):
        assert t.queries and t.retrieved_ids == [[] for _ in t.queries]
    # the last turn's search is not run, and not recorded
    final = RolloutEngine(ByQuestion(char_tokenizer, lambda text: ["<search> a </search>"]), r,
                          RolloutConfig(max_turns=2, max_new_tokens=40, max_context=20000))
    (t,) = final.run(world["qas"][:1])
    assert t.num_turns == 3 and len(t.queries) == len(t.retrieved_ids) == 2


def test_trajectory_records_keep_retrieved_ids_and_old_records_load(char_tokenizer, world):
    from nemo_sdsearch.world.evidence import trajectory_query_metrics

    r, qa = world["retriever"], world["qas"][0]
    engine = RolloutEngine(ByQuestion(char_tokenizer, ideal_then_answer(world)), r,
                           RolloutConfig(max_turns=3, max_new_tokens=120, max_context=20000))
    (t,) = engine.run([qa])
    d = json.loads(json.dumps(t.to_dict()))
    back = Trajectory.from_dict(d)
    assert back.retrieved_ids == t.retrieved_ids and back.queries == t.queries
    old = {k: v for k, v in d.items() if k != "retrieved_ids"}  # written before the field existed
    older = Trajectory.from_dict(old)
    assert older.retrieved_ids == [] and older.token_ids == t.token_ids
    with pytest.raises(ValueError, match="retriever"):
        trajectory_query_metrics(older, qa.metadata)  # not recorded: the queries must be re-run
    assert trajectory_query_metrics(older, qa.metadata, r, 3) == trajectory_query_metrics(back, qa.metadata)


def _traj(qid: str, retrieved: list[list[str]], answer: str = "a") -> Trajectory:
    t = Trajectory(qid, f"{qid}?", ["a"])
    t.queries = [f"query {i}" for i in range(len(retrieved))]
    t.retrieved_ids = retrieved
    t.token_ids, t.from_policy, t.num_turns, t.answer = [1, 2, 3], [False, True, True], len(retrieved) + 1, answer
    return t


HAND_META = {"bridge": {"kind": "bridge", "evidence": ["10", "20"]},
             "cmp": {"kind": "comparison", "evidence": ["30", "40"]},
             "user": {"kind": "single_hop"}}                      # a user file's question: no evidence ids


def _hand_batch():
    return [_traj("bridge", [["10", "x"], ["20"]]),   # first hit, 2/2 searches hit, recall 1
            _traj("bridge", [["20"], ["y"]]),         # a bridge's second hop first: no first-query hit; 1/2, 0.5
            _traj("cmp", [["40", "z"]]),              # either hop of a comparison counts: hit; 1/1, 0.5
            _traj("cmp", []),                         # never searched: miss; 0 searches, recall 0
            _traj("user", [["10"], ["30"]])]          # no evidence metadata: left out


def test_rollout_metrics_of_hand_built_trajectories():
    from nemo_sdsearch.algorithms.grpo import rollout_metrics

    trajs = _hand_batch()
    adv = torch.zeros(len(trajs))
    one, *_ = rollout_metrics(Replica(0, 1), trajs, adv, HAND_META)
    assert one["env/first_query_hit"] == 2 / 4
    assert one["env/evidence_hit_per_search"] == 4 / 5       # (2 + 1 + 1 + 0) hits over (2 + 2 + 1 + 0) searches
    assert one["env/evidence_recall"] == (1 + 0.5 + 0.5 + 0) / 4
    assert one["env/number_of_valid_search"] == 7 / 5         # the other figures still cover every rollout
    # two replicas, one holding only the question without evidence: both get the whole batch's figures
    a, b = trajs[4:], trajs[:4]
    ra, rb = Replica(0, 2), Replica(1, 2)
    rollout_metrics(ra, a, adv[4:], HAND_META)
    rollout_metrics(rb, b, adv[:4], HAND_META)
    two_a, *_ = rollout_metrics(Replica(0, 2, others=rb.sent), a, adv[4:], HAND_META)
    two_b, *_ = rollout_metrics(Replica(1, 2, others=ra.sent), b, adv[:4], HAND_META)
    for got in (two_a, two_b):
        assert got.keys() == one.keys()
        for k in one:
            assert got[k] == pytest.approx(one[k], rel=1e-12), k
    # no rollout of the batch has evidence (or no metadata given): the keys are left out, not NaN
    for meta in (HAND_META, None):
        none, *_ = rollout_metrics(Replica(0, 1), trajs[4:], adv[4:], meta)
        assert not set(QUERY_KEYS) & set(none) and "critic/score/mean" in none
    # evidence but not one search: the per-search rate is NaN, the others are 0
    empty, *_ = rollout_metrics(Replica(0, 1), [trajs[3]], adv[:1], HAND_META)
    assert empty["env/first_query_hit"] == 0.0 and empty["env/evidence_recall"] == 0.0
    assert math.isnan(empty["env/evidence_hit_per_search"])


def _strip_evidence(qa: QA) -> QA:
    return QA(qa.id, qa.question, qa.golden_answers, {"kind": qa.metadata["kind"]})


def test_eval_report_columns_with_and_without_evidence(char_tokenizer, world):
    from nemo_sdsearch.eval.harness import evaluate

    engine = RolloutEngine(ByQuestion(char_tokenizer, ideal_then_answer(world)), world["retriever"],
                           RolloutConfig(max_turns=3, max_new_tokens=120, max_context=20000, temperature=0.0))
    qas = world["qas"]
    plain = [_strip_evidence(q) for q in qas]
    report = evaluate(engine, {"world": qas, "user": plain}, batch_size=5, progress=False)
    s = report.by_dataset["world"]["all"]
    assert (s["n"], s["n_evidence"], s["em"]) == (len(qas), len(qas), 1.0)
    # every hop searched with its ideal query (the evidence ranks first): all hit, all hops found
    assert s["first_query_hit"] == s["evidence_hit_per_search"] == s["evidence_recall"] == 1.0
    assert s["evidence_searches"] == sum(len(world["by_text"][q.question.strip()].hops) for q in qas)
    assert "first_query_hit" not in report.by_dataset["user"]["all"]
    pred = report.predictions["world"][0]
    assert pred["first_query_hit"] is True and pred["retrieved_ids"][0][0] == qas[0].metadata["evidence"][0]
    md = report.to_markdown()
    assert md.splitlines()[0].endswith("| first-query hit | evidence hit/search | evidence recall |")
    assert f"| world | **all** | {len(qas)} | 1.000 | 1.000 | " in md and md.count(" | 1.000 | 1.000 | 1.000 |") >= 1
    assert all(line.endswith(" - | - | - |") for line in md.splitlines() if line.startswith("| user |"))
    json.dumps(report.to_json())
    # a report of user files only: no query-level columns at all
    only = evaluate(engine, {"user": plain}, batch_size=5, progress=False)
    assert "first-query hit" not in only.to_markdown() and "first_query_hit" not in json.dumps(only.to_json())
    # a first query that names nothing: no first-query hit; the later hops' ideal queries still hit
    vague = RolloutEngine(ByQuestion(char_tokenizer, ideal_then_answer(world, lambda q: "nothing here")),
                          world["retriever"], RolloutConfig(max_turns=3, max_new_tokens=120, max_context=20000))
    v = evaluate(vague, {"world": qas}, batch_size=12, progress=False).by_dataset["world"]
    assert v["all"]["first_query_hit"] == 0.0
    for kind, s in v.items():  # the later hops' ideal queries still hit
        assert 0.0 <= s["evidence_hit_per_search"] < 1.0 and s["evidence_recall"] < 1.0, kind


def test_sharded_greedy_evaluation_sums_the_query_metrics(char_tokenizer, world):
    """At dp = 2 (each replica its share, sums all-reduced) the result is the one process's."""
    from nemo_sdsearch.algorithms.setup import greedy_em, sharded_greedy_em

    engine = RolloutEngine(ByQuestion(char_tokenizer, ideal_then_answer(world, lambda q: q.hops[0].entity)),
                           world["retriever"], RolloutConfig(max_turns=3, max_new_tokens=120, max_context=20000))
    qas = world["qas"]
    whole = greedy_em(engine, qas, 4)
    r1 = Replica(1, 2)
    sharded_greedy_em(r1, engine, qas, 4)
    got = sharded_greedy_em(Replica(0, 2, others=r1.sent), engine, qas, 4)
    assert got.keys() == whole.keys() and "single_hop" in got
    assert all("first_query_hit" in got[kind] for kind in got)
    assert json.dumps(got) == json.dumps(whole)  # the sums themselves are all-reduced: exactly the same figures
    assert 0.0 < whole["all"]["first_query_hit"] < 1.0   # the name alone finds some evidence, not all


def test_end_of_run_table_standard_errors():
    from nemo_sdsearch.algorithms.grpo import eval_metrics
    from nemo_sdsearch.algorithms.report import summary_rows

    start = {"all": {"n": 100, "em": 0.25, "f1": 0.3, "searches": 1.0, "n_evidence": 100, "evidence_searches": 100,
                     "first_query_hit": 0.5, "evidence_hit_per_search": 0.5, "evidence_recall": 0.4}}
    end = {"all": {"n": 100, "em": 0.5, "f1": 0.6, "searches": 1.5, "n_evidence": 100, "evidence_searches": 150,
                   "first_query_hit": 0.9, "evidence_hit_per_search": 0.8, "evidence_recall": 0.9}}
    rows = summary_rows(start, end, [{"env/first_query_hit": 0.2}, {"env/first_query_hit": 0.6}])
    se = lambda p: math.sqrt(p * (1 - p) / 100)
    z_em = 0.25 / math.sqrt(se(0.25) ** 2 + se(0.5) ** 2)
    z_hit = 0.4 / math.sqrt(se(0.5) ** 2 + se(0.9) ** 2)
    assert rows[0] == ("test EM (all)", f"0.250 ± {se(0.25):.3f}", "0.500 ± 0.050", f"+{z_em:.2f} SE")
    assert rows[1] == ("test first-query hit (all)", "0.500 ± 0.050", "0.900 ± 0.030", f"+{z_hit:.2f} SE")
    assert rows[0][3] == "+3.78 SE" and rows[1][3] == "+6.86 SE"
    assert rows[2] == ("env/first_query_hit", "0.2000", "0.6000", "")
    # no evidence metadata: EM only; equal 0 and 0 has no standard error
    plain = {"all": {"n": 10, "em": 0.0, "f1": 0.0, "searches": 0.0}}
    assert summary_rows(plain, plain, []) == [("test EM (all)", "0.000 ± 0.000", "0.000 ± 0.000", "n/a")]
    assert eval_metrics("test", end) == {"val/test_em": 0.5, "val/test_first_query_hit": 0.9,
                                         "val/test_evidence_hit_per_search": 0.8, "val/test_evidence_recall": 0.9}
    assert eval_metrics("dev", plain) == {"val/dev_em": 0.0, "val/dev_f1": 0.0}


def test_curves_get_a_first_query_hit_panel(tmp_path):
    import matplotlib.image

    from nemo_sdsearch.algorithms.report import plot_curves

    history = [{"step": s, "critic/score/mean": 0.1 * s, "env/first_query_hit": 0.2 * s} for s in (1, 2)]
    evals = [{"step": 0, "val/test_em": 0.1, "val/test_first_query_hit": 0.3},
             {"step": 2, "val/dev_em": 0.2, "val/dev_first_query_hit": 0.5}]
    plot_curves(history, evals, tmp_path / "with.png", "t")
    plot_curves([{k: v for k, v in h.items() if k != "env/first_query_hit"} for h in history],
                [{k: v for k, v in e.items() if "first_query" not in k} for e in evals], tmp_path / "without.png", "t")
    wide, narrow = (matplotlib.image.imread(tmp_path / f).shape[1] for f in ("with.png", "without.png"))
    assert wide > narrow * 1.1  # one more panel
