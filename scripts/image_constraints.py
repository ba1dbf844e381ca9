"""Print a pip constraints file pinning every distribution this interpreter imports, one line per name.

The Dockerfile installs the project under the base image's own versions with this file. `pip list --format=freeze`
is not enough there: an image whose virtual environment also sees the system site-packages (the NGC NeMo image:
TensorRT-LLM and vLLM go to the system, its uv-synced /opt/venv shadows them) lists a package once per location,
and two pins of one name at two versions make every install that needs it unresolvable. The version that counts is
the one Python imports: the first distribution of each name on `sys.path`, which is what this prints.

    python scripts/image_constraints.py [--exclude NAME ...] > /opt/image-constraints.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys


def canonical(name: str) -> str:
    """PEP 503 normalised name (pip treats `Foo_Bar` and `foo-bar` as one project)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_versions(exclude: set[str] = frozenset()) -> dict[str, str]:
    """Canonical name -> version of the first distribution of each name on sys.path (the one imported)."""
    seen: dict[str, str] = {}
    for dist in metadata.distributions():  # sys.path order: earlier entries shadow later ones
        name = dist.metadata["Name"]
        if not name:
            continue  # a broken .dist-info without metadata: nothing to pin
        key = canonical(name)
        if key not in seen and key not in exclude:
            seen[key] = dist.version
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exclude", nargs="*", default=[], help="project names not to pin (the project itself)")
    args = p.parse_args(argv)
    for name, version in sorted(imported_versions({canonical(n) for n in args.exclude}).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
