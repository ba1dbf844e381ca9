"""Questions in FlashRAG format: `{"id", "question", "golden_answers", "metadata"}`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class QA:
    id: str
    question: str
    golden_answers: list[str]
    metadata: dict = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        """Question kind from the metadata (FlashRAG files may not have one)."""
        kind = self.metadata.get("kind")
        return None if kind is None else str(kind)

    @classmethod
    def from_flashrag(cls, row: dict, where: str = "question") -> "QA":
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("id", "question", "golden_answers") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; FlashRAG format is "
                             '{"id", "question", "golden_answers": [...], "metadata": {...}}')
        answers = row["golden_answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: golden_answers must be a non-empty list of strings")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise ValueError(f"{where}: question must be a non-empty string")
        return cls(str(row["id"]), row["question"], list(answers), dict(row.get("metadata") or {}))


def load_flashrag(path: str | Path) -> list[QA]:
    """Read a FlashRAG jsonl file; a bad line (not UTF-8, not JSON, not a question) raises ValueError
    naming the file and line."""
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "question files must be UTF-8 jsonl (re-encode it, e.g. iconv -t UTF-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            out.append(QA.from_flashrag(row, f"{path}:{i}"))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out
