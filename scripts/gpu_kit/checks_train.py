"""Training: `train_hf` and `train_megatron`, 3 steps of `sdsearch train` each at lr 1e-6 (the fp32 master
weights must move; the first update's direction measured on its own rollouts), megatron with TP 1, bf16, Megatron
DDP and the distributed optimizer on the GPU, tracking the hf run; in the dry run, a probe of what the GPU run
builds that the CPU run does not (the bf16 frozen reference)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .common import TRAIN_LR, TRAIN_STEPS, Fail, gpu_mode


def stepped_params(optimizer) -> list:
    """The tensors an optimizer steps: for Megatron's mixed-precision optimizers the fp32 main weights (shards
    under the distributed optimizer) held by the torch optimizer inside; for a torch optimizer its params."""
    import torch

    inner = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_opt = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", opt)
        inner += [p for g in torch_opt.param_groups for p in g["params"]]
    return inner


def optimizer_name(optimizer) -> str:
    """`AdamW`, or Megatron's wrappers with what they chain: `ChainedOptimizer[DistributedOptimizer]`."""
    chained = getattr(optimizer, "chained_optimizers", None)
    inner = f"[{','.join(type(o).__name__ for o in chained)}]" if chained else ""
    return type(optimizer).__name__ + inner


def train_overrides(actor: str, mode: str, out_dir: Path) -> list[str]:
    o = [f"actor={actor}", "algorithm=sd_search", "generator=torch", f"trainer.steps={TRAIN_STEPS}",
         f"optim.lr={TRAIN_LR}", "optim.weight_decay=0.0", "trainer.eval_every=0", "trainer.save_every=0",
         "trainer.keep_last=0", "trainer.keep_best=false", "trainer.final_test_eval=false",
         f"trainer.out_dir={out_dir}", "trainer.overwrite=true", "logger.backends=[console]", "trainer.seed=0"]
    if mode == "gpu":
        o += ["model.device=cuda", "trainer.questions_per_step=8", "rollout.group_size=5", "model.threads=8"]
    else:
        o += ["trainer.questions_per_step=2", "rollout.group_size=4", "rollout.max_turns=2",
              "rollout.max_new_tokens=48", "data.dev_questions=2", "data.test_questions=2", "model.threads=1"]
    if actor == "megatron":
        o += ["megatron.tensor_parallel=1", "megatron.pipeline_parallel=1", "megatron.distributed_optimizer=true",
              f"megatron.dtype={'bf16' if mode == 'gpu' else 'auto'}"]
    return o


def first_update_measured(update, tensors_of, captured: dict):
    """`grpo.update_policy`, measuring the first update's direction on its own rollouts with the actor's log-probs
    (`Actor.logprobs_at`, at the rollout temperature): `surrogate_gain`, the sum over rollouts of advantage x the
    change of their policy tokens' log-probs (positive when the update follows the GRPO surrogate; reported, not
    judged: bf16 model weights on the GPU can round lr-1e-6 changes away), with the advantages' absolute sum and
    the step's query tokens (the SD-Search term acts at those)."""
    def measured(actor, ref, trajs, adv, teacher, cfg, pad_id):
        if "first_update" in captured:
            return update(actor, ref, trajs, adv, teacher, cfg, pad_id)
        rollouts = [tensors_of([t], pad_id, actor.device)[:3] for t in trajs]
        logprobs = lambda: [actor.logprobs_at(b, r, c, cfg.rollout.temperature, with_grad=False).double().cpu()
                            for b, r, c in rollouts]  # noqa: E731
        before = logprobs()
        m, stats = update(actor, ref, trajs, adv, teacher, cfg, pad_id)
        gain = sum(float(a) * float((n - o).sum()) for a, o, n in zip(adv.tolist(), before, logprobs()))
        captured["first_update"] = {"surrogate_gain": gain, "adv_abs_sum": float(adv.abs().sum()),
                                    "query_tokens": int(m["n_query"])}
        return m, stats
    return measured


