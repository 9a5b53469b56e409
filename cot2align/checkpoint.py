"""Atomic checkpoints of everything that has state, and exact resume.

Layout: <run_dir>/checkpoints/step_<N>/state.pt, plus <run_dir>/checkpoints/latest
(a text file naming the newest complete step). A step folder is written under a
temporary name and renamed only when complete, so a crash mid-save never leaves a
checkpoint that resume would load.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write state to checkpoints/step_<step> atomically; keep the newest `keep` steps."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with (tmp / "state.pt").open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    latest_tmp.replace(root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else (a crash between renames) the newest complete step
    folder, or None. Half-written `.tmp_step_*` folders are never candidates."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "state.pt").is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if (p / "state.pt").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint folder's state (CPU tensors)."""
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
