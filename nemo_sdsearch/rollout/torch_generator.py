"""The `torch` generator backend: any Hugging Face causal LM, on CPU or one GPU.

Rows and slots. A session's rows (one per prompt) share a *pool* of at most `max_concurrent_rows`
KV slots. A row that holds a slot has its tokens at columns 0 .. len - 1 of the slot, with no holes,
whatever the other rows did; the other rows wait in a queue, as plain token lists. A forward writes each
row's new tokens at its own offset and attends through a per-row causal mask, so each row computes what
a dense forward of its own tokens would (tested against a full re-forward). Rows run *independently*:
`run` decodes every row in the pool one token per step, and a row that ends a turn gets its environment
tokens (retrieved passages) prefilled at once, for that row alone, while the others keep decoding (no
row waits for the slowest row of a turn: continuous batching). A row that is done frees its slot, and
the next waiting row is admitted there (its context prefilled into the slot) in the same forward. The
KV buffers, the next-token logits and every forward are sized by the pool, never by the number of rows,
so a session of 2,560 rollouts takes the memory of `max_concurrent_rows` of them.

`generate` (one turn for every live row) works with any number of rows too: when rows still wait for
the turn, a row that has taken it is parked (its slot freed, its tokens kept) and prefilled again when
it is next admitted.

Decode steps run the whole buffer (rows that are idle for a step write a dummy token past their end,
which the next real write overwrites); prefills of a few rows run on those rows only. The prompts'
common prefix (the instruction) is encoded once and copied into each slot as its row is admitted. Once
no row waits, released slots are compacted away when they are an eighth of the buffer. The LM head runs
only on the rows that need next-token logits.

Sampling is per row: row r of a session with seed s draws its n-th uniform from a counter-based hash of
(s, r, n) and samples by inverse CDF, so what a row samples does not depend on which rows share its
batch or on the pool size (up to float rounding of the logits, which batched matmuls do not promise to
keep bit-equal across batch shapes).
"""

from __future__ import annotations

import inspect
from itertools import islice
from typing import Callable, Iterable, Mapping, Sequence

import torch

from nemo_sdsearch.rollout.generator import (MASK64, Completion, GenerationSession, Generator, SamplingParams,
                                             StopChecker, mix_seed, splitmix64)

def row_key(session_seed: int | None, row: int) -> int:
    """The random stream of one row: a hash of (session seed, row index)."""
    return mix_seed(session_seed, row)


def row_uniform(key: int, n: int) -> float:
    """The n-th uniform in [0, 1) of the stream `key` (SplitMix64 at counter n: no state to carry)."""
    return (splitmix64((key + n * 0x9E3779B97F4A7C15) & MASK64) >> 11) * 2.0 ** -53


