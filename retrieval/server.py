"""The retrieval HTTP service: `python -m nemo_sdsearch.retrieval serve --index DIR --port 8000`.

Search-R1 wire format: `POST /retrieve {"queries": [...], "topk": k, "return_scores": bool}` answers
`{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}` (with scores) or
`{"result": [[{"id", "contents"}, ...], ...]}` (without). As in Search-R1's server, `topk` may be left out or
null (the server's `--topk` applies) and `return_scores` defaults to false. `GET /health` reports readiness.

Concurrent requests are coalesced: a batcher collects requests for up to `batch_window_ms`, runs one batched
encode + search of at most `max_batch_queries` queries in a worker thread (more waiting queries go into the
next batch), and hands each request its rows at its own topk; a failed search answers every request of its
batch with a 500 and the next batch is served. Every input is validated; a bad request gets a 4xx JSON error
saying what is wrong, and no input can crash the server. `--port 0` binds a free port and reports it.

Every connection is bounded while it is read (`ConnectionGuard`: our own asyncio protocol around the one uvicorn
would use, given to uvicorn through its public `http` option, plus an ASGI wrapper that reports finished answers;
no uvicorn class is subclassed, so any uvicorn the pyproject range admits serves it): the request head must
arrive within `header_timeout_s` of connecting (or of the previous answer), the body within `body_timeout_s` of
the head, a body over `max_request_bytes` is refused with 413 before it is read, and beyond `max_connections`
open connections a new one gets 503. Idle, slowloris and short-body clients are closed on time, so a handful of
them cannot exhaust the file descriptors.
All limits live in `Limits`; each is a `serve` flag and a row in docs/retrieval.md.
"""


import asyncio
import http
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

LINGER_S = 2.0  # after a refusal, how long input is read and dropped before the socket closes (see _close_after_answer)


def _dumps(obj) -> bytes:
    try:
        import orjson
    except ImportError:  # an optional speed-up: plain json gives the same document
        import json

        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
    return orjson.dumps(obj)


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """Every limit the server enforces. Each field is a `serve` flag (`max_queries` is `--max-queries`) and a row
    of the limits table in docs/retrieval.md."""

    # Per request, checked on the parsed body: a violation is a 400 that names the field.
    max_queries: int = _limit(512, "queries in one request (400 beyond)")
    max_topk: int = _limit(100, "largest topk (400 beyond)")
    max_query_chars: int = _limit(4096, "characters in one query (400 beyond)")
    # Per connection, enforced while reading (ConnectionGuard), before a slow or large client can hold a
    # file descriptor or memory for long.
    header_timeout_s: float = _limit(10.0, "seconds from connecting (or from the previous answer on a kept-alive "
                                           "connection) until the request line and headers are in; then the "
                                           "connection is closed (with 408 if part of a request arrived)")
    body_timeout_s: float = _limit(30.0, "seconds from the end of the headers until the whole body is in; "
                                         "then 408 and the connection is closed")
    keep_alive_s: float = _limit(5.0, "an idle kept-alive connection is closed after this many seconds")
    max_request_bytes: int = _limit(4 * 2**20, "bytes of one request body: a larger Content-Length gets 413 "
                                               "before the body is read, a chunked body is counted as it arrives")
    max_header_bytes: int = _limit(64 * 2**10, "bytes of one request line and headers (431 beyond)")
    max_connections: int = _limit(1024, "open connections; a connection beyond them gets 503 and is closed "
                                        "(the server raises its file-descriptor limit to fit)")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"--{f.name.replace('_', '-')} must be a positive number, not {value!r}")


@dataclass
class Waits:
    """How long the connections one kind of deadline closed had waited, by the server's event-loop clock: from when
    the deadline was set (at connecting or after answering the previous request, for the head; when the head was
    complete, for the body) to when it closed them. `min_s` and `max_s` are the shortest and longest such wait;
    `late_max_s` is the most any of them was closed after its deadline (the timer fired late: a busy event loop).
    A deadline of T seconds gives T <= min_s <= max_s <= T + late_max_s. None until one was closed."""

    min_s: float | None = None
    max_s: float | None = None
    late_max_s: float | None = None

    def add(self, waited_s: float, late_s: float) -> None:
        self.min_s = waited_s if self.min_s is None else min(self.min_s, waited_s)
        self.max_s = waited_s if self.max_s is None else max(self.max_s, waited_s)
        self.late_max_s = late_s if self.late_max_s is None else max(self.late_max_s, late_s)


