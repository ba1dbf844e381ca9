"""Multi-turn search rollouts over a `Generator` (torch backend here; TensorRT-LLM later)."""
