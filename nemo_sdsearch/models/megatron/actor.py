"""`MegatronActor`: the `Actor` seam over a megatron-core GPTModel shard (tensor parallel).

Same semantics as `models.hf.HFActor`: positions are *target* positions (the logits "at (row, col)"
come from the hidden state at col-1), the LM head runs only on the selected rows, the teacher pass is
the same weights under no_grad, `train_step` accumulates micro-batch gradients, clips the global norm
and skips the update on a non-finite loss or gradient.

Forward: `GPTModel.forward` with `post_process` switched off for the call, which returns the decoder
output (final norm applied) before the output layer, in Megatron's [seq, batch, hidden] layout. The
attention mask is Megatron's implicit causal mask (attention_mask=None): for right-padded batches that
is exact at every real position, since pad tokens only come after the tokens that are scored. Position
ids are 0..T-1 for every row, as in the HF backend.

Vocabulary: the output layer is column parallel, so each TP rank computes logits for its slice
[vocab_start, vocab_start + Vp/tp) of the padded vocabulary. `logits_at` returns that LOCAL shard
([N, Vp/tp]; columns with global id >= vocab_size are TP padding) unless `gather_logits` is on,
in which case it returns the full [N, vocab_size] logits exactly like the HF backend (all-gathered over
TP, differentiable, padding dropped). `gather_logits` defaults to True at tp=1 and False at tp>1.
`vocab_shard` says which (a `losses.shard.VocabShard`: this rank's columns over megatron's TP group, passed
explicitly, or the single-device vocabulary), and the losses do their vocabulary math through it, which cuts
the padding off. `full_logits_at` always gathers. `logprobs_at` uses the local shard's `logprobs` (at tp>1
two all-reduces of [N] numbers instead of gathering [N, V] logits).

Optimizer: none for a frozen copy (`optimizer="none"`: the reference / teacher, any dtype). On CPU (and whenever
`optimizer="torch"`) plain `torch.optim.AdamW` over the local shards
(AdamW is elementwise, so sharded AdamW equals AdamW on the full weights), our micro-batch loop, the
global gradient norm all-reduced over the model-parallel group with TP-replicated parameters (the
RMSNorm weights) counted once, and gradients averaged over the data-parallel group when there is one.
On CUDA by default (`optimizer="megatron"`): Megatron's `DistributedDataParallel` and
`DistributedOptimizer` (fp32 main weights and grads, sharded optimizer state), written against the
megatron-core 0.16 API; it cannot run on a CPU-only machine and has not been run yet.
Sequence parallelism only on GPU.

Pipeline parallelism (pp > 1), in the NeMo-Aligner actor pattern: every step goes through megatron's
`get_forward_backward_func()` schedule; earlier stages only run their decoder layers, the LAST stage
turns the decoder output into selected-row logits / log-probs and computes the loss there.
- Training: `train_step_pipeline(batches, loss_fn, n_micro)`. `batches[i]` is a `PipelineMicroBatch`
  (the `SequenceBatch`, the selected target (rows, cols), and a dict `extra` of whatever per-row tensors
  the loss needs: advantages, old / reference log-probs, teacher logits...). Every rank passes the same
  list (earlier stages need the token ids for the shapes; only the first stage embeds them).
  `loss_fn(outputs, mb)` runs on the last stage only; `outputs` is a `LastStageOutputs` with
  differentiable `logprobs(temperature)`, `logits()` (same convention as `logits_at`), `local_logits()`
  and `full_logits()` at (mb.rows, mb.cols). Each micro-batch loss is back-propagated as is (the sum
  over micro-batches, exactly like `train_step`; the 1/num_microbatches that the schedule applies is
  undone). The micro-batch losses are broadcast from the last stage, so every rank reports the same
  stats and makes the same skip decision; grad clipping and the non-finite skip are those of
  `train_step` (a non-finite micro-batch loss cannot abort a running pipeline: the whole schedule runs,
  then the update is skipped and the first non-finite loss is reported, as `train_step` does).
  At pp == 1 the same call works: with CUDA it runs `forward_backward_no_pipelining`; without CUDA it
  runs the `train_step` closure loop by default (the same numbers, tested; `use_schedule=True` runs
  megatron's schedule there too). On CPU the schedules run over gloo with `cpu_compat` patches 7 and 8.
- The closure-style `train_step(micro_batch_losses, n)` raises at pp > 1 (a closure cannot back-propagate
  through other ranks' stages).
- Scoring at pp > 1 (`logits_at`, `full_logits_at`, `teacher_logits_at`, `logprobs_at`) runs the schedule
  with `forward_only=True` and is NOT differentiable. `logprobs_at` returns the [N] log-probs on every
  rank (broadcast from the last stage over the pipeline group); the logits methods return the [N, V]
  logits on the last stage and None on the other stages (losses on logits belong in `loss_fn`).
- Schedule arguments: `seq_length` / `micro_batch_size` are the largest T (padded to a multiple of tp
  under sequence parallelism) and B over the micro-batches; with `variable_seq_lengths=True` (set by the
  builder when pp > 1 and required here) the stages exchange the real shapes per micro-batch, so
  micro-batches may differ in length and size. p2p buffers use `config.pipeline_dtype`.
- Gradients: with Megatron's DDP, `finalize_model_grads` (DP reduce-scatter, tied-embedding all-reduce
  between the first and last stage); with the torch optimizer, the same done by hand (tied embedding
  grad all-reduced over the embedding group, DP average) and the global norm counts the last stage's
  copy of the tied embedding (`param.shared`) once.
"""

