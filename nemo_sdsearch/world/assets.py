"""Where the embedded default lives: the warm-started tiny model and its tokenizer, and the bundled world."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "tiny"


def default_model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; rebuild it with "
            f"`sdsearch warmstart --out {DEFAULT_MODEL_DIR}` or pass --model PATH")
    return DEFAULT_MODEL_DIR


def default_datasets(split: str = "test"):
    """(questions as QA, corpus) of the bundled world: `test` uses the separate test world."""
    from nemo_sdsearch.core.qa import QA
    from nemo_sdsearch.world.generator import build_bundle

    bundle = build_bundle()
    if split not in ("train", "dev", "test"):
        raise ValueError(f"unknown split {split!r}; choose train, dev or test")
    world = bundle.test_world if split == "test" else bundle.train_world
    questions = [QA.from_flashrag(q.to_flashrag()) for q in getattr(bundle, split)]
    return questions, world.passages
