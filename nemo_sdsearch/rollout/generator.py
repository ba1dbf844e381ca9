"""The `Generator` seam: batched sampling with stop strings, sampled log-probs, and sessions that keep
their state (KV cache) across turns so that appending retrieved passages prefills only the new tokens.

A session holds a set of live rows. `generate` samples one turn for every live row; `extend` appends
environment tokens to some rows; `release` drops rows that are done. Log-probs are those of the sampled
token under the temperature-scaled distribution, `log_softmax(logits / T)` (T = 1 for greedy), before
any top-p truncation: the same quantity the actor recomputes for the GRPO ratio.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

# ---------------------------------------------------------------------------------------------------
# Random streams that belong to a row, not to a batch
# ---------------------------------------------------------------------------------------------------
MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int | None) -> int:
    """A 64-bit hash of a sequence of integers (None counts as 0): SplitMix64 chained over the parts."""
    x = splitmix64((parts[0] or 0) & MASK64)
    for part in parts[1:]:
        x = splitmix64(x ^ ((part or 0) & MASK64))
    return x


def question_row_seed(seed: int | None, question_id: str, sample: int) -> int:
    """The seed of sample `sample` of question `question_id` in a rollout call seeded `seed`: what a row
    draws then depends on its question and sample index only, not on which batch, replica or position
    runs it (so a data-parallel split samples exactly what one process would)."""
    return mix_seed(seed, zlib.crc32(str(question_id).encode("utf-8")), sample) & ((1 << 63) - 1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop string), "eos", or "length"
    stop: str | None = None


class GenerationSession(ABC):
    @property
    @abstractmethod
    def rows(self) -> list[int]:
        """Live row ids (the indices of the prompts given to `Generator.open`)."""

    @abstractmethod
    def generate(self, params: SamplingParams) -> dict[int, Completion]:
        """Sample one turn for every live row."""

    @abstractmethod
    def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
        """Append environment tokens to rows (prefill only these tokens)."""

    @abstractmethod
    def release(self, rows: Sequence[int]) -> None:
        """Drop rows that are done."""

    @abstractmethod
    def length(self, row: int) -> int:
        """Number of context tokens of a live row."""

    def run(self, params_for: Callable[[int], SamplingParams],
            on_turn: Callable[[dict[int, Completion]], Mapping[int, Sequence[int] | None]]) -> None:
        """Drive every live row to its end. `params_for(row)` gives the sampling parameters of the row's
        next turn. After turns end, `on_turn(completions)` says per row what to append before the row's
        next turn (environment tokens, possibly none) or None: the row is done and is released.

        Backends may run rows independently (a row that ends a turn continues at once: continuous
        batching) and so call `on_turn` with any subset of rows. This default is turn-synchronous: all
        live rows take a turn together through `generate`, `extend` and `release`."""
        while self.rows:
            params = {r: params_for(r) for r in self.rows}
            first = next(iter(params.values()))
            if any(p != first for p in params.values()):
                raise ValueError("turn-synchronous sessions need the same sampling parameters for every live row")
            env = on_turn(self.generate(first))
            self.release([r for r, toks in env.items() if toks is None])
            extend = {r: toks for r, toks in env.items() if toks is not None and len(toks)}
            if extend:
                self.extend(extend)

    def close(self) -> None:
        self.release(list(self.rows))


DEFAULT_BUCKET_BYTES = 1 << 30  # refit buckets: 1 GiB


def iter_buckets(weights, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive (name, tensor) pairs of a weight stream (an iterable of pairs, see
    `Actor.iter_weights`, or a Mapping) grouped into lists of at most `bucket_bytes` bytes; a tensor
    larger than that is a bucket of its own. Nothing is kept after a bucket is handed out: a consumer
    that drops each bucket (`del bucket` at the end of its loop body: a `for` loop variable still holds
    the previous bucket while the next one is filled) holds at most one bucket plus the one tensor that
    did not fit into it."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    items = weights.items() if isinstance(weights, Mapping) else weights
    bucket: list = []
    size = 0
    for name, tensor in items:
        n = tensor.numel() * tensor.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


class Generator(ABC):
    tokenizer: object

    @abstractmethod
    def open(self, prompts: Sequence[Sequence[int]], seed: int | None = None,
             row_seeds: Sequence[int] | None = None) -> GenerationSession:
        """A session over `prompts`. `row_seeds[r]` (optional) is row r's own seed: when given, what row r
        samples depends on it alone, not on `seed`, its position or the other rows."""
        ...

    def refit(self, weights) -> None:
        """Load new weights: a weight stream of (HF name, tensor) pairs (`Actor.iter_weights`) or a Mapping
        of them. Backends that hold their own copy of the weights override this and load the stream
        bucket by bucket (`iter_buckets`), dropping each bucket once it is loaded, so a refit never holds
        the whole model. The stream must be consumed to its end (it may be a collective)."""
        raise NotImplementedError(f"{type(self).__name__} holds no weights of its own to refit")

    # The memory seam, with defaults for backends that hold nothing between generations (the torch generator
    # runs the trained model itself): the recipe calls these unconditionally.
    def sleep(self, level: int = 1) -> None:
        """Release memory while the trainer updates: level 1 the KV cache, level 2 the weights too (a refit
        on wake-up brings them back). Default: nothing to release."""

    def wake_up(self) -> None:
        """Take the memory `sleep` released back. Default: nothing to take."""

    def shutdown(self) -> None:
        """Release the devices and workers for good (the end of a run). Default: nothing to release."""


class StopChecker:
    """Detects stop strings on the token stream, including strings split over several tokens."""

    def __init__(self, tokenizer, stops: Sequence[str], eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.eos = set(eos_token_ids)
        self.window = max((len(s) for s in self.stops), default=0) + 4
        self.last_chars = {s[-1] for s in self.stops}
        self.ascii = all(s.isascii() for s in self.stops)
        self._pieces: dict[int, str] = {}

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def check(self, ids: Sequence[int]) -> tuple[str | None, str | None]:
        """(finish_reason, stop string) after the last token of `ids`, or (None, None)."""
        last = ids[-1]
        if last in self.eos:
            return "eos", None
        if not self.stops:
            return None, None
        if self.ascii:
            piece = self._pieces.get(last)
            if piece is None:
                piece = self._pieces[last] = self._decode([last])
            if not any(c in piece for c in self.last_chars):
                return None, None
        text = self._decode(ids[-self.window:])
        prev_len = len(self._decode(ids[-self.window:-1])) if len(ids) > 1 else 0
        for s in self.stops:
            pos = text.rfind(s)
            if pos >= 0 and pos + len(s) > prev_len:
                return "stop", s
        return None, None
