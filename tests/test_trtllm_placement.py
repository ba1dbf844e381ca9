"""One TensorRT-LLM engine per data-parallel replica (rollout/trtllm_placement.py).

The planning functions are checked on cluster layouts; then a real 4-process gloo run of
`sdsearch train actor=megatron generator=trtllm` (TP 2 x DP 2, engine TP 2) goes through the real
TRTLLMGenerator, placement and replica refit code, with three things faked (a GPU is needed for the real
ones): the `tensorrt_llm.LLM` constructor (tests/fake_trtllm.RecordingLLM: it records its arguments and
the environment it was built in, and its workers sit on the GPUs of the bundles it was given), the `ray`
module (named placement groups), and CUDA IPC handles (a tensor tagged with the GPU of the rank that made
it, so the engine can check that every handle came from its own GPU's rank).
"""

from __future__ import annotations

import os

import pytest
import torch

from nemo_sdsearch.errors import ConfigError
from nemo_sdsearch.rollout.trtllm_placement import (EnginePlacement, GPUSlot, engine_bundles, engine_environment,
                                                    job_bundles)


def test_engine_environment_hides_the_launchers_variables_and_restores_them(monkeypatch):
    launcher = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "PMI_RANK": "3", "PMIX_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
                "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                "TORCHELASTIC_RUN_ID": "x"}
    for k, v in launcher.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("RAY_ADDRESS", "n1:6379")
    with engine_environment() as hidden:
        assert set(hidden) >= set(launcher)
        assert not set(launcher) & set(os.environ)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1" and os.environ["RAY_ADDRESS"] == "n1:6379"
    assert all(os.environ[k] == v for k, v in launcher.items())


def _megatron_slots(nodes: int, gpus: int, tp: int, pp: int):
    """Global rank -> GPUSlot for torchrun's rank order, and each replica's ranks in megatron's order
    (tp fastest, then dp, then pp)."""
    world = nodes * gpus
    slots = [GPUSlot(f"10.0.0.{r // gpus + 1}", r % gpus, f"GPU-{r}") for r in range(world)]
    dp = world // (tp * pp)
    replicas = [[t + tp * d + tp * dp * p for p in range(pp) for t in range(tp)] for d in range(dp)]
    return slots, replicas


def test_bundles_follow_the_nodes_and_each_engine_sits_on_its_replicas_gpus():
    slots, replicas = _megatron_slots(nodes=2, gpus=4, tp=2, pp=2)
    bundles, index = job_bundles(slots)
    assert len(bundles) == 8
    assert [b for b in bundles[:4] if "node:10.0.0.1" in b] == bundles[:4]
    assert all("node:10.0.0.2" in b and b["GPU"] == 1 for b in bundles[4:])
    assert [index[s] for s in slots] == list(range(8))
    assert replicas == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # engine TP 2: the first pipeline stage's two GPUs of each replica, on node 1
    got = [engine_bundles([slots[r] for r in rep], 2, index) for rep in replicas]
    assert got == [[0, 1], [2, 3]]
    assert not set(got[0]) & set(got[1])
    # TP 4 would take stage 1's GPUs on the other node: refused, naming the key
    with pytest.raises(ConfigError, match="trtllm.tensor_parallel.*span nodes"):
        engine_bundles([slots[r] for r in replicas[0]], 4, index)
    with pytest.raises(ConfigError, match="trtllm.tensor_parallel.*do not fit"):
        engine_bundles([slots[r] for r in replicas[0]], 8, index)


def test_a_node_with_unused_gpus_is_refused():
    slots = [GPUSlot("10.0.0.1", i, f"GPU-{i}") for i in (0, 2)]
    with pytest.raises(ConfigError, match="cluster.gpus_per_node"):
        job_bundles(slots)


def test_a_placement_ray_resolved_elsewhere_fails_loudly():
    p = EnginePlacement(object(), [0, 1], ["GPU-a", "GPU-b"])
    p.check(["gpu-b", "GPU-a"])  # order and the GPU- prefix's case do not matter
    with pytest.raises(RuntimeError, match="not on this replica's"):
        p.check(["GPU-a", "GPU-c"])


# ---------------------------------------------------------------------------------------------------
# the real recipe under torchrun-like gloo processes
# ---------------------------------------------------------------------------------------------------
LAUNCHER_ENV = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "PMI_RANK": "0", "PMIX_RANK": "0"}


