"""What `run` writes: every line printed also goes to OUT/report.txt (Report), the header, and the summary at
the end (a line per check with what it skipped and any PREDICTED GPU FAILURE, the TARGET lines) together with
OUT/summary.json. The summary is printed last, so the device tool's output_tail holds it even when the files
do not come back."""

from __future__ import annotations

import datetime
import json
import sys
import threading
from pathlib import Path


class Report:
    """Prints and writes to OUT/report.txt at once."""

    def __init__(self, path: Path):
        self.f = open(path, "w", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")


def write_header(log: Report, mode: str, budget: float, jobs: int, out: Path) -> None:
    log(f"# sdsearch GPU kit ({'dry run on CPU' if mode == 'dry' else 'GPU run'}), "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}; budget {budget:.0f} s; {jobs} at a time; "
        f"out {out}")


def write_summary(log: Report, mode: str, results: list[dict], total: float, budget: float, out: Path) -> list[str]:
    """The summary lines and OUT/summary.json; returns the names of the checks that failed."""
    log("")
    log(f"# summary ({'dry run' if mode == 'dry' else 'GPU'}; {total:.0f} s of the {budget:.0f} s budget)")
    for r in results:
        log(f"{r['name']:16s} {r['status'].upper():5s} {r['seconds']:6.0f} s  {r.get('reason', '')}")
        for skipped in r.get("skipped", []):
            log(f"{'':16s} skipped: {skipped}")
        for predicted in r.get("predicted_gpu_failures", []):
            log(f"{'':16s} PREDICTED GPU FAILURE: {predicted}")
    targets = [t for r in results for t in r.get("targets", [])]
    if targets and mode == "dry":
        log("(dry run: tiny shapes on a shared CPU; these TARGET lines test the printing, not the goals)")
    for t in targets:
        log(t)
    summary = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "seconds": round(total, 1), "budget_s": budget, "checks": results, "targets": targets}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    failed = [r["name"] for r in results if r["status"] == "fail"]
    log(f"# {'FAILED: ' + ', '.join(failed) if failed else 'no check failed'}; report {out / 'report.txt'}")
    return failed
