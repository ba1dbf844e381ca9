"""The synthetic world: determinism, size, formats, separation of the test world, answerability, and query
sensitivity (which words a query uses decides whether the evidence is retrieved)."""

import json
import random
from collections import Counter

import pytest

from nemo_sdsearch.world.assets import default_bundle
from nemo_sdsearch.world.generator import (_BRIDGE, _COMPARE, _SINGLE, FILLERS, RELATIONS, TEST_SEED, TRAIN_SEED,
                                           TYPE_RELATIONS, build_bundle, build_world)


def test_world_is_deterministic_and_large_enough():
    a, b = build_world(5), build_world(5)
    assert a.passages == b.passages and a.evidence_ids == b.evidence_ids
    assert build_world(6).passages != a.passages
    assert a.num_entities >= 1000
    assert len(_SINGLE) >= 6  # relation types that questions ask about
    # one passage per aspect (relation) of an entity plus its filler sections
    per_type = {t: len(getattr(a, t)) * (len(FILLERS[t]) + len(TYPE_RELATIONS[t])) for t in FILLERS}
    assert len(a.passages) == sum(per_type.values()) == len({p["id"] for p in a.passages})
    assert len(a.evidence_ids) == sum(len(getattr(a, t)) * len(TYPE_RELATIONS[t]) for t in FILLERS)


def test_facts_are_spread_over_section_passages():
    w = build_world(5)
    by_id = {p["id"]: p["contents"] for p in w.passages}
    person = next(iter(w.persons))
    titles = sorted(c.partition("\n")[0] for c in by_id.values() if c.startswith(f'"{person} ('))
    assert titles == sorted(f'"{person} ({s})"' for s in
                            [f for f, _ in FILLERS["persons"]] + [RELATIONS[r][2] for r in TYPE_RELATIONS["persons"]])
    for (entity, relation), pid in w.evidence_ids.items():
        _, keyword, section, evidence, _ = RELATIONS[relation]
        text = by_id[pid]
        assert text.startswith(f'"{entity} ({section})"\n') and evidence(entity, w) in text
        assert keyword in text  # the passage names its relation's keyword
        # ... and no other aspect of the entity does (keywords of its kind of entity)
        for other in TYPE_RELATIONS[RELATIONS[relation][0]]:
            if RELATIONS[other][1] != keyword:
                assert RELATIONS[other][1] not in text.lower()


def test_renamed_entities_are_referred_to_by_their_new_names():
    w = build_world(5)
    assert all(a["birthplace"] in w.cities for a in w.persons.values())
    assert all(a["founder"] in w.persons and w.persons[a["founder"]]["founded"] == o for o, a in w.orgs.items())
    assert all(a["headquarters"] in w.cities for a in w.orgs.values())
    assert all(a["country"] in w.countries for a in w.cities.values())
    assert all(w.cities[a["capital"]]["country"] == k for k, a in w.countries.items())
    assert sum(a["founded"] is not None for a in w.persons.values()) == len(w.orgs)


def test_names_share_tokens_with_distractors():
    w = build_world(5)
    surnames = Counter(p.split()[1] for p in w.persons)
    assert sum(n for n in surnames.values() if n > 1) >= len(w.persons) // 2  # families
    firsts = Counter(o.split()[0] for o in w.orgs)
    assert sum(n for n in firsts.values() if n > 1) >= len(w.orgs) // 5  # "X Works" / "X Bank"
    # an organization never carries its founder's family name (the answer would be in the question)
    assert all(o.split()[0] != a["founder"].split()[1] for o, a in w.orgs.items())
    # near-homonyms: cities one syllable apart
    from nemo_sdsearch.world.generator import _syllables

    def one_apart(a, b):
        sa, sb = _syllables(a), _syllables(b)
        return len(sa) == len(sb) and sum(x != y for x, y in zip(sa, sb)) == 1

    cities = sorted(w.cities)
    assert sum(any(one_apart(c, d) for d in cities if d != c) for c in cities) >= 20


def test_corpus_and_question_formats(bundle):
    for p in bundle.train_world.passages[:50]:
        assert set(p) == {"id", "contents"}
        title, _, text = p["contents"].partition("\n")
        assert title.startswith('"') and title.endswith('"') and text
    for q in bundle.test[:50]:
        row = json.loads(json.dumps(q.to_flashrag()))
        assert set(row) == {"id", "question", "golden_answers", "metadata"}
        assert row["metadata"]["kind"] in ("single_hop", "bridge", "comparison")
        assert isinstance(row["golden_answers"], list) and row["golden_answers"]


