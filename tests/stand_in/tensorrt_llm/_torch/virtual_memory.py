"""`ExecutorMemoryType`: the memory tags sleep / wakeup accept (TensorRT-LLM 1.2's values)."""

import enum


class ExecutorMemoryType(str, enum.Enum):
    SAMPLER = "sampler"
    DRAFTER = "drafter"
    GUIDED_DECODER = "guided_decoder"
    SPEC_RESOURCE_MANAGER = "spec_resource_manager"
    INIT_KV_CACHE = "_no_capture_init_kv_cache"
    INIT_EXTRA_RESOURCES = "_no_capture_init_extra_resources"
    MODEL_EXTRA = "model_extra"
    EXTRA_RESOURCES = "executor_extra"
    KV_CACHE = "kv_cache"
    MODEL_ENGINE_MAIN = "model"
    MODEL_ENGINE_DRAFT = "draft_model"


WEIGHT_TAGS = {"model", "draft_model"}
