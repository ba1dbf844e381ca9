"""Actor and generation model backends (hf, megatron)."""
