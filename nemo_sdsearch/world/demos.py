"""Synthetic demonstrations of the search protocol for the warm start.

A demonstration is a token-exact `Trajectory` built the way the rollout engine builds one: the prompt,
policy turns (`<think>..</think>` then `<search>..</search>` or `<answer>..</answer>`) and, after every
search, the information block the *real* retriever returns for that query. Two formats:

- student format: prompt P_S(q); queries phrased in one of several equivalent ways, so the policy
  keeps real uncertainty over query wording;
- reference format (Search-E1's teacher): prompt P_T(q, tau_ref) with a correct solution (its policy
  text and the passages it retrieved, as `search_e1.reference_text` renders a pool rollout) and the
  instruction to solve the question in its own words; the response reuses the reference's exact queries;
- teacher format: prompt P_T(q) with a hindsight block over a synthetic group of attempts, some
  correct, some wrong (wrong entity, wrong relation, missing hop). The response reuses the exact queries
  of a correct attempt when there is one. This teaches the same weights to read a hindsight block the
  way an instruct LLM would, so they can act as the SD-Search teacher.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from nemo_sdsearch.core.hindsight import AttemptSummary, HindsightConfig, hindsight_block
from nemo_sdsearch.core.prompts import information_block, reference_block, student_prompt, teacher_prompt
from nemo_sdsearch.core.spans import SpanType
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.world.generator import _SINGLE, Hop, Question

QUERY_STYLES = ["{e} {r}", "{r} of {e}", "what is the {r} of {e}"]


def phrase_query(hop: Hop, style: int) -> str:
    suffix = _SINGLE[hop.relation][2]
    return QUERY_STYLES[style].format(e=hop.entity, r=suffix)


def plan_think(hop: Hop) -> str:
    return f"I need the {_SINGLE[hop.relation][2]} of {hop.entity}."


def response_turns(q: Question, queries: Sequence[str]) -> list[tuple[str, str | None]]:
    """Policy turns as (text, query or None). Query i answers hop i; the last turn answers."""
    turns = []
    for i, (hop, query) in enumerate(zip(q.hops, queries)):
        think = plan_think(hop) if i == 0 else f"{q.hops[i - 1].evidence} {plan_think(hop)}"
        turns.append((f"<think> {think} </think>\n<search> {query} </search>", query))
    final = q.hops[-1].evidence
    if q.kind == "comparison":
        final += f" The earlier year is {q.golden_answers[0]}."
    turns.append((f"<think> {final} </think>\n<answer> {q.golden_answers[0]} </answer>", None))
    return turns


def _corrupt(q: Question, queries: list[str], rng: random.Random, entities: Sequence[str]) -> list[str]:
    """A plausible but wrong search plan."""
    mode = rng.randrange(3)
    bad = list(queries)
    if mode == 0 or len(bad) == 1:  # wrong relation on one hop
        i = rng.randrange(len(bad))
        hop = q.hops[i]
        other = rng.choice([r for r in _SINGLE if r != hop.relation])
        bad[i] = QUERY_STYLES[0].format(e=hop.entity, r=_SINGLE[other][2])
    elif mode == 1:  # wrong entity on the last hop
        bad[-1] = QUERY_STYLES[0].format(e=rng.choice(entities), r=_SINGLE[q.hops[-1].relation][2])
    else:  # stopped after the first hop
        bad = bad[:1]
    return bad


@dataclass
class DemoBuilder:
    tokenizer: object
    retriever: object
    entities: Sequence[str]
    topk: int = 3
    teacher_fraction: float = 0.3
    reference_fraction: float = 0.0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build(self, q: Question, rng: random.Random) -> Trajectory | None:
        style = rng.randrange(len(QUERY_STYLES))
        queries = [phrase_query(h, style) for h in q.hops]
        prompt = student_prompt(q.question)
        draw = rng.random()
        if draw < self.reference_fraction:
            ref_queries = [phrase_query(h, rng.randrange(len(QUERY_STYLES))) for h in q.hops]
            docs = self.retriever.search(ref_queries, self.topk) + [None]
            solution = "".join(text + (information_block([d.contents for d in found]) if query else "")
                               for (text, query), found in zip(response_turns(q, ref_queries), docs))
            prompt = teacher_prompt(q.question, reference_block(solution))
            queries = ref_queries
        elif draw < self.reference_fraction + self.teacher_fraction:
            attempts = []
            n_correct = rng.choice([0, 1, 1, 2, 3])
            for k in range(5):
                if k < n_correct:
                    qs = [phrase_query(h, rng.randrange(len(QUERY_STYLES))) for h in q.hops]
                    attempts.append(AttemptSummary(tuple(qs), True, q.golden_answers[0]))
                else:
                    qs = _corrupt(q, queries, rng, self.entities)
                    attempts.append(AttemptSummary(tuple(qs), False, rng.choice(self.entities)))
            rng.shuffle(attempts)
            correct = [a for a in attempts if a.correct]
            if correct:
                queries = list(correct[0].queries) if rng.random() < 0.8 else list(rng.choice(correct).queries)
            cfg = HindsightConfig(include_answers=rng.random() < 0.3)
            prompt = teacher_prompt(q.question, hindsight_block(attempts, cfg))
        return self._trajectory(q, prompt, queries)

    def _trajectory(self, q: Question, prompt: str, queries: list[str]) -> Trajectory | None:
        t = Trajectory.start(q.id, q.question, q.golden_answers, self.encode(prompt))
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        results = self.retriever.search(queries, self.topk)
        for (text, query), docs in zip(response_turns(q, queries), results + [None]):
            ids = self.encode(text)
            t.add_policy(ids, [0.0] * len(ids), decode)
            if query is None:
                break
            t.queries.append(query)
            # A demonstration must be answerable from what the retriever returned.
            hop = q.hops[len(t.queries) - 1]
            if not any(hop.evidence in d.contents for d in docs):
                return None
            t.add_environment(self.encode(information_block([d.contents for d in docs])), SpanType.INFORMATION)
        t.finalize()
        return t