@dataclass
class ConnectionStats:
    """What the connection guard did, reported by `/health` under "connections"."""

    open: int = 0
    refused_over_max_connections: int = 0  # 503 at connect
    header_timeouts: int = 0  # closed: no complete request head within header_timeout_s
    body_timeouts: int = 0  # 408: no complete body within body_timeout_s
    too_large: int = 0  # 413 (body) or 431 (head)
    header_timeout_waits: Waits = field(default_factory=Waits)  # how long the header_timeouts had waited
    body_timeout_waits: Waits = field(default_factory=Waits)  # how long the body_timeouts had waited


def _error_response(status: int, message: str, extra_headers: str = "") -> bytes:
    body = _dumps({"error": message})
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra_headers}connection: close\r\n\r\n").encode() + body


def _client_key(address) -> tuple[str, int] | None:
    """A TCP peer address as uvicorn puts it in the ASGI scope's "client": (host, port)."""
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class ConnectionGuard:
    """Read deadlines, size caps, a connection cap and lingering close around uvicorn, on public interfaces only.

    uvicorn takes an asyncio protocol class for its `http` option and calls it once per connection; here that
    class (`protocol`) is our own `asyncio.Protocol`, `GuardedConnection`, which holds the protocol uvicorn would
    have used itself (`http`, "httptools" by default, built with the arguments uvicorn passed) and stands between
    it and the socket: every byte read goes through our own httptools parser first (httptools' public parser
    API), which tells where the request head ends, how large the body is and when the message is complete;
    uvicorn's protocol sees the connection through `_GuardedTransport`, an `asyncio.Transport` of ours. Whether
    an answer is complete is told by the ASGI side: `wrap(app)` is the application uvicorn serves, and reports
    each finished answer to the connection it came on (found by the ASGI scope's "client", the peer address).
    Nothing here subclasses or patches uvicorn's classes or reads their state: the guard relies on the asyncio
    protocol and transport contract, the ASGI spec, uvicorn's documented Config options and the name table behind
    its `--http` choices (`uvicorn.config.HTTP_PROTOCOLS`, to build the protocol `http` names).

    uvicorn's own keep-alive timer starts only after an answer, so a client that connects and sends nothing,
    or one header line now and then, or less body than it announced, would be held forever. Here each
    connection has one deadline for what it is waiting for: the request head (armed at connect and after each
    answer), then the body (armed when the head is complete), none while the application answers. One lazy
    timer per connection checks it: moving a deadline later costs no new timer.
    """

    def __init__(self, limits: "Limits", stats: "ConnectionStats", http: str = "httptools"):
        from uvicorn.config import HTTP_PROTOCOLS  # the table behind uvicorn's documented `--http` choices
        from uvicorn.importer import import_from_string

        self.limits, self.stats = limits, stats
        self.inner_class = import_from_string(HTTP_PROTOCOLS[http])
        self.connections: dict[tuple[str, int], GuardedConnection] = {}  # open, accepted, by peer address
        guard = self

        class Protocol(GuardedConnection):
            def __init__(self, *args, **kwargs):  # whatever uvicorn passes goes to its own protocol
                super().__init__(guard, lambda: guard.inner_class(*args, **kwargs))

        self.protocol = Protocol

    def wrap(self, app):
        """`app` as an ASGI application that tells the guard when each answer on a connection is complete."""
        connections = self.connections

        async def guarded_app(scope, receive, send):
            conn = connections.get(_client_key(scope.get("client"))) if scope["type"] == "http" else None
            if conn is None:
                return await app(scope, receive, send)
            answered = False

            async def send_and_track(message):
                nonlocal answered
                await send(message)
                if not answered and message["type"] == "http.response.body" and not message.get("more_body"):
                    answered = True
                    conn.answered()

            try:
                await app(scope, receive, send_and_track)
            finally:  # no complete answer (uvicorn answers 500 itself, or the client went away)
                if not answered:
                    conn.answered()

        return guarded_app


