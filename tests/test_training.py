"""GRPO / SD-Search training: exact resume, the teacher pass, the query-only JSD, bad input."""

import copy
import json
import math

import pytest
import torch

from nemo_sdsearch.config import ConfigError, load_config

TIMING = ("timing_s/", "timing_per_token_ms/", "perf/")  # wall-clock metrics: never equal across runs


def tiny_overrides(model_dir, out_dir, steps, **extra):
    base = {
        "model.path": str(model_dir), "model.threads": 1, "trainer.steps": steps, "trainer.questions_per_step": 2,
        "rollout.group_size": 2, "rollout.max_new_tokens": 12, "rollout.max_turns": 1, "rollout.max_context": 512,
        "trainer.eval_every": 0, "trainer.save_every": 1, "trainer.final_test_eval": False,
        "trainer.out_dir": str(out_dir), "grpo.micro_batch_size": 2, "optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(overrides):
    from nemo_sdsearch.algorithms.grpo import train

    return train(load_config("tiny_cpu", overrides), progress=False)


def final_params(out_dir):
    from safetensors.torch import load_file

    return load_file(out_dir / "final" / "model.safetensors")


@pytest.mark.slow
def test_exact_resume(tmp_path):
    """N steps, stop, resume N steps == 2N straight steps (parameters and metrics). Uses the embedded
    model: it searches and sometimes answers correctly, so advantages, KL and JSD all move the weights."""
    from nemo_sdsearch.world.assets import default_model_dir

    model_dir = default_model_dir()
    extra = {"rollout.max_new_tokens": 40, "rollout.max_turns": 2, "rollout.group_size": 3,
             "optim.lr": 1e-4, "rollout.max_context": 1024}
    straight = run(tiny_overrides(model_dir, tmp_path / "a", 4, **extra))
    run(tiny_overrides(model_dir, tmp_path / "b", 2, **extra))
    resumed = run(tiny_overrides(model_dir, tmp_path / "b", 4, **{"trainer.resume": True}, **extra))
    pa, pb = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    # Not vacuous: every term was active and the policy left the reference. The k3 KL to the frozen reference
    # is 0 before the first update (the same weights score the same tokens) and positive after every one;
    # advantages of both signs reached the surrogate; the JSD had query positions to work on.
    hist = straight["history"]
    assert abs(hist[0]["actor/kl_loss"]) < 1e-7 and all(h["actor/kl_loss"] > 1e-4 for h in hist[1:])
    assert not any(h["actor/update_skipped"] for h in hist)
    assert any(h["critic/advantages/max"] > 0 > h["critic/advantages/min"] and h["actor/pg_loss"] != 0 for h in hist)
    assert all(h["sd/query_tokens"] > 0 and math.isfinite(h["sd/jsd"]) and h["sd/jsd"] > 0 for h in hist)
    # (compared as JSON text: bit-exact floats, and a NaN sd/jsd equals itself)
    strip = lambda h: json.dumps([{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in h])
    assert strip(straight["history"]) == strip(resumed["history"])
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "curves.png").stat().st_size > 10_000


def test_grpo_and_sd_search_metrics(micro_model_dir, tmp_path):
    summary = run(tiny_overrides(micro_model_dir[0], tmp_path / "sd", 1))
    row = summary["history"][0]
    for key in ("critic/score/mean", "env/number_of_valid_search", "sd/jsd", "sd/agreement", "actor/kl_loss",
                "actor/pg_clipfrac", "actor/entropy", "actor/pg_loss", "perf/throughput", "timing_s/gen",
                "timing_s/teacher", "timing_s/update_actor", "timing_s/retrieval"):
        assert key in row and math.isfinite(row[key]), (key, row.get(key))   # NaN fails too
    summary = run(tiny_overrides(micro_model_dir[0], tmp_path / "grpo", 1, algorithm="grpo"))
    assert math.isnan(summary["history"][0]["sd/jsd"]) and summary["history"][0]["timing_s/teacher"] == 0.0


def test_learning_rate_warms_up_linearly_over_the_warmup_ratio_of_the_steps(micro_model_dir, tmp_path):
    """optim.warmup_ratio: step k (0-based) of the first W = ceil(ratio * steps) runs at lr * (k + 1) / W, then lr
    (the rate the optimizer really held, as actor/lr logs it); 0 = lr from the first step."""
    from nemo_sdsearch.algorithms.grpo import scheduled_lr

    cfg = load_config("tiny_cpu", ["trainer.steps=12", "optim.lr=1e-3", "optim.warmup_ratio=0.285"])
    assert [scheduled_lr(cfg, k) for k in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # W = ceil(3.42)
    assert scheduled_lr(load_config("tiny_cpu", ["optim.lr=1e-3"]), 0) == 1e-3
    summary = run(tiny_overrides(micro_model_dir[0], tmp_path / "w", 3, algorithm="grpo",
                                 **{"optim.warmup_ratio": 0.5, "trainer.save_every": 0}))
    assert [h["actor/lr"] for h in summary["history"]] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_teacher_pass_has_no_gradient(micro_model):
    from nemo_sdsearch.models.base import SequenceBatch
    from nemo_sdsearch.models.hf import HFActor

    micro_model = copy.deepcopy(micro_model)  # the session's model is shared: train a copy
    actor = HFActor(micro_model, lr=1e-3)
    batch = SequenceBatch.from_lists([[5, 6, 7, 8], [9, 10, 11]], pad_id=1)
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 2])
    micro_model.zero_grad(set_to_none=True)
    t = actor.teacher_logits_at(batch, rows, cols)
    assert not t.requires_grad and t.grad_fn is None
    s = actor.logits_at(batch, rows, cols)
    assert s.requires_grad
    assert torch.allclose(t, s.detach(), atol=1e-5)  # same weights, same context: same logits
    # A loss through the teacher side alone cannot reach the weights.
    with pytest.raises(RuntimeError):
        (t * 2).sum().backward()
    assert all(p.grad is None for p in micro_model.parameters())


