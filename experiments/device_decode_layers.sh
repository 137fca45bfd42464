#!/bin/bash
# Scanned against unrolled decoder layers on a lent GPU (the decode-step lead of
# experiments/results/hbm_backends.md), one call of the device tool:
#   run(command="bash experiments/device_decode_layers.sh", timeout_s=560)
# Results land in $OUT (at most 8 files come back). On 2026-12-04 the sampler step needed more
# than 170 s (four compiles); it has 300 now.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
timeout 300 python3 experiments/bench_sampler.py --batches 1 --repeats 3 --warmup 1 --skip-hf \
    --gpu-batches 16,64 --gpu-scan-layers 1,0 --tag gpu_layers 2>&1 | tee "$OUT/sampler_layers.log"
timeout 200 python3 experiments/bench_round.py --preset qwen2-0.5b --batch 16 --prompt-len 128 \
    --new-tokens 128 --dtype bfloat16 --steps 5 --scan-layers 0 --skip-trl --tag unrolled 2>&1 | tee "$OUT/round_unrolled.log"
cp experiments/results/bench_sampler_gpu_layers.* experiments/results/bench_round_qwen2-0.5b_gpu_unrolled.* "$OUT"/
ls "$OUT"
