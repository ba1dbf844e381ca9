"""The on-disk index format of the retrieval service, and loading it for search.

DIR/
  meta.json             kind (dense | bm25), encoder, prefixes, pooling, max length, FAISS index type, counts, the
                        corpus fingerprint (path, size, mtime, SHA-256), the served files and their sizes
  corpus.jsonl          the corpus as given (Search-R1 format), never loaded whole
  corpus.offsets.npy    byte offset of every line, so a document is one seek + one readline
  emb/shard_NNNNN.npy   passage embeddings (float32, L2-normalised), one file per shard (dense)
  index.faiss           the FAISS index (dense), memory-mapped at load when the index type allows
  bm25/                 the bm25s index (bm25), memory-mapped at load

`FaissFileRetriever` serves an index that was not built here, as it is: a FAISS index file and the corpus jsonl
its vectors were made from (Search-R1's `e5_Flat.index` + `wiki-18.jsonl`; vector i is the i-th corpus line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CorpusError, Document, Retriever, import_faiss, parse_corpus_line


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
        return parse_corpus_line(self._fh.readline(), f"{self.path}:{i + 1}", i)

    def get_many(self, ids: Sequence[int]) -> list[dict]:
        return [self.get(i) for i in ids]


def scan_offsets(corpus: str | Path) -> np.ndarray:
    """Byte offsets of the non-empty lines of a jsonl file, validating every line."""
    offsets = []
    with open(corpus, "rb") as f:
        pos = 0
        for n, line in enumerate(f, start=1):
            if line.strip():
                parse_corpus_line(line, f"{corpus}:{n}", len(offsets))
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
    """The `python -m nemo_sdsearch.retrieval build` command that (re)builds `index_dir` as its meta.json describes
    it."""
    import shlex

    meta = meta or {}
    cmd = ["python", "-m", __package__, "build", "--corpus", (meta.get("corpus") or {}).get("path", "CORPUS.jsonl"),
           "--out", str(index_dir), "--kind", meta.get("kind", "dense")]
    if meta.get("kind") == "dense":
        flags = {"--encoder": "encoder", "--index": "index_type", "--query-prefix": "query_prefix",
                 "--passage-prefix": "passage_prefix", "--pooling": "pooling", "--max-length": "max_length",
                 "--shard-size": "shard_size"}
        meta = {"pooling": "mean", **meta} if "query_prefix" in meta else meta  # older builds: mean, unrecorded
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
            from .encoder import TextEncoder

            self.encoder = TextEncoder(self.meta["encoder"], self.meta["query_prefix"], self.meta["passage_prefix"],
                                       self.meta["max_length"], device=device, pooling=self.meta.get("pooling", "mean"))
            self.index = read_faiss_index(self.dir / "index.faiss", use_gpu)
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
        return _documents(self.store, ids, scores, keep_zero=self.kind == "dense")


class FaissFileRetriever(IndexRetriever):
    """A FAISS index file served with the corpus jsonl its vectors were made from, neither rebuilt nor copied:
    vector i is the i-th non-empty line of the corpus (how Search-R1's index_builder.py writes `e5_Flat.index`
    from `wiki-18.jsonl`). The queries are encoded as the passages were: same encoder, pooling and query prefix
    (E5: mean pooling, "query: "), L2-normalised. The corpus is indexed by a newline scan at start (disk speed,
    no parsing); a line is parsed when a search returns it."""

    def __init__(self, faiss_index: str | Path, corpus: str | Path, encoder: str | Path, query_prefix: str = "",
                 pooling: str = "mean", max_length: int = 256, device: str | None = None,
                 use_gpu: bool | None = None, progress: bool = False):
        import time

        from .encoder import TextEncoder

        t0 = time.perf_counter()
        faiss_index, corpus = Path(faiss_index), Path(corpus)
        for flag, path in (("--faiss-index", faiss_index), ("--corpus", corpus)):
            if not path.is_file():
                raise FileNotFoundError(f"{flag} {path} not found")
        if corpus.suffix in (".gz", ".bz2", ".xz", ".zst"):
            raise ValueError(f"--corpus {corpus} is compressed: decompress it first (e.g. gzip -d {corpus}); the "
                             "server reads lines by byte offset")
        self.encoder = TextEncoder(encoder, query_prefix, "", max_length, device=device, pooling=pooling)
        self.index = read_faiss_index(faiss_index, use_gpu=False)
        if self.index.d != self.encoder.dim:
            raise ValueError(f"--faiss-index {faiss_index} holds {self.index.d}-dimensional vectors but the encoder "
                             f"{encoder} makes {self.encoder.dim}-dimensional ones: give the encoder the index was "
                             "built with (Search-R1's e5_Flat.index: intfloat/e5-base-v2, 768)")
        offsets = line_offsets(corpus, progress)
        if len(offsets) != self.index.ntotal:
            raise ValueError(f"--faiss-index {faiss_index} holds {self.index.ntotal} vectors but --corpus {corpus} has "
                             f"{len(offsets)} non-empty lines: they are not an index and the corpus it was built "
                             "from (vector i must be line i)")
        self.store = CorpusStore(corpus, offsets)
        for i in {0, len(offsets) - 1}:  # a wrong file (not jsonl, not UTF-8) fails now, not at the first search
            self.store.get(i)
        self.index = _maybe_to_gpus(self.index, use_gpu)
        self.kind = "dense"
        self.startup_s = time.perf_counter() - t0  # search and len: IndexRetriever's dense path


def _documents(store: CorpusStore, ids, scores, keep_zero: bool) -> list[list[Document]]:
    """One ranked Document list per query from a search's (ids, scores); FAISS pads missing hits with id -1, and
    a BM25 score of 0 matched nothing (keep_zero=False drops those)."""
    out = []
    for row_ids, row_scores in zip(np.asarray(ids), np.asarray(scores)):
        keep = [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0 and (keep_zero or s > 0)]
        docs = store.get_many([i for i, _ in keep])
        out.append([Document(d["id"], d["contents"], s) for d, (_, s) in zip(docs, keep)])
    return out


def line_offsets(corpus: str | Path, progress: bool = False) -> np.ndarray:
    """Byte offsets of the non-empty lines of a text file, from a newline scan (no parsing: about disk speed, some
    seconds for the 14 GB wiki-18.jsonl); 8 bytes per line."""
    from tqdm import tqdm

    corpus = Path(corpus)
    size = corpus.stat().st_size
    newlines, pos = [], 0
    with open(corpus, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"indexing lines of {corpus.name}",
                                       disable=not progress or size < 2**28) as bar:
        while chunk := f.read(2**26):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos)
            pos += len(chunk)
            bar.update(len(chunk))
    ends = np.concatenate(newlines + [np.asarray([size], dtype=np.int64)]).astype(np.int64)
    starts = np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1] + 1])
    return starts[ends > starts]  # empty lines (and the end of a file that ends with a newline) hold no document


def read_faiss_index(path: str | Path, use_gpu: bool | None = None):
    """A FAISS index file, memory-mapped where its type allows (flat, IVF), with search-time settings for
    approximate types (HNSW efSearch >= 128, IVF nprobe <= 64), on the GPUs when asked or available."""
    faiss = import_faiss()

    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except RuntimeError:  # index types without mmap support load into memory
        index = faiss.read_index(str(path))
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(index.hnsw.efSearch, 128)
    if hasattr(index, "nprobe"):
        index.nprobe = min(64, index.nlist)
    return _maybe_to_gpus(index, use_gpu)


def _maybe_to_gpus(index, use_gpu: bool | None):
    """Shard the index over all GPUs when faiss-gpu is installed (use_gpu=None: when available)."""
    faiss = import_faiss()

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
