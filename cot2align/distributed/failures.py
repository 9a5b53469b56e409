"""Who failed: check-ins, heartbeats and blame, through the world's rendezvous store.

When a rank dies, every peer that talks to it sees an error, and so do peers blocked on those
peers. To name the one at fault, each rank that fails knowingly checks in with its reason
(`check_in`, `silent_peers`), and each rank counts a heartbeat from a thread of its own
(`start_heartbeat`). A rank whose collective failed waits for its peers' check-ins, then names
the silent peers whose heartbeat stopped (they died), else the peers that failed by themselves
(a missing file, out of memory), else those that named their own culprit, else the silent peers
whose heartbeat goes on (they are stuck). A silent peer that is alive is usually busy elsewhere
(evaluating while the others wait for it) or blocked on the very rank that is deciding; it is
not blamed while a cause is found.

The store lives in global rank 0, which keeps it up while others may still read it (`hold_store`).
Store traffic: one counter increment per rank per `HEARTBEAT_S`, on a connection of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch.distributed as dist


class PeerError(RuntimeError):
    """A peer sent nothing before the deadline, closed its connection, or reported a failure."""


class PeerDied(PeerError):
    """Peers of a failed collective did not answer afterwards: they died, or are stuck; `ranks` names them."""

    def __init__(self, ranks: list[int], message: str) -> None:
        self.ranks = ranks
        super().__init__(message)


class DesyncError(RuntimeError):
    """A message does not match what the receiver expected (other step, samples or lengths)."""


CHECK_IN_KEY = "cot2align/after_failure/"
FAILURES_KEY = "cot2align/failures"
EXIT_KEY = "cot2align/exit/"
ALIVE_KEY = "cot2align/alive/"
BLAME_WAIT_S = 10.0
"""How long a rank whose collective failed waits for its peers to check in before naming the silent ones."""
HEARTBEAT_S = 1.0
"""Period of each rank's heartbeat; a silent peer is judged alive when its count grew over 2.5 periods."""

_heartbeat_stop: threading.Event | None = None


Kind = Literal["own", "names", "symptom"]