class GuardedConnection(asyncio.Protocol):
    """One connection of a `ConnectionGuard`: the socket's protocol, holding uvicorn's (see ConnectionGuard)."""

    def __init__(self, guard: ConnectionGuard, make_inner):
        import httptools

        self.guard, self.limits, self.stats = guard, guard.limits, guard.stats
        self._make_inner, self.inner = make_inner, None
        self._inner_open = False  # uvicorn's protocol has the connection (made, not lost)
        self.transport = self.loop = None
        self._key = None
        self._parser = httptools.HttpRequestParser(self)  # None once it cannot follow the stream (upgrade, error)
        self._parse_error = httptools.HttpParserError
        self._reading = "head"  # what the parser waits for: "head" (request line + headers) or "body"
        self._in_message = False  # a byte of the request being read has arrived
        self._pending = 0  # requests whose head is complete and whose answer is not
        self._answering = False  # part of an answer has been written and the answer is not complete
        self._kind = None  # the deadline armed: "head", "body" or None (none while the application answers)
        self._deadline = None  # loop time by which that must be in
        self._since = 0.0  # loop time when the deadline was set (for the stats' Waits)
        self._timer = None
        self._timer_at = 0.0
        self._head_bytes = self._body_bytes = 0
        self._content_length = None
        self._message_completed = False
        self._accepted = False
        self._done = False  # we answered or closed on our own, or uvicorn closed: input is dropped from now on

    # -- the socket's side -------------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport, self.loop = transport, asyncio.get_running_loop()
        limits, stats = self.limits, self.stats
        if stats.open >= limits.max_connections:
            self._done = True
            stats.refused_over_max_connections += 1
            transport.write(_error_response(
                503, f"the server holds its limit of {limits.max_connections} open connections "
                     "(--max-connections); retry shortly", "retry-after: 1\r\n"))
            self._close_after_answer()
            return
        self._accepted = True
        stats.open += 1
        self._key = _client_key(transport.get_extra_info("peername"))
        if self._key is not None:
            self.guard.connections[self._key] = self
        self.inner = self._make_inner()
        self._inner_open = True
        self.inner.connection_made(_GuardedTransport(self))
        self._update()

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = self._kind = None
        if self._accepted:
            self._accepted = False
            self.stats.open -= 1
            if self._key is not None and self.guard.connections.get(self._key) is self:
                del self.guard.connections[self._key]
        self._detach(exc)

    def data_received(self, data):
        if self._done:
            return  # lingering: read and dropped
        self._message_completed = False
        if self._parser is not None:
            try:
                self._parser.feed_data(data)
            except self._parse_error:  # an upgrade, or a request uvicorn's parser refuses too (400 and close)
                self._parser = None
            if self._done:
                return
        # All of `data` was request head unless a message ended in it (then the next head's first bytes go
        # uncounted: at most one read).
        if self._reading == "head" and not self._message_completed:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self.stats.too_large += 1
                self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes "
                                  "(--max-header-bytes)")
                return
        self.inner.data_received(data)

    def eof_received(self):
        if self._inner_open and not self._done:
            return self.inner.eof_received()
        return None  # the client's end of a lingering close: the transport closes

    def pause_writing(self):
        if self._inner_open:
            self.inner.pause_writing()

    def resume_writing(self):
        if self._inner_open:
            self.inner.resume_writing()

    # -- our parser's callbacks (httptools.HttpRequestParser) -------------------------------------------
    def on_message_begin(self):
        self._in_message, self._content_length = True, None

    def on_header(self, name: bytes, value: bytes):
        if name.lower() == b"content-length":
            self._content_length = int(value) if value.strip().isdigit() else None

    def on_headers_complete(self):
        if self._done:
            return
        self._reading, self._head_bytes, self._body_bytes = "body", 0, 0
        if self._content_length is not None and self._content_length > self.limits.max_request_bytes:
            self.stats.too_large += 1
            self._refuse(413, f"the request body has {self._content_length} bytes; the limit is "
                              f"{self.limits.max_request_bytes} (--max-request-bytes)")
            return
        self._pending += 1
        self._update()

    def on_body(self, body: bytes):
        if self._done:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_request_bytes:
            self.stats.too_large += 1
            self._refuse(413, f"the request body exceeds {self.limits.max_request_bytes} bytes (--max-request-bytes)")

    def on_message_complete(self):
        if self._done:
            return
        self._reading, self._in_message, self._message_completed = "head", False, True
        self._update()

    # -- the application's side ----------------------------------------------------------------------------
    def answered(self) -> None:
        """The application's answer to the oldest pending request is complete (from `ConnectionGuard.wrap`)."""
        self._pending = max(0, self._pending - 1)
        self._answering = False
        self._update()

    # -- deadlines ------------------------------------------------------------------------------------------
    def _update(self) -> None:
        """Arm the deadline of what the connection waits for now: the head when no request is pending, the body
        of the request being read when no earlier one is still being answered (a pipelined request waits, its
        reading paused by uvicorn), none otherwise. A deadline of the kind already armed keeps its time."""
        if self._done or self.transport is None:
            return
        if self._reading == "head":
            kind = "head" if self._pending == 0 else None
        else:
            kind = "body" if self._pending <= 1 else None
        if kind == self._kind:
            return
        self._kind = kind
        if kind is None:
            self._deadline = None
            return
        self._since = self.loop.time()
        at = self._since + (self.limits.header_timeout_s if kind == "head" else self.limits.body_timeout_s)
        self._deadline = at
        if self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self.loop.call_at(at, self._check_deadline), at

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None or self._done or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < self._deadline:  # moved later since the timer was set
            self._timer, self._timer_at = self.loop.call_at(self._deadline, self._check_deadline), self._deadline
            return
        limits, stats = self.limits, self.stats
        if self._kind == "head":
            stats.header_timeouts += 1
            stats.header_timeout_waits.add(now - self._since, now - self._deadline)
            if not self._in_message:  # nothing of a request arrived: nothing to answer
                self._done = True
                self._deadline = self._kind = None
                self.transport.close()
                self._detach(None)
            else:
                self._refuse(408, f"the request line and headers did not arrive within {limits.header_timeout_s}s "
                                  "(--header-timeout-s)")
        else:
            stats.body_timeouts += 1
            stats.body_timeout_waits.add(now - self._since, now - self._deadline)
            expected = f" of {self._content_length}" if self._content_length is not None else ""
            self._refuse(408, f"the request body did not arrive within {limits.body_timeout_s}s "
                              f"(--body-timeout-s): got {self._body_bytes}{expected} bytes")

    # -- closing ---------------------------------------------------------------------------------------------
    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `message` in our own words and close: the request is not handed on, and uvicorn's
        protocol is told the connection is gone (the application's answer, if it ever comes, is dropped)."""
        self._done = True
        self._deadline = self._kind = None
        answering = self._answering and self._pending > 0
        self._detach(None)
        if self.transport.is_closing():
            return
        if answering:  # half an answer is out: nothing more can be said on this connection
            self.transport.close()
            return
        self.transport.write(_error_response(status, message))
        self._close_after_answer()

    def _detach(self, exc) -> None:
        """uvicorn's protocol loses the connection (once): its application's pending receive() ends."""
        if self._inner_open:
            self._inner_open = False
            self.inner.connection_lost(exc)

    def _inner_close(self) -> None:
        """uvicorn closes the connection (keep-alive timeout, `connection: close`, a request it refused): it is
        closed with lingering, and uvicorn's protocol is told it is lost at once, as asyncio would."""
        if self._done:
            return
        self._done = True
        self._deadline = self._kind = None
        self._close_after_answer()
        self.loop.call_soon(self._detach, None)

    def _close_after_answer(self) -> None:
        """Lingering close (nginx's lingering_close): send the answer and FIN, then read and drop what the
        client still sends until it closes or LINGER_S pass. Closing a socket whose input was not read
        makes the kernel answer with RST, which can destroy our answer in the client's receive buffer
        before the client reads it (a slowloris client keeps writing header lines while we answer)."""
        transport = self.transport
        if transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.resume_reading()  # uvicorn may have paused reading; what arrives now is dropped
        except RuntimeError:
            pass
        transport.write_eof()  # the client's read sees the answer, then end of stream; its close ends ours
        self.loop.call_later(LINGER_S, transport.close)


class _GuardedTransport(asyncio.Transport):
    """The connection as uvicorn's protocol sees it: the socket's transport, except that closing it closes with
    lingering (`GuardedConnection._inner_close`), and that nothing is written once the guard has answered."""

    def __init__(self, conn: GuardedConnection):
        super().__init__()
        self._conn, self._real = conn, conn.transport

    def write(self, data) -> None:
        conn = self._conn
        if conn._done or not conn._inner_open:
            return
        if not conn._answering and not data.startswith(b"HTTP/1.1 100 "):  # an interim 100 Continue is no answer
            conn._answering = True
        self._real.write(data)

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self._conn._inner_open:
            self._conn._inner_close()

    def is_closing(self) -> bool:
        return self._conn._done or not self._conn._inner_open or self._real.is_closing()

    def abort(self) -> None:
        self._conn._done = True
        self._real.abort()

    def get_extra_info(self, name, default=None):
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        if not self.is_closing():
            self._real.pause_reading()

    def resume_reading(self) -> None:
        if not self.is_closing():
            self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def write_eof(self) -> None:
        if not self.is_closing():
            self._real.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self):
        return self._real.get_write_buffer_limits()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def get_protocol(self):
        return self._conn.inner

    def set_protocol(self, protocol) -> None:  # a protocol switch (uvicorn's websocket upgrade; the server has none)
        self._conn.inner = protocol


