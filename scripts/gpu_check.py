#!/usr/bin/env python3
"""The one-shot GPU verification kit (issue 18): everything the project has written for CUDA, run in one
call on a lent GPU machine (one H200, Python 3.12 with its own CUDA torch, transformers and peft, no
network), and a dry run of the same script on the CPU that the test suite runs, so the kit cannot rot
between GPU draws. docs/gpu.md says how to run it and holds the last report.

    scripts/gpu_check.sh prepare [--no-download] [--no-dry-run]   # here: wheels, size, import check
    scripts/gpu_check.sh run [--out DIR] [--only a,b] [--budget S]  # there: install wheels, run checks
    scripts/gpu_check.sh run --dry-run [--out DIR]                  # here: the same checks, CPU, tiny

prepare (here, with network): downloads into .gpu_wheels/ (ignored; name it in the device tool's `carry`)
the wheels the checks import that the machine lacks, built for CPython 3.12 manylinux x86_64 (WHEELS
below), checks their tags, their requirements and that they fit the 64 MiB carry limit together with the
working tree; then builds a simulated machine under /tmp (a venv holding only the machine's packages,
KINDS.md's list, symlinked from the dev venv, plus the carried wheels), imports there every module the
checks import, and runs the dry run there.

run (there): installs the wheels into a private folder (pip --target; PYTHONPATH), then runs each check
in its own process group under its own time limit, all within --budget seconds (default 480): `env`
(nvidia-smi, versions), `pytest_gpu` (pytest -m gpu), `train_hf` and `train_megatron` (3 steps of
`sdsearch train` each, lr 1e-6: the fp32 master weights must move; megatron with TP 1, bf16, Megatron DDP
and the distributed optimizer, tracking the hf run), `logits` (HF <-> Megatron logits, a Qwen2 0.5B-class
model built from a config), `losses` (bench/losses.py at 8,192 x 151,936 with TARGET lines) and
`generator` (torch-generator tokens/s, the same 0.5B-class model). Everything printed also goes to
OUT/report.txt; OUT/summary.json, OUT/metrics_hf.jsonl, OUT/metrics_megatron.jsonl, OUT/losses.json and
OUT/pytest_gpu.xml are the other files (6 of the 8 the device tool returns). OUT: --out, else $OUT.

--dry-run: the same checks on the CPU at tiny shapes with the current interpreter (no wheels installed);
what needs CUDA (nvidia-smi, Megatron DDP + distributed optimizer, bf16 logits, the compiled JSD, CUDA
timings) is skipped with the reason printed. Exit status: 0 when no check failed.

The code is in scripts/gpu_kit/, one module per concern (its __init__ lists them): this file is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as `python scripts/gpu_check.py` it is there already; imported, it is not
    sys.path.append(str(HERE))

from gpu_kit.common import BUDGET_S, WHEEL_DIR, norm_name  # noqa: E402
from gpu_kit.prepare import prepare  # noqa: E402
from gpu_kit.runner import CHECKS, check_main, run  # noqa: E402
from gpu_kit.wheels import LEFT_BEHIND, MACHINE_PACKAGES, WHEELS, fits_machine, install_wheels, wheel_info  # noqa: E402

# what tests/test_gpu_kit.py reads from this module
__all__ = ["CHECKS", "LEFT_BEHIND", "MACHINE_PACKAGES", "WHEELS", "fits_machine", "install_wheels", "main",
           "norm_name", "wheel_info"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: download the wheels, check size and imports, dry-run on a simulated "
                                       "machine")
    p.add_argument("--wheels", default=str(WHEEL_DIR))
    p.add_argument("--no-download", action="store_true", help="use the wheels already in --wheels")
    p.add_argument("--no-dry-run", action="store_true", help="skip the dry run on the simulated machine")
    r = sub.add_parser("run", help="there: install the wheels and run the checks (--dry-run: here, CPU)")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--out", help="report folder (default: $OUT)")
    r.add_argument("--wheels", default=str(WHEEL_DIR))
    r.add_argument("--no-install", action="store_true", help="use the packages already importable")
    r.add_argument("--only", help="comma-separated checks: " + ",".join(CHECKS))
    r.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all checks")
    r.add_argument("--jobs", type=int, help="checks at a time (default: 1 on the GPU, 2 in a dry run)")
    c = sub.add_parser("_check")
    c.add_argument("name", choices=list(CHECKS))
    c.add_argument("--mode", choices=("gpu", "dry"), required=True)
    c.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        return prepare(args)
    if args.cmd == "run":
        return run(args)
    return check_main(args.name, args.mode, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
