"""The served recipe: one torch.distributed world, teacher ranks serve, student ranks train.

    world = [ teacher replica 0: TP x PP ranks | replica 1 | ... | student DP ranks ]

`run_rank(cfg)` is what every process of the world runs (the local launcher below and the
cluster launcher call it): it initialises torch.distributed (gloo on CPU, nccl on GPU), builds
the `Topology`, creates the process groups once, and dispatches by role: teacher ranks run
`teacher.serve.serve`, student ranks run the ONE training loop (`train.train`) with a
`ServedTeacher` as teacher source and DeepSpeed (over the student group only) as optimizer.
With `teacher.cache.mode=auto` the teacher source switches (`recipes.cache.served_then_cached`):
the teacher ranks serve the first epoch, seal the cache and return (their processes end while the
students train on), and each student reads the rest of the run from the cache; over a complete
cache the students ask the teacher ranks for nothing and read from the first step (`launch_local`
then starts no teacher rank at all).
`launch_local(cfg)` spawns such a world on this machine and returns what the first student
returned. The colocated recipe (`recipes.colocated`) is the reference it is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from cot2align.config import Config
from cot2align.configbase import require
from cot2align.data.dataset import Sample
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.distributed.failures import BLAME_WAIT_S, blame, check_in, check_out, hold_store
from cot2align.distributed.parallel import DataParallel
from cot2align.distributed.spawn import spawn_world
from cot2align.distributed.topology import Topology
from cot2align.distributed.transport import Transport
from cot2align.distributed.world import close_world, device_of, init_world, wire_dtype
from cot2align.logging import log
from cot2align.lora import base_model
from cot2align.models import DTYPES, load_model, load_tokenizer
from cot2align.preemption import stop_request
from cot2align.recipes.build import callbacks, distill_loss, needs, open_logger, student_model
from cot2align.recipes.cache import (
    cache_dir,
    cache_key,
    cached_teacher,
    loss_layers,
    resolve_mode,
    run_formats,
    served_then_cached,
)
from cot2align.recipes.inputs import ensure_inputs, input_paths
from cot2align.recipes.prepare import Paths, load_split, read_samples, write_run_files
from cot2align.student.cached import CachedTeacher, SwitchingTeacher
from cot2align.student.engine import DeepSpeedStepper, StudentMPU
from cot2align.student.served import ServedTeacher
from cot2align.student.teacher_io import load_teacher_io
from cot2align.teacher.cache import CacheWriter, is_complete
from cot2align.teacher.megatron_model import MegatronTeacher
from cot2align.teacher.serve import (
    CacheTap,
    HFHiddenStates,
    HiddenStates,
    MegatronHiddenStates,
    ServeStats,
    serve,
)
from cot2align.train import TrainJob, TrainResult, train


def check_served(cfg: Config) -> None:
    """Cross-section checks of a served run (before anything heavy starts)."""
    tp = cfg.teacher.parallel
    require(cfg.student.parallel.dp != 0, "student.parallel.dp",
            "is 0 (no student rank): only the cache-teacher job runs without students; a distillation needs "
            ">= 1, or -1 (every rank the teachers do not use)")
    require(tp.replicas >= 1 or cfg.teacher.cache.mode in ("read", "auto"), "teacher.parallel.replicas",
            "must be >= 1 in runtime.mode=served (0 only with teacher.cache.mode=read: students read the cache)")
    require(tp.replicas == 0 or cfg.teacher.cache.mode != "read", "teacher.cache.mode",
            f"is read: the students read every state from the cache, so teacher.parallel.replicas must be 0 "
            f"(got {tp.replicas}; the local launcher sets it)")
    if cfg.runtime.teacher_backend == "hf":
        require(tp.tp == 1 and tp.pp == 1, "teacher.parallel.tp",
                f"runtime.teacher_backend=hf runs the teacher on one rank: tp and pp must be 1 "
                f"(got tp={tp.tp}, pp={tp.pp}); use runtime.teacher_backend=megatron to shard it")


def without_teacher_ranks(cfg: Config) -> Config:
    """`cfg` as a run from a complete teacher-state cache records it: no teacher rank (replicas 0,
    tp = pp = 1), every rank a student."""
    return cfg.merged({"teacher": {"parallel": {"replicas": 0, "tp": 1, "pp": 1}}})


def local_world_size(cfg: Config) -> int:
    """World size of a local launch: runtime.world_size, else teacher ranks + students."""
    if cfg.runtime.world_size:
        return cfg.runtime.world_size
    tp = cfg.teacher.parallel
    return tp.tp * tp.pp * tp.replicas + max(cfg.student.parallel.dp, 1)


# --------------------------------------------------------------------------- one rank
def run_rank(cfg: Config) -> Any:
    """Entry point of every process of the world (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the
    environment). Returns the rank's result: a TrainResult on students, ServeStats on teachers."""
    init_world(cfg.runtime, cfg.train.threads)
    rank = dist.get_rank()
    try:
        if rank == 0:
            ensure_inputs(cfg)  # data, tokenizers, teacher, rationales: once, before the ranks read them
        dist.barrier()
        result = run_world(cfg)
        if rank == 0:  # the store lives in this process: up for as long as the other ranks may need it
            if isinstance(result, ServeStats):
                log.info("teacher rank 0: served its last step; keeping the rendezvous store up until the students "
                         "finish")
            hold_store(dist.get_world_size(), [], cfg.runtime.timeout_s + BLAME_WAIT_S, until_a_failure=True)
        return result
    except Exception as e:  # peers of a failed collective learn that this rank is alive and why it fails
        check_in(rank, e)
        if rank == 0:  # the peers still blaming read the store, which lives in this process
            check_out(rank)
            hold_store(dist.get_world_size(), getattr(e, "ranks", []), cfg.runtime.timeout_s + BLAME_WAIT_S)
        raise
    finally:
        check_out(rank)
        close_world()


