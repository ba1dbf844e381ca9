#!/usr/bin/env bash
# Helpers shared by the sbatch scripts in this folder. Sourced, never run on its own.
#
# Environment a user may set (all optional):
#   CONTAINER_IMAGE   an NGC image / squashfs: every step runs in it through pyxis
#                     (srun --container-image/--container-mounts); unset: plain srun on the host
#   CONTAINER_MOUNTS  pyxis mounts (default: the submit directory at the same path)
#   SDSEARCH_VENV     a virtualenv to activate on the host when no container is named
#   SDSEARCH_LOGS     root of the per-job log folders (default: ./logs)

# Per-job log folder: logs/<job name>-<job id>/ (array tasks and requeues share it).
sdsearch_log_dir() {
    LOG_DIR="${SDSEARCH_LOGS:-$PWD/logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}"
    mkdir -p "$LOG_DIR"
    export LOG_DIR
    echo "logs: $LOG_DIR"
}

# srun, inside the container when CONTAINER_IMAGE is set. Extra srun options first, then "--", then
# the command:  sdsearch_srun --ntasks=1 -- sdsearch eval ...
sdsearch_srun() {
    local opts=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
    [[ "${1:-}" == "--" ]] && shift
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        srun "${opts[@]}" --container-image="$CONTAINER_IMAGE" \
            --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}" --container-workdir="$PWD" "$@"
    else
        srun "${opts[@]}" "$@"
    fi
}

# Activate the host virtualenv (no container).
sdsearch_env() {
    if [[ -z "${CONTAINER_IMAGE:-}" && -n "${SDSEARCH_VENV:-}" ]]; then
        # shellcheck disable=SC1091
        source "$SDSEARCH_VENV/bin/activate"
    fi
    export PYTHONUNBUFFERED=1
}

# torchrun rendezvous from the SLURM allocation: the first node of the (first het component's) node
# list is the c10d endpoint; the port is derived from the job id so concurrent jobs do not collide.
sdsearch_rendezvous() {
    local nodelist="${SLURM_JOB_NODELIST_HET_GROUP_0:-${SLURM_JOB_NODELIST:-localhost}}"
    MASTER_ADDR="$(scontrol show hostnames "$nodelist" | head -n 1)"
    MASTER_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))
    NNODES="${SLURM_JOB_NUM_NODES_HET_GROUP_0:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    export MASTER_ADDR MASTER_PORT NNODES
    echo "rendezvous: $MASTER_ADDR:$MASTER_PORT, $NNODES node(s)"
}

# Requeue on preemption or time limit: sbatch --signal=B:USR1@<s> sends USR1 to this shell shortly
# before the end; the job goes back to the queue and, with trainer.resume=true, continues from its
# last checkpoint. The step must run in the background (`... & wait`) for the trap to fire.
sdsearch_requeue_on_signal() {
    trap 'echo "$(date -Is) caught the end-of-allocation signal: requeueing ${SLURM_JOB_ID}";
          scontrol requeue "${SLURM_JOB_ID}"; exit 0' USR1
    echo "restart count: ${SLURM_RESTART_COUNT:-0}"
}

# Wait for a retrieval service to answer /health (the het component or an external URL).
sdsearch_wait_for_retrieval() {
    local url="$1" tries="${2:-600}"
    for ((i = 0; i < tries; i++)); do
        if python - "$url" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/health", timeout=2).read()
PY
            echo "retrieval service up at $url"
            return 0
        fi
        sleep 2
    done
    echo "retrieval service at $url did not come up" >&2
    return 1
}

# The generator the run will use (the config's, after the key=value overrides), read by the project's own
# config loader inside the container:  sdsearch_generator CONFIG [key=value ...]
sdsearch_generator() {
    sdsearch_srun --ntasks=1 --nodes=1 -- python -c \
        'import sys; from nemo_sdsearch.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).generator)' \
        "$@" | tail -n 1
}

