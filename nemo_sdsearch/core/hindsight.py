"""The hindsight block of SD-Search: what the group of rollouts for one question searched and how it ended.

Format (one line per distinct attempt; `order="outcome"`: successful attempts first, then by group order;
`order="group"`: in group order, so an attempt's position says nothing about its outcome):

    Hindsight from 5 attempts at this question:
    Attempt 1 (correct, x2): search "Velora Works founder" ; search "Talen Moravik birthplace"
    Attempt 2 (wrong): search "Velora Works headquarters" ; answered "Oskar"

Answers are shown only with `include_answers=True`; a correct attempt's answer *is* the gold answer, so
the default hides every answer and the gold answer itself appears only with `include_gold=True`.
The block is capped at `max_tokens` (as counted by `count_tokens`) by dropping whole attempts, the last
wrong one first, never by cutting a line in half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class AttemptSummary:
    queries: tuple[str, ...]
    correct: bool
    answer: str | None = None


@dataclass
class HindsightConfig:
    include_answers: bool = False
    include_gold: bool = False
    max_tokens: int = 256
    header: str = "Hindsight from {n} attempts at this question:"
    order: str = "outcome"   # outcome: correct attempts first; group: first-seen group order


def _attempt_line(index: int, attempt: AttemptSummary, count: int, include_answers: bool) -> str:
    outcome = "correct" if attempt.correct else "wrong"
    if count > 1:
        outcome += f", x{count}"
    steps = [f'search "{q}"' for q in attempt.queries] or ["no search"]
    if include_answers:
        steps.append(f'answered "{attempt.answer}"' if attempt.answer is not None else "no answer")
    return f"Attempt {index} ({outcome}): " + " ; ".join(steps)


def hindsight_block(attempts: Sequence[AttemptSummary], config: HindsightConfig | None = None,
                    gold_answer: str | None = None,
                    count_tokens: Callable[[str], int] = lambda s: len(s.split())) -> str:
    cfg = config or HindsightConfig()
    # Merge identical attempts, keep first-seen order, successful ones first (stable sort).
    distinct: dict[tuple, list] = {}
    for a in attempts:
        key = (a.queries, a.correct, a.answer if cfg.include_answers else None)
        distinct.setdefault(key, [a, 0])[1] += 1
    if cfg.order not in ("outcome", "group"):
        raise ValueError(f"hindsight order {cfg.order!r}: choose outcome | group")
    ordered = list(distinct.values())
    if cfg.order == "outcome":
        ordered.sort(key=lambda item: not item[0].correct)
    header = cfg.header.format(n=len(attempts))
    footer = []
    if cfg.include_gold and gold_answer is not None:
        footer.append(f'The correct answer is "{gold_answer}".')
    while True:
        lines = [_attempt_line(i + 1, a, c, cfg.include_answers) for i, (a, c) in enumerate(ordered)]
        block = "\n".join([header, *lines, *footer])
        if count_tokens(block) <= cfg.max_tokens or not ordered:
            return block
        wrong = [i for i, (a, _) in enumerate(ordered) if not a.correct]
        ordered.pop(wrong[-1] if wrong else -1)