class SearchError(RuntimeError):
    """A search could not be answered: the retriever failed on the batch the request was in (every request of
    that batch gets it), or the batcher stopped. `/retrieve` answers it with 500 and this message."""


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future = field(repr=False)
    rows: list = field(default_factory=list, repr=False)  # one ranked list per query, filled batch by batch
    taken: int = 0  # queries handed to a batch so far
    filled: int = 0  # rows received so far


class Batcher:
    """Coalesces concurrent searches into batched retriever calls of at most `max_batch_queries` queries.

    Requests wait in arrival order. A batch takes queries from the front until it holds `max_batch_queries`: a
    request that does not fit whole is split, its first queries going into this batch and the rest into the next
    (so a request of more queries than the cap is served by several calls, and none is larger than the cap). The
    retriever is asked for the largest topk of the batch and each request gets its own topk of every row. If the
    retriever raises (or answers the wrong number of rows), every request with queries in that batch gets a
    `SearchError` and the batcher goes on with the next batch: no request is left waiting.

    The counters (`stats()`, reported by /health under "batcher") say what it did: the batches and their sizes,
    and the failed ones with the requests they failed."""

    RECENT = 64  # batch sizes kept for /health

    def __init__(self, retriever, window_ms: float = 4.0, max_batch_queries: int = 256):
        if isinstance(max_batch_queries, bool) or not isinstance(max_batch_queries, int) or max_batch_queries < 1:
            raise ValueError(f"--max-batch-queries must be a positive integer, not {max_batch_queries!r}")
        if not window_ms >= 0:
            raise ValueError(f"--batch-window-ms must be at least 0, not {window_ms!r}")
        self.retriever = retriever
        self.window_ms = window_ms
        self.window = window_ms / 1000
        self.max_batch = max_batch_queries
        self._waiting: deque[_Pending] = deque()  # in arrival order; the front one may be partly taken
        self._wake = asyncio.Event()
        self.batches = 0  # retriever calls that answered
        self.queries = 0  # queries they answered
        self.failed_batches = 0  # retriever calls that raised (or answered the wrong number of rows)
        self.failed_requests = 0  # requests answered with a SearchError because a batch of theirs failed
        self.largest_batch = 0  # queries in the largest retriever call, failed ones included
        self.recent_batch_sizes: deque[int] = deque(maxlen=self.RECENT)  # queries per call, oldest first
        self._recent_batch = 2.0  # moving average of requests per batch
        self._task = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail(list(self._waiting), SearchError("the retrieval server is shutting down"))
        self._waiting.clear()

    def stats(self) -> dict:
        return {"window_ms": self.window_ms, "max_batch_queries": self.max_batch, "batches": self.batches,
                "queries": self.queries, "failed_batches": self.failed_batches,
                "failed_requests": self.failed_requests, "largest_batch": self.largest_batch,
                "recent_batch_sizes": list(self.recent_batch_sizes),
                "waiting_requests": sum(not p.future.done() for p in self._waiting),
                "waiting_queries": sum(len(p.queries) - p.taken for p in self._waiting if not p.future.done())}

    async def search(self, queries: list[str], topk: int):
        if not queries:
            return []
        if self._task is None or self._task.done():
            raise SearchError("the batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(list(queries), topk, fut, [None] * len(queries)))
        self._wake.set()
        return await fut

    def _fail(self, pending: list[_Pending], error: SearchError) -> None:
        for p in pending:
            if not p.future.done():
                p.future.set_exception(SearchError(str(error)))
                self.failed_requests += 1

    def _next_batch(self) -> list[tuple[_Pending, int, int]]:
        """(request, first query, end) pieces of the next batch, at most `max_batch` queries in all."""
        pieces, n = [], 0
        while self._waiting and n < self.max_batch:
            p = self._waiting[0]
            if p.future.done():  # its client went away, or an earlier batch of it failed
                self._waiting.popleft()
                continue
            take = min(self.max_batch - n, len(p.queries) - p.taken)
            pieces.append((p, p.taken, p.taken + take))
            p.taken += take
            n += take
            if p.taken == len(p.queries):
                self._waiting.popleft()
        return pieces

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            # Let concurrent requests arrive for one window, then take what is queued (one timer per batch, not
            # one per request), up to max_batch queries; the rest waits for the next batch. A client that sends
            # one request at a time would only ever wait out the window: once the recent batches hold a single
            # request each, the window is skipped.
            if (self.window > 0 and len(self._waiting) == 1 and self._recent_batch > 1.5
                    and len(self._waiting[0].queries) - self._waiting[0].taken < self.max_batch):
                await asyncio.sleep(self.window)
            pieces = self._next_batch()
            if not pieces:
                continue
            requests = list({id(p): p for p, _, _ in pieces}.values())
            queries = [q for p, a, b in pieces for q in p.queries[a:b]]
            self.largest_batch = max(self.largest_batch, len(queries))
            self.recent_batch_sizes.append(len(queries))
            self._recent_batch = 0.8 * self._recent_batch + 0.2 * len(requests)
            try:
                results = await loop.run_in_executor(None, self.retriever.search, queries,
                                                     max(p.topk for p, _, _ in pieces))
                if len(results) != len(queries):
                    raise SearchError(f"the retriever answered {len(results)} rows for {len(queries)} queries")
                i = 0
                for p, a, b in pieces:
                    rows = results[i:i + b - a]
                    i += b - a
                    if p.future.done():
                        continue
                    p.rows[a:b] = [list(r)[:p.topk] for r in rows]
                    p.filled += b - a
                    if p.filled == len(p.queries):
                        p.future.set_result(p.rows)
            except asyncio.CancelledError:
                self._fail(requests, SearchError("the retrieval server is shutting down"))
                raise
            except Exception as e:  # the search failed: every request with queries in this batch gets the error
                log.exception("search of a batch of %d queries from %d requests failed", len(queries), len(requests))
                self.failed_batches += 1
                self._fail(requests, e if isinstance(e, SearchError) else
                           SearchError(f"the search failed: {type(e).__name__}: {e}"))
                continue
            self.batches += 1
            self.queries += len(queries)


def create_app(retriever, limits: Limits | None = None, window_ms: float = 4.0, max_batch_queries: int = 256,
               default_topk: int = 3):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

    limits = limits or Limits()
    batcher = Batcher(retriever, window_ms, max_batch_queries)
    connections = ConnectionStats()  # filled in by the connection guard when served by `serve`
    started = time.time()

    class RetrieveRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        queries: list[StrictStr] = Field(min_length=1, max_length=limits.max_queries)
        topk: StrictInt | None = Field(default=None, ge=1, le=limits.max_topk)  # None: default_topk
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
            "expected": '{"queries": ["..."], "topk": 3 (or null), "return_scores": false}'})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": f"body: {exc.detail}" if exc.status_code == 400
                                                                  else str(exc.detail)})

    @app.exception_handler(SearchError)
    async def _search_failed(request: Request, exc: SearchError):
        return JSONResponse(status_code=500, content={"error": str(exc)})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(status_code=500, content={"error": f"internal error: {type(exc).__name__}"})

    @app.post("/retrieve", response_class=Response)
    async def retrieve(req: RetrieveRequest):
        rows = await batcher.search(req.queries, default_topk if req.topk is None else req.topk)
        # Serialised here in one pass (FastAPI's generic encoder walks every value first).
        body = _dumps({"result": [[d.to_wire(req.return_scores) for d in row] for row in rows]})
        return Response(body, media_type="application/json")

    @app.get("/health")
    async def health():
        return {"status": "ok", "num_passages": len(retriever) if hasattr(retriever, "__len__") else None,
                "uptime_s": time.time() - started, "batches": batcher.batches, "queries": batcher.queries,
                "startup_s": getattr(retriever, "startup_s", None), "batcher": batcher.stats(),
                "connections": asdict(connections),
                "limits": {"max_queries": limits.max_queries, "max_topk": limits.max_topk,
                           "max_request_bytes": limits.max_request_bytes}}

    app.state.batcher = batcher
    app.state.connections = connections
    return app


