"""The Search-R1 on-ramp of the retrieval service: an index built the way Search-R1's index_builder.py builds
`e5_Flat.index` from `wiki-18.jsonl` is served as it is (no rebuild, nothing written), and clients configured the
Search-R1 / verl way (a URL ending in /retrieve, `topk: null`, documents without id) get the same passages."""

import json
import threading
import time

import httpx
import numpy as np
import pytest

from nemo_sdsearch.retrieval import build_retriever
from nemo_sdsearch.retrieval.client import RetrievalClient, service_url
from nemo_sdsearch.retrieval.encoder import auto_encoder_settings, default_encoder_path
from nemo_sdsearch.retrieval.server import bound_port
from test_retrieval_service import Server, evidence_corpus, refusing_port

N_PASSAGES = 120
N_QUESTIONS = 12  # questions whose evidence the corpus holds
NO_ID = {5, 17, 64}  # corpus rows written without an "id" (their id is the row number)
SERVER_TOPK = 2  # the server's --topk, used when a request gives topk null or none


def search_r1_encode(tokenizer, model, texts):
    """Search-R1's Encoder.encode / Index_Builder.encode_all for E5, written from its code independently of
    ours: prefix, tokenize (max length 256), mean pooling over the attention mask, L2 normalisation."""
    import torch

    with torch.no_grad():
        inputs = tokenizer(texts, max_length=256, padding=True, truncation=True, return_tensors="pt")
        out = model(**inputs, return_dict=True)
        hidden = out.last_hidden_state.masked_fill(~inputs["attention_mask"][..., None].bool(), 0.0)
        emb = hidden.sum(dim=1) / inputs["attention_mask"].sum(dim=1)[..., None]
        return torch.nn.functional.normalize(emb, dim=-1).numpy().astype(np.float32, order="C")


@pytest.fixture(scope="module")
def search_r1_files(tmp_path_factory, bundle):
    """wiki-18.jsonl-style corpus + e5_Flat.index-style FAISS file (index_factory "Flat", inner product) built
    with the bundled MiniLM as the encoder, E5 prefixes; and the passage embeddings for reference answers."""
    import faiss
    from transformers import AutoModel, AutoTokenizer

    d = tmp_path_factory.mktemp("search_r1")
    passages = evidence_corpus(bundle.test_world.passages, bundle.test[:N_QUESTIONS], N_PASSAGES)
    with open(d / "wiki-18.jsonl", "w") as f:
        for i, p in enumerate(passages):
            row = {"contents": p["contents"]} if i in NO_ID else {"id": str(i), "contents": p["contents"]}
            f.write(json.dumps(row) + "\n")
    encoder = default_encoder_path()
    tok, model = AutoTokenizer.from_pretrained(str(encoder)), AutoModel.from_pretrained(str(encoder)).eval()
    emb = search_r1_encode(tok, model, [f"passage: {p['contents']}" for p in passages])
    index = faiss.index_factory(emb.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(emb)
    faiss.write_index(index, str(d / "e5_Flat.index"))
    return {"dir": d, "encoder": encoder, "emb": emb, "passages": passages,
            "encode_queries": lambda qs: search_r1_encode(tok, model, [f"query: {q}" for q in qs])}


@pytest.fixture(scope="module")
def search_r1_server(search_r1_files):
    d = search_r1_files["dir"]
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}
    server = Server(None, flags=["--faiss-index", d / "e5_Flat.index", "--corpus", d / "wiki-18.jsonl",
                                 "--encoder", search_r1_files["encoder"], "--query-prefix", "query: ",
                                 "--pooling", "mean", "--max-length", "256", "--topk", SERVER_TOPK]).start()
    yield server
    server.stop()
    # served as they are: nothing was written next to the index or the corpus, nothing was rebuilt
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()} == before


