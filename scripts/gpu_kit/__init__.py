"""The GPU verification kit behind scripts/gpu_check.py (the entry: its docstring and flags) and docs/gpu.md, by
concern, so a session with 15 minutes of GPU finds what to read or fix at once:

    common.py             paths, budget, model shapes, RESULT protocol, Skip / Fail, gpu_mode, stream
    wheels.py             WHEELS carried, LEFT_BEHIND, MACHINE_PACKAGES; download, tag checks, install_wheels
    prepare.py            `prepare`: the simulated machine, the import check, the dry run there
    runner.py             `run`: CHECKS (limits), one process group per check, the budget; `_check` lands here
    report.py             report.txt, the summary lines and summary.json
    checks_env.py         env, pytest_gpu
    checks_train.py       train_hf, train_megatron (and the bf16 probe, hf tracking)
    checks_numerics.py    logits (HF <-> Megatron)
    checks_losses.py      losses (bench/losses.py, the Liger anchor, TARGET lines)
    checks_generation.py  generator (tokens/s), launch (Ray + torchrun + TensorRT-LLM)
    checks_memory.py      memory (measured peak per phase vs layout.py; was scripts/gpu_memory.py)

Each check is `fn(mode, out) -> dict` (mode "gpu" or "dry"); what it does in the dry run (CPU, tiny shapes) is
written next to what it does on the GPU, in the same function.
"""
