"""The served runtime: one torch.distributed world, teacher ranks serve, student ranks train.

    world = [ teacher replica 0: TP x PP ranks | replica 1 | ... | student DP ranks ]

`run_rank(cfg)` is what every process of the world runs (the local launcher below and
the cluster launcher call it): it initialises torch.distributed (gloo on CPU, nccl on
GPU), builds the `Topology`, creates the process groups once, and dispatches by role:
teacher ranks run `teacher.serve.serve`, student ranks run the ONE training loop
(`train.train`) with a `ServedTeacher` as teacher source and DeepSpeed (over the student
group only) as optimizer. `launch_local(cfg, world_size)` spawns such a world on this
machine and returns what the first student returned.

`colocated` mode (teacher in the student's process, no world) is `pipeline.distill`'s
single-process path and the reference the served mode is tested against.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.distributed as dist

from cot2align.configbase import ConfigBase, require

if TYPE_CHECKING:
    from cot2align.config import Config
    from cot2align.topology import Topology


@dataclass
class RuntimeConfig(ConfigBase):
    """How teacher and students run (`runtime.*`)."""

    mode: Literal["colocated", "served"] = "colocated"
    """colocated: the teacher runs in the student's process; served: teacher ranks
    (teacher.parallel) serve hidden states to student ranks (student.parallel)."""
    teacher_backend: Literal["hf", "megatron"] = "hf"
    """hf: the HF teacher on one rank per replica (tp = pp = 1); megatron: megatron-core
    shards over teacher.parallel.tp x teacher.parallel.pp ranks (Llama-family teachers)."""
    prefetch: int = 2
    """Micro-batches a teacher rank computes ahead of each student it serves (0 = in lockstep)."""
    timeout_s: float = 300.0
    """Deadline of every receive of teacher states on a student, after the first one."""
    startup_timeout_s: float = 1800.0
    """Deadline of start-up (process groups, the first request and the first states) and of a
    student accepting sent states (students may pause for evaluation and checkpoints)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl when CUDA is available, else gloo."""
    wire_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the states on the wire; auto = bfloat16 on GPU, float32 on CPU."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage of the students (0-3; 1 partitions the optimizer state, 2 also the
    gradients, 3 also the weights: evaluation, export and checkpoints then gather them, one
    module at a time, from every student into a whole copy kept on the first student; every
    student then calls the same modules in each micro-batch, as every micro-batch runs the
    step's formats: see cot2align.data.dataset.collate)."""
    zero3_persist_below: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every student (DeepSpeed's
    stage3_param_persistence_threshold; 0 = partition every parameter)."""
    world_size: int = 0
    """Processes of a local launch (0 = teacher ranks + student.parallel.dp, dp -1 counting as 1)."""

    def check(self, prefix: str) -> None:
        require(self.prefetch >= 0, f"{prefix}.prefetch", f"must be >= 0, got {self.prefetch}")
        require(self.timeout_s > 0, f"{prefix}.timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.startup_timeout_s > 0, f"{prefix}.startup_timeout_s",
                f"must be > 0, got {self.startup_timeout_s}")
        require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage",
                f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        require(self.zero3_persist_below >= 0, f"{prefix}.zero3_persist_below",
                f"must be >= 0, got {self.zero3_persist_below}")
        require(self.world_size >= 0, f"{prefix}.world_size", f"must be >= 0, got {self.world_size}")


def check_served(cfg: Config) -> None:
    """Cross-section checks of a served run (before anything heavy starts)."""
    tp = cfg.teacher.parallel
    require(tp.replicas >= 1, "teacher.parallel.replicas", "must be >= 1 in runtime.mode=served")
    if cfg.runtime.teacher_backend == "hf":
        require(tp.tp == 1 and tp.pp == 1, "teacher.parallel.tp",
                f"runtime.teacher_backend=hf runs the teacher on one rank: tp and pp must be 1 "
                f"(got tp={tp.tp}, pp={tp.pp}); use runtime.teacher_backend=megatron to shard it")


def local_world_size(cfg: Config) -> int:
    """World size of a local launch: runtime.world_size, else teacher ranks + students."""
    if cfg.runtime.world_size:
        return cfg.runtime.world_size
    tp = cfg.teacher.parallel
    return tp.tp * tp.pp * tp.replicas + max(cfg.student.parallel.dp, 1)


def describe_rank(topo: Topology, rank: int) -> str:
    """"teacher rank 1 (replica 0, pp 0, tp 1)" / "student rank 3 (dp 1)"."""
    if topo.role(rank) == "teacher":
        c = topo.teacher_coord(rank)
        return f"teacher rank {rank} (replica {c.replica}, pp {c.pp_rank}, tp {c.tp_rank})"
    return f"student rank {rank} (dp {topo.student_index(rank)})"


def _device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend(cfg: RuntimeConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _wire_dtype(cfg: RuntimeConfig, device: torch.device) -> torch.dtype:
    name = cfg.wire_dtype if cfg.wire_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# --------------------------------------------------------------------------- one rank
def run_rank(cfg: Config) -> Any:
    """Entry point of every process of the world (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the
    environment). Returns the rank's result: a TrainResult on students, ServeStats on teachers."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = _backend(cfg.runtime)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif not cfg.train.threads:  # share the cores of this node between its processes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=cfg.runtime.startup_timeout_s))
    try:
        if rank == 0:
            _prepare(cfg)
        dist.barrier()
        return run_world(cfg)
    finally:
        dist.destroy_process_group()


