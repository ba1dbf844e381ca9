"""The host's random generators (Python's, NumPy's, torch's CPU generator): one way to save and restore them, for
every checkpoint that carries them (algorithms/state.py's loop state, models/megatron/training_state.py)."""

from __future__ import annotations

import random

import numpy as np
import torch


def host_rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_host_rng_state(state: dict) -> None:
    # "random": the key Megatron training-state checkpoints used for Python's generator before 2026-12-08
    random.setstate(state["python"] if "python" in state else state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