def run_world(cfg: Config, run_dir: Path | None = None) -> Any:
    """This rank's part of a served run in an initialised world (see the module docstring)."""
    check_served(cfg)
    topo = Topology(cfg.teacher.parallel, cfg.student.parallel)
    topo.create_groups(timeout=timedelta(seconds=cfg.runtime.startup_timeout_s))
    device = device_of(dist.get_backend())
    transport = Transport(describe=topo.name_rank, device=device,
                          send_timeout_s=cfg.runtime.startup_timeout_s,
                          peers_of=lambda r: (topo.teacher_ranks(topo.teacher_coord(r).replica)
                                              if topo.role(r) == "teacher" else [r]))
    p = input_paths(cfg)
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = read_samples(p.train, cfg.data, s_tok, t_tok)
    pad_ids = {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}
    if topo.role() == "teacher":
        return _teacher(cfg, topo, transport, device, p, samples, pad_ids)
    return _student(cfg, topo, transport, device, p, s_tok, t_tok, samples, pad_ids, run_dir or cfg.run_dir)


def _teacher(cfg: Config, topo: Topology, transport: Transport, device: torch.device, p: Paths,
             samples: list[Sample], pad_ids: dict[str, int]) -> Any:
    states: HiddenStates
    if cfg.runtime.teacher_backend == "megatron":
        teacher = MegatronTeacher(p.teacher_model, topo.teacher_pg_collection(), dtype=DTYPES[cfg.teacher.dtype])
        states = MegatronHiddenStates(teacher, sends=topo.teacher_coord().tp_rank == 0)
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")
        states = HFHiddenStates(load_model(p.teacher_model, cfg.teacher.dtype), device, autocast)
    def open_cache(layers: list[int], fmts: list[str], width: int) -> CacheWriter | None:
        key = cache_key(cfg, p, layers, fmts, width)
        if resolve_mode(cfg, key) != "write":
            return None
        return CacheWriter(cache_dir(cfg), key, f"t{topo.rank}", cfg.teacher.cache.shard_mb << 20)

    cache = CacheTap(open_cache) if cfg.teacher.cache.mode != "off" else None
    return serve(topo=topo, transport=transport, states=states, samples=samples, pad_ids=pad_ids,
                 seed=cfg.run.seed, prefetch=cfg.runtime.prefetch, wire_dtype=wire_dtype(cfg.runtime, device),
                 request_timeout_s=cfg.runtime.startup_timeout_s, cache=cache)


def _blaming(topo: Topology, transport: Transport, fn: Callable[[], Any]) -> Any:
    """fn() on a student; a failed collective of the students names the student that died (if one did)."""
    try:
        return fn()
    except Exception as e:
        reported = blame(e, topo.student_ranks, topo.rank, transport.describe)
        if reported is e:
            raise
        raise reported from e


def _source_totals(teacher: ServedTeacher | CachedTeacher | SwitchingTeacher | None) -> dict[str, float]:
    """What a student's teacher source received over the run: bytes and positions from the teacher
    ranks, bytes read from the cache (both for a source that switched from one to the other)."""
    if isinstance(teacher, ServedTeacher):
        return {"received_bytes": teacher.bytes_received, "received_positions": teacher.positions_received}
    if isinstance(teacher, CachedTeacher):
        return {"cache_read_bytes": teacher.bytes_read}
    if isinstance(teacher, SwitchingTeacher):
        live = teacher.live
        return {**(_source_totals(live) if isinstance(live, ServedTeacher) else {}),
                **_source_totals(teacher.cached)}
    return {}


