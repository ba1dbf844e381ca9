"""Convert question files you have downloaded into the FlashRAG jsonl that `sdsearch train` and
`sdsearch eval` read (`{"id", "question", "golden_answers", "metadata"}`). Nothing is downloaded.

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
import re
import sys
from pathlib import Path

QUESTION = re.compile(r"Question:\s*(.+?)\s*$", re.DOTALL)


def _rows(path: Path):
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None


def _as_list(x) -> list[str]:
    if isinstance(x, str):
        return [x]
    return [str(a) for a in (x or [])]


def convert_row(row: dict, where: str, source: str) -> tuple[str, dict]:
    """(dataset name, FlashRAG row) for one input row of either format."""
    if "question" in row and "golden_answers" in row:  # FlashRAG
        answers = _as_list(row["golden_answers"])
        out = {"id": str(row.get("id", where)), "question": str(row["question"]).strip(), "golden_answers": answers,
               "metadata": dict(row.get("metadata") or {})}
        name = source
    elif "prompt" in row and "reward_model" in row:  # Search-R1
        messages = row["prompt"]
        text = messages if isinstance(messages, str) else next(
            (m.get("content", "") for m in reversed(list(messages)) if m.get("role") == "user"), "")
        m = QUESTION.search(text or "")
        if not m:
            raise ValueError(f"{where}: no 'Question: ...' in the Search-R1 prompt")
        question = m.group(1).strip()
        truth = (row.get("reward_model") or {}).get("ground_truth") or {}
        answers = _as_list(truth.get("target") if isinstance(truth, dict) else truth)
        extra = row.get("extra_info") or {}
        name = str(row.get("data_source") or source)
        out = {"id": f"{name}_{extra.get('split', 'x')}_{extra.get('index', where)}", "question": question,
               "golden_answers": answers, "metadata": {"data_source": name}}
    else:
        raise ValueError(f"{where}: neither FlashRAG ({{question, golden_answers}}) nor Search-R1 "
                         "({prompt, reward_model}) fields")
    if not out["question"]:
        raise ValueError(f"{where}: empty question")
    if not out["golden_answers"] or not all(a.strip() for a in out["golden_answers"]):
        raise ValueError(f"{where}: no usable golden answer")
    return name, out


def convert(paths: list[Path], out_dir: Path, split_by_source: bool = False, merge: str | None = None) -> dict:
    from nemo_sdsearch.core.qa import load_flashrag

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for path in paths:
        rows = []
        for i, row in _rows(path):
            name, converted = convert_row(row, f"{path}:{i}", path.parent.name or path.stem)
            rows.append((name if split_by_source else path.stem if merge is None else "merged", converted))
        for name, converted in rows:
            groups.setdefault(name if not merge else "merged", []).append(converted)
    written = {}
    for name, rows in groups.items():
        target = out_dir / (merge if merge else f"{name}.jsonl")
        seen, unique = set(), []
        for r in rows:  # ids must be unique within a file
            rid = r["id"]
            k = 1
            while r["id"] in seen:
                r["id"] = f"{rid}#{k}"
                k += 1
            seen.add(r["id"])
            unique.append(r)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique), encoding="utf-8")
        load_flashrag(tmp)  # the trainer's own loader accepts every line
        tmp.replace(target)
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