def _prepare(cfg: Config) -> None:
    """Data, tokenizers and (embedded) teacher, once per run, before the ranks read them."""
    from cot2align.pipeline import prepare_data, train_teacher

    p = prepare_data(cfg)
    if not (p.teacher_model / "config.json").is_file():
        if cfg.teacher.path:
            raise FileNotFoundError(f"teacher.path: {p.teacher_model} is not an HF checkpoint")
        train_teacher(cfg)
    if cfg.cot.enabled and cfg.data.use_cot:  # teacher rationales (resumes / reuses its output)
        from cot2align.cot import generate_cot

        generate_cot(cfg)


def run_world(cfg: Config, run_dir: Path | None = None) -> Any:
    """This rank's part of a served run in an initialised world (see the module docstring)."""
    from cot2align.topology import Topology

    check_served(cfg)
    topo = Topology(cfg.teacher.parallel, cfg.student.parallel)
    topo.create_groups(timeout=timedelta(seconds=cfg.runtime.startup_timeout_s))
    from cot2align.transport import Transport

    device = _device(dist.get_backend())
    transport = Transport(describe=lambda r: describe_rank(topo, r), device=device,
                          send_timeout_s=cfg.runtime.startup_timeout_s)
    if topo.role() == "teacher":
        return _teacher(cfg, topo, transport, device)
    return _student(cfg, topo, transport, device, run_dir or cfg.run_dir)


def _data(cfg: Config) -> tuple[Any, Any, list[Any], Any]:
    from cot2align.models import load_tokenizer
    from cot2align.pipeline import _samples, paths

    p = paths(cfg)
    if cfg.cot.enabled and cfg.data.use_cot:  # train on the rationales `_prepare` generated
        from cot2align.cot.generate import output_path

        p = dataclasses.replace(p, train=output_path(cfg))
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    return s_tok, t_tok, _samples(cfg, cfg.data, s_tok, t_tok, p), p


