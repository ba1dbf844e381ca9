"""`LLM`: the driver side of an engine (see ../../README.md): placement, workers, requests, collective RPC."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from tensorrt_llm.llmapi.llm_args import PLACEMENT, TorchLlmArgs


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: object = None
    generation_logits: object = None


class RequestOutput:
    """What generate_async returns at once: awaitable (the finished request), iterable with `async for` (here
    one final step), abortable."""

    def __init__(self, ref, want_logprobs: bool):
        self._ref, self._want_logprobs = ref, want_logprobs
        self.outputs = [CompletionOutput()]
        self.finished = False

    def _fill(self, d: dict) -> None:
        o = self.outputs[0]
        o.token_ids = list(d["token_ids"])
        o.logprobs = ([{t: Logprob(lp, r) for t, lp, r in entries} for entries in d["logprobs"]]
                      if self._want_logprobs else [])
        o.finish_reason, o.stop_reason = d["finish_reason"], d["stop_reason"]
        self.finished = True

    async def aresult(self) -> "RequestOutput":
        if not self.finished:
            self._fill(await self._ref)
        return self

    def result(self) -> "RequestOutput":
        import ray

        if not self.finished:
            self._fill(ray.get(self._ref))
        return self

    def __await__(self):
        return self.aresult().__await__()

    def __aiter__(self):
        self._streamed = False
        return self

    async def __anext__(self):
        if self._streamed:
            raise StopAsyncIteration
        self._streamed = True
        return await self.aresult()

    def abort(self) -> None:
        pass  # worker 0 serves one request at a time: it runs to its own stop


class LLM:
    def __init__(self, model, tokenizer=None, **kwargs):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.args = TorchLlmArgs(model=model, tokenizer=tokenizer, **kwargs)
        if self.args.orchestrator_type != "ray":
            raise ValueError("the TensorRT-LLM stand-in runs the Ray orchestrator only (orchestrator_type='ray')")
        if isinstance(tokenizer, str) or tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.tokenizer = tokenizer
        # "auto" (the default) is the TorchSampler unless beam search is on (the stand-in has none)
        self.sampler_type = "TorchSampler" if self.args.sampler_type == "auto" else self.args.sampler_type
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
        self._started_cluster = False
        try:
            ray.init(address="auto", namespace="trtllm", ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False)
        except ConnectionError:
            ray.init(namespace="trtllm", include_dashboard=False, log_to_driver=False)
            self._started_cluster = True
        tp = int(self.args.tensor_parallel_size)
        groups, share, self._own_group = self._placement(ray, tp)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_RAYLET_PID", "RAY_NODE_IP_ADDRESS")}
        env["TLLM_DISABLE_MPI"] = "1"
        from tensorrt_llm.executor.ray_worker import RayWorker

        bases = (RayWorker,)
        if self.args.ray_worker_extension_cls:
            module, _, name = self.args.ray_worker_extension_cls.rpartition(".")
            ext = getattr(importlib.import_module(module), name)
            clash = sorted(set(vars(ext)) & set(vars(RayWorker)) - {"__module__", "__doc__", "__dict__",
                                                                     "__weakref__", "__qualname__"})
            if clash:
                raise ValueError(f"worker extension {name} redefines worker attributes {clash}")
            bases = (RayWorker, ext)
        worker_cls = ray.remote(type(f"RayWorkerWith{bases[-1].__name__}", bases, {}))
        self.workers = []
        for rank, (pg, index) in enumerate(groups):
            has_gpu = bool(pg.bundle_specs[index].get("GPU"))
            self.workers.append(worker_cls.options(
                num_cpus=1, num_gpus=share if has_gpu else 0, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=index),
            ).remote(rank, tp, str(model), bool(self.args.enable_sleep), pg, index))
        ray.get([w.report_device_id.remote() for w in self.workers])  # every worker is up
        self.requests = 0

    def _placement(self, ray, tp: int):
        """[(group, bundle index)] per rank, the per-worker GPU share, and the group this LLM made itself."""
        from ray.util.placement_group import get_current_placement_group

        a = self.args
        if PLACEMENT == "ray_placement_config" and a.ray_placement_config is not None:
            cfg = a.ray_placement_config
            groups, indices, share = cfg.placement_groups, cfg.placement_bundle_indices, cfg.per_worker_gpu_share
        elif PLACEMENT == "top_level" and a.placement_groups is not None:
            groups, indices, share = a.placement_groups, a.placement_bundle_indices, a.per_worker_gpu_share
        elif os.environ.get("TRTLLM_RAY_BUNDLE_INDICES"):
            current = get_current_placement_group()
            if current is None:
                raise ValueError("TRTLLM_RAY_BUNDLE_INDICES needs to run inside a placement group")
            groups = [current]
            indices = [[int(i) for i in os.environ["TRTLLM_RAY_BUNDLE_INDICES"].split(",")]]
            share = float(os.environ.get("TRTLLM_RAY_PER_WORKER_GPUS", "1"))
            flat = [(current, i) for i in indices[0]]
            if len(flat) != tp:
                raise ValueError(f"{len(flat)} bundle indices for tensor_parallel_size={tp}")
            return flat, share, current  # the executor removes the current group at shutdown (the real one does)
        else:
            me = ray.util.get_node_ip_address()
            bundles = [{"CPU": 1} for _ in range(tp)]
            bundles[0][f"node:{me}"] = 0.01
            pg = ray.util.placement_group(bundles, strategy="PACK")
            ray.get(pg.ready(), timeout=300)
            return [(pg, i) for i in range(tp)], 1.0, pg
        flat = [(g, i) for g, idx in zip(groups, indices) for i in idx]
        if len(flat) != tp:
            raise ValueError(f"{len(flat)} placement bundle indices for tensor_parallel_size={tp}")
        return flat, float(share or 1.0), None

    # -- requests ----------------------------------------------------------------------------------------------
    def generate_async(self, inputs, sampling_params=None, streaming: bool = False) -> RequestOutput:
        from tensorrt_llm.sampling_params import SamplingParams

        sp = sampling_params or SamplingParams()
        prompt = list(inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs)
        stops = [] if sp.stop is None else ([sp.stop] if isinstance(sp.stop, str) else list(sp.stop))
        words = [(t, [t]) for t in (sp.stop_token_ids or [])]
        words += [(s, self.tokenizer.encode(s, add_special_tokens=False)) for s in stops]
        end_id = sp.end_id if sp.end_id is not None else self.tokenizer.eos_token_id
        request = {"seed": sp.seed, "top_k": sp.top_k, "top_p": sp.top_p, "temperature": sp.temperature,
                   "max_tokens": sp.max_tokens, "stop_words": words, "end_id": end_id,
                   "include_stop_str_in_output": sp.include_stop_str_in_output,
                   "sampler_type": self.sampler_type, "logprobs": sp.logprobs,
                   "logprobs_mode": getattr(getattr(sp, "logprobs_mode", None), "value", "raw")}
        self.requests += 1
        return RequestOutput(self.workers[0].generate.remote(prompt, request), sp.logprobs is not None)

    # -- collective RPC, memory, shutdown ----------------------------------------------------------------------
    def _collective_rpc(self, method: str, args=(), kwargs=None):
        import ray

        out = ray.get([w.call.remote(method, tuple(args), kwargs) for w in self.workers])
        if method == "update_weights" and args and args[0] is None:  # worker 0 decodes with every worker's shard
            ray.get(self.workers[0].assemble.remote(ray.get([w.shards.remote() for w in self.workers])))
        return out

    def shutdown(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.get(w.call.remote("shutdown"), timeout=30)
            except Exception:  # noqa: BLE001 - a dead worker: kill it anyway
                pass
            ray.kill(w)
        self.workers = []
        if self._own_group is not None:  # a group it made itself (or, env-var path, the current one)
            ray.util.remove_placement_group(self._own_group)
            self._own_group = None
        if self._started_cluster:
            ray.shutdown()
