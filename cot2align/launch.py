"""Start a run: a Slurm job through submitit, a local world of ranks, or the embedded pipeline.

    python launcher/submit.py                                    # the embedded default, in-process
    python launcher/submit.py --config C --nodes 8 --partition gpu   # ONE Slurm job: 8 nodes x 8 tasks
    python launcher/submit.py --config C --dry-run               # config, plan, sbatch script; submits nothing
    python launcher/submit.py --config C --world-size 4 --local  # a served world of 4 ranks on this machine
    python launcher/submit.py --resume runs/NAME                 # resubmit a run directory (resumes training)

Every cluster run gets a run directory `<run.output_dir>/<run.name>` holding the resolved
config (`config.yaml`, with the planned layout written in), the plan (`plan.md`), the sbatch
script (`submit.sh`) and `logs/` (`<jobid>_<task>_log.out|err`, one pair per rank). Every task
of the job is a `RankTask`: it exports the torch.distributed environment of its Slurm task and
runs `cot2align.runtime.run_rank`; on preemption or time-out submitit calls its `checkpoint()`
and requeues the job, which resumes from `<run_dir>/checkpoints/latest`.

Merge order of settings: config defaults <- YAML <- dotted overrides <- command-line flags
(`--nodes 8` is `cluster.nodes=8`, `--partition gpu` is `launch.slurm.partition=gpu`, ...).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cot2align.configbase import ConfigBase, ConfigError, require

if TYPE_CHECKING:
    import submitit

    from cot2align.config import Config
    from cot2align.plan import Plan, WorkloadSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_KEYS: dict[str, str] = {
    "tp": "teacher.parallel.tp",
    "pp": "teacher.parallel.pp",
    "replicas": "teacher.parallel.replicas",
    "dp": "student.parallel.dp",
}
"""Config keys of the four layout sizes the planner chooses (or checks)."""
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


# ----------------------------------------------------------------------------- configuration


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


# ----------------------------------------------------------------------------- planning


def workload_for(cfg: Config) -> WorkloadSpec:
    """The planner's workload derived from data / train / loss / runtime, then `launch.workload`."""
    from cot2align.plan import WorkloadSpec

    loss = cfg.loss
    kd_base = loss.name in ("kd", "uld", "mined", "dskd") or (loss.name == "cot2align" and loss.base != "none")
    dskd = loss.name == "dskd" or (loss.name == "cot2align" and loss.base == "dskd")
    ot = loss.name == "cot2align"
    wl = WorkloadSpec(
        teacher_seq_len=cfg.data.max_length,
        student_seq_len=cfg.data.max_length,
        micro_batch_size=cfg.train.micro_batch_size,
        formats=2 if cfg.data.use_cot and cfg.data.pairing in ("reference", "pair") else 1,
        grad_accum=cfg.train.grad_accum,
        prefetch=cfg.runtime.prefetch,
        student_zero_stage=cfg.runtime.zero_stage,  # type: ignore[arg-type]  # 0-2, validated by runtime
        dtype="bf16" if cfg.teacher.dtype == "bfloat16" else "fp32",
        served_layers=max(1, len(set(loss.ot.teacher_layers))) if ot else 1,
        student_holds_teacher_head=kd_base,
        teacher_head_flops_per_param=6.0 if dskd else 2.0,
        ot_pairs=(3 if loss.ot.cross_pairs else 1) if ot else 0,
    )
    return wl.merged(cfg.launch.workload, "launch.workload")


def _model_ref(explicit: str, path: str, role: str) -> tuple[str | None, str]:
    """(what the planner reads for `role`, or None and why not)."""
    from cot2align.modelspec import resolve_model_config

    if explicit:
        return explicit, ""
    if not path:
        return None, (f"{role}.path is empty (the embedded tiny model); set launch.{role}_config to a "
                      "config.json or a configs/models/ preset to plan")
    try:
        resolve_model_config(path)
    except ConfigError:
        return None, (f"{role}.path {path!r} has no config.json on this machine; set launch.{role}_config "
                      "to a config.json or a configs/models/ preset to plan")
    return path, ""


