"""The batched multi-turn search rollout engine (Search-R1 protocol).

Every row generates a turn until `</search>`, `</answer>` or EOS. A turn that ends in EOS without a completed
action ends the trajectory (finish reason "eos", not an invalid action): nothing is sampled or trained on after
an EOS, as in Search-R1 and verl. A completed search is run (one
batched retriever call for all rows whose turn ended at the same step), its passages are appended as an
information block (their ids recorded in `Trajectory.retrieved_ids`, one list per search: the query-level
metrics of world/evidence.py) and the row continues from its KV cache. Rows run independently when the backend
supports it (`GenerationSession.run`): a row never waits for the slowest row of a turn. A turn without a valid action (no tag, an empty query, the token
limit) gets Search-R1's invalid-action feedback and costs a turn. After `max_turns` turns the final
turn stops only at `</answer>`: no further retrieval. The context guard keeps every row within
`max_context`: information is truncated to fit (the prompt and question are never touched) and a row
with no room left for a turn ends with finish reason "context".
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from nemo_sdsearch.core.prompts import INVALID_ACTION_FEEDBACK, format_passages, information_block, student_prompt
from nemo_sdsearch.core.qa import QA
from nemo_sdsearch.core.reward import NORMALIZATIONS
from nemo_sdsearch.core.spans import ANSWER_CLOSE, SEARCH_CLOSE, SpanType
from nemo_sdsearch.core.trajectory import Trajectory
from nemo_sdsearch.rollout.generator import Generator, SamplingParams, question_row_seed

_SEARCH = re.compile(r"<search>(.*?)</search>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class RolloutConfig:
    """The engine's settings. These defaults are also the config's (`config.py`'s RolloutSection and
    RewardSection take them), and a run builds its RolloutConfig from its config (`config.rollout_config`)."""
    max_turns: int = 4  # searches allowed; the turn after the last one must answer
    max_new_tokens: int = 96  # per turn
    max_context: int = 1024
    topk: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    retrieval: bool = True  # False: every search returns no passages (the "no search" ablation)
    normalization: str = "squad"  # answer normalisation of the EM reward (core.reward)
    max_obs_tokens: int = 0  # > 0: an information block is cut to this many tokens (Search-R1's max_obs_length)

    def __post_init__(self):
        if self.max_turns < 0 or self.topk < 1 or self.max_context <= self.max_new_tokens or self.max_obs_tokens < 0:
            raise ValueError(f"invalid rollout config {self}: need max_turns >= 0, topk >= 1, "
                             "max_context > max_new_tokens, max_obs_tokens >= 0")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"answer normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")


def parse_action(text: str) -> tuple[str, str | None]:
    """('answer', content) | ('search', query) | ('invalid', None) for one policy turn."""
    searches, answers = _SEARCH.findall(text), _ANSWER.findall(text)
    last_search = text.rfind(SEARCH_CLOSE)
    last_answer = text.rfind(ANSWER_CLOSE)
    if answers and last_answer > last_search:
        return "answer", answers[-1].strip()
    if searches:
        query = searches[-1].strip()
        return ("search", query) if query else ("invalid", None)
    return "invalid", None


class RolloutEngine:
    def __init__(self, generator: Generator, retriever, config: RolloutConfig | None = None,
                 prompt_fn: Callable[[str], str] = student_prompt):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.retriever = retriever
        self.cfg = config or RolloutConfig()
        self.prompt_fn = prompt_fn
        self._info_open = self.encode("\n\n<information>")
        self._info_close = self.encode("</information>\n\n")
        self._feedback = self.encode(INVALID_ACTION_FEEDBACK)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _information_ids(self, contents: list[str], room: int) -> list[int] | None:
        """Token ids of the information block, truncated to `room` tokens; None if nothing fits."""
        ids = self.encode(information_block(contents))
        if len(ids) <= room:
            return ids
        body_room = room - len(self._info_open) - len(self._info_close)
        if body_room < 1:
            return None
        body = self.encode(format_passages(contents))[:body_room]
        return self._info_open + body + self._info_close

    def run(self, questions: Sequence[QA], n_samples: int = 1, seed: int = 0,
            prompts: Sequence[str] | None = None, progress: Callable[[int], None] | None = None,
            question_seeds: Sequence[int] | None = None) -> list[Trajectory]:
        """Roll out `n_samples` trajectories per question (grouped: question i owns rows i*n .. i*n+n-1).
        `question_seeds`: each question's own call seed (default: `seed` for every one), so one call can roll out
        questions that smaller calls would have seeded differently (the pool's batches)."""
        cfg = self.cfg
        trajs: list[Trajectory] = []
        for qi, q in enumerate(questions):
            prompt_ids = self.encode(prompts[qi] if prompts is not None else self.prompt_fn(q.question))
            if len(prompt_ids) + cfg.max_new_tokens > cfg.max_context:
                raise ValueError(f"question {q.id!r}: its prompt has {len(prompt_ids)} tokens, which leaves no "
                                 f"room for a {cfg.max_new_tokens}-token turn within max_context="
                                 f"{cfg.max_context}; raise rollout.max_context or shorten the prompt")
            trajs += [Trajectory.start(q.id, q.question, q.golden_answers, prompt_ids, cfg.normalization)
                      for _ in range(n_samples)]
        if not trajs:
            return []
        turns_taken = [0] * len(trajs)

        def params_for(row: int) -> SamplingParams:
            final = turns_taken[row] == cfg.max_turns
            return SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                  (ANSWER_CLOSE,) if final else (SEARCH_CLOSE, ANSWER_CLOSE))

        def on_turn(completions) -> dict[int, list[int] | None]:
            env: dict[int, list[int] | None] = {}
            searches, invalid = {}, []
            for row, c in completions.items():
                t = trajs[row]
                final = turns_taken[row] == cfg.max_turns
                turns_taken[row] += 1
                text = t.add_policy(c.token_ids, c.logprobs, self.decode)
                t.truncated_turns += int(c.finish_reason == "length")
                action, content = parse_action(text)
                ended = c.finish_reason == "eos" and action == "invalid"  # the model ended its trajectory
                t.invalid_actions += int(action == "invalid" and not ended)
                if action == "answer":
                    t.finish_reason = "answer"
                    env[row] = None
                elif ended:
                    t.finish_reason = "eos"
                    env[row] = None
                elif final:
                    t.finish_reason = "no_answer"
                    env[row] = None
                elif action == "search":
                    t.queries.append(content)
                    searches[row] = content
                else:
                    invalid.append(row)
            passages: dict[int, list[str]] = {}
            if searches:
                rows = list(searches)
                t0 = time.perf_counter()
                if cfg.retrieval and self.retriever is not None:
                    results = self.retriever.search([searches[r] for r in rows], cfg.topk)
                else:
                    results = [[] for _ in rows]
                dt = time.perf_counter() - t0
                for r in rows:  # one batched call served these rows: each carries its share of the time
                    trajs[r].retrieval_s += dt / len(rows)
                passages = {r: [d.contents for d in docs] for r, docs in zip(rows, results)}
                for r, docs in zip(rows, results):  # what each search retrieved (the query-level metrics)
                    trajs[r].retrieved_ids.append([str(d.id) for d in docs])
            for row in [*passages, *invalid]:
                t = trajs[row]
                room = cfg.max_context - len(t.token_ids) - cfg.max_new_tokens
                if row in passages:
                    cap = min(room, cfg.max_obs_tokens) if cfg.max_obs_tokens else room
                    ids = self._information_ids(passages[row], cap)
                else:
                    ids = self._feedback if len(self._feedback) <= room else None
                if ids is None:
                    t.finish_reason = "context"
                    env[row] = None
                    continue
                t.add_environment(ids, SpanType.INFORMATION)
                env[row] = ids
            if progress is not None:
                n_done = sum(v is None for v in env.values())
                if n_done:
                    progress(n_done)
            return env

        # every row's random stream belongs to its (question, sample index): a question samples the same
        # rollouts whichever batch, replica or position runs it
        seeds = list(question_seeds) if question_seeds is not None else [seed] * len(questions)
        row_seeds = [question_row_seed(s, q.id, j) for q, s in zip(questions, seeds) for j in range(n_samples)]
        session = self.generator.open([t.token_ids for t in trajs], seed=seed, row_seeds=row_seeds)
        try:
            session.run(params_for, on_turn)
        finally:
            session.close()
        for t in trajs:
            if t.finish_reason == "running":
                t.finish_reason = "no_answer"
            t.finalize()
        return trajs
