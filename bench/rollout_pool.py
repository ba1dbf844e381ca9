"""Rollouts through the torch generator's row pool: time and KV memory against the number of concurrent rows.

Runs the same rollouts (the embedded model, sampled, `--samples` per question) with the pool unbounded (one
KV slot per rollout, the old behaviour) and with bounded pools, and prints per setting the seconds, the
generated tokens per second and the most KV memory the session held. Each row has its own random
stream, so every setting samples the same trajectories as the first one (`same`), up to a rare token
whose uniform falls within float rounding of a CDF boundary (batched matmuls round by batch shape).

    python bench/rollout_pool.py [--questions 64] [--samples 8] [--pools 0 256 64 16] [--max-new-tokens 64]
    python bench/rollout_pool.py --smoke

TARGET lines: every pool samples the same trajectories (at least 95% identical), and the smallest bounded pool's KV
peak is at most half the unbounded one's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# bench/retrieval.py must not shadow the `retrieval` package: drop this folder from the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine  # noqa: E402
from nemo_sdsearch.rollout.torch_generator import TorchGenerator  # noqa: E402


class PeakKV:
    """A TorchGenerator whose sessions report their KV peak here."""

    def __init__(self, gen: TorchGenerator):
        self.gen, self.tokenizer, self.peak = gen, gen.tokenizer, 0

    def open(self, prompts, seed=None, row_seeds=None):
        s = self.gen.open(prompts, seed, row_seeds)
        close = s.close

        def closing():
            close()
            self.peak = max(self.peak, s.kv_peak_bytes)

        s.close = closing
        return s


def main():
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.world.assets import default_datasets, default_model_dir
    from nemo_sdsearch.retrieval import BM25Retriever

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--pools", type=int, nargs="+", default=[0, 256, 64, 16], help="0: unbounded")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="4 questions x 2 samples, pools unbounded and 2: the bench runs")
    args = ap.parse_args()
    if args.smoke:
        args.questions, args.samples, args.pools, args.max_new_tokens, args.threads = 4, 2, [0, 2], 16, 1
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model or default_model_dir(), device="cpu")
    questions, corpus = default_datasets("test")
    questions = questions[:args.questions]
    retriever = BM25Retriever(corpus)
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, max_context=2048)
    RolloutEngine(TorchGenerator(model, tok), retriever, cfg).run(questions[:2])  # warm-up

    rows = len(questions) * args.samples
    print(f"{rows} rollouts ({len(questions)} questions x {args.samples}), sampled, max {cfg.max_new_tokens} new "
          f"tokens per turn, {torch.get_num_threads()} threads")
    print(f"{'pool':>10s} {'seconds':>9s} {'tokens':>8s} {'tokens/s':>9s} {'KV peak MiB':>12s} {'same':>6s}")
    first, peaks, agree = None, {}, []
    for pool in args.pools:
        gen = PeakKV(TorchGenerator(model, tok, max_concurrent_rows=pool))
        t0 = time.perf_counter()
        trajs = RolloutEngine(gen, retriever, cfg).run(questions, n_samples=args.samples, seed=1)
        s = time.perf_counter() - t0
        ids = [t.token_ids for t in trajs]
        first = first or ids
        n = sum(sum(t.from_policy) for t in trajs)
        same = sum(a == b for a, b in zip(ids, first))
        print(f"{pool or 'unbounded':>10} {s:9.2f} {n:8d} {n / s:9.1f} {gen.peak / 2 ** 20:12.2f} {same:>3d}/{rows}")
        peaks[pool] = gen.peak
        agree.append(same / rows)
    from nemo_sdsearch.core.targets import target_line

    # the same trajectories whatever the pool (up to a rare CDF-boundary token), and a bounded pool's KV peak a
    # fraction of the unbounded one's
    print(target_line("pools_same_trajectories", min(agree), ">=", 0.95))
    bounded = [p for p in args.pools if p]
    if 0 in peaks and bounded and peaks[0]:
        print(target_line("smallest_pool_kv_peak_over_unbounded", peaks[min(bounded)] / peaks[0], "<=", 0.5))


if __name__ == "__main__":
    main()
