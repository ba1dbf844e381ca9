#!/usr/bin/env bash
# Helpers shared by the sbatch scripts in this folder. Sourced, never run on its own.
#
# Environment a user may set (all optional):
#   CONTAINER_IMAGE   an NGC image / squashfs: every step runs in it through pyxis (srun --container-image,
#                     --container-mounts, and --container-name=sdsearch-<job id>: one named container per node,
#                     shared by every step on that node, so the trainer and the Ray node it drives see the same
#                     /tmp (Ray's session) and /dev/shm (IPC)); unset: plain srun on the host
#   CONTAINER_MOUNTS  pyxis mounts (default: the submit directory at the same path)
#   SDSEARCH_VENV     a virtualenv to activate on the host when no container is named
#   SDSEARCH_LOGS     root of the per-job log folders (default: ./logs)
#   SDSEARCH_DIST_TIMEOUT_MINUTES  how long a rank waits in a collective before the job fails (default 30)
#
# Everything that runs the project's code or its python (training, the retrieval service, the readiness
# probe, the config probe, Ray) is an srun step, so it runs in the container when one is named; only the
# SLURM clients (scontrol) and the shell's own bookkeeping run on the batch host.

# Per-job log folder: logs/<job name>-<job id>/ (array tasks and requeues share it).
sdsearch_log_dir() {
    LOG_DIR="${SDSEARCH_LOGS:-$PWD/logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}"
    mkdir -p "$LOG_DIR"
    export LOG_DIR
    echo "logs: $LOG_DIR"
}

