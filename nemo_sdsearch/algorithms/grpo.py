"""GRPO and SD-Search training recipe (`sdsearch train`), top to bottom.

One step:
  1. sample B questions; G rollouts each with the student prompt (generation)
  2. reward = EM of the final answer; group-normalised advantages
  3. old and reference log-probs at policy positions (no grad)
  4. [sd_search] a hindsight block per group; teacher sequences; teacher logits at query positions
  5. update: GRPO clipped surrogate + kl_coef * k3 KL [+ sd.coef * JSD at query positions]
Periodic greedy dev evaluation, checkpoints (model, optimizer, RNG, data position), TensorBoard and
metrics.jsonl every step, and at the end a summary table, a PNG of the curves and test-world EM.

Backends (`actor=hf|megatron`). hf: one process; the generator shares the actor's weights. megatron:
`torchrun --nproc-per-node N sdsearch train actor=megatron megatron.tensor_parallel=TP` (N a multiple of
TP); each rank trains its tensor-parallel shard of a megatron-core GPTModel and keeps a full HF copy of
the model for generation, refitted from the gathered weights after every optimizer step. Every rank
runs the same rollouts (same seeds, same weights; checked each step), so nothing is broadcast; at tp>1
the training losses and metrics read vocab-sharded logits (losses.vocab_parallel*). Only rank 0 writes
files and prints; checkpoints are Megatron dist checkpoints (every rank) plus the loop state (rank 0).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import torch

from nemo_sdsearch.algorithms import sd_search
from nemo_sdsearch.algorithms.report import plot_curves, summary_rows
from nemo_sdsearch.algorithms.state import (QuestionSampler, append_jsonl, check_out_dir, clear_out_dir,
                                            load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                            truncate_jsonl)
from nemo_sdsearch.config import TrainConfig, to_dict
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.losses.policy import clipped_surrogate_per_token, group_advantages, k3_per_token
from nemo_sdsearch.losses.vocab_parallel import vocab_parallel_logprobs
from nemo_sdsearch.losses.vocab_parallel_metrics import vocab_parallel_argmax, vocab_parallel_entropy
from nemo_sdsearch.models.base import SequenceBatch
from nemo_sdsearch.models.hf import HFActor, HFScorer, token_logprobs


# ---------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------
def load_questions(cfg: TrainConfig) -> dict:
    """train / dev / test questions: the user's FlashRAG files when given, else the bundled world."""
    from nemo_sdsearch.core.qa import QA, load_flashrag
    from nemo_sdsearch.world.generator import build_bundle

    d = cfg.data
    if d.train_files:
        read = lambda files: [q for f in files for q in load_flashrag(f)]
        train, dev, test = read(d.train_files), read(d.dev_files), read(d.test_files)
    else:
        bundle = build_bundle()
        qa = lambda qs: [QA.from_flashrag(q.to_flashrag()) for q in qs]
        train, dev, test = qa(bundle.train), qa(bundle.dev), qa(bundle.test)
    return {"train": train[:d.train_questions] if d.train_questions else train,
            "dev": dev[:d.dev_questions] if d.dev_questions else dev,
            "test": test[:d.test_questions] if d.test_questions else test}


def make_prompt_format(cfg: TrainConfig, tok):
    """The student/teacher prompt builder of this run (`prompt.instruction`, `prompt.chat_template`)."""
    from nemo_sdsearch.core.prompts import prompt_format

    return prompt_format(tok, cfg.prompt.instruction, cfg.prompt.chat_template)


