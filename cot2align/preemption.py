"""Stop at a step boundary when the job is about to be preempted or to time out.

Slurm (`#SBATCH --signal=USR2@<delay>`, which submitit sets) and submitit's local
executor send SIGUSR2 to EVERY task shortly before a time-out or a preemption.
submitit's own handler checkpoints and requeues at once on global rank 0 — in the
served runtime a teacher rank, mid-schedule, while the students hold the state worth
saving. So each rank replaces that handler with `StopRequest.record`, which only sets
a flag, and keeps submitit's handler for later:

1. the students poll the flag after every step (agreeing over the student group, so
   they all stop after the same step), checkpoint, tell their teacher replica (STOP),
   and return with `TrainResult.interrupted`;
2. the teacher ranks leave their schedule at the next micro-batch and return with
   `ServeStats.stopped_at`;
3. after `run_rank` has returned (the world is torn down), global rank 0 calls the
   kept submitit handler, which calls `RankTask.checkpoint()` and requeues the job; the
   requeued job resumes from `<run_dir>/checkpoints/latest`.

A signal that arrives after the last step changes nothing: the run just finishes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any] | int | None


class StopRequest:
    """A flag set by a signal handler; read at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Handler] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def record(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler: remember the signal, do nothing else (async-signal-safe enough)."""
        self.signum = signum

    def install(self, signums: tuple[int, ...] = (signal.SIGUSR2,)) -> None:
        """Route `signums` to `record`, keeping the handlers they had (e.g. submitit's)."""
        for s in signums:
            self.previous[s] = signal.signal(s, self.record)

    def chain(self) -> None:
        """Run the kept handler of the recorded signal, SIGUSR2 if none was (submitit's handler:
        checkpoint() and requeue). Usually does not return (it exits the process)."""
        signum = self.signum if self.signum is not None else int(signal.SIGUSR2)
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)

    def reset(self) -> None:
        """Forget the recorded signal and restore the kept handlers (tests, in-process reuse)."""
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self.previous.clear()
        self.signum = None


stop_request = StopRequest()
"""The process's stop flag (installed by `cot2align.launch.submit.RankTask`)."""


def stopped_early(result: Any) -> bool:
    """Whether a rank's result (`TrainResult` on students, `ServeStats` on teachers) says the world
    stopped before the last step."""
    return bool(getattr(result, "interrupted", False) or getattr(result, "stopped_at", None) is not None)
