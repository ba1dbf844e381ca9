"""Synthetic demonstrations of the search protocol for the warm start.

A demonstration is a token-exact `Trajectory` built the way the rollout engine builds one: the prompt,
policy turns (`<think>..</think>` then `<search>..</search>` or `<answer>..</answer>`) and, after every
search, the information block the *real* retriever returns for that query. Two formats:

- student format: prompt P_S(q); queries phrased in one of several equivalent ways, so the policy
  keeps real uncertainty over query wording;
- reference format (Search-E1's teacher): prompt P_T(q, tau_ref) with a correct solution (its policy
  text and the passages it retrieved, as `search_e1.reference_text` renders a pool rollout) and the
  instruction to solve the question in its own words; the response reuses the reference's exact queries;
- teacher format: prompt P_T(q) with a hindsight block over a synthetic group of attempts. Two kinds of
  target (`hindsight_targets`):
  - `precise` (the shipped model's stages): attempts correct or wrong (wrong entity, wrong relation,
    missing hop, vague), outcome-sorted blocks; the response reuses the exact queries of a correct
    attempt when there is one, else the precise query. Its flaw: the correct attempt is always the
    precise one, and listed first, so "a block is present -> write the precise query" and "copy Attempt 1"
    pay as well as reading the labels do.
  - `outcome` (`outcome_group`): 2 to 5 attempts in group order (random label positions), most of them
    plans that would find the evidence, in different wordings (the precise styles and the vague ones that
    happen to hit), a few that would not; which of the good plans are labelled correct is drawn at random
    (a good search can still end in a wrong answer). The response copies an attempt labelled correct;
    with none labelled correct it is the student's own habit (vague queries included). Neither the
    presence of a block nor a position predicts the wording: only the labels do.

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
    hindsight_targets: str = "precise"  # precise (the shipped stages) | outcome (module doc)

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
            return self._trajectory(q, prompt, *self.habit(q, queries, rng))
        elif self.hindsight_targets == "outcome":
            attempts, target, vague = self.outcome_group(q, rng)
            if target is None:   # no attempt labelled correct: the student's own habit
                target, vague = self.habit(q, queries, rng)
            cfg = HindsightConfig(include_answers=rng.random() < 0.3, order="group")
            t = self._trajectory(q, teacher_prompt(q.question, hindsight_block(attempts, cfg)), target, vague)
            if t is not None:
                t.demo_format = "teacher"   # read by warmstart.loss_weights
            return t
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

    def habit(self, q: Question, queries: list[str], rng: random.Random) -> tuple[list[str], list[bool]]:
        """The student's habit for `q` (its precise `queries`): each hop searched vaguely at `vague_queries`
        for questions phrased with `VAGUE_TEMPLATE`, precisely otherwise."""
        if self.vague_queries > 0 and q.template == VAGUE_TEMPLATE:
            vague = [rng.random() < self.vague_queries for _ in q.hops]
            return ([vague_query(h, rng.randrange(len(VAGUE_STYLES))) if v else query
                     for h, v, query in zip(q.hops, vague, queries)], vague)
        return list(queries), [False] * len(queries)

    def _hits(self, q: Question, queries: Sequence[str]) -> bool:
        """Every query of the plan finds its hop's evidence in the top-k (the real retriever)."""
        if len(queries) != len(q.hops):
            return False
        return all(any(_is_evidence(h, d) for d in docs)
                   for h, docs in zip(q.hops, self.retriever.search(list(queries), self.topk)))

    def outcome_group(self, q: Question, rng: random.Random):
        """(attempts in group order, the target queries or None, their vague flags): a synthetic group whose
        labels alone say which wording to copy (module doc). A plan is good when every query finds its
        evidence (precise styles always should; a vague one sometimes does); the correct labels go to 0, 1
        or 2 of the good plans at random (never to every attempt), wrong answers to the rest."""
        n = rng.choice([2, 3, 4, 5])
        plans = []   # (queries, vague flags, good)
        for _ in range(n):
            kind = rng.choices(("precise", "vague", "bad"), weights=(0.55, 0.25, 0.2))[0]
            if kind == "precise":
                style = rng.randrange(len(QUERY_STYLES))
                qs, vague = [phrase_query(h, style) for h in q.hops], [False] * len(q.hops)
            elif kind == "vague":
                flags = [rng.random() < 0.7 for _ in q.hops]
                qs = [vague_query(h, rng.randrange(len(VAGUE_STYLES))) if f else phrase_query(h, rng.randrange(3))
                      for h, f in zip(q.hops, flags)]
                vague = flags
            else:
                qs = _corrupt(q, [phrase_query(h, 0) for h in q.hops], rng, self.entities)
                vague = [False] * len(qs)
            plans.append((qs, vague, kind != "bad" and self._hits(q, qs)))
        good = [i for i, p in enumerate(plans) if p[2]]
        n_correct = min(rng.choice([0, 1, 1, 1, 2]), len(good), n - 1)
        correct = set(rng.sample(good, n_correct))
        attempts = [AttemptSummary(tuple(qs), i in correct, q.golden_answers[0] if i in correct
                                   else rng.choice([e for e in self.entities if e != q.golden_answers[0]]))
                    for i, (qs, _, _) in enumerate(plans)]
        if not correct:
            return attempts, None, None
        pick = rng.choice(sorted(correct))
        return attempts, list(plans[pick][0]), list(plans[pick][1])

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
