"""Rollout throughput: our engine against a Search-R1-style loop and against the decode ceiling, side by side.

Two workloads, each run by all three:
- greedy: `--questions` questions, one rollout each, greedy (both loops then produce the same trajectories,
  which is checked, so the comparison is like for like);
- training-shaped: the main job's step (conf/tiny_cpu.yaml: `--train-questions` questions x group size 5,
  temperature 1, the same per-turn budget and turn limit).

The Search-R1-style loop re-encodes the whole context every turn (no KV reuse across turns), decodes every
row to the per-turn maximum, then cuts each row at the first `</search>` / `</answer>`. Ours keeps the KV
cache across turns, stops each row on the tag, and drops finished rows. Two ceilings, both the same model decoding in
one batched pass with a KV cache and no tool calls (prompt prefill untimed), in a minimal loop (one forward and one
argmax or multinomial draw per token):
- the batched-decode ceiling: as many rows as the workload has, each as many new tokens as our rollouts generated
  per row on average. No generator can reach it on a fixed set of rows of unequal length: a row's tokens come one
  step after another, so any generator takes at least as many steps as the longest row (training-shaped: about
  3x the mean), while this ceiling takes the mean;
- the length-matched ceiling: each row decodes exactly as many tokens as our rollout of it generated and leaves
  the batch when it has them. What remains between ours and it is the rollout's own cost: the prefill of the
  retrieved passages and feedback, the retrieval, the stop checks, the bookkeeping.
Ours is reported as generated tokens per second against the first, and as a ratio of times against the second.

Targets: greedy at least 3x the Search-R1-style loop; training-shaped at least 5x it and ours at least 0.8
of each ceiling.

    python bench/rollout.py [--model DIR] [--questions 64] [--train-questions 8] [--max-new-tokens 96] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
from nemo_sdsearch.core.targets import target_line  # noqa: E402

from nemo_sdsearch.core.prompts import INVALID_ACTION_FEEDBACK, information_block, student_prompt  # noqa: E402
from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine, parse_action  # noqa: E402
from nemo_sdsearch.rollout.torch_generator import TorchGenerator  # noqa: E402


@torch.inference_mode()
def search_r1_style(model, tok, retriever, questions, cfg: RolloutConfig):
    """Returns per row (response ids) and the number of kept tokens; greedy or sampled at cfg.temperature."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)
    dec = lambda ids: tok.decode(ids, skip_special_tokens=False)
    ctx = [enc(student_prompt(q.question)) for q in questions]
    resp = [[] for _ in questions]
    active = list(range(len(questions)))
    kept = 0
    pad = tok.pad_token_id
    feedback = enc(INVALID_ACTION_FEEDBACK)
    for turn in range(cfg.max_turns + 1):
        if not active:
            break
        final = turn == cfg.max_turns
        L = max(len(ctx[i]) for i in active)
        ids = torch.full((len(active), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(active):  # left padding, whole context re-encoded
            ids[j, L - len(ctx[i]):] = torch.tensor(ctx[i])
            mask[j, L - len(ctx[i]):] = 1
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0} if cfg.temperature > 0 else \
            {"do_sample": False}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.max_new_tokens, pad_token_id=pad, **sampling)
        new = out[:, L:].tolist()
        still, queries = [], {}
        for j, i in enumerate(active):
            # Cut at the first tag that ends a turn (decode token by token until the text has it).
            stops = ("</answer>",) if final else ("</search>", "</answer>")
            cut = len(new[j])
            for k in range(1, len(new[j]) + 1):
                if any(s in dec(new[j][:k]) for s in stops):
                    cut = k
                    break
            turn_ids = new[j][:cut]
            kept += len(turn_ids)
            ctx[i] += turn_ids
            resp[i] += turn_ids
            action, content = parse_action(dec(turn_ids))
            if action == "search" and not final:
                queries[i] = content
                still.append(i)
            elif action == "invalid" and not final:
                ctx[i] += feedback
                resp[i] += feedback
                still.append(i)
        searching = [i for i in still if i in queries]
        results = retriever.search([queries[i] for i in searching], cfg.topk) if searching else []
        for i, docs in zip(searching, results):
            info = enc(information_block([d.contents for d in docs]))
            ctx[i] += info
            resp[i] += info
        active = still
    return resp, kept


@torch.inference_mode()
def decode_ceiling(model, tok, prompts: list[list[int]], new_tokens: int | list[int], temperature: float) -> float:
    """Seconds to decode `new_tokens` tokens for every prompt in one batch (left-padded, KV cache, no stops),
    the prompts' prefill excluded: the generator's ceiling for this batch and length. With one length per prompt
    (the length-matched ceiling), each row decodes its own number of tokens and leaves the batch when it has them
    (its cache rows dropped at once), so the loop takes as many steps as the longest row, as any generator must."""
    from transformers import DynamicCache

    from nemo_sdsearch.rollout.torch_generator import _cache_kwarg

    kw = _cache_kwarg(model)  # `cache` from transformers 5.24 on, `past_key_values` before
    pad = tok.pad_token_id
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, L - len(p):] = torch.tensor(p)
        mask[j, L - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{kw: cache})
    logits = out.logits[:, -1]
    pos = positions[:, -1:]
    left = torch.tensor([new_tokens] * len(prompts) if isinstance(new_tokens, int) else list(new_tokens))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(int(left.max())):
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=g)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        left -= 1
        if not bool(left.all()):                 # rows that have their tokens leave the batch
            keep = left.nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            nxt, mask, pos, left = nxt[keep], mask[keep], pos[keep], left[keep]
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos + 1
        logits = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                       **{kw: cache}).logits[:, -1]
    return time.perf_counter() - t0


