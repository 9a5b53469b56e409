"""The Slurm job: its settings (`launch.*`) and the sbatch script submitit renders for it.

Nodes and GPUs per node come from `cluster.*` (`cot2align.plan.ClusterSpec`); everything here
is plain data and text, so a job can be rendered and checked on a laptop without Slurm.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from submitit.slurm.slurm import _make_sbatch_string

from cot2align.configbase import REPO_ROOT, ConfigBase, ConfigError, require
from cot2align.plan import ClusterSpec

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(value: str) -> int:
    """Minutes (rounded up) of a Slurm time: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S.

    Raises ValueError for anything else.
    """
    m = _TIME.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time (M, H:M:S, D-H, D-H:M:S)")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is None:  # M | M:S | H:M:S
        h, mi, s = {1: [0, *parts, 0], 2: [0, *parts], 3: parts}[len(parts)]
    else:  # D-H | D-H:M | D-H:M:S
        h, mi, s = [*parts, 0, 0][:3]
    seconds = ((int(days or 0) * 24 + h) * 60 + mi) * 60 + s
    return math.ceil(seconds / 60)


@dataclass
class SlurmConfig(ConfigBase):
    """The Slurm job (`launch.slurm.*`); nodes and GPUs per node come from `cluster.*`."""

    partition: str = ""
    """--partition ('' = the cluster's default)."""
    account: str = ""
    """--account ('' = none)."""
    qos: str = ""
    """--qos ('' = none)."""
    time: int | str = "24:00:00"
    """Time limit per (re)queued job: M, H:M:S or D-H:M:S. Quote it in YAML: unquoted, YAML reads
    24:00:00 as the number 86400."""
    mem: str = ""
    """--mem per node, e.g. 480G or 0 (all of it); '' = the partition's default."""
    constraint: str = ""
    """--constraint, e.g. h100 ('' = none)."""
    cpus_per_task: int = 8
    """CPU cores per rank (data loading, tokenization)."""
    request_gpus: bool = True
    """Ask for --gpus-per-node=cluster.gpus_per_node (false: CPU-only partitions, gloo)."""
    exclusive: bool = False
    """--exclusive nodes."""
    job_name: str = ""
    """--job-name ('' = run.name)."""
    signal_delay_s: int = 120
    """SIGUSR2 this many seconds before the time limit: checkpoint() and requeue."""
    max_requeues: int = 20
    """Time-outs after which the job is not requeued any more (preemptions do not count)."""
    env_script: str = "slurm/env.sh"
    """Sourced before the ranks start (venv, modules, NCCL settings); relative to the repository;
    '' = none."""
    setup: list[str] = field(default_factory=list)
    """More shell lines run before the ranks start (after env_script)."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """Extra #SBATCH directives, e.g. {mail-type: END, reservation: big}."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun arguments, e.g. [--cpu-bind=none]."""

    def check(self, prefix: str) -> None:
        if isinstance(self.time, int):
            raise ConfigError(
                f"{prefix}.time: got the number {self.time}; write the time limit as a quoted string, "
                "e.g. '24:00:00' (unquoted YAML reads 24:00:00 as 86400)"
            )
        try:
            minutes = slurm_minutes(self.time)
        except ValueError as e:
            raise ConfigError(f"{prefix}.time: {e}") from None
        require(minutes >= 1, f"{prefix}.time", f"must be at least one minute, got {self.time!r}")
        require(self.cpus_per_task >= 1, f"{prefix}.cpus_per_task", f"must be >= 1, got {self.cpus_per_task}")
        require(self.signal_delay_s >= 0, f"{prefix}.signal_delay_s", f"must be >= 0, got {self.signal_delay_s}")
        require(self.max_requeues >= 0, f"{prefix}.max_requeues", f"must be >= 0, got {self.max_requeues}")

    @property
    def minutes(self) -> int:
        """The time limit in minutes (what submitit and `#SBATCH --time` get)."""
        return slurm_minutes(str(self.time))


@dataclass
class LaunchConfig(ConfigBase):
    """How launcher/submit.py starts a cluster run (`launch.*`)."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    plan: bool = True
    """Run the cluster planner before submitting and write its layout into the run's config."""
    fixed: list[Literal["tp", "pp", "replicas", "dp"]] = field(default_factory=list)
    """Layout sizes the planner must keep from teacher.parallel / student.parallel (dp -1 = the
    rest); the others it chooses. The resolved config of a run fixes all four."""
    teacher_config: str = ""
    """HF config.json (file, folder or configs/models/ preset) the planner reads for the teacher
    ('' = teacher.path; needed when the weights are not on this machine)."""
    student_config: str = ""
    """Same for the student ('' = student.path)."""
    workload: dict[str, Any] = field(default_factory=dict)
    """Planner workload fields overriding those derived from the config, e.g. {flash_attention: false}."""


def sbatch_parameters(s: SlurmConfig, cluster: ClusterSpec, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of the job: N nodes x G tasks, one GPU per task."""
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if s.env_script:
        script = Path(s.env_script)
        setup.append(f"source {shlex.quote(str(script if script.is_absolute() else REPO_ROOT / script))}")
    params: dict[str, Any] = {
        "job_name": s.job_name or job_name,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.gpus_per_node,
        "gpus_per_node": cluster.gpus_per_node if s.request_gpus else None,
        "cpus_per_task": s.cpus_per_task,
        "time": s.minutes,
        "signal_delay_s": s.signal_delay_s,
        "partition": s.partition or None,
        "account": s.account or None,
        "qos": s.qos or None,
        "mem": s.mem or None,
        "constraint": s.constraint or None,
        "exclusive": True if s.exclusive else None,
        "setup": [*setup, *s.setup],
        "srun_args": list(s.srun_args) or None,
        "additional_parameters": {"chdir": os.getcwd(), **s.sbatch},
    }
    return {k: v for k, v in params.items() if v is not None}


def render_sbatch(params: dict[str, Any], folder: Path) -> str:
    """The sbatch script submitit writes for a job of these parameters whose logs go to `folder`.

    Uses submitit's own renderer (`submitit.slurm.slurm._make_sbatch_string`, private: the one
    SlurmExecutor calls), so what we show in --dry-run is byte for byte what sbatch gets; recheck
    it when upgrading submitit (tests/launch/test_launch.py compares the two)."""
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def slurm_available() -> bool:
    """sbatch and srun on PATH."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None
