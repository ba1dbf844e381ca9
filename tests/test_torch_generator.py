"""The torch generator backend: KV-cache continuation, stop strings, sampling, reproducibility."""

import pytest
import torch

from nemo_sdsearch.rollout.generator import SamplingParams, StopChecker
from nemo_sdsearch.rollout.torch_generator import TorchGenerator


def full_logprobs(model, ids, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, -1)


def test_kv_cache_continuation_matches_full_reforward(micro_model, tokenizer):
    """Multi-turn generation with holes (uneven turns, uneven inserts, released rows) gives the same
    log-probs as one dense forward of each row's own tokens."""
    gen = TorchGenerator(micro_model, tokenizer)
    prompts = [tokenizer.encode(t) for t in ["Where was Oskar born?", "A much longer prompt about a city and a year", "x"]]
    s = gen.open(prompts, seed=3)
    contexts = [list(p) for p in prompts]
    record = {r: [] for r in range(3)}  # (position, token, logprob)
    for turn, (inserts, release) in enumerate([({0: "Doc 1 text", 2: "a b c d e f"}, []),
                                               ({1: "z"}, [0]),
                                               ({}, [])]):
        outs = s.generate(SamplingParams(max_new_tokens=6 + 3 * turn, temperature=0.8))
        for r, c in outs.items():
            for tok, lp in zip(c.token_ids, c.logprobs):
                record[r].append((len(contexts[r]), tok, lp))
                contexts[r].append(tok)
        s.release(release)
        extra = {r: tokenizer.encode(t) for r, t in inserts.items() if r in s.rows}
        s.extend(extra)
        for r, ids in extra.items():
            contexts[r] += ids
            assert s.length(r) == len(contexts[r])
    for r in range(3):
        ref = full_logprobs(micro_model, contexts[r], 0.8)
        errs = [abs(ref[pos - 1, tok].item() - lp) for pos, tok, lp in record[r]]
        assert len(errs) >= 6 and max(errs) < 1e-4, (r, max(errs))


def test_seeded_generation_is_reproducible(micro_model, tokenizer):
    gen = TorchGenerator(micro_model, tokenizer)
    prompts = [tokenizer.encode("Who founded it?")] * 4
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = gen.open(prompts, seed=7).generate(p)
    b = gen.open(prompts, seed=7).generate(p)
    c = gen.open(prompts, seed=8).generate(p)
    assert [a[i].token_ids for i in range(4)] == [b[i].token_ids for i in range(4)]
    assert [a[i].logprobs for i in range(4)] == [b[i].logprobs for i in range(4)]
    assert [a[i].token_ids for i in range(4)] != [c[i].token_ids for i in range(4)]


def test_greedy_is_argmax(micro_model, tokenizer):
    gen = TorchGenerator(micro_model, tokenizer)
    prompt = tokenizer.encode("In what year was it founded?")
    out = gen.open([prompt]).generate(SamplingParams(max_new_tokens=5, temperature=0.0))[0]
    ctx = list(prompt)
    for tok, lp in zip(out.token_ids, out.logprobs):
        ref = full_logprobs(micro_model, ctx)
        assert tok == int(ref[-1].argmax()) and lp == pytest.approx(ref[-1, tok].item(), abs=1e-4)
        ctx.append(tok)


def test_top_p_keeps_only_the_nucleus():
    from nemo_sdsearch.rollout.torch_generator import _sample

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(_sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g)[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_stop_string_split_across_tokens(char_tokenizer):
    checker = StopChecker(char_tokenizer, ["</search>"], eos_token_ids=[0])
    ids = []
    results = []
    for ch in "abc </sear":
        ids.append(ord(ch))
        results.append(checker.check(ids))
    assert all(r == (None, None) for r in results)
    for ch in "ch>":
        ids.append(ord(ch))
    assert checker.check(ids) == ("stop", "</search>")
    assert checker.check([ord("a"), 0]) == ("eos", None)
    # A stop string that occurred earlier does not fire again on a later token.
    ids += [ord("x"), ord(">")]
    assert checker.check(ids) == (None, None)


def test_generation_stops_on_tag_token(micro_model, tokenizer):
    """With the tag as its own token, a turn ends exactly at it; without it the turn runs to the limit."""
    gen = TorchGenerator(micro_model, tokenizer)
    prompt = tokenizer.encode("q")
    free = gen.open([prompt], seed=0).generate(SamplingParams(max_new_tokens=40, temperature=1.0))[0]
    stop_tok = free.token_ids[5]
    stop_text = tokenizer.decode([stop_tok], skip_special_tokens=False)
    if not stop_text.strip():
        pytest.skip("sampled a whitespace token")
    out = gen.open([prompt], seed=0).generate(SamplingParams(max_new_tokens=40, temperature=1.0, stop=(stop_text,)))[0]
    first = next(i for i, t in enumerate(free.token_ids)
                 if stop_text in tokenizer.decode(free.token_ids[:i + 1], skip_special_tokens=False))
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
    assert free.finish_reason in ("length", "eos")


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_cache_keyword_follows_the_model_signature(micro_model):
    """transformers 5.24 renamed the decoder's `past_key_values` to `cache`; an unknown name would be
    swallowed by **kwargs (cache silently unused), so the generator reads the name from the signature."""
    import inspect

    from nemo_sdsearch.rollout.torch_generator import _cache_kwarg

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    assert (_cache_kwarg(New()), _cache_kwarg(Old())) == ("cache", "past_key_values")
    real = _cache_kwarg(micro_model.get_decoder())
    assert real in inspect.signature(micro_model.get_decoder().forward).parameters
