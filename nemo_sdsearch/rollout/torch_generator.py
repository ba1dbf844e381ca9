"""The `torch` generator backend: any Hugging Face causal LM, on CPU or one GPU.

All rows of a session share one time axis. Prompts are right-padded; a row that finishes a turn early,
or that gets fewer environment tokens than another, leaves masked *holes* on that axis. Holes are
excluded by the attention mask and skipped by the per-row position ids, so each row computes exactly
what a dense forward of its own tokens would (tested against a full re-forward). Rows that are done
are removed from the cache, and the LM head runs only on the rows that need next-token logits.
"""

from __future__ import annotations

from typing import Mapping, Sequence

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


def _growing_cache():
    """A DynamicCache whose layers keep spare capacity, so appending a token copies only that token
    (the stock layer concatenates, copying the whole cache at every decode step)."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._kbuf = self._vbuf = None
                self._len = 0
            n = key_states.shape[-2]
            need = self._len + n
            if self._kbuf is None or need > self._kbuf.shape[-2]:
                cap = max(need, 2 * (0 if self._kbuf is None else self._kbuf.shape[-2]), 64)
                shape = (*key_states.shape[:-2], cap, key_states.shape[-1])
                kbuf = key_states.new_empty(shape)
                vbuf = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
                if self._len:
                    kbuf[..., :self._len, :] = self._kbuf[..., :self._len, :]
                    vbuf[..., :self._len, :] = self._vbuf[..., :self._len, :]
                self._kbuf, self._vbuf = kbuf, vbuf
            self._kbuf[..., self._len:need, :] = key_states
            self._vbuf[..., self._len:need, :] = value_states
            self._len = need
            self.keys, self.values = self._kbuf[..., :need, :], self._vbuf[..., :need, :]
            return self.keys, self.values

        def select(self, rows=None, cols=None) -> None:
            """Keep batch `rows` and time `cols` (index tensors) of the cached keys and values."""
            if not self.is_initialized or self._len == 0:
                return
            k, v = self.keys, self.values
            if rows is not None:
                k, v = k[rows], v[rows]
            if cols is not None:
                k, v = k[..., cols, :], v[..., cols, :]
            self._kbuf, self._vbuf = k.contiguous(), v.contiguous()
            self._len = self._kbuf.shape[-2]
            self.keys, self.values = self._kbuf, self._vbuf

        def batch_select_indices(self, indices) -> None:
            self.select(rows=indices)

    class GrowingCache(DynamicCache):
        def __init__(self):
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    return GrowingCache()


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


class TorchSession(GenerationSession):
    def __init__(self, owner: TorchGenerator, prompts: Sequence[Sequence[int]], seed: int | None):
        self.g = owner
        self.model = owner.model
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        self.device = owner.device
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(0 if seed is None else seed)
        self._rows = list(range(len(prompts)))
        self._lengths = [0] * len(prompts)
        B = len(prompts)
        self.cache = _growing_cache()
        self.mask = torch.zeros((B, 0), dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=self.device)
        self.last_logits = torch.zeros((B, self.lm_head.out_features), device=self.device)
        self._forward_chunks({i: p for i, p in enumerate(prompts)})

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def rows(self) -> list[int]:
        return list(self._rows)

    def length(self, row: int) -> int:
        return self._lengths[row]

    def _index(self, row: int) -> int:
        try:
            return self._rows.index(row)
        except ValueError:
            raise KeyError(f"row {row} is not live in this session") from None

    @torch.inference_mode()
    def _forward_chunks(self, chunks: Mapping[int, Sequence[int]]) -> None:
        """Append a right-padded chunk per row (rows not in `chunks` get holes); refresh last logits."""
        B = len(self._rows)
        L = max((len(c) for c in chunks.values()), default=0)
        if L == 0:
            return
        ids = torch.full((B, L), self.g.pad_id, dtype=torch.long)
        new_mask = torch.zeros((B, L), dtype=torch.long)
        lens = torch.zeros(B, dtype=torch.long)
        for row, toks in chunks.items():
            b = self._index(row)
            n = len(toks)
            if n:
                ids[b, :n] = torch.as_tensor(list(toks), dtype=torch.long)
                new_mask[b, :n] = 1
                lens[b] = n
                self._lengths[row] += n
        ids, new_mask, lens = ids.to(self.device), new_mask.to(self.device), lens.to(self.device)
        pos = self.next_pos[:, None] + (new_mask.cumsum(1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.decoder(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                           past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        rows = (lens > 0).nonzero().squeeze(-1)
        if rows.numel():
            hidden = out.last_hidden_state[rows, lens[rows] - 1]
            self.last_logits[rows] = self.lm_head(hidden).float()
        self.next_pos = self.next_pos + lens

    # -- the seam ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, params: SamplingParams) -> dict[int, Completion]:
        B = len(self._rows)
        checker = StopChecker(self.g.tokenizer, params.stop, self.g.eos_token_ids)
        out_ids: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        stops: list[str | None] = [None] * B
        active = torch.ones(B, dtype=torch.bool, device=self.device)
        for step in range(params.max_new_tokens):
            idx = active.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            tok, lp = _sample(self.last_logits[idx], params, self.gen)
            tok_list, lp_list = tok.tolist(), lp.tolist()
            chunk = {}
            for j, b in enumerate(idx.tolist()):
                out_ids[b].append(tok_list[j])
                out_lp[b].append(lp_list[j])
                reason, stop = checker.check(out_ids[b])
                if reason is None and step == params.max_new_tokens - 1:
                    reason = "length"
                if reason is not None:
                    reasons[b], stops[b] = reason, stop
                    active[b] = False
                chunk[self._rows[b]] = [tok_list[j]]
            # Every sampled token is fed, so the cache always holds the whole context.
            self._forward_chunks(chunk)
        return {self._rows[b]: Completion(out_ids[b], out_lp[b], reasons[b] or "length", stops[b])
                for b in range(B)}

    def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
        self._forward_chunks(tokens)

    def _drop_shared_holes(self) -> None:
        """Remove time columns that are holes in every live row (they only cost attention time)."""
        used = self.mask.sum(0) > 0
        if bool(used.all()):
            return
        cols = used.nonzero().squeeze(-1)
        self.mask = self.mask[:, cols]
        for layer in self.cache.layers:
            layer.select(cols=cols)

    def release(self, rows: Sequence[int]) -> None:
        drop = set(rows)
        if not drop:
            return
        keep = [b for b, r in enumerate(self._rows) if r not in drop]
        if len(keep) == len(self._rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._rows = [self._rows[b] for b in keep]
        if keep:
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]
            self.next_pos = self.next_pos[index]
            self.last_logits = self.last_logits[index]
            self._drop_shared_holes()
        else:
            self.cache = _growing_cache()
            self.mask = self.mask[:0]
            self.next_pos = self.next_pos[:0]
            self.last_logits = self.last_logits[:0]
