"""`tensorrt_llm.SamplingParams`: the fields the project sets (a dataclass, as the real one is)."""

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list | str | None = None
    stop_token_ids: list | None = None
    include_stop_str_in_output: bool = False
    end_id: int | None = None
    pad_id: int | None = None
    logprobs: int | None = None
    detokenize: bool = True
    return_generation_logits: bool = False
