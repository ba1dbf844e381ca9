#!/usr/bin/env bash
# Benchmark evaluation (the papers' Table 1 layout): greedy search rollouts of a model on FlashRAG
# files, EM per dataset and the average.
#
# The prompt must match training: the Qwen2.5 recipes use Search-R1's instruction in the chat template
# (INSTRUCTION=search_r1, CHAT_TEMPLATE=auto, the defaults here); EM is the SQuAD / Search-R1 definition.
#
#   MODEL=runs/sdsearch-7b-1234/final RETRIEVAL_URL=http://node:8000 \
#   sbatch slurm/eval.sh data/nq.jsonl data/triviaqa.jsonl data/popqa.jsonl data/hotpotqa.jsonl \
#                        data/2wiki.jsonl data/musique.jsonl data/bamboogle.jsonl
#SBATCH --job-name=sdsearch-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SDSEARCH_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
sdsearch_log_dir
sdsearch_env
: "${MODEL:?set MODEL to an HF model directory}"
: "${RETRIEVAL_URL:?set RETRIEVAL_URL to the retrieval service}"
if [[ $# -eq 0 ]]; then echo "usage: sbatch slurm/eval.sh DATA.jsonl [DATA.jsonl ...]" >&2; exit 2; fi
sdsearch_wait_for_retrieval "$RETRIEVAL_URL" 30

sdsearch_srun --ntasks=1 -- sdsearch eval --model "$MODEL" --retrieval-url "$RETRIEVAL_URL" \
    --instruction "${INSTRUCTION:-search_r1}" --chat-template "${CHAT_TEMPLATE:-auto}" \
    --data "$@" --out "$LOG_DIR/eval" > "$LOG_DIR/eval.log" 2>&1 &
wait $!
cat "$LOG_DIR/eval/results.md"
