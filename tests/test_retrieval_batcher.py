"""The retrieval server's batcher on its fault paths (issue 24), through the real app over real HTTP (uvicorn on a
port it binds itself, in a thread of this process) and the real BM25 retriever over the test world.

To make coalescing deterministic without timing, the retriever holds its first search at a gate: while that
"plug" batch is held in the worker thread, the test sends the requests under test and waits until the server's
own /health counts them as waiting (`batcher.waiting_requests`); opening the gate then lets the batcher form its
next batches from exactly those requests. What the batcher did is read from /health (`batcher`: the sizes of
the recent batches, the failed batches and requests)."""

import asyncio
import json
import math
import threading

import httpx
import pytest

from nemo_sdsearch.retrieval import BM25Retriever
from nemo_sdsearch.retrieval.server import Limits, create_app
from test_retrieval_service import served_in_thread

POISON = "this query breaks the index"
TIMEOUT_S = 30  # per request: an answer that never comes fails the test instead of hanging it


class GatedBM25(BM25Retriever):
    """The real BM25 retriever, with a gate its searches wait at (open unless a test closes it) and a query that
    makes it raise (the way a failing index read or encoder would): the two things a test must control."""

    def __init__(self, passages):
        super().__init__(passages)
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()  # set when a search is waiting at the closed gate
        self.calls = []  # (queries, k) of every call, in order

    def search(self, queries, topk=3):
        self.calls.append((list(queries), topk))
        if not self.gate.is_set():
            self.held.set()
            assert self.gate.wait(TIMEOUT_S)
        if POISON in queries:
            raise RuntimeError("index shard 3 is unreadable")
        return super().search(queries, topk)


@pytest.fixture(scope="module")
def bm25(bundle):
    return BM25Retriever(bundle.test_world.passages)


@pytest.fixture(scope="module")
def rich_queries(bundle, bm25):
    """Queries of the test world with at least 10 hits each, so that every topk up to 10 is filled exactly."""
    queries = [h.query for q in bundle.test for h in q.hops]
    return [q for q, row in zip(queries, bm25.search(queries, 10)) if len(row) == 10]


def serve(bundle, max_batch_queries: int, window_ms: float = 4.0):
    retriever = GatedBM25(bundle.test_world.passages)
    app = create_app(retriever, Limits(), window_ms=window_ms, max_batch_queries=max_batch_queries)
    return retriever, app


def rows_of(response: httpx.Response) -> list[list[tuple[str, float]]]:
    assert response.status_code == 200, response.text
    return [[(d["document"]["id"], d["score"]) for d in row] for row in response.json()["result"]]


def alone(bm25, queries, topk) -> list[list[tuple[str, float]]]:
    """What one request gets from the retriever with nothing else in its batch."""
    return [[(d.id, d.score) for d in row] for row in bm25.search(queries, topk)]


async def held_burst(url: str, retriever: GatedBM25, bodies: list[dict], one_by_one: bool = False):
    """Hold the batcher with a plug request at the closed gate, send `bodies` (concurrently; or `one_by_one`,
    each after the server counts the one before as waiting, so that they queue in this order), wait until the
    server counts all of them waiting, open the gate: (the plug's response, the responses of `bodies`)."""
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=len(bodies) + 2)) as client:
        async def waiting() -> int:
            return (await client.get("/health")).json()["batcher"]["waiting_requests"]

        async def until_waiting(n: int) -> None:
            while await waiting() < n:
                await asyncio.sleep(0.01)

        retriever.gate.clear()
        retriever.held.clear()
        plug = asyncio.create_task(client.post("/retrieve", json={"queries": ["plug"], "topk": 1}))
        assert await asyncio.to_thread(retriever.held.wait, TIMEOUT_S)  # the plug's batch is in the retriever
        tasks = []
        for i, body in enumerate(bodies):
            tasks.append(asyncio.create_task(client.post("/retrieve", json=body)))
            if one_by_one:
                await asyncio.wait_for(until_waiting(i + 1), TIMEOUT_S)
        await asyncio.wait_for(until_waiting(len(bodies)), TIMEOUT_S)
        assert await waiting() == len(bodies)
        retriever.gate.set()
        # none may hang: every response within TIMEOUT_S
        return await asyncio.wait_for(plug, TIMEOUT_S), await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=TIMEOUT_S).json()


def test_requests_with_different_topk_share_a_batch_and_each_gets_its_own_topk(bundle, bm25, rich_queries):
    """Eight concurrent requests, topk 1 to 10 and one to three queries each, coalesce into one retriever call at
    the largest topk; every request gets exactly its own topk per query, the rows the retriever gives that
    request alone (ids and scores), in its query order."""
    retriever, app = serve(bundle, max_batch_queries=256)
    topks = [1, 10, 2, 5, 3, 7, 1, 4]
    bodies, q = [], 0
    for i, k in enumerate(topks):
        n = 1 + i % 3
        bodies.append({"queries": rich_queries[q:q + n], "topk": k, "return_scores": True})
        q += n
    with served_in_thread(app, Limits()) as port:
        url = f"http://127.0.0.1:{port}"
        plug, responses = asyncio.run(held_burst(url, retriever, bodies))
        stats = health(url)["batcher"]
    assert rows_of(plug) == alone(bm25, ["plug"], 1)
    for body, response in zip(bodies, responses):
        rows = rows_of(response)
        assert [len(r) for r in rows] == [body["topk"]] * len(body["queries"]), body
        assert rows == alone(bm25, body["queries"], body["topk"]), body
    total = sum(len(b["queries"]) for b in bodies)
    assert stats["recent_batch_sizes"] == [1, total]  # the plug, then all eight requests in one batch
    batch_queries, k = retriever.calls[1]  # one call, the requests' queries in their order of arrival, at topk 10
    assert sorted(batch_queries) == sorted(x for b in bodies for x in b["queries"]) and k == max(topks)
    assert (stats["batches"], stats["queries"], stats["failed_batches"], stats["waiting_requests"]) == \
           (2, 1 + total, 0, 0)


