"""Manipulation check: does SD-Search's teacher read the outcomes in its hindsight block?

    python bench/teacher_signal.py [--model DIR] [--questions 160] [--seed 0] [--out FILE] [--smoke] [key=value ...]

SD-Search's teacher is the policy itself with a hindsight block (the group's queries and which attempts were
correct) in its prompt; the JSD pulls the student toward it at query tokens. That credits the right queries
only if the teacher, relative to the student, raises the probability of the queries of correct attempts and
lowers that of wrong ones, and only if it does so *because of the outcome labels*.

The script rolls out `--questions` training questions x `rollout.group_size` with the model (the run's sampling
settings) and keeps the MIXED groups (some attempts correct, some wrong: the only groups whose labels say
anything). For every search query of every kept rollout it takes the teacher - student log-ratio
log p_T - log p_S of the query's tokens (closing tag included, temperature 1) two ways: per token (the mean
over the query's tokens: no query-length confound) and per query (the sum). Four blocks are scored, each
built by `sd_search.rollout_hindsight_blocks` from the run's `sd.*` keys:

- real: the block training gives the rollout;
- other question: another mixed group's block (`sd.hindsight_source=other_question`): same form, nothing about
  this question (the placebo);
- labels true / labels swapped: the rollout's group listed in group order (`sd.hindsight_order=group`), once
  with the true outcome labels and once with every label flipped (correct <-> wrong): the same attempts in the
  same order, so the two blocks differ only in the labels.

The credit direction of a block is, within each mixed group, the mean log-ratio of the queries of correct
attempts minus that of wrong attempts (question difficulty cancels), averaged over groups with a 95% interval
over groups (a group-clustered interval: queries of one group are not independent). Contrasts are paired per
group: real - other question (what the teacher reads from its own question's block) and labels true - labels
swapped (the label effect: what the outcome labels alone change).

`--synthetic N` adds the same label contrast in the warm start's own demonstration format (N synthetic groups of
the bundled training world, `DemoBuilder.outcome_group`): the log-probability of the first turn that copies the
attempt labelled correct minus that of one copying a wrong-labelled attempt in another wording, with the true
labels minus with those two labels swapped. It says whether the weights learned to read labels at all, apart
from whether they do on the policy's own groups.

It ends with TARGET lines. The pre-registered comparison (docs/results.md) runs only if the label effect's
lower 95% bound (per token) is above 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

# bench/retrieval.py must not shadow the `retrieval` package
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

UNITS = ("per_token", "per_query")


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
    """Mean and the half-width of its 95% t interval over the values (nan below two): the ablation's rule."""
    from nemo_sdsearch.algorithms.ablation import t_interval

    return t_interval(list(xs))


def score_queries(actor, trajs, blocks, encode_teacher, sd_cfg, pad_id: int, micro: int = 8) -> list[dict]:
    """Per search query of every trajectory, with `blocks[i]` the block trajectory i's teacher reads:
    {"traj", "query", "log_ratio" (sum over its tokens), "per_token" (mean), "jsd" (mean per token), "tokens"}."""
    import torch

    from nemo_sdsearch.algorithms.grpo import micro_batch_tensors
    from nemo_sdsearch.algorithms.sd_search import teacher_sequences
    from nemo_sdsearch.losses.divergences import generalized_jsd_dense
    from nemo_sdsearch.models.base import SequenceBatch

    teacher = teacher_sequences(trajs, blocks, encode_teacher)
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
        where = {(r, c): k for k, (r, c) in enumerate(zip(q_rows.tolist(), q_cols.tolist()))}
        for r, i in enumerate(mi):
            for qi, (a, b) in enumerate(query_spans(trajs[i].query_mask())):
                ks = [where[(r, c)] for c in range(a, b) if (r, c) in where]
                if ks:
                    s = float(lr[ks].sum())
                    out.append({"traj": i, "query": qi, "log_ratio": s, "per_token": s / len(ks),
                                "jsd": float(jsd[ks].mean()), "tokens": len(ks)})
    return out


def group_directions(scored: list[dict], correct: list[bool], group_size: int, unit: str) -> dict[int, float]:
    """Per group: mean `unit` log-ratio of the queries of correct attempts - that of wrong attempts (groups
    with queries on both sides only)."""
    key = "log_ratio" if unit == "per_query" else "per_token"
    sides: dict[int, tuple[list, list]] = {}
    for q in scored:
        g = q["traj"] // group_size
        sides.setdefault(g, ([], []))[0 if correct[q["traj"]] else 1].append(q[key])
    return {g: statistics.mean(c) - statistics.mean(w) for g, (c, w) in sides.items() if c and w}


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[g] - b[g] for g in sorted(a.keys() & b.keys())]


