"""The TensorRT-LLM contracts the double (tests/fake_trtllm.py, and the stand-in's sampler it shares with
tests/stand_in) keeps, and what `TRTLLMGenerator` does with them:

* log-probs per sampler, as upstream documents them (docs/trtllm.md, "Log-probs per sampler"): the double's
  numbers against the upstream formulas, and the generator asking each sampler for the mode that gives the
  trainer's convention, log_softmax(logits / T) before top-p, or refusing a setting no mode gives;
* tensor parallelism: every worker keeps its own shard of a refit and the engine serves all of them, so a refit
  that sends one worker the wrong tensors changes what the engine serves;
* sleep: level 1 keeps the weights, level 2 discards them until a refit brings every one back; the training
  recipe sleeps at level 1 only.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from fake_trtllm import (FAKE_UUIDS, FakeTRTLLMGenerator, LogprobMode, fake_generator, sampler,
                         sampling_params_without, shard_of)
from nemo_sdsearch.rollout.generator import SamplingParams

PROMPTS = ["Where was Oskar born?", "Name the river.", "Who founded the city of Varn?"]


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def perturbed(model, seed: int):
    """A copy of `model` with every parameter moved by half its spread (tied weights stay tied)."""
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5 * p.float().std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    return new


def last_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0, -1].double()


def convention(model, context, start, tokens, temperature) -> list[float]:
    """The trainer's log-probs of `tokens` (at context[start:]): log_softmax(logits / T), T = 1 for greedy."""
    t = temperature if temperature > 0 else 1.0
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([list(context)])).logits[0].double() / t, -1)
    return [logp[start + i - 1, tok].item() for i, tok in enumerate(tokens)]


