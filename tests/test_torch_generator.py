"""The torch generator backend: KV-cache continuation, stop strings, sampling, reproducibility."""

from itertools import chain

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

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]])).expand(1000, 4)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # inverse CDF on a grid of uniforms
    ids, _ = _sample(logits, SamplingParams(temperature=1.0, top_p=0.8), u)
    assert torch.bincount(ids, minlength=4).tolist() == [667, 333, 0, 0]  # 0.6 / 0.9 and 0.3 / 0.9
    ids, _ = _sample(logits, SamplingParams(temperature=1.0), u)
    assert torch.bincount(ids, minlength=4).tolist() == [600, 300, 50, 50]
    edge = _sample(logits[:2], SamplingParams(temperature=1.0, top_p=0.8), torch.tensor([0.0, 1 - 2 ** -53]))[0]
    assert edge.tolist() == [0, 1]  # the ends of [0, 1) never reach a token outside the nucleus


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


# -- the row pool ----------------------------------------------------------------------------------------
INSTRUCTION = "Answer the question. Search with <search> query </search> when you need facts. Question: "
QUESTIONS = ["Where was Oskar born?", "Name the river.", "Who founded the city of Lorn?", "x", "In what year?",
             "Which of the two towns is older, Amsel or Brekk?", "Who wrote it?", "Where is the bridge?"]


