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
def train(cfg: TrainConfig, console=None, progress: bool = True) -> dict:
    """`sdsearch train`: GRPO / SD-Search for cfg.trainer.steps steps (see the module docstring)."""
    run = Run(cfg, console, progress)
    with run.bar:
        for step in range(run.start_step, cfg.trainer.steps):
            run.record(rl_step(run, step))
            run.evaluate_and_save(step + 1)
    return run.finish()


def rl_step(run: "Run", step: int) -> dict:
    """One step of the recipe (numbers as in the module docstring); returns its metrics row."""
    cfg, c = run.cfg, run.c
    actor, G, dp = c.actor, cfg.rollout.group_size, c.actor.dp_size
    t_step = time.perf_counter()
    # 1. rollouts: this replica's share
    questions = [c.data["train"][i] for i in run.sampler.take(cfg.trainer.questions_per_step)]
    t0 = time.perf_counter()
    trajs = replica_rollouts(actor, run.engine("train"), questions, G, cfg.trainer.seed * 1_000_003 + step)
    gen_s = time.perf_counter() - t0
    # 2. rewards and advantages (per group, inside the replica)
    rewards = torch.tensor([t.exact_match for t in trajs])
    adv = group_advantages(rewards, G, eps=cfg.grpo.adv_eps)
    # 4. (SD-Search) hindsight blocks and teacher sequences
    teacher = None
    if cfg.algorithm == "sd_search":
        blocks = sd_search.group_hindsight_blocks(trajs, G, cfg.sd, lambda s: len(run.encode(s)))
        teacher = sd_search.teacher_sequences(trajs, blocks, G, lambda q, b: run.encode(run.prompts.teacher(q, b)))
    # 3 + 5. old/reference log-probs, then the update; the generator sleeps through it where it can
    t_update = time.perf_counter()
    generator = run.generator
    sleeping = generator is not None and cfg.generator == "trtllm" and cfg.trtllm.sleep_while_training
    if sleeping:
        generator.sleep(level=1)
    m, stats = update_policy(actor, c.ref, trajs, adv, teacher, cfg, c.tok.pad_token_id)
    update_s = time.perf_counter() - t_update - m["teacher_s"]
    if sleeping:
        generator.wake_up()
    refit_generator(actor, c.weight_sink)  # (refit time counts in time_step_s)
    # whole-batch rollout figures: sums over the replicas
    n, reward_sum, searches, sampled, loss_sum = actor.all_reduce_dp(torch.tensor(
        [len(trajs), float(rewards.sum()), sum(t.num_searches for t in trajs), sum(sum(t.from_policy) for t in trajs),
         sum(s["loss"] for s in stats)], dtype=torch.float64)).tolist()
    per_query = lambda v: v / max(m["n_query"], 1) if teacher is not None else float("nan")
    per_token = lambda v: v / max(m["n_policy"], 1)
    return {"step": step + 1, "reward": reward_sum / max(n, 1), "em": reward_sum / max(n, 1),
            "searches_per_rollout": searches / max(n, 1), "jsd": per_query(m["jsd_sum"]),
            "agreement": per_query(m["agree"]), "query_tokens": m["n_query"], "kl": per_token(m["kl_sum"]),
            "clip_fraction": per_token(m["clip"]), "entropy": per_token(m["entropy_sum"]), "loss": loss_sum / dp,
            "grad_norm": stats[-1]["grad_norm"], "skipped": any(s["skipped"] for s in stats),
            "tokens_per_s": sampled / max(gen_s, 1e-9), "time_generation_s": gen_s,
            "time_teacher_s": m["teacher_s"], "time_update_s": update_s, "time_step_s": time.perf_counter() - t_step}


