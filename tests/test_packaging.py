"""The installable package: what the wheel holds (every package, conf/ as package data, the retrieval service
as nemo_sdsearch.retrieval and no top-level `retrieval`), faiss as one of two extras, and a real non-editable
install that trains from another directory."""

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAPPED = {"nemo_sdsearch.retrieval": "retrieval", "nemo_sdsearch.conf": "conf"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def test_every_package_is_listed_and_the_mapped_folders_are_where_pyproject_says():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == MAPPED
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nemo_sdsearch").rglob("__init__.py")}
    on_disk |= {name + "." + ".".join(p.parent.relative_to(REPO / folder).parts)
                for name, folder in MAPPED.items() for p in (REPO / folder).rglob("__init__.py")
                if p.parent != REPO / folder}
    listed = set(setuptools["packages"])
    missing = sorted(on_disk - listed - set(MAPPED))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (the wheel would lack them)"
    assert listed == on_disk | set(MAPPED)
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["nemo_sdsearch.conf"] == ["*.yaml"]
    assert (REPO / "conf" / "tiny_cpu.yaml").is_file() and (REPO / "retrieval" / "__init__.py").is_file()


def _requirements(extras: list[str]) -> list[str]:
    """The requirements an install of `.[extras]` pulls, self-references (nemo-sdsearch[cpu]) followed."""
    project = PYPROJECT["project"]
    out, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            m = re.fullmatch(r"nemo-sdsearch\[(.+)\]", req)
            if m:
                todo += [e.strip() for e in m.group(1).split(",")]
            else:
                out.append(req)
    return out


def test_faiss_is_one_of_two_extras_and_the_image_installs_only_the_gpu_one():
    faiss = lambda reqs: {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs if r.startswith("faiss")}
    assert faiss(PYPROJECT["project"]["dependencies"]) == set()
    assert faiss(_requirements(["cpu"])) == {"faiss-cpu"}
    assert faiss(_requirements(["gpu"])) == {"faiss-gpu-cu12"}
    assert faiss(_requirements(["test"])) == {"faiss-cpu"}
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n]*?\"?\.\[([a-z,]+)\]", dockerfile)
    assert installs, "the Dockerfile installs the project with extras"
    for extras in installs:
        assert faiss(_requirements(extras.split(","))) == {"faiss-gpu-cu12"}, extras
    assert not re.search(r"pip install[^\n]*faiss-cpu", dockerfile)
    deps = {re.match(r"[A-Za-z0-9_.-]+", r).group(0): r for r in PYPROJECT["project"]["dependencies"]}
    assert "<" in deps["rapidfuzz"]  # bounded like every dependency


def test_import_names_from_another_directory(tmp_path):
    """Installed (editable here), the project claims nemo_sdsearch only: `retrieval` is not importable outside a
    checkout, nemo_sdsearch.retrieval is, and `python -m retrieval` still works in the checkout's root."""
    run = lambda code, cwd: subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True,
                                           text=True, timeout=120)
    p = run("import retrieval", tmp_path)
    assert p.returncode != 0 and "No module named 'retrieval'" in p.stderr
    p = run("from nemo_sdsearch.retrieval import build_retriever; from nemo_sdsearch.config import config_dir; "
            "print(build_retriever.__module__, config_dir())", tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["nemo_sdsearch.retrieval", str(REPO / "conf")]
    for cwd, module in ((tmp_path, "nemo_sdsearch.retrieval"), (REPO, "retrieval")):
        p = subprocess.run([sys.executable, "-m", module, "serve", "--help"], cwd=cwd, env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "--faiss-index" in p.stdout, p.stderr


@pytest.mark.slow
def test_wheel_installs_and_trains_from_another_directory(tmp_path):
    """`pip install` of the built wheel (not editable) into a fresh venv, then `sdsearch train trainer.steps=1`
    from another directory. Kept to what CI affords (about 40 s, offline): the wheel is built without build
    isolation from a copy of the sources, installed with --no-deps, and the venv reaches the dependencies
    through a .pth line naming this environment's site-packages (its .pth files, the editable install's
    finder among them, are not run from there)."""
    src, dist, venv, elsewhere = (tmp_path / d for d in ("src", "dist", "venv", "elsewhere"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("nemo_sdsearch", "retrieval", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    p = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    wheel = next(dist.glob("nemo_sdsearch-*.whl"))

    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "_dependencies.pth").write_text(site.getsitepackages()[0] + "\n")
    p = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    elsewhere.mkdir()
    run = lambda *args, **kw: subprocess.run([*map(str, args)], cwd=elsewhere, env=_env(), capture_output=True,
                                             text=True, timeout=kw.get("timeout", 300))
    p = run(python, "-c", "import nemo_sdsearch, nemo_sdsearch.retrieval as r; from nemo_sdsearch.config import "
                          "config_dir; print(nemo_sdsearch.__file__); print(r.__file__); print(config_dir())")
    assert p.returncode == 0, p.stderr
    package = venv_site / "nemo_sdsearch"
    assert p.stdout.split() == [str(package / "__init__.py"), str(package / "retrieval" / "__init__.py"),
                                str(package / "conf")]
    names = lambda d: sorted(x.name for x in d.glob("*.yaml"))
    assert names(package / "conf") == names(REPO / "conf")
    p = run(python, "-c", "import retrieval")
    assert p.returncode != 0 and "No module named 'retrieval'" in p.stderr
    assert not (venv_site / "retrieval").exists()
    p = run(python, "-m", "nemo_sdsearch.retrieval", "serve", "--help")
    assert p.returncode == 0 and "--faiss-index" in p.stdout, p.stderr

    out = tmp_path / "run"
    p = run(venv / "bin" / "sdsearch", "train", "trainer.steps=1", "trainer.questions_per_step=2",
            "rollout.group_size=2", "rollout.max_new_tokens=12", "rollout.max_turns=1", "trainer.eval_every=0",
            "trainer.save_every=1", "trainer.final_test_eval=false", "model.threads=1", "grpo.micro_batch_size=2",
            f"trainer.out_dir={out}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out / "final" / "config.json").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1
    assert list(elsewhere.iterdir()) == []  # nothing written where it ran