@pytest.fixture
def one_thread():
    """The micro model's matmuls are too small for threads to pay: on a busy machine, synchronising
    two threads costs more than the work (seconds per test). One thread keeps these tests fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pool_prompts(tokenizer, n):
    return [tokenizer.encode(INSTRUCTION + QUESTIONS[r % len(QUESTIONS)] + " " * (r % 3)) for r in range(n)]


def drive(gen, prompts, params_for, env_for, seed=5):
    """Run a session to the end; returns per row the (token ids, log-probs) of every turn, and the session."""
    s = gen.open(prompts, seed=seed)
    turns = {r: 0 for r in range(len(prompts))}
    out = {r: [] for r in range(len(prompts))}

    def on_turn(completions):
        env = {}
        for r, c in completions.items():
            out[r].append((c.token_ids, c.logprobs))
            env[r] = env_for(r, turns[r])
            turns[r] += 1
        return env

    s.run(lambda r: params_for(r, turns[r]), on_turn)
    return out, s


@pytest.mark.parametrize("mode", ["sampled", "greedy", "mixed"])
def test_rows_do_not_depend_on_the_pool(micro_model, tokenizer, mode, one_thread):
    """64 rows through a pool of 4 slots, of 64, and one row at a time (pool of 1): every row samples the
    same tokens, with the same log-probs (to float rounding: batched matmuls round by batch shape), and
    takes the same turns: its random stream is its own, whatever shares its batch."""
    prompts = pool_prompts(tokenizer, 64)
    info = [tokenizer.encode(f"<information>Doc {r}: the river runs past the old town.</information>") for r in range(5)]
    temps = {"sampled": lambda r: 0.8, "greedy": lambda r: 0.0, "mixed": lambda r: (0.0, 1.0, 0.7)[r % 3]}[mode]

    def params_for(r, turn):
        return SamplingParams(max_new_tokens=3 + (r + turn) % 5, temperature=temps(r), top_p=0.9 if r % 2 else 1.0)

    def env_for(r, turn):  # rows end after 1 to 3 turns, some with retrieved passages, some with none
        return None if turn >= r % 3 else (info[r % 5] if (r + turn) % 2 else [])

    runs = {pool: drive(TorchGenerator(micro_model, tokenizer, max_concurrent_rows=pool), prompts, params_for, env_for)[0]
            for pool in (64, 4, 1)}
    ref = runs[64]
    assert sum(len(t) for t in ref.values()) == sum(1 + r % 3 for r in range(64))
    for pool in (4, 1):
        for r in range(64):
            assert [ids for ids, _ in runs[pool][r]] == [ids for ids, _ in ref[r]], (pool, r)
            got = [lp for _, lps in runs[pool][r] for lp in lps]
            want = [lp for _, lps in ref[r] for lp in lps]
            assert got == pytest.approx(want, abs=1e-5), (pool, r)
    if mode != "greedy":  # the rows' streams are distinct: identical prompts sample differently
        same_prompt = [r for r in range(64) if r % 24 == 0]
        assert len({tuple(ref[r][0][0]) for r in same_prompt}) > 1


def test_generate_parks_rows_beyond_the_pool(micro_model, tokenizer, one_thread):
    """Turn-synchronous `generate` and `extend` over 16 rows with a pool of 4: rows that took the turn give
    their slot to rows still waiting, and are prefilled again later; the result equals a pool of 16."""
    prompts = pool_prompts(tokenizer, 16)
    outs = {}
    for pool in (16, 4):
        s = TorchGenerator(micro_model, tokenizer, max_concurrent_rows=pool).open(prompts, seed=9)
        t1 = s.generate(SamplingParams(max_new_tokens=5, temperature=1.0))
        s.release([3, 7])
        s.extend({r: tokenizer.encode(" more") for r in (0, 5, 12)})
        t2 = s.generate(SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9))
        assert s.rows == [r for r in range(16) if r not in (3, 7)]
        assert s.length(5) == len(prompts[5]) + len(t1[5].token_ids) + len(tokenizer.encode(" more")) + len(t2[5].token_ids)
        outs[pool] = (t1, t2)
    for a, b in zip(outs[16], outs[4]):
        assert sorted(a) == sorted(b)
        for r in a:
            assert a[r].token_ids == b[r].token_ids
            assert a[r].logprobs == pytest.approx(b[r].logprobs, abs=1e-5)


def test_kv_memory_is_sized_by_the_pool_not_the_rollouts(micro_model, tokenizer, one_thread):
    """2,560 rollouts (two turns each, passages in between) through a pool of 64 slots: every rollout
    finishes, and the most KV memory the session ever held equals that of a 64-row batch, a small
    fraction of one slot per rollout."""
    info = tokenizer.encode("<information>Doc 1: the river runs past the old town.</information>")
    p = SamplingParams(max_new_tokens=2, temperature=1.0)

    def rollouts(n, pool):
        gen = TorchGenerator(micro_model, tokenizer, eos_token_ids=[], max_concurrent_rows=pool)
        out, s = drive(gen, pool_prompts(tokenizer, n), lambda r, turn: p, lambda r, turn: info if turn == 0 else None)
        assert s.rows == [] and all(len(turns) == 2 and all(len(ids) == 2 for ids, _ in turns) for turns in out.values())
        return s.kv_peak_bytes

    pooled = rollouts(2560, 64)
    batch = rollouts(64, 64)
    one_slot_per_row = rollouts(2560, None)
    print(f"KV peak bytes: 2,560 rows in a 64-row pool {pooled:,}; 64 rows {batch:,}; "
          f"2,560 rows, one slot each {one_slot_per_row:,}")
    assert pooled == batch > 0
    assert one_slot_per_row >= 2560 // 64 * batch * 0.9


def test_refit_streams_named_tensors_in_place(micro_model, tokenizer):
    """refit from a generator of (name, tensor) pairs equals load_state_dict, copies each tensor into the
    model as it comes (nothing is gathered first), and refuses unknown, repeated, misshapen and missing
    tensors, naming them."""
    import copy

    new = copy.deepcopy(micro_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in new.parameters():
            prm.add_(torch.randn(prm.shape, generator=g))
    state = {k: v.detach().clone() for k, v in new.state_dict().items()}
    ref = copy.deepcopy(micro_model)
    ref.load_state_dict(state)
    model = copy.deepcopy(micro_model)
    gen = TorchGenerator(model, tokenizer)
    params = dict(model.named_parameters())
    assert "lm_head.weight" in state and model.lm_head.weight is model.model.embed_tokens.weight

    def stream(skip=("lm_head.weight",)):  # tied: the LM head is the embedding
        prev = None
        for name, value in state.items():
            if name in skip:
                continue
            if prev is not None:  # the previous tensor is in the model before the next one is produced
                assert torch.equal(params[prev], state[prev]), prev
            prev = name
            yield name, value.clone()

    gen.refit(stream())
    for name, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    gen.refit(micro_model.state_dict())  # a Mapping with both tied names works too
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), micro_model.parameters()))
    gen.refit(chain([("model.rotary_emb.inv_freq", torch.ones(8))], stream()))  # derived from the config: ignored
    taken = []

    def unknown_first():
        yield "model.layers.0.mlp.gate.weight", torch.zeros(1)
        for name, value in stream():
            taken.append(name)
            yield name, value

    with pytest.raises(ValueError, match="'model.layers.0.mlp.gate.weight' is not a parameter"):
        gen.refit(unknown_first())
    assert len(taken) == len(state) - 1, "after a bad tensor the stream is consumed to its end (it may be a collective)"
    with pytest.raises(ValueError, match="'model.norm.weight' was given twice"):
        gen.refit(chain(stream(), [("model.norm.weight", state["model.norm.weight"])]))
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        gen.refit([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"1 tensor\(s\) of the model were not given: model.layers.1.self_attn.q_proj.bias\."):
        gen.refit(stream(skip=("lm_head.weight", "model.layers.1.self_attn.q_proj.bias")))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) of the model were not given: model.embed_tokens.weight\."):
        gen.refit(stream(skip=("lm_head.weight", "model.embed_tokens.weight")))
