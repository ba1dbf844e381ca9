"""`tensorrt_llm.SamplingParams`: the fields the project sets (a dataclass, as the real one is), and
`LogprobMode`, the TorchSampler's log-prob convention (`logprobs_mode`: "raw", the default, or "processed"; the
upstream tests pass these strings; _torch/pyexecutor/sampler.py says what each returns)."""

import enum
from dataclasses import dataclass


class LogprobMode(str, enum.Enum):
    RAW = "raw"
    PROCESSED = "processed"


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
    logprobs_mode: LogprobMode = LogprobMode.RAW
    detokenize: bool = True
    return_generation_logits: bool = False

    def __post_init__(self):
        self.logprobs_mode = LogprobMode(getattr(self.logprobs_mode, "value", self.logprobs_mode))
