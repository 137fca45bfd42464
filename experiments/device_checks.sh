#!/bin/bash
# Issue 17 item 6 on a lent GPU, as one call of the device tool (see BUILD_NOTES.md):
#   run(command="bash experiments/device_checks.sh", carry=[".bench"], timeout_s=560)
# .bench is a copy of ../shared/bench (TRL's harness and its wheels). Results land in $OUT.
# Each step has its own timeout, so one failure leaves time for the rest. At most 8 files come
# back from $OUT: one log plus the six result files.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .bench/wheels/*.whl
# TRL runs in a subprocess with this interpreter (torch + transformers are in the image) and trl
# from /tmp/site; our JAX process leaves it half of the GPU's memory.
export XPO_TORCH_PYTHON=$(command -v python3) XPO_TRL_BENCH=.bench/trl_xpo_round.py
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
PYTHONPATH=.:/tmp/site timeout 280 python3 experiments/bench_round.py --preset qwen2-0.5b --batch 16 \
    --prompt-len 128 --new-tokens 128 --dtype bfloat16 --steps 5 2>&1 | tee -a "$OUT/log.txt"
unset XLA_PYTHON_CLIENT_MEM_FRACTION
timeout 150 python3 experiments/bench_sampler.py --batches 1 --repeats 3 --warmup 1 --skip-hf \
    --gpu-batches 16,64 --tag gpu 2>&1 | tee -a "$OUT/log.txt"
timeout 120 python3 experiments/hbm_backends.py 2>&1 | tee -a "$OUT/log.txt"
cp experiments/results/bench_round_qwen2-0.5b_gpu.* experiments/results/bench_sampler_gpu.* \
   experiments/results/hbm_backends_gpu.* "$OUT"/ 2>/dev/null
ls -la "$OUT"
