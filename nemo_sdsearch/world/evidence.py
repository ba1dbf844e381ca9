"""Query-level metrics of a rollout: did its searches retrieve the evidence passages of its question?

The bundled world records, for every hop of a question, the id of the passage that holds its answer
(FlashRAG `metadata.evidence`, one id per hop; see `world/generator.py`). Given what each search of a
rollout retrieved (passage ids, in rank order), `query_metrics` returns:
- `evidence_hits`: per search, whether it retrieved the evidence passage of any hop of the question;
- `first_query_hit`: whether the first search retrieved the evidence of a hop that can be searched first:
  the first hop (single-hop, bridge; a bridge's second hop needs the first one's answer), or either hop
  of a comparison (its two hops can be searched in either order). A rollout that never searched misses;
- `searches`: how many searches it made;
- `evidence_recall`: the fraction of the question's hops whose evidence any search retrieved.
Questions without evidence metadata (user files) get None: callers omit the metrics for them.

`trajectory_query_metrics` takes a `Trajectory`: it reads `retrieved_ids` (one list of passage ids per
entry of `queries`) if the rollout engine recorded them, else re-runs the recorded queries through the
retriever the rollout used (exact for deterministic retrievers such as BM25 and dense FAISS over a fixed
corpus).

Aggregates over rollouts, used by the training metrics (`env/first_query_hit`, ...), the evaluation harness
and the greedy evaluations during training: `metric_sums` gives the five sums (`SUMS`) that add up over
shards and data-parallel replicas, `rates` turns (all-reduced) sums into `first_query_hit` (fraction of
rollouts), `evidence_hit_per_search` (over all searches pooled; NaN when none searched) and `evidence_recall`
(mean over rollouts), or {} when no rollout had evidence metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class QueryMetrics:
    evidence_hits: tuple[bool, ...]
    first_query_hit: bool
    searches: int
    evidence_recall: float

    @property
    def evidence_hit_rate(self) -> float:
        """Fraction of this rollout's searches that retrieved evidence (nan without searches)."""
        return sum(self.evidence_hits) / self.searches if self.searches else math.nan


def query_metrics(retrieved_ids: Sequence[Sequence[str]], metadata: Mapping | None) -> QueryMetrics | None:
    """Metrics of one rollout from the passage ids each of its searches retrieved (one list per search, as
    many lists as searches) and its question's metadata; None when the metadata has no evidence ids."""
    evidence = list((metadata or {}).get("evidence") or [])
    if not evidence:
        return None
    wanted = set(evidence)
    hits = tuple(bool(wanted & set(ids)) for ids in retrieved_ids)
    first_ok = set(evidence) if (metadata or {}).get("kind") == "comparison" else {evidence[0]}
    first = bool(retrieved_ids) and bool(first_ok & set(retrieved_ids[0]))
    found = set().union(*map(set, retrieved_ids)) if retrieved_ids else set()
    recall = sum(e in found for e in evidence) / len(evidence)
    return QueryMetrics(hits, first, len(retrieved_ids), recall)


def trajectory_query_metrics(trajectory, metadata: Mapping | None, retriever=None,
                             topk: int = 3) -> QueryMetrics | None:
    """`query_metrics` of a `Trajectory`: its `retrieved_ids` when recorded, else its `queries` re-run
    through `retriever` at `topk` (the rollout's own retriever and top k)."""
    retrieved = getattr(trajectory, "retrieved_ids", None)
    if retrieved is None or len(retrieved) != len(trajectory.queries):  # not recorded (or an older record)
        if not (metadata or {}).get("evidence"):
            return None
        if retriever is None:
            raise ValueError("this trajectory does not record retrieved passage ids: pass the retriever "
                             "(and top k) its rollout used")
        queries = list(trajectory.queries)
        retrieved = [[d.id for d in docs] for docs in retriever.search(queries, topk)] if queries else []
    return query_metrics(retrieved, metadata)


def summarize(metrics: Iterable[QueryMetrics | None]) -> dict[str, float]:
    """Means over rollouts (those without evidence metadata left out): `first_query_hit_rate`,
    `evidence_hit_rate` (over all searches pooled), `evidence_recall`, `searches_per_question`, `n`.
    Empty when no rollout has evidence metadata."""
    sums = metric_sums(metrics)  # the same sums the training metrics and evaluations all-reduce
    r = rates(sums)
    if not r:
        return {}
    n = int(sums[0])
    return {"first_query_hit_rate": r["first_query_hit"], "evidence_hit_rate": r["evidence_hit_per_search"],
            "evidence_recall": r["evidence_recall"], "searches_per_question": sums[3] / n, "n": n}


# the sums behind `rates`: rollouts with evidence metadata, first-query hits, searches that retrieved evidence,
# searches (of those rollouts), and the sum of their evidence recalls
SUMS = ("n_evidence", "first_query_hits", "evidence_hits", "evidence_searches", "evidence_recall_sum")
RATES = ("first_query_hit", "evidence_hit_per_search", "evidence_recall")


def metric_sums(metrics: Iterable[QueryMetrics | None]) -> list[float]:
    """The `SUMS` of some rollouts' metrics (those without evidence metadata, None, left out)."""
    rows = [m for m in metrics if m is not None]
    return [float(len(rows)), float(sum(m.first_query_hit for m in rows)),
            float(sum(sum(m.evidence_hits) for m in rows)), float(sum(m.searches for m in rows)),
            float(sum(m.evidence_recall for m in rows))]


def rates(sums: Sequence[float]) -> dict[str, float]:
    """`RATES` from `SUMS` (summed over any number of shards); {} when no rollout had evidence metadata."""
    n, first, hits, searches, recall = (float(x) for x in sums)
    if n < 0.5:
        return {}
    return {"first_query_hit": first / n,
            "evidence_hit_per_search": hits / searches if searches > 0 else math.nan,
            "evidence_recall": recall / n}