def plan_for(cfg: Config) -> tuple[Plan | None, str]:
    """The planner's layout for `cfg.cluster`, or (None, why no plan was made).

    Sizes named in `launch.fixed` are kept (the hf teacher backend fixes tp = pp = 1).
    Raises ConfigError (naming keys and numbers) when no layout fits.
    """
    from cot2align.modelspec import load_model_spec
    from cot2align.plan import plan

    if not cfg.launch.plan:
        return None, "launch.plan is false"
    teacher, why_t = _model_ref(cfg.launch.teacher_config, cfg.teacher.path, "teacher")
    student, why_s = _model_ref(cfg.launch.student_config, cfg.student.path, "student")
    if teacher is None or student is None:
        return None, why_t or why_s
    sizes = {"tp": cfg.teacher.parallel.tp, "pp": cfg.teacher.parallel.pp,
             "replicas": cfg.teacher.parallel.replicas, "dp": cfg.student.parallel.dp}
    fixed: dict[str, int | None] = {k: (sizes[k] if k in cfg.launch.fixed and sizes[k] >= 1 else None)
                                    for k in SIZE_KEYS}
    if cfg.runtime.teacher_backend == "hf":  # one rank per replica
        fixed["tp"], fixed["pp"] = 1, 1
    t, s, wl = load_model_spec(teacher), load_model_spec(student), workload_for(cfg)
    return plan(t, s, cfg.cluster, wl, fixed, SIZE_KEYS), ""


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """`cfg` with the plan's layout written into teacher.parallel / student.parallel, all four fixed."""
    return cfg.merged({
        "teacher": {"parallel": {"tp": plan.tp, "pp": plan.pp, "replicas": plan.replicas}},
        "student": {"parallel": {"dp": plan.dp}},
        "launch": {"fixed": list(SIZE_KEYS)},
    })


@dataclass
class Prepared:
    """A cluster run ready to submit: resolved config, plan (or why none), run directory."""

    cfg: Config
    plan: Plan | None
    plan_note: str
    run_dir: Path

    @property
    def world_size(self) -> int:
        """nodes * gpus_per_node: one rank per GPU."""
        return self.cfg.cluster.world_size

    @property
    def logs(self) -> Path:
        """submitit's folder: the per-rank logs and its pickles."""
        return self.run_dir / "logs"

    def plan_markdown(self) -> str:
        """plan.md: the plan's tables, or why there is none and the layout used."""
        if self.plan is not None:
            return self.plan.to_markdown()
        t, s = self.cfg.teacher.parallel, self.cfg.student.parallel
        return (f"No plan: {self.plan_note}.\n\nLayout from the config: {t.replicas} teacher replica(s) x "
                f"(tp {t.tp} x pp {t.pp}), student dp {s.dp} (-1 = the rest), world size {self.world_size}.\n")


def prepare(cfg: Config, world_size: int | None = None) -> Prepared:
    """Resolve a served run for `world_size` ranks (default: the cluster's GPUs): plan, check the layout.

    Raises ConfigError naming the key when the layout cannot work (before anything is submitted).
    """
    from cot2align.runtime import check_served
    from cot2align.topology import Topology

    if cfg.runtime.mode != "served":
        print("note: a cluster job runs the served world: runtime.mode=served", file=sys.stderr)
        cfg = cfg.merged({"runtime": {"mode": "served"}})
    if world_size:  # a local world: one node, one task per rank
        cfg = cfg.merged({"cluster": {"nodes": 1, "gpus_per_node": world_size}})
    world = cfg.cluster.world_size
    result, note = plan_for(cfg) if world_size is None else (None, "a local world is not planned")
    if result is not None:
        cfg = apply_plan(cfg, result)
    cfg.validate()
    check_served(cfg)
    Topology(cfg.teacher.parallel, cfg.student.parallel, world, 0)  # sizes add up to the world
    return Prepared(cfg, result, note, cfg.run_dir.resolve())


# ----------------------------------------------------------------------------- the job


class RankTask:
    """One task of the job = one rank of the served world; submitit requeues it on preemption/time-out."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        """The resolved config as a plain dict (pickled into the job)."""
        self.requeues = 0
        """How often `checkpoint()` requeued this task."""

    def __call__(self) -> Any:
        """Export RANK / WORLD_SIZE / MASTER_ADDR / ... of this task and run `run_rank`; return its result."""
        from submitit.helpers import TorchDistributedEnvironment

        # all GPUs of the node stay visible: run_rank selects cuda:LOCAL_RANK
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from cot2align.config import Config
        from cot2align.logging import setup_console_logging
        from cot2align.preemption import stop_request, stopped_early

        setup_console_logging()
        cfg = Config().merged(self.config)
        cfg.validate()
        stop_request.install()  # SIGUSR2 now only asks to stop at the next step boundary
        run_rank = importlib.import_module("cot2align.runtime").run_rank  # looked up at run time
        result = run_rank(cfg)
        if stopped_early(result) and int(os.environ["RANK"]) == 0:
            stop_request.chain()  # submitit's handler: checkpoint() below, requeue, exit
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called through submitit's handler by global rank 0 once the world stopped at a step
        boundary and the students saved (see `cot2align.preemption`): requeue this task, resuming
        from the run's checkpoint."""
        from submitit.helpers import DelayedSubmission

        self.requeues += 1
        self.config = {**self.config, "run": {**self.config.get("run", {}), "resume": True}}
        return DelayedSubmission(self, *args, **kwargs)


