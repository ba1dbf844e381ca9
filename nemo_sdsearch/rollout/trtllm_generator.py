"""The `trtllm` generator backend: TensorRT-LLM's LLM API (PyTorch backend) behind the `Generator` seam.

GPU only. `tensorrt_llm` is imported lazily, inside the class: this module imports on any machine, and
constructing a `TRTLLMGenerator` without TensorRT-LLM raises an ImportError that says how to get it.
Target: TensorRT-LLM 1.2.x as shipped in the NGC NeMo 26.04 container (`pip install -e '.[trtllm]'`
elsewhere). The conformance suite `tests/test_generator_conformance.py` runs the same checks on this
backend as on the torch one wherever tensorrt_llm imports and a CUDA GPU exists.

See docs/trtllm.md for how the seam maps onto the LLM API (requests, continuous batching, stop strings,
log-probs, seeds, refit, sleep) and for the research log: every TensorRT-LLM API fact this module relies
on, where it was read, and which are still assumptions that only the GPU conformance run checks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import json
import logging
import math
import os
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

from nemo_sdsearch.rollout.generator import (Completion, GenerationSession, Generator, SamplingParams, StopChecker,
                                             iter_buckets, mix_seed)
from nemo_sdsearch.rollout.trtllm_placement import (EnginePlacement, connect_ray, engine_environment, ipc_handles,
                                                    start_local_ray)

log = logging.getLogger(__name__)

INSTALL_HINT = ("the trtllm generator backend needs TensorRT-LLM >= 1.2 (GPU only): run inside the NGC NeMo "
                "container (26.04 ships TensorRT-LLM 1.2.x) or install the project's `trtllm` extra on a CUDA "
                "machine: pip install -c constraints.txt -e '.[trtllm]'")

EXTENSION_CLS = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
WEIGHT_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra",
               "executor_extra", "model", "draft_model")
KV_TAGS = ("kv_cache",)


def trtllm_available() -> bool:
    """True if `tensorrt_llm` can be found (it may still fail to load without a GPU)."""
    return importlib.util.find_spec("tensorrt_llm") is not None


def import_trtllm() -> SimpleNamespace:
    """The few TensorRT-LLM names this backend uses, or an ImportError with `INSTALL_HINT`."""
    try:
        import tensorrt_llm
        from tensorrt_llm import LLM, SamplingParams as TrtSamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
    except Exception as e:  # a wheel without a GPU can fail with OSError/RuntimeError as well
        raise ImportError(f"{INSTALL_HINT} (importing tensorrt_llm failed: {type(e).__name__}: {e})") from e
    api = SimpleNamespace(version=getattr(tensorrt_llm, "__version__", "?"), LLM=LLM,
                          SamplingParams=TrtSamplingParams, KvCacheConfig=KvCacheConfig,
                          TorchLlmArgs=None, SleepConfig=None, RayPlacementConfig=None)
    try:
        from tensorrt_llm.llmapi.llm_args import TorchLlmArgs
        api.TorchLlmArgs = TorchLlmArgs
    except Exception:
        pass
    try:
        from tensorrt_llm.llmapi.llm_args import RayPlacementConfig  # one engine per replica (placement groups)
        api.RayPlacementConfig = RayPlacementConfig
    except Exception:
        pass
    try:
        from tensorrt_llm.llmapi import SleepConfig  # newer releases replace enable_sleep with this
        api.SleepConfig = SleepConfig
    except Exception:
        pass
    return api


def request_seed(session_seed: int | None, row: int, turn: int) -> int:
    """The sampling seed of one request: a hash of (session seed, row, turn), in [0, 2**63)."""
    return mix_seed(session_seed, row, turn) & ((1 << 63) - 1)


def _norm_uuid(u: str) -> str:
    u = str(u).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


class TRTLLMGenerator(Generator):
    """`Generator` over a TensorRT-LLM `LLM` (PyTorch backend, Ray orchestrator for in-place refit).

    model_dir: a Hugging Face checkpoint directory (config, weights, tokenizer files).
    tokenizer: the tokenizer the rollout engine decodes with (defaults to the one in `model_dir`).
    sampler_type: "TRTLLMSampler" (default: honours per-request seeds, temperature-scaled log-probs)
        or "TorchSampler".
    logprobs_source: "auto" or "sampler" (the sampler's log-probs, in the mode that gives the project's
        convention, see `_logprob_plan`; a sampling setting for which no mode gives it is refused with a
        ValueError), or "logits" (computed here from the returned generation logits: exact for every
        sampler and setting, costs vocab floats per generated token).
    streaming: watch every token with our StopChecker and abort at the first stop (exact torch
        semantics); False relies on TensorRT-LLM's token-id stop words and cuts afterwards.
    llm_kwargs: extra `LLM(...)` arguments (override ours).
    """

    def __init__(self, model_dir: str | os.PathLike, tokenizer=None, eos_token_ids: Sequence[int] | None = None, *,
                 tensor_parallel_size: int = 1, dtype: str = "auto", max_seq_len: int | None = None,
                 max_batch_size: int = 256, max_num_tokens: int | None = None,
                 kv_cache_free_gpu_memory_fraction: float = 0.5, sampler_type: str = "TRTLLMSampler",
                 logprobs_source: str = "auto", streaming: bool = True, enable_sleep: bool = True,
                 refit_bucket_bytes: int = 1 << 30, max_input_len: int | None = None,
                 placement: "EnginePlacement | None" = None, llm_kwargs: Mapping[str, Any] | None = None):
        with engine_environment():  # the launcher's SLURM/PMI/torchrun variables must not reach the workers
            self._build(model_dir, tokenizer, eos_token_ids, tensor_parallel_size, dtype, max_seq_len, max_batch_size,
                        max_num_tokens, kv_cache_free_gpu_memory_fraction, sampler_type, logprobs_source, streaming,
                        enable_sleep, refit_bucket_bytes, max_input_len, placement, llm_kwargs)
        if placement is not None:
            placement.check(self.engine_uuids())

    def _build(self, model_dir, tokenizer, eos_token_ids, tensor_parallel_size, dtype, max_seq_len, max_batch_size,
               max_num_tokens, kv_cache_free_gpu_memory_fraction, sampler_type, logprobs_source, streaming,
               enable_sleep, refit_bucket_bytes, max_input_len, placement, llm_kwargs):
        api = import_trtllm()  # raises ImportError(INSTALL_HINT) without TensorRT-LLM
        model_dir = Path(model_dir)
        llm_tokenizer = tokenizer if tokenizer is not None else str(model_dir)  # encodes the stop strings
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # RayExecutor sets this too; the driver needs it to see the workers' GPUs for IPC refit.
        os.environ.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
        if os.environ.get("RAY_ADDRESS"):  # the job's Ray cluster: join it through this node's raylet (by IP)
            connect_ray()
        else:
            start_local_ray()
        kwargs: dict[str, Any] = dict(
            model=str(model_dir), tokenizer=llm_tokenizer, backend="pytorch", dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_config=api.KvCacheConfig(enable_block_reuse=True,
                                              free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction),
            max_batch_size=max_batch_size, sampler_type=sampler_type,
            orchestrator_type="ray", ray_worker_extension_cls=EXTENSION_CLS,
            gather_generation_logits=logprobs_source == "logits")
        if max_seq_len is not None:
            kwargs["max_seq_len"] = max_seq_len
        if max_num_tokens is not None:
            kwargs["max_num_tokens"] = max_num_tokens
        if max_input_len is not None:
            kwargs["max_input_len"] = max_input_len
        if enable_sleep:
            kwargs["enable_sleep"] = True
        if placement is not None:
            kwargs.update(placement.llm_kwargs(api))
        kwargs.update(llm_kwargs or {})
        kwargs = _fit_llm_kwargs(api, kwargs)
        log.info("building TensorRT-LLM %s LLM from %s", api.version, model_dir)
        llm = api.LLM(**kwargs)
        self._setup(llm, tokenizer, api.SamplingParams, eos_token_ids, sampler_type=sampler_type,
                    logprobs_source=logprobs_source, streaming=streaming,
                    weight_dtype=_weight_dtype(model_dir, dtype), refit_bucket_bytes=refit_bucket_bytes)

    @classmethod
    def from_llm(cls, llm, tokenizer, sampling_params_cls, eos_token_ids: Sequence[int] | None = None, *,
                 sampler_type: str = "TRTLLMSampler", logprobs_source: str = "auto", streaming: bool = True,
                 weight_dtype=None, refit_bucket_bytes: int = 1 << 30,
                 refit_finalize: bool | None = None) -> "TRTLLMGenerator":
        """Wrap an already built LLM (or a test double with the same surface)."""
        self = cls.__new__(cls)
        self._setup(llm, tokenizer, sampling_params_cls, eos_token_ids, sampler_type=sampler_type,
                    logprobs_source=logprobs_source, streaming=streaming, weight_dtype=weight_dtype,
                    refit_bucket_bytes=refit_bucket_bytes, refit_finalize=refit_finalize)
        return self

    def _setup(self, llm, tokenizer, sampling_params_cls, eos_token_ids, *, sampler_type, logprobs_source,
               streaming, weight_dtype, refit_bucket_bytes, refit_finalize=None):
        if sampler_type not in ("TRTLLMSampler", "TorchSampler"):
            raise ValueError(f"sampler_type must be 'TRTLLMSampler' or 'TorchSampler', got {sampler_type!r}")
        if logprobs_source not in ("auto", "sampler", "logits"):
            raise ValueError(f"logprobs_source must be 'auto', 'sampler' or 'logits', got {logprobs_source!r}")
        self.llm = llm
        self.tokenizer = tokenizer
        self._SP = sampling_params_cls
        self._sp_fields = _param_fields(sampling_params_cls)
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_token_ids = list(eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.sampler_type = sampler_type
        self.logprobs_source = logprobs_source
        self.streaming = streaming
        self.weight_dtype = weight_dtype
        self.refit_bucket_bytes = int(refit_bucket_bytes)
        self._refit_finalize_flag = refit_finalize
        self._asleep: list[str] | None = None
        self._needs_refit = False
        self.replica = None  # a trtllm_placement.ReplicaRefit when the engine serves a replica of several ranks
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-generator", daemon=True)
        self._thread.start()

    # -- the seam ----------------------------------------------------------------------------------
    def open(self, prompts: Sequence[Sequence[int]], seed: int | None = None,
             row_seeds: Sequence[int] | None = None) -> "TRTLLMSession":
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if self._asleep is not None:
            raise RuntimeError("the TensorRT-LLM generator is asleep; call wake_up() before generating")
        if self._needs_refit:
            raise RuntimeError("weights were released by sleep(level=2); call refit(weights) after wake_up()")
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
        return TRTLLMSession(self, prompts, seed, row_seeds)

    def refit(self, weights) -> None:
        """Load the actor's weights into the running engine in place (no rebuild).

        `weights`: a weight stream of (HF name, tensor) pairs (`Actor.iter_weights`) or a Mapping. It is
        grouped into buckets of `refit_bucket_bytes` (`iter_buckets`); CUDA IPC handles of each bucket's
        tensors (cast to the engine dtype, on the worker's GPU) go to every Ray worker through
        `collective_rpc("update_weights", ({uuid: [(name, handle)]},))`, then the bucket is dropped, and
        `update_weights(None)` finalises (TensorRT-LLM 1.2 RL worker extension; see the module
        docstring). So the trainer side holds at most one bucket plus one tensor. An extension without
        the final call (the earliest form) loads everything in one call: the whole stream is collected
        first. The prefix cache is reset by TensorRT-LLM, since cached KV blocks were computed with the
        old weights."""
        if self._asleep is not None and set(self._asleep) - set(KV_TAGS):
            raise RuntimeError("the weights are released (sleep(level=2)); call wake_up() before refit()")
        if self.replica is not None:  # a data-parallel replica's engine: its ranks send their own GPU's handles
            self.replica.refit(weights.items() if isinstance(weights, Mapping) else weights)
            self._needs_refit = False
            return
        items = weights.items() if isinstance(weights, Mapping) else weights
        items = ((k, v) for k, v in items if not k.endswith("rotary_emb.inv_freq"))
        finalize = self._refit_finalize()
        uuids = self._device_uuids()
        for bucket in (iter_buckets(items, self.refit_bucket_bytes) if finalize else [list(items)]):
            keep: list = []
            handles = {u: self._ipc_handles(bucket, u, keep) for u in uuids}
            self.collective_rpc("update_weights", handles)
            del bucket, handles, keep  # before the next bucket is filled
        if finalize:
            self.collective_rpc("update_weights", None)
        self._needs_refit = False

    def sleep(self, level: int = 1) -> None:
        """Release GPU memory while the actor trains. level 1: the KV cache; level 2: the weights as well
        (then `refit` must follow `wake_up`, since the released weights need not be restored)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self._asleep is not None:
            return
        tags = _valid_tags(list(KV_TAGS) if level == 1 else [*WEIGHT_TAGS, *KV_TAGS])
        release = getattr(self.llm, "release", None)
        if callable(release) and not inspect.iscoroutinefunction(release):
            release(tags=tags)  # newer LLM API (SleepConfig); same tags
        else:
            self.collective_rpc("sleep", tags)
        self._asleep = tags
        if level == 2:
            self._needs_refit = True

    def wake_up(self) -> None:
        if self._asleep is None:
            return
        tags, self._asleep = self._asleep, None
        resume = getattr(self.llm, "resume", None)
        if callable(resume) and not inspect.iscoroutinefunction(resume):
            resume(tags=tags)
        else:
            self.collective_rpc("wakeup", tags)
        try:  # the reuse tree still points at KV blocks whose content was released
            self.collective_rpc("reset_prefix_cache")
        except Exception as e:  # noqa: BLE001
            log.warning("could not reset TensorRT-LLM's prefix cache after wake_up (%s); cached KV blocks may be "
                        "stale until the next refit", e)

    def shutdown(self) -> None:
        try:
            shutdown = getattr(self.llm, "shutdown", None)
            if callable(shutdown):
                shutdown()
        finally:
            if self._loop.is_running():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)

    # -- requests ----------------------------------------------------------------------------------
    def _submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _logprob_plan(self, params: SamplingParams) -> str:
        """Where the sampled log-probs come from: 'sampler' (the TRTLLMSampler's), 'raw' / 'processed' (the
        TorchSampler's, in that `logprobs_mode`) or 'logits'.

        The project's convention is log_softmax(logits / T) over the whole vocabulary, before top-p (T = 1 for
        greedy). What each sampler returns (docs/trtllm.md, "Log-probs per sampler"): the TRTLLMSampler
        log softmax(logits / T) before top-k / top-p, i.e. the convention; the TorchSampler's "raw" mode (its
        default) log_softmax(logits) without the temperature: the convention at T = 1 and for greedy; its
        "processed" mode log_softmax(logits / T) renormalised over the tokens top-k / top-p kept: the convention
        when nothing is cut (top_p = 1, top_k = 0)."""
        if self.logprobs_source == "logits":
            return "logits"
        if self.sampler_type == "TRTLLMSampler":
            return "sampler"
        if params.temperature in (0, 1):
            return "raw"
        if "logprobs_mode" in self._sp_fields and params.top_p == 1.0:
            return "processed"
        why = ("its log-probs renormalised over the top-p set (logprobs_mode='processed') are not either"
               if "logprobs_mode" in self._sp_fields else
               "this TensorRT-LLM's SamplingParams has no logprobs_mode, so it has no temperature-scaled ones")
        raise ValueError(f"TorchSampler returns log_softmax(logits) without the temperature, not the "
                         f"log_softmax(logits / T) the trainer expects, at temperature={params.temperature}, "
                         f"top_p={params.top_p}; {why}. Use sampler_type='TRTLLMSampler' or "
                         "logprobs_source='logits'")

    def _sampling_params(self, params: SamplingParams, seed: int, plan: str):
        kw: dict[str, Any] = dict(max_tokens=params.max_new_tokens, seed=seed, detokenize=False,
                                  include_stop_str_in_output=True, pad_id=self.pad_id,
                                  stop=list(params.stop) or None, stop_token_ids=list(self.eos_token_ids) or None,
                                  logprobs=1 if plan != "logits" else None,
                                  return_generation_logits=plan == "logits")
        # EOS ids are stop tokens (kept in the output). The C++ sampler gets no end id at all (as in verl);
        # the TorchSampler keeps the first one as its end id.
        kw["end_id"] = -1 if self.sampler_type == "TRTLLMSampler" or not self.eos_token_ids else self.eos_token_ids[0]
        if params.temperature == 0:
            kw.update(top_k=1, top_p=None, temperature=None)  # greedy at the default temperature 1
        else:
            kw.update(top_k=0, top_p=params.top_p, temperature=params.temperature)
        if plan in ("raw", "processed"):  # the TorchSampler's mode, said explicitly where the release has it
            kw["logprobs_mode"] = plan
        return self._SP(**{k: v for k, v in kw.items() if k in self._sp_fields})

    async def _turn(self, context: list[int], params: SamplingParams, seed: int) -> Completion:
        """One request: sample a turn after `context`, cut it at the first stop / EOS."""
        plan = self._logprob_plan(params)
        checker = StopChecker(self.tokenizer, params.stop, self.eos_token_ids)
        sp = self._sampling_params(params, seed, plan)
        result = self.llm.generate_async(context, sampling_params=sp, streaming=self.streaming)
        cut, scanned = None, False
        try:
            if self.streaming:
                seen = 0
                async for step in result:
                    ids = step.outputs[0].token_ids
                    cut = _first_stop(checker, ids, seen)
                    seen = len(ids)
                    if cut is not None:
                        _abort(result)  # the turn is over; stop the request early
                        break
                scanned = True
            else:
                await result
        except asyncio.CancelledError:
            _abort(result)
            raise
        return self._completion(result.outputs[0], params, checker, plan, cut, scanned)

    def _completion(self, out, params: SamplingParams, checker: StopChecker, plan: str,
                    cut: int | None, scanned: bool = False) -> Completion:
        ids = [int(t) for t in out.token_ids]
        if cut is None and not scanned:
            cut = _first_stop(checker, ids, 0)
        if cut is not None:
            reason, stop = checker.check(ids[:cut])
        elif len(ids) >= params.max_new_tokens:
            cut, reason, stop = params.max_new_tokens, "length", None
        elif out.finish_reason == "length":  # the engine's max_seq_len ended the turn
            cut, reason, stop = len(ids), "length", None
        elif out.finish_reason == "stop" and getattr(out, "stop_reason", None) in params.stop:
            # a token-id stop word whose text our checker did not see (decoding artefact): trust the engine
            cut, reason, stop = len(ids), "stop", out.stop_reason
        elif out.finish_reason == "stop" and ids and ids[-1] in self.eos_token_ids:
            cut, reason, stop = len(ids), "eos", None
        else:
            raise RuntimeError(f"TensorRT-LLM ended a turn after {len(ids)} tokens with finish_reason="
                               f"{out.finish_reason!r} / stop_reason={getattr(out, 'stop_reason', None)!r}, "
                               "but no stop string, EOS or length limit explains it")
        ids = ids[:cut]
        return Completion(ids, self._logprobs(out, ids, params, plan), reason, stop)

    def _logprobs(self, out, ids: list[int], params: SamplingParams, plan: str) -> list[float]:
        if plan == "logits":
            import torch

            logits = getattr(out, "generation_logits", None)
            if logits is None or len(logits) < len(ids):
                raise RuntimeError("logprobs_source='logits' needs generation logits for every token; build the "
                                   "LLM with gather_generation_logits=True")
            t = params.temperature if params.temperature > 0 else 1.0
            logp = torch.log_softmax(torch.as_tensor(logits[:len(ids)]).float() / t, -1)
            return logp.gather(-1, torch.tensor(ids, device=logp.device)[:, None]).squeeze(-1).tolist()
        entries = out.logprobs or []
        if len(entries) < len(ids):
            raise RuntimeError(f"TensorRT-LLM returned {len(entries)} log-probs for {len(ids)} tokens")
        lps = []
        for i, (tok, entry) in enumerate(zip(ids, entries)):
            if isinstance(entry, Mapping):
                if tok not in entry:
                    raise RuntimeError(f"the log-probs TensorRT-LLM returned for token {i} do not include the "
                                       f"sampled id {tok} (got ids {sorted(entry)[:5]}); use logprobs_source='logits'")
                value = entry[tok]
                value = getattr(value, "logprob", value)
            else:
                value = entry
            lps.append(float(value))
        if any(math.isinf(v) or math.isnan(v) for v in lps):
            raise RuntimeError("TensorRT-LLM returned non-finite log-probs for sampled tokens (processed after "
                               "top-p?); use logprobs_source='logits'")
        return lps

    # -- refit and memory plumbing -----------------------------------------------------------------
    def collective_rpc(self, method: str, *args):
        """Call `method` of the worker extension on every TensorRT-LLM worker of this engine (the refit's
        IPC-handle hand-over, sleep/wake-up tags, device ids); their answers, one per worker."""
        llm = self.llm
        if hasattr(llm, "_collective_rpc"):
            return llm._collective_rpc(method, args=tuple(args))
        executor = getattr(llm, "_executor", None)
        if executor is not None and hasattr(executor, "collective_rpc"):
            return executor.collective_rpc(method, args=tuple(args))
        raise RuntimeError(f"this LLM cannot run collective RPC {method!r}: build it with orchestrator_type='ray' "
                           f"and ray_worker_extension_cls='{EXTENSION_CLS}' (TensorRT-LLM >= 1.2)")

    def _refit_finalize(self) -> bool:
        """True if the worker extension's update_weights takes buckets and a final None (see docstring)."""
        if self._refit_finalize_flag is None:
            try:
                from tensorrt_llm.llmapi.rlhf_utils import WorkerExtension

                p = inspect.signature(WorkerExtension.update_weights).parameters.get("ipc_handles")
                self._refit_finalize_flag = p is not None and p.default is None
            except Exception:  # noqa: BLE001
                self._refit_finalize_flag = False
        return self._refit_finalize_flag

    def engine_uuids(self) -> list[str]:
        """The device UUIDs of the engine's workers (TensorRT-LLM's report_device_id), in worker order."""
        uuids = self.collective_rpc("report_device_id")
        return sorted(set(uuids), key=list(uuids).index)

    def _device_uuids(self) -> list[str]:
        try:
            uuids = self.collective_rpc("report_device_id")
            if uuids:
                return sorted(set(uuids), key=list(uuids).index)
        except Exception as e:  # noqa: BLE001
            log.warning("report_device_id failed (%s); refitting the current CUDA device only", e)
        import torch

        return [_device_uuid(torch.cuda.current_device())]

    def _ipc_handles(self, bucket, uuid: str, keep: list) -> list:
        """[(name, handle)] with every tensor on the device whose id is `uuid` (`trtllm_placement.ipc_handles`:
        CUDA IPC, or a shared-memory file for a CPU-only run's "CPU-..." device); the tensors are appended to
        `keep`, which must outlive the RPC (the handles do not hold the memory)."""
        return ipc_handles(bucket, self.weight_dtype, keep, device=_local_device(uuid))


