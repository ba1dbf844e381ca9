from tensorrt_llm.llmapi.llm_args import KvCacheConfig  # noqa: F401
from tensorrt_llm.llmapi.llm import LLM  # noqa: F401
