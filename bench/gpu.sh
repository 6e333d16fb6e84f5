#!/usr/bin/env bash
# bf16 training throughput of CTAL (dense, blocked, linear) and HPS at 288x384 on one GPU, and MFU.
# Usage: bench/gpu.sh [--max-seconds 300] [--peak-tflops 989] [--dry-run] [--out FILE]
#   --max-seconds  wall-clock bound for all rows (default 300); rows past it are marked skipped
#   --peak-tflops  the GPU's bf16 dense peak, for model FLOP utilisation (default 989: H100/H200)
#   --dry-run      run on the CPU, tiny (ResNet-18, 32x32, 2 steps): proves the script works
# Writes bench/results/gpu.json after every row.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
max_seconds=300
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max-seconds) max_seconds="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# The outer timeout is a backstop (start-up, a hung kernel); the script stops itself first.
exec timeout --kill-after=10 "$((${max_seconds%.*} + 60))" \
  "$PYTHON" bench/gpu_bench.py --max-seconds "$max_seconds" "${args[@]}"