def build_components(cfg: TrainConfig):
    from nemo_sdsearch.models.hf import load_model_and_tokenizer
    from nemo_sdsearch.config import rollout_config
    from nemo_sdsearch.rollout.engine import RolloutEngine
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator
    from nemo_sdsearch.world.assets import default_model_dir
    from nemo_sdsearch.world.generator import build_bundle
    from retrieval import build_retriever

    megatron = cfg.actor == "megatron"
    device = cfg.model.device
    if megatron:  # process groups first: a wrong launch fails before anything is loaded
        device = _init_megatron_parallel(cfg) or device
    torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.trainer.seed)
    # hf: this model object is the trained one: fp32 master weights (bf16 autocast on CUDA). megatron: it is
    # only the generation copy and the source of the actor's weights (Megatron keeps fp32 main weights).
    model, tok = load_model_and_tokenizer(cfg.model.path or default_model_dir(), device=device, training=not megatron)
    if megatron:
        # The HF model stays on every rank for generation (refitted after every step); the actor and the
        # frozen reference are megatron-core shards built from its initial weights.
        actor = _megatron_actor(model, cfg)
        ref = _megatron_actor(model, cfg, frozen=True) if cfg.grpo.kl_coef > 0 else None
        torch.manual_seed(cfg.trainer.seed)  # building the GPTModels drew from (and reseeded) the CPU RNG
    else:
        ref = None
        if cfg.grpo.kl_coef > 0:
            ref = copy.deepcopy(model).eval()
            ref.requires_grad_(False)
        actor = HFActor(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                        grad_clip=cfg.optim.grad_clip)
    data = load_questions(cfg)
    if cfg.data.train_files:  # the user's data: the retrieval service holds its corpus
        train_retriever = test_retriever = build_retriever("http", [], url=cfg.cluster.retrieval_url)
    else:
        bundle = build_bundle()
        train_retriever = build_retriever(cfg.rollout.retriever, bundle.train_world.passages,
                                          url=cfg.cluster.retrieval_url)
        test_retriever = build_retriever(cfg.rollout.retriever, bundle.test_world.passages,
                                         url=cfg.cluster.retrieval_url)
    # hf: shares the actor's weights, no refit needed on one device; megatron: its own copy (see train);
    # trtllm: the TensorRT-LLM engine holds its own weights, refitted in place after every update
    if cfg.generator == "trtllm":
        from nemo_sdsearch.rollout.trtllm_generator import TRTLLMGenerator

        generator = TRTLLMGenerator(cfg.model.path or default_model_dir(), tok,
                                    tensor_parallel_size=cfg.trtllm.tensor_parallel,
                                    kv_cache_free_gpu_memory_fraction=cfg.trtllm.kv_cache_fraction,
                                    max_seq_len=cfg.rollout.max_context)
    else:
        generator = TorchGenerator(model, tok)
    norm = cfg.reward.normalization
    sample_cfg = rollout_config(cfg.rollout, normalization=norm)
    greedy_cfg = rollout_config(cfg.rollout, temperature=0.0, normalization=norm)
    student = make_prompt_format(cfg, tok).student
    engines = {"train": RolloutEngine(generator, train_retriever, sample_cfg, prompt_fn=student),
               "dev": RolloutEngine(generator, train_retriever, greedy_cfg, prompt_fn=student),
               "test": RolloutEngine(generator, test_retriever, greedy_cfg, prompt_fn=student)}
    if megatron:
        return actor, ref, tok, data, engines
    return actor, (HFScorer(ref) if ref is not None else None), tok, data, engines


# ---------------------------------------------------------------------------------------------------
# The megatron backend: launch check, actor and reference, refit, cross-rank checks
# ---------------------------------------------------------------------------------------------------
def _init_megatron_parallel(cfg: TrainConfig) -> str | None:
    """Process groups from the torchrun environment and Megatron's TP groups; a launch that cannot give
    them fails with a ConfigError naming the key. Returns this rank's device (None: the default)."""
    from nemo_sdsearch.config import ConfigError
    from nemo_sdsearch.models.megatron.builder import init_parallel

    m = cfg.megatron
    tp, pp = m.tensor_parallel, m.pipeline_parallel
    mp = tp * pp
    launch = (f"launch with `torchrun --nproc-per-node {mp} $(which sdsearch) train actor=megatron "
              f"megatron.tensor_parallel={tp} megatron.pipeline_parallel={pp} ...` (or --nproc-per-node a "
              f"multiple of {mp}: data parallel)")
    if m.sequence_parallel and tp > 1 and not torch.cuda.is_available():
        raise ConfigError("config key megatron.sequence_parallel: sequence parallelism needs GPUs "
                          "(NCCL reduce-scatter); set it to false on CPU")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    else:
        env = os.environ.get("WORLD_SIZE")
        if mp > 1 and (env is None or "MASTER_PORT" not in os.environ):
            raise ConfigError(f"config key megatron.tensor_parallel: tensor_parallel={tp} x pipeline_parallel="
                              f"{pp} needs {mp} processes "
                              f"but this one was not started by torchrun (no WORLD_SIZE/MASTER_PORT in the "
                              f"environment): {launch}")
        world = int(env or 1)
    if world % mp:
        raise ConfigError(f"config key megatron.tensor_parallel: tensor_parallel={tp} x pipeline_parallel={pp} "
                          f"does not divide the {world} processes of this launch: {launch}")
    init_parallel(tp, pp, seed=cfg.trainer.seed)
    if torch.cuda.is_available() and cfg.model.device is None:
        return f"cuda:{torch.cuda.current_device()}"
    return None


