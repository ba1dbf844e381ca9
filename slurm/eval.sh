#!/usr/bin/env bash
# Benchmark evaluation (the papers' Table 1 layout): greedy search rollouts of a model on FlashRAG
# files, EM per dataset and the average.
#
# RUN: a trained run's directory (trainer.out_dir of `sdsearch train`). The rollout budgets
# (max_new_tokens, max_context, max_turns, topk), the EM normalisation and the prompt format
# (instruction, chat template) are then the run's own (RUN/config.json) and the model is RUN/final, so
# the model is evaluated under the budgets it was trained with. results.md ends with a table of every
# setting and where it came from (flag, run config or default).
#
#   RUN=runs/sdsearch-7b-1234 RETRIEVAL_URL=http://node:8000 \
#   sbatch slurm/eval.sh data/nq.jsonl data/triviaqa.jsonl data/popqa.jsonl data/hotpotqa.jsonl \
#                        data/2wiki.jsonl data/musique.jsonl data/bamboogle.jsonl
#
# Optional overrides (each wins over the run's value): MODEL (an HF directory; required without RUN),
# INSTRUCTION (default|search_r1), CHAT_TEMPLATE (auto|none), MAX_NEW_TOKENS, MAX_CONTEXT, MAX_TURNS,
# TOPK, EM (squad|unicode). Without RUN, the prompt defaults to the Qwen2.5 recipes' (INSTRUCTION=search_r1,
# CHAT_TEMPLATE=auto) and the budgets to the training config's defaults: set them to what the model saw.
# Extra `sdsearch eval` flags: EVAL_ARGS (e.g. EVAL_ARGS="--limit 100 --batch-size 64").
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
: "${RETRIEVAL_URL:?set RETRIEVAL_URL to the retrieval service}"
if [[ $# -eq 0 ]]; then echo "usage: [RUN=DIR] [MODEL=DIR] sbatch slurm/eval.sh DATA.jsonl [DATA.jsonl ...]" >&2; exit 2; fi

args=(--retrieval-url "$RETRIEVAL_URL")
if [[ -n "${RUN:-}" ]]; then
    if [[ ! -f "$RUN/config.json" ]]; then
        echo "RUN=$RUN is not a training run directory (no $RUN/config.json)" >&2; exit 2
    fi
    args+=(--run "$RUN")
    [[ -n "${INSTRUCTION:-}" ]] && args+=(--instruction "$INSTRUCTION")
    [[ -n "${CHAT_TEMPLATE:-}" ]] && args+=(--chat-template "$CHAT_TEMPLATE")
else
    : "${MODEL:?set RUN to the trained run directory (its budgets and prompt are used), or MODEL to an HF model directory}"
    args+=(--instruction "${INSTRUCTION:-search_r1}" --chat-template "${CHAT_TEMPLATE:-auto}")
fi
[[ -n "${MODEL:-}" ]] && args+=(--model "$MODEL")
[[ -n "${MAX_NEW_TOKENS:-}" ]] && args+=(--max-new-tokens "$MAX_NEW_TOKENS")
[[ -n "${MAX_CONTEXT:-}" ]] && args+=(--max-context "$MAX_CONTEXT")
[[ -n "${MAX_TURNS:-}" ]] && args+=(--max-turns "$MAX_TURNS")
[[ -n "${TOPK:-}" ]] && args+=(--topk "$TOPK")
[[ -n "${EM:-}" ]] && args+=(--em "$EM")
if [[ -n "${EVAL_ARGS:-}" ]]; then
    read -r -a extra <<< "$EVAL_ARGS"
    args+=("${extra[@]}")
fi
sdsearch_wait_for_retrieval "$RETRIEVAL_URL" 30

sdsearch_srun --ntasks=1 -- sdsearch eval "${args[@]}" --data "$@" --out "$LOG_DIR/eval" \
    > "$LOG_DIR/eval.log" 2>&1 &
wait $!
cat "$LOG_DIR/eval/results.md"
