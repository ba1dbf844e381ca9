"""Search-E1 killed at each stage and resumed: `sdsearch train algorithm=search_e1` is SIGKILLed (no handler runs,
as in a crash) at a point of its pipeline (`SDSEARCH_E1_KILL_AT`, algorithms/search_e1.py), then started again with
trainer.resume=true. The module promises that a crash loses at most a batch of the pool and that a resumed run
continues where it stopped: the finished stages are not run again (their files untouched), a pool is completed
from its file (a last line the crash cut is dropped), an OPSD round that did not finish starts over, and the run
ends with the files and weights of one that was never stopped (compared with a module-wide uninterrupted run).

Kill points, in turn in one run: `pool` (after the first of the pool's two batches; the crash also cut the next
line in half), `pairs` (pool complete, mining.json written), `opsd` (after OPSD step 1 of 3), `merge` (the round's
merged weights written, the round not yet recorded as done).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_sdsearch.algorithms.search_e1 import KILL_ENV

# One cycle: a GRPO round of 1 step, a pool of 10 questions x 2 (two batches of the pool's 8 questions), 3 OPSD
# steps with a dev evaluation after each (8 dev questions). The embedded model answers some questions, so pairs
# are mined; seed 3 and opsd_lr 5e-3 make the adapter of step 2 beat the start on dev EM (checked below), so the
# merged weights are the trained adapter's, not the round's start weights.
E1 = {"algorithm": "search_e1", "search_e1.cycles": 1, "model.threads": 1, "trainer.seed": 3, "trainer.questions_per_step": 2,
      "rollout.group_size": 2, "rollout.max_new_tokens": 40, "rollout.max_turns": 2, "trainer.eval_every": 0,
      "trainer.save_every": 1, "trainer.final_test_eval": False, "grpo.micro_batch_size": 2,
      "search_e1.grpo_steps": 1, "search_e1.pool_questions": 10, "search_e1.pool_samples": 2,
      "search_e1.opsd_steps": 3, "search_e1.opsd_pairs_per_step": 2, "search_e1.opsd_micro_batch_size": 2,
      "search_e1.opsd_eval_every": 1, "search_e1.opsd_lr": 5e-3, "data.dev_questions": 8,
      "trainer.eval_batch_size": 4}
POOL_BATCH = 8  # build_pool_sharded's batch_questions


def _e1_command(out: Path, kill: str | None = None, resume: bool = False) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    env.pop(KILL_ENV, None)
    if kill is not None:
        env[KILL_ENV] = kill
    args = [f"{k}={v}" for k, v in {**E1, "trainer.out_dir": str(out), "trainer.resume": resume}.items()]
    return [sys.executable, "-m", "nemo_sdsearch.cli", "train", *args], env


def _e1(out: Path, kill: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
    cmd, env = _e1_command(out, kill, resume)
    return subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                          check=False)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _state(out: Path) -> dict:
    return json.loads((out / "search_e1_state.json").read_text())


def _end_state(out: Path) -> dict:
    """What a run ends with, in terms that do not depend on its directory or its timings."""
    from safetensors.torch import load_file

    state = json.loads((out / "search_e1_state.json").read_text().replace(str(out), "<run>"))
    for rd in state["rounds"]:
        rd.get("mining", {}).pop("pool_seconds", None)
    pool = _jsonl(out / "cycle_0" / "pool" / "pool.jsonl")
    for row in pool:
        for t in row["rollouts"]:
            t.pop("retrieval_s")  # wall-clock
    mining = json.loads((out / "cycle_0" / "pool" / "mining.json").read_text())
    mining.pop("pool_seconds")
    grpo = [{k: v for k, v in r.items() if not k.startswith(("timing", "perf/"))}
            for r in _jsonl(out / "cycle_0" / "grpo" / "metrics.jsonl")]
    return {"state": state, "pool": pool, "mining": mining, "grpo_metrics": json.dumps(grpo, sort_keys=True),
            "opsd_metrics": (out / "cycle_0" / "opsd" / "opsd_metrics.jsonl").read_text(),
            "merged": load_file(out / "cycle_0" / "opsd" / "merged" / "model.safetensors")}


def _files(path: Path) -> dict[str, tuple[int, bytes]]:
    """The file `path`, or every file under the folder `path`: (mtime_ns, contents) by path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started in the background (one thread: it runs beside the test's own starts, on the
    other core); calling the fixture's value waits for it and gives (run dir, end state)."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("e1_straight") / "run"
    log = out.parent / "straight.log"
    cmd, env = _e1_command(out)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)

    def finished():
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
        end = _end_state(out)
        opsd = end["state"]["rounds"][-1]
        assert end["mining"]["pairs"] > 0 and opsd["stage"] == "opsd" and opsd["best_step"] > 0, opsd
        grpo_final = load_file(out / "cycle_0" / "grpo" / "final" / "model.safetensors")
        assert any(not torch.equal(grpo_final[k], end["merged"][k]) for k in grpo_final)  # the OPSD round changed them
        return out, end

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(1200)
def test_search_e1_killed_at_every_stage_resumes_to_the_end_of_an_uninterrupted_run(reference, tmp_path):
    """One run killed four times, at each stage in turn (each start but the first resumes the one before), then
    resumed to its end."""
    out = tmp_path / "run"
    pool_file, opsd_dir = out / "cycle_0" / "pool" / "pool.jsonl", out / "cycle_0" / "opsd"
    finished, before, outputs = [], [], []
    for i, stage in enumerate(["pool", "pairs", "opsd", "merge", None]):
        p = _e1(out, kill=stage, resume=i > 0)
        outputs.append(p.stdout)
        assert p.returncode == (0 if stage is None else -signal.SIGKILL), f"killed at {stage}:\n{p.stdout[-4000:]}"
        # the stages finished before this start were not run again: their files are as they were
        assert [_files(f) for f in finished] == before, f"a finished stage was run again (start {i}, {stage})"
        if stage is None:
            break
        # where the crash left the run: the GRPO round recorded as done, nothing after it
        assert _state(out)["done"] == ["0/grpo"], stage
        if stage == "pool":  # the first batch of the pool on disk, and half of the next line: the crash cut it
            lines = pool_file.read_text().splitlines(keepends=True)
            assert len(lines) == POOL_BATCH and not (out / "cycle_0" / "pool" / "mining.json").exists()
            with open(pool_file, "a") as f:   # the next question's line, cut (its form: any line of the pool)
                f.write(lines[0][:len(lines[0]) // 2])
            finished = [out / "cycle_0" / "grpo"]
        elif stage == "pairs":  # the pool completed from its whole lines, the cut one dropped (with a warning)
            assert pool_file.read_text().startswith("".join(lines)) and "cut by a crash" in p.stdout, p.stdout[-4000:]
            assert len(pool_file.read_text().splitlines()) == E1["search_e1.pool_questions"]
            assert (out / "cycle_0" / "pool" / "mining.json").exists() and not opsd_dir.exists()
            finished = [out / "cycle_0" / "grpo", pool_file]
        elif stage == "opsd":
            assert [r["step"] for r in _jsonl(opsd_dir / "opsd_metrics.jsonl")] == [1]
            assert not (opsd_dir / "merged" / "model.safetensors").exists()
        elif stage == "merge":  # the round ran to its end and was merged: it starts over all the same
            assert [r["step"] for r in _jsonl(opsd_dir / "opsd_metrics.jsonl")] == [1, 2, 3]
            assert (opsd_dir / "merged" / "model.safetensors").exists()
        before = [_files(f) for f in finished]
    # the run ends as the one that was never stopped: pool, pairs, OPSD losses and dev EMs (each step once), the
    # merged weights bit for bit, the state
    end = _end_state(out)
    _, ref = reference()
    assert end["pool"] == ref["pool"]
    assert end["mining"] == ref["mining"]
    assert end["grpo_metrics"] == ref["grpo_metrics"]
    assert end["opsd_metrics"] == ref["opsd_metrics"]
    assert end["state"] == ref["state"]
    assert end["merged"].keys() == ref["merged"].keys()
    assert all(torch.equal(end["merged"][k], ref["merged"][k]) for k in ref["merged"])
