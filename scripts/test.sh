#!/usr/bin/env bash
# Install (CPU torch pinned), prepare offline test assets, lint, type-check, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e '.[dev]'
python scripts/prepare_test_assets.py
ruff check cot2align launcher tests bench scripts
mypy cot2align launcher
python -m pytest -q
