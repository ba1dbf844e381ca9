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


SOURCE_KEY = "val/test_score/<data_source>"   # the README's row for Search-R1's per-source validation scores


def documented_name(key: str) -> str:
    """The README row a logged key belongs to (`val/test_score/nq` -> `val/test_score/<data_source>`)."""
    return SOURCE_KEY if key.startswith("val/test_score/") else key


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
    logged = {documented_name(k) for r in rows for k in r} | set(TEST_KEYS)
    assert logged == set(documented), (sorted(logged - set(documented)), sorted(set(documented) - logged))
    assert "val/dev_em" in rows[-1] and "val/dev_em" not in rows[0]
    # the bundled world's dev questions have no data_source: verl's "unknown", one source, so the dev EM
    assert rows[-1]["val/test_score/unknown"] == rows[-1]["val/dev_em"]
    assert [k for k in rows[-1] if k.startswith("val/test_score/")] == ["val/test_score/unknown"]
    evals = logged_run["summary"]["evals"]
    dev = {k: rows[-1][k] for k in ("val/dev_em", "val/dev_f1", *(f"val/dev_{q}" for q in QUERY_RATES),
                                    "val/test_score/unknown")}
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # (NaN equals NaN)
    assert same(evals, [{"step": 0, **val_test_metrics(logged_run["summary"]["start_test"])},
                        {"step": STEPS, **dev}, {"step": STEPS, **val_test_metrics(logged_run["summary"]["end_test"])}])
    for r in rows:   # the rollout figures hold together
        assert r["response_length/min"] <= r["response_length/mean"] <= r["response_length/max"]
        assert 0 < r["prompt_length/min"] <= r["prompt_length/mean"] <= r["prompt_length/max"] <= 512 - 12
        assert 0.0 <= r["prompt_length/clip_ratio"] <= 1.0
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
        self.delay, self.calls, self.elapsed = delay, [], 0.0

    def search(self, queries, topk=3):
        import time

        from nemo_sdsearch.retrieval import Document

        t0 = time.perf_counter()
        self.calls.append(len(queries))
        time.sleep(self.delay)
        self.elapsed += time.perf_counter() - t0
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
    trajs = engine.run([QA("q1", "Q1?", ["yes"]), QA("q2", "The second question?", ["yes"])], n_samples=2)
    assert [t.invalid_actions for t in trajs] == [0, 1, 2, 0]
    assert [t.truncated_turns for t in trajs] == [0, 0, 2, 0]
    assert [t.finish_reason for t in trajs] == ["answer", "answer", "no_answer", "answer"]
    assert retriever.calls == [3, 1]                     # rows 0, 2, 3 searched together, then row 3
    share = [t.retrieval_s for t in trajs]
    assert share[1] == 0.0 and share[0] == share[2] and share[3] > share[0] >= 0.05 / 3
    # the shares add up to the time the calls took (the engine's clock around each call: a little more)
    assert retriever.elapsed <= sum(share) <= retriever.elapsed + 0.01
    adv = group_advantages(torch.tensor([t.exact_match for t in trajs]), 2, eps=1e-6)
    prompts = [t.prompt_length for t in trajs]   # (question 2's prompt is 17 characters longer)
    assert prompts[0] == prompts[1] == prompts[2] - 17 == prompts[3] - 17
    room = prompts[2]                            # the longer prompts fill the room: half the rollouts
    one, resp, total = rollout_metrics(Replica(0, 1), trajs, adv, prompt_room=room)
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
    assert one["prompt_length/mean"] == sum(prompts) / 4
    assert (one["prompt_length/max"], one["prompt_length/min"]) == (max(prompts), min(prompts))
    assert one["prompt_length/clip_ratio"] == 0.5
    assert rollout_metrics(Replica(0, 1), trajs, adv, prompt_room=room + 1)[0]["prompt_length/clip_ratio"] == 0.0
    # two replicas, one question group each: the same figures
    second = Replica(1, 2)
    rollout_metrics(second, trajs[2:], adv[2:], prompt_room=room)
    two, resp2, total2 = rollout_metrics(Replica(0, 2, others=second.sent), trajs[:2], adv[:2], prompt_room=room)
    assert two.keys() == one.keys() and (resp2, total2) == (resp, total)
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-12), k


