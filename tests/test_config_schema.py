"""The schema a reader can trust: a moved key is refused naming its new place, the rollout engine's settings have
one set of defaults (the engine's RolloutConfig, which the config's sections take and `rollout_config` builds),
and every key of the embedded default config is documented where it is set."""

import dataclasses
import re
import typing

import pytest
import yaml

from nemo_sdsearch.config import (MOVED, ConfigError, RewardSection, RolloutSection, TrainConfig, apply_overrides,
                                  config_dir, load_config, rollout_config)
from nemo_sdsearch.rollout.engine import RolloutConfig


@pytest.mark.parametrize("override", ["cycles=2", "+cycles=2", "++cycles=2"])
def test_the_old_top_level_cycles_override_names_search_e1_cycles(override):
    with pytest.raises(ConfigError, match=r"config key cycles: moved to search_e1[.]cycles; write the override as "
                                          r"search_e1[.]cycles=2"):
        load_config("tiny_cpu", ["algorithm=search_e1", override])


def test_an_arm_override_of_cycles_is_refused_too():
    cfg = load_config("tiny_cpu")
    with pytest.raises(ConfigError, match=r"search_e1[.]cycles=1"):
        apply_overrides(cfg, ["cycles=1"])
    assert apply_overrides(cfg, ["search_e1.cycles=1"]).search_e1.cycles == 1


def test_a_yaml_file_that_still_sets_cycles_at_the_top_names_the_section(tmp_path):
    (tmp_path / "tiny_cpu.yaml").write_text((config_dir() / "tiny_cpu.yaml").read_text())
    (tmp_path / "old.yaml").write_text("defaults:\n  - tiny_cpu\n  - _self_\n\ncycles: 3\n")
    with pytest.raises(ConfigError, match=r"config key cycles \(config 'old'\): moved to search_e1[.]cycles; put "
                                          r"`cycles:` under `search_e1:`"):
        load_config("old", directory=str(tmp_path))


def test_search_e1_cycles_is_read_and_checked():
    assert load_config("tiny_cpu").search_e1.cycles == TrainConfig().search_e1.cycles == 2
    assert load_config("tiny_cpu", ["search_e1.cycles=3"]).search_e1.cycles == 3
    with pytest.raises(ConfigError, match=r"config key search_e1[.]cycles: must be >= 1"):
        load_config("tiny_cpu", ["search_e1.cycles=0"])
    assert set(MOVED) == {"cycles"} and not hasattr(TrainConfig(), "cycles")


def test_the_rollout_config_of_a_default_config_is_the_engines_default():
    """Built from a default config, every RolloutConfig field is the engine's own default: the two sets of defaults
    (RolloutSection / RewardSection and RolloutConfig) are one."""
    built, engine = rollout_config(TrainConfig()), RolloutConfig()
    for f in dataclasses.fields(RolloutConfig):
        assert getattr(built, f.name) == getattr(engine, f.name), f.name
    section, reward = RolloutSection(), RewardSection()
    shared = [f.name for f in dataclasses.fields(RolloutConfig) if hasattr(section, f.name)]
    assert sorted(shared) == ["max_context", "max_new_tokens", "max_turns", "temperature", "top_p", "topk"]
    for name in shared:
        assert getattr(section, name) == getattr(engine, name), name
    assert reward.normalization == engine.normalization
    assert engine.max_new_tokens == 96  # what the embedded default run has always used (conf/tiny_cpu.yaml)


def test_rollout_config_carries_every_setting_of_the_section():
    cfg = load_config("tiny_cpu", ["rollout.max_turns=2", "rollout.max_new_tokens=50", "rollout.max_context=700",
                                   "rollout.topk=5", "rollout.temperature=0.7", "rollout.top_p=0.9",
                                   "reward.normalization=unicode"])
    sample = rollout_config(cfg)
    assert (sample.max_turns, sample.max_new_tokens, sample.max_context, sample.topk, sample.temperature,
            sample.top_p, sample.normalization) == (2, 50, 700, 5, 0.7, 0.9, "unicode")
    greedy = rollout_config(cfg, greedy=True)
    assert greedy == dataclasses.replace(sample, temperature=0.0, top_p=1.0)
    # the embedded default run: the YAML's budgets, which are the schema's
    default = rollout_config(load_config("tiny_cpu"))
    assert (default.max_new_tokens, default.max_context, default.max_turns, default.topk) == (96, 1024, 4, 3)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _schema_keys(cls=TrainConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_key_of_the_embedded_default_is_set_and_commented():
    """conf/tiny_cpu.yaml sets every key of the schema, each with a comment on its line saying what it does."""
    path = config_dir() / "tiny_cpu.yaml"
    text = path.read_text()
    assert set(_leaves(yaml.safe_load(text))) == set(_schema_keys())
    uncommented = []
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*):\s*(\S.*)?$", line)
        if m and m.group(2) and not m.group(2).startswith("#") and "#" not in m.group(2):
            uncommented.append(line.strip())
    assert not uncommented, f"keys without a comment in {path.name}: {uncommented}"
