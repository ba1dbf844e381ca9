"""Every numeric key of the schema has a range; every out-of-range value is refused at load time, naming
the key, before any model is loaded. Also: question files that are not UTF-8, stale checkpoint temporaries."""

import dataclasses
import typing

import pytest

from nemo_sdsearch.config import CHOICES, RANGES, ConfigError, Range, TrainConfig, get_key, load_config


def schema_keys(cls=TrainConfig, prefix=""):
    """(dotted key, annotation) of every leaf of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from schema_keys(t, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", t


def is_numeric(t) -> bool:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return t in (int, float) or (typing.get_origin(t) is typing.Union and args and all(a in (int, float) for a in args))


def numeric_keys():
    default = TrainConfig()
    out = set()
    for key, t in schema_keys():
        value = default
        for part in key.split("."):
            value = getattr(value, part)
        if is_numeric(t) or (isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value)):
            out.add(key)
    return out


def test_every_numeric_key_has_a_range_and_every_range_a_key():
    keys = numeric_keys()
    assert len(keys) > 50
    assert keys == set(RANGES), (f"no range for {sorted(keys - set(RANGES))}; "
                                 f"ranges for unknown keys {sorted(set(RANGES) - keys)}")


def bad_values(r: Range) -> list:
    out = []
    if r.lo is not None:
        out.append(r.lo if r.lo_open else r.lo - 1)
    if r.hi is not None:
        out.append(r.hi if r.hi_open else r.hi + 1)
    if not r.null:
        out.append(None)
    return out


def as_override(key, value):
    if key == "optim.betas":  # a list: one element out of range
        return f"{key}=[0.9,{'null' if value is None else value}]"
    return f"{key}={'null' if value is None else value}"


CASES = [(k, v) for k, r in RANGES.items() for v in bad_values(r)]


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_out_of_range_value_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"config key {key.replace('.', '[.]')}"):
        load_config("tiny_cpu", [as_override(key, value)])


@pytest.mark.parametrize("key", sorted(RANGES))
def test_the_default_and_the_bounds_themselves_are_accepted(key):
    r = RANGES[key]
    good = [v for v in (r.lo if not r.lo_open else None, r.hi if not r.hi_open else None) if v is not None]
    for value in good:
        if key in ("rollout.max_context", "rollout.max_new_tokens", "trainer.questions_per_step",
                   "rollout.retriever"):  # cross-key rules apply on top of the range
            continue
        if key == "optim.betas":
            value = [value, value]
            override = f"{key}=[{value[0]},{value[1]}]"
        else:
            override = f"{key}={value}"
        load_config("tiny_cpu", [override])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_string_choices_are_checked(key):
    listed = isinstance(get_key(TrainConfig(), key), list)  # a list of choices (logger.backends): one entry wrong
    with pytest.raises(ConfigError, match=f"config key {key.replace('.', '[.]')}: must be one of"):
        load_config("tiny_cpu", [f"{key}=[nonsense]" if listed else f"{key}=nonsense"])


def test_nan_is_out_of_every_range():
    with pytest.raises(ConfigError, match="sd.beta"):
        load_config("tiny_cpu", ["sd.beta=nan"])


def test_cli_refuses_before_loading_a_model(capsys, monkeypatch):
    import nemo_sdsearch.models.hf as hf
    from nemo_sdsearch.cli import main

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hf, "load_model_and_tokenizer", boom)
    for override, key in (("trainer.questions_per_step=0", "trainer.questions_per_step"),
                          ("trainer.save_every=-1", "trainer.save_every"), ("model.threads=0", "model.threads")):
        assert main(["train", override]) == 2
        assert f"config key {key}" in capsys.readouterr().err


def test_question_file_that_is_not_utf8_names_file_and_line(tmp_path):
    from nemo_sdsearch.core.qa import load_flashrag

    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": "1", "question": "a?", "golden_answers": ["x"]}\n'
                     b'{"id": "2", "question": "caf\xff?", "golden_answers": ["y"]}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8 \(byte 0xff at column 29\)"):
        load_flashrag(path)


def test_stale_checkpoint_temporaries_are_removed_on_start(tmp_path):
    from nemo_sdsearch.algorithms.state import clear_out_dir, load_latest_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, 1, {"step": 1})
    (tmp_path / "checkpoints" / ".tmp_step_000002").mkdir()
    (tmp_path / "checkpoints" / ".tmp_step_000002" / "state.pt").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "latest.tmp").write_text("step_000002")
    clear_out_dir(tmp_path, overwrite=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert load_latest_checkpoint(tmp_path)["step"] == 1
