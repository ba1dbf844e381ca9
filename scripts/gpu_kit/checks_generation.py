"""Generation: `generator` (torch-generator tokens/s) and `launch` (slurm/train_7b.sh's launch path on one node:
the job's Ray cluster, torchrun, 2 steps with generator=trtllm, the real TensorRT-LLM on the GPU, the tests'
stand-in in the dry run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import QWEN_05B, ROOT, Fail, Skip, gpu_mode, qwen_config


class _StubTokenizer:
    """Just enough tokenizer for the torch generator on a random model: one letter per token id."""

    def __init__(self, eos: int, pad: int):
        self.eos_token_id, self.pad_token_id = eos, pad

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) - 97 for ch in text]


def check_generator(mode: str, out: Path) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.rollout.generator import SamplingParams
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator

    cuda = gpu_mode(mode)
    device = "cuda" if cuda else "cpu"
    cfg = qwen_config(mode)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32).eval()
    gen = TorchGenerator(model, _StubTokenizer(eos=0, pad=1), max_concurrent_rows=256)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(2, cfg.vocab_size, (64 if cuda else 8,), generator=g).tolist()  # a shared instruction
    stops = ("</search>", "</answer>")
    shapes = [(64, 128, 256), (256, 128, 128)] if cuda else [(4, 8, 8)]
    gen.open([prefix + [5, 6]] * 2, seed=0).generate(SamplingParams(max_new_tokens=4, stop=stops))  # warm-up
    figures = {}
    for rows, prompt_len, new in shapes:
        prompts = [prefix + torch.randint(2, cfg.vocab_size, (prompt_len - len(prefix),), generator=g).tolist()
                   for _ in range(rows)]
        sync()
        t0 = time.perf_counter()
        session = gen.open(prompts, seed=1)
        done = session.generate(SamplingParams(max_new_tokens=new, temperature=1.0, stop=stops))
        sync()
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in done.values())
        figures[f"{rows}x{prompt_len}+{new}"] = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}
        print(f"{rows} rows, prompts of {prompt_len} tokens (a {len(prefix)}-token shared prefix), up to {new} new "
              f"tokens each: {tokens} tokens in {dt:.2f} s = {tokens / dt:,.0f} tokens/s "
              f"({'bf16, CUDA' if cuda else 'fp32, CPU'})")
    return {"status": "pass", "figures": figures,
            "skipped": [] if cuda else ["the 0.5B-class shape and CUDA timing: GPU only (a tiny model here)"]}


def check_launch(mode: str, out: Path) -> dict:
    """The launch path of slurm/train_7b.sh, minus SLURM, on this machine: `ray_cluster start` (the head, with a
    per-run token) and `wait`, then `torchrun --standalone --nproc-per-node 1 sdsearch train actor=megatron
    generator=trtllm` for two steps against it (RAY_ADDRESS), then the head stopped. On a GPU: a 0.5B-class
    Qwen2 (random weights, built from its config) and the real TensorRT-LLM, which must be importable (the NGC
    container; the lent machine has neither Ray nor TensorRT-LLM, and Ray's wheel is over the carry limit).
    Dry run: the embedded tiny model and the tests' TensorRT-LLM stand-in (tests/stand_in) on the CPU. One rank
    (one GPU), so the engine builds its own placement; the two-rank placement runs in tests/test_slurm.py."""
    import importlib.util

    import torch

    cuda = gpu_mode(mode)
    missing = [m for m in ("ray", *(["tensorrt_llm"] if cuda else [])) if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed here (the NGC container has both; Ray's wheel, ~70 MB, "
                   "is over what a device call carries)")
    from nemo_sdsearch.rollout.ray_cluster import one_node_cluster
    from nemo_sdsearch.world.assets import default_model_dir

    work = Path(tempfile.mkdtemp(prefix="sdsearch_launch_"))
    if cuda:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        model_dir = work / "model"
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))  # the project's tokenizer: its vocabulary
        shape = {**QWEN_05B, "vocab_size": len(tok)}                    # (a sampled id must decode)
        Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype="bfloat16")).to(torch.bfloat16).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    else:
        model_dir = default_model_dir()
    extra = {} if cuda else {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "stand_in"),
                                                            os.environ.get("PYTHONPATH", "")]),
                             "SDSEARCH_RAY_START_ARGS": "--object-store-memory=200000000"}
    t0 = time.perf_counter()
    with one_node_cluster(gpus=torch.cuda.device_count() if cuda else 0, env={**os.environ, **extra}) as env:
        ray_s = time.perf_counter() - t0
        print(f"ray: one node up at {env['RAY_ADDRESS']} in {ray_s:.1f} s", flush=True)
        run_dir = work / "run"
        o = ["actor=megatron", "generator=trtllm", f"model.path={model_dir}", "trainer.steps=2", "trainer.save_every=0",
             "trainer.eval_every=0", "trainer.final_test_eval=false", f"trainer.out_dir={run_dir}",
             "logger.backends=[console]", "cluster.gpus_per_node=1", "trainer.questions_per_step=2",
             "rollout.group_size=2", "rollout.max_turns=1", "rollout.max_new_tokens=24", "rollout.max_context=1024",
             "grpo.micro_batch_size=2", "data.dev_questions=2", "data.test_questions=2"]
        o += ["model.device=cuda", "megatron.dtype=bf16"] if cuda else ["model.threads=1"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                    "--no-python", str(Path(sys.executable).parent / "sdsearch"), "train", *o]
        print("$ " + " ".join(torchrun), flush=True)
        t1 = time.perf_counter()
        tr = subprocess.run(torchrun, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        train_s = time.perf_counter() - t1
        print(tr.stdout[-6000:] + tr.stderr[-3000:])
        if tr.returncode != 0:
            raise Fail(f"sdsearch train under torchrun exited with {tr.returncode}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    problems = []
    if len(rows) != 2:
        problems.append(f"{len(rows)} metrics rows, not 2")
    if any(r.get("actor/update_skipped") for r in rows):
        problems.append("an update was skipped (non-finite loss or gradient)")
    figures = {"ray_start_s": round(ray_s, 1), "train_s": round(train_s, 1),
               "step_s": [r.get("timing_s/step") for r in rows], "gen_s": [r.get("timing_s/gen") for r in rows],
               "engine": "TensorRT-LLM" if cuda else "the tests' stand-in"}
    print(f"launch: Ray head up in {ray_s:.1f} s; 2 steps under torchrun in {train_s:.1f} s with {figures['engine']}")
    return {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "figures": figures,
            "skipped": [] if cuda else ["the real TensorRT-LLM and CUDA: GPU only (the tests' stand-in here)"]}
