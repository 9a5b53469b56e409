"""A world of processes on this machine: spawn the ranks, collect their results, fail fast.

    results = spawn_world(target, arg, world=4, essential=[2, 3], grace_s=360)

Every rank runs `target(arg)` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK
set (the same environment a Slurm task exports), so what runs here is what runs on a cluster.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(target: Callable[[Any], Any], arg: Any, rank: int, world: int, port: int, results: Any,
            env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        results.put((rank, target(arg), None))
    except BaseException as e:
        results.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class WorldError(RuntimeError):
    """Ranks of a local world failed; `failures` maps each failed rank to its error."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        lines = [f"{len(failures)} rank(s) failed:"]
        for rank, err in sorted(failures.items()):
            lines.append(f"--- rank {rank}: {err.strip()}")
        super().__init__("\n".join(lines))


def spawn_world(target: Callable[[Any], Any], arg: Any, world: int, essential: Sequence[int], grace_s: float,
                env: dict[str, str] | None = None, timeout_s: float | None = None) -> list[Any]:
    """Run `target(arg)` on `world` spawned processes; return every rank's result, by rank.

    target must be picklable (a module-level function). On a failure the other ranks get `grace_s`
    to report what they saw (or until every rank in `essential` has finished: in a served world, the
    students), then everything still running is killed and `WorldError` lists every failed rank's
    error. timeout_s bounds the whole run (default: none). env: extra environment variables of the
    ranks (fault injection in tests).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(target, arg, r, world, port, results, env or {}), daemon=False)
             for r in range(world)]
    for proc in procs:
        proc.start()
    overall = time.monotonic() + timeout_s if timeout_s else float("inf")
    grace = float("inf")  # after a failure: until the others' own deadlines have passed
    done: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        while len(done) + len(failures) < world and time.monotonic() < min(overall, grace):
            try:
                rank, result, error = results.get(timeout=0.5)
            except queue.Empty:
                for r, proc in enumerate(procs):
                    if r not in done and r not in failures and proc.exitcode not in (None, 0):
                        failures[r] = f"process exited with code {proc.exitcode} without reporting"
                        grace = min(grace, time.monotonic() + grace_s)
                continue
            if error is None:
                done[rank] = result
            else:
                failures[rank] = error
                grace = min(grace, time.monotonic() + grace_s)
            if failures and all(r in done or r in failures for r in essential):
                grace = min(grace, time.monotonic() + 2)  # nothing left worth waiting for
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
        results.close()
        results.join_thread()
    for r in range(world):
        if r not in done and r not in failures:
            failures[r] = "did not finish before the deadline (killed)"
    if failures:
        raise WorldError(failures)
    return [done[r] for r in range(world)]