def test_search_r1_index_served_as_is_with_and_without_retrieve_in_the_url(search_r1_files, search_r1_server,
                                                                           bundle):
    passages = search_r1_files["passages"]
    hops = [h for q in bundle.test[:N_QUESTIONS] for h in q.hops]
    queries = [h.query for h in hops]
    # The reference: Search-R1's query encoding against the index's vectors, exhaustive inner product.
    scores = search_r1_files["encode_queries"](queries) @ search_r1_files["emb"].T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    expected_ids = [[str(i) for i in row] for row in top]  # id-less rows are named by their row number too
    health = httpx.get(search_r1_server.url + "/health").json()
    assert health["num_passages"] == N_PASSAGES

    results = {}
    for name, url in [("base", search_r1_server.url), ("base/", search_r1_server.url + "/"),
                      ("/retrieve", search_r1_server.url + "/retrieve"),
                      ("/retrieve/", search_r1_server.url + "/retrieve/")]:
        client = build_retriever("http", [], url=url)
        try:
            results[name] = client.search(queries, 3)
        finally:
            client.close()
    base = results["base"]
    for name, rows in results.items():
        assert [[(d.id, d.contents, d.score) for d in r] for r in rows] == \
               [[(d.id, d.contents, d.score) for d in r] for r in base], name
    assert [[d.id for d in r] for r in base] == expected_ids
    for r, row_top, row_scores in zip(base, top, scores):
        assert [d.score for d in r] == pytest.approx([float(row_scores[i]) for i in row_top], abs=2e-5)
        assert [d.contents for d in r] == [passages[i]["contents"] for i in row_top]
    # the served passages answer the questions: the gold passage is in the top 3 for most hops
    assert sum(any(h.evidence in d.contents for d in r) for h, r in zip(hops, base)) >= 0.8 * len(hops)


def test_id_less_documents_are_named_by_their_row(search_r1_files, search_r1_server):
    row = sorted(NO_ID)[1]
    title = search_r1_files["passages"][row]["contents"].partition("\n")[0].strip('"')
    client = RetrievalClient(search_r1_server.url + "/retrieve")
    try:
        docs = client.search([title], 3)[0]
    finally:
        client.close()
    hit = next(d for d in docs if d.contents == search_r1_files["passages"][row]["contents"])
    assert hit.id == str(row)


def test_topk_null_or_absent_uses_the_server_default_as_search_r1(search_r1_server):
    url = search_r1_server.url + "/retrieve"
    for body in ({"queries": ["a city"], "topk": None}, {"queries": ["a city"]},
                 {"queries": ["a city"], "topk": None, "return_scores": True}):
        r = httpx.post(url, json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["result"][0]) == SERVER_TOPK
    plain = httpx.post(url, json={"queries": ["a city"], "topk": None}).json()["result"][0]
    assert all(set(d) == {"id", "contents"} for d in plain)  # return_scores defaults to false, as Search-R1
    scored = httpx.post(url, json={"queries": ["a city"], "topk": 3, "return_scores": True}).json()["result"][0]
    assert len(scored) == 3 and all(set(d) == {"document", "score"} for d in scored)
    assert httpx.post(url, json={"queries": ["a city"], "topk": "3"}).status_code == 400  # still checked


def test_query_command_talks_to_the_service(search_r1_server, capsys):
    from nemo_sdsearch.retrieval.__main__ import main

    assert main(["query", "--url", search_r1_server.url + "/retrieve", "--topk", "2", "a city", "a person"]) == 0
    out = capsys.readouterr().out
    assert out.count("query: ") == 2 and out.count("  1. [") == 2 and out.count("  2. [") == 2
    with refusing_port() as port:
        assert main(["query", "--url", f"http://127.0.0.1:{port}", "x"]) == 1
    assert "unreachable" in capsys.readouterr().err


