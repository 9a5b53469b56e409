"""Atomic checkpoints of everything that has state, and exact resume.

Layout of one step: <run_dir>/checkpoints/step_<N>/ holding `state.pt` (what every rank
shares: whole weights, schedule, RNG, history; written by the first rank), optionally one
`shard_<r>.pt` per student rank (that rank's part of a ZeRO-partitioned optimizer, written
by the rank itself), and `manifest.json`, written LAST, listing every file with its size.
<run_dir>/checkpoints/latest is a text file naming the newest committed step.

A step is written into `.tmp_step_<N>`, the manifest is written and the folder renamed
only once every part is on disk, so a crash mid-save never leaves a folder that resume
would load: a folder without a manifest, or whose files do not match it, is never a
candidate.

Every file is read with `torch.load(weights_only=True)`: tensors, numbers, strings and
plain containers only, so a crafted file in a shared run directory cannot run code; one
that holds anything else is refused with `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cot2align.logging import log

MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT = 2
"""Version of the layout; written into each manifest."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely or does not fit the run."""


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states, as plain types and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {"python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])


def _as_tuples(x: Any) -> Any:
    """random.setstate wants tuples (a state that went through a list-producing round trip)."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def safe_load(file: str | Path, mmap: bool = False) -> Any:
    """torch.load of tensors, numbers, strings and plain containers only (CPU).

    Raises CheckpointError naming the file when it holds any other pickled object (which is
    never constructed), or when it is not a torch file at all."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: refused to load: it holds a pickled object other than tensors, numbers, "
                              f"strings and plain containers ({first}); only load files you trust by other "
                              "means") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable checkpoint file ({e})") from None


def _write(file: Path, obj: Any) -> int:
    """torch.save + fsync; returns the size in bytes."""
    with file.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return file.stat().st_size


def shard_name(rank: int) -> str:
    """File of a student rank's optimizer shard inside a step folder."""
    return f"shard_{rank:05d}.pt"


def _root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _tmp(run_dir: str | Path, step: int) -> Path:
    return _root(run_dir) / f".tmp_step_{step:08d}"


def save_sharded(run_dir: str | Path, step: int, state: dict[str, Any] | None, shard: dict[str, Any] | None,
                 rank: int, size: int, barrier: Callable[[], None], keep: int = 2) -> Path:
    """Collective over `size` ranks (`barrier` synchronises them): rank 0 writes `state`, every
    rank with a `shard` writes it as `shard_<rank>.pt`; rank 0 then commits the manifest (sizes
    of all files, which it reads from the shared folder), renames the folder, points `latest` at
    it and keeps the newest `keep` steps. Returns the step folder."""
    root, tmp = _root(run_dir), _tmp(run_dir, step)
    final = root / f"step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if rank == 0:
        _write(tmp / STATE, state if state is not None else {})
    if shard is not None:
        _write(tmp / shard_name(rank), shard)
    barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT, "step": step, "ranks": size, "files": files}
        with (tmp / MANIFEST).open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        latest_tmp.replace(root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """One process: write state to checkpoints/step_<step> atomically; keep the newest `keep` steps."""
    return save_sharded(run_dir, step, state, None, 0, 1, lambda: None, keep)


def manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a step folder when the folder is complete (every listed file present with
    its size), else None."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        m = json.loads(file.read_text())
        files = m["files"]
    except (ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        part = Path(path) / name
        if not part.is_file() or part.stat().st_size != size:
            return None
    return m  # type: ignore[no-any-return]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, else (a crash between renames) the newest complete step
    folder, or None. Folders without a matching manifest (half-written) are never candidates."""
    root = _root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if manifest(path) is not None:
            return path
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in steps if manifest(p) is not None]
    if len(complete) < len(steps):
        log.warning("%s: step folder(s) without a matching %s (half-written, or from before manifests) are not "
                    "resumed: %s", root, MANIFEST, ", ".join(p.name for p in steps if p not in complete))
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint folder's shared state (CPU tensors); shards: `load_shard`."""
    if manifest(path) is None:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST}, or its files do not match it)")
    state = safe_load(Path(path) / STATE, mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{Path(path) / STATE}: expected a dict, found {type(state).__name__}")
    return state


def load_shard(path: str | Path, rank: int) -> dict[str, Any]:
    """One rank's shard of a checkpoint folder, memory-mapped (only what is read is paged in)."""
    file = Path(path) / shard_name(rank)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (the checkpoint has {manifest(path) or {}!r})")
    out = safe_load(file, mmap=True)
    if not isinstance(out, dict):
        raise CheckpointError(f"{file}: expected a dict, found {type(out).__name__}")
    return out
