#!/usr/bin/env bash
# Install (CPU torch pinned, Slurm from apt), prepare offline test assets, lint, type-check, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e '.[dev]'
# A real Slurm for tests/launch/test_slurm.py (its fixture starts a 4-node local cluster, slurm/local-cluster.sh,
# and stops it); without root or the packages those tests are skipped with the reason.
if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; } \
    || echo "warning: could not install slurm-wlm and munge: the slurm tests will be skipped" >&2
fi
python scripts/prepare_test_assets.py
ruff check cot2align launcher tests bench scripts
mypy cot2align launcher
python -m pytest -q --durations=15