def flipped(trajs) -> list[bool]:
    """Every trajectory's outcome label swapped (correct <-> wrong)."""
    return [t.exact_match != 1.0 for t in trajs]


def mixed_groups(trajs, group_size: int) -> list:
    """The trajectories of the groups with some correct and some wrong attempts, groups kept whole, in order."""
    out = []
    for g in range(0, len(trajs), group_size):
        group = trajs[g:g + group_size]
        if 0 < sum(t.exact_match == 1.0 for t in group) < len(group):
            out += group
    return out


def analyse(scored: dict[str, list[dict]], correct: list[bool], group_size: int) -> dict:
    """Directions per block and the two paired contrasts, each as {mean, ci, lower, groups} per unit."""
    out: dict = {}
    for unit in UNITS:
        d = {name: group_directions(s, correct, group_size, unit) for name, s in scored.items()}
        rows = {f"direction/{name}": list(v.values()) for name, v in d.items()}
        rows["read/real-other_question"] = paired(d["real"], d["other_question"])
        rows["label_effect/true-swapped"] = paired(d["labels_true"], d["labels_swapped"])
        out[unit] = {}
        for name, xs in rows.items():
            m, h = mean_ci(xs)
            out[unit][name] = {"mean": m, "ci": h, "lower": m - h, "groups": len(xs)}
    return out


def target_lines(res: dict) -> list[str]:
    """The pass/fail lines: the label effect (the gate of the pre-registered comparison) and the credit
    direction the real block gives beyond another question's."""
    lines = []
    for key, what in (("label_effect/true-swapped", "label effect (labels true - swapped)"),
                      ("read/real-other_question", "own block - other question's block")):
        for unit in UNITS:
            r = res[unit][key]
            ok = r["lower"] > 0
            lines.append(f"TARGET {what}, {unit.replace('_', ' ')}: lower 95% bound > 0 nats: "
                         f"{r['mean']:+.4f} ± {r['ci']:.4f} over {r['groups']} mixed groups -> "
                         f"{'PASS' if ok else 'FAIL'}")
    return lines


