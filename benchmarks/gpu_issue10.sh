#!/usr/bin/env bash
# Issue 10's remaining figures in one pass of about seven minutes on one H200 (the 7b1-shaped iteration with
# decode batches of 256 needs ~125 GiB). Each step's output also goes to $OUT/<step>.log when OUT is set.
#   0. decode_check.py --agreement-only: the decode paths agree under CUDA graphs and bf16, and the trunk the
#      decoder keeps (through pinned host memory, in chunks) against the scoring forward's
#   1. ppo_iteration.py at bloomz-7b1-mt as the trainer runs it: chunk_size auto, fused BLOOM kernels; the
#      decoder keeps the trunk where that costs no decode batch (256 rows: 78.8 GiB free after the decoder is
#      built, 78.4 without it; the line "chunk auto: ..." says what it chose)
#   2. decode batches of 256 set by hand: the decoder always keeps the trunk (at its peak memory)
#   3. chunk_size auto with the trunk kept by the scoring forward: the comparison
#   4. the same with transformers' kernels: what the fused ones buy
#   5. kernels.py at bloomz-7b1-mt: BLOOM's fused kernels against transformers' (time, error, NaN)
# ppo_iteration.py times its phases with CUDA events, without a synchronisation per minibatch (the trainer has
# none either); its per-1,024 column is computed from 256 prompts measured, labelled so.
# The steps' limits add up to 570 s: with the wheels installed first, the pass fits one 600 s device call.
# Usage: benchmarks/gpu_issue10.sh    (DEVICE=cpu SHAPE=cpu-small: the same steps as a dry run on a CPU)
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$(mktemp -d)}"
python="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
shape="${SHAPE:-bloomz-7b1-mt}"
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

"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"
step agreement 50 "$python" benchmarks/decode_check.py --device "$device" --agreement-only
iteration=("$python" benchmarks/ppo_iteration.py --device "$device" --shape "$shape" --prompts 256 --paths new --chunk auto)
step iteration_auto 130 "${iteration[@]}"
first=$?
step iteration_256 110 "${iteration[@]/auto/256}"
# The trunk kept by the scoring forward: the comparison, and the measurement if the decoder's trunk failed.
step iteration_auto_scoring_trunk 110 "${iteration[@]}" --trunk score || [ "$first" -eq 0 ] || exit 1
step iteration_auto_transformers_kernels 100 "${iteration[@]}" --kernels transformers
step kernels 70 "$python" benchmarks/kernels.py --device "$device" --shape "$shape"