def check_train(actor: str, mode: str, out: Path) -> dict:
    import nemo_sdsearch.algorithms.grpo as grpo
    from nemo_sdsearch.cli import main as sdsearch

    cuda = gpu_mode(mode)
    skipped, predicted = [], []
    captured: dict = {}
    build = grpo.build_components

    def build_and_snapshot(cfg, *a, **kw):  # the run's own components, seen before the first step
        c = build(cfg, *a, **kw)
        captured["c"] = c
        captured["before"] = [p.detach().float().cpu().clone() for p in stepped_params(c.actor.optimizer)]
        return c

    grpo.build_components = build_and_snapshot
    grpo.update_policy = first_update_measured(grpo.update_policy, grpo.micro_batch_tensors, captured)
    run_dir = Path(tempfile.mkdtemp(prefix=f"sdsearch_gpu_{actor}_"))
    argv = ["train", *train_overrides(actor, mode, run_dir)]
    print("$ sdsearch " + " ".join(argv))
    rc = sdsearch(argv)
    if rc != 0:
        raise Fail(f"sdsearch train exited with {rc}")
    c = captured["c"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shutil.copy(run_dir / "metrics.jsonl", out / f"metrics_{actor}.jsonl")
    after = stepped_params(c.actor.optimizer)
    dtypes = sorted({str(p.dtype) for p in after})
    n = sum(p.numel() for p in after)
    moved = sum(int((p.detach().float().cpu() != b).sum()) for p, b in zip(after, captured["before"]))
    max_step = max(float((p.detach().float().cpu() - b).abs().max()) for p, b in zip(after, captured["before"]))
    model_dtype = str(next(c.actor.model.parameters()).dtype)
    figures = {"steps": len(rows), "master_dtypes": dtypes, "master_numel": n, "moved_fraction": moved / max(n, 1),
               "max_abs_update": max_step, "model_dtype": model_dtype, "device": str(c.actor.device),
               "optimizer": optimizer_name(c.actor.optimizer),
               "lr": [r.get("actor/lr") for r in rows], "skipped": [r.get("actor/update_skipped") for r in rows],
               "score": [r.get("critic/score/mean") for r in rows], "grad_norm": [r.get("actor/grad_norm") for r in rows],
               "entropy": [r.get("actor/entropy") for r in rows], "loss": [r.get("actor/loss") for r in rows],
               "step_s": [r.get("timing_s/step") for r in rows], "first_update": captured.get("first_update")}
    print(f"{actor}: {len(rows)} steps; master weights {dtypes} ({n} values, optimizer "
          f"{figures['optimizer']}), model parameters {model_dtype} on {figures['device']}; "
          f"{100 * moved / max(n, 1):.1f}% of the master values moved, largest update {max_step:.3g} "
          f"(lr {TRAIN_LR:g} x {TRAIN_STEPS} steps)")
    for r in rows:
        print(f"  step {r['step']}: score {r['critic/score/mean']:.3f} loss {r['actor/loss']:.4g} grad_norm "
              f"{r['actor/grad_norm']:.4g} entropy {r['actor/entropy']:.4g} jsd {r['sd/jsd']:.4g} lr "
              f"{r['actor/lr']:.3g} skipped {r['actor/update_skipped']} ({r['timing_s/step']:.1f} s)")
    problems = []
    if len(rows) != TRAIN_STEPS:
        problems.append(f"{len(rows)} metrics rows, not {TRAIN_STEPS}")
    if any(r.get("actor/update_skipped") for r in rows):
        problems.append("an update was skipped (non-finite loss or gradient)")
    if any(abs(r.get("actor/lr", 0) - TRAIN_LR) > 1e-12 for r in rows):
        problems.append(f"lr is not {TRAIN_LR:g}")
    if dtypes != ["torch.float32"]:
        problems.append(f"the stepped (master) weights are {dtypes}, not fp32")
    if moved / max(n, 1) < 0.5:
        problems.append(f"only {100 * moved / max(n, 1):.1f}% of the fp32 master values moved at lr {TRAIN_LR:g}")
    if not 0 < max_step <= 4 * TRAIN_STEPS * TRAIN_LR:
        problems.append(f"largest master update {max_step:.3g} is outside (0, {4 * TRAIN_STEPS * TRAIN_LR:.3g}]")
    if cuda and "cuda" not in figures["device"]:
        problems.append(f"the actor is on {figures['device']}, not CUDA")
    if actor == "megatron":
        if cuda:
            if c.actor.ddp is None:
                problems.append("Megatron DDP is not in use")
            if "Distributed" not in figures["optimizer"]:
                problems.append(f"the optimizer is {figures['optimizer']}, not Megatron's DistributedOptimizer")
            if model_dtype != "torch.bfloat16":
                problems.append(f"the Megatron model parameters are {model_dtype}, not bf16")
        else:
            skipped.append("Megatron DDP + distributed optimizer and bf16 parameters: GPU only (on the CPU the actor "
                           "steps fp32 parameters with torch AdamW)")
            predicted = probe_megatron_bf16(argv[1:])
        problems += tracking(rows, out, figures)
    res = {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "figures": figures,
           "skipped": skipped}
    if actor == "megatron" and not cuda and predicted:
        res["predicted_gpu_failures"] = predicted
        if not problems:
            res["status"], res["reason"] = "warn", "the GPU run will fail: " + "; ".join(predicted)
    return res


def probe_megatron_bf16(overrides: list[str]) -> list[str]:
    """On the CPU: build what the GPU run builds that the CPU run does not, where that needs no GPU: the
    frozen reference policy (grpo.kl_coef > 0) with megatron.dtype=bf16, as setup.build_components does on a
    GPU. Returns the predicted GPU failures."""
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.models.megatron.launch import build_megatron_actor, hf_tensor_reader
    from nemo_sdsearch.world.assets import default_model_dir

    cfg = load_config("tiny_cpu", [o for o in overrides if not o.startswith("megatron.dtype=")] +
                      ["megatron.dtype=bf16"])
    hf_config, read = hf_tensor_reader(cfg.model.path or default_model_dir())
    try:
        ref = build_megatron_actor(hf_config, read, cfg, frozen=True)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        msg = (f"the frozen bf16 reference (grpo.kl_coef > 0, megatron.dtype bf16) cannot be built: "
               f"{type(e).__name__}: {str(e).split(';')[0][:200]}")
        print("GPU-path probe: " + msg)
        return [msg]
    dtype = next(ref.model.parameters()).dtype
    print(f"GPU-path probe: the frozen bf16 reference builds ({dtype}, optimizer {ref.optimizer})")
    return []


def tracking(rows: list[dict], out: Path, figures: dict) -> list[str]:
    """Does the megatron run track the hf run? Both start from the same weights, data and seeds; their
    rollouts differ where the generators' precision does (the hf actor's generator shares its fp32 weights,
    the megatron one runs a bf16 copy on a GPU), so the bounds are loose: the mean score over the steps within
    0.2, the first step's entropy within 25% and the gradient norms summed over the steps within a factor of 2
    (a step whose rollouts all score alike has no policy gradient)."""
    path = out / "metrics_hf.jsonl"
    if not path.exists():
        return ["no train_hf metrics to track (run train_hf first)"]
    hf = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"{'step':>4s} {'score hf':>9s} {'score mg':>9s} {'grad hf':>9s} {'grad mg':>9s} {'entropy hf':>11s} "
          f"{'entropy mg':>11s} {'loss hf':>10s} {'loss mg':>10s}")
    for a, b in zip(hf, rows):
        print(f"{a['step']:4d} {a['critic/score/mean']:9.3f} {b['critic/score/mean']:9.3f} {a['actor/grad_norm']:9.4g} "
              f"{b['actor/grad_norm']:9.4g} {a['actor/entropy']:11.4g} {b['actor/entropy']:11.4g} "
              f"{a['actor/loss']:10.4g} {b['actor/loss']:10.4g}")
    problems = []
    if len(hf) != len(rows):
        return [f"hf ran {len(hf)} steps, megatron {len(rows)}"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    d_score = abs(mean(hf, "critic/score/mean") - mean(rows, "critic/score/mean"))
    e_hf, e_mg = hf[0]["actor/entropy"], rows[0]["actor/entropy"]
    g_hf, g_mg = sum(r["actor/grad_norm"] for r in hf), sum(r["actor/grad_norm"] for r in rows)
    figures["tracking"] = {"mean_score_diff": d_score, "entropy_1": [e_hf, e_mg], "grad_norm_sum": [g_hf, g_mg]}
    if d_score > 0.2:
        problems.append(f"mean score differs by {d_score:.3f} (> 0.2)")
    if abs(e_hf - e_mg) > 0.25 * max(abs(e_hf), 1e-9):
        problems.append(f"step-1 entropy {e_mg:.4g} vs hf {e_hf:.4g} (> 25%)")
    if max(g_hf, g_mg) > 1e-9 and not (0.5 <= g_mg / max(g_hf, 1e-12) <= 2.0):
        problems.append(f"summed grad norms {g_mg:.4g} vs hf {g_hf:.4g} (beyond a factor of 2)")
    print("megatron tracks hf" if not problems else "megatron does NOT track hf: " + "; ".join(problems))
    return problems