def test_only_query_positions_enter_the_jsd():
    from nemo_sdsearch.losses.grpo_sd_loss import jsd_at_queries
    from nemo_sdsearch.config import SDSection

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 50, generator=g, dtype=torch.float64) * 3
    is_q = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    teacher = torch.randn(4, 50, generator=g, dtype=torch.float64) * 3
    base = jsd_at_queries(logits, is_q, teacher, SDSection()).sum()
    other = logits.clone()
    other[~is_q] += torch.randn(6, 50, generator=g, dtype=torch.float64) * 10
    assert jsd_at_queries(other, is_q, teacher, SDSection()).sum().item() == base.item()
    x = logits.clone().requires_grad_()
    jsd_at_queries(x, is_q, teacher, SDSection()).sum().backward()
    assert (x.grad[~is_q] == 0).all() and (x.grad[is_q].abs().sum(-1) > 0).all()
    moved = logits.clone()
    moved[1] += 5 * torch.randn(50, generator=g, dtype=torch.float64)
    assert jsd_at_queries(moved, is_q, teacher, SDSection()).sum().item() != base.item()


def test_non_finite_loss_skips_the_step(micro_model):
    from nemo_sdsearch.models.hf import HFActor

    micro_model = copy.deepcopy(micro_model)  # the session's model is shared: train a copy
    actor = HFActor(micro_model, lr=1e-2)
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    p = next(micro_model.parameters())
    stats = actor.train_step(lambda i: p.sum() * float("nan"), 1)
    assert stats["skipped"]
    assert all(torch.equal(before[k], v) for k, v in micro_model.state_dict().items())
    # the skipped step took no optimizer step, so this is Adam's first: with m = (1 - b1) g, v = (1 - b2) g^2
    # and the bias corrections, p <- p - lr g / (|g| + eps), g = the clipped gradient of 1e-3 |p|^2 summed over
    # the 2 micro-batches
    params_before = {n: q.detach().clone() for n, q in micro_model.named_parameters()}
    name = next(n for n, q in micro_model.named_parameters() if q is p)
    stats = actor.train_step(lambda i: (p ** 2).sum() * 1e-3, 2)
    assert not stats["skipped"]
    x = params_before[name].double()
    g = 2 * 2e-3 * x
    norm = g.norm()
    assert stats["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    g = g * min(1.0, 1.0 / (norm.item() + 1e-6))        # clip_grad_norm_ at actor.grad_clip = 1
    want = x - 1e-2 * g / (g.abs() + 1e-8)
    assert torch.allclose(p.detach().double(), want, rtol=0, atol=1e-6)
    # the loss's direction: every non-zero weight stepped toward 0, and the loss fell
    step, nz = p.detach().double() - x, x != 0
    assert nz.float().mean() > 0.9 and (step[nz] * x[nz] < 0).all() and (step[~nz] == 0).all()
    assert (p.detach().double() ** 2).sum() < (x ** 2).sum()
    # no gradient, no step: every other parameter is bit-identical
    assert all(torch.equal(q, params_before[n]) for n, q in micro_model.named_parameters() if n != name)


@pytest.mark.parametrize("override, message", [
    ("sd.bta=0.3", "sd.bta"),
    ("+trainer.foo=1", "trainer.foo"),
    ("trainer.steps=abc", "trainer.steps"),
    ("sd.beta=1.5", "sd.beta"),
    ("algorithm=ppo", "algorithm"),
    ("rollout.group_size=1", "rollout.group_size"),
])
def test_invalid_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("tiny_cpu", [override])


def test_search_e1_refuses_its_dev_files_as_test_files(tmp_path):
    """Search-E1 selects the OPSD step on dev EM: dev files that are also test files (named two ways too) would
    report a test EM that selected itself. The other algorithms only monitor on dev and may share them."""
    files = {k: str(tmp_path / f"{k}.jsonl") for k in ("train", "dev")}
    common = ["rollout.retriever=http", "cluster.retrieval_url=http://127.0.0.1:9/retrieve",
              f"data.train_files=[{files['train']}]", f"data.dev_files=[{files['dev']}]"]
    same = f"data.test_files=[{tmp_path}/./dev.jsonl]"
    with pytest.raises(ConfigError, match=r"data\.test_files.*selection set"):
        load_config("tiny_cpu", ["algorithm=search_e1", *common, same])
    assert load_config("tiny_cpu", ["algorithm=sd_search", *common, same]).algorithm == "sd_search"
    held_out = f"data.test_files=[{tmp_path}/test.jsonl]"
    assert load_config("tiny_cpu", ["algorithm=search_e1", *common, held_out]).data.test_files


def test_every_dev_evaluation_searches_the_runs_own_corpus(tmp_path):
    """`setup.retrievers`, which the trainer's engines use (Search-E1's OPSD round evaluates on the run's dev engine):
    the retrieval service for questions from files (the user's corpus), the bundled world's train / test passages
    otherwise (the LoRA round's dev retriever was once the bundled world's whatever the data)."""
    import inspect

    from nemo_sdsearch.algorithms import search_e1, setup
    from nemo_sdsearch.algorithms.setup import retrievers
    from nemo_sdsearch.retrieval.bm25 import BM25Retriever
    from nemo_sdsearch.retrieval.client import RetrievalClient
    from nemo_sdsearch.world.assets import default_bundle

    files = [f"data.{k}_files=[{tmp_path}/{k}.jsonl]" for k in ("train", "dev", "test")]
    cfg = load_config("tiny_cpu", [*files, "rollout.retriever=http", "cluster.retrieval_url=http://10.1.2.3:8000/retrieve"])
    dev, test = retrievers(cfg)
    assert isinstance(dev, RetrievalClient) and dev is test and dev.url.startswith("http://10.1.2.3:8000")
    dev, test = retrievers(load_config("tiny_cpu", []))
    bundle = default_bundle()
    assert isinstance(dev, BM25Retriever) and dev.corpus == list(bundle.train_world.passages)
    assert test.corpus == list(bundle.test_world.passages)
    assert "retrievers(cfg)" in inspect.getsource(setup._engines)
    assert 'c.engines["dev"]' in inspect.getsource(search_e1.opsd_round)


def test_cli_train_bad_key_exits_2(capsys):
    from nemo_sdsearch.cli import main

    assert main(["train", "sd.bta=1"]) == 2
    assert "sd.bta" in capsys.readouterr().err
