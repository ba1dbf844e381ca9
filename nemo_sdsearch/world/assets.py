"""Where the embedded default lives: the warm-started tiny model and its tokenizer, and the bundled world."""

from __future__ import annotations

import functools
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "tiny"


def default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; rebuild it with "
            f"`sdsearch warmstart --out {DEFAULT_MODEL_DIR}` or pass --model PATH")
    return DEFAULT_MODEL_DIR


@functools.cache
def default_bundle():
    """The bundled world at its default sizes (`generator.build_bundle()`), built once per process (about half a
    second) and shared by every caller: treat it as read-only, never mutate it or its worlds, question lists or
    passages (copy first). A bundle of other sizes or seeds: call `build_bundle(...)` itself."""
    from nemo_sdsearch.world.generator import build_bundle

    return build_bundle()


def default_datasets(split: str = "test"):
    """(questions as QA, corpus) of the bundled world: `test` uses the separate test world. Both are new lists
    (the passages themselves are the shared bundle's: read-only)."""
    from nemo_sdsearch.core.qa import QA

    bundle = default_bundle()
    if split not in ("train", "dev", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, dev or test")
    world = bundle.test_world if split == "test" else bundle.train_world
    questions = [QA.from_flashrag(q.to_flashrag()) for q in getattr(bundle, split)]
    return questions, list(world.passages)