def _student(cfg: Config, topo: Topology, transport: Transport, device: torch.device, p: Paths,
             s_tok: PreTrainedTokenizerBase, t_tok: PreTrainedTokenizerBase, samples: list[Sample],
             pad_ids: dict[str, int], run_dir: Path) -> TrainResult:
    dp = DataParallel(size=topo.dp, rank=topo.student_index(), group=topo.student_group(), device=device)
    student = student_model(cfg, s_tok)
    # transformers writes checkpoints only on global rank 0 of an initialised world, which here is
    # a teacher rank: let the first student (the only one that exports) write them.
    setattr(base_model(student), "should_save_on_this_rank", lambda is_main_process: is_main_process)  # noqa: B010
    io = load_teacher_io(p.teacher_model, DTYPES[cfg.teacher.dtype], device)
    need = needs(cfg.loss)
    tc = cfg.train
    sampler = GlobalBatchSampler(len(samples), tc.micro_batch_size, tc.grad_accum, topo.dp, cfg.run.seed)
    loss_fn = distill_loss(cfg, student, io.hidden_size, s_tok, t_tok)
    teacher: ServedTeacher | CachedTeacher | SwitchingTeacher | None = None
    key = cache_key(cfg, p, loss_layers(loss_fn, io.num_layers), run_formats(cfg), io.hidden_size) \
        if need.teacher and cfg.teacher.cache.mode in ("read", "auto") else None
    if topo.colocated:  # a student-only world: the states come from the cache
        if key is not None:
            teacher = cached_teacher(cfg, key, io, samples, topo.dp, dp.rank)
    else:
        replica = topo.replica_of()
        served = ServedTeacher(
            transport, io, sampler, dp.rank, topo.teacher_ranks(replica),
            {x: topo.sender_rank(replica, x, io.num_layers) for x in range(io.num_layers + 1)},
            wire_dtype(cfg.runtime, device), cfg.runtime.timeout_s, cfg.runtime.startup_timeout_s, cfg.run.seed)
        teacher = served
        if cfg.teacher.cache.mode == "auto" and key is not None:
            if resolve_mode(cfg, key) == "read":  # complete already: the replica serves nothing
                served.start(0, 0, [], [])
                served.done()
                teacher = cached_teacher(cfg, key, io, samples, topo.dp, dp.rank)
            else:  # the replica serves the first epoch and seals the cache, then this student reads it
                teacher = served_then_cached(cfg, key, served, io, samples, topo.dp, dp.rank)
        elif not need.teacher:  # tell the replica there is nothing to serve
            served.start(0, 0, [], [])
    # DeepSpeed all-reduces gradient norms over a "model-parallel" group: each student alone
    mpu = StudentMPU(dp, topo.student_ranks, topo.student_self_group())

    def make_stepper(total_steps: int) -> DeepSpeedStepper:
        return DeepSpeedStepper(student, loss_fn, tc, cfg.loss.projector_lr, total_steps, cfg.runtime.zero_stage,
                                mpu, cfg.runtime.zero3_persist_below)

    job = TrainJob(run_dir=run_dir, student=student, student_tok=s_tok, loss_fn=loss_fn, samples=samples,
                   pad_ids=pad_ids, cfg=tc, seed=cfg.run.seed, teacher=teacher if need.teacher else None,
                   needs_aux=need.aux, projector_lr=cfg.loss.projector_lr, make_stepper=make_stepper,
                   data_parallel=dp, device=device, resume=cfg.run.resume)
    if dp.main:
        write_run_files(cfg, run_dir, "distill (served)")
    plan = run_dir / "plan.md"  # written by the launcher
    logger = open_logger(cfg, run_dir, cfg.run.name, main=dp.main,
                         extra={"plan": plan.read_text()} if plan.is_file() else None)
    t0 = time.perf_counter()
    try:
        res = _blaming(topo, transport, lambda: train(
            job, logger=logger, log_cfg=cfg.logging,
            callbacks=callbacks(cfg.logging, cfg.eval, tc, run_dir,
                                load_split(p.dev, cfg.data) if dp.main else None,
                                stop=lambda: stop_request.requested)))
        if isinstance(teacher, ServedTeacher) and not need.teacher:  # the replica waits for this student's word
            if res.interrupted or res.early_stopped:
                teacher.stop(res.steps)
            else:
                teacher.done()
        elif teacher is not None and not isinstance(teacher, ServedTeacher):
            teacher.stop(res.steps)
        logger.log(res.steps, {"wall_s": time.perf_counter() - t0, **_source_totals(teacher)}, prefix="distill/")
    finally:
        logger.close()
    return res


# --------------------------------------------------------------------------- local launcher
def launch_local(cfg: Config, world_size: int | None = None, env: dict[str, str] | None = None,
                 timeout_s: float | None = None, return_all: bool = False) -> Any:
    """Run a served world of `world_size` processes on this machine; return the first student's result
    (return_all: every rank's, by rank: ServeStats on teachers, TrainResult on students).

    On a failure the other ranks get until their own deadlines (runtime.timeout_s) to report what
    they saw (or until every student has finished), then everything still running is killed and
    `distributed.spawn.WorldError` lists every failed rank's error. timeout_s bounds the whole run
    (default: none). env: extra environment variables of the ranks (fault injection in tests).
    """
    if cfg.teacher.cache.mode == "read" or (cfg.teacher.cache.mode == "auto" and is_complete(cache_dir(cfg))):
        cfg = without_teacher_ranks(cfg)
    world = world_size or local_world_size(cfg)
    students = Topology(cfg.teacher.parallel, cfg.student.parallel, world, 0).student_ranks
    results = spawn_world(run_rank, cfg, world, essential=students, grace_s=cfg.runtime.timeout_s + 60, env=env,
                          timeout_s=timeout_s)
    return results if return_all else results[students[0]]
