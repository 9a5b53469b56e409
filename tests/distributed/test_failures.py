"""Who failed: check-ins, heartbeats, blame and the store kept up by rank 0 (cot2align.distributed.failures)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cot2align.distributed.failures import (
    ALIVE_KEY,
    EXIT_KEY,
    HEARTBEAT_S,
    PeerDied,
    PeerError,
    blame,
    check_in,
    hold_store,
    start_heartbeat,
    stop_heartbeat,
)
from cot2align.distributed.spawn import WorldError, spawn_world


def _describe(r: int) -> str:
    return f"teacher rank {r} (tp {r})"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[dist.Store]:
    """The rendezvous store of a one-rank world (the peers' keys are written by hand)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.distributed_c10d._get_default_store()
    finally:
        dist.destroy_process_group()


def _later(store: dist.Store, *keys: str, after_s: float = 0.5) -> None:
    def run() -> None:
        time.sleep(after_s)
        for k in keys:
            store.set(k, "")

    threading.Thread(target=run, daemon=True).start()


def test_rank_0_holds_the_store_until_the_others_check_out(store: dist.Store) -> None:
    """hold_store(until_a_failure): no limit while no rank failed (here: until ranks 1 and 2 check out
    0.5 s later); once a rank checked in as failing, `wait_s` more at most, returning who never checked out."""
    _later(store, f"{EXIT_KEY}1", f"{EXIT_KEY}2")
    t0 = time.monotonic()
    assert hold_store(3, [], wait_s=0.0, until_a_failure=True) == []
    assert time.monotonic() - t0 >= 0.5
    check_in(4, PeerDied([5], "rank 5 died"))
    t0 = time.monotonic()
    assert hold_store(6, [5], wait_s=0.3, until_a_failure=True) == [3, 4]  # 1 and 2 checked out
    assert 0.3 <= time.monotonic() - t0 < 5


def test_a_failed_collective_blames_the_peer_that_never_checked_in(store: dist.Store) -> None:
    err = blame(RuntimeError("Connection closed by peer"), [0, 1], 0, _describe, wait_s=0.5)
    assert isinstance(err, PeerDied) and err.ranks == [1]
    assert str(err).startswith("teacher rank 1 (tp 1) died or hangs")
    # a peer that checked in with its own culprit is quoted, not blamed
    check_in(2, PeerError("student rank 3 (dp 1) is unreachable"))
    err = blame(RuntimeError("Connection closed by peer"), [0, 2], 0, _describe, wait_s=0.5)
    assert type(err) is PeerError and "teacher rank 2 (tp 2) failed first: PeerError: student rank 3" in str(err)
    named = PeerError("student rank 3 (dp 1) is unreachable")
    assert blame(named, [0, 1], 0, _describe, wait_s=0.5) is named  # already names its peer
    plain = RuntimeError("shape mismatch")
    check_in(3, RuntimeError("shape mismatch"))
    assert blame(plain, [0, 3], 0, _describe, wait_s=0.5) is plain  # every peer failed alike: no culprit
    own = FileNotFoundError("key.json")
    assert blame(own, [0, 3], 4, _describe, wait_s=0.5) is own  # not a collective's: checked in, unchanged
    err = blame(RuntimeError("Connection closed by peer"), [0, 4], 0, _describe, wait_s=0.5)
    assert type(err) is PeerError and "teacher rank 4 (tp 4) failed first: FileNotFoundError: key.json" in str(err)


def test_a_silent_peer_whose_heartbeat_goes_on_is_not_blamed_while_one_died(store: dist.Store) -> None:
    """Ranks 1 and 2 are silent; rank 1's heartbeat counts on (busy elsewhere, or blocked on us), rank
    2's stopped: rank 2 alone died. With only rank 1 silent it is named as stuck."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            store.add(f"{ALIVE_KEY}1", 1)
            stop.wait(HEARTBEAT_S / 4)

    threading.Thread(target=beat, daemon=True).start()
    try:
        err = blame(RuntimeError("Connection closed by peer"), [0, 1, 2], 0, _describe, wait_s=0.5)
        assert isinstance(err, PeerDied) and err.ranks == [2], err
        assert str(err).startswith("teacher rank 2 (tp 2) died or hangs")
        err = blame(RuntimeError("Timed out"), [0, 1], 0, _describe, wait_s=0.5)
        assert isinstance(err, PeerDied) and err.ranks == [1], err
        assert str(err).startswith("teacher rank 1 (tp 1) is stuck: alive, but no word from it")
        check_in(2, FileNotFoundError("key.json"))  # 2 failed by itself while 1 is busy: 2 is at fault
        err = blame(RuntimeError("Connection closed by peer"), [0, 1, 2], 0, _describe, wait_s=0.5)
        assert type(err) is PeerError and "teacher rank 2 (tp 2) failed first: FileNotFoundError" in str(err), err
        assert "rank 1" not in str(err)
    finally:
        stop.set()


def test_the_heartbeat_counts_until_a_new_world_replaces_it(store: dist.Store) -> None:
    start_heartbeat(0, period_s=0.05)
    time.sleep(0.5)
    first = int(store.add(f"{ALIVE_KEY}0", 0))
    assert first >= 3
    start_heartbeat(7, period_s=0.05)  # stops rank 0's
    time.sleep(0.5)
    assert int(store.add(f"{ALIVE_KEY}0", 0)) <= first + 1
    seventh = int(store.add(f"{ALIVE_KEY}7", 0))
    assert seventh >= 3
    stop_heartbeat()
    time.sleep(0.3)
    assert int(store.add(f"{ALIVE_KEY}7", 0)) <= seventh + 2


def _all_reduce_while_rank_0_is_busy(fault: str) -> None:
    """3 ranks: rank 2 dies (fault "dies") or fails by itself ("raises"), rank 0 is busy for 8 s
    (evaluating, say) before it joins the all-reduce."""
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=timedelta(seconds=60))
    start_heartbeat(rank)
    dist.barrier()
    if rank == 2 and fault == "dies":
        os._exit(9)
    if rank == 0:
        time.sleep(8.0)
    try:
        if rank == 2:
            raise FileNotFoundError("key.json")
        dist.all_reduce(torch.ones(1))
    except Exception as e:
        raise blame(e, [0, 1, 2], rank, lambda r: f"rank {r}", wait_s=2.0) from None


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dies", "raises"])
def test_a_rank_busy_elsewhere_is_not_blamed_for_a_failure(tmp_path: Path, fault: str) -> None:
    """Rank 1's all-reduce fails at once; rank 0 is still busy, so it checks in only ~8 s later. Rank 1
    names rank 2 alone (without heartbeats it named "rank 0, rank 2" when rank 2 died; without culprit
    check-ins it named rank 0 "stuck" when rank 2 raised), and so does rank 0."""
    with pytest.raises(WorldError) as info:
        spawn_world(_all_reduce_while_rank_0_is_busy, fault, 3, essential=[0, 1], grace_s=60, timeout_s=120)
    failures = info.value.failures
    expected = "PeerDied: rank 2 died or hangs" if fault == "dies" else "PeerError: a collective of rank"
    assert ("exited with code 9" if fault == "dies" else "FileNotFoundError: key.json") in failures[2], failures
    for survivor in (0, 1):
        assert failures[survivor].startswith(expected), failures
        if fault == "raises":  # the cause alone, not also the peer that quoted it
            assert failures[survivor].split("\n")[0].endswith("because rank 2 failed first: FileNotFoundError: key.json")
