"""Typed training configuration. The YAML files in `conf/` document every key; this schema checks them:
an unknown key or a value of the wrong type fails at start with a message naming the key, and
`validate` checks ranges and choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf


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
    group_size: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 4
    max_new_tokens: int = 96
    max_context: int = 1024
    topk: int = 3
    retriever: str = "bm25"


@dataclass
class PromptSection:
    instruction: str = "default"     # default (our wording; the embedded model) | search_r1 (verbatim)
    chat_template: str = "auto"      # auto: the tokenizer's chat template when it has one | none


@dataclass
class RewardSection:
    normalization: str = "squad"     # squad (SQuAD / Search-R1 normalize_answer) | unicode (lenient)


def rollout_config(r: RolloutSection, temperature: float | None = None, normalization: str = "squad"):
    """The engine's RolloutConfig from the `rollout` section (temperature 0 = greedy evaluation)."""
    from nemo_sdsearch.rollout.engine import RolloutConfig

    return RolloutConfig(max_turns=r.max_turns, max_new_tokens=r.max_new_tokens, max_context=r.max_context,
                         topk=r.topk, temperature=r.temperature if temperature is None else temperature,
                         top_p=r.top_p if temperature is None else 1.0, normalization=normalization)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])


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


@dataclass
class SearchE1Section:
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


@dataclass
class MegatronSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True   # shard optimizer states over data-parallel ranks (GPU only)
    activation_checkpointing: bool = False
    dtype: str = "auto"                  # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    make_vocab_size_divisible_by: int = 128


@dataclass
class TRTLLMSection:
    tensor_parallel: int = 1
    kv_cache_fraction: float = 0.35      # of free GPU memory, for the generation KV cache
    sleep_while_training: bool = True    # release generation memory during the update


@dataclass
class ClusterSection:
    nodes: int = 1
    gpus_per_node: int = 0               # 0: CPU run
    gpu_memory_gib: float = 80.0
    memory_headroom: float = 0.9         # fraction of GPU memory the estimate may use
    retrieval_url: Optional[str] = None  # a running retrieval service; null = in-process retriever