def test_three_kinds_and_two_searches_for_multi_hop(bundle):
    kinds = Counter(q.kind for q in bundle.test)
    assert set(kinds) == {"single_hop", "bridge", "comparison"}
    for q in bundle.test:
        if q.kind == "single_hop":
            assert len(q.hops) == 1
        else:
            assert len(q.hops) == 2 and q.hops[0].entity != q.hops[1].entity
        if q.kind == "bridge":
            # The second hop's subject is only known from the first hop's answer.
            assert q.hops[1].entity == q.hops[0].value and q.hops[1].entity not in q.question
        if q.kind == "comparison":
            assert q.golden_answers == [min(h.value for h in q.hops)]
            assert q.golden_answers[0] not in q.question
    assert {q.relation for q in default_bundle().test} == set(_SINGLE) | set(_BRIDGE) | set(_COMPARE)


def test_test_world_is_a_different_world(bundle):
    assert TRAIN_SEED != TEST_SEED
    assert bundle.train_world.seed == TRAIN_SEED and bundle.test_world.seed == TEST_SEED
    assert not (bundle.train_world.names & bundle.test_world.names)
    assert not (bundle.train_world.words & bundle.test_world.words)  # not even a shared name word
    train_answers = {a for q in bundle.train for a in q.golden_answers if not a.isdigit()}
    test_answers = {a for q in bundle.test for a in q.golden_answers if not a.isdigit()}
    assert not (train_answers & test_answers)
    assert not ({q.question for q in bundle.train} & {q.question for q in bundle.dev})


def test_every_hop_is_answerable_from_its_evidence_passage(bundle):
    by_id = {p["id"]: p["contents"] for p in bundle.test_world.passages}
    for q in bundle.test:
        meta = json.loads(json.dumps(q.to_flashrag()))["metadata"]
        assert meta["evidence"] == [h.evidence_id for h in q.hops] == [h["evidence_id"] for h in meta["hops"]]
        for h in q.hops:
            assert h.evidence in by_id[h.evidence_id] and h.value in h.evidence
            assert by_id[h.evidence_id].startswith(f'"{h.entity} (')
            assert sum(h.evidence in c for c in by_id.values()) == 1  # the evidence passage is the only one


def test_tokenizer_has_single_token_tags(tokenizer):
    from nemo_sdsearch.core.spans import TAGS

    for tag in TAGS:
        assert len(tokenizer.encode(tag, add_special_tokens=False)) == 1
    ids = tokenizer.encode("year 1843", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids][-4:] == ["1", "8", "4", "3"]
    text = 'Doc 1(Title: "Zürich") <search> x </search>'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_no_world_shares_names_with_the_tokenizer_world(bundle):
    """BPE merges whole names of the world it was trained on; training and test worlds must use names
    the tokenizer has not merged (they tokenize alike), or the model copies them poorly."""
    tw = bundle.tokenizer_world.names
    assert not (tw & bundle.train_world.names) and not (tw & bundle.test_world.names)
    assert not (bundle.train_world.names & bundle.test_world.names)


def test_audit_meets_the_targets_on_the_default_test_world():
    """`sdsearch world --audit`'s BM25 targets at top 3 on the default test world (all 300 questions): the
    ideal query finds the evidence, the name alone mostly does not, a wrong relation keyword almost never."""
    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.audit import TARGETS, audit

    b = build_bundle(n_train=10, n_dev=2)
    report = audit({"bm25": BM25Retriever(b.test_world.passages)}, b.test, topk=3)
    assert report.rate("bm25", "ideal") >= 0.95
    assert report.rate("bm25", "entity_only") <= 0.5
    assert report.rate("bm25", "wrong_relation") <= 0.2
    for kind in ("single_hop", "bridge", "comparison"):
        assert report.rate("bm25", "ideal", kind) >= 0.95
        assert report.rate("bm25", "ideal", kind) - report.rate("bm25", "entity_only", kind) >= 0.4
    lines = report.target_lines()
    assert len(lines) == len(TARGETS) and all(line.startswith("TARGET ") and line.endswith("met=yes") for line in lines)
    assert "| bm25 | **all** |" in report.to_markdown()


def test_ideal_query_ranks_the_evidence_first_and_wrong_keyword_finds_a_sibling(bundle):
    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.audit import wrong_keyword

    r = BM25Retriever(bundle.test_world.passages)
    hops = [h for q in bundle.test for h in q.hops]
    for h, docs in zip(hops, r.search([h.query for h in hops], 3)):
        assert docs[0].id == h.evidence_id
    rng = random.Random(0)
    wrong = [f"{h.entity} {wrong_keyword(h.relation, rng)}" for h in hops]
    for h, q, docs in zip(hops, wrong, r.search(wrong, 1)):
        assert docs[0].id != h.evidence_id and docs[0].title.startswith(h.entity + " (")


def test_cli_world_audit_prints_table_and_target_lines(capsys):
    from nemo_sdsearch.cli import main

    assert main(["world", "--audit", "--retrievers", "bm25"]) == 0
    out = capsys.readouterr().out
    assert "| bm25 | **all** | " in out and "| bm25 | bridge | " in out
    targets = [line for line in out.splitlines() if line.startswith("TARGET ")]
    assert [t.split()[1] for t in targets] == ["world_bm25_ideal_hit_at_3", "world_bm25_entity_only_hit_at_3",
                                               "world_bm25_wrong_relation_hit_at_3"]
    assert all(t.endswith("met=yes") for t in targets)


