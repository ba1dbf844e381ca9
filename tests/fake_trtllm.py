"""A CPU test double of the slice of TensorRT-LLM's LLM API that `TRTLLMGenerator` uses.

It runs a Hugging Face model with full re-forwards and mimics what the backend relies on (see the
module docstring of nemo_sdsearch/rollout/trtllm_generator.py): `generate_async(ids, sampling_params,
streaming)` returning a result that can be awaited, iterated with `async for` and aborted; cumulative
`outputs[0].token_ids` / `logprobs` ({token: Logprob}); stop words matched as token-id sequences of
`tokenizer.encode(stop)` (so a stop string spelled with other tokens is NOT caught here, as in
TensorRT-LLM); `stop_token_ids`; `end_id`; per-request seeds; top_k=1 greedy; log-probs of the
temperature-scaled distribution before top-p (the TRTLLMSampler behaviour the backend assumes);
`_collective_rpc` with report_device_id / update_weights (buckets, then None; the names and sizes of
every refit's buckets are recorded in `refits`) / sleep / wakeup / reset_prefix_cache. Requests
interleave on the event loop one token at a time, like in-flight batching.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from nemo_sdsearch.rollout.trtllm_generator import TRTLLMGenerator

FAKE_UUID = "GPU-00000000-fake-0000-0000-000000000000"


def _stand_in_sampling_params():
    """tests/stand_in's `tensorrt_llm.SamplingParams`, loaded from its file under another name: this process must
    not import a `tensorrt_llm` (the conformance suite decides from that whether the real one is here)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "stand_in" / "tensorrt_llm" / "sampling_params.py"
    spec = importlib.util.spec_from_file_location("stand_in_sampling_params", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SamplingParams


FakeSamplingParams = _stand_in_sampling_params()


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class FakeOutput:
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: object = None
    generation_logits: torch.Tensor | None = None


class FakeResult:
    def __init__(self, llm: "FakeLLM", prompt, sp: FakeSamplingParams, streaming: bool):
        self.llm, self.prompt, self.sp, self.streaming = llm, [int(t) for t in prompt], sp, streaming
        self.outputs = [FakeOutput()]
        self.finished = False
        self._aborted = False
        self._steps: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._produce())

    def abort(self) -> None:
        self._aborted = True

    async def _produce(self) -> None:
        sp, llm = self.sp, self.llm
        stops = [] if sp.stop is None else ([sp.stop] if isinstance(sp.stop, str) else list(sp.stop))
        words = [(t, [t]) for t in (sp.stop_token_ids or [])]
        words += [(s, llm.tokenizer.encode(s, add_special_tokens=False)) for s in stops]
        gen = torch.Generator().manual_seed(int(sp.seed or 0))
        greedy = sp.top_k == 1
        temp = 1.0 if greedy or sp.temperature is None else float(sp.temperature)
        ids, out, lps, logits_rows = list(self.prompt), [], [], []
        try:
            while True:
                if self._aborted:
                    self._steps.put_nowait((list(out), list(lps), "cancelled", None, None, True))
                    return
                if llm.asleep:
                    raise RuntimeError("fake engine: generate while asleep")
                with torch.no_grad():
                    logits = llm.model(torch.tensor([ids])).logits[0, -1].float()
                logp = torch.log_softmax(logits / temp, -1)
                if greedy:
                    tok = int(logits.argmax())
                else:
                    probs = logp.exp()
                    if sp.top_p is not None and sp.top_p < 1.0:
                        sorted_p, order = probs.sort(descending=True)
                        keep = sorted_p.cumsum(-1) - sorted_p < sp.top_p
                        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
                    tok = int(torch.multinomial(probs, 1, generator=gen))
                ids.append(tok)
                out.append(tok)
                lps.append({tok: Logprob(float(logp[tok]), int((logp > logp[tok]).sum()) + 1)})
                logits_rows.append(logits)
                reason, stop_reason = None, None
                if sp.end_id is not None and tok == sp.end_id:
                    reason = "stop"
                elif len(out) >= sp.max_tokens:
                    reason = "length"
                else:
                    for src, word in words:
                        if word and out[-len(word):] == word:
                            reason, stop_reason = "stop", src
                            if not sp.include_stop_str_in_output:
                                del out[-len(word):], lps[-len(word):], logits_rows[-len(word):]
                            break
                gl = torch.stack(logits_rows) if sp.return_generation_logits and logits_rows else None
                self._steps.put_nowait((list(out), list(lps), reason, stop_reason, gl, reason is not None))
                if reason is not None:
                    return
                await asyncio.sleep(0)  # let the other requests take a step
        except BaseException as e:  # surface errors to the consumer
            self._steps.put_nowait(e)

    def _apply(self, item) -> None:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        ids, lps, reason, stop_reason, gl, done = item
        o = self.outputs[0]
        o.token_ids, o.logprobs = ids, (lps if self.sp.logprobs is not None else [])
        o.finish_reason, o.stop_reason, o.generation_logits = reason, stop_reason, gl
        self.finished = done

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        self._apply(await self._steps.get())
        return self

    async def aresult(self):
        while not self.finished:
            self._apply(await self._steps.get())
        return self

    def __await__(self):
        return self.aresult().__await__()


