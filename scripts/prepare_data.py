"""Convert question files you have downloaded into FlashRAG jsonl (`{"id", "question", "golden_answers",
"metadata"}`): merge several into one, or split a Search-R1 file into one file per benchmark. Nothing is
downloaded. `sdsearch train` (data.train_files, ...) and `sdsearch eval --data` read both formats directly
(nemo_sdsearch.core.qa.load_questions); this script is for merging, splitting and checking.

Inputs, recognised per file:
- FlashRAG jsonl (`{"id", "question", "golden_answers", ...}`): checked, normalised, passed through.
- Search-R1 parquet or jsonl rows (`data_source`, `prompt` [chat messages whose user turn ends with
  "Question: ..."], `reward_model.ground_truth.target`, `extra_info.index`), as written by Search-R1's
  `scripts/data_process/qa_search_*.py`; parquet needs `pyarrow`.

    python scripts/prepare_data.py --out data nq/train.jsonl hotpotqa/train.jsonl \\
        --merge nq_hotpotqa_train.jsonl          # the recipes' training file
    python scripts/prepare_data.py --out data searchr1/test.parquet --split-by-source   # one file per benchmark

Every output line is validated by the same loader the trainer uses; a bad input row is reported with
its file and row number and nothing is written for that file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemo_sdsearch.core.files import atomic_path
from nemo_sdsearch.core.qa import QA, is_search_r1_row, load_questions, read_rows, unique_id


def convert_row(row: dict, where: str, source: str) -> tuple[str, dict]:
    """(dataset name, FlashRAG row) for one input row of either format (the trainer's own readers,
    nemo_sdsearch.core.qa, decide; blank answers are dropped here too)."""
    if is_search_r1_row(row):
        qa = QA.from_search_r1(row, where)
        name = qa.metadata["data_source"]
    elif isinstance(row, dict) and "question" in row and "golden_answers" in row:  # FlashRAG
        answers = [row["golden_answers"]] if isinstance(row["golden_answers"], str) else row["golden_answers"]
        row = {**row, "id": row.get("id", where), "question": str(row["question"]).strip(),
               "golden_answers": [str(a) for a in answers or [] if str(a).strip()]}
        qa = QA.from_flashrag(row, where)
        name = source
    else:
        raise ValueError(f"{where}: neither FlashRAG ({{question, golden_answers}}) nor Search-R1 "
                         "({prompt, reward_model}) fields")
    return name, {"id": qa.id, "question": qa.question, "golden_answers": qa.golden_answers, "metadata": qa.metadata}


def convert(paths: list[Path], out_dir: Path, split_by_source: bool = False, merge: str | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for path in paths:
        rows = []
        for where, row in read_rows(path):
            name, converted = convert_row(row, where, path.parent.name or path.stem)
            rows.append((name if split_by_source else path.stem if merge is None else "merged", converted))
        for name, converted in rows:
            groups.setdefault(name if not merge else "merged", []).append(converted)
    written = {}
    for name, rows in groups.items():
        target = out_dir / (merge if merge else f"{name}.jsonl")
        seen, unique = set(), []
        for r in rows:  # ids must be unique within a file (the trainer's rule: core/qa.py unique_id)
            r["id"] = unique_id(r["id"], seen)
            unique.append(r)
        with atomic_path(target) as tmp:  # <target>.tmp, renamed onto the target once the loader accepts it
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique), encoding="utf-8")
            load_questions(tmp)  # the trainer's own loader accepts every line
        written[str(target)] = len(unique)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--split-by-source", action="store_true",
                    help="one output file per Search-R1 data_source (e.g. nq.jsonl, hotpotqa.jsonl, ...)")
    ap.add_argument("--merge", help="write all inputs into this one file name instead")
    args = ap.parse_args(argv)
    try:
        written = convert(args.inputs, args.out, args.split_by_source, args.merge)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, n in written.items():
        print(f"{n:8d} questions -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