def test_query_metrics_per_search_first_query_and_recall():
    from nemo_sdsearch.world.evidence import query_metrics, summarize

    bridge = {"kind": "bridge", "evidence": ["10", "20"]}
    m = query_metrics([["1", "10", "2"], ["3", "4", "5"], ["20"]], bridge)
    assert m.evidence_hits == (True, False, True) and m.first_query_hit and m.searches == 3
    assert m.evidence_recall == 1.0 and m.evidence_hit_rate == pytest.approx(2 / 3)
    # the bridge's second hop found first is not a first-query hit; a comparison's either hop is
    assert not query_metrics([["20"]], bridge).first_query_hit
    assert query_metrics([["20"]], {"kind": "comparison", "evidence": ["10", "20"]}).first_query_hit
    none = query_metrics([], {"kind": "single_hop", "evidence": ["7"]})
    assert none.searches == 0 and not none.first_query_hit and none.evidence_recall == 0.0
    assert query_metrics([["1"]], {"kind": "single_hop"}) is None  # no evidence metadata: no metrics
    s = summarize([m, none, None])
    assert s == {"first_query_hit_rate": 0.5, "evidence_hit_rate": pytest.approx(2 / 3), "evidence_recall": 0.5,
                 "searches_per_question": 1.5, "n": 2}
    assert summarize([None]) == {}


def test_trajectory_query_metrics_rerun_the_queries(bundle):
    from nemo_sdsearch.core.qa import QA
    from nemo_sdsearch.core.trajectory import Trajectory
    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.evidence import trajectory_query_metrics

    q = next(q for q in bundle.test if q.kind == "bridge")
    qa = QA.from_flashrag(q.to_flashrag())
    t = Trajectory(qa.id, qa.question, qa.golden_answers)
    t.queries = [q.hops[0].entity, q.hops[0].query, q.hops[1].query]
    r = BM25Retriever(bundle.test_world.passages)
    m = trajectory_query_metrics(t, qa.metadata, r, topk=3)
    expected_first = any(d.id == q.hops[0].evidence_id for d in r.search([q.hops[0].entity], 3)[0])
    assert m.evidence_hits[1:] == (True, True) and m.first_query_hit == expected_first and m.searches == 3
    with pytest.raises(ValueError, match="retriever"):
        trajectory_query_metrics(t, qa.metadata)
    t.retrieved_ids = [[q.hops[0].evidence_id], [], ["x"]]  # recorded by the rollout engine: used as is
    assert trajectory_query_metrics(t, qa.metadata).evidence_hits == (True, False, False)


def test_vague_habit_of_the_demonstrations(bundle, tokenizer):
    """Students of vague-habit template questions search vaguely at the configured rate; a vague search that
    misses ends the demonstration before any answer; every other demonstration searches precisely."""
    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.demos import VAGUE_TEMPLATE, DemoBuilder

    builder = DemoBuilder(tokenizer, BM25Retriever(bundle.train_world.passages), sorted(bundle.train_world.names),
                          teacher_fraction=0.0, vague_queries=1.0)
    rng = random.Random(0)
    questions = bundle.train[:80]
    demos = [(q, builder.build(q, rng)) for q in questions]
    habit = [(q, d) for q, d in demos if q.template == VAGUE_TEMPLATE]
    assert 20 < len(habit) < 60
    for q, d in demos:
        keywords = [RELATIONS[h.relation][1] for h in q.hops]
        if q.template == VAGUE_TEMPLATE:
            assert d is not None and all(k not in query for k, query in zip(keywords, d.queries))
            if d.answer is None:  # missed: cut right after the query
                assert d.num_turns == len(d.queries) and d.from_policy[-1]  # no information, no answer turn
            else:
                assert d.exact_match == 1.0
        elif d is not None:
            assert all(k in query for k, query in zip(keywords, d.queries)) and d.exact_match == 1.0
    assert any(d.answer is None for _, d in habit) and any(d.answer is not None for _, d in habit)


def test_a_larger_test_set_extends_the_bundled_one():
    """data.test_questions above the bundle's 300: drawn on from the same test world and seed, so the first 300
    are the bundle's own; every question unique and answerable from the test world."""
    from nemo_sdsearch.algorithms.setup import load_questions
    from nemo_sdsearch.config import load_config

    base = load_questions(load_config("tiny_cpu"))["test"]
    big = load_questions(load_config("tiny_cpu", ["data.test_questions=1000"]))["test"]
    assert len(base) == 300 and len(big) == 1000
    assert [q.id for q in big[:300]] == [q.id for q in base] and [q.question for q in big[:300]] == [q.question for q in base]
    assert len({q.id for q in big}) == len({q.question for q in big}) == 1000
    assert all(q.metadata.get("evidence") for q in big)
