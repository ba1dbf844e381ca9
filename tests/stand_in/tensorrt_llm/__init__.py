"""A TensorRT-LLM stand-in for the tests (see ../README.md): the LLM API slice the project uses, on Ray, on CPU."""

import os

__version__ = os.environ.get("TRTLLM_STAND_IN_VERSION", "1.2.0")
STAND_IN = True

from tensorrt_llm.sampling_params import SamplingParams  # noqa: E402
from tensorrt_llm.llmapi.llm import LLM  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]
