#!/usr/bin/env bash
# A GPU run in one command, sized for one H100 or H200 and under 9 minutes (the step budgets below add up
# to 520 s; a step still running at its budget is stopped, and killed 5 s later: at most 540 s in all):
#   environment   the device and the versions of torch, CUDA, cuDNN, triton       -> environment.json
#   tests         tests/gpu/: the Triton kernels against SDPA in every dtype, every tile configuration,
#                 a model with lightning_fa2 against sdpa, QLoRA through bitsandbytes' CUDA kernels,
#                 fp16-mixed with the precision plugin                             -> tests.json
#   attention     the kernels' tuned tiles and TFLOP/s, forward and forward+backward, against SDPA's flash
#                 and cuDNN backends: seq 1k-16k, head dims 64 and 128, bf16, causal and full
#                                                                                   -> attention.json, .png
#   mfu           MFU of llama-124m and llama-1b in bf16, sdpa vs lightning_fa2, eager and compiled
#                 (PretrainModule(compile=True), where this checkout has it)         -> mfu.json, .png
# A step that fails or runs out of time is reported with its error and the next one runs; the summary
# table (and summary.json) says which, and the exit status is 1 if any failed. Each step's output is also
# kept in <step>.log beside the results.
#
#   benchmarks/gpu.sh                 # on the GPU: results in benchmarks/results/gpu/
#   benchmarks/gpu.sh --dry-run       # the same steps on the CPU with tiny shapes (the kernels under Triton's
#                                     # interpreter), results in a new temporary folder, not benchmarks/results
#   benchmarks/gpu.sh --out DIR       # results in DIR
# The Python that runs the steps is $PYTHON (default: python).

set -u -o pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) [ $# -ge 2 ] || { echo "--out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "unknown argument '$1': expected --dry-run, --out DIR or --help" >&2; exit 2 ;;
    esac
    shift
done

PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY_RUN" = 1 ]; then
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/lightning-llm-gpu-dry-run.XXXXXX")}
    # The kernels run under Triton's interpreter; it must be on before anything imports triton.
    export TRITON_INTERPRET=1 LIGHTNING_LLM_GPU_DRY_RUN=1
    BUDGETS=(environment=300 tests=600 attention=300 mfu=900)
    ATTENTION=(--seqlens 33 64 --head-dims 64 --batch 1 --batch-heads 2 --repeats 1 --rounds 1)
    MFU=(--models tiny --block-size 32 --tokens-per-step 64 --steps 3 --warmup 1 --rounds 1)
else
    OUT=${OUT:-benchmarks/results/gpu}
    BUDGETS=(environment=20 tests=190 attention=100 mfu=210)
    ATTENTION=(--seqlens 1024 2048 4096 8192 16384 --head-dims 64 128 --total-tokens 16384 --model-dim 2048
               --dtype bfloat16 --repeats 5 --rounds 3)
    MFU=(--models llama-124m llama-1b --block-size 2048 --tokens-per-step 8192 --steps 6 --warmup 2 --rounds 3)
fi
mkdir -p "$OUT" || exit 2
echo "results in $OUT"

budget() {  # budget NAME: the step's seconds
    local entry
    for entry in "${BUDGETS[@]}"; do
        [ "${entry%%=*}" = "$1" ] && { echo "${entry#*=}"; return; }
    done
}

NAMES=() STATUSES=() SECONDS_TAKEN=() ERRORS=()
RUN_START=$(date +%s.%N)

step() {  # step NAME COMMAND...: run it under its budget, log it, record how it went
    local name=$1 limit
    shift
    limit=$(budget "$name")
    echo
    echo "=== $name (budget ${limit} s) ==="
    local start rc elapsed status error=""
    start=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" = 0 ]; then
        status=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=failed
        error="ran out of its ${limit} s budget (exit $rc)"
    else
        status=failed
        error="exit status $rc: $(grep -E 'Error|error|FAILED|Traceback' "$OUT/$name.log" | tail -n 1 | cut -c1-300)"
    fi
    [ "$status" = failed ] && echo "!!! step $name failed: $error (its output: $OUT/$name.log)"
    echo "=== $name: $status in ${elapsed} s (total so far $(awk -v a="$RUN_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s) ==="
    NAMES+=("$name") STATUSES+=("$status") SECONDS_TAKEN+=("$elapsed") ERRORS+=("$error")
}

# Written atomically, as every result: a temporary sibling, flushed to disk, renamed.
step environment bash -c 'tmp=$(mktemp "$1.XXXXXX") && trap "rm -f \"$tmp\"" EXIT &&
    "$0" benchmarks/record.py > "$tmp" && sync "$tmp" && mv "$tmp" "$1" && cat "$1"' "$PYTHON" "$OUT/environment.json"
step tests env LIGHTNING_LLM_GPU_REPORT="$OUT/tests.json" \
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/gpu
step attention "$PYTHON" benchmarks/attention.py "${ATTENTION[@]}" --impls lightning_fa2 sdpa sdpa_cudnn \
    --no-gpt2-medium --out "$OUT/attention.json"
step mfu "$PYTHON" benchmarks/mfu.py "${MFU[@]}" --out "$OUT/mfu.json"

TOTAL=$(awk -v a="$RUN_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
FAILED=0
echo
echo "=== summary ($OUT) ==="
printf '%-14s%-8s%10s%10s  %s\n' step status seconds budget error
JSON="{\"dry_run\": $([ "$DRY_RUN" = 1 ] && echo true || echo false), \"total_seconds\": $TOTAL, \"steps\": ["
for i in "${!NAMES[@]}"; do
    printf '%-14s%-8s%10s%10s  %s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${SECONDS_TAKEN[$i]}" "$(budget "${NAMES[$i]}")" "${ERRORS[$i]}"
    [ "${STATUSES[$i]}" = ok ] || FAILED=1
    error=$(printf '%s' "${ERRORS[$i]}" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\000-\037')
    JSON+="$([ "$i" = 0 ] || echo ", "){\"step\": \"${NAMES[$i]}\", \"status\": \"${STATUSES[$i]}\", \"seconds\": ${SECONDS_TAKEN[$i]}, \"budget_seconds\": $(budget "${NAMES[$i]}"), \"error\": \"$error\"}"
done
JSON+="]}"
printf '%-14s%-8s%10s\n' total "$([ $FAILED = 0 ] && echo ok || echo failed)" "$TOTAL"
TMP=$(mktemp "$OUT/summary.json.XXXXXX") && printf '%s\n' "$JSON" > "$TMP" && sync "$TMP" && mv "$TMP" "$OUT/summary.json"
echo "results in $OUT"
exit $FAILED