def test_validation_scores_per_data_source_as_search_r1_logs_them(char_tokenizer):
    """The dev evaluation of the recipe (`sharded_greedy_em(..., by_source=True)` -> `eval_metrics`) adds
    Search-R1 / verl's `val/test_score/<data_source>`: the mean reward (EM) of each source's questions (a
    question without a source is verl's "unknown"); the same figures from one process and from two replicas
    holding every other question each."""
    from nemo_sdsearch.algorithms.grpo import eval_metrics
    from nemo_sdsearch.algorithms.setup import sharded_greedy_em
    from nemo_sdsearch.core.qa import QA
    from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine

    # every rollout answers "yes": right where the gold answer is "yes"
    gold = [("nq", "yes"), ("hotpotqa", "no"), ("nq", "no"), ("hotpotqa", "no"), ("hotpotqa", "yes"), (None, "yes")]
    questions = [QA(f"q{i}", f"Question {i}?", [g], {"data_source": s} if s else {}) for i, (s, g) in enumerate(gold)]
    engine = RolloutEngine(ScriptedTurns(char_tokenizer, lambda row, q: ["<answer> yes </answer>"]), None,
                           RolloutConfig(max_turns=1, max_new_tokens=40, max_context=4000, temperature=0.0))
    one = eval_metrics("dev", sharded_greedy_em(Replica(0, 1), engine, questions, 4, by_source=True))
    assert one["val/dev_em"] == pytest.approx(3 / 6)
    scores = {k: v for k, v in one.items() if k.startswith("val/test_score/")}
    assert scores == pytest.approx({"val/test_score/nq": 1 / 2, "val/test_score/hotpotqa": 1 / 3,
                                    "val/test_score/unknown": 1.0})
    second = Replica(1, 2)
    sharded_greedy_em(second, engine, questions, 4, by_source=True)
    two = eval_metrics("dev", sharded_greedy_em(Replica(0, 2, others=second.sent), engine, questions, 4,
                                                by_source=True))
    assert two == pytest.approx(one)
    # the final test evaluation (and Search-E1's, the ablation's) is not split by source
    plain = eval_metrics("test", sharded_greedy_em(Replica(0, 1), engine, questions, 4))
    assert plain == {"val/test_em": pytest.approx(0.5)}


