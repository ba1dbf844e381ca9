"""A CPU test double of the slice of TensorRT-LLM's LLM API that `TRTLLMGenerator` uses, in one process.

It runs a Hugging Face model (a KV cache per request) and keeps the engine's contracts that the backend relies on
(module docstring of nemo_sdsearch/rollout/trtllm_generator.py, docs/trtllm.md):

* requests: `generate_async(ids, sampling_params, streaming)` returns a result that can be awaited, iterated with
  `async for` and aborted; cumulative `outputs[0].token_ids` / `logprobs` ([{token: Logprob}]); stop words
  matched as token-id sequences of `tokenizer.encode(stop)` (a stop string spelled with other tokens is NOT
  caught, as in TensorRT-LLM); `stop_token_ids`; `end_id`; per-request seeds; requests interleave on the event
  loop one token at a time, like in-flight batching.
* sampling and log-probs per sampler, as upstream documents them (the stand-in's _torch/pyexecutor/sampler.py,
  shared with tests/stand_in): the TRTLLMSampler reports log softmax(logits / T) before top-k / top-p, the
  TorchSampler the raw log_softmax(logits) by default or, with `logprobs_mode="processed"`, the log-probs of
  the distribution it drew from (after temperature, top-k and top-p); `logprobs=K` adds the top K (TorchSampler).
* tensor parallelism: the engine has one worker per device id (two by default). A refit,
  `update_weights({device id: [(name, tensor)]})` per bucket then `update_weights(None)`, gives every worker the
  full tensors of ITS OWN device id; a worker keeps only its shard (the rank-th piece of each flattened tensor)
  and the model the engine decodes with is assembled from every worker's shard at the final call. A worker that
  received the wrong tensors, or none, changes what the engine serves. Names and sizes of every refit's buckets
  are recorded in `refits`.
* memory: `sleep(tags)` / `wakeup(tags)` with TensorRT-LLM's memory tags; releasing a weight tag ("model",
  "draft_model": a level-2 sleep) discards the weights: every worker's shard and the decode model become NaN,
  generating raises until a refit has brought back EVERY weight (checked at the final call), and waking up does
  not restore them. A level-1 sleep (the KV cache) keeps them.

The engine holds its own copy of the model it is given (as a real engine loads its own), so a test that reads
`llm.model` sees what the engine serves, not the trainer's tensors.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.util
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_sdsearch.rollout.trtllm_generator import TRTLLMGenerator

STAND_IN = Path(__file__).resolve().parent / "stand_in" / "tensorrt_llm"
FAKE_UUIDS = ("GPU-00000000-fake-0000-0000-000000000000", "GPU-11111111-fake-1111-1111-111111111111")


def _load(relative: str, name: str):
    """A file of tests/stand_in, loaded under another name: this process must not import a `tensorrt_llm` (the
    conformance suite decides from that whether the real one is here)."""
    spec = importlib.util.spec_from_file_location(name, STAND_IN / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sp_module = _load("sampling_params.py", "stand_in_sampling_params")
FakeSamplingParams = _sp_module.SamplingParams
LogprobMode = _sp_module.LogprobMode
sampler = _load("_torch/pyexecutor/sampler.py", "stand_in_sampler")
MEMORY_TAGS = {t.value for t in _load("_torch/virtual_memory.py", "stand_in_virtual_memory").ExecutorMemoryType}
WEIGHT_TAGS = {"model", "draft_model"}
_shards = _load("executor/shards.py", "stand_in_shards")
shard_of, canonical_names = _shards.shard_of, _shards.canonical_names


def sampling_params_without(*names: str):
    """A SamplingParams class like FakeSamplingParams without some fields (an older release's)."""
    kept = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(FakeSamplingParams)
            if f.name not in names]
    return dataclasses.make_dataclass("SamplingParams", kept)


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
    def __init__(self, llm: "FakeLLM", prompt, sp, streaming: bool):
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
        mode = getattr(sp, "logprobs_mode", "raw")
        feed, past, out, lps, logits_rows = list(self.prompt), None, [], [], []
        try:
            while True:
                if self._aborted:
                    self._steps.put_nowait((list(out), list(lps), "cancelled", None, None, True))
                    return
                llm.check_can_generate()
                with torch.no_grad():  # the prompt once, then one token at a time over the request's KV cache
                    result = llm.model(torch.tensor([feed]), use_cache=True, **{llm.cache_kwarg: past})
                past, logits = result[llm.cache_kwarg], result.logits[0, -1].float()
                tok, entries = sampler.step(logits, sampler_type=llm.sampler_type, temperature=sp.temperature,
                                            top_k=sp.top_k, top_p=sp.top_p, logprobs=sp.logprobs,
                                            logprobs_mode=mode, generator=gen)
                feed = [tok]
                out.append(tok)
                lps.append({t: Logprob(lp, r) for t, lp, r in entries})
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


# -- the engine's workers: tensor-parallel shards ----------------------------------------------------------
class FakeWorker:
    """One rank of the engine: its device id and its shard of every weight."""

    def __init__(self, uuid: str, rank: int, world: int, state: dict):
        self.uuid, self.rank, self.world = uuid, rank, world
        self.shard = {n: shard_of(t, rank, world) for n, t in state.items()}
        self.reloaded: set[str] = set()
        self.released = False

    def load(self, named, names: dict, shapes: dict) -> None:
        for name, t in named:
            if name not in names:
                raise KeyError(f"update_weights: the model has no weight {name!r}")
            target = names[name]
            if tuple(t.shape) != shapes[target]:
                raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the model {shapes[target]}")
            self.shard[target] = shard_of(t, self.rank, self.world)
            self.reloaded.add(target)

    def release(self) -> None:
        for t in self.shard.values():
            if t.is_floating_point():
                t.fill_(float("nan"))
        self.released, self.reloaded = True, set()

    def finish(self) -> None:
        if self.released:
            missing = sorted(set(self.shard) - self.reloaded)
            if missing:
                raise RuntimeError(f"worker {self.rank} ({self.uuid}): weights released by sleep were not all "
                                   f"reloaded: {missing[:5]}")
            self.released = False