class TRTLLMSession(GenerationSession):
    """Rows keep their whole token context; every turn is one TensorRT-LLM request over that context."""

    def __init__(self, owner: TRTLLMGenerator, prompts: Sequence[Sequence[int]], seed: int | None,
                 row_seeds: Sequence[int] | None = None):
        self.g = owner
        self.seed = 0 if seed is None else int(seed)
        self.row_seeds = None if row_seeds is None else [int(x) for x in row_seeds]
        self._ctx: dict[int, list[int]] = {r: [int(t) for t in p] for r, p in enumerate(prompts)}
        self._turns: dict[int, int] = {r: 0 for r in self._ctx}

    @property
    def rows(self) -> list[int]:
        return list(self._ctx)

    def length(self, row: int) -> int:
        if row not in self._ctx:
            raise KeyError(f"row {row} is not live in this session")
        return len(self._ctx[row])

    def _seed(self, row: int, turn: int) -> int:
        """Row `row`'s seed for its turn `turn`: from its own row seed when the session has them."""
        if self.row_seeds is not None:
            return request_seed(self.row_seeds[row], 0, turn)
        return request_seed(self.seed, row, turn)

    def _request(self, row: int, params: SamplingParams) -> concurrent.futures.Future:
        turn = self._turns[row]
        self._turns[row] = turn + 1
        return self.g._submit(self.g._turn(list(self._ctx[row]), params, self._seed(row, turn)))

    def generate(self, params: SamplingParams) -> dict[int, Completion]:
        futures = {r: self._request(r, params) for r in self.rows}
        try:
            done = {r: f.result() for r, f in futures.items()}
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
        for r, c in done.items():
            self._ctx[r].extend(c.token_ids)
        return done

    def extend(self, tokens: Mapping[int, Sequence[int]]) -> None:
        for r in tokens:
            if r not in self._ctx:
                raise KeyError(f"row {r} is not live in this session")
        for r, toks in tokens.items():
            self._ctx[r].extend(int(t) for t in toks)

    def release(self, rows: Sequence[int]) -> None:
        for r in rows:
            self._ctx.pop(r, None)
            self._turns.pop(r, None)

    def run(self, params_for: Callable[[int], SamplingParams],
            on_turn: Callable[[dict[int, Completion]], Mapping[int, Sequence[int] | None]]) -> None:
        """Continuous batching: a row's next request goes in as soon as `on_turn` returned its environment
        tokens, while the other rows' requests keep decoding. `on_turn` runs in this thread with every
        row whose turn ended since the last call."""
        finished_q: queue.Queue = queue.Queue()
        pending: dict[int, concurrent.futures.Future] = {}

        def submit(row: int) -> None:
            fut = self._request(row, params_for(row))
            pending[row] = fut
            fut.add_done_callback(lambda f, row=row: finished_q.put((row, f)))

        try:
            for r in self.rows:
                submit(r)
            while pending:
                batch = [finished_q.get()]
                while True:
                    try:
                        batch.append(finished_q.get_nowait())
                    except queue.Empty:
                        break
                finished: dict[int, Completion] = {}
                for r, f in batch:
                    del pending[r]
                    c = f.result()
                    self._ctx[r].extend(c.token_ids)
                    finished[r] = c
                env = on_turn(finished)
                for r in finished:
                    toks = env.get(r)
                    if toks is None:
                        self.release([r])
                        continue
                    self._ctx[r].extend(int(t) for t in toks)
                    submit(r)
        except BaseException:
            for f in pending.values():
                f.cancel()
            raise