class Run:
    """The state of one `sdsearch train` run around its steps: components, sampler, history and evaluations,
    output directory (written by rank 0 only), TensorBoard, progress bar; resume and the final outputs."""

    def __init__(self, cfg: TrainConfig, console=None, progress: bool = True):
        from rich.console import Console

        self.cfg, out = cfg, Path(cfg.trainer.out_dir)
        self.out = out
        check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)  # every rank, before anything is written
        self.c = c = build_components(cfg)                          # distributed: every rank joined the groups
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
        self.generator = c.engines["train"].generator if c.engines is not None else None
        self.sampler = QuestionSampler(len(c.data["train"]), cfg.trainer.seed)
        self.history, self.evals, self.start_test, self.start_step = [], [], None, 0
        self._resume()
        if cfg.trainer.final_test_eval and self.start_test is None:
            self.console.print("evaluating the start weights on the test world ...")
            self.start_test = self.greedy("test")
            self.console.print(f"start test EM {self.start_test['all']['em']:.3f}")
        self.writer = self._writer()
        self.bar = self._progress_bar(progress)
        self.task = self.bar.add_task(cfg.algorithm, total=cfg.trainer.steps, completed=self.start_step, info="")

    # -- pieces the steps use ------------------------------------------------------------------------
    def engine(self, name: str):
        return self.c.engines[name] if self.c.engines is not None else None

    def encode(self, text: str) -> list[int]:
        return self.c.tok.encode(text, add_special_tokens=False)

    def greedy(self, split: str) -> dict:
        """Greedy EM of the current weights on a split (sharded over the replicas)."""
        return sharded_greedy_em(self.c.actor, self.engine(split), self.c.data[split], self.cfg.trainer.eval_batch_size)

    def _resume(self) -> None:
        state = load_latest_checkpoint(self.out) if self.cfg.trainer.resume else None
        if state is None:
            if self.rank0 and (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            return
        set_rng_state(state["rng"])
        self.c.actor.load_state(self.out / "checkpoints", state)  # a distributed actor restores its ranks' RNG too
        refit_generator(self.c.actor, self.c.weight_sink)
        self.sampler.load(state["sampler"])
        self.history, self.evals, self.start_test, self.start_step = (state["history"], state["evals"],
                                                                      state["start_test"], state["step"])
        if self.rank0:
            truncate_jsonl(self.out / "metrics.jsonl", self.start_step)
        self.console.print(f"resumed from step {self.start_step}")

    def _writer(self):
        if not self.rank0:
            return _NoWriter()
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.start_step + 1)

    def _progress_bar(self, progress: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), console=self.console, disable=not (progress and self.rank0))

    # -- after each step -------------------------------------------------------------------------------
    def record(self, row: dict) -> None:
        """Keep, write (metrics.jsonl, TensorBoard) and show one step's row."""
        if row["skipped"]:
            self.console.print(f"[yellow]step {row['step']}: non-finite loss or gradient, update skipped[/yellow]")
        self.history.append(row)
        if self.rank0:
            append_jsonl(self.out / "metrics.jsonl", row)
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                self.writer.add_scalar(f"train/{k}", v, row["step"])
        info = f"reward {row['reward']:.2f} searches {row['searches_per_rollout']:.2f}"
        if not math.isnan(row["jsd"]):
            info += f" jsd {row['jsd']:.3f}"
        if self.evals:
            info += f" dev EM {self.evals[-1]['em']:.2f}"
        self.bar.update(self.task, advance=1, info=info)

    def evaluate_and_save(self, step: int) -> None:
        """The periodic greedy dev evaluation and training checkpoint after step `step`."""
        t = self.cfg.trainer
        if t.eval_every and step % t.eval_every == 0:
            dev = self.greedy("dev")
            self.evals.append({"step": step, "em": dev["all"]["em"], "f1": dev["all"]["f1"]})
            self.writer.add_scalar("eval/dev_em", dev["all"]["em"], step)
        if t.save_every and step % t.save_every == 0:
            loop_state = {"sampler": self.sampler.state(), "rng": rng_state(), "step": step, "history": self.history,
                          "evals": self.evals, "start_test": self.start_test, "config": to_dict(self.cfg)}
            self.c.actor.save_state(self.out / "checkpoints", step,
                                    lambda extra: save_checkpoint(self.out, step, {**extra, **loop_state}))

    # -- the end ---------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Final test evaluation, final/ weights, the generator shut down; rank 0 writes the summary table,
        curves.png and summary.json."""
        cfg, out, evals = self.cfg, self.out, self.evals
        self.writer.flush()
        end_test = None
        if cfg.trainer.final_test_eval:
            end_test = self.greedy("test")
            evals = [{"step": 0, "em": float("nan"), "test_em": self.start_test["all"]["em"]}] + evals
            evals.append({"step": cfg.trainer.steps, "em": evals[-1]["em"], "test_em": end_test["all"]["em"]})
            self.writer.add_scalar("eval/test_em", end_test["all"]["em"], cfg.trainer.steps)
        self.writer.close()
        summary = {"start_test": self.start_test, "end_test": end_test, "history": self.history, "evals": evals}
        save_final(self.c.actor, self.c.tok, out, self.rank0)
        if self.generator is not None and hasattr(self.generator, "shutdown"):
            self.generator.shutdown()
        if self.rank0:
            from rich.table import Table

            plot_curves(self.history, evals, out / "curves.png", f"{cfg.algorithm} on the tiny world")
            table = Table(title=f"{cfg.algorithm}: {cfg.trainer.steps} steps")
            for col, justify in (("metric", "left"), ("start", "right"), ("end", "right")):
                table.add_column(col, justify=justify)
            for r in summary_rows(self.start_test, end_test, self.history):
                table.add_row(*r)
            self.console.print(table)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            self.console.print(f"wrote {out}/final (HF model), curves.png, metrics.jsonl, summary.json, tensorboard/")
        return summary