def _megatron_dtype(cfg: TrainConfig) -> torch.dtype:
    d = cfg.megatron.dtype
    if d == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[d]


def _megatron_actor(hf_model, cfg: TrainConfig, frozen: bool = False):
    """This rank's megatron-core shard of `hf_model` (its current weights) as a `MegatronActor`; frozen:
    no gradient, no optimizer (the reference policy of the k3 KL)."""
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import build_gpt_model

    m = cfg.megatron
    overrides = {}
    if m.sequence_parallel and m.tensor_parallel > 1:
        overrides["sequence_parallel"] = True
    if m.activation_checkpointing:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(hf_model.config, dtype=_megatron_dtype(cfg), vocab_divisor=m.make_vocab_size_divisible_by,
                            **overrides)
    # auto: Megatron's mixed-precision optimizer on GPU (fp32 main weights; sharded over DP when
    # megatron.distributed_optimizer), torch AdamW over fp32 shards on CPU. The frozen reference needs none.
    optimizer = "torch" if frozen else "auto"
    actor = MegatronActor(model, hf_model.config, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                          betas=cfg.optim.betas, grad_clip=cfg.optim.grad_clip, optimizer=optimizer,
                          distributed_optimizer=m.distributed_optimizer)
    actor.load_hf_weights(hf_model.state_dict())
    if frozen:
        model.requires_grad_(False)
        actor.optimizer = None
    return actor


def _vocab_shard(actor) -> dict | None:
    """{"group", "vocab_size"} when the actor's logits are a vocabulary shard (Megatron at tp > 1), else
    None (full logits: the dense/chunked functions apply)."""
    if getattr(actor, "tp", 1) > 1 and not getattr(actor, "gather_logits", True):
        return {"group": actor.tp_group, "vocab_size": actor.vocab_size}
    return None


