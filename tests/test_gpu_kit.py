"""The GPU verification kit (scripts/gpu_check.sh, docs/gpu.md) cannot rot between GPU draws: its dry run
(every check, on the CPU at tiny shapes, CUDA-only parts skipped with a reason) passes here, the wheels it
carries cover what the checks import, and the device command line in docs/gpu.md fits the device tool."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kit = _kit()
runner = importlib.import_module("gpu_kit.runner")  # on sys.path once gpu_check.py is loaded


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of every check (the expensive part of this module, ~125 CPU-seconds), shared by the tests
    below: (summary.json, its checks by name, the output folder)."""
    out = tmp_path_factory.mktemp("gpu_kit") / "out"
    p = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "run", "--dry-run", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return summary, {c["name"]: c for c in summary["checks"]}, out


@pytest.mark.slow
def test_dry_run_exercises_every_check(dry):
    summary, by_name, out = dry
    assert summary["mode"] == "dry"
    assert list(by_name) == list(kit.CHECKS)
    for name, c in by_name.items():
        assert c["status"] in ("pass", "warn"), (name, c)   # nothing failed, nothing ran out of time
    # what needs CUDA is skipped with a reason that says so
    assert any("GPU only" in s for s in by_name["train_megatron"]["skipped"])
    assert any("GPU only" in s for s in by_name["logits"]["skipped"])
    assert any("nvidia-smi" in s for s in by_name["env"]["skipped"])


@pytest.mark.slow
def test_dry_run_training_moves_the_policy_along_the_surrogate(dry):
    # the training checks ran 3 steps at lr 1e-6 and moved the fp32 master weights, and the first update moved the
    # policy the way the GRPO surrogate says, measured on its own rollouts (a group's rewards differed): the
    # rollouts with a positive advantage gained log-probability, those with a negative one lost it (a flipped
    # objective gives the opposite sign, about as large)
    _, by_name, out = dry
    gains = {}
    for actor in ("hf", "megatron"):
        f = by_name[f"train_{actor}"]["figures"]
        assert f["steps"] == 3 and f["lr"] == [1e-6] * 3 and f["master_dtypes"] == ["torch.float32"]
        assert f["moved_fraction"] > 0.5
        first = f["first_update"]
        assert first["adv_abs_sum"] > 0, "the first step's groups all scored alike: no policy gradient to check"
        assert first["surrogate_gain"] > 0, first
        gains[actor] = first["surrogate_gain"]
        assert (out / f"metrics_{actor}.jsonl").exists()
    # on the CPU both actors are fp32 and see the same rollouts: Megatron's first update is the hf one's
    assert gains["megatron"] == pytest.approx(gains["hf"], rel=1e-2)
    assert "tracking" in by_name["train_megatron"]["figures"]
    # what the GPU run builds and the CPU run does not (the bf16 frozen reference) builds here too
    assert not by_name["train_megatron"].get("predicted_gpu_failures"), by_name["train_megatron"]


@pytest.mark.slow
def test_dry_run_logits_memory_and_report(dry):
    summary, by_name, out = dry
    assert by_name["logits"]["figures"]["float32"]["max_abs_logit_diff"] <= 2e-3
    # the memory check ran the 0.5B-class run's path (the tiny model here) and printed layout.py's estimate per phase;
    # the measurement is the GPU's
    phases = by_name["memory"]["figures"]["phases"]
    assert set(phases) == {"generation", "training"} and all(p["estimate_gib"] > 0 for p in phases.values())
    assert all(p["reserved_gib"] is None for p in phases.values())
    assert any("GPU only" in s for s in by_name["memory"]["skipped"])
    assert summary["targets"] and all(t.startswith("TARGET ") for t in summary["targets"])
    report = (out / "report.txt").read_text()
    assert "# summary (dry run" in report and "[generator]" in report and "tokens/s" in report
    # what comes back from the device tool: at most 8 files, plain names
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f.name) for f in files)


