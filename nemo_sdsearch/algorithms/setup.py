"""What a training recipe runs on, built from the config: the actor and reference (any backend), the
tokenizer, the questions, the rollout engines (on replica leaders only), the prompt format; and the
data-parallel helpers the recipes share (sharded greedy evaluation). The recipes (grpo.py, search_e1.py,
ablation.py) never branch on the backend: this module and the backends do."""

from __future__ import annotations

import copy
import os

import torch

from nemo_sdsearch.config import TrainConfig


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


def is_rank0(cfg: TrainConfig) -> bool:
    if cfg.actor != "megatron":
        return True
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def build_components(cfg: TrainConfig):
    """(actor, reference scorer or None, tokenizer, questions, rollout engines or None).

    hf: one process; the generator shares the actor's fp32 weights. megatron (under torchrun): the
    process groups come first (a wrong launch fails before anything is loaded); the actor and the frozen
    reference are this rank's megatron-core shards; only a replica leader keeps a generation model and
    engines (the other ranks of the replica receive the leader's trajectories), so no other rank holds
    an unsharded model after setup."""
    from nemo_sdsearch.config import rollout_config
    from nemo_sdsearch.models.hf import HFActor, HFScorer, load_model_and_tokenizer
    from nemo_sdsearch.rollout.engine import RolloutEngine
    from nemo_sdsearch.world.assets import default_model_dir
    from nemo_sdsearch.world.generator import build_bundle
    from retrieval import build_retriever

    megatron = cfg.actor == "megatron"
    device = cfg.model.device
    if megatron:
        from nemo_sdsearch.models.megatron.launch import build_megatron_actor, init_megatron_parallel

        device = init_megatron_parallel(cfg) or device
    torch.set_num_threads(cfg.model.threads)
    torch.manual_seed(cfg.trainer.seed)
    # hf: this model object is the trained one: fp32 master weights (bf16 autocast on CUDA). megatron: it is
    # the source of the shards' weights and, on a replica leader, the generation copy.
    model_dir = cfg.model.path or default_model_dir()
    model, tok = load_model_and_tokenizer(model_dir, device=device, training=not megatron)
    if megatron:
        actor = build_megatron_actor(model, cfg)
        ref = build_megatron_actor(model, cfg, frozen=True) if cfg.grpo.kl_coef > 0 else None
        torch.manual_seed(cfg.trainer.seed)  # building the GPTModels drew from (and reseeded) the CPU RNG
    else:
        ref = None
        if cfg.grpo.kl_coef > 0:
            ref = HFScorer(copy.deepcopy(model).eval().requires_grad_(False))
        actor = HFActor(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
                        grad_clip=cfg.optim.grad_clip)
    data = load_questions(cfg)
    if not actor.is_replica_leader:
        del model  # this rank trains its shards only; the replica leader generates
        return actor, ref, tok, data, None
    if cfg.data.train_files:  # the user's data: the retrieval service holds its corpus
        train_retriever = test_retriever = build_retriever("http", [], url=cfg.cluster.retrieval_url)
    else:
        bundle = build_bundle()
        train_retriever = build_retriever(cfg.rollout.retriever, bundle.train_world.passages,
                                          url=cfg.cluster.retrieval_url)
        test_retriever = build_retriever(cfg.rollout.retriever, bundle.test_world.passages,
                                         url=cfg.cluster.retrieval_url)
    # torch: hf shares the actor's weights (no refit on one device); megatron: the leader's own copy, refitted
    # from the actor's weight stream. trtllm: the engine holds its own weights, refitted in place.
    if cfg.generator == "trtllm":
        from nemo_sdsearch.rollout.trtllm_generator import TRTLLMGenerator

        generator = TRTLLMGenerator(model_dir, tok, tensor_parallel_size=cfg.trtllm.tensor_parallel,
                                    kv_cache_free_gpu_memory_fraction=cfg.trtllm.kv_cache_fraction,
                                    max_seq_len=cfg.rollout.max_context)
    else:
        from nemo_sdsearch.rollout.torch_generator import TorchGenerator

        generator = TorchGenerator(model, tok, max_concurrent_rows=cfg.rollout.max_concurrent_rows)
    norm = cfg.reward.normalization
    sample_cfg = rollout_config(cfg.rollout, normalization=norm)
    greedy_cfg = rollout_config(cfg.rollout, temperature=0.0, normalization=norm)
    student = make_prompt_format(cfg, tok).student
    engines = {"train": RolloutEngine(generator, train_retriever, sample_cfg, prompt_fn=student),
               "dev": RolloutEngine(generator, train_retriever, greedy_cfg, prompt_fn=student),
               "test": RolloutEngine(generator, test_retriever, greedy_cfg, prompt_fn=student)}
    return actor, ref, tok, data, engines


def greedy_em(engine, questions, batch_size: int) -> dict:
    """Greedy EM / F1 / searches per question kind ("all" included) of one engine on `questions`."""
    from nemo_sdsearch.eval.harness import evaluate

    report = evaluate(engine, {"x": questions}, batch_size=batch_size, progress=False)
    return report.by_dataset["x"]


def sharded_greedy_em(actor, engine, questions, batch_size: int) -> dict:
    """`greedy_em` over all `questions`, each data-parallel replica evaluating its share `questions[r::dp]`
    (its leader generates, then shares the result in the replica); the per-kind sums are all-reduced over
    the replicas, so every rank returns the whole result (exactly `greedy_em`'s at dp = 1)."""
    local = None
    if actor.is_replica_leader:
        share = questions[actor.dp_rank::actor.dp_size]
        local = greedy_em(engine, share, batch_size) if share else {}
    local = actor.broadcast_in_replica(local)
    if actor.dp_size == 1:
        return local
    kinds = ["all"] + sorted({q.kind for q in questions if q.kind is not None})
    fields = ("em", "f1", "searches")
    sums = torch.zeros(len(kinds), 1 + len(fields), dtype=torch.float64)
    for i, k in enumerate(kinds):
        if k in local and local[k]["n"]:
            n = local[k]["n"]
            sums[i] = torch.tensor([n] + [local[k][f] * n for f in fields], dtype=torch.float64)
    sums = actor.all_reduce_dp(sums)
    out = {}
    for i, k in enumerate(kinds):
        n = int(round(float(sums[i, 0])))
        if n:
            out[k] = {"n": n, **{f: float(sums[i, 1 + j]) / n for j, f in enumerate(fields)}}
    return out