def serve(retriever, host: str = "127.0.0.1", port: int = 8000, window_ms: float = 4.0,
          max_batch_queries: int = 256, limits: Limits | None = None, default_topk: int = 3,
          port_file: str | os.PathLike | None = None) -> None:
    """Serve a loaded retriever (`index.IndexRetriever`, `index.FaissFileRetriever`) until interrupted.

    `port` 0 binds a free port chosen by the kernel. Once the server accepts connections it prints
    `retrieval serve: listening on http://HOST:PORT` (the port it bound) and, with `port_file`, writes that port
    to the file (atomically: a reader sees the whole number or no file); the file is removed when it stops."""
    import uvicorn

    limits = _fit_file_limit(limits or Limits())
    app = create_app(retriever, limits, window_ms, max_batch_queries, default_topk)
    if port_file is not None:
        Path(port_file).unlink(missing_ok=True)  # a file left by an earlier server must not be read as ours

    class ReportingServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                _announce(host, bound_port(self), port_file)

    server = ReportingServer(uvicorn_config(app, host, port, limits))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if port_file is not None and server.started:
            Path(port_file).unlink(missing_ok=True)
    if not server.started:  # uvicorn logged why (e.g. the port is in use)
        raise SystemExit(3)


def bound_port(server) -> int:
    """The port a started `uvicorn.Server` listens on (the one the kernel chose where it was given port 0; with a
    host name of several addresses, each has its own and this is the first)."""
    return server.servers[0].sockets[0].getsockname()[1]