class CheckIn(NamedTuple):
    """What a failing rank said: its error, and what kind it is: "own" (it failed by itself: the
    cause), "names" (it names the peer at fault) or "symptom" (a collective failed, cause unknown)."""

    reason: str
    kind: Kind


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is how a collective or point-to-point operation failed (a closed connection,
    a timeout: a symptom of a peer's failure), not a failure of this rank itself."""
    return type(error) is RuntimeError or isinstance(error, dist.DistError)


def _reason(error: BaseException) -> str:
    """'Type: first line of the message' (the type alone for an empty message)."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0][:400]}" if text else type(error).__name__


def _say(store: Any, rank: int, error: BaseException) -> None:
    kind: Kind = ("names" if isinstance(error, (PeerError, DesyncError)) else
            "symptom" if is_collective_failure(error) else "own")
    store.set(f"{CHECK_IN_KEY}{rank}", f"{kind}:{_reason(error)}")
    store.add(FAILURES_KEY, 1)


def _heard(store: Any, rank: int) -> CheckIn:
    kind, _, reason = store.get(f"{CHECK_IN_KEY}{rank}").decode(errors="replace").partition(":")
    return CheckIn(reason, cast(Kind, kind))


def _beats(store: Any, rank: int) -> int:
    return int(store.add(f"{ALIVE_KEY}{rank}", 0))


def start_heartbeat(rank: int, period_s: float = HEARTBEAT_S) -> None:
    """Count `rank`'s heartbeat in the rendezvous store every `period_s`, from a daemon thread on a
    connection of its own (a store call of the main thread blocks nothing here). It stops with the
    process, when the store goes, or when this is called again (a new world)."""
    global _heartbeat_stop
    stop_heartbeat()
    stop = _heartbeat_stop = threading.Event()
    store = dist.distributed_c10d._get_default_store()
    try:
        store = store.clone()  # type: ignore[attr-defined]  # (missing from torch's stubs)
    except Exception:  # a store without clone (FileStore) shares the main thread's
        pass

    def beat() -> None:
        try:
            while not stop.is_set():
                store.add(f"{ALIVE_KEY}{rank}", 1)
                stop.wait(period_s)
        except Exception:  # the store (in rank 0) is gone: nobody is left to tell
            return

    threading.Thread(target=beat, name=f"heartbeat-{rank}", daemon=True).start()


def stop_heartbeat() -> None:
    """Stop this process's heartbeat (its world is closing)."""
    if _heartbeat_stop is not None:
        _heartbeat_stop.set()


def check_in(rank: int, error: BaseException) -> None:
    """Record in the world's rendezvous store that `rank` fails knowingly, with `error` (best effort)."""
    try:
        _say(dist.distributed_c10d._get_default_store(), rank, error)
    except Exception:  # no world, or the store (on global rank 0's node) is gone
        pass


def check_out(rank: int) -> None:
    """Record in the rendezvous store that `rank` is done (it no longer reads the store; best effort)."""
    try:
        dist.distributed_c10d._get_default_store().set(f"{EXIT_KEY}{rank}", "")
    except Exception:
        pass


def hold_store(world_size: int, dead: Sequence[int], wait_s: float, until_a_failure: bool = False,
               poll_s: float = 0.2) -> list[int]:
    """On global rank 0, which hosts the rendezvous store: keep it (and so every check-in that names
    a culprit) up until every rank but the known `dead` has checked out, at most `wait_s`; with
    `until_a_failure`, without limit while no rank has checked in as failing, then `wait_s` more.

    Without this, a peer still deciding whom to blame (`silent_peers`) would find the store gone
    and blame rank 0, or, when rank 0 is not in its group, every peer. Rank 0 holds it when it fails,
    and (`until_a_failure`) when its own part ends while other ranks work on: a teacher rank whose
    replica served its last step. A rank that dies without a word while no other has failed is the
    launcher's to reap (srun --kill-on-bad-exit, `spawn_world`'s grace). Returns the ranks that
    never checked out.
    """
    waiting = [r for r in range(1, world_size) if r not in dead]
    try:
        store = dist.distributed_c10d._get_default_store()
        keys = [f"{EXIT_KEY}{r}" for r in waiting]
        deadline = float("inf") if until_a_failure else time.monotonic() + wait_s
        while keys and not store.check(keys) and time.monotonic() < deadline:
            if deadline == float("inf") and store.add(FAILURES_KEY, 0) > 0:
                deadline = time.monotonic() + wait_s
            time.sleep(poll_s)
        return [r for r in waiting if not store.check([f"{EXIT_KEY}{r}"])]
    except Exception:
        return waiting


def silent_peers(group: Sequence[int], rank: int, error: BaseException, wait_s: float = BLAME_WAIT_S
                  ) -> tuple[list[int], list[int], dict[int, CheckIn]]:
    """After a collective over `group` failed on `rank` with `error`: (the peers that never checked
    in within `wait_s` and whose heartbeat stopped, those that never checked in but are alive, what
    the others said). Checks `rank` in first.

    Liveness is judged over at least 2.5 heartbeat periods. When the store itself is gone (it lives
    in global rank 0), rank 0 is the dead one, or every peer when rank 0 is not among them.
    """
    peers = [r for r in group if r != rank]
    try:
        store = dist.distributed_c10d._get_default_store()
        _say(store, rank, error)
        started = time.monotonic()
        beats = {r: _beats(store, r) for r in peers}
        while True:
            silent = [r for r in peers if not store.check([f"{CHECK_IN_KEY}{r}"])]
            if not silent or time.monotonic() > started + wait_s:
                break
            time.sleep(0.1)
        said = {r: _heard(store, r) for r in peers if r not in silent}
        if silent:
            time.sleep(max(0.0, started + 2.5 * HEARTBEAT_S - time.monotonic()))
        alive = [r for r in silent if _beats(store, r) > beats[r]]
        return [r for r in silent if r not in alive], alive, said
    except Exception:  # the store (in rank 0) is unreachable: rank 0 is among the dead
        return ([0] if 0 in peers else peers), [], {}


def blame(error: Exception, group: Sequence[int], rank: int, describe: Callable[[int], str],
          wait_s: float = BLAME_WAIT_S) -> Exception:
    """`error` of a collective over `group`, naming the peer at fault: `PeerDied` when peers died,
    a PeerError quoting the peers that failed by themselves, else those naming their own culprit,
    `PeerDied` naming the peers that are alive but stuck, else `error` itself.

    Any other error (this rank's own failure, or one that names its peer already: PeerError,
    DesyncError) is checked in, for the peers, and returned unchanged.
    """
    if not is_collective_failure(error) or len(group) < 2:
        check_in(rank, error)
        return error
    dead, stuck, said = silent_peers(group, rank, error, wait_s)
    context = f"within {wait_s:.0f} s after a collective of {describe(rank)} with it failed ({_reason(error)})"
    kind = "own" if any(heard.kind == "own" for heard in said.values()) else "names"
    named = {r: heard.reason for r, heard in said.items() if heard.kind == kind}
    if dead:
        verdict: Exception = PeerDied(dead, f"{', '.join(describe(r) for r in dead)} died or hangs: no word "
                                            f"from it {context}; see its log")
    elif named:
        return PeerError(f"a collective of {describe(rank)} failed ({_reason(error)}) because "
                         + "; ".join(f"{describe(r)} failed first: {why}" for r, why in sorted(named.items())))
    elif stuck:
        verdict = PeerDied(stuck, f"{', '.join(describe(r) for r in stuck)} is stuck: alive, but no word from it "
                                  f"{context}; see its log")
    else:
        return error
    check_in(rank, verdict)
    return verdict
