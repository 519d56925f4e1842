#!/usr/bin/env bash
# The GPU benchmark suite in ONE call of the device machine: ceilings, correctness at real size, the main table, a
# profile, the kernel tests, compute-sanitizer, end-to-end DPO/GRPO steps, the V x N sweep and a tuning sweep. Stages
# run in priority order under one time budget, each with its own limit; every stage's full log and results land in
# $OUT, the summary is printed last.
#
#   here:        bash scripts/gpu/fetch_wheels.sh               # trl, datasets, liger wheels for the image's Python
#   device tool: run(command="bash scripts/gpu/benchmark_suite.sh", carry=[".whl"], timeout_s=600)
#
# GPU_SUITE_BUDGET_S (default 560) bounds the whole call; GPU_SUITE_STAGES (default: all) picks stages, e.g.
# "ceilings main tune" for a rerun; GPU_SUITE_MAIN_IMPLS the main table's implementations; GPU_SUITE_DRY=1 runs the
# same stages at toy sizes on the CPU (tests/scripts/test_benchmark_suite.py). See docs/benchmarks.md ("Rerunning").
set -u
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
DRY=${GPU_SUITE_DRY:-0}
# The device tool brings back at most 8 files from $OUT: on the GPU (GPU_SUITE_PACK=1, the default there) results are
# written to a scratch folder and packed into $OUT/results.tgz after every stage, so a stage cut off still leaves the
# ones before it.
DEST=
if [[ ${GPU_SUITE_PACK:-$([[ $DRY == 1 ]] && echo 0 || echo 1)} == 1 ]]; then
  DEST=$OUT
  OUT=$(mktemp -d /tmp/gpu_suite.XXXX)
fi
pack() {
  [[ -n $DEST ]] || return 0
  tar czf "$DEST/results.tgz.part" -C "$OUT" . && mv "$DEST/results.tgz.part" "$DEST/results.tgz"
  cp "$SUMMARY" "$DEST/summary.txt"
}
BUDGET=${GPU_SUITE_BUDGET_S:-560}
STAGES=${GPU_SUITE_STAGES:-"ceilings main profile tests sanitizer e2e sizes tune"}
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
want() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # stage NAME LIMIT_S MIN_S command...: skipped when fewer than MIN_S seconds are left (a Python stage
  local name=$1 limit=$2 min=$3 l rc  # needs ~20-30 s to import torch, start CUDA and compile its kernels)
  shift 3
  want "$name" || return 0
  l=$(left)
  if (( l < min )); then echo "== $name: skipped, ${l}s left (needs ${min}s)" | tee -a "$SUMMARY"; return 0; fi
  (( limit > l - 10 )) && limit=$(( l - 10 ))
  echo "== $name (limit ${limit}s, $(( $(date +%s) - T0 ))s in)"
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name rc=$rc after $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
  tail -n 12 "$OUT/$name.log"
  pack
}

# The device image has no `pip install -e .` of this checkout: the package is imported from the working tree.
if [[ $DRY != 1 ]] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed" | tee -a "$SUMMARY"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv > "$OUT/nvidia_smi.txt" 2>&1

# The H200 benchmark case, and the V x N grid
CASE=(--n 16384 --d 4096 --vocab 151936 --dtype bf16)
SIZES=(--ns 2048,16384,65536 --vocabs 128256,151936,262144 --d 4096 --dtype bf16)
STEP=(--device cuda --configs dpo_ours,dpo_trl,grpo_ours,grpo_ours_fused,grpo_trl)
if [[ $DRY == 1 ]]; then
  CASE=(--n 48 --d 32 --vocab 1001 --dtype fp32 --device cpu --threads 1)
  SIZES=(--ns 32,64 --vocabs 301,1001 --d 16 --dtype fp32 --device cpu)
  STEP=(--device cpu --tiny)
fi
MAIN_IMPLS=${GPU_SUITE_MAIN_IMPLS:-naive,trl_chunked,ours_chunked,ours_triton,ours_triton@+tiles,ours_fused_loss,ours_fused_loss_chunked,liger,liger_scaled,liger_scaled_fallback}
stage ceilings 60 20 python3 scripts/gpu/ceilings.py --out "$OUT/ceilings.json"
stage main 200 90 python3 scripts/bench_head.py "${CASE[@]}" --verbose --impls "$MAIN_IMPLS" \
  --check-sampled 128 --check-tokens 32 --repeats 7 --warmup 1 --memory fwdbwd --out "$OUT/main"
stage profile 90 40 python3 scripts/gpu/profile_head.py --n 16384 --d 4096 --vocab 151936 --dtype bf16 \
  --impls ours_triton,trl_chunked,ours_fused_loss --rounds 2 --out "$OUT/profile"
stage tests 80 40 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_triton_linear.py \
  tests/ops/test_triton_logits.py tests/ops/test_fused_loss.py
if command -v compute-sanitizer > /dev/null; then
  # the caching allocator pools small tensors in big blocks, which hides small out-of-bounds accesses from memcheck
  stage sanitizer 60 30 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/gpu/sanitize_kernels.py
else
  echo "== sanitizer: compute-sanitizer not on PATH" | tee -a "$SUMMARY"
fi
stage e2e 110 70 python3 scripts/bench_step.py "${STEP[@]}" --out "$OUT/e2e"
stage sizes 130 60 python3 scripts/bench_sizes.py "${SIZES[@]}" --impls trl_chunked,ours_triton,ours_triton@+tiles,ours_fused_loss,liger \
  --repeats 3 --warmup 1 --memory off --out "$OUT/sizes"
stage tune 90 50 python3 scripts/bench_head.py "${CASE[@]}" --verbose --memory off --repeats 5 --warmup 1 --check-tokens 16 \
  --impls ours_triton,ours_triton@+buf96,ours_triton@+buf448,ours_triton@+tiles,ours_triton@128x128x64w8s4,ours_triton@128x256x64w8s3,ours_triton@256x128x64w8s3,ours_fused_loss,ours_fused_loss@2048,ours_fused_loss@4096,ours_fused_loss@8192 \
  --out "$OUT/tune"

echo
echo "######## summary ($(( $(date +%s) - T0 ))s)"
cat "$SUMMARY"
[[ -f "$OUT/ceilings.log" ]] && tail -n 4 "$OUT/ceilings.log"
for f in "$OUT"/main/*.md "$OUT"/tune/*.md; do [[ -f $f ]] && sed -n '/^| impl | check/,/^$/p' "$f" | cut -c1-220; done
[[ -f "$OUT/sizes/sizes.md" ]] && cat "$OUT/sizes/sizes.md"
for f in "$OUT"/e2e/*.md; do [[ -f $f ]] && head -n 40 "$f"; done
pack
exit 0
