"""Megatron-core actor on CPU (gloo, 2 real processes): HF <-> Megatron conversion at TP 1 and 2, logits
and a training step equal to the HF backend, .nemo archives, training-state checkpoints, `sdsearch convert`.

The models are the `micro` Qwen2 config with random weights (scaled up from HF's 0.02 init so that a
wrong mapping shows up in the numbers), vocabulary 1000 (padded to 1024 by Megatron: the padding path
is exercised), tied and untied embeddings. All 2-process work runs in ONE spawn (module fixture
`tp2`): spawning costs more than the work.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from _mp import run_workers  # noqa: E402 - tests/ is on sys.path under pytest

VOCAB = 1000
# AdamW eps 1e-6 (both backends): Adam's first step moves every weight by ~lr * g / (|g| + eps), so
# gradients at float-noise level (the key bias's gradient is exactly 0 in exact arithmetic, softmax being
# shift invariant; after clipping the noise is ~1e-9) would be amplified to ~lr-sized, backend-specific
# updates with eps = 1e-8. With 1e-6 the noise stays noise and the weights agree to ~1e-6.
LR, WD, CLIP, EPS = 1e-3, 0.01, 0.5, 1e-6
SEQ_LENS = (9, 5, 7)
MICRO = ([0, 1], [2])            # rows of each micro-batch
TEMPERATURE = 0.7
ASSETS = Path(__file__).resolve().parents[1] / "nemo_sdsearch" / "world" / "assets" / "tiny"


# --------------------------------------------------------------------------------------------------
# shared pieces (used in the parent and in the workers)
# --------------------------------------------------------------------------------------------------
def make_hf(tied: bool, seed: int = 0):
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.world.model_config import qwen2_config

    cfg = qwen2_config("micro", VOCAB, eos_token_id=0, pad_token_id=1)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model.eval()


def sequences():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in SEQ_LENS]


def full_batch():
    from nemo_sdsearch.models.base import SequenceBatch

    return SequenceBatch.from_lists(sequences(), pad_id=1)


def micro_batches():
    from nemo_sdsearch.models.base import SequenceBatch

    seqs = sequences()
    return [SequenceBatch.from_lists([seqs[i] for i in rows], pad_id=1) for rows in MICRO]


def targets(batch):
    from nemo_sdsearch.models.base import positions_from_mask

    return positions_from_mask(batch.attention_mask.bool())


def mean_logprob_loss(actor, batch):
    rows, cols = targets(batch)
    return -actor.logprobs_at(batch, rows, cols).mean()


def train_once(actor):
    mbs = micro_batches()
    return actor.train_step(lambda i: mean_logprob_loss(actor, mbs[i]), len(mbs))


def hf_actor(model):
    from nemo_sdsearch.models.hf import HFActor

    actor = HFActor(model, lr=LR, weight_decay=WD, grad_clip=CLIP)
    for group in actor.optimizer.param_groups:
        group["eps"] = EPS
    return actor


def hf_logits(model, batch):
    from nemo_sdsearch.models.hf import HFScorer

    rows, cols = targets(batch)
    with torch.no_grad():
        return HFScorer(model).logits_at(batch, rows, cols)


# --------------------------------------------------------------------------------------------------
# the 2-process run
# --------------------------------------------------------------------------------------------------
STREAM_SHARD_BYTES = 100_000     # the micro model (~0.5-0.8 MB) in several shards
REFIT_BUCKET_BYTES = 40_000      # and several refit buckets, some tensors larger than one


def stream_consumers(actor, rank: int, tied: bool, out_dir: str) -> dict:
    """The two consumers of `actor.iter_weights()` on a distributed actor, every rank iterating each
    stream: the final-checkpoint writer (rank 0 writes) and a refit of a TRT-LLM API double (held by
    rank 0; the other ranks drain the stream). Live bytes of each stream measured (test_weight_stream)."""
    from collections import deque
    from types import SimpleNamespace

    from fake_trtllm import fake_generator
    from test_weight_stream import LiveBytes

    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    def settled(live: LiveBytes) -> tuple:
        # gloo's worker thread drops its reference to the last collective's tensor a moment after it
        # returned: give it that moment (a tensor that something really keeps stays counted)
        torch.distributed.barrier()
        for _ in range(100):
            if live.alive == 0:
                break
            time.sleep(0.01)
        return live.peak, live.largest, live.total, live.alive

    res: dict = {}
    live = LiveBytes(transport_slack=True)
    save_hf_checkpoint_from_stream(live.wrap(actor.iter_weights()), out_dir, actor.hf_config,
                                   shard_bytes=STREAM_SHARD_BYTES)
    res["write_live"] = settled(live)
    live = LiveBytes(transport_slack=True)
    if rank == 0:
        gen = fake_generator(make_hf(tied, seed=7), SimpleNamespace(eos_token_id=0, pad_token_id=1),
                             refit_bucket_bytes=REFIT_BUCKET_BYTES)
        gen.refit(live.wrap(actor.iter_weights()))
        res["refit_held"] = {k: v.clone() for k, v in gen.llm.model.state_dict().items()}
        res["refit_buckets"] = gen.llm.refits[-1]
        gen.shutdown()
    else:
        deque(live.wrap(actor.iter_weights()), maxlen=0)
    res["refit_live"] = settled(live)
    return res


def _tp2_worker(rank, world, dirs: dict, out: str):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    from nemo_sdsearch.models.megatron.training_state import (load_training_state, save_training_state,
                                                                 training_state_to_megatron)
    from nemo_sdsearch.models.megatron.hf_mapping import megatron_to_hf
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel
    from nemo_sdsearch.models.megatron.cpu_compat import apply_cpu_compat

    res: dict = {"compat": (apply_cpu_compat(), apply_cpu_compat(), str(torch.cuda.current_device()))}
    kw = dict(lr=LR, weight_decay=WD, grad_clip=CLIP, eps=EPS)
    init_parallel(2)
    res["tp"] = ps.get_tensor_model_parallel_world_size()
    batch = full_batch()
    rows, cols = targets(batch)
    for name, d in dirs.items():
        r: dict = {}
        actor = MegatronActor.from_hf(d, **kw)
        full = actor.full_logits_at(batch, rows, cols)
        local = actor.logits_at(batch, rows, cols)
        teacher = actor.teacher_logits_at(batch, rows, cols)
        r["full_logits"] = full.detach()
        r["local_shape"] = tuple(local.shape)
        real = max(0, min(actor.shard_size, actor.vocab_size - actor.vocab_start))
        r["local_is_slice"] = torch.equal(local[:, :real].detach(),
                                          full[:, actor.vocab_start:actor.vocab_start + real].detach())
        r["teacher_no_grad"] = (not teacher.requires_grad) and local.requires_grad and torch.equal(teacher, local.detach())
        r["logprobs"] = actor.logprobs_at(batch, rows, cols, temperature=TEMPERATURE).detach()
        r["exported"] = actor.export_weights()
        r["streamed"] = list(actor.iter_weights())
        r["stats"] = train_once(actor)
        r["after"] = actor.export_weights()
        r["consumers"] = stream_consumers(actor, rank, name == "tied", f"{out}/{name}_streamed_hf")
        # resume: save after step 1, take step 2; a fresh actor loads the checkpoint and takes step 2
        ck = f"{out}/{name}_state"
        save_training_state(ck, actor, extra={"step": 1})
        cfg, states, _ = training_state_to_megatron(ck)
        r["read_without_model"] = megatron_to_hf(states, cfg)
        r["stats2"] = train_once(actor)
        r["after2"] = actor.export_weights()
        fresh = MegatronActor.from_hf(d, **kw)
        r["extra"] = load_training_state(ck, fresh)
        r["resumed"] = fresh.export_weights()
        r["resumed_stats2"] = train_once(fresh)
        r["resumed_after2"] = fresh.export_weights()
        # a non-finite loss skips the update on every rank
        before = fresh.export_weights()
        r["nan_stats"] = fresh.train_step(lambda i: torch.tensor(float("nan"), requires_grad=True), 1)
        r["nan_unchanged"] = all(torch.equal(before[k], v) for k, v in fresh.export_weights().items())
        res[name] = r if rank == 0 else {k: r[k] for k in ("full_logits", "after", "streamed", "consumers")}
    # tensor parallel 1 x data parallel 2 (each replica gets the same micro-batches: the average is the same)
    init_parallel(1)
    actor = MegatronActor.from_hf(dirs["untied"], **kw)
    res["tp1"] = {"tp": ps.get_tensor_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
                  "full_logits": actor.logits_at(batch, rows, cols).detach(),
                  "stats": train_once(actor), "after": actor.export_weights()}
    res["tp1"]["streamed"] = list(actor.iter_weights())
    # resharding: the TP=2 training checkpoint (model + AdamW state) loads into this TP=1 x DP=2 actor
    res["tp1"]["extra"] = load_training_state(f"{out}/untied_state", actor)
    res["tp1"]["resharded"] = actor.export_weights()
    res["tp1"]["resharded_stats2"] = train_once(actor)
    res["tp1"]["resharded_after2"] = actor.export_weights()
    # bf16 weights under the torch AdamW (no fp32 master copy) are refused, not trained
    try:
        MegatronActor.from_hf(dirs["untied"], dtype=torch.bfloat16, optimizer="torch", **kw)
        res["bf16_torch_optimizer"] = "accepted"
    except ValueError as e:
        res["bf16_torch_optimizer"] = str(e)
    teardown_parallel()
    return res


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models, dirs = {}, {}
    for name, tied in (("tied", True), ("untied", False)):
        m = make_hf(tied)
        m.save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (root / name / f).write_bytes((ASSETS / f).read_bytes())
        models[name], dirs[name] = m, str(root / name)
    return models, dirs


@pytest.fixture(scope="module")
def tp2(hf_models, tmp_path_factory):
    _, dirs = hf_models
    out = tmp_path_factory.mktemp("tp2")
    results = run_workers(_tp2_worker, 2, dirs, str(out), timeout=240)
    return results, out


# --------------------------------------------------------------------------------------------------
# tests on the 2-process run
# --------------------------------------------------------------------------------------------------
def test_cpu_compat_applied_once(tp2):
    (r0, _), _ = tp2
    assert r0["compat"] == (True, True, "cpu") and r0["tp"] == 2


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tp2_logits_match_hf(tp2, hf_models, name):
    (r0, r1), _ = tp2
    ref = hf_logits(hf_models[0][name], full_batch())
    assert r0[name]["full_logits"].shape == ref.shape == (sum(SEQ_LENS) - len(SEQ_LENS), VOCAB)
    assert (r0[name]["full_logits"] - ref).abs().max().item() <= 1e-4
    assert torch.equal(r0[name]["full_logits"], r1[name]["full_logits"])   # every TP rank sees the same
    # logits_at at tp=2: this rank's shard of the padded vocabulary (1024 / 2 columns)
    assert r0[name]["local_shape"] == (ref.shape[0], 512) and r0[name]["local_is_slice"]
    assert r0[name]["teacher_no_grad"]


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tp2_vocab_parallel_logprobs_match_hf(tp2, hf_models, name):
    from nemo_sdsearch.models.hf import token_logprobs

    (r0, _), _ = tp2
    batch = full_batch()
    rows, cols = targets(batch)
    ref = token_logprobs(hf_logits(hf_models[0][name], batch), batch.input_ids[rows, cols], TEMPERATURE)
    assert (r0[name]["logprobs"] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tp2_export_weights_is_the_hf_state_dict_bit_exact(tp2, hf_models, name):
    (r0, _), _ = tp2
    ref = hf_models[0][name].state_dict()
    got = r0[name]["exported"]
    assert list(got) == list(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def assert_stream_is(streamed: list, state: dict, tied: bool) -> None:
    """A weight stream equals an HF state dict bit for bit: same order, a tied lm_head left out."""
    assert [n for n, _ in streamed] == [k for k in state if not (tied and k == "lm_head.weight")]
    assert all(t.dtype == state[n].dtype and torch.equal(t, state[n]) for n, t in streamed)


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tp2_weight_stream_is_the_export_bit_exact(tp2, hf_models, name):
    """The per-tensor stream equals the all-at-once export (and so the HF state dict), on every rank."""
    (r0, r1), _ = tp2
    for r in (r0, r1):
        assert_stream_is(r[name]["streamed"], r0[name]["exported"], name == "tied")
        assert_stream_is(r[name]["streamed"], hf_models[0][name].state_dict(), name == "tied")


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tp2_streamed_checkpoint_and_refit_hold_the_trained_weights(tp2, name):
    """Fed from the TP=2 stream after a step: rank 0's sharded HF directory loads with transformers and
    the TRT-LLM double holds exactly the trained weights; each consumer held at most one shard / bucket
    plus the largest tensor, and the rank that keeps nothing held one tensor at a time."""
    from transformers import AutoModelForCausalLM

    from test_weight_stream import check_buckets

    (r0, r1), out = tp2
    after = r0[name]["after"]
    d = out / f"{name}_streamed_hf"
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 2 and (d / "model.safetensors.index.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    got = loaded.state_dict()
    assert list(got) == list(after) and all(torch.equal(got[k], after[k]) for k in after)
    c0, c1 = r0[name]["consumers"], r1[name]["consumers"]
    held = c0["refit_held"]
    assert list(held) == list(after) and all(torch.equal(held[k], after[k]) for k in after)
    check_buckets(c0["refit_buckets"], REFIT_BUCKET_BYTES)
    for key, limit in (("write_live", STREAM_SHARD_BYTES), ("refit_live", REFIT_BUCKET_BYTES)):
        peak, largest, total, alive = c0[key]
        assert peak <= limit + largest < total and alive == 0
        peak, largest, total, alive = c1[key]
        assert peak == largest and alive == 0            # rank 1 only took part in the collectives


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tp2_train_step_matches_hf(tp2, hf_models, name):
    (r0, r1), _ = tp2
    model = copy.deepcopy(hf_models[0][name])
    ref_stats = train_once(hf_actor(model))
    stats = r0[name]["stats"]
    assert not stats["skipped"] and not ref_stats["skipped"]
    assert abs(stats["loss"] - ref_stats["loss"]) <= 1e-5
    assert abs(stats["grad_norm"] - ref_stats["grad_norm"]) <= 1e-5 * ref_stats["grad_norm"]
    assert ref_stats["grad_norm"] > CLIP                       # clipping was active
    ref = model.state_dict()
    after = r0[name]["after"]
    start = hf_models[0][name].state_dict()
    assert max((after[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5
    assert max((ref[k] - start[k]).abs().max().item() for k in ref) > 1e-4   # the step did move the weights
    assert all(torch.equal(after[k], r1[name]["after"][k]) for k in after)


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_training_state_resume_is_bit_exact(tp2, name):
    (r0, _), _ = tp2
    r = r0[name]
    assert r["extra"] == {"step": 1}
    assert all(torch.equal(r["resumed"][k], v) for k, v in r["after"].items())
    assert r["resumed_stats2"] == r["stats2"]
    assert all(torch.equal(r["resumed_after2"][k], v) for k, v in r["after2"].items())
    # the model part of the checkpoint reads back without building a model (what convert uses)
    assert all(torch.equal(r["read_without_model"][k], v) for k, v in r["after"].items())


def test_non_finite_loss_skips_the_step(tp2):
    (r0, _), _ = tp2
    for name in ("tied", "untied"):
        assert r0[name]["nan_stats"]["skipped"] and r0[name]["nan_unchanged"]


def test_bf16_weights_are_refused_by_the_torch_optimizer(tp2):
    results, _ = tp2
    msg = results[0]["bf16_torch_optimizer"]
    assert "fp32 master weights" in msg and "bfloat16" in msg


def test_tp1_dp2_matches_hf(tp2, hf_models):
    (r0, _), _ = tp2
    assert (r0["tp1"]["tp"], r0["tp1"]["dp"]) == (1, 2)
    ref = hf_logits(hf_models[0]["untied"], full_batch())
    assert r0["tp1"]["full_logits"].shape == ref.shape            # tp=1 gathers by default: HF shape
    assert (r0["tp1"]["full_logits"] - ref).abs().max().item() <= 1e-4
    model = copy.deepcopy(hf_models[0]["untied"])
    ref_stats = train_once(hf_actor(model))
    assert abs(r0["tp1"]["stats"]["loss"] - ref_stats["loss"]) <= 1e-5
    ref_w = model.state_dict()
    assert max((r0["tp1"]["after"][k] - ref_w[k]).abs().max().item() for k in ref_w) <= 1e-5
    assert_stream_is(r0["tp1"]["streamed"], r0["tp1"]["after"], tied=False)   # the TP=1 stream


def test_training_state_reshards_from_tp2_to_tp1(tp2):
    """A checkpoint written at TP=2 resumes at TP=1 x DP=2: the weights bit-exactly, the optimizer state
    too (the next step equals the TP=2 run's next step up to summation order)."""
    (r0, _), _ = tp2
    tp1, tp2run = r0["tp1"], r0["untied"]
    assert tp1["extra"] == {"step": 1}
    assert all(torch.equal(tp1["resharded"][k], v) for k, v in tp2run["after"].items())
    assert abs(tp1["resharded_stats2"]["loss"] - tp2run["stats2"]["loss"]) <= 1e-5
    assert max((tp1["resharded_after2"][k] - v).abs().max().item() for k, v in tp2run["after2"].items()) <= 1e-5


def test_convert_training_checkpoint_to_hf_cli(tp2, tmp_path):
    """`sdsearch convert` of a TP=2 training checkpoint (a real CLI process) -> a loadable HF dir."""
    from transformers import AutoModelForCausalLM

    (r0, _), out = tp2
    dst = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "nemo_sdsearch.cli", "convert", str(out / "untied_state"),
                           "--to", "hf", str(dst), "--threads", "1"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in r0["untied"]["after"].items())


