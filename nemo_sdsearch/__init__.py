"""nemo_sdsearch: SD-Search and Search-E1 training for search-augmented reasoning agents."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The retrieval service is the repository's top-level retrieval/ folder, installed as nemo_sdsearch.retrieval
# (pyproject.toml maps it). Imported from a checkout that is not installed (the repository root as working
# directory or on PYTHONPATH), the same name finds that folder: the repository root joins this package's path.
_here = _Path(__file__).resolve().parent
if not (_here / "retrieval").exists() and (_here.parent / "retrieval" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - __path__ is set for every package
