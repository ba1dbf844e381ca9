"""Span types of trajectory tokens and the tag parser.

Every token of a trajectory carries one `SpanType`. Tokens the environment inserts (the prompt,
retrieved passages, invalid-action feedback) are typed by whoever inserts them; tokens the policy
samples are typed by `parse_policy_tokens`, which works on characters, so a tag split over several
tokens (`</sea` + `rch>`) or glued to neighbouring text (`Paris</answer>`) is handled exactly.

Policy text outside any tag counts as THINK: in the Search-R1 protocol free text is reasoning.
A search query position is a policy token inside `<search>...</search>` that carries query content
or the closing tag; the opening tag only decides *to* search and is SEARCH but not a query position.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Sequence


class SpanType(enum.IntEnum):
    PROMPT = 0
    THINK = 1
    SEARCH = 2
    INFORMATION = 3
    ANSWER = 4


POLICY_SPANS = (SpanType.THINK, SpanType.SEARCH, SpanType.ANSWER)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, INFO_OPEN, INFO_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Parser states; a policy segment starts OUTSIDE unless the caller says otherwise.
OUTSIDE, IN_THINK, IN_SEARCH, IN_ANSWER = "outside", "think", "search", "answer"
_OPEN = {THINK_OPEN: IN_THINK, SEARCH_OPEN: IN_SEARCH, ANSWER_OPEN: IN_ANSWER}
_CLOSE = {THINK_CLOSE: IN_THINK, SEARCH_CLOSE: IN_SEARCH, ANSWER_CLOSE: IN_ANSWER}
_STATE_SPAN = {OUTSIDE: SpanType.THINK, IN_THINK: SpanType.THINK, IN_SEARCH: SpanType.SEARCH,
               IN_ANSWER: SpanType.ANSWER}


@dataclass(frozen=True)
class CharLabels:
    span: list[SpanType]
    is_query: list[bool]
    end_state: str


def label_characters(text: str, start_state: str = OUTSIDE) -> CharLabels:
    """Label every character of policy text with its span type and query flag."""
    span: list[SpanType] = []
    is_query: list[bool] = []
    state = start_state
    i = 0
    while i < len(text):
        tag = _tag_at(text, i)
        if tag is None:
            span.append(_STATE_SPAN[state])
            is_query.append(state == IN_SEARCH)
            i += 1
            continue
        if tag in _OPEN:
            state = _OPEN[tag]
            kind, query = _STATE_SPAN[state], False
        elif tag in _CLOSE and state == _CLOSE[tag]:
            kind, query = _STATE_SPAN[state], state == IN_SEARCH
            state = OUTSIDE
        else:  # a stray closing tag or a hallucinated <information> tag: plain policy text
            kind, query = _STATE_SPAN[state], state == IN_SEARCH
        span.extend([kind] * len(tag))
        is_query.extend([query] * len(tag))
        i += len(tag)
    return CharLabels(span, is_query, state)


def _tag_at(text: str, i: int) -> str | None:
    if text[i] != "<":
        return None
    for tag in TAGS:
        if text.startswith(tag, i):
            return tag
    return None


def token_char_spans(decode: Callable[[Sequence[int]], str], token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Text of `token_ids` and the [start, end) character range of every token.

    Fast path: decode tokens one by one. When that does not reproduce the joint decode (a multi-byte
    character split over byte-level tokens), fall back to prefix decoding, which gives a token that
    completes a character the whole character and a token holding a fragment an empty range.
    """
    ids = list(token_ids)
    text = decode(ids)
    pieces = [decode([t]) for t in ids]
    if "".join(pieces) == text:
        spans, pos = [], 0
        for p in pieces:
            spans.append((pos, pos + len(p)))
            pos += len(p)
        return text, spans
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        cur = len(decode(ids[:k]))
        # A partial byte sequence decodes to U+FFFD and may shrink once completed: never go backwards.
        cur = max(cur, prev) if k < len(ids) else len(text)
        spans.append((prev, cur))
        prev = cur
    return text, spans


@dataclass(frozen=True)
class TokenLabels:
    span: list[SpanType]
    is_query: list[bool]
    end_state: str
    text: str


def parse_policy_tokens(decode: Callable[[Sequence[int]], str], token_ids: Sequence[int],
                        start_state: str = OUTSIDE) -> TokenLabels:
    """Span type and query flag of every token of one policy-generated segment.

    A token whose characters straddle several spans takes the most specific one: a query character
    makes it a query position; otherwise ANSWER beats SEARCH beats THINK. A token with no characters
    of its own (a byte fragment) takes the label of the character at its position.
    """
    text, char_spans = token_char_spans(decode, token_ids)
    chars = label_characters(text, start_state)
    span: list[SpanType] = []
    is_query: list[bool] = []
    fallback_kind = _STATE_SPAN[start_state]
    for start, end in char_spans:
        if end <= start:
            if start < len(text):
                span.append(chars.span[start])
                is_query.append(chars.is_query[start])
            else:
                span.append(span[-1] if span else fallback_kind)
                is_query.append(is_query[-1] if is_query else False)
            continue
        kinds = chars.span[start:end]
        if any(chars.is_query[start:end]):
            span.append(SpanType.SEARCH)
            is_query.append(True)
            continue
        is_query.append(False)
        if SpanType.ANSWER in kinds:
            span.append(SpanType.ANSWER)
        elif SpanType.SEARCH in kinds:
            span.append(SpanType.SEARCH)
        else:
            span.append(SpanType.THINK)
    return TokenLabels(span, is_query, chars.end_state, text)
