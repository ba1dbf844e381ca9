"""`prepare` (here, with network): the wheels (wheels.py), then a simulated machine under /tmp (a venv holding
only the machine's packages, symlinked from this dev venv, plus the carried wheels) on which every module the
checks import is imported (CHECK_IMPORTS) and the dry run is run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import CARRY_LIMIT, ENTRY, ROOT, SIM, norm_name
from .wheels import (LEFT_BEHIND, MACHINE_PACKAGES, WHEELS, download_wheels, fits_machine, requirements_report,
                     tree_bytes, wheel_files)

# Every module the checks import (prepare imports them on the simulated machine).
CHECK_IMPORTS = [
    "nemo_sdsearch", "nemo_sdsearch.cli", "nemo_sdsearch.config", "nemo_sdsearch.algorithms.grpo",
    "nemo_sdsearch.algorithms.search_e1", "nemo_sdsearch.algorithms.setup", "nemo_sdsearch.models.hf",
    "nemo_sdsearch.models.megatron.actor", "nemo_sdsearch.models.megatron.builder",
    "nemo_sdsearch.models.megatron.launch", "nemo_sdsearch.models.megatron.hf_mapping",
    "nemo_sdsearch.checkpoint.hf_writer",
    "nemo_sdsearch.rollout.torch_generator", "nemo_sdsearch.losses.divergences",
    "nemo_sdsearch.losses.vocab_parallel", "nemo_sdsearch.retrieval", "nemo_sdsearch.core.targets",
    "nemo_sdsearch.world.generator", "nemo_sdsearch.logger", "megatron.core", "megatron.core.optimizer",
    "megatron.core.distributed", "omegaconf", "hydra", "bm25s", "rapidfuzz", "transformers", "pytest",
]


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
        rc = subprocess.run([str(python), str(ENTRY), "run", "--dry-run", "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1"}).returncode
        ok &= rc == 0
    print("prepare: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1

