"""The engine worker: one Ray actor per rank of an engine, on the placement-group bundle it was given.

Tensor parallelism as the stand-in models it: a refit hands every worker the full Hugging Face tensors (its own
device's handles); each worker keeps only its shard, the `rank`-th of `world_size` pieces of every flattened
tensor, as a real worker keeps its slice. Worker 0 decodes with the weights assembled from EVERY worker's shard
(the driver gathers them after the refit's final call, `LLM._collective_rpc`), so a worker that got the wrong
tensors, or none, changes what the engine generates."""

from __future__ import annotations

import inspect
import os

import torch

from tensorrt_llm._torch.pyexecutor.sampler import step
from tensorrt_llm._torch.virtual_memory import WEIGHT_TAGS, ExecutorMemoryType
from tensorrt_llm.executor.shards import canonical_names, shard_of


class RayWorker:
    def __init__(self, rank: int, world_size: int, model_dir: str, enable_sleep: bool, placement_group,
                 bundle_index: int):
        import ray
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)  # the same floating-point sums whatever the node's core count
        self.rank, self.world_size, self.enable_sleep = rank, world_size, enable_sleep
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.names = canonical_names(model)
        state = model.state_dict()
        self.shapes = {n: tuple(state[n].shape) for n in set(self.names.values())}
        self.shard = {n: shard_of(state[n], rank, world_size) for n in self.shapes}
        self.model = model if rank == 0 else None  # worker 0 decodes (with every worker's shards, `assemble`)
        self.node_ip = ray.util.get_node_ip_address()
        # the device of this bundle: the k-th bundle of the group on this node is the node's k-th device
        table = ray.util.placement_group_table(placement_group)
        nodes = {int(k): v for k, v in table["bundles_to_node_id"].items()}
        mine = nodes[bundle_index]
        k = sum(1 for i, n in nodes.items() if n == mine and i < bundle_index)
        resource = "GPU" if table["bundles"][bundle_index].get("GPU") else "CPU"
        self.device_id = f"{resource}-{self.node_ip}-{k}"
        self.asleep: set[str] = set()
        self.weights_released = False
        self.reloaded: set[str] = set()
        self.prefix_cache_resets = 0
        self.requests = 0
        self.senders: set[int] = set()  # pids of the processes whose handles this worker loaded

    # -- what the executor calls ------------------------------------------------------------------------
    def call(self, method: str, args=(), kwargs=None):
        return getattr(self, method)(*args, **(kwargs or {}))

    def report_device_id(self) -> str:
        return self.device_id

    def info(self) -> dict:
        """Stand-in only (for the tests' assertions): where this worker runs and what it saw."""
        return {"rank": self.rank, "device_id": self.device_id, "node_ip": self.node_ip, "pid": os.getpid(),
                "environ": dict(os.environ), "requests": self.requests,
                "prefix_cache_resets": self.prefix_cache_resets, "senders": sorted(self.senders)}

    def shards(self) -> dict:
        """This worker's shard of every weight (the driver assembles them; the tests compare them)."""
        return {n: t.clone() for n, t in self.shard.items()}

    def weights(self) -> dict:
        """Stand-in only: the weights worker 0 decodes with (assembled from every worker's shard)."""
        if self.model is None:
            raise RuntimeError(f"worker {self.rank} holds a shard only; worker 0 decodes")
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def sleep(self, tags) -> None:
        self._check_tags(tags, "sleep")
        self.asleep |= set(tags)
        if set(tags) & WEIGHT_TAGS:  # the weights are released: a refit must bring every one back
            with torch.no_grad():
                for t in self.shard.values():
                    t.fill_(float("nan"))
                if self.model is not None:
                    for p in self.model.parameters():
                        p.fill_(float("nan"))
            self.weights_released, self.reloaded = True, set()

    def wakeup(self, tags) -> None:
        self._check_tags(tags, "wakeup")
        self.asleep -= set(tags)

    def _check_tags(self, tags, what: str) -> None:
        if not self.enable_sleep:
            raise ValueError(f"{what} needs the LLM built with enable_sleep=True")
        valid = {t.value for t in ExecutorMemoryType}
        bad = sorted(set(tags) - valid)
        if bad:
            raise ValueError(f"{what}: unknown memory tags {bad}")

    def shutdown(self) -> None:
        self.model = None

    # -- weights ------------------------------------------------------------------------------------------
    def _load_weights(self, named) -> None:
        for name, t in named:
            if name not in self.names:
                raise KeyError(f"update_weights: the model has no weight {name!r}")
            target = self.names[name]
            if t.numel() != self.shard_numel(target):
                raise ValueError(f"update_weights: {name} has {tuple(t.shape)}, the model {self.shapes[target]}")
            self.shard[target] = shard_of(t.float(), self.rank, self.world_size)
            self.reloaded.add(target)

    def shard_numel(self, name: str) -> int:
        n = 1
        for d in self.shapes[name]:
            n *= d
        return n

    def _finish_weights(self) -> None:
        if self.weights_released:
            missing = sorted(set(self.shapes) - self.reloaded)
            if missing:
                raise RuntimeError(f"weights released by sleep were not all reloaded: {missing[:5]}")
            self.weights_released = False
        self.prefix_cache_resets += 1  # the real finish resets the prefix cache
        return None

    def assemble(self, shards: list[dict]) -> None:
        """Worker 0: decode with the weights made of every worker's shard (in rank order)."""
        state = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, shape in self.shapes.items():
                state[name].copy_(torch.cat([s[name] for s in shards]).view(shape))

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: list[int], sp: dict) -> dict:
        if self.asleep:
            raise RuntimeError(f"generate while asleep ({sorted(self.asleep)})")
        if self.weights_released:
            raise RuntimeError("generate after sleep released the weights and before a refit")
        self.requests += 1
        gen = torch.Generator().manual_seed(int(sp["seed"] or 0))
        words = sp["stop_words"]  # [(source, [ids])]: strings tokenized by the driver, and stop_token_ids
        out, lps = [], []
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        result = self.model(torch.tensor([prompt]), use_cache=True)
        reason, stop_reason = None, None
        while True:
            tok, entries = step(result.logits[0, -1], sampler_type=sp["sampler_type"], temperature=sp["temperature"],
                                top_k=sp["top_k"], top_p=sp["top_p"], logprobs=sp["logprobs"],
                                logprobs_mode=sp["logprobs_mode"], generator=gen)
            out.append(tok)
            lps.append(entries)
            if sp["end_id"] is not None and sp["end_id"] >= 0 and tok == sp["end_id"]:
                reason = "stop"
            elif len(out) >= sp["max_tokens"]:
                reason = "length"
            else:
                for src, word in words:
                    if word and out[-len(word):] == word:
                        reason, stop_reason = "stop", src
                        if not sp["include_stop_str_in_output"]:
                            del out[-len(word):], lps[-len(word):]
                        break
            if reason is not None:
                return {"token_ids": out, "logprobs": lps, "finish_reason": reason, "stop_reason": stop_reason}
            result = self.model(torch.tensor([[tok]]), use_cache=True, **{key: result[key]})
