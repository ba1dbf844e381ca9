"""In-process dense retriever: FAISS inner-product index over normalised encoder embeddings.

Passage embeddings are cached on disk (`cache_dir`, default ~/.cache/nemo_sdsearch/embeddings) under a
key made of the corpus contents, the encoder directory and its passage prefix, pooling and max length, so a
second start over the same corpus does not re-encode it. The cache file is written atomically. The encoder's
prefixes and pooling follow its name unless given (`TextEncoder`'s "auto": E5 gets "query: " / "passage: "),
as the index builder chooses them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Document, Retriever, import_faiss
from .encoder import TextEncoder


class DenseRetriever(Retriever):
    def __init__(self, corpus: Sequence[dict], encoder: TextEncoder | None = None,
                 embeddings: np.ndarray | None = None, cache_dir: str | Path | None = "default"):
        faiss = import_faiss()

        self.corpus = list(corpus)
        self.encoder = encoder or TextEncoder()
        if embeddings is None:
            embeddings = self._cached_embeddings(cache_dir)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(self.corpus), self.encoder.dim):
            raise ValueError(f"embeddings have shape {embeddings.shape}, expected "
                             f"({len(self.corpus)}, {self.encoder.dim})")
        self.index = faiss.IndexFlatIP(self.encoder.dim)
        self.index.add(embeddings)

    def _cache_key(self) -> str:
        h = hashlib.sha256()
        for part in (str(self.encoder.path), self.encoder.passage_prefix, str(self.encoder.max_length),
                     self.encoder.pooling):
            h.update(part.encode() + b"\0")
        for row in self.corpus:
            h.update(row["contents"].encode() + b"\0")
        return h.hexdigest()[:32]

    def _cached_embeddings(self, cache_dir) -> np.ndarray:
        if cache_dir is None:
            return self.encoder.encode_passages([r["contents"] for r in self.corpus])
        if cache_dir == "default":
            cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo_sdsearch" / "embeddings"
        path = Path(cache_dir) / f"{self._cache_key()}.npy"
        if path.exists():
            emb = np.load(path)
            if emb.shape == (len(self.corpus), self.encoder.dim):
                return emb
        emb = self.encoder.encode_passages([r["contents"] for r in self.corpus])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, path)
        return emb

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        if not queries:
            return []
        scores, ids = self.index.search(self.encoder.encode_queries(list(queries)), min(topk, len(self.corpus)))
        return [[Document(self.corpus[i]["id"], self.corpus[i]["contents"], float(s))
                 for i, s in zip(row_ids, row_scores) if i >= 0] for row_ids, row_scores in zip(ids, scores)]
