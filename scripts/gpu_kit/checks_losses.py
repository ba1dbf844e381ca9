"""Losses: `losses`, bench/losses.py (the dense TRL/GKD JSD, our chunked JSD eager and compiled, Liger-Kernel's
fused Triton JSD as the GPU anchor where its wheel is carried, and the read-once floor) with its TARGET lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import ROOT, Fail, gpu_mode, stream


def check_losses(mode: str, out: Path) -> dict:
    cuda = gpu_mode(mode)
    skipped = []
    if cuda:
        args = ["--device", "cuda", "--rows", "8192", "--vocab", "151936", "--repeats", "3"]
    else:
        args = ["--device", "cpu", "--rows", "64", "--vocab", "2048", "--repeats", "1", "--threads", "1",
                "--methods", "floor,chunked,dense", "--ours", "chunked"]
        skipped.append("chunked_compiled: torch.compile takes ~20 s on this CPU; the GPU run compiles it "
                       "(Triton) and holds it to 1.5x the read-once floor")
    cmd = [sys.executable, str(ROOT / "bench" / "losses.py"), *args, "--json", str(out / "losses.json")]
    rc, text = stream(cmd)
    if rc != 0:
        raise Fail(f"bench/losses.py exited with {rc}")
    targets = [line for line in text.splitlines() if line.startswith("TARGET ")]
    if cuda and not any("jsd_time_vs_floor" in t for t in targets):
        raise Fail("no jsd_time_vs_floor TARGET line")
    unmet = [t.split()[1] for t in targets if "met=no" in t]
    return {"status": "pass", "targets": targets, "skipped": skipped,
            "reason": f"targets not met: {', '.join(unmet)}" if unmet else f"{len(targets)} TARGET lines",
            "figures": json.loads((out / "losses.json").read_text())}
