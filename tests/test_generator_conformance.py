"""Conformance of every `Generator` backend to the seam (nemo_sdsearch/rollout/generator.py).

Backends:
* "torch": TorchGenerator on the micro model (always).
* "trtllm-fake": the real TRTLLMGenerator / TRTLLMSession code (requests, streaming stop checks and
  aborts, continuous batching in `run`, per-request seeds, log-prob extraction, bucketed refit,
  sleep / wake) over tests/fake_trtllm.py, a CPU double of the TensorRT-LLM LLM API (always): a
  two-worker tensor-parallel engine with the TRTLLMSampler that holds its own copy of the weights and
  decodes with the shards of both workers, so the reference model below is the trainer's, not the
  engine's.
* "trtllm": TRTLLMGenerator over a real TensorRT-LLM engine built from a temporary HF directory
  (only where tensorrt_llm imports and a CUDA GPU exists; skipped otherwise, with the reason).

Log-probs are checked against a dense full re-forward of each row's context with the HF model whose
weights the backend holds: log_softmax(logits / T)[sampled token], T = 1 for greedy, before top-p.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from nemo_sdsearch.rollout.generator import SamplingParams
from nemo_sdsearch.rollout.torch_generator import TorchGenerator

# the real TensorRT-LLM backend needs CUDA (and tensorrt_llm): selected by `pytest -m gpu`
BACKENDS = ["torch", "trtllm-fake", pytest.param("trtllm", marks=pytest.mark.gpu)]


@dataclass
class Backend:
    name: str
    gen: object
    ref: torch.nn.Module  # HF model with the weights the backend generates with (for re-forwards)
    tol: float  # max abs error of a sampled log-prob against the re-forward
    exact: bool  # bit-stable numerics: greedy outputs can be compared across sessions as-is
    engine_dtype: torch.dtype = torch.float32

    def refit(self, state: dict) -> None:
        """Give the backend new weights and keep the reference model in step."""
        self.gen.refit({k: v.to(self.engine_dtype) if v.is_floating_point() else v for k, v in state.items()})
        if self.gen_model() is not self.ref:
            self.ref.load_state_dict({k: v.to(self.engine_dtype).float() if v.is_floating_point() else v
                                      for k, v in state.items()})

    def gen_model(self):
        return getattr(self.gen, "model", None) or getattr(getattr(self.gen, "llm", None), "model", None)


def _trtllm_backend(micro_model, tokenizer, tmp_path_factory) -> Backend:
    from nemo_sdsearch.rollout.trtllm_generator import import_trtllm, trtllm_available

    if not trtllm_available():
        pytest.skip("tensorrt_llm is not installed (GPU-only; NGC NeMo container or the `trtllm` extra)")
    if not torch.cuda.is_available():
        pytest.skip("the trtllm backend needs a CUDA GPU")
    try:
        import_trtllm()
    except ImportError as e:
        pytest.skip(str(e))
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.rollout.trtllm_generator import TRTLLMGenerator

    # The micro config with head_dim 64 (16 in `micro`): TensorRT-LLM's fused attention kernels cover the
    # usual head sizes (32..256), not 16. Saved in bfloat16, the engine dtype.
    cfg = copy.deepcopy(micro_model.config)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = 128, 2, 1, 256
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = 64
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    out = tmp_path_factory.mktemp("trtllm_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ref = model.float().cuda().eval()  # bf16-rounded weights, float32 re-forward
    gen = TRTLLMGenerator(out, tokenizer=tokenizer, max_seq_len=1024, max_batch_size=64,
                          kv_cache_free_gpu_memory_fraction=0.2)
    return Backend("trtllm", gen, ref, tol=5e-2, exact=False, engine_dtype=torch.bfloat16)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, micro_model, tokenizer, tmp_path_factory):
    if request.param == "torch":
        model = copy.deepcopy(micro_model)
        yield Backend("torch", TorchGenerator(model, tokenizer), model, tol=1e-4, exact=True)
    elif request.param == "trtllm-fake":
        from fake_trtllm import fake_generator

        model = copy.deepcopy(micro_model)
        b = Backend("trtllm-fake", fake_generator(model, tokenizer), model, tol=1e-4, exact=True)
        yield b
        b.gen.shutdown()
    else:
        b = _trtllm_backend(micro_model, tokenizer, tmp_path_factory)
        yield b
        b.gen.shutdown()


# -- helpers ---------------------------------------------------------------------------------------------
def ref_logprobs(b: Backend, ids, temperature: float) -> torch.Tensor:
    dev = next(b.ref.parameters()).device
    with torch.no_grad():
        logits = b.ref(torch.tensor([list(ids)], device=dev)).logits[0].double().cpu()
    return torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), -1)


def assert_logprobs(b: Backend, context, records, temperature):
    """records: (position in context, token, log-prob). `context` must hold every recorded token."""
    ref = ref_logprobs(b, context, temperature)
    assert records
    for pos, tok, lp in records:
        assert context[pos] == tok, "the recorded token is not the one in the row's context"
    errs = [abs(ref[pos - 1, tok].item() - lp) for pos, tok, lp in records]
    assert max(errs) < b.tol, (b.name, max(errs))


def assert_greedy(b: Backend, context, start: int, ids):
    """Each greedy token is the argmax of the re-forward (within the backend's tolerance on near-ties)."""
    ref = ref_logprobs(b, list(context) + list(ids), 1.0)
    for i, tok in enumerate(ids):
        row = ref[start + i - 1]
        if b.exact:
            assert tok == int(row.argmax()), (b.name, i)
        else:
            assert row[tok] >= row.max() - b.tol, (b.name, i)


@contextmanager
def eos_ids(gen, ids):
    old = gen.eos_token_ids
    gen.eos_token_ids = list(ids)
    try:
        yield
    finally:
        gen.eos_token_ids = old


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def records(start: int, c):
    """(position in the row's context, token, log-prob) of a completion that begins at `start`."""
    return [(start + i, t, lp) for i, (t, lp) in enumerate(zip(c.token_ids, c.logprobs))]


# -- the checks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_equal_dense_reforward(backend, tokenizer, temperature, top_p):
    prompts = [enc(tokenizer, t) for t in ["Where was Oskar born?", "Who founded the city of Varn?", "x"]]
    out = backend.gen.open(prompts, seed=1).generate(SamplingParams(max_new_tokens=10, temperature=temperature,
                                                                    top_p=top_p))
    assert sorted(out) == [0, 1, 2]
    for r, c in out.items():
        assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason in ("stop", "eos", "length")
        ctx = prompts[r] + c.token_ids
        assert_logprobs(backend, ctx, records(len(prompts[r]), c), temperature)


def test_greedy_is_argmax(backend, tokenizer):
    prompts = [enc(tokenizer, "In what year was it founded?"), enc(tokenizer, "Name the river.")]
    with eos_ids(backend.gen, []):
        out = backend.gen.open(prompts).generate(SamplingParams(max_new_tokens=8, temperature=0.0))
    for r, c in out.items():
        assert len(c.token_ids) == 8 and c.finish_reason == "length"
        assert_greedy(backend, prompts[r], len(prompts[r]), c.token_ids)
        ctx = prompts[r] + c.token_ids
        assert_logprobs(backend, ctx, records(len(prompts[r]), c), 1.0)


def _free_run(b, prompt, n=40, seed=0):
    with eos_ids(b.gen, []):
        return b.gen.open([prompt], seed=seed).generate(SamplingParams(max_new_tokens=n, temperature=1.0))[0]


def _first_hit(tokenizer, ids, stop):
    return next(i for i in range(len(ids))
                if stop in tokenizer.decode(ids[:i + 1], skip_special_tokens=False))


def test_stop_string_ends_turn_at_the_tag(backend, tokenizer):
    """A stop string that is one token: the turn ends with it, exactly where it first appears."""
    prompt = enc(tokenizer, "q: which city?")
    free = _free_run(backend, prompt)
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in free.token_ids]
    k = next((i for i in range(3, len(texts)) if texts[i].strip()), None)
    assert k is not None, f"the free run sampled no non-blank token after the third: {texts}"
    stop = texts[k]
    with eos_ids(backend.gen, []):
        out = backend.gen.open([prompt], seed=0).generate(
            SamplingParams(max_new_tokens=40, temperature=1.0, stop=(stop,)))[0]
    first = _first_hit(tokenizer, free.token_ids, stop)
    assert out.finish_reason == "stop" and out.stop == stop
    assert out.token_ids == free.token_ids[:first + 1]
    assert tokenizer.decode(out.token_ids, skip_special_tokens=False).endswith(stop)


