"""Client of the retrieval service, used by the rollout engine as a `Retriever`.

Async and connection-pooled (httpx), with a per-request timeout and retries with jittered exponential
backoff on connection errors, timeouts and 5xx answers, up to `max_wait_s` in all: a rollout survives a
retrieval server restart in the middle of a batch (the jitter keeps a cluster's many clients from retrying in
lock-step). A 4xx answer is the caller's error and is raised at once with the server's message.

A turn's searches can be many more than one request may carry: a TensorRT-LLM replica hands hundreds of finished
rows to one turn, and the service refuses more than its `--max-queries` (512 by default) queries per request. So
`search` splits the queries into requests of at most `max_queries_per_request` queries (lowered to the limit the
service reports in `/health` when it reports one) and about `max_request_bytes` of JSON, sends them concurrently
over the pool, and returns the rows in the order of the queries.

`url` is the service's base URL or its `/retrieve` endpoint (how Search-R1 and verl write it): both name the same
service. Answers are read as Search-R1's server writes them too: a document without "id" (Search-R1's BM25
answers) gets "", and one with "title"/"text" but no "contents" is put together as `"title"\\ntext`.
"""

from __future__ import annotations

import asyncio
import json
import random
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
                 max_backoff_s: float = 5.0, max_connections: int = 64, max_queries_per_request: int = 256,
                 max_request_bytes: int = 2**20):
        if max_queries_per_request < 1 or max_request_bytes < 1:
            raise ValueError("max_queries_per_request and max_request_bytes must be positive")
        self.url = service_url(url)
        self.timeout_s, self.max_wait_s = timeout_s, max_wait_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_connections = max_connections
        self.max_queries_per_request, self.max_request_bytes = max_queries_per_request, max_request_bytes
        self.retries = 0      # requests sent again after a connection error, a timeout or a 5xx
        self.requests = 0     # requests answered (a split turn counts each of its requests)
        self._limits_read = False
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

    async def _read_limits(self, client) -> None:
        """Lower `max_queries_per_request` to the service's own limit when its /health reports one (ours does;
        Search-R1's server has no /health: the default stays). Once per client; never an error."""
        if self._limits_read:
            return
        self._limits_read = True
        try:
            r = await client.get(f"{self.url}/health", timeout=min(self.timeout_s, 5.0))
            cap = int(r.json().get("limits", {}).get("max_queries", 0)) if r.status_code == 200 else 0
        except Exception:  # noqa: BLE001 - no /health, not JSON, not up yet: keep the default
            cap = 0
        if cap > 0:
            self.max_queries_per_request = min(self.max_queries_per_request, cap)

    def split(self, queries: Sequence[str]) -> list[list[str]]:
        """The requests one turn's queries go out in: at most `max_queries_per_request` queries and about
        `max_request_bytes` of JSON each (a single query larger than that still gets its own request), in order."""
        chunks: list[list[str]] = [[]]
        size = 0
        for q in queries:
            n = len(json.dumps(q)) + 2
            if chunks[-1] and (len(chunks[-1]) >= self.max_queries_per_request or size + n > self.max_request_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(q)
            size += n
        return chunks

    async def search_async(self, queries: Sequence[str], topk: int = 3) -> list[list[Document]]:
        if not queries:
            return []
        client = await self._http()
        await self._read_limits(client)
        parts = await asyncio.gather(*(self._request(client, chunk, topk) for chunk in self.split(queries)))
        return [row for part in parts for row in part]

    async def _request(self, client, queries: list[str], topk: int) -> list[list[Document]]:
        """One POST /retrieve, retried with jittered exponential backoff (see the module docstring)."""
        import httpx

        body = {"queries": queries, "topk": topk, "return_scores": True}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        delay = self.backoff_s
        while True:
            try:
                r = await client.post(f"{self.url}/retrieve", json=body)
                if r.status_code < 400:
                    rows = r.json()["result"]
                    if len(rows) != len(queries):
                        raise RetrievalError(f"retrieval server {self.url} answered {len(rows)} rows for "
                                             f"{len(queries)} queries")
                    self.requests += 1
                    return [[_document(x) for x in row] for row in rows]
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
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # jitter: clients that failed together spread out
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
