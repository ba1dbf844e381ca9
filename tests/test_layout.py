"""The scale-out recipes load, and impossible parallel layouts fail at config time, naming the key."""

import pytest

from nemo_sdsearch.config import ConfigError, load_config
from nemo_sdsearch.layout import memory_estimate, parameter_count

RECIPES = ["qwen25_7b_sd_search", "qwen25_7b_search_e1", "qwen25_3b_sd_search", "qwen25_3b_search_e1"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_carry_the_papers_hyper_parameters(name):
    cfg = load_config(name)
    assert (cfg.rollout.group_size, cfg.optim.lr, cfg.grpo.kl_coef, cfg.grpo.clip_eps) == (5, 1e-6, 0.001, 0.2)
    assert (cfg.rollout.temperature, cfg.rollout.topk, cfg.rollout.max_turns) == (1.0, 3, 4)
    assert cfg.search_e1.grpo_steps == 200 and cfg.actor == "megatron" and cfg.generator == "trtllm"
    assert cfg.cluster.gpus_per_node == 8 and cfg.cluster.gpu_memory_gib == 80
    est = memory_estimate(cfg)
    assert est.peak(True) <= 0.9 * 80


def test_parameter_count_matches_the_published_sizes():
    assert abs(parameter_count(load_config("qwen25_7b_sd_search").arch) / 1e9 - 7.62) < 0.02
    assert abs(parameter_count(load_config("qwen25_3b_sd_search").arch) / 1e9 - 3.09) < 0.02


@pytest.mark.parametrize("recipe, overrides, key, words", [
    ("qwen25_3b_sd_search", ["megatron.tensor_parallel=4"], "megatron.tensor_parallel", "2 key/value groups"),
    ("qwen25_7b_sd_search", ["megatron.tensor_parallel=8"], "megatron.tensor_parallel", "28 attention heads"),
    ("qwen25_7b_sd_search", ["cluster.nodes=6", "megatron.pipeline_parallel=3"], "megatron.pipeline_parallel",
     "28 layers"),
    ("qwen25_7b_sd_search", ["megatron.pipeline_parallel=3"], "megatron.tensor_parallel", "16 GPUs"),
    ("qwen25_7b_sd_search", ["cluster.gpus_per_node=2"], "megatron.tensor_parallel", "one node"),
    ("qwen25_7b_sd_search", ["cluster.gpu_memory_gib=16"], "megatron.tensor_parallel", "GiB"),
    ("qwen25_7b_sd_search", ["trainer.questions_per_step=6"], "trainer.questions_per_step", "data-parallel"),
    ("qwen25_7b_sd_search", ["actor=hf"], "megatron.tensor_parallel", "actor=megatron"),
    ("qwen25_7b_sd_search", ["generator=vllm"], "generator", "one of torch, trtllm"),
])
def test_impossible_layouts_fail_before_any_gpu(recipe, overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(recipe, overrides)
    assert key in str(e.value) and words in str(e.value)


def test_pipeline_parallel_layouts_load():
    cfg = load_config("qwen25_7b_sd_search", ["cluster.nodes=4", "megatron.pipeline_parallel=2"])
    assert memory_estimate(cfg).pp == 2
    # on CPU too: megatron's schedules run over gloo (cpu_compat), so pp > 1 is a valid CPU layout
    assert load_config("tiny_cpu", ["actor=megatron", "megatron.pipeline_parallel=2"]).megatron.pipeline_parallel == 2


def test_cpu_config_rejects_gpu_only_settings():
    with pytest.raises(ConfigError, match="trtllm needs GPUs"):
        load_config("tiny_cpu", ["generator=trtllm"])
    with pytest.raises(ConfigError, match="retrieval service URL"):
        load_config("tiny_cpu", ["rollout.retriever=http"])
