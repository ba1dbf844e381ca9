"""What every part of the GPU kit shares: the paths, the run's constants, the model shapes, the result
protocol between `run` and a check's process (`RESULT {json}` as its last line), and the small helpers the
checks use (Skip / Fail, `gpu_mode`, `stream`, `qwen_config`)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "scripts" / "gpu_check.py"  # what `run` starts once per check (`gpu_check.py _check NAME ...`)
WHEEL_DIR = ROOT / ".gpu_wheels"          # .gitignore'd; the device tool's `carry` names it
SITE = Path(tempfile.gettempdir()) / "sdsearch_gpu_site"   # where `run` installs the wheels (there)
SIM = Path(tempfile.gettempdir()) / "sdsearch_gpu_sim"     # the simulated machine (here)
CARRY_LIMIT = 64 * 2**20                   # working tree + carried paths, per device call
BUDGET_S = 480                             # all checks of one `run`
RESULT = "RESULT "                         # a check's last line: RESULT {json}

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


class Skip(Exception):
    pass


class Fail(Exception):
    pass


def gpu_mode(mode: str) -> bool:
    """True on the GPU run (where torch must see CUDA: Fail otherwise), False in the dry run."""
    import torch

    if mode == "gpu" and not torch.cuda.is_available():
        raise Fail("no CUDA device visible to torch")
    return mode == "gpu"


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


def qwen_config(mode: str):
    from transformers import Qwen2Config

    return Qwen2Config(bos_token_id=0, eos_token_id=0, pad_token_id=1,
                       **(QWEN_05B if mode == "gpu" else QWEN_TINY))
