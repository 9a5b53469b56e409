"""MetricsLogger: metrics.jsonl and the offline W&B run hold every logged key, whatever the
order of steps across series (train at 1..3, evaluation back at 0, a table, images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb
from wandb_records import history

from cot2align.logging import STEP_METRIC, LoggingConfig, MetricsLogger


def test_every_logged_key_reaches_the_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("WANDB_MODE", "offline")
    png = tmp_path / "p.png"
    plt.imsave(png, [[0.0, 1.0], [1.0, 0.0]])
    logger = MetricsLogger(tmp_path, LoggingConfig(), {"a": 1}, "steps")
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step}, prefix="train/")
    logger.log(3, {"rouge_l": 0.5}, prefix="dev/")
    logger.log_images(2, {"ot_plan/main": png})
    logger.log_table("generations/test", ["id", "text"], [["a", "x"]])
    logger.log(0, {"test/rouge_l": 0.25}, prefix="eval/")  # after training, at step 0
    logger.close()
    wandb.teardown()  # the W&B service flushes the run's file when it stops
    (run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(run)
    got = [(r[STEP_METRIC], k) for r in rows for k in r if not k.startswith("_") and k != STEP_METRIC]
    assert got == [(1, "train/loss"), (2, "train/loss"), (3, "train/loss"), (3, "dev/rouge_l"),
                   (2, "ot_plan/main"), (0, "generations/test"), (0, "eval/test/rouge_l")]
    assert [r["_step"] for r in rows] == sorted({r["_step"] for r in rows})  # W&B's own step: increasing
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], k) for r in jsonl for k in r if k not in ("step", "time")] == [
        (1, "train/loss"), (2, "train/loss"), (3, "train/loss"), (3, "dev/rouge_l"), (0, "eval/test/rouge_l")]
    assert "Tried to log to step" not in "".join(capfd.readouterr())
