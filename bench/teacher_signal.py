"""Does SD-Search's teacher read its hindsight block? The credit signal at search-query tokens, measured.

    python bench/teacher_signal.py [--model DIR] [--questions 96] [--seed 0] [--out FILE] [key=value ...]

SD-Search's teacher is the policy itself with a hindsight block (the group's queries and which attempts
were correct) in its prompt; the JSD pulls the student toward it at query tokens. That moves the student
the right way only if the teacher raises the probability of good queries and lowers that of bad ones
relative to the student. This script rolls out `--questions` training questions x `rollout.group_size`
with the model (the run's sampling settings), builds each group's hindsight block exactly as training
does (`sd.*` keys), and for every search query of every rollout takes the teacher-student log-ratio of the
whole query, log p_T(query) - log p_S(query) (the sum over its tokens, closing tag included, at
temperature 1), and its mean per-token generalized JSD (`sd.beta`).

Queries are split two ways: by the outcome the block reports for their attempt (correct / wrong), and by
whether the query retrieved an evidence passage of its question (the bundled world's metadata). The
credit direction is the mean log-ratio of the good queries minus that of the bad ones (a 95% normal
interval over queries); positive: the teacher prefers the good queries more than the student does.
Everything is measured twice, with the real blocks and with a control that gives each group the block of
another question (same format and length, no information about this question): only the difference
between the two is what the teacher reads from its own group's hindsight.

The figures go to the console (and, with --out, to a JSON file). Mixed groups (some attempts correct, some
wrong) are where GRPO's advantage has a sign to give too; the table counts them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

# bench/retrieval.py must not shadow the `retrieval` package
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]


def query_spans(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True in a query mask: one run per search query, in order."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal interval (nan half-width below two values)."""
    if not xs:
        return math.nan, math.nan
    if len(xs) < 2:
        return xs[0], math.nan
    return statistics.mean(xs), 1.96 * statistics.stdev(xs) / math.sqrt(len(xs))


