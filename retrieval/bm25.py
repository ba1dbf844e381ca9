"""In-process BM25 retriever (bm25s)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Document, Retriever


class BM25Retriever(Retriever):
    def __init__(self, corpus: Sequence[dict], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self._bm25s = bm25s
        self.corpus = list(corpus)
        self.model = bm25s.BM25(k1=k1, b=b)
        self.model.index(bm25s.tokenize([r["contents"] for r in self.corpus], stopwords="en",
                                        show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        if not queries:
            return []
        k = min(topk, len(self.corpus))
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        ids, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        out = []
        for row_ids, row_scores in zip(np.asarray(ids), np.asarray(scores)):
            # A query that matches nothing scores 0 everywhere: return no documents rather than
            # arbitrary ones.
            out.append([Document(self.corpus[i]["id"], self.corpus[i]["contents"], float(s))
                        for i, s in zip(row_ids, row_scores) if s > 0])
        return out