def _is_rank0(cfg: TrainConfig) -> bool:
    if cfg.actor != "megatron":
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def check_same_rollouts(trajs: list[Trajectory]) -> None:
    """Every rank must have sampled the same trajectories (same seeds, same weights): one all-reduce of
    a CRC32 of the token ids (and its negation: MAX of both = all equal)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return
    crc = 0
    for t in trajs:
        ids = torch.tensor([len(t.token_ids)] + list(t.token_ids), dtype=torch.int64)
        crc = zlib.crc32(ids.numpy().tobytes(), crc)
    h = torch.tensor([crc, -crc], dtype=torch.int64)
    torch.distributed.all_reduce(h, op=torch.distributed.ReduceOp.MAX)
    if int(h[0]) != crc or int(h[1]) != -crc:
        raise RuntimeError(f"rank {torch.distributed.get_rank()}: the rollouts differ between ranks (token-id "
                           "hash mismatch); generation must be deterministic and the refitted weights identical "
                           "on every rank")


def _save_megatron_checkpoint(out: Path, step: int, actor, payload: dict, rank0: bool) -> None:
    """Collective: the model/optimizer/RNG shards as a Megatron dist checkpoint (every rank), then rank 0
    writes the loop state (`state.pt`, naming that directory) and moves the `latest` pointer."""
    from nemo_sdsearch.checkpoint.nemo_archive import save_training_state

    name = f"megatron_step_{step:06d}"
    directory = out / "checkpoints" / name
    if rank0 and directory.exists():
        shutil.rmtree(directory)
    save_training_state(directory, actor, extra={"step": step})  # barriers inside
    if rank0:
        save_checkpoint(out, step, {**payload, "megatron": name})
    torch.distributed.barrier()


class _NoWriter:
    """The TensorBoard writer of ranks other than 0."""

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def greedy_em(engine, questions, batch_size: int) -> dict:
    from nemo_sdsearch.eval.harness import evaluate

    report = evaluate(engine, {"x": questions}, batch_size=batch_size, progress=False)
    return report.by_dataset["x"]


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


def update_policy(actor, ref, trajs: list[Trajectory], adv: torch.Tensor, teacher, cfg: TrainConfig, pad_id: int):
    """One policy update on a rollout batch (steps 3 and 5 of the recipe).

    First, for every mini-batch, the tensors and the old and reference log-probs at policy positions
    (no grad, all from the weights that sampled). Then per mini-batch one optimizer step over
    micro-batches of: GRPO clipped surrogate + kl_coef * k3 KL (+ sd.coef * JSD at query positions when
    `teacher` holds teacher sequences). Returns (metric sums, one train_step stats dict per mini-batch)."""
    T, G = cfg.rollout.temperature, cfg.grpo
    shard = _vocab_shard(actor)  # tp > 1: logits_at gives this rank's vocabulary shard
    pipeline = getattr(actor, "pp", 1) > 1
    m = {"teacher_s": 0.0, "jsd_sum": 0.0, "agree": 0.0, "n_query": 0, "kl_sum": 0.0,
         "clip": 0.0, "entropy_sum": 0.0, "n_policy": 0}
    per_mini = len(trajs) // G.mini_batches
    plan = []
    for mb in range(G.mini_batches):
        idx = list(range(mb * per_mini, (mb + 1) * per_mini))
        micro = [idx[i:i + G.micro_batch_size] for i in range(0, len(idx), G.micro_batch_size)]
        tensors = [micro_batch_tensors([trajs[i] for i in mi], pad_id, actor.device) for mi in micro]
        with torch.no_grad():
            # With a single optimizer step the weights that sampled are the weights being trained:
            # old log-probs are then the current ones, detached (ratio == 1), and need no extra pass.
            old = [None] * len(tensors) if G.mini_batches == 1 else \
                [actor.logprobs_at(b, r, c, T, with_grad=False) for b, r, c, _ in tensors]
            refs = [ref.logprobs_at(b, r, c, T, with_grad=False) if ref is not None else None
                    for b, r, c, _ in tensors]
        plan.append((idx, micro, tensors, old, refs))

    stats = []
    for idx, micro, tensors, old, refs in plan:
        n_tokens = sum(int(r.numel()) for _, r, _, _ in tensors)
        n_query = sum(int(q.sum()) for *_, q in tensors)
        seq_lens = [torch.bincount(r, minlength=len(mi)).clamp(min=1) for (_, r, _, _), mi in zip(tensors, micro)]

        def teacher_logits(k: int):
            """The teacher pass of micro-batch k (no grad) at its query positions, or None."""
            batch, rows, cols, is_q = tensors[k]
            if teacher is None or not bool(is_q.any()):
                return None
            t0 = time.perf_counter()
            mi = micro[k]
            tb = SequenceBatch.from_lists([teacher[i].token_ids for i in mi], pad_id, actor.device)
            shift = torch.tensor([teacher[i].shift for i in mi], device=actor.device)
            q_rows, q_cols = rows[is_q], cols[is_q]
            t_logits = actor.teacher_logits_at(tb, q_rows, q_cols + shift[q_rows])
            m["teacher_s"] += time.perf_counter() - t0
            return t_logits

        def micro_loss(k: int, logits: torch.Tensor, t_logits) -> torch.Tensor:
            """Micro-batch k's loss from the policy logits at its policy positions (and the teacher's)."""
            batch, rows, cols, is_q = tensors[k]
            mi = micro[k]
            if shard is None:
                logp = token_logprobs(logits, batch.input_ids[rows, cols], T)
            else:
                logp = vocab_parallel_logprobs(logits, batch.input_ids[rows, cols].to(logits.device), temperature=T,
                                               **shard)
            a = adv[mi].to(logp.device)[rows]
            surr, clipped = clipped_surrogate_per_token(logp, logp.detach() if old[k] is None else old[k], a, G.clip_eps)
            if G.reduction == "token":
                w = torch.full_like(surr, 1.0 / n_tokens)
            else:
                w = 1.0 / (seq_lens[k][rows].to(surr.dtype) * len(idx))
            loss = (surr * w).sum()
            if refs[k] is not None:
                kl_tok = k3_per_token(logp, refs[k].to(logp.device), clamp=G.kl_clamp)
                loss = loss + G.kl_coef * (kl_tok * w).sum()
                m["kl_sum"] += float(kl_tok.detach().sum())
            with torch.no_grad():
                if shard is None:
                    lsm = torch.log_softmax(logits.detach(), -1)
                    m["entropy_sum"] += float(-(lsm.exp() * lsm).sum(-1).sum())
                else:
                    m["entropy_sum"] += float(vocab_parallel_entropy(logits.detach(), **shard).sum())
                m["clip"] += float(clipped.sum())
                m["n_policy"] += int(rows.numel())
            if t_logits is not None:
                jsd = sd_search.jsd_at_queries(logits, is_q, t_logits, cfg.sd, vocab_shard=shard)
                loss = loss + cfg.sd.coef * jsd.sum() / n_query
                m["jsd_sum"] += float(jsd.detach().sum())
                if shard is None:
                    m["agree"] += float((logits[is_q].detach().argmax(-1) == t_logits.argmax(-1)).sum())
                else:
                    m["agree"] += float((vocab_parallel_argmax(logits[is_q].detach(), **shard)
                                         == vocab_parallel_argmax(t_logits, **shard)).sum())
                m["n_query"] += int(is_q.sum())
            return loss

        if pipeline:
            # pp > 1: megatron's schedule runs the stages; the loss is computed on the last stage from its
            # decoder output. The teacher passes (forward-only schedules) come first, at the same weights.
            from nemo_sdsearch.models.megatron.actor import PipelineMicroBatch

            t_all = [teacher_logits(k) for k in range(len(micro))]
            batches = [PipelineMicroBatch(b, r, c, {"k": k}) for k, (b, r, c, _) in enumerate(tensors)]
            stats.append(actor.train_step_pipeline(
                batches, lambda out, mb: micro_loss(mb.extra["k"], out.logits(), t_all[mb.extra["k"]])))
        else:
            stats.append(actor.train_step(
                lambda k: micro_loss(k, actor.logits_at(*tensors[k][:3]), teacher_logits(k)), len(micro)))
    if pipeline:  # the metric sums were taken on the last stage: every rank reports them
        keys = sorted(m)
        vec = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64)
        vec = actor.broadcast_from_last_stage(vec, (len(keys),), torch.float64).cpu()
        m = {k: (int(round(v)) if k.startswith("n_") else v) for k, v in zip(keys, vec.tolist())}
    return m, stats


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, console=None, progress: bool = True) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from torch.utils.tensorboard import SummaryWriter

    megatron, rank0 = cfg.actor == "megatron", _is_rank0(cfg)
    # megatron: every rank runs the loop; only rank 0 prints and writes files
    console = (console or Console()) if rank0 else Console(quiet=True)
    out = Path(cfg.trainer.out_dir)
    check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)  # every rank, before anything is written
    actor, ref, tok, data, engines = build_components(cfg)  # megatron: every rank has joined the groups
    if rank0:
        clear_out_dir(out, cfg.trainer.overwrite)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    prompts = make_prompt_format(cfg, tok)
    generator = engines["train"].generator  # megatron: refitted from the actor after every update
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    G, B = cfg.rollout.group_size, cfg.trainer.questions_per_step
    sampler = QuestionSampler(len(data["train"]), cfg.trainer.seed)
    history, evals, start_test, start_step = [], [], None, 0

    state = load_latest_checkpoint(out) if cfg.trainer.resume else None
    if state is not None:
        if megatron:
            from nemo_sdsearch.checkpoint.nemo_archive import load_training_state

            if "megatron" not in state:
                raise ValueError(f"{out}/checkpoints: the latest checkpoint (step {state['step']}) was written "
                                 "by actor=hf; resume it with actor=hf")
            # model, optimizer and every rank's RNG states from the dist checkpoint
            load_training_state(out / "checkpoints" / state["megatron"], actor)
            generator.refit(actor.export_weights())
        else:
            actor.model.load_state_dict(state["model"])
            actor.optimizer.load_state_dict(state["optimizer"])
        sampler.load(state["sampler"])
        if not megatron:
            set_rng_state(state["rng"])
        history, evals, start_test, start_step = state["history"], state["evals"], state["start_test"], state["step"]
        if rank0:
            truncate_jsonl(out / "metrics.jsonl", start_step)
        console.print(f"resumed from step {start_step}")
    elif rank0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    if cfg.trainer.final_test_eval and start_test is None:
        console.print("evaluating the start weights on the test world ...")
        start_test = greedy_em(engines["test"], data["test"], cfg.trainer.eval_batch_size)
        console.print(f"start test EM {start_test['all']['em']:.3f}")

    writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1) if rank0 else _NoWriter()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=console, disable=not (progress and rank0))
    with bar:
        task = bar.add_task(cfg.algorithm, total=cfg.trainer.steps, completed=start_step, info="")
        for step in range(start_step, cfg.trainer.steps):
            t_step = time.perf_counter()
            # 1. rollouts ------------------------------------------------------------------------
            questions = [data["train"][i] for i in sampler.take(B)]
            t0 = time.perf_counter()
            trajs = engines["train"].run(questions, n_samples=G, seed=cfg.trainer.seed * 1_000_003 + step)
            gen_s = time.perf_counter() - t0
            if megatron:
                check_same_rollouts(trajs)
            # 2. rewards and advantages ------------------------------------------------------------
            rewards = torch.tensor([t.exact_match for t in trajs])
            adv = group_advantages(rewards, G, eps=cfg.grpo.adv_eps)
            # 4. (SD-Search) hindsight blocks and teacher sequences --------------------------------
            teacher = None
            if cfg.algorithm == "sd_search":
                blocks = sd_search.group_hindsight_blocks(trajs, G, cfg.sd, lambda s: len(encode(s)))
                teacher = sd_search.teacher_sequences(trajs, blocks, G, lambda q, b: encode(prompts.teacher(q, b)))
            # 3 + 5. old/reference log-probs, then the update --------------------------------------
            t_update = time.perf_counter()
            sleeping = cfg.generator == "trtllm" and cfg.trtllm.sleep_while_training
            if sleeping:  # release the generation KV cache while the update runs
                generator.sleep(level=1)
            m, stats = update_policy(actor, ref, trajs, adv, teacher, cfg, tok.pad_token_id)
            update_s = time.perf_counter() - t_update - m["teacher_s"]
            if sleeping:
                generator.wake_up()
            if megatron or cfg.generator == "trtllm":  # the generator holds its own copy of the weights
                generator.refit(actor.export_weights())  # (refit time counts in time_step_s)
            step_s = time.perf_counter() - t_step
            skipped = any(s["skipped"] for s in stats)
            row = {
                "step": step + 1,
                "reward": float(rewards.mean()),
                "em": float(rewards.mean()),
                "searches_per_rollout": sum(t.num_searches for t in trajs) / len(trajs),
                "jsd": m["jsd_sum"] / max(m["n_query"], 1) if teacher is not None else float("nan"),
                "agreement": m["agree"] / max(m["n_query"], 1) if teacher is not None else float("nan"),
                "query_tokens": m["n_query"],
                "kl": m["kl_sum"] / max(m["n_policy"], 1),
                "clip_fraction": m["clip"] / max(m["n_policy"], 1),
                "entropy": m["entropy_sum"] / max(m["n_policy"], 1),
                "loss": sum(s["loss"] for s in stats),
                "grad_norm": stats[-1]["grad_norm"],
                "skipped": skipped,
                "tokens_per_s": sum(sum(t.from_policy) for t in trajs) / max(gen_s, 1e-9),
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
                dev = greedy_em(engines["dev"], data["dev"], cfg.trainer.eval_batch_size)
                evals.append({"step": step + 1, "em": dev["all"]["em"], "f1": dev["all"]["f1"]})
                writer.add_scalar("eval/dev_em", dev["all"]["em"], step + 1)
            if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
                loop_state = {"sampler": sampler.state(), "rng": rng_state(), "step": step + 1, "history": history,
                              "evals": evals, "start_test": start_test, "config": to_dict(cfg)}
                if megatron:
                    _save_megatron_checkpoint(out, step + 1, actor, loop_state, rank0)
                else:
                    save_checkpoint(out, step + 1, {
                        "model": actor.model.state_dict(), "optimizer": actor.optimizer.state_dict(), **loop_state})
            info = f"reward {row['reward']:.2f} searches {row['searches_per_rollout']:.2f}"
            if teacher is not None:
                info += f" jsd {row['jsd']:.3f}"
            if evals:
                info += f" dev EM {evals[-1]['em']:.2f}"
            bar.update(task, advance=1, info=info)
    writer.flush()

    # final evaluation, summary table, plot --------------------------------------------------------
    end_test = None
    if cfg.trainer.final_test_eval:
        end_test = greedy_em(engines["test"], data["test"], cfg.trainer.eval_batch_size)
        evals = [{"step": 0, "em": float("nan"), "test_em": start_test["all"]["em"]}] + evals
        evals.append({"step": cfg.trainer.steps, "em": evals[-1]["em"], "test_em": end_test["all"]["em"]})
        writer.add_scalar("eval/test_em", end_test["all"]["em"], cfg.trainer.steps)
    writer.close()
    summary = {"start_test": start_test, "end_test": end_test, "history": history, "evals": evals}
    if not rank0:  # every rank ran the same loop; rank 0 writes the results
        torch.distributed.barrier()
        return summary
    # megatron: the generation model holds the trained weights (refitted from export_weights every step)
    (generator.model if megatron else actor.model).save_pretrained(out / "final", safe_serialization=True)
    tok.save_pretrained(out / "final")
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
    if megatron:
        torch.distributed.barrier()
    return summary