def diff_ci(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of two independent means and its 95% normal half-width."""
    (ma, ha), (mb, hb) = mean_ci(a), mean_ci(b)
    return ma - mb, math.hypot(ha / 1.96, hb / 1.96) * 1.96


def score_queries(actor, trajs, blocks, group_size: int, encode_teacher, sd_cfg, pad_id: int,
                  micro: int = 8) -> list[dict]:
    """Per search query of every trajectory: {"traj", "query", "log_ratio", "jsd", "tokens"}."""
    import torch

    from nemo_sdsearch.algorithms.grpo import micro_batch_tensors
    from nemo_sdsearch.algorithms.sd_search import teacher_sequences
    from nemo_sdsearch.losses.divergences import generalized_jsd_dense
    from nemo_sdsearch.models.base import SequenceBatch

    teacher = teacher_sequences(trajs, [blocks[i // group_size] for i in range(len(trajs))], encode_teacher)
    out = []
    for lo in range(0, len(trajs), micro):
        mi = list(range(lo, min(lo + micro, len(trajs))))
        batch, rows, cols, is_q = micro_batch_tensors([trajs[i] for i in mi], pad_id, actor.device)
        if not bool(is_q.any()):
            continue
        q_rows, q_cols = rows[is_q], cols[is_q]
        with torch.no_grad():
            student = actor.logits_at(batch, q_rows, q_cols).double()
            tb = SequenceBatch.from_lists([teacher[i].token_ids for i in mi], pad_id, actor.device)
            shift = torch.tensor([teacher[i].shift for i in mi], device=actor.device)
            teach = actor.teacher_logits_at(tb, q_rows, q_cols + shift[q_rows]).double()
            tok = batch.input_ids[q_rows, q_cols]
            lr = (teach.log_softmax(-1) - student.log_softmax(-1)).gather(-1, tok[:, None])[:, 0]
            jsd = generalized_jsd_dense(student, teach, sd_cfg.beta, 1.0)
        # one query = one run of query positions in its trajectory's mask
        where = {}
        for k, (r, c) in enumerate(zip(q_rows.tolist(), q_cols.tolist())):
            where[(r, c)] = k
        for r, i in enumerate(mi):
            for qi, (a, b) in enumerate(query_spans(trajs[i].query_mask())):
                ks = [where[(r, c)] for c in range(a, b) if (r, c) in where]
                if ks:
                    out.append({"traj": i, "query": qi, "log_ratio": float(lr[ks].sum()),
                                "jsd": float(jsd[ks].mean()), "tokens": len(ks)})
    return out


def split_table(scored: list[dict], label) -> dict:
    """{"good": [...], "bad": [...]} log-ratios of the queries `label(q)` calls True / False (None: skipped)."""
    good = [q["log_ratio"] for q in scored if label(q) is True]
    bad = [q["log_ratio"] for q in scored if label(q) is False]
    return {"good": good, "bad": bad}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the embedded warm start)")
    ap.add_argument("--questions", type=int, default=96, help="training questions rolled out (x group_size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here too")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of conf/tiny_cpu.yaml (sd.*, rollout.*)")
    args = ap.parse_args(argv)

    import random
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from nemo_sdsearch.algorithms.sd_search import group_hindsight_blocks
    from nemo_sdsearch.algorithms.setup import build_components, close_components, make_prompt_format
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.world.assets import default_model_dir
    from nemo_sdsearch.world.evidence import query_metrics

    console = Console(width=150)
    cfg = load_config("tiny_cpu", args.overrides)
    model = args.model or cfg.model.path or str(default_model_dir())
    cfg = replace(cfg, algorithm="sd_search", model=replace(cfg.model, path=model),
                  grpo=replace(cfg.grpo, kl_coef=0.0))
    c = build_components(cfg)
    G = cfg.rollout.group_size
    pool = c.data["train"]
    picked = random.Random(args.seed).sample(range(len(pool)), min(args.questions, len(pool)))
    questions = [pool[i] for i in picked]
    console.print(f"rolling out {len(questions)} training questions x {G} with {model} ...")
    trajs = c.engines["train"].run(questions, n_samples=G, seed=args.seed)
    encode = lambda s: c.tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompts = make_prompt_format(cfg, c.tok)
    blocks = group_hindsight_blocks(trajs, G, cfg.sd, lambda s: len(encode(s)))
    n_groups = len(blocks)
    control = [blocks[(g + 1) % n_groups] for g in range(n_groups)]  # another question's block
    teacher_ids = lambda q, b: encode(prompts.teacher(q, b))  # noqa: E731

    hits = []  # per trajectory: per search, did it retrieve evidence (None without metadata)
    for t, q in zip(trajs, (q for q in questions for _ in range(G))):
        m = query_metrics(t.retrieved_ids, q.metadata)
        hits.append(m.evidence_hits if m is not None else None)
    correct = [t.exact_match == 1.0 for t in trajs]
    mixed = sum(0 < sum(correct[g * G:(g + 1) * G]) < G for g in range(n_groups))

    results = {"model": model, "questions": len(questions), "group_size": G, "mixed_groups": mixed,
               "rollouts_correct": sum(correct) / len(trajs), "sd": {"beta": cfg.sd.beta,
               "include_answers": cfg.sd.include_answers, "include_gold": cfg.sd.include_gold}}
    scored = {name: score_queries(c.actor, trajs, bl, G, teacher_ids, cfg.sd, c.tok.pad_token_id)
              for name, bl in (("real", blocks), ("control", control))}
    close_components(c)
    # the same queries under both blocks: real - control per query is what the teacher read from its own group
    control_lr = {(q["traj"], q["query"]): q["log_ratio"] for q in scored["control"]}
    scored["read"] = [{**q, "log_ratio": q["log_ratio"] - control_lr[(q["traj"], q["query"])]}
                      for q in scored["real"] if (q["traj"], q["query"]) in control_lr]
    splits = {
        "attempt correct / wrong": lambda q: correct[q["traj"]],
        "query retrieved evidence / missed": lambda q: None if hits[q["traj"]] is None
        or q["query"] >= len(hits[q["traj"]]) else bool(hits[q["traj"]][q["query"]]),
    }
    titles = {"real": "real hindsight", "control": "control (another question's block)",
              "read": "real - control, per query (what the teacher reads from its own group's block)"}
    table = Table(title="teacher - student log-ratio of a whole search query, nats (mean ± 95% CI)")
    for col in ("hindsight", "split", "good queries", "bad queries", "credit direction (good - bad)"):
        table.add_column(col)
    for name, qs in scored.items():
        results[name] = {"queries": len(qs)}
        if name != "read":
            results[name]["mean_jsd_per_token"] = statistics.mean(q["jsd"] for q in qs) if qs else math.nan
        for split, label in splits.items():
            s = split_table(qs, label)
            (mg, hg), (mb, hb), (d, hd) = mean_ci(s["good"]), mean_ci(s["bad"]), diff_ci(s["good"], s["bad"])
            results[name][split] = {"good_mean": mg, "good_n": len(s["good"]), "bad_mean": mb,
                                    "bad_n": len(s["bad"]), "direction": d, "direction_ci": hd}
            table.add_row(titles[name], split, f"{mg:+.3f} ± {hg:.3f} (n={len(s['good'])})",
                          f"{mb:+.3f} ± {hb:.3f} (n={len(s['bad'])})", f"{d:+.3f} ± {hd:.3f}")
    console.print(table)
    console.print(f"{sum(correct)} of {len(trajs)} rollouts correct; {mixed} of {n_groups} groups mixed "
                  f"(some attempts correct, some wrong); mean JSD per query token "
                  f"{results['real']['mean_jsd_per_token']:.4f} (real), {results['control']['mean_jsd_per_token']:.4f} (control)")
    for split in splits:
        r = results["read"][split]
        console.print(f"credit the teacher reads from its own hindsight ({split}): {r['direction']:+.3f} "
                      f"± {r['direction_ci']:.3f} nats per query")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
