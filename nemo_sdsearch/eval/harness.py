"""Evaluation harness: greedy search rollouts over FlashRAG-format datasets, EM and F1 per dataset and
per question kind, a markdown table and a JSON record."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.rollout.engine import RolloutEngine


@dataclass
class Score:
    n: int = 0
    em: float = 0.0
    f1: float = 0.0
    searches: float = 0.0

    def add(self, em: float, f1: float, searches: int) -> None:
        self.n += 1
        self.em += em
        self.f1 += f1
        self.searches += searches

    def mean(self) -> dict:
        d = max(self.n, 1)
        return {"n": self.n, "em": self.em / d, "f1": self.f1 / d, "searches": self.searches / d}


@dataclass
class EvalReport:
    by_dataset: dict[str, dict[str, dict]] = field(default_factory=dict)  # dataset -> kind -> score
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

    def to_markdown(self) -> str:
        lines = ["| dataset | kind | n | EM | F1 | searches/question |", "|---|---|---:|---:|---:|---:|"]
        for name, kinds in self.by_dataset.items():
            for kind, s in kinds.items():
                label = f"**{kind}**" if kind == "all" else kind
                lines.append(f"| {name} | {label} | {s['n']} | {s['em']:.3f} | {s['f1']:.3f} | {s['searches']:.2f} |")
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


def evaluate(engine: RolloutEngine, datasets: dict[str, Sequence[QA]], batch_size: int = 32,
             progress: bool = True, seed: int = 0) -> EvalReport:
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
                    scores["all"].add(em, f1, t.num_searches)
                    if q.kind is not None:
                        scores[q.kind].add(em, f1, t.num_searches)
                    preds.append({"id": q.id, "kind": q.kind, "prediction": t.answer, "golden_answers": q.golden_answers,
                                  "em": em, "f1": f1, "queries": t.queries, "finish_reason": t.finish_reason})
            kinds = ["all"] + sorted(k for k in scores if k != "all")
            report.by_dataset[name] = {k: scores[k].mean() for k in kinds}
            report.predictions[name] = preds
    return report
