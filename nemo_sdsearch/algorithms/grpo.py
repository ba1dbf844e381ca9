"""GRPO and SD-Search training recipe (`sdsearch train`), top to bottom.

One step:
  1. sample B questions (one shared sampler); this data-parallel replica takes every dp-th question
     group, its leader rolls out G trajectories per question with the student prompt and shares them with
     the replica's other ranks (tensor / pipeline shards)
  2. reward = EM of the final answer; group-normalised advantages (a group never spans replicas)
  3. old and reference log-probs at policy positions (no grad)
  4. [sd_search] a hindsight block per group; teacher sequences; teacher logits at query positions
  5. update: `GRPOSDLoss` (clipped surrogate + kl_coef * k3 KL [+ sd.coef * JSD at query positions]),
     normalised by the counts of the whole batch over all replicas, so any split trains like one process
Periodic greedy dev evaluation (sharded over replicas), checkpoints, TensorBoard and metrics.jsonl every
step, and at the end a summary table, a PNG of the curves and test-world EM. Metrics are whole-batch
sums over the replicas; only rank 0 prints and writes files.

The recipe sees one `Actor` interface whatever the backend and layout (`algorithms/setup.py` builds it:
`actor=hf` in one process, `actor=megatron` under torchrun with tp x pp x dp ranks).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

import torch

from nemo_sdsearch.algorithms import sd_search
from nemo_sdsearch.algorithms.report import plot_curves, summary_rows
from nemo_sdsearch.algorithms.setup import build_components, is_rank0, make_prompt_format, sharded_greedy_em
from nemo_sdsearch.algorithms.state import (QuestionSampler, append_jsonl, check_out_dir, clear_out_dir,
                                            load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                            truncate_jsonl)
from nemo_sdsearch.config import ConfigError, TrainConfig, to_dict
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.losses.grpo_sd_loss import METRIC_SUMS, GRPOSDLoss, PolicyMicroBatch, token_weights
from nemo_sdsearch.losses.policy import group_advantages
from nemo_sdsearch.models.base import SequenceBatch


class _NoWriter:
    """The TensorBoard writer of ranks other than 0."""

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


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
    policy[:, 0] = False
    rows, cols = policy.nonzero(as_tuple=True)
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
    """The teacher logits of one micro-batch at its query positions, as a function run when the loss needs
    them (same weights, no grad, the teacher sequence shifted by its longer prompt); None without any."""
    if teacher is None or not bool(is_q.any()):
        return None

    def run():
        t0 = time.perf_counter()
        tb = SequenceBatch.from_lists([teacher[i].token_ids for i in mi], pad_id, actor.device)
        shift = torch.tensor([teacher[i].shift for i in mi], device=actor.device)
        q_rows, q_cols = rows[is_q], cols[is_q]
        logits = actor.teacher_logits_at(tb, q_rows, q_cols + shift[q_rows])
        timer["teacher_s"] += time.perf_counter() - t0
        return logits

    return run


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
def replica_rollouts(actor, engine, questions, group_size: int, seed: int) -> list[Trajectory]:
    """This replica's share of the step's questions (every dp-th whole group), rolled out by its leader and
    shared with the replica's other ranks."""
    mine = questions[actor.dp_rank::actor.dp_size]
    trajs = engine.run(mine, n_samples=group_size, seed=seed) if actor.is_replica_leader else None
    return actor.broadcast_in_replica(trajs)


def refit_generator(actor, generator) -> None:
    """Bring the generator to the actor's weights, streamed tensor by tensor (the generator loads them in
    buckets). Collective on a distributed actor: every rank of a replica takes part in the weight stream;
    only the leader's generator keeps them. A torch generator that runs the actor's own model needs nothing."""
    if generator is not None and getattr(generator, "model", None) is getattr(actor, "model", object()):
        return
    weights = actor.iter_weights()
    if generator is not None:
        generator.refit(weights)
    else:
        deque(weights, maxlen=0)


