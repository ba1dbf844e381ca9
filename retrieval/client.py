"""Client of the retrieval service, used by the rollout engine as a `Retriever`.

Async and connection-pooled (httpx), with a per-request timeout and retries with exponential backoff
on connection errors, timeouts and 5xx answers, up to `max_wait_s` in all: a rollout survives a
retrieval server restart in the middle of a batch. A 4xx answer is the caller's error and is raised
at once with the server's message.

`url` is the service's base URL or its `/retrieve` endpoint (how Search-R1 and verl write it): both name the same
service. Answers are read as Search-R1's server writes them too: a document without "id" (Search-R1's BM25
answers) gets "", and one with "title"/"text" but no "contents" is put together as `"title"\\ntext`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Sequence

from .base import Document, Retriever


class RetrievalError(RuntimeError):
    pass


def service_url(url: str) -> str:
    """The base URL of a retrieval service given as `http://host:port` or `http://host:port/retrieve` (a trailing
    slash either way)."""
    base = url.strip().rstrip("/")
    if base.endswith("/retrieve"):
        base = base[: -len("/retrieve")].rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"retrieval URL {url!r} must start with http:// or https:// (e.g. http://host:8000 or "
                         "http://host:8000/retrieve)")
    return base


def _document(x: dict) -> Document:
    """One hit of an answer: `{"document": {...}, "score": s}` (with scores) or the document itself."""
    doc, score = (x["document"], x.get("score", 0.0)) if "document" in x else (x, 0.0)
    contents = doc.get("contents")
    if contents is None:  # Search-R1's BM25 answers carry title and text besides contents; some servers only those
        contents = f'"{doc.get("title", "")}"\n{doc.get("text", "")}'
    return Document(str(doc.get("id", "")), contents, float(score))


class RetrievalClient(Retriever):
    def __init__(self, url: str, timeout_s: float = 30.0, max_wait_s: float = 120.0, backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0, max_connections: int = 64):
        self.url = service_url(url)
        self.timeout_s, self.max_wait_s = timeout_s, max_wait_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_connections = max_connections
        self.retries = 0
        self._loop = None
        self._thread = None
        self._client = None
        self._lock = threading.Lock()

    # -- async API --------------------------------------------------------------------------------
    async def _http(self):
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s,
                limits=httpx.Limits(max_connections=self.max_connections,
                                    max_keepalive_connections=self.max_connections))
        return self._client

    async def search_async(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        import httpx

        client = await self._http()
        body = {"queries": list(queries), "topk": topk, "return_scores": True}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        delay = self.backoff_s
        while True:
            try:
                r = await client.post(f"{self.url}/retrieve", json=body)
                if r.status_code < 400:
                    return [[_document(x) for x in row] for row in r.json()["result"]]
                if r.status_code < 500:
                    msg = r.json().get("error", r.text) if "json" in r.headers.get("content-type", "") else r.text
                    raise RetrievalError(f"retrieval server rejected the request ({r.status_code}): {msg}")
                problem = f"server error {r.status_code}"
            except (httpx.TransportError, httpx.TimeoutException) as e:
                problem = f"{type(e).__name__}: {e}"
            if loop.time() + delay > deadline:
                raise RetrievalError(f"retrieval server {self.url} unreachable for {self.max_wait_s:.0f}s "
                                     f"(last problem: {problem}); is `python -m {__package__} serve` (or "
                                     "Search-R1's retrieval_server.py) running there?")
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- the synchronous Retriever seam (runs the async client on a private event loop) ------------
    def _ensure_loop(self):
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
                self._thread.start()
        return self._loop

    def search(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        if not queries:
            return []
        return asyncio.run_coroutine_threadsafe(self.search_async(queries, topk), self._ensure_loop()).result()

    def close(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop = None
