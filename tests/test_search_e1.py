"""Search-E1 OPSD mechanics: the LoRA round is the actor in adapter mode (models/hf.py) under the one OPSD step
(algorithms/opsd.py): the adapter-off teacher == the base model, merged == adapter-on, the loss is taken at policy
positions only, a step trains the adapter alone and the merge folds it into the weights; the pool survives a
restart."""

import copy
import json

import pytest
import torch

from nemo_sdsearch.algorithms.opsd import opsd_micro_batches, opsd_step
from nemo_sdsearch.algorithms.search_e1 import add_lora, build_pool, reference_text
from nemo_sdsearch.config import load_config
from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.core.spans import SpanType
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.losses.opsd_loss import OPSDLoss
from nemo_sdsearch.models.base import SequenceBatch
from nemo_sdsearch.models.hf import AdapterOff, HFActor, HFScorer

LORA = load_config("tiny_cpu", ["search_e1.lora_r=4"])


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def adapter_actor(model, lr=1e-3, seed=0) -> HFActor:
    """An HFActor over `model` in adapter mode (Search-E1's adapter, `add_lora`), the adapter's init seeded."""
    actor = HFActor(model, lr=lr, grad_clip=0.0)
    torch.manual_seed(seed)
    actor.enable_adapter(lambda m: add_lora(m, LORA))
    return actor


