"""Answer extraction and exact-match / F1 scoring.

Two answer normalisations, chosen by the config key `reward.normalization`:

- `squad` (the default): the SQuAD `normalize_answer` that Search-R1, FlashRAG and both papers use for
  their EM tables: lower case, delete the ASCII `string.punctuation` characters, drop the articles
  a/an/the as whole words, collapse whitespace. Nothing else: a curly quote, an en dash or a full-width
  letter is kept as it is, so "“Oskar”" does not match "Oskar". Numbers under this definition are
  comparable with the papers'.
- `unicode` (lenient, opt-in): Unicode NFKC first (full-width letters, ligatures and no-break spaces
  become plain), then every Unicode punctuation character is deleted as well. It only ever turns a
  `squad` miss into a match, never the reverse; use it for corpora with typographic quotes and dashes,
  and do not compare its numbers with published tables.

Both keep accents ("Zürich" != "Zurich"), as the standard script does.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable

NORMALIZATIONS = ("squad", "unicode")
_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_answer(text: str, normalization: str = "squad") -> str:
    if normalization == "squad":
        text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    elif normalization == "unicode":
        text = unicodedata.normalize("NFKC", text).lower()
        text = "".join(ch for ch in text
                       if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    else:
        raise ValueError(f"answer normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_answer(response_text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>` in the response, stripped; None if none."""
    matches = _ANSWER.findall(response_text)
    return matches[-1].strip() if matches else None


def exact_match(prediction: str | None, golden_answers: Iterable[str], normalization: str = "squad") -> float:
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction, normalization)
    return float(any(pred == normalize_answer(g, normalization) for g in golden_answers))


def f1_score(prediction: str | None, golden_answers: Iterable[str], normalization: str = "squad") -> float:
    """Token F1 against the best alias; yes/no/noanswer must match exactly (HotpotQA convention)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction, normalization)
    best = 0.0
    for gold in golden_answers:
        ref = normalize_answer(gold, normalization)
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