def test_stop_string_split_across_tokens(backend, tokenizer):
    """A stop string spelled by two sampled tokens ends the turn at the second one (the engine must
    not rely on the stop string's own tokenization)."""
    prompt = enc(tokenizer, "q: who wrote it?")
    free = _free_run(backend, prompt, n=40, seed=3)
    ids = free.token_ids
    for k in range(2, len(ids) - 1):
        a, c = (tokenizer.decode([t], skip_special_tokens=False) for t in ids[k:k + 2])
        stop = a + c
        if a.strip() and c.strip() and _first_hit(tokenizer, ids, stop) == k + 1 \
                and stop not in tokenizer.decode(ids[:k + 1], skip_special_tokens=False):
            break
    else:
        pytest.fail(f"the free run has no two adjacent non-blank tokens to split a stop string over: {ids}")
    with eos_ids(backend.gen, []):
        out = backend.gen.open([prompt], seed=3).generate(
            SamplingParams(max_new_tokens=40, temperature=1.0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.stop == stop
    assert out.token_ids == ids[:k + 2]


def test_max_new_tokens_gives_length(backend, tokenizer):
    with eos_ids(backend.gen, []):
        out = backend.gen.open([enc(tokenizer, "Tell me")] * 2, seed=5).generate(
            SamplingParams(max_new_tokens=5, temperature=1.0))
    for c in out.values():
        assert len(c.token_ids) == 5 and c.finish_reason == "length" and c.stop is None


def test_eos_ends_turn(backend, tokenizer):
    prompt = enc(tokenizer, "and then")
    free = _free_run(backend, prompt, n=20, seed=11)
    eos = free.token_ids[3]
    with eos_ids(backend.gen, [eos]):
        out = backend.gen.open([prompt], seed=11).generate(SamplingParams(max_new_tokens=20, temperature=1.0))[0]
    first = free.token_ids.index(eos)
    assert out.finish_reason == "eos" and out.stop is None
    assert out.token_ids == free.token_ids[:first + 1] and out.token_ids[-1] == eos
    assert len(out.logprobs) == len(out.token_ids)


def test_multi_turn_extend_continues_from_context(backend, tokenizer):
    """Uneven turns, uneven environment tokens and a released row: every sampled log-prob equals the
    dense re-forward of the row's own full context."""
    texts = ["Where was Oskar born?", "A much longer prompt about a city and a year", "x"]
    prompts = [enc(tokenizer, t) for t in texts]
    s = backend.gen.open(prompts, seed=3)
    ctx = [list(p) for p in prompts]
    rec = {r: [] for r in range(3)}
    for turn, (inserts, release) in enumerate([({0: "Doc 1 text", 2: "a b c d e f"}, []),
                                               ({1: "z"}, [0]),
                                               ({}, [])]):
        outs = s.generate(SamplingParams(max_new_tokens=5 + 3 * turn, temperature=0.8))
        assert sorted(outs) == sorted(s.rows)
        for r, c in outs.items():
            rec[r] += records(len(ctx[r]), c)
            ctx[r] += c.token_ids
            assert s.length(r) == len(ctx[r])
        s.release(release)
        extra = {r: enc(tokenizer, t) for r, t in inserts.items() if r in s.rows}
        s.extend(extra)
        for r, ids in extra.items():
            ctx[r] += ids
            assert s.length(r) == len(ctx[r])
    for r in range(3):
        assert_logprobs(backend, ctx[r], rec[r], 0.8)


def test_release_drops_rows_and_others_are_unaffected(backend, tokenizer):
    prompts = [enc(tokenizer, t) for t in ["First question here", "Second one", "Third question, longer text"]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    with eos_ids(backend.gen, []):
        s = backend.gen.open(prompts)
        t1 = s.generate(greedy)
        s.release([1])
        assert s.rows == [0, 2]
        with pytest.raises(KeyError):
            s.length(1)
        with pytest.raises(KeyError):
            s.extend({1: [1, 2]})
        t2 = s.generate(greedy)
        assert sorted(t2) == [0, 2]
        solo = backend.gen.open([prompts[0], prompts[2]])
        u1, u2 = solo.generate(greedy), solo.generate(greedy)
    for r, q in ((0, 0), (2, 1)):
        if backend.exact:
            assert t1[r].token_ids == u1[q].token_ids and t2[r].token_ids == u2[q].token_ids
        ctx = prompts[r] + t1[r].token_ids
        assert_greedy(backend, ctx, len(ctx), t2[r].token_ids)


def test_run_drives_rows_with_on_turn(backend, tokenizer):
    """`run` with a callback that appends tokens to some rows, continues others with no tokens and
    ends the rest: the contexts the callback sees are exactly prompt + completions + appended tokens,
    and every log-prob matches the dense re-forward of the final context."""
    prompts = [enc(tokenizer, t) for t in ["Row zero asks", "Row one asks a question", "two", "Row three"]]
    env_plan = {0: [None],
                1: [enc(tokenizer, "<information>doc A</information>"), enc(tokenizer, " more"), None],
                2: [[], None],
                3: [enc(tokenizer, "z z"), None]}
    params = {0: SamplingParams(max_new_tokens=5, temperature=1.0),
              1: SamplingParams(max_new_tokens=7, temperature=1.0),
              2: SamplingParams(max_new_tokens=4, temperature=0.0),
              3: SamplingParams(max_new_tokens=6, temperature=1.0)}
    temps = {r: (p.temperature or 1.0) for r, p in params.items()}
    s = backend.gen.open(prompts, seed=21)
    ctx = {r: list(p) for r, p in enumerate(prompts)}
    rec = {r: [] for r in ctx}
    turns = {r: 0 for r in ctx}
    calls = []

    def on_turn(completions):
        calls.append(sorted(completions))
        env = {}
        for r, c in completions.items():
            assert r in s.rows
            assert 1 <= len(c.token_ids) <= params[r].max_new_tokens and len(c.logprobs) == len(c.token_ids)
            rec[r] += records(len(ctx[r]), c)
            ctx[r] += c.token_ids
            assert s.length(r) == len(ctx[r]), "the session's context is not prompt + completions + env"
            toks = env_plan[r][turns[r]]
            turns[r] += 1
            if toks is not None:
                ctx[r] += toks
            env[r] = toks
        return env

    with eos_ids(backend.gen, []):
        s.run(lambda r: params[r], on_turn)
    assert s.rows == []
    assert turns == {r: len(plan) for r, plan in env_plan.items()}
    assert sum(len(c) for c in calls) == sum(turns.values())
    for r in ctx:
        assert_logprobs(backend, ctx[r], rec[r], temps[r])


def test_seeded_sampling_is_reproducible(backend, tokenizer):
    prompts = [enc(tokenizer, "Who founded it?")] * 4
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9)
    with eos_ids(backend.gen, []):
        a = backend.gen.open(prompts, seed=7).generate(p)
        b = backend.gen.open(prompts, seed=7).generate(p)
        c = backend.gen.open(prompts, seed=8).generate(p)
    ids = lambda out: [out[i].token_ids for i in range(4)]  # noqa: E731
    assert ids(a) == ids(b)
    for i in range(4):
        assert a[i].logprobs == pytest.approx(b[i].logprobs, abs=1e-6 if backend.exact else 1e-3)
    assert ids(a) != ids(c)
    assert len({tuple(t) for t in ids(a)}) > 1, "identical prompts in one session must not share samples"


def test_returned_ids_are_the_sampled_ids(backend, tokenizer):
    """What a turn returns is what the session fed back: continuing in the session equals a fresh
    session whose prompt is prompt + the returned ids."""
    prompt = enc(tokenizer, "The capital of the region is")
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    with eos_ids(backend.gen, []):
        s = backend.gen.open([prompt], seed=4)
        first = s.generate(SamplingParams(max_new_tokens=10, temperature=1.0))[0]
        cont = s.generate(greedy)[0]
        fresh = backend.gen.open([prompt + first.token_ids]).generate(greedy)[0]
    ctx = prompt + first.token_ids
    assert s.length(0) == len(ctx) + len(cont.token_ids)
    if backend.exact:
        assert cont.token_ids == fresh.token_ids
    assert_greedy(backend, ctx, len(ctx), cont.token_ids)
    assert_greedy(backend, ctx, len(ctx), fresh.token_ids)
    full = ctx + cont.token_ids
    assert_logprobs(backend, full, records(len(prompt), first) + records(len(ctx), cont), 1.0)


def test_refit_follows_new_weights(backend, tokenizer):
    prompts = [enc(tokenizer, "Where was Oskar born?"), enc(tokenizer, "Name the river.")]
    old = {k: v.detach().clone() for k, v in backend.ref.state_dict().items()}
    perturbed = copy.deepcopy(backend.ref)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for prm in perturbed.parameters():  # parameters, not state-dict keys: tied weights stay tied
            prm.add_(0.5 * prm.detach().float().std().clamp_min(1e-3).to(prm.device)
                     * torch.randn(prm.shape, generator=g).to(prm))
    new = {k: v.detach().clone() for k, v in perturbed.state_dict().items()}
    del perturbed
    ref_before = [ref_logprobs(backend, p, 1.0)[-1] for p in prompts]
    try:
        backend.refit(new)
        with eos_ids(backend.gen, []):
            s = backend.gen.open(prompts, seed=2)
            sampled = s.generate(SamplingParams(max_new_tokens=8, temperature=1.0))
            greedy = backend.gen.open(prompts).generate(SamplingParams(max_new_tokens=6, temperature=0.0))
        for r, p in enumerate(prompts):
            ctx = p + sampled[r].token_ids
            assert_logprobs(backend, ctx, records(len(p), sampled[r]), 1.0)
            assert_greedy(backend, p, len(p), greedy[r].token_ids)
            moved = (ref_logprobs(backend, p, 1.0)[-1] - ref_before[r]).abs().max().item()
            assert moved > 20 * backend.tol, "the perturbation did not change the model"
    finally:
        backend.refit(old)
    after = backend.gen.open(prompts[:1]).generate(SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    assert_greedy(backend, prompts[0], len(prompts[0]), after.token_ids)


def test_refit_consumes_a_weight_stream(backend, tokenizer):
    """`refit` takes the actor's weight stream (`Actor.iter_weights`): (name, tensor) pairs consumed once,
    each tensor once, a tied lm_head.weight left out; the backend then generates with those weights."""
    prompt = enc(tokenizer, "Which river runs through it?")
    old = {k: v.detach().clone() for k, v in backend.ref.state_dict().items()}
    new = copy.deepcopy(backend.ref)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in new.parameters():
            prm.add_(0.5 * prm.detach().float().std().clamp_min(1e-3).to(prm.device)
                     * torch.randn(prm.shape, generator=g).to(prm))
    tied = bool(getattr(new.config, "tie_word_embeddings", False))
    pairs = [(k, v.detach().clone()) for k, v in new.state_dict().items() if not (tied and k == "lm_head.weight")]
    taken: list[str] = []

    def stream():
        for name, tensor in pairs:
            taken.append(name)
            yield name, tensor.to(backend.engine_dtype) if tensor.is_floating_point() else tensor

    try:
        backend.gen.refit(stream())
        assert taken == [n for n, _ in pairs]                  # consumed once, to the end
        held = backend.gen_model()
        if held is not None:                                   # in-process backends: exactly the new weights
            want = new.state_dict()
            assert all(torch.equal(v, want[k].to(v.dtype)) for k, v in held.state_dict().items())
        if held is not backend.ref:
            backend.ref.load_state_dict(new.state_dict())
        with eos_ids(backend.gen, []):
            c = backend.gen.open([prompt]).generate(SamplingParams(max_new_tokens=6, temperature=0.0))[0]
        assert_greedy(backend, prompt, len(prompt), c.token_ids)
        assert_logprobs(backend, prompt + c.token_ids, records(len(prompt), c), 1.0)
    finally:
        backend.refit(old)


@pytest.mark.parametrize("backend", ["trtllm-fake", pytest.param("trtllm", marks=pytest.mark.gpu)], indirect=True)
def test_sleep_and_wake_up(backend, tokenizer):
    """The backends that hold GPU memory (the torch backend runs the trained model itself and has no sleep):
    level 1 keeps the weights (generation after wake-up matches the reference without a refit); level 2
    discards them, so generating needs a refit after the wake-up, which brings them back."""
    gen = backend.gen
    prompt = enc(tokenizer, "Who founded it?")
    gen.sleep(level=1)
    with pytest.raises(RuntimeError, match="asleep"):
        gen.open([prompt])
    gen.wake_up()
    c = gen.open([prompt], seed=1).generate(SamplingParams(max_new_tokens=6, temperature=1.0))[0]
    assert_logprobs(backend, prompt + c.token_ids, records(len(prompt), c), 1.0)
    gen.sleep(level=2)
    gen.wake_up()
    with pytest.raises(RuntimeError, match="refit"):
        gen.open([prompt])
    backend.refit({k: v.detach().clone() for k, v in backend.ref.state_dict().items()})
    c = gen.open([prompt], seed=1).generate(SamplingParams(max_new_tokens=6, temperature=1.0))[0]
    assert_logprobs(backend, prompt + c.token_ids, records(len(prompt), c), 1.0)


def test_a_row_samples_the_same_whatever_shares_its_session(backend, tokenizer):
    """Each row samples from its own stream (session seed, row index): its tokens do not depend on how
    many rows share the session or what they are (the torch backend's row pool relies on it)."""
    prompts = [enc(tokenizer, t) for t in ["Where was Oskar born?", "Name the river.", "Who founded it?"]]
    others = [enc(tokenizer, t) for t in ["A different question here", "z", "Which is older?", "Two more"]]
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    with eos_ids(backend.gen, []):
        alone = backend.gen.open(prompts, seed=11).generate(p)
        crowd = backend.gen.open([prompts[0], others[0], prompts[2], *others[1:]], seed=11).generate(p)
    for r in (0, 2):
        if backend.exact:
            assert crowd[r].token_ids == alone[r].token_ids, r
        for out in (alone, crowd):
            assert_logprobs(backend, prompts[r] + out[r].token_ids, records(len(prompts[r]), out[r]), 1.0)


# -- backend-independent facts about the trtllm module (run on CPU) ---------------------------------------
def test_trtllm_module_imports_without_tensorrt_llm():
    from nemo_sdsearch.rollout import trtllm_generator as m

    if m.trtllm_available():
        pytest.skip("tensorrt_llm is installed here")
    with pytest.raises(ImportError, match=r"trtllm.*extra|NGC"):
        m.TRTLLMGenerator("/nonexistent")


def test_request_seeds_are_distinct_and_stable():
    from nemo_sdsearch.rollout.trtllm_generator import request_seed

    seeds = {request_seed(s, r, t) for s in (0, 1, None) for r in range(8) for t in range(4)}
    assert len(seeds) == 2 * 8 * 4  # None is seed 0
    assert request_seed(7, 3, 1) == request_seed(7, 3, 1) and all(0 <= x < 2 ** 63 for x in seeds)


def test_fake_engine_misses_a_respelled_stop_but_the_backend_does_not(tokenizer, micro_model):
    """TensorRT-LLM matches stop words as token ids; the backend's own check on the stream must catch a
    stop string the model spelled with different tokens (here: streaming off, so the engine runs on
    and the backend cuts the turn afterwards)."""
    from fake_trtllm import fake_generator

    gen = fake_generator(copy.deepcopy(micro_model), tokenizer, streaming=False)
    prompt = enc(tokenizer, "q: who wrote it?")
    with eos_ids(gen, []):
        free = gen.open([prompt], seed=3).generate(SamplingParams(max_new_tokens=30, temperature=1.0))[0]
        ids = free.token_ids
        for k in range(2, len(ids) - 1):
            a, c = (tokenizer.decode([t], skip_special_tokens=False) for t in ids[k:k + 2])
            stop = a + c
            if a.strip() and c.strip() and enc(tokenizer, stop) != ids[k:k + 2]:
                break
        else:
            pytest.fail(f"every adjacent token pair of the free run re-encodes to itself: {ids}")
        out = gen.open([prompt], seed=3).generate(SamplingParams(max_new_tokens=30, temperature=1.0, stop=(stop,)))[0]
    first = _first_hit(tokenizer, ids, stop)
    assert out.finish_reason == "stop" and out.stop == stop and out.token_ids == ids[:first + 1]
    last = gen.llm.requests[-1]
    assert last.stop == [stop] and last.include_stop_str_in_output and last.stop_token_ids is None