def _mlflow_runs(out: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    exp = client.get_experiment_by_name("nemo_sdsearch")
    return client, client.search_runs([exp.experiment_id])


def _mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.skipif(OPTIONAL != ["wandb", "mlflow"], reason="needs both optional extras ('.[wandb]', '.[mlflow]')")
def test_a_resumed_run_logs_into_the_same_wandb_and_mlflow_runs(micro_model_dir, tmp_path, monkeypatch):
    """`sdsearch train` for one step (checkpointed), then the same run resumed to two steps (what a requeued
    SLURM job does): the checkpoint stores the W&B and MLflow run ids and the resumed run logs into those runs;
    MLflow's file store ends with ONE run holding steps 1 and 2 (FINISHED), W&B's offline folders hold one run
    id with step 1 in the first attempt and step 2 in the second. A fresh run opens new ones."""
    import torch
    from rich.console import Console

    from nemo_sdsearch.algorithms import grpo
    from nemo_sdsearch.logger import build_loggers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    for k in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    base = [f"model.path={micro_model_dir[0]}", "model.threads=1", "trainer.questions_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=12", "rollout.max_turns=1", "rollout.max_context=512",
            "trainer.eval_every=0", "trainer.save_every=1", "trainer.final_test_eval=false",
            "grpo.micro_batch_size=2", f"trainer.out_dir={out}", "logger.backends=[wandb,mlflow]"]
    first = io.StringIO()
    grpo.train(load_config("tiny_cpu", [*base, "trainer.steps=1"]), Console(file=first), progress=False)
    client, (run,) = _mlflow_runs(out)
    stored = torch.load(out / "checkpoints" / "step_000001" / "state.pt", weights_only=False)["logger_runs"]
    assert stored["mlflow"] == run.info.run_id and set(stored) == {"wandb", "mlflow"}
    assert "logging into the same runs" not in first.getvalue()

    second = io.StringIO()
    grpo.train(load_config("tiny_cpu", [*base, "trainer.steps=2", "trainer.resume=true"]), Console(file=second),
               progress=False)
    assert "resumed from step 1" in second.getvalue()
    assert f"logging into the same runs: wandb {stored['wandb']}, mlflow {stored['mlflow']}" in second.getvalue()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    client, runs = _mlflow_runs(out)
    assert [r.info.run_id for r in runs] == [stored["mlflow"]]            # one MLflow run
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.resume"] == "False"                   # the first attempt's parameters stay
    for key in ("critic/score/mean", "response_length/mean", "prompt_length/mean"):
        assert _mlflow_history(client, run.info.run_id, key) == [(r["step"], pytest.approx(r[key])) for r in rows]
    # W&B (offline): one folder per attempt, one run id, step 1 then step 2
    folders = sorted(glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*")))
    assert len(folders) == 2, folders
    steps = []
    for folder in folders:
        (log,) = glob.glob(f"{folder}/run-*.wandb")
        records = list(wandb_records(Path(log)))
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {stored["wandb"]}
        steps.append(sorted(json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
                            for i in r.history.item if (i.key or "/".join(i.nested_key)) == "_step"))
    assert steps == [[1], [2]]
    # a fresh run (no stored ids: trainer.overwrite=true, or no checkpoint yet) opens a new MLflow run
    cfg = load_config("tiny_cpu", base)
    with build_loggers(cfg, out, Console(file=io.StringIO())) as fresh:
        new = fresh.run_ids()
    assert set(new) == {"wandb", "mlflow"} and new["mlflow"] != stored["mlflow"] and new["wandb"] != stored["wandb"]
    assert len(_mlflow_runs(out)[1]) == 2


@pytest.mark.skipif("mlflow" not in OPTIONAL, reason="mlflow is an optional extra ('.[mlflow]')")
def test_a_run_stopped_for_a_requeue_ends_its_mlflow_run_as_preempted(tmp_path, monkeypatch):
    """A preemption (`Preempted` leaving the loggers' block) ends the MLflow run KILLED, an error FAILED; the
    resumed run reopens it RUNNING and finishes it."""
    from rich.console import Console

    from nemo_sdsearch.errors import Preempted
    from nemo_sdsearch.logger import build_loggers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny_cpu", ["logger.backends=[mlflow]", f"trainer.out_dir={tmp_path}"])
    console = Console(file=io.StringIO())
    with pytest.raises(Preempted):
        with build_loggers(cfg, tmp_path, console) as loggers:
            loggers.log(1, {"step": 1, "critic/score/mean": 0.25})
            raise Preempted(1)
    ids = loggers.run_ids()
    client, (run,) = _mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"
    resumed = build_loggers(cfg, tmp_path, console, start_step=1, run_ids=ids)
    assert resumed.run_ids() == ids and client.get_run(ids["mlflow"]).info.status == "RUNNING"
    with pytest.raises(RuntimeError):
        with resumed:
            resumed.log(2, {"step": 2, "critic/score/mean": 0.5})
            raise RuntimeError("a crash")
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"
    with build_loggers(cfg, tmp_path, console, start_step=2, run_ids=ids) as again:
        again.log(3, {"step": 3, "critic/score/mean": 0.75})
    (run,) = _mlflow_runs(tmp_path)[1]
    assert run.info.status == "FINISHED"
    assert _mlflow_history(client, run.info.run_id, "critic/score/mean") == [(1, 0.25), (2, 0.5), (3, 0.75)]