def sbatch_parameters(prep: Prepared) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of the job: N nodes x G tasks, one GPU per task."""
    cfg, s = prep.cfg, prep.cfg.launch.slurm
    setup = [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if s.env_script:
        script = Path(s.env_script)
        setup.append(f"source {shlex.quote(str(script if script.is_absolute() else REPO_ROOT / script))}")
    params: dict[str, Any] = {
        "job_name": s.job_name or cfg.run.name,
        "nodes": cfg.cluster.nodes,
        "ntasks_per_node": cfg.cluster.gpus_per_node,
        "gpus_per_node": cfg.cluster.gpus_per_node if s.request_gpus else None,
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


def _submitit_command(folder: Path) -> str:
    """What the sbatch script runs on every task (submitit's SlurmExecutor command)."""
    return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def render_sbatch(prep: Prepared) -> str:
    """The sbatch script submitit writes for this job (no Slurm needed to render it)."""
    from submitit.slurm.slurm import _make_sbatch_string  # the renderer SlurmExecutor itself uses

    return _make_sbatch_string(command=_submitit_command(prep.logs), folder=prep.logs, **sbatch_parameters(prep))


def slurm_available() -> bool:
    """sbatch and srun on PATH."""
    return shutil.which("sbatch") is not None and shutil.which("srun") is not None


# ----------------------------------------------------------------------------- actions


def _dump_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def write_run_dir(prep: Prepared, script: str | None = None) -> None:
    """config.yaml, plan.md, logs/ (and submit.sh when given); warns when an existing run's config changed."""
    import yaml

    prep.logs.mkdir(parents=True, exist_ok=True)
    cfg_file = prep.run_dir / "config.yaml"
    if cfg_file.is_file():
        old = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        changed = _changed_keys(old, prep.cfg.to_dict())
        if changed:
            shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            print(f"warning: {cfg_file} exists and this config differs in: {shown}", file=sys.stderr)
    cfg_file.write_text(_dump_config(prep.cfg), encoding="utf-8")
    (prep.run_dir / "plan.md").write_text(prep.plan_markdown(), encoding="utf-8")
    if script is not None:
        (prep.run_dir / "submit.sh").write_text(script, encoding="utf-8")


def _resume_note(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        return f"resumes from {latest}: {latest.read_text().strip()}"
    return "new run: no checkpoints/latest yet"


def _wandb_line(cfg: Config) -> str:
    mode = os.environ.get("WANDB_MODE", cfg.logging.wandb_mode)
    where = f"{cfg.logging.entity}/" if cfg.logging.entity else ""
    extra = f"; upload later: wandb sync {cfg.run_dir.resolve()}/wandb/offline-run-*" if mode == "offline" else ""
    return f"W&B run:  {cfg.run.name!r} in project {where}{cfg.logging.project} (mode {mode}{extra})"


def submit_slurm(prep: Prepared) -> str:
    """Submit ONE job of nodes x gpus_per_node tasks; write the run directory; print where things are.

    Returns the job id.
    """
    from submitit import SlurmExecutor

    cfg = prep.cfg
    if not cfg.train.save_every:
        print("warning: train.save_every is 0: preemption and time-outs still checkpoint at a step boundary, "
              "but a failed node loses every step since the start; set train.save_every", file=sys.stderr)
    script = render_sbatch(prep)
    write_run_dir(prep, script)
    ex = SlurmExecutor(folder=prep.logs, max_num_timeout=cfg.launch.slurm.max_requeues)
    ex.update_parameters(**sbatch_parameters(prep))
    job = ex.submit(RankTask(cfg.to_dict()))
    submitted = Path(job.paths.submission_file)
    if submitted.is_file():  # what sbatch really got (same text as `script`)
        shutil.copyfile(submitted, prep.run_dir / "submit.sh")
    with (prep.run_dir / "job_ids.txt").open("a", encoding="utf-8") as f:
        f.write(f"{job.job_id}\n")
    n = prep.world_size
    out = prep.logs / f"{job.job_id}_<task>_log.out"  # submitit's %j_%t_log.out / .err
    print(f"submitted Slurm job {job.job_id}: {cfg.cluster.nodes} node(s) x {cfg.cluster.gpus_per_node} "
          f"task(s) = world size {n}")
    print(f"run dir:  {prep.run_dir} ({_resume_note(prep.run_dir)})")
    print(f"logs:     {out} and .err, task 0..{n - 1}")
    print(_wandb_line(cfg))
    print(f"resubmit: python launcher/submit.py --resume {prep.run_dir}")
    return str(job.job_id)


def run_local_world(prep: Prepared) -> int:
    """The same job on this machine: submitit LocalExecutor, one node, world_size tasks; waits for it."""
    from submitit import LocalExecutor

    write_run_dir(prep)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ex = LocalExecutor(folder=prep.logs, max_num_timeout=prep.cfg.launch.slurm.max_requeues)
    gpus = _local_gpus(prep)
    ex.update_parameters(nodes=1, tasks_per_node=prep.world_size, gpus_per_node=gpus,
                         timeout_min=prep.cfg.launch.slurm.minutes, signal_delay_s=prep.cfg.launch.slurm.signal_delay_s)
    job = ex.submit(RankTask(prep.cfg.to_dict()))
    print(f"local world of {prep.world_size} rank(s) ({gpus} GPU(s)), job {job.job_id}")
    print(f"run dir:  {prep.run_dir}")
    print(f"logs:     {prep.logs}/{job.job_id}_<task>_log.out|err")
    try:
        results = job.results()
    except Exception as e:  # submitit re-raises a failed task's error with its traceback
        print(f"local world failed: {e}", file=sys.stderr)
        return 1
    from cot2align.topology import Topology

    first_student = Topology(prep.cfg.teacher.parallel, prep.cfg.student.parallel, prep.world_size, 0).student_ranks[0]
    res = results[first_student]
    if hasattr(res, "steps"):  # a TrainResult
        print(f"done: {res.steps} steps, best dev {res.best_dev}, exported {res.export_dir}")
    else:
        print(f"done: {res}")
    print(_wandb_line(prep.cfg))
    return 0


def _local_gpus(prep: Prepared) -> int:
    if prep.cfg.runtime.backend == "gloo":
        return 0
    try:
        import torch

        return min(prep.world_size, torch.cuda.device_count())
    except Exception:
        return 0


# ----------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    """The launcher's flags (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="launcher/submit.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (default: configs/embedded.yaml)")
    ap.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="resubmit a run directory: its config.yaml (training resumes from its checkpoints)")
    ap.add_argument("--nodes", type=int, help="Slurm nodes (cluster.nodes)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs = tasks per node (cluster.gpus_per_node)")
    ap.add_argument("--partition", help="launch.slurm.partition")
    ap.add_argument("--account", help="launch.slurm.account")
    ap.add_argument("--qos", help="launch.slurm.qos")
    ap.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (launch.slurm.time)")
    ap.add_argument("--mem", help="memory per node, e.g. 480G (launch.slurm.mem)")
    ap.add_argument("--constraint", help="launch.slurm.constraint")
    ap.add_argument("--cpus-per-task", type=int, help="launch.slurm.cpus_per_task")
    ap.add_argument("--name", help="run name = job name = W&B run name (run.name)")
    ap.add_argument("--local", action="store_true", help="run on this machine even where Slurm is available")
    ap.add_argument("--world-size", type=int, default=0,
                    help="run the served world with this many ranks on this machine (submitit LocalExecutor)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config, the plan and the sbatch script; submit nothing")
    ap.add_argument("--prepare", action="store_true",
                    help="write the run directory, print its path and submit nothing (slurm/cot2align.sbatch)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 cluster.gpu_memory_gib=141")
    args = ap.parse_args(argv)
    if args.resume and args.config:
        ap.error("--resume RUN_DIR uses RUN_DIR/config.yaml; do not pass --config as well")
    return args


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as a nested config mapping (merged after the dotted overrides)."""
    slurm = {k: getattr(args, k) for k in ("partition", "account", "qos", "time", "mem", "constraint", "cpus_per_task")
             if getattr(args, k) is not None}
    cluster = {k: getattr(args, k) for k in ("nodes", "gpus_per_node") if getattr(args, k) is not None}
    out: dict[str, Any] = {}
    if cluster:
        out["cluster"] = cluster
    if slurm:
        out["launch"] = {"slurm": slurm}
    if args.name is not None:
        out["run"] = {"name": args.name}
    return out


def _as_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested mapping -> `a.b=value` strings (values JSON-encoded, which YAML reads back unchanged)."""
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += _as_overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def _run_pipeline(config: str | None, overrides: list[str]) -> int:
    """The embedded pipeline in this process (`cot2align pipeline`)."""
    from cot2align.cli import main as cli_main

    return cli_main(["pipeline", *(["--config", config] if config else []), *overrides])


def no_slurm_message(nodes: int) -> str:
    """What to do when more than one node is asked for without Slurm."""
    return (f"cluster.nodes={nodes} (--nodes) needs Slurm, but `sbatch`/`srun` are not on PATH.\n"
            "  On this machine: python launcher/submit.py [--config FILE] [--world-size N] "
            "(one node: the pipeline in-process, or a served world of N local ranks)\n"
            "  To check a cluster run here: add --dry-run (prints the plan and the sbatch script)\n"
            "  On the cluster's login node: the same command submits the job; or submit by hand with "
            "sbatch slurm/cot2align.sbatch (see slurm/README.md)")


def main(argv: list[str] | None = None) -> int:
    """`python launcher/submit.py ...`; returns the exit status (2 for configuration errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rank"]:
        return rank_main(argv[1:])
    if not argv:  # unchanged: the embedded default pipeline, here
        return _run_pipeline(None, [])
    args = parse(argv)
    from cot2align.config import load_config
    from cot2align.logging import setup_console_logging

    setup_console_logging()
    config = str(Path(args.resume) / "config.yaml") if args.resume else args.config
    flags = flag_values(args)
    try:
        cfg = load_config(config, args.overrides).merged(flags)
        cfg.validate()
        slurm = slurm_available() and not args.local and not args.world_size
        cluster_run = args.dry_run or args.prepare or slurm
        if not cluster_run and cfg.cluster.nodes > 1:
            print(f"error: {no_slurm_message(cfg.cluster.nodes)}", file=sys.stderr)
            return 2
        prep: Prepared | None = None
        if cluster_run:
            prep = prepare(cfg)
        elif args.world_size:
            prep = prepare(cfg, args.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if prep is None:  # one node, no Slurm (or --local): the pipeline in this process
        return _run_pipeline(config, [*args.overrides, *_as_overrides(flags)])
    if args.dry_run:
        print(f"# Resolved config ({prep.run_dir / 'config.yaml'})\n")
        print(_dump_config(prep.cfg))
        print(f"# Plan ({prep.run_dir / 'plan.md'})\n")
        print(prep.plan_markdown())
        print(f"# sbatch script ({prep.run_dir / 'submit.sh'})\n")
        print(render_sbatch(prep))
        print(f"dry run: nothing submitted, nothing written; run directory would be {prep.run_dir}")
        return 0
    if args.prepare:
        write_run_dir(prep, render_sbatch(prep))
        print(prep.run_dir)
        return 0
    if slurm:
        submit_slurm(prep)
        return 0
    return run_local_world(prep)


def rank_main(argv: list[str]) -> int:
    """`python -m cot2align.launch rank --config RUN_DIR/config.yaml`: one rank under a hand-written srun.

    Reads the rank layout of the Slurm task through submitit's environment helpers (as the
    submitit job does) and runs `cot2align.runtime.run_rank`.
    """
    ap = argparse.ArgumentParser(prog="cot2align.launch rank")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    from submitit.helpers import TorchDistributedEnvironment

    from cot2align.config import load_config
    from cot2align.logging import setup_console_logging

    setup_console_logging()
    cfg = load_config(args.config, args.overrides)
    if "SLURM_JOB_ID" in os.environ:
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    from cot2align.preemption import stop_request, stopped_early

    stop_request.install()  # the batch script passes SIGUSR2 on to every rank
    run_rank = importlib.import_module("cot2align.runtime").run_rank
    result = run_rank(cfg)
    if stopped_early(result) and int(os.environ["RANK"]) == 0 and "SLURM_JOB_ID" in os.environ:
        import subprocess

        print(f"stopped early: requeueing job {os.environ['SLURM_JOB_ID']}", flush=True)
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=120)
    return 0


__all__ = [
    "LaunchConfig",
    "Prepared",
    "RankTask",
    "SlurmConfig",
    "apply_plan",
    "main",
    "plan_for",
    "prepare",
    "render_sbatch",
    "sbatch_parameters",
    "slurm_available",
    "slurm_minutes",
    "submit_slurm",
    "workload_for",
]

if __name__ == "__main__":
    raise SystemExit(main())
