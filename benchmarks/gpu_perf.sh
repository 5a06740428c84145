#!/usr/bin/env bash
# Issue 10's GPU figures, and issue 7's bf16 learning check, in one pass on one CUDA device (an H200: the
# 7b1-shaped iteration needs ~100 GiB). Each step's output is also written to $OUT/<step>.log when OUT is set.
#   1. decode_check.py: the decode paths agree (float32 and bf16), where a decode step's time goes, the LM head
#   2. ppo_iteration.py at bloomz-7b1-mt: new paths vs old, phase by phase
#   3. generate.py at bloomz-7b1-mt: engine vs generate (batched and one at a time)
#   4. bf16_check.py: SFT, RM and PPO on bf16 models through `rlhf train` (tiny and 560m shapes)
# Usage: benchmarks/gpu_perf.sh [BELLE_DIR]    (default ../shared/belle)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
belle="${1:-$repo/../shared/belle}"
out="${OUT:-$(mktemp -d)}"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo"

step() {
  local name=$1
  shift
  echo "== $name: $*"
  SECONDS=0
  "$@" 2>&1 | grep -v -E "Loading weights|Writing model shards|it/s\]$" | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after ${SECONDS} s"
  return "$rc"
}

"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
if ! step decode_check "$python" benchmarks/decode_check.py --device cuda; then
  echo "decode_check failed: the rest decodes without CUDA graphs (RLHF_DECODE=eager)"
  export RLHF_DECODE=eager
fi
step ppo_iteration "$python" benchmarks/ppo_iteration.py --device cuda --shape bloomz-7b1-mt --prompts 256 \
  --baseline-prompts 64
step generate "$python" benchmarks/generate.py --device cuda --shape bloomz-7b1-mt --belle "$belle" --questions 128 \
  --batch 64 --single 2 --max-new-tokens 256
step bf16_check "$python" benchmarks/bf16_check.py
