"""Training state that must survive a crash: question order position, checkpoints, metrics files."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_sdsearch.config import ConfigError
from nemo_sdsearch.core.files import atomic_path, atomic_write_text


@dataclass
class QuestionSampler:
    """Epoch-wise shuffled order of question indices; its state is (epoch, position)."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order()
            take = order[self.position:self.position + k - len(out)]
            out += take
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A run writes into `out` only if it continues the run there (`trainer.resume=true`), or `out` is
    empty or absent, or the user asked to replace it (`trainer.overwrite=true`): a new run never mixes
    its files with an old run's (reused pools, appended metrics, an old model under a new config.json).
    Read-only: call it on every rank before anything is written, then `clear_out_dir` on rank 0."""
    if resume or overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"config key trainer.out_dir: {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(f"config key trainer.out_dir: {out} already holds a run ({shown}); set "
                         f"trainer.resume=true to continue it, trainer.overwrite=true to delete it and start "
                         f"over, or choose another trainer.out_dir")


def clear_out_dir(out: Path, overwrite: bool) -> None:
    """Rank 0, at the start of a run: with `trainer.overwrite=true` delete everything in `out`; make sure it
    exists; remove the temporaries a run killed mid-checkpoint left behind (`checkpoints/.tmp_step_*`,
    `checkpoints/latest.tmp`: never pointed to by `latest`, so never needed)."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    if ckpt_root.is_dir():
        for stale in [*ckpt_root.glob(".tmp_step_*"), *ckpt_root.glob("latest.tmp")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def save_checkpoint(out_dir: Path, step: int, payload: dict) -> Path:
    """Write checkpoints/step_NNNNNN/state.pt atomically and durably (as `.tmp_step_NNNNNN/`, fsynced, renamed),
    then point `latest` at it the same way (`latest.tmp`)."""
    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    with atomic_path(final, f".tmp_step_{step:06d}") as tmp:
        tmp.mkdir(parents=True)
        torch.save(payload, tmp / "state.pt")
    atomic_write_text(ckpt_root / "latest", final.name, tmp_name="latest.tmp")
    return final


def rotate_checkpoints(out_dir: Path, keep_last: int, keep_step: int | None = None) -> list[int]:
    """Rank 0, after a checkpoint is complete: delete every training checkpoint (`step_N/` and the
    distributed actor's `megatron_step_N/`) except the newest `keep_last` (0 = keep all), the one `latest`
    points at, and `keep_step` (the best by dev EM). Returns the steps deleted."""
    root = out_dir / "checkpoints"
    if keep_last <= 0 or not root.is_dir():
        return []
    steps = sorted(int(p.name.split("_")[-1]) for p in root.glob("step_*") if p.is_dir())
    keep = set(steps[-keep_last:])
    if (root / "latest").exists():
        keep.add(int((root / "latest").read_text().strip().split("_")[-1]))
    if keep_step is not None:
        keep.add(int(keep_step))
    gone = [s for s in steps if s not in keep]
    for s in gone:
        for d in (root / f"step_{s:06d}", root / f"megatron_step_{s:06d}"):
            if d.exists():
                shutil.rmtree(d)
    return gone


def checkpoint_bytes(hf_config, distributed: bool) -> int:
    """An upper estimate of one training checkpoint's size: per parameter fp32 weights and Adam's two fp32
    moments (12 bytes; the distributed actor's Megatron checkpoint adds its bf16 model weights: 14), plus 1%
    for the loop state. Counted from the HF config (Qwen2 family: embeddings, attention with biases, SwiGLU
    MLP, norms; an untied output layer)."""
    c = hf_config
    h, L, V, f = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * f + 2 * h
    params = V * h * (1 if getattr(c, "tie_word_embeddings", False) else 2) + L * layer + h
    return int(params * (14 if distributed else 12) * 1.01)


def check_free_disk(out_dir: Path, need_bytes: int, count: float) -> None:
    """Refuse to start a run whose disk cannot hold `count` more checkpoints of `need_bytes` each."""
    if count <= 0:
        return
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes * count:
        gib = 2 ** 30
        raise ConfigError(f"config key trainer.out_dir: {out_dir} has {free / gib:.1f} GiB free, but one training "
                          f"checkpoint takes about {need_bytes / gib:.1f} GiB (x trainer.min_free_disk_checkpoints="
                          f"{count:g}); free space, choose another trainer.out_dir, lower trainer.keep_last, or set "
                          "trainer.min_free_disk_checkpoints=0 to skip this check")


def load_latest_checkpoint(out_dir: Path) -> dict | None:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip() / "state.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume, drop metric rows past the checkpoint so the file matches the state."""
    if not path.exists():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= max_step]
    atomic_write_text(path, "".join(r + "\n" for r in rows))  # a crash here keeps the old file whole
