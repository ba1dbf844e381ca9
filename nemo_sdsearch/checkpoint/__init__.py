"""HF <-> Megatron (Qwen2 family) weight conversion, .nemo archives, training-state checkpoints."""
