"""Metrics: always `metrics.jsonl` in the run directory, Weights & Biases in addition.

W&B is offline unless configured (or WANDB_MODE says) otherwise, imported lazily,
and only on the process that logs.

Steps: W&B drops (with a warning) any row logged at a step below one it has seen, and the
series of a run are not in step order with each other (evaluation after training logs at
step 0; a table has no step). So W&B's own step is never set: every row carries our step as
the `global_step` metric, which every series uses as its x-axis (`define_metric`), and W&B
counts its rows itself (always increasing).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cot2align.configbase import ConfigBase, require

log = logging.getLogger("cot2align")

STEP_METRIC = "global_step"
"""The W&B metric every logged series is plotted against (our optimizer step)."""


@dataclass
class LoggingConfig(ConfigBase):
    """Where metrics go (`logging.*`)."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; the WANDB_MODE environment variable wins when set."""
    project: str = "cot2align"
    entity: str = ""
    group: str = ""
    """W&B group ('' = the Slurm job id when there is one)."""
    log_every: int = 10
    """Log (and reduce) metrics every N optimizer steps."""
    progress: bool = True
    """Show a progress bar on long stages."""
    heatmap_every: int = 0
    """Every N optimizer steps, save the Cross-CoT OT plans of the step's last micro-batch (first
    sample) under run_dir/ot_plans/ and log them to W&B as images (0 = off; cot2align loss only)."""

    def check(self, prefix: str) -> None:
        require(self.heatmap_every >= 0, f"{prefix}.heatmap_every", f"must be >= 0 (0 = off), got {self.heatmap_every}")


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at each record (not the stream of the first call, which a
    test harness or a redirect may have closed since)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    """One-line console format for the library's logger."""
    if not log.handlers:
        h = _CurrentStderr()
        h.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level)


class MetricsLogger:
    """Appends one JSON object per log call to run_dir/metrics.jsonl and mirrors it to W&B."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, config: dict[str, Any], name: str,
                 job_type: str = "distill", resume_id: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb: Any = None
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id.txt"
            run_id = resume_id or (id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8])
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=cfg.project, entity=cfg.entity or None, name=name,
                group=cfg.group or os.environ.get("SLURM_JOB_ID") or None,
                job_type=job_type, config=config, dir=str(self.run_dir), mode=mode, id=run_id,  # type: ignore[arg-type]
                resume="allow", settings=wandb.Settings(silent=True, console="off"),
            )
            self._wandb.define_metric(STEP_METRIC)
            self._wandb.define_metric("*", step_metric=STEP_METRIC)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        row = {"step": step, "time": time.time(), **{f"{prefix}{k}": v for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({**{k: v for k, v in row.items() if k not in ("step", "time")}, STEP_METRIC: step})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int = 0) -> None:
        """A W&B table (e.g. generations) at `step`; also written as run_dir/<key>.jsonl."""
        with (self.run_dir / f"{key.replace('/', '_')}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(dict(zip(columns, r, strict=True))) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=list[Any](columns), data=rows), STEP_METRIC: step})

    def log_images(self, step: int, images: dict[str, str | Path]) -> None:
        """Log image files (e.g. PNG heatmaps) to W&B under their keys; no-op without W&B."""
        if self._wandb is not None and images:
            import wandb

            self._wandb.log({**{k: wandb.Image(str(p)) for k, p in images.items()}, STEP_METRIC: step})

    @property
    def wandb_dir(self) -> str | None:
        return None if self._wandb is None else str(Path(self._wandb.dir).parent)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
