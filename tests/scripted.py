"""Test doubles shared by the rollout and metrics tests: a generator that replays fixed turn texts, and a
data-parallel replica view whose all-reduce adds what the other replicas contributed."""

from __future__ import annotations

from typing import Callable, Sequence

from nemo_sdsearch.rollout.generator import Completion, GenerationSession, Generator


class ScriptedTurns(Generator):
    """Replays fixed turn texts per row: `turns(row, question) -> [text, ...]` (question: the text after the
    prompt's last "Question: "); the last text repeats once they run out. A turn longer than max_new_tokens is
    cut and reported with finish reason "length", one that ends in the tokenizer's EOS with "eos", as a real
    generator does. What the engine asked for is recorded: `params_seen` (the `SamplingParams` of every generate
    call, in order) and `extends` (per extend call, {row: the decoded text appended}: the information blocks)."""

    def __init__(self, tokenizer, turns: Callable[[int, str], Sequence[str]]):
        self.tokenizer, self.turns = tokenizer, turns
        self.params_seen, self.extends = [], []

    def open(self, prompts, seed=None, row_seeds=None):
        gen = self
        texts = [list(gen.turns(r, gen.tokenizer.decode(p).rpartition("Question: ")[2].strip()))
                 for r, p in enumerate(prompts)]

        class Session(GenerationSession):
            def __init__(self):
                self.live, self.turn = list(range(len(prompts))), [0] * len(prompts)
                self.lens = [len(p) for p in prompts]

            @property
            def rows(self):
                return list(self.live)

            def length(self, row):
                return self.lens[row]

            def generate(self, params):
                gen.params_seen.append(params)
                out = {}
                for r in self.live:
                    t = texts[r]
                    ids = gen.tokenizer.encode(t[min(self.turn[r], len(t) - 1)])
                    cut = len(ids) > params.max_new_tokens
                    ids = ids[:params.max_new_tokens]
                    eos = bool(ids) and ids[-1] == gen.tokenizer.eos_token_id
                    out[r] = Completion(ids, [-1.0] * len(ids), "length" if cut else "eos" if eos else "stop")
                    self.turn[r] += 1
                    self.lens[r] += len(ids)
                return out

            def extend(self, tokens):
                gen.extends.append({r: gen.tokenizer.decode(t) for r, t in tokens.items()})
                for r, t in tokens.items():
                    self.lens[r] += len(t)

            def release(self, rows):
                self.live = [r for r in self.live if r not in set(rows)]

        return Session()


class Replica:
    """An actor's data-parallel view: `all_reduce_dp` adds what the other replicas contributed (`others`, the
    tensor another Replica `sent`); one replica's leader, so `broadcast_in_replica` is the identity."""

    def __init__(self, dp_rank, dp_size, others=None):
        self.dp_rank, self.dp_size, self.others, self.sent = dp_rank, dp_size, others, None
        self.is_replica_leader = True

    def all_reduce_dp(self, t):
        self.sent = t.clone()
        return t if self.others is None else t + self.others

    def broadcast_in_replica(self, obj):
        return obj
