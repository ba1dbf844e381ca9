"""The on-disk index format of the retrieval service, and loading it for search.

DIR/
  meta.json             kind (dense | bm25), encoder, prefixes, max length, FAISS index type, counts
  corpus.jsonl          the corpus as given (Search-R1 format), never loaded whole
  corpus.offsets.npy    byte offset of every line, so a document is one seek + one readline
  emb/shard_NNNNN.npy   passage embeddings (float32, L2-normalised), one file per shard (dense)
  index.faiss           the FAISS index (dense), memory-mapped at load when the index type allows
  bm25/                 the bm25s index (bm25), memory-mapped at load
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.base import Document, Retriever, parse_corpus_line


class CorpusStore:
    """Random access to a jsonl corpus through a line-offset table (bounded memory)."""

    def __init__(self, path: str | Path, offsets: np.ndarray):
        self.path = Path(path)
        self.offsets = offsets
        self._fh = open(self.path, "rb")

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, i: int) -> dict:
        self._fh.seek(int(self.offsets[i]))
        return parse_corpus_line(self._fh.readline().decode("utf-8"), f"{self.path}:{i + 1}")

    def get_many(self, ids: Sequence[int]) -> list[dict]:
        return [self.get(i) for i in ids]


def scan_offsets(corpus: str | Path) -> np.ndarray:
    """Byte offsets of the non-empty lines of a jsonl file, validating every line."""
    offsets = []
    with open(corpus, "rb") as f:
        pos = 0
        for n, line in enumerate(f, start=1):
            if line.strip():
                parse_corpus_line(line.decode("utf-8"), f"{corpus}:{n}")
                offsets.append(pos)
            pos += len(line)
    if not offsets:
        raise ValueError(f"{corpus}: the corpus is empty")
    return np.asarray(offsets, dtype=np.int64)


def read_meta(index_dir: str | Path) -> dict:
    path = Path(index_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{index_dir} is not an index directory (no meta.json); build one with "
                                "`python -m retrieval build --corpus C --out DIR`")
    meta = json.loads(path.read_text())
    if not meta.get("complete"):
        raise ValueError(f"{index_dir}: the index build did not finish; run the same build command again "
                         "to resume it")
    return meta


class IndexRetriever(Retriever):
    """Search over a built index directory (dense FAISS or BM25)."""

    def __init__(self, index_dir: str | Path, device: str | None = None, use_gpu: bool | None = None):
        import time

        t0 = time.perf_counter()
        self.dir = Path(index_dir)
        self.meta = read_meta(self.dir)
        self.store = CorpusStore(self.dir / "corpus.jsonl", np.load(self.dir / "corpus.offsets.npy", mmap_mode="r"))
        self.kind = self.meta["kind"]
        if self.kind == "dense":
            import faiss

            from retrieval.encoder import TextEncoder

            self.encoder = TextEncoder(self.meta["encoder"], self.meta["query_prefix"], self.meta["passage_prefix"],
                                       self.meta["max_length"], device=device)
            flags = faiss.IO_FLAG_MMAP if self.meta["index_type"] in ("flat", "ivfpq") else 0
            try:
                self.index = faiss.read_index(str(self.dir / "index.faiss"), flags)
            except RuntimeError:  # index types without mmap support load into memory
                self.index = faiss.read_index(str(self.dir / "index.faiss"))
            if self.meta["index_type"] == "hnsw":
                self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, 128)
            if self.meta["index_type"] == "ivfpq":
                self.index.nprobe = min(64, self.index.nlist)
            self.index = _maybe_to_gpus(self.index, use_gpu)
        elif self.kind == "bm25":
            import bm25s

            self.bm25 = bm25s.BM25.load(str(self.dir / "bm25"), mmap=True)
            self._bm25s = bm25s
        else:
            raise ValueError(f"{index_dir}: unknown index kind {self.kind!r}")
        self.startup_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.store)

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        if not queries:
            return []
        k = min(topk, len(self.store))
        if self.kind == "dense":
            scores, ids = self.index.search(self.encoder.encode_queries(list(queries)), k)
        else:
            tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
            ids, scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        out = []
        for row_ids, row_scores in zip(np.asarray(ids), np.asarray(scores)):
            keep = [(int(i), float(s)) for i, s in zip(row_ids, row_scores)
                    if i >= 0 and (self.kind == "dense" or s > 0)]
            docs = self.store.get_many([i for i, _ in keep])
            out.append([Document(d["id"], d["contents"], s) for d, (_, s) in zip(docs, keep)])
        return out


def _maybe_to_gpus(index, use_gpu: bool | None):
    """Shard the index over all GPUs when faiss-gpu is installed (use_gpu=None: when available)."""
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is False or n == 0:
        if use_gpu:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU (install faiss-gpu on a GPU node)")
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    co.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, co=co)


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
