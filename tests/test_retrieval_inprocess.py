"""In-process retrievers (real bm25s and real FAISS over the bundled MiniLM)."""

import json

import pytest

from nemo_sdsearch.core.prompts import format_passages, information_block
from nemo_sdsearch.retrieval import BM25Retriever, Document, load_corpus
from nemo_sdsearch.retrieval.base import CorpusError


def recall_at(retriever, questions, k):
    hops = [h for q in questions for h in q.hops]
    results = retriever.search([h.query for h in hops], k)
    return sum(any(h.evidence in d.contents for d in docs) for h, docs in zip(hops, results)) / len(hops)


def test_bm25_finds_the_entity_passage(bundle):
    r = BM25Retriever(bundle.test_world.passages)
    assert recall_at(r, bundle.test, 3) >= 0.99
    res = r.search(["qqqq zzzz"], 3)
    assert res == [[]]
    assert r.search([], 3) == []


@pytest.mark.slow
def test_dense_minilm_faiss(bundle, tmp_path):
    import numpy as np

    from nemo_sdsearch.retrieval import DenseRetriever, TextEncoder

    from test_retrieval_service import evidence_corpus

    questions = bundle.test[:20]
    corpus = evidence_corpus(bundle.test_world.passages, questions, 200)
    encoder = TextEncoder()
    r = DenseRetriever(corpus, encoder, cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (200, encoder.dim)
    # A second start over the same corpus reads the cache; a changed corpus gets its own entry.
    again = DenseRetriever(corpus, encoder, cache_dir=tmp_path)
    assert np.array_equal(faiss_vectors(again), faiss_vectors(r))
    DenseRetriever(corpus[:50], encoder, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert recall_at(r, questions, 3) >= 0.9
    docs = r.search(["anything"], 5)[0]
    assert len(docs) == 5 and all(-1.001 <= d.score <= 1.001 for d in docs)
    assert [d.score for d in docs] == sorted([d.score for d in docs], reverse=True)


def faiss_vectors(r):
    return r.index.reconstruct_n(0, r.index.ntotal)


def test_encoder_is_mean_pooled_and_normalised():
    import numpy as np

    from nemo_sdsearch.retrieval import TextEncoder

    enc = TextEncoder()
    e = enc.encode_queries(["a city in the north", "a painter born in 1843", "a city in the north"])
    assert e.shape == (3, enc.dim) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert np.allclose(e[0], e[2], atol=1e-6) and not np.allclose(e[0], e[1], atol=1e-2)


def test_search_r1_passage_format():
    docs = [Document("1", '"Oskar"\nOskar is a city.'), Document("2", '"Bo Li"\nBo Li was born.\nSecond line')]
    assert format_passages([d.contents for d in docs]) == (
        'Doc 1(Title: "Oskar") Oskar is a city.\nDoc 2(Title: "Bo Li") Bo Li was born.\nSecond line')
    assert information_block([]) == "\n\n<information></information>\n\n"
    assert docs[1].title == "Bo Li"
    assert docs[0].to_wire(True) == {"document": {"id": "1", "contents": '"Oskar"\nOskar is a city.'}, "score": 0.0}


def test_corpus_errors_name_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"id": 1, "contents": '"T"\nx'}) + "\n{bad json\n")
    with pytest.raises(CorpusError, match=r"c.jsonl:2: not valid JSON"):
        load_corpus(p)
    p.write_text(json.dumps({"id": 1, "text": "x"}) + "\n")
    with pytest.raises(CorpusError, match='"contents"'):
        load_corpus(p)
    p.write_text("\n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(p)
    p.write_bytes(json.dumps({"id": 1, "contents": '"T"\nx'}).encode() + b'\n{"id": 2, "contents": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 27\)"):
        load_corpus(p)
    p.write_text(json.dumps({"id": 7, "contents": '"T"\nx'}) + "\n")
    assert load_corpus(p) == [{"id": "7", "contents": '"T"\nx'}]


def test_encoder_matches_sentence_transformers():
    """Our mean-pool + L2 encoder reproduces the sentence-transformers pipeline of the bundled MiniLM."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from nemo_sdsearch.retrieval import TextEncoder
    from nemo_sdsearch.retrieval.encoder import default_encoder_path

    texts = ['"Oskar"\nOskar is a city in Kiasiia.', "who founded Velora Works", "a b c " * 30]
    ours = TextEncoder().encode_passages(texts)
    ref = SentenceTransformer(str(default_encoder_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(ours, ref, atol=1e-5)
