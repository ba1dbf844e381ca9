"""SD-Search step time against a GRPO-only step on the same rollout batch, side by side in one run.

The rollouts are generated once; each update then starts from the same weights and optimizer state.
The SD-Search update adds the hindsight blocks, the teacher pass (the same weights, no grad, only up to
the last query token) and the JSD at query positions. Step = generation + update; the target is on
the whole step, the update-only ratio is printed too.

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
from nemo_sdsearch.eval.targets import target_line  # noqa: E402


def main():
    from nemo_sdsearch.algorithms import sd_search
    from nemo_sdsearch.algorithms.grpo import update_policy
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

    def timed_update(algorithm: str) -> float:
        actor.model.load_state_dict(weights)
        fresh = HFActor(actor.model, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip)
        t0 = time.perf_counter()
        teacher = None
        if algorithm == "sd_search":
            blocks = sd_search.rollout_hindsight_blocks(trajs, args.group, cfg.sd, lambda s: len(encode(s)))
            teacher = sd_search.teacher_sequences(trajs, blocks, lambda q, b: encode(prompts.teacher(q, b)))
        update_policy(fresh, ref, trajs, adv, teacher, cfg, tok.pad_token_id)
        return time.perf_counter() - t0

    times = {"grpo": [], "sd_search": []}
    for _ in range(args.repeats):
        for algo in ("grpo", "sd_search"):
            times[algo].append(timed_update(algo))
    grpo_u, sd_u = min(times["grpo"]), min(times["sd_search"])
    n_q = sum(sum(t.query_mask()) for t in trajs)
    n_p = sum(sum(t.policy_mask()) for t in trajs)
    print(f"{len(trajs)} rollouts ({args.questions} questions x {args.group}), {n_p} policy tokens, "
          f"{n_q} query tokens, {torch.get_num_threads()} threads")
    print(f"{'':12s} {'generation s':>13s} {'update s':>9s} {'step s':>8s}")
    for name, u in (("GRPO", grpo_u), ("SD-Search", sd_u)):
        print(f"{name:12s} {gen_s:13.2f} {u:9.2f} {gen_s + u:8.2f}")
    step_ratio = (gen_s + sd_u) / (gen_s + grpo_u)
    print(f"update-only ratio {sd_u / grpo_u:.2f}x, whole-step ratio {step_ratio:.2f}x")
    print(target_line("sd_step_vs_grpo_step", step_ratio, "<=", 1.25))


if __name__ == "__main__":
    main()
