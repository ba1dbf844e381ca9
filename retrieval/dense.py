"""In-process dense retriever: FAISS inner-product index over normalised encoder embeddings."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from retrieval.base import Document, Retriever
from retrieval.encoder import TextEncoder


class DenseRetriever(Retriever):
    def __init__(self, corpus: Sequence[dict], encoder: TextEncoder | None = None,
                 embeddings: np.ndarray | None = None):
        import faiss

        self.corpus = list(corpus)
        self.encoder = encoder or TextEncoder()
        if embeddings is None:
            embeddings = self.encoder.encode_passages([r["contents"] for r in self.corpus])
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(self.corpus), self.encoder.dim):
            raise ValueError(f"embeddings have shape {embeddings.shape}, expected "
                             f"({len(self.corpus)}, {self.encoder.dim})")
        self.index = faiss.IndexFlatIP(self.encoder.dim)
        self.index.add(embeddings)

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        if not queries:
            return []
        scores, ids = self.index.search(self.encoder.encode_queries(list(queries)), min(topk, len(self.corpus)))
        return [[Document(self.corpus[i]["id"], self.corpus[i]["contents"], float(s))
                 for i, s in zip(row_ids, row_scores) if i >= 0] for row_ids, row_scores in zip(ids, scores)]
