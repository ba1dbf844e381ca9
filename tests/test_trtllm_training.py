"""`sdsearch train generator=trtllm` wiring, on CPU through the TensorRT-LLM API double of
tests/fake_trtllm.py (the real engine needs a GPU; the double is a two-worker tensor-parallel engine that
serves every worker's shard and discards its weights on a level-2 sleep): the generator sleeps during every
update, is refitted in place after it, serves exactly the trained weights, and each GRPO update moves the
policy the way its objective says, measured on what the engine serves."""

import torch

from nemo_sdsearch.algorithms import grpo
from nemo_sdsearch.config import load_config


def policy_logprobs(model, traj, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of a trajectory's policy tokens under `model` (float64)."""
    ids = torch.tensor([traj.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double() / temperature, -1)
    pos = torch.tensor([p for p, m in enumerate(traj.policy_mask()) if m and p > 0])
    return logp[pos - 1, ids[0, pos]]


def surrogate_gain(before: list[torch.Tensor], after: list[torch.Tensor], adv) -> float:
    """sum over rollouts of advantage x (sum of policy-token log-prob changes): the first-order change of the GRPO
    surrogate. A step of the optimizer on the surrogate makes it positive; on a flipped one, negative."""
    return float(sum(float(a) * float((n - o).sum()) for a, o, n in zip(adv, before, after)))


def test_train_with_the_trtllm_generator_refits_and_sleeps(tmp_path, monkeypatch):
    """GRPO on the embedded model, two steps of 2 questions x 4 rollouts (2 turns: it searches, then answers, so
    a group's rewards can differ and the surrogate has a gradient)."""
    from fake_trtllm import fake_generator

    from nemo_sdsearch.world.assets import default_model_dir

    made, steps = [], []

    def fake_trtllm_generator(model_dir, tok, **kwargs):
        from transformers import AutoModelForCausalLM

        g = fake_generator(AutoModelForCausalLM.from_pretrained(str(model_dir)), tok)
        made.append(g)
        return g

    def engine_logprobs(trajs):
        return [policy_logprobs(made[0].llm.model, t, 1.0) for t in trajs]

    update_policy, refit_generator = grpo.update_policy, grpo.refit_generator

    def recorded_update(actor, ref, trajs, adv, *a, **k):  # the engine still serves the weights that sampled
        steps.append({"trajs": trajs, "adv": adv.clone(), "before": engine_logprobs(trajs)})
        return update_policy(actor, ref, trajs, adv, *a, **k)

    def recorded_refit(actor, sink):
        refit_generator(actor, sink)
        steps[-1]["after"] = engine_logprobs(steps[-1]["trajs"])  # what the engine serves after the refit

    import nemo_sdsearch.rollout.trtllm_generator as trt

    monkeypatch.setattr(trt, "TRTLLMGenerator", fake_trtllm_generator)
    monkeypatch.setattr(grpo, "update_policy", recorded_update)
    monkeypatch.setattr(grpo, "refit_generator", recorded_refit)
    overrides = {"model.path": str(default_model_dir()), "model.threads": 1, "generator": "trtllm",
                 "algorithm": "grpo", "cluster.gpus_per_node": 1, "trainer.steps": 2,
                 "trainer.questions_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 48,
                 "rollout.max_turns": 2, "rollout.max_context": 1024, "trainer.eval_every": 0,
                 "trainer.save_every": 1, "trainer.final_test_eval": False, "trainer.out_dir": str(tmp_path / "run"),
                 "grpo.micro_batch_size": 4, "optim.lr": 1e-4}
    cfg = load_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.rollout.temperature == 1.0
    summary = grpo.train(cfg, progress=False)
    assert len(summary["history"]) == 2 and len(made) == 1 and len(steps) == 2
    llm = made[0].llm
    methods = [m for m, _ in llm.calls]
    assert methods.count("sleep") == 2 and methods.count("wakeup") == 2  # once per update
    assert [args[0] for m, args in llm.calls if m == "sleep"] == [["kv_cache"]] * 2  # level 1: weights kept
    assert methods.count("update_weights") >= 2  # buckets + finalize, every step
    # every refit streamed the whole model in buckets of at most refit_bucket_bytes (or one larger tensor)
    from test_weight_stream import check_buckets

    assert len(llm.refits) >= 2
    for buckets in llm.refits:
        check_buckets(buckets, made[0].refit_bucket_bytes)
        assert {n for b in buckets for n, _ in b} >= {n for n, _ in llm.model.named_parameters()}
    from safetensors.torch import load_file

    # the engine serves exactly the trained weights, every tensor assembled from both workers' shards
    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    held = llm.model.state_dict()
    assert all(torch.equal(held[k], trained[k]) for k in trained)
    for s in steps:
        # the rollouts' log-probs are the trainer's convention of the weights that sampled them
        for t, lp in zip(s["trajs"], s["before"]):
            sampled = torch.tensor([x for p, (x, m) in enumerate(zip(t.sampled_logprobs, t.policy_mask()))
                                    if m and p > 0])
            assert torch.allclose(sampled.double(), lp, atol=1e-4)
    # each update with a policy gradient moved the served policy the way the surrogate says: the rollouts with a
    # positive advantage gained log-probability, those with a negative one lost it, weighted by their advantages
    # (the KL to the reference has no gradient at the first step, where the reference is the policy)
    graded = [s for s in steps if s["adv"].abs().sum() > 0]
    assert graded and graded[0] is steps[0], "step 1's groups all scored alike: no policy gradient to check"
    for s in graded:
        assert surrogate_gain(s["before"], s["after"], s["adv"]) > 0, s["adv"]
