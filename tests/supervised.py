"""A stand-in supervisor for tests of `exit_with_supervisor`: spawns `n` ranks with
`supervised`, as `launch_local` does; each writes its pid to <out>/rank<r>.pid and then blocks
(as a rank blocked in training or a collective would).

    python tests/supervised.py OUT N
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

from cot2align.runtime import supervised


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
