"""Start a run: a Slurm job through submitit, a local world of ranks, or the embedded pipeline.

    python launcher/submit.py                                    # the embedded default, in-process
    python launcher/submit.py --config C --nodes 8 --partition gpu   # ONE Slurm job: 8 nodes x 8 tasks
    python launcher/submit.py --config C --dry-run               # config, plan, sbatch script; submits nothing
    python launcher/submit.py --config C --world-size 4 --local  # a served world of 4 ranks on this machine
    python launcher/submit.py --resume runs/NAME                 # resubmit a run directory (resumes training)
    python launcher/submit.py --config C --nodes 1 --gpus-per-node 4 --cache-first teacher.cache.mode=auto
                     # two jobs: cache-teacher on the 4 GPUs, then 4 students from the cache (afterok)

Every cluster run gets a run directory `<run.output_dir>/<run.name>` holding the resolved
config (`config.yaml`, with the planned layout written in), the plan (`plan.md`), the sbatch
script (`submit.sh`) and `logs/` (`<jobid>_<task>_log.out|err`, one pair per rank). Every task
of the job is a `RankTask`: it exports the torch.distributed environment of its Slurm task and
runs `cot2align.recipes.served.run_rank`; on preemption or time-out submitit calls its `checkpoint()`
and requeues the job, which resumes from `<run_dir>/checkpoints/latest`.

With `--cache-first` (config with teacher.cache.mode=read or auto) the launcher runs two jobs on the
same GPUs: (a) `cot2align cache-teacher` on the teacher layout (replicas = GPUs / (tp x pp): one
whole HF teacher per GPU, or megatron-core shards), its run directory `<run_dir>/cache-teacher/`;
then (b) the distillation as a
world of students only (teacher replicas 0, student.parallel.dp = GPUs, teacher.cache.mode=read). On
Slurm (b) is submitted with `--dependency=afterok:<job a>`; on this machine (b) starts when (a) ends.

Merge order of settings: config defaults <- YAML <- dotted overrides <- command-line flags
(`--nodes 8` is `cluster.nodes=8`, `--partition gpu` is `launch.slurm.partition=gpu`, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit
import torch
import yaml
from submitit import LocalExecutor, SlurmExecutor
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment

from cot2align.config import Config, load_config, read_config_file
from cot2align.configbase import REPO_ROOT, ConfigError, changed_keys
from cot2align.distributed.topology import Topology
from cot2align.launch.layout import Prepared, fit_to_partition, prepare, prepare_cache_first
from cot2align.launch.slurm import partition_problems, query_partition, slurm_available
from cot2align.logging import setup_console_logging
from cot2align.preemption import stop_request, stopped_early
from cot2align.recipes import served
from cot2align.recipes.cache import cache_teacher
from cot2align.recipes.pipeline import run_embedded

# ----------------------------------------------------------------------------- the job


MASTER_ADDR_OVERRIDE = "COT2ALIGN_MASTER_ADDR"
"""Environment variable that replaces the rendezvous address derived from the job's first node name."""


def use_master_addr_override() -> None:
    """MASTER_ADDR = $COT2ALIGN_MASTER_ADDR when set (where node names do not resolve; see slurm/env.sh)."""
    if os.environ.get(MASTER_ADDR_OVERRIDE):
        os.environ["MASTER_ADDR"] = os.environ[MASTER_ADDR_OVERRIDE]


def given_keys(config: str | None, overrides: list[str], flags: dict[str, Any]) -> set[str]:
    """Dotted keys the user set: in the YAML file (and its `base` chain), the overrides, the flags."""

    def dotted(d: dict[str, Any], prefix: str = "") -> set[str]:
        return {k for key, v in d.items()
                for k in (dotted(v, f"{prefix}{key}.") if isinstance(v, dict) and v else {f"{prefix}{key}"})}

    return (dotted(read_config_file(config)) | dotted(flags)
            | {o.split("=", 1)[0].strip() for o in overrides})


