"""`sdsearch eval --run DIR`: evaluation under a trained run's rollout budgets and prompt format (its
config.json, written by `sdsearch train`), explicit flags overriding, and clear errors for a bad run dir.
(slurm/eval.sh, which passes RUN and only the overrides given, runs as a real job on the test SLURM cluster
against the real retrieval service in tests/test_slurm.py.)"""

import json
import shutil

import pytest

from nemo_sdsearch.cli import main

# Distinctive settings (none is eval's or the schema's default), so a value that comes back can only be the run's.
RUN_SETTINGS = {
    "rollout.max_new_tokens": 13, "rollout.max_context": 300, "rollout.max_turns": 1, "rollout.topk": 2,
    "rollout.max_concurrent_rows": 7, "reward.normalization": "unicode", "prompt.instruction": "search_r1",
    "prompt.chat_template": "none",
}


@pytest.fixture(scope="module")
def trained_run(micro_model_dir, tmp_path_factory):
    """A run directory made by a real (tiny) `sdsearch train`: config.json, final/."""
    out = tmp_path_factory.mktemp("run") / "sd"
    overrides = {
        "model.path": str(micro_model_dir[0]), "model.threads": 1, "trainer.steps": 1,
        "trainer.questions_per_step": 2, "rollout.group_size": 2, "trainer.eval_every": 0,
        "trainer.save_every": 0, "trainer.final_test_eval": False, "trainer.out_dir": str(out),
        "grpo.micro_batch_size": 2, **RUN_SETTINGS,
    }
    assert main(["train", *(f"{k}={v}" for k, v in overrides.items())]) == 0
    assert (out / "config.json").is_file() and (out / "final" / "config.json").is_file()
    return out


@pytest.fixture
def captured_engine(monkeypatch):
    """The rollout engine `sdsearch eval` builds (its RolloutConfig, generator and prompt function)."""
    from nemo_sdsearch.eval import harness

    seen = {}
    real = harness.evaluate

    def spy(engine, datasets, **kw):
        seen["engine"], seen["datasets"] = engine, datasets
        return real(engine, datasets, **kw)

    monkeypatch.setattr(harness, "evaluate", spy)
    return seen


def _eval(run, tmp_path, *flags):
    out = tmp_path / "ev"
    rc = main(["eval", "--run", str(run), "--limit", "2", "--quiet", "--threads", "1", "--out", str(out), *flags])
    return rc, out


def test_eval_takes_the_runs_budgets_and_prompt(trained_run, tmp_path, captured_engine, capsys):
    from transformers import AutoTokenizer

    from nemo_sdsearch.core.prompts import prompt_format

    rc, out = _eval(trained_run, tmp_path)
    assert rc == 0
    engine = captured_engine["engine"]
    c = engine.cfg
    assert (c.max_new_tokens, c.max_context, c.max_turns, c.topk, c.normalization, c.temperature) == \
        (13, 300, 1, 2, "unicode", 0.0)
    assert engine.generator.max_concurrent_rows == 7
    tok = AutoTokenizer.from_pretrained(str(trained_run / "final"))
    q = "Who founded the city?"
    assert engine.prompt_fn(q) == prompt_format(tok, "search_r1", "none").student(q)
    assert list(captured_engine["datasets"]) == ["tiny-world-test"]
    # results.json and results.md state every setting and where it came from
    settings = json.loads((out / "results.json").read_text())["settings"]
    for key, value in RUN_SETTINGS.items():
        name = {"reward.normalization": "normalization"}.get(key, key.split(".")[1])
        assert settings[name] == {"value": value, "from": f"run {key}"}, name
    assert settings["model"] == {"value": str(trained_run / "final"), "from": "run final/"}
    assert settings["retriever"] == {"value": "bm25", "from": "run rollout.retriever"}
    md = (out / "results.md").read_text()
    assert "| max_new_tokens | 13 | run rollout.max_new_tokens |" in md
    assert "| max_context | 300 | run rollout.max_context |" in md
    printed = " ".join(capsys.readouterr().out.split())
    assert "rollout budgets: max_new_tokens=13 (run rollout.max_new_tokens), max_context=300 (run " \
           "rollout.max_context)" in printed
    assert "sdsearch eval settings" in printed


