"""One TensorRT-LLM engine per data-parallel replica (rollout/trtllm_placement.py).

The planning functions are checked on cluster layouts; the placement form is detected on each release the
TensorRT-LLM stand-in can declare (tests/stand_in); then a real 4-process gloo run of `sdsearch train
actor=megatron generator=trtllm` (TP 2 x DP 2, engine TP 2) goes through the real TRTLLMGenerator, placement
and replica refit code on a REAL Ray cluster started here (`ray start --head`), with the stand-in engine
(Ray actors on the placement group's bundles, weights over shared-memory IPC handles): only CUDA is missing.
"""

from __future__ import annotations

import os

import pytest
import torch

from nemo_sdsearch.errors import ConfigError
import subprocess
import sys
import time
from pathlib import Path

from fake_trtllm import shard_of
from nemo_sdsearch.rollout.trtllm_placement import (PLACEMENT_FORMS, DeviceSlot, EnginePlacement, EngineSpread,
                                                    cpu_device_id,
                                                    engine_blocks, engine_bundles, engine_environment,
                                                    job_bundles)

STAND_IN = Path(__file__).resolve().parent / "stand_in"


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
    """Global rank -> DeviceSlot for torchrun's rank order, and each replica's ranks in megatron's order
    (tp fastest, then dp, then pp)."""
    world = nodes * gpus
    slots = [DeviceSlot(f"10.0.0.{r // gpus + 1}", r % gpus, f"GPU-{r}") for r in range(world)]
    dp = world // (tp * pp)
    replicas = [[t + tp * d + tp * dp * p for p in range(pp) for t in range(tp)] for d in range(dp)]
    return slots, replicas


def test_bundles_follow_the_nodes_and_the_engines_cover_every_gpu_whatever_the_training_layout():
    slots, replicas = _megatron_slots(nodes=2, gpus=4, tp=2, pp=2)
    bundles, index = job_bundles(slots)
    assert len(bundles) == 8
    assert [b for b in bundles[:4] if "node:10.0.0.1" in b] == bundles[:4]
    assert all("node:10.0.0.2" in b and b["GPU"] == 1 for b in bundles[4:])
    assert [index[s] for s in slots] == list(range(8))
    assert replicas == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # the engines are blocks of consecutive ranks, independent of the replicas: engine TP 2 gives 4 engines (two on
    # each node, stage 1's GPUs generate too), engine TP 4 two (one per node, each holding two replicas' stage),
    # engine TP 1 eight
    for g, want in ((2, [[0, 1], [2, 3], [4, 5], [6, 7]]), (4, [[0, 1, 2, 3], [4, 5, 6, 7]]), (1, [[r] for r in range(8)])):
        blocks = engine_blocks(8, g)
        assert blocks == want and sorted(r for b in blocks for r in b) == list(range(8))
        assert [engine_bundles([slots[r] for r in b], index) for b in blocks] == want
    # a block over two nodes (a size that does not divide a node's GPUs) is refused, naming the key
    with pytest.raises(ConfigError, match="trtllm.tensor_parallel.*span nodes"):
        engine_bundles([slots[r] for r in (2, 3, 4)], index)
    with pytest.raises(ConfigError, match="trtllm.tensor_parallel.*does not divide"):
        engine_blocks(8, 3)


def test_engine_spread_gives_each_engine_every_eth_question_and_puts_the_results_back_in_order():
    """`EngineSpread.share` / `regroup` without a process group: 3 engines over 7 questions, 2 rows each."""
    items = list("abcdefg")
    shares = [EngineSpread(e, 3, [0, 2, 4]).share(items) for e in range(3)]
    assert shares == [["a", "d", "g"], ["b", "e"], ["c", "f"]] and EngineSpread(None, 3, [0, 2, 4]).share(items) == []
    results = [[f"{q}{j}" for q in share for j in range(2)] for share in shares]
    spread = EngineSpread(0, 3, [0, 2, 4])
    spread.gather = lambda local: results          # what the all-gather returns: every engine's rows, engine order
    assert spread.regroup(items, 2, results[0]) == [[f"{q}0", f"{q}1"] for q in items]


