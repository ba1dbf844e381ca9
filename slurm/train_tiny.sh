#!/usr/bin/env bash
# The embedded default (SD-Search on the bundled tiny world) as a one-node CPU job.
#
#   sbatch slurm/train_tiny.sh [key=value ...]        (from the repository root)
#
# Extra arguments are `sdsearch train` overrides. The run directory is runs/<job name>-<job id>
# (or $SDSEARCH_OUT); a requeued job (preemption, or USR1 before the time limit) resumes from its last
# checkpoint. Step logs go to logs/<job name>-<job id>/.
#SBATCH --job-name=sdsearch-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SDSEARCH_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
sdsearch_setup

OUT="${SDSEARCH_OUT:-runs/${SLURM_JOB_NAME:-sdsearch-tiny}-${SLURM_JOB_ID:-local}}"
echo "run directory: $OUT"
sdsearch_srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-2}" -- \
    sdsearch train trainer.out_dir="$OUT" trainer.resume=true model.threads="${SLURM_CPUS_PER_TASK:-2}" "$@" \
    >> "$LOG_DIR/train.log" 2>&1 &
wait $!
echo "finished: $OUT"
