"""The teacher-state cache in the recipes: its key, the mode a run resolves to, the cached teacher
sources, and the `cot2align cache-teacher` stage.

    cot2align cache-teacher [--config FILE] [key=value ...]   # teacher over the whole data set, no students
    cot2align distill teacher.cache.mode=read ...             # students only, states from the cache

`cache-teacher` runs the HF teacher in this process over every sample (sorted by length, batches of
`teacher.cache.batch_size`), writing the final layer plus `loss.ot.teacher_layers` and both formats
when the data has CoT pairs, so one cache serves every loss of a sweep. Under a torchrun-style
launch (RANK / WORLD_SIZE in the environment) each process writes every WORLD_SIZE-th batch as its
own writer and the last one to finish writes the manifest: no process group is needed. For a
teacher sharded tp x pp > 1 under a torch.distributed launch (runtime.teacher_backend=megatron)
the processes are one world of megatron-core teacher replicas that split the batches by replica.

`auto` over an incomplete cache switches mid-run in both runtimes (`student.cached.SwitchingTeacher`):
the teacher runs the first epoch only (`writing_teacher`: in this process; `served_then_cached`: the
teacher ranks serve that epoch, seal the cache and exit), then every student reads the cache.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from cot2align.config import Config
from cot2align.configbase import require
from cot2align.data.dataset import Sample, collate
from cot2align.data.sampler import GlobalBatchSampler
from cot2align.distributed.failures import blame
from cot2align.distributed.topology import StudentParallelConfig, TeacherParallelConfig, Topology
from cot2align.distributed.world import close_world, init_world
from cot2align.logging import log
from cot2align.losses import DistillLoss
from cot2align.models import (
    DTYPES,
    frozen,
    load_model,
    load_tokenizer,
    num_layers,
    resolve_layers,
    response_view,
)
from cot2align.recipes.build import needs
from cot2align.recipes.inputs import ensure_inputs, input_paths
from cot2align.recipes.prepare import Paths, read_samples
from cot2align.student.cached import (
    CachedTeacher,
    LocalSealer,
    RemoteSealer,
    SwitchingTeacher,
    write_states,
    write_views,
)
from cot2align.student.teacher_io import TeacherIO
from cot2align.teacher.cache import (
    CacheError,
    CacheKey,
    CacheReader,
    CacheWriter,
    file_digest,
    finalize,
    is_complete,
    missing,
    required_entries,
    stored_key,
)
from cot2align.teacher.megatron_model import MegatronTeacher
from cot2align.teacher.serve import MegatronHiddenStates
from cot2align.train import TeacherSource

TOKENIZATION_KEYS = ("use_cot", "pairing", "max_length", "max_prompt_length", "on_overlength", "add_eos",
                     "on_bad_row")
"""data.* settings that change which samples exist and how the teacher side is tokenized."""


def cache_dir(cfg: Config) -> Path:
    """`teacher.cache.dir`, else <run.work_dir>/teacher-cache."""
    return Path(cfg.teacher.cache.dir) if cfg.teacher.cache.dir else Path(cfg.run.work_dir) / "teacher-cache"


def teacher_dtype(cfg: Config) -> str:
    """The teacher's precision, whichever backend computed: the weight dtype, plus '+autocast-bf16'
    where fp32 weights compute in bf16 (the HF teacher under train.dtype=bfloat16 autocast; megatron
    computes in its weight dtype). bf16 weights compute in bf16 on both backends, so an HF-written
    cache (`cache-teacher`) and a megatron-written one of the same settings share the key."""
    autocast = (cfg.teacher.dtype == "float32" and cfg.train.dtype == "bfloat16"
                and cfg.runtime.teacher_backend == "hf")
    return f"{cfg.teacher.dtype}{'+autocast-bf16' if autocast else ''}"


def cache_key(cfg: Config, p: Paths, layers: list[int], fmts: list[str], width: int) -> CacheKey:
    """The key of the states this config's teacher gives for `layers` (resolved) and `fmts`."""
    memo = Path(cfg.run.work_dir) / "digests.json"
    tokenization = {k: getattr(cfg.data, k) for k in TOKENIZATION_KEYS}
    return CacheKey(teacher=file_digest([p.teacher_model], memo), data=file_digest([p.train], memo),
                    tokenizer=file_digest([p.teacher_tokenizer], memo),
                    tokenization=str(sorted(tokenization.items())), layers=tuple(sorted(set(layers))),
                    formats=tuple(fmts), dtype=cfg.teacher.cache.dtype, teacher_dtype=teacher_dtype(cfg),
                    width=width)


