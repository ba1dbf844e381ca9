"""Search-E1 OPSD mechanics: adapter-off teacher == base model, merged == adapter-on, the loss is
taken at policy positions only, the pool survives a restart."""

import copy
import json

import pytest
import torch

from nemo_sdsearch.algorithms.search_e1 import add_lora, build_pool, opsd_loss_terms, reference_text
from nemo_sdsearch.config import load_config
from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.core.spans import SpanType
from nemo_sdsearch.core.trajectory import Trajectory


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture
def lora_model(micro_model):
    base = copy.deepcopy(micro_model)
    peft_model = add_lora(copy.deepcopy(micro_model), load_config("tiny_cpu", ["search_e1.lora_r=4"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would hide everything
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base, peft_model


def test_adapter_off_is_exactly_the_base_model(lora_model):
    base, peft_model = lora_model
    ids = list(range(5, 40))
    on = logits_of(peft_model, ids)
    with peft_model.disable_adapter():
        off = logits_of(peft_model, ids)
    assert torch.equal(off, logits_of(base, ids))
    assert (on - off).abs().max() > 1e-3  # the adapter does something


def test_merged_model_gives_adapter_on_logits(lora_model):
    _, peft_model = lora_model
    ids = list(range(7, 50))
    on = logits_of(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert torch.allclose(logits_of(merged, ids), on, atol=1e-5)


def hand_opsd_terms(peft_model, student, teacher, shift, mask, tau):
    """fp64 oracle of opsd_loss_terms for one sequence, from full forwards: at each policy position j >= 1 the
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


def test_opsd_loss_only_at_policy_positions(lora_model):
    _, peft_model = lora_model
    t = Trajectory.start("q", "Q", ["a"], [5, 6, 7])
    t.add_policy([8, 9, 10], [0.0] * 3, lambda ids: "<search>x</search>"[:len(ids)])
    t.add_environment([11, 12, 13, 14], SpanType.INFORMATION)
    t.add_policy([15, 16], [0.0] * 2, lambda ids: "ab"[:len(ids)])
    teacher = [20, 21, 22, 23] + t.response_ids()
    terms = opsd_loss_terms(peft_model, 0, [t.token_ids], [teacher], [1], [t.policy_mask()], 10.0)
    assert terms.shape == (5,)  # 3 + 2 policy tokens, none of the 4 information tokens
    want = hand_opsd_terms(peft_model, t.token_ids, teacher, 1, t.policy_mask(), 10.0)
    assert torch.allclose(terms.double(), want, rtol=1e-4, atol=1e-6), (terms, want)
    # the teacher read at the student's positions (no shift) would be a different loss
    unshifted = hand_opsd_terms(peft_model, t.token_ids, teacher, 0, t.policy_mask(), 10.0)
    assert (unshifted - want).abs().max() > 1e-3
    only_info = Trajectory.start("q", "Q", ["a"], [5, 6])
    only_info.add_environment([11, 12], SpanType.INFORMATION)
    assert opsd_loss_terms(peft_model, 0, [only_info.token_ids], [[1] + only_info.token_ids], [1],
                           [only_info.policy_mask()], 10.0).numel() == 0


def test_clip_bound_holds_per_term(lora_model):
    _, peft_model = lora_model
    seq = list(range(5, 30))
    mask = [False] * 5 + [True] * 20
    tiny = opsd_loss_terms(peft_model, 0, [seq], [seq], [0], [mask], 1e-3)
    same = opsd_loss_terms(peft_model, 0, [seq], [seq], [0], [mask], 10.0)
    # Teacher = the frozen policy on the same context: per position sum_v min(p_v log(p_v / q_v), tau), the
    # clip applied per vocabulary entry (before the sum), values checked against the fp64 hand computation
    want_tiny = hand_opsd_terms(peft_model, seq, seq, 0, mask, 1e-3)
    want = hand_opsd_terms(peft_model, seq, seq, 0, mask, 10.0)
    assert torch.allclose(tiny.double(), want_tiny, rtol=1e-4, atol=1e-7), (tiny, want_tiny)
    assert torch.allclose(same.double(), want, rtol=1e-4, atol=1e-6), (same, want)
    # the tiny tau bites (clipped < unclipped everywhere), tau = 10 does not (no entry reaches it): the plain
    # KL(base || base + adapter), > 0
    assert (tiny.double() < want - 1e-4).all()
    s_lp = torch.log_softmax(logits_of(peft_model, seq).double(), -1)
    with peft_model.disable_adapter():
        t_lp = torch.log_softmax(logits_of(peft_model, seq).double(), -1)
    kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)[4:24]      # positions 5..24 predicted from rows 4..23
    assert torch.allclose(same.double(), kl, rtol=1e-4, atol=1e-6) and (kl > 1e-4).all()


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