# A Ray cluster for the TensorRT-LLM engines (one per data-parallel replica; their workers are Ray actors
# placed on the replica's GPUs): a head on the first training node, a worker on every other training node,
# each given all of its node's GPUs; exports RAY_ADDRESS for the trainer. The srun steps run in the
# background until the job ends (ray start --block).  sdsearch_ray_cluster GPUS_PER_NODE
sdsearch_ray_cluster() {
    local gpus="$1" port="${RAY_PORT:-6379}" nodelist head node i
    nodelist="${SLURM_JOB_NODELIST_HET_GROUP_0:-${SLURM_JOB_NODELIST:-localhost}}"
    head="$(scontrol show hostnames "$nodelist" | head -n 1)"
    RAY_ADDRESS="${head}:${port}"
    export RAY_ADDRESS
    sdsearch_srun --nodes=1 --ntasks=1 -w "$head" --overlap -- \
        ray start --head --node-ip-address="$head" --port="$port" --num-gpus="$gpus" --disable-usage-stats --block \
        > "$LOG_DIR/ray-head.log" 2>&1 &
    for ((i = 0; i < 120; i++)); do
        if sdsearch_srun --nodes=1 --ntasks=1 -w "$head" --overlap -- ray status --address="$RAY_ADDRESS" \
            > /dev/null 2>&1; then
            break
        fi
        sleep 2
    done
    for node in $(scontrol show hostnames "$nodelist" | tail -n +2); do
        sdsearch_srun --nodes=1 --ntasks=1 -w "$node" --overlap -- \
            ray start --address="$RAY_ADDRESS" --num-gpus="$gpus" --disable-usage-stats --block \
            > "$LOG_DIR/ray-worker-${node}.log" 2>&1 &
    done
    echo "ray: head $RAY_ADDRESS, $(scontrol show hostnames "$nodelist" | wc -l) node(s) x $gpus GPUs"
}

# The GPU training job of slurm/train_{3b,7b}.sh: the retrieval service on het component 1 unless
# RETRIEVAL_URL names one, torchrun over the training nodes, resume on requeue.
#   sdsearch_train_gpu DEFAULT_CONFIG [--config NAME] [key=value ...]
sdsearch_train_gpu() {
    local config="$1"; shift
    if [[ "${1:-}" == "--config" ]]; then config="$2"; shift 2; fi
    local gpus="${GPUS_PER_NODE:-8}" port="${RETRIEVAL_PORT:-8000}" host out
    if [[ -z "${RETRIEVAL_URL:-}" ]]; then
        : "${INDEX_DIR:?set INDEX_DIR to the retrieval index (python -m nemo_sdsearch.retrieval build ...) or RETRIEVAL_URL}"
        host="$(scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_1}" | head -n 1)"
        sdsearch_srun --het-group=1 --ntasks=1 -- \
            python -m nemo_sdsearch.retrieval serve --index "$INDEX_DIR" --host 0.0.0.0 --port "$port" \
            > "$LOG_DIR/retrieval.log" 2>&1 &
        RETRIEVAL_URL="http://${host}:${port}"
    fi
    export RETRIEVAL_URL
    sdsearch_wait_for_retrieval "$RETRIEVAL_URL"
    sdsearch_rendezvous
    if [[ "$(sdsearch_generator "$config" "$@")" == "trtllm" ]]; then
        sdsearch_ray_cluster "$gpus"
    fi
    out="${SDSEARCH_OUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
    local group=()
    [[ -n "${SLURM_HET_SIZE:-}" ]] && group=(--het-group=0)
    sdsearch_srun "${group[@]}" --ntasks-per-node=1 -- \
        torchrun --nnodes="$NNODES" --nproc-per-node="$gpus" \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
            --no-python sdsearch train --config "$config" \
            cluster.retrieval_url="$RETRIEVAL_URL" cluster.nodes="$NNODES" cluster.gpus_per_node="$gpus" \
            trainer.out_dir="$out" trainer.resume=true "$@" \
        >> "$LOG_DIR/train.log" 2>&1 &
    wait $!
    echo "finished: $out (convert with: sbatch slurm/convert_to_hf.sh $out/final OUT_DIR)"
}

# The start of every job: strict mode is the caller's; log folder, environment, requeue trap.
sdsearch_setup() {
    sdsearch_log_dir
    sdsearch_env
    sdsearch_requeue_on_signal
}