class FakeLLM:
    def __init__(self, model, tokenizer, worker_uuids=(FAKE_UUID,)):
        self.model, self.tokenizer = model, tokenizer
        self.worker_uuids = list(worker_uuids)
        self.senders: list[dict] = []  # per update_weights bucket: {worker uuid: uuid of the rank that sent it}
        self.asleep: list | None = None
        self.calls: list[tuple] = []
        self.requests: list[FakeSamplingParams] = []
        # per refit (closed by the final update_weights(None)), per bucket: the (name, bytes) received
        self.refits: list[list[list[tuple[str, int]]]] = []
        self._refit_open = False
        self._loading: dict = {}

    def generate_async(self, inputs, sampling_params, streaming: bool = False) -> FakeResult:
        self.requests.append(sampling_params)
        return FakeResult(self, inputs, sampling_params, streaming)

    def _collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append((method, args))
        if method == "report_device_id":
            return list(self.worker_uuids)
        if method == "update_weights":
            (handles,) = args
            if handles is None:  # finalize: load everything received so far
                missing, unexpected = self.model.load_state_dict(self._loading, strict=False)
                if unexpected:
                    raise KeyError(f"unexpected weights {unexpected}")
                self._loading = {}
                self._refit_open = False
                return [None]
            if sorted(handles) != sorted(self.worker_uuids):  # every worker gets its own GPU's handles
                raise KeyError(f"update_weights for GPUs {sorted(handles)}, the engine runs on {self.worker_uuids}")
            self.senders.append({u: _sender(h, u) for u, h in handles.items()})
            bucket = [(name, _unwrap(t)) for name, t in handles[self.worker_uuids[0]]]
            if not self._refit_open:
                self.refits.append([])
                self._refit_open = True
            self.refits[-1].append([(name, t.numel() * t.element_size()) for name, t in bucket])
            self._loading.update(dict(bucket))
            return [None]
        if method == "sleep":
            self.asleep = list(args[0])
            return [None]
        if method == "wakeup":
            self.asleep = None
            return [None]
        if method == "reset_prefix_cache":
            return [None]
        raise AttributeError(method)

    def shutdown(self):
        pass


class FakeTRTLLMGenerator(TRTLLMGenerator):
    """The real TRTLLMGenerator logic over FakeLLM; weights go over as plain tensors instead of CUDA IPC."""

    def _ipc_handles(self, bucket, uuid, keep):
        return [(name, t.detach().clone()) for name, t in bucket]


def fake_generator(model, tokenizer, **kwargs) -> FakeTRTLLMGenerator:
    kwargs.setdefault("refit_finalize", True)
    kwargs.setdefault("refit_bucket_bytes", 64 * 1024)  # several buckets for the micro model
    return FakeTRTLLMGenerator.from_llm(FakeLLM(model, tokenizer), tokenizer, FakeSamplingParams, **kwargs)


