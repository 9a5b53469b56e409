"""Preemption: SIGUSR2 -> every rank stops at a step boundary -> checkpoint -> submitit requeues -> resume.

The end-to-end test runs the real job path (launcher -> submitit LocalExecutor -> RankTask ->
run_rank: a teacher rank serving a DeepSpeed student over gloo), sends SIGUSR2 to every task
mid-training as Slurm does before a time-out or a preemption, and checks that the requeued job
finishes with exactly the per-step losses of an uninterrupted run, in one W&B run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from jobs import tiny_job_config, tiny_teacher

from cot2align.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cot2align.config import Config
from cot2align.launch import submit as launch
from cot2align.preemption import StopRequest

STEPS = 30


def test_stop_request_records_and_chains_to_the_kept_handler() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    req = StopRequest()
    try:
        req.install()
        assert not req.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert req.requested and seen == []  # recorded only: the kept handler has not run
        req.chain()
        assert seen == [signal.SIGUSR2]
        req.reset()
        assert not req.requested and signal.getsignal(signal.SIGUSR2) is not req.record
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3), "step": 1})

    def torn_save(obj: Any, f: Any) -> None:  # the process dies half-way through writing
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3), "step": 2})
    monkeypatch.undo()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_00000001"
    assert load_checkpoint(ckpt)["step"] == 1
    # a crash between replacing a step folder and repointing `latest`: the newest complete folder
    save_checkpoint(tmp_path, 3, {"step": 3})
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and load_checkpoint(ckpt)["step"] == 3


def _config(tiny_task: dict[str, Path], teacher: Path, out: Path, name: str) -> dict[str, Any]:
    return tiny_job_config(
        tiny_task, teacher, out, name, run={"seed": 5, "resume": True}, loss={"name": "cot2align"},
        train={"max_steps": STEPS, "lr": 1e-2, "min_lr": 1e-4}, logging={"wandb_mode": "offline", "log_every": 1},
        runtime={"mode": "served", "teacher_backend": "hf"})


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from metrics.jsonl; a step logged twice is an error."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            assert row["step"] not in out, f"step {row['step']} was trained twice"
            out[row["step"]] = row["train/loss"]
    return out


def _tasks() -> list[psutil.Process]:
    """The submitit task processes (the ranks) started under this test process."""
    return [p for p in psutil.Process().children(recursive=True)
            if any("submitit.core._submit" in a for a in p.cmdline())]


@pytest.mark.slow
def test_preempted_job_requeues_and_matches_the_uninterrupted_run(tiny_task: dict[str, Path], tmp_path: Path,
                                                                   no_slurm: None) -> None:
    from cot2align.recipes.served import launch_local

    teacher = tiny_teacher(tiny_task, tmp_path / "teacher")

    # the reference: the same served world, never interrupted
    ref_cfg = Config().merged(_config(tiny_task, teacher, tmp_path / "ref", "ref"))
    ref_cfg.validate()
    reference = launch_local(ref_cfg, world_size=2, timeout_s=600)
    assert len(reference.history) == STEPS

    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(_config(tiny_task, teacher, tmp_path / "runs", "job")))
    run_dir = tmp_path / "runs" / "job"
    rc: list[int] = []
    job = threading.Thread(target=lambda: rc.append(launch.main(["--local", "--world-size", "2", "--config",
                                                                 str(f)])))
    job.start()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= 3):
        time.sleep(0.05)
    assert (run_dir / "metrics.jsonl").exists(), "the job never started training"
    tasks = _tasks()
    assert len(tasks) == 2
    for p in tasks:  # what Slurm does before a time-out or a preemption
        p.send_signal(signal.SIGUSR2)
    job.join(timeout=600)
    assert not job.is_alive() and rc == [0]

    stops = sorted(int(p.name.split("_")[-1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert stops[-1] == STEPS and 3 <= stops[0] < STEPS, stops  # saved at the stop, then at the end
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*_log.*"))
    assert "stopped at step" in logs and "Requeued job" in logs

    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once: no step lost or repeated
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx(
        [h["loss"] for h in reference.history], rel=1e-6, abs=0)

    # one W&B run for the job: the requeued attempt continued the same run id
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(run_id) for p in attempts)
