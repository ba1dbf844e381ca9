"""The `torch` generator backend: any Hugging Face causal LM, on CPU or one GPU.

Every row of a session owns a *slot* of a key/value buffer and its own length: row b's tokens sit at
columns 0 .. len_b - 1 of slot b, with no holes, whatever the other rows did. A forward writes each
row's new tokens at its own offset and attends through a per-row causal mask, so each row computes
exactly what a dense forward of its own tokens would (tested against a full re-forward). This layout
lets rows run *independently*: `run` decodes every live row one token per step, and a row that ends
a turn gets its environment tokens (retrieved passages) prefilled at once, for that row alone, while
the others keep decoding. No row waits for the slowest row of a turn (continuous batching).

Decode steps run the whole buffer (rows that are idle for a step write a dummy token past their end,
which the next real write overwrites); prefills of a few rows run on those rows only. The prompts'
common prefix (the instruction) is encoded once and copied into every slot. Released rows
are compacted away once they are a quarter of the buffer. The LM head runs only on the rows that
need next-token logits.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import torch

from nemo_sdsearch.rollout.generator import Completion, GenerationSession, Generator, SamplingParams, StopChecker


class TorchGenerator(Generator):
    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int] | None = None, device=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_token_ids = list(eos_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def open(self, prompts: Sequence[Sequence[int]], seed: int | None = None) -> "TorchSession":
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        return TorchSession(self, prompts, seed)

    def refit(self, state_dict) -> None:
        self.model.load_state_dict(state_dict)


def _slot_cache():
    """A transformers `Cache` over per-row slots. Before each forward the session sets `slots` (buffer
    rows taking part, None for all) and `starts` (each one's write offset); `update` writes the new
    keys/values there and returns the first `span` columns of those rows for attention."""
    from transformers.cache_utils import DynamicCache

    class SlotCache(DynamicCache):
        def __init__(self):
            super().__init__()
            self.k: list[torch.Tensor] = []
            self.v: list[torch.Tensor] = []
            self.slots: torch.Tensor | None = None
            self.starts: torch.Tensor | None = None
            self.span = 0
            self.n_slots = 0

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.span

        def _ensure(self, layer_idx: int, like: torch.Tensor, need: int) -> None:
            while len(self.k) <= layer_idx:
                self.k.append(None)
                self.v.append(None)
            buf = self.k[layer_idx]
            if buf is not None and buf.shape[2] >= need:
                return
            cap = max(need, 64 if buf is None else 2 * buf.shape[2])
            shape = (self.n_slots, like.shape[1], cap, like.shape[3])
            kb, vb = like.new_zeros(shape), like.new_zeros(shape)
            if buf is not None:
                kb[:, :, :buf.shape[2]] = buf
                vb[:, :, :buf.shape[2]] = self.v[layer_idx]
            self.k[layer_idx], self.v[layer_idx] = kb, vb

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            L = key_states.shape[2]
            self._ensure(layer_idx, key_states, self.span)
            kb, vb = self.k[layer_idx], self.v[layer_idx]
            rows = torch.arange(kb.shape[0], device=kb.device) if self.slots is None else self.slots
            cols = self.starts[:, None] + torch.arange(L, device=kb.device)
            kb.transpose(1, 2)[rows[:, None], cols] = key_states.transpose(1, 2)
            vb.transpose(1, 2)[rows[:, None], cols] = value_states.transpose(1, 2)
            if self.slots is None:
                return kb[:, :, :self.span], vb[:, :, :self.span]
            return kb.index_select(0, rows)[:, :, :self.span], vb.index_select(0, rows)[:, :, :self.span]

        def broadcast(self, src: int, upto: int) -> None:
            """Copy the first `upto` columns of slot `src` into every slot."""
            for kb, vb in zip(self.k, self.v):
                kb[:, :, :upto] = kb[src:src + 1, :, :upto]
                vb[:, :, :upto] = vb[src:src + 1, :, :upto]

        def keep(self, slots: torch.Tensor) -> None:
            self.k = [b.index_select(0, slots) for b in self.k]
            self.v = [b.index_select(0, slots) for b in self.v]
            self.n_slots = int(slots.numel())

    return SlotCache()


def _cache_kwarg(decoder) -> str:
    """The keyword under which `decoder.forward` takes its KV cache: `cache` from transformers 5.24 on
    (`past_key_values` still works there but warns, and goes in 5.40), `past_key_values` before 5.24.
    Read from the signature, not the version, so a model whose forward is not migrated yet keeps
    working; passing the wrong name is not an option, since before 5.24 an unknown `cache=` would
    vanish into the forward's **kwargs and the slot cache would silently not be used."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator):
    """Sampled ids and their log-probs under log_softmax(logits / T)."""
    logits = logits.float()
    if params.temperature == 0:
        ids = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        logp = torch.log_softmax(logits / params.temperature, -1)
        probs = logp.exp()
        if params.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the first
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        ids = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class _Turn:
    """One row's turn in progress."""

    __slots__ = ("params", "checker", "ids", "logprobs")

    def __init__(self, params: SamplingParams, checker: StopChecker):
        self.params, self.checker, self.ids, self.logprobs = params, checker, [], []


class TorchSession(GenerationSession):
    def __init__(self, owner: TorchGenerator, prompts: Sequence[Sequence[int]], seed: int | None):
        self.g = owner
        self.model = owner.model
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        self.device = owner.device
        self.dtype = next(self.model.parameters()).dtype
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(0 if seed is None else seed)
        B = len(prompts)
        self._slot_row: list[int | None] = list(range(B))  # slot -> row id (None: released)
        self._slot_of: dict[int, int] = {r: r for r in range(B)}
        self._lengths = [0] * B  # per row id
        self.cache = _slot_cache()
        self.cache.n_slots = B
        self._cache_kw = _cache_kwarg(self.decoder)
        self.lens = torch.zeros(B, dtype=torch.long, device=self.device)  # per slot
        self.last_logits = torch.zeros((B, self.lm_head.out_features), device=self.device)
        self._checkers: dict[tuple, StopChecker] = {}
        # Prefix sharing: the prompts' common prefix (the instruction) is encoded once and copied into
        # every slot; each row then prefills only its own suffix (at least one token, for its logits).
        shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        if B > 1 and shared >= 8:
            self._forward({0: prompts[0][:shared]})
            with torch.inference_mode():
                self.cache.broadcast(0, shared)
                self.lens.fill_(shared)
            self._lengths = [shared] * B
            prompts = [p[shared:] for p in prompts]
        self._forward({r: p for r, p in enumerate(prompts)})

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        return [r for r in self._slot_row if r is not None]

    def length(self, row: int) -> int:
        if row not in self._slot_of:
            raise KeyError(f"row {row} is not live in this session")
        return self._lengths[row]

    def _checker(self, params: SamplingParams) -> StopChecker:
        key = tuple(params.stop)
        if key not in self._checkers:
            self._checkers[key] = StopChecker(self.g.tokenizer, params.stop, self.g.eos_token_ids)
        return self._checkers[key]

    def _turn(self, params: SamplingParams) -> _Turn:
        return _Turn(params, self._checker(params))

    def _compact(self) -> None:
        live = [s for s, r in enumerate(self._slot_row) if r is not None]
        index = torch.tensor(live, dtype=torch.long, device=self.device)
        self.cache.keep(index)
        self.lens = self.lens[index]
        self.last_logits = self.last_logits[index]
        self._slot_row = [self._slot_row[s] for s in live]
        self._slot_of = {r: s for s, r in enumerate(self._slot_row)}

    @torch.inference_mode()
    def _forward(self, chunks: Mapping[int, Sequence[int]]) -> None:
        """Append each row's tokens at its own offset; refresh the next-token logits of those rows.

        One-token steps over most of the buffer run on all slots (no gather); otherwise only the
        slots in `chunks` take part."""
        chunks = {self._slot_of[r]: toks for r, toks in chunks.items() if len(toks)}
        if not chunks:
            return
        n_slots = len(self._slot_row)
        L = max(len(t) for t in chunks.values())
        everyone = L == 1 and 2 * len(chunks) >= n_slots
        slots = list(range(n_slots)) if everyone else sorted(chunks)
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        n = torch.tensor([len(chunks.get(s, ())) for s in slots], dtype=torch.long)
        ids = torch.full((len(slots), L), self.g.pad_id, dtype=torch.long)
        for j, s in enumerate(slots):
            toks = chunks.get(s)
            if toks:
                ids[j, :len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
                self._lengths[self._slot_row[s]] += len(toks)
        ids, n = ids.to(self.device), n.to(self.device)
        starts = self.lens if everyone else self.lens[index]
        offsets = torch.arange(L, device=self.device)
        pos = starts[:, None] + offsets
        span = int(starts.max()) + L
        # Query j of a row sees columns 0 .. start + j of its own slot: causal, and never anything
        # written past its end (other rows' dummy writes, or the padding of this chunk).
        allowed = torch.arange(span, device=self.device)[None, None, :] <= pos[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        mask = mask[:, None]
        self.cache.slots = None if everyone else index
        self.cache.starts = starts
        self.cache.span = span
        masks = {"full_attention": mask, "sliding_attention": mask}
        out = self.decoder(input_ids=ids, attention_mask=masks, position_ids=pos, use_cache=True,
                           **{self._cache_kw: self.cache})
        took = (n > 0).nonzero().squeeze(-1)
        hidden = out.last_hidden_state[took, n[took] - 1]
        self.last_logits[index[took]] = self.lm_head(hidden).float()
        if everyone:
            self.lens += n
        else:
            self.lens[index] += n

    def _decode_step(self, turns: dict[int, _Turn]) -> dict[int, Completion]:
        """Sample one token for every row in `turns`, feed it, and return the rows whose turn ended."""
        rows = sorted(turns, key=self._slot_of.__getitem__)
        fed: dict[int, list[int]] = {}
        finished: dict[int, Completion] = {}
        groups: dict[tuple[float, float], list[int]] = {}
        for r in rows:
            p = turns[r].params
            groups.setdefault((p.temperature, p.top_p), []).append(r)
        for group in groups.values():
            index = torch.tensor([self._slot_of[r] for r in group], dtype=torch.long, device=self.device)
            tok, lp = _sample(self.last_logits[index], turns[group[0]].params, self.gen)
            for r, t, l in zip(group, tok.tolist(), lp.tolist()):
                turn = turns[r]
                turn.ids.append(t)
                turn.logprobs.append(l)
                fed[r] = [t]
                reason, stop = turn.checker.check(turn.ids)
                if reason is None and len(turn.ids) >= turn.params.max_new_tokens:
                    reason = "length"
                if reason is not None:
                    finished[r] = Completion(turn.ids, turn.logprobs, reason, stop)
        # Every sampled token is fed, so the cache always holds the whole context.
        self._forward(fed)
        return finished

    # -- the seam ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, params: SamplingParams) -> dict[int, Completion]:
        turns = {r: self._turn(params) for r in self.rows}
        done: dict[int, Completion] = {}
        while turns:
            for r, c in self._decode_step(turns).items():
                done[r] = c
                del turns[r]
        return done

    def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
        for r in tokens:
            if r not in self._slot_of:
                raise KeyError(f"row {r} is not live in this session")
        self._forward(tokens)

    @torch.inference_mode()
    def run(self, params_for: Callable[[int], SamplingParams],
            on_turn: Callable[[dict[int, Completion]], Mapping[int, Sequence[int] | None]]) -> None:
        """Continuous batching: every row runs its own turns; see `GenerationSession.run`."""
        turns = {r: self._turn(params_for(r)) for r in self.rows}
        while turns:
            finished = self._decode_step(turns)
            if not finished:
                continue
            env = on_turn(finished)
            done, extend = [], {}
            for r in finished:
                toks = env.get(r)
                if toks is None:
                    done.append(r)
                    del turns[r]
                    continue
                if len(toks):
                    extend[r] = toks
                turns[r] = self._turn(params_for(r))
            self.release(done)
            self._forward(extend)

    def release(self, rows: Sequence[int]) -> None:
        for r in rows:
            s = self._slot_of.pop(r, None)
            if s is not None:
                self._slot_row[s] = None
        dead = sum(r is None for r in self._slot_row)
        if dead and (8 * dead >= len(self._slot_row) or dead == len(self._slot_row)):
            self._compact()