def _teacher(cfg: Config, topo: Topology, transport: Any, device: torch.device) -> Any:
    from cot2align.models import DTYPES, load_model
    from cot2align.teacher.serve import HFHiddenStates, HiddenStates, MegatronHiddenStates, serve

    s_tok, t_tok, samples, p = _data(cfg)
    states: HiddenStates
    if cfg.runtime.teacher_backend == "megatron":
        from cot2align.teacher.megatron_model import MegatronTeacher

        teacher = MegatronTeacher(p.teacher_model, topo.teacher_pg_collection(), dtype=DTYPES[cfg.teacher.dtype])
        states = MegatronHiddenStates(teacher, sends=topo.teacher_coord().tp_rank == 0)
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")
        states = HFHiddenStates(load_model(p.teacher_model, cfg.teacher.dtype), device, autocast)
    return serve(topo=topo, transport=transport, states=states, samples=samples,
                 pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}, seed=cfg.run.seed,
                 prefetch=cfg.runtime.prefetch, wire_dtype=_wire_dtype(cfg.runtime, device),
                 request_timeout_s=cfg.runtime.startup_timeout_s)


class _Silent:
    """Metrics logger of the students other than the first (train() logs on the first only)."""

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def _student(cfg: Config, topo: Topology, transport: Any, device: torch.device, run_dir: Path) -> Any:
    from cot2align.data.sampler import GlobalBatchSampler
    from cot2align.logging import MetricsLogger
    from cot2align.lora import base_model
    from cot2align.losses import LossContext, build_loss
    from cot2align.models import DTYPES, hidden_size
    from cot2align.pipeline import _student_model, _write_run_files, load_split
    from cot2align.preemption import stop_request
    from cot2align.student.engine import DeepSpeedStepper, StudentMPU
    from cot2align.student.served import ServedTeacher
    from cot2align.student.teacher_io import load_teacher_io
    from cot2align.train import DataParallel, train

    s_tok, t_tok, samples, p = _data(cfg)
    dp = DataParallel(size=topo.dp, rank=topo.student_index(), group=topo.student_group(), device=device)
    student = _student_model(cfg, s_tok)
    # transformers writes checkpoints only on global rank 0 of an initialised world, which here is
    # a teacher rank: let the first student (the only one that exports) write them.
    setattr(base_model(student), "should_save_on_this_rank", lambda is_main_process: is_main_process)  # noqa: B010
    io = load_teacher_io(p.teacher_model, DTYPES[cfg.teacher.dtype], device)
    same = s_tok.get_vocab() == t_tok.get_vocab()
    ctx = LossContext(hidden_size(student), io.hidden_size, len(s_tok), len(t_tok), same, s_tok, t_tok,
                      cache_dir=str(Path(cfg.run.work_dir) / "cache"))
    loss_fn = build_loss(cfg.loss, ctx)
    needs_teacher = cfg.loss.name != "sft"
    needs_aux = cfg.loss.name == "cot2align" and cfg.loss.ot.cross_pairs
    tc = cfg.train
    sampler = GlobalBatchSampler(len(samples), tc.micro_batch_size, tc.grad_accum, topo.dp, cfg.run.seed)
    replica = topo.replica_of()
    teacher = ServedTeacher(
        transport, io, sampler, dp.rank, topo.teacher_ranks(replica),
        {x: topo.sender_rank(replica, x, io.num_layers) for x in range(io.num_layers + 1)},
        _wire_dtype(cfg.runtime, device), cfg.runtime.timeout_s, cfg.runtime.startup_timeout_s, cfg.run.seed)
    if not needs_teacher:  # tell the replica there is nothing to serve
        teacher.start(0, 0, [], [])
    # DeepSpeed all-reduces gradient norms over a "model-parallel" group: each student alone
    mpu = StudentMPU(dp, topo.student_ranks, topo.student_self_group())

    def make_stepper(total_steps: int) -> DeepSpeedStepper:
        return DeepSpeedStepper(student, loss_fn, tc, cfg.loss.projector_lr, total_steps, cfg.runtime.zero_stage,
                                mpu, cfg.runtime.zero3_persist_below)

    main = dp.rank == 0
    if main:
        _write_run_files(cfg, run_dir, "distill (served)")
    plan = run_dir / "plan.md"  # written by the launcher
    logged = {**cfg.to_dict(), **({"plan": plan.read_text()} if plan.is_file() else {})}
    logger = MetricsLogger(run_dir, cfg.logging, logged, name=cfg.run.name) if main else _Silent()
    t0 = time.perf_counter()
    try:
        res = train(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn,
                    teacher=teacher if needs_teacher else None, samples=samples,
                    pad_ids={"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}, cfg=tc,
                    projector_lr=cfg.loss.projector_lr, needs_aux=needs_aux, seed=cfg.run.seed,
                    logger=cast(MetricsLogger, logger), log_cfg=cfg.logging,
                    dev=load_split(p.dev, cfg.data) if main else None, eval_cfg=cfg.eval if main else None,
                    resume=cfg.run.resume, make_stepper=make_stepper, data_parallel=dp, device=device,
                    should_stop=lambda: stop_request.requested)
        if not needs_teacher:  # the replica waits for this student's last word
            if res.interrupted:
                teacher.stop(res.steps)
            else:
                teacher.done()
        logger.log(res.steps, {"wall_s": time.perf_counter() - t0, "received_bytes": teacher.bytes_received,
                               "received_positions": teacher.positions_received}, prefix="distill/")
    finally:
        logger.close()
    return res


# --------------------------------------------------------------------------- local launcher
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(cfg: Config, rank: int, world: int, port: int, results: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        results.put((rank, run_rank(cfg), None))
    except BaseException as e:
        results.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class WorldError(RuntimeError):
    """Ranks of a local world failed; `failures` maps each failed rank to its error."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        lines = [f"{len(failures)} rank(s) failed:"]
        for rank, err in sorted(failures.items()):
            lines.append(f"--- rank {rank}: {err.strip()}")
        super().__init__("\n".join(lines))


def launch_local(cfg: Config, world_size: int | None = None, env: dict[str, str] | None = None,
                 timeout_s: float | None = None, return_all: bool = False) -> Any:
    """Run a served world of `world_size` processes on this machine; return the first student's result
    (return_all: every rank's, by rank: ServeStats on teachers, TrainResult on students).

    On a failure the other ranks get until their own deadlines (runtime.timeout_s) to report
    what they saw (or until every student has finished), then everything still running is killed and `WorldError` lists every
    failed rank's error. timeout_s bounds the whole run (default: none). env: extra
    environment variables of the ranks (fault injection in tests).
    """
    import torch.multiprocessing as mp

    from cot2align.topology import Topology

    world = world_size or local_world_size(cfg)
    students = Topology(cfg.teacher.parallel, cfg.student.parallel, world, 0).student_ranks
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_local_worker, args=(cfg, r, world, port, results, env or {}), daemon=False)
             for r in range(world)]
    for proc in procs:
        proc.start()
    overall = time.monotonic() + timeout_s if timeout_s else float("inf")
    grace = float("inf")  # after a failure: until the others' own deadlines have passed
    done: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        while len(done) + len(failures) < world and time.monotonic() < min(overall, grace):
            try:
                rank, result, error = results.get(timeout=0.5)
            except queue.Empty:
                for r, proc in enumerate(procs):
                    if r not in done and r not in failures and proc.exitcode not in (None, 0):
                        failures[r] = f"process exited with code {proc.exitcode} without reporting"
                        grace = min(grace, time.monotonic() + cfg.runtime.timeout_s + 60)
                continue
            if error is None:
                done[rank] = result
            else:
                failures[rank] = error
                grace = min(grace, time.monotonic() + cfg.runtime.timeout_s + 60)
            if failures and all(s in done or s in failures for s in students):
                grace = min(grace, time.monotonic() + 2)  # every student is finished: no need to wait longer
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
        results.close()
        results.join_thread()
    missing = [r for r in range(world) if r not in done and r not in failures]
    for r in missing:
        failures[r] = "did not finish before the deadline (killed)"
    if failures:
        raise WorldError(failures)
    return [done[r] for r in range(world)] if return_all else done[students[0]]
