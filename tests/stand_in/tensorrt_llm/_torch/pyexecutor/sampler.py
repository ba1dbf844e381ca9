"""The samplers of TensorRT-LLM's PyTorch backend, as the stand-in models them (upstream, this path holds
`TorchSampler` and `TRTLLMSampler`). One decoding step: the token, and what the sampler reports as the
log-probabilities. docs/trtllm.md ("Log-probs per sampler") cites the upstream files each rule was read in:

* TRTLLMSampler (the C++ decoder): log softmax(logits / T) over the whole vocabulary, T = 1 when the request
  gives no temperature (greedy). The decoder applies the temperature to the logits in place before it samples,
  and the PyTorch backend builds its decoder requests with `is_normalize_log_probs=False`, so the top-k / top-p
  kernels report log p(token) of the temperature-scaled softmax, not renormalised over the kept tokens. The C++
  decoder has no `logprobs_mode`; it reports the sampled token's log-prob only.
* TorchSampler, `logprobs_mode` "raw" (the default): log_softmax(logits) of the model's raw logits, whatever the
  temperature, top-k or top-p.
* TorchSampler, `logprobs_mode` "processed": the log-probabilities of the distribution the token was drawn from,
  log_softmax(logits / T) over the tokens top-k / top-p kept (-inf elsewhere); a greedy request's distribution
  is a point mass (log-prob 0 for the argmax).

`logprobs=K` (TorchSampler): K = 0 gives the sampled token's entry only; K > 0 the top K of the same vector plus
the sampled token when it is not among them. Ranks count from 1 in that vector.

Only `torch` is imported here: tests/fake_trtllm.py loads this file by its path.
"""

from __future__ import annotations

import torch

SAMPLERS = ("TRTLLMSampler", "TorchSampler")
MODES = ("raw", "processed")


def mode_name(mode) -> str:
    """'raw' or 'processed' from a LogprobMode member or its string; anything else is refused."""
    value = getattr(mode, "value", mode)
    if value is None:
        return "raw"
    if value not in MODES:
        raise ValueError(f"logprobs_mode must be one of {MODES}, got {mode!r}")
    return value


def is_greedy(temperature, top_k, top_p) -> bool:
    """`SamplingParams.params_imply_greedy_decoding`: nothing given, top_k = 1, top_p = 0 or temperature = 0."""
    return ((temperature is None and top_p is None and top_k is None) or top_k == 1 or top_p == 0.0
            or temperature == 0)


def kept_tokens(probs: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """The tokens top-k (0 or None: all) and top-p (None or 1: all) keep, as a mask."""
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= probs >= probs.topk(int(top_k)).values[-1]
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        nucleus = sorted_p.cumsum(-1) - sorted_p < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, nucleus)
    return keep


def step(logits: torch.Tensor, *, sampler_type: str, temperature, top_k, top_p, logprobs, logprobs_mode,
         generator: torch.Generator) -> tuple[int, list[tuple[int, float, int]]]:
    """Sample one token after `logits` (the model's raw logits, [vocab]) and report its log-probs as the sampler
    does: (token, [(token id, log-prob, rank)]); the list is empty when `logprobs` is None."""
    if sampler_type not in SAMPLERS:
        raise ValueError(f"sampler_type must be one of {SAMPLERS}, got {sampler_type!r}")
    logits = logits.float()
    greedy = is_greedy(temperature, top_k, top_p)
    temp = 1.0 if greedy or temperature is None else float(temperature)
    scaled = torch.log_softmax(logits / temp, -1)
    keep = None
    if greedy:
        tok = int(logits.argmax())
    else:
        probs = scaled.exp()
        keep = kept_tokens(probs, top_k, top_p)
        tok = int(torch.multinomial(probs * keep, 1, generator=generator))
    if logprobs is None:
        return tok, []
    if sampler_type == "TRTLLMSampler":
        vector, only_sampled = scaled, True
    elif mode_name(logprobs_mode) == "raw":
        vector, only_sampled = torch.log_softmax(logits, -1), False
    elif greedy:
        vector = torch.full_like(logits, float("-inf"))
        vector[tok] = 0.0
        only_sampled = False
    else:
        vector = torch.log_softmax((logits / temp).masked_fill(~keep, float("-inf")), -1)
        only_sampled = False
    rank = lambda i: int((vector > vector[i]).sum()) + 1  # noqa: E731
    ids = [] if only_sampled or not logprobs else vector.topk(int(logprobs)).indices.tolist()
    if tok not in ids:
        ids.append(tok)
    return tok, [(i, float(vector[i]), rank(i)) for i in ids]
