"""The project's install resolves under the NGC image the Dockerfile builds on (issue 25), checked offline.

The Dockerfile installs the project with every package the image already has pinned to the image's version
(`pip install -c /opt/image-constraints.txt`), so a dependency range that excludes the image's version makes the
image build fail (pip: ResolutionImpossible), as `uvicorn>=0.54,<0.55` did against the image's uvicorn 0.44.
constraints/ngc-26.04.txt records the image's versions from public sources (its header says which); here every
requirement the Dockerfile installs (the base dependencies and the extras it names, under the image's Python
and platform) is checked against it with `packaging`, and every conflict is reported by name. No GPU package is
installed."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
NGC = REPO / "constraints" / "ngc-26.04.txt"
# The image's interpreter and platform (NeMo 26.04: Python 3.12 on x86_64 Linux), for environment markers.
IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def image_pins(text: str) -> dict[str, Version]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() and version.strip(), f"{NGC.name}: not a `name==version` pin: {line!r}"
        key = canonicalize_name(name.strip())
        assert key not in pins, f"{NGC.name}: {key} is pinned twice"
        pins[key] = Version(version.strip())
    return pins


def dockerfile_extras() -> list[str]:
    """The extras of the Dockerfile's `pip install ... -e ".[gpu,data]"` of the project."""
    found = re.findall(r"pip install [^\n]*?\"?\.\[([a-z0-9_,-]+)\]", (REPO / "Dockerfile").read_text())
    assert len(found) == 1, f"expected one install of the project in the Dockerfile, found {found}"
    return found[0].split(",")


def installed_requirements(project: dict, extras: list[str]) -> list[Requirement]:
    """The requirements that `pip install .[extras]` asks for on the image (markers evaluated there), with the
    project's own extras (`nemo-sdsearch[cpu,...]`) expanded."""
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    out, todo, seen = [], [(r, "") for r in project["dependencies"]], set()
    for extra in extras:
        todo += [(r, extra) for r in optional[extra]]
    while todo:
        text, extra = todo.pop(0)
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**IMAGE_ENV, "extra": extra}):
            continue
        if canonicalize_name(req.name) == name:  # a self-reference: its extras' requirements
            for sub in sorted(req.extras - seen):
                seen.add(sub)
                todo += [(r, sub) for r in optional[sub]]
            continue
        out.append(req)
    return out


def conflicts(pyproject_text: str, ngc_text: str) -> list[str]:
    """Each requirement of the Dockerfile's install that the image's pinned version does not satisfy."""
    project = tomllib.loads(pyproject_text)["project"]
    pins = image_pins(ngc_text)
    bad = []
    python = Version(IMAGE_ENV["python_full_version"])
    if "requires-python" in project:
        from packaging.specifiers import SpecifierSet

        if python not in SpecifierSet(project["requires-python"]):
            bad.append(f"python {python} (the image's) is outside requires-python {project['requires-python']}")
    for req in installed_requirements(project, dockerfile_extras()):
        pinned = pins.get(canonicalize_name(req.name))
        # prereleases=True: a pin names its version exactly (the image's torch is 2.11.0a0+...), which pip accepts
        if pinned is not None and not req.specifier.contains(pinned, prereleases=True):
            bad.append(f"{req.name}{req.specifier} excludes the image's {req.name}=={pinned}")
    return bad


def test_the_dockerfile_install_admits_every_version_of_the_ngc_image():
    bad = conflicts((REPO / "pyproject.toml").read_text(), NGC.read_text())
    assert not bad, "the image build would fail (pip cannot resolve under the image's versions):\n  " + "\n  ".join(bad)


def test_the_check_covers_the_dockerfile_install_and_names_each_conflict():
    """The check reads what the Dockerfile installs, knows the image's versions of the packages that broke or
    could break the build, and names every conflict: the old uvicorn pin, a transformers range above the
    image's, and a requires-python the image's 3.12 misses, each reported."""
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = image_pins(NGC.read_text())
    for name in ("uvicorn", "fastapi", "starlette", "transformers", "torch", "numpy", "tokenizers", "peft",
                 "megatron-core", "tensorrt-llm", "httpx", "pyarrow"):
        assert name in pins, f"{NGC.name} has no pin of {name}"
    assert sorted(dockerfile_extras()) == ["data", "gpu"]
    names = {canonicalize_name(r.name) for r in installed_requirements(tomllib.loads(pyproject)["project"],
                                                                       dockerfile_extras())}
    assert {"uvicorn", "fastapi", "transformers", "torch", "pyarrow", "faiss-gpu-cu12"} <= names
    assert "faiss-cpu" not in names and "pytest" not in names  # the test extra is not installed there
    old = re.sub(r'"uvicorn[^"]*"', '"uvicorn>=0.54,<0.55"', pyproject)
    assert old != pyproject
    assert conflicts(old, NGC.read_text()) == [
        f"uvicorn<0.55,>=0.54 excludes the image's uvicorn=={pins['uvicorn']}"]
    worse = re.sub(r'"transformers[^"]*"', '"transformers>=5.4,<6"', old).replace(
        'requires-python = ">=3.11"', 'requires-python = ">=3.13"')
    assert conflicts(worse, NGC.read_text()) == [
        "python 3.12.3 (the image's) is outside requires-python >=3.13",
        f"transformers<6,>=5.4 excludes the image's transformers=={pins['transformers']}",
        f"uvicorn<0.55,>=0.54 excludes the image's uvicorn=={pins['uvicorn']}"]


def test_image_constraints_pin_each_name_once_at_the_imported_version(tmp_path):
    """The Dockerfile's /opt/image-constraints.txt: a package present in two site-packages at two versions (the NGC
    image's venv over its system site-packages) is pinned once, at the version Python imports (the first on
    sys.path); `pip list --format=freeze` would pin both and make the install unresolvable."""
    import subprocess
    import sys

    first, second = tmp_path / "venv_site", tmp_path / "system_site"
    for site, version in ((first, "2.0"), (second, "1.0")):
        info = site / f"demo_pkg-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: Demo_Pkg\nVersion: {version}\n")
    (second / "other_pkg-3.1.dist-info").mkdir()
    (second / "other_pkg-3.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: other.pkg\nVersion: 3.1\n")
    env = {"PYTHONPATH": f"{first}:{second}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "image_constraints.py"), "--exclude", "Other_Pkg"],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert "demo-pkg==2.0" in out and not any(line.startswith("demo-pkg==1.0") for line in out)
    assert not any(line.startswith("other-pkg==") for line in out)  # excluded by its name in another spelling
    names = [line.partition("==")[0] for line in out]
    assert len(names) == len(set(names)) and "pytest" in names  # this interpreter's own packages, once each
    assert "FROM" in (REPO / "Dockerfile").read_text() and "image_constraints.py --exclude nemo-sdsearch" in \
        (REPO / "Dockerfile").read_text()