# -- helpers -----------------------------------------------------------------------------------------
def _first_stop(checker: StopChecker, ids: Sequence[int], start: int) -> int | None:
    """Length of `ids` up to and including the first stop string / EOS at or after position `start`."""
    ids = list(ids)
    for i in range(start, len(ids)):
        if checker.check(ids[:i + 1])[0] is not None:
            return i + 1
    return None


def _abort(result) -> None:
    """Abort a request that is still running; best effort (the turn is already cut on our side)."""
    if getattr(result, "finished", True):
        return
    try:
        result.abort()
    except Exception as e:  # noqa: BLE001
        log.debug("aborting a TensorRT-LLM request failed (%s); it runs to its token limit", e)


def _valid_tags(tags: list[str]) -> list[str]:
    """The memory tags this TensorRT-LLM knows (`ExecutorMemoryType`), in order; all of them if unknown."""
    import importlib

    for module in ("tensorrt_llm._torch.virtual_memory", "tensorrt_llm.llmapi.llm_args", "tensorrt_llm.llmapi"):
        try:
            valid = {t.value for t in getattr(importlib.import_module(module), "ExecutorMemoryType")}
        except Exception:  # noqa: BLE001
            continue
        return [t for t in tags if t in valid]
    return tags


def _param_fields(cls) -> set[str]:
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields:
        return set(fields)
    fields = getattr(cls, "model_fields", None)
    if fields:
        return set(fields)
    return set(inspect.signature(cls).parameters)