# srun, inside the container when CONTAINER_IMAGE is set. Extra srun options first, then "--", then
# the command:  sdsearch_srun --ntasks=1 -- sdsearch eval ...
# In a heterogeneous job the step goes to component 0 (the training nodes) unless the options name a
# --het-group: a step without one would span every component. Without --cpus-per-task the step gets its
# component's (SLURM 22.05 to 23.02 steps do not inherit it: one CPU per task, bound to one core).
sdsearch_srun() {
    local opts=() group=0 cpus
    while [[ $# -gt 0 && "$1" != "--" ]]; do opts+=("$1"); shift; done
    [[ "${1:-}" == "--" ]] && shift
    if [[ -n "${SLURM_HET_SIZE:-}" ]]; then
        if [[ " ${opts[*]} " == *" --het-group="* ]]; then
            group="${opts[*]##*--het-group=}"; group="${group%% *}"
        else
            opts=(--het-group=0 "${opts[@]}")
        fi
        cpus="SLURM_CPUS_PER_TASK_HET_GROUP_${group}"
        cpus="${!cpus:-}"
    else
        cpus="${SLURM_CPUS_PER_TASK:-}"
    fi
    if [[ -n "$cpus" && " ${opts[*]} " != *" --cpus-per-task="* ]]; then
        opts+=(--cpus-per-task="$cpus")
    fi
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        srun "${opts[@]}" --container-image="$CONTAINER_IMAGE" --container-name="sdsearch-${SLURM_JOB_ID:-local}" \
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

# torchrun on every training node (one agent per node, NPROC_PER_NODE processes each), joined by the c10d
# rendezvous of sdsearch_rendezvous (call it first); a node that fails ends the step on all of them. Each
# process says where the rendezvous placed it ("rank 1 of 16 on node-b ...") before it runs the command.
#   sdsearch_torchrun NPROC_PER_NODE COMMAND [ARG ...]
sdsearch_torchrun() {
    local nproc="$1"; shift
    # torchrun forwards USR1 (the end-of-allocation signal) to every rank, and gives the ranks the signal's lead
    # time to finish their step and write its checkpoint before it kills them (torch >= 2.8 reads these; older
    # ones ignore them). A rank's crash makes torchrun send SIGTERM to the others: they exit at once unless their
    # step is about to end (algorithms/preemption.py), so the job ends within seconds, not after this timeout.
    export TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    # torchrun of the pinned torch takes the list from --signals-to-handle (or PET_SIGNALS_TO_HANDLE) and overwrites
    # the variable above with that option's default, which lacks USR1: it would die of USR1, its ranks left running
    export PET_SIGNALS_TO_HANDLE="$TORCHELASTIC_SIGNALS_TO_HANDLE"
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SDSEARCH_SHUTDOWN_TIMEOUT:-${SDSEARCH_SIGNAL_LEAD_S:-300}}"
    # shellcheck disable=SC2016  # expanded by each worker's bash, not here
    local announce='echo "rank $RANK of $WORLD_SIZE on $(uname -n) (node rank $GROUP_RANK, local rank $LOCAL_RANK)"; exec "$@"'
    # --overlap: the job's Ray step (sdsearch_ray_cluster) runs on the same nodes for the whole job
    sdsearch_srun --ntasks-per-node=1 --kill-on-bad-exit=1 --overlap -- \
        torchrun --nnodes="$NNODES" --nproc-per-node="$nproc" \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-0}" \
            --no-python bash -c "$announce" sdsearch-rank "$@"
}

# Preemption without loss. sbatch --signal=B:USR1@<s> sends USR1 to this shell shortly before the time limit
# (and SLURM sends TERM on preemption): the trap passes it to the training step (srun forwards it to its
# tasks, torchrun to every rank), the trainer finishes the step it is in, checkpoints it and exits with
# status 75, and `sdsearch_train_step` requeues the job, which resumes there (trainer.resume=true). A signal
# before the trainer started requeues at once.
sdsearch_requeue_on_signal() {
    trap 'sdsearch_forward_signal USR1' USR1
    trap 'sdsearch_forward_signal TERM' TERM
    echo "restart count: ${SLURM_RESTART_COUNT:-0}"
}
sdsearch_forward_signal() {
    SDSEARCH_PREEMPTED=1
    if [[ -n "${SDSEARCH_STEP_PID:-}" ]] && kill -0 "$SDSEARCH_STEP_PID" 2> /dev/null; then
        echo "$(date -Is) caught SIG$1: asking the trainer to checkpoint its step and stop"
        pkill -"$1" -P "$SDSEARCH_STEP_PID" 2> /dev/null || true  # the step's srun (it forwards to its tasks)
    else
        echo "$(date -Is) caught SIG$1 before training started: requeueing ${SLURM_JOB_ID}"
        sdsearch_requeue
    fi
}
# Requeue this job and end the batch script. slurmctld can refuse a requeue for a moment (a job still
# completing a step, a busy controller): retry, saying why; if it never takes, end with status 75 (the
# checkpoint is written: `sbatch` the same script with trainer.resume=true to continue).
sdsearch_requeue() {
    local try err
    for try in 1 2 3 4 5 6; do
        if err="$(scontrol requeue "${SLURM_JOB_ID}" 2>&1)"; then
            exit 0
        fi
        echo "$(date -Is) scontrol requeue ${SLURM_JOB_ID} failed (try ${try}/6): ${err}"
        sleep 5
    done
    echo "$(date -Is) could not requeue ${SLURM_JOB_ID}: resubmit with trainer.resume=true to continue"
    exit 75
}

# Run the training step in the background (so that the trap can fire) with its output appended to LOG, wait
# for it (also through the signals the trap handles), and requeue the job when the trainer stopped for a
# signal (status 75: its checkpoint is written). Returns the step's status otherwise.
#   sdsearch_train_step LOG CMD [ARGS...]
sdsearch_train_step() {
    local log="$1" status=0
    shift
    # a subshell that outlives the signal (its trap does nothing; the command in it gets the default handling)
    ( trap ':' USR1 TERM; "$@" ) >> "$log" 2>&1 &
    SDSEARCH_STEP_PID=$!
    while true; do
        wait "$SDSEARCH_STEP_PID" && status=0 || status=$?
        kill -0 "$SDSEARCH_STEP_PID" 2> /dev/null || break  # wait returned for a trapped signal: keep waiting
    done
    SDSEARCH_STEP_PID=""
    if [[ -n "${SDSEARCH_PREEMPTED:-}" || "$status" -eq 75 ]]; then
        echo "$(date -Is) the trainer stopped for a signal (status $status): requeueing ${SLURM_JOB_ID}"
        sdsearch_requeue
    fi
    if [[ "$status" -ne 0 ]]; then
        # torchrun's summary names the rank that failed first, its node, exit code or signal
        echo "$(date -Is) the training step failed (status $status); the first failure, from $log:"
        grep -A 10 "Root Cause" "$log" | grep -E "^ *(time|host|rank|exitcode|error_file|traceback) *:" \
            | head -n 6 || true
    fi
    return "$status"
}

# Wait for a retrieval service to answer /health (the het component or an external URL). The probe is one
# step on the first training node, inside the container (the image's python, not the host's), polling every
# 2 s; it prints the service's passages and the queries it has served. --overlap: a step already running
# (retrieval_server.sh's server) may hold all of the allocation's CPUs.
#   sdsearch_wait_for_retrieval URL [TRIES]
sdsearch_wait_for_retrieval() {
    local url="$1" tries="${2:-600}"
    if sdsearch_srun --ntasks=1 --nodes=1 --overlap -- python -c "$SDSEARCH_HEALTH_PY" "$url" "$tries"; then
        return 0
    fi
    echo "retrieval service at $url did not come up" >&2
    return 1
}
SDSEARCH_HEALTH_PY='
import json, sys, time, urllib.error, urllib.request
url, tries = sys.argv[1], int(sys.argv[2])
for attempt in range(tries):
    base = url.rstrip("/")
    base = base[:-len("/retrieve")] if base.endswith("/retrieve") else base
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as answer:
            health = json.load(answer)
    except urllib.error.HTTPError as e:  # no /health (Search-R1'"'"'s own server): one real query instead
        try:
            req = urllib.request.Request(base + "/retrieve", data=json.dumps({"queries": ["health check"], "topk": 1}).encode(),
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).read()
            health = {}
        except Exception:
            time.sleep(2)
            continue
    except Exception:
        time.sleep(2)
        continue
    print("retrieval service up at %s: %s passages, %s queries served" % (url, health.get("num_passages"), health.get("queries")))
    sys.exit(0)
sys.exit(1)'

# The retrieval service as heterogeneous component 1 (train_{3b,7b}.sh; train_tiny.sh submitted with a second
# component), serving INDEX; exports RETRIEVAL_URL once it answers. The server step runs until the job ends.
#   sdsearch_retrieval_component INDEX
sdsearch_retrieval_component() {
    local index="$1" port="${RETRIEVAL_PORT:-8000}" host
    host="$(scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_1:?not a heterogeneous job with a retrieval component}" | head -n 1)"
    sdsearch_srun --het-group=1 --ntasks=1 -- \
        python -m nemo_sdsearch.retrieval serve --index "$index" --host 0.0.0.0 --port "$port" \
        >> "$LOG_DIR/retrieval.log" 2>&1 &
    RETRIEVAL_URL="http://${host}:${port}"
    export RETRIEVAL_URL
    sdsearch_wait_for_retrieval "$RETRIEVAL_URL"
}

