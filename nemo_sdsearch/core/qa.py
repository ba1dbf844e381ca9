"""Questions, and reading the question files users bring.

A question is FlashRAG's `{"id", "question", "golden_answers", "metadata"}`. `load_questions` reads one file in
either of the two formats in use, row by row:
- FlashRAG jsonl (`{"id", "question", "golden_answers", "metadata"}`);
- Search-R1 / verl rows, parquet or jsonl, as Search-R1's `scripts/data_process/qa_search_{train,test}_merge.py`
  write them: `data_source`, `prompt` (chat messages whose user turn ends with "Question: ..."),
  `reward_model.ground_truth.target` (the gold answers), `extra_info.{split,index}`, and usually the FlashRAG
  columns `question` / `golden_answers` they were made from. Such a row becomes the question with id
  `<data_source>_<split>_<index>` (unique across the merged sources of one file) and metadata
  `{"data_source": ...}`; its `prompt` is not used (the run's prompt format applies).
Parquet needs pyarrow (`pip install 'nemo-sdsearch[data]'`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

_QUESTION_IN_PROMPT = re.compile(r"Question:\s*(.+?)\s*$", re.DOTALL)


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

    @classmethod
    def from_search_r1(cls, row: dict, where: str = "question") -> "QA":
        """A Search-R1 / verl data row (see the module docstring)."""
        source = str(row.get("data_source") or "search_r1")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            question = _question_in_prompt(row.get("prompt"))
            if question is None:
                raise ValueError(f"{where}: a Search-R1 row needs a 'question' column or a prompt whose user turn "
                                 "ends with 'Question: ...'")
        truth = (row.get("reward_model") or {}).get("ground_truth")
        answers = truth.get("target") if isinstance(truth, dict) else truth
        if answers is None:
            answers = row.get("golden_answers")
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"{where}: no usable golden answer (reward_model.ground_truth.target must be a "
                             "non-empty list of strings)")
        extra = row.get("extra_info") or {}
        index = extra.get("index", row.get("id", where))
        return cls(f"{source}_{extra.get('split', 'x')}_{index}", question.strip(), answers,
                   {"data_source": source})


def _question_in_prompt(prompt) -> str | None:
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, (list, tuple)):  # chat messages: the question ends the last user turn
        text = next((m.get("content", "") for m in reversed(prompt) if isinstance(m, dict) and m.get("role") == "user"),
                    "")
    else:
        return None
    m = _QUESTION_IN_PROMPT.search(text or "")
    return m.group(1).strip() if m else None


def is_search_r1_row(row) -> bool:
    return isinstance(row, dict) and ("reward_model" in row or ("prompt" in row and "data_source" in row))


def question_from_row(row, where: str) -> QA:
    """One row of a question file, in either format."""
    return QA.from_search_r1(row, where) if is_search_r1_row(row) else QA.from_flashrag(row, where)


def read_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """(file:row, row) for every row of a parquet or jsonl file; a line that is not UTF-8 JSON raises ValueError
    naming the file and line."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow: pip install 'nemo-sdsearch[data]' "
                             "(or pyarrow)") from None
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", row
        return
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
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def load_questions(path: str | Path) -> list[QA]:
    """The questions of a FlashRAG jsonl file or a Search-R1 parquet / jsonl file (recognised row by row); a bad
    row raises ValueError naming the file and row."""
    out = [question_from_row(row, where) for where, row in read_rows(path)]
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def load_benchmarks(paths) -> dict[str, list[QA]]:
    """Evaluation sets by name, for `sdsearch eval --data`: a FlashRAG file is one set named after the file
    (nq_test.jsonl -> nq_test); a Search-R1 file is one set per data_source (its test.parquet merges seven
    benchmarks: nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, musique, bamboogle)."""
    sets: dict[str, list[QA]] = {}
    for path in paths:
        n = 0
        for where, row in read_rows(path):
            qa = question_from_row(row, where)
            sets.setdefault(qa.metadata["data_source"] if is_search_r1_row(row) else Path(path).stem, []).append(qa)
            n += 1
        if not n:
            raise ValueError(f"{path}: no questions")
    return sets


def unique_id(rid: str, seen: set) -> str:
    """`rid`, or `rid#1`, `rid#2`, ... : the first not in `seen`, which it is added to."""
    new, k = rid, 1
    while new in seen:
        new, k = f"{rid}#{k}", k + 1
    seen.add(new)
    return new


def load_split(paths) -> list[QA]:
    """The questions of one split read from several files (the trainer's `data.*_files`), ids made unique: FlashRAG
    numbers every dataset's rows alike (`train_0` in NQ and in HotpotQA) while the trainer keys rollouts and
    Search-E1's pool by question id, so a repeated id gets a `#k` suffix (the first keeps its id), as
    `scripts/prepare_data.py --merge` writes them."""
    seen: set = set()
    out = []
    for path in paths:
        for q in load_questions(path):
            rid = unique_id(q.id, seen)
            out.append(q if rid == q.id else QA(rid, q.question, q.golden_answers, q.metadata))
    return out


# The name the trainer and `sdsearch eval` call; it reads every format load_questions reads.
load_flashrag = load_questions
