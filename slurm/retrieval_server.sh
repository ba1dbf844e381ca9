#!/usr/bin/env bash
# The retrieval service (Search-R1 wire format) as its own job: an E5 / FAISS index built with
# `python -m nemo_sdsearch.retrieval build` (docs/retrieval.md), or Search-R1's own index and corpus served as
# they are (docs/search_r1.md). Training jobs point at it with RETRIEVAL_URL.
#
#   INDEX_DIR=/data/wiki18_e5_flat sbatch slurm/retrieval_server.sh
#   FAISS_INDEX=/data/search_r1/e5_Flat.index CORPUS=/data/search_r1/wiki-18.jsonl ENCODER=/models/e5-base-v2 \
#       sbatch slurm/retrieval_server.sh
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
if [[ -n "${FAISS_INDEX:-}" ]]; then
    : "${CORPUS:?set CORPUS to the corpus jsonl that FAISS_INDEX was built from (Search-R1: wiki-18.jsonl)}"
    : "${ENCODER:?set ENCODER to the encoder directory that built FAISS_INDEX (Search-R1: e5-base-v2)}"
    source_flags=(--faiss-index "$FAISS_INDEX" --corpus "$CORPUS" --encoder "$ENCODER")
else
    : "${INDEX_DIR:?set INDEX_DIR to an index built by python -m nemo_sdsearch.retrieval build, or FAISS_INDEX, CORPUS, ENCODER}"
    source_flags=(--index "$INDEX_DIR")
fi
PORT="${RETRIEVAL_PORT:-8000}"
HOST="$(hostname -f 2>/dev/null || hostname)"

sdsearch_srun --ntasks=1 -- python -m nemo_sdsearch.retrieval serve "${source_flags[@]}" --host 0.0.0.0 --port "$PORT" \
    > "$LOG_DIR/retrieval.log" 2>&1 &
server=$!
sdsearch_wait_for_retrieval "http://${HOST}:${PORT}"
echo "http://${HOST}:${PORT}" | tee "$LOG_DIR/retrieval_url"
wait "$server"
