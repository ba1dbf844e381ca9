"""`sdsearch train actor=megatron` under a REAL `torchrun` (gloo, CPU) against the same run with actor=hf in
one process: same seeds, same start weights, the same GLOBAL batch (4 questions x 3 rollouts).

Layouts: TP2 x DP2 and PP2 x DP2 (4 processes), TP2 x PP2 (4 processes); plain TP1 x DP2 is the two-node
SLURM test's layout (tests/test_slurm.py) and adds nothing here that TP2 x DP2 does not exercise. A
data-parallel replica takes every dp-th question group of the shared batch; its leader generates with a
random stream per (question, sample) so a row draws the same numbers whichever replica runs it; losses
are normalised by the whole batch's counts. So step 1 (identical start weights) has identical rollouts
and its loss-side metrics (k3 KL, JSD, agreement, clip fraction, entropy, from vocab-sharded logits at
tp=2) agree to float noise; step 2 rolls out with the refitted generator (weights equal up to float
noise), and the exported HF models agree at the end. At pp=2 the update runs through megatron's own 1F1B
schedule. A resumed run (dist checkpoint + rank-0 loop state) that offloads the training state around
generation reproduces the straight run's last step bit-exactly. The embedded model is used: it searches, so
query tokens (JSD) exist. The padded vocabulary (2048 -> 2400 with make_vocab_size_divisible_by=600) puts TP
padding columns on rank 1.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

# Two steps: step 1 from identical weights, step 2 from the refitted generator (weights equal to float noise).
# A third step has been seen to flip one sampled token on the PP2xDP2 and DP2 layouts (the weights then
# differ by ~1e-5 after 4 Adam steps, and one temperature-1 draw landed on a CDF boundary): rollouts can only
# be compared token for token while the weights are equal to float noise.
STEPS = 2
LOSS_KEYS = ("sd/jsd", "sd/agreement", "actor/kl_loss", "actor/pg_loss", "actor/pg_clipfrac", "actor/entropy",
             "actor/loss", "actor/grad_norm", "actor/pg_logit_grad_norm", "sd/logit_grad_norm")
# counts over identical rollouts: equal; ROLLOUT_SUMS add fractions, in another order over replicas
ROLLOUT_KEYS = ("critic/score/mean", "critic/advantages/max", "critic/advantages/min", "response_length/mean",
                "response_length/max", "response_length/min", "response_length/clip_ratio",
                "env/number_of_actions/mean", "env/number_of_valid_search", "env/finish_ratio", "sd/query_tokens",
                "env/first_query_hit", "env/evidence_hit_per_search", "env/evidence_recall")
ROLLOUT_SUMS = ("critic/advantages/mean", "env/ratio_of_valid_action")
TIMING = ("timing_s/", "timing_per_token_ms/", "perf/")  # wall-clock metrics: never equal across runs


def overrides(out_dir, steps=STEPS, **extra):
    base = {
        "model.threads": 1, "trainer.steps": steps, "trainer.seed": 3, "trainer.questions_per_step": 4,
        "rollout.group_size": 3, "rollout.max_new_tokens": 40, "rollout.max_turns": 2,
        "trainer.eval_every": 0, "trainer.save_every": 1, "trainer.final_test_eval": False,
        "trainer.out_dir": str(out_dir), "grpo.micro_batch_size": 2, "grpo.mini_batches": 2, "optim.lr": 1e-4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


TP2 = {"actor": "megatron", "megatron.tensor_parallel": 2, "megatron.make_vocab_size_divisible_by": 600}
PP2 = {"actor": "megatron", "megatron.pipeline_parallel": 2}
LAYOUTS = {
    "tp2dp2": TP2,                  # TP2 x DP2: the vocab-sharded losses, two replicas of two ranks
    "pp2dp2": PP2,                  # PP2 x DP2: megatron's 1F1B schedule (tied embeddings: the last stage's copy)
    "tp2pp2": {**TP2, **PP2},       # TP2 x PP2 x DP1: the vocab-sharded losses on the last stage's TP group
}
NPROC = {"tp2dp2": 4, "pp2dp2": 4, "tp2pp2": 4}
OFFLOAD = {"offload.optimizer": True, "offload.grads": True, "offload.reference": "cpu"}
RESUMED = "pp2dp2"    # the layout whose last step is taken again from its checkpoint, with offload on


def torchrun(args: list[str], timeout: float = 600, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC sdsearch train ARGS` in a subprocess."""
    bindir = Path(sys.executable).parent
    script = bindir / "sdsearch"
    entry = [str(script)] if script.exists() else ["-m", "nemo_sdsearch.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *entry, "train",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(out_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def weights(out_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(out_dir) / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nemo_sdsearch.algorithms.grpo import train
    from nemo_sdsearch.config import load_config

    root = tmp_path_factory.mktemp("mtrain")
    hf = train(load_config("tiny_cpu", overrides(root / "hf")), progress=False)
    procs = {name: torchrun(overrides(root / name, **layout), nproc=NPROC[name]) for name, layout in LAYOUTS.items()}
    return root, hf, procs


@pytest.fixture(scope="module")
def resumed(runs):
    """PP2 x DP2 resumed from the straight run's next-to-last checkpoint, with Adam's moments, the gradients and
    the reference parked in host memory while the engines generate (offload.*): the run dir."""
    root, _, _ = runs
    src, dst = root / RESUMED, root / f"{RESUMED}_resume_offload"
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    (dst / "checkpoints" / "latest").write_text(f"step_{STEPS - 1:06d}")
    torchrun(overrides(dst, **LAYOUTS[RESUMED], **OFFLOAD, **{"trainer.resume": True}), nproc=NPROC[RESUMED])
    return dst


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_megatron_tracks_hf(runs, name):
    """Every layout against actor=hf on the same global batch: rollouts identical (step 1 from identical
    weights: token for token, so rewards, searches and query tokens are equal), loss-side metrics and the
    final weights within float noise."""
    root, hf, procs = runs
    proc = procs[name]
    mg = metrics(root / name)
    assert [r["step"] for r in mg] == list(range(1, STEPS + 1))   # rank 0 alone wrote metrics.jsonl
    assert [r["step"] for r in hf["history"]] == [r["step"] for r in mg]
    h1 = hf["history"][0]
    assert h1["sd/query_tokens"] > 0 and h1["actor/kl_loss"] > 0   # the JSD and KL terms are exercised
    for step in range(STEPS):                                      # same weights (to noise) -> same trajectories
        for k in ROLLOUT_KEYS:
            assert mg[step][k] == hf["history"][step][k], (step + 1, k)
        for k in ROLLOUT_SUMS:
            assert math.isclose(mg[step][k], hf["history"][step][k], rel_tol=1e-12, abs_tol=1e-15), (step + 1, k)
    worst = {}
    for step, rtol in ((0, 5e-5), (1, 1e-4), (2, 1e-4))[:STEPS]:
        h, m = hf["history"][step], mg[step]
        for k in LOSS_KEYS:
            if math.isnan(h[k]):                                   # sd/*: a batch without query tokens
                assert math.isnan(m[k]), (step + 1, k)
                continue
            worst[(step + 1, k)] = rel(m[k], h[k])
            assert math.isclose(m[k], h[k], rel_tol=rtol, abs_tol=1e-7), (step + 1, k, m[k], h[k])
    print(name, "worst relative metric difference", max(worst.values()))
    # the exported HF weights (streamed from the actor, written by rank 0)
    wh, wm = weights(root / "hf"), weights(root / name)
    assert wh.keys() == wm.keys()
    # AdamW divides by sqrt(v): float noise in a near-zero gradient becomes an lr-sized (1e-4) step on that
    # element, so the max elementwise difference is a few 1e-5 after 4 optimizer steps (the norm check
    # below is the meaningful one)
    max_abs = max((wh[k] - wm[k]).abs().max().item() for k in wh)
    print(name, "final weights max abs difference", max_abs)
    assert max_abs < 5e-5
    from safetensors.torch import load_file

    from nemo_sdsearch.world.assets import default_model_dir

    w0 = load_file(default_model_dir() / "model.safetensors")
    moved = sum(((wh[k] - w0[k]) ** 2).sum() for k in wh).sqrt()
    diff = sum(((wh[k] - wm[k]) ** 2).sum() for k in wh).sqrt()
    print(name, "final weights: distance / distance moved", float(diff / moved))
    assert moved > 1e-3 and diff < 1e-3 * moved
    # only rank 0 printed the summary and wrote the results
    assert proc.stdout.count("wrote ") == 1
    assert (root / name / "curves.png").exists() and (root / name / "summary.json").exists()
    assert sorted(p.name for p in (root / name / "checkpoints").iterdir() if p.name.startswith("megatron_")) == \
        [f"megatron_step_{s:06d}" for s in range(1, STEPS + 1)]


def test_megatron_resume_with_offload_continues_bit_exactly(runs, resumed):
    """The straight PP2 x DP2 run's last step taken again from its next-to-last checkpoint (dist checkpoint + rank-0
    loop state) by a run that parks Adam's moments, the gradients and the reference in host memory while the engines
    generate (the checkpoint saved with the state brought back): the same step, bit for bit, and the same final
    weights. Offload changes nothing but the memory held; resuming loses nothing."""
    root, _, _ = runs
    straight, again = metrics(root / RESUMED), metrics(resumed)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    strip = lambda r: json.dumps({k: v for k, v in r.items()   # NaN equals NaN
                                  if not k.startswith(TIMING) and k != "memory/trainer_gib"})
    assert strip(again[-1]) == strip(straight[-1])
    ws, wr = weights(root / RESUMED), weights(resumed)
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_offload_holds_only_the_weights_during_generation(runs, resumed):
    """What rank 0 (pipeline stage 0) held during generation (memory/trainer_gib, measured from the live tensors)
    is the estimate's resident training-state rows (layout.py, the same config), with and without offload: with
    it, only the weights stay."""
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.layout import GIB, RESIDENT, TRAINER_STATE, memory_estimate

    root, _, _ = runs
    plain, off = metrics(root / RESUMED)[-1], metrics(resumed)[-1]   # the last step: Adam's moments exist
    tiny = ["arch.hidden_size=256", "arch.num_layers=4", "arch.num_attention_heads=8", "arch.num_kv_heads=4",
            "arch.ffn_hidden_size=704", "arch.vocab_size=2048"]   # the embedded model (its config.json)

    def resident(extra):
        cfg = load_config("tiny_cpu", overrides(root / "x", **LAYOUTS[RESUMED], **extra) + tiny)
        est = memory_estimate(cfg, world=NPROC[RESUMED])
        return sum(r.gib for r in est.components if r.phase == RESIDENT and r.component in TRAINER_STATE)

    # the estimate counts the largest stage (the last: it also holds the final norm): within 0.1% of stage 0
    assert plain["memory/trainer_gib"] == pytest.approx(resident({}), rel=5e-3)
    assert off["memory/trainer_gib"] == pytest.approx(resident(OFFLOAD), rel=5e-3)
    assert off["memory/trainer_gib"] < plain["memory/trainer_gib"] / 3
    print("trainer GiB held in generation: plain", plain["memory/trainer_gib"], "offload",
          off["memory/trainer_gib"], "of", GIB)


# --------------------------------------------------------------------------------------------------
# the metric helpers on vocabulary shards (2 real processes, gloo WORLD group)
# --------------------------------------------------------------------------------------------------
def _metrics_worker(rank, world, cases):
    from nemo_sdsearch.losses.vocab_parallel import shard_logits, vocab_parallel_argmax, vocab_parallel_entropy

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = []
        for full, vocab in cases:
            shard = shard_logits(full, rank, world)
            out.append((vocab_parallel_argmax(shard, vocab_size=vocab), vocab_parallel_entropy(shard, vocab_size=vocab),
                        vocab_parallel_entropy(shard, vocab_size=vocab, temperature=0.7, chunk_rows=2)))
        return out
    finally:
        torch.distributed.destroy_process_group()


def test_vocab_parallel_argmax_and_entropy_match_dense():
    """Padding columns (huge logits there must be ignored), a rank holding no real column, ties across
    shards (the first global index wins, as torch.argmax), fp64 and fp32."""
    from _mp import run_workers

    g = torch.Generator().manual_seed(0)
    cases = []
    for vocab, v_pad, dtype in ((7, 10, torch.float64), (3, 8, torch.float32)):   # (3, 8): rank 1 has none
        full = torch.randn(5, v_pad, generator=g, dtype=dtype) * 3
        full[:, vocab:] = 1e4                      # padding: must never win nor enter the softmax
        full[0, :vocab] = 1.0                      # all tied
        if vocab > v_pad // 2:
            full[1, v_pad // 2] = full[1, 0] = 50.0  # a tie across the two shards
        cases.append((full, vocab))
    results = run_workers(_metrics_worker, 2, cases, timeout=120)
    for (full, vocab), per_case in zip(cases, zip(*results)):
        (a0, e0, t0), (a1, e1, t1) = per_case
        x = full[:, :vocab]
        assert torch.equal(a0, x.argmax(-1)) and torch.equal(a1, a0)
        for temp, e in ((1.0, e0), (0.7, t0)):
            lsm = torch.log_softmax(x / temp, -1)
            ref = -(lsm.exp() * lsm).sum(-1)
            tol = 1e-12 if full.dtype == torch.float64 else 1e-5
            assert e.dtype == full.dtype and (e - ref).abs().max().item() <= tol
        assert torch.equal(e0, e1) and torch.equal(t0, t1)


def test_megatron_without_torchrun_fails_clearly(tmp_path, capsys, monkeypatch):
    from nemo_sdsearch.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    args = ["train", "actor=megatron", "megatron.tensor_parallel=2", f"trainer.out_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "megatron.tensor_parallel" in err and "torchrun --nproc-per-node 2" in err
    # launched by torchrun, but with a number of processes that tp does not divide
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "megatron.tensor_parallel" in err and "3 processes" in err
