"""The trainer's state off the device while the engines generate (`offload.*`), the way NeMo-RL and verl fit
70B-class RL: what generation does not read leaves the GPU before the engine wakes and comes back before the
update.

Mechanism (one for every backend, CPU included): a tensor's storage is copied to host memory (pinned on CUDA)
and the device storage is resized to 0 bytes, so the memory returns to the allocator while every tensor object,
view and reference stays valid (the optimizer's state dict, Megatron's bucket views, `param.main_grad`);
`restore` resizes the storage back and copies the bytes in. The round trip is bit-exact. A storage shared by
several tensors (a tied embedding, views into one buffer) is parked once.

Parts (`offload.*` keys, `PARTS`):
- "optimizer": the optimizer's state (Adam's moments, the step count) and, under Megatron's optimizer, its fp32
  main weights (megatron-core's `offload_to_cpu` / `restore_from_cpu`);
- "grads": the gradients. The torch optimizer sets them to None after each step (nothing to park); Megatron's
  DDP keeps a contiguous fp32 grad buffer, released without a copy (it is zeroed before the next step anyway:
  `offload_grad_buffers` / `restore_grad_buffers`);
- "params": the model's weights (only where the generator holds its own copy; the refit streams them before
  they leave).

`state_bytes` measures what an actor (or any module + optimizer) holds on its device, component by component,
with the names `layout.memory_estimate` uses, so a test can hold the estimate to the measurement.
"""

from __future__ import annotations

from typing import Iterable

import torch

PARTS = ("optimizer", "grads", "params")


def _byte_view(storage: torch.UntypedStorage, device) -> torch.Tensor:
    n = storage.nbytes()
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (n,), (1,))


class HostCopies:
    """Storages parked in host memory (see the module docstring). `park(tensors, keep=True)`: every distinct
    storage among `tensors` copied to the host (keep=False: not copied, restored as zeros) and freed on its
    device; `restore()`: every parked storage back, bytes restored. Parking an already parked storage (0 bytes)
    is a no-op."""

    def __init__(self):
        self._parked: list[tuple[torch.UntypedStorage, int, torch.device, torch.Tensor | None]] = []

    def __len__(self) -> int:
        return len(self._parked)

    @property
    def host_bytes(self) -> int:
        """Bytes held in host memory for the parked storages."""
        return sum(h.numel() for *_, h in self._parked if h is not None)

    def park(self, tensors: Iterable[torch.Tensor], keep: bool = True) -> int:
        """Park the storages of `tensors`; returns the device bytes freed."""
        seen: set[int] = set()   # (a parked storage has 0 bytes: skipped below)
        freed = 0
        for t in tensors:
            if t is None:
                continue
            s = t.untyped_storage()
            n = s.nbytes()
            key = s.data_ptr()
            if n == 0 or key in seen:
                continue
            seen.add(key)
            host = None
            if keep:
                pin = t.device.type == "cuda"
                host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
                host.copy_(_byte_view(s, t.device))   # blocking: the device copy is freed right after
            s.resize_(0)
            self._parked.append((s, n, t.device, host))
            freed += n
        return freed

    def restore(self) -> int:
        """Every parked storage back on its device; returns the bytes restored."""
        total = 0
        for s, n, device, host in self._parked:
            s.resize_(n)
            view = _byte_view(s, device)
            view.copy_(host) if host is not None else view.zero_()
            total += n
        self._parked = []
        return total


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen and s.nbytes():
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The tensors of a torch optimizer's state (Adam's moments and step counts)."""
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def state_bytes(model, optimizer=None, ddp=None) -> dict[str, int]:
    """What `model` (+ its optimizer) holds in device memory now, by the components of `layout.memory_estimate`:
    "actor weights", "actor gradient buffer fp32" (`.grad`s, or Megatron DDP's grad buffers), "Adam m and v fp32"
    (the optimizer's state). A parked storage counts 0."""
    params = list(model.parameters())
    if ddp is not None:
        grads = [b.grad_data for b in ddp.buffers + getattr(ddp, "expert_parallel_buffers", [])]
    else:
        grads = [p.grad for p in params]
    return {"actor weights": _unique_bytes(params), "actor gradient buffer fp32": _unique_bytes(grads),
            "Adam m and v fp32": _unique_bytes(optimizer_state_tensors(optimizer))}


class TrainerOffload:
    """Park and restore one actor's state by parts (`PARTS`). The torch path (every CPU run, `optimizer="torch"`)
    parks the tensors itself; Megatron's DDP + DistributedOptimizer path (GPU) uses megatron-core 0.16's own
    offload calls for the grad buffers and the optimizer, and parks the DDP param buffers (bf16 weights)."""

    def __init__(self, model, optimizer=None, ddp=None):
        self.model, self.optimizer, self.ddp = model, optimizer, ddp
        self.host = HostCopies()
        self.parked: list[str] = []

    def offload(self, parts: Iterable[str]) -> None:
        for part in parts:
            if part not in PARTS:
                raise ValueError(f"unknown offload part {part!r}; one of {PARTS}")
            if part in self.parked:
                continue
            self.parked.append(part)
            if part == "params":
                if self.ddp is not None:   # the contiguous bf16 param buffers (every param is a view)
                    self.host.park(b.param_data for b in self.ddp.buffers)
                else:
                    self.host.park(self.model.parameters())
            elif part == "grads":
                if self.ddp is not None:
                    self.ddp.offload_grad_buffers(synchronize=True, empty_cache=False)
                else:
                    self.host.park((p.grad for p in self.model.parameters()), keep=False)
            elif part == "optimizer" and self.optimizer is not None:
                if self.ddp is not None:
                    self.optimizer.offload_to_cpu()   # fp32 main weights and Adam's moments
                else:
                    self.host.park(optimizer_state_tensors(self.optimizer))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload(self) -> None:
        if not self.parked:
            return
        if self.ddp is not None:
            if "grads" in self.parked:
                self.ddp.restore_grad_buffers(synchronize=False)
            if "optimizer" in self.parked and self.optimizer is not None:
                self.optimizer.restore_from_cpu()
        self.host.restore()
        self.parked = []


class Parkable:
    """`offload` / `reload` / `state_bytes` for an object with `.model` (and `.optimizer`, `.ddp` where it has them):
    the actors (models.base.Actor) and the frozen reference scorers."""

    def offload(self, parts) -> None:
        """Move this rank's `parts` of the training state ("optimizer", "grads", "params") off the device until
        `reload()`; the tensors stay valid objects, their bytes wait in host memory. Idempotent."""
        self._trainer_offload().offload(parts)

    def reload(self) -> None:
        """Everything `offload` moved back on the device, bit for bit (a no-op when nothing is off)."""
        if getattr(self, "_offload", None) is not None:
            self._offload.reload()

    @property
    def offloaded(self) -> list[str]:
        return list(self._offload.parked) if getattr(self, "_offload", None) is not None else []

    def state_bytes(self) -> dict[str, int]:
        """The training state this rank holds on its device now, by `layout.memory_estimate`'s component names."""
        return state_bytes(self.model, getattr(self, "optimizer", None), getattr(self, "ddp", None))

    def _trainer_offload(self):
        if getattr(self, "_offload", None) is None:
            self._offload = TrainerOffload(self.model, getattr(self, "optimizer", None), getattr(self, "ddp", None))
        self._offload.optimizer = getattr(self, "optimizer", None)  # reset_optimizer makes a new one
        return self._offload