def _fit_llm_kwargs(api, kwargs: dict) -> dict:
    """Drop (with a warning) LLM arguments this TensorRT-LLM does not know; map enable_sleep to
    sleep_config on releases that replaced it."""
    if api.TorchLlmArgs is None:
        return kwargs
    known = set(getattr(api.TorchLlmArgs, "model_fields", {})) | {"model", "tokenizer", "backend"}
    if not known - {"model", "tokenizer", "backend"}:
        return kwargs
    out = {}
    for k, v in kwargs.items():
        if k in known:
            out[k] = v
        elif k == "enable_sleep" and "sleep_config" in known and api.SleepConfig is not None:
            out["sleep_config"] = api.SleepConfig()
        else:
            log.warning("TensorRT-LLM %s has no LLM argument %r; ignoring it", api.version, k)
    return out


def _weight_dtype(model_dir: Path, dtype: str):
    import torch

    name = dtype
    if dtype == "auto":
        try:
            cfg = json.loads((model_dir / "config.json").read_text())
            name = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        except (OSError, ValueError):
            name = "bfloat16"
    return {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32, "float": torch.float32}.get(str(name).replace("torch.", ""), torch.bfloat16)


def _device_uuid(index: int) -> str:
    try:
        from tensorrt_llm._torch.utils import get_device_uuid

        return get_device_uuid(index)
    except Exception:  # noqa: BLE001
        import torch

        return "GPU-" + str(torch.cuda.get_device_properties(index).uuid)


def _local_device(uuid: str):
    import torch

    if str(uuid).startswith("CPU-"):  # a CPU-only run's device (trtllm_placement.cpu_device_id): host memory
        return torch.device("cpu")
    want = _norm_uuid(uuid)
    for i in range(torch.cuda.device_count()):
        if _norm_uuid(_device_uuid(i)) == want:
            return torch.device("cuda", i)
    raise RuntimeError(f"no local CUDA device has UUID {uuid}; the refit driver must see the TensorRT-LLM workers' "
                       "GPUs (set RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 before Ray starts)")
