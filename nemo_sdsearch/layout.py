"""Parallel layout checks and a per-GPU memory estimate, run when a config is loaded, before any GPU
is touched. An impossible layout (a tensor-parallel size that does not divide the attention heads or
the key/value groups, a pipeline size that does not divide the layers, more model-parallel ranks than
GPUs, ...) or a layout whose estimated peak does not fit `cluster.gpu_memory_gib x cluster.memory_headroom`
fails with a `ConfigError` naming the key to change.

Memory model: what one GPU holds in the cluster design, per phase (docs/cluster.md shows the tables,
printed by `python scripts/memory_table.py`). Bytes; P = parameters of the largest pipeline stage (padded
vocabulary), P_hf = the HF model's, t / p = megatron tensor / pipeline parallel, d = data-parallel size,
g = trtllm.tensor_parallel, b = grpo.micro_batch_size, s = rollout.max_context, h / f / L = hidden / ffn /
layers, kv = key/value heads x head dim, Vp = vocabulary padded to make_vocab_size_divisible_by x t.

  resident in both phases
    CUDA contexts + NCCL         CUDA_NCCL_OVERHEAD_GIB: the trainer's and the engine's contexts, communicator
                                 buffers, the engine's runtime workspace
    actor weights                2 P / t        Megatron's DistributedOptimizer with grad_reduce_in_fp32:
    actor gradient buffer fp32   4 P / t        bf16 weights and an fp32 grad buffer per model-parallel shard,
    fp32 main weights            4 P / t / d    fp32 main weights and Adam m, v sharded over DP (no / d without
    Adam m and v fp32            8 P / t / d    megatron.distributed_optimizer; megatron.dtype=fp32 or actor=hf:
    reference policy             2 P / t        4-byte weights, no main copy)   reference: grpo.kl_coef > 0
    generator weights bf16       2 P_hf / g     this GPU's TensorRT-LLM worker: the engines cover every GPU of the
                                                job in blocks of g (sleep level 1 keeps them);
                                                generator=torch with actor=megatron: the HF copy, 2 P_hf
  generation phase
    KV cache reserved            kv_cache_fraction x (GPU memory - the resident rows but Adam's moments):
                                 TensorRT-LLM reserves that fraction of the memory free when the engine is
                                 built, after the actor and the reference and before the first optimizer step
                                 allocates Adam's moments. Resident instead with trtllm.sleep_while_training=false
    refit transient              REFIT_BUCKET_BYTES + Vp x h x 2: one bucket of gathered HF tensors and the
                                 largest tensor (embedding / LM head) whole during its TP gather; the loop
                                 refits after waking the engine, so it meets the KV cache
    allocator cache kept         ALLOCATOR_KEPT_GIB: the update's activations, logits and gradients are freed
                                 to torch's caching allocator, which keeps them reserved; every rank empties
                                 the cache before the engine wakes (setup.engine_asleep), and what stays is
                                 the partly used segments (without it the whole training phase's transients,
                                 ~17.6 GiB at 7B TP 2 x DP 8, would meet the wake-up's KV cache)
  training phase (one micro-batch at a time)
    activations                  full recompute: s b (p L/p 2h/t' + A), the checkpointed layer inputs of the
                                 p micro-batches 1F1B keeps in flight on the first stage plus one recomputed
                                 layer; without: s b p L/p A; both + 2 s b h (decoder output gathered for the
                                 LM head). A = 8h/t' + (4h + 4kv + 6f)/t bytes per token and layer, t' = t with
                                 sequence parallelism else 1: Korthikanti et al. 2022 (eq. 2, 34 s b h +
                                 5 a s^2 b for GPT) counted for the Qwen2 layer: norm inputs 4h, QKV and fc1
                                 inputs 4h (the 8h SP splits), Q 2h, K and V 4kv, attention output 2h, fc1
                                 output 4f, SwiGLU output 2f; no dropout masks, flash attention (no s^2 term)
    policy logits + gradient     2 x b min(s, (max_turns + 1) max_new_tokens) x Vp/t x 4 (fp32, at the policy
                                 positions; an upper bound: every turn at max_new_tokens)
    teacher logits               b min(s, max_turns max_new_tokens) x Vp/t x 4 (SD-Search, fp32, at the query
                                 positions; an upper bound: every search turn all query); x megatron.teacher_window
                                 at p > 1 (a window of micro-batches shares one teacher schedule)
    student query rows           the same size (the gathered rows the JSD overwrites with its gradient)
    JSD chunk buffers            JSD_CHUNK_BUFFERS x sd.chunk_rows x Vp/t x 4
  peak = max(generation phase, training phase), each including the resident rows

Offload (models/offload.py): offload.grads, offload.optimizer (the fp32 main weights and Adam's moments) and
offload.reference=cpu move those rows from "resident" to the training phase (parked in host memory while the
engines generate; build_components parks them before the engine is built, so they are not in the memory the
KV cache's fraction is taken of); trtllm.sleep_level=2 moves the engine's weights to the generation phase.
A CPU run (cluster.gpus_per_node=0; `world` given) runs the torch AdamW: fp32 weights, gradients in the
training phase (set to None after every step), Adam's moments not sharded. `sdsearch layout` searches the
layouts that fit (`layout_options`, `layout_report`).

Reported, not counted: the KV cache the replica's rollouts of one step would need all at max_context at
once, and how many such rollouts the reserved cache holds. Not modelled: fragmentation (the headroom), the
Search-E1 OPSD round with adapter=lora (an adapter mode of the HF actor, one device: the base weights plus a
small adapter and its AdamW state, less than a GRPO round holds; adapter=full is a GRPO-shaped round).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_sdsearch.core.vocab import pad_vocab_size
from nemo_sdsearch.errors import ConfigError

GIB = 1024 ** 3
REFIT_BUCKET_BYTES = 1 << 30      # the refit's bucket of HF tensors (TRTLLMGenerator's refit_bucket_bytes default)
ALLOCATOR_KEPT_GIB = 1.0          # torch's caching allocator after the update's empty_cache(): segments still partly
                                  # in use by resident tensors cannot be returned (an estimate; the GPU kit measures
                                  # max_memory_reserved once a GPU run lands)
CUDA_NCCL_OVERHEAD_GIB = 3.0      # two CUDA contexts (~0.5-1 GiB each), NCCL buffers, engine workspace
JSD_CHUNK_BUFFERS = 6             # live [chunk_rows, Vp/t] fp32 tensors in the chunked JSD forward
                                  # (student, teacher, their exps and log-softmaxes)

RESIDENT, GENERATION, TRAINING, INFO = "resident", "generation", "training", "info"


def _config_error(key: str, msg: str):
    return ConfigError(f"config key {key}: {msg}")


def parameter_count(arch) -> int:
    """Parameters of the HF model (unpadded vocabulary)."""
    return _layer_params(arch) * arch.num_layers + arch.vocab_size * arch.hidden_size * (
        1 if arch.tied_embeddings else 2) + arch.hidden_size


def _layer_params(arch) -> int:
    h, ffn = arch.hidden_size, arch.ffn_hidden_size
    kv = arch.num_kv_heads * (h // arch.num_attention_heads)
    attn = h * h + 2 * h * kv + h * h + (h + 2 * kv)  # q, k, v, o (+ QKV bias)
    return attn + 3 * h * ffn + 2 * h                 # + gate, up, down + two RMSNorms


def stage_parameter_count(arch, vocab: int, pp: int) -> int:
    """Parameters of the largest pipeline stage: pp = 1 the whole model; pp > 1 the last stage (its layers,
    the LM head, the final norm; a tied LM head is a copy of the embedding there)."""
    h = arch.hidden_size
    if pp == 1:
        return _layer_params(arch) * arch.num_layers + vocab * h * (1 if arch.tied_embeddings else 2) + h
    return _layer_params(arch) * (arch.num_layers // pp) + vocab * h + h


@dataclass(frozen=True)
class MemoryRow:
    component: str
    phase: str          # resident | generation | training | info (reported, not counted)
    gib: float
    note: str = ""


@dataclass
class MemoryEstimate:
    """Per-GPU memory of one layout: the component rows, the two phase totals and the peak."""
    params: int
    tp: int
    pp: int
    dp: int
    gen_tp: int
    components: list = field(default_factory=list)   # MemoryRow: resident, generation or training
    kv_needed_gib: float = 0.0     # the replica's rollouts of one step, all at max_context at once
    kv_rollouts: int = 0           # rollouts at max_context the reserved KV cache holds at once
    rollouts_per_replica: float = 0.0

    def _sum(self, *phases) -> float:
        return sum(r.gib for r in self.components if r.phase in phases)

    def gib(self, component: str) -> float:
        """One component's GiB (0 when the layout does not have it)."""
        return sum(r.gib for r in self.components if r.component == component)

    @property
    def resident_gib(self) -> float:
        return self._sum(RESIDENT)

    @property
    def generation_gib(self) -> float:
        """Generation phase: the resident state, the KV cache and the refit transient."""
        return self._sum(RESIDENT, GENERATION)

    @property
    def training_gib(self) -> float:
        """Training phase: the resident state and the update's activations and logits."""
        return self._sum(RESIDENT, TRAINING)

    @property
    def peak_gib(self) -> float:
        return max(self.generation_gib, self.training_gib)

    @property
    def peak_phase(self) -> str:
        return GENERATION if self.generation_gib >= self.training_gib else TRAINING

    def rows(self) -> list[MemoryRow]:
        """Every component, then the phase totals and the peak, then what the KV cache would need."""
        return self.components + [
            MemoryRow("generation phase", "total", self.generation_gib),
            MemoryRow("training phase", "total", self.training_gib),
            MemoryRow("peak", "total", self.peak_gib, f"{self.peak_phase} phase"),
            MemoryRow("KV cache needed (share at max_context)", INFO, self.kv_needed_gib,
                      f"{self.rollouts_per_replica:g} rollouts at once; the reserved cache holds {self.kv_rollouts}")]

    def table(self) -> str:
        head = (f"parameters {self.params / 1e9:.2f} B; layout tp={self.tp} pp={self.pp} dp={self.dp}, "
                f"TensorRT-LLM tp={self.gen_tp}; GiB per GPU")
        return "\n".join([head] + [f"  {r.phase:10s} {r.component:40s} {r.gib:7.2f}  {r.note}".rstrip()
                                   for r in self.rows()])