def test_a_cpu_only_run_asks_for_cpu_bundles_on_the_same_code_path():
    slots = [DeviceSlot(f"10.0.0.{n}", i, cpu_device_id(f"10.0.0.{n}", i)) for n in (1, 2) for i in range(2)]
    bundles, index = job_bundles(slots)
    assert bundles == [{"CPU": 1, "node:10.0.0.1": 0.001}] * 2 + [{"CPU": 1, "node:10.0.0.2": 0.001}] * 2
    assert engine_bundles(slots[2:], index) == [2, 3]
    gpu = DeviceSlot("10.0.0.1", 0, "GPU-abc")
    assert gpu.resource == "GPU" and job_bundles([gpu])[0] == [{"GPU": 1, "CPU": 1, "node:10.0.0.1": 0.001}]


def test_a_node_with_unused_gpus_is_refused():
    slots = [DeviceSlot("10.0.0.1", i, f"GPU-{i}") for i in (0, 2)]
    with pytest.raises(ConfigError, match="cluster.gpus_per_node"):
        job_bundles(slots)


def test_a_placement_ray_resolved_elsewhere_fails_loudly():
    p = EnginePlacement(object(), [0, 1], ["GPU-a", "GPU-b"])
    p.check(["gpu-b", "GPU-a"])  # order and the GPU- prefix's case do not matter
    with pytest.raises(RuntimeError, match="not on this block's"):
        p.check(["GPU-a", "GPU-c"])


# ---------------------------------------------------------------------------------------------------
# which placement arguments the installed TensorRT-LLM takes
# ---------------------------------------------------------------------------------------------------
FORM_PROBE = """
from nemo_sdsearch.rollout.trtllm_generator import import_trtllm
from nemo_sdsearch.rollout.trtllm_placement import EnginePlacement, placement_form
api = import_trtllm()
try:
    form = placement_form(api)
except ImportError as e:
    print("refused:", e)
else:
    kw = EnginePlacement("PG", [2, 3], []).llm_kwargs(api)
    print(api.version, form, sorted(kw))
"""