# -- the double's samplers against the upstream formulas ---------------------------------------------------
LOGITS = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 3


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens top-p keeps, written out: the largest probabilities until their sum reaches top_p."""
    order = probs.argsort(descending=True).tolist()
    keep, total = set(), 0.0
    for i in order:
        if total >= top_p:
            break
        keep.add(i)
        total += probs[i].item()
    return torch.tensor([i in keep for i in range(len(probs))])


def run_step(sampler_type, *, temperature, top_k, top_p, logprobs=1, mode="raw", seed=0):
    return sampler.step(LOGITS, sampler_type=sampler_type, temperature=temperature, top_k=top_k, top_p=top_p,
                        logprobs=logprobs, logprobs_mode=mode, generator=torch.Generator().manual_seed(seed))


def test_trtllm_sampler_reports_the_temperature_scaled_log_prob_before_top_p():
    expected = torch.log_softmax(LOGITS / 0.7, -1)
    keep = nucleus(torch.softmax(LOGITS / 0.7, -1), 0.9)
    for seed in range(20):
        tok, entries = run_step("TRTLLMSampler", temperature=0.7, top_k=0, top_p=0.9, seed=seed)
        assert keep[tok], "sampled outside the top-p set"
        assert [(i, round(lp, 5)) for i, lp, _ in entries] == [(tok, round(expected[tok].item(), 5))]
    tok, entries = run_step("TRTLLMSampler", temperature=None, top_k=1, top_p=None)   # greedy: T = 1
    assert tok == int(LOGITS.argmax()) and entries[0][1] == pytest.approx(torch.log_softmax(LOGITS, -1)[tok].item())


def test_torch_sampler_raw_mode_ignores_the_temperature_and_adds_the_top_k():
    raw = torch.log_softmax(LOGITS, -1)
    for seed in range(20):
        tok, entries = run_step("TorchSampler", temperature=0.7, top_k=0, top_p=0.9, logprobs=3, seed=seed)
        top3 = raw.topk(3).indices.tolist()
        assert [i for i, _, _ in entries] == top3 + ([tok] if tok not in top3 else [])
        for i, lp, rank in entries:
            assert lp == pytest.approx(raw[i].item(), abs=1e-6) and rank == int((raw > raw[i]).sum()) + 1
    tok, entries = run_step("TorchSampler", temperature=0.7, top_k=0, top_p=0.9, logprobs=0, mode=LogprobMode.RAW)
    assert [i for i, _, _ in entries] == [tok]                                           # K = 0: the sampled one


def test_torch_sampler_processed_mode_is_the_distribution_it_drew_from():
    keep = nucleus(torch.softmax(LOGITS / 0.7, -1), 0.9)
    expected = torch.log_softmax((LOGITS / 0.7).masked_fill(~keep, float("-inf")), -1)
    assert expected[keep].exp().sum().item() == pytest.approx(1.0)  # renormalised over the top-p set
    for seed in range(20):
        tok, entries = run_step("TorchSampler", temperature=0.7, top_k=0, top_p=0.9, logprobs=0, mode="processed",
                                seed=seed)
        assert keep[tok] and entries[0][1] == pytest.approx(expected[tok].item(), abs=1e-6)
    top2 = torch.log_softmax(LOGITS / 0.7, -1).topk(2).indices  # top-k = 2: renormalised over those two
    tok, entries = run_step("TorchSampler", temperature=0.7, top_k=2, top_p=None, logprobs=0, mode="processed")
    assert tok in top2.tolist()
    assert entries[0][1] == pytest.approx(torch.log_softmax(LOGITS[top2] / 0.7, -1)[top2.tolist().index(tok)].item())
    tok, entries = run_step("TorchSampler", temperature=0.0, top_k=None, top_p=None, logprobs=0, mode="processed")
    assert tok == int(LOGITS.argmax()) and entries == [(tok, 0.0, 1)]                    # greedy: a point mass
    with pytest.raises(ValueError, match="logprobs_mode"):
        run_step("TorchSampler", temperature=0.7, top_k=0, top_p=1.0, mode="processed_logprobs")


# -- the generator asks each sampler for the trainer's convention ------------------------------------------
CASES = [  # (sampler, temperature, top_p, the mode the generator must ask for)
    ("TRTLLMSampler", 0.7, 0.9, None),
    ("TRTLLMSampler", 0.0, 1.0, None),
    ("TorchSampler", 1.0, 0.9, LogprobMode.RAW),         # raw = the convention at T = 1 (before top-p)
    ("TorchSampler", 0.0, 1.0, LogprobMode.RAW),         # greedy: raw at T = 1
    ("TorchSampler", 0.7, 1.0, LogprobMode.PROCESSED),   # T != 1 and nothing cut: processed
]


@pytest.mark.parametrize("sampler_type,temperature,top_p,mode", CASES)
def test_generator_log_probs_are_the_trainers_with_every_sampler(micro_model, tokenizer, sampler_type, temperature,
                                                                 top_p, mode):
    gen = fake_generator(micro_model, tokenizer, sampler_type=sampler_type)
    prompts = [enc(tokenizer, t) for t in PROMPTS]
    try:
        gen.eos_token_ids = []
        out = gen.open(prompts, seed=3).generate(SamplingParams(max_new_tokens=8, temperature=temperature,
                                                                top_p=top_p))
    finally:
        gen.shutdown()
    assert {sp.logprobs_mode for sp in gen.llm.requests} == {mode or LogprobMode.RAW}
    for r, c in out.items():
        want = convention(micro_model, prompts[r] + c.token_ids, len(prompts[r]), c.token_ids, temperature)
        assert c.logprobs == pytest.approx(want, abs=1e-4), (sampler_type, temperature, top_p)


@pytest.mark.parametrize("sp_cls,temperature,top_p", [
    ("current", 0.7, 0.9),                   # processed is renormalised over the top-p set, raw has no T
    ("without logprobs_mode", 0.7, 1.0),     # a release with raw log-probs only
])
def test_a_torch_sampler_setting_no_mode_serves_is_refused_unless_logits_are_used(micro_model, tokenizer, sp_cls,
                                                                                  temperature, top_p):
    cls = sampling_params_without("logprobs_mode") if sp_cls != "current" else None
    kw = {} if cls is None else {"sampling_params_cls": cls}
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_p=top_p)
    prompt = enc(tokenizer, PROMPTS[0])
    for source in ("auto", "sampler"):  # "sampler" too: the sampler's log-probs, never the wrong convention
        gen = fake_generator(micro_model, tokenizer, sampler_type="TorchSampler", logprobs_source=source, **kw)
        try:
            with pytest.raises(ValueError, match=r"TorchSampler returns log_softmax\(logits\) without the temp"):
                gen.open([prompt], seed=1).generate(params)
        finally:
            gen.shutdown()
    gen = fake_generator(micro_model, tokenizer, sampler_type="TorchSampler", logprobs_source="logits", **kw)
    try:
        gen.eos_token_ids = []
        c = gen.open([prompt], seed=1).generate(params)[0]
    finally:
        gen.shutdown()
    assert gen.llm.requests[-1].return_generation_logits and gen.llm.requests[-1].logprobs is None
    want = convention(micro_model, prompt + c.token_ids, len(prompt), c.token_ids, temperature)
    assert c.logprobs == pytest.approx(want, abs=1e-4)


# -- tensor parallelism: every worker's shard is served -------------------------------------------------------
def test_every_worker_keeps_its_own_shard_and_the_engine_serves_all_of_them(micro_model, tokenizer):
    new = perturbed(micro_model, 1)
    gen = fake_generator(micro_model, tokenizer)
    try:
        gen.refit(new.state_dict())
        workers = gen.llm.workers
        assert [w.uuid for w in workers] == list(FAKE_UUIDS)
        state = new.state_dict()
        for w in workers:
            for name, shard in w.shard.items():
                assert torch.equal(shard, shard_of(state[name], w.rank, len(workers))), (w.rank, name)
        ids = enc(tokenizer, PROMPTS[2])
        assert torch.equal(last_logits(gen.llm.model, ids), last_logits(new, ids))   # the trainer's logits
    finally:
        gen.shutdown()


class StaleForWorker1(FakeTRTLLMGenerator):
    """Sends worker 1 the tensors it was built with instead of the bucket's (a refit that mixes up devices)."""
    stale: dict = {}

    def _ipc_handles(self, bucket, uuid, keep):
        if uuid == FAKE_UUIDS[1]:
            return [(name, self.stale[name].clone()) for name, _ in bucket]
        return super()._ipc_handles(bucket, uuid, keep)


