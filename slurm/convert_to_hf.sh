#!/usr/bin/env bash
# Convert a checkpoint to a Hugging Face directory that transformers.AutoModelForCausalLM.from_pretrained
# loads. SRC: a training result of this project (megatron_step_* training checkpoint, Megatron weight
# directory, sdsearch training archive) or a NeMo checkpoint (NeMo 1.x .nemo file or its unpacked
# directory, NeMo 2.0 checkpoint directory with context/ and weights/; Qwen2 and Llama families).
# See docs/nemo.md.
#
#   sbatch slurm/convert_to_hf.sh SRC OUT_DIR
#SBATCH --job-name=sdsearch-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${SDSEARCH_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
sdsearch_log_dir
sdsearch_env
if [[ $# -ne 2 ]]; then echo "usage: sbatch slurm/convert_to_hf.sh SRC OUT_DIR" >&2; exit 2; fi
sdsearch_srun --ntasks=1 -- sdsearch convert "$1" --to hf "$2" > "$LOG_DIR/convert.log" 2>&1 &
wait $!
echo "wrote $2"
