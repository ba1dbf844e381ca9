"""GRPO and SD-Search training recipe (`sdsearch train`), top to bottom.

One step:
  1. sample B questions (one shared sampler); this data-parallel replica takes every dp-th question
     group, its leader rolls out G trajectories per question with the student prompt and shares them with
     the replica's other ranks (tensor / pipeline shards)
  2. reward = EM of the final answer; group-normalised advantages (a group never spans replicas)
  3. old and reference log-probs at policy positions (no grad)
  4. [sd_search] a hindsight block per rollout (sd.hindsight_members / hindsight_source); teacher sequences;
     teacher logits at query positions
  5. update: `GRPOSDLoss` (clipped surrogate + kl_coef * k3 KL [+ sd.coef * JSD at query positions]),
     normalised by the counts of the whole batch over all replicas, so any split trains like one process
Periodic greedy dev evaluation (sharded over replicas), checkpoints, metrics.jsonl and the `logger.backends`
(console line or progress bar, TensorBoard, W&B, MLflow: nemo_sdsearch/logger.py) every step, and at the end
a summary table (test EM and first-query hit rate, start -> end, with standard errors), a PNG of the curves and
the test-world results. Where the questions record their evidence passages (the bundled world), rollouts and
evaluations also get the query-level metrics of world/evidence.py (first-query hit, evidence hit per search,
evidence recall). Metric names follow verl / Search-R1
(`critic/score/mean`, `actor/pg_loss`, `env/number_of_valid_search`, ...; the README's Metrics section);
they are whole-batch figures over the replicas; only rank 0 prints and writes files.

The recipe sees one `Actor` interface whatever the backend and layout (`algorithms/setup.py` builds it:
`actor=hf` in one process, `actor=megatron` under torchrun with tp x pp x dp ranks).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

import torch

from nemo_sdsearch.algorithms import sd_search
from nemo_sdsearch.layout import GIB
from nemo_sdsearch.algorithms.report import SUMMARY_CAPTION, plot_curves, summary_rows
from nemo_sdsearch.algorithms.setup import (barrier, build_components, close_components, engine_asleep, is_rank0,
                                            make_prompt_format, sharded_greedy_em)
from nemo_sdsearch.algorithms.preemption import StopRequest, check_signal_lead
from nemo_sdsearch.algorithms.state import (QuestionSampler, append_jsonl, check_free_disk, check_out_dir,
                                            checkpoint_bytes, clear_out_dir, load_latest_checkpoint,
                                            rotate_checkpoints, save_checkpoint,
                                            truncate_jsonl)
from nemo_sdsearch.config import ConfigError, TrainConfig, to_dict
from nemo_sdsearch.errors import EXIT_REQUEUE, Preempted
from nemo_sdsearch.rng import host_rng_state, set_host_rng_state
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.eval.harness import SOURCE
from nemo_sdsearch.logger import build_loggers, check_backends
from nemo_sdsearch.losses.grpo_sd_loss import METRIC_SUMS, GRPOSDLoss, PolicyMicroBatch, token_weights
from nemo_sdsearch.losses.policy import group_advantages
from nemo_sdsearch.models.base import SequenceBatch, TeacherPass, positions_from_mask
from nemo_sdsearch.world.evidence import RATES as QUERY_RATES
from nemo_sdsearch.world.evidence import metric_sums, rates as query_rates, trajectory_query_metrics


# ---------------------------------------------------------------------------------------------------
# Tensors for one micro-batch of trajectories
# ---------------------------------------------------------------------------------------------------
def micro_batch_tensors(trajs: list[Trajectory], pad_id: int, device):
    batch = SequenceBatch.from_lists([t.token_ids for t in trajs], pad_id, device)
    policy = torch.zeros(batch.shape, dtype=torch.bool)
    query = torch.zeros(batch.shape, dtype=torch.bool)
    for i, t in enumerate(trajs):
        policy[i, :len(t.token_ids)] = torch.tensor(t.policy_mask())
        query[i, :len(t.token_ids)] = torch.tensor(t.query_mask())
    rows, cols = positions_from_mask(policy)
    # Query positions are a subset of policy positions: index them inside the policy rows.
    is_query_row = query[rows, cols]
    return batch, rows.to(device), cols.to(device), is_query_row.to(device)



def policy_micro_batches(actor, ref, trajs: list[Trajectory], adv: torch.Tensor, teacher, cfg: TrainConfig,
                         pad_id: int, timer: dict) -> list[list[PolicyMicroBatch]]:
    """The micro-batches of each mini-batch of one update. Old and reference log-probs (no grad) come from
    the weights that sampled; loss weights from the counts of the mini-batch over ALL replicas (one
    all-reduce), scaled by dp since the actor averages gradients over the replicas. Teacher logits are
    computed when the loss asks for them (one micro-batch at a time), timed into `timer`."""
    G, T, dp = cfg.grpo, cfg.rollout.temperature, actor.dp_size
    per_mini = len(trajs) // G.mini_batches
    minis = []
    for m in range(G.mini_batches):
        idx = list(range(m * per_mini, (m + 1) * per_mini))
        micro = [idx[i:i + G.micro_batch_size] for i in range(0, len(idx), G.micro_batch_size)]
        tensors = [micro_batch_tensors([trajs[i] for i in mi], pad_id, actor.device) for mi in micro]
        if teacher is not None:  # a rollout whose teacher sequence is too long has no JSD term (sd_search.py)
            tensors = [(b, r, c, q & torch.tensor([teacher[i] is not None for i in mi], device=q.device)[r])
                       for mi, (b, r, c, q) in zip(micro, tensors)]
        counts = torch.tensor([sum(int(r.numel()) for _, r, _, _ in tensors), sum(int(q.sum()) for *_, q in tensors),
                               len(idx)], dtype=torch.float64)
        n_tokens, n_query, n_seqs = (int(round(x)) for x in actor.all_reduce_dp(counts).tolist())
        mbs = []
        for mi, (batch, rows, cols, is_q) in zip(micro, tensors):
            with torch.no_grad():
                # With one optimizer step the weights that sampled are the weights being trained: old
                # log-probs are then the current ones, detached (ratio == 1), and need no extra pass.
                old = None if G.mini_batches == 1 else actor.logprobs_at(batch, rows, cols, T, with_grad=False)
                ref_lp = ref.logprobs_at(batch, rows, cols, T, with_grad=False) if ref is not None else None
            seq_lens = torch.bincount(rows, minlength=len(mi)).clamp(min=1)
            mbs.append(PolicyMicroBatch(
                batch, rows, cols, is_q, adv[mi].to(rows.device)[rows],
                token_weights(rows, seq_lens, G.reduction, n_tokens, n_seqs, scale=dp),
                query_weight=dp / n_query if n_query else 0.0, old_logprobs=old, ref_logprobs=ref_lp,
                teacher_logits=_teacher_pass(actor, teacher, mi, rows, cols, is_q, pad_id, timer)))
        minis.append(mbs)
    return minis


def _teacher_pass(actor, teacher, mi, rows, cols, is_q, pad_id, timer):
    """The teacher logits of one micro-batch at its query positions, as a `TeacherPass` run when the loss needs
    them (same weights, no grad, the teacher sequence shifted by its longer prompt); None without any."""
    if teacher is None or not bool(is_q.any()):
        return None
    shift = torch.tensor([teacher[i].shift if teacher[i] else 0 for i in mi], device=actor.device)
    q_rows, q_cols = rows[is_q], cols[is_q]
    # (a rollout without a teacher sequence has no query row here)
    make = lambda: SequenceBatch.from_lists([teacher[i].token_ids if teacher[i] else [pad_id] for i in mi], pad_id,
                                            actor.device)
    return TeacherPass(actor, make, q_rows, q_cols + shift[q_rows], timer)


def update_policy(actor, ref, trajs: list[Trajectory], adv: torch.Tensor, teacher, cfg: TrainConfig, pad_id: int):
    """One policy update on this replica's share of a rollout batch (steps 3 and 5 of the recipe): one
    optimizer step per mini-batch of `GRPOSDLoss` over its micro-batches. Returns (metric sums over the
    whole batch, one train stats dict per mini-batch)."""
    loss_fn = GRPOSDLoss.from_config(cfg, actor.vocab_shard)
    timer = {"teacher_s": 0.0}
    sums = dict.fromkeys(METRIC_SUMS, 0.0)

    def scored(logits, mb):
        loss, s = loss_fn(logits, mb)
        for k, v in s.items():
            sums[k] += v
        return loss

    stats = [actor.train_on(mbs, scored)
             for mbs in policy_micro_batches(actor, ref, trajs, adv, teacher, cfg, pad_id, timer)]
    total = actor.reduce_metric_sums(torch.tensor([float(sums[k]) for k in METRIC_SUMS], dtype=torch.float64))
    m = {k: (int(round(v)) if k.startswith("n_") else v) for k, v in zip(METRIC_SUMS, total.tolist())}
    m["teacher_s"] = timer["teacher_s"]
    return m, stats


# ---------------------------------------------------------------------------------------------------
# Rollouts, refit, final weights
# ---------------------------------------------------------------------------------------------------
def replica_rollouts(actor, engine, questions, group_size: int, seed: int, spread=None) -> list[Trajectory]:
    """This replica's share of the step's questions (every dp-th whole group): rolled out by its leader and shared
    with the replica's other ranks, or with `spread` (engines on every GPU, trtllm_placement.EngineSpread) by the
    job's engines, every e-th question on engine e, gathered, and this replica's questions kept."""
    if spread is not None:
        share = spread.share(questions)
        local = engine.run(share, n_samples=group_size, seed=seed) if share else []
        by_question = spread.regroup(questions, group_size, local)
        return [t for i in range(actor.dp_rank, len(questions), actor.dp_size) for t in by_question[i]]
    mine = questions[actor.dp_rank::actor.dp_size]
    trajs = engine.run(mine, n_samples=group_size, seed=seed) if actor.is_replica_leader else None
    return actor.broadcast_in_replica(trajs)


def refit_generator(actor, sink) -> None:
    """Bring the generator to the actor's weights, streamed tensor by tensor (`Components.weight_sink`: the
    generator itself, a replica's collective TensorRT-LLM refit, or a rank that only drains the stream;
    None where the generator runs the trained model itself). Collective on a distributed actor."""
    if sink is not None:
        sink.refit(actor.iter_weights())


def save_final(actor, tok, out: Path, rank0: bool) -> None:
    """The trained weights as a Hugging Face model directory in `out/final`, written by rank 0 from the same
    weight stream as a refit (collective: every rank iterates it; no rank holds the whole model)."""
    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    save_hf_checkpoint_from_stream(actor.iter_weights(), out / "final", actor.hf_config, tokenizer=tok, write=rank0)


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, console=None, progress: bool = True, components=None) -> dict:
    """`sdsearch train`: GRPO / SD-Search for cfg.trainer.steps steps (see the module docstring). `components`:
    what to train on (a Search-E1 round passes the ones its stages share); None: built here from the config and
    closed at the end (the engines shut down, the job's placement group removed)."""
    run = Run(cfg, console, progress, components)
    t = cfg.trainer
    # SIGUSR1 / SIGTERM: finish the step, checkpoint it, exit for a requeue (a SIGTERM far from the step's end:
    # exit at once; algorithms/preemption.py)
    stop = StopRequest(grace_s=t.sigterm_grace_s, step_time_s=t.step_time_s)
    try:
        with run.loggers:  # the progress bar on a terminal; every backend closed at the end, also on an error
            for step in range(run.start_step, t.steps):
                if step > run.start_step and stop.agreed(run.c.actor):  # signalled while the last one was saved
                    run.stop_for(stop, step)
                stop.step_started(step)
                row = rl_step(run, step)
                run.record({**row, **run.evaluate(step + 1)})  # the dev evaluation (if due) joins the step's row
                stop.step_finished()  # a boundary: a SIGTERM from here on is checkpointed with this step
                if stop.agreed(run.c.actor):
                    run.stop_for(stop, step + 1)
                run.save(step + 1)
            stop.outside_steps()
            summary = run.finish()
        if components is None:
            close_components(run.c)
        return summary
    finally:
        stop.close()


def rl_step(run: "Run", step: int) -> dict:
    """One step of the recipe (numbers as in the module docstring); returns its metrics row."""
    cfg, c = run.cfg, run.c
    actor, G, dp = c.actor, cfg.rollout.group_size, c.actor.dp_size
    t_step = time.perf_counter()
    # 1. rollouts: this replica's share
    questions = [c.data["train"][i] for i in run.sampler.take(cfg.trainer.questions_per_step)]
    held = sum(actor.state_bytes().values()) + (c.ref.state_bytes()["actor weights"] if c.ref is not None else 0)
    t0 = time.perf_counter()
    trajs = replica_rollouts(actor, run.engine("train"), questions, G, cfg.trainer.seed * 1_000_003 + step, c.spread)
    gen_s = time.perf_counter() - t0
    # 2. rewards and advantages (per group, inside the replica)
    rewards = torch.tensor([t.exact_match for t in trajs])
    adv = group_advantages(rewards, G, eps=cfg.grpo.adv_eps)
    # 4. (SD-Search) hindsight blocks and teacher sequences
    teacher = None
    if cfg.algorithm == "sd_search":
        blocks = sd_search.rollout_hindsight_blocks(trajs, G, cfg.sd, lambda s: len(run.encode(s)))
        teacher = sd_search.teacher_sequences(trajs, blocks, lambda q, b: run.encode(run.prompts.teacher(q, b)),
                                              max_positions=actor.hf_config.max_position_embeddings)
    # 3 + 5. old/reference log-probs, then the update; the engine sleeps through it where it can
    if cfg.optim.warmup_ratio:
        set_learning_rate(actor, scheduled_lr(cfg, step))
    t_update = time.perf_counter()
    # (the refit, once the engine is awake again, counts in timing_s/step)
    with engine_asleep(c, cfg, refit=lambda: refit_generator(actor, c.weight_sink)):
        m, stats = update_policy(actor, c.ref, trajs, adv, teacher, cfg, c.tok.pad_token_id)
        update_s = time.perf_counter() - t_update - m["teacher_s"]
    rollout, resp_tokens, all_tokens = rollout_metrics(actor, trajs, adv, {q.id: q.metadata for q in questions},
                                                       prompt_room=cfg.rollout.max_context - cfg.rollout.max_new_tokens)
    n_policy, n_query = m["n_policy"], m["n_query"]
    too_long = (float(actor.all_reduce_dp(torch.tensor([float(sum(s is None for s in teacher))], dtype=torch.float64)))
                / (len(trajs) * dp) if teacher is not None else 0.0)
    per_token = lambda v: v / max(n_policy, 1)
    per_query = lambda v: v / n_query if teacher is not None and n_query else float("nan")  # no query: no JSD
    loss_sum = float(actor.all_reduce_dp(torch.tensor([sum(s["loss"] for s in stats)], dtype=torch.float64)))
    step_s = time.perf_counter() - t_step
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {
        "step": step + 1, **rollout,
        "actor/pg_loss": per_token(m["pg_sum"]), "actor/kl_loss": per_token(m["kl_sum"]),
        "actor/entropy": per_token(m["entropy_sum"]), "actor/pg_clipfrac": per_token(m["clip"]),
        "actor/loss": loss_sum / (dp * len(stats)),
        "actor/grad_norm": sum(s["grad_norm"] for s in stats) / len(stats),
        "actor/lr": learning_rate(actor, cfg), "actor/update_skipped": any(s["skipped"] for s in stats),
        "sd/jsd": per_query(m["jsd_sum"]), "sd/agreement": per_query(m["agree"]), "sd/query_tokens": n_query,
        **({"sd/teacher_too_long": too_long, **term_grad_norms(m, dp, len(stats))} if teacher is not None else {}),
        "timing_s/gen": gen_s, "timing_s/retrieval": sum(t.retrieval_s for t in trajs),
        "timing_s/teacher": m["teacher_s"], "timing_s/update_actor": update_s, "timing_s/step": step_s,
        "timing_per_token_ms/gen": 1000 * gen_s / max(resp_tokens, 1),
        "perf/throughput": all_tokens / (step_s * world),
        "memory/trainer_gib": held / GIB,
    }


def term_grad_norms(m: Mapping, dp: int, n_optimizer_steps: int) -> dict:
    """The two loss terms' gradient norms with respect to the policy logits (`GRPOSDLoss._logit_grad_sq`),
    root mean square over the step's optimizer steps: `actor/pg_logit_grad_norm` (surrogate + KL) and
    `sd/logit_grad_norm` (sd.coef x JSD). Each replica's loss carries the factor dp (its gradients are averaged
    over the replicas), so the replicas' summed squares are divided by dp**2."""
    scale = 1.0 / (dp * dp * max(n_optimizer_steps, 1))
    return {"actor/pg_logit_grad_norm": math.sqrt(m["pg_grad_sq"] * scale),
            "sd/logit_grad_norm": math.sqrt(m["sd_grad_sq"] * scale)}


def rollout_metrics(actor, trajs: list[Trajectory], adv: torch.Tensor,
                    metadata: Mapping[str, Mapping] | None = None,
                    prompt_room: int | None = None) -> tuple[dict, float, float]:
    """The rollout side of a step's row over the whole batch (sums over the replicas; the extremes from each
    replica's own, gathered as a [dp, 6] sum with one row per replica), and the batch's generated and total
    token counts. With `metadata` (question id -> its FlashRAG metadata) the query-level metrics of the rollouts
    whose question records evidence passages (world/evidence.py): `env/first_query_hit`,
    `env/evidence_hit_per_search`, `env/evidence_recall`; left out of the row when no rollout of the whole batch
    has evidence (the all-reduced count decides, the same on every rank).
    `prompt_length/*` (verl's compute_data_metrics): the prompt's tokens per rollout; its clip_ratio the fraction
    of prompts that fill `prompt_room` (rollout.max_context - rollout.max_new_tokens: the longest prompt the
    engine takes, as verl counts prompts at data.max_prompt_length; 0 without a room)."""
    dp = actor.dp_size
    n_pol = torch.tensor([sum(t.policy_mask()) for t in trajs], dtype=torch.float64)
    resp = torch.tensor([t.num_sampled_tokens for t in trajs], dtype=torch.float64)
    prompt = torch.tensor([t.prompt_length for t in trajs], dtype=torch.float64)
    prompt_full = float((prompt >= prompt_room).sum()) if prompt_room is not None else 0.0
    adv = adv.to(torch.float64)
    query = metric_sums(trajectory_query_metrics(t, (metadata or {}).get(t.question_id)) for t in trajs)
    sums = torch.tensor([
        len(trajs), sum(t.exact_match for t in trajs), float((adv * n_pol).sum()), float(n_pol.sum()),
        float(resp.sum()), sum(t.truncated for t in trajs), sum(t.num_turns for t in trajs),
        sum(t.num_searches for t in trajs), sum(t.finish_reason == "answer" for t in trajs),
        sum(1 - t.invalid_actions / max(t.num_turns, 1) for t in trajs), sum(len(t.token_ids) for t in trajs),
        float(prompt.sum()), prompt_full, *query], dtype=torch.float64)
    extremes = torch.zeros(dp, 6, dtype=torch.float64)
    extremes[actor.dp_rank] = torch.stack([adv.max(), adv.min(), resp.max(), resp.min(), prompt.max(), prompt.min()])
    total = actor.all_reduce_dp(torch.cat([sums, extremes.flatten()]))
    head, ext = total[:len(sums)].tolist(), total[len(sums):].view(dp, 6)
    (n, score, adv_tok, n_tok, resp_sum, truncated, turns, searches, answered, valid,
     tokens, prompt_sum, prompt_clipped), query = head[:-len(query)], head[-len(query):]
    n = max(n, 1)
    return {"critic/score/mean": score / n,
            "critic/advantages/mean": adv_tok / max(n_tok, 1), "critic/advantages/max": float(ext[:, 0].max()),
            "critic/advantages/min": float(ext[:, 1].min()),
            "response_length/mean": resp_sum / n, "response_length/max": float(ext[:, 2].max()),
            "response_length/min": float(ext[:, 3].min()), "response_length/clip_ratio": truncated / n,
            "prompt_length/mean": prompt_sum / n, "prompt_length/max": float(ext[:, 4].max()),
            "prompt_length/min": float(ext[:, 5].min()), "prompt_length/clip_ratio": prompt_clipped / n,
            "env/number_of_actions/mean": turns / n, "env/number_of_valid_search": searches / n,
            "env/finish_ratio": answered / n, "env/ratio_of_valid_action": valid / n,
            **{f"env/{k}": v for k, v in query_rates(query).items()}}, resp_sum, tokens


def eval_metrics(split: str, result: dict) -> dict:
    """The `val/*` metrics of a greedy evaluation (`sharded_greedy_em`'s result) of split "dev" or "test":
    `val/<split>_em` (and `val/dev_f1`), and the query-level `val/<split>_first_query_hit`,
    `val/<split>_evidence_hit_per_search`, `val/<split>_evidence_recall` when its questions record evidence.
    A result evaluated per data_source (the dev evaluation, Search-R1's validation) adds Search-R1 / verl's
    `val/test_score/<data_source>`: the mean reward (EM) of that source's questions."""
    a = result["all"]
    out = {f"val/{split}_em": a["em"], **({"val/dev_f1": a["f1"]} if split == "dev" else {})}
    out.update({f"val/{split}_{k}": a[k] for k in QUERY_RATES if k in a})
    out.update({f"val/test_score/{k[len(SOURCE):]}": r["em"] for k, r in result.items() if k.startswith(SOURCE)})
    return out


def scheduled_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate of 0-based step `step`: optim.lr after a linear warm-up over the first
    W = ceil(optim.warmup_ratio * trainer.steps) steps, step k < W using optim.lr * (k + 1) / W (verl's constant
    schedule with warm-up, which Search-R1 runs with lr_warmup_steps_ratio 0.285, starts at k / W: its first step
    does not move the weights; here the first step already learns)."""
    warmup = math.ceil(cfg.optim.warmup_ratio * cfg.trainer.steps)
    return cfg.optim.lr * min(1.0, (step + 1) / warmup) if warmup else cfg.optim.lr


def set_learning_rate(actor, lr: float) -> None:
    """Set every parameter group's learning rate of the actor's optimizer (HF: torch AdamW; Megatron: its
    optimizer's param_groups, as megatron's own OptimizerParamScheduler sets them)."""
    for group in getattr(getattr(actor, "optimizer", None), "param_groups", None) or []:
        group["lr"] = lr


def learning_rate(actor, cfg: TrainConfig) -> float:
    """The optimizer's current learning rate (optim.lr where the actor exposes no param_groups)."""
    groups = getattr(getattr(actor, "optimizer", None), "param_groups", None)
    return float(groups[0]["lr"]) if groups else float(cfg.optim.lr)


class Run:
    """The state of one `sdsearch train` run around its steps: components, sampler, history and evaluations,
    output directory (written by rank 0 only), the metrics loggers; resume and the final outputs."""

    def __init__(self, cfg: TrainConfig, console=None, progress: bool = True, components=None):
        from rich.console import Console

        self.cfg, out = cfg, Path(cfg.trainer.out_dir)
        self.out = out
        check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)  # every rank, before anything is written
        check_backends(cfg.logger.backends)                          # a missing wandb / mlflow, before any model
        check_signal_lead(cfg.trainer.step_time_s, cfg.trainer.checkpoint_time_s)  # can a preemption save a step?
        # distributed: every rank joined the groups
        self.c = c = components if components is not None else build_components(cfg)
        barrier()  # every rank checked out_dir before rank 0 writes into it
        self.rank0 = is_rank0(cfg)
        self.console = (console or Console()) if self.rank0 else Console(quiet=True)
        B, dp = cfg.trainer.questions_per_step, c.actor.dp_size
        if B % (dp * cfg.grpo.mini_batches):
            raise ConfigError(f"config key trainer.questions_per_step: {B} questions do not split into {dp} "
                              f"data-parallel replicas x {cfg.grpo.mini_batches} mini-batches of whole groups")
        if self.rank0:
            clear_out_dir(out, cfg.trainer.overwrite)
            (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        self.prompts = make_prompt_format(cfg, c.tok)
        self.sampler = QuestionSampler(len(c.data["train"]), cfg.trainer.seed)
        self.history, self.evals, self.start_test, self.start_step, self.best = [], [], None, 0, None
        self.saved_step = 0
        self.logger_runs: dict[str, str] = {}  # the W&B / MLflow runs a resumed run continues (its checkpoint's)
        if cfg.trainer.save_every or cfg.trainer.keep_last:
            check_free_disk(out, checkpoint_bytes(c.actor.hf_config, cfg.actor == "megatron"),
                            cfg.trainer.min_free_disk_checkpoints)
        self._resume()
        self.loggers = build_loggers(cfg, out, self.console, rank0=self.rank0, live=progress,
                                     start_step=self.start_step, run_ids=self.logger_runs)
        continued = {k: v for k, v in self.loggers.run_ids().items() if self.logger_runs.get(k) == v}
        if continued:
            self.console.print("logging into the same runs: " + ", ".join(f"{k} {v}" for k, v in continued.items()),
                               soft_wrap=True)  # one line, also in a SLURM log
        if cfg.trainer.final_test_eval and self.start_test is None:
            self.console.print("evaluating the start weights on the test world ...")
            self.start_test = self.greedy("test")
            self.loggers.log_eval(0, eval_metrics("test", self.start_test))

    # -- pieces the steps use ------------------------------------------------------------------------
    def engine(self, name: str):
        return self.c.engines[name] if self.c.engines is not None else None

    def encode(self, text: str) -> list[int]:
        return self.c.tok.encode(text, add_special_tokens=False)

    def greedy(self, split: str, by_source: bool = False) -> dict:
        """Greedy EM of the current weights on a split (sharded over the replicas); with `by_source` also per
        data_source (the validation's `val/test_score/<data_source>`)."""
        return sharded_greedy_em(self.c.actor, self.engine(split), self.c.data[split], self.cfg.trainer.eval_batch_size,
                                 by_source=by_source, spread=self.c.spread)

    def _resume(self) -> None:
        state = load_latest_checkpoint(self.out) if self.cfg.trainer.resume else None
        if state is None:
            if self.rank0 and (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            return
        set_host_rng_state(state["rng"])
        # as an update: the engine asleep, what offload.* parked back on the device to be loaded into (and parked
        # again before the engine wakes: a resumed run generates with the state it keeps off the device)
        with engine_asleep(self.c, self.cfg, refit=lambda: refit_generator(self.c.actor, self.c.weight_sink)):
            self.c.actor.load_state(self.out / "checkpoints", state)  # a distributed actor restores its ranks' RNG
        self.sampler.load(state["sampler"])
        self.history, self.evals, self.start_test, self.start_step = (state["history"], state["evals"],
                                                                      state["start_test"], state["step"])
        self.best = state.get("best")
        self.logger_runs = dict(state.get("logger_runs") or {})  # (a checkpoint written before it existed: none)
        self.saved_step = self.start_step
        if self.rank0:
            truncate_jsonl(self.out / "metrics.jsonl", self.start_step)
        self.console.print(f"resumed from step {self.start_step}")

    # -- after each step -------------------------------------------------------------------------------
    def stop_for(self, stop: StopRequest, step: int) -> None:
        """A signal asked the job to stop (every rank agreed): checkpoint step `step` (if it is not saved
        yet) and exit for a requeue."""
        if step > self.saved_step:
            self.save(step, force=True)
        self.console.print(f"preempted (signal {stop.signum}): step {step} checkpointed; exiting with status "
                           f"{EXIT_REQUEUE} for a requeue (trainer.resume=true continues)")
        raise Preempted(step)

    def evaluate(self, step: int) -> dict:
        """The periodic greedy dev evaluation after step `step`: {"val/dev_em", "val/dev_f1"} and, when the
        dev questions record evidence passages, the query-level `val/dev_*` (`eval_metrics`); {} when none
        is due."""
        t = self.cfg.trainer
        if not (t.eval_every and step % t.eval_every == 0):
            return {}
        val = eval_metrics("dev", self.greedy("dev", by_source=True))
        self.evals.append({"step": step, **val})
        return val

    def record(self, row: dict) -> None:
        """Keep one step's row (the history), write it to metrics.jsonl and hand it to the loggers: its
        training metrics as the step, its `val/*` metrics (an evaluation after the step) as an evaluation."""
        if row["actor/update_skipped"]:
            self.console.print(f"[yellow]step {row['step']}: non-finite loss or gradient, update skipped[/yellow]")
        self.history.append(row)
        if self.rank0:
            append_jsonl(self.out / "metrics.jsonl", row)
        self.loggers.log(row["step"], {k: v for k, v in row.items() if not k.startswith("val/")})
        val = {k: v for k, v in row.items() if k.startswith("val/")}
        if val:
            self.loggers.log_eval(row["step"], val)

    def save(self, step: int, force: bool = False) -> None:
        """The training checkpoint after step `step`, when one is due (or `force`d: a preemption); then rank 0
        keeps the newest trainer.keep_last checkpoints and, with trainer.keep_best, the saved step with the
        best dev EM (evaluated at that step)."""
        t = self.cfg.trainer
        if not (force or (t.save_every and step % t.save_every == 0)):
            return
        if self.evals and self.evals[-1]["step"] == step and (self.best is None or
                                                              self.evals[-1]["val/dev_em"] > self.best["val/dev_em"]):
            self.best = {"step": step, "val/dev_em": self.evals[-1]["val/dev_em"]}
        loop_state = {"sampler": self.sampler.state(), "rng": host_rng_state(), "step": step, "history": self.history,
                      "evals": self.evals, "start_test": self.start_test, "config": to_dict(self.cfg),
                      "best": self.best, "logger_runs": self.loggers.run_ids()}
        save = lambda: self.c.actor.save_state(self.out / "checkpoints", step,
                                               lambda extra: save_checkpoint(self.out, step, {**extra, **loop_state}))
        if self.c.actor.offloaded:  # the state parked for generation (offload.*) comes back while the engine sleeps
            with engine_asleep(self.c, self.cfg):
                save()
        else:
            save()
        self.saved_step = step
        if self.rank0:
            rotate_checkpoints(self.out, t.keep_last, self.best["step"] if t.keep_best and self.best else None)

    # -- the end ---------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Final test evaluation, final/ weights; rank 0 writes the summary table, curves.png and summary.json.
        (The components stay up: whoever built them closes them.)"""
        cfg, out, evals = self.cfg, self.out, self.evals
        end_test = None
        if cfg.trainer.final_test_eval:
            end_test = self.greedy("test")
            evals = [{"step": 0, **eval_metrics("test", self.start_test)}, *evals,
                     {"step": cfg.trainer.steps, **eval_metrics("test", end_test)}]
            self.loggers.log_eval(cfg.trainer.steps, eval_metrics("test", end_test))
        self.loggers.close()  # the progress bar ends before the table; the backends are flushed and finished
        summary = {"start_test": self.start_test, "end_test": end_test, "history": self.history, "evals": evals}
        save_final(self.c.actor, self.c.tok, out, self.rank0)
        if self.rank0:
            from rich.table import Table

            plot_curves(self.history, evals, out / "curves.png", f"{cfg.algorithm} on the tiny world")
            table = Table(title=f"{cfg.algorithm}: {cfg.trainer.steps} steps", caption=SUMMARY_CAPTION)
            for col, justify in (("metric", "left"), ("start", "right"), ("end", "right"), ("gain", "right")):
                table.add_column(col, justify=justify)
            for r in summary_rows(self.start_test, end_test, self.history):
                table.add_row(*r)
            self.console.print(table)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            extra = "".join(f", {b}" for b in ("tensorboard/", "wandb/", "mlruns/") if (out / b.rstrip("/")).exists())
            self.console.print(f"wrote {out}/final (HF model), curves.png, metrics.jsonl, summary.json{extra}",
                               soft_wrap=True)
        return summary