# --------------------------------------------------------------------------------------------------
# conversion without processes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_hf_megatron_hf_bit_exact(hf_models, name, tp, tmp_path):
    from nemo_sdsearch.checkpoint.formats import load_sdsearch_archive, save_sdsearch_archive
    from nemo_sdsearch.models.megatron.hf_mapping import hf_to_megatron, megatron_to_hf
    from nemo_sdsearch.models.megatron.builder import layout_for

    model = hf_models[0][name]
    ref = model.state_dict()
    ranks = hf_to_megatron(ref, model.config, tp=tp)
    assert len(ranks) == tp
    emb = ranks[0]["embedding.word_embeddings.weight"]
    assert emb.shape == (1024 // tp, 64)
    assert ("output_layer.weight" in ranks[0]) == (name == "untied")
    # the QKV shard of rank r holds query group r: its 2 query heads, then its key and value heads
    hd, per = 16, 2
    q, k = ref["model.layers.0.self_attn.q_proj.weight"], ref["model.layers.0.self_attn.k_proj.weight"]
    g = tp - 1
    shard = ranks[-1]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(shard[:per * hd], q[(2 // tp) * g * per * hd:][:per * hd])
    assert torch.equal(shard[per * hd:(per + 1) * hd], k[(2 // tp) * g * hd:][:hd])
    back = megatron_to_hf(ranks, model.config)
    assert list(back) == list(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    # ... and through a .nemo archive
    path = save_sdsearch_archive(tmp_path / "m.nemo", ranks, model.config, layout_for(model.config, tp))
    cfg, states, layout = load_sdsearch_archive(path)
    assert (layout.tp, layout.padded_vocab_size, layout.tied) == (tp, 1024, name == "tied")
    assert cfg.to_dict() == model.config.to_dict()
    back = megatron_to_hf(states, cfg)
    assert list(back) == list(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_pipeline_parallel_split_and_te_names_round_trip(hf_models):
    """pp=2 stage split (layers renumbered per stage, the tied embedding copied to the last stage) and
    the Transformer Engine names (norms fused into linear_qkv / linear_fc1) convert back bit-exactly."""
    from nemo_sdsearch.models.megatron.hf_mapping import hf_to_megatron, megatron_to_hf

    for name in ("tied", "untied"):
        model = hf_models[0][name]
        ref = model.state_dict()
        ranks = hf_to_megatron(ref, model.config, tp=2, pp=2, te=True)
        assert len(ranks) == 4
        first, last = ranks[0], ranks[2]
        assert "embedding.word_embeddings.weight" in first and "decoder.final_layernorm.weight" not in first
        assert "embedding.word_embeddings.weight" not in last and "output_layer.weight" in last
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in last
        assert torch.equal(last["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
                           ref["model.layers.1.post_attention_layernorm.weight"])
        back = megatron_to_hf(ranks, model.config, pp=2)
        assert list(back) == list(ref) and all(torch.equal(back[k], ref[k]) for k in ref)


def test_convert_cli_hf_nemo_megatron_hf(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_sdsearch.cli import main

    model = hf_models[0]["untied"]
    src = hf_models[1]["untied"]
    nemo, mdir, hf_out = tmp_path / "m.nemo", tmp_path / "mg", tmp_path / "hf"
    assert main(["convert", src, "--to", "nemo", str(nemo), "--tp", "2"]) == 0
    assert main(["convert", str(nemo), "--to", "megatron", str(mdir), "--tp", "1"]) == 0
    assert main(["convert", str(mdir), "--to", "hf", str(hf_out)]) == 0
    assert (hf_out / "tokenizer.json").read_bytes() == (ASSETS / "tokenizer.json").read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(str(hf_out)).eval()
    sd, ref = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    batch = full_batch()
    assert torch.equal(hf_logits(loaded, batch), hf_logits(model, batch))
    assert main(["convert", str(tmp_path / "nothing"), "--to", "hf", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------------------------------
# GPU only (skipped here): the Transformer Engine spec when TE is installed, Megatron's DDP and
# DistributedOptimizer, NCCL
# --------------------------------------------------------------------------------------------------
def _gpu_worker(rank, world, d: str):
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    init_parallel(1)
    # weight decay 0: Megatron's optimizer exempts biases and norms from decay, the HF AdamW does not
    actor = MegatronActor.from_hf(d, lr=LR, weight_decay=0.0, grad_clip=CLIP, eps=EPS)
    batch = full_batch()
    rows, cols = targets(batch)
    logits = actor.full_logits_at(batch, rows, cols).detach().cpu()
    stats = train_once(actor)
    after = {k: v.cpu() for k, v in actor.export_weights().items()}
    teardown_parallel()
    return logits, stats, after, actor.ddp is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_distributed_optimizer_matches_hf(hf_models):
    logits, stats, after, megatron_opt = run_workers(_gpu_worker, 1, hf_models[1]["untied"], timeout=300)[0]
    model = copy.deepcopy(hf_models[0]["untied"])
    ref_logits = hf_logits(model, full_batch())
    hf = hf_actor(model)
    for group in hf.optimizer.param_groups:
        group["weight_decay"] = 0.0
    ref_stats = train_once(hf)
    assert megatron_opt
    assert (logits - ref_logits).abs().max().item() <= 1e-3
    assert abs(stats["loss"] - ref_stats["loss"]) <= 1e-4 * abs(ref_stats["loss"])
    ref = model.state_dict()
    assert max((after[k] - ref[k]).abs().max().item() for k in ref) <= 1e-4
