#!/usr/bin/env bash
# The GPU check in one run (a few minutes on an H100/H200): CUDA greedy parity with
# Transformers, the seed's table and the 256-request throughput workload on SmolLM2's
# shape and on a ~1B Llama (random weights, bf16), the engine's per-step overhead, the
# decode-attention kernels, quantized weights and the fp8 KV cache (bench/quant.py), then
# parity of every model family (windows, soft-caps, the Triton fused MoE).
#   bash bench/gpu.sh [OUTDIR]      results and logs under OUTDIR (default out/gpu)
#   bash bench/gpu.sh --dry-run     the same steps at toy sizes, on whatever device is here
#   SHAPES="qwen3-1b mixtral-small" bash bench/gpu.sh   other models' throughput
set -u
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-out/gpu}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
quick=()
[ $dry = 1 ] && quick=(--quick)

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, go on if it fails
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "exit $? ($name)"
    tail -n 30 "$out/$name.log"
}

if [ $dry = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    step parity 80 "$py" bench/gpu_parity.py --families none
fi
# Transformers' batch-size sweep runs the whole workload once per size: two sizes keep
# each shape within its limit (a GPU session has 15 minutes in all).
sweep=(--hf-batches 64,256 --workload-repeats 1)
[ $dry = 1 ] && sweep=()
# SHAPES picks the throughput models, e.g. SHAPES="qwen3-1b mixtral-small" for issue 15's.
for shape in ${SHAPES:-smollm2 llama-1b}; do
    step "throughput-$shape" 240 "$py" bench/throughput.py --random-model "$shape" --repeats 1 \
        --dtype bfloat16 "${sweep[@]}" "${quick[@]}" --out "$out/throughput-$shape.md"
done
# Issue 16: bf16 vs fp8/int8 weights vs an fp8 KV cache (and TP=2 on two GPUs) on a ~1B
# Qwen3, and the quantized GEMM kernels against bf16 at decode batch sizes.
if [ $dry = 1 ]; then
    step quant 120 "$py" bench/quant.py --random-model tiny --quick --out "$out/quant.md"
else
    step quant 240 "$py" bench/quant.py --random-model qwen3-1b --out "$out/quant.md"
fi
step step-overhead 90 "$py" bench/step_overhead.py --device "${DEVICE:-auto}" "${quick[@]}" \
    --out "$out/step-overhead.txt"
if [ $dry = 0 ] && [ "${KERNELS:-0}" = 1 ]; then
    step kernels 90 "$py" bench/kernels.py --out "$out/kernels.md"
fi
if [ $dry = 0 ]; then
    step families-parity 180 "$py" bench/gpu_parity.py --families all --prompts 4
fi
for md in "$out"/throughput-*.md; do
    [ -f "$md" ] && "$py" bench/plot.py "$md" -o "${md%.md}.png"
done
echo "== tables"
cat "$out"/*.md "$out"/*.txt 2>/dev/null