# The generator the run will use (the config's, after the key=value overrides), read by the project's own
# config loader inside the container:  sdsearch_generator CONFIG [key=value ...]
sdsearch_generator() {
    sdsearch_srun --ntasks=1 --nodes=1 -- python -c \
        'import sys; from nemo_sdsearch.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).generator)' \
        "$@" | tail -n 1
}

# A Ray cluster for the TensorRT-LLM engines (one per data-parallel replica; their workers are Ray actors
# placed on the replica's devices), started the way NeMo-RL's ray.sub starts one (rollout/ray_cluster.py says
# why each piece is so): the first training node's IP address (never its host name: the engines' bundles are
# pinned by `node:<ip>`), then ONE long-lived step with a task per training node, each `ray start --block` as
# the head or a worker joining it, with the SLURM / PMI / torchrun variables removed first; it returns once
# every node has joined and exports RAY_ADDRESS=<head ip>:<port>. The training step then runs on the same
# nodes with --overlap (inside the same named container under pyxis). DEVICES: GPUs per node (0: a CPU run).
#   sdsearch_ray_cluster DEVICES
sdsearch_ray_cluster() {
    local devices="$1" port="${RAY_PORT:-6379}" nodelist head n
    # one token for every node, driver and Ray worker of this job's cluster (Ray >= 2.53 token authentication;
    # older Ray ignores both variables): the later steps inherit it from this shell
    if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
        RAY_AUTH_TOKEN="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    fi
    RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN RAY_AUTH_MODE
    nodelist="${SLURM_JOB_NODELIST_HET_GROUP_0:-${SLURM_JOB_NODELIST:-localhost}}"
    head="$(scontrol show hostnames "$nodelist" | head -n 1)"
    n="$(scontrol show hostnames "$nodelist" | wc -l)"
    SDSEARCH_RAY_HEAD_IP="$(sdsearch_srun --nodes=1 --ntasks=1 -w "$head" --overlap -- \
        python -m nemo_sdsearch.rollout.ray_cluster node-ip | tail -n 1)"
    RAY_ADDRESS="${SDSEARCH_RAY_HEAD_IP}:${port}"
    export RAY_ADDRESS
    sdsearch_srun --nodes="$n" --ntasks="$n" --ntasks-per-node=1 --overlap -- \
        python -m nemo_sdsearch.rollout.ray_cluster start --head-ip "$SDSEARCH_RAY_HEAD_IP" --port "$port" \
            --gpus "$devices" >> "$LOG_DIR/ray.log" 2>&1 &
    SDSEARCH_RAY_PID=$!
    # wait for every node (a step on the head node), giving up as soon as the Ray step itself ends
    sdsearch_srun --nodes=1 --ntasks=1 -w "$head" --overlap -- \
        python -m nemo_sdsearch.rollout.ray_cluster wait --address "$RAY_ADDRESS" --nodes "$n" \
            --timeout "${SDSEARCH_RAY_TIMEOUT:-600}" &
    local waiter=$! status=0
    while kill -0 "$waiter" 2> /dev/null; do
        if ! kill -0 "$SDSEARCH_RAY_PID" 2> /dev/null; then
            kill -TERM "$waiter" 2> /dev/null || true
            break
        fi
        sleep 1
    done
    wait "$waiter" || status=$?
    if [[ "$status" -ne 0 ]] || ! kill -0 "$SDSEARCH_RAY_PID" 2> /dev/null; then
        echo "the Ray cluster did not come up; its nodes' output, from $LOG_DIR/ray.log:" >&2
        tail -n 5 "$LOG_DIR/ray.log" >&2 || true
        sdsearch_ray_stop
        return 1
    fi
}

