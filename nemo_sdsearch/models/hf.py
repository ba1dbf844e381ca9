"""Loading Hugging Face causal LMs and tokenizers from local directories (never from a hub)."""

from __future__ import annotations

from pathlib import Path

from nemo_sdsearch.losses.vocab_parallel import token_logprobs
from nemo_sdsearch.models.base import Actor
from nemo_sdsearch.models.offload import Parkable


def default_dtype(device: str, training: bool):
    """The parameter dtype to load a model in: fp32 for any model that is trained (fp32 master weights;
    the forward runs under bf16 autocast on CUDA), bf16 for inference-only copies on CUDA, else fp32."""
    import torch

    if training or not str(device).startswith("cuda"):
        return torch.float32
    return torch.bfloat16


def load_model_and_tokenizer(path: str | Path, device: str | None = None, dtype=None, training: bool = False):
    """Model (in eval mode, on `device`) and tokenizer from a local HF directory. `training=True` loads
    fp32 parameters on every device (see `default_dtype`); an explicit `dtype` wins."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); give a local path "
                                "holding a Hugging Face causal LM (nothing is downloaded at run time)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = default_dtype(device, training)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, tokenizer


SHARED_PREFIX_MIN = 16   # tokens: what sharing fewer would save does not pay for another forward


def _lcp(ids, lengths, a: int, b: int) -> int:
    """The common prefix of rows a and b, stopping one short of the shorter (each keeps a token of its own)."""
    n = min(int(lengths[a]), int(lengths[b])) - 1
    return int((ids[a, :n] == ids[b, :n]).long().cumprod(0).sum()) if n > 0 else 0


def prefix_groups(ids, lengths, min_prefix: int = SHARED_PREFIX_MIN) -> tuple[int, list[tuple[list[int], int]]]:
    """(common, runs): `common`, the prefix every row shares (0 when under `min_prefix`), and the runs of
    consecutive rows that share at least `min_prefix` more tokens than that, each with its own prefix length
    (SD-Search's teacher sequences: the instruction is common; a group's question and hindsight block make a
    run). A row in no run stands alone as ([row], common)."""
    B = ids.shape[0]
    common = min((_lcp(ids, lengths, 0, i) for i in range(1, B)), default=0)
    common = common if common >= min_prefix else 0
    runs: list[tuple[list[int], int]] = []
    for i in range(B):
        if runs:
            rows, p = runs[-1]
            shared = min(_lcp(ids, lengths, rows[0], i), p if len(rows) > 1 else ids.shape[1])
            if shared >= common + min_prefix:
                runs[-1] = (rows + [i], shared)
                continue
        runs.append(([i], common))
    return common, [(rows, p if len(rows) > 1 else common) for rows, p in runs]


def shared_prefix_hidden(decoder, batch, min_prefix: int = SHARED_PREFIX_MIN):
    """The decoder's last hidden states of a right-padded batch, [B, T, d], as one forward of the batch would give
    them (up to float rounding), each shared prefix encoded once (`prefix_groups`): the common prefix as one row,
    whose keys and values (a transformers cache) every run then extends by its own prefix, again as one row; the
    run's rows (and the rows in no run, together) encode only what is theirs after it. Padding positions hold
    nothing meaningful (as in a forward of the batch). Without anything shared: one forward of the batch."""
    import copy

    import torch
    from transformers import DynamicCache

    from nemo_sdsearch.rollout.torch_generator import _cache_kwarg

    ids, mask = batch.input_ids, batch.attention_mask
    lengths = mask.sum(1)
    common, runs = prefix_groups(ids, lengths, min_prefix)
    if common == 0 and all(len(rows) == 1 for rows, _ in runs):
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    kw = _cache_kwarg(decoder)
    out = None

    def forward(rows: list[int], start: int, end: int, cache):
        """Rows' tokens start..end (end None: each row's own end) after `cache` (their first `start` tokens)."""
        nonlocal out
        idx = torch.tensor(rows, device=ids.device)
        stop = int(lengths[idx].max()) if end is None else end
        m = torch.cat([mask.new_ones(len(rows), start), mask[idx, start:stop]], 1)
        pos = torch.arange(start, stop, device=ids.device).expand(len(rows), -1)
        h = decoder(input_ids=ids[idx, start:stop], attention_mask=m, position_ids=pos, use_cache=True,
                    **{kw: cache}).last_hidden_state
        if out is None:
            out = h.new_zeros(*ids.shape, h.shape[-1])
        out[idx, start:stop] = h.to(out.dtype)

    def cache_for(n: int, first: int, upto: int, base):
        """A cache of the first `upto` tokens of row `first` (extending `base`, the common prefix's), for n rows."""
        cache = copy.deepcopy(base) if base is not None else DynamicCache()
        start = common if base is not None else 0
        if upto > start:
            forward([first], start, upto, cache)
        cache.batch_repeat_interleave(n)
        return cache

    base = None
    if common:
        base = DynamicCache()
        forward([0], 0, common, base)
        out[:, :common] = out[0, :common]
    alone = [rows[0] for rows, _ in runs if len(rows) == 1]
    if alone:
        forward(alone, common, None, cache_for(len(alone), alone[0], common, base))
    for rows, p in runs:
        if len(rows) > 1:
            forward(rows, p, None, cache_for(len(rows), rows[0], p, base))
            out[rows, common:p] = out[rows[0], common:p]
    return out


class HFScorer(Parkable):
    """Logits and log-probs at selected positions of a transformers causal LM (no optimizer).

    The LM head runs only on requested rows: the decoder gives hidden states, we gather the rows, then
    apply the output embedding. bf16 autocast on GPU, fp32 on CPU.
    """

    def __init__(self, model, device=None):
        import torch

        self.torch = torch
        self.model = model
        self.device = device or next(model.parameters()).device
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.autocast = torch.device(self.device).type == "cuda"

    # -- forward pieces --------------------------------------------------------------------------
    def _hidden(self, batch):
        torch = self.torch
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.last_hidden_state

    def logits_at(self, batch, rows, cols):
        hidden = self._hidden(batch)
        h = hidden[rows, cols - 1]
        with self.torch.autocast("cuda", dtype=self.torch.bfloat16, enabled=self.autocast):
            return self.lm_head(h).float()

    def teacher_logits_at(self, batch, rows, cols):
        """`logits_at` under no_grad, each common prefix encoded once: rows that begin alike (SD-Search's teacher
        sequences of one group share the instruction, the question and the hindsight block; OPSD's teachers of
        one question, the instruction and the question) run their prefix as one row, whose keys and values the
        rows then share for their own suffixes (`shared_prefix_hidden`)."""
        torch = self.torch
        with torch.no_grad():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                hidden = shared_prefix_hidden(self.decoder, batch)
                return self.lm_head(hidden[rows, cols - 1]).float()

    def logprobs_at(self, batch, rows, cols, temperature: float = 1.0, with_grad: bool = True):
        torch = self.torch
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            logits = self.logits_at(batch, rows, cols)
            return token_logprobs(logits, batch.input_ids[rows, cols], temperature)

    def copy_weights_from(self, other) -> None:
        """Take `other`'s (an HFScorer / HFActor of the same architecture) current weights."""
        for who in (self, other):
            _refuse_in_adapter_mode(who, "copy_weights_from")
        with self.torch.no_grad():
            for mine, theirs in zip(self.model.state_dict().values(), other.model.state_dict().values(), strict=True):
                mine.copy_(theirs)

    def load_weights_from_dir(self, path) -> None:
        """The weights of a HF directory's safetensors files, tensor by tensor (tied aliases follow)."""
        from nemo_sdsearch.models.weights_reader import hf_tensor_reader

        _refuse_in_adapter_mode(self, "load_weights_from_dir")   # (the adapted layers' names are not the file's)
        _, get = hf_tensor_reader(path)
        state = self.model.state_dict()
        with self.torch.no_grad():
            for name in get.names():
                if name in state:
                    state[name].copy_(get(name))


def _refuse_in_adapter_mode(scorer, what: str) -> None:
    if getattr(scorer, "peft", None) is not None:
        raise RuntimeError(f"{what} on an actor in adapter mode: merge_adapter() first")


class AdapterOff:
    """The teacher of an `HFActor` in adapter mode: the same model with the adapter disabled (peft's
    `disable_adapter()`), i.e. the weights the adapter started from (NeMo-Aligner's pattern: the reference
    logits of the adapted model with its adapter off; no second copy of the model). A scorer as a
    `TeacherPass` wants one: `teacher_logits_at` (no grad, shared prefixes encoded once)."""

    def __init__(self, actor: "HFActor"):
        self.actor = actor

    def teacher_logits_at(self, batch, rows, cols):
        if self.actor.peft is None:
            raise RuntimeError("the adapter-off teacher of an actor whose adapter was merged")
        with self.actor.peft.disable_adapter():
            return self.actor.teacher_logits_at(batch, rows, cols)


class HFActor(HFScorer, Actor):
    """`Actor` over a transformers causal LM: AdamW, gradient clipping, micro-batches with gradient
    accumulation (`train_step`), the teacher pass with the same weights under no_grad.

    The trained parameters must be fp32 (master weights): a plain AdamW on bf16 weights at lr 1e-6
    moves about 1% of them (most updates are below half a bf16 ulp) in a direction nearly orthogonal to
    the fp32 update. On CUDA the forward runs under bf16 autocast, so the speed is bf16's.

    Adapter mode (Search-E1's LoRA OPSD round): `enable_adapter` puts a peft LoRA adapter on the model in place,
    after which only the adapter trains (the same `train_on` / `train_step`: optimizer, clipping, non-finite
    skips), every forward (and a generator sharing the model) runs with the adapter on, `adapter_off()` is the
    teacher with it off, `iter_weights` streams the merged weights; `merge_adapter` folds it into the fp32
    weights and ends the mode."""

    peft = None   # the PeftModel wrapping `model` in adapter mode, else None

    def __init__(self, model, lr: float = 1e-6, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 grad_clip: float = 1.0, device=None):
        from nemo_sdsearch.models.base import require_fp32_params

        super().__init__(model, device)
        require_fp32_params(model.named_parameters(), "HFActor",
                            "load it with load_model_and_tokenizer(..., training=True)")
        self.grad_clip = grad_clip
        self._adamw = dict(weight_decay=weight_decay, betas=tuple(betas))
        self.reset_optimizer(lr)

    def reset_optimizer(self, lr: float) -> None:
        self.optimizer = self.torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                                **self._adamw)

    def train_step(self, micro_batch_losses, n_micro: int) -> dict:
        self.model.train()
        try:
            return self._train_step(micro_batch_losses, n_micro)
        finally:
            self.model.eval()   # a skipped step too: the generator sharing the model samples in eval mode

    def _train_step(self, micro_batch_losses, n_micro: int) -> dict:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(n_micro):
            loss = micro_batch_losses(i)
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return {"loss": float(loss.detach()), "grad_norm": float("nan"), "skipped": True}
            loss.backward()
            total += float(loss.detach())
        params = [p for p in self.model.parameters() if p.grad is not None]
        # grad_clip <= 0: no clipping (the norm is still measured, and a non-finite one skips the step)
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": total, "grad_norm": float(norm), "skipped": True}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": float(norm), "skipped": False}

    # -- adapter mode -------------------------------------------------------------------------------
    def enable_adapter(self, wrap) -> None:
        """Adapter mode: `wrap(model)` puts a (plain LoRA) peft adapter on the model in place and returns the
        PeftModel (`peft.get_peft_model`; its init draws from torch's RNG, so seed it first for a reproducible
        adapter). peft freezes every other weight, so from here the optimizer (a fresh one, at the current
        learning rate) trains the adapter alone."""
        if self.peft is not None:
            raise RuntimeError("enable_adapter: the actor is in adapter mode already")
        lr = self.optimizer.param_groups[0]["lr"]
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        peft_model = wrap(self.model)
        if peft_model.get_base_model() is not self.model:
            raise ValueError("enable_adapter: `wrap` must adapt the actor's own model in place (get_peft_model)")
        self.peft = peft_model
        self.reset_optimizer(lr)

    def adapter_off(self) -> AdapterOff:
        """The adapter-off teacher (`AdapterOff`): the weights the adapter started from, under no grad."""
        if self.peft is None:
            raise RuntimeError("adapter_off: the actor is not in adapter mode (enable_adapter)")
        return AdapterOff(self)

    def adapter_state(self) -> dict:
        """A copy of the adapter's weights (a few MB: a round keeps its best one in memory)."""
        return {k: v.detach().clone() for k, v in self.peft.state_dict().items() if "lora_" in k}

    def merge_adapter(self, state: dict | None = None) -> None:
        """End adapter mode: the adapter (`state`, an `adapter_state()`, when given) merged into the fp32
        weights (W + B A alpha / r, the weights `iter_weights` streamed in adapter mode, bit for bit), the
        model's own modules back in place, every weight that trained before trainable again, and a fresh
        optimizer at the current learning rate over them."""
        if self.peft is None:
            raise RuntimeError("merge_adapter: the actor is not in adapter mode (enable_adapter)")
        if state is not None:
            self.peft.load_state_dict(state, strict=False)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.peft.merge_and_unload() is not self.model:
            raise RuntimeError("merge_and_unload did not give the actor's model back")
        self.peft = None
        for p in self._trainable:
            p.requires_grad_(True)
        self._trainable = []
        self.reset_optimizer(lr)

    def _named_weights(self):
        """(HF name, tensor) of every state-dict entry, tied aliases included. In adapter mode the adapted
        layers' weights are merged on the fly (base + peft's own delta, as `merge_and_unload` computes it)
        under their plain names, and the adapter's own tensors are left out."""
        state = self.model.state_dict()
        if self.peft is None:
            yield from ((k, v.detach()) for k, v in state.items())
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        tuned = {name: m for name, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)}
        for name, tensor in state.items():
            parts = name.split(".")
            owner = next((o for o in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if o in tuned), None)
            if owner is None:
                yield name, tensor.detach()
                continue
            rest = name[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue    # lora_A / lora_B: the adapter itself
            plain = owner + "." + rest[len("base_layer."):]
            layer = tuned[owner]
            if rest == "base_layer.weight" and not layer.disable_adapters and not layer.merged:
                with self.torch.no_grad():
                    merged = tensor.detach()
                    for adapter in layer.active_adapters:
                        if adapter in getattr(layer, "lora_variant", {}):
                            raise NotImplementedError(f"iter_weights: the {adapter} adapter of {owner} is not plain "
                                                      "LoRA (DoRA and other variants are not merged here)")
                        merged = merged + layer.get_delta_weight(adapter)
                yield plain, merged
            else:
                yield plain, tensor.detach()

    def save_state(self, checkpoints: Path, step: int, write_loop_state) -> None:
        """The model and optimizer go into the loop state's own file (one process)."""
        _refuse_in_adapter_mode(self, "save_state")
        write_loop_state({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def load_state(self, checkpoints: Path, state: dict) -> None:
        _refuse_in_adapter_mode(self, "load_state")
        if "model" not in state:
            raise ValueError(f"{checkpoints}: the latest checkpoint (step {state['step']}) was written by "
                             "actor=megatron; resume it with actor=megatron")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # torch.load's storages cannot be resized, so offload.* could not park them: the state gets its own memory
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if hasattr(v, "untyped_storage"):
                    st[k] = v.clone()

    @property
    def hf_config(self):
        return self.model.config

    def iter_weights(self):
        """The model's state dict as the weight stream (no copies: the tensors ARE the parameters; in adapter
        mode the adapted layers' merged weights are new tensors), each tensor once: an alias of one already
        yielded (a tied `lm_head.weight`) is left out."""
        seen: set[tuple] = set()
        for name, tensor in self._named_weights():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            yield name, tensor

    def export_weights(self):
        """The state dict (tied aliases included) as detached tensors sharing the parameters' memory (the
        merged ones in adapter mode: `iter_weights`)."""
        return dict(self._named_weights())
