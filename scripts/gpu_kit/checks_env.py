"""The machine itself: `env` (nvidia-smi, nvcc, Python and package versions, where the carried packages load
from) and `pytest_gpu` (pytest -m gpu over the test files that carry the marker)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import ROOT, Fail, stream


def check_env(mode: str, out: Path) -> dict:
    from importlib import metadata

    import torch

    skipped = []
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})")
    figures = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("transformers", "peft", "tokenizers", "safetensors", "numpy", "triton", "megatron-core", "omegaconf",
                 "hydra-core", "antlr4-python3-runtime", "bm25s", "rapidfuzz", "pytest", "transformer-engine",
                 "tensorrt-llm", "faiss-gpu-cu12", "faiss-cpu", "apex"):
        try:
            v = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v = None
        figures[dist] = v
        print(f"  {dist:24s} {v or '-'}")
    from importlib.util import find_spec

    for mod in ("megatron.core", "omegaconf", "hydra", "bm25s", "rapidfuzz", "nemo_sdsearch"):
        spec = find_spec(mod)
        print(f"  {mod} from {Path(spec.origin).parent if spec and spec.origin else None}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        figures["device"] = p.name
        print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} device(s)")
    elif mode == "gpu":
        raise Fail("no CUDA device visible to torch")
    for tool, argv in (("nvidia-smi", ["nvidia-smi"]), ("nvcc", ["nvcc", "--version"])):
        if shutil.which(tool) is None:
            skipped.append(f"{tool}: not on PATH" + (" (dry run on CPU)" if mode == "dry" else ""))
            continue
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        print(f"$ {' '.join(argv)}\n{p.stdout}{p.stderr}")
    if mode == "gpu" and shutil.which("nvidia-smi") is None:
        raise Fail("nvidia-smi is not on PATH")
    return {"status": "pass", "figures": figures, "skipped": skipped}


def check_pytest_gpu(mode: str, out: Path) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *files, "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={out / 'pytest_gpu.xml'}"]
    rc, text = stream(cmd)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    res = {"figures": counts, "files": files}
    if rc not in (0, 5):
        return {**res, "status": "fail", "reason": f"pytest exited with {rc}: {counts}"}
    reasons = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", text)))
    return {**res, "status": "pass", "reason": f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} "
                                               f"skipped", "skipped": reasons}

