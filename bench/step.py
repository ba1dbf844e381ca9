"""One SD-Search step against a GRPO step on the same rollout batch, and where the step's time goes, side by side.

The rollouts are generated once; each update then starts from the same weights and optimizer state. The
SD-Search update adds the hindsight blocks, the teacher pass (the same weights, no grad, only up to the last
query token) and the JSD at query positions. The step is split into: generation; reference (and old, with
more than one mini-batch) log-probs; the teacher pass; forward + backward; the optimizer (clip + AdamW). The
forward + backward is compared with what this machine's matmuls attain at the model's shapes, measured in
the same run: achieved GFLOP/s (the model's forward + backward FLOPs over the measured time) against the best
of the matmuls (micro-batch tokens x hidden times hidden x {q/k/v/o, MLP, LM head} widths, fp32, the same
threads).

Target: the SD-Search step at most 1.10x the GRPO step on the same rollouts.

    python bench/step.py [--model DIR] [--questions 8] [--group 5] [--repeats 2]
    python bench/step.py --smoke     # the suite's run: that the bench works, not a measurement
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
from nemo_sdsearch.core.targets import target_line  # noqa: E402

PHASES = ("ref/old log-probs", "teacher", "forward+backward", "optimizer")


def matmul_gflops(m: int, shapes: list[tuple[int, int]], seconds: float = 0.3) -> float:
    """The best fp32 GFLOP/s of (m x k) @ (k x n) over `shapes`, each timed for about `seconds`."""
    best = 0.0
    for k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def model_flops(cfg, tokens: int, attn_pairs: int, head_rows: int) -> float:
    """Forward + backward FLOPs (3x the forward's): the decoder's linear layers on every token, attention scores
    and values over `attn_pairs` (query, key) pairs per layer, the LM head on `head_rows` rows."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    linear = L * (d * d * 2 + 2 * d * kv + 3 * d * f)  # q, o; k, v; gate, up, down
    forward = 2 * linear * tokens + L * 4 * d * attn_pairs + 2 * d * cfg.vocab_size * head_rows
    return 3 * forward


def main():
    from nemo_sdsearch.algorithms import grpo, sd_search
    from nemo_sdsearch.algorithms.setup import build_components, make_prompt_format
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.losses.policy import group_advantages
    from nemo_sdsearch.models.hf import HFActor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--group", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="the suite's check that the bench runs: 2 questions x 2, "
                    "one repeat, one thread (the printed ratio is not a measurement)")
    args = ap.parse_args()
    if args.smoke:
        args.questions, args.group, args.repeats, args.threads = 2, 2, 1, 1
    overrides = [f"rollout.group_size={args.group}", f"trainer.questions_per_step={args.questions}",
                 f"model.threads={args.threads}"] + ([f"model.path={args.model}"] if args.model else [])
    cfg = load_config("tiny_cpu", overrides)
    c = build_components(cfg)
    actor, ref, tok, data, engines = c.actor, c.ref, c.tok, c.data, c.engines
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    prompts = make_prompt_format(cfg, tok)
    questions = data["train"][:args.questions]
    t0 = time.perf_counter()
    trajs = engines["train"].run(questions, n_samples=args.group, seed=1)
    gen_s = time.perf_counter() - t0
    adv = group_advantages([t.exact_match for t in trajs], args.group)
    weights = copy.deepcopy(actor.model.state_dict())
    shapes = {}  # the micro-batches' padded shapes, for the FLOP count

    def timed_update(algorithm: str) -> dict:
        actor.model.load_state_dict(weights)
        fresh = HFActor(actor.model, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip)
        took = dict.fromkeys(PHASES, 0.0)
        step = fresh.optimizer.step

        def timed_step(*a, **k):  # the optimizer's share of train_step (the clip is measured with it below)
            t = time.perf_counter()
            out = step(*a, **k)
            took["optimizer"] += time.perf_counter() - t
            return out

        fresh.optimizer.step = timed_step
        make = grpo.policy_micro_batches

        def timed_micro_batches(*a, **k):  # ref/old log-probs (the teacher pass runs later, when the loss asks)
            t = time.perf_counter()
            out = make(*a, **k)
            took["ref/old log-probs"] += time.perf_counter() - t
            for mbs in out:
                for mb in mbs:
                    shapes.setdefault(algorithm, []).append((tuple(mb.batch.input_ids.shape), int(mb.rows.numel())))
            return out

        grpo.policy_micro_batches = timed_micro_batches
        try:
            t0 = time.perf_counter()
            teacher = None
            if algorithm == "sd_search":
                blocks = sd_search.rollout_hindsight_blocks(trajs, args.group, cfg.sd, lambda s: len(encode(s)))
                teacher = sd_search.teacher_sequences(trajs, blocks, lambda q, b: encode(prompts.teacher(q, b)))
            m, _ = grpo.update_policy(fresh, ref, trajs, adv, teacher, cfg, tok.pad_token_id)
            total = time.perf_counter() - t0
        finally:
            grpo.policy_micro_batches = make
        took["teacher"] = m["teacher_s"]
        took["forward+backward"] = total - took["ref/old log-probs"] - took["teacher"] - took["optimizer"]
        took["update"] = total
        return took

    runs = {"grpo": [], "sd_search": []}
    for _ in range(args.repeats):
        for algo in ("grpo", "sd_search"):
            runs[algo].append(timed_update(algo))
    best = {a: min(r, key=lambda x: x["update"]) for a, r in runs.items()}
    n_q = sum(sum(t.query_mask()) for t in trajs)
    n_p = sum(sum(t.policy_mask()) for t in trajs)
    print(f"{len(trajs)} rollouts ({args.questions} questions x {args.group}), {n_p} policy tokens, "
          f"{n_q} query tokens, {torch.get_num_threads()} threads")
    print(f"{'':12s} {'generation s':>13s} {'update s':>9s} {'step s':>8s}")
    for name, algo in (("GRPO", "grpo"), ("SD-Search", "sd_search")):
        u = best[algo]["update"]
        print(f"{name:12s} {gen_s:13.2f} {u:9.2f} {gen_s + u:8.2f}")
    print(f"\nwhere the step goes (seconds; share of the step){'':4s}")
    print(f"{'phase':20s} {'GRPO':>14s} {'SD-Search':>14s}")
    rows = [("generation", gen_s, gen_s)] + [(p, best["grpo"][p], best["sd_search"][p]) for p in PHASES]
    for name, g, s in rows:
        print(f"{name:20s} {g:7.2f} ({g / (gen_s + best['grpo']['update']):4.0%}) "
              f"{s:7.2f} ({s / (gen_s + best['sd_search']['update']):4.0%})")
    # forward + backward against the matmuls' ceiling at the model's shapes (the GRPO update: no teacher)
    mcfg = actor.model.config
    tokens = sum(b * t for (b, t), _ in shapes["grpo"]) // args.repeats
    pairs = sum(b * t * (t + 1) // 2 for (b, t), _ in shapes["grpo"]) // args.repeats
    head = sum(n for _, n in shapes["grpo"]) // args.repeats
    flops = model_flops(mcfg, tokens, pairs, head)
    m_tokens = max(b * t for (b, t), _ in shapes["grpo"])
    d, f, kv = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_key_value_heads * (mcfg.hidden_size //
                                                                                      mcfg.num_attention_heads)
    attainable = matmul_gflops(m_tokens, [(d, d), (d, kv), (d, f), (f, d), (d, mcfg.vocab_size)],
                               0.05 if args.smoke else 0.3)
    achieved = flops / best["grpo"]["forward+backward"] / 1e9
    print(f"\nthe GRPO update's forward+backward: {flops / 1e9:.1f} GFLOP in {best['grpo']['forward+backward']:.2f} s = "
          f"{achieved:.1f} GFLOP/s; this machine's fp32 matmuls at the model's shapes ({m_tokens} tokens per "
          f"micro-batch): {attainable:.1f} GFLOP/s; achieved / attainable {achieved / attainable:.2f}")
    step_ratio = (gen_s + best["sd_search"]["update"]) / (gen_s + best["grpo"]["update"])
    print(f"update-only ratio {best['sd_search']['update'] / best['grpo']['update']:.2f}x, "
          f"whole-step ratio {step_ratio:.2f}x")
    print(target_line("sd_step_vs_grpo_step", step_ratio, "<=", 1.10))
    print(target_line("fwd_bwd_vs_matmul_ceiling", achieved / attainable, ">=", 0.5))


if __name__ == "__main__":
    main()