def test_a_burst_over_the_batch_cap_is_split_into_batches_none_over_it(bundle, bm25, rich_queries):
    """With --max-batch-queries 8, a burst of ten requests holding 52 queries (one of them 20 queries, more than
    the cap by itself) is served in exactly ceil(52 / 8) = 7 batches of at most 8 queries (8, 8, 8, 8, 8, 8, 4:
    a request that does not fit whole is split over two batches), and every request gets the rows it gets
    alone, at its own topk."""
    cap = 8
    retriever, app = serve(bundle, max_batch_queries=cap)
    sizes, topks = [1, 3, 5, 2, 20, 4, 7, 1, 6, 3], [3, 1, 10, 2, 4, 5, 3, 6, 1, 2]
    bodies, q = [], 0
    for n, k in zip(sizes, topks):
        queries = [rich_queries[(q + j) % len(rich_queries)] for j in range(n)]
        bodies.append({"queries": queries, "topk": k, "return_scores": True})
        q += n
    with served_in_thread(app, Limits()) as port:
        url = f"http://127.0.0.1:{port}"
        before = health(url)["batcher"]
        _, responses = asyncio.run(held_burst(url, retriever, bodies))
        after = health(url)["batcher"]
    for body, response in zip(bodies, responses):
        assert rows_of(response) == alone(bm25, body["queries"], body["topk"]), body
    total = sum(sizes)
    burst = after["recent_batch_sizes"][len(before["recent_batch_sizes"]) + 1:]  # after the plug's batch
    print(f"\n{total} queries in {len(bodies)} requests, cap {cap}: batches of {burst}")
    assert burst == [cap] * (total // cap) + [total % cap] and len(burst) == math.ceil(total / cap)
    assert after["largest_batch"] == cap and all(len(qs) <= cap for qs, _ in retriever.calls)
    assert after["batches"] - before["batches"] == 1 + len(burst)
    assert after["queries"] - before["queries"] == 1 + total
    assert after["failed_batches"] == 0 and after["waiting_requests"] == 0


def test_one_retriever_error_reaches_every_request_of_its_batch_and_the_next_batch_is_served(bundle, bm25,
                                                                                              rich_queries):
    """A retriever that raises on a batch: each of the five requests waiting in it gets a 500 naming the
    error (none hangs), and the server serves the next batch. With --max-batch-queries 8 and requests queued
    in the order A (6 queries), B (6, the failing query last), C (3): the first batch (A and B's first two
    queries) is answered, the second (B's other four and C) fails, so A gets its rows and B and C the error."""
    retriever, app = serve(bundle, max_batch_queries=8)
    qs = rich_queries
    error = "the search failed: RuntimeError: index shard 3 is unreadable"
    with served_in_thread(app, Limits()) as port:
        url = f"http://127.0.0.1:{port}"
        # five requests in one batch, one of them holding the failing query
        bodies = [{"queries": [qs[0]], "topk": 3}, {"queries": [qs[1], POISON], "topk": 2},
                  {"queries": [qs[2], qs[3]], "topk": 5}, {"queries": [qs[4]], "topk": 1},
                  {"queries": [qs[5]], "topk": 3}]
        _, responses = asyncio.run(held_burst(url, retriever, bodies))
        for response in responses:
            assert response.status_code == 500 and response.json() == {"error": error}
        stats = health(url)["batcher"]
        assert stats["recent_batch_sizes"] == [1, 7]
        assert (stats["batches"], stats["failed_batches"], stats["failed_requests"], stats["waiting_requests"]) == \
               (1, 1, 5, 0)
        # the server goes on: the next batch is served, by the same batcher
        after = httpx.post(url + "/retrieve", json={"queries": qs[6:9], "topk": 4, "return_scores": True},
                           timeout=TIMEOUT_S)
        assert rows_of(after) == alone(bm25, qs[6:9], 4)

        # an error in the second batch of a request that was split over two
        a = {"queries": qs[10:16], "topk": 3, "return_scores": True}
        b = {"queries": qs[16:21] + [POISON], "topk": 2, "return_scores": True}
        c = {"queries": qs[21:24], "topk": 1, "return_scores": True}
        _, (ra, rb, rc) = asyncio.run(held_burst(url, retriever, [a, b, c], one_by_one=True))
        assert rows_of(ra) == alone(bm25, a["queries"], 3)
        assert (rb.status_code, rb.json()) == (500, {"error": error})
        assert (rc.status_code, rc.json()) == (500, {"error": error})
        final = health(url)["batcher"]
        assert final["recent_batch_sizes"][-2:] == [8, 7]
        assert (final["failed_batches"], final["failed_requests"], final["waiting_requests"]) == (2, 7, 0)
        again = httpx.post(url + "/retrieve", json=c, timeout=TIMEOUT_S)
        assert rows_of(again) == alone(bm25, c["queries"], 1)


def test_batcher_settings_are_checked():
    from nemo_sdsearch.retrieval.server import Batcher

    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="--max-batch-queries must be a positive integer"):
            Batcher(None, max_batch_queries=bad)
    with pytest.raises(ValueError, match="--batch-window-ms must be at least 0"):
        Batcher(None, window_ms=-1)
    assert json.dumps(Batcher(None, 0, 1).stats())  # what /health reports is JSON
