#!/usr/bin/env bash
# The foundation issue's GPU check, as one script for a lent H100/H200: bf16 LLaDA-8B forward vs roofline,
# and the fp32 golden-parity tests on the GPU. Writes into ${OUT:-benchmarks/results}.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 benchmarks/forward_throughput.py --model llada-8b --batch 1 --seq-len 512 --impls auto,xla,cudnn \
    --out "$OUT/forward_llada-8b_b1_l512_gpu.json"
python3 benchmarks/forward_throughput.py --model llada-8b --batch 8 --seq-len 512 --impls auto,xla \
    --out "$OUT/forward_llada-8b_b8_l512_gpu.json"
JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -p no:cacheprovider tests/test_golden.py tests/test_layers.py \
    2>&1 | tail -5
