"""The `Retriever` seam and the corpus format."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Document:
    id: str
    contents: str
    score: float = 0.0

    @property
    def title(self) -> str:
        return self.contents.partition("\n")[0].strip().strip('"')

    def to_wire(self, with_score: bool) -> dict:
        doc = {"document": {"id": self.id, "contents": self.contents}}
        return {**doc, "score": self.score} if with_score else doc["document"]


class Retriever(ABC):
    """`search(queries, topk) -> one ranked list of Documents per query`."""

    @abstractmethod
    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        ...


class CorpusError(ValueError):
    pass


def import_faiss():
    """The `faiss` module, or an error that says which extra installs it (dense retrieval only: BM25 and the
    HTTP client work without it)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("dense retrieval needs FAISS: pip install 'nemo-sdsearch[cpu]' (faiss-cpu), or "
                          "'nemo-sdsearch[gpu]' (faiss-gpu) on GPU nodes; never both (they install the same module)"
                          ) from None
    return faiss


def parse_corpus_line(line: bytes | str, where: str, number: int) -> dict:
    """One corpus line (raw bytes, decoded here as UTF-8, or text) as `{"id", "contents"}`; any problem, bad
    encoding included, raises a `CorpusError` naming `where` (file:line). A line without an "id" gets `number`, its
    row number (0-based, counting non-empty lines): the number of its vector in a FAISS index built over the file, and
    what Search-R1's server looks a hit up by."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                              "corpus files must be UTF-8 jsonl (re-encode it, e.g. iconv -t UTF-8)") from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not valid JSON ({e.msg}); each line must be "
                          '{"id": ..., "contents": "\\"Title\\"\\ntext"}') from None
    if not isinstance(row, dict) or "contents" not in row or not isinstance(row["contents"], str):
        raise CorpusError(f'{where}: a corpus line needs a string field "contents" ("Title"\\ntext)')
    doc_id = row.get("id")
    return {"id": str(number if doc_id is None else doc_id), "contents": row["contents"]}


def load_corpus(path: str | Path) -> list[dict]:
    """Read a Search-R1 corpus jsonl (a line without "id" gets its row number); a malformed line raises a
    `CorpusError` naming file and line."""
    rows = []
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte is reported with its line
        for i, line in enumerate(f, start=1):
            if line.strip():
                rows.append(parse_corpus_line(line, f"{path}:{i}", len(rows)))
    if not rows:
        raise CorpusError(f"{path}: the corpus is empty")
    return rows


def corpus_texts(corpus: Iterable[dict]) -> list[str]:
    return [row["contents"] for row in corpus]