class RankTask:
    """One task of the job = one rank of the served world; submitit requeues it on preemption/time-out."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        """The resolved config as a plain dict (pickled into the job)."""
        self.requeues = 0
        """How often `checkpoint()` requeued this task."""

    def __call__(self) -> Any:
        """Export RANK / WORLD_SIZE / MASTER_ADDR / ... of this task and run `run_rank`; return its result."""
        cfg = _task_config(self.config)
        stop_request.install()  # SIGUSR2 now only asks to stop at the next step boundary
        result = served.run_rank(cfg)
        if stopped_early(result) and int(os.environ["RANK"]) == 0:
            stop_request.chain()  # submitit's handler: checkpoint() below, requeue, exit
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called through submitit's handler by global rank 0 once the world stopped at a step
        boundary and the students saved (see `cot2align.preemption`): requeue this task, resuming
        from the run's checkpoint."""
        self.requeues += 1
        self.config = {**self.config, "run": {**self.config.get("run", {}), "resume": True}}
        return DelayedSubmission(self, *args, **kwargs)



def _task_config(config: dict[str, Any]) -> Config:
    """In a submitit task: export RANK / WORLD_SIZE / MASTER_ADDR / ... of this task (all GPUs of the
    node stay visible: the task selects cuda:LOCAL_RANK), set up logging; the validated config."""
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    use_master_addr_override()
    setup_console_logging()
    cfg = Config().merged(config)
    cfg.validate()
    return cfg


class CacheTask:
    """One task of the cache-teacher job = one rank of `cot2align cache-teacher` (this task's RANK /
    WORLD_SIZE: a whole HF teacher writing every WORLD_SIZE-th batch, or one megatron-core shard of
    a teacher replica); requeued on time-out, it continues where the journals end."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        """The resolved config of the cache job (teacher.cache.mode=write) as a plain dict."""

    def __call__(self) -> str:
        """Export this task's rank variables and write its share of the cache; returns the cache folder."""
        cfg = _task_config(self.config)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return str(cache_teacher(cfg))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Requeue as is: the writers skip the shards their journals list."""
        return DelayedSubmission(self, *args, **kwargs)


# ----------------------------------------------------------------------------- actions


def write_run_dir(prep: Prepared, script: str | None = None) -> None:
    """config.yaml, plan.md, logs/ (and submit.sh when given); warns when an existing run's config changed."""
    prep.logs.mkdir(parents=True, exist_ok=True)
    cfg_file = prep.run_dir / "config.yaml"
    if cfg_file.is_file():
        old = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        changed = changed_keys(old, prep.cfg.to_dict())
        if changed:
            shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            print(f"warning: {cfg_file} exists and this config differs in: {shown}", file=sys.stderr)
    cfg_file.write_text(prep.cfg.to_yaml(), encoding="utf-8")
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
    cfg = prep.cfg
    if not cfg.train.save_every:
        print("warning: train.save_every is 0: preemption and time-outs still checkpoint at a step boundary, "
              "but a failed node loses every step since the start; set train.save_every", file=sys.stderr)
    script = prep.sbatch_script()
    write_run_dir(prep, script)
    ex = SlurmExecutor(folder=prep.logs, max_num_timeout=cfg.launch.slurm.max_requeues)
    ex.update_parameters(**prep.sbatch_parameters())
    task = CacheTask(cfg.to_dict()) if prep.job == "cache-teacher" else RankTask(cfg.to_dict())
    job = ex.submit(task)
    submitted = Path(job.paths.submission_file)
    if submitted.is_file():  # what sbatch really got (same text as `script`)
        shutil.copyfile(submitted, prep.run_dir / "submit.sh")
    with (prep.run_dir / "job_ids.txt").open("a", encoding="utf-8") as f:
        f.write(f"{job.job_id}\n")
    n = prep.world_size
    out = prep.logs / f"{job.job_id}_<task>_log.out"  # submitit's %j_%t_log.out / .err
    after = f", after job {prep.dependency.split(':', 1)[1]} succeeds" if prep.dependency else ""
    print(f"submitted Slurm job {job.job_id} ({prep.job}{after}): {cfg.cluster.nodes} node(s) x "
          f"{cfg.cluster.gpus_per_node} task(s) = world size {n}")
    if prep.job == "cache-teacher":
        print(f"run dir:  {prep.run_dir}")
        print(f"logs:     {out} and .err, task 0..{n - 1}")
        return str(job.job_id)
    print(f"run dir:  {prep.run_dir} ({_resume_note(prep.run_dir)})")
    print(f"logs:     {out} and .err, task 0..{n - 1}")
    print(_wandb_line(cfg))
    print(f"resubmit: python launcher/submit.py --resume {prep.run_dir}")
    return str(job.job_id)


