"""Memory: `memory`, what one GPU really reserves per phase of a training step, next to what
`nemo_sdsearch/layout.py` estimates for the same config, so the memory model's error is a number the next session
can correct.

Two steps of `sdsearch train actor=megatron generator=torch` (TP 1, bf16, Megatron DDP + distributed optimizer) on
a Qwen2 model of Qwen2.5-0.5B's shape (random weights, the project's vocabulary). Around every rollout (the
generation phase) and every update (the training phase) the peak statistics are reset and read back:
`torch.cuda.max_memory_reserved` (what the allocator held: what the estimate models) and
`torch.cuda.max_memory_allocated`. The estimate is `layout.memory_estimate` of the run's own config with
`cluster.gpus_per_node=1` and the model's architecture. Dry run (no GPU): the embedded tiny model on the CPU, the
estimate printed, nothing measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .common import QWEN_05B, Fail, gpu_mode

GIB = 1024 ** 3


def phase_probe(fn, name: str, peaks: dict, cuda: bool, entered: set):
    """`fn` with the CUDA peak statistics reset before it and the phase's peak reserved / allocated bytes kept
    (the largest over calls) in `peaks[name]`; `name` is added to `entered` when the phase runs (on the CPU too,
    so the dry run sees that training still goes through the probed functions)."""
    import torch

    def probed(*args, **kwargs):
        entered.add(name)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
            got = peaks.setdefault(name, {"reserved": 0, "allocated": 0})
            got["reserved"] = max(got["reserved"], torch.cuda.max_memory_reserved())
            got["allocated"] = max(got["allocated"], torch.cuda.max_memory_allocated())
        return out
    return probed


def comparison(est, peaks: dict) -> tuple[list[str], dict]:
    """Lines of the table (phase, measured reserved / allocated, estimate, measured / estimate) and the figures. The
    estimate is the phase total without the CUDA contexts and NCCL buffers (`CUDA_NCCL_OVERHEAD_GIB`), which torch's
    allocator does not hold."""
    from nemo_sdsearch.layout import CUDA_NCCL_OVERHEAD_GIB

    lines = [f"{'phase':11s} {'reserved GiB':>13s} {'allocated GiB':>14s} {'estimate GiB':>13s} {'reserved/est':>13s}"
             f"   (estimate: the phase total less the {CUDA_NCCL_OVERHEAD_GIB:g} GiB of CUDA contexts + NCCL)"]
    figures = {}
    for phase, total in (("generation", est.generation_gib), ("training", est.training_gib)):
        estimate = total - CUDA_NCCL_OVERHEAD_GIB
        got = peaks.get(phase)
        reserved = got["reserved"] / GIB if got else None
        allocated = got["allocated"] / GIB if got else None
        ratio = reserved / estimate if reserved is not None and estimate else None
        figures[phase] = {"reserved_gib": reserved, "allocated_gib": allocated, "estimate_gib": estimate,
                          "reserved_over_estimate": ratio}
        fmt = lambda v, w: f"{v:{w}.2f}" if v is not None else f"{'-':>{w}s}"  # noqa: E731
        lines.append(f"{phase:11s} {fmt(reserved, 13)} {fmt(allocated, 14)} {estimate:13.2f} {fmt(ratio, 13)}")
    return lines, figures


def check_memory(mode: str, out: Path) -> dict:
    cuda = gpu_mode(mode)
    import torch

    import nemo_sdsearch.algorithms.grpo as grpo
    from nemo_sdsearch.cli import main as sdsearch
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.layout import memory_estimate
    from nemo_sdsearch.world.assets import default_model_dir

    work = Path(tempfile.mkdtemp(prefix="sdsearch_memory_"))
    if cuda:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        model_dir = work / "model"
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
        shape = {**QWEN_05B, "vocab_size": len(tok)}
        Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype="bfloat16")).to(torch.bfloat16).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    else:
        model_dir = default_model_dir()
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    arch = [f"arch.hidden_size={hf['hidden_size']}", f"arch.num_layers={hf['num_hidden_layers']}",
            f"arch.num_attention_heads={hf['num_attention_heads']}", f"arch.num_kv_heads={hf['num_key_value_heads']}",
            f"arch.ffn_hidden_size={hf['intermediate_size']}", f"arch.vocab_size={hf['vocab_size']}",
            f"arch.tied_embeddings={str(hf.get('tie_word_embeddings', True)).lower()}"]
    run_dir = work / "run"
    o = ["actor=megatron", "generator=torch", "algorithm=sd_search", f"model.path={model_dir}", "trainer.steps=2",
         "trainer.save_every=0", "trainer.eval_every=0", "trainer.final_test_eval=false", f"trainer.out_dir={run_dir}",
         "trainer.overwrite=true", "logger.backends=[console]", "trainer.questions_per_step=4", "rollout.group_size=4",
         "rollout.max_new_tokens=64", "rollout.max_context=1024", "grpo.micro_batch_size=4",
         "data.dev_questions=2", "data.test_questions=2", "megatron.tensor_parallel=1", "megatron.pipeline_parallel=1"]
    # dry run: nothing is measured, so one small step shows the path (the probes entered, the estimate printed)
    o += ["model.device=cuda", "megatron.dtype=bf16", "model.threads=8"] if cuda else \
        ["model.threads=1", "trainer.steps=1", "trainer.questions_per_step=2", "rollout.group_size=2",
         "rollout.max_turns=1", "rollout.max_new_tokens=16"]
    peaks: dict = {}
    entered: set = set()
    saved = grpo.replica_rollouts, grpo.update_policy
    grpo.replica_rollouts = phase_probe(grpo.replica_rollouts, "generation", peaks, cuda, entered)
    grpo.update_policy = phase_probe(grpo.update_policy, "training", peaks, cuda, entered)
    try:
        print("$ sdsearch train " + " ".join(o), flush=True)
        rc = sdsearch(["train", *o])
    finally:
        grpo.replica_rollouts, grpo.update_policy = saved
    if rc != 0:
        raise Fail(f"sdsearch train exited with {rc}")
    cfg = load_config("tiny_cpu", [*o, *arch, "cluster.gpus_per_node=1"], check_memory=False)
    est = memory_estimate(cfg, world=1)
    print(est.table())
    lines, figures = comparison(est, peaks)
    print("\n".join(lines))
    problems, skipped = [], []
    for phase, fn in (("generation", "grpo.replica_rollouts"), ("training", "grpo.update_policy")):
        if phase not in entered:
            problems.append(f"the {phase} phase never ran through its probe ({fn} was not called)")
    if cuda:
        for phase, f in figures.items():
            if f["reserved_gib"] is None:
                problems.append(f"no {phase} phase was measured")
    else:
        skipped.append("torch.cuda.max_memory_reserved per phase: GPU only (the estimate is printed)")
    off = [f"{p} {f['reserved_over_estimate']:.2f}x" for p, f in figures.items()
           if f["reserved_over_estimate"] is not None and not 0.5 <= f["reserved_over_estimate"] <= 2.0]
    res = {"status": "fail" if problems else ("warn" if off else "pass"),
           "reason": "; ".join(problems) or (f"measured / estimated outside [0.5, 2]: {', '.join(off)}" if off else ""),
           "figures": {"phases": figures, "params": est.params}, "skipped": skipped}
    (out / "memory.json").write_text(json.dumps(res, indent=1, default=str))
    return res
