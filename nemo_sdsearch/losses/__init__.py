"""Loss functions: GRPO surrogate and KL to the reference (policy.py); distillation divergences
(divergences.py: dense and chunked generalized JSD, pointwise-clipped forward KL)."""
