"""Typed training configuration. The YAML files in `conf/` document every key; this schema checks them:
an unknown key or a value of the wrong type fails at start with a message naming the key, and
`validate` checks ranges and choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from nemo_sdsearch.errors import ConfigError  # callers may also import it from here
from nemo_sdsearch.rollout.engine import RolloutConfig


@dataclass
class ModelConfig:
    path: Optional[str] = None  # None: the embedded tiny model
    device: Optional[str] = None
    threads: int = 2


@dataclass
class DataConfig:
    train_questions: Optional[int] = None
    dev_questions: int = 60
    test_questions: Optional[int] = None
    train_files: list = field(default_factory=list)  # FlashRAG jsonl files; empty = the bundled world
    dev_files: list = field(default_factory=list)
    test_files: list = field(default_factory=list)


@dataclass
class RolloutSection:
    """The rollout engine's settings and the run's sampling around them. The keys the engine has take its
    defaults (`rollout/engine.py`'s RolloutConfig: one source, so the two cannot disagree); `rollout_config`
    builds the engine's RolloutConfig from this section."""
    group_size: int = 5
    temperature: float = RolloutConfig.temperature
    top_p: float = RolloutConfig.top_p
    max_turns: int = RolloutConfig.max_turns
    max_new_tokens: int = RolloutConfig.max_new_tokens
    max_context: int = RolloutConfig.max_context
    topk: int = RolloutConfig.topk
    retriever: str = "bm25"
    max_concurrent_rows: int = 256      # torch generator: rows holding a KV slot at once (0 = all)


@dataclass
class PromptSection:
    instruction: str = "default"     # default (our wording; the embedded model) | search_r1 (verbatim)
    chat_template: str = "auto"      # auto: the tokenizer's chat template when it has one | none


@dataclass
class RewardSection:
    normalization: str = RolloutConfig.normalization  # squad (SQuAD / Search-R1 normalize_answer) | unicode (lenient)


def rollout_config(cfg: TrainConfig, greedy: bool = False) -> RolloutConfig:
    """The engine's RolloutConfig of a run, the one place it is built from the config: the `rollout` section's
    settings and `reward.normalization`; `greedy` (evaluation): temperature 0, no nucleus cut."""
    r = cfg.rollout
    return RolloutConfig(max_turns=r.max_turns, max_new_tokens=r.max_new_tokens, max_context=r.max_context,
                         topk=r.topk, temperature=0.0 if greedy else r.temperature, top_p=1.0 if greedy else r.top_p,
                         normalization=cfg.reward.normalization)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.0   # linear warm-up over this fraction of trainer.steps (Search-R1: 0.285); 0 = none


@dataclass
class GRPOSection:
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    reduction: str = "token"
    micro_batch_size: int = 8
    mini_batches: int = 1
    adv_eps: float = 1e-6
    kl_clamp: Optional[float] = 10.0   # clamp of the per-token k3 KL (verl's low_var_kl); null = none


@dataclass
class SDSection:
    coef: float = 1.0
    beta: float = 0.5
    temperature: float = 1.0
    chunk_rows: int = 64
    compile: bool = False
    include_answers: bool = False
    include_gold: bool = False
    max_hindsight_tokens: int = 256
    hindsight_members: str = "group"   # group: every attempt, the rollout's own included; others: its own left out
    hindsight_source: str = "own"      # own: its question's block; other_question: the next question's (placebo)
    hindsight_order: str = "outcome"   # outcome: correct attempts listed first; group: in group order (position
                                       # says nothing about the outcome: only the labels do)


@dataclass
class SearchE1Section:
    cycles: int = 2                      # (GRPO round, pool, pairs, OPSD round) cycles
    grpo_steps: int = 15
    pool_questions: int = 48
    pool_samples: int = 5
    opsd_steps: int = 20
    opsd_pairs_per_step: int = 8
    opsd_micro_batch_size: int = 4
    opsd_lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    tau_clip: float = 10.0
    opsd_eval_every: int = 5
    reference_information: bool = True
    max_reference_tokens: int = 384
    loss_normalization: str = "trajectory"  # trajectory (paper eq. 7) | token
    adapter: str = "lora"                # lora (the paper; actor=hf) | full (full-parameter OPSD, any actor)


@dataclass
class TrainerSection:
    steps: int = 40
    questions_per_step: int = 8
    eval_every: int = 10
    save_every: int = 10
    seed: int = 0
    out_dir: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    final_test_eval: bool = True
    eval_batch_size: int = 50
    keep_last: int = 3                   # training checkpoints kept (the newest); 0 = keep all
    keep_best: bool = True               # also keep the saved step with the best dev EM
    min_free_disk_checkpoints: float = 1.0  # refuse to start unless the disk holds this many more checkpoints
    step_time_s: Optional[float] = None  # estimate of one step's wall time (null: unknown); with checkpoint_time_s
                                         # checked at start against the job's end-of-allocation signal lead
    checkpoint_time_s: Optional[float] = None  # estimate of writing one training checkpoint
    sigterm_grace_s: float = 20.0        # SIGTERM this close to a step's end checkpoints it; earlier: exit at once


@dataclass
class ArchSection:
    """Architecture facts used to check the parallel layout and estimate memory before any GPU is
    touched (the HF config of model.path is authoritative at run time; these must agree with it).
    0 = unknown: the layout checks that need the value are skipped."""
    hidden_size: int = 0
    num_layers: int = 0
    num_attention_heads: int = 0
    num_kv_heads: int = 0
    ffn_hidden_size: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = True
    max_position_embeddings: int = 0   # 0 = read from model.path's config.json when it is on this machine


@dataclass
class MegatronSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True   # shard optimizer states over data-parallel ranks (GPU only)
    activation_checkpointing: bool = False
    dtype: str = "auto"                  # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    make_vocab_size_divisible_by: int = 128
    teacher_window: int = 4              # pp > 1: micro-batches per pipeline schedule when a teacher pass is needed
                                         # (one forward-only teacher schedule + one training schedule per window)
    dist_timeout_minutes: Optional[float] = None  # collective timeout; null: $SDSEARCH_DIST_TIMEOUT_MINUTES, else 30


@dataclass
class TRTLLMSection:
    tensor_parallel: int = 1
    kv_cache_fraction: float = 0.35      # of free GPU memory, for the generation KV cache
    sleep_while_training: bool = True    # release generation memory during the update
    sleep_level: int = 1                 # 1: the update releases the KV cache; 2: the engine's weights too (each
                                         # wake-up is followed by a refit)
    streaming: bool = False              # watch every token of a turn (our stop check, early abort) instead of
                                         # TensorRT-LLM's stop words and a cut after the turn (same tokens)


@dataclass
class OffloadSection:
    """What leaves the trainer's GPUs while the engines generate (models/offload.py): parked in host memory
    after each update, before the engine wakes, and back on the device when the next update starts."""
    optimizer: bool = False              # Adam's moments (and Megatron's fp32 main weights)
    grads: bool = False                  # the gradient buffers (Megatron's DDP keeps them; released, not copied)
    reference: str = "resident"          # resident | cpu: the frozen reference's weights in host memory outside
                                         # the update (the k3 KL's, Search-E1's full-parameter OPSD teacher)


@dataclass
class ClusterSection:
    nodes: int = 1
    gpus_per_node: int = 0               # 0: CPU run
    gpu_memory_gib: float = 80.0
    memory_headroom: float = 0.9         # fraction of GPU memory the estimate may use
    retrieval_url: Optional[str] = None  # a running retrieval service; null = in-process retriever


@dataclass
class LoggerSection:
    """Where the metrics of `sdsearch train` go besides metrics.jsonl (always written); names in
    nemo_sdsearch/logger.py, documented in the README's Metrics section."""
    backends: list = field(default_factory=lambda: ["console", "tensorboard"])  # of console, tensorboard, wandb, mlflow
    project: str = "nemo_sdsearch"       # W&B project / MLflow experiment
    run_name: Optional[str] = None       # null: trainer.out_dir
    wandb_mode: str = "auto"             # auto (WANDB_MODE, else online) | online | offline | disabled
    mlflow_tracking_uri: Optional[str] = None  # null: MLFLOW_TRACKING_URI, else a file store in <out_dir>/mlruns


@dataclass
class TrainConfig:
    algorithm: str = "sd_search"
    actor: str = "hf"                    # hf | megatron
    generator: str = "torch"             # torch | trtllm
    model: ModelConfig = field(default_factory=ModelConfig)
    arch: ArchSection = field(default_factory=ArchSection)
    megatron: MegatronSection = field(default_factory=MegatronSection)
    trtllm: TRTLLMSection = field(default_factory=TRTLLMSection)
    offload: OffloadSection = field(default_factory=OffloadSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptSection = field(default_factory=PromptSection)
    reward: RewardSection = field(default_factory=RewardSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    sd: SDSection = field(default_factory=SDSection)
    search_e1: SearchE1Section = field(default_factory=SearchE1Section)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    logger: LoggerSection = field(default_factory=LoggerSection)


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key}: {msg}")


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric key: lo / hi bounds (None: unbounded), open or closed, and
    whether null is allowed; `why` is added to the error message."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False
    why: str = ""

    def holds(self, v) -> bool:
        if v is None:
            return self.null
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # NaN is out of every range
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"must be in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"must be {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"must be {'<' if self.hi_open else '<='} {self.hi:g}"
        return text + (" or null" if self.null else "") + (f" ({self.why})" if self.why else "")


_POS, _NONNEG, _ONE = Range(0, lo_open=True), Range(0), Range(1)
_PROB = Range(0, 1)
# Every numeric key of the schema and its range (tests/test_config_ranges.py checks that none is missing).
RANGES: dict[str, Range] = {
    "model.threads": _ONE,
    "data.train_questions": Range(1, null=True),
    "data.dev_questions": Range(0, why="0 = all dev questions"),
    "data.test_questions": Range(1, null=True),
    "rollout.group_size": Range(2, why="GRPO needs at least 2 rollouts per question"),
    "rollout.temperature": Range(0, lo_open=True, why="training rollouts must sample"),
    "rollout.top_p": Range(0, 1, lo_open=True),
    "rollout.max_turns": _NONNEG,
    "rollout.max_new_tokens": _ONE,
    "rollout.max_context": Range(2),
    "rollout.topk": _ONE,
    "rollout.max_concurrent_rows": Range(0, why="0 = one KV slot per rollout"),
    "optim.lr": _POS,
    "optim.weight_decay": _NONNEG,
    "optim.grad_clip": Range(0, why="the max global gradient norm; 0 = no clipping"),
    "optim.betas": Range(0, 1, hi_open=True, why="each of the two Adam betas"),
    "optim.warmup_ratio": Range(0, 1, why="the fraction of trainer.steps the learning rate warms up over"),
    "grpo.clip_eps": Range(0, 1, lo_open=True, hi_open=True),
    "grpo.kl_coef": _NONNEG,
    "grpo.micro_batch_size": _ONE,
    "grpo.mini_batches": _ONE,
    "grpo.adv_eps": Range(0, lo_open=True, why="a group of equal rewards would divide 0 by 0"),
    "grpo.kl_clamp": Range(0, lo_open=True, null=True),
    "sd.coef": _NONNEG,
    "sd.beta": Range(0, 1, why="the JSD mixture weight"),
    "sd.temperature": _POS,
    "sd.chunk_rows": _ONE,
    "sd.max_hindsight_tokens": _ONE,
    "search_e1.cycles": _ONE,
    "search_e1.grpo_steps": _ONE,
    "search_e1.pool_questions": _ONE,
    "search_e1.pool_samples": Range(2, why="pair mining needs at least 2 rollouts per question"),
    "search_e1.opsd_steps": _NONNEG,
    "search_e1.opsd_pairs_per_step": _ONE,
    "search_e1.opsd_micro_batch_size": _ONE,
    "search_e1.opsd_lr": _POS,
    "search_e1.lora_r": _ONE,
    "search_e1.lora_alpha": _POS,
    "search_e1.tau_clip": _POS,
    "search_e1.opsd_eval_every": Range(0, why="0 = never"),
    "search_e1.max_reference_tokens": _ONE,
    "trainer.steps": _ONE,
    "trainer.questions_per_step": _ONE,
    "trainer.eval_every": Range(0, why="0 = never"),
    "trainer.save_every": Range(0, why="0 = never"),
    "trainer.seed": _NONNEG,
    "trainer.eval_batch_size": _ONE,
    "trainer.keep_last": Range(0, why="0 = keep all"),
    "trainer.min_free_disk_checkpoints": Range(0, why="0 = no disk check"),
    "trainer.step_time_s": Range(0, lo_open=True, null=True, why="null = unknown"),
    "trainer.checkpoint_time_s": Range(0, null=True, why="null = unknown"),
    "trainer.sigterm_grace_s": _NONNEG,
    "arch.hidden_size": Range(0, why="0 = unknown"),
    "arch.num_layers": Range(0, why="0 = unknown"),
    "arch.num_attention_heads": Range(0, why="0 = unknown"),
    "arch.num_kv_heads": Range(0, why="0 = unknown"),
    "arch.ffn_hidden_size": Range(0, why="0 = unknown"),
    "arch.vocab_size": Range(0, why="0 = unknown"),
    "arch.max_position_embeddings": Range(0, why="0 = from model.path's config.json"),
    "megatron.tensor_parallel": _ONE,
    "megatron.pipeline_parallel": _ONE,
    "megatron.make_vocab_size_divisible_by": _ONE,
    "megatron.teacher_window": _ONE,
    "megatron.dist_timeout_minutes": Range(0, lo_open=True, null=True, why="null = $SDSEARCH_DIST_TIMEOUT_MINUTES or 30"),
    "trtllm.tensor_parallel": _ONE,
    "trtllm.kv_cache_fraction": Range(0, 1, lo_open=True),
    "trtllm.sleep_level": Range(1, 2, why="1: the KV cache; 2: the weights as well"),
    "cluster.nodes": _ONE,
    "cluster.gpus_per_node": Range(0, why="0 = a CPU run"),
    "cluster.gpu_memory_gib": _POS,
    "cluster.memory_headroom": Range(0, 1, lo_open=True),
}

# Every string key with a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ("grpo", "sd_search", "search_e1"),
    "actor": ("hf", "megatron"),
    "generator": ("torch", "trtllm"),
    "prompt.instruction": ("default", "search_r1"),
    "prompt.chat_template": ("auto", "none"),
    "reward.normalization": ("squad", "unicode"),
    "rollout.retriever": ("bm25", "dense", "http"),
    "grpo.reduction": ("token", "sequence"),
    "sd.hindsight_members": ("group", "others"),
    "sd.hindsight_order": ("outcome", "group"),
    "sd.hindsight_source": ("own", "other_question"),
    "search_e1.loss_normalization": ("trajectory", "token"),
    "search_e1.adapter": ("lora", "full"),
    "megatron.dtype": ("auto", "bf16", "fp32"),
    "offload.reference": ("resident", "cpu"),
    "logger.backends": ("console", "tensorboard", "wandb", "mlflow"),   # each entry of the list
    "logger.wandb_mode": ("auto", "online", "offline", "disabled"),
}


# Keys that moved: the old spelling (an override or a YAML key) is refused, naming where the key lives now.
MOVED: dict[str, str] = {
    "cycles": "search_e1.cycles",
}


def _refuse_moved_overrides(overrides) -> None:
    """A Hydra override (`key=value`, `+key=value`, `++key=value`, `~key`) of a moved key fails here, naming
    the new key (Hydra alone would say only that it "could not override" it)."""
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~").strip()
        if key in MOVED:
            raise ConfigError(f"config key {key}: moved to {MOVED[key]}; write the override as "
                              f"{MOVED[key]}={value or '...'}")


def _refuse_moved_keys(raw, name: str) -> None:
    """A composed YAML config that still sets a moved key fails here, naming the new key."""
    for key, new in MOVED.items():
        if _has_key(raw, key):
            section, _, leaf = new.rpartition(".")
            raise ConfigError(f"config key {key} (config {name!r}): moved to {new}; put `{leaf}:` under "
                              f"`{section}:`")


def _has_key(node, key: str) -> bool:
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def get_key(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig, check_memory: bool = True) -> TrainConfig:
    for key, allowed in RANGES.items():
        value = get_key(cfg, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        _require(all(allowed.holds(v) for v in values), key, f"{allowed.describe()}, got {value!r}")
    _require(len(cfg.optim.betas) == 2, "optim.betas", f"must be two numbers, got {cfg.optim.betas!r}")
    for key, options in CHOICES.items():
        value = get_key(cfg, key)
        values = value if isinstance(value, (list, tuple)) else [value]
        _require(all(v in options for v in values), key, f"must be one of {', '.join(options)}, got {value!r}")
    _require(not (cfg.trainer.resume and cfg.trainer.overwrite), "trainer.overwrite",
             "cannot be combined with trainer.resume=true (resume continues the run that overwrite deletes)")
    r = cfg.rollout
    _require(r.retriever != "http" or bool(cfg.cluster.retrieval_url), "cluster.retrieval_url",
             "rollout.retriever=http needs the retrieval service URL")
    _require(r.max_context > r.max_new_tokens, "rollout.max_context", "must exceed rollout.max_new_tokens")
    _require(cfg.actor == "hf" or cfg.algorithm != "search_e1" or cfg.search_e1.adapter == "full",
             "search_e1.adapter", "actor=megatron has no LoRA: use search_e1.adapter=full (full-parameter OPSD "
             "against the frozen copy of the round's start weights)")
    _require(cfg.sd.hindsight_source == "own" or cfg.trainer.questions_per_step >= 2, "sd.hindsight_source",
             "other_question (the placebo) needs trainer.questions_per_step >= 2: a rollout reads another question's "
             "block from the same step")
    _require(cfg.trainer.questions_per_step % cfg.grpo.mini_batches == 0, "trainer.questions_per_step",
             "must be a multiple of grpo.mini_batches")
    _require(cfg.trtllm.sleep_level == 1 or cfg.trtllm.sleep_while_training, "trtllm.sleep_level",
             "2 releases the engine's weights during the update: it needs trtllm.sleep_while_training=true")
    _check_positions(cfg)
    d = cfg.data
    _require(bool(d.train_files) == bool(d.dev_files) == bool(d.test_files), "data.train_files",
             "give train_files, dev_files and test_files together (or none: the bundled world)")
    _require(cfg.algorithm != "search_e1" or not set(map(_file_key, d.dev_files)) & set(map(_file_key, d.test_files)),
             "data.test_files", "Search-E1 keeps the OPSD step with the best dev EM: the dev files are its selection "
             "set and must not also be the test files (the reported test EM would include what selected it)")
    _require(not d.train_files or r.retriever == "http", "rollout.retriever",
             "questions from files need the retrieval service over their corpus (rollout.retriever=http)")
    from nemo_sdsearch.layout import check_layout

    check_layout(cfg, memory=check_memory)
    return cfg


def _file_key(path) -> str:
    """A question file as a comparable key (the same file named two ways is one)."""
    return str(Path(path).expanduser().resolve())


class ConfigWarning(UserWarning):
    """A setting that runs, but not as a user would assume (said once at config time)."""


def model_max_positions(cfg: TrainConfig) -> int | None:
    """The model's `max_position_embeddings`: `arch.max_position_embeddings`, else model.path's config.json (the
    embedded model's when model.path is null) when it is on this machine; None when unknown."""
    import json

    if cfg.arch.max_position_embeddings:
        return cfg.arch.max_position_embeddings
    if cfg.model.path:
        directory = Path(cfg.model.path)
    else:
        from nemo_sdsearch.world.assets import DEFAULT_MODEL_DIR

        directory = DEFAULT_MODEL_DIR
    try:
        return int(json.loads((directory / "config.json").read_text())["max_position_embeddings"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_positions(cfg: TrainConfig) -> None:
    """The longest sequences the budgets allow against the model's positions: a rollout (rollout.max_context)
    must fit (an error); a teacher sequence may not (a warning: an SD-Search rollout whose teacher sequence passes
    the model's positions gets no JSD term, counted as `sd/teacher_too_long`; such a Search-E1 pair is left out of
    its OPSD round)."""
    import warnings

    positions = model_max_positions(cfg)
    if not positions:
        return
    r = cfg.rollout
    _require(r.max_context <= positions, "rollout.max_context",
             f"{r.max_context} exceeds the model's {positions} positions (max_position_embeddings): rollouts would "
             "run past what the model was trained for")
    if cfg.algorithm == "sd_search" and r.max_context + cfg.sd.max_hindsight_tokens > positions:
        warnings.warn(f"SD-Search's teacher sequence (a rollout, up to rollout.max_context={r.max_context} tokens, "
                      f"plus a hindsight block of up to sd.max_hindsight_tokens={cfg.sd.max_hindsight_tokens}) can "
                      f"pass the model's {positions} positions: a rollout whose teacher sequence does gets no JSD "
                      "term (its share: sd/teacher_too_long)", ConfigWarning, stacklevel=3)
    if cfg.algorithm == "search_e1" and r.max_context + cfg.search_e1.max_reference_tokens > positions:
        warnings.warn(f"Search-E1's teacher sequence (a rollout, up to rollout.max_context={r.max_context} tokens, "
                      "plus a reference of up to search_e1.max_reference_tokens="
                      f"{cfg.search_e1.max_reference_tokens}) can pass the model's {positions} positions: an OPSD "
                      "pair whose teacher sequence does is left out of its round", ConfigWarning, stacklevel=3)


def config_dir() -> Path:
    """The shipped YAML configs: nemo_sdsearch/conf in an installed wheel, the repository's conf/ in a checkout
    (and an editable install); pyproject.toml maps one to the other."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return installed if installed.is_dir() else here.parent / "conf"


def load_config(name: str = "tiny_cpu", overrides: list[str] | None = None, directory: str | None = None,
                check_memory: bool = True) -> TrainConfig:
    """Compose `conf/<name>.yaml` with Hydra override syntax (`key=value`), check it against the schema (and,
    unless `check_memory` is off, against the per-GPU memory estimate: `sdsearch layout` reports it instead)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    directory = str(Path(directory or config_dir()).resolve())
    if not Path(directory, f"{name}.yaml").exists():
        raise ConfigError(f"no config {name!r} in {directory}")
    _refuse_moved_overrides(overrides or [])
    try:
        with initialize_config_dir(config_dir=directory, version_base=None):
            raw = compose(config_name=name, overrides=list(overrides or []))
        _refuse_moved_keys(raw, name)
        schema = OmegaConf.structured(TrainConfig)
        merged = OmegaConf.merge(schema, raw)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_first_line(e)) from None
    cfg: TrainConfig = OmegaConf.to_object(merged)
    return validate(cfg, check_memory)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`cfg` with `key=value` overrides (dot list), checked against the schema and validated as a loaded
    config is (an ablation arm's settings on top of the study's config)."""
    from omegaconf.errors import OmegaConfBaseException

    _refuse_moved_overrides(overrides)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e)) from None
    return validate(OmegaConf.to_object(merged))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"config key {key}: {line}" if key else line


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
