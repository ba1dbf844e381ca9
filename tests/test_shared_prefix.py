"""The HF teacher pass encodes each common prefix once (`models.hf.shared_prefix_hidden`): SD-Search's teacher
sequences of one group share the instruction, the question and the hindsight block. Against one forward of the
whole batch in fp64: the same hidden states and the same teacher logits."""

from __future__ import annotations

import pytest
import torch

from nemo_sdsearch.models.base import SequenceBatch
from nemo_sdsearch.models.hf import HFScorer, load_model_and_tokenizer, prefix_groups, shared_prefix_hidden
from nemo_sdsearch.world.assets import default_model_dir


def _rand(g, n):
    return torch.randint(5, 2000, (n,), generator=g).tolist()


def _batch():
    g = torch.Generator().manual_seed(0)
    p = _rand(g, 40)
    seqs = [p + _rand(g, 3), p + _rand(g, 10), p + _rand(g, 7),   # a run: 40 tokens in common
            _rand(g, 30),                                        # alone (so nothing is common to all)
            p[:20] + _rand(g, 12), p + [1, 2, 3],                # a run of 20 (the run's first row decides)
            p[:10] + _rand(g, 5)]                                # 10 < SHARED_PREFIX_MIN: alone
    return SequenceBatch.from_lists(seqs, pad_id=0)


def _teacher_like_batch():
    """SD-Search's teacher micro-batch: an instruction common to all, a group's question and block per run."""
    g = torch.Generator().manual_seed(1)
    instruction, q1, q2 = _rand(g, 24), _rand(g, 30), _rand(g, 18)
    seqs = [instruction + q1 + _rand(g, n) for n in (5, 9, 2)] + [instruction + q2 + _rand(g, n) for n in (7, 4)]
    seqs.append(instruction + _rand(g, 11))                           # shares only the instruction
    return SequenceBatch.from_lists(seqs, pad_id=0)


def test_rows_are_grouped_by_their_common_prefix():
    b = _batch()
    assert prefix_groups(b.input_ids, b.attention_mask.sum(1)) == (
        0, [([0, 1, 2], 40), ([3], 0), ([4, 5], 20), ([6], 0)])
    t = _teacher_like_batch()
    assert prefix_groups(t.input_ids, t.attention_mask.sum(1)) == (24, [([0, 1, 2], 54), ([3, 4], 42), ([5], 24)])
    # a row identical to the run's first keeps a token of its own: the prefix stops one short of the shorter
    same = SequenceBatch.from_lists([list(range(5, 25))] * 2, pad_id=0)
    assert prefix_groups(same.input_ids, same.attention_mask.sum(1)) == (19, [([0], 19), ([1], 19)])


@pytest.mark.parametrize("make", [_batch, _teacher_like_batch], ids=["runs", "common_and_runs"])
def test_shared_prefix_hidden_states_and_teacher_logits_equal_one_forward_in_fp64(make):
    model, _ = load_model_and_tokenizer(default_model_dir(), device="cpu")
    model = model.double()
    b = make()
    decoder = model.get_decoder()
    with torch.no_grad():
        whole = decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state
        shared = shared_prefix_hidden(decoder, b)
    real = b.attention_mask.bool()
    assert (whole[real] - shared[real]).abs().max().item() < 1e-12
    scorer = HFScorer(model)
    rows, cols = real.nonzero(as_tuple=True)
    keep = cols > 0
    rows, cols = rows[keep], cols[keep]
    teacher = scorer.teacher_logits_at(b, rows, cols)
    with torch.no_grad():
        dense = scorer.logits_at(b, rows, cols)
    assert teacher.shape == dense.shape == (rows.numel(), model.config.vocab_size)
    assert (teacher - dense).abs().max().item() < 1e-10
