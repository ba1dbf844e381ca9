"""Checkpoints: HF <-> Megatron (Qwen2 family) weight conversion, NeMo's own formats (`.nemo` 1.x archives,
NeMo 2.0 directories: Qwen2 and Llama), the project's Megatron weight directories and sdsearch training
archives, training-state checkpoints, `sdsearch convert`."""