def test_explicit_flags_override_the_run(trained_run, tmp_path, captured_engine):
    rc, out = _eval(trained_run, tmp_path, "--max-new-tokens", "9", "--em", "squad", "--instruction", "default",
                    "--max-concurrent-rows", "0", "--model", str(trained_run / "final"))
    assert rc == 0
    engine = captured_engine["engine"]
    assert (engine.cfg.max_new_tokens, engine.cfg.max_context, engine.cfg.normalization) == (9, 300, "squad")
    assert engine.generator.max_concurrent_rows is None
    assert engine.prompt_fn.__self__.instruction == "default" and engine.prompt_fn.__self__.chat is None
    s = json.loads((out / "results.json").read_text())["settings"]
    assert s["max_new_tokens"] == {"value": 9, "from": "--max-new-tokens"}
    assert s["normalization"] == {"value": "squad", "from": "--em"}
    assert s["instruction"] == {"value": "default", "from": "--instruction"}
    assert s["chat_template"] == {"value": "none", "from": "run prompt.chat_template"}
    assert s["max_context"] == {"value": 300, "from": "run rollout.max_context"}
    assert s["model"]["from"] == "--model"


def test_without_a_run_the_defaults_are_the_training_configs(tmp_path, micro_model_dir, captured_engine):
    """No --run: the schema defaults (96 new tokens, 1,024 context: what eval always used), marked default."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(micro_model_dir[0]), "--limit", "1", "--quiet", "--threads", "1",
                 "--out", str(out)]) == 0
    c = captured_engine["engine"].cfg
    assert (c.max_new_tokens, c.max_context, c.max_turns, c.topk, c.normalization) == (96, 1024, 4, 3, "squad")
    s = json.loads((out / "results.json").read_text())["settings"]
    assert s["max_new_tokens"] == {"value": 96, "from": "default"}
    assert s["instruction"] == {"value": "default", "from": "default"}


def test_the_7b_recipes_budgets_come_from_a_config_written_by_the_config_code(tmp_path, capsys):
    """A run dir whose config.json is the 7B recipe as `sdsearch train` writes it (load_config + to_dict):
    500 new tokens, 8,192 context, Search-R1's prompt, its http retriever and test files."""
    from nemo_sdsearch.config import load_config, to_dict
    from nemo_sdsearch.eval.run_config import budgets_line, load_run, resolve

    cfg = load_config("qwen25_7b_sd_search", ["cluster.retrieval_url=http://node7:8000"])
    run_dir = tmp_path / "run7b"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    run = load_run(run_dir)
    assert run.model is None and run.test_files == list(cfg.data.test_files)
    s = resolve({}, run)
    assert (s["max_new_tokens"].value, s["max_context"].value) == (cfg.rollout.max_new_tokens,
                                                                   cfg.rollout.max_context) == (500, 8192)
    assert s["max_new_tokens"].source == "run rollout.max_new_tokens"
    assert (s["instruction"].value, s["chat_template"].value) == ("search_r1", "auto")
    assert (s["retriever"].value, s["retrieval_url"].value) == ("http", "http://node7:8000")
    assert "max_new_tokens=500 (run rollout.max_new_tokens)" in budgets_line(s)
    # flags win, each recorded as such
    s = resolve({"max_new_tokens": 256, "retrieval_url": "http://other:9000/retrieve"}, run)
    assert (s["max_new_tokens"].value, s["max_new_tokens"].source) == (256, "--max-new-tokens")
    assert (s["retriever"].value, s["retriever"].source) == ("http", "--retrieval-url")
    assert s["retrieval_url"].value == "http://other:9000/retrieve"
    s = resolve({"retriever": "bm25"}, run)
    assert s["retriever"].value == "bm25" and s["retrieval_url"].value is None
    # the run has no final/ yet: eval says so (and how to go on) instead of evaluating another model
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--quiet"]) == 2
    assert "no trained model (final/ is written when" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["absent", "file", "no_config", "bad_json", "not_object", "hf_model_dir",
                                  "bad_value", "bad_choice", "missing_key", "no_final", "flag_conflict"])
