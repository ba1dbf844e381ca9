#!/usr/bin/env bash
# Qwen2.5-32B SD-Search on 2 nodes of 8 x H100 80GB, with the retrieval service as a
# heterogeneous job component on a third node.
#
#   MODEL_DIR=/data/Qwen2.5-32B-Instruct INDEX_DIR=/data/wiki18_e5_flat \
#   CONTAINER_IMAGE=/images/nemo_sdsearch.sqsh sbatch slurm/train_32b.sh [key=value ...]
#
# With RETRIEVAL_URL set (a service you already run, e.g. slurm/retrieval_server.sh) no server is
# started. The retrieval component is then still allocated (a batch script cannot drop a component of
# its own heterogeneous job); to run without it, submit a copy without the hetjob block:
#   sed '/^#SBATCH hetjob/,/^$/d' slurm/train_32b.sh > /tmp/train.sh && RETRIEVAL_URL=... sbatch /tmp/train.sh
# The config's parallel layout and memory estimate are checked before any GPU is used.
# GPUS_PER_NODE (default 8): ranks (torchrun processes) per training node and cluster.gpus_per_node. Run on
# CPU nodes (what tests/test_slurm.py does): sbatch options for the #SBATCH lines, `key=value` overrides for
# the recipe (docs/cluster.md, "The GPU scripts on CPU").
#SBATCH --job-name=sdsearch-32b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@3000
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
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
sdsearch_setup
sdsearch_train_gpu qwen25_32b_sd_search "$@"
