"""The multi-turn rollout engine: token exactness, the Search-R1 protocol rules, the context guard."""

import pytest

from nemo_sdsearch.core.prompts import INVALID_ACTION_FEEDBACK
from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.core.spans import SpanType
from nemo_sdsearch.rollout.engine import RolloutConfig, RolloutEngine, parse_action
from nemo_sdsearch.rollout.generator import GenerationSession, Generator
from nemo_sdsearch.rollout.torch_generator import TorchGenerator
from nemo_sdsearch.retrieval import BM25Retriever
from scripted import ScriptedTurns


class Spy(Generator):
    """Wraps a real generator and records every completion it hands to the engine, in order."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.log = inner, inner.tokenizer, []

    def open(self, prompts, seed=None, row_seeds=None):
        session = self.inner.open(prompts, seed)
        original = session.run

        def run(params_for, on_turn):
            def spy(completions):
                self.log.append({r: list(c.token_ids) for r, c in completions.items()})
                return on_turn(completions)
            return original(params_for, spy)

        session.run = run
        return session


def scripted(tokenizer, turns_by_row: dict):
    """`scripted.ScriptedTurns` replaying `turns_by_row[row]` (a test double of the seam, for protocol rules)."""
    return ScriptedTurns(tokenizer, lambda row, question: turns_by_row[row])


@pytest.fixture
def qas(bundle):
    return [QA.from_flashrag(q.to_flashrag()) for q in bundle.test[:6]]


def test_trained_ids_equal_sampled_ids(micro_model, tokenizer, bundle, qas):
    spy = Spy(TorchGenerator(micro_model, tokenizer))
    engine = RolloutEngine(spy, BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_turns=2, max_new_tokens=24, max_context=700))
    trajs = engine.run(qas, n_samples=2, seed=0)
    assert len(trajs) == 12
    for row, t in enumerate(trajs):
        sampled = [tok for turn in spy.log for tok in turn.get(row, [])]
        policy_ids = [tok for tok, p in zip(t.token_ids, t.from_policy) if p]
        assert policy_ids == sampled
        assert len(t.token_ids) == len(t.span_types) == len(t.sampled_logprobs) == len(t.is_query)
        assert len(t.token_ids) <= 700


def test_seeded_rollouts_are_reproducible(micro_model, tokenizer, bundle, qas):
    engine = RolloutEngine(TorchGenerator(micro_model, tokenizer), BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_turns=2, max_new_tokens=16, max_context=600))
    a = engine.run(qas[:3], n_samples=2, seed=11)
    b = engine.run(qas[:3], n_samples=2, seed=11)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.sampled_logprobs for t in a] == [t.sampled_logprobs for t in b]


def test_one_call_with_question_seeds_samples_what_separately_seeded_calls_sample(micro_model, tokenizer, bundle, qas):
    """`question_seeds`: one call over two batches' questions (the pool's larger batches on engines that cover every
    GPU) rolls out what the two batches seeded `seed` and `seed + 3` do (a row's stream is its question's seed,
    question and sample)."""
    engine = RolloutEngine(TorchGenerator(micro_model, tokenizer), BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_turns=2, max_new_tokens=16, max_context=600))
    apart = engine.run(qas[:3], n_samples=2, seed=5) + engine.run(qas[3:], n_samples=2, seed=8)
    together = engine.run(qas, n_samples=2, seed=5, question_seeds=[5] * 3 + [8] * 3)
    assert [t.token_ids for t in together] == [t.token_ids for t in apart]
    shuffled = engine.run(qas[::-1], n_samples=2, seed=0, question_seeds=[8] * 3 + [5] * 3)
    assert [t.token_ids for t in shuffled] == [t.token_ids for q in range(5, -1, -1) for t in apart[2 * q:2 * q + 2]]


def test_protocol_search_invalid_answer(char_tokenizer, bundle):
    q = bundle.test[0]
    entity = q.hops[0].entity
    turns = {
        0: [f"<think>go</think><search> {entity} </search>", "<answer> Oskar </answer>"],
        1: ["I am not sure", "<search>   </search>", "<answer>x</answer>"],
    }
    gen = scripted(char_tokenizer, turns)
    engine = RolloutEngine(gen, BM25Retriever(bundle.test_world.passages), RolloutConfig(max_turns=4, max_new_tokens=64, max_context=4000))
    t0, t1 = engine.run([QA("a", "Q?", ["Oskar"]), QA("b", "Q2?", ["x"])])
    assert t0.queries == [entity] and t0.answer == "Oskar" and t0.exact_match == 1.0 and t0.finish_reason == "answer"
    info = char_tokenizer.decode([i for i, s in zip(t0.token_ids, t0.span_types) if s == SpanType.INFORMATION])
    assert info.startswith("\n\n<information>Doc 1(Title: ") and f'"{entity} (' in info  # titles name a section
    # Row 1: no tag, then an empty query: both invalid, each answered with the feedback, each a turn.
    assert t1.queries == [] and t1.answer == "x" and t1.num_turns == 3
    fb = char_tokenizer.decode([i for i, s in zip(t1.token_ids, t1.span_types) if s == SpanType.INFORMATION])
    assert fb == INVALID_ACTION_FEEDBACK * 2


def test_final_turn_must_answer_and_never_retrieves(char_tokenizer, bundle):
    gen = scripted(char_tokenizer, {0: ["<search> a </search>"]})
    engine = RolloutEngine(gen, BM25Retriever(bundle.test_world.passages), RolloutConfig(max_turns=2, max_new_tokens=64, max_context=4000))
    (t,) = engine.run([QA("a", "Q?", ["z"])])
    assert t.num_searches == 2 and t.num_turns == 3 and t.finish_reason == "no_answer"
    assert [p.stop for p in gen.params_seen] == [("</search>", "</answer>")] * 2 + [("</answer>",)]
    assert len(gen.extends) == 2  # retrieval after turns 1 and 2 only


def test_retrieval_disabled_returns_empty_information(char_tokenizer, bundle):
    gen = scripted(char_tokenizer, {0: ["<search> a </search>", "<answer>b</answer>"]})
    engine = RolloutEngine(gen, BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_turns=2, max_new_tokens=64, max_context=4000, retrieval=False))
    engine.run([QA("a", "Q?", ["z"])])
    assert gen.extends[0] == {0: "\n\n<information></information>\n\n"}


def test_context_guard_truncates_information_and_keeps_question(char_tokenizer, bundle):
    q = bundle.test[0]
    turns = {0: [f"<search> {q.hops[0].entity} </search>"] * 5}
    gen = scripted(char_tokenizer, turns)
    prompt_len = len(char_tokenizer.encode(engine_prompt := RolloutEngine(gen, None).prompt_fn("Q?")))
    limit = prompt_len + 400
    engine = RolloutEngine(gen, BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_turns=4, max_new_tokens=100, max_context=limit))
    (t,) = engine.run([QA("a", "Q?", ["z"])])
    assert char_tokenizer.decode(t.token_ids[:prompt_len]) == engine_prompt
    assert len(t.token_ids) <= limit - 100 + len(turns[0][0])
    assert t.finish_reason == "context"
    info = char_tokenizer.decode([i for i, s in zip(t.token_ids, t.span_types) if s == SpanType.INFORMATION])
    assert info.endswith("</information>\n\n")  # truncated inside, closed properly


def test_prompt_too_long_names_the_question(char_tokenizer):
    engine = RolloutEngine(scripted(char_tokenizer, {}), None, RolloutConfig(max_new_tokens=64, max_context=100))
    with pytest.raises(ValueError, match="question 'long-one'"):
        engine.run([QA("long-one", "x" * 500, ["y"])])


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><search> q </search>", ("search", "q")),
    ("<answer> a </answer>", ("answer", "a")),
    ("<search></search>", ("invalid", None)),
    ("nothing", ("invalid", None)),
    ("<search>a</search> then <answer>b</answer>", ("answer", "b")),
])
def test_parse_action(text, expected):
    assert parse_action(text) == expected


class TurnSynchronous(Generator):
    """The torch backend driven turn by turn (the seam's default `run`) instead of continuously."""

    def __init__(self, inner):
        self.inner, self.tokenizer = inner, inner.tokenizer

    def open(self, prompts, seed=None, row_seeds=None):
        session = self.inner.open(prompts, seed)
        session.run = GenerationSession.run.__get__(session)
        return session


def _full_logprobs(model, ids, temperature):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, -1)