def test_client_reads_answers_of_search_r1s_own_server(bundle):
    """Search-R1's retrieval_server.py answers BM25 hits as {"title", "text", "contents"} (no id), has no /health,
    and takes topk null: our client, given its /retrieve URL, reads it."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    passages = bundle.test_world.passages[:3]

    class QueryRequest(BaseModel):  # Search-R1's request model
        queries: list[str]
        topk: int | None = None
        return_scores: bool = False

    app = FastAPI()
    seen = []

    @app.post("/retrieve")
    def retrieve(request: QueryRequest):
        seen.append(request.model_dump())
        docs = [{"title": p["contents"].split("\n")[0].strip('"'), "text": p["contents"].split("\n", 1)[1],
                 "contents": p["contents"]} for p in passages[:request.topk or 3]]
        rows = [[{"document": d, "score": 10.0 - i} for i, d in enumerate(docs)] if request.return_scores else docs
                for _ in request.queries]
        return {"result": rows}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        port = bound_port(server)  # bound by the server itself (port 0): no port is released for it to take
        client = RetrievalClient(f"http://127.0.0.1:{port}/retrieve")
        try:
            rows = client.search(["q1", "q2"], 2)
        finally:
            client.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert seen == [{"queries": ["q1", "q2"], "topk": 2, "return_scores": True}]  # the Search-R1 wire format
    assert [[(d.id, d.contents, d.score) for d in r] for r in rows] == \
           [[("", passages[0]["contents"], 10.0), ("", passages[1]["contents"], 9.0)]] * 2
    assert rows[0][0].title == passages[0]["contents"].split("\n")[0].strip('"')


def test_service_url_forms():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/retrieve", "http://h:8000/retrieve/",
                " http://h:8000/retrieve "):
        assert service_url(url) == "http://h:8000"
    assert service_url("https://proxy/search/retrieve") == "https://proxy/search"
    with pytest.raises(ValueError, match="must start with http"):
        service_url("h:8000/retrieve")


def test_auto_encoder_settings_follow_search_r1():
    assert auto_encoder_settings("/models/e5-base-v2") == ("query: ", "mean")
    assert auto_encoder_settings("/hf/models--intfloat--e5-base-v2/snapshots/0123abcd") == ("query: ", "mean")
    assert auto_encoder_settings("/models/bge-large-en-v1.5") == (
        "Represent this sentence for searching relevant passages: ", "cls")
    assert auto_encoder_settings("/models/all-MiniLM-L6-v2") == ("", "mean")
    assert auto_encoder_settings("/models/e5-base-v2", query_prefix="", pooling="cls") == ("", "cls")


def test_serve_flags_name_what_is_missing_or_wrong(search_r1_files, tmp_path, capsys):
    from nemo_sdsearch.retrieval.__main__ import main

    d = search_r1_files["dir"]
    index, corpus, encoder = str(d / "e5_Flat.index"), str(d / "wiki-18.jsonl"), str(search_r1_files["encoder"])
    cases = [
        ([], "serve needs --index DIR"),
        (["--faiss-index", index, "--corpus", corpus], "needs --encoder too"),
        (["--index", str(tmp_path), "--faiss-index", index], "not both"),
        (["--index", str(tmp_path), "--query-prefix", "query: "], "not an index directory"),
        (["--faiss-index", index, "--corpus", corpus, "--encoder", encoder, "--topk", "500"], "above --max-topk"),
    ]
    short = tmp_path / "short.jsonl"
    short.write_text("".join(line for line in open(corpus).readlines()[:-1]))
    cases.append((["--faiss-index", index, "--corpus", str(short), "--encoder", encoder],
                  f"holds {N_PASSAGES} vectors but --corpus {short} has {N_PASSAGES - 1} non-empty lines"))
    gz = tmp_path / "wiki-18.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b")
    cases.append((["--faiss-index", index, "--corpus", str(gz), "--encoder", encoder], "gzip -d"))
    cases += [(["--index", str(tmp_path), "--port", "65536"], "--port must be 0 (any free port) to 65535, not 65536"),
              (["--index", str(tmp_path), "--max-batch-queries", "0"], "--max-batch-queries must be at least 1, not 0"),
              (["--index", str(tmp_path), "--batch-window-ms", "-1"], "--batch-window-ms must be at least 0, not -1.0")]
    for flags, words in cases:
        assert main(["serve", "--port", "0", *flags]) == 2, flags
        assert words in capsys.readouterr().err, flags
