"""The layout of a cluster run: the planner's choice of teacher tp x pp x replicas and student dp
for `cluster.*`, written into the config, checked against the world before anything is submitted."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cot2align.config import Config
from cot2align.configbase import ConfigError, require
from cot2align.distributed.topology import Topology
from cot2align.launch.slurm import Partition, render_sbatch, sbatch_parameters
from cot2align.modelspec import ModelSpec, load_model_spec, model_spec_from_hf_config, resolve_model_config
from cot2align.plan import CachedLayout, Plan, WorkloadSpec, cached_plan, plan, teacher_memory
from cot2align.recipes.served import check_served, without_teacher_ranks

SIZE_KEYS: dict[str, str] = {
    "tp": "teacher.parallel.tp",
    "pp": "teacher.parallel.pp",
    "replicas": "teacher.parallel.replicas",
    "dp": "student.parallel.dp",
}
"""Config keys of the four layout sizes the planner chooses (or checks)."""


def workload_for(cfg: Config) -> WorkloadSpec:
    """The planner's workload derived from data / train / loss / runtime, then `launch.workload`."""
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
        examples=_count_examples(Path(cfg.data.train_file)) if cfg.data.train_file else 0,
        cache_dtype=cfg.teacher.cache.dtype,
        student_lora_rank=cfg.student_lora.r if cfg.student_lora.enabled else 0,
        student_lora_targets=list(cfg.student_lora.target_modules) if cfg.student_lora.enabled else [],
    )
    return wl.merged(cfg.launch.workload, "launch.workload")


def _count_examples(path: Path) -> int:
    """Non-empty lines of a JSONL file (0 when it is not on this machine: the disk estimate is then per example)."""
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _model_ref(explicit: str, path: str, role: str) -> tuple[str | None, str]:
    """(what the planner reads for `role`: a config.json / preset, '' = the embedded tiny model;
    or None and why not)."""
    if explicit:
        return explicit, ""
    if not path:
        return "", ""  # the embedded tiny model: see embedded_model_spec
    try:
        resolve_model_config(path)
    except ConfigError:
        return None, (f"{role}.path {path!r} has no config.json on this machine; set launch.{role}_config "
                      "to a config.json or a configs/models/ preset to plan")
    return path, ""


def embedded_model_spec(cfg: Config, role: Literal["teacher", "student"]) -> ModelSpec:
    """The planner's view of the embedded tiny model of `role` (`embedded.<role>_model`, its tokenizer's vocab)."""
    tiny = getattr(cfg.embedded, f"{role}_model")
    vocab = getattr(cfg.embedded, f"{role}_tokenizer").vocab_size
    if tiny.arch == "gpt2":
        hf: dict[str, Any] = {"model_type": "gpt2", "n_embd": tiny.hidden, "n_layer": tiny.layers, "n_head": tiny.heads,
                              "n_inner": tiny.intermediate, "vocab_size": vocab, "n_positions": tiny.max_positions}
    else:
        hf = {"model_type": tiny.arch, "hidden_size": tiny.hidden, "num_hidden_layers": tiny.layers,
              "num_attention_heads": tiny.heads, "num_key_value_heads": tiny.kv_heads,
              "intermediate_size": tiny.intermediate, "vocab_size": vocab, "tie_word_embeddings": False}
    return model_spec_from_hf_config(hf, f"embedded {role}")