def _replica_engine_worker(rank, world, model_dir, out, store):
    import sys

    import fake_trtllm

    import nemo_sdsearch.rollout.trtllm_generator as tg
    import nemo_sdsearch.rollout.trtllm_placement as tp
    from nemo_sdsearch.algorithms import grpo
    from nemo_sdsearch.config import load_config

    me = f"GPU-fake-{rank}"
    os.environ.update(LAUNCHER_ENV, RAY_ADDRESS="fake-head:6379")
    sys.modules["ray"] = fake_trtllm.fake_ray_module(store)
    tg.import_trtllm = fake_trtllm.fake_trtllm_api
    tp.local_gpu_slot = lambda: GPUSlot("10.0.0.1", rank, me)
    tp.ipc_handles = lambda bucket, dtype, keep: [(n, fake_trtllm.FakeIPCHandle(me, t.detach().clone()))
                                                  for n, t in bucket]
    import nemo_sdsearch.models.hf as hf

    loads = []
    real_load = hf.load_model_and_tokenizer
    hf.load_model_and_tokenizer = lambda *a, **k: loads.append(a) or real_load(*a, **k)
    overrides = {"actor": "megatron", "megatron.tensor_parallel": 2, "generator": "trtllm",
                 "trtllm.tensor_parallel": 2, "cluster.gpus_per_node": 4, "model.path": model_dir, "model.threads": 1,
                 "trainer.steps": 1, "trainer.seed": 5, "trainer.questions_per_step": 2, "rollout.group_size": 2,
                 "rollout.max_new_tokens": 24, "rollout.max_turns": 1, "rollout.max_context": 1024,
                 "trainer.eval_every": 0, "trainer.save_every": 0, "trainer.final_test_eval": False,
                 "trainer.out_dir": out, "grpo.micro_batch_size": 2, "optim.lr": 1e-4}
    grpo.train(load_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()]), progress=False)
    res = {"environ_after": {k: os.environ.get(k) for k in LAUNCHER_ENV}, "engines": [], "whole_model_loads": len(loads)}
    for b in fake_trtllm.RecordingLLM.built:
        kw, llm = b["kwargs"], b["llm"]
        rpc = kw["ray_placement_config"]
        res["engines"].append({
            "tp": kw["tensor_parallel_size"], "max_seq_len": kw.get("max_seq_len"), "max_input_len": kw.get("max_input_len"),
            "max_num_tokens": kw.get("max_num_tokens"), "bundles": rpc.placement_bundle_indices,
            "group": rpc.placement_groups[0].name, "group_bundles": rpc.placement_groups[0].bundle_specs,
            "workers": llm.worker_uuids, "launcher_env_seen": sorted(set(LAUNCHER_ENV) & set(b["environ"])),
            "torchrun_env_seen": sorted({"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(b["environ"])),
            "senders": llm.senders, "refits": len(llm.refits),
            "held": {k: v.clone() for k, v in llm.model.state_dict().items()}})
    return res


@pytest.mark.timeout(900)
def test_one_engine_per_replica_on_its_own_gpus_refitted_by_its_own_ranks(tmp_path):
    pytest.importorskip("megatron.core")
    from _mp import run_workers
    from safetensors.torch import load_file

    from nemo_sdsearch.world.assets import default_model_dir

    out = tmp_path / "run"
    store = tmp_path / "ray"
    store.mkdir()
    results = run_workers(_replica_engine_worker, 4, str(default_model_dir()), str(out), str(store), timeout=900)
    # replica leaders (ranks 0 and 2) built exactly one engine each; the other ranks none
    assert [len(r["engines"]) for r in results] == [1, 0, 1, 0]
    # no rank loaded a whole HF model: the shards were read tensor by tensor, the engines load their own
    assert [r["whole_model_loads"] for r in results] == [0, 0, 0, 0]
    e0, e1 = results[0]["engines"][0], results[2]["engines"][0]
    assert e0["bundles"] == [[0, 1]] and e1["bundles"] == [[2, 3]]
    assert e0["workers"] == ["GPU-fake-0", "GPU-fake-1"] and e1["workers"] == ["GPU-fake-2", "GPU-fake-3"]
    assert e0["group"] == e1["group"] and e0["group"].startswith("sdsearch-4242-")  # one group for the job
    assert len(e0["group_bundles"]) == 4 and all(b["GPU"] == 1 and "node:10.0.0.1" in b for b in e0["group_bundles"])
    for e in (e0, e1):
        assert e["tp"] == 2
        assert e["max_seq_len"] == 1024 and e["max_input_len"] == 1024 and e["max_num_tokens"] >= 1024
        assert e["launcher_env_seen"] == [] and e["torchrun_env_seen"] == []  # hidden while the engine started
        # refit: every bucket's handles for a worker GPU came from the rank on that GPU
        assert e["refits"] == 1 and e["senders"]
        for bucket in e["senders"]:
            assert bucket == {u: u for u in e["workers"]}
    # the launcher's variables are back for the trainer
    assert all(r["environ_after"] == LAUNCHER_ENV for r in results)
    # final/ was written (by rank 0, from the weight stream) and both engines hold exactly those weights
    final = load_file(out / "final" / "model.safetensors")
    for e in (e0, e1):
        assert all(torch.equal(e["held"][k], final[k]) for k in final)
    initial = load_file(default_model_dir() / "model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in final)
