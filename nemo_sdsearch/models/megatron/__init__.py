"""The megatron-core backend: CPU adaptation (`cpu_compat`), process groups and the Qwen2 `GPTModel`
builder (`builder`), and the tensor-parallel `MegatronActor` (`actor`). Imported lazily: nothing here
is needed by the HF backend, and megatron-core is only imported when these modules are."""
