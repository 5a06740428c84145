#!/usr/bin/env bash
# The GPU paths in one short pass, for a machine with one CUDA device:
#   1. the tiny recipes (SFT, RM, PPO) in-process, where precision "auto" means bf16;
#   2. the tiny SFT recipe through `accelerate launch` with configs/accelerate/gpu.yaml;
#   3. the PPO step benchmark (hydra vs four separate models) at the GPU shapes;
#   4. the console's GPU panel against the real driver (benchmarks/gpu_panel_check.py).
# Usage: benchmarks/gpu_smoke.sh [WORKDIR]   (default: a fresh temporary folder; the repo stays clean)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$python" - <<'EOF'
import torch
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

cd "$work"
cp "$repo/configs/tiny.yaml" tiny.yaml
"$python" -m engine.cli demo init demo
for stage in sft rm ppo; do
  SECONDS=0
  "$python" -m engine.cli train "$stage" tiny.yaml
  echo "stage $stage in-process: ${SECONDS} s"
done
"$python" -m engine.cli launch sft tiny.yaml --accelerate-config "$repo/configs/accelerate/gpu.yaml"
"$python" -m engine.cli runs

cd "$repo/benchmarks"
"$python" ppo_bench.py --device cuda --steps 3
"$python" gpu_panel_check.py
