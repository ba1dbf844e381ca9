"""Rollout throughput: our engine against a Search-R1-style loop, side by side in one run.

Both run the same model, questions, retriever and greedy decoding. The Search-R1-style loop re-encodes
the whole context every turn (no KV reuse across turns), decodes every row to the per-turn maximum, then
cuts each row at the first `</search>` / `</answer>`. Ours keeps the KV cache across turns, stops each row
on the tag, and drops finished rows. Greedy decoding makes both produce the same trajectories, which is
checked, so the comparison is like for like.

    python bench/rollout.py [--model DIR] [--questions 64] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
from nemo_sdsearch.eval.targets import target_line  # noqa: E402

from nemo_sdsearch.core.prompts import INVALID_ACTION_FEEDBACK, information_block, student_prompt  # noqa: E402
from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine, parse_action  # noqa: E402
from nemo_sdsearch.rollout.torch_generator import TorchGenerator  # noqa: E402


@torch.inference_mode()
def search_r1_style(model, tok, retriever, questions, cfg: RolloutConfig):
    """Returns per question (response ids, answer-or-None) and the number of kept tokens."""
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
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                             min_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=pad)
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


def main():
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.world.assets import default_datasets, default_model_dir
    from nemo_sdsearch.retrieval import BM25Retriever

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="4 questions, 16 new tokens a turn: the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.questions, args.max_new_tokens = 4, 16
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model or default_model_dir(), device="cpu")
    questions, corpus = default_datasets("test")
    questions = questions[:args.questions]
    retriever = BM25Retriever(corpus)
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, max_context=2048)
    engine = RolloutEngine(TorchGenerator(model, tok), retriever, cfg)

    # Warm up both paths once on two questions.
    engine.run(questions[:2])
    search_r1_style(model, tok, retriever, questions[:2], cfg)

    t0 = time.perf_counter()
    trajs = engine.run(questions)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(sum(t.from_policy) for t in trajs)

    t0 = time.perf_counter()
    base_resp, base_tokens = search_r1_style(model, tok, retriever, questions, cfg)
    base_s = time.perf_counter() - t0

    same = sum(t.response_ids() == r for t, r in zip(trajs, base_resp))
    rows = [("ours (KV reuse, stop on tag)", ours_s, ours_tokens), ("Search-R1-style loop", base_s, base_tokens)]
    print(f"{len(questions)} questions, greedy, max {cfg.max_new_tokens} new tokens per turn, "
          f"{cfg.max_turns} searches max, {torch.get_num_threads()} threads")
    print(f"{'loop':32s} {'seconds':>9s} {'tokens':>8s} {'tokens/s':>9s} {'questions/s':>12s}")
    for name, s, n in rows:
        print(f"{name:32s} {s:9.2f} {n:8d} {n / s:9.1f} {len(questions) / s:12.2f}")
    tok_ratio = (ours_tokens / ours_s) / (base_tokens / base_s)
    q_ratio = base_s / ours_s
    print(f"identical trajectories: {same}/{len(questions)}")
    print(f"ratio tokens/s {tok_ratio:.2f}x, questions/s {q_ratio:.2f}x")
    print(target_line("rollout_speedup", q_ratio, ">=", 3))


if __name__ == "__main__":
    main()