def test_a_refit_that_sends_one_worker_the_wrong_tensors_changes_what_the_engine_serves(micro_model, tokenizer):
    new = perturbed(micro_model, 2)
    StaleForWorker1.stale = micro_model.state_dict()
    gen = fake_generator(micro_model, tokenizer, generator_cls=StaleForWorker1)
    prompt = enc(tokenizer, PROMPTS[0])
    try:
        gen.refit(new.state_dict())
        gen.eos_token_ids = []
        c = gen.open([prompt], seed=5).generate(SamplingParams(max_new_tokens=6, temperature=1.0))[0]
        served = last_logits(gen.llm.model, prompt)
    finally:
        gen.shutdown()
    assert (served - last_logits(new, prompt)).abs().max() > 0.1
    assert (served - last_logits(micro_model, prompt)).abs().max() > 0.1      # half new, half old: neither
    want = convention(new, prompt + c.token_ids, len(prompt), c.token_ids, 1.0)
    assert max(abs(a - b) for a, b in zip(c.logprobs, want)) > 1e-2           # a conformance check fails


# -- sleep ------------------------------------------------------------------------------------------------------
def test_level_1_keeps_the_weights_level_2_discards_them_until_a_full_refit(micro_model, tokenizer):
    gen = fake_generator(micro_model, tokenizer)
    llm, prompt = gen.llm, enc(tokenizer, PROMPTS[1])
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    try:
        gen.eos_token_ids = []
        gen.sleep(level=1)
        assert llm.asleep == ["kv_cache"] and not llm.weights_released
        gen.wake_up()
        c = gen.open([prompt]).generate(greedy)[0]   # no refit needed
        assert c.logprobs == pytest.approx(convention(micro_model, prompt + c.token_ids, len(prompt),
                                                      c.token_ids, 0.0), abs=1e-4)
        gen.sleep(level=2)
        assert "model" in llm.asleep and llm.weights_released
        gen.wake_up()
        assert llm.asleep is None and all(torch.isnan(p).all() for p in llm.model.parameters())
        with pytest.raises(RuntimeError, match="level-2 sleep"):  # the engine itself, past the generator's guard
            gen._submit(gen._turn(prompt, greedy, 0)).result(timeout=60)
        new = perturbed(micro_model, 3)
        partial = {k: v for k, v in new.state_dict().items() if "layers.0.mlp" not in k}
        with pytest.raises(RuntimeError, match="not all reloaded"):
            gen.refit(partial)
        gen.refit(new.state_dict())
        c = gen.open([prompt]).generate(greedy)[0]
        assert torch.equal(last_logits(llm.model, prompt), last_logits(new, prompt))
        assert c.logprobs == pytest.approx(convention(new, prompt + c.token_ids, len(prompt), c.token_ids, 0.0),
                                           abs=1e-4)
    finally:
        gen.shutdown()


