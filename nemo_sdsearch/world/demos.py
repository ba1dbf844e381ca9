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

Precise and vague queries (`vague_queries`): a precise query names the entity and the relation's keyword
(one of `QUERY_STYLES`), and the bundled world is built so that it finds the evidence; a vague query
(`VAGUE_STYLES`: the name alone, "about" the name, the name and "overview") mostly does not. The student
demonstrations have a habit: for questions phrased with the second of their relation's two templates
(`VAGUE_TEMPLATE`), each hop is searched vaguely with probability `vague_queries`; every other question,
and every teacher or reference demonstration, searches precisely (a teacher's hindsight block lists vague
attempts among the wrong ones). A vague search that misses the evidence
ends its demonstration right after the query (no answer is ever demonstrated without its evidence), so the
policy learns the habit at exactly that rate and nothing about what to do after a miss. The warm-started
policy therefore leaves room that only better queries can fill: its first query finds the evidence less
often than the ideal query (`sdsearch world --audit`), and RL can learn to drop the habit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from nemo_sdsearch.core.hindsight import AttemptSummary, HindsightConfig, hindsight_block
from nemo_sdsearch.core.prompts import information_block, reference_block, student_prompt, teacher_prompt
from nemo_sdsearch.core.spans import SpanType
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.world.generator import _SINGLE, Hop, Question, keyword

QUERY_STYLES = ["{e} {r}", "{r} of {e}", "what is the {r} of {e}"]  # precise: name + relation keyword
VAGUE_STYLES = ["{e}", "about {e}", "{e} overview"]  # vague: no relation keyword
VAGUE_TEMPLATE = 1  # questions phrased with this template index carry the vague habit (see module doc)


def phrase_query(hop: Hop, style: int) -> str:
    return QUERY_STYLES[style].format(e=hop.entity, r=keyword(hop.relation))


def vague_query(hop: Hop, style: int) -> str:
    return VAGUE_STYLES[style].format(e=hop.entity)


def plan_think(hop: Hop, vague: bool = False) -> str:
    if vague:
        return f"I will look up {hop.entity}."
    return f"I need the {keyword(hop.relation)} of {hop.entity}."


def response_turns(q: Question, queries: Sequence[str],
                   vague: Sequence[bool] | None = None) -> list[tuple[str, str | None]]:
    """Policy turns as (text, query or None). Query i answers hop i; the last turn answers. `vague[i]`: query i
    is a vague one (its plan does not name the relation)."""
    vague = list(vague or [False] * len(queries))
    turns = []
    for i, (hop, query) in enumerate(zip(q.hops, queries)):
        plan = plan_think(hop, vague[i])
        think = plan if i == 0 else f"{q.hops[i - 1].evidence} {plan}"
        turns.append((f"<think> {think} </think>\n<search> {query} </search>", query))
    final = q.hops[-1].evidence
    if q.kind == "comparison":
        final += f" The earlier year is {q.golden_answers[0]}."
    turns.append((f"<think> {final} </think>\n<answer> {q.golden_answers[0]} </answer>", None))
    return turns


def _corrupt(q: Question, queries: list[str], rng: random.Random, entities: Sequence[str]) -> list[str]:
    """A plausible but wrong search plan."""
    mode = rng.randrange(4)
    bad = list(queries)
    if mode == 3:  # vague queries (the name without the relation)
        bad = [vague_query(h, rng.randrange(len(VAGUE_STYLES))) for h in q.hops]
    elif mode == 0 or len(bad) == 1:  # wrong relation on one hop
        i = rng.randrange(len(bad))
        hop = q.hops[i]
        other = rng.choice([r for r in _SINGLE if keyword(r) != keyword(hop.relation)])
        bad[i] = QUERY_STYLES[0].format(e=hop.entity, r=keyword(other))
    elif mode == 1:  # wrong entity on the last hop
        bad[-1] = QUERY_STYLES[0].format(e=rng.choice(entities), r=keyword(q.hops[-1].relation))
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
    vague_queries: float = 0.0  # the student habit's rate of vague queries (module doc)

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
        elif draw >= self.reference_fraction + self.teacher_fraction:  # student
            if self.vague_queries > 0 and q.template == VAGUE_TEMPLATE:
                vague = [rng.random() < self.vague_queries for _ in q.hops]
                queries = [vague_query(h, rng.randrange(len(VAGUE_STYLES))) if v else query
                           for h, v, query in zip(q.hops, vague, queries)]
                return self._trajectory(q, prompt, queries, vague)
        else:
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

    def _trajectory(self, q: Question, prompt: str, queries: list[str],
                    vague: Sequence[bool] | None = None) -> Trajectory | None:
        t = Trajectory.start(q.id, q.question, q.golden_answers, self.encode(prompt))
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        results = self.retriever.search(queries, self.topk)
        for (text, query), docs in zip(response_turns(q, queries, vague), results + [None]):
            ids = self.encode(text)
            t.add_policy(ids, [0.0] * len(ids), decode)
            if query is None:
                break
            t.queries.append(query)
            # A demonstration must be answerable from what the retriever returned: a precise query that
            # misses drops it, a vague one that misses ends it here (the habit, never a guessed answer).
            i = len(t.queries) - 1
            if not any(_is_evidence(q.hops[i], d) for d in docs):
                if vague and vague[i]:
                    break
                return None
            t.add_environment(self.encode(information_block([d.contents for d in docs])), SpanType.INFORMATION)
        t.finalize()
        return t


def _is_evidence(hop: Hop, doc) -> bool:
    return doc.id == hop.evidence_id if hop.evidence_id else hop.evidence in doc.contents
