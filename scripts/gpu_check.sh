#!/usr/bin/env bash
# The GPU verification kit (issue 18; docs/gpu.md). A thin wrapper: scripts/gpu_check.py does the work.
#   scripts/gpu_check.sh prepare              here: wheels into .gpu_wheels/, size and import checks, dry run
#   scripts/gpu_check.sh run                  on the lent GPU machine (reports under $OUT)
#   scripts/gpu_check.sh run --dry-run        here: the same checks on the CPU at tiny shapes
# Interpreter: $PYTHON if set, else the checkout's .venv (it does not travel to the GPU machine), else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then
        py="$root/.venv/bin/python"
    else
        py="$(command -v python3)"
    fi
fi
cd "$root"
exec "$py" scripts/gpu_check.py "$@"