# Stop the job's Ray cluster (the long-lived step of sdsearch_ray_cluster): srun passes SIGTERM to every
# node's `ray start --block`, which stops its Ray processes.
sdsearch_ray_stop() {
    if [[ -n "${SDSEARCH_RAY_PID:-}" ]] && kill -0 "$SDSEARCH_RAY_PID" 2> /dev/null; then
        kill -TERM "$SDSEARCH_RAY_PID" 2> /dev/null || true
        wait "$SDSEARCH_RAY_PID" 2> /dev/null || true
    fi
    SDSEARCH_RAY_PID=""
}

# The GPU training job of slurm/train_{3b,7b}.sh: the retrieval service on het component 1 unless
# RETRIEVAL_URL names one, torchrun over the training nodes, resume on requeue.
#   sdsearch_train_gpu DEFAULT_CONFIG [--config NAME] [key=value ...]
sdsearch_train_gpu() {
    local config="$1"; shift
    if [[ "${1:-}" == "--config" ]]; then config="$2"; shift 2; fi
    local gpus="${GPUS_PER_NODE:-8}" out generator
    if [[ -z "${RETRIEVAL_URL:-}" ]]; then
        : "${INDEX_DIR:?set INDEX_DIR to the retrieval index (python -m nemo_sdsearch.retrieval build ...) or RETRIEVAL_URL}"
        sdsearch_retrieval_component "$INDEX_DIR"
    else
        sdsearch_wait_for_retrieval "$RETRIEVAL_URL"
    fi
    sdsearch_rendezvous
    # the config as the training step will load it (the same layout overrides, so its checks pass or fail alike)
    if ! generator="$(sdsearch_generator "$config" cluster.nodes="$NNODES" cluster.gpus_per_node="$gpus" "$@")"; then
        echo "the config $config does not load with these overrides (the error is above)" >&2
        return 1
    fi
    echo "generator: $generator"
    if [[ "$generator" == "trtllm" ]]; then
        sdsearch_ray_cluster "$gpus"
    fi
    out="${SDSEARCH_OUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
    local status=0
    sdsearch_train_step "$LOG_DIR/train.log" sdsearch_torchrun "$gpus" sdsearch train --config "$config" \
            cluster.retrieval_url="$RETRIEVAL_URL" cluster.nodes="$NNODES" cluster.gpus_per_node="$gpus" \
            trainer.out_dir="$out" trainer.resume=true "$@" || status=$?
    sdsearch_ray_stop
    if [[ "$status" -ne 0 ]]; then
        return "$status"
    fi
    sdsearch_wait_for_retrieval "$RETRIEVAL_URL" 1 || true  # the queries it has served (the run is done either way)
    echo "finished: $out (convert with: sbatch slurm/convert_to_hf.sh $out/final OUT_DIR)"
}

# The start of every job: strict mode is the caller's; log folder, environment, requeue trap.
sdsearch_setup() {
    sdsearch_log_dir
    sdsearch_env
    sdsearch_signal_lead
    sdsearch_requeue_on_signal
}

# SDSEARCH_SIGNAL_LEAD_S: how many seconds before the time limit the end-of-allocation signal comes, read from
# the running script's own `#SBATCH --signal=...@<seconds>` line (SLURM runs a copy of the script, header
# included) unless the caller set it (do, when you override --signal on the sbatch command line). The trainer
# checks at start that a step and its checkpoint fit in it (trainer.step_time_s + trainer.checkpoint_time_s).
sdsearch_signal_lead() {
    if [[ -z "${SDSEARCH_SIGNAL_LEAD_S:-}" && -r "$0" ]]; then
        SDSEARCH_SIGNAL_LEAD_S="$(sed -n 's/^#SBATCH --signal=[^@]*@\([0-9][0-9]*\).*/\1/p' "$0" | head -n 1)"
    fi
    export SDSEARCH_SIGNAL_LEAD_S
    echo "end-of-allocation signal lead: ${SDSEARCH_SIGNAL_LEAD_S:-unknown} s"
}
