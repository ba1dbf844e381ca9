"""Logs and metrics a cluster user can read: `sdsearch train ... > log 2>&1` (a real subprocess whose stdout
is a file) writes one plain line per step and per evaluation; metrics.jsonl, TensorBoard, an offline W&B run
and an MLflow file store hold exactly the metric names the README's Metrics section documents, with the
same values; a missing optional backend is refused before any model is loaded, naming the install command."""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_sdsearch.config import ConfigError, load_config
from nemo_sdsearch.logger import ConsoleLogger, check_backends, scalars
from scripted import Replica, ScriptedTurns

STEPS = 2
README = Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL = [b for b in ("wandb", "mlflow") if importlib.util.find_spec(b) is not None]  # installed extras


def documented_keys() -> list[str]:
    """The first column of the README's Metrics table."""
    text = README.read_text()
    section = text[text.index("\n## Metrics\n"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


@pytest.fixture(scope="module")
def logged_run(micro_model_dir, tmp_path_factory):
    """`sdsearch train logger.backends=[console,tensorboard,<wandb>,<mlflow>] > log 2>&1`: 2 steps, a dev
    evaluation after step 2, test EM of the start and final weights; W&B offline under tmp, MLflow's
    default file store in out_dir/mlruns."""
    root = tmp_path_factory.mktemp("logging")
    out, log = root / "run", root / "train.log"
    backends = ",".join(["console", "tensorboard", *OPTIONAL])
    overrides = {
        "model.path": str(micro_model_dir[0]), "model.threads": 1, "trainer.steps": STEPS,
        "trainer.questions_per_step": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 12,
        "rollout.max_turns": 1, "rollout.max_context": 512, "trainer.eval_every": STEPS, "trainer.save_every": 0,
        "trainer.final_test_eval": True, "data.dev_questions": 3, "data.test_questions": 3,
        "trainer.out_dir": str(out), "grpo.micro_batch_size": 2, "logger.backends": f"[{backends}]",
    }
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb_dir"), "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for k in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    script = Path(sys.executable).parent / "sdsearch"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "nemo_sdsearch.cli"]
    with open(log, "w") as f:
        proc = subprocess.run([*cmd, "train", *(f"{k}={v}" for k, v in overrides.items())], stdout=f,
                              stderr=subprocess.STDOUT, env=env, cwd=root, timeout=600, check=False)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"root": root, "out": out, "log": text, "rows": rows,
            "summary": json.loads((out / "summary.json").read_text())}


TEST_KEYS = ("val/test_em", "val/test_first_query_hit", "val/test_evidence_hit_per_search", "val/test_evidence_recall")
QUERY_RATES = ("first_query_hit", "evidence_hit_per_search", "evidence_recall")


def val_test_metrics(result: dict) -> dict:
    """The val/test_* metrics of a start_test / end_test record of summary.json."""
    return {"val/test_em": result["all"]["em"], **{f"val/test_{k}": result["all"][k] for k in QUERY_RATES}}


def expected_scalars(run) -> dict[int, dict[str, float]]:
    """What every scalar backend must hold: each row's finite numbers, and the test metrics at 0 and STEPS."""
    want = {r["step"]: scalars(r) for r in run["rows"]}
    want[0] = scalars(val_test_metrics(run["summary"]["start_test"]))
    want[STEPS].update(scalars(val_test_metrics(run["summary"]["end_test"])))
    return want


def assert_same_scalars(got: dict[int, dict[str, float]], want: dict[int, dict[str, float]], backend: str):
    assert sorted(got) == sorted(want), backend
    for step in want:
        assert sorted(got[step]) == sorted(want[step]), (backend, step)
        for k, v in want[step].items():
            assert math.isclose(got[step][k], v, rel_tol=1e-6, abs_tol=1e-9), (backend, step, k, got[step][k], v)


def test_a_log_file_gets_one_line_per_step_and_per_evaluation(logged_run):
    lines = logged_run["log"].splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)]
    for line, row in zip(steps, logged_run["rows"]):
        assert f"critic/score/mean={row['critic/score/mean']:.4g}" in line and "timing_s/step=" in line
    evals = [line.split()[2:] for line in lines if line.startswith("eval step ")]
    assert [e[0] for e in evals] == [f"0/{STEPS}", f"{STEPS}/{STEPS}", f"{STEPS}/{STEPS}"]
    assert evals[0][1].startswith("val/test_em=") and evals[1][1].startswith("val/dev_em=")
    assert evals[2][1].startswith("val/test_em=")


