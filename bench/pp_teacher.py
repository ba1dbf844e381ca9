"""The pipeline bubble of SD-Search's teacher pass at PP 2 (2 real processes, gloo): one update of `n` micro-batches
through `MegatronActor.train_on`, timed without a teacher term, with the teacher pass one micro-batch per schedule
(`megatron.teacher_window=1`, the layout before windows), and with all of them in one window.

    python bench/pp_teacher.py [--micro 8] [--rows 4] [--length 192] [--repeats 3]
    python bench/pp_teacher.py --smoke

Per schedule of m micro-batches, each stage idles (pp - 1) / (m + pp - 1) of it: 1/2 with a schedule per
micro-batch at PP 2, 1/(n+1) with one window. The teacher pass is a forward-only pass over every micro-batch,
about a third of a training forward + backward, so with no bubble the step with the teacher costs ~1.33x the
step without. Prints the three step times, the ratios, and TARGET lines: the windowed teacher step within 1.6x
the step without a teacher, and at least 1.2x faster than a schedule per micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
MARK = "PP_TEACHER "


def worker(args) -> None:
    """Under torchrun (2 ranks): build the same model on both stages, time train_on per mode, rank 0 prints."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.models.base import SequenceBatch, TeacherPass
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel
    from nemo_sdsearch.world.model_config import qwen2_config

    torch.set_num_threads(1)
    init_parallel(1, pp=2)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(qwen2_config(args.size, 2048, eos_token_id=0, pad_token_id=1))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, 2048, (args.length,), generator=g).tolist() for _ in range(args.micro * args.rows)]

    class MB:
        def __init__(self, k, actor, teacher):
            rows = seqs[k * args.rows:(k + 1) * args.rows]
            self.batch = SequenceBatch.from_lists(rows, pad_id=1)
            n = len(rows[0])
            self.rows = torch.arange(len(rows)).repeat_interleave(n - 1)
            self.cols = torch.arange(1, n).repeat(len(rows))
            make = lambda rows=rows: SequenceBatch.from_lists([[7] * 16 + r for r in rows], pad_id=1)  # a longer prompt
            self.teacher_logits = TeacherPass(actor, make, self.rows, self.cols + 16) if teacher else None

    def loss_fn(logits, mb):
        loss = -torch.log_softmax(logits, -1).max(-1).values.mean()
        t = mb.teacher_logits() if callable(mb.teacher_logits) else mb.teacher_logits
        return loss if t is None else loss + ((logits - t) ** 2).mean() * 1e-3

    times = {}
    for mode, window, teacher in (("no teacher", args.micro, False), ("window 1", 1, True),
                                  (f"window {args.micro}", args.micro, True)):
        actor = MegatronActor.from_hf(hf, lr=1e-5, teacher_window=window)
        runs = []
        for r in range(args.repeats + 1):          # the first is a warm-up
            mbs = [MB(k, actor, teacher) for k in range(args.micro)]
            torch.distributed.barrier()
            t0 = time.perf_counter()
            actor.train_on(mbs, loss_fn)
            torch.distributed.barrier()
            if r:
                runs.append(time.perf_counter() - t0)
        times[mode] = statistics.median(runs)
    if torch.distributed.get_rank() == 0:
        print(MARK + json.dumps(times), flush=True)
    teardown_parallel()


def report(times: dict, micro: int) -> list[str]:
    base, one, win = times["no teacher"], times["window 1"], times[f"window {micro}"]
    lines = [f"{'mode':14s} {'step s':>8s} {'/ no teacher':>13s}"]
    lines += [f"{k:14s} {v:8.3f} {v / base:13.2f}" for k, v in times.items()]
    lines.append(f"bubble per schedule at PP 2: window 1: 1/2; window {micro}: 1/{micro + 1}")
    lines.append(f"TARGET pp2_teacher_step_over_no_teacher value={win / base:.2f} goal=<=1.6 "
                 f"met={'yes' if win / base <= 1.6 else 'no'}")
    lines.append(f"TARGET pp2_teacher_window_speedup value={one / win:.2f} goal=>=1.2 "
                 f"met={'yes' if one / win >= 1.2 else 'no'}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--micro", type=int, default=8, help="micro-batches per update")
    p.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--length", type=int, default=192, help="tokens per sequence")
    p.add_argument("--size", default="tiny", help="model size (world/model_config.py): micro | tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="seconds: the micro model, 4 micro-batches of 2 x 24 tokens")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.micro, args.rows, args.length, args.size, args.repeats = 4, 2, 24, "micro", 1
    if args.worker:
        worker(args)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), "--worker", "--micro", str(args.micro), "--rows", str(args.rows),
           "--length", str(args.length), "--size", args.size, "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(MARK)), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"PP 2 update of {args.micro} micro-batches x {args.rows} x {args.length} tokens ({args.size} model), "
          f"median of {args.repeats}")
    print("\n".join(report(json.loads(line[len(MARK):]), args.micro)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
