"""Search-E1: GRPO rounds alternated with on-policy self-distillation (OPSD) rounds, top to bottom.

One cycle:
  1. GRPO round: `search_e1.grpo_steps` steps of the GRPO recipe (grpo.py) from the current weights.
  2. Rollout pool: K rollouts per pool question from the converged policy, reward and number of
     searches recorded, appended to pool.jsonl question by question (a crash loses at most a batch: a last
     line it cut is dropped on resume).
  3. Pair mining (core/pairs.py): reference = correct with fewest searches, student = most different.
  4. OPSD round: a LoRA adapter on the policy (the actor in adapter mode). Student = adapter on, prompt P_S(q);
     teacher = adapter off (the frozen policy), prompt P_T(q, tau_ref) = instruction || q || reference trajectory
     (with its passages) || "solve it in your own words". Both score the same student trajectory; per pair the
     mean over its policy positions (information excluded) of sum_v min(p_t log(p_t / p_s), tau), then
     the mean over pairs (eq. 7). Greedy dev EM every few steps; the best adapter is merged into fp32.
     (`search_e1.adapter=full`: every weight trains, teacher = a frozen copy of the round's start weights.)
     Both modes run the same OPSD step (algorithms/opsd.py) through the actor.
Every stage boundary is recorded in search_e1_state.json, so `trainer.resume=true` continues where a
run stopped (a GRPO round resumes from its own checkpoints, the pool from its file); without it the run
directory must be empty (or `trainer.overwrite=true`), so nothing of an earlier run is reused. A resumed run
ends with the files and weights of a run that was never stopped (tests/test_faults.py kills one at each stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path

from nemo_sdsearch.algorithms.state import check_out_dir, clear_out_dir
from nemo_sdsearch.config import TrainConfig, to_dict
from nemo_sdsearch.core.files import atomic_write_text
from nemo_sdsearch.core.pairs import RolloutRecord, mine_pairs
from nemo_sdsearch.core.prompts import reference_block
from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.core.spans import INFO_CLOSE
from nemo_sdsearch.core.trajectory import Trajectory

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KILL_ENV = "SDSEARCH_E1_KILL_AT"  # test-only fault injection (`_kill_point`); unset in every real run


def _kill_point(point: str) -> None:
    """Fault injection for tests/test_faults.py: SIGKILL this process when SDSEARCH_E1_KILL_AT names `point`, as a
    crash there would end it (no handler runs, nothing more is written). Points: `pool` (a batch of the pool is
    on disk), `pairs` (the pool is complete and mining.json written), `opsd` (an OPSD step's row written),
    `merge` (the OPSD round's merged weights written, the round not yet recorded as done)."""
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# Stage state
# ---------------------------------------------------------------------------------------------------
def _state_path(out: Path) -> Path:
    return out / "search_e1_state.json"


def load_state(out: Path) -> dict:
    path = _state_path(out)
    return json.loads(path.read_text()) if path.exists() else {"done": [], "model": None, "rounds": []}


def save_state(out: Path, state: dict) -> None:
    atomic_write_text(_state_path(out), json.dumps(state, indent=1), tmp_name="search_e1_state.tmp")


# ---------------------------------------------------------------------------------------------------
# 2. Rollout pool
# ---------------------------------------------------------------------------------------------------
def read_pool(path: Path, repair: bool) -> dict[str, list[Trajectory]]:
    """The rollouts of a pool file written so far, by question id. A crash can cut the file's last line (a
    question half written): that line is dropped with a warning, and with `repair` (the one process that writes
    the file) cut off the file, so the stage resumes there and appends whole lines. A bad line before the last
    one is corruption, not a crash: an error that names it."""
    import logging

    done: dict[str, list[Trajectory]] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    lines = data.split(b"\n")
    good = 0  # bytes of whole, parsed lines
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            row = json.loads(line)
            if i == len(lines) - 1:  # no newline after it: written, but not to its end
                raise ValueError("no newline")
            done[row["question_id"]] = [Trajectory.from_dict(t) for t in row["rollouts"]]
        except (ValueError, KeyError, TypeError) as e:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not a pool row ({e}); the file is damaged") from None
            logging.getLogger(__name__).warning("%s: its last line (%d bytes) was cut by a crash; dropped, its "
                                                "question is rolled out again", path, len(line))
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(good)
            break
        good += len(line) + 1
    return done


def _pool_batches(questions: list[QA], done: dict, batch_questions: int):
    """(seed offset, questions still to roll out) per batch of the pool. Batches and their seeds are fixed by
    the position in the whole question list, not among those left, so a resumed pool rolls its missing
    questions out exactly as a run that never stopped."""
    for i in range(0, len(questions), batch_questions):
        batch = [q for q in questions[i:i + batch_questions] if q.id not in done]
        if batch:
            yield i, batch


def build_pool(engine, questions: list[QA], k: int, seed: int, path: Path, batch_questions: int = 8) -> list[list[Trajectory]]:
    """K rollouts per question, appended to `path` (jsonl, one question per line); resumes a partial file (a
    last line cut by a crash is dropped: `read_pool`)."""
    done = read_pool(path, repair=True)
    with open(path, "a") as f:
        for i, batch in _pool_batches(questions, done, batch_questions):
            trajs = engine.run(batch, n_samples=k, seed=seed + i)
            for j, q in enumerate(batch):
                group = trajs[j * k:(j + 1) * k]
                done[q.id] = group
                f.write(json.dumps({"question_id": q.id, "rollouts": [t.to_dict() for t in group]}) + "\n")
            f.flush()
    return [done[q.id] for q in questions]


def pool_records(group: list[Trajectory]) -> list[RolloutRecord]:
    """Mining records; the length tie-break counts the rollout's own (policy) tokens, not retrieved ones."""
    return [RolloutRecord("".join(t.policy_texts), t.exact_match == 1.0, t.num_searches, sum(t.policy_mask()))
            for t in group]


def _fair_shares(lengths: list[int], budget: int) -> list[int]:
    """Split `budget` over segments of the given lengths: short segments keep all they have, the rest
    share what is left equally (water-filling), so no segment gets more than it needs."""
    shares = [0] * len(lengths)
    left = sorted(range(len(lengths)), key=lambda i: lengths[i])
    while left:
        each = budget // len(left)
        i = left.pop(0)
        shares[i] = min(lengths[i], each)
        budget -= shares[i]
    return shares


def reference_text(t: Trajectory, decode, with_information: bool, max_tokens: int) -> str:
    """The reference trajectory as the teacher reads it, as a reference block: its policy turns and, with
    `with_information`, the passages it retrieved (as the paper's teacher sees them).

    At most about `max_tokens` response tokens: the passages are truncated first (each information block
    keeps its head, with the room left by the policy tokens shared fairly between blocks); the policy's
    own tokens, and so its answer, are never cut unless they alone exceed the cap, and then the head of
    the reasoning goes and the tail (with the answer) stays."""
    segments: list[tuple[bool, list[int]]] = []  # (from the environment, ids), in order
    for tok, env in zip(t.token_ids[t.prompt_length:], [not p for p in t.from_policy[t.prompt_length:]]):
        if env and not with_information:
            continue
        if segments and segments[-1][0] == env:
            segments[-1][1].append(tok)
        else:
            segments.append((env, [tok]))
    policy = [ids for env, ids in segments if not env]
    n_policy = sum(len(ids) for ids in policy)
    if n_policy >= max_tokens:  # no room for passages: keep the end of the policy's own text
        flat = [tok for ids in policy for tok in ids]
        text = decode(flat) if len(flat) <= max_tokens else "... " + decode(flat[-max_tokens:])
        return reference_block(text)
    env_idx = [i for i, (env, _) in enumerate(segments) if env]
    shares = dict(zip(env_idx, _fair_shares([len(segments[i][1]) for i in env_idx], max_tokens - n_policy)))
    parts = []
    for i, (env, ids) in enumerate(segments):
        if not env or shares[i] == len(ids):
            parts.append(decode(ids))
            continue
        whole = decode(ids)
        cut = decode(ids[:shares[i]]).rstrip() + " ..."
        # keep the block closed, so the teacher sees where the passages end and the policy resumes
        parts.append(cut + ("</information>\n\n" if INFO_CLOSE in whole and INFO_CLOSE not in cut else "\n"))
    return reference_block("".join(parts))


# ---------------------------------------------------------------------------------------------------
# 4. OPSD round
# ---------------------------------------------------------------------------------------------------
def add_lora(model, cfg: TrainConfig):
    """The OPSD round's LoRA adapter on `model`, in place (`peft.get_peft_model`; the PeftModel is returned): rank
    search_e1.lora_r, scaling lora_alpha / r, on every attention and MLP projection (`LORA_TARGETS`), no dropout.
    Its init (A: Kaiming uniform, B: zero, so the adapter starts as no change) draws from torch's RNG."""
    from peft import LoraConfig, get_peft_model

    e1 = cfg.search_e1
    lora = LoraConfig(r=e1.lora_r, lora_alpha=e1.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def opsd_items(pool, pairs, decode, teacher_prompt_ids, e1,
               max_positions: int | None = None) -> list[tuple[list[int], list[int], int, list[bool]]]:
    """(student ids, teacher ids, shift, student policy mask) per mined pair. The teacher sequence is
    P_T(q, reference) followed by exactly the student's response tokens, so student position j is teacher
    position j + shift; `teacher_prompt_ids(question, block)` gives P_T's ids (chat template included).

    `max_positions` (the model's max_position_embeddings): a pair whose teacher sequence is longer (a student
    rollout of up to rollout.max_context tokens plus a reference of up to search_e1.max_reference_tokens) is left
    out of the round, never scored past the model's positions; a round whose every pair is too long is refused."""
    items = []
    for p in pairs:
        group = pool[p.question]
        ref, stu = group[p.reference], group[p.student]
        block = reference_text(ref, decode, e1.reference_information, e1.max_reference_tokens)
        prompt = teacher_prompt_ids(stu.question, block)
        items.append((stu.token_ids, prompt + stu.response_ids(), len(prompt) - stu.prompt_length, stu.policy_mask()))
    if max_positions is None:
        return items
    kept = [it for it in items if len(it[1]) <= max_positions]
    if items and not kept:
        raise ValueError(f"every one of the {len(items)} OPSD pairs has a teacher sequence longer than the model's "
                         f"{max_positions} positions: lower search_e1.max_reference_tokens "
                         f"({e1.max_reference_tokens}) or rollout.max_context")
    return kept


def grpo_round_seed(seed: int, cycle: int) -> int:
    """The seed of cycle `cycle`'s GRPO round: the run's own seed for the first (so the first round is the GRPO
    baseline's first `grpo_steps` steps with the same seed, and an ablation pairs the two), a seed of its own
    for every later round."""
    return seed if cycle == 0 else seed * 101 + cycle


def _dev_row(result: dict) -> dict:
    """{"em", "fqh"} of a greedy dev evaluation (`greedy_em`'s result); fqh (first-query hit) is None when the
    dev questions record no evidence passages."""
    return {"em": result["all"]["em"], "fqh": result["all"].get("first_query_hit")}


def _dev_history(scores: dict) -> dict:
    """A history row's dev metrics: dev_em and, when measured, dev_first_query_hit."""
    out = {"dev_em": scores["em"]}
    if scores["fqh"] is not None:
        out["dev_first_query_hit"] = scores["fqh"]
    return out


def _plot_opsd(history, path):
    from nemo_sdsearch.algorithms.report import figure

    with figure(path, 2, (10, 3.5), "OPSD step") as (a, b):
        a.plot([h["step"] for h in history if "loss" in h], [h["loss"] for h in history if "loss" in h], marker=".")
        a.set_title("OPSD loss (clipped forward KL)")
        ev = [h for h in history if "dev_em" in h]
        b.plot([h["step"] for h in ev], [h["dev_em"] for h in ev], marker="o")
        b.set_title("dev EM (greedy)")


# ---------------------------------------------------------------------------------------------------
# 2. The pool over data-parallel replicas; 4. the OPSD round
# ---------------------------------------------------------------------------------------------------
POOL_ROWS_PER_ENGINE = 256   # with engines on every GPU: a pool batch gives each engine at least this many rows


def build_pool_sharded(actor, engine, questions: list[QA], k: int, seed: int, path: Path, rank0: bool,
                       batch_questions: int = 8, spread=None) -> list[list[Trajectory]]:
    """`build_pool` over data-parallel replicas: each batch of questions is split over the replicas (each
    replica's leader rolls out its share; a row's random stream belongs to its question and sample, so the
    split changes nothing), gathered on every rank, and appended to `path` by rank 0. Resumes a partial file.
    With `spread` (engines on every GPU, trtllm_placement.EngineSpread) a batch is split over the job's engines
    and holds at least POOL_ROWS_PER_ENGINE rows per engine."""
    from nemo_sdsearch.algorithms.setup import barrier

    done = read_pool(path, repair=rank0)
    barrier()  # every rank has read the file before rank 0 appends to it
    dp = actor.dp_size
    physical = batch_questions
    if spread is not None:  # (a multiple of the seeding batch, so that a row's seed is the same as without spread)
        per_engine = -(-max(batch_questions, -(-POOL_ROWS_PER_ENGINE // k)) // batch_questions) * batch_questions
        physical = spread.count * per_engine
    position = {q.id: n for n, q in enumerate(questions)}
    # a question's seed: its seeding batch's (every batch_questions questions of the pool list), whatever the size
    # of the batch that rolls it out
    q_seed = lambda q: seed + position[q.id] // batch_questions * batch_questions  # noqa: E731
    with (open(path, "a") if rank0 else contextlib.nullcontext()) as f:
        for i, batch in _pool_batches(questions, done, physical):
            if spread is not None:
                share = spread.share(batch)
                local = [t.to_dict() for t in engine.run(share, n_samples=k, seed=seed + i,
                                                         question_seeds=[q_seed(q) for q in share])] if share else []
                for q, rows in zip(batch, spread.regroup(batch, k, local)):
                    done[q.id] = [Trajectory.from_dict(t) for t in rows]
            else:
                mine = batch[actor.dp_rank::dp]
                trajs = engine.run(mine, n_samples=k, seed=seed + i) if actor.is_replica_leader and mine else []
                trajs = actor.broadcast_in_replica([t.to_dict() for t in trajs] if actor.is_replica_leader else None)
                for r, share in enumerate(actor.all_gather_dp(trajs)):
                    for j, q in enumerate(batch[r::dp]):
                        done[q.id] = [Trajectory.from_dict(t) for t in share[j * k:(j + 1) * k]]
            if rank0:
                for q in batch:
                    f.write(json.dumps({"question_id": q.id, "rollouts": [t.to_dict() for t in done[q.id]]}) + "\n")
                f.flush()
            _kill_point("pool")
    return [done[q.id] for q in questions]


def opsd_round(cfg: TrainConfig, c, pool, pairs, out: Path, console, rank0: bool) -> dict:
    """The OPSD round over the run's components `c`: `search_e1.opsd_steps` steps of `opsd.opsd_step`, the one OPSD
    step of both adapter modes (micro-batches, the clipped KL, and the actor's own optimizer, gradient clipping and
    non-finite skips):
    - `search_e1.adapter=lora` (the hf actor): the actor in adapter mode trains a LoRA adapter (`add_lora`, its init
      seeded by trainer.seed), the teacher is the same model with the adapter off (`adapter_off()`); the best
      step's adapter (the start, zero, if none beats it) is kept in memory and merged into the fp32 weights at the
      end, which are written to out/merged;
    - `search_e1.adapter=full` (any actor, distributed too): every weight trains, the teacher is the frozen reference
      set to the round's start weights; the best step's weights are written to out/merged from the weight stream
      when measured, and taken back at the end if the actor trained past them.
    Greedy dev EM every opsd_eval_every steps (sharded; the generator runs the adapted or trained weights). The
    actor (and its generator) end the round holding the kept weights, those of out/merged."""
    from nemo_sdsearch.algorithms.grpo import refit_generator
    from nemo_sdsearch.algorithms.opsd import opsd_step
    from nemo_sdsearch.algorithms.setup import (barrier, engine_asleep, make_prompt_format, sharded_greedy_em,
                                                start_stage)
    from nemo_sdsearch.checkpoint.hf_writer import save_hf_checkpoint_from_stream

    e1 = cfg.search_e1
    lora = e1.adapter == "lora"
    prompts = make_prompt_format(cfg, c.tok)
    decode = lambda ids: c.tok.decode(ids, skip_special_tokens=False)
    encode = lambda t: c.tok.encode(t, add_special_tokens=False)
    positions = c.actor.hf_config.max_position_embeddings
    items = opsd_items(pool, pairs, decode, lambda q, block: encode(prompts.teacher(q, block)), e1,
                       max_positions=positions)
    if len(items) < len(pairs):
        console.print(f"[yellow]OPSD: {len(pairs) - len(items)} of {len(pairs)} pairs left out: their teacher sequence "
                      f"passes the model's {positions} positions[/yellow]")
    # a fresh optimizer at opsd_lr, the reference (the full round's teacher) set to the round's start weights, and
    # torch's RNG seeded: the adapter's init draws from it, so a resumed run (which did not run the GRPO round in
    # this process) draws the adapter of a run that never stopped
    start_stage(c, cfg, e1.opsd_lr, cfg.trainer.seed)
    if lora:
        c.actor.enable_adapter(lambda model: add_lora(model, cfg))
    teacher = c.actor.adapter_off() if lora else c.ref
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "opsd_metrics.jsonl").unlink(missing_ok=True)  # a round a crash stopped starts over: its rows too
    dev_engine = c.engines["dev"] if c.engines is not None else None
    dev = lambda: _dev_row(sharded_greedy_em(c.actor, dev_engine, c.data["dev"], cfg.trainer.eval_batch_size,
                                             spread=c.spread))
    write_merged = lambda: save_hf_checkpoint_from_stream(c.actor.iter_weights(), out / "merged", c.actor.hf_config,
                                                          tokenizer=c.tok, write=rank0)
    # the best step so far: its adapter in memory (a few MB), or its weights in out/merged (the full model)
    keep = c.actor.adapter_state if lora else write_merged
    rng = random.Random(cfg.trainer.seed)
    best = {**dev(), "step": 0, "kept": keep()}
    console.print(f"OPSD ({'LoRA adapter' if lora else 'full-parameter'}): {len(items)} pairs; dev EM before "
                  f"{best['em']:.3f}")
    history = [{"step": 0, **_dev_history(best)}]
    for step in range(1, e1.opsd_steps + 1):
        batch = rng.sample(items, min(e1.opsd_pairs_per_step, len(items)))
        evaluate = bool(e1.opsd_eval_every and step % e1.opsd_eval_every == 0)
        with engine_asleep(c, cfg, refit=(lambda: refit_generator(c.actor, c.weight_sink)) if evaluate else None):
            s = opsd_step(c.actor, teacher, batch, e1, c.tok.pad_token_id)
        if s["skipped"]:
            console.print(f"[yellow]OPSD step {step}: non-finite loss or gradient, skipped[/yellow]")
        row = {"step": step, "loss": s["loss"]}
        if evaluate:
            scores = dev()
            row.update(_dev_history(scores))
            if scores["em"] > best["em"]:
                best = {**scores, "step": step, "kept": keep()}
        history.append(row)
        if rank0:
            with open(out / "opsd_metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        _kill_point("opsd")
    if lora:  # the kept adapter merged into the fp32 weights (a bf16 merge would round a small delta away)
        with engine_asleep(c, cfg, refit=lambda: refit_generator(c.actor, c.weight_sink)):
            c.actor.merge_adapter(best["kept"])
        write_merged()
    else:
        if best["step"] != e1.opsd_steps:  # the actor trained past the kept step: back to the kept weights
            barrier()  # rank 0 wrote out/merged
            c.actor.load_weights_from_dir(out / "merged")
        refit_generator(c.actor, c.weight_sink)
    if rank0:
        _plot_opsd(history, out / "opsd_curves.png")
    return {"best_step": best["step"], "best_dev_em": best["em"], "best_dev_first_query_hit": best["fqh"],
            "history": history}


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------
def run(cfg: TrainConfig, console=None, progress: bool = True) -> dict:
    """`sdsearch train algorithm=search_e1`: `search_e1.cycles` (GRPO round, pool, pairs, OPSD round) cycles, then
    the final test evaluation. The actor, its optimizer, the frozen reference and the rollout engines are built
    once per process and every stage runs over them (`setup.start_stage` begins a training stage: a fresh
    optimizer, the reference set to the stage's start weights); the stages' outputs on disk (each round's
    final/ and merged/) are for resume and inspection. Under torchrun every stage is sharded over the
    data-parallel replicas and only rank 0 writes files (behind barriers)."""
    from rich.console import Console

    from nemo_sdsearch.algorithms import grpo
    from nemo_sdsearch.algorithms.setup import (barrier, build_components, close_components, init_distributed,
                                                is_rank0, start_stage)
    from nemo_sdsearch.world.assets import default_model_dir

    out = Path(cfg.trainer.out_dir)
    check_out_dir(out, cfg.trainer.resume, cfg.trainer.overwrite)  # every rank, before anything is written
    init_distributed(cfg)
    rank0 = is_rank0(cfg)
    console = (console or Console()) if rank0 else Console(quiet=True)
    if rank0:
        clear_out_dir(out, cfg.trainer.overwrite)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    barrier()
    state = load_state(out) if cfg.trainer.resume else {"done": [], "model": None, "rounds": []}

    def commit(state):  # rank 0 writes; the others wait, so nobody reads a half-written state
        if rank0:
            save_state(out, state)
        barrier()

    model_dir = Path(state["model"] or cfg.model.path or default_model_dir())
    e1 = cfg.search_e1
    # the reference: the k3 KL's in the GRPO rounds, and the full-parameter OPSD round's frozen teacher
    c = build_components(replace(cfg, model=replace(cfg.model, path=str(model_dir))),
                         with_reference=cfg.grpo.kl_coef > 0 or e1.adapter == "full")
    grpo_c = c if cfg.grpo.kl_coef > 0 else c._replace(ref=None)  # no KL term: no reference pass
    for cycle in range(cfg.search_e1.cycles):
        cdir = out / f"cycle_{cycle}"
        # 1. GRPO round ---------------------------------------------------------------------------
        if f"{cycle}/grpo" not in state["done"]:
            rcfg = replace(cfg, algorithm="grpo",
                           model=replace(cfg.model, path=str(model_dir)),
                           trainer=replace(cfg.trainer, steps=e1.grpo_steps, out_dir=str(cdir / "grpo"),
                                           final_test_eval=False, overwrite=False,
                                           # a resumed run continues a round it left half done; a new run's
                                           # round directories are new (the run directory was empty)
                                           resume=cfg.trainer.resume,
                                           seed=grpo_round_seed(cfg.trainer.seed, cycle)))
            console.rule(f"cycle {cycle}: GRPO round ({e1.grpo_steps} steps)")
            start_stage(c, rcfg, cfg.optim.lr, rcfg.trainer.seed)
            summary = grpo.train(rcfg, console, progress, components=grpo_c)
            model_dir = cdir / "grpo" / "final"
            state["done"].append(f"{cycle}/grpo")
            state["model"] = str(model_dir)
            dev = [e for e in summary["evals"] if "val/dev_em" in e]  # the round's last dev evaluation
            state["rounds"].append({"cycle": cycle, "stage": "grpo", "dev_em": dev[-1]["val/dev_em"] if dev else None,
                                    "dev_first_query_hit": dev[-1].get("val/dev_first_query_hit") if dev else None,
                                    "dev_step": dev[-1]["step"] if dev else None})  # the step it measured
            commit(state)
        if f"{cycle}/opsd" in state["done"]:
            continue
        # 2 + 3. Rollout pool and pair mining -------------------------------------------------------
        pool, pairs, report_d = pool_and_pairs(cfg, c, cycle, cdir / "pool", console, rank0)
        # 4. OPSD round --------------------------------------------------------------------------
        console.rule(f"cycle {cycle}: OPSD round ({e1.opsd_steps} steps, {e1.adapter})")
        if pairs:
            if rank0:
                (cdir / "opsd").mkdir(parents=True, exist_ok=True)
            barrier()
            result = opsd_round(cfg, c, pool, pairs, cdir / "opsd", console, rank0)
            model_dir = cdir / "opsd" / "merged"
        else:
            console.print("[yellow]no pairs mined (no correct rollouts): OPSD round skipped[/yellow]")
            result = {"best_step": None, "best_dev_em": None, "best_dev_first_query_hit": None, "history": []}
        _kill_point("merge")
        state["done"].append(f"{cycle}/opsd")
        state["model"] = str(model_dir)
        before = result["history"][0] if result["history"] else {}  # step 0: the GRPO round's end weights
        state["rounds"].append({"cycle": cycle, "stage": "opsd", "dev_em": result["best_dev_em"],
                                "dev_first_query_hit": result["best_dev_first_query_hit"],
                                "dev_em_before": before.get("dev_em"),
                                "dev_first_query_hit_before": before.get("dev_first_query_hit"),
                                "best_step": result["best_step"], "mining": report_d})
        commit(state)
    # trainer.final_test_eval=false (the ablation, which evaluates every method's final model itself): none
    test = final_test(cfg, c) if cfg.trainer.final_test_eval else None
    close_components(c)
    state["final_test"] = test
    state["final_model"] = str(model_dir)
    commit(state)
    if rank0:
        from rich.table import Table

        table = Table(title=f"Search-E1: {cfg.search_e1.cycles} cycles")
        for col in ("cycle", "stage", "dev EM"):
            table.add_column(col)
        for rd in state["rounds"]:
            table.add_row(str(rd["cycle"]), rd["stage"], "n/a" if rd["dev_em"] is None else f"{rd['dev_em']:.3f}")
        console.print(table)
        console.print((f"final test EM {test['all']['em']:.3f}; " if test is not None else "") + f"model {model_dir}")
    return state


def pool_and_pairs(cfg: TrainConfig, c, cycle: int, pdir: Path, console, rank0: bool):
    """Steps 2 and 3: the rollout pool of the round's policy (the run's components `c`; sharded over the
    replicas, pool.jsonl by rank 0) and the mined pairs (every rank mines the same pool the same way; rank 0
    writes mining.json)."""
    from nemo_sdsearch.algorithms.setup import barrier

    e1 = cfg.search_e1
    train = c.data["train"]
    pool_qs = random.Random(cfg.trainer.seed * 31 + cycle).sample(train, min(e1.pool_questions, len(train)))
    if rank0:
        pdir.mkdir(parents=True, exist_ok=True)
    barrier()
    console.rule(f"cycle {cycle}: rollout pool ({len(pool_qs)} questions x {e1.pool_samples})")
    t0 = time.perf_counter()
    engine = c.engines["train"] if c.engines is not None else None
    pool = build_pool_sharded(c.actor, engine, pool_qs, e1.pool_samples, cfg.trainer.seed * 7 + cycle,
                              pdir / "pool.jsonl", rank0, spread=c.spread)
    pairs, report = mine_pairs([pool_records(g) for g in pool])
    report_d = report.as_dict()
    report_d["pool_accuracy"] = sum(t.exact_match for g in pool for t in g) / max(1, sum(len(g) for g in pool))
    report_d["pool_seconds"] = time.perf_counter() - t0
    if rank0:
        (pdir / "mining.json").write_text(json.dumps(report_d, indent=1))
    _kill_point("pairs")
    console.print("pair mining: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in report_d.items()))
    return pool, pairs, report_d


def final_test(cfg: TrainConfig, c) -> dict:
    """Greedy test EM of the run's current (final) weights (sharded over the replicas)."""
    from nemo_sdsearch.algorithms.setup import sharded_greedy_em

    engine = c.engines["test"] if c.engines is not None else None
    return sharded_greedy_em(c.actor, engine, c.data["test"], cfg.trainer.eval_batch_size, spread=c.spread)