@pytest.fixture
def lora_model(micro_model):
    """(the base model, an HFActor over a copy of it in adapter mode with a trained-looking adapter)."""
    base = copy.deepcopy(micro_model)
    # (the adapter's seed: one under which every position of test_clip_bound_holds_per_term has a vocabulary term
    # above its tiny tau, so that the clip bites everywhere)
    actor = adapter_actor(copy.deepcopy(micro_model), seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would hide everything
        for name, p in actor.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base, actor


def test_adapter_off_is_exactly_the_base_model(lora_model):
    base, actor = lora_model
    ids = list(range(5, 40))
    on = logits_of(actor.peft, ids)
    with actor.peft.disable_adapter():
        off = logits_of(actor.peft, ids)
    assert torch.equal(off, logits_of(base, ids))
    assert (on - off).abs().max() > 1e-3  # the adapter does something


def test_merged_model_gives_adapter_on_logits(lora_model):
    _, actor = lora_model
    ids = list(range(7, 50))
    on = logits_of(actor.peft, ids)
    merged = actor.peft.merge_and_unload()
    assert torch.allclose(logits_of(merged, ids), on, atol=1e-5)


def hand_opsd_terms(peft_model, student, teacher, shift, mask, tau):
    """fp64 oracle of the OPSD terms for one sequence, from full forwards: at each policy position j >= 1 the
    student (adapter on) predicts token j from logits[j - 1] of its own sequence, the teacher (adapter off,
    frozen) from logits[j - 1 + shift] of the teacher sequence; term = sum_v min(p_v log(p_v / q_v), tau),
    p the teacher's distribution and q the student's."""
    s_logits = logits_of(peft_model, student).double()
    with peft_model.disable_adapter():
        t_logits = logits_of(peft_model, teacher).double()
    out = []
    for j in range(1, len(student)):
        if mask[j]:
            log_q = torch.log_softmax(s_logits[j - 1], -1)
            log_p = torch.log_softmax(t_logits[j - 1 + shift], -1)
            out.append(torch.clamp(log_p.exp() * (log_p - log_q), max=tau).sum())
    return torch.stack(out)


def opsd_terms(actor, students, teachers, shifts, masks, tau):
    """The per-position terms of what `opsd_step` trains on in adapter mode: its micro-batches
    (`opsd_micro_batches`, the teacher `adapter_off()`), the student's logits, the loss's clipped KL; the
    loss (`OPSDLoss`) at unit weights is their sum."""
    items = list(zip(students, teachers, shifts, masks))
    n = sum(sum(m[1:]) for m in masks)
    (mb,) = opsd_micro_batches(items, actor, actor.adapter_off(), 0, len(items), lambda ms: torch.ones(n))
    logits = actor.logits_at(mb.batch, mb.rows, mb.cols)
    terms = actor.vocab_shard.clipped_forward_kl(logits, mb.teacher_logits(), tau)
    loss, sums = OPSDLoss(tau, actor.vocab_shard)(logits, mb)
    assert sums["n"] == n and torch.allclose(loss, terms.sum())
    return terms


def test_opsd_loss_only_at_policy_positions(lora_model):
    _, actor = lora_model
    t = Trajectory.start("q", "Q", ["a"], [5, 6, 7])
    t.add_policy([8, 9, 10], [0.0] * 3, lambda ids: "<search>x</search>"[:len(ids)])
    t.add_environment([11, 12, 13, 14], SpanType.INFORMATION)
    t.add_policy([15, 16], [0.0] * 2, lambda ids: "ab"[:len(ids)])
    teacher = [20, 21, 22, 23] + t.response_ids()
    terms = opsd_terms(actor, [t.token_ids], [teacher], [1], [t.policy_mask()], 10.0)
    assert terms.shape == (5,)  # 3 + 2 policy tokens, none of the 4 information tokens
    want = hand_opsd_terms(actor.peft, t.token_ids, teacher, 1, t.policy_mask(), 10.0)
    assert torch.allclose(terms.double(), want, rtol=1e-4, atol=1e-6), (terms, want)
    # the teacher read at the student's positions (no shift) would be a different loss
    unshifted = hand_opsd_terms(actor.peft, t.token_ids, teacher, 0, t.policy_mask(), 10.0)
    assert (unshifted - want).abs().max() > 1e-3
    only_info = Trajectory.start("q", "Q", ["a"], [5, 6])
    only_info.add_environment([11, 12], SpanType.INFORMATION)
    assert opsd_terms(actor, [only_info.token_ids], [[1] + only_info.token_ids], [1],
                      [only_info.policy_mask()], 10.0).numel() == 0


def test_clip_bound_holds_per_term(lora_model):
    _, actor = lora_model
    seq = list(range(5, 30))
    mask = [False] * 5 + [True] * 20
    tiny = opsd_terms(actor, [seq], [seq], [0], [mask], 1e-3)
    same = opsd_terms(actor, [seq], [seq], [0], [mask], 10.0)
    # Teacher = the frozen policy on the same context: per position sum_v min(p_v log(p_v / q_v), tau), the
    # clip applied per vocabulary entry (before the sum), values checked against the fp64 hand computation
    want_tiny = hand_opsd_terms(actor.peft, seq, seq, 0, mask, 1e-3)
    want = hand_opsd_terms(actor.peft, seq, seq, 0, mask, 10.0)
    assert torch.allclose(tiny.double(), want_tiny, rtol=1e-4, atol=1e-7), (tiny, want_tiny)
    assert torch.allclose(same.double(), want, rtol=1e-4, atol=1e-6), (same, want)
    # the tiny tau bites (clipped < unclipped everywhere), tau = 10 does not (no entry reaches it): the plain
    # KL(base || base + adapter), > 0
    assert (tiny.double() < want - 1e-4).all()
    s_lp = torch.log_softmax(logits_of(actor.peft, seq).double(), -1)
    with actor.peft.disable_adapter():
        t_lp = torch.log_softmax(logits_of(actor.peft, seq).double(), -1)
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)[4:24]      # positions 5..24 predicted from rows 4..23
    assert torch.allclose(same.double(), kl, rtol=1e-4, atol=1e-6) and (kl > 1e-4).all()


# ---------------------------------------------------------------------------------------------------
# The LoRA round is the actor in adapter mode under the one OPSD step
# ---------------------------------------------------------------------------------------------------
def _items():
    """(student ids, teacher ids, shift, policy mask) of two pairs: the teacher reads a longer prompt."""
    a, b = list(range(5, 30)), list(range(40, 58))
    ma, mb = [False] * 6 + [True] * 19, [False] * 4 + [True] * 14
    return [(a, [70, 71, 72] + a[1:], 2, ma), (b, [80] * 5 + b[2:], 3, mb)]