@pytest.mark.parametrize("version, expect", [
    ("1.2.0", "1.2.0 ray_placement_config ['ray_placement_config']"),
    ("1.2.0+toplevel", "1.2.0+toplevel top_level ['per_worker_gpu_share', 'placement_bundle_indices', "
                       "'placement_groups']"),
    ("1.2.0rc4", "refused: TensorRT-LLM 1.2.0rc4 takes no Ray placement group from its caller"),
])
def test_the_placement_form_is_read_from_the_installed_release(version, expect):
    """The form comes from the release's own LLM arguments (its TorchLlmArgs fields), never from a hard-coded
    version table: 1.2.0rc6+ takes ray_placement_config=RayPlacementConfig(...), a release that declares the
    top-level trio gets those, and one with neither (env-var placement from inside a Ray actor only) is refused
    with the release named."""
    env = {**os.environ, "PYTHONPATH": f"{STAND_IN}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRTLLM_STAND_IN_VERSION": version}
    p = subprocess.run([sys.executable, "-c", FORM_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    *said, last = p.stdout.strip().splitlines()
    assert last.startswith(expect), p.stdout
    if not expect.startswith("refused"):  # the run says at start which form it used
        assert said == [f"TensorRT-LLM {version}: engine placed through {PLACEMENT_FORMS[last.split()[1]]} on "
                        "bundles [2, 3]"], said


# ---------------------------------------------------------------------------------------------------
# the real recipe under torchrun-like gloo processes, on a real Ray cluster
# ---------------------------------------------------------------------------------------------------
LAUNCHER_ENV = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "PMI_RANK": "0", "PMIX_RANK": "0"}


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster (`ray start --head --block` through the project's own start and wait commands, with
    this machine's node IP and a token, as a job script starts one) for this module; stopped at the end. Started
    with the interpreter's environment off PATH (`/venv/bin/python -m ...` without activating it): the node's
    `ray start` is the interpreter's own `ray` script all the same."""
    pytest.importorskip("ray")
    from nemo_sdsearch.rollout.ray_cluster import one_node_cluster

    bin_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and os.path.realpath(d) != os.path.realpath(bin_dir))
    env = {**os.environ, "PATH": path or os.defpath, "SDSEARCH_RAY_START_ARGS": "--object-store-memory=200000000"}
    with one_node_cluster(cpus=4, env=env) as env:
        yield {"address": env["RAY_ADDRESS"], "token": env["RAY_AUTH_TOKEN"]}


def _replica_engine_worker(rank, world, model_dir, out, ray_head, mtp=2, gtp=2):
    sys.path.insert(0, str(STAND_IN))
    os.environ.update(LAUNCHER_ENV, RAY_ADDRESS=ray_head["address"], RAY_AUTH_TOKEN=ray_head["token"],
                      PYTHONPATH=f"{STAND_IN}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    import ray

    import nemo_sdsearch.models.hf as hf
    from nemo_sdsearch.algorithms import grpo
    from nemo_sdsearch.algorithms.setup import build_components, close_components
    from nemo_sdsearch.config import load_config

    loads, updates = [], []
    real_load = hf.load_model_and_tokenizer
    hf.load_model_and_tokenizer = lambda *a, **k: loads.append(a) or real_load(*a, **k)
    real_update = grpo.update_policy

    def recorded_update(actor, ref, trajs, adv, *a, **k):  # this replica's rollouts and advantages
        updates.append({"trajs": trajs, "adv": adv.clone()})
        return real_update(actor, ref, trajs, adv, *a, **k)

    grpo.update_policy = recorded_update
    # GRPO, 2 turns (a search, then an answer): a group's rewards differ, so the update has a policy gradient
    overrides = {"actor": "megatron", "megatron.tensor_parallel": mtp, "generator": "trtllm", "algorithm": "grpo",
                 "trtllm.tensor_parallel": gtp, "cluster.gpus_per_node": 4, "model.path": model_dir, "model.threads": 1,
                 "trainer.steps": 1, "trainer.seed": 0, "trainer.questions_per_step": 4, "rollout.group_size": 4,
                 "rollout.max_new_tokens": 48, "rollout.max_turns": 2, "rollout.max_context": 1024,
                 "trainer.eval_every": 0, "trainer.save_every": 0, "trainer.final_test_eval": False,
                 "trainer.out_dir": out, "grpo.micro_batch_size": 2, "optim.lr": 1e-4}
    cfg = load_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()])
    c = build_components(cfg)
    from nemo_sdsearch.models.megatron.hf_mapping import local_weights

    shard = sum(t.numel() * t.element_size() for t in local_weights(c.actor.model).values())
    bytes_read = {"read": c.bytes_read, "shard": shard, "models": 1 + (c.ref is not None)}
    grpo.train(cfg, progress=False, components=c)
    from nemo_sdsearch.models.megatron.builder import replica_wait_group

    res = {"environ_after": {k: os.environ.get(k) for k in LAUNCHER_ENV}, "engine": None, "updates": updates,
           "whole_model_loads": len(loads), "pid": os.getpid(), "bytes_read": bytes_read,
           "wait_group": (torch.distributed.get_backend(c.actor.replica_group), c.actor.replica_group is replica_wait_group(),
                          c.actor.replica_ranks)}
    g = c.engines["train"].generator if c.engines is not None else None
    if g is not None:
        llm = g.llm
        placement = llm.args.ray_placement_config
        pg = placement.placement_groups[0]
        table = ray.util.placement_group_table(pg)
        res["engine"] = {
            "tp": llm.args.tensor_parallel_size, "max_seq_len": llm.args.max_seq_len,
            "max_input_len": llm.args.max_input_len, "max_num_tokens": llm.args.max_num_tokens,
            "bundles": placement.placement_bundle_indices, "group": table["name"], "group_bundles": table["bundles"],
            "workers": [ray.get(w.info.remote()) for w in llm.workers],
            "served": ray.get(llm.workers[0].weights.remote()),  # what worker 0 decodes with
            "shards": [ray.get(w.shards.remote()) for w in llm.workers], "requests": llm.requests}
    close_components(c)
    if rank == 0:
        res["groups_after"] = [g["name"] for g in ray.util.placement_group_table().values()
                               if g["name"].startswith("sdsearch-") and g["state"] != "REMOVED"]
    return res


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mtp, gtp", [(2, 1), (1, 2)], ids=["megatron_tp2_engine_tp1", "megatron_tp1_engine_tp2"])
def test_engines_on_every_gpu_whatever_the_training_layout_refitted_by_their_own_ranks(tmp_path, ray_head, mtp, gtp):
    """4 ranks, engines independent of the training layout: Megatron TP 2 x DP 2 with four engines of TP 1 (two per
    replica: every GPU generates), and Megatron TP 1 x DP 4 with two engines of TP 2 (each across two replicas).
    Each engine's workers sit on its block's devices and load only handles made by the rank on their own device
    (the re-shard: every rank holds the full tensors of its replica's stream, each worker keeps its engine-TP
    slice); after the step every worker holds its slice of the trained weights; each replica trained on its own
    questions' rollouts, which every engine helped generate."""
    pytest.importorskip("megatron.core")
    from _mp import run_workers
    from safetensors.torch import load_file

    from nemo_sdsearch.rollout.ray_cluster import node_ip
    from nemo_sdsearch.world.assets import default_model_dir

    out = tmp_path / "run"
    results = run_workers(_replica_engine_worker, 4, str(default_model_dir()), str(out), ray_head, mtp, gtp,
                          timeout=900)
    ip = node_ip()
    blocks = [list(range(s, s + gtp)) for s in range(0, 4, gtp)]
    # every block's first rank built exactly one engine, the other ranks none
    assert [r["engine"] is not None for r in results] == [rank % gtp == 0 for rank in range(4)]
    # no rank loaded a whole HF model, or read one: each rank read its shard's parts once per model it builds
    assert [r["whole_model_loads"] for r in results] == [0, 0, 0, 0]
    whole = (default_model_dir() / "model.safetensors").stat().st_size
    for r in results:
        b = r["bytes_read"]
        assert b["models"] == 2 and b["read"] == b["models"] * b["shard"], b
        assert b["shard"] < (0.6 if mtp == 2 else 1.01) * whole, b
    engines = [results[block[0]]["engine"] for block in blocks]
    assert [e["bundles"] for e in engines] == [[block] for block in blocks]
    assert all(e["group"] == engines[0]["group"] and e["group"].startswith("sdsearch-4242-") for e in engines)
    pids = [r["pid"] for r in results]
    final = load_file(out / "final" / "model.safetensors")
    for block, e in zip(blocks, engines):
        assert e["tp"] == gtp and e["requests"] > 0   # every engine generated
        assert [w["device_id"] for w in e["workers"]] == [cpu_device_id(ip, r) for r in block]
        # refit: each worker loaded only handles made by the rank on its own device
        assert [w["senders"] for w in e["workers"]] == [[pids[r]] for r in block]
        assert all(torch.equal(e["served"][k], final[k]) for k in final)
        for wrank, shards in enumerate(e["shards"]):
            assert shards and all(torch.equal(t, shard_of(final[n], wrank, gtp)) for n, t in shards.items()), wrank
    # each replica trained on its own questions' rollouts (a replica of mtp ranks: 4 questions x 4 over 4 / mtp)
    dp = 4 // mtp
    assert [len(r["updates"]) for r in results] == [1] * 4
    assert [len(r["updates"][0]["trajs"]) for r in results] == [16 // dp] * 4
    leaders = list(range(0, 4, mtp))
    shares = [results[r]["updates"][0] for r in leaders]
    assert all([t.token_ids for t in results[r]["updates"][0]["trajs"]] == [t.token_ids for t in shares[i]["trajs"]]
               for i, lead in enumerate(leaders) for r in range(lead, lead + mtp))
    assert len({t.question_id for u in shares for t in u["trajs"]}) == 4      # the replicas' questions: disjoint
    from test_trtllm_training import policy_logprobs, surrogate_gain
    from transformers import AutoModelForCausalLM

    adv = torch.cat([u["adv"] for u in shares])
    trajs = [t for u in shares for t in u["trajs"]]
    assert adv.abs().sum() > 0, "every group's rollouts scored alike: no policy gradient to check"
    before = AutoModelForCausalLM.from_pretrained(str(default_model_dir())).eval()
    after = AutoModelForCausalLM.from_pretrained(str(out / "final")).eval()
    gain = surrogate_gain([policy_logprobs(before, t, 1.0) for t in trajs],
                          [policy_logprobs(after, t, 1.0) for t in trajs], adv)
    assert gain > 0, (gain, adv)
    assert all(r["environ_after"] == LAUNCHER_ENV for r in results)
    # the job's placement group was removed at the end, after the engines shut down
    assert results[0]["groups_after"] == []
