"""Retrieval for search agents: in-process retrievers (BM25, dense FAISS) behind one `Retriever` interface.

Wire and corpus formats follow Search-R1: a corpus line is `{"id", "contents"}` with contents
`"Title"\\ntext`; a search result is a list (one per query) of `Document`s.
"""

from retrieval.base import Document, Retriever, load_corpus
from retrieval.bm25 import BM25Retriever

__all__ = ["Document", "Retriever", "load_corpus", "BM25Retriever", "DenseRetriever", "TextEncoder"]


def __getattr__(name):  # dense retrieval pulls in torch/faiss: import it only when asked for
    if name == "DenseRetriever":
        from retrieval.dense import DenseRetriever
        return DenseRetriever
    if name == "TextEncoder":
        from retrieval.encoder import TextEncoder
        return TextEncoder
    raise AttributeError(name)
