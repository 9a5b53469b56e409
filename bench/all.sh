#!/usr/bin/env bash
# Every benchmark in one run, one after the other (they must not share the 2 cores), and one
# markdown file with all their tables: bench/results/all.md (each bench also writes its JSON).
#
#   bash bench/all.sh            # ~15 min on the 2-core CPU when quiet
#   QUICK=1 bash bench/all.sh    # small sizes (smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/all.md
quick=()
[[ "${QUICK:-0}" == 1 ]] && quick=(--quick)
{
  echo "# cot2align benchmarks ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "machine: $(nproc) cores, $(python -c 'import platform; print(platform.processor() or platform.machine())'),"\
       "torch $(python -c 'import torch; print(torch.__version__)'), load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "## Losses and the OT engine (bench/losses.py)"
  echo
  python bench/losses.py "${quick[@]}"
  echo
  echo "## Runtime: served vs colocated, overlap, wire bytes, teacher-rank memory (bench/runtime.py)"
  echo
  python bench/runtime.py
  echo
  echo "## Student step efficiency and OT share (bench/efficiency.py)"
  echo
  python bench/efficiency.py
  echo
  echo "## Planner: the 70B preset on 8 nodes x 8 GPUs (cot2align plan)"
  echo
  python launcher/submit.py --dry-run --config configs/llama70b-to-1b-8nodes.yaml | sed -n '/^# Plan/,/^# sbatch/p' | sed '$d'
  echo
  echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>/dev/null | grep --line-buffered -v "real_accelerator.py" | tee "$OUT"
echo "wrote $OUT"
