"""Run a function on every rank of a small torch.distributed world (for multi-process tests).

    results = run_distributed(fn, 4, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on 4 ranks

The one multi-process harness of the tests, on top of the package's own local world
(`cot2align.distributed.spawn.spawn_world`): spawned processes, so `fn` and its arguments must
be picklable (a module-level function). A failure on any rank raises `WorldError` naming every
failed rank with its traceback; ranks still running (e.g. blocked in a collective with the
failed rank) are killed after `grace_s`. The whole run is bounded by `timeout_s`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from cot2align.distributed.failures import start_heartbeat, stop_heartbeat
from cot2align.distributed.spawn import spawn_world


def _rank(call: tuple[Callable[..., Any], tuple[Any, ...], str, float]) -> Any:
    fn, args, backend, timeout_s = call
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    start_heartbeat(rank)
    try:
        result = fn(rank, world, *args)
        dist.barrier()  # nobody tears down the store (hosted by rank 0) while others still use it
        return result
    finally:
        stop_heartbeat()
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo",
                    timeout_s: float = 300.0, grace_s: float = 10.0) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks; return results by rank."""
    return spawn_world(_rank, (fn, args, backend, timeout_s), world_size, essential=range(world_size),
                       grace_s=grace_s, timeout_s=timeout_s)