def workload(name, model, tok, retriever, questions, cfg: RolloutConfig, group: int, check_same: bool) -> dict:
    """Ours, the Search-R1-style loop and the ceiling on one workload: a row of the table."""
    engine = RolloutEngine(TorchGenerator(model, tok), retriever, cfg)
    engine.run(questions[:2], n_samples=min(group, 2))  # warm up both paths
    search_r1_style(model, tok, retriever, questions[:2], cfg)
    t0 = time.perf_counter()
    trajs = engine.run(questions, n_samples=group)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(sum(t.from_policy) for t in trajs)
    rows = [q for q in questions for _ in range(group)]
    t0 = time.perf_counter()
    base_resp, base_tokens = search_r1_style(model, tok, retriever, rows, cfg)
    base_s = time.perf_counter() - t0
    same = sum(t.response_ids() == r for t, r in zip(trajs, base_resp)) if check_same else None
    prompts = [tok.encode(student_prompt(q.question), add_special_tokens=False) for q in rows]
    per_row = max(1, round(ours_tokens / len(rows)))
    ceiling_s = decode_ceiling(model, tok, prompts, per_row, cfg.temperature)
    lengths = [max(1, sum(t.from_policy)) for t in trajs]
    matched_s = decode_ceiling(model, tok, prompts, lengths, cfg.temperature)
    return {"name": name, "rows": len(rows), "ours_s": ours_s, "ours_tokens": ours_tokens, "base_s": base_s,
            "base_tokens": base_tokens, "same": same, "ceiling_s": ceiling_s, "ceiling_tokens": per_row * len(rows),
            "matched_s": matched_s, "matched_tokens": sum(lengths), "longest": max(lengths)}


def main():
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.world.assets import default_datasets, default_model_dir
    from nemo_sdsearch.retrieval import BM25Retriever

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--train-questions", type=int, default=8, help="questions of the training-shaped workload "
                                                                    "(x group size 5; the main job's step: 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="2 questions (1 training-shaped), 16 new tokens a turn: the "
                                                         "bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.questions, args.train_questions, args.max_new_tokens, args.threads = 2, 1, 16, 1
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model or default_model_dir(), device="cpu")
    questions, corpus = default_datasets("test")
    retriever = BM25Retriever(corpus)
    greedy = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, max_context=2048)
    train = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, max_context=1024)
    results = [workload("greedy", model, tok, retriever, questions[:args.questions], greedy, 1, True),
               workload("training-shaped", model, tok, retriever, questions[:args.train_questions], train, 5, False)]
    print(f"max {args.max_new_tokens} new tokens per turn, {greedy.max_turns} searches max, "
          f"{torch.get_num_threads()} threads; tokens = generated (policy) tokens")
    print(f"{'workload':16s} {'rows':>5s} | {'loop':28s} {'seconds':>8s} {'tokens':>7s} {'tokens/s':>9s}")
    for r in results:
        for name, sec, n in (("ours (KV reuse, stop on tag)", r["ours_s"], r["ours_tokens"]),
                             ("Search-R1-style loop", r["base_s"], r["base_tokens"]),
                             ("ceiling: batched decode", r["ceiling_s"], r["ceiling_tokens"]),
                             ("ceiling: length-matched", r["matched_s"], r["matched_tokens"])):
            print(f"{r['name']:16s} {r['rows']:5d} | {name:28s} {sec:8.2f} {n:7d} {n / sec:9.1f}")
    for r in results:
        ceiling = (r["ours_tokens"] / r["ours_s"]) / (r["ceiling_tokens"] / r["ceiling_s"])
        matched = r["matched_s"] / r["ours_s"]   # the same tokens per row: a ratio of times
        r["speedup"], r["of_ceiling"], r["of_matched"] = r["base_s"] / r["ours_s"], ceiling, matched
        same = f", identical trajectories {r['same']}/{r['rows']}" if r["same"] is not None else ""
        print(f"{r['name']}: {r['speedup']:.2f}x the Search-R1-style loop (rows/s), {ceiling:.2f} of the "
              f"ceiling's tokens/s, {matched:.2f} of the length-matched ceiling's (longest row "
              f"{r['longest']} tokens, mean {r['matched_tokens'] / r['rows']:.0f}){same}")
    g, t = results
    print(target_line("rollout_speedup", g["speedup"], ">=", 3))
    print(target_line("rollout_speedup_training_shaped", t["speedup"], ">=", 5))
    print(target_line("rollout_vs_decode_ceiling_training_shaped", t["of_ceiling"], ">=", 0.8))
    print(target_line("rollout_vs_length_matched_ceiling_training_shaped", t["of_matched"], ">=", 0.8))


if __name__ == "__main__":
    main()