def test_metrics_jsonl_keys_are_the_documented_ones(logged_run):
    """Every key a row holds is in the README's table and every documented key is logged somewhere; no value
    is logged under two names."""
    documented = documented_keys()
    assert len(documented) == len(set(documented))
    rows = logged_run["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    logged = {k for r in rows for k in r} | set(TEST_KEYS)
    assert logged == set(documented), (sorted(logged - set(documented)), sorted(set(documented) - logged))
    assert "val/dev_em" in rows[-1] and "val/dev_em" not in rows[0]
    evals = logged_run["summary"]["evals"]
    dev = {k: rows[-1][k] for k in ("val/dev_em", "val/dev_f1", *(f"val/dev_{q}" for q in QUERY_RATES))}
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # (NaN equals NaN)
    assert same(evals, [{"step": 0, **val_test_metrics(logged_run["summary"]["start_test"])},
                        {"step": STEPS, **dev}, {"step": STEPS, **val_test_metrics(logged_run["summary"]["end_test"])}])
    for r in rows:   # the rollout figures hold together
        assert r["response_length/min"] <= r["response_length/mean"] <= r["response_length/max"]
        assert r["critic/advantages/min"] <= r["critic/advantages/max"]
        for k in ("critic/score/mean", "env/finish_ratio", "env/ratio_of_valid_action", "response_length/clip_ratio",
                  "env/first_query_hit", "env/evidence_recall"):
            assert 0.0 <= r[k] <= 1.0, k
        assert 0.0 <= r["timing_s/retrieval"] <= r["timing_s/gen"] <= r["timing_s/step"]


def test_tensorboard_holds_the_same_names_and_values(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run["out"] / "tensorboard"))
    acc.Reload()
    got: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            got.setdefault(e.step, {})[tag] = e.value
    assert_same_scalars(got, expected_scalars(logged_run), "tensorboard")  # (float32: within rel 1e-6)


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`): LevelDB log blocks of 32 KiB after a 7-byte
    header, each record's data a `wandb_internal_pb2.Record` (W&B's own protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, data = 7, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:               # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        data += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):         # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(data)
            yield record
            data = b""


@pytest.mark.skipif("wandb" not in OPTIONAL, reason="wandb is an optional extra ('.[wandb]')")
def test_wandb_offline_run_holds_the_same_names_and_values(logged_run):
    files = glob.glob(str(logged_run["root"] / "wandb_dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    got: dict[int, dict[str, float]] = {}
    config, project = {}, None
    for r in wandb_records(Path(files[0])):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            step = item.pop("_step")
            got.setdefault(step, {}).update({k: v for k, v in item.items() if not k.startswith("_")})
        elif kind == "run":
            project = r.run.project
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    assert project == "nemo_sdsearch"
    assert config["rollout"]["group_size"] == 2 and config["logger"]["backends"][-1] in OPTIONAL
    assert_same_scalars(got, expected_scalars(logged_run), "wandb")


@pytest.mark.skipif("mlflow" not in OPTIONAL, reason="mlflow is an optional extra ('.[mlflow]')")
def test_mlflow_file_store_holds_the_same_names_and_values(logged_run, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(logged_run["out"] / "mlruns").as_uri())
    exp = client.get_experiment_by_name("nemo_sdsearch")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == str(logged_run["out"])
    assert run.data.params["rollout.group_size"] == "2"
    got: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            got.setdefault(m.step, {})[key] = m.value
    assert_same_scalars(got, expected_scalars(logged_run), "mlflow")


def test_console_lines_off_a_terminal_and_the_bar_on_one():
    from rich.console import Console

    row = {"step": 1, "critic/score/mean": 0.25, "sd/jsd": float("nan"), "actor/update_skipped": False,
           "timing_s/step": 1.5, "env/number_of_valid_search": 1.0}
    plain = Console(file=io.StringIO(), force_terminal=False, width=30)
    log = ConsoleLogger(plain, total_steps=3, description="grpo", live=True)
    log.start()
    log.log(1, row)
    log.log_eval(1, {"val/dev_em": 0.5, "val/dev_f1": 0.625})
    log.close()
    lines = plain.file.getvalue().splitlines()
    assert len(lines) == 2                                   # one each, never wrapped at the console width
    assert lines[0].startswith("step 1/3 critic/score/mean=0.25 env/number_of_valid_search=1 timing_s/step=1.5")
    assert "sd/jsd" not in lines[0]                           # NaN is not shown
    assert lines[1] == "eval step 1/3 val/dev_em=0.5 val/dev_f1=0.625"
    tty = Console(file=io.StringIO(), force_terminal=True, width=120)
    log = ConsoleLogger(tty, total_steps=3, description="grpo", live=True)
    log.start()
    log.log(1, row)
    log.close()
    assert "step 1/3" not in tty.file.getvalue() and "score 0.25" in tty.file.getvalue()


def test_scalars_keep_finite_numbers_and_booleans():
    got = scalars({"step": 3, "a": 1, "b": float("nan"), "c": True, "d": float("inf"), "e": 0.5, "f": "x"})
    assert got == {"a": 1, "c": 1.0, "e": 0.5}


def test_a_missing_backend_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    from nemo_sdsearch.algorithms import grpo, setup

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    for backend in ("wandb", "mlflow"):
        with pytest.raises(ConfigError, match=re.escape(f"pip install -c constraints.txt -e '.[{backend}]'")):
            check_backends(["console", backend])
    monkeypatch.setattr(setup, "build_components", lambda cfg: pytest.fail("a model was loaded"))
    monkeypatch.setattr(grpo, "build_components", lambda cfg: pytest.fail("a model was loaded"))
    cfg = load_config("tiny_cpu", ["logger.backends=[console,wandb]", f"trainer.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"logger\.backends: wandb is not installed"):
        grpo.train(cfg, progress=False)


@pytest.mark.parametrize("override, key", [("logger.backends=[console,prometheus]", "logger.backends"),
                                           ("logger.wandb_mode=sometimes", "logger.wandb_mode")])
def test_logger_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"config key {key}")):
        load_config("tiny_cpu", [override])


class _SlowRetriever:
    """Sleeps `delay` seconds per call, whatever the number of queries."""

    def __init__(self, delay):
        self.delay, self.calls = delay, []

    def search(self, queries, topk=3):
        import time

        from nemo_sdsearch.retrieval import Document

        self.calls.append(len(queries))
        time.sleep(self.delay)
        return [[Document(id="d", contents="\"T\"\nsome text")] for _ in queries]


def test_rollout_figures_from_the_engine(char_tokenizer):
    """Per rollout, the engine counts invalid turns and turns cut by the token budget, and splits each
    batched retriever call's time over the rows it served; `rollout_metrics` turns them into the env/* and
    response_length/* figures, the same for one process and for two replicas holding half the groups each."""
    import torch

    from nemo_sdsearch.algorithms.grpo import rollout_metrics
    from nemo_sdsearch.core.qa import QA
    from nemo_sdsearch.losses.policy import group_advantages
    from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine

    long_turn = "<think>" + "x" * 80
    turns = {0: ["<search> a </search>", "<answer> yes </answer>"],       # search, answer (right)
             1: ["no tag here", "<answer> no </answer>"],                  # invalid, answer (wrong)
             2: ["<search> b </search>", long_turn, long_turn],          # search, cut, final cut
             3: ["<search> c </search>", "<search> d </search>", "<answer> yes </answer>"]}
    retriever = _SlowRetriever(0.05)
    engine = RolloutEngine(ScriptedTurns(char_tokenizer, lambda row, question: turns[row]), retriever,
                           RolloutConfig(max_turns=2, max_new_tokens=40, max_context=4000))
    trajs = engine.run([QA("q1", "Q1?", ["yes"]), QA("q2", "Q2?", ["yes"])], n_samples=2)
    assert [t.invalid_actions for t in trajs] == [0, 1, 2, 0]
    assert [t.truncated_turns for t in trajs] == [0, 0, 2, 0]
    assert [t.finish_reason for t in trajs] == ["answer", "answer", "no_answer", "answer"]
    assert retriever.calls == [3, 1]                     # rows 0, 2, 3 searched together, then row 3
    share = [t.retrieval_s for t in trajs]
    assert share[1] == 0.0 and share[0] == share[2] and share[3] > share[0] >= 0.05 / 3
    assert sum(share) == pytest.approx(engine.stats.retrieval_s, rel=1e-9)
    adv = group_advantages(torch.tensor([t.exact_match for t in trajs]), 2, eps=1e-6)
    one, resp, total = rollout_metrics(Replica(0, 1), trajs, adv)
    n_pol = torch.tensor([sum(t.policy_mask()) for t in trajs], dtype=torch.float64)
    assert one["critic/score/mean"] == 0.5 and one["env/finish_ratio"] == 0.75
    assert one["env/number_of_valid_search"] == 1.0 and one["env/number_of_actions/mean"] == 2.5
    assert one["env/ratio_of_valid_action"] == pytest.approx((1 + 0.5 + 1 / 3 + 1) / 4)
    assert one["response_length/clip_ratio"] == 0.25
    lengths = [t.num_sampled_tokens for t in trajs]
    assert (one["response_length/max"], one["response_length/min"]) == (max(lengths), min(lengths))
    assert one["response_length/mean"] == sum(lengths) / 4 and resp == sum(lengths)
    assert one["critic/advantages/mean"] == pytest.approx(float((adv.double() * n_pol).sum() / n_pol.sum()))
    assert (one["critic/advantages/max"], one["critic/advantages/min"]) == (float(adv.max()), float(adv.min()))
    assert total == sum(len(t.token_ids) for t in trajs)
    # two replicas, one question group each: the same figures
    second = Replica(1, 2)
    rollout_metrics(second, trajs[2:], adv[2:])
    two, resp2, total2 = rollout_metrics(Replica(0, 2, others=second.sent), trajs[:2], adv[:2])
    assert two.keys() == one.keys() and (resp2, total2) == (resp, total)
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-12), k
