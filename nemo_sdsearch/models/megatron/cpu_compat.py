"""Run megatron-core 0.16 on a machine without CUDA (CPU tensors, gloo process groups).

megatron-core assumes a GPU in a handful of places that the GPTModel forward/backward path touches:
tensors are allocated on `torch.cuda.current_device()`, the causal attention mask is built with
`device="cuda"`, and the tensor-parallel RNG tracker (`model_parallel_cuda_manual_seed`,
`get_cuda_rng_tracker().fork()`) stores and swaps *CUDA* generator states. On a CPU-only host each of
these raises ("Torch not compiled with CUDA enabled") or silently does nothing.

`apply_cpu_compat()` maps every one of them to the CPU device and the CPU default generator. It is the
ONLY place in the project that adapts Megatron to CPU; it is idempotent and does nothing at all when
`torch.cuda.is_available()` (GPU runs use Megatron unmodified). The patches, and why each is needed:

1. `torch.cuda.current_device()` -> `torch.device("cpu")`.
   Megatron passes it as `device=` to `torch.empty`/`torch.arange` (tensor_parallel mappings, layers,
   rotary embeddings, attention). A `torch.device` is accepted everywhere it is used that way.
2. `torch.cuda.get_rng_state`, `torch.cuda.set_rng_state`, `torch.cuda.manual_seed` -> the CPU default
   generator. `CudaRNGStatesTracker.add` (called by `model_parallel_cuda_manual_seed`) saves the CUDA
   state, seeds it, reads the new state and restores the old one; on CPU the read raises. On this host
   "the CUDA generator" *is* the CPU generator (it drives dropout, the only random op in the forward).
   Note: after the patch `torch.cuda.manual_seed(s)` reseeds the CPU generator (it is a silent no-op
   on an unpatched CPU host); `torch.manual_seed` is unaffected (it calls `manual_seed_all`).
3. `megatron.core.tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> the CPU
   generator. `fork()` uses these private helpers, not the public torch ones; the setter goes through
   `torch.cuda._lazy_call`, which on a host where CUDA never initialises queues the callback forever,
   so without the patch `fork()` would not switch states at all.
4. `megatron.core.transformer.utils.get_default_causal_mask` / `get_sliding_window_causal_mask` (and
   the names `megatron.core.fusions.fused_softmax` imported from there) -> the same masks built on the
   CPU. They hard-code `device="cuda"`; the unfused softmax path calls them whenever a causal layer is
   run without an explicit mask (which is how the actor runs right-padded batches).
5. `torch.cuda.synchronize()` -> no-op. `megatron.core.dist_checkpointing` (torch_dist save) calls it
   after staging tensors to the CPU; there is nothing to wait for on a CPU host.
6. A logging filter drops Megatron's "CPU RNG state changed within GPU RNG context" warning: with the
   CPU generator standing in for the CUDA one, every random draw inside `fork()` (dropout) changes
   "the CPU state" by construction, so the warning would fire on every dropout call and mean nothing.
7. The pipeline schedules (`megatron.core.pipeline_parallel.schedules`): every `forward_backward_*`
   function allocates its token counter with `torch.zeros([], dtype=torch.int, device="cuda")`. The
   module's global `torch` is replaced by a proxy that is `torch` in every respect except that
   `zeros(..., device="cuda")` allocates on the CPU. Nothing else in the schedules needs CUDA: the p2p
   layer allocates on `torch.cuda.current_device()` (patch 1), `batch_isend_irecv` and plain
   isend/irecv both work over gloo, and its `torch.cuda.synchronize()` is patch 5. With this, the real
   1F1B schedule (`forward_backward_pipelining_without_interleaving`) runs on CPU over gloo.
8. `LanguageModule.setup_embeddings_and_output_layer` (pp > 1, tied embeddings) moves the first and
   last stages' copies of the shared embedding with `weight.data.cuda()` before all-reducing them. For
   the duration of that one call `torch.Tensor.cuda` returns the CPU tensor itself.

What is NOT adapted (stays GPU-only, by design): Megatron's optimizers (`DistributedOptimizer`,
`get_megatron_optimizer` allocate buffers with `device="cuda"`), `DistributedDataParallel` buffers,
Transformer Engine, fused kernels, sequence parallelism (gloo has no reduce-scatter). On CPU the actor
uses a plain torch optimizer.
"""

from __future__ import annotations

import logging

_APPLIED = False
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


class _CpuCounterTorch:
    """`torch` for megatron's schedules module, except that `zeros(device="cuda")` allocates on the CPU."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def zeros(self, *args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return self._torch.zeros(*args, **kwargs)


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU execution. Returns True when the patches are (or already were) in
    place, False when CUDA is available and nothing was changed."""
    global _APPLIED
    import torch

    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    cpu = torch.device("cpu")

    # 1. device placement
    torch.cuda.current_device = lambda: cpu

    # 2. public CUDA RNG calls -> CPU default generator
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    torch.cuda.manual_seed = manual_seed
    torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.random.set_rng_state = set_rng_state
    torch.cuda.random.manual_seed = manual_seed

    # 3. Megatron's private tracker helpers (used by CudaRNGStatesTracker.fork)
    from megatron.core.tensor_parallel import random as mrandom

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state

    # 4. causal masks built on the CPU
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=cpu), diagonal=1).bool()

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool, device=cpu)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = get_default_causal_mask
        mod.get_sliding_window_causal_mask = get_sliding_window_causal_mask

    # 5. nothing to synchronise
    torch.cuda.synchronize = lambda device=None: None

    # 6. the meaningless RNG warning
    logging.getLogger(mrandom.__name__).addFilter(_DropRngWarning())

    # 7. the schedules' CUDA token counter
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuCounterTorch(torch)

    # 8. the tied-embedding `.cuda()` of pp > 1 models, scoped to the one call
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer

    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED
