"""`sdsearch warmstart`: train the tiny model from scratch on synthetic search demonstrations.

Everything is derived from seeds: the worlds, the tokenizer (trained on the training world's text), the
demonstrations (student and teacher formats, see `world/demos.py`) and the model initialisation. The
loss is next-token cross-entropy on policy tokens only (prompt, hindsight and information are context).
The result (weights, tokenizer, a JSON record of how it was made) is what ships as the embedded default.
`vague_queries` gives the student demonstrations a habit of vague queries for some question phrasings
(`world/demos.py`), so the shipped policy leaves room for RL to improve its queries.

Every epoch draws its demonstrations from a *fresh* world (seed `world_seed_base + epoch`, never using a
test-world name). With one fixed world a small model lowers its loss fastest by memorising that world's
~1,000 entities and then writes remembered names instead of copying them from the question and the
passages; with a new world every epoch only reading the context pays.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nemo_sdsearch.core.files import atomic_path
from nemo_sdsearch.core.prompts import INSTRUCTION, student_prompt
from nemo_sdsearch.world.demos import QUERY_STYLES, DemoBuilder, phrase_query, response_turns


@dataclass
class WarmstartConfig:
    out: str = "warmstart_out"
    model: str = "tiny"
    vocab_size: int = 2048
    seed: int = 0
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 3000
    max_minutes: float = 45.0
    teacher_fraction: float = 0.25
    reference_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 25
    save_every: int = 250
    threads: int = 2
    max_questions: int | None = None  # use only the first N questions of each world (tests)
    questions_per_world: int = 2000
    fresh_worlds: bool = True  # False: every epoch uses the training world itself
    world_seed_base: int = 10_000
    init: str | None = None  # continue from this model directory (its tokenizer is kept)
    info_lm_weight: float = 0.5  # weight of the language-modelling loss on information tokens
    bf16: bool = False  # bf16 autocast of the forward pass (weights, optimizer state and loss stay fp32)
    # Student demonstrations of questions phrased with the vague-habit template search each hop with a vague
    # query (the name without the relation keyword) at this rate; 0 = every demonstration searches precisely.
    # It leaves the policy room to improve its queries (world/demos.py); the shipped model used 0.7.
    vague_queries: float = 0.7
    # Teacher-format targets (world/demos.py): precise = the shipped stages' (the target never depends on the
    # outcome labels); outcome = the target copies an attempt labelled correct, in group order.
    hindsight_targets: str = "precise"
    # Loss weight of the search-query tokens of outcome teacher demonstrations (1 = every policy token alike).
    # The tokens where the labels decide the wording are ~1% of the policy tokens; weighting them up
    # concentrates the gradient on reading the labels.
    teacher_query_weight: float = 1.0


def tokenizer_corpus(bundle, rng: random.Random) -> list[str]:
    """Text of the bundle's tokenizer world (never the training or test world: see generator.py)."""
    texts = [p["contents"] for p in bundle.tokenizer_world.passages]
    texts += [student_prompt(q.question) for q in bundle.tokenizer_questions[:2000]]
    for q in bundle.tokenizer_questions[:3000]:
        style = rng.randrange(len(QUERY_STYLES))
        texts += [t for t, _ in response_turns(q, [phrase_query(h, style) for h in q.hops])]
    texts += [INSTRUCTION] * 200
    return texts


def batches_for_epoch(demos, batch_size: int, rng: random.Random):
    """Length-bucketed batches: sort chunks of 50 batches by length, then shuffle the batches."""
    order = list(range(len(demos)))
    rng.shuffle(order)
    out = []
    chunk = batch_size * 50
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: len(demos[j].token_ids))
        out += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def collate(trajs, pad_id: int):
    """(input ids, attention mask, policy-token mask, information-token mask), right-padded."""
    import torch

    n = max(len(t.token_ids) for t in trajs)
    ids = torch.full((len(trajs), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajs), n), dtype=torch.long)
    policy = torch.zeros((len(trajs), n), dtype=torch.bool)
    info = torch.zeros((len(trajs), n), dtype=torch.bool)
    for i, t in enumerate(trajs):
        L = len(t.token_ids)
        ids[i, :L] = torch.tensor(t.token_ids)
        attn[i, :L] = 1
        policy[i, :L] = torch.tensor(t.policy_mask())
        info[i, :L] = torch.tensor(t.information_mask())
    return ids, attn, policy, info


