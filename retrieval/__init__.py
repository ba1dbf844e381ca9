"""Retrieval for search agents: in-process retrievers (BM25, dense FAISS) behind one `Retriever` interface, the
retrieval service (`python -m nemo_sdsearch.retrieval build | serve | query`) and its client.

The folder lives at the top of the repository and installs as `nemo_sdsearch.retrieval` (pyproject.toml), so
modules here import each other relatively. Wire and corpus formats follow Search-R1: a corpus line is
`{"id", "contents"}` with contents `"Title"\\ntext`; a search result is a list (one per query) of `Document`s.
"""

from .base import Document, Retriever, load_corpus
from .bm25 import BM25Retriever

__all__ = ["Document", "Retriever", "load_corpus", "build_retriever", "BM25Retriever", "DenseRetriever",
           "TextEncoder"]


def build_retriever(kind: str, corpus: list[dict], encoder: str | None = None, url: str | None = None) -> Retriever:
    """An in-process retriever over `corpus`: `bm25`, or `dense` (FAISS over `encoder`, default MiniLM);
    or `http`: a client of a running retrieval service at `url` (its base URL or its /retrieve endpoint: ours or
    Search-R1's retrieval_server.py; the corpus is the service's)."""
    if kind == "http":
        if not url:
            raise ValueError("retriever http needs the service URL (cluster.retrieval_url)")
        from .client import RetrievalClient
        return RetrievalClient(url)
    if kind == "bm25":
        return BM25Retriever(corpus)
    if kind == "dense":
        from .dense import DenseRetriever
        from .encoder import TextEncoder
        return DenseRetriever(corpus, TextEncoder(encoder))
    raise ValueError(f"retriever must be bm25, dense or http, not {kind!r}")


def __getattr__(name):  # dense retrieval pulls in torch/faiss: import it only when asked for
    if name == "DenseRetriever":
        from .dense import DenseRetriever
        return DenseRetriever
    if name == "TextEncoder":
        from .encoder import TextEncoder
        return TextEncoder
    raise AttributeError(name)
