#!/usr/bin/env bash
# The retrieval service (Search-R1 wire format) as its own job: E5 / FAISS index built with
# `python -m retrieval build` (docs/retrieval.md). Training jobs point at it with RETRIEVAL_URL.
#
#   INDEX_DIR=/data/wiki18_e5_flat sbatch slurm/retrieval_server.sh
#
# The URL is written to logs/<job>/retrieval_url (and printed) once the service answers /health.
#SBATCH --job-name=sdsearch-retrieval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SDSEARCH_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
sdsearch_log_dir
sdsearch_env
: "${INDEX_DIR:?set INDEX_DIR to an index directory written by python -m retrieval build}"
PORT="${RETRIEVAL_PORT:-8000}"
HOST="$(hostname -f 2>/dev/null || hostname)"

sdsearch_srun --ntasks=1 -- python -m retrieval serve --index "$INDEX_DIR" --host 0.0.0.0 --port "$PORT" \
    > "$LOG_DIR/retrieval.log" 2>&1 &
server=$!
sdsearch_wait_for_retrieval "http://${HOST}:${PORT}"
echo "http://${HOST}:${PORT}" | tee "$LOG_DIR/retrieval_url"
wait "$server"
