"""`TorchLlmArgs` and friends: the LLM's arguments, checked as the real pydantic model checks them (unknown
arguments refused, placement arguments only with orchestrator_type='ray'). Which placement arguments exist
depends on the version the stand-in declares (`tensorrt_llm.__version__`, see ../README.md)."""

from __future__ import annotations

from dataclasses import dataclass

from tensorrt_llm import __version__

if __version__.endswith("+toplevel"):
    PLACEMENT = "top_level"
elif "rc" in __version__ and int(__version__.split("rc")[1]) < 6:
    PLACEMENT = "env"
else:
    PLACEMENT = "ray_placement_config"


@dataclass
class KvCacheConfig:
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float = 0.9


_FIELDS = {"model": None, "tokenizer": None, "backend": "pytorch", "dtype": "auto", "tensor_parallel_size": 1,
           "kv_cache_config": None, "max_batch_size": 256, "max_seq_len": None, "max_input_len": None,
           "max_num_tokens": None, "sampler_type": "auto", "orchestrator_type": None,
           "ray_worker_extension_cls": None, "gather_generation_logits": False, "enable_sleep": False,
           "trust_remote_code": False}
if PLACEMENT == "ray_placement_config":
    class RayPlacementConfig:
        """Where the engine's workers go: one placement group per entry, the bundle index of every rank."""

        def __init__(self, placement_groups=None, placement_bundle_indices=None, per_worker_gpu_share=None,
                     defer_workers_init: bool = False):
            if (placement_groups is None) != (placement_bundle_indices is None):
                raise ValueError("placement_groups and placement_bundle_indices must be given together")
            if placement_groups is not None and len(placement_groups) != len(placement_bundle_indices):
                raise ValueError("placement_groups and placement_bundle_indices must have the same length")
            if per_worker_gpu_share is not None and not 0 < per_worker_gpu_share <= 1:
                raise ValueError("per_worker_gpu_share must be in (0, 1]")
            self.placement_groups, self.placement_bundle_indices = placement_groups, placement_bundle_indices
            self.per_worker_gpu_share, self.defer_workers_init = per_worker_gpu_share, defer_workers_init

    _FIELDS["ray_placement_config"] = None
elif PLACEMENT == "top_level":
    _FIELDS.update(placement_groups=None, placement_bundle_indices=None, per_worker_gpu_share=None)


class TorchLlmArgs:
    model_fields = dict(_FIELDS)

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self.model_fields))
        if unknown:
            raise ValueError(f"TorchLlmArgs: extra inputs are not permitted: {unknown}")
        for k, default in self.model_fields.items():
            setattr(self, k, kwargs.get(k, default))
        if self.sampler_type not in ("auto", "TorchSampler", "TRTLLMSampler"):
            raise ValueError(f"TorchLlmArgs: unknown sampler_type {self.sampler_type!r}")
        ray_only = [k for k in ("ray_placement_config", "ray_worker_extension_cls", "placement_groups")
                    if getattr(self, k, None) is not None]
        if ray_only and self.orchestrator_type != "ray":
            raise ValueError(f"{ray_only} are only supported with orchestrator_type='ray'")
