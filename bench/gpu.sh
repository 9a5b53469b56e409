#!/usr/bin/env bash
# The GPU path in one script (< 8 min on one GPU): OT engine on CUDA vs the reference loop,
# bf16 vs fp32 of every loss, a colocated distillation under bf16 autocast vs the CPU fp32 run,
# the megatron teacher (tp 1) vs HF logits, peak GPU memory of each; prints one table
# (details: bench/gpu.py). Without a GPU it says so and exits 0.
#
#   bash bench/gpu.sh                        # on a GPU machine
#   bash bench/gpu.sh --device cpu --quick   # every section on CPU, small sizes (checks the script)
#   bash bench/gpu.sh --out bench/results/gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --device cpu "* ]] && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing run."
  echo "Run it on a GPU machine, or check the script on CPU with: bash bench/gpu.sh --device cpu --quick"
  exit 0
fi
exec timeout "${GPU_BENCH_TIMEOUT:-480}" python bench/gpu.py "$@"
