"""Policy-gradient losses over token log-probabilities.

GRPO: group-normalised advantages, the PPO clipped surrogate, and the low-variance k3 estimator of
KL(pi || pi_ref) (Schulman's k3: exp(r) - r - 1 with r = log pi_ref - log pi, unbiased and >= 0; clamped
per token at 10 by default, as verl's `low_var_kl`).
"""

from __future__ import annotations

from typing import Sequence

import torch


def group_advantages(rewards: Sequence[float] | torch.Tensor, group_size: int, eps: float = 1e-6,
                     normalize_std: bool = True) -> torch.Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps) within consecutive groups of `group_size`.

    A group whose rewards are all equal gets zero advantage (never NaN). std is the unbiased sample
    standard deviation, as in GRPO implementations (verl, TRL)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    centred = g - g.mean(1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (g.std(1, keepdim=True) + eps)
    return centred.view(-1).float()


def clipped_surrogate_per_token(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                                clip_eps: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(r A, clip(r, 1-eps, 1+eps) A) and the flag of tokens where the clip is active."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def k3_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float | None = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r) - r - 1 with r = log pi_ref - log pi (>= 0).

    clamp (default 10, verl's `low_var_kl` as used by the Search-R1 recipe): the value is clamped to
    [-clamp, clamp] (in effect capped at `clamp`, since k3 >= 0), and, so that exp(r) never overflows, the
    log-ratio r is first clamped to [-L, L] with L = max(20, clamp + 1) (verl's +-20 for the default; L is
    chosen so that the log-ratio clamp never binds before the value clamp: for r < -(clamp + 1) the value
    exceeds `clamp` anyway). As with torch.clamp, the gradient is exactly zero wherever a clamp is active,
    e.g. for a token with pi << pi_ref. clamp=None: the unclamped estimator."""
    r = ref_logp - logp
    if clamp is None:
        return torch.exp(r) - r - 1
    if not clamp > 0:
        raise ValueError(f"k3 clamp must be > 0 (or None to disable it), got {clamp}")
    bound = max(20.0, float(clamp) + 1.0)
    r = torch.clamp(r, min=-bound, max=bound)
    return torch.clamp(torch.exp(r) - r - 1, min=-clamp, max=clamp)
