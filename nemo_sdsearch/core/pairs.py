"""Search-E1 pair mining over a rollout pool (K rollouts per question).

Per question:
- reference = a correct rollout with the fewest searches; ties go to the shorter one (fewer tokens),
  then to the earlier one;
- student   = the wrong rollout whose text differs most from the reference's at character level
  (Levenshtein distance); with no wrong rollout, the other correct rollout that differs most;
- a question with no correct rollout is dropped (and so is one whose only rollout is the reference).
The compared text is the rollout's own policy text (its reasoning, queries and answer), not the
retrieved passages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs (insert, delete, substitute: 1 each) over code points.

    rapidfuzz's C++ Levenshtein (bit-parallel); the distance is over the rollout texts of every pair at
    paper scale. Same definition as before: tests/test_pairs.py checks it against a plain dynamic program.
    """
    return int(Levenshtein.distance(a, b, weights=(1, 1, 1)))


@dataclass(frozen=True)
class RolloutRecord:
    text: str
    correct: bool
    num_searches: int
    length: int


@dataclass(frozen=True)
class Pair:
    question: int
    reference: int
    student: int
    student_correct: bool
    distance: int


@dataclass
class MiningReport:
    questions: int = 0
    pairs: int = 0
    wrong_students: int = 0
    correct_students: int = 0
    dropped_no_correct: int = 0
    dropped_single_rollout: int = 0
    reference_searches: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        refs = d.pop("reference_searches")
        d["mean_reference_searches"] = float(np.mean(refs)) if refs else float("nan")
        return d


def mine_pair(question: int, rollouts: Sequence[RolloutRecord]) -> Pair | None:
    correct = [i for i, r in enumerate(rollouts) if r.correct]
    if not correct:
        return None
    ref = min(correct, key=lambda i: (rollouts[i].num_searches, rollouts[i].length, i))
    wrong = [i for i, r in enumerate(rollouts) if not r.correct]
    candidates = wrong or [i for i in correct if i != ref]
    if not candidates:
        return None
    dist = {i: levenshtein(rollouts[ref].text, rollouts[i].text) for i in candidates}
    student = max(candidates, key=lambda i: (dist[i], -i))
    return Pair(question, ref, student, rollouts[student].correct, dist[student])


def mine_pairs(groups: Sequence[Sequence[RolloutRecord]]) -> tuple[list[Pair], MiningReport]:
    report = MiningReport(questions=len(groups))
    pairs = []
    for q, rollouts in enumerate(groups):
        pair = mine_pair(q, rollouts)
        if pair is None:
            if any(r.correct for r in rollouts):
                report.dropped_single_rollout += 1
            else:
                report.dropped_no_correct += 1
            continue
        pairs.append(pair)
        report.pairs += 1
        report.reference_searches.append(rollouts[pair.reference].num_searches)
        if pair.student_correct:
            report.correct_students += 1
        else:
            report.wrong_students += 1
    return pairs, report
