"""What a training recipe runs on, built from the config: the actor and reference (any backend), the
tokenizer, the questions, the rollout engines (on replica leaders only), the prompt format; and the
data-parallel helpers the recipes share (sharded greedy evaluation). The recipes (grpo.py, search_e1.py,
ablation.py) never branch on the backend: this module and the backends do."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
from collections import deque
from typing import NamedTuple

import torch

from nemo_sdsearch.config import TrainConfig


def load_questions(cfg: TrainConfig) -> dict:
    """train / dev / test questions: the user's FlashRAG files when given, else the bundled world."""
    from nemo_sdsearch.core.qa import QA, load_split
    from nemo_sdsearch.world.assets import default_bundle

    d = cfg.data
    if d.train_files:
        # FlashRAG jsonl / Search-R1 parquet, several files per split, ids made unique over the split
        train, dev, test = load_split(d.train_files), load_split(d.dev_files), load_split(d.test_files)
    else:
        bundle = default_bundle()
        qa = lambda qs: [QA.from_flashrag(q.to_flashrag()) for q in qs]
        # more test questions than the bundle's 300: drawn on from the same test world and seed (the first
        # 300 are the bundle's own)
        test = bundle.test if (d.test_questions or 0) <= len(bundle.test) else bundle.more_test(d.test_questions)
        train, dev, test = qa(bundle.train), qa(bundle.dev), qa(test)
    return {"train": train[:d.train_questions] if d.train_questions else train,
            "dev": dev[:d.dev_questions] if d.dev_questions else dev,
            "test": test[:d.test_questions] if d.test_questions else test}


def make_prompt_format(cfg: TrainConfig, tok):
    """The student/teacher prompt builder of this run (`prompt.instruction`, `prompt.chat_template`)."""
    from nemo_sdsearch.core.prompts import prompt_format

    return prompt_format(tok, cfg.prompt.instruction, cfg.prompt.chat_template)


def is_rank0(cfg: TrainConfig) -> bool:
    if cfg.actor != "megatron":
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class Components(NamedTuple):
    """What `build_components` gives a recipe."""
    actor: object           # models.base.Actor (this rank's shard on a distributed backend)
    ref: object | None      # the frozen reference scorer of the k3 KL (None: kl_coef = 0)
    tok: object
    data: dict              # train / dev / test questions
    engines: dict | None    # rollout engines "train" / "dev" / "test" (replica leaders only)
    weight_sink: object | None  # what takes the actor's weight stream after an update (`.refit(weights)`), or
                                # None where nothing needs it (the hf actor's generator runs the trained model)
    placement: object | None = None  # the job's Ray placement group (trtllm_placement.JobPlacement) under
                                     # torchrun with generator=trtllm; removed by close_components
    bytes_read: int | None = None    # weight bytes this rank read from the model directory to build its shards
    spread: object | None = None     # trtllm_placement.EngineSpread: engines on every GPU, independent of the
                                     # training layout (generator=trtllm under torchrun); None: one generator
                                     # per replica leader (or one process)


class DrainWeights:
    """The weight sink of a rank that keeps nothing but must take part in the stream's collectives."""

    @staticmethod
    def refit(weights) -> None:
        deque(weights, maxlen=0)


def init_distributed(cfg: TrainConfig) -> None:
    """The process groups of a distributed actor (a no-op for the hf actor); safe to call again."""
    if cfg.actor == "megatron":
        from nemo_sdsearch.models.megatron.launch import init_megatron_parallel

        init_megatron_parallel(cfg)


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def offload_parts(cfg: TrainConfig) -> list[str]:
    """The parts of the trainer's state parked in host memory while the engines generate (`offload.*`)."""
    return [part for part, on in (("optimizer", cfg.offload.optimizer), ("grads", cfg.offload.grads)) if on]


@contextlib.contextmanager
def engine_asleep(c: Components, cfg: TrainConfig, refit=None):
    """The update phase between two generations (GRPO's, OPSD's, a checkpoint's save).

    Enter: the TensorRT-LLM engine sleeps (trtllm.sleep_while_training; trtllm.sleep_level 1 releases its KV
    cache, 2 its weights too) and the trainer's parked state comes back on the device (`offload.*`: Adam's
    moments, the grad buffers, the reference's weights with offload.reference=cpu).
    Exit, in the order that keeps the wake-up's peak low: every rank of the replica returns the update's cached
    allocator blocks to the device (`free_training_memory`); the trainer parks `offload.*` in host memory; the
    engine wakes, so its KV cache (and weights) meet only what generation needs; then `refit()` when given
    (the recipe's weight stream), or after a level-2 sleep the stream into the woken engine, whose weights were
    released."""
    generator = c.engines["train"].generator if c.engines is not None else None
    sleeping = generator is not None and cfg.generator == "trtllm" and cfg.trtllm.sleep_while_training
    level = cfg.trtllm.sleep_level
    ref_on_host = c.ref is not None and cfg.offload.reference == "cpu"
    if sleeping:
        generator.sleep(level=level)
    c.actor.reload()
    if ref_on_host:
        c.ref.reload()
    try:
        yield
    finally:
        parts = offload_parts(cfg)
        if cfg.generator == "trtllm" or parts or ref_on_host:
            free_training_memory(c.actor)
        park_for_generation(cfg, c.actor, c.ref)
        if sleeping:
            generator.wake_up()
        if refit is not None:
            refit()
        elif sleeping and level == 2 and c.weight_sink is not None:
            c.weight_sink.refit(c.actor.iter_weights())


