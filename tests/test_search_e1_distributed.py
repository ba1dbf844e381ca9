"""Search-E1 as a distributed recipe: `search_e1.run` with actor=megatron at TP 2 x DP 2 (4 gloo processes,
as torchrun starts them) against the single-process actor=hf run on the same seed, both with full-parameter
OPSD (`search_e1.adapter=full`: megatron has no LoRA). Same pool and pairs mined, OPSD losses and the final
weights within 1e-5 (Adam at lr 2e-5: float noise in a near-zero gradient moves a weight by up to lr); the ranks other than 0 run under a guard that fails on any file they write in the run
directory (open for writing, mkdir, rename/replace, unlink, rmtree)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

BASE = {"algorithm": "search_e1", "search_e1.adapter": "full", "search_e1.cycles": 1, "model.threads": 1, "trainer.seed": 3,
        "trainer.questions_per_step": 4, "rollout.group_size": 2, "rollout.max_new_tokens": 40,
        "rollout.max_turns": 2, "trainer.eval_every": 0, "trainer.save_every": 0, "trainer.final_test_eval": True,
        "grpo.micro_batch_size": 2, "optim.lr": 2e-5, "search_e1.grpo_steps": 1, "search_e1.pool_questions": 6,
        "search_e1.pool_samples": 3, "search_e1.opsd_steps": 2, "search_e1.opsd_pairs_per_step": 2,
        "search_e1.opsd_micro_batch_size": 1, "search_e1.opsd_eval_every": 2, "search_e1.opsd_lr": 2e-5,
        "data.dev_questions": 4, "data.test_questions": 4, "trainer.eval_batch_size": 4}
MEGATRON = {"actor": "megatron", "megatron.tensor_parallel": 2}


def _overrides(out, **extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**BASE, "trainer.out_dir": str(out), **extra}.items()]


def guard_writes(root: str) -> None:
    """Make every write under `root` from this process raise."""
    import builtins
    import io
    import shutil

    root = os.path.realpath(root)

    def inside(p) -> bool:
        try:
            return os.path.realpath(os.fspath(p)).startswith(root)
        except TypeError:
            return False

    real_open = builtins.open

    def guarded_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            raise PermissionError(f"rank {os.environ.get('RANK')} wrote {file}")
        return real_open(file, mode, *a, **k)

    builtins.open = io.open = guarded_open
    for mod, name in [(os, n) for n in ("mkdir", "makedirs", "replace", "rename", "remove", "unlink", "rmdir")] + \
                     [(shutil, "rmtree"), (shutil, "copy"), (shutil, "copytree"), (shutil, "move")]:
        real = getattr(mod, name)

        def guarded(*a, _real=real, _name=name, **k):
            if any(inside(x) for x in a[:2]):
                raise PermissionError(f"rank {os.environ.get('RANK')} called {_name}{a[:2]}")
            return _real(*a, **k)

        setattr(mod, name, guarded)


def _e1_worker(rank, world, out):
    if rank != 0:
        guard_writes(out)
    from nemo_sdsearch.algorithms import search_e1
    from nemo_sdsearch.config import load_config

    state = search_e1.run(load_config("tiny_cpu", _overrides(out, **MEGATRON)), progress=False)
    return {"rounds": state["rounds"], "final_test": state["final_test"]}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


@pytest.mark.timeout(1200)
def test_search_e1_tp2_dp2_reproduces_one_process(tmp_path):
    from _mp import run_workers
    from safetensors.torch import load_file

    from nemo_sdsearch.algorithms import search_e1
    from nemo_sdsearch.config import load_config

    hf_out, mg_out = tmp_path / "hf", tmp_path / "megatron"
    ref = search_e1.run(load_config("tiny_cpu", _overrides(hf_out)), progress=False)
    results = run_workers(_e1_worker, 4, str(mg_out), timeout=1200)
    # every rank ends with the same state (but for its own timings); rank 0's files tell the run
    for r in results:
        for rd in r["rounds"]:
            rd.get("mining", {}).pop("pool_seconds", None)
    same = lambda r: json.dumps(r, sort_keys=True)  # as text: NaN (a mean over no pairs) equals NaN
    assert all(same(r) == same(results[0]) for r in results), results
    # the same pool and the same pairs
    pool_hf, pool_mg = (_jsonl(d / "cycle_0" / "pool" / "pool.jsonl") for d in (hf_out, mg_out))
    assert [row["question_id"] for row in pool_hf] == [row["question_id"] for row in pool_mg]
    for a, b in zip(pool_hf, pool_mg):
        assert [t["token_ids"] for t in a["rollouts"]] == [t["token_ids"] for t in b["rollouts"]]
    mining_hf, mining_mg = (json.loads((d / "cycle_0" / "pool" / "mining.json").read_text()) for d in (hf_out, mg_out))
    strip = lambda d: {k: v for k, v in d.items() if k != "pool_seconds"}
    assert strip(mining_hf) == strip(mining_mg)
    assert ref["rounds"][-1]["stage"] == "opsd" and mining_hf["pairs"] > 0, mining_hf
    # OPSD losses and dev EMs, then the final (best) weights
    loss_hf, loss_mg = (_jsonl(d / "cycle_0" / "opsd" / "opsd_metrics.jsonl") for d in (hf_out, mg_out))
    assert [r["step"] for r in loss_hf] == [r["step"] for r in loss_mg] == [1, 2]
    for a, b in zip(loss_hf, loss_mg):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert a.get("dev_em") == b.get("dev_em")
    w_hf, w_mg = (load_file(d / "cycle_0" / "opsd" / "merged" / "model.safetensors") for d in (hf_out, mg_out))
    assert set(w_hf) == set(w_mg)
    worst = max(float((w_hf[k].double() - w_mg[k].double()).abs().max()) for k in w_hf)
    assert worst <= 1e-5, worst
    # ... while training moved them further than that (Adam at lr 2e-5: about 2e-5 per step)
    from nemo_sdsearch.world.assets import default_model_dir

    start = load_file(default_model_dir() / "model.safetensors")
    assert max(float((w_hf[k].double() - start[k].double()).abs().max()) for k in w_hf) > 1.5e-5
    assert results[0]["final_test"] == ref["final_test"]
