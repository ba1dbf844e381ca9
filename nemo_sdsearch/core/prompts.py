"""Prompts of the search protocol and the information block.

A `PromptFormat` builds every prompt the system feeds a model, from one instruction preset and one
chat-template choice (config keys `prompt.instruction` and `prompt.chat_template`):

- `student(q)`: the inference-time context P_S(q) = instruction || question;
- `teacher(q, context)`: P_T(q) = instruction || question || context, where the context is the
  SD-Search hindsight block or Search-E1's reference block; it sits inside the same user turn.

Presets: `default` is our own wording (the embedded tiny model is trained on it); `search_r1` is the
instruction text of Search-R1 (and so of both papers' setups) verbatim, typo included, with its
"Question: q?" line, for reproduction runs. With a chat template (`auto` and a tokenizer that has one,
as every Instruct checkpoint does), the prompt text becomes the single user message and the template's
generation prompt follows, exactly as Search-R1 renders it; the response then starts right after the
assistant header. Every token count (the response shift of the teacher, the context guard) is taken on
the templated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

INSTRUCTION = (
    "Answer the question. Reason inside <think> and </think> each time you learn something new. "
    "To look something up, write a query inside <search> and </search>; the results come back "
    "inside <information> and </information>. You may search several times. When you know the "
    "answer, write only the answer inside <answer> and </answer>, for example <answer> Paris </answer>."
)

# Search-R1's instruction, verbatim (scripts/data_process/nq_search.py), for reproduction runs.
SEARCH_R1_INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
    "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
    "engine by <search> query </search> and it will return the top searched results between <information> "
    "and </information>. You can search as many times as your want. If you find no further external "
    "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>."
)

INSTRUCTION_PRESETS = ("default", "search_r1")
CHAT_TEMPLATE_CHOICES = ("auto", "none")


def student_prompt(question: str, instruction: str = INSTRUCTION) -> str:
    return f"{instruction}\nQuestion: {question.strip()}\n"


def search_r1_prompt(question: str) -> str:
    """Search-R1's prompt text: its instruction, then "Question: q" with a question mark added if missing."""
    q = question.strip()
    if q and not q.endswith("?"):
        q += "?"
    return f"{SEARCH_R1_INSTRUCTION} Question: {q}\n"


def teacher_prompt(question: str, context: str, instruction: str = INSTRUCTION) -> str:
    """The student prompt with an extra context block (hindsight block or reference trajectory)."""
    return with_context(student_prompt(question, instruction), context)


def with_context(student_text: str, context: str) -> str:
    """The teacher's user text: the student's user text, then the context block on its own lines."""
    return f"{student_text.rstrip(chr(10))}\n{context.strip()}\n"


@dataclass(frozen=True)
class PromptFormat:
    """Student and teacher prompt texts for one instruction preset and one chat-template wrapper.

    `chat` wraps a user message into the model's chat template (None: raw text, no template)."""

    instruction: str = "default"
    chat: Callable[[str], str] | None = None

    def __post_init__(self):
        if self.instruction not in INSTRUCTION_PRESETS:
            raise ValueError(f"prompt instruction preset must be one of {INSTRUCTION_PRESETS}, "
                             f"got {self.instruction!r}")

    def user_text(self, question: str) -> str:
        return search_r1_prompt(question) if self.instruction == "search_r1" else student_prompt(question)

    def _wrap(self, text: str) -> str:
        return self.chat(text) if self.chat is not None else text

    def student(self, question: str) -> str:
        return self._wrap(self.user_text(question))

    def teacher(self, question: str, context: str) -> str:
        return self._wrap(with_context(self.user_text(question), context))


def chat_wrapper(tokenizer, chat_template: str = "auto") -> Callable[[str], str] | None:
    """`auto`: the tokenizer's chat template around one user message plus the generation prompt (as
    Search-R1 applies it), when the tokenizer has a template; `none` (or no template): None."""
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"prompt.chat_template must be one of {CHAT_TEMPLATE_CHOICES}, got {chat_template!r}")
    if chat_template == "none" or not getattr(tokenizer, "chat_template", None):
        return None

    def wrap(text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    return wrap


def prompt_format(tokenizer, instruction: str = "default", chat_template: str = "auto") -> PromptFormat:
    return PromptFormat(instruction, chat_wrapper(tokenizer, chat_template))


REFERENCE_HEADER = "A correct solution to this question:"
REFERENCE_FOOTER = ("Read the solution above, then solve the question yourself, in your own words: "
                    "reason, search and answer as if you had not seen it.")


def reference_block(solution_text: str) -> str:
    """Search-E1's teacher context: a better sibling trajectory (with its retrieved passages), then the
    instruction to solve the question in the model's own words."""
    return f"{REFERENCE_HEADER}\n{solution_text.strip()}\n{REFERENCE_FOOTER}"


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