def _serves_the_model(gen, model, tokenizer):
    """After an update phase the engine generates again, with the log-probs of `model` (its weights are there)."""
    prompt = enc(tokenizer, PROMPTS[0])
    gen.eos_token_ids = []
    out = gen.open([prompt]).generate(SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    assert out.logprobs == pytest.approx(convention(model, prompt + out.token_ids, len(prompt), out.token_ids, 0.0),
                                         abs=1e-4)


def _update_phase_parts(gen, level: int, sink=None):
    """What `setup.engine_asleep` reads: the components (an actor with nothing to park) and the config."""
    from nemo_sdsearch.config import OffloadSection

    actor = SimpleNamespace(gather_in_replica=lambda obj: None, reload=lambda: None, offload=lambda parts: None,
                            iter_weights=lambda: iter(()))
    c = SimpleNamespace(engines={"train": SimpleNamespace(generator=gen)}, actor=actor, ref=None, weight_sink=sink)
    cfg = SimpleNamespace(generator="trtllm", trtllm=SimpleNamespace(sleep_while_training=True, sleep_level=level),
                          offload=OffloadSection())
    return c, cfg


def test_a_level_2_sleep_releases_the_weights_and_the_wake_up_refits_them(micro_model, tokenizer):
    """trtllm.sleep_level=2: the update releases the engine's weights too; leaving the update phase wakes it and
    streams the weights back in (without a refit the engine would refuse to generate)."""
    from nemo_sdsearch.algorithms.setup import engine_asleep
    from nemo_sdsearch.models.hf import HFActor

    model = copy.deepcopy(micro_model)
    gen = fake_generator(model, tokenizer)
    actor = HFActor(copy.deepcopy(micro_model))
    c, cfg = _update_phase_parts(gen, level=2, sink=gen)
    c = SimpleNamespace(**{**vars(c), "actor": actor})
    try:
        with engine_asleep(c, cfg):
            assert gen.llm.weights_released and "kv_cache" in gen.llm.asleep
        assert gen.llm.asleep is None and not gen.llm.weights_released
        methods = [m for m, _ in gen.llm.calls]
        assert methods[:3] == ["sleep", "wakeup", "reset_prefix_cache"] and "update_weights" in methods
        _serves_the_model(gen, micro_model, tokenizer)
    finally:
        gen.shutdown()


def test_training_sleeps_at_level_1_only(micro_model, tokenizer):
    """`setup.engine_asleep` (around every update) releases the KV cache and nothing else: the rollouts after it
    need no refit for the weights to be there (the recipe refits after the update anyway)."""
    from nemo_sdsearch.algorithms.setup import engine_asleep

    gen = fake_generator(micro_model, tokenizer)
    c, cfg = _update_phase_parts(gen, level=1)
    try:
        with engine_asleep(c, cfg):
            assert gen.llm.asleep == ["kv_cache"] and not gen.llm.weights_released
        assert gen.llm.asleep is None and [m for m, _ in gen.llm.calls] == ["sleep", "wakeup", "reset_prefix_cache"]
        _serves_the_model(gen, micro_model, tokenizer)
    finally:
        gen.shutdown()