def test_adapter_off_teacher_gives_the_base_models_logits_in_fp64(micro_model):
    """The LoRA teacher (`adapter_off()`, what `opsd_step` scores the teacher through) is the base model: with the
    model in fp64, its logits at the micro-batch's teacher positions are the base model's through the same teacher
    pass bit for bit, and a plain fp64 forward's to fp32 rounding (the scorer returns fp32 logits), while the
    student (adapter on) differs."""
    base = copy.deepcopy(micro_model).double()
    actor = HFActor(copy.deepcopy(micro_model), lr=1e-3)   # (built on fp32 master weights, then run in fp64)
    actor.model.double()
    torch.manual_seed(0)
    actor.enable_adapter(lambda m: add_lora(m, LORA))
    with torch.no_grad():
        for name, p in actor.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    assert all(p.dtype == torch.float64 for p in actor.model.parameters())
    items = _items()
    (mb,) = opsd_micro_batches(items, actor, actor.adapter_off(), 0, 2, lambda ms: torch.ones(33))
    assert isinstance(mb.teacher_logits.scorer, AdapterOff)
    teacher = mb.teacher_logits()
    tb = SequenceBatch.from_lists([x[1] for x in items], 0)
    rows, cols = mb.teacher_logits.rows, mb.teacher_logits.cols
    assert torch.equal(teacher, HFScorer(base).teacher_logits_at(tb, rows, cols))
    full = torch.stack([logits_of(base, items[r][1])[c - 1] for r, c in zip(rows.tolist(), cols.tolist())])
    assert full.dtype == torch.float64
    torch.testing.assert_close(teacher.double(), full, rtol=0, atol=1e-6)
    student = actor.logits_at(mb.batch, mb.rows, mb.cols).detach()
    assert (student - teacher).abs().max() > 1e-3


