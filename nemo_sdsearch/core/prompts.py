"""Prompts of the search protocol (Search-R1 protocol, our own words) and the information block.

`student_prompt(q)` is the inference-time context P_S(q) = instruction || question.
`teacher_prompt(q, hindsight_block)` is P_T(q) = instruction || question || hindsight block (SD-Search);
`teacher_prompt(q, reference_trajectory)` serves Search-E1 the same way with a reference trajectory.
"""

from __future__ import annotations

from typing import Sequence

INSTRUCTION = (
    "Answer the question. Reason inside <think> and </think> each time you learn something new. "
    "To look something up, write a query inside <search> and </search>; the results come back "
    "inside <information> and </information>. You may search several times. When you know the "
    "answer, write only the answer inside <answer> and </answer>, for example <answer> Paris </answer>."
)


def student_prompt(question: str, instruction: str = INSTRUCTION) -> str:
    return f"{instruction}\nQuestion: {question.strip()}\n"


def teacher_prompt(question: str, hindsight: str, instruction: str = INSTRUCTION) -> str:
    """The student prompt with an extra context block (hindsight block or reference trajectory)."""
    return f"{instruction}\nQuestion: {question.strip()}\n{hindsight.strip()}\n"


REFERENCE_HEADER = "A correct solution to this question:"


def reference_block(solution_text: str) -> str:
    """Search-E1's teacher context: a better sibling trajectory, shown after the question."""
    return f"{REFERENCE_HEADER}\n{solution_text.strip()}"


def document_title_text(contents: str) -> tuple[str, str]:
    """Split Search-R1 corpus contents `"Title"\\ntext` into (title, text); the title keeps its quotes."""
    title, _, text = contents.partition("\n")
    return title, text


def format_passages(contents: Sequence[str]) -> str:
    """Passages as Search-R1 shows them to the model: `Doc i(Title: t) text`, one per line."""
    lines = []
    for i, c in enumerate(contents, start=1):
        title, text = document_title_text(c)
        lines.append(f"Doc {i}(Title: {title}) {text}")
    return "\n".join(lines)


def information_block(contents: Sequence[str]) -> str:
    """Environment text appended after a search: the passages wrapped in information tags."""
    return f"\n\n<information>{format_passages(contents)}</information>\n\n"


INVALID_ACTION_FEEDBACK = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
    "and </search>. If I want to give the final answer, I should put the answer between <answer> "
    "and </answer>. Let me try again.\n"
)