def _announce(host: str, port: int, port_file) -> None:
    print(f"retrieval serve: listening on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    if port_file is not None:
        path = Path(port_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, path)


def uvicorn_config(app, host: str, port: int, limits: Limits | None = None, http: str = "httptools"):
    """The uvicorn configuration of `serve`: the connection guard of `limits` (`ConnectionGuard`, around uvicorn's
    `http` protocol) on `create_app`'s app. Only documented Config options: the guard's protocol class as `http`,
    its ASGI wrapper as the app, `proxy_headers` off (the wrapper finds a request's connection by the peer address
    in the ASGI scope, which forwarded-for headers would rewrite)."""
    import uvicorn

    limits = limits or Limits()
    guard = ConnectionGuard(limits, app.state.connections, http)
    return uvicorn.Config(guard.wrap(app), host=host, port=port, http=guard.protocol, ws="none", proxy_headers=False,
                          lifespan="on", timeout_keep_alive=limits.keep_alive_s, log_level="warning", access_log=False)


def _fit_file_limit(limits: Limits) -> Limits:
    """Raise the soft open-file limit so that `max_connections` sockets (plus the index files) fit under it:
    past it, accept() would fail before the connection cap could answer 503. Where the hard limit is too low,
    the cap is lowered to fit, with a warning."""
    import dataclasses
    import resource

    reserve = 256  # index files, logs, the worker threads' files
    need = limits.max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return limits
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < need:
        fit = max(1, target - reserve)
        log.warning("--max-connections %d does not fit the open-file limit (%d, hard %d): serving at most %d "
                    "connections; raise `ulimit -n` to allow more", limits.max_connections, soft, hard, fit)
        limits = dataclasses.replace(limits, max_connections=fit)
    return limits
