#!/usr/bin/env bash
# Issue 10's remaining figures in one pass of about five minutes on one H200 (the 7b1-shaped iteration with
# decode batches of 256 needs ~130 GiB). Each step's output also goes to $OUT/<step>.log when OUT is set.
#   1. kernels.py at bloomz-7b1-mt: BLOOM's fused kernels against transformers' (time, error, NaN)
#   2. ppo_iteration.py, new paths, decode batches of 256 (the 133.2 s row of results_h200.md's fourth pass)
#   3. the same with transformers' kernels: what the fused ones buy, same run
#   4. the same with chunk_size auto: what the trainer's default picks and takes (with the prefill in slices
#      and 80 % of the memory left after the decoder is built, expected: one batch of 256, at a lower peak than step 2's hand-set 256)
# ppo_iteration.py now times its phases with CUDA events, without the synchronisation per minibatch that the
# earlier passes in results_h200.md had (and the trainer no longer has): compare those passes' totals with care.
# Usage: benchmarks/gpu_issue10.sh
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d)}"
python="${PYTHON:-python3}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo"

step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  SECONDS=0
  timeout "$limit" "$@" 2>&1 | grep -v -E "Loading weights|it/s\]$" | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after ${SECONDS} s"
  return "$rc"
}

"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
iteration=("$python" benchmarks/ppo_iteration.py --device cuda --shape bloomz-7b1-mt --prompts 256 --paths new)
step kernels 120 "$python" benchmarks/kernels.py --device cuda --shape bloomz-7b1-mt
step iteration_256 150 "${iteration[@]}" --chunk 256 || exit 1  # the rest would fail alike
step iteration_256_transformers_kernels 150 "${iteration[@]}" --chunk 256 --kernels transformers
step iteration_auto 150 "${iteration[@]}" --chunk auto
