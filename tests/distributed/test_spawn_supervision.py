"""A local world does not outlive its supervisor: ranks spawned like `launch_local`'s die within
seconds when the supervisor is terminated (SIGTERM), killed (SIGKILL) or interrupted (Ctrl-C:
SIGINT to the whole foreground process group). The end-to-end case (a training world) is in
tests/recipes/test_served.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from supervised import alive, wait_gone

HERE = Path(__file__).resolve().parent.parent  # tests/
WITHIN_S = 5.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "ctrl-c"])
def test_ranks_die_with_their_supervisor(tmp_path: Path, how: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    sup = subprocess.Popen([sys.executable, str(HERE / "supervised.py"), str(tmp_path), "2"], env=env,
                           start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid", tmp_path / "supervisor.pid"]
        while not all(f.is_file() and f.read_text() for f in files):
            assert sup.poll() is None, sup.stderr.read().decode() if sup.stderr else ""
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
        ranks = [int(f.read_text()) for f in files[:2]]
        assert all(alive(p) for p in ranks)
        if how == "ctrl-c":
            os.killpg(sup.pid, signal.SIGINT)  # what a terminal sends: the whole foreground group
        else:
            sup.send_signal(getattr(signal, how))
        sup.wait(timeout=WITHIN_S)
        assert wait_gone(ranks, WITHIN_S) == [], f"ranks outlived the supervisor ({how})"
    finally:
        if sup.poll() is None:
            sup.kill()
        for f in tmp_path.glob("rank*.pid"):
            if f.read_text() and alive(int(f.read_text())):
                os.kill(int(f.read_text()), signal.SIGKILL)