def test_a_lora_step_trains_the_adapter_alone_and_the_merge_folds_it_in(micro_model):
    """`opsd_step` in adapter mode: the actor's own optimizer moves the adapter and no base weight; the weight
    stream (`iter_weights`: refit, out/merged) gives the merged weights under the plain names; `merge_adapter`
    ends the mode with exactly those weights, every weight trainable again."""
    plain = {k: v.clone() for k, v in micro_model.state_dict().items()}
    actor = adapter_actor(copy.deepcopy(micro_model), lr=1e-2)
    model = actor.model
    assert sum(p.numel() for p in actor.optimizer.param_groups[0]["params"]) == \
        sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = lambda: {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}  # noqa: E731
    before, adapter0 = base(), actor.adapter_state()
    assert all(float(v.abs().max()) == 0 for k, v in adapter0.items() if "lora_B" in k)  # B starts at zero
    e1 = load_config("tiny_cpu", ["search_e1.opsd_micro_batch_size=1", "search_e1.tau_clip=10.0"]).search_e1
    out = opsd_step(actor, actor.adapter_off(), _items(), e1, pad_id=0)
    assert not out["skipped"] and out["loss"] > 0 and out["grad_norm"] > 0
    assert all(torch.equal(v, before[k]) for k, v in base().items())          # no base weight moved
    adapter1 = actor.adapter_state()
    assert any(not torch.equal(adapter1[k], adapter0[k]) for k in adapter0 if "lora_B" in k)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    # the stream: the plain names, the adapted projections merged, everything else the base weights
    stream = dict(actor.iter_weights())
    assert set(stream) | {"lm_head.weight"} == set(plain) | {"lm_head.weight"}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(stream[q], plain[q])
    assert torch.equal(stream["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])
    ids = list(range(7, 40))
    on = logits_of(model, ids)
    actor.merge_adapter()
    assert actor.peft is None and list(model.state_dict()) == list(plain)
    assert all(torch.equal(v, stream[k]) for k, v in actor.iter_weights())    # the merge is what was streamed
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in actor.optimizer.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(logits_of(model, ids), on, rtol=0, atol=1e-5)


def test_the_first_lora_step_is_the_full_parameter_step(micro_model):
    """One OPSD step serves both modes: at the start of a round (the adapter zero) the LoRA step's student and
    teacher are the full mode's (the actor, a frozen copy of it), so the loss of `opsd_step` is the same."""
    e1 = load_config("tiny_cpu", ["search_e1.opsd_micro_batch_size=1"]).search_e1
    lora = adapter_actor(copy.deepcopy(micro_model))
    full, ref = HFActor(copy.deepcopy(micro_model), lr=1e-3), HFScorer(copy.deepcopy(micro_model))
    a = opsd_step(lora, lora.adapter_off(), _items(), e1, pad_id=0)
    b = opsd_step(full, ref, _items(), e1, pad_id=0)
    assert a["loss"] == b["loss"] > 0


def test_adapter_mode_refuses_what_reads_weights_by_name(micro_model):
    actor = adapter_actor(copy.deepcopy(micro_model))
    with pytest.raises(RuntimeError, match="adapter mode"):
        actor.load_weights_from_dir("/nonexistent")
    with pytest.raises(RuntimeError, match="adapter mode already"):
        actor.enable_adapter(lambda m: add_lora(m, LORA))
    actor.merge_adapter()
    with pytest.raises(RuntimeError, match="not in adapter mode"):
        actor.adapter_off()


def test_reference_text_omits_information_by_default(char_tokenizer):
    tok = char_tokenizer
    t = Trajectory.start("q", "Q", ["a"], tok.encode("P"))
    t.add_policy(tok.encode("<search>x</search>"), [0.0] * 18, tok.decode)
    t.add_environment(tok.encode("<information>doc</information>"))
    t.add_policy(tok.encode("<answer>a</answer>"), [0.0] * 18, tok.decode)
    short = reference_text(t, tok.decode, False, 1000)
    assert "doc" not in short and "<search>x</search><answer>a</answer>" in short
    assert "doc" in reference_text(t, tok.decode, True, 1000)


def test_pool_is_appended_and_resumed(micro_model, tokenizer, bundle, tmp_path):
    from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator
    from nemo_sdsearch.retrieval import BM25Retriever

    engine = RolloutEngine(TorchGenerator(micro_model, tokenizer), BM25Retriever(bundle.train_world.passages),
                           RolloutConfig(max_turns=1, max_new_tokens=8, max_context=400))
    qs = [QA.from_flashrag(q.to_flashrag()) for q in bundle.train[:3]]
    path = tmp_path / "pool.jsonl"
    first = build_pool(engine, qs[:2], 2, seed=0, path=path, batch_questions=1)
    assert len(path.read_text().splitlines()) == 2
    calls = []
    original = engine.run
    engine.run = lambda batch, **kw: calls.append([q.id for q in batch]) or original(batch, **kw)
    full = build_pool(engine, qs, 2, seed=0, path=path, batch_questions=1)
    assert calls == [[qs[2].id]]  # only the missing question was rolled out again
    assert [t.token_ids for t in full[0]] == [t.token_ids for t in first[0]]
    assert all(len(g) == 2 for g in full) and len(path.read_text().splitlines()) == 3
    # ... and the resumed pool is the pool of a run that never stopped (a batch's seed is its place in the whole
    # question list, not among the questions left)
    straight = build_pool(engine, qs, 2, seed=0, path=tmp_path / "straight.jsonl", batch_questions=1)
    assert [[t.token_ids for t in g] for g in full] == [[t.token_ids for t in g] for g in straight]
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q.id for q in qs]

    # a crash cut the last line in the middle: resuming drops it (with a warning), rolls its question out again
    # and appends whole lines after the last whole one
    text = path.read_text()
    path.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])
    calls.clear()
    again = build_pool(engine, qs, 2, seed=0, path=path, batch_questions=1)
    assert calls == [[qs[2].id]]
    assert [t.token_ids for t in again[2]] == [t.token_ids for t in full[2]]
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q.id for q in qs]
    # a damaged line that is not the last one is an error that names it
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a pool row"):
        build_pool(engine, qs, 2, seed=0, path=path, batch_questions=1)
