#!/usr/bin/env bash
# One lent-GPU session for the decoding, caching, memory and evaluation issues, most important first. Each
# step has its own time limit so one slow compile cannot starve the rest; results land in ${OUT}.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" python3 "$@" 2>&1 | grep -v -E "^W[0-9]{4}|rematerialization" | tail -14; }
step 150 benchmarks/decode_throughput.py --model llada-8b --batch 1 --prompt-len 256 --gen-len 256 --block 32 \
    --cache none,dual,prefix --strategies planner,threshold --max-iterations 16 --repeats 2 \
    --out "$OUT/decode_llada-8b_b1_h200.json"
step 120 benchmarks/decode_throughput.py --model llada-8b --batch 32 --prompt-len 256 --gen-len 256 --block 32 \
    --cache none,dual --strategies planner --max-iterations 8 --repeats 1 --out "$OUT/decode_llada-8b_b32_h200.json"
step 90 benchmarks/gpu_memory_check.py --out "$OUT"
step 150 benchmarks/throughput.py --model llada-8b --batches 1,8,32 --prompt-len 256 --gen-len 256 --block 32,128 \
    --strategies planner --max-iterations 8 --repeats 1 --iters 5 --out "$OUT/throughput_llada-8b_h200.json"
