#!/usr/bin/env bash
# The embedded default (SD-Search on the bundled tiny world) as a CPU job: one process on one node, or
# torchrun over several nodes (data parallel; actor=megatron), optionally with the retrieval service as a
# heterogeneous component on its own node.
#
#   sbatch slurm/train_tiny.sh [key=value ...]                          (from the repository root)
#   sbatch --nodes=2 slurm/train_tiny.sh actor=megatron [key=value ...]
#   sdsearch world --out data/tiny && python -m nemo_sdsearch.retrieval build --kind bm25 \
#       --corpus data/tiny/train_corpus.jsonl --out data/tiny_bm25
#   INDEX_DIR=data/tiny_bm25 sbatch --nodes=2 : --ntasks=1 slurm/train_tiny.sh actor=megatron [key=value ...]
#
# Extra arguments are `sdsearch train` overrides. More than one node (or NPROC_PER_NODE > 1) runs under
# torchrun with the rendezvous of slurm/common.sh. With generator=trtllm among them the job's Ray cluster is
# started on its training nodes first (slurm/common.sh's sdsearch_ray_cluster; on CPU nodes the engine is
# whatever `tensorrt_llm` the environment provides: the tests put their stand-in there). With a second component (`: --ntasks=1`) the retrieval
# service serves INDEX_DIR there and the rollouts query it (rollout.retriever=http). The run directory is
# runs/<job name>-<job id> (or $SDSEARCH_OUT); a requeued job (preemption, or USR1 before the time limit)
# resumes from its last checkpoint, and slurm-<job>.out keeps every attempt. Step logs go to
# logs/<job name>-<job id>/.
#SBATCH --job-name=sdsearch-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append

set -euo pipefail
cd "${SDSEARCH_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
sdsearch_setup

OUT="${SDSEARCH_OUT:-runs/${SLURM_JOB_NAME:-sdsearch-tiny}-${SLURM_JOB_ID:-local}}"
echo "run directory: $OUT"
cpus="${SLURM_CPUS_PER_TASK_HET_GROUP_0:-${SLURM_CPUS_PER_TASK:-2}}"
args=(trainer.out_dir="$OUT" trainer.resume=true model.threads="$cpus")
service=""
if [[ -n "${SLURM_JOB_NODELIST_HET_GROUP_1:-}" ]]; then
    : "${INDEX_DIR:?set INDEX_DIR to a retrieval index of the tiny world (see the top of this script)}"
    sdsearch_retrieval_component "$INDEX_DIR"
    service="$RETRIEVAL_URL"
    args+=(rollout.retriever=http cluster.retrieval_url="$service")
fi
nodes="${SLURM_JOB_NUM_NODES_HET_GROUP_0:-${SLURM_JOB_NUM_NODES:-1}}"
if [[ " $* " == *" generator=trtllm "* ]]; then
    sdsearch_ray_cluster 0
fi
status=0
if (( nodes * ${NPROC_PER_NODE:-1} > 1 )); then
    sdsearch_rendezvous
    sdsearch_train_step "$LOG_DIR/train.log" sdsearch_torchrun "${NPROC_PER_NODE:-1}" sdsearch train "${args[@]}" "$@" \
        || status=$?
else
    sdsearch_train_step "$LOG_DIR/train.log" sdsearch_srun --ntasks=1 --overlap -- sdsearch train "${args[@]}" "$@" \
        || status=$?
fi
sdsearch_ray_stop
if [[ "$status" -ne 0 ]]; then exit "$status"; fi
if [[ -n "$service" ]]; then sdsearch_wait_for_retrieval "$service" 1; fi  # the queries it served
echo "finished: $OUT"