def fit_to_partition(cfg: Config, part: Partition, given: set[str]) -> Config:
    """On a CPU partition, the keys the user did not give follow its nodes: one task per node
    (`cluster.gpus_per_node`; node CPUs // cpus_per_task when --cpus-per-task is given) using
    all of the node's CPUs (`launch.slurm.cpus_per_task`). A GPU partition keeps the config."""
    if part.gpus > 0:
        return cfg
    cpt = cfg.launch.slurm.cpus_per_task
    tasks = cfg.cluster.gpus_per_node
    if "cluster.gpus_per_node" not in given:
        tasks = max(1, part.cpus // cpt) if "launch.slurm.cpus_per_task" in given else 1
    if "launch.slurm.cpus_per_task" not in given:
        cpt = max(1, part.cpus // tasks)
    return cfg.merged({"cluster": {"gpus_per_node": tasks}, "launch": {"slurm": {"cpus_per_task": cpt}}})


def _model_specs(cfg: Config) -> tuple[ModelSpec, ModelSpec] | str:
    """(teacher, student) as the planner sees them, or why they cannot be read here."""
    teacher, why_t = _model_ref(cfg.launch.teacher_config, cfg.teacher.path, "teacher")
    student, why_s = _model_ref(cfg.launch.student_config, cfg.student.path, "student")
    if teacher is None or student is None:
        return why_t or why_s
    return (load_model_spec(teacher) if teacher else embedded_model_spec(cfg, "teacher"),
            load_model_spec(student) if student else embedded_model_spec(cfg, "student"))


def cached_plan_for(cfg: Config) -> tuple[CachedLayout | None, str]:
    """The cached layout of a students-only run (teacher.parallel.replicas = 0) on `cfg.cluster`, or
    (None, why not). Raises ConfigError when a student rank does not fit."""
    specs = _model_specs(cfg)
    if isinstance(specs, str):
        return None, specs
    return cached_plan(specs[0], specs[1], cfg.cluster, workload_for(cfg)), ""


def plan_for(cfg: Config) -> tuple[Plan | None, str]:
    """The planner's layout for `cfg.cluster`, or (None, why no plan was made).

    Sizes named in `launch.fixed` are kept (the hf teacher backend fixes tp = pp = 1).
    Raises ConfigError (naming keys and numbers) when no layout fits.
    """
    if not cfg.launch.plan:
        return None, "launch.plan is false"
    specs = _model_specs(cfg)
    if isinstance(specs, str):
        return None, specs
    sizes = {"tp": cfg.teacher.parallel.tp, "pp": cfg.teacher.parallel.pp,
             "replicas": cfg.teacher.parallel.replicas, "dp": cfg.student.parallel.dp}
    fixed: dict[str, int | None] = {k: (sizes[k] if k in cfg.launch.fixed and sizes[k] >= 1 else None)
                                    for k in SIZE_KEYS}
    if cfg.runtime.teacher_backend == "hf":  # one rank per replica
        fixed["tp"], fixed["pp"] = 1, 1
    return plan(specs[0], specs[1], cfg.cluster, workload_for(cfg), fixed, SIZE_KEYS), ""


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
    partition: Partition | None = None
    """The Slurm partition as sinfo reported it (None: not asked, e.g. a local world or no Slurm)."""
    cached: CachedLayout | None = None
    """The students-only layout of a run from the teacher-state cache (teacher replicas 0)."""
    dependency: str = ""
    """sbatch --dependency of the job, e.g. afterok:4242 ('' = none)."""
    job: Literal["distill", "cache-teacher"] = "distill"
    """What the job runs: the served world (`run_rank`) or the cache writers (`cache_teacher`)."""

    @property
    def world_size(self) -> int:
        """nodes * gpus_per_node: one rank per GPU."""
        return self.cfg.cluster.world_size

    @property
    def logs(self) -> Path:
        """submitit's folder: the per-rank logs and its pickles."""
        return self.run_dir / "logs"

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit SlurmExecutor parameters of this job (see `launch.slurm.sbatch_parameters`)."""
        params = sbatch_parameters(self.cfg.launch.slurm, self.cfg.cluster, self.cfg.run.name, self.partition)
        if self.dependency:
            params["additional_parameters"] = {**params["additional_parameters"], "dependency": self.dependency}
        return params

    def sbatch_script(self) -> str:
        """The sbatch script submitit will write for this job."""
        return render_sbatch(self.sbatch_parameters(), self.logs)

    def plan_markdown(self) -> str:
        """plan.md: the plan's tables, or why there is none and the layout used."""
        t, s = self.cfg.teacher.parallel, self.cfg.student.parallel
        if self.job == "cache-teacher":
            cache = self.cfg.teacher.cache
            where = f"into {cache.dir or '<run.work_dir>/teacher-cache'} ({cache.dtype})"
            if t.tp * t.pp > 1:
                idle = self.world_size - t.replicas * t.tp * t.pp
                how = (f"{self.world_size} ranks run `cot2align cache-teacher` as {t.replicas} megatron-core teacher "
                       f"replica(s) of tp {t.tp} x pp {t.pp}, each forwarding every {t.replicas}-th batch"
                       f"{f' ({idle} GPU(s) idle)' if idle else ''}; tp rank 0 of each stage writes that stage's "
                       f"layers {where}; rank 0 seals the manifest.")
            else:
                how = (f"{self.world_size} writer(s) run `cot2align cache-teacher` (one HF teacher each, every "
                       f"{self.world_size}-th batch) {where}; the last one to finish seals the manifest.")
            return f"## Cache-teacher job: {t.replicas} teacher replica(s) x (tp {t.tp} x pp {t.pp}), no students\n\n{how}\n"
        if self.cached is not None:
            return self.cached.to_markdown()
        if self.plan is not None:
            return self.plan.to_markdown()
        return (f"No plan: {self.plan_note}.\n\nLayout from the config: {t.replicas} teacher replica(s) x "
                f"(tp {t.tp} x pp {t.pp}), student dp {s.dp} (-1 = the rest), world size {self.world_size}.\n")


def prepare(cfg: Config, world_size: int | None = None) -> Prepared:
    """Resolve a served run for `world_size` ranks (default: the cluster's GPUs): plan, check the layout.

    Raises ConfigError naming the key when the layout cannot work (before anything is submitted).
    """
    if cfg.runtime.mode != "served":
        print("note: a cluster job runs the served world: runtime.mode=served", file=sys.stderr)
        cfg = cfg.merged({"runtime": {"mode": "served"}})
    if world_size:  # a local world: one node, one task per rank
        cfg = cfg.merged({"cluster": {"nodes": 1, "gpus_per_node": world_size}})
    world = cfg.cluster.world_size
    if cfg.teacher.cache.mode == "read":  # students only: every rank reads the cache
        cfg = students_only(cfg, world)
        cached, note = (cached_plan_for(cfg) if world_size is None and cfg.launch.plan
                        else (None, "a local world is not planned"))
        cfg.validate()
        check_served(cfg)
        Topology(cfg.teacher.parallel, cfg.student.parallel, world, 0)
        return Prepared(cfg, None, note, cfg.run_dir.resolve(), cached=cached)
    result, note = plan_for(cfg) if world_size is None else (None, "a local world is not planned")
    if result is not None:
        cfg = apply_plan(cfg, result)
    cfg.validate()
    check_served(cfg)
    Topology(cfg.teacher.parallel, cfg.student.parallel, world, 0)  # sizes add up to the world
    return Prepared(cfg, result, note, cfg.run_dir.resolve())


def students_only(cfg: Config, world: int) -> Config:
    """`cfg` as a run from the teacher-state cache on `world` ranks: teacher replicas 0 (tp = pp = 1),
    every rank a student (student.parallel.dp = world), teacher.cache.mode=read."""
    return without_teacher_ranks(cfg).merged({"teacher": {"cache": {"mode": "read"}}, "student": {"parallel": {"dp": world}},
                                              "launch": {"fixed": list(SIZE_KEYS)}})


CACHE_JOB_DIR = "cache-teacher"
"""Sub-folder of the run directory holding the cache-teacher job's config, plan, script and logs."""


def prepare_cache_first(cfg: Config, world_size: int | None = None) -> tuple[Prepared, Prepared]:
    """Two jobs on the same GPUs: (a) cache-teacher, (b) the distillation from the cache.

    (a) runs the teacher layout on the GPUs, with teacher.cache.mode=write: replicas = floor(world /
    (tp x pp)) writers (`cot2align cache-teacher`, every replicas-th batch each): one whole HF teacher
    per GPU when tp = pp = 1, else megatron-core shards (runtime.teacher_backend=megatron, for a
    teacher no GPU holds alone); (b) is the students-only world (teacher replicas 0, dp = world,
    teacher.cache.mode=read). Raises ConfigError naming the key when the config cannot run this way.
    """
    mode = cfg.teacher.cache.mode
    require(mode in ("read", "auto"), "teacher.cache.mode",
            f"must be read or auto with --cache-first (the distillation reads the cache the first job writes); "
            f"got {mode!r}")
    if world_size:
        cfg = cfg.merged({"cluster": {"nodes": 1, "gpus_per_node": world_size}})
    t, world = cfg.teacher.parallel, cfg.cluster.world_size
    size = t.tp * t.pp
    require(size == 1 or cfg.runtime.teacher_backend == "megatron", "runtime.teacher_backend",
            f"is {cfg.runtime.teacher_backend!r}: a teacher sharded tp {t.tp} x pp {t.pp} is run by megatron-core; "
            "set runtime.teacher_backend=megatron (or tp = pp = 1: one whole HF teacher per GPU)")
    require(world >= size, "teacher.parallel.tp" if t.tp > 1 else "teacher.parallel.pp",
            f"--cache-first runs whole teacher replicas of tp {t.tp} x pp {t.pp} = {size} GPUs, but the job has "
            f"{world} (cluster.nodes x cluster.gpus_per_node)")
    specs = _model_specs(cfg)
    wl = workload_for(cfg)
    if not isinstance(specs, str):
        teacher = specs[0]
        writers = Topology(t.merged({"replicas": world // size}), cfg.student.parallel.merged({"dp": 0}), world, 0)
        writers.check_teacher_model(teacher.num_layers, teacher.num_heads, teacher.num_kv_heads)
        if cfg.launch.plan:  # one replica's shard must fit a GPU
            tm = teacher_memory(teacher, cfg.cluster, wl, t.tp, t.pp, 1)
            require(tm.fits, "cluster.gpu_memory_gib",
                    f"--cache-first puts a tp {t.tp} x pp {t.pp} teacher shard on each GPU: it needs {tm.describe()} "
                    f"> {cfg.cluster.usable_gib:.2f} GiB usable; raise teacher.parallel.tp or pp")
    run_dir = cfg.run_dir.resolve()
    write = cfg.merged({
        "teacher": {"parallel": {"replicas": world // size}, "cache": {"mode": "write"}},
        "student": {"parallel": {"dp": 0}},  # the cache job has no students
        "launch": {"slurm": {"job_name": f"{cfg.launch.slurm.job_name or cfg.run.name}-cache-teacher"}},
    })
    write.validate()
    cache_job = Prepared(write, None, "the cache-teacher job is not planned", run_dir / CACHE_JOB_DIR,
                         job="cache-teacher")
    distill_job = prepare(cfg.merged({"teacher": {"cache": {"mode": "read"}}}), world_size)
    return cache_job, distill_job