from __future__ import annotations

import contextlib
import math
import time
import shutil
from pathlib import Path
from dataclasses import dataclass, field

import torch

from nemo_sdsearch.models.base import Actor
from nemo_sdsearch.losses.shard import VocabShard


@contextlib.contextmanager
def _decoder_output(model):
    """Make `GPTModel.forward` return the decoder output (before the output layer)."""
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


@dataclass
class PipelineMicroBatch:
    """One micro-batch for `MegatronActor.train_step_pipeline`: the sequences, the selected target
    positions, and any per-row tensors the loss needs (advantages, old / ref log-probs, teacher logits)."""

    batch: object                      # SequenceBatch
    rows: torch.Tensor
    cols: torch.Tensor
    extra: dict = field(default_factory=dict)


class LastStageOutputs:
    """The decoder output of one micro-batch on the last pipeline stage, with the actor's heads applied
    at (mb.rows, mb.cols) on demand (each call runs the output layer again; all differentiable)."""

    def __init__(self, actor, hidden, mb: PipelineMicroBatch):
        self.actor, self.hidden, self.mb = actor, hidden, mb

    def local_logits(self) -> torch.Tensor:
        return self.actor._head(self.hidden, self.mb.rows, self.mb.cols)

    def full_logits(self) -> torch.Tensor:
        return self.actor.gather(self.local_logits())

    def logits(self) -> torch.Tensor:
        local = self.local_logits()
        return self.actor.gather(local) if self.actor.gather_logits else local

    def logprobs(self, temperature: float = 1.0) -> torch.Tensor:
        return self.actor._logprobs_from_local(self.local_logits(), self.mb.batch, self.mb.rows, self.mb.cols,
                                               temperature)


def _teacher_logits(passes) -> list:
    """The logits of a window's teacher passes: one forward-only schedule when they are `TeacherPass`es of one
    pipeline-parallel scorer, else each pass by itself."""
    from nemo_sdsearch.models.base import TeacherPass

    scorer = passes[0].scorer if passes and isinstance(passes[0], TeacherPass) else None
    if scorer is not None and all(isinstance(p, TeacherPass) and p.scorer is scorer for p in passes) \
            and getattr(scorer, "pp", 1) > 1:
        return scorer.teacher_logits_window(passes)
    return [p() for p in passes]


