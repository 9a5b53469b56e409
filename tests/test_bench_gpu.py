"""bench/gpu.sh: without a GPU it says so and exits 0 (CI has none); its CPU mode runs every
section (a check that the script is not broken before it first meets a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU on this machine" in out.stdout and "|" not in out.stdout  # no table: nothing ran


@pytest.mark.slow
def test_cpu_mode_runs_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--quick", "--out",
                          str(tmp_path / "gpu.json")], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert {"ot", "colocated", "megatron", "loss cot2align", "loss sft"} <= sections
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
