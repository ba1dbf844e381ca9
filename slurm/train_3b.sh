#!/usr/bin/env bash
# Qwen2.5-3B SD-Search (or Search-E1) on 1 node of 8 x H100 80GB, with the retrieval service as a
# heterogeneous job component on a second node.
#
#   MODEL_DIR=/data/Qwen2.5-3B-Instruct INDEX_DIR=/data/wiki18_e5_flat \
#   CONTAINER_IMAGE=/images/nemo_sdsearch.sqsh sbatch slurm/train_3b.sh [--config qwen25_3b_search_e1] [key=value ...]
#
# With RETRIEVAL_URL set (a service you already run, e.g. slurm/retrieval_server.sh) no server is
# started. The retrieval component is then still allocated (a batch script cannot drop a component of
# its own heterogeneous job); to run without it, submit a copy without the hetjob block:
#   sed '/^#SBATCH hetjob/,/^$/d' slurm/train_3b.sh > /tmp/train.sh && RETRIEVAL_URL=... sbatch /tmp/train.sh
# The config's parallel layout and memory estimate are checked before any GPU is used.
#SBATCH --job-name=sdsearch-3b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
#SBATCH hetjob
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G

set -euo pipefail
cd "${SDSEARCH_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
sdsearch_log_dir
sdsearch_env
sdsearch_requeue_on_signal

CONFIG="qwen25_3b_sd_search"
if [[ "${1:-}" == "--config" ]]; then CONFIG="$2"; shift 2; fi
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PORT="${RETRIEVAL_PORT:-8000}"

if [[ -z "${RETRIEVAL_URL:-}" ]]; then
    : "${INDEX_DIR:?set INDEX_DIR to the retrieval index (python -m retrieval build ...) or RETRIEVAL_URL}"
    host="$(scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_1}" | head -n 1)"
    sdsearch_srun --het-group=1 --ntasks=1 -- \
        python -m retrieval serve --index "$INDEX_DIR" --host 0.0.0.0 --port "$PORT" \
        > "$LOG_DIR/retrieval.log" 2>&1 &
    RETRIEVAL_URL="http://${host}:${PORT}"
fi
export RETRIEVAL_URL
sdsearch_wait_for_retrieval "$RETRIEVAL_URL"
sdsearch_rendezvous

OUT="${SDSEARCH_OUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
train_group=()
[[ -n "${SLURM_HET_SIZE:-}" ]] && train_group=(--het-group=0)
sdsearch_srun "${train_group[@]}" --ntasks-per-node=1 -- \
    torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
        --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
        --no-python sdsearch train --config "$CONFIG" \
        cluster.retrieval_url="$RETRIEVAL_URL" cluster.nodes="$NNODES" cluster.gpus_per_node="$GPUS_PER_NODE" \
        trainer.out_dir="$OUT" trainer.resume=true "$@" \
    >> "$LOG_DIR/train.log" 2>&1 &
wait $!
echo "finished: $OUT (convert with: sbatch slurm/convert_to_hf.sh $OUT/final OUT_DIR)"
