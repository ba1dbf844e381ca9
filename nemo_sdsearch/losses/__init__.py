"""Loss functions: GRPO surrogate and KL to the reference (policy.py); distillation divergences
(divergences.py: dense and chunked generalized JSD, pointwise-clipped forward KL); all vocab-parallel math,
log-probs, JSD, metrics (vocab_parallel.py); `VocabShard`, the one interface the losses use for both
(shard.py); the GRPO + SD-Search loss of one micro-batch (grpo_sd_loss.py); Search-E1's OPSD loss of one micro-batch,
the clipped forward KL to the teacher (opsd_loss.py)."""