def test_continuous_batching_matches_full_reforward(micro_model, tokenizer, bundle, qas):
    """Rows run their turns independently (prefix sharing, per-row prefills, compaction of released
    rows); every sampled log-prob still equals a dense forward of that row's own tokens."""
    engine = RolloutEngine(TorchGenerator(micro_model, tokenizer), BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_turns=3, max_new_tokens=20, max_context=900, temperature=0.8))
    trajs = engine.run(qas, n_samples=3, seed=5)
    assert len({len(t.token_ids) for t in trajs}) > 3  # rows really ran out of step with each other
    checked = 0
    for t in trajs:
        ref = _full_logprobs(micro_model, t.token_ids, 0.8)
        for pos, (tok, policy, lp) in enumerate(zip(t.token_ids, t.from_policy, t.sampled_logprobs)):
            if policy:
                assert abs(ref[pos - 1, tok].item() - lp) < 1e-4, (t.id, pos)
                checked += 1
    assert checked > 200


def test_continuous_and_turn_synchronous_give_the_same_greedy_rollouts(micro_model, tokenizer, bundle, qas):
    retriever = BM25Retriever(bundle.test_world.passages)
    cfg = RolloutConfig(max_turns=2, max_new_tokens=16, max_context=700, temperature=0.0)
    a = RolloutEngine(TorchGenerator(micro_model, tokenizer), retriever, cfg).run(qas)
    b = RolloutEngine(TurnSynchronous(TorchGenerator(micro_model, tokenizer)), retriever, cfg).run(qas)
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert [t.span_types for t in a] == [t.span_types for t in b]


def test_an_eos_without_an_action_ends_the_trajectory(char_tokenizer, bundle):
    """A turn that ends in EOS (id 0 here) with no search or answer tag ends the rollout there: finish reason
    "eos", not an invalid action, no feedback appended, nothing sampled after the EOS (Search-R1 and verl end the
    trajectory at EOS). Another row's EOS after a complete answer changes nothing."""
    turns = {0: ["I do not know\x00", "<answer>too late</answer>"], 1: ["<answer>x</answer>\x00"]}
    engine = RolloutEngine(scripted(char_tokenizer, turns), BM25Retriever(bundle.test_world.passages),
                           RolloutConfig(max_context=4096))
    t0, t1 = engine.run([QA("q1", "Who?", ["x"])], n_samples=2)
    assert t0.finish_reason == "eos" and t0.num_turns == 1 and t0.invalid_actions == 0
    assert t0.token_ids[-1] == 0 and t0.from_policy[-1]                  # the EOS is the last token, sampled
    assert "too late" not in char_tokenizer.decode(t0.token_ids)        # never sampled after it
    assert INVALID_ACTION_FEEDBACK not in char_tokenizer.decode(t0.token_ids)
    assert t1.finish_reason == "answer" and t1.answer == "x" and t1.exact_match == 1.0
