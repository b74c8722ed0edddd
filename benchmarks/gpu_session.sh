#!/usr/bin/env bash
# One lent-GPU session (<= 8 minutes on one H200) re-measuring every accelerator decoding figure at HEAD:
#   1. forward B=1 and B=8, L=512 (bf16 LLaDA-8B widths, random weights) against the roofline
#   2. decode none/prefix/dual x planner/threshold at block 32 and 128, B=1 and B=32, whole generations
#      (no iteration cap), unrolled layer loop: tokens/s and ms/iteration against the weight-read floor
#   3. continuous batching (generate_many over the engine) against sync batches, without a cache and with the
#      per-row dual cache
#   4. one XLA dump of a cached (dual) iteration, for reading what it moves
# Each step has its own time limit so one slow compile cannot starve the rest. Results go to $OUT (default
# benchmarks/results); copy them into benchmarks/results/ and commit. `--smoke` runs the same steps at tiny
# shapes on any backend (CPU included) to check the script end to end; its JSON goes to $OUT/smoke/.
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=.
if [ "$SMOKE" = 1 ]; then
    OUT="$OUT/smoke"; MODEL=cpu; FWD=tiny; P=16; G=16; BLOCKS="8"; BATCHES="1 2"; L=64; CB_PROMPTS=8; T=10  # shared CPU: generous limits
else
    MODEL=llada-8b; FWD=llada-8b; P=256; G=256; BLOCKS="32 128"; BATCHES="1 32"; L=512; CB_PROMPTS=64; T=1
fi
mkdir -p "$OUT"
TAG=$( [ "$SMOKE" = 1 ] && echo smoke || echo h200 )
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
step() { local limit=$1; shift; echo "== $*"; local s=$SECONDS
         timeout "$limit" python3 "$@" 2>&1 | grep -v -E "^W[0-9]{4}|rematerialization" | tail -16
         echo "   (${SECONDS}s total, step $((SECONDS - s))s)"; }

# Budget on the H200 (limits, the most each step may take): forward 2 x 45 s, decoding 2 x (90 + 55) s,
# continuous batching 50 s, dump 40 s: 470 s plus start-up. A step that hits its limit writes no JSON.
# 1. forward
for B in 1 8; do
    step $((45 * T)) benchmarks/forward_throughput.py --model "$FWD" --batch "$B" --seq-len "$L" --impls auto \
        --iters 5 --out "$OUT/forward_${FWD}_b${B}_l${L}_${TAG}.json"
done
# 2. decoding: B=1 planner and threshold; B=32 the planner only (its whole generations fit; random-weight
#    threshold decoding reveals ~1 token per iteration, G iterations of B=32 would not). At B=1 the dual
#    planner's refresh and cached iteration are also timed bare: the loop's fixed cost per iteration on the GPU
for BL in $BLOCKS; do
    for B in $BATCHES; do
        if [ "$B" = 1 ]; then STRATS=planner,threshold; LIM=90; BARE=""; else STRATS=planner; LIM=55; BARE=--skip-bare; fi
        step $((LIM * T)) benchmarks/decode_throughput.py --model "$MODEL" --batch "$B" --prompt-len "$P" \
            --gen-len "$G" --block "$BL" --cache none,prefix,dual --strategies "$STRATS" --rounds 1 \
            --layer-loop unrolled $BARE --out "$OUT/decode_${MODEL}_b${B}_block${BL}_${TAG}.json"
    done
done
# 3. continuous batching vs sync batches, no cache and the per-row dual cache
step $((50 * T)) benchmarks/continuous_batching.py --model "$MODEL" --prompts "$CB_PROMPTS" --gen-len "$G" \
    --block "${BLOCKS%% *}" --slots 8 --cache none,dual --out "$OUT/continuous_batching_${MODEL}_${TAG}.json"
# 4. XLA dump of the cached dual iteration (compile only)
DUMP="$OUT/xla_dump_cached_iteration"
export XLA_FLAGS="--xla_dump_to=$DUMP --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*cached.*"
step $((40 * T)) benchmarks/decode_bytes.py --model "$MODEL" --batch 1 --modes dual --prompt "$P" \
    --gen "$G" --block-length "${BLOCKS%% *}" --layers 1,2
unset XLA_FLAGS
ls "$DUMP" 2>/dev/null | grep -c "after_optimizations.txt" | sed 's/^/   HLO modules dumped: /'
echo "== done in ${SECONDS}s; results in $OUT"
