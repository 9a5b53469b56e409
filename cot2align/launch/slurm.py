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
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from submitit.slurm.slurm import _make_sbatch_string

from cot2align.configbase import REPO_ROOT, ConfigBase, ConfigError, require
from cot2align.plan import ClusterSpec

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
SIGNAL_MARGIN_S = 60
"""A job's least time before its SIGUSR2: the ranks install their handler within it (before, the
signal's default action kills the task)."""


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
        require(self.signal_delay_s + SIGNAL_MARGIN_S <= minutes * 60, f"{prefix}.signal_delay_s",
                f"{self.signal_delay_s} s before the time limit {self.time!r} ({minutes * 60} s) leaves the job under "
                f"{SIGNAL_MARGIN_S} s before SIGUSR2: it could arrive before the ranks handle it (the task would die "
                f"instead of checkpointing); give a longer {prefix}.time or a shorter delay")
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


@dataclass
class Partition:
    """A Slurm partition as `sinfo` reports it; per-node figures are the smallest node's."""

    name: str
    """Partition name."""
    nodes: int
    """Nodes in the partition."""
    cpus: int
    """CPUs per node."""
    gpus: int
    """GPUs per node (gres gpu; 0 = a CPU partition)."""
    memory_mb: int
    """Memory per node in MB."""


def _gres_gpus(gres: str) -> int:
    """GPUs in a gres string: 'gpu:8', 'gpu:h100:8(S:0-1)', 'gpu:a100:4,gpu:v100:2', '(null)' -> 8, 8, 6, 0."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def parse_sinfo(text: str, partition: str) -> Partition | None:
    """The partition `partition` ('' = the default, marked '*') in `sinfo -h -N -o '%P|%c|%G|%m'` output."""
    rows = [line.split("|") for line in text.splitlines() if line.count("|") == 3]
    if not partition:
        partition = next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), "")
    mine = [r for r in rows if r[0].rstrip("*") == partition]
    if not mine:
        return None
    return Partition(name=partition, nodes=len(mine), cpus=min(int(r[1]) for r in mine),
                     gpus=min(_gres_gpus(r[2]) for r in mine),
                     memory_mb=min(int(re.sub(r"\D", "", r[3]) or 0) for r in mine))


def query_partition(partition: str) -> Partition | None:
    """`sinfo` about `partition` ('' = the cluster's default); None when sinfo fails or does not know it."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%G|%m"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sinfo(out.stdout, partition) if out.returncode == 0 else None


def mem_mb(value: str) -> int | None:
    """--mem in MB ('480G' -> 491520; '0' = all of the node, or not a size -> None)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip().upper())
    if not m or int(m.group(1)) == 0:
        return None
    return max(1, int(m.group(1)) * {"K": 1, "": 1024, "M": 1024, "G": 1024**2, "T": 1024**3}[m.group(2)] // 1024)


def partition_problems(s: SlurmConfig, cluster: ClusterSpec, part: Partition) -> list[str]:
    """What of the job's request does not fit partition `part` (Slurm would leave it PENDING forever)."""
    where = f"partition {part.name!r} (sinfo)"
    out = []
    if cluster.nodes > part.nodes:
        out.append(f"cluster.nodes (--nodes) = {cluster.nodes}, but {where} has {part.nodes} node(s)")
    tasks = cluster.gpus_per_node
    if s.cpus_per_task * tasks > part.cpus:
        out.append(f"launch.slurm.cpus_per_task (--cpus-per-task) = {s.cpus_per_task} x {tasks} task(s) per node "
                   f"(cluster.gpus_per_node) = {s.cpus_per_task * tasks} CPUs, but the nodes of {where} have "
                   f"{part.cpus}: use --cpus-per-task {max(1, part.cpus // tasks)} or fewer tasks per node")
    if s.request_gpus and 0 < part.gpus < tasks:
        out.append(f"cluster.gpus_per_node (--gpus-per-node) = {tasks}, but the nodes of {where} have "
                   f"{part.gpus} GPU(s)")
    mem = mem_mb(s.mem) if s.mem else None
    if mem is not None and mem > part.memory_mb:
        out.append(f"launch.slurm.mem (--mem) = {s.mem}, but the nodes of {where} have {part.memory_mb} MB")
    return out


def sbatch_parameters(s: SlurmConfig, cluster: ClusterSpec, job_name: str,
                      partition: Partition | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of the job: N nodes x G tasks, one GPU per task (none on a
    CPU `partition`, as sinfo reported it; None = not known)."""
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if s.env_script:
        script = Path(s.env_script)
        setup.append(f"source {shlex.quote(str(script if script.is_absolute() else REPO_ROOT / script))}")
    params: dict[str, Any] = {
        "job_name": s.job_name or job_name,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.gpus_per_node,
        "gpus_per_node": cluster.gpus_per_node if s.request_gpus and (partition is None or partition.gpus)
        else None,  # a CPU partition is never asked for GPUs
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