class MegatronActor(Actor):
    def __init__(self, model, hf_config, lr: float = 1e-6, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 grad_clip: float = 1.0, eps: float = 1e-8, gather_logits: bool | None = None,
                 optimizer: str = "auto", distributed_optimizer: bool = True, teacher_window: int = 4):
        from megatron.core import parallel_state as ps

        self.model = model                    # this rank's GPTModel shard (never wrapped)
        self.teacher_window = max(1, int(teacher_window))  # pp > 1: micro-batches per schedule with teacher passes
        self.hf_config = hf_config
        self.grad_clip = grad_clip
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.dp = ps.get_data_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.is_first_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        if self.pp > 1:
            if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
                raise NotImplementedError("virtual (interleaved) pipeline stages are not supported")
            if not model.config.variable_seq_lengths:
                raise ValueError("pp > 1 needs config.variable_seq_lengths=True (RL batches change shape "
                                 "every step): build the model with builder.build_gpt_model")
            if model.pre_process != self.is_first_stage or model.post_process != self.is_last_stage:
                raise ValueError("the model's pre_process/post_process do not match this pipeline stage")
        self.vocab_size = hf_config.vocab_size
        self.padded_vocab_size = model.vocab_size
        self.shard_size = self.padded_vocab_size // self.tp
        self.vocab_start = self.tp_rank * self.shard_size
        # this rank's columns of the padded vocabulary (what the output layer returns), over the TP group
        self.local_vocab_shard = VocabShard(self.vocab_size, self.vocab_start, self.vocab_start + self.shard_size,
                                            self.tp_group)
        self.gather_logits = (self.tp == 1) if gather_logits is None else gather_logits
        self.sequence_parallel = bool(model.config.sequence_parallel) and self.tp > 1
        if self.sequence_parallel and not torch.cuda.is_available():
            raise NotImplementedError("sequence parallelism needs reduce-scatter (NCCL); gloo has none: "
                                      "build the model with sequence_parallel=False on CPU")
        self.device = next(model.parameters()).device
        self._adamw = dict(weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        use_megatron_opt = optimizer == "megatron" or (optimizer == "auto" and torch.cuda.is_available())
        if optimizer == "none":  # a frozen copy (the reference / teacher): no gradient, no optimizer, any dtype
            model.requires_grad_(False)
            self.ddp = self.optimizer = None
        elif use_megatron_opt:
            self._init_megatron_optimizer(lr, weight_decay, betas, eps, distributed_optimizer)
        else:
            from nemo_sdsearch.models.base import require_fp32_params

            # The torch AdamW steps the model's own parameters: they must be the fp32 master weights.
            require_fp32_params(model.named_parameters(), "MegatronActor(optimizer='torch')",
                                "build the model in fp32, or use optimizer='megatron' (fp32 main weights, GPU)")
            self.ddp, self.optimizer = None, self._torch_adamw(lr)
        self.model.eval()

    def _torch_adamw(self, lr: float):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr, **self._adamw)

    # -- stages (models.base.Actor) -----------------------------------------------------------------------
    def reset_optimizer(self, lr: float) -> None:
        """A fresh optimizer at `lr`. torch AdamW: a new one over the same shards. Megatron's optimizer (GPU): its
        Adam state emptied (Adam initialises empty state on the next step) and every group's lr set; the DDP
        buffers and the fp32 main weights stay (not run on a GPU yet)."""
        if self.optimizer is None:
            raise ValueError("a frozen copy (optimizer='none') has no optimizer to reset")
        if self.ddp is None:
            self.optimizer = self._torch_adamw(lr)
            return
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in inner:
            getattr(opt, "optimizer", opt).state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def copy_weights_from(self, other: "MegatronActor") -> None:
        """This rank's shard takes `other`'s shard (same layout), parameter by parameter."""
        from nemo_sdsearch.models.megatron.hf_mapping import local_weights

        mine, theirs = local_weights(self.model), local_weights(other.model)
        if mine.keys() != theirs.keys():
            raise ValueError("copy_weights_from needs two models of the same layout")
        with torch.no_grad():
            for k, t in mine.items():
                t.copy_(theirs[k])

    def load_weights_from_dir(self, path) -> None:
        """This rank's shard of a HF directory, read part by part (models.weights_reader)."""
        from nemo_sdsearch.models.weights_reader import hf_tensor_reader

        _, read = hf_tensor_reader(path)
        self.load_hf_weights(read)
        if self.ddp is not None:  # Megatron's optimizer steps fp32 main copies: they take the new weights too
            self.optimizer.reload_model_params()

    # -- forward pieces ------------------------------------------------------------------------------
    def _hidden(self, batch) -> torch.Tensor:
        """Decoder output [T, B, H] (final norm applied), the full sequence on every TP rank. Under pp > 1 on
        a stage other than the last: that stage's raw output (sequence-sharded under SP), to be sent on."""
        ids = batch.input_ids.to(self.device)
        B, T = ids.shape
        if self.sequence_parallel and T % self.tp:
            # sequence parallelism splits T over the TP ranks: pad T to a multiple of tp (extra columns
            # on the right change nothing before them under the causal mask)
            ids = torch.nn.functional.pad(ids, (0, self.tp - T % self.tp))
        pos = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand(B, -1)
        with _decoder_output(self.model):
            hidden = self.model(ids, pos, None)
        if self.pp > 1 and not self.is_last_stage:
            return hidden                     # this stage's output, sent as is to the next stage
        if self.sequence_parallel:
            # [T/tp, B, H] per rank -> [T, B, H]. The backward only splits: the output layer (run with
            # sequence parallelism off, see _local_logits) already all-reduces the hidden-state gradient.
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)[:T]
        return hidden

    def _local_logits(self, batch, rows, cols) -> torch.Tensor:
        """[N, Vp/tp] fp32 logits of this rank's slice of the padded vocabulary."""
        return self._head(self._hidden(batch), rows, cols)

    def _head(self, hidden, rows, cols) -> torch.Tensor:
        """The output layer on the decoder output at target positions (rows, cols): [N, Vp/tp] fp32."""
        rows, cols = rows.to(self.device), cols.to(self.device)
        h = hidden[cols - 1, rows].unsqueeze(1)           # [N, 1, H]: the output layer wants 3-D input
        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights \
            else None
        layer = self.model.output_layer
        saved_sp, layer.sequence_parallel = layer.sequence_parallel, False  # h is already full, not sharded
        try:
            logits, _ = layer(h, weight=weight)
        finally:
            layer.sequence_parallel = saved_sp
        return logits[:, 0].float()

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full [N, vocab_size] logits from local shards (all-gather over TP, differentiable)."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        full = gather_from_tensor_model_parallel_region(local_logits) if self.tp > 1 else local_logits
        return full[:, :self.vocab_size]

    def full_logits_at(self, batch, rows, cols) -> torch.Tensor:
        if self.pp > 1:
            return self._score_pipeline(batch, rows, cols, lambda out: out.full_logits())
        return self.gather(self._local_logits(batch, rows, cols))

    def logits_at(self, batch, rows, cols):
        if self.pp > 1:
            return self._score_pipeline(batch, rows, cols, lambda out: out.logits())
        local = self._local_logits(batch, rows, cols)
        return self.gather(local) if self.gather_logits else local

    def teacher_logits_at(self, batch, rows, cols):
        with torch.no_grad():
            return self.logits_at(batch, rows, cols)

    def _logprobs_from_local(self, local, batch, rows, cols, temperature):
        targets = batch.input_ids.to(self.device)[rows.to(self.device), cols.to(self.device)]
        return self.local_vocab_shard.logprobs(local, targets, temperature)

    def logprobs_at(self, batch, rows, cols, temperature: float = 1.0, with_grad: bool = True):
        if self.pp > 1:
            lp = self._score_pipeline(batch, rows, cols, lambda out: out.logprobs(temperature))
            return self.broadcast_from_last_stage(lp, (int(rows.numel()),), torch.float32)
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            return self._logprobs_from_local(self._local_logits(batch, rows, cols), batch, rows, cols,
                                             temperature)

    # -- pipeline parallel (megatron schedules) ------------------------------------------------------------
    def _schedule_model(self):
        return self.ddp if self.ddp is not None else self.model

    def _forward_step_func(self, loss_func_for):
        """A megatron `forward_step_func`: next micro-batch from the iterator, this stage's forward, and on
        the last stage `loss_func_for(hidden, mb)` as the schedule's loss_func."""
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            hidden = self._hidden(mb.batch)
            return hidden, (lambda output: loss_func_for(output, mb))
        return forward_step

    def _run_schedule(self, batches, n_micro: int, forward_only: bool, loss_func_for):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        T = max(int(mb.batch.input_ids.shape[1]) for mb in batches[:n_micro])
        if self.sequence_parallel and T % self.tp:
            T += self.tp - T % self.tp
        B = max(int(mb.batch.input_ids.shape[0]) for mb in batches[:n_micro])
        forward_backward = get_forward_backward_func()
        return forward_backward(forward_step_func=self._forward_step_func(loss_func_for),
                                data_iterator=iter(batches[:n_micro]), model=[self._schedule_model()],
                                num_microbatches=n_micro, seq_length=T, micro_batch_size=B,
                                forward_only=forward_only)

    def _score_pipeline(self, batch, rows, cols, head):
        """Forward-only schedule on one micro-batch; `head(LastStageOutputs)` on the last stage. Returns its
        result (detached) on the last stage, None on the others."""
        mb = PipelineMicroBatch(batch, rows, cols)

        def loss_func_for(hidden, mb_):
            result = head(LastStageOutputs(self, hidden, mb_)).detach()
            return torch.zeros((), device=hidden.device), {"result": result}

        with torch.no_grad():
            store = self._run_schedule([mb], 1, True, loss_func_for)
        return store[0]["result"] if self.is_last_stage else None

    def broadcast_from_last_stage(self, tensor, shape, dtype):
        """`tensor` (given on the last stage) on every rank of this pipeline."""
        from megatron.core import parallel_state as ps

        if self.pp == 1:
            return tensor
        buf = tensor.to(self.device, dtype).contiguous() if self.is_last_stage else \
            torch.empty(shape, dtype=dtype, device=self.device)
        torch.distributed.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        return buf

    # -- training --------------------------------------------------------------------------------------
    def _grad_norm_sq_local(self, params) -> torch.Tensor:
        """Sum of squared grads this rank is responsible for: TP-sharded params always, TP-replicated
        ones (norms) only on TP rank 0, so the all-reduce over the model-parallel group counts them once."""
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            # param.shared: the last pipeline stage's copy of a tied embedding (never set at pp == 1)
            if param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p):
                total += p.grad.detach().double().pow(2).sum()
        return total

    def _skip(self, loss: float, grad_norm: float) -> dict:
        """A skipped step: gradients dropped, no update, the model back in eval mode."""
        self._zero()
        self.model.eval()
        return {"loss": loss, "grad_norm": grad_norm, "skipped": True}

    def _finish(self, total: float) -> dict:
        """After the backward passes: Megatron's DDP + DistributedOptimizer on GPU, plain AdamW over the
        local shards otherwise."""
        return self._finish_megatron(total) if self.ddp is not None else self._finish_torch(total)

    def _zero(self):
        self.optimizer.zero_grad(set_to_none=True)
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()

    def train_step(self, micro_batch_losses, n_micro: int) -> dict:
        if self.pp > 1:
            raise NotImplementedError(
                "pipeline parallel (pp > 1): a loss closure cannot back-propagate through other ranks' "
                "stages; use train_step_pipeline(batches, loss_fn, n_micro), which runs megatron's schedule")
        self.model.train()
        self._zero()
        total = 0.0
        for i in range(n_micro):
            loss = micro_batch_losses(i)
            if not torch.isfinite(loss):
                self._any_replica_bad(True)
                return self._skip(float(loss.detach()), float("nan"))
            loss.backward()
            total += float(loss.detach())
        if self._any_replica_bad(False):
            return self._skip(total, float("nan"))
        return self._finish(total)

    def _any_replica_bad(self, bad: bool) -> bool:
        """Whether any data-parallel replica saw a non-finite loss this step (one all-reduce at dp > 1,
        exactly one per step on every rank, wherever its loss went bad), so that all replicas skip together
        instead of some waiting in the gradient all-reduce for the others."""
        if self.dp == 1:
            return bad
        from megatron.core import parallel_state as ps

        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return bool(flag.item() > 0)

    # -- the recipe's view of parallelism (see models.base.Actor) ---------------------------------------
    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def is_replica_leader(self) -> bool:
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def vocab_shard(self) -> VocabShard:
        """Where `logits_at`'s columns sit: the gathered [N, vocab_size] logits (one device's view), or this
        rank's shard of the padded vocabulary over the TP group."""
        return VocabShard.single(self.vocab_size) if self.gather_logits else self.local_vocab_shard

    def all_reduce_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp > 1:
            from megatron.core import parallel_state as ps

            torch.distributed.all_reduce(tensor, group=ps.get_data_parallel_group())
        return tensor

    def all_gather_dp(self, obj) -> list:
        if self.dp == 1:
            return [obj]
        from megatron.core import parallel_state as ps

        out = [None] * self.dp
        torch.distributed.all_gather_object(out, obj, group=ps.get_data_parallel_group())
        return out

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    @property
    def replica_group(self):
        """The replica's gloo group (builder.replica_wait_group): object hand-offs and waits inside the replica
        go through it, never through an NCCL kernel spinning on a GPU an engine decodes on."""
        from nemo_sdsearch.models.megatron.builder import replica_wait_group

        group = replica_wait_group()
        if group is None:
            from megatron.core import parallel_state as ps

            group = ps.get_model_parallel_group()
        return group

    def broadcast_in_replica(self, obj):
        if self.tp * self.pp == 1:
            return obj
        group = self.replica_group
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(group, 0), group=group)
        return box[0]

    def gather_in_replica(self, obj) -> list | None:
        if self.tp * self.pp == 1:
            return [obj]
        group = self.replica_group
        leader = torch.distributed.get_global_rank(group, 0)
        out = [None] * (self.tp * self.pp) if torch.distributed.get_rank() == leader else None
        torch.distributed.gather_object(obj, out, dst=leader, group=group)
        return out

    @property
    def replica_ranks(self) -> list[int]:
        return list(torch.distributed.get_process_group_ranks(self.replica_group))

    def reduce_metric_sums(self, sums: torch.Tensor) -> torch.Tensor:
        sums = self.broadcast_from_last_stage(sums, tuple(sums.shape), sums.dtype).cpu()
        return self.all_reduce_dp(sums)

    # -- training checkpoints ----------------------------------------------------------------------------
    def save_state(self, checkpoints: Path, step: int, write_loop_state) -> None:
        """Collective: model, optimizer and RNG shards as a Megatron dist checkpoint under `checkpoints`
        (every rank writes its shard), then rank 0 calls `write_loop_state({"megatron": name})`, then a
        barrier, so no rank runs ahead of a half-written checkpoint."""
        from nemo_sdsearch.models.megatron.training_state import save_training_state

        name = f"megatron_step_{step:06d}"
        rank0 = torch.distributed.get_rank() == 0
        if rank0 and (checkpoints / name).exists():
            shutil.rmtree(checkpoints / name)
        save_training_state(checkpoints / name, self, extra={"step": step})  # barriers inside
        if rank0:
            write_loop_state({"megatron": name})
        torch.distributed.barrier()

    def load_state(self, checkpoints: Path, state: dict) -> None:
        """Model, optimizer and every rank's RNG states from the dist checkpoint named in the loop state."""
        from nemo_sdsearch.models.megatron.training_state import load_training_state

        if "megatron" not in state:
            raise ValueError(f"{checkpoints}: the latest checkpoint (step {state['step']}) was written by "
                             "actor=hf; resume it with actor=hf")
        load_training_state(checkpoints / state["megatron"], self)

    def train_on(self, micro_batches, loss_fn) -> dict:
        if self.pp == 1:
            return super().train_on(micro_batches, loss_fn)
        # pp > 1: megatron's schedule; the loss runs on the last stage from its decoder output. A teacher pass is
        # a forward-only schedule that needs every stage, so it cannot run inside the training schedule. The
        # micro-batches go in windows of megatron.teacher_window: one forward-only schedule gives the window's
        # teacher logits (`TeacherPass`es of one scorer, pipelined like training micro-batches), one training
        # schedule runs the window, and its teacher logits are dropped after its backward. A window of w
        # micro-batches fills the pipeline w times per bubble instead of once (the bubble is (pp-1)/(w+pp-1) of
        # each schedule), for w micro-batches of teacher logits resident instead of one.
        batches = [PipelineMicroBatch(mb.batch, mb.rows, mb.cols, {"k": k}) for k, mb in enumerate(micro_batches)]
        step_loss = lambda out, pmb: loss_fn(out.logits(), micro_batches[pmb.extra["k"]])
        if not any(callable(mb.teacher_logits) for mb in micro_batches):
            return self.train_step_pipeline(batches, step_loss)

        def prepare(window):
            todo = [k for k in window if callable(micro_batches[k].teacher_logits)]
            for k, logits in zip(todo, _teacher_logits([micro_batches[k].teacher_logits for k in todo])):
                micro_batches[k].teacher_logits = logits

        def release(window):
            for k in window:
                micro_batches[k].teacher_logits = None

        return self.train_step_pipeline(batches, step_loss, per_window=(self.teacher_window, prepare, release))

    def teacher_logits_window(self, passes) -> list:
        """The logits of several `TeacherPass`es on this actor in ONE forward-only schedule (collective over the
        pipeline): their [N, V] results on the last stage, None on the other stages."""
        if not passes:
            return []
        t0 = time.perf_counter()
        mbs = [PipelineMicroBatch(p.make_batch(), p.rows, p.cols) for p in passes]

        def loss_func_for(hidden, mb):
            return torch.zeros((), device=hidden.device), {"result": LastStageOutputs(self, hidden, mb).logits().detach()}

        with torch.no_grad():
            store = self._run_schedule(mbs, len(mbs), True, loss_func_for)
        timer = passes[0].timer
        if timer is not None:
            timer["teacher_s"] = timer.get("teacher_s", 0.0) + time.perf_counter() - t0
        return [s["result"] for s in store] if self.is_last_stage else [None] * len(mbs)

    def train_step_pipeline(self, batches, loss_fn, n_micro: int | None = None, use_schedule: bool | None = None,
                            per_window=None) -> dict:
        """One optimizer step over `n_micro` micro-batches driven by megatron's forward/backward schedule.

        `batches[i]`: a `PipelineMicroBatch` (the same list on every rank). `loss_fn(outputs, batches[i])`
        runs on the last pipeline stage with `outputs` a `LastStageOutputs` and returns micro-batch i's
        scalar loss; the step back-propagates the SUM of the micro-batch losses, like `train_step`.
        Returns the same stats as `train_step` on every rank. `use_schedule` (default: pp > 1 or CUDA)
        picks the schedule at pp == 1; without it pp == 1 runs the `train_step` loop with the same loss.
        `per_window=(w, prepare, release)`: one schedule call per window of w consecutive micro-batches (gradients
        accumulate over the calls), `prepare(window)` before a window's call (collective: e.g. its teacher passes)
        with the window's micro-batch indices, `release(window)` after.
        """
        n_micro = len(batches) if n_micro is None else n_micro
        if use_schedule is None:
            use_schedule = self.pp > 1 or torch.cuda.is_available()
        if not use_schedule:
            if self.pp > 1:
                raise ValueError("pp > 1 always runs the schedule")

            def micro_loss(i):
                mb = batches[i]
                return loss_fn(LastStageOutputs(self, self._hidden(mb.batch), mb), mb)
            return self.train_step(micro_loss, n_micro)

        self.model.train()
        self._zero()
        losses: list[torch.Tensor] = []

        windows = [list(range(n_micro))] if per_window is None else \
            [list(range(i, min(i + per_window[0], n_micro))) for i in range(0, n_micro, per_window[0])]
        per_call = {k: len(w) for w in windows for k in w}

        def loss_func_for(hidden, mb):
            loss = loss_fn(LastStageOutputs(self, hidden, mb), mb)
            losses.append(loss.detach().reshape(()).double())
            # the schedule divides the loss by num_microbatches before its backward; undo that so that the
            # micro-batch losses are summed as in train_step
            return loss * per_call[index[id(mb)]], {"loss": loss.detach()}

        index = {id(mb): k for k, mb in enumerate(batches[:n_micro])}
        if per_window is None:
            self._run_schedule(batches, n_micro, False, loss_func_for)
        else:
            _, prepare, release = per_window
            for window in windows:
                prepare(window)
                self._run_schedule(batches[window[0]:window[-1] + 1], len(window), False, loss_func_for)
                release(window)
        vec = torch.stack(losses).to(self.device) if self.is_last_stage else None
        vals = self.broadcast_from_last_stage(vec, (n_micro,), torch.float64).tolist()
        bad = [v for v in vals if not math.isfinite(v)]
        if self._any_replica_bad(bool(bad)):
            return self._skip(bad[0] if bad else sum(vals), float("nan"))
        return self._finish(sum(vals))

    def _allreduce_tied_embedding_grad(self):
        """pp > 1, tied embeddings, torch optimizer: sum the gradients of the first stage's embedding and the
        last stage's copy (what `finalize_model_grads` does for Megatron's DDP)."""
        from megatron.core import parallel_state as ps

        if self.pp == 1 or not self.model.share_embeddings_and_output_weights:
            return
        if not (self.model.pre_process or self.model.post_process) or not ps.is_rank_in_embedding_group():
            return
        w = self.model.shared_embedding_or_output_weight()
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        torch.distributed.all_reduce(w.grad, group=ps.get_embedding_group())

    def _finish_torch(self, total: float) -> dict:
        """Gradient sync, global norm, clip and AdamW step of the torch-optimizer path (grads accumulated)."""
        from megatron.core import parallel_state as ps

        self._allreduce_tied_embedding_grad()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.dp > 1:  # average gradients over data-parallel replicas
            group = ps.get_data_parallel_group()
            for p in params:
                torch.distributed.all_reduce(p.grad, group=group)
                p.grad.div_(self.dp)
        sq = self._grad_norm_sq_local(params)
        if self.tp * self.pp > 1:
            torch.distributed.all_reduce(sq, group=ps.get_model_parallel_group())
        norm = sq.sqrt().float()
        if not torch.isfinite(norm):
            return self._skip(total, float(norm))
        if self.grad_clip and self.grad_clip > 0:
            # the same rule as torch.nn.utils.clip_grad_norm_ (coefficient always applied, clamped at 1)
            coef = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
            for p in params:
                p.grad.detach().mul_(coef.to(p.grad.dtype))
        self.optimizer.step()
        self._zero()
        self.model.eval()
        return {"loss": total, "grad_norm": float(norm), "skipped": False}

    # -- GPU: Megatron DDP + DistributedOptimizer (not runnable on CPU) ---------------------------------
    def _init_megatron_optimizer(self, lr, weight_decay, betas, eps, distributed: bool = True):
        """Megatron's mixed-precision optimizer: fp32 main weights and grads behind bf16 model weights;
        `distributed` shards them (and the Adam state) over the data-parallel ranks."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = self.model.config
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   overlap_param_gather=False, use_distributed_optimizer=distributed,
                                                   average_in_collective=True)
        # DDP registers the grad hooks on the parameters of self.model, which we keep calling directly.
        self.ddp = DistributedDataParallel(config=cfg, ddp_config=ddp_config, module=self.model)
        opt_config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay,
                                     adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps,
                                     clip_grad=self.grad_clip or 0.0, bf16=cfg.bf16, fp16=cfg.fp16,
                                     params_dtype=cfg.params_dtype, use_distributed_optimizer=distributed)
        self.optimizer = get_megatron_optimizer(opt_config, [self.ddp])

    def _finish_megatron(self, total: float) -> dict:
        from megatron.core.distributed import finalize_model_grads

        # data-parallel reduce-scatter into the grad buffers, plus the TP all-reduce of the norm weights'
        # gradients under sequence parallelism (and the tied-embedding sync across pipeline stages)
        finalize_model_grads([self.ddp])
        found_inf = self.optimizer.prepare_grads()  # model grads -> fp32 main grads
        norm = float(self.optimizer.get_grad_norm())
        if found_inf or not math.isfinite(norm):
            return self._skip(total, norm)
        if self.grad_clip and self.grad_clip > 0:
            self.optimizer.clip_grad_norm(self.grad_clip)
        self.optimizer.step_with_ready_grads()      # step + copy to model params + param all-gather
        self._zero()
        self.model.eval()
        return {"loss": total, "grad_norm": norm, "skipped": False}

    # -- weights ------------------------------------------------------------------------------------------
    def iter_weights(self):
        """The weight stream (see `Actor.iter_weights`): per HF tensor, its TP parts all-gathered and at
        pp > 1 broadcast from its stage (`checkpoint.qwen2.iter_hf_weights`). A collective: every rank of
        this replica's tp x pp group iterates it to the end, and every one receives every tensor."""
        from nemo_sdsearch.models.megatron.hf_mapping import iter_hf_weights

        return iter_hf_weights(self.model, self.hf_config)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The whole HF state dict at once (the stream collected; a tied `lm_head.weight` is the embedding,
        as in `state_dict()`), on every rank. Holds the full model: for tests and small models."""
        from nemo_sdsearch.models.megatron.hf_mapping import gather_megatron_to_hf

        return gather_megatron_to_hf(self.model, self.hf_config)

    def load_hf_weights(self, hf_state) -> None:
        from nemo_sdsearch.models.megatron.hf_mapping import load_hf_into_megatron

        load_hf_into_megatron(self.model, hf_state, self.hf_config)

    @classmethod
    def from_hf(cls, hf_model_or_dir, tp: int | None = None, dtype=torch.float32, **kwargs) -> MegatronActor:
        """Build this rank's GPTModel from a HF model (or a local HF directory) and wrap it. The parallel
        state must already be initialised (`builder.init_parallel`)."""
        from nemo_sdsearch.models.weights_reader import read_hf_dir
        from nemo_sdsearch.models.megatron.builder import build_gpt_model

        if isinstance(hf_model_or_dir, torch.nn.Module):
            hf_config, state = hf_model_or_dir.config, hf_model_or_dir.state_dict()
        else:
            hf_config, state = read_hf_dir(hf_model_or_dir)
        model = build_gpt_model(hf_config, tp=tp, dtype=dtype)
        actor = cls(model, hf_config, **kwargs)
        actor.load_hf_weights(state)
        return actor
