"""The retrieval HTTP service: `python -m retrieval serve --index DIR --port 8000`.

Search-R1 wire format: `POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}` answers
`{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}` (with scores) or
`{"result": [[{"id", "contents"}, ...], ...]}` (without). `GET /health` reports readiness.

Concurrent requests are coalesced: a batcher collects requests for up to `batch_window_ms` (or
`max_batch_queries` queries), runs one batched encode + search in a worker thread, and hands each
request its rows. Every input is validated; a bad request gets a 4xx JSON error saying what is wrong,
and no input can crash the server.
"""


import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("retrieval.server")


def _dumps(obj) -> bytes:
    try:
        import orjson
    except ImportError:  # an optional speed-up: plain json gives the same document
        import json

        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
    return orjson.dumps(obj)


@dataclass
class Limits:
    max_queries: int = 512
    max_topk: int = 100
    max_query_chars: int = 4096


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Coalesces concurrent searches into one retriever call."""

    def __init__(self, retriever, window_ms: float = 4.0, max_batch_queries: int = 256):
        self.retriever = retriever
        self.window = window_ms / 1000
        self.max_batch = max_batch_queries
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.batches = 0
        self.queries = 0
        self._recent_batch = 2.0  # moving average of requests per batch
        self._task = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def search(self, queries: list[str], topk: int):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(queries, topk, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch, n = [first], len(first.queries)
            # Let concurrent requests arrive for one window, then take everything queued (one timer
            # per batch, not one per request), up to max_batch queries; the rest waits for the next.
            # A client that sends one request at a time would only ever wait out the window: once the
            # recent batches hold a single request each, the window is skipped.
            if self.window > 0 and self.queue.empty() and self._recent_batch > 1.5:
                await asyncio.sleep(self.window)
            while n < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                batch.append(item)
                n += len(item.queries)
            queries = [q for p in batch for q in p.queries]
            k = max(p.topk for p in batch)
            try:
                results = await loop.run_in_executor(None, self.retriever.search, queries, k)
            except Exception as e:  # the search failed: every waiting request gets the error
                log.exception("search failed")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.batches += 1
            self.queries += len(queries)
            self._recent_batch = 0.8 * self._recent_batch + 0.2 * len(batch)
            i = 0
            for p in batch:
                rows = [r[:p.topk] for r in results[i:i + len(p.queries)]]
                i += len(p.queries)
                if not p.future.done():
                    p.future.set_result(rows)


def create_app(retriever, limits: Limits | None = None, window_ms: float = 4.0, max_batch_queries: int = 256):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

    limits = limits or Limits()
    batcher = Batcher(retriever, window_ms, max_batch_queries)
    started = time.time()

    class RetrieveRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        queries: list[StrictStr] = Field(min_length=1, max_length=limits.max_queries)
        topk: StrictInt = Field(default=3, ge=1, le=limits.max_topk)
        return_scores: StrictBool = False

        @field_validator("queries")
        @classmethod
        def _query_lengths(cls, qs):
            for i, q in enumerate(qs):
                if len(q) > limits.max_query_chars:
                    raise ValueError(f"query {i} has {len(q)} characters; the limit is {limits.max_query_chars}")
            return qs

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="nemo_sdsearch retrieval", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = [{"where": ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body",
                   "problem": e.get("msg", "invalid")} for e in exc.errors()]
        first = errors[0] if errors else {"where": "body", "problem": "invalid request"}
        return JSONResponse(status_code=400, content={
            "error": f"{first['where']}: {first['problem']}", "errors": errors,
            "expected": '{"queries": ["..."], "topk": 3, "return_scores": false}'})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": f"body: {exc.detail}" if exc.status_code == 400
                                                                  else str(exc.detail)})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(status_code=500, content={"error": f"internal error: {type(exc).__name__}"})

    @app.post("/retrieve", response_class=Response)
    async def retrieve(req: RetrieveRequest):
        rows = await batcher.search(req.queries, req.topk)
        # Serialised here in one pass (FastAPI's generic encoder walks every value first).
        body = _dumps({"result": [[d.to_wire(req.return_scores) for d in row] for row in rows]})
        return Response(body, media_type="application/json")

    @app.get("/health")
    async def health():
        return {"status": "ok", "num_passages": len(retriever) if hasattr(retriever, "__len__") else None,
                "uptime_s": time.time() - started, "batches": batcher.batches, "queries": batcher.queries,
                "startup_s": getattr(retriever, "startup_s", None)}

    app.state.batcher = batcher
    return app


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8000, window_ms: float = 4.0,
          max_batch_queries: int = 256, use_gpu: bool | None = None, limits: Limits | None = None) -> None:
    import uvicorn

    from retrieval.index import IndexRetriever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    retriever = IndexRetriever(index_dir, use_gpu=use_gpu)
    log.info("loaded %s index of %d passages from %s in %.2fs", retriever.kind, len(retriever), index_dir,
             time.perf_counter() - t0)
    app = create_app(retriever, limits, window_ms, max_batch_queries)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
