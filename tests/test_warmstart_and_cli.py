"""Warm start (a few steps of the real trainer on the micro config) and the `sdsearch` CLI end to end."""

import json

import pytest
import torch

from nemo_sdsearch.cli import main


@pytest.fixture
def warm_dir(micro_model_dir):
    return micro_model_dir


def test_warmstart_saves_a_loadable_model(warm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, record, _ = warm_dir
    assert record["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok.encode("<search>", add_special_tokens=False)) == 1
    assert model.config.vocab_size == len(tok)
    saved = json.loads((out / "warmstart.json").read_text())
    assert saved["config"]["model"] == "micro"


def test_warmstart_is_reproducible(warm_dir, tmp_path):
    from safetensors.torch import load_file

    from nemo_sdsearch.world.warmstart import WarmstartConfig, run_warmstart

    out, _, cfg = warm_dir
    again = WarmstartConfig(**{**cfg.__dict__, "out": str(tmp_path / "again")})
    run_warmstart(again, progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_loss_tracks_fp32(bundle, tokenizer):
    """`warmstart --bf16`: the forward under bf16 autocast gives the fp32 loss within bf16 precision, the
    loss itself is fp32, and the fp32 weights get gradients."""
    import random

    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.world.demos import DemoBuilder
    from nemo_sdsearch.world.model_config import qwen2_config
    from nemo_sdsearch.world.warmstart import collate, demo_loss
    from nemo_sdsearch.retrieval import BM25Retriever

    builder = DemoBuilder(tokenizer, BM25Retriever(bundle.train_world.passages), sorted(bundle.train_world.names))
    rng = random.Random(0)
    demos = [d for d in (builder.build(q, rng) for q in bundle.train[:6]) if d][:4]
    ids, attn, policy, info = collate(demos, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config("micro", len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))
    fp32, _ = demo_loss(model, ids, attn, policy, info, 0.5)
    bf16, policy_bf16 = demo_loss(model, ids, attn, policy, info, 0.5, bf16=True)
    assert bf16.dtype == torch.float32 and policy_bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) <= 2e-2 * fp32.item()
    bf16.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_demonstrations_cover_both_formats(bundle, tokenizer):
    import random

    from nemo_sdsearch.world.demos import DemoBuilder
    from nemo_sdsearch.retrieval import BM25Retriever

    builder = DemoBuilder(tokenizer, BM25Retriever(bundle.train_world.passages), sorted(bundle.train_world.names),
                          teacher_fraction=0.5)
    rng = random.Random(0)
    demos = [builder.build(q, rng) for q in bundle.train[:60]]
    demos = [d for d in demos if d]
    texts = [tokenizer.decode(d.token_ids[:d.prompt_length]) for d in demos]
    teacher = [d for d, t in zip(demos, texts) if "Hindsight from" in t]
    assert 10 < len(teacher) < 50
    for d in demos:
        assert d.exact_match == 1.0
        q = next(q for q in bundle.train if q.id == d.question_id)
        assert d.num_searches == len(q.hops)
    # Teacher demonstrations reuse the exact queries of a correct attempt listed in the hindsight block.
    for d, t in zip(demos, texts):
        if "(correct" in t:
            line = next(l for l in t.splitlines() if "(correct" in l)
            assert line.count('search "') >= 1
            assert any(f'search "{d.queries[0]}"' in l for l in t.splitlines() if "(correct" in l)


def test_cli_eval_on_files_writes_table_and_json(warm_dir, bundle, tmp_path, capsys):
    out_model = warm_dir[0]
    data = tmp_path / "mini_test.jsonl"
    data.write_text("".join(json.dumps(q.to_flashrag()) + "\n" for q in bundle.test[:5]))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in bundle.test_world.passages))
    rc = main(["eval", "--data", str(data), "--corpus", str(corpus), "--model", str(out_model),
               "--out", str(tmp_path / "ev"), "--max-new-tokens", "16", "--quiet", "--threads", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    scores = res["scores"]["mini_test"]
    assert scores["all"]["n"] == 5
    assert sum(scores[k]["n"] for k in scores if k != "all") == 5
    assert 0.0 <= scores["all"]["em"] <= 1.0
    assert len(res["predictions"]["mini_test"]) == 5
    assert "| mini_test | **all** | 5 |" in (tmp_path / "ev" / "results.md").read_text()


def test_cli_eval_bad_input(tmp_path, capsys, warm_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q"}\n')
    rc = main(["eval", "--data", str(bad), "--no-retrieval", "--model", str(warm_dir[0]), "--quiet"])
    assert rc == 2
    assert "bad.jsonl:1: missing field(s) ['golden_answers']" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tmp_path / "nope"), "--quiet", "--limit", "1"])
    assert rc == 2 and "not a model directory" in capsys.readouterr().err


def test_cli_world_export(tmp_path):
    assert main(["world", "--out", str(tmp_path)]) == 0
    from nemo_sdsearch.core.qa import load_flashrag
    from nemo_sdsearch.retrieval import load_corpus

    assert len(load_corpus(tmp_path / "test_corpus.jsonl")) >= 1000
    assert len(load_flashrag(tmp_path / "test.jsonl")) == 300


