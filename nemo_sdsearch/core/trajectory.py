"""A token-exact trajectory: prompt, then policy turns interleaved with environment text.

The token ids stored here are exactly the ids the generator sampled (never decoded and re-tokenized);
environment text (passages, invalid-action feedback) is tokenized once when inserted and stored as is.
Every token carries a `SpanType`; policy tokens also carry whether they are search-query positions
and the log-probability the generator sampled them with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from nemo_sdsearch.core.reward import exact_match, extract_answer, f1_score
from nemo_sdsearch.core.spans import OUTSIDE, POLICY_SPANS, SpanType, parse_policy_tokens


@dataclass
class Trajectory:
    question_id: str
    question: str
    golden_answers: list[str]
    token_ids: list[int] = field(default_factory=list)
    span_types: list[SpanType] = field(default_factory=list)
    is_query: list[bool] = field(default_factory=list)
    from_policy: list[bool] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)
    prompt_length: int = 0
    queries: list[str] = field(default_factory=list)
    policy_texts: list[str] = field(default_factory=list)
    answer: str | None = None
    finish_reason: str = "running"
    num_turns: int = 0
    normalization: str = "squad"  # answer normalisation of exact_match / f1 (core.reward)
    # what the rollout engine measured (the training metrics: env/*, response_length/*, timing_s/retrieval)
    invalid_actions: int = 0      # turns holding no valid action (no search or answer tag, an empty query)
    truncated_turns: int = 0      # turns the token budget (rollout.max_new_tokens) cut off
    retrieval_s: float = 0.0      # this rollout's share of the retriever calls' wall time (a batched call's
                                  # time split evenly over the rows it served)
    # the ids of the passages each search retrieved, in rank order: one list per entry of `queries` (an empty
    # list when retrieval is off); fewer lists than queries means not recorded (a record written before the
    # field existed): world/evidence.py then re-runs the queries
    retrieved_ids: list[list[str]] = field(default_factory=list)
    _parse_state: str = OUTSIDE

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def start(cls, question_id: str, question: str, golden_answers: Sequence[str],
              prompt_ids: Sequence[int], normalization: str = "squad") -> "Trajectory":
        t = cls(question_id, question, list(golden_answers), normalization=normalization)
        t.add_environment(prompt_ids, SpanType.PROMPT)
        t.prompt_length = len(prompt_ids)
        return t

    def add_environment(self, ids: Sequence[int], kind: SpanType = SpanType.INFORMATION) -> None:
        if kind in POLICY_SPANS:
            raise ValueError(f"environment tokens cannot have policy span type {kind.name}")
        n = len(ids)
        self.token_ids.extend(ids)
        self.span_types.extend([kind] * n)
        self.is_query.extend([False] * n)
        self.from_policy.extend([False] * n)
        self.sampled_logprobs.extend([math.nan] * n)

    def add_policy(self, ids: Sequence[int], logprobs: Sequence[float],
                   decode: Callable[[Sequence[int]], str]) -> str:
        """Append one sampled turn; returns its text. Span types come from the tag parser."""
        if len(ids) != len(logprobs):
            raise ValueError("one log-prob per sampled token is required")
        labels = parse_policy_tokens(decode, ids, self._parse_state)
        # Tags never continue across environment text: a new turn starts outside unless a tag was
        # left open inside the policy's own text (then the parser carries it on).
        self._parse_state = labels.end_state
        self.token_ids.extend(ids)
        self.span_types.extend(labels.span)
        self.is_query.extend(labels.is_query)
        self.from_policy.extend([True] * len(ids))
        self.sampled_logprobs.extend(logprobs)
        self.policy_texts.append(labels.text)
        self.num_turns += 1
        return labels.text

    # -- masks ----------------------------------------------------------------------------------
    def policy_mask(self) -> list[bool]:
        """Positions the policy loss trains on: sampled think/search/answer tokens."""
        return [p and s in POLICY_SPANS for p, s in zip(self.from_policy, self.span_types)]

    def query_mask(self) -> list[bool]:
        """Search-query positions: sampled tokens of `<search>` content plus the closing tag."""
        return [p and q for p, q in zip(self.from_policy, self.is_query)]

    def information_mask(self) -> list[bool]:
        return [s == SpanType.INFORMATION for s in self.span_types]

    def response_ids(self) -> list[int]:
        return self.token_ids[self.prompt_length:]

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    @property
    def num_sampled_tokens(self) -> int:
        """Tokens the policy generated (every turn; environment text not counted)."""
        return sum(self.from_policy)

    @property
    def truncated(self) -> bool:
        """A length budget cut this rollout: a turn hit rollout.max_new_tokens, or the context guard ended it."""
        return self.truncated_turns > 0 or self.finish_reason == "context"

    # -- storage -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-serialisable record (NaN log-probs of environment tokens become null)."""
        return {
            "question_id": self.question_id, "question": self.question, "golden_answers": self.golden_answers,
            "token_ids": self.token_ids, "span_types": [int(s) for s in self.span_types],
            "is_query": self.is_query, "from_policy": self.from_policy,
            "sampled_logprobs": [None if math.isnan(x) else x for x in self.sampled_logprobs],
            "prompt_length": self.prompt_length, "queries": self.queries, "policy_texts": self.policy_texts,
            "answer": self.answer, "finish_reason": self.finish_reason, "num_turns": self.num_turns,
            "normalization": self.normalization, "invalid_actions": self.invalid_actions,
            "truncated_turns": self.truncated_turns, "retrieval_s": self.retrieval_s,
            "retrieved_ids": self.retrieved_ids,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        t = cls(d["question_id"], d["question"], list(d["golden_answers"]),
                normalization=d.get("normalization", "squad"))
        t.token_ids = list(d["token_ids"])
        t.span_types = [SpanType(x) for x in d["span_types"]]
        t.is_query, t.from_policy = list(d["is_query"]), list(d["from_policy"])
        t.sampled_logprobs = [math.nan if x is None else x for x in d["sampled_logprobs"]]
        t.prompt_length, t.queries, t.policy_texts = d["prompt_length"], list(d["queries"]), list(d["policy_texts"])
        t.answer, t.finish_reason, t.num_turns = d["answer"], d["finish_reason"], d["num_turns"]
        # records written before these fields existed read as "nothing measured"
        t.invalid_actions, t.truncated_turns = d.get("invalid_actions", 0), d.get("truncated_turns", 0)
        t.retrieval_s = d.get("retrieval_s", 0.0)
        t.retrieved_ids = [[str(x) for x in ids] for ids in d.get("retrieved_ids", [])]
        n = len(t.token_ids)
        if not (len(t.span_types) == len(t.is_query) == len(t.from_policy) == len(t.sampled_logprobs) == n):
            raise ValueError(f"trajectory record for {t.question_id!r} has per-token fields of unequal length")
        return t

    # -- outcome --------------------------------------------------------------------------------
    def finalize(self) -> None:
        answers = [a for a in (extract_answer(t) for t in self.policy_texts) if a is not None]
        self.answer = answers[-1] if answers else None

    @property
    def exact_match(self) -> float:
        return exact_match(self.answer, self.golden_answers, self.normalization)

    @property
    def f1(self) -> float:
        return f1_score(self.answer, self.golden_answers, self.normalization)
