"""`sdsearch train generator=trtllm` wiring, on CPU through the TensorRT-LLM API double of
tests/fake_trtllm.py (the real engine needs a GPU): the generator sleeps during every update, is
refitted in place after it, and ends holding exactly the trained weights."""

import torch

from nemo_sdsearch.algorithms import grpo
from nemo_sdsearch.config import load_config


def test_train_with_the_trtllm_generator_refits_and_sleeps(tmp_path, monkeypatch):
    """Uses the embedded model: it searches, so the SD-Search term moves the weights."""
    from fake_trtllm import fake_generator

    from nemo_sdsearch.world.assets import default_model_dir

    made = []

    def fake_trtllm_generator(model_dir, tok, **kwargs):
        from transformers import AutoModelForCausalLM

        g = fake_generator(AutoModelForCausalLM.from_pretrained(str(model_dir)), tok)
        made.append(g)
        return g

    import nemo_sdsearch.rollout.trtllm_generator as trt

    monkeypatch.setattr(trt, "TRTLLMGenerator", fake_trtllm_generator)
    overrides = {"model.path": str(default_model_dir()), "model.threads": 1, "generator": "trtllm",
                 "cluster.gpus_per_node": 1, "trainer.steps": 2, "trainer.questions_per_step": 2,
                 "rollout.group_size": 2, "rollout.max_new_tokens": 32, "rollout.max_turns": 1,
                 "rollout.max_context": 1024, "trainer.eval_every": 0, "trainer.save_every": 1,
                 "trainer.final_test_eval": False, "trainer.out_dir": str(tmp_path / "run"),
                 "grpo.micro_batch_size": 2, "optim.lr": 1e-4}
    cfg = load_config("tiny_cpu", [f"{k}={v}" for k, v in overrides.items()])
    summary = grpo.train(cfg, progress=False)
    assert len(summary["history"]) == 2 and len(made) == 1
    llm = made[0].llm
    methods = [m for m, _ in llm.calls]
    assert methods.count("sleep") == 2 and methods.count("wakeup") == 2  # once per update
    assert methods.count("update_weights") >= 2  # buckets + finalize, every step
    # every refit streamed the whole model in buckets of at most refit_bucket_bytes (or one larger tensor)
    from test_weight_stream import check_buckets

    assert len(llm.refits) >= 2
    for buckets in llm.refits:
        check_buckets(buckets, made[0].refit_bucket_bytes)
        assert {n for b in buckets for n, _ in b} >= {n for n, _ in llm.model.named_parameters()}
    from safetensors.torch import load_file

    trained = load_file(tmp_path / "run" / "final" / "model.safetensors")
    held = llm.model.state_dict()
    assert all(torch.equal(held[k], trained[k]) for k in trained)
    initial = load_file(default_model_dir() / "model.safetensors")
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)  # the weights did move