TRAINER_STATE = ("actor weights", "actor gradient buffer fp32", "fp32 main weights", "Adam m and v fp32",
                 "reference policy")
"""The rows of the training state (`Parkable.state_bytes` measures the first four on a live actor)."""


def memory_estimate(cfg, world: int | None = None) -> MemoryEstimate:
    """The per-GPU (per-rank) memory of `cfg`'s layout; `world`: the job's ranks (default: cluster.nodes x
    cluster.gpus_per_node). A CPU run (cluster.gpus_per_node=0) is modelled with what it runs: the torch AdamW
    (fp32 weights, gradients freed after each step, Adam's moments not sharded)."""
    a, m, c, r = cfg.arch, cfg.megatron, cfg.cluster, cfg.rollout
    megatron = cfg.actor == "megatron"
    tp, pp = (m.tensor_parallel, m.pipeline_parallel) if megatron else (1, 1)
    world = world or max(1, c.nodes * max(1, c.gpus_per_node))
    dp = max(1, world // (tp * pp))
    vocab = pad_vocab_size(a.vocab_size, tp, max(1, m.make_vocab_size_divisible_by)) if megatron else a.vocab_size
    P_hf = parameter_count(a)
    P = stage_parameter_count(a, vocab, pp)
    h, f, L, s, b = a.hidden_size, a.ffn_hidden_size, a.num_layers, r.max_context, cfg.grpo.micro_batch_size
    head_dim = h // a.num_attention_heads
    kv = a.num_kv_heads * head_dim
    # Megatron's DDP + DistributedOptimizer on GPUs; the torch AdamW on CPU and for the hf actor (fp32 weights,
    # no main copy, nothing sharded, gradients set to None after every step)
    megatron_opt = megatron and c.gpus_per_node > 0
    fp32 = m.dtype == "fp32" or not megatron or (m.dtype == "auto" and c.gpus_per_node == 0)
    shard = dp if megatron_opt and m.distributed_optimizer else 1
    off = cfg.offload
    rows: list[MemoryRow] = []

    def add(component, phase, nbytes, note=""):
        rows.append(MemoryRow(component, phase, nbytes / GIB, note))

    # -- the training state: resident, or in the training phase only where it is parked in host memory while
    #    the engines generate (offload.*) or does not exist between updates (the torch AdamW's gradients) ------
    parked = lambda on: TRAINING if on else RESIDENT
    add("CUDA contexts + NCCL", RESIDENT, CUDA_NCCL_OVERHEAD_GIB * GIB, "constant")
    add("actor weights", RESIDENT, (4 if fp32 else 2) * P / tp, f"{4 if fp32 else 2} P / tp")
    add("actor gradient buffer fp32", parked(off.grads or not megatron_opt), 4 * P / tp,
        "4 P / tp" + ("; offload.grads" if off.grads and megatron_opt else
                      "" if megatron_opt else "; freed after each step (torch AdamW)"))
    if not fp32:
        add("fp32 main weights", parked(off.optimizer), 4 * P / tp / shard,
            f"4 P / tp / {shard}" + ("; offload.optimizer" if off.optimizer else ""))
    add("Adam m and v fp32", parked(off.optimizer), 8 * P / tp / shard,
        f"8 P / tp / {shard}" + ("; offload.optimizer" if off.optimizer else ""))
    if cfg.grpo.kl_coef > 0:
        add("reference policy", parked(off.reference == "cpu"), (4 if fp32 else 2) * P / tp,
            "frozen, grpo.kl_coef > 0" + ("; offload.reference=cpu" if off.reference == "cpu" else ""))
    trtllm = cfg.generator == "trtllm"
    gen_tp = cfg.trtllm.tensor_parallel if trtllm else 1
    level2 = trtllm and cfg.trtllm.sleep_while_training and cfg.trtllm.sleep_level == 2
    if trtllm:
        add("generator weights bf16", GENERATION if level2 else RESIDENT, 2 * P_hf / gen_tp,
            "TensorRT-LLM engine: 2 P_hf / trtllm tp" + ("; released by a level-2 sleep" if level2 else ""))
    elif megatron:
        add("generator weights bf16", RESIDENT, 2 * P_hf, "the HF copy on the replica leader")
    # -- generation phase ----------------------------------------------------------------------------
    # the step's rollouts of one engine (engines on every GPU, world / g of them), or of one replica's generator
    rollouts = cfg.trainer.questions_per_step * r.group_size / (max(1, world // gen_tp) if trtllm and megatron else dp)
    kv_per_token = L * 2 * -(-a.num_kv_heads // gen_tp) * head_dim * 2   # K and V bf16, this GPU's heads
    kv_needed = rollouts * s * kv_per_token
    if trtllm:
        # free memory when the engine reserves its cache: built after the actor and the reference and after
        # build_components parked offload.*, before the first optimizer step allocates Adam's moments
        free = max(0.0, c.gpu_memory_gib - sum(x.gib for x in rows
                                               if x.component != "Adam m and v fp32" and x.phase != TRAINING))
        kv_reserved = cfg.trtllm.kv_cache_fraction * free * GIB
        asleep = cfg.trtllm.sleep_while_training
        add("KV cache reserved", GENERATION if asleep else RESIDENT, kv_reserved,
            f"{cfg.trtllm.kv_cache_fraction:g} x {free:.1f} GiB free at engine start"
            + ("" if asleep else "; kept through the update"))
        add("refit bucket + largest tensor", GENERATION, REFIT_BUCKET_BYTES + vocab * h * 2,
            f"{REFIT_BUCKET_BYTES / GIB:g} GiB + Vp x h x 2")
        add("allocator cache kept after the update", GENERATION, ALLOCATOR_KEPT_GIB * GIB,
            "what torch.cuda.empty_cache() cannot return (partly used segments); an estimate")
    else:
        kv_reserved = kv_needed
        add("KV cache (torch generator)", GENERATION, kv_needed, "the whole share at max_context")
    # -- training phase ------------------------------------------------------------------------------
    sp = tp if m.sequence_parallel and megatron else 1
    per_layer = 8 * h / sp + (4 * h + 4 * kv + 6 * f) / tp   # bytes per token and layer, nothing recomputed
    if m.activation_checkpointing and megatron:
        act, note = s * b * (pp * (L // pp) * 2 * h / sp + per_layer), "layer inputs + one recomputed layer"
    else:
        act, note = s * b * pp * (L // pp) * per_layer, "every layer stored"
    add("activations", TRAINING, act + 2 * s * b * h, note)
    policy_rows = b * min(s, (r.max_turns + 1) * r.max_new_tokens)
    add("policy logits + gradient fp32", TRAINING, 2 * policy_rows * vocab / tp * 4,
        f"2 x {policy_rows} rows x Vp/tp x 4")
    if cfg.algorithm == "sd_search" and cfg.sd.coef > 0:
        query_rows = b * min(s, r.max_turns * r.max_new_tokens)
        chunk = min(cfg.sd.chunk_rows, query_rows)
        window = m.teacher_window if megatron and pp > 1 else 1   # pp > 1: a window of micro-batches' teacher logits
        add("teacher logits fp32 (query rows)", TRAINING, window * query_rows * vocab / tp * 4,
            f"{query_rows} rows x Vp/tp x 4" + (f" x {window} (megatron.teacher_window)" if window > 1 else ""))
        add("student query rows fp32 (JSD grad)", TRAINING, query_rows * vocab / tp * 4, "the same size")
        add("JSD chunk buffers fp32", TRAINING, JSD_CHUNK_BUFFERS * chunk * vocab / tp * 4,
            f"{JSD_CHUNK_BUFFERS} x {chunk} rows x Vp/tp x 4")
    return MemoryEstimate(P_hf, tp, pp, dp, gen_tp, rows, kv_needed_gib=kv_needed / GIB,
                          kv_rollouts=int(kv_reserved // (s * kv_per_token)), rollouts_per_replica=rollouts)


def memory_table(cfg) -> list[MemoryRow]:
    """The rows of `memory_estimate(cfg)`: components, phase totals, peak, the KV cache needed."""
    return memory_estimate(cfg).rows()


def markdown_table(recipes: dict) -> str:
    """One markdown table ({column title: cfg}): a row per component, the phase totals and the peak, GiB per GPU."""
    ests = list(map(memory_estimate, recipes.values()))
    keys: list[tuple[str, str]] = []
    for e in ests:
        keys += [(r.phase, r.component) for r in e.components if (r.phase, r.component) not in keys]
    keys.sort(key=lambda k: (RESIDENT, GENERATION, TRAINING).index(k[0]))

    def line(*cells):
        return "| " + " | ".join(cells) + " |"

    def cell(e, phase, comp):
        got = [r.gib for r in e.components if (r.phase, r.component) == (phase, comp)]
        return f"{sum(got):.1f}" if got else "-"

    out = [line("phase", "GiB per GPU", *recipes), "|---|---|" + "---:|" * len(ests),
           line("", "layout", *(f"TP {e.tp}, PP {e.pp}, DP {e.dp}; TRT-LLM TP {e.gen_tp}" for e in ests)),
           line("", "parameters", *(f"{e.params / 1e9:.2f} B" for e in ests))]
    out += [line(phase, comp, *(cell(e, phase, comp) for e in ests)) for phase, comp in keys]
    out += [line("**total**", "generation phase", *(f"{e.generation_gib:.1f}" for e in ests)),
            line("**total**", "training phase", *(f"{e.training_gib:.1f}" for e in ests)),
            line("**peak**", "", *(f"**{e.peak_gib:.1f}** ({e.peak_phase})" for e in ests)),
            line("info", "KV cache needed: the share at max_context", *(f"{e.kv_needed_gib:.1f}" for e in ests)),
            line("info", "rollouts at max_context the cache holds", *(f"{e.kv_rollouts} of {e.rollouts_per_replica:g}"
                                                                    for e in ests))]
    return "\n".join(out)


def _fixes(cfg, est: MemoryEstimate, budget: float) -> list[tuple[str, str]]:
    """(config key, what to do) for each phase over the budget, the peak phase first."""
    grow_tp = ("megatron.tensor_parallel",
               "raise megatron.tensor_parallel (or cluster.nodes: more data-parallel ranks shard the optimizer)")
    fixes = []
    for phase in sorted((GENERATION, TRAINING), key=lambda p: p != est.peak_phase):
        total = est.generation_gib if phase == GENERATION else est.training_gib
        if total <= budget:
            continue
        if phase == GENERATION:
            fix = grow_tp if total - est.gib("KV cache reserved") > budget else \
                ("trtllm.kv_cache_fraction", "lower trtllm.kv_cache_fraction (or raise trtllm.tensor_parallel)")
        elif est.resident_gib > budget:
            fix = grow_tp
        elif cfg.actor == "megatron" and not cfg.megatron.activation_checkpointing:
            fix = ("megatron.activation_checkpointing", "set megatron.activation_checkpointing=true")
        elif cfg.generator == "trtllm" and not cfg.trtllm.sleep_while_training:
            fix = ("trtllm.sleep_while_training",
                   "set trtllm.sleep_while_training=true (the update releases the KV cache)")
        elif cfg.grpo.micro_batch_size > 1:
            fix = ("grpo.micro_batch_size", "lower grpo.micro_batch_size")
        else:
            fix = grow_tp
        if fix not in fixes:
            fixes.append(fix)
    return fixes


def check_layout(cfg, memory: bool = True) -> None:
    """Raise ConfigError for an impossible parallel layout or (`memory`) one whose memory estimate does not fit."""
    a, m, c = cfg.arch, cfg.megatron, cfg.cluster
    tp, pp = m.tensor_parallel, m.pipeline_parallel
    for key, v in (("megatron.tensor_parallel", tp), ("megatron.pipeline_parallel", pp),
                   ("trtllm.tensor_parallel", cfg.trtllm.tensor_parallel), ("cluster.nodes", c.nodes)):
        if v < 1:
            raise _config_error(key, f"must be >= 1, got {v}")
    if m.dtype not in ("auto", "bf16", "fp32"):
        raise _config_error("megatron.dtype", f"must be auto, bf16 or fp32, got {m.dtype!r}")
    if cfg.actor == "hf" and (tp > 1 or pp > 1):
        raise _config_error("megatron.tensor_parallel", "tensor/pipeline parallelism needs actor=megatron")
    if cfg.generator == "trtllm" and c.gpus_per_node == 0:
        raise _config_error("generator", "trtllm needs GPUs (set cluster.gpus_per_node)")
    if c.gpus_per_node:
        world = c.nodes * c.gpus_per_node
        if tp > c.gpus_per_node:
            raise _config_error("megatron.tensor_parallel", f"{tp} exceeds the {c.gpus_per_node} GPUs of one node "
                                "(tensor parallelism must stay inside a node)")
        if world % (tp * pp):
            raise _config_error("megatron.tensor_parallel", f"tp x pp = {tp * pp} does not divide the "
                                f"{world} GPUs ({c.nodes} nodes x {c.gpus_per_node})")
        dp = world // (tp * pp)
        rollouts = cfg.trainer.questions_per_step * cfg.rollout.group_size
        if rollouts % dp:
            raise _config_error("trainer.questions_per_step", f"{rollouts} rollouts per step do not split over "
                                f"{dp} data-parallel ranks")
        if cfg.trtllm.tensor_parallel > c.gpus_per_node:
            raise _config_error("trtllm.tensor_parallel", f"exceeds the {c.gpus_per_node} GPUs of one node")
        if cfg.generator == "trtllm" and c.gpus_per_node % cfg.trtllm.tensor_parallel:
            raise _config_error("trtllm.tensor_parallel", f"{cfg.trtllm.tensor_parallel} does not divide the "
                                f"{c.gpus_per_node} GPUs of a node: the engines cover every GPU of the job in blocks "
                                "of trtllm.tensor_parallel GPUs inside a node")
    if a.num_attention_heads:
        if a.num_attention_heads % tp:
            raise _config_error("megatron.tensor_parallel", f"{tp} does not divide the {a.num_attention_heads} "
                                "attention heads")
        if a.num_kv_heads and a.num_kv_heads % tp:
            raise _config_error("megatron.tensor_parallel", f"{tp} does not divide the {a.num_kv_heads} key/value "
                                "groups (megatron-core needs num_query_groups % tp == 0)")
        g = cfg.trtllm.tensor_parallel
        if cfg.generator == "trtllm" and a.num_attention_heads % g:
            raise _config_error("trtllm.tensor_parallel", f"{g} does not divide the {a.num_attention_heads} heads")
    if a.num_layers and a.num_layers % pp:
        raise _config_error("megatron.pipeline_parallel", f"{pp} does not divide the {a.num_layers} layers")
    if memory and c.gpus_per_node and a.hidden_size and a.num_layers and a.vocab_size and a.num_attention_heads:
        est = memory_estimate(cfg)
        budget = c.gpu_memory_gib * c.memory_headroom
        if est.peak_gib > budget:
            fixes = _fixes(cfg, est, budget)
            raise _config_error(fixes[0][0], f"estimated {est.peak_gib:.1f} GiB per GPU ({est.peak_phase} phase) "
                                f"exceeds {budget:.1f} GiB ({c.memory_headroom:.0%} of {c.gpu_memory_gib:g} GiB); "
                                + "; ".join(fix for _, fix in fixes) + f":\n{est.table()}")
        if cfg.generator == "trtllm" and est.kv_rollouts < 1:
            kv = est.gib("KV cache reserved")
            raise _config_error("trtllm.kv_cache_fraction", f"the reserved KV cache ({kv:.2f} GiB) cannot hold one rollout of rollout.max_context={cfg.rollout.max_context} "
                                "tokens; raise trtllm.kv_cache_fraction or trtllm.tensor_parallel:\n" + est.table())


# ---------------------------------------------------------------------------------------------------
# `sdsearch layout`: which layouts of a recipe fit, and how many GPUs generate
# ---------------------------------------------------------------------------------------------------
OFFLOAD_PLANS = {
    "none": {},
    "state": {"optimizer": True, "grads": True, "reference": "cpu"},          # offload.* on
    "state+engine": {"optimizer": True, "grads": True, "reference": "cpu", "sleep_level": 2},  # + level-2 sleep
}


@dataclass(frozen=True)
class LayoutOption:
    tp: int
    pp: int
    dp: int
    gen_tp: int
    offload: str                  # a key of OFFLOAD_PLANS
    estimate: MemoryEstimate
    budget_gib: float

    @property
    def fits(self) -> bool:
        return self.estimate.peak_gib <= self.budget_gib

    @property
    def generating(self) -> float:
        """The share of the job's GPUs that run an engine worker while the engines generate: every GPU (the
        engines cover the job in blocks of trtllm.tensor_parallel GPUs, independent of the training layout)."""
        return 1.0


def with_layout(cfg, tp: int, pp: int, gen_tp: int, offload: str = "none", nodes: int | None = None):
    """`cfg` with another parallel layout, engine size and offload plan (`OFFLOAD_PLANS`)."""
    from dataclasses import replace

    plan = OFFLOAD_PLANS[offload]
    off = replace(cfg.offload, optimizer=plan.get("optimizer", False), grads=plan.get("grads", False),
                  reference=plan.get("reference", "resident"))
    return replace(cfg, megatron=replace(cfg.megatron, tensor_parallel=tp, pipeline_parallel=pp), offload=off,
                   trtllm=replace(cfg.trtllm, tensor_parallel=gen_tp, sleep_level=plan.get("sleep_level", 1)),
                   cluster=replace(cfg.cluster, nodes=nodes or cfg.cluster.nodes))


def layout_options(cfg, nodes: int | None = None) -> list[LayoutOption]:
    """Every possible layout of `cfg`'s model on `nodes` nodes (default: the recipe's): megatron tp and pp, the
    engine's tensor parallelism, and the three offload plans; each with its memory estimate. Impossible ones
    (check_layout without the memory check) are left out."""
    c = cfg.cluster
    world = (nodes or c.nodes) * c.gpus_per_node
    sizes = [n for n in (1, 2, 4, 8) if n <= c.gpus_per_node]
    out = []
    for tp in sizes:
        for pp in (1, 2, 4, 8, 16):
            if world % (tp * pp):
                continue
            for gen_tp in sizes:
                for plan in OFFLOAD_PLANS:
                    v = with_layout(cfg, tp, pp, gen_tp, plan, nodes)
                    try:
                        check_layout(v, memory=False)
                    except ConfigError:
                        continue
                    out.append(LayoutOption(tp, pp, world // (tp * pp), gen_tp, plan, memory_estimate(v),
                                            c.gpu_memory_gib * c.memory_headroom))
    return out


def layout_report(name: str, cfg, nodes: int | None = None, top: int = 8) -> str:
    """What `sdsearch layout` prints for one recipe: its own layout's phase totals and verdict, then the layouts
    that fit on `nodes` nodes, the most GPUs generating first, then the lowest peak."""
    c = cfg.cluster
    nodes = nodes or c.nodes
    budget = c.gpu_memory_gib * c.memory_headroom
    world = nodes * c.gpus_per_node
    own = memory_estimate(replace_nodes(cfg, nodes))
    m = cfg.megatron
    gen = 1.0 if cfg.generator == "trtllm" else 1 / (m.tensor_parallel * m.pipeline_parallel)  # torch: leaders only
    verdict = "fits" if own.peak_gib <= budget else "does NOT fit"
    lines = [f"{name}: {parameter_count(cfg.arch) / 1e9:.1f} B parameters on {nodes} node(s) x {c.gpus_per_node} "
             f"GPUs of {c.gpu_memory_gib:g} GiB (budget {budget:.1f} GiB = {c.memory_headroom:.0%})",
             f"  the recipe's layout: TP {m.tensor_parallel} x PP {m.pipeline_parallel} x DP {own.dp}, engine TP "
             f"{cfg.trtllm.tensor_parallel}, offload {_plan_of(cfg)}: generation {own.generation_gib:.1f} GiB, "
             f"training {own.training_gib:.1f} GiB, peak {own.peak_gib:.1f} GiB ({own.peak_phase}) -> {verdict}; "
             f"{gen:.0%} of the GPUs generate"]
    options = layout_options(cfg, nodes)
    fitting = sorted((o for o in options if o.fits), key=lambda o: (-o.generating, o.estimate.peak_gib))
    lines.append(f"  layouts that fit on {world} GPUs: {len(fitting)} of {len(options)} possible"
                 + (f" (the best {min(top, len(fitting))}):" if fitting else ""))
    if fitting:
        lines.append("     TP  PP  DP  engine TP  offload        generation  training    peak  GPUs generating")
        for o in fitting[:top]:
            e = o.estimate
            lines.append(f"    {o.tp:3d} {o.pp:3d} {o.dp:3d} {o.gen_tp:10d}  {o.offload:13s} {e.generation_gib:10.1f} "
                         f"{e.training_gib:9.1f} {e.peak_gib:7.1f}  {o.generating:15.0%}")
    return "\n".join(lines)


def replace_nodes(cfg, nodes: int):
    from dataclasses import replace

    return replace(cfg, cluster=replace(cfg.cluster, nodes=nodes))


def _plan_of(cfg) -> str:
    o = cfg.offload
    if not (o.optimizer or o.grads or o.reference == "cpu"):
        return "none"
    return "state+engine" if cfg.trtllm.sleep_level == 2 else "state"


DOC_RECIPES = ("qwen25_7b_sd_search", "qwen25_7b_search_e1", "qwen25_3b_sd_search", "qwen25_3b_search_e1",
               "qwen25_32b_sd_search", "qwen25_72b_sd_search")
