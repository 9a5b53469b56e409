"""One process's side of the torch.distributed world: backend, device, threads, wire dtype."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

from cot2align.distributed.config import RuntimeConfig
from cot2align.distributed.failures import start_heartbeat, stop_heartbeat


def backend_of(cfg: RuntimeConfig) -> str:
    """`runtime.backend`, with auto = nccl when CUDA is available, else gloo."""
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_of(backend: str) -> torch.device:
    """Where this rank computes and keeps its collectives' tensors."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wire_dtype(cfg: RuntimeConfig, device: torch.device) -> torch.dtype:
    """dtype of the teacher states on the wire (auto: bf16 on GPU, fp32 on CPU)."""
    name = cfg.wire_dtype if cfg.wire_dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class RendezvousError(RuntimeError):
    """The rendezvous address (MASTER_ADDR) is missing or does not resolve on this node."""


def check_master_addr(addr: str) -> None:
    """Fail at once, naming `addr` and how to set it, where MASTER_ADDR does not resolve (gloo and
    nccl would otherwise stall on repeated name look-ups)."""
    how = ("set COT2ALIGN_MASTER_ADDR to an address every node reaches (e.g. `export "
           "COT2ALIGN_MASTER_ADDR=10.0.0.1` in slurm/env.sh or launch.slurm.setup; it replaces the node "
           "name), or make the node names resolve (DNS or /etc/hosts)")
    if not addr:
        raise RendezvousError(f"MASTER_ADDR is not set: {how}")
    try:
        socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
    except OSError as e:
        raise RendezvousError(f"the rendezvous address MASTER_ADDR={addr!r} (the job's first node) does not "
                              f"resolve on {socket.gethostname()} ({e}): {how}") from None


def rank_threads(local_world: int, environ: Mapping[str, str] | None = None,
                 affinity: set[int] | None = None) -> int:
    """Torch threads of a CPU rank: what its task was given, never more than the CPUs it may run on.

    OMP_NUM_THREADS when set, else SLURM_CPUS_PER_TASK (Slurm's --cpus-per-task), else the task's
    CPU affinity shared by the `local_world` ranks of this node; capped at the affinity's size.
    `environ` / `affinity` default to this process's (os.environ, os.sched_getaffinity).
    """
    env = os.environ if environ is None else environ
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cpus = max(1, len(affinity))
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        given = env.get(var, "").strip()
        if given.isdigit() and int(given) >= 1:
            return min(int(given), cpus)
    return max(1, cpus // max(1, local_world))


def init_world(cfg: RuntimeConfig, threads: int = 0) -> torch.device:
    """Initialise torch.distributed from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; returns the
    rank's device, and starts the rank's heartbeat (see `failures`). threads: torch threads of a CPU rank
    (0 = what its task was given, `rank_threads`). `close_world` leaves it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    check_master_addr(os.environ.get("MASTER_ADDR", ""))
    backend = backend_of(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif not threads:
        torch.set_num_threads(rank_threads(int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=cfg.startup_timeout_s))
    start_heartbeat(rank)
    return device_of(backend)


def close_world() -> None:
    """Leave the world `init_world` joined: stop the heartbeat, destroy the default process group."""
    stop_heartbeat()
    dist.destroy_process_group()