# -- one engine per data-parallel replica: the TensorRT-LLM LLM constructor, Ray and CUDA IPC, faked ----------
@dataclass
class FakeIPCHandle:
    """What `trtllm_placement.ipc_handles` makes in these tests: the tensor and the GPU of the rank that made it."""
    sender: str
    tensor: torch.Tensor


def _unwrap(t):
    return t.tensor if isinstance(t, FakeIPCHandle) else t


def _sender(handles, uuid):
    senders = {h.sender for _, h in handles if isinstance(h, FakeIPCHandle)}
    if senders and senders != {uuid}:
        raise ValueError(f"the handles for GPU {uuid} were made on {sorted(senders)}: a rank may only send its own GPU's")
    return senders.pop() if senders else None


@dataclass
class FakeKvCacheConfig:
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float = 0.9


@dataclass
class FakeRayPlacementConfig:
    placement_groups: list | None = None
    placement_bundle_indices: list | None = None
    per_worker_gpu_share: float | None = None


class RecordingLLM(FakeLLM):
    """`tensorrt_llm.LLM(**kwargs)`: records its arguments and the environment it was built in; its workers
    sit on the GPUs of the placement bundles it was given (`bundle_uuid(pg, index)`)."""
    built: list[dict] = []
    bundle_uuid = staticmethod(lambda pg, index: f"GPU-fake-{index}")

    def __init__(self, **kwargs):
        import os

        from transformers import AutoModelForCausalLM, AutoTokenizer

        placement = kwargs.get("ray_placement_config")
        if placement is not None:
            (pg,), (bundles,) = placement.placement_groups, placement.placement_bundle_indices
            uuids = [self.bundle_uuid(pg, i) for i in bundles]
        else:
            uuids = [FAKE_UUID]
        if len(uuids) != kwargs.get("tensor_parallel_size", 1):
            raise ValueError(f"{len(uuids)} placement bundles for tensor_parallel_size={kwargs.get('tensor_parallel_size')}")
        tok = kwargs["tokenizer"]
        if isinstance(tok, str):
            tok = AutoTokenizer.from_pretrained(tok)
        super().__init__(AutoModelForCausalLM.from_pretrained(kwargs["model"]), tok, uuids)
        self.kwargs = kwargs
        self.environ = dict(os.environ)
        RecordingLLM.built.append({"llm": self, "kwargs": kwargs, "environ": self.environ})


def fake_trtllm_api():
    """A stand-in for `trtllm_generator.import_trtllm()`."""
    from types import SimpleNamespace

    return SimpleNamespace(version="fake", LLM=RecordingLLM, SamplingParams=FakeSamplingParams,
                           KvCacheConfig=FakeKvCacheConfig, TorchLlmArgs=None, SleepConfig=None,
                           RayPlacementConfig=FakeRayPlacementConfig)


class FakePlacementGroup:
    def __init__(self, bundles, name):
        self.bundle_specs, self.name = bundles, name

    def ready(self):
        return self


def fake_ray_module(store):
    """A stand-in for the `ray` module with what trtllm_placement uses: init / is_initialized / get,
    util.placement_group and util.get_placement_group (named groups shared between processes through the
    folder `store`) and util.get_node_ip_address."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    store = Path(store)
    state = {"init": None}

    def placement_group(bundles, strategy="PACK", name=""):
        (store / f"{name}.json").write_text(json.dumps({"bundles": bundles, "strategy": strategy}))
        return FakePlacementGroup(bundles, name)

    def get_placement_group(name):
        return FakePlacementGroup(json.loads((store / f"{name}.json").read_text())["bundles"], name)

    util = SimpleNamespace(placement_group=placement_group, get_placement_group=get_placement_group,
                           get_node_ip_address=lambda: "10.0.0.1")
    return SimpleNamespace(util=util, init=lambda **kw: state.update(init=kw),
                           is_initialized=lambda: state["init"] is not None, get=lambda x, timeout=None: x,
                           state=state)