@dataclass
class TrainConfig:
    algorithm: str = "sd_search"
    actor: str = "hf"                    # hf | megatron
    generator: str = "torch"             # torch | trtllm
    model: ModelConfig = field(default_factory=ModelConfig)
    arch: ArchSection = field(default_factory=ArchSection)
    megatron: MegatronSection = field(default_factory=MegatronSection)
    trtllm: TRTLLMSection = field(default_factory=TRTLLMSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptSection = field(default_factory=PromptSection)
    reward: RewardSection = field(default_factory=RewardSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    sd: SDSection = field(default_factory=SDSection)
    search_e1: SearchE1Section = field(default_factory=SearchE1Section)
    cycles: int = 2
    trainer: TrainerSection = field(default_factory=TrainerSection)


class ConfigError(ValueError):
    pass


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key}: {msg}")


def validate(cfg: TrainConfig) -> TrainConfig:
    _require(cfg.algorithm in ("grpo", "sd_search", "search_e1"), "algorithm",
             f"must be grpo, sd_search or search_e1, got {cfg.algorithm!r}")
    _require(cfg.cycles >= 1, "cycles", "must be >= 1")
    e1 = cfg.search_e1
    _require(e1.pool_samples >= 2, "search_e1.pool_samples", "pair mining needs at least 2 rollouts per question")
    _require(e1.tau_clip > 0, "search_e1.tau_clip", "must be > 0")
    _require(e1.lora_r >= 1, "search_e1.lora_r", "must be >= 1")
    _require(e1.loss_normalization in ("trajectory", "token"), "search_e1.loss_normalization",
             f"must be trajectory or token, got {e1.loss_normalization!r}")
    _require(cfg.prompt.instruction in ("default", "search_r1"), "prompt.instruction",
             f"must be default or search_r1, got {cfg.prompt.instruction!r}")
    _require(cfg.prompt.chat_template in ("auto", "none"), "prompt.chat_template",
             f"must be auto or none, got {cfg.prompt.chat_template!r}")
    _require(cfg.reward.normalization in ("squad", "unicode"), "reward.normalization",
             f"must be squad or unicode, got {cfg.reward.normalization!r}")
    _require(cfg.grpo.kl_clamp is None or cfg.grpo.kl_clamp > 0, "grpo.kl_clamp", "must be > 0 or null")
    _require(not (cfg.trainer.resume and cfg.trainer.overwrite), "trainer.overwrite",
             "cannot be combined with trainer.resume=true (resume continues the run that overwrite deletes)")
    r = cfg.rollout
    _require(r.group_size >= 2, "rollout.group_size", "GRPO needs at least 2 rollouts per question")
    _require(r.temperature > 0, "rollout.temperature", "training rollouts must sample (temperature > 0)")
    _require(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _require(r.retriever in ("bm25", "dense", "http"), "rollout.retriever", "must be bm25, dense or http")
    _require(r.retriever != "http" or bool(cfg.cluster.retrieval_url), "cluster.retrieval_url",
             "rollout.retriever=http needs the retrieval service URL")
    _require(r.max_context > r.max_new_tokens, "rollout.max_context", "must exceed rollout.max_new_tokens")
    _require(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    _require(0 <= cfg.sd.beta <= 1, "sd.beta", f"JSD mixture weight must be in [0, 1], got {cfg.sd.beta}")
    _require(cfg.sd.coef >= 0, "sd.coef", "must be >= 0")
    _require(cfg.grpo.reduction in ("token", "sequence"), "grpo.reduction", "must be token or sequence")
    _require(0 < cfg.grpo.clip_eps < 1, "grpo.clip_eps", "must be in (0, 1)")
    _require(cfg.grpo.micro_batch_size >= 1, "grpo.micro_batch_size", "must be >= 1")
    _require(cfg.grpo.mini_batches >= 1, "grpo.mini_batches", "must be >= 1")
    _require(cfg.trainer.steps >= 1, "trainer.steps", "must be >= 1")
    _require(cfg.trainer.questions_per_step % cfg.grpo.mini_batches == 0, "trainer.questions_per_step",
             "must be a multiple of grpo.mini_batches")
    d = cfg.data
    _require(bool(d.train_files) == bool(d.dev_files) == bool(d.test_files), "data.train_files",
             "give train_files, dev_files and test_files together (or none: the bundled world)")
    _require(not d.train_files or r.retriever == "http", "rollout.retriever",
             "questions from files need the retrieval service over their corpus (rollout.retriever=http)")
    _require(cfg.actor in ("hf", "megatron"), "actor", f"must be hf or megatron, got {cfg.actor!r}")
    _require(cfg.generator in ("torch", "trtllm"), "generator", f"must be torch or trtllm, got {cfg.generator!r}")
    from nemo_sdsearch.layout import check_layout

    check_layout(cfg)
    return cfg


def config_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "conf"


def load_config(name: str = "tiny_cpu", overrides: list[str] | None = None, directory: str | None = None) -> TrainConfig:
    """Compose `conf/<name>.yaml` with Hydra override syntax (`key=value`), check it against the schema."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    directory = str(Path(directory or config_dir()).resolve())
    if not Path(directory, f"{name}.yaml").exists():
        raise ConfigError(f"no config {name!r} in {directory}")
    try:
        with initialize_config_dir(config_dir=directory, version_base=None):
            raw = compose(config_name=name, overrides=list(overrides or []))
        schema = OmegaConf.structured(TrainConfig)
        merged = OmegaConf.merge(schema, raw)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_first_line(e)) from None
    cfg: TrainConfig = OmegaConf.to_object(merged)
    return validate(cfg)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"config key {key}: {line}" if key else line


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