def synthetic_label_effect(model, tok, n: int, seed: int = 1) -> list[float]:
    """Per synthetic group (module doc): [log p(target turn) - log p(alternative turn)] under the true labels
    minus the same under the two attempts' labels swapped, nats."""
    import random

    import torch

    from nemo_sdsearch.core.hindsight import AttemptSummary, HindsightConfig, hindsight_block
    from nemo_sdsearch.core.prompts import teacher_prompt
    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.demos import DemoBuilder, response_turns
    from nemo_sdsearch.world.assets import default_bundle

    bundle = default_bundle()
    builder = DemoBuilder(tok, BM25Retriever(bundle.train_world.passages), sorted(bundle.train_world.names),
                          hindsight_targets="outcome")
    rng = random.Random(seed)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731

    def logp(prompt: str, text: str) -> float:
        p, t = enc(prompt), enc(text)
        ids = torch.tensor([p + t])
        with torch.no_grad():
            lsm = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        return float(lsm[len(p) - 1:].gather(-1, ids[0, len(p):, None]).sum())

    out, order = [], HindsightConfig(order="group")
    for q in bundle.train:
        if len(out) >= n:
            break
        attempts, target, _ = builder.outcome_group(q, rng)
        if target is None:
            continue
        alts = [a for a in attempts if not a.correct and a.queries != tuple(target) and len(a.queries) == len(q.hops)]
        if not alts:
            continue
        alt = alts[0].queries
        swapped = [AttemptSummary(a.queries, (not a.correct) if a.queries in (tuple(target), alt) else a.correct, a.answer)
                   for a in attempts]
        turn, alt_turn = response_turns(q, list(target)[:1])[0][0], response_turns(q, list(alt)[:1])[0][0]
        true_p, swap_p = (teacher_prompt(q.question, hindsight_block(a, order)) for a in (attempts, swapped))
        out.append((logp(true_p, turn) - logp(true_p, alt_turn)) - (logp(swap_p, turn) - logp(swap_p, alt_turn)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: model.path, else the embedded warm start)")
    ap.add_argument("--questions", type=int, default=160, help="training questions rolled out (x group_size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here too")
    ap.add_argument("--smoke", action="store_true", help="a few questions, one thread (the test suite's run)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="also the label contrast on N synthetic groups in the warm start's demonstration format")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of conf/tiny_cpu.yaml (sd.*, rollout.*)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.questions = min(args.questions, 8)
        args.overrides = ["model.threads=1", *args.overrides]

    import random

    from rich.console import Console
    from rich.table import Table

    from nemo_sdsearch.algorithms.sd_search import rollout_hindsight_blocks
    from nemo_sdsearch.algorithms.setup import build_components, close_components, make_prompt_format
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.world.assets import default_model_dir

    console = Console(width=160)
    cfg = load_config("tiny_cpu", args.overrides)
    model = args.model or cfg.model.path or str(default_model_dir())
    cfg = replace(cfg, algorithm="sd_search", model=replace(cfg.model, path=model))
    c = build_components(cfg, with_reference=False)  # scoring only: no reference copy
    G = cfg.rollout.group_size
    pool = c.data["train"]
    picked = random.Random(args.seed).sample(range(len(pool)), min(args.questions, len(pool)))
    questions = [pool[i] for i in picked]
    console.print(f"rolling out {len(questions)} training questions x {G} with {model} ...")
    all_trajs = c.engines["train"].run(questions, n_samples=G, seed=args.seed)
    trajs = mixed_groups(all_trajs, G)
    n_mixed = len(trajs) // G
    encode = lambda s: c.tok.encode(s, add_special_tokens=False)  # noqa: E731
    count = lambda s: len(encode(s))  # noqa: E731
    prompts = make_prompt_format(cfg, c.tok)
    teacher_ids = lambda q, b: encode(prompts.teacher(q, b))  # noqa: E731
    grouped = replace(cfg.sd, hindsight_order="group")
    blocks = {"real": rollout_hindsight_blocks(trajs, G, cfg.sd, count)} if trajs else {}
    if n_mixed >= 2:
        blocks["other_question"] = rollout_hindsight_blocks(trajs, G, replace(cfg.sd, hindsight_source="other_question"),
                                                            count)
        blocks["labels_true"] = rollout_hindsight_blocks(trajs, G, grouped, count)
        blocks["labels_swapped"] = rollout_hindsight_blocks(trajs, G, grouped, count, outcomes=flipped(trajs))
    results = {"model": model, "questions": len(questions), "group_size": G, "mixed_groups": n_mixed,
               "groups": len(questions), "rollouts_correct": sum(t.exact_match == 1.0 for t in all_trajs) / len(all_trajs),
               "sd": {"beta": cfg.sd.beta, "include_answers": cfg.sd.include_answers,
                      "hindsight_members": cfg.sd.hindsight_members, "hindsight_order": cfg.sd.hindsight_order}}
    if n_mixed < 2:
        close_components(c)
        console.print(f"[red]{n_mixed} mixed group(s) among {len(questions)}: nothing to contrast; raise --questions[/red]")
        print("TARGET label effect (labels true - swapped): no mixed groups -> FAIL")
        results["targets"] = {"label_effect": False, "read": False}
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return 0
    scored = {name: score_queries(c.actor, trajs, bl, teacher_ids, cfg.sd, c.tok.pad_token_id)
              for name, bl in blocks.items()}
    if args.synthetic:
        synth = synthetic_label_effect(c.actor.model, c.tok, args.synthetic)
        m, h = mean_ci(synth)
        results["synthetic_label_effect"] = {"mean": m, "ci": h, "groups": len(synth)}
        console.print(f"label effect in the demonstration format ({len(synth)} synthetic groups, first turn, "
                      f"target - alternative, true - swapped labels): {m:+.4f} ± {h:.4f} nats")
    close_components(c)
    correct = [t.exact_match == 1.0 for t in trajs]
    res = analyse(scored, correct, G)
    results.update({"queries": len(scored["real"]), "analysis": res,
                    "mean_jsd_per_token": {k: statistics.mean(q["jsd"] for q in s) for k, s in scored.items()}})
    table = Table(title=f"teacher - student log-ratio at search queries, nats: within-group (correct - wrong) "
                        f"means over {n_mixed} mixed groups (± 95% group-clustered t interval)")
    for col in ("quantity", "per token", "per query", "groups"):
        table.add_column(col)
    for name in res["per_token"]:
        a, b = res["per_token"][name], res["per_query"][name]
        table.add_row(name, f"{a['mean']:+.4f} ± {a['ci']:.4f}", f"{b['mean']:+.4f} ± {b['ci']:.4f}", str(a["groups"]))
    console.print(table)
    console.print(f"{len(questions)} questions x {G}: {n_mixed} mixed groups, {len(scored['real'])} queries in them; "
                  "mean JSD per query token " + ", ".join(f"{k} {v:.4f}" for k, v in results["mean_jsd_per_token"].items()))
    lines = target_lines(res)
    results["targets"] = {"label_effect": res["per_token"]["label_effect/true-swapped"]["lower"] > 0,
                          "read": res["per_token"]["read/real-other_question"]["lower"] > 0}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        console.print(f"wrote {args.out}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
