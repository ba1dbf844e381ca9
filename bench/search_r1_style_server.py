"""A retrieval server in the style of Search-R1's `retrieval_server.py`, for the side-by-side benchmark:
a synchronous FastAPI endpoint that encodes each request's queries on its own (no batching across
requests) and searches the same FAISS index with the same encoder as ours.

    python bench/search_r1_style_server.py --index DIR --port 8001
"""

import argparse
import os
import sys

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from nemo_sdsearch.retrieval.index import IndexRetriever  # noqa: E402


class QueryRequest(BaseModel):
    queries: list[str]
    topk: int = 3
    return_scores: bool = False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    retriever = IndexRetriever(args.index)
    app = FastAPI()

    @app.post("/retrieve")
    def retrieve(request: QueryRequest):  # sync: runs in the threadpool, one encode per request
        results = retriever.search(request.queries, request.topk)
        return {"result": [[d.to_wire(request.return_scores) for d in row] for row in results]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
