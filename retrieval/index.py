"""The on-disk index format of the retrieval service, and loading it for search.

DIR/
  meta.json             kind (dense | bm25), encoder, prefixes, max length, FAISS index type, counts, the
                        corpus fingerprint (path, size, mtime, SHA-256), the served files and their sizes
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

from retrieval.base import CorpusError, Document, Retriever, parse_corpus_line


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
        return parse_corpus_line(self._fh.readline(), f"{self.path}:{i + 1}")

    def get_many(self, ids: Sequence[int]) -> list[dict]:
        return [self.get(i) for i in ids]


def scan_offsets(corpus: str | Path) -> np.ndarray:
    """Byte offsets of the non-empty lines of a jsonl file, validating every line."""
    offsets = []
    with open(corpus, "rb") as f:
        pos = 0
        for n, line in enumerate(f, start=1):
            if line.strip():
                parse_corpus_line(line, f"{corpus}:{n}")
                offsets.append(pos)
            pos += len(line)
    if not offsets:
        raise CorpusError(f"{corpus}: the corpus is empty")
    return np.asarray(offsets, dtype=np.int64)


def staging_dir(index_dir: str | Path) -> Path:
    """Where a build of `index_dir` runs until it is swapped in (a sibling: the swap is a rename)."""
    index_dir = Path(index_dir)
    return index_dir.parent / f".{index_dir.name}.building"


def read_meta_file(index_dir: Path) -> dict | None:
    """meta.json of a directory, or None when it has none (or an unreadable one)."""
    try:
        return json.loads((Path(index_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def serving_files(meta: dict) -> dict[str, int | None]:
    """The files a server reads, with their sizes when the build recorded them (older builds: names only)."""
    if "files" in meta:
        return meta["files"]
    return {"corpus.jsonl": None, "corpus.offsets.npy": None,
            ("index.faiss" if meta.get("kind") == "dense" else "bm25"): None}


def rebuild_command(index_dir: str | Path, meta: dict | None) -> str:
    """The `python -m retrieval build` command that (re)builds `index_dir` as its meta.json describes it."""
    import shlex

    meta = meta or {}
    cmd = ["python", "-m", "retrieval", "build", "--corpus", (meta.get("corpus") or {}).get("path", "CORPUS.jsonl"),
           "--out", str(index_dir), "--kind", meta.get("kind", "dense")]
    if meta.get("kind") == "dense":
        flags = {"--encoder": "encoder", "--index": "index_type", "--query-prefix": "query_prefix",
                 "--passage-prefix": "passage_prefix", "--max-length": "max_length", "--shard-size": "shard_size"}
        cmd += [x for flag, key in flags.items() if key in meta for x in (flag, str(meta[key]))]
    return shlex.join(cmd)


def read_meta(index_dir: str | Path) -> dict:
    """meta.json of a complete, intact index; otherwise an error that names the directory and the command
    that (re)builds it."""
    index_dir = Path(index_dir)
    meta = read_meta_file(index_dir)
    if meta is None:
        staged = read_meta_file(staging_dir(index_dir))
        if staged is not None:
            raise FileNotFoundError(f"{index_dir} holds no finished index: a build into it did not finish (its "
                                    f"partial build is in {staging_dir(index_dir)}); run it again to resume: "
                                    f"`{rebuild_command(index_dir, staged)}`")
        what = "has no meta.json" if index_dir.is_dir() else "does not exist"
        raise FileNotFoundError(f"{index_dir} is not an index directory ({what}); build one with "
                                f"`{rebuild_command(index_dir, None)}`")
    if not meta.get("complete"):
        raise ValueError(f"{index_dir}: the index build did not finish (meta.json says complete: false); run the "
                         f"build again to resume it: `{rebuild_command(index_dir, meta)}`")
    for rel, size in serving_files(meta).items():
        path = index_dir / rel
        problem = ("is missing" if not path.exists() else
                   f"has {path.stat().st_size} bytes, not {size}" if size is not None and path.stat().st_size != size
                   else None)
        if problem:
            raise FileNotFoundError(f"{index_dir}: index file {rel} {problem}; the index is damaged: rebuild it with "
                                    f"`{rebuild_command(index_dir, meta)}`")
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
