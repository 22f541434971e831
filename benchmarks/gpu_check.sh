#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): pretraining step per backbone at 96³ batch 4
# bf16 with crops/s, peak memory, HybridMIM/SimMIM ratios, TFLOP/s and MFU; fine-tuning and
# inference throughput; fp16 + GradScaler; torch.compile on/off. Writes
# results/benchmarks/gpu_check/gpu_check.{json,md} (or --out DIR) and its log beside them.
#
#   bash benchmarks/gpu_check.sh                 # on a GPU: paper sizes, ≤ 8 minutes
#   bash benchmarks/gpu_check.sh --size tiny     # anywhere (CI runs this)
#
# GPU_CHECK_LIMIT_S (default 480) caps the wall time; the script is killed past it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
OUT=results/benchmarks/gpu_check
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[i]}" == --out ]] && OUT="${args[i+1]}"
done
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee "$OUT/nvidia-smi.txt" || true
timeout --kill-after=10 "${GPU_CHECK_LIMIT_S:-480}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" \
  2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