def submit_cache_first(cache_job: Prepared, distill_job: Prepared) -> tuple[str, str]:
    """Submit the cache-teacher job, then the distillation with --dependency=afterok on it.

    Returns both job ids."""
    first = submit_slurm(cache_job)
    distill_job.dependency = f"afterok:{first}"
    return first, submit_slurm(distill_job)


def _submit_local(prep: Prepared, task: RankTask | CacheTask) -> tuple[submitit.Job[Any], int]:
    """Write the run directory and start `task` as world_size LocalExecutor tasks; (the job, its GPUs)."""
    write_run_dir(prep)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ex = LocalExecutor(folder=prep.logs, max_num_timeout=prep.cfg.launch.slurm.max_requeues)
    gpus = _local_gpus(prep)
    ex.update_parameters(nodes=1, tasks_per_node=prep.world_size, gpus_per_node=gpus,
                         timeout_min=prep.cfg.launch.slurm.minutes, signal_delay_s=prep.cfg.launch.slurm.signal_delay_s)
    return ex.submit(task), gpus


def run_local_cache_job(prep: Prepared) -> int:
    """The cache-teacher job on this machine: world_size writers as LocalExecutor tasks; waits for them."""
    job, gpus = _submit_local(prep, CacheTask(prep.cfg.to_dict()))
    print(f"cache-teacher: {prep.world_size} writer(s) ({gpus} GPU(s)), job {job.job_id}, logs {prep.logs}")
    try:
        folders = job.results()
    except Exception as e:  # submitit re-raises a failed task's error with its traceback
        print(f"cache-teacher job failed: {e}", file=sys.stderr)
        return 1
    print(f"cache-teacher: done, cache in {folders[0]}")
    return 0


def run_local_world(prep: Prepared) -> int:
    """The same job on this machine: submitit LocalExecutor, one node, world_size tasks; waits for it."""
    job, gpus = _submit_local(prep, RankTask(prep.cfg.to_dict()))
    print(f"local world of {prep.world_size} rank(s) ({gpus} GPU(s)), job {job.job_id}")
    print(f"run dir:  {prep.run_dir}")
    print(f"logs:     {prep.logs}/{job.job_id}_<task>_log.out|err")
    try:
        results = job.results()
    except Exception as e:  # submitit re-raises a failed task's error with its traceback
        print(f"local world failed: {e}", file=sys.stderr)
        return 1
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
    return min(prep.world_size, torch.cuda.device_count())


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
    ap.add_argument("--cache-first", action="store_true",
                    help="two jobs on the same GPUs: cot2align cache-teacher (teacher replicas of tp x pp GPUs), then the "
                         "distillation with every GPU a student reading the cache (teacher replicas 0); on "
                         "Slurm the second waits for the first (afterok); needs teacher.cache.mode=read or auto")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 cluster.gpu_memory_gib=141")
    args = ap.parse_args(argv)
    if args.resume and args.config:
        ap.error("--resume RUN_DIR uses RUN_DIR/config.yaml; do not pass --config as well")
    if args.cache_first and args.resume:
        ap.error("--resume RUN_DIR resubmits the distillation only (its config reads the cache); "
                 "do not pass --cache-first as well")
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