def loss_layers(loss_fn: DistillLoss, final_layer: int) -> list[int]:
    """The teacher layers the loss reads (resolved, sorted)."""
    return sorted(set(resolve_layers(loss_fn.required_layers()[1], final_layer)))


def run_formats(cfg: Config) -> list[str]:
    """The formats a run asks the teacher for."""
    return ["main", "aux"] if needs(cfg.loss).aux else ["main"]


def resolve_mode(cfg: Config, key: CacheKey) -> Literal["off", "read", "write"]:
    """What this run does with the cache: auto -> read when a complete cache matches, else write (a
    folder holding another key is refused, naming the key, in every mode but off)."""
    mode = cfg.teacher.cache.mode
    if mode == "off":
        return "off"
    root = cache_dir(cfg)
    stored = stored_key(root)
    if stored is not None:
        why = key.mismatch(stored, subset_ok=mode != "write")
        if why:
            raise CacheError(f"teacher cache {root} (teacher.cache.dir) does not match this run (key {why})")
    if mode == "auto":
        return "read" if is_complete(root) else "write"
    return mode


def open_reader(cfg: Config, key: CacheKey) -> CacheReader:
    return CacheReader(cache_dir(cfg), key, cfg.teacher.cache.verify)


def cached_teacher(cfg: Config, key: CacheKey, io: TeacherIO, samples: list[Sample], dp_size: int,
                   dp_rank: int) -> CachedTeacher:
    """The cached source of one student (replica `dp_rank` of `dp_size`)."""
    tc = cfg.train
    sampler = GlobalBatchSampler(len(samples), tc.micro_batch_size, tc.grad_accum, dp_size, cfg.run.seed)
    return CachedTeacher(open_reader(cfg, key), io.head, io.embed, io.num_layers, sampler, dp_rank, samples,
                         cfg.teacher.cache.prefetch)


def writing_teacher(cfg: Config, key: CacheKey, live: TeacherSource, io: TeacherIO, samples: list[Sample],
                    pad_ids: dict[str, int]) -> SwitchingTeacher:
    """auto, colocated: `live` for the first epoch while this process writes the cache, which it
    completes and seals at the switch, then the cache."""
    tc = cfg.train
    sampler = GlobalBatchSampler(len(samples), tc.micro_batch_size, tc.grad_accum, 1, cfg.run.seed)
    writer = CacheWriter(cache_dir(cfg), key, "colocated", cfg.teacher.cache.shard_mb << 20)
    sealer = LocalSealer(writer, live, samples, pad_ids, tc.micro_batch_size)
    return SwitchingTeacher(live, sealer, sampler, lambda: cached_teacher(cfg, key, io, samples, 1, 0))


def served_then_cached(cfg: Config, key: CacheKey, live: TeacherSource, io: TeacherIO, samples: list[Sample],
                       dp_size: int, dp_rank: int) -> SwitchingTeacher:
    """auto, served (student replica `dp_rank` of `dp_size`): the teacher ranks serve the first epoch
    and write the cache, which they seal before they exit; the student waits for the seal (at most
    runtime.timeout_s) and reads the rest of the run from the cache with `key`."""
    tc = cfg.train
    sampler = GlobalBatchSampler(len(samples), tc.micro_batch_size, tc.grad_accum, dp_size, cfg.run.seed)
    sealer = RemoteSealer(cache_dir(cfg), cfg.runtime.timeout_s)
    return SwitchingTeacher(live, sealer, sampler, lambda: cached_teacher(cfg, key, io, samples, dp_size, dp_rank))


def sweep_layers(cfg: Config, final_layer: int) -> list[int]:
    """What cache-teacher stores: the final layer and the OT layers (a superset of every loss's)."""
    return sorted(set(resolve_layers([-1, *cfg.loss.ot.teacher_layers], final_layer)))


def _wait_for(marker: Path, launch_id: str, timeout_s: float, rank: int) -> None:
    """Wait until rank 0 of this launch wrote `marker` holding `launch_id` (its inputs are ready)."""
    deadline = time.monotonic() + timeout_s
    while not (marker.is_file() and marker.read_text() == launch_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cache-teacher rank {rank}: rank 0 did not prepare the inputs within "
                               f"{timeout_s:.0f} s (runtime.startup_timeout_s); see rank 0's log")
        time.sleep(1.0)


