"""Index building: `python -m retrieval build --corpus corpus.jsonl --out DIR [--kind dense|bm25]
[--encoder PATH] [--index flat|hnsw|ivfpq]`.

Dense: E5-style encoding streamed over the corpus in shards of `--shard-size` passages; each shard is
written atomically as soon as it is encoded, so an interrupted build resumes at the first missing
shard (memory stays bounded by one shard). The FAISS index is then built from the shards and
`meta.json` is marked complete last: an index directory is either complete or resumable, never corrupt.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from retrieval.index import CorpusStore, atomic_save_npy, scan_offsets


def _write_meta(out: Path, meta: dict) -> None:
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / "meta.json")


def _prepare(corpus: Path, out: Path, meta: dict) -> tuple[CorpusStore, dict]:
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else None
    same = old is not None and all(old.get(k) == v for k, v in meta.items() if k != "complete")
    if not same:  # a different build in this directory: start over
        for p in ("emb", "bm25", "index.faiss", "corpus.jsonl", "corpus.offsets.npy"):
            q = out / p
            shutil.rmtree(q) if q.is_dir() else q.unlink(missing_ok=True)
    if not (out / "corpus.offsets.npy").exists():
        offsets = scan_offsets(corpus)
        shutil.copyfile(corpus, out / "corpus.jsonl")
        atomic_save_npy(out / "corpus.offsets.npy", offsets)
    meta = {**meta, "num_passages": int(len(np.load(out / "corpus.offsets.npy", mmap_mode="r"))), "complete": False}
    _write_meta(out, meta)
    return CorpusStore(out / "corpus.jsonl", np.load(out / "corpus.offsets.npy")), meta


def build_index(corpus: str | Path, out: str | Path, kind: str = "dense", encoder: str | None = None,
                index_type: str = "flat", query_prefix: str = "", passage_prefix: str = "", max_length: int = 256,
                shard_size: int = 10_000, batch_size: int = 64, progress: bool = True) -> dict:
    from tqdm import tqdm

    corpus, out = Path(corpus), Path(out)
    if kind not in ("dense", "bm25"):
        raise ValueError(f"--kind must be dense or bm25, not {kind!r}")
    if index_type not in ("flat", "hnsw", "ivfpq"):
        raise ValueError(f"--index must be flat, hnsw or ivfpq, not {index_type!r}")
    if not corpus.exists():
        raise FileNotFoundError(f"corpus {corpus} not found")
    t0 = time.perf_counter()
    meta = {"kind": kind, "corpus_size_bytes": corpus.stat().st_size}
    if kind == "dense":
        from retrieval.encoder import TextEncoder, default_encoder_path

        encoder_path = str(Path(encoder).resolve()) if encoder else str(default_encoder_path())
        meta.update(encoder=encoder_path, index_type=index_type, query_prefix=query_prefix,
                    passage_prefix=passage_prefix, max_length=max_length, shard_size=shard_size)
    store, meta = _prepare(corpus, out, meta)
    n = meta["num_passages"]
    if kind == "bm25":
        import bm25s

        texts = (store.get(i)["contents"] for i in range(n))
        model = bm25s.BM25()
        model.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=progress), show_progress=progress)
        tmp = out / "bm25.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(str(tmp))
        shutil.rmtree(out / "bm25", ignore_errors=True)
        tmp.rename(out / "bm25")
    else:
        enc = TextEncoder(meta["encoder"], query_prefix, passage_prefix, max_length, batch_size=batch_size)
        meta["dim"] = enc.dim
        (out / "emb").mkdir(exist_ok=True)
        shards = list(range(0, n, shard_size))
        bar = tqdm(total=n, desc="encoding passages", unit="passage", disable=not progress)
        for s, start in enumerate(shards):
            path = out / "emb" / f"shard_{s:05d}.npy"
            stop = min(n, start + shard_size)
            if path.exists() and np.load(path, mmap_mode="r").shape == (stop - start, enc.dim):
                bar.update(stop - start)
                continue
            texts = [store.get(i)["contents"] for i in range(start, stop)]
            atomic_save_npy(path, enc.encode_passages(texts).astype(np.float32))
            bar.update(stop - start)
        bar.close()
        _build_faiss(out, len(shards), enc.dim, index_type, n)
    meta["complete"] = True
    meta["build_seconds"] = time.perf_counter() - t0
    _write_meta(out, meta)
    return meta


def _build_faiss(out: Path, n_shards: int, dim: int, index_type: str, n: int) -> None:
    import faiss

    shard = lambda s: np.ascontiguousarray(np.load(out / "emb" / f"shard_{s:05d}.npy"), dtype=np.float32)
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    else:
        nlist = max(1, min(4096, int(4 * np.sqrt(n))))
        m = next(m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        sample = np.concatenate([shard(s) for s in range(n_shards)])[: max(nlist * 39, 10_000)]
        index.train(sample)
    for s in range(n_shards):
        index.add(shard(s))
    tmp = out / "index.faiss.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(out / "index.faiss")
