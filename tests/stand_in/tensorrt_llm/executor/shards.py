"""How the stand-in's workers split the weights (one home for the Ray stand-in and tests/fake_trtllm.py): each worker
keeps the `rank`-th of `world` near-equal pieces of every flattened tensor, as a real worker keeps its slice; tied
tensors are refitted under their first name."""

from __future__ import annotations

import torch


def shard_of(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Worker `rank`'s piece of a tensor: the rank-th of `world` near-equal pieces of it, flattened."""
    return torch.tensor_split(t.detach().reshape(-1), world)[rank].clone()


def canonical_names(model) -> dict[str, str]:
    """Each state-dict name -> the first name of the same tensor (a tied lm_head.weight -> the embedding)."""
    first: dict = {}
    return {k: first.setdefault((v.data_ptr(), tuple(v.shape)), k)
            for k, v in model.state_dict(keep_vars=True).items()}
