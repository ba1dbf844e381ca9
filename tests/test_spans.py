"""Span types and masks on hand-written trajectories, including tags split across tokens and glued tags."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_sdsearch.core.spans import SpanType, label_characters, parse_policy_tokens, token_char_spans
from nemo_sdsearch.core.trajectory import Trajectory

T, S, A = SpanType.THINK, SpanType.SEARCH, SpanType.ANSWER


def piece_decoder(pieces):
    """Tokens are given as text pieces; id i decodes to pieces[i]."""
    return lambda ids: "".join(pieces[i] for i in ids)


def labels(pieces, start="outside"):
    out = parse_policy_tokens(piece_decoder(pieces), list(range(len(pieces))), start)
    return out.span, out.is_query


def test_clean_tags_one_token_each():
    pieces = ["<think>", " plan", "</think>", "\n", "<search>", " Oskar", " birthplace", " ", "</search>"]
    span, query = labels(pieces)
    assert span == [T, T, T, T, S, S, S, S, S]
    assert query == [False, False, False, False, False, True, True, True, True]


def test_tags_split_across_tokens():
    pieces = ["<th", "ink>", "x", "</th", "ink>", "<sea", "rch>", "q1", " q2", "</", "sea", "rch", ">"]
    span, query = labels(pieces)
    assert span == [T, T, T, T, T, S, S, S, S, S, S, S, S]
    # Query = content plus the whole closing tag, even when the closing tag is four tokens.
    assert query == [False] * 7 + [True] * 6


def test_tags_glued_to_neighbouring_text():
    pieces = ["ok.<sea", "rch>Paris", " France</search>\n", "<answer>Paris</answer>"]
    span, query = labels(pieces)
    # "ok.<sea" holds think text and part of the opening tag: SEARCH, not a query position.
    assert span == [S, S, S, A]
    assert query == [False, True, True, False]


def test_answer_and_untagged_text():
    pieces = ["I", " think", " <answer>", " 1843 ", "</answer>", " bye"]
    span, query = labels(pieces)
    assert span == [T, T, A, A, A, T]
    assert not any(query)


def test_unclosed_tag_continues_and_carries_state():
    out = parse_policy_tokens(piece_decoder(["<search>", " abc"]), [0, 1])
    assert out.end_state == "search" and out.is_query == [False, True]
    span, query = labels([" more", "</search>"], start=out.end_state)
    assert span == [S, S] and query == [True, True]


def test_stray_closing_tag_is_plain_text():
    chars = label_characters("</search>x")
    assert set(chars.span) == {T} and not any(chars.is_query)


def test_byte_fragments_get_the_label_of_their_character():
    # A two-byte character split over two byte-level tokens: the first decodes to nothing on its own.
    text_by_prefix = {(): "", (0,): "<search>", (0, 1): "<search>", (0, 1, 2): "<search>é", (0, 1, 2, 3): "<search>é</search>"}
    standalone = {0: "<search>", 1: "\ufffd", 2: "\ufffd", 3: "</search>"}

    def decode(ids):
        ids = tuple(ids)
        return text_by_prefix[ids] if ids in text_by_prefix else "".join(standalone[i] for i in ids)

    text, spans = token_char_spans(decode, [0, 1, 2, 3])
    assert text == "<search>é</search>"
    assert spans == [(0, 8), (8, 8), (8, 9), (9, 18)]
    out = parse_policy_tokens(decode, [0, 1, 2, 3])
    assert out.is_query == [False, True, True, True]


def test_trajectory_masks(char_tokenizer):
    tok = char_tokenizer
    t = Trajectory.start("q", "Q?", ["x"], tok.encode("PROMPT<answer>no</answer>"))
    turn1 = tok.encode("<think>a</think><search>b c</search>")
    t.add_policy(turn1, [-0.5] * len(turn1), tok.decode)
    t.add_environment(tok.encode("<information>doc</information>"))
    turn2 = tok.encode("<answer>x</answer>")
    t.add_policy(turn2, [-0.1] * len(turn2), tok.decode)
    t.finalize()
    pm, qm, im = t.policy_mask(), t.query_mask(), t.information_mask()
    n_prompt = len("PROMPT<answer>no</answer>")
    assert not any(pm[:n_prompt])
    assert sum(pm) == len(turn1) + len(turn2)
    text = tok.decode(t.token_ids)
    query_text = "".join(c for c, q in zip(text, qm) if q)
    assert query_text == "b c</search>"
    info_text = "".join(c for c, i in zip(text, im) if i)
    assert info_text == "<information>doc</information>"
    # The example answer in the prompt is never the model's answer.
    assert t.answer == "x" and t.exact_match == 1.0
    assert all(math.isnan(x) for x, p in zip(t.sampled_logprobs, t.from_policy) if not p)


SEGMENT = st.lists(st.sampled_from(["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>",
                                    "<information>", "</information>", "abc", " ", "<", "/", ">", "sea", "rch"]),
                   min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), SEGMENT), min_size=1, max_size=8))
def test_information_tokens_are_never_policy_tokens(segments):
    """Property: whatever the text, tokens the environment inserted carry no policy or query loss."""
    pieces = []
    t = Trajectory.start("q", "Q", ["a"], [])
    for from_policy, seg in segments:
        ids = list(range(len(pieces), len(pieces) + len(seg)))
        pieces += seg
        decode = lambda xs: "".join(pieces[i] for i in xs)
        if from_policy:
            t.add_policy(ids, [0.0] * len(ids), decode)
        else:
            t.add_environment(ids)
    for pm, qm, im, fp in zip(t.policy_mask(), t.query_mask(), t.information_mask(), t.from_policy):
        if im:
            assert not pm and not qm
        if qm:
            assert pm  # a query position is always a policy position
        assert pm == fp


def test_trajectory_round_trip(char_tokenizer):
    import json

    tok = char_tokenizer
    t = Trajectory.start("q1", "Q?", ["x", "y"], tok.encode("P"))
    t.add_policy(tok.encode("<search>a</search>"), [-0.25] * 18, tok.decode)
    t.queries.append("a")
    t.add_environment(tok.encode("<information>d</information>"))
    t.add_policy(tok.encode("<answer>x</answer>"), [-0.5] * 18, tok.decode)
    t.finalize()
    back = Trajectory.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back.token_ids == t.token_ids and back.span_types == t.span_types
    assert back.query_mask() == t.query_mask() and back.policy_mask() == t.policy_mask()
    assert back.answer == "x" and back.exact_match == 1.0 and back.queries == ["a"]
    assert all((a == b) or (math.isnan(a) and math.isnan(b)) for a, b in zip(back.sampled_logprobs, t.sampled_logprobs))
