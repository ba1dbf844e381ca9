"""Pipeline parallelism in `MegatronActor` through megatron-core's REAL schedules, on CPU over gloo.

megatron-core 0.16's schedules allocate their token counter with `torch.zeros(..., device="cuda")` and, for
a pp > 1 model with tied embeddings, `LanguageModule` moves the last stage's embedding copy with `.cuda()`;
`cpu_compat` (patches 7 and 8) maps both to the CPU, and the rest (p2p with `batch_isend_irecv`, shape
exchange for variable sequence lengths) runs unchanged over gloo. So:

(a) pp=1: the real `forward_backward_no_pipelining` gives the closure path's loss, gradients and weights.
(b) pp=2 (2 gloo processes), untied and tied embeddings: the stage split (pre/post_process, global layer
    numbers, the tied copy on the last stage), the schedule selected and the arguments the actor gives it,
    and the real 1F1B schedule (`forward_backward_pipelining_without_interleaving`) against pp=1: log-probs,
    loss, gradients, weights, the tied copies after the update, and the non-finite skip on every stage.
(c) GPU only: the same pp=2 comparison on 2 GPUs (NCCL p2p).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from _mp import run_workers  # noqa: E402
from test_megatron import (CLIP, EPS, LR, MICRO, REFIT_BUCKET_BYTES, SEQ_LENS, STREAM_SHARD_BYTES,  # noqa: E402
                           TEMPERATURE, WD, assert_stream_is, full_batch, make_hf, micro_batches,
                           stream_consumers, targets)


def pipeline_batches():
    from nemo_sdsearch.models.megatron.actor import PipelineMicroBatch

    out = []
    for mb in micro_batches():
        rows, cols = targets(mb)
        adv = torch.linspace(-1.0, 2.0, rows.numel())          # a per-row tensor the loss needs
        out.append(PipelineMicroBatch(mb, rows, cols, {"adv": adv}))
    return out


def pg_loss(outputs, mb):
    return -(outputs.logprobs(TEMPERATURE) * mb.extra["adv"]).mean()


def closure_loss(actor, mb):
    return -(actor.logprobs_at(mb.batch, mb.rows, mb.cols, temperature=TEMPERATURE) * mb.extra["adv"]).mean()


def capture_grads(actor) -> dict:
    """Record the (clipped) gradients right before the optimizer step."""
    got: dict = {}
    real = actor.optimizer.step

    def step(*a, **k):
        got.update({n: p.grad.detach().clone() for n, p in actor.model.named_parameters() if p.grad is not None})
        return real(*a, **k)

    actor.optimizer.step = step
    return got


def hf_named(grads: dict, hf_config, pp_rank: int, pp: int) -> dict:
    from nemo_sdsearch.models.megatron.hf_mapping import merge_stage

    return merge_stage([grads], hf_config, pp_rank, pp)


def _worker(rank, world, d: str):
    warnings.filterwarnings("ignore")
    import megatron.core.pipeline_parallel as mpp
    from megatron.core.pipeline_parallel import schedules

    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    kw = dict(lr=LR, weight_decay=WD, grad_clip=CLIP, eps=EPS)
    batch = full_batch()
    rows, cols = targets(batch)
    res: dict = {}

    # ---------------- pp = 2 -------------------------------------------------------------------------
    init_parallel(1, pp=2)
    actor = MegatronActor.from_hf(d, **kw)
    m = actor.model
    res["loaded_export"] = actor.export_weights()
    res["loaded_streamed"] = list(actor.iter_weights())
    res["structure"] = dict(pp=actor.pp, first=actor.is_first_stage, last=actor.is_last_stage,
                            pre=m.pre_process, post=m.post_process,
                            layers=[layer.layer_number for layer in m.decoder.layers],
                            embedding=hasattr(m, "embedding"), output_layer=hasattr(m, "output_layer"),
                            final_norm=m.decoder.final_layernorm is not None,
                            varlen=m.config.variable_seq_lengths, pipeline_dtype=m.config.pipeline_dtype,
                            schedule=schedules.get_forward_backward_func().__name__)
    if actor.is_last_stage and m.share_embeddings_and_output_weights:
        from nemo_sdsearch.models.weights_reader import read_hf_dir

        emb = read_hf_dir(d)[1]["model.embed_tokens.weight"]
        res["structure"]["tied_copy_equal"] = torch.equal(m.shared_embedding_or_output_weight()[:emb.shape[0]], emb)
    calls: list = []
    real_get = mpp.get_forward_backward_func
    real_schedule = real_get()

    def recording(**k):
        calls.append({n: k[n] for n in ("num_microbatches", "seq_length", "micro_batch_size", "forward_only")}
                     | {"model_is_list": isinstance(k["model"], list)})
        return real_schedule(**k)

    mpp.get_forward_backward_func = lambda *a, **k: recording
    try:
        try:
            actor.train_step(lambda i: torch.zeros(()), 1)
            res["closure_refused"] = False
        except NotImplementedError:
            res["closure_refused"] = True
        res["logprobs"] = actor.logprobs_at(batch, rows, cols, temperature=TEMPERATURE)
        logits = actor.logits_at(batch, rows, cols)
        res["logits"] = None if logits is None else logits.detach()
        grads = capture_grads(actor)
        res["stats"] = actor.train_step_pipeline(pipeline_batches(), pg_loss)
        res["grads"] = hf_named(grads, actor.hf_config, rank, 2)
        res["after"] = actor.export_weights()
        res["streamed_after"] = list(actor.iter_weights())
        res["consumers"] = stream_consumers(actor, rank, m.share_embeddings_and_output_weights, f"{d}_streamed_hf")
        if m.share_embeddings_and_output_weights:
            res["shared_after"] = m.shared_embedding_or_output_weight().detach().clone()
        before = res["after"]
        res["nan_stats"] = actor.train_step_pipeline(
            pipeline_batches(), lambda out, mb: out.logprobs().sum() * float("nan"))
        res["nan_unchanged"] = all(torch.equal(before[k], v) for k, v in actor.export_weights().items())
        res["calls"] = calls
    finally:
        mpp.get_forward_backward_func = real_get

    # ---------------- pp = 1 (x dp 2, same data on both replicas) ------------------------------------------
    init_parallel(1)
    ref = MegatronActor.from_hf(d, **kw)
    res["ref_logprobs"] = ref.logprobs_at(batch, rows, cols, temperature=TEMPERATURE).detach()
    res["ref_logits"] = ref.logits_at(batch, rows, cols).detach()
    pbs = pipeline_batches()
    g = capture_grads(ref)
    res["ref_stats"] = ref.train_step(lambda i: closure_loss(ref, pbs[i]), len(pbs))
    res["ref_grads"] = hf_named(g, ref.hf_config, 0, 1)
    res["ref_after"] = ref.export_weights()

    # the real forward_backward_no_pipelining
    sched = MegatronActor.from_hf(d, **kw)
    res["pp1_schedule"] = schedules.get_forward_backward_func().__name__
    g = capture_grads(sched)
    res["sched_stats"] = sched.train_step_pipeline(pipeline_batches(), pg_loss, use_schedule=True)
    res["sched_grads"] = hf_named(g, sched.hf_config, 0, 1)
    res["sched_after"] = sched.export_weights()

    # the CPU default at pp=1: the closure loop with the same loss_fn
    loop = MegatronActor.from_hf(d, **kw)
    res["loop_stats"] = loop.train_step_pipeline(pipeline_batches(), pg_loss)
    res["loop_after"] = loop.export_weights()
    teardown_parallel()
    return res


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "untied"
    make_hf(tied=False).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module", params=["untied", "tied"])
def model_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / request.param
    make_hf(tied=request.param == "tied").save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def runs(model_dir):
    return run_workers(_worker, 2, model_dir, timeout=300)


def _maxdiff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_pp2_stage_split_and_pipeline_path_selected(runs, model_dir):
    from transformers import AutoConfig

    L = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    s0, s1 = runs[0]["structure"], runs[1]["structure"]
    half = L // 2
    assert (s0["pp"], s0["first"], s0["last"], s0["pre"], s0["post"]) == (2, True, False, True, False)
    assert (s1["pp"], s1["first"], s1["last"], s1["pre"], s1["post"]) == (2, False, True, False, True)
    assert s0["layers"] == list(range(1, half + 1)) and s1["layers"] == list(range(half + 1, L + 1))
    assert s0["embedding"] and not s1["embedding"] and s1["output_layer"] and not s0["output_layer"]
    if model_dir.endswith("/tied"):  # the last stage holds a copy of the tied embedding, all-reduced at build
        assert s1["tied_copy_equal"]
    assert s1["final_norm"] and not s0["final_norm"]
    for s in (s0, s1):
        assert s["varlen"] and s["pipeline_dtype"] == torch.float32
        assert s["schedule"] == "forward_backward_pipelining_without_interleaving"
    for r in runs:
        assert r["closure_refused"]
        # logprobs_at, logits_at (forward only, 1 micro-batch each), train_step_pipeline and the NaN step
        assert r["calls"][0] == {"num_microbatches": 1, "seq_length": max(SEQ_LENS), "micro_batch_size": 3,
                                 "forward_only": True, "model_is_list": True}
        assert r["calls"][1]["forward_only"]
        assert r["calls"][2] == {"num_microbatches": len(MICRO), "seq_length": 9, "micro_batch_size": 2,
                                 "forward_only": False, "model_is_list": True}
        assert len(r["calls"]) == 4


def test_pp2_weight_stream_is_the_hf_state_dict_bit_exact(runs, model_dir):
    """At pp=2 each stage streams its own tensors and broadcasts them: both ranks receive the whole
    model, in HF order, bit-exactly (at load: the HF state dict; after a step: the export)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    tied = model_dir.endswith("/tied")
    for r in runs:
        got = r["loaded_export"]
        assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
        assert_stream_is(r["loaded_streamed"], ref, tied)
        assert_stream_is(r["streamed_after"], runs[0]["after"], tied)


