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


def test_opsd_loss_only_at_policy_positions(lora_model):
    _, peft_model = lora_model
    t = Trajectory.start("q", "Q", ["a"], [5, 6, 7])
    t.add_policy([8, 9, 10], [0.0] * 3, lambda ids: "<search>x</search>"[:len(ids)])
    t.add_environment([11, 12, 13, 14], SpanType.INFORMATION)
    t.add_policy([15, 16], [0.0] * 2, lambda ids: "ab"[:len(ids)])
    teacher = [20, 21, 22, 23] + t.response_ids()
    terms = opsd_loss_terms(peft_model, 0, [t.token_ids], [teacher], [1], [t.policy_mask()], 10.0)
    assert terms.shape == (5,)  # 3 + 2 policy tokens, none of the 4 information tokens
    assert (terms <= 10.0 * peft_model.config.vocab_size).all() and (terms > -1e-6).all()
    only_info = Trajectory.start("q", "Q", ["a"], [5, 6])
    only_info.add_environment([11, 12], SpanType.INFORMATION)
    assert opsd_loss_terms(peft_model, 0, [only_info.token_ids], [[1] + only_info.token_ids], [1],
                           [only_info.policy_mask()], 10.0).numel() == 0


def test_clip_bound_holds_per_term(lora_model):
    _, peft_model = lora_model
    seq = list(range(5, 30))
    mask = [False] * 5 + [True] * 20
    tiny = opsd_loss_terms(peft_model, 0, [seq], [seq], [0], [mask], 1e-3)
    # sum_v min(term_v, tau) <= vocab * tau, and with a tiny tau every positive term is clipped
    assert (tiny <= 1e-3 * peft_model.config.vocab_size + 1e-9).all()
    same = opsd_loss_terms(peft_model, 0, [seq], [seq], [0], [mask], 10.0)
    # Teacher = the frozen policy on the same context: KL(base || base + adapter) > 0 but finite.
    assert torch.isfinite(same).all() and (same > 0).all()


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