class TorchGenerator(Generator):
    """`max_concurrent_rows`: KV slots per session (the pool); None or 0: one slot per row."""

    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int] | None = None, device=None,
                 max_concurrent_rows: int | None = 256):
        if max_concurrent_rows is not None and max_concurrent_rows < 0:
            raise ValueError(f"max_concurrent_rows must be >= 1 (or 0 / None: unbounded), got {max_concurrent_rows}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_token_ids = list(eos_token_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        self.max_concurrent_rows = max_concurrent_rows or None

    def open(self, prompts: Sequence[Sequence[int]], seed: int | None = None,
             row_seeds: Sequence[int] | None = None) -> "TorchSession":
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
        return TorchSession(self, prompts, seed, row_seeds)

    @torch.no_grad()
    def refit(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new weights into the model in place, one tensor at a time, from a weight stream of
        (HF name, tensor) pairs (`Actor.iter_weights`) or a Mapping: nothing is gathered, so a stream
        that makes each tensor as it is asked for holds one at a time. Every parameter and buffer of
        `model.state_dict()` must come exactly once; tied tensors (the LM head of tied embeddings) under
        either name or both. A bad tensor (unknown name, repeated, wrong shape) is reported after the
        stream has been consumed to its end, since producing it may be a collective on other ranks."""
        targets = self.model.state_dict(keep_vars=True)
        tensor_id = {name: id(t) for name, t in targets.items()}  # tied names share one tensor
        given: set[str] = set()
        error = None
        for name, value in (weights.items() if isinstance(weights, Mapping) else weights):
            target = targets.get(name)
            if error is not None or (target is None and name.endswith("rotary_emb.inv_freq")):
                continue  # after an error: drain the stream; inv_freq is derived from the config
            if target is None:
                error = (f"{name!r} is not a parameter or buffer of the generation model "
                         f"({type(self.model).__name__}); expected Hugging Face names such as "
                         f"{', '.join(list(targets)[:3])}")
            elif name in given:
                error = f"{name!r} was given twice"
            elif tuple(value.shape) != tuple(target.shape):
                error = f"{name!r} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}"
            else:
                target.copy_(value)
                given.add(name)
        loaded = {tensor_id[name] for name in given}
        missing = []  # one name per tensor not loaded
        for name, i in tensor_id.items():
            if i not in loaded:
                missing.append(name)
                loaded.add(i)
        if error is None and missing:
            error = f"{len(missing)} tensor(s) of the model were not given: {', '.join(missing[:5])}"
        if error is not None:
            raise ValueError(f"refit: {error}. The model may now mix old and new weights: refit it again with "
                             "a complete weight stream")


def _slot_cache():
    """A transformers `Cache` over per-row slots. Before each forward the session sets `slots` (buffer
    rows taking part, None for all) and `starts` (each one's write offset); `update` writes the new
    keys/values there and returns the first `span` columns of those rows for attention. `peak_bytes`
    is the most memory its key/value buffers (with the shared prefix) ever held at once."""
    from transformers.cache_utils import DynamicCache

    class SlotCache(DynamicCache):
        def __init__(self):
            super().__init__()
            self.k: list[torch.Tensor] = []
            self.v: list[torch.Tensor] = []
            self.prefix: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: the shared prefix's k, v
            self.slots: torch.Tensor | None = None
            self.starts: torch.Tensor | None = None
            self.span = 0
            self.n_slots = 0
            self.peak_bytes = 0

        @property
        def nbytes(self) -> int:
            return (sum(b.nbytes for b in self.k + self.v if b is not None)
                    + sum(k.nbytes + v.nbytes for k, v in self.prefix))

        def _allocated(self, extra: int = 0) -> None:
            self.peak_bytes = max(self.peak_bytes, self.nbytes + extra)

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
            self._allocated(kb.nbytes + vb.nbytes)  # the old buffers live until the copy is done
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

        def save_prefix(self, src: int, upto: int) -> None:
            """Keep the first `upto` columns of slot `src`: the prefix that `load_prefix` copies."""
            self.prefix = [(kb[src, :, :upto].clone(), vb[src, :, :upto].clone()) for kb, vb in zip(self.k, self.v)]
            self._allocated()

        def load_prefix(self, slots: torch.Tensor) -> None:
            for (pk, pv), kb, vb in zip(self.prefix, self.k, self.v):
                kb[slots, :, :pk.shape[1]] = pk
                vb[slots, :, :pv.shape[1]] = pv

        def keep(self, slots: torch.Tensor) -> None:
            """Keep only `slots`, in order. Layer by layer: the old buffer of a layer goes as soon as its
            copy exists, so compaction costs one layer's copy on top of the buffers, not a second set."""
            for bufs in (self.k, self.v):
                for i, b in enumerate(bufs):
                    kept = b.index_select(0, slots)
                    self._allocated(kept.nbytes)
                    bufs[i] = kept
                    del b, kept
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


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight exceeds u * total (never a zero-weight index)."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def _sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor | None):
    """Sampled ids and their log-probs under log_softmax(logits / T). Row i samples by inverse CDF at
    the uniform u[i] (unused when greedy), so its draw depends on nothing but its own logits and u[i]."""
    logits = logits.float()
    if params.temperature == 0:
        ids = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1)
    else:
        logp = torch.log_softmax(logits / params.temperature, -1)
        probs = logp.exp()
        if params.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
            keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the first
            ids = order.gather(-1, _inverse_cdf(sorted_p * keep, u)[:, None]).squeeze(-1)
        else:
            ids = _inverse_cdf(probs, u)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class _Turn:
    """One row's turn in progress."""

    __slots__ = ("params", "checker", "ids", "logprobs")

    def __init__(self, params: SamplingParams, checker: StopChecker):
        self.params, self.checker, self.ids, self.logprobs = params, checker, [], []


class TorchSession(GenerationSession):
    def __init__(self, owner: TorchGenerator, prompts: Sequence[Sequence[int]], seed: int | None,
                 row_seeds: Sequence[int] | None = None):
        self.g = owner
        self.model = owner.model
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        self.device = owner.device
        self.dtype = next(self.model.parameters()).dtype
        B = len(prompts)
        n_slots = min(B, owner.max_concurrent_rows or B)
        self._context: list[list[int] | None] = [list(p) for p in prompts]  # per row id: all its tokens
        self._keys = [row_key(seed, r) for r in range(B)] if row_seeds is None else [row_key(s, 0) for s in row_seeds]
        self._draws = [0] * B  # per row id: uniforms drawn so far
        self._waiting: dict[int, None] = dict.fromkeys(range(B))  # rows without a slot, in admission order
        self._slot_row: list[int | None] = [None] * n_slots  # slot -> row id (None: free)
        self._slot_of: dict[int, int] = {}
        self.cache = _slot_cache()
        self.cache.n_slots = n_slots
        self._cache_kw = _cache_kwarg(self.decoder)
        self.lens = torch.zeros(n_slots, dtype=torch.long, device=self.device)  # per slot
        self.last_logits = torch.zeros((n_slots, self.lm_head.out_features), device=self.device)
        self._checkers: dict[tuple, StopChecker] = {}
        # Prefix sharing: the prompts' common prefix (the instruction) is encoded once and copied into
        # each slot at admission; each row then prefills only its own suffix (at least one token, for
        # its logits).
        self._shared = 0
        shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        if B > 1 and shared >= 8:
            self._forward_slots({0: prompts[0][:shared]})
            self.cache.save_prefix(0, shared)
            self._shared = shared
        self._forward(self._admit())

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        return sorted([*self._slot_of, *self._waiting])

    @property
    def kv_peak_bytes(self) -> int:
        """The most memory the session's key/value buffers held at once."""
        return self.cache.peak_bytes

    def _live(self, row: int) -> bool:
        return row in self._slot_of or row in self._waiting

    def length(self, row: int) -> int:
        if not self._live(row):
            raise KeyError(f"row {row} is not live in this session")
        return len(self._context[row])

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
    def _admit(self, limit: int | None = None) -> dict[int, list[int]]:
        """Give free slots to waiting rows (at most `limit`), in queue order. Returns what each admitted
        row still has to prefill (all its context after the shared prefix, which is copied in here)."""
        free = [s for s, r in enumerate(self._slot_row) if r is None]
        n = min(len(free), len(self._waiting), len(free) if limit is None else limit)
        if n == 0:
            return {}
        rows = list(islice(self._waiting, n))
        slots = free[:n]
        for r, s in zip(rows, slots):
            del self._waiting[r]
            self._slot_row[s], self._slot_of[r] = r, s
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        if self._shared:
            self.cache.load_prefix(index)
        self.lens[index] = self._shared
        return {r: self._context[r][self._shared:] for r in rows}

    def _park(self, row: int) -> None:
        """Free a row's slot and queue it again; its tokens are prefilled anew at its next admission."""
        self._slot_row[self._slot_of.pop(row)] = None
        self._waiting[row] = None

    def _forward(self, chunks: Mapping[int, Sequence[int]]) -> None:
        """Append tokens to rows that hold slots (the tokens are already in the rows' contexts)."""
        self._forward_slots({self._slot_of[r]: toks for r, toks in chunks.items()})

    @torch.inference_mode()
    def _forward_slots(self, chunks: Mapping[int, Sequence[int]]) -> None:
        """Append each slot's tokens at its own offset; refresh the next-token logits of those slots.

        One-token steps over most of the buffer run on all slots (no gather); otherwise only the
        slots in `chunks` take part."""
        chunks = {s: toks for s, toks in chunks.items() if len(toks)}
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
        ids, n = ids.to(self.device), n.to(self.device)
        starts = self.lens if everyone else self.lens[index]
        offsets = torch.arange(L, device=self.device)
        pos = starts[:, None] + offsets
        span = int(starts.max()) + L
        # Query j of a row sees columns 0 .. start + j of its own slot: causal, and never anything
        # written past its end (other rows' dummy writes, the padding of this chunk, or what an
        # earlier occupant of the slot left there).
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

    def _uniforms(self, rows: Sequence[int]) -> torch.Tensor:
        u = []
        for r in rows:
            u.append(row_uniform(self._keys[r], self._draws[r]))
            self._draws[r] += 1
        return torch.tensor(u, dtype=torch.float64, device=self.device)

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
            params = turns[group[0]].params
            index = torch.tensor([self._slot_of[r] for r in group], dtype=torch.long, device=self.device)
            u = self._uniforms(group) if params.temperature > 0 else None
            tok, lp = _sample(self.last_logits[index], params, u)
            for r, t, l in zip(group, tok.tolist(), lp.tolist()):
                turn = turns[r]
                turn.ids.append(t)
                turn.logprobs.append(l)
                self._context[r].append(t)
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
        todo = len(self._waiting)  # the first `todo` waiting rows take this turn once admitted
        turns = {r: self._turn(params) for r in self._slot_of}
        done: dict[int, Completion] = {}
        while True:
            if todo:
                admitted = self._admit(limit=todo)
                self._forward(admitted)
                todo -= len(admitted)
                turns.update((r, self._turn(params)) for r in admitted)
            if not turns:
                return done
            for r, c in self._decode_step(turns).items():
                done[r] = c
                del turns[r]
                if todo:
                    self._park(r)

    def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
        for r in tokens:
            if not self._live(r):
                raise KeyError(f"row {r} is not live in this session")
        for r, toks in tokens.items():
            self._context[r] += toks
        self._forward({r: toks for r, toks in tokens.items() if r in self._slot_of})

    @torch.inference_mode()
    def run(self, params_for: Callable[[int], SamplingParams],
            on_turn: Callable[[dict[int, Completion]], Mapping[int, Sequence[int] | None]]) -> None:
        """Continuous batching: every row runs its own turns; see `GenerationSession.run`. A row that is
        done frees its slot for the next waiting row."""
        self._forward(self._admit())
        turns = {r: self._turn(params_for(r)) for r in sorted(self._slot_of, key=self._slot_of.__getitem__)}
        while turns:
            finished = self._decode_step(turns)
            if not finished:
                continue
            env = on_turn(finished)
            done, feed = [], {}
            for r in finished:
                toks = env.get(r)
                if toks is None:
                    done.append(r)
                    del turns[r]
                    continue
                if len(toks):
                    self._context[r] += toks
                    feed[r] = toks
                turns[r] = self._turn(params_for(r))
            self.release(done)
            admitted = self._admit()
            turns.update((r, self._turn(params_for(r))) for r in admitted)
            self._forward({**feed, **admitted})

    def release(self, rows: Sequence[int]) -> None:
        for r in rows:
            s = self._slot_of.pop(r, None)
            if s is not None:
                self._slot_row[s] = None
            elif r in self._waiting:
                del self._waiting[r]
            else:
                continue
            self._context[r] = None
        dead = sum(r is None for r in self._slot_row)
        if not self._waiting and dead and (8 * dead >= len(self._slot_row) or dead == len(self._slot_row)):
            self._compact()
