"""`sdsearch world --audit`: does the wording of a query decide whether the evidence is retrieved?

For every hop of every question the world knows the evidence passage (`Hop.evidence_id`). The audit asks
a retriever four queries per hop and counts how often the evidence lands in the top k:
- ideal: the entity's name and the relation's keyword (`Hop.query`, what the passage itself says);
- entity_only: the name alone;
- wrong_relation: the name and the keyword of another relation of the same kind of entity;
- question: the question text (only for hops whose entity the question names: the first hop of a bridge
  question, both hops of a comparison).
The world is built so that only the ideal query reliably finds the evidence (`world/generator.py`);
`TARGETS` are the promises for BM25 at top 3, pinned by tests/test_world.py.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from nemo_sdsearch.world.generator import RELATIONS, TYPE_RELATIONS, Question, World, keyword

QUERY_FORMS = ("ideal", "entity_only", "wrong_relation", "question")
# (retriever, query form, op, goal) at top 3
TARGETS = [("bm25", "ideal", ">=", 0.95), ("bm25", "entity_only", "<=", 0.5), ("bm25", "wrong_relation", "<=", 0.2)]


@dataclass(frozen=True)
class AuditQuery:
    kind: str  # question kind
    form: str  # one of QUERY_FORMS
    query: str
    evidence_id: str


def wrong_keyword(relation: str, rng: random.Random) -> str:
    """The keyword of another relation of the same kind of entity (so the query finds a sibling passage)."""
    others = [r for r in TYPE_RELATIONS[RELATIONS[relation][0]] if keyword(r) != keyword(relation)]
    return keyword(rng.choice(others))


def audit_queries(questions: Sequence[Question]) -> list[AuditQuery]:
    out = []
    for q in questions:
        for i, h in enumerate(q.hops):
            rng = random.Random(f"{q.id}/{i}")
            out += [AuditQuery(q.kind, "ideal", h.query, h.evidence_id),
                    AuditQuery(q.kind, "entity_only", h.entity, h.evidence_id),
                    AuditQuery(q.kind, "wrong_relation", f"{h.entity} {wrong_keyword(h.relation, rng)}",
                               h.evidence_id)]
            if h.entity in q.question:
                out.append(AuditQuery(q.kind, "question", q.question, h.evidence_id))
    return out


@dataclass
class AuditReport:
    topk: int
    # retriever -> kind ("all" included) -> form -> [hits, n]
    counts: dict[str, dict[str, dict[str, list[int]]]] = field(default_factory=dict)

    def rate(self, retriever: str, form: str, kind: str = "all") -> float:
        hits, n = self.counts[retriever][kind][form]
        return hits / n if n else float("nan")

    def to_markdown(self) -> str:
        lines = ["| retriever | kind | n hops | " + " | ".join(f"{f} hit@{self.topk}" for f in QUERY_FORMS) + " |",
                 "|---|---|---:|" + "---:|" * len(QUERY_FORMS)]
        for name, kinds in self.counts.items():
            for kind, forms in kinds.items():
                cells = [f"{self.rate(name, f, kind):.3f}" for f in QUERY_FORMS]
                label = f"**{kind}**" if kind == "all" else kind
                lines.append(f"| {name} | {label} | {forms['ideal'][1]} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def target_lines(self) -> list[str]:
        from nemo_sdsearch.core.targets import target_line

        return [target_line(f"world_{name}_{form}_hit_at_{self.topk}", self.rate(name, form), op, goal)
                for name, form, op, goal in TARGETS if name in self.counts]


def audit(retrievers: dict, questions: Sequence[Question], topk: int = 3) -> AuditReport:
    """Hit rates of the evidence passage at top `topk` per retriever (name -> `Retriever`), question kind and
    query form."""
    queries = audit_queries(questions)
    report = AuditReport(topk)
    for name, retriever in retrievers.items():
        results = retriever.search([a.query for a in queries], topk)
        counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: {f: [0, 0] for f in QUERY_FORMS})
        for a, docs in zip(queries, results):
            hit = int(any(d.id == a.evidence_id for d in docs[:topk]))
            for kind in ("all", a.kind):
                counts[kind][a.form][0] += hit
                counts[kind][a.form][1] += 1
        report.counts[name] = {"all": counts["all"], **{k: counts[k] for k in sorted(counts) if k != "all"}}
    return report


def audit_world(world: World, questions: Sequence[Question], retrievers: Sequence[str] = ("bm25", "dense"),
                topk: int = 3, encoder: str | None = None) -> AuditReport:
    """`audit` with retrievers built the project's way (`build_retriever`) over the world's passages."""
    from nemo_sdsearch.retrieval import build_retriever

    return audit({name: build_retriever(name, world.passages, encoder) for name in retrievers}, questions, topk)