def test_bad_run_dirs_give_a_clear_error(case, tmp_path, capsys, micro_model_dir, trained_run):
    run = tmp_path / "run"
    good = json.loads((trained_run / "config.json").read_text())
    flags = []
    if case == "absent":
        expected = "no such directory"
    elif case == "file":
        run.write_text("x")
        expected = "not a directory"
    else:
        run.mkdir()
        (run / "final").symlink_to(trained_run / "final")
        if case == "no_config":
            expected = "no config.json, so not a `sdsearch train` run directory"
        elif case == "bad_json":
            (run / "config.json").write_text('{"rollout": {')
            expected = "config.json: not valid JSON (line 1"
        elif case == "not_object":
            (run / "config.json").write_text("[1, 2]")
            expected = "not a training config (a JSON object), got list"
        elif case == "hf_model_dir":
            run = micro_model_dir[0]  # a model directory given as the run
            expected = "is a Hugging Face model config, not a training run's"
        else:
            cfg = json.loads(json.dumps(good))
            if case == "bad_value":
                cfg["rollout"]["max_new_tokens"] = 0
                expected = "rollout.max_new_tokens must be >= 1, got 0"
            elif case == "bad_choice":
                cfg["prompt"]["instruction"] = "verbose"
                expected = "prompt.instruction must be one of default, search_r1, got 'verbose'"
            elif case == "missing_key":
                del cfg["rollout"]["max_context"]
                expected = "no rollout.max_context, so not a config written by `sdsearch train`"
            elif case == "no_final":
                (run / "final").unlink()
                expected = "no trained model (final/ is written when `sdsearch train` finishes); give --model"
            else:  # flag_conflict
                flags = ["--max-new-tokens", "400"]
                expected = "max_context 300 (run rollout.max_context) must exceed max_new_tokens 400 (--max-new-tokens)"
            (run / "config.json").write_text(json.dumps(cfg))
    rc = main(["eval", "--run", str(run), "--quiet", "--limit", "1", "--out", str(tmp_path / "ev"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and err.startswith("sdsearch eval: error:"), err
    assert not (tmp_path / "ev").exists()


def test_a_run_without_final_but_with_a_search_e1_state_uses_its_final_model(trained_run, tmp_path,
                                                                             captured_engine):
    run = tmp_path / "e1"
    run.mkdir()
    shutil.copy(trained_run / "config.json", run / "config.json")
    (run / "search_e1_state.json").write_text(json.dumps({"final_model": str(trained_run / "final")}))
    rc, out = _eval(run, tmp_path)
    assert rc == 0 and captured_engine["engine"].cfg.max_new_tokens == 13
    s = json.loads((out / "results.json").read_text())["settings"]
    assert s["model"] == {"value": str(trained_run / "final"), "from": "run search_e1_state.json final_model"}


def test_the_runs_test_files_are_the_default_questions(trained_run, tmp_path, bundle, captured_engine, capsys):
    """A run trained on FlashRAG files: eval reads its data.test_files unless --data is given."""
    questions = tmp_path / "my_test.jsonl"
    questions.write_text("".join(json.dumps(q.to_flashrag()) + "\n" for q in bundle.test[:3]))
    run = tmp_path / "files_run"
    run.mkdir()
    cfg = json.loads((trained_run / "config.json").read_text())
    cfg["data"]["test_files"] = [str(questions)]
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "final").symlink_to(trained_run / "final")
    rc, out = _eval(run, tmp_path, "--no-retrieval")
    assert rc == 0 and list(captured_engine["datasets"]) == ["my_test"]
    s = json.loads((out / "results.json").read_text())["settings"]
    assert s["data"] == {"value": "my_test", "from": "run data.test_files"}
    assert s["retriever"] == {"value": None, "from": "--no-retrieval"}
    # the run's in-process retriever needs the corpus of those files
    with pytest.raises(SystemExit, match=r"questions from files \(run data.test_files\) with the bm25 retriever"):
        _eval(run, tmp_path)
