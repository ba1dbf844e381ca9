"""Evaluation harness: greedy search rollouts over FlashRAG-format datasets, EM and F1 per dataset and
per question kind (and, for questions that record their evidence passages, the query-level metrics of
world/evidence.py: first-query hit, evidence hit per search, evidence recall), a markdown table and a JSON
record."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.rollout.engine import RolloutEngine
from nemo_sdsearch.world import evidence


@dataclass
class Score:
    """Sums over the questions of one dataset and kind. `mean()` is the per-kind record of results.json: n, em,
    f1, searches (per question) and, when some question records its evidence passages (the bundled world's
    FlashRAG `metadata.evidence`; world/evidence.py), n_evidence (those questions), evidence_searches (their
    searches), first_query_hit (fraction of them whose first search retrieved the evidence of a hop searchable
    first), evidence_hit_per_search (fraction of their searches, pooled, that retrieved evidence of any hop; NaN
    without searches) and evidence_recall (fraction of a question's hops whose evidence any search retrieved,
    mean). `sums()` / `from_sums()` add shards up (the sharded evaluation during training)."""
    n: int = 0
    em: float = 0.0
    f1: float = 0.0
    searches: float = 0.0
    query: list[float] = field(default_factory=lambda: [0.0] * len(evidence.SUMS))  # evidence.SUMS

    SUMS = ("n", "em", "f1", "searches", *evidence.SUMS)
    _COUNTS = {"n", "searches", "n_evidence", "first_query_hits", "evidence_hits", "evidence_searches"}

    def add(self, em: float, f1: float, searches: int, query: "evidence.QueryMetrics | None" = None) -> None:
        self.n += 1
        self.em += em
        self.f1 += f1
        self.searches += searches
        if query is not None:
            self.query = [a + b for a, b in zip(self.query, evidence.metric_sums([query]))]

    def mean(self) -> dict:
        d = max(self.n, 1)
        out = {"n": self.n, "em": self.em / d, "f1": self.f1 / d, "searches": self.searches / d}
        rates = evidence.rates(self.query)
        if rates:
            out.update(n_evidence=int(round(self.query[0])), evidence_searches=int(round(self.query[3])), **rates)
        return out

    def sums(self) -> list[float]:
        return [float(self.n), self.em, self.f1, self.searches, *self.query]

    @classmethod
    def from_sums(cls, sums) -> "Score":
        v = [round(x) if k in cls._COUNTS else float(x) for k, x in zip(cls.SUMS, sums)]
        return cls(int(v[0]), v[1], v[2], v[3], [float(x) for x in v[4:]])


def _rate(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


@dataclass
class EvalReport:
    by_dataset: dict[str, dict[str, dict]] = field(default_factory=dict)  # dataset -> kind -> score
    # dataset -> kind -> `Score.sums()` (not written: what shards of an evaluation add up, exactly)
    sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    predictions: dict[str, list[dict]] = field(default_factory=dict)
    normalization: str = "squad"  # the EM definition (core.reward): squad is the papers' one
    # the settings the rollouts ran under and where each came from (`sdsearch eval`: flag, run config or
    # default): name -> {"value": ..., "from": ...}; written to results.json and results.md
    settings: dict[str, dict] = field(default_factory=dict)

    @property
    def em_definition(self) -> str:
        return {"squad": "EM: SQuAD / Search-R1 answer normalisation",
                "unicode": "EM: lenient Unicode normalisation (NFKC, Unicode punctuation deleted); "
                           "not comparable with the papers' tables"}[self.normalization]

    def overall(self, dataset: str) -> dict:
        return self.by_dataset[dataset]["all"]

    @property
    def has_evidence(self) -> bool:
        """Whether some dataset records evidence passages (then the query-level columns are shown)."""
        return any("first_query_hit" in s for kinds in self.by_dataset.values() for s in kinds.values())

    def to_markdown(self) -> str:
        """One row per dataset and question kind: n, EM, F1, searches per question and, when some dataset
        records evidence passages, first-query hit, evidence hit per search and evidence recall (a dataset
        without evidence metadata shows "-" there)."""
        head, rule = "| dataset | kind | n | EM | F1 | searches/question |", "|---|---|---:|---:|---:|---:|"
        query = self.has_evidence
        if query:
            head += " first-query hit | evidence hit/search | evidence recall |"
            rule += "---:|---:|---:|"
        lines = [head, rule]
        for name, kinds in self.by_dataset.items():
            for kind, s in kinds.items():
                label = f"**{kind}**" if kind == "all" else kind
                line = f"| {name} | {label} | {s['n']} | {s['em']:.3f} | {s['f1']:.3f} | {s['searches']:.2f} |"
                if query:
                    line += (" " + " | ".join(_rate(s[k]) for k in evidence.RATES) + " |" if "first_query_hit" in s
                             else " - | - | - |")
                lines.append(line)
        return "\n".join(lines)

    def table1(self) -> str:
        """The papers' Table 1 layout: one row of EM, one column per benchmark in the papers' order
        (NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle; any other dataset after them) and
        the unweighted average over datasets."""
        names = sorted(self.by_dataset, key=lambda n: (_table1_rank(n), n))
        cells = [self.by_dataset[n]["all"]["em"] for n in names]
        head = "| " + " | ".join(_table1_label(n) for n in names) + " | Avg. |"
        rule = "|" + "---:|" * (len(names) + 1)
        row = "| " + " | ".join(f"{100 * c:.1f}" for c in cells) + f" | {100 * sum(cells) / max(len(cells), 1):.1f} |"
        return "\n".join([head, rule, row])

    def settings_markdown(self) -> str:
        """The settings table (setting | value | from); empty when no settings were recorded."""
        if not self.settings:
            return ""
        rows = ["| setting | value | from |", "|---|---|---|"]
        rows += [f"| {name} | {s['value']} | {s['from']} |" for name, s in self.settings.items()]
        return "\n".join(rows)

    def to_json(self) -> dict:
        out = {"scores": self.by_dataset, "predictions": self.predictions, "normalization": self.normalization,
               "average_em": sum(d["all"]["em"] for d in self.by_dataset.values()) / max(len(self.by_dataset), 1)}
        if self.settings:
            out["settings"] = self.settings
        return out

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.to_json(), indent=1))
        text = self.em_definition + "\n\n" + self.to_markdown() + "\n"
        if len(self.by_dataset) > 1:
            text = "EM x 100 (Table 1 layout)\n\n" + self.table1() + "\n\n" + text
        if self.settings:
            text += "\nSettings of the rollouts (greedy):\n\n" + self.settings_markdown() + "\n"
        (out / "results.md").write_text(text)


# The papers' benchmark order (general QA, then multi-hop QA) and display names; file stems are matched
# after lower-casing and dropping separators and split suffixes ("nq_test.jsonl" -> NQ).
_TABLE1 = [("nq", "NQ"), ("triviaqa", "TriviaQA"), ("popqa", "PopQA"), ("hotpotqa", "HotpotQA"),
           ("2wikimultihopqa", "2Wiki"), ("2wiki", "2Wiki"), ("musique", "MuSiQue"), ("bamboogle", "Bamboogle")]


def _table1_key(name: str) -> str:
    key = "".join(c for c in name.lower() if c.isalnum())
    for suffix in ("test", "dev", "validation", "val", "train"):
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[:-len(suffix)]
            break
    return key


def _table1_rank(name: str) -> int:
    key = _table1_key(name)
    order = {k: i for i, k in enumerate(dict.fromkeys(label for _, label in _TABLE1))}
    for k, label in _TABLE1:
        if key == k:
            return order[label]
    return len(order)


def _table1_label(name: str) -> str:
    key = _table1_key(name)
    return next((label for k, label in _TABLE1 if key == k), name)


# The key prefix of a per-data_source score (`evaluate(..., by_source=True)`: the training's validation, logged
# as Search-R1 / verl log it, `val/test_score/<data_source>`).
SOURCE = "data_source:"


def data_source(q: QA) -> str:
    """A question's data_source (a Search-R1 row's column, else its FlashRAG metadata's); verl's "unknown"
    for a question without one (the bundled world)."""
    return str(q.metadata.get("data_source") or "unknown")


def evaluate(engine: RolloutEngine, datasets: dict[str, Sequence[QA]], batch_size: int = 32,
             progress: bool = True, seed: int = 0, by_source: bool = False) -> EvalReport:
    """Greedy rollouts of every question; per dataset the scores of all its questions ("all"), of each
    question kind and, with `by_source`, of each data_source (keys `SOURCE + name`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    report = EvalReport(normalization=engine.cfg.normalization)
    total = sum(len(v) for v in datasets.values())
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, transient=False) as bar:
        task = bar.add_task("eval", total=total)
        for name, questions in datasets.items():
            bar.update(task, description=f"eval {name}")
            scores: dict[str, Score] = defaultdict(Score)
            preds = []
            for i in range(0, len(questions), batch_size):
                batch = list(questions[i:i + batch_size])
                trajs = engine.run(batch, n_samples=1, seed=seed + i,
                                   progress=lambda n: bar.advance(task, n))
                for q, t in zip(batch, trajs):
                    em, f1 = t.exact_match, t.f1
                    qm = evidence.trajectory_query_metrics(t, q.metadata, engine.retriever, engine.cfg.topk)
                    scores["all"].add(em, f1, t.num_searches, qm)
                    if q.kind is not None:
                        scores[q.kind].add(em, f1, t.num_searches, qm)
                    if by_source:
                        scores[SOURCE + data_source(q)].add(em, f1, t.num_searches, qm)
                    pred = {"id": q.id, "kind": q.kind, "prediction": t.answer, "golden_answers": q.golden_answers,
                            "em": em, "f1": f1, "queries": t.queries, "retrieved_ids": t.retrieved_ids,
                            "finish_reason": t.finish_reason}
                    if qm is not None:  # the question records its evidence passages
                        pred.update(first_query_hit=qm.first_query_hit, evidence_hits=list(qm.evidence_hits),
                                    evidence_recall=qm.evidence_recall)
                    preds.append(pred)
            kinds = ["all"] + sorted(k for k in scores if k != "all")
            report.by_dataset[name] = {k: scores[k].mean() for k in kinds}
            report.sums[name] = {k: scores[k].sums() for k in kinds}
            report.predictions[name] = preds
    return report
