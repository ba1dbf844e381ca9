"""Answer extraction and exact-match / F1 scoring with the standard (SQuAD / Search-R1) normalisation.

Normalisation: Unicode NFKC (full-width letters, ligatures, non-breaking spaces become plain), lower
case, punctuation removed (ASCII `string.punctuation` and every Unicode punctuation character, e.g.
curly quotes and dashes), the articles a/an/the dropped, whitespace collapsed. Accents are kept, as
in the standard script: "Zürich" and "Zurich" are different answers.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable

_ASCII_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    # Punctuation is deleted, as the standard script does ("o'neil" == "oneil", "new-york" == "newyork").
    text = "".join(
        ch for ch in text if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P")
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(response_text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>` in the response, stripped; None if none."""
    matches = _ANSWER.findall(response_text)
    return matches[-1].strip() if matches else None


def exact_match(prediction: str | None, golden_answers: Iterable[str]) -> float:
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golden_answers))


def f1_score(prediction: str | None, golden_answers: Iterable[str]) -> float:
    """Token F1 against the best alias; yes/no/noanswer must match exactly (HotpotQA convention)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    best = 0.0
    for gold in golden_answers:
        ref = normalize_answer(gold)
        special = {"yes", "no", "noanswer"}
        if (pred in special or ref in special) and pred != ref:
            continue
        common = Counter(pred.split()) & Counter(ref.split())
        same = sum(common.values())
        if same == 0:
            continue
        precision, recall = same / len(pred.split()), same / len(ref.split())
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