def test_pp2_streamed_checkpoint_and_refit_hold_the_trained_weights(runs, model_dir):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from test_weight_stream import check_buckets

    after = runs[0]["after"]
    d = Path(f"{model_dir}_streamed_hf")
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 2
    got = AutoModelForCausalLM.from_pretrained(str(d)).state_dict()
    assert list(got) == list(after) and all(torch.equal(got[k], after[k]) for k in after)
    c0, c1 = runs[0]["consumers"], runs[1]["consumers"]
    held = c0["refit_held"]
    assert list(held) == list(after) and all(torch.equal(held[k], after[k]) for k in after)
    check_buckets(c0["refit_buckets"], REFIT_BUCKET_BYTES)
    for key, limit in (("write_live", STREAM_SHARD_BYTES), ("refit_live", REFIT_BUCKET_BYTES)):
        peak, largest, total, alive = c0[key]
        assert peak <= limit + largest < total and alive == 0
        peak, largest, total, alive = c1[key]
        assert peak == largest and alive == 0


def test_pp2_forward_only_scoring_matches_pp1(runs):
    r0, r1 = runs
    assert r0["logits"] is None                      # logits live on the last stage only
    assert (r1["logits"] - r0["ref_logits"]).abs().max().item() <= 1e-5
    for r in runs:                                   # log-probs are broadcast to every stage
        assert (r["logprobs"] - r0["ref_logprobs"]).abs().max().item() <= 1e-5
        assert not r["logprobs"].requires_grad


