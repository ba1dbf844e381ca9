"""The engine worker: one Ray actor per rank of an engine, on the placement-group bundle it was given."""

from __future__ import annotations

import os

import torch

from tensorrt_llm._torch.virtual_memory import WEIGHT_TAGS, ExecutorMemoryType


class RayWorker:
    def __init__(self, rank: int, world_size: int, model_dir: str, enable_sleep: bool, placement_group,
                 bundle_index: int):
        import ray
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)  # the same floating-point sums whatever the node's core count
        self.rank, self.world_size, self.enable_sleep = rank, world_size, enable_sleep
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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

    def weights(self) -> dict:
        """Stand-in only: the weights this worker holds (for the tests' assertions)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def sleep(self, tags) -> None:
        self._check_tags(tags, "sleep")
        self.asleep |= set(tags)
        if set(tags) & WEIGHT_TAGS:  # the weights are released: a refit must bring every one back
            with torch.no_grad():
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
        state = self.model.state_dict()
        with torch.no_grad():
            for name, t in named:
                if name not in state:
                    raise KeyError(f"update_weights: the model has no weight {name!r}")
                state[name].copy_(t)
                self.reloaded.add(name)

    def _finish_weights(self) -> None:
        if self.weights_released:
            names = {n for n, _ in self.model.named_parameters()}
            missing = sorted(names - self.reloaded)
            if missing:
                raise RuntimeError(f"weights released by sleep were not all reloaded: {missing[:5]}")
            self.weights_released = False
        self.prefix_cache_resets += 1  # the real finish resets the prefix cache
        return None

    def weights_digest(self) -> float:
        return float(sum(p.double().sum() for p in self.model.parameters()))

    # -- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: list[int], sp: dict) -> dict:
        if self.asleep:
            raise RuntimeError(f"generate while asleep ({sorted(self.asleep)})")
        if self.weights_released:
            raise RuntimeError("generate after sleep released the weights and before a refit")
        self.requests += 1
        gen = torch.Generator().manual_seed(int(sp["seed"] or 0))
        greedy = sp["top_k"] == 1
        temp = 1.0 if greedy or sp["temperature"] is None else float(sp["temperature"])
        top_p = sp["top_p"]
        words = sp["stop_words"]  # [(source, [ids])]: strings tokenized by the driver, and stop_token_ids
        out, lps = [], []
        result = self.model(torch.tensor([prompt]), use_cache=True)
        reason, stop_reason = None, None
        while True:
            logits = result.logits[0, -1].float()
            logp = torch.log_softmax(logits / temp, -1)
            if greedy:
                tok = int(logits.argmax())
            else:
                probs = logp.exp()
                if top_p is not None and top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    keep = sorted_p.cumsum(-1) - sorted_p < top_p
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            out.append(tok)
            lps.append((tok, float(logp[tok]), int((logp > logp[tok]).sum()) + 1))
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
            result = self.model(torch.tensor([[tok]]), past_key_values=result.past_key_values, use_cache=True)