def test_outcome_demonstrations_follow_the_labels_not_the_position_or_the_wording(bundle, tokenizer):
    """hindsight_targets=outcome: the target copies an attempt labelled correct, and nothing else predicts it:
    the correct attempts sit at every position, wrong-labelled attempts hold good plans in other wordings too,
    and with no attempt labelled correct the target is the student's own habit (vague queries included)."""
    import collections
    import random

    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.demos import VAGUE_STYLES, VAGUE_TEMPLATE, DemoBuilder

    builder = DemoBuilder(tokenizer, BM25Retriever(bundle.train_world.passages), sorted(bundle.train_world.names),
                          teacher_fraction=1.0, vague_queries=1.0, hindsight_targets="outcome")
    rng = random.Random(0)
    positions, first, habit_vague, n_with, alternatives = collections.Counter(), 0, [], 0, 0
    for q in bundle.train[:150]:
        attempts, target, vague = builder.outcome_group(q, rng)
        assert 2 <= len(attempts) <= 5
        correct = [i for i, a in enumerate(attempts) if a.correct]
        assert len(correct) <= min(2, len(attempts) - 1)
        if target is None:
            assert not correct
            habit_vague.append(q.id)
            continue
        n_with += 1
        assert tuple(target) in {attempts[i].queries for i in correct}       # the target copies a correct one
        assert builder._hits(q, target)                                       # ... and would find the evidence
        positions.update(correct)
        first += tuple(target) == attempts[0].queries
        # a wrong-labelled attempt with a plan in another wording: the wording alone cannot tell
        alternatives += any(not a.correct and a.queries != tuple(target) for a in attempts)
    assert n_with > 60 and len(habit_vague) > 15 and alternatives > 0.8 * n_with
    assert set(positions) == {0, 1, 2, 3, 4}                                  # every position holds correct ones
    assert first / n_with < 0.5                                               # "copy Attempt 1" does not pay
    # with no attempt labelled correct the demonstration is the student's habit: vague for the habit template
    built = [(q, builder.build(q, rng)) for q in [q for q in bundle.train if q.template == VAGUE_TEMPLATE][:80]]
    prompt = lambda d: tokenizer.decode(d.token_ids[:d.prompt_length])  # noqa: E731
    none_correct = [(q, d) for q, d in built if d is not None and "(correct" not in prompt(d)]
    vague = lambda q, d: d.queries[0] in {style.format(e=q.hops[0].entity) for style in VAGUE_STYLES}  # noqa: E731
    assert len(none_correct) > 5 and all(vague(q, d) for q, d in none_correct), \
        "no attempt correct: the target is the habit (vague_queries=1.0: always vague)"
    demos = [d for _, d in none_correct]
    text = tokenizer.decode(demos[0].token_ids[:demos[0].prompt_length])
    assert "Hindsight from" in text


def test_teacher_query_weight_weights_only_the_query_tokens_of_teacher_demonstrations(bundle, tokenizer):
    import random

    from nemo_sdsearch.retrieval import BM25Retriever
    from nemo_sdsearch.world.demos import DemoBuilder
    from nemo_sdsearch.world.warmstart import collate, demo_loss, loss_weights

    builder = DemoBuilder(tokenizer, BM25Retriever(bundle.train_world.passages), sorted(bundle.train_world.names),
                          teacher_fraction=0.5, hindsight_targets="outcome")
    rng = random.Random(0)
    demos = [d for d in (builder.build(q, rng) for q in bundle.train[:30]) if d is not None]
    teacher = [d for d in demos if getattr(d, "demo_format", None) == "teacher"]
    assert teacher and len(teacher) < len(demos)
    ids, attn, policy, info = collate(demos, tokenizer.pad_token_id)
    assert loss_weights(demos, ids.shape[1], 1.0) is None
    w = loss_weights(demos, ids.shape[1], 4.0)
    for i, d in enumerate(demos):
        q = torch.zeros(ids.shape[1], dtype=torch.bool)
        q[:len(d.token_ids)] = torch.tensor(d.query_mask())
        expected = 4.0 if getattr(d, "demo_format", None) == "teacher" else 1.0
        assert bool(q.any()) and torch.all(w[i][q] == expected) and torch.all(w[i][~q] == 1.0)
    # the weighted policy loss is the weighted mean of the per-token cross-entropies
    from transformers import Qwen2ForCausalLM
    from nemo_sdsearch.world.model_config import qwen2_config

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config("micro", len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))
    with torch.no_grad():
        _, plain = demo_loss(model, ids, attn, policy, info, 0.0)
        _, weighted = demo_loss(model, ids, attn, policy, info, 0.0, weights=w)
        _, ones = demo_loss(model, ids, attn, policy, info, 0.0, weights=torch.ones_like(w))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].double()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        pw = policy[:, 1:] * w[:, 1:]
        assert float(weighted) == pytest.approx(float((ce * pw).sum() / pw.sum()), rel=1e-5)
    assert float(ones) == pytest.approx(float(plain), rel=1e-6)