def free_training_memory(actor) -> None:
    """Collective over the replica: every rank empties torch's caching allocator (the update's activations,
    logits and their gradients stay reserved there otherwise), and the leader waits until all have (the engine
    it wakes next allocates on the other ranks' GPUs too)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    actor.gather_in_replica(None)


def start_stage(c: Components, cfg: TrainConfig, lr: float, seed: int) -> None:
    """A new training stage over components built once (Search-E1's GRPO and OPSD rounds): a fresh optimizer at
    `lr`, the frozen reference (the k3 KL's, the OPSD teacher) set to the actor's current weights (what building
    the stage's components from its start weights gave), and the CPU RNG seeded as that build seeded it. It
    touches the whole state, so it runs as an update does (`engine_asleep`): what `offload.*` parks comes back
    for it and is parked again before the engines generate."""
    with engine_asleep(c, cfg):
        c.actor.reset_optimizer(lr)
        if c.ref is not None:
            c.ref.copy_weights_from(c.actor)
    torch.manual_seed(seed)


def close_components(c: Components) -> None:
    """The end of a run's components (collective under torchrun): the generator shut down (TensorRT-LLM
    releases its devices and Ray workers), then, once every engine is down, the job's placement group removed
    by rank 0, which says how many of the job's groups Ray still holds (none)."""
    generator = c.engines["train"].generator if c.engines is not None else None
    if generator is not None:
        generator.shutdown()
    if c.placement is not None:
        barrier()
        left = c.placement.remove(torch.distributed.get_rank())
        if left is not None:
            print(f"placement group {c.placement.name} removed; groups of this job left in Ray: {len(left)}"
                  + (f" ({', '.join(left)})" if left else ""), flush=True)


def build_components(cfg: TrainConfig, with_reference: bool | None = None) -> Components:
    """The actor, reference, tokenizer, questions, rollout engines and weight sink of this rank.

    hf: one process; the generator shares the actor's fp32 weights. megatron (under torchrun): the
    process groups come first (a wrong launch fails before anything is loaded); the actor and the frozen
    reference are this rank's megatron-core shards, read tensor by tensor from the HF directory; only a
    replica leader builds a generator (the other ranks receive its trajectories), and only a leader with the
    torch generator loads a whole model (its generation copy, refitted from the weight stream). So no other
    rank ever holds an unsharded model. generator=trtllm: one engine per replica on the replica's GPUs
    (`rollout/trtllm_placement.py`). `with_reference`: build the frozen reference copy (default: when the
    k3 KL needs it, grpo.kl_coef > 0; Search-E1's full-parameter OPSD uses it as the frozen teacher)."""
    from transformers import AutoTokenizer

    from nemo_sdsearch.models.hf import HFActor, HFScorer, load_model_and_tokenizer
    from nemo_sdsearch.world.assets import default_model_dir

    megatron = cfg.actor == "megatron"
    device = cfg.model.device
    if megatron:
        from nemo_sdsearch.models.megatron.launch import init_megatron_parallel

        device = init_megatron_parallel(cfg) or device
    torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.trainer.seed)
    model_dir = cfg.model.path or default_model_dir()
    data = load_questions(cfg)
    with_reference = cfg.grpo.kl_coef > 0 if with_reference is None else with_reference
    if not megatron:
        # this model object is the trained one: fp32 master weights (bf16 autocast on CUDA)
        model, tok = load_model_and_tokenizer(model_dir, device=device, training=True)
        ref = HFScorer(copy.deepcopy(model).eval().requires_grad_(False)) if with_reference else None
        actor = HFActor(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                        grad_clip=cfg.optim.grad_clip)
        park_for_generation(cfg, actor, ref)
        if cfg.generator == "trtllm":
            generator = _trtllm_engine(cfg, actor, tok, model_dir)
            return Components(actor, ref, tok, data, _engines(cfg, generator, tok), generator)
        return Components(actor, ref, tok, data, _engines(cfg, _torch_generator(cfg, model, tok), tok), None)

    from nemo_sdsearch.models.megatron.launch import build_megatron_actor, hf_tensor_reader

    hf_config, read = hf_tensor_reader(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    actor = build_megatron_actor(hf_config, read, cfg)
    ref = build_megatron_actor(hf_config, read, cfg, frozen=True) if with_reference else None
    bytes_read = read.bytes_read
    del read
    park_for_generation(cfg, actor, ref)  # before the engine reserves its KV cache from the free memory
    torch.manual_seed(cfg.trainer.seed)  # building the GPTModels drew from (and reseeded) the CPU RNG
    placement = spread = None
    if cfg.generator == "trtllm":
        generator, sink, placement, spread = _trtllm_engines(cfg, actor, tok, model_dir)
    elif actor.is_replica_leader:
        model, _ = load_model_and_tokenizer(model_dir, device=device)  # the replica's generation copy
        generator = sink = _torch_generator(cfg, model, tok)
    else:
        generator, sink = None, DrainWeights()
    engines = _engines(cfg, generator, tok) if generator is not None else None
    return Components(actor, ref, tok, data, engines, sink, placement, bytes_read, spread)


def park_for_generation(cfg: TrainConfig, actor, ref) -> None:
    """What `offload.*` keeps in host memory while the engines generate, parked (every update brings it back and
    parks it again: `engine_asleep`)."""
    actor.offload(offload_parts(cfg))
    if ref is not None and cfg.offload.reference == "cpu":
        ref.offload(["params"])


def _torch_generator(cfg: TrainConfig, model, tok):
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator

    return TorchGenerator(model, tok, max_concurrent_rows=cfg.rollout.max_concurrent_rows)


def _trtllm_engine(cfg: TrainConfig, actor, tok, model_dir, placement=None):
    """A TensorRT-LLM engine over `model_dir` sized for the rollouts: a turn's prompt is a row's whole context,
    so max_seq_len, max_input_len and max_num_tokens all cover rollout.max_context."""
    from nemo_sdsearch.rollout.trtllm_generator import TRTLLMGenerator

    ctx = cfg.rollout.max_context
    return TRTLLMGenerator(model_dir, tok, tensor_parallel_size=cfg.trtllm.tensor_parallel,
                           kv_cache_free_gpu_memory_fraction=cfg.trtllm.kv_cache_fraction, max_seq_len=ctx,
                           max_input_len=ctx, max_num_tokens=max(ctx, 8192), placement=placement,
                           streaming=cfg.trtllm.streaming)


def _trtllm_engines(cfg: TrainConfig, actor, tok, model_dir):
    """(this rank's engine or None, this rank's weight sink, the job's placement or None, the job's `EngineSpread`
    or None) under torchrun with TensorRT-LLM engines on every GPU (collective over the world: every rank reports
    its device, rank 0 creates the job's placement group, every block's driver builds its engine; see
    rollout/trtllm_placement.py)."""
    from nemo_sdsearch.rollout import trtllm_placement as tp

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        generator = _trtllm_engine(cfg, actor, tok, model_dir)
        return generator, generator, None, None
    world, rank = dist.get_world_size(), dist.get_rank()
    slots = [None] * world
    dist.all_gather_object(slots, tp.local_device_slot())
    name = [f"sdsearch-{os.environ.get('SLURM_JOB_ID', 'job')}-{os.getpid()}"]
    dist.broadcast_object_list(name, src=0)  # rank 0's: one placement group for the job
    placement = tp.JobPlacement(name[0])
    blocks = tp.engine_blocks(world, cfg.trtllm.tensor_parallel)
    groups = [dist.new_group(b, backend="gloo") for b in blocks]   # every rank creates every group, in order
    everyone = dist.new_group(list(range(world)), backend="gloo")
    e = rank // cfg.trtllm.tensor_parallel
    block, group = blocks[e], groups[e]
    engine_place = placement.plan(slots, block, rank, dist.barrier)
    generator = _trtllm_engine(cfg, actor, tok, model_dir, engine_place) if engine_place is not None else None
    if generator is not None:
        print(f"engine {e} (ranks {block[0]}-{block[-1]}): TensorRT-LLM workers on {', '.join(generator.engine_uuids())} "
              f"(placement bundles {engine_place.bundle_indices} of {placement.name})", flush=True)
    info = [(engine_place.expected_uuids, generator.refit_bucket_bytes, generator.weight_dtype)
            if generator is not None else None]
    dist.broadcast_object_list(info, src=block[0], group=group)

    def gather(obj):
        out = [None] * len(block) if rank == block[0] else None
        dist.gather_object(obj, out, dst=block[0], group=group)
        return out

    sink = tp.ReplicaRefit(slots[rank].uuid, *info[0], gather=gather, release=lambda: dist.barrier(group=group),
                           rpc=generator.collective_rpc if generator is not None else None)
    if generator is not None:
        generator.replica = sink
    spread = tp.EngineSpread(e if rank == block[0] else None, len(blocks), [b[0] for b in blocks], everyone)
    return generator, sink, placement, spread


def retrievers(cfg: TrainConfig) -> tuple:
    """(train and dev retriever, test retriever) of a run: the retrieval service over the user's corpus when
    the questions come from files, else `rollout.retriever` over the bundled world's train / test passages."""
    from nemo_sdsearch.retrieval import build_retriever
    from nemo_sdsearch.world.assets import default_bundle

    if cfg.data.train_files:  # the user's data: the retrieval service holds its corpus
        service = build_retriever("http", [], url=cfg.cluster.retrieval_url)
        return service, service
    bundle = default_bundle()
    return (build_retriever(cfg.rollout.retriever, bundle.train_world.passages, url=cfg.cluster.retrieval_url),
            build_retriever(cfg.rollout.retriever, bundle.test_world.passages, url=cfg.cluster.retrieval_url))


def _engines(cfg: TrainConfig, generator, tok) -> dict:
    """The train (sampling), dev and test (greedy) rollout engines over one generator."""
    from nemo_sdsearch.config import rollout_config
    from nemo_sdsearch.rollout.engine import RolloutEngine

    train_retriever, test_retriever = retrievers(cfg)
    sample_cfg, greedy_cfg = rollout_config(cfg), rollout_config(cfg, greedy=True)
    student = make_prompt_format(cfg, tok).student
    return {"train": RolloutEngine(generator, train_retriever, sample_cfg, prompt_fn=student),
            "dev": RolloutEngine(generator, train_retriever, greedy_cfg, prompt_fn=student),
            "test": RolloutEngine(generator, test_retriever, greedy_cfg, prompt_fn=student)}


def greedy_em(engine, questions, batch_size: int) -> dict:
    """Greedy EM / F1 / searches per question kind ("all" included) of one engine on `questions`, and the
    query-level metrics where the questions record evidence passages (`eval.harness.Score.mean`)."""
    from nemo_sdsearch.eval.harness import Score

    return {k: Score.from_sums(s).mean() for k, s in greedy_sums(engine, questions, batch_size).items()}


def greedy_sums(engine, questions, batch_size: int, by_source: bool = False) -> dict[str, list[float]]:
    """`greedy_em` as the sums behind it, per kind (and per data_source: `by_source`; `eval.harness.Score.sums`):
    shards add up."""
    from nemo_sdsearch.eval.harness import evaluate

    report = evaluate(engine, {"x": questions}, batch_size=batch_size, progress=False, by_source=by_source)
    return report.sums["x"]


def sharded_greedy_em(actor, engine, questions, batch_size: int, by_source: bool = False, spread=None) -> dict:
    """`greedy_em` over all `questions`, each data-parallel replica evaluating its share `questions[r::dp]`
    (its leader generates, then shares the result in the replica), or with `spread` (engines on every GPU) each
    engine every e-th question; the per-kind sums are all-reduced, so every rank returns the whole result
    (exactly `greedy_em`'s at dp = 1)."""
    from nemo_sdsearch.eval.harness import SOURCE, Score, data_source

    if spread is not None:   # the job's engines (trtllm_placement.EngineSpread): engine e evaluates every e-th
        share = spread.share(questions)
        local = greedy_sums(engine, share, batch_size, by_source) if share else {}
        reduce = spread.all_reduce
    else:
        local = None
        if actor.is_replica_leader:
            share = questions[actor.dp_rank::actor.dp_size]
            local = greedy_sums(engine, share, batch_size, by_source) if share else {}
        local = actor.broadcast_in_replica(local)
        if actor.dp_size == 1:
            return {k: Score.from_sums(s).mean() for k, s in local.items()}
        reduce = actor.all_reduce_dp
    kinds = ["all"] + sorted({q.kind for q in questions if q.kind is not None})
    kinds += sorted({SOURCE + data_source(q) for q in questions}) if by_source else []
    sums = torch.zeros(len(kinds), len(Score.SUMS), dtype=torch.float64)  # n, em, f1, ... summed (Score.SUMS)
    for i, k in enumerate(kinds):
        if k in local:
            sums[i] = torch.tensor(local[k], dtype=torch.float64)
    sums = reduce(sums)
    out = {}
    for i, k in enumerate(kinds):
        if int(round(float(sums[i, 0]))):
            out[k] = Score.from_sums(sums[i].tolist()).mean()
    return out
