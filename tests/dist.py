"""Run a function on every rank of a small torch.distributed world (for multi-process tests).

    results = run_distributed(fn, 4, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on 4 ranks

Processes are started with the "spawn" method, so `fn` and its arguments must be
picklable (a module-level function). Each rank's return value is saved with
`torch.save` in a temporary directory and loaded back (list indexed by rank).
An exception on any rank is re-raised in the caller with the rank id and the remote
traceback; ranks still running (e.g. blocked in a collective with the failed rank)
are killed after a short grace period. The whole run is bounded by `timeout_s`.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cot2align.runtime import free_port


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    out_dir: str,
    status: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        result = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears down the store (hosted by rank 0) while others still use it
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        status.put((rank, None))
    except BaseException:
        status.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    grace_s: float = 10.0,
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks; return results by rank.

    Raises RuntimeError naming the first failing rank (with its traceback), or the ranks
    that did not finish within `timeout_s`. After a failure the other ranks get `grace_s`
    seconds to finish before they are killed.
    """
    ctx = mp.get_context("spawn")
    status = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dist_test_") as out_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, backend, timeout_s, out_dir, status, fn, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        done: dict[int, str | None] = {}
        failure: tuple[int, str] | None = None
        try:
            while len(done) < world_size:
                now = time.monotonic()
                if now >= deadline:
                    break
                try:
                    rank, error = status.get(timeout=min(1.0, deadline - now))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                    if dead and failure is None:  # killed without reporting (e.g. segfault, OOM)
                        failure = (dead[0], f"process exited with code {procs[dead[0]].exitcode}")
                        deadline = min(deadline, time.monotonic() + grace_s)
                    continue
                done[rank] = error
                if error is not None and failure is None:
                    failure = (rank, error)
                    deadline = min(deadline, time.monotonic() + grace_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)
        if failure is not None:
            rank, error = failure
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error}")
        missing = [r for r in range(world_size) if r not in done]
        if missing:
            raise RuntimeError(
                f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s (killed)"
            )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
