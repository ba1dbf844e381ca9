"""The trainer's state off the device while the engines generate (`offload.*`, models/offload.py): storages parked
in host memory and restored bit for bit, training with offload equal to training without (one process here; the
gloo TP2 x DP2 run is in tests/test_megatron_train.py), and the memory model (layout.py) moving what is parked out
of the generation phase."""

from __future__ import annotations

import copy

import pytest
import torch

from nemo_sdsearch.config import load_config
from nemo_sdsearch.layout import GENERATION, RESIDENT, TRAINER_STATE, TRAINING, memory_estimate
from nemo_sdsearch.models.offload import HostCopies, TrainerOffload, state_bytes


def test_host_copies_free_the_storage_and_restore_every_view_bit_for_bit():
    base = torch.randn(6, 5, dtype=torch.float64)
    view, other = base[2:4], torch.randn(7)
    alias = base.view(-1)                        # the same storage twice: parked once
    before = (base.clone(), other.clone())
    host = HostCopies()
    freed = host.park([base, view, alias, other, None])
    assert freed == base.numel() * 8 + other.numel() * 4 and len(host) == 2
    assert base.untyped_storage().nbytes() == 0 and other.untyped_storage().nbytes() == 0
    assert host.host_bytes == freed
    assert host.park([base]) == 0                # parked already
    assert host.restore() == freed and len(host) == 0
    assert torch.equal(base, before[0]) and torch.equal(other, before[1])
    assert torch.equal(view, before[0][2:4]) and view.data_ptr() == base.data_ptr() + 2 * 5 * 8
    zeros = torch.ones(3)
    host.park([zeros], keep=False)               # released, not copied: restored as zeros
    host.restore()
    assert torch.equal(zeros, torch.zeros(3))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(model, opt, steps, park=None):
    """AdamW steps on a fixed regression batch; between steps (where the engines would generate) `park` parks and
    restores the state."""
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 4)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if park is not None:
            park()


def test_training_with_the_optimizer_and_weights_parked_between_steps_equals_training_without():
    a = _model()
    b = copy.deepcopy(a)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    off = TrainerOffload(b, opt_b)
    seen = []

    def park():
        off.offload(["optimizer", "grads", "params"])
        held = state_bytes(b, opt_b)
        seen.append(held)
        off.reload()

    _train(a, opt_a, 4)
    _train(b, opt_b, 4, park)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"])
               for p, q in zip(a.parameters(), b.parameters()))
    assert seen and all(v == 0 for held in seen for v in held.values())   # nothing held while parked
    n = sum(p.numel() for p in b.parameters())
    assert state_bytes(b, opt_b) == {"actor weights": 4 * n, "actor gradient buffer fp32": 0,
                                     "Adam m and v fp32": 8 * n + 4 * len(list(b.parameters()))}  # + step counts
    with pytest.raises(ValueError, match="unknown offload part"):
        off.offload(["kv_cache"])


def _gpu(*overrides):
    return load_config("qwen25_7b_sd_search", list(overrides))


def test_offload_moves_the_parked_state_out_of_the_generation_phase():
    base = memory_estimate(_gpu())
    off = memory_estimate(_gpu("offload.optimizer=true", "offload.grads=true", "offload.reference=cpu"))
    phase = lambda est, comp: next(r.phase for r in est.components if r.component == comp)
    for comp in ("actor gradient buffer fp32", "fp32 main weights", "Adam m and v fp32", "reference policy"):
        assert phase(base, comp) == RESIDENT and phase(off, comp) == TRAINING
        assert off.gib(comp) == base.gib(comp)
    assert phase(off, "actor weights") == RESIDENT
    # the engine is built after build_components parked them: its KV cache reserves the fraction of more memory
    parked = sum(off.gib(c) for c in ("actor gradient buffer fp32", "fp32 main weights", "reference policy"))
    kv = lambda est: est.gib("KV cache reserved")
    assert kv(off) == pytest.approx(kv(base) + 0.3 * parked)
    assert off.generation_gib == pytest.approx(base.generation_gib - parked - base.gib("Adam m and v fp32")
                                               + 0.3 * parked)
    # a level-2 sleep releases the engine's weights for the update
    lv2 = memory_estimate(_gpu("trtllm.sleep_level=2"))
    assert phase(lv2, "generator weights bf16") == GENERATION
    assert lv2.training_gib == pytest.approx(base.training_gib - base.gib("generator weights bf16"))


TINY_ARCH = ["arch.hidden_size=256", "arch.num_layers=4", "arch.num_attention_heads=8", "arch.num_kv_heads=4",
             "arch.ffn_hidden_size=704", "arch.vocab_size=2048"]   # the embedded model's config.json


def test_a_cpu_run_is_modelled_with_the_torch_optimizer():
    """gpus_per_node=0: fp32 weights, gradients only in the training phase, Adam's moments not sharded: the rows
    tests/test_megatron_train.py holds a live run to (memory/trainer_gib)."""
    cfg = load_config("tiny_cpu", ["actor=megatron", "megatron.tensor_parallel=2", *TINY_ARCH])
    est = memory_estimate(cfg, world=4)
    assert est.dp == 2
    weights = est.gib("actor weights")
    assert est.gib("Adam m and v fp32") == pytest.approx(2 * weights)      # 8 P / tp, not / dp
    assert est.gib("reference policy") == pytest.approx(weights)
    assert not est.gib("fp32 main weights")
    resident = {r.component for r in est.components if r.phase == RESIDENT and r.component in TRAINER_STATE}
    assert resident == {"actor weights", "Adam m and v fp32", "reference policy"}


def test_bad_offload_settings_fail_at_config_time():
    from nemo_sdsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="offload.reference"):
        load_config("tiny_cpu", ["offload.reference=disk"])
    with pytest.raises(ConfigError, match="trtllm.sleep_level"):
        load_config("tiny_cpu", ["trtllm.sleep_level=3"])
    with pytest.raises(ConfigError, match="sleep_while_training"):
        load_config("tiny_cpu", ["trtllm.sleep_level=2", "trtllm.sleep_while_training=false"])


def test_a_resumed_run_generates_with_the_state_offload_parks(tmp_path):
    """`trainer.resume=true` with offload.*: the checkpoint is loaded as an update runs (the parked state back on the
    device to be loaded into, parked again before generation), so the resumed step holds what the straight run's
    step held while generating (memory/trainer_gib), and takes the same step."""
    import json
    import shutil

    from nemo_sdsearch.algorithms.grpo import train

    def run(out, *extra):
        cfg = load_config("tiny_cpu", [
            "model.threads=1", "trainer.steps=2", "trainer.questions_per_step=2", "rollout.group_size=2",
            "rollout.max_new_tokens=24", "rollout.max_turns=1", "trainer.eval_every=0", "trainer.save_every=1",
            "trainer.final_test_eval=false", "offload.optimizer=true", "offload.grads=true",
            "offload.reference=cpu", f"trainer.out_dir={out}", *extra])
        train(cfg, progress=False)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_000001")
    resumed = run(tmp_path / "b", "trainer.resume=true")
    assert [r["step"] for r in resumed] == [1, 2]
    held = straight[1]["memory/trainer_gib"]
    assert resumed[1]["memory/trainer_gib"] == held
    # only the weights stay (the reference, Adam's moments and the gradients are parked)
    n = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / "a" / "final" / "model.safetensors").values())
    assert held * 2 ** 30 <= 4 * n * 1.01
    timing = ("timing_s/", "timing_per_token_ms/", "perf/")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(timing)}
    assert json.dumps(strip(resumed[1])) == json.dumps(strip(straight[1]))