class FakeLLM:
    def __init__(self, model, tokenizer, worker_uuids=FAKE_UUIDS, sampler_type: str = "TRTLLMSampler"):
        if sampler_type not in sampler.SAMPLERS:
            raise ValueError(f"sampler_type must be one of {sampler.SAMPLERS}, got {sampler_type!r}")
        self.model = copy.deepcopy(model).eval()  # the engine's own weights
        self.tokenizer, self.sampler_type = tokenizer, sampler_type
        # the forward's KV-cache keyword: `cache` from transformers 5.24 on, `past_key_values` before
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.worker_uuids = list(worker_uuids)
        self.names = canonical_names(self.model)
        state = self.model.state_dict()
        self.shapes = {n: tuple(state[n].shape) for n in set(self.names.values())}
        self.workers = [FakeWorker(u, r, len(self.worker_uuids), {n: state[n] for n in self.shapes})
                        for r, u in enumerate(self.worker_uuids)]
        self.asleep: list | None = None
        self.calls: list[tuple] = []
        self.requests: list = []
        # per refit (closed by the final update_weights(None)), per bucket: the (name, bytes) received
        self.refits: list[list[list[tuple[str, int]]]] = []
        self._refit_open = False

    @property
    def weights_released(self) -> bool:
        return any(w.released for w in self.workers)

    def check_can_generate(self) -> None:
        if self.asleep:
            raise RuntimeError(f"fake engine: generate while asleep ({sorted(self.asleep)})")
        if self.weights_released:
            raise RuntimeError("fake engine: generate after a sleep released the weights (a level-2 sleep) and "
                               "before a refit brought them back")

    def generate_async(self, inputs, sampling_params, streaming: bool = False) -> FakeResult:
        self.requests.append(sampling_params)
        return FakeResult(self, inputs, sampling_params, streaming)

    def _collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append((method, args))
        if method == "report_device_id":
            return list(self.worker_uuids)
        if method == "update_weights":
            return self._update_weights(*args)
        if method in ("sleep", "wakeup"):
            (tags,) = args
            bad = sorted(set(tags) - MEMORY_TAGS)
            if bad:
                raise ValueError(f"{method}: unknown memory tags {bad}")
            if method == "sleep":
                self.asleep = sorted(set(self.asleep or []) | set(tags))
                if set(tags) & WEIGHT_TAGS:
                    self._release_weights()
            else:
                left = sorted(set(self.asleep or []) - set(tags))
                self.asleep = left or None
            return [None] * len(self.workers)
        if method == "reset_prefix_cache":
            return [None] * len(self.workers)
        raise AttributeError(method)

    def _update_weights(self, handles):
        if handles is None:  # the final call: every worker checks its reload, the decode model is assembled
            for w in self.workers:
                w.finish()
            self._assemble()
            self._refit_open = False
            return [None] * len(self.workers)
        if sorted(handles) != sorted(self.worker_uuids):  # every worker gets its own GPU's handles
            raise KeyError(f"update_weights for GPUs {sorted(handles)}, the engine runs on {self.worker_uuids}")
        for w in self.workers:
            w.load(handles[w.uuid], self.names, self.shapes)
        if not self._refit_open:
            self.refits.append([])
            self._refit_open = True
        self.refits[-1].append([(name, t.numel() * t.element_size()) for name, t in handles[self.worker_uuids[0]]])
        return [None] * len(self.workers)

    def _assemble(self) -> None:
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, shape in self.shapes.items():
                state[name].copy_(torch.cat([w.shard[name] for w in self.workers]).view(shape))

    def _release_weights(self) -> None:
        for w in self.workers:
            w.release()
        with torch.no_grad():
            for t in self.model.state_dict(keep_vars=True).values():
                if t.is_floating_point():
                    t.fill_(float("nan"))

    def shutdown(self):
        pass


class FakeTRTLLMGenerator(TRTLLMGenerator):
    """The real TRTLLMGenerator logic over FakeLLM; weights go over as plain tensors instead of CUDA IPC (a copy
    per device id, as every rank sends its own)."""

    def _ipc_handles(self, bucket, uuid, keep):
        return [(name, t.detach().clone()) for name, t in bucket]


def fake_generator(model, tokenizer, *, worker_uuids=FAKE_UUIDS, sampler_type: str = "TRTLLMSampler",
                   sampling_params_cls=FakeSamplingParams, generator_cls=FakeTRTLLMGenerator,
                   **kwargs) -> FakeTRTLLMGenerator:
    """The generator over a fake engine of `len(worker_uuids)` tensor-parallel workers (two by default) that runs
    `sampler_type` and holds its own copy of `model`."""
    kwargs.setdefault("refit_finalize", True)
    kwargs.setdefault("refit_bucket_bytes", 64 * 1024)  # several buckets for the micro model
    llm = FakeLLM(model, tokenizer, worker_uuids, sampler_type)
    return generator_cls.from_llm(llm, tokenizer, sampling_params_cls, sampler_type=sampler_type, **kwargs)
