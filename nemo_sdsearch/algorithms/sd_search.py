"""SD-Search: the teacher side of the step (hindsight blocks, teacher sequences).

The loop lives in `grpo.py` (SD-Search is GRPO plus one loss term); this file holds what SD-Search adds:

1. a hindsight block per rollout from its question's group of rollouts (queries in order, outcome): the whole
   group's, or the others' (`sd.hindsight_members`), or another question's (`sd.hindsight_source`, a placebo);
2. teacher sequences: P_T(q) = instruction || question || hindsight block (all in the user turn when a
   chat template is used), followed by exactly the
   same response tokens as the student trajectory, so every response position has a teacher twin
   shifted by len(P_T) - len(P_S);
3. teacher logits at the query positions only (same weights, no grad: `models.base.TeacherPass`), and the
   token-level generalized JSD(teacher || student) there, normalised by the number of query tokens: the loss
   term, `losses.grpo_sd_loss.jsd_at_queries` (on a tensor-parallel actor from the vocabulary shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from nemo_sdsearch.core.hindsight import AttemptSummary, HindsightConfig, hindsight_block
from nemo_sdsearch.core.trajectory import Trajectory


def block_config(sd_cfg) -> HindsightConfig:
    return HindsightConfig(include_answers=sd_cfg.include_answers, include_gold=sd_cfg.include_gold,
                           max_tokens=sd_cfg.max_hindsight_tokens, order=getattr(sd_cfg, "hindsight_order", "outcome"))


def _outcomes(trajs: Sequence[Trajectory], outcomes: Sequence[bool] | None) -> list[bool]:
    return [t.exact_match == 1.0 for t in trajs] if outcomes is None else list(outcomes)


def group_hindsight_blocks(trajs: Sequence[Trajectory], group_size: int, sd_cfg,
                           count_tokens: Callable[[str], int], outcomes: Sequence[bool] | None = None) -> list[str]:
    """One hindsight block per group (consecutive `group_size` trajectories share a question). `outcomes`:
    the label each attempt gets (default: its exact match; a manipulation check passes others)."""
    cfg = block_config(sd_cfg)
    ok = _outcomes(trajs, outcomes)
    blocks = []
    for g in range(0, len(trajs), group_size):
        group = trajs[g:g + group_size]
        attempts = [AttemptSummary(tuple(t.queries), ok[g + k], t.answer) for k, t in enumerate(group)]
        blocks.append(hindsight_block(attempts, cfg, gold_answer=group[0].golden_answers[0],
                                      count_tokens=count_tokens))
    return blocks


def rollout_hindsight_blocks(trajs: Sequence[Trajectory], group_size: int, sd_cfg,
                             count_tokens: Callable[[str], int], outcomes: Sequence[bool] | None = None) -> list[str]:
    """The hindsight block each rollout's teacher reads, one per trajectory (consecutive `group_size`
    trajectories share a question):

    - `sd.hindsight_members`: `group` (default) = every attempt of its group, its own included (one block per
      group); `others` = the group's other G - 1 attempts, its own left out (the JSD then never pulls the
      student toward a block that lists its own sample);
    - `sd.hindsight_source`: `own` (default) = its question's block; `other_question` = the placebo: the
      (whole-group) block of the next question of the batch, cyclically, so the teacher reads a block of the
      same form and length whose outcomes say nothing about this question. Needs two questions or more.

    `outcomes`: the label each attempt gets (default: its exact match)."""
    members = getattr(sd_cfg, "hindsight_members", "group")
    source = getattr(sd_cfg, "hindsight_source", "own")
    if members not in ("group", "others") or source not in ("own", "other_question"):
        raise ValueError(f"sd.hindsight_members={members!r} / sd.hindsight_source={source!r}: "
                         "choose group | others and own | other_question")
    groups = [list(trajs[g:g + group_size]) for g in range(0, len(trajs), group_size)]
    if source == "other_question":
        if len(groups) < 2:
            raise ValueError("sd.hindsight_source=other_question needs at least two questions per replica and step "
                             f"(this one has {len(groups)}): raise trainer.questions_per_step")
        whole = group_hindsight_blocks(trajs, group_size, sd_cfg, count_tokens, outcomes)
        return [whole[(i // group_size + 1) % len(groups)] for i in range(len(trajs))]
    if members == "group":
        whole = group_hindsight_blocks(trajs, group_size, sd_cfg, count_tokens, outcomes)
        return [whole[i // group_size] for i in range(len(trajs))]
    cfg = block_config(sd_cfg)
    ok = _outcomes(trajs, outcomes)
    out = []
    for start, group in zip(range(0, len(trajs), group_size), groups):
        labels = ok[start:start + len(group)]
        for j in range(len(group)):
            attempts = [AttemptSummary(tuple(t.queries), labels[k], t.answer) for k, t in enumerate(group) if k != j]
            out.append(hindsight_block(attempts, cfg, gold_answer=group[0].golden_answers[0],
                                       count_tokens=count_tokens))
    return out


@dataclass
class TeacherSequence:
    token_ids: list[int]
    shift: int  # teacher position = student position + shift


def teacher_sequences(trajs: Sequence[Trajectory], blocks: Sequence[str],
                      teacher_prompt_ids: Callable[[str, str], list[int]],
                      max_positions: int | None = None) -> list[TeacherSequence | None]:
    """`blocks`: each trajectory's hindsight block (`rollout_hindsight_blocks`); `teacher_prompt_ids(question,
    block)`: the token ids of P_T (chat template included, if any); the shift is taken against the
    trajectory's own (equally templated) prompt length.

    `max_positions` (the model's `max_position_embeddings`): a teacher sequence longer than that (the student's
    prompt and response up to its last query, plus the block: up to rollout.max_context +
    sd.max_hindsight_tokens) would put the teacher at positions the model was not trained for; its entry is None
    and that rollout's query positions get no JSD term (counted as `sd/teacher_too_long`)."""
    if len(blocks) != len(trajs):
        raise ValueError(f"{len(blocks)} hindsight blocks for {len(trajs)} trajectories: one per trajectory")
    out: list[TeacherSequence | None] = []
    for t, block in zip(trajs, blocks):
        prompt = teacher_prompt_ids(t.question, block)
        # Causal attention: nothing after the last query token changes the teacher's query logits.
        query = t.query_mask()
        last = max((j for j, q in enumerate(query) if q), default=t.prompt_length)
        ids = prompt + t.token_ids[t.prompt_length:last + 1]
        out.append(None if max_positions is not None and len(ids) > max_positions
                   else TeacherSequence(ids, len(prompt) - t.prompt_length))
    return out
