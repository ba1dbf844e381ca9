"""The synthetic world: determinism, size, formats, separation of the test world, answerability."""

import json
from collections import Counter

from nemo_sdsearch.world.generator import _BRIDGE, _COMPARE, _SINGLE, build_bundle, build_world


def test_world_is_deterministic_and_large_enough():
    a, b = build_world(5), build_world(5)
    assert a.passages == b.passages
    assert build_world(6).passages != a.passages
    assert a.num_entities >= 1000
    assert len(_SINGLE) >= 6  # relation types that questions ask about
    assert len(a.passages) == a.num_entities


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
    assert {q.relation for q in build_bundle().test} == set(_SINGLE) | set(_BRIDGE) | set(_COMPARE)


def test_test_world_is_a_different_world(bundle):
    assert bundle.train_world.seed != bundle.test_world.seed
    assert not (bundle.train_world.names & bundle.test_world.names)
    train_answers = {a for q in bundle.train for a in q.golden_answers if not a.isdigit()}
    test_answers = {a for q in bundle.test for a in q.golden_answers if not a.isdigit()}
    assert not (train_answers & test_answers)
    assert not ({q.question for q in bundle.train} & {q.question for q in bundle.dev})


def test_every_hop_is_answerable_from_the_corpus(bundle):
    texts = {p["contents"].partition("\n")[0].strip('"'): p["contents"] for p in bundle.test_world.passages}
    for q in bundle.test:
        for h in q.hops:
            assert h.evidence in texts[h.entity] and h.value in h.evidence


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
