"""A stand-in supervisor for tests of `exit_with_supervisor`: spawns `n` ranks with
`supervised`, as `launch_local` does; each writes its pid to <out>/rank<r>.pid and then blocks
(as a rank blocked in training or a collective would). Also the /proc helpers of those tests.

    python tests/supervised.py OUT N
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

from cot2align.distributed.spawn import supervised


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, dead but not yet reaped, does not). Linux (/proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], within_s: float) -> list[int]:
    """The pids still alive after up to `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_main(rank: int, out: str) -> None:
    """One rank: announce, block."""
    (Path(out) / f"rank{rank}.pid").write_text(str(os.getpid()))
    while True:
        time.sleep(1000)


def main(out: str, n: int) -> None:
    with supervised(mp.get_context("spawn"), rank_main, [(r, out) for r in range(n)]) as procs:
        (Path(out) / "supervisor.pid").write_text(str(os.getpid()))
        for p in procs:
            p.join()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
