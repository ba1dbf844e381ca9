"""Data-parallel scaling as work counts: the same global batch at DP 1 and DP 2 (`sdsearch train
actor=megatron` under torchrun, TP 1), counting per rank what each one computes.

    python bench/scaling.py [--steps 2] [--questions 4]

Per rank: rollout tokens generated, tokens through the actor's forward (policy, old/reference log-probs
and teacher passes), and parameter elements stepped by the optimizer. Two CPU cores cannot show the
wall-clock speedup of more processes, so the target is on work: per-rank generation and forward work at
DP 2 is at most 0.55x of DP 1. (Optimizer work per rank only drops with the distributed optimizer, which
shards the optimizer state over DP on GPU; on CPU every replica steps its whole model shard.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# bench/retrieval.py must not shadow the `retrieval` package
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
MARK = "SCALING_COUNTS "


def worker(overrides: list[str]) -> None:
    """Under torchrun: run the recipe with counters on this rank's work, print every rank's counts (rank 0)."""
    import torch

    from nemo_sdsearch.algorithms import grpo
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.rollout.engine import RolloutEngine

    counts = {"generated_tokens": 0, "forward_tokens": 0, "optimizer_elements": 0, "rollouts": 0}
    hidden, run = MegatronActor._hidden, RolloutEngine.run

    def counted_hidden(self, batch):
        counts["forward_tokens"] += int(batch.attention_mask.sum())
        return hidden(self, batch)

    def counted_run(self, questions, *args, **kwargs):
        trajs = run(self, questions, *args, **kwargs)
        if kwargs.get("n_samples", 1) > 1:  # training rollouts (evaluation is off in this bench)
            counts["generated_tokens"] += sum(sum(t.from_policy) for t in trajs)
            counts["rollouts"] += len(trajs)
        return trajs

    MegatronActor._hidden, RolloutEngine.run = counted_hidden, counted_run
    step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        counts["optimizer_elements"] += sum(p.numel() for g in self.param_groups for p in g["params"] if p.grad is not None)
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = counted_step
    grpo.train(load_config("tiny_cpu", overrides), progress=False)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, counts)
    if torch.distributed.get_rank() == 0:
        print(MARK + json.dumps(everyone), flush=True)


def launch(nproc: int, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           __file__, "--worker", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"torchrun with {nproc} processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK):])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--questions", type=int, default=4, help="questions per step (the global batch)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="new tokens per turn")
    p.add_argument("--smoke", action="store_true", help="1 step of 2 questions, 16 new tokens a turn: the bench runs "
                                                        "end to end")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.questions, args.max_new_tokens = 1, 2, 16
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dp in (1, 2):
            overrides = ["actor=megatron", "model.threads=1", f"trainer.steps={args.steps}",
                         f"trainer.questions_per_step={args.questions}", "rollout.group_size=3",
                         f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.max_turns=2", "trainer.eval_every=0",
                         "trainer.save_every=0", "trainer.final_test_eval=false", "grpo.micro_batch_size=2",
                         f"trainer.out_dir={tmp}/dp{dp}"]
            results[dp] = launch(dp, overrides)
    keys = ("rollouts", "generated_tokens", "forward_tokens", "optimizer_elements")
    print(f"global batch {args.questions} questions x 3 rollouts, {args.steps} steps; counts per rank")
    print(f"{'':>22}" + "".join(f"{k:>20}" for k in keys))
    for dp, per_rank in results.items():
        for r, c in enumerate(per_rank):
            print(f"{f'DP {dp} rank {r}':>22}" + "".join(f"{c[k]:>20,}" for k in keys))
    ratio = {k: max(c[k] for c in results[2]) / max(1, results[1][0][k]) for k in keys}
    print(f"{'DP 2 / DP 1 (max rank)':>22}" + "".join(f"{ratio[k]:>20.3f}" for k in keys))
    total = {k: sum(c[k] for c in results[2]) / max(1, results[1][0][k]) for k in keys}
    print(f"{'DP 2 total / DP 1':>22}" + "".join(f"{total[k]:>20.3f}" for k in keys))
    for k in ("generated_tokens", "forward_tokens"):
        print(f"TARGET per_rank_{k}_dp2_over_dp1 value={ratio[k]:.3f} goal=<=0.55 met={'yes' if ratio[k] <= 0.55 else 'no'}")
    print(f"TARGET total_{'forward_tokens'}_dp2_over_dp1 value={total['forward_tokens']:.3f} goal=<=1.05 "
          f"met={'yes' if total['forward_tokens'] <= 1.05 else 'no'}")


if __name__ == "__main__":
    main()
