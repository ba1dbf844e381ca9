"""The HF teacher pass encodes each common prefix once (`models.hf.shared_prefix_hidden`): SD-Search's teacher
sequences of one group share the instruction, the question and the hindsight block. Against one forward of the
whole batch in fp64: the same hidden states and the same teacher logits."""

from __future__ import annotations

import torch

from nemo_sdsearch.models.base import SequenceBatch
from nemo_sdsearch.models.hf import HFScorer, load_model_and_tokenizer, prefix_groups, shared_prefix_hidden
from nemo_sdsearch.world.assets import default_model_dir


def _batch():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(5, 2000, (n,), generator=g).tolist()
    p = rand(40)
    seqs = [p + rand(3), p + rand(10), p + rand(7),   # a group: 40 tokens in common
            rand(30),                                 # alone
            p[:20] + rand(12), p + [1, 2, 3],         # a group of 20 (the run's first row decides)
            p[:10] + rand(5)]                         # 10 < SHARED_PREFIX_MIN: alone
    return SequenceBatch.from_lists(seqs, pad_id=0)


def test_rows_are_grouped_by_their_common_prefix():
    b = _batch()
    assert prefix_groups(b.input_ids, b.attention_mask.sum(1)) == [([0, 1, 2], 40), ([3], 0), ([4, 5], 20), ([6], 0)]
    # a row identical to the run's first keeps a token of its own: the prefix stops one short of the shorter
    same = SequenceBatch.from_lists([list(range(5, 25))] * 2, pad_id=0)
    assert prefix_groups(same.input_ids, same.attention_mask.sum(1)) == [([0, 1], 19)]


def test_shared_prefix_hidden_states_and_teacher_logits_equal_one_forward_in_fp64():
    model, _ = load_model_and_tokenizer(default_model_dir(), device="cpu")
    model = model.double()
    b = _batch()
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