def cache_teacher(cfg: Config) -> Path:
    """`cot2align cache-teacher`: write (or complete) the cache of this config; returns its folder.

    Every process (RANK of WORLD_SIZE, no process group; one process without them) runs one whole
    HF teacher over every WORLD_SIZE-th batch; but a teacher sharded tp x pp > 1 under a
    torch.distributed launch (MASTER_ADDR / MASTER_PORT set: torchrun, `launcher/submit.py
    --cache-first`) is run as WORLD_SIZE / (tp x pp) megatron-core replicas, each forwarding every
    replicas-th batch (`_write_sharded`; runtime.teacher_backend=megatron).
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    ready = cache_dir(cfg).parent / f".{cache_dir(cfg).name}.inputs-ready"
    launch_id = ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"))
    if rank == 0:
        p = ensure_inputs(cfg)
        if world > 1:  # the other writers wait for the data, teacher and rationales made above
            ready.parent.mkdir(parents=True, exist_ok=True)
            ready.write_text(launch_id)
    else:
        p = input_paths(cfg)
        _wait_for(ready, launch_id, cfg.runtime.startup_timeout_s, rank)
    if rank and not p.teacher_model.is_dir():
        raise FileNotFoundError(f"cache-teacher rank {rank}: {p.teacher_model} does not exist (rank 0 makes it)")
    s_tok, t_tok = load_tokenizer(p.student_tokenizer), load_tokenizer(p.teacher_tokenizer)
    samples = read_samples(p.train, cfg.data, s_tok, t_tok)
    fmts = ["main", "aux"] if any(s.paired for s in samples) else ["main"]
    required = required_entries([s.paired for s in samples], fmts)
    # batches of similar lengths (little padding); each writer's share comes from ALL of them, never
    # from what is missing when it starts: writers start at different times and must split the same list
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].seqs["teacher"]["main"].ids))
    bs = cfg.teacher.cache.batch_size or cfg.train.micro_batch_size
    batches = [order[k : k + bs] for k in range(0, len(order), bs)]
    pad_ids = {"student": s_tok.pad_token_id, "teacher": t_tok.pad_token_id}
    t = cfg.teacher.parallel
    if t.tp * t.pp > 1 and {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"} <= set(os.environ):
        require(cfg.runtime.teacher_backend == "megatron", "runtime.teacher_backend",
                f"is {cfg.runtime.teacher_backend!r}: cache-teacher runs a teacher sharded tp {t.tp} x pp {t.pp} "
                "with megatron-core; set runtime.teacher_backend=megatron")
        return _write_sharded(cfg, p, samples, batches, fmts, required, pad_ids)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    model = frozen(load_model(p.teacher_model, cfg.teacher.dtype).to(device))  # type: ignore[arg-type]
    layers = sweep_layers(cfg, num_layers(model))
    key = cache_key(cfg.merged({"runtime": {"teacher_backend": "hf"}}), p, layers, fmts,
                    int(model.config.hidden_size))
    root = cache_dir(cfg)
    if _complete(cfg, key):
        return root
    writer = CacheWriter(root, key, f"r{rank}", cfg.teacher.cache.shard_mb << 20)
    todo = {i for i, _ in missing(root, key, required)}  # a resumed write skips what it has
    mine = _share(batches, todo, rank, world)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16")
    t0, positions = time.perf_counter(), 0
    for n, idx in enumerate(mine):
        batch = collate([samples[i] for i in idx], pad_ids)
        views = {}
        with torch.no_grad(), autocast:
            for fmt in [f for f in fmts if f in batch.seqs["teacher"]]:
                views[fmt] = response_view(model, batch.seqs["teacher"][fmt].to(device), layers)
                positions += int(views[fmt].mask.sum())
        write_views(writer, batch, views, layers)
        if n % 50 == 0:
            log.info("cache-teacher rank %d: batch %d of %d", rank, n + 1, len(mine))
    writer.close()
    _log_written(rank, positions, time.perf_counter() - t0, writer.bytes_written)
    if finalize(root, key, required):
        log.info("cache-teacher: %s complete", root)
    elif world == 1:
        raise CacheError(f"teacher cache {root} is incomplete after cache-teacher wrote every sample")
    return root


def _complete(cfg: Config, key: CacheKey) -> bool:
    """Whether the cache folder is complete already (a folder with another key is refused)."""
    if not is_complete(cache_dir(cfg)):
        return False
    open_reader(cfg, key)
    log.info("cache-teacher: %s is complete already", cache_dir(cfg))
    return True


def _share(batches: list[list[int]], todo: set[int], k: int, n: int) -> list[list[int]]:
    """Writer k of n: every n-th batch from the k-th, keeping the samples still to write."""
    return [b for b in ([i for i in batch if i in todo] for batch in batches[k::n]) if b]


def _log_written(rank: int, positions: int, seconds: float, written: int) -> None:
    log.info("cache-teacher rank %d: %d positions in %.1f s (%.0f positions/s), %.1f MiB written", rank, positions,
             seconds, positions / max(seconds, 1e-9), written / 2**20)


def _write_sharded(cfg: Config, p: Paths, samples: list[Sample], batches: list[list[int]], fmts: list[str],
                   required: set[tuple[int, str]], pad_ids: dict[str, int]) -> Path:
    """cache-teacher with the megatron teacher: replicas = floor(world / (tp x pp)) shards of it (the
    ranks left over idle); the ranks of a replica forward every replicas-th batch together, and tp
    rank 0 of each pipeline stage writes the layers its stage holds (as it would serve them). Rank 0
    seals the cache once every writer has closed. A resumed job skips what the folder holds (rank
    0's reading, for all)."""
    t, rank, world = cfg.teacher.parallel, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    size = t.tp * t.pp
    require(world >= size, "teacher.parallel.tp",
            f"cache-teacher runs whole teacher replicas of tp x pp = {t.tp} x {t.pp} = {size} ranks: the job has "
            f"{world} (cluster.nodes x cluster.gpus_per_node)")
    used = world // size * size
    if rank >= used:  # the GPUs left over by whole replicas (e.g. 64 GPUs, replicas of 10)
        log.info("cache-teacher rank %d: idle (%d replicas of %d ranks use ranks 0-%d)", rank, used // size, size,
                 used - 1)
        return cache_dir(cfg)
    os.environ["WORLD_SIZE"] = str(used)
    init_world(cfg.runtime, cfg.train.threads)
    topo = Topology(TeacherParallelConfig(t.tp, t.pp, used // size), StudentParallelConfig(dp=0))
    try:
        topo.create_groups(timeout=timedelta(seconds=cfg.runtime.startup_timeout_s))
        return _write_replica_share(cfg, p, topo, samples, batches, fmts, required, pad_ids)
    except Exception as e:  # a failed collective names the rank at fault; other errors are this rank's
        reported = blame(e, topo.teacher_ranks(), rank, topo.name_rank)
        if reported is e:
            raise
        raise reported from e
    finally:
        close_world()


def _write_replica_share(cfg: Config, p: Paths, topo: Topology, samples: list[Sample], batches: list[list[int]],
                         fmts: list[str], required: set[tuple[int, str]], pad_ids: dict[str, int]) -> Path:
    """This rank's part of `_write_sharded` in a world of teacher ranks only (`topo`)."""
    rank = topo.rank
    teacher = MegatronTeacher(p.teacher_model, topo.teacher_pg_collection(), dtype=DTYPES[cfg.teacher.dtype])
    replica = topo.teacher_coord().replica
    states = MegatronHiddenStates(teacher, sends=topo.teacher_coord().tp_rank == 0)
    layers = sweep_layers(cfg, states.num_layers)
    key = cache_key(cfg, p, layers, fmts, int(teacher.hf_config.hidden_size))
    root = cache_dir(cfg)
    if _complete(cfg, key):
        return root
    todo: list[Any] = [{i for i, _ in missing(root, key, required)} if rank == 0 else None]
    dist.broadcast_object_list(todo)  # every rank of a replica must walk the same batches
    mine = _share(batches, todo[0], replica, topo.replicas)
    sends = [x for x in layers if topo.sender_rank(replica, x, states.num_layers) == rank]
    writer = CacheWriter(root, key, f"r{rank}", cfg.teacher.cache.shard_mb << 20) if sends else None
    t0, positions = time.perf_counter(), 0
    for n, idx in enumerate(mine):
        batch = collate([samples[i] for i in idx], pad_ids)
        for fmt in [f for f in fmts if f in batch.seqs["teacher"]]:
            seq = batch.seqs["teacher"][fmt]
            hidden = states.hidden(seq, layers)
            positions += int(seq.resp_mask.sum())
            if writer is not None:
                write_states(writer, idx, fmt, sends, hidden, seq.resp_mask)
        if n % 50 == 0:
            log.info("cache-teacher rank %d (replica %d): batch %d of %d", rank, replica, n + 1, len(mine))
    if writer is not None:
        writer.close()
        _log_written(rank, positions, time.perf_counter() - t0, writer.bytes_written)
    dist.barrier()  # every writer has journaled its shards
    if rank == 0:
        if not finalize(root, key, required):
            raise CacheError(f"teacher cache {root} is incomplete after cache-teacher wrote every sample")
        log.info("cache-teacher: %s complete", root)
    dist.barrier()
    return root