def test_pp2_train_step_matches_pp1(runs):
    r0, r1 = runs
    ref = r0["ref_stats"]
    assert not ref["skipped"] and ref["grad_norm"] > CLIP
    for r in runs:
        assert not r["stats"]["skipped"]
        assert abs(r["stats"]["loss"] - ref["loss"]) <= 1e-6
        assert abs(r["stats"]["grad_norm"] - ref["grad_norm"]) <= 1e-5 * ref["grad_norm"]
        assert _maxdiff(r["after"], r0["ref_after"]) <= 1e-5
    grads = r0["grads"] | r1["grads"]                 # each stage holds its own layers' gradients
    assert set(r0["grads"]).isdisjoint(r1["grads"])
    if "shared_after" in r1:  # tied: the last stage's copy of the embedding took the same update
        assert torch.equal(r1["shared_after"], r0["shared_after"])
    assert _maxdiff(grads, r0["ref_grads"]) <= 1e-6


def test_pp2_non_finite_loss_skips_on_every_stage(runs):
    for r in runs:
        assert r["nan_stats"]["skipped"] and r["nan_unchanged"]


def test_pp1_megatron_schedule_equals_closure_path(runs):
    r0 = runs[0]
    assert r0["pp1_schedule"] == "forward_backward_no_pipelining"
    ref, got = r0["ref_stats"], r0["sched_stats"]
    assert not got["skipped"]
    assert abs(got["loss"] - ref["loss"]) <= 1e-6
    assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-6 * ref["grad_norm"]
    assert _maxdiff(r0["sched_grads"], r0["ref_grads"]) <= 1e-6
    assert _maxdiff(r0["sched_after"], r0["ref_after"]) <= 1e-6
    # and the CPU default (no schedule at pp=1) is the closure path itself
    assert r0["loop_stats"] == ref
    assert _maxdiff(r0["loop_after"], r0["ref_after"]) == 0.0


# --------------------------------------------------------------------------------------------------
# GPU: the real pp=2 schedule (NCCL p2p) against pp=1
# --------------------------------------------------------------------------------------------------
def _gpu_worker(rank, world, d: str):
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import init_parallel, teardown_parallel

    kw = dict(lr=LR, weight_decay=0.0, grad_clip=CLIP, eps=EPS)
    batch = full_batch()
    rows, cols = targets(batch)
    out = {}
    for pp in (2, 1):
        init_parallel(1, pp=pp)
        actor = MegatronActor.from_hf(d, **kw)
        lp = actor.logprobs_at(batch, rows, cols, temperature=TEMPERATURE)
        stats = actor.train_step_pipeline(pipeline_batches(), pg_loss)
        out[pp] = {"logprobs": lp.detach().cpu(), "stats": stats,
                   "after": {k: v.cpu() for k, v in actor.export_weights().items()}}
    teardown_parallel()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_pp2_schedule_matches_pp1(untied_dir):
    for r in run_workers(_gpu_worker, 2, untied_dir, timeout=300):
        a, b = r[2], r[1]
        assert (a["logprobs"] - b["logprobs"]).abs().max().item() <= 1e-4
        assert not a["stats"]["skipped"] and not b["stats"]["skipped"]
        assert abs(a["stats"]["loss"] - b["stats"]["loss"]) <= 1e-4 * max(1.0, abs(b["stats"]["loss"]))
        assert abs(a["stats"]["grad_norm"] - b["stats"]["grad_norm"]) <= 1e-3 * b["stats"]["grad_norm"]
        assert _maxdiff(a["after"], b["after"]) <= 1e-4