def save_final(actor, tok, out: Path, rank0: bool) -> None:
    """The trained weights as a Hugging Face model directory in `out/final`, written by rank 0 from the same
    weight stream as a refit (collective: every rank iterates it; no rank holds the whole model)."""
    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    save_hf_checkpoint_from_stream(actor.iter_weights(), out / "final", actor.hf_config, tokenizer=tok, write=rank0)


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, console=None, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from torch.utils.tensorboard import SummaryWriter

    out = Path(cfg.trainer.out_dir)
    check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)  # every rank, before anything is written
    actor, ref, tok, data, engines = build_components(cfg)      # distributed: every rank joined the groups
    rank0 = is_rank0(cfg)
    console = (console or Console()) if rank0 else Console(quiet=True)
    G, B, dp = cfg.rollout.group_size, cfg.trainer.questions_per_step, actor.dp_size
    if B % (dp * cfg.grpo.mini_batches):
        raise ConfigError(f"config key trainer.questions_per_step: {B} questions do not split into {dp} "
                          f"data-parallel replicas x {cfg.grpo.mini_batches} mini-batches of whole groups")
    if rank0:
        clear_out_dir(out, cfg.trainer.overwrite)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    prompts = make_prompt_format(cfg, tok)
    engine = lambda name: engines[name] if engines is not None else None
    generator = engines["train"].generator if engines is not None else None
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    evaluate = lambda name, qs: sharded_greedy_em(actor, engine(name), qs, cfg.trainer.eval_batch_size)
    sampler = QuestionSampler(len(data["train"]), cfg.trainer.seed)
    history, evals, start_test, start_step = [], [], None, 0

    state = load_latest_checkpoint(out) if cfg.trainer.resume else None
    if state is not None:
        set_rng_state(state["rng"])
        actor.load_state(out / "checkpoints", state)  # a distributed actor restores its ranks' RNG too
        refit_generator(actor, generator)
        sampler.load(state["sampler"])
        history, evals, start_test, start_step = state["history"], state["evals"], state["start_test"], state["step"]
        if rank0:
            truncate_jsonl(out / "metrics.jsonl", start_step)
        console.print(f"resumed from step {start_step}")
    elif rank0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    if cfg.trainer.final_test_eval and start_test is None:
        console.print("evaluating the start weights on the test world ...")
        start_test = evaluate("test", data["test"])
        console.print(f"start test EM {start_test['all']['em']:.3f}")

    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1) if rank0 else _NoWriter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=console, disable=not (progress and rank0))
    with bar:
        task = bar.add_task(cfg.algorithm, total=cfg.trainer.steps, completed=start_step, info="")
        for step in range(start_step, cfg.trainer.steps):
            t_step = time.perf_counter()
            # 1. rollouts: this replica's share -------------------------------------------------------
            questions = [data["train"][i] for i in sampler.take(B)]
            t0 = time.perf_counter()
            trajs = replica_rollouts(actor, engine("train"), questions, G, cfg.trainer.seed * 1_000_003 + step)
            gen_s = time.perf_counter() - t0
            # 2. rewards and advantages (per group, inside the replica) -------------------------------
            rewards = torch.tensor([t.exact_match for t in trajs])
            adv = group_advantages(rewards, G, eps=cfg.grpo.adv_eps)
            # 4. (SD-Search) hindsight blocks and teacher sequences ------------------------------------
            teacher = None
            if cfg.algorithm == "sd_search":
                blocks = sd_search.group_hindsight_blocks(trajs, G, cfg.sd, lambda s: len(encode(s)))
                teacher = sd_search.teacher_sequences(trajs, blocks, G, lambda q, b: encode(prompts.teacher(q, b)))
            # 3 + 5. old/reference log-probs, then the update ------------------------------------------
            t_update = time.perf_counter()
            sleeping = generator is not None and cfg.generator == "trtllm" and cfg.trtllm.sleep_while_training
            if sleeping:  # release the generation KV cache while the update runs
                generator.sleep(level=1)
            m, stats = update_policy(actor, ref, trajs, adv, teacher, cfg, tok.pad_token_id)
            update_s = time.perf_counter() - t_update - m["teacher_s"]
            if sleeping:
                generator.wake_up()
            refit_generator(actor, generator)  # (refit time counts in time_step_s)
            step_s = time.perf_counter() - t_step
            # whole-batch rollout figures: sums over the replicas
            totals = actor.all_reduce_dp(torch.tensor(
                [float(rewards.sum()), len(trajs), sum(t.num_searches for t in trajs),
                 sum(sum(t.from_policy) for t in trajs), sum(s["loss"] for s in stats)], dtype=torch.float64)).tolist()
            reward = totals[0] / max(totals[1], 1)
            skipped = any(s["skipped"] for s in stats)
            row = {
                "step": step + 1,
                "reward": reward,
                "em": reward,
                "searches_per_rollout": totals[2] / max(totals[1], 1),
                "jsd": m["jsd_sum"] / max(m["n_query"], 1) if teacher is not None else float("nan"),
                "agreement": m["agree"] / max(m["n_query"], 1) if teacher is not None else float("nan"),
                "query_tokens": m["n_query"],
                "kl": m["kl_sum"] / max(m["n_policy"], 1),
                "clip_fraction": m["clip"] / max(m["n_policy"], 1),
                "entropy": m["entropy_sum"] / max(m["n_policy"], 1),
                "loss": totals[4] / dp,
                "grad_norm": stats[-1]["grad_norm"],
                "skipped": skipped,
                "tokens_per_s": totals[3] / max(gen_s, 1e-9),
                "time_generation_s": gen_s, "time_teacher_s": m["teacher_s"], "time_update_s": update_s,
                "time_step_s": step_s,
            }
            if skipped:
                console.print(f"[yellow]step {step + 1}: non-finite loss or gradient, update skipped[/yellow]")
            history.append(row)
            if rank0:
                append_jsonl(out / "metrics.jsonl", row)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    writer.add_scalar(f"train/{k}", v, step + 1)
            # periodic evaluation and checkpoint ------------------------------------------------
            if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0:
                dev = evaluate("dev", data["dev"])
                evals.append({"step": step + 1, "em": dev["all"]["em"], "f1": dev["all"]["f1"]})
                writer.add_scalar("eval/dev_em", dev["all"]["em"], step + 1)
            if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
                loop_state = {"sampler": sampler.state(), "rng": rng_state(), "step": step + 1, "history": history,
                              "evals": evals, "start_test": start_test, "config": to_dict(cfg)}
                actor.save_state(out / "checkpoints", step + 1,
                                 lambda extra: save_checkpoint(out, step + 1, {**extra, **loop_state}))
            info = f"reward {row['reward']:.2f} searches {row['searches_per_rollout']:.2f}"
            if teacher is not None:
                info += f" jsd {row['jsd']:.3f}"
            if evals:
                info += f" dev EM {evals[-1]['em']:.2f}"
            bar.update(task, advance=1, info=info)
    writer.flush()

    # final evaluation, weights, summary table, plot ------------------------------------------------
    end_test = None
    if cfg.trainer.final_test_eval:
        end_test = evaluate("test", data["test"])
        evals = [{"step": 0, "em": float("nan"), "test_em": start_test["all"]["em"]}] + evals
        evals.append({"step": cfg.trainer.steps, "em": evals[-1]["em"], "test_em": end_test["all"]["em"]})
        writer.add_scalar("eval/test_em", end_test["all"]["em"], cfg.trainer.steps)
    writer.close()
    summary = {"start_test": start_test, "end_test": end_test, "history": history, "evals": evals}
    save_final(actor, tok, out, rank0)
    if rank0:
        plot_curves(history, evals, out / "curves.png", f"{cfg.algorithm} on the tiny world")
        table = Table(title=f"{cfg.algorithm}: {cfg.trainer.steps} steps")
        table.add_column("metric")
        table.add_column("start", justify="right")
        table.add_column("end", justify="right")
        for r in summary_rows(start_test, end_test, history):
            table.add_row(*r)
        console.print(table)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        console.print(f"wrote {out}/final (HF model), curves.png, metrics.jsonl, summary.json, tensorboard/")
    return summary
