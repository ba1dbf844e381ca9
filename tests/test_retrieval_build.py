"""Index builds that match their encoder: `build` picks an E5 encoder's "query: " / "passage: " by the same rule as
`serve --faiss-index` and the in-process retriever (encoder.encoder_settings), records what it used in meta.json,
and `serve` encodes queries with exactly that (other prefixes given to serve are refused; an index built against
its encoder's convention is served as built, with a warning). The encoder computes in float32.

The "E5" encoder is the bundled MiniLM's files linked into a directory named e5-mini: the name is what marks an
encoder as E5 (as in Search-R1), and nothing is downloaded."""

import json

import numpy as np
import pytest

from nemo_sdsearch.retrieval import build_retriever
from nemo_sdsearch.retrieval.__main__ import main
from nemo_sdsearch.retrieval.build import build_index
from nemo_sdsearch.retrieval.encoder import TextEncoder, default_encoder_path
from nemo_sdsearch.retrieval.index import IndexRetriever, rebuild_command
from test_retrieval_search_r1 import search_r1_encode
from test_retrieval_service import Server

N_PASSAGES = 24


@pytest.fixture(scope="module")
def files(tmp_path_factory, bundle):
    d = tmp_path_factory.mktemp("build")
    e5 = d / "models" / "e5-mini"
    e5.mkdir(parents=True)
    for f in default_encoder_path().iterdir():
        (e5 / f.name).symlink_to(f)
    passages = bundle.test_world.passages[:N_PASSAGES]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in passages))
    return {"dir": d, "e5": e5, "corpus": corpus, "passages": passages}


@pytest.fixture(scope="module")
def e5_index(files):
    out = files["dir"] / "e5_flat"
    build_index(files["corpus"], out, encoder=str(files["e5"]), progress=False)
    return out


@pytest.fixture(scope="module")
def reference(files):
    """Search-R1's E5 encoding, written independently of ours (test_retrieval_search_r1.search_r1_encode)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files["e5"]))
    model = AutoModel.from_pretrained(str(files["e5"]), dtype="float32").eval()
    return lambda texts: search_r1_encode(tok, model, texts)


def test_an_e5_build_uses_e5_prefixes_and_serving_encodes_queries_with_them(files, e5_index, reference):
    meta = json.loads((e5_index / "meta.json").read_text())
    assert (meta["query_prefix"], meta["passage_prefix"], meta["pooling"]) == ("query: ", "passage: ", "mean")
    contents = [p["contents"] for p in files["passages"]]
    emb = np.load(e5_index / "emb" / "shard_00000.npy")
    want = reference([f"passage: {c}" for c in contents])
    np.testing.assert_allclose(emb, want, atol=1e-5)
    assert np.abs(emb - reference(contents)).max() > 1e-2  # the prefix changes the vectors: the check can fail
    # the server's retriever encodes queries as the index records: its scores are E5 query . E5 passage
    queries = [contents[3].split("\n", 1)[1][:60], contents[11].split("\n", 1)[1][:60]]
    docs = IndexRetriever(e5_index).search(queries, topk=N_PASSAGES)
    q = reference([f"query: {x}" for x in queries])
    for row, qv in zip(docs, q):
        scores = {d.id: d.score for d in row}
        for i, p in enumerate(files["passages"]):
            assert scores[p["id"]] == pytest.approx(float(qv @ want[i]), abs=1e-4)
    # the in-process dense retriever (sdsearch eval --retriever dense --encoder DIR) follows the same rule
    enc = build_retriever("dense", files["passages"], str(files["e5"])).encoder
    assert (enc.query_prefix, enc.passage_prefix, enc.pooling) == ("query: ", "passage: ", "mean")
    # the bundled MiniLM is not E5: no prefixes
    plain = files["dir"] / "minilm"
    meta = build_index(files["corpus"], plain, kind="dense", progress=False)
    assert (meta["query_prefix"], meta["passage_prefix"], meta["pooling"]) == ("", "", "mean")
    np.testing.assert_allclose(np.load(plain / "emb" / "shard_00000.npy"), reference(contents), atol=1e-5)


def test_serve_refuses_encoding_flags_unlike_the_index(files, e5_index, capsys):
    bad = [(["--query-prefix", ""], "--query-prefix '' (built with 'query: ')"),
           (["--pooling", "cls"], "--pooling 'cls' (built with 'mean')"),
           (["--max-length", "128"], "--max-length 128 (built with 256)")]
    for flags, words in bad:  # an invalid port: were the flags accepted, serve would stop there, never serve
        assert main(["serve", "--index", str(e5_index), "--port", "65536", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert words in err and "drop these flags" in err, err
    # flags that repeat what the index records pass this check: the next one (the port) is what fails
    same = ["--query-prefix", "query: ", "--pooling", "mean", "--max-length", "256"]
    assert main(["serve", "--index", str(e5_index), *same, "--port", "65536"]) == 2
    assert "--port must be 0" in capsys.readouterr().err
    bm25 = files["dir"] / "bm25"
    build_index(files["corpus"], bm25, kind="bm25", progress=False)
    assert main(["serve", "--index", str(bm25), "--query-prefix", "query: ", "--port", "65536"]) == 2
    assert "is a bm25 index" in capsys.readouterr().err


def test_an_index_built_against_the_convention_is_served_as_built_with_a_warning(files, capsys):
    out = files["dir"] / "e5_noprefix"
    assert main(["build", "--corpus", str(files["corpus"]), "--out", str(out), "--encoder", str(files["e5"]),
                 "--query-prefix", "", "--passage-prefix", ""]) == 0
    assert "warning: encoder" in capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["query_prefix"], meta["passage_prefix"]) == ("", "")
    server = Server(out).start()
    try:
        log = server.output()
    finally:
        server.stop()
    assert "query prefix '' (its convention: 'query: ')" in log and "retrieves worse" in log, log
    assert "query prefix '', mean pooling" in log, log  # what it serves with: the index's own


def test_an_index_built_before_pooling_was_recorded_is_still_up_to_date(files, e5_index):
    meta = json.loads((e5_index / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k != "pooling"}
    (e5_index / "meta.json").write_text(json.dumps(old))
    try:
        assert build_index(files["corpus"], e5_index, encoder=str(files["e5"]), progress=False).get("unchanged")
        assert "--pooling mean" in rebuild_command(e5_index, old)
        assert IndexRetriever(e5_index).encoder.pooling == "mean"
    finally:
        (e5_index / "meta.json").write_text(json.dumps(meta))


def test_the_encoder_computes_in_float32_whatever_the_checkpoint_stores(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(default_encoder_path()))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "tiny")  # a bf16 checkpoint
    tok.save_pretrained(tmp_path / "tiny")
    enc = TextEncoder(tmp_path / "tiny", device="cpu")
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    assert enc.encode_queries(["who founded it"]).dtype == np.float32