def loss_weights(trajs, n: int, teacher_query_weight: float):
    """[B, n] per-token weights of the policy loss: 1, and `teacher_query_weight` on the search-query tokens of
    teacher-format demonstrations (`demo_format == "teacher"`); None when the weight is 1."""
    import torch

    if teacher_query_weight == 1.0:
        return None
    w = torch.ones((len(trajs), n))
    for i, t in enumerate(trajs):
        if getattr(t, "demo_format", None) == "teacher":
            q = torch.tensor(t.query_mask())
            w[i, :len(q)][q] = teacher_query_weight
    return w


def demo_loss(model, ids, attn, policy, info, info_weight: float, bf16: bool = False, weights=None):
    """(total loss, policy-token loss): next-token cross-entropy on policy tokens + weighted on passages.
    bf16: the forward pass under CPU/GPU bf16 autocast; the cross-entropy is taken in fp32. `weights` ([B, T],
    `loss_weights`): the policy loss is the weighted mean over policy tokens."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=attn).logits
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(ids.shape[0], -1)
    p, i = policy[:, 1:], info[:, 1:]
    pw = p.float() if weights is None else p * weights[:, 1:]
    policy_loss = (ce * pw).sum() / pw.sum().clamp(min=1)
    if info_weight <= 0:
        return policy_loss, policy_loss
    info_loss = (ce * i).sum() / i.sum().clamp(min=1)
    return policy_loss + info_weight * info_loss, policy_loss


def run_warmstart(cfg: WarmstartConfig, progress: bool = True) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.world.assets import default_bundle
    from nemo_sdsearch.world.generator import build_world, make_questions
    from nemo_sdsearch.world.model_config import qwen2_config
    from nemo_sdsearch.world.tokenizer import train_tokenizer
    from nemo_sdsearch.retrieval import BM25Retriever

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = default_bundle()
    if cfg.init:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.init)
    else:
        tok = train_tokenizer(tokenizer_corpus(bundle, rng), cfg.vocab_size)
    n_questions = cfg.max_questions or cfg.questions_per_world

    def epoch_data(epoch: int):
        """(questions, demo builder) of one epoch's world."""
        if cfg.fresh_worlds:
            world = build_world(cfg.world_seed_base + epoch, exclude_names=bundle.test_world.words)
            questions = make_questions(world, n_questions, cfg.world_seed_base + epoch, f"ws{epoch}")
        else:
            world, questions = bundle.train_world, bundle.train[:n_questions]
        builder = DemoBuilder(tok, BM25Retriever(world.passages), sorted(world.names),
                              teacher_fraction=cfg.teacher_fraction, reference_fraction=cfg.reference_fraction,
                              vague_queries=cfg.vague_queries, hindsight_targets=cfg.hindsight_targets)
        return questions, builder

    if cfg.init:
        model = Qwen2ForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
    else:
        model = Qwen2ForCausalLM(qwen2_config(cfg.model, len(tok), tok.eos_token_id, tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    from tqdm import tqdm

    start, step, epoch, history = time.time(), 0, 0, []
    bar = tqdm(total=cfg.max_steps, desc="warmstart", disable=not progress)
    ema = None
    while step < cfg.max_steps:
        questions, builder = epoch_data(epoch)
        demos = [d for d in (builder.build(q, rng) for q in questions) if d is not None]
        for batch_idx in batches_for_epoch(demos, cfg.batch_size, rng):
            ids, attn, policy, info = collate([demos[j] for j in batch_idx], tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            batch = [demos[j] for j in batch_idx]
            loss, policy_loss = demo_loss(model, ids, attn, policy, info, cfg.info_lm_weight, cfg.bf16,
                                          loss_weights(batch, ids.shape[1], cfg.teacher_query_weight))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            ema = policy_loss.item() if ema is None else 0.95 * ema + 0.05 * policy_loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", epoch=epoch)
            if step % cfg.log_every == 0:
                history.append({"step": step, "loss": ema, "minutes": (time.time() - start) / 60, "epoch": epoch})
            if step % cfg.save_every == 0:
                _save(model, tok, cfg, out, step, history, bundle)
            if step >= cfg.max_steps or (time.time() - start) / 60 > cfg.max_minutes:
                break
        epoch += 1
        if (time.time() - start) / 60 > cfg.max_minutes:
            break
    bar.close()
    return _save(model, tok, cfg, out, step, history, bundle)


def _save(model, tok, cfg: WarmstartConfig, out: Path, step: int, history: list, bundle) -> dict:
    record = {"config": asdict(cfg), "steps": step, "history": history,
              "epochs_started": history[-1]["epoch"] + 1 if history else 0,
              "world": {"train_seed": bundle.train_world.seed, "test_seed": bundle.test_world.seed}}
    # Written as <out>.tmp; it replaces the previous save only once it is complete (and on the disk).
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "warmstart.json").write_text(json.dumps(record, indent=1))
    return record