def test_checks_start_after_what_they_depend_on(monkeypatch, tmp_path):
    """The scheduler of `run`: one job keeps the order given (the GPU run) but never starts a check before the
    one it depends on; several jobs start the longest chain (train_hf, then train_megatron) first."""
    started, lock = [], threading.Lock()

    def fake_run_check(name, mode, out, limit, env, emit):
        with lock:
            started.append(name)
        emit(f"ran {name}")
        time.sleep(0.01 if name.startswith("train_") else 0.05)
        return {"name": name, "status": "pass", "seconds": 0.0}

    monkeypatch.setattr(runner, "run_check", fake_run_check)
    log = runner.Report(tmp_path / "report.txt")
    names = ["env", "train_megatron", "logits", "train_hf"]
    res = runner.run_checks(names, "dry", tmp_path, {}, log, time.perf_counter() + 60, 60, 1)
    assert [r["name"] for r in res] == names
    assert started == ["env", "logits", "train_hf", "train_megatron"]  # train_megatron waited for train_hf
    started.clear()
    res = runner.run_checks(list(kit.CHECKS), "dry", tmp_path, {}, log, time.perf_counter() + 60, 60, 2)
    assert [r["name"] for r in res] == list(kit.CHECKS) and sorted(started) == sorted(kit.CHECKS)
    assert started[0] == "train_hf" and started.index("train_megatron") < started.index("env")


def test_every_dependency_is_on_the_machine_carried_or_left_behind_with_a_reason():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {kit.norm_name(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in deps}
    machine = {kit.norm_name(n) for n in kit.MACHINE_PACKAGES}
    carried = {kit.norm_name(n) for n, _, _ in kit.WHEELS}
    assert not (carried & machine)
    assert names - machine - carried - set(kit.LEFT_BEHIND) == set()
    # one version per carried distribution, inside the project's own bounds for megatron-core
    assert len(carried) == len(kit.WHEELS)
    assert dict((kit.norm_name(n), v) for n, v, _ in kit.WHEELS)["megatron-core"].startswith("0.16.")


def test_wheel_tags_for_cpython_312_manylinux_x86_64():
    ok = ["megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
          "omegaconf-2.3.1-py3-none-any.whl", "rapidfuzz-3.14.6-cp312-cp312-manylinux2014_x86_64.whl"]
    bad = ["megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl",
           "rapidfuzz-3.14.6-cp312-cp312-manylinux_2_28_aarch64.whl",
           "x-1.0-cp312-cp312-win_amd64.whl"]
    assert all(kit.fits_machine(kit.wheel_info(Path(n))) is None for n in ok)
    assert all(kit.fits_machine(kit.wheel_info(Path(n))) is not None for n in bad)


def test_gpu_doc_holds_the_device_command_and_the_wheel_folder_is_ignored():
    doc = (REPO / "docs" / "gpu.md").read_text()
    block = re.search(r"```device-run\n(.*?)\n```", doc, re.S)
    assert block, "docs/gpu.md must hold the device call in a ```device-run block"
    call = json.loads(block.group(1))
    assert len(call["command"]) < 2000 and "scripts/gpu_check.sh run" in call["command"]
    assert call["carry"] == [".gpu_wheels"] and call["timeout_s"] <= 600
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu_wheels/x.whl"], cwd=REPO)
    assert ignored.returncode == 0
    for name in kit.CHECKS:
        assert f"`{name}`" in doc


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_wrapper_passes_shellcheck():
    p = subprocess.run(["shellcheck", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_install_wheels_into_a_private_folder(tmp_path):
    """What `run` does first on the machine: the carried wheels into a folder that PYTHONPATH then names."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "kitprobe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("kitprobe/__init__.py", "VALUE = 42\n")
        z.writestr("kitprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: kitprobe\nVersion: 1.0\n")
        z.writestr("kitprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")
        z.writestr("kitprobe-1.0.dist-info/RECORD", "")
    site = tmp_path / "site"
    kit.install_wheels(wheels, site)
    p = subprocess.run([sys.executable, "-c", "import kitprobe; print(kitprobe.VALUE)"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert p.stdout.strip() == "42", p.stderr
    with pytest.raises(SystemExit, match="prepare"):
        kit.install_wheels(tmp_path / "nothing", site)


def test_gpu_mode_without_a_gpu_fails_cleanly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "run", "--no-install", "--only",
                        "env", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    (env,) = json.loads((out / "summary.json").read_text())["checks"]
    assert env["status"] == "fail" and "CUDA" in env["reason"]