def _run_pipeline(cfg: Config) -> int:
    """The embedded pipeline in this process (`cot2align pipeline`)."""
    run_embedded(cfg)
    return 0


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
    args = parse(argv)
    setup_console_logging()
    if not argv:  # the embedded default pipeline, here, even where Slurm is available
        return _run_pipeline(load_config())
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
        cache_job: Prepared | None = None
        if args.cache_first and not cluster_run and not args.world_size:
            raise ConfigError("--cache-first runs two jobs: on this machine give --world-size N (the ranks of "
                              "both jobs), or submit to Slurm")
        part = query_partition(cfg.launch.slurm.partition) if slurm and not args.prepare else None
        if part is not None:
            cfg = fit_to_partition(cfg, part, given_keys(config, args.overrides, flags))
        elif slurm and not args.prepare:
            print(f"warning: sinfo did not report partition {cfg.launch.slurm.partition or '(the default)'}: "
                  "the request is not checked against it", file=sys.stderr)
        if cluster_run:
            if args.cache_first:
                cache_job, prep = prepare_cache_first(cfg)
                cache_job.partition = part
            else:
                prep = prepare(cfg)
            prep.partition = part
            problems = partition_problems(prep.cfg.launch.slurm, prep.cfg.cluster, part) if part else []
            if problems:
                raise ConfigError("the job does not fit " + "; ".join(problems))
        elif args.world_size:
            if args.cache_first:
                cache_job, prep = prepare_cache_first(cfg, args.world_size)
            else:
                prep = prepare(cfg, args.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if prep is None:  # one node, no Slurm (or --local): the pipeline in this process
        return _run_pipeline(cfg)
    if args.dry_run and cache_job is not None:
        print(f"# Cache-teacher job ({cache_job.run_dir}), first\n")
        print(cache_job.plan_markdown())
        print(cache_job.sbatch_script())
        prep.dependency = "afterok:<cache-teacher job id>"
    if args.dry_run:
        print(f"# Resolved config ({prep.run_dir / 'config.yaml'})\n")
        print(prep.cfg.to_yaml())
        print(f"# Plan ({prep.run_dir / 'plan.md'})\n")
        print(prep.plan_markdown())
        print(f"# sbatch script ({prep.run_dir / 'submit.sh'})\n")
        print(prep.sbatch_script())
        print(f"dry run: nothing submitted, nothing written; run directory would be {prep.run_dir}")
        return 0
    if args.prepare:
        if cache_job is not None:
            write_run_dir(cache_job, cache_job.sbatch_script())
        write_run_dir(prep, prep.sbatch_script())
        print(prep.run_dir)
        return 0
    if slurm:
        if cache_job is not None:
            submit_cache_first(cache_job, prep)
        else:
            submit_slurm(prep)
        return 0
    if cache_job is not None:
        rc = run_local_cache_job(cache_job)
        if rc:
            return rc
    return run_local_world(prep)


def rank_main(argv: list[str]) -> int:
    """`python -m cot2align.launch.submit rank --config RUN_DIR/config.yaml`: one rank under a hand-written srun.

    Reads the rank layout of the Slurm task through submitit's environment helpers (as the
    submitit job does) and runs `cot2align.recipes.served.run_rank`.
    """
    ap = argparse.ArgumentParser(prog="cot2align.launch.submit rank")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    setup_console_logging()
    cfg = load_config(args.config, args.overrides)
    if "SLURM_JOB_ID" in os.environ:
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        use_master_addr_override()
    stop_request.install()  # the batch script passes SIGUSR2 on to every rank
    result = served.run_rank(cfg)
    if stopped_early(result) and int(os.environ["RANK"]) == 0 and "SLURM_JOB_ID" in os.environ:
        print(f"stopped early: requeueing job {os.environ['SLURM_JOB_ID']}", flush=True)
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
