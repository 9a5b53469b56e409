"""One process's side of the torch.distributed world: backend, device, threads, wire dtype."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from cot2align.distributed.config import RuntimeConfig


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


def init_world(cfg: RuntimeConfig, threads: int = 0) -> torch.device:
    """Initialise torch.distributed from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; returns the
    rank's device. threads: torch threads of a CPU rank (0 = share this node's cores)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend_of(cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif not threads:  # share the cores of this node between its processes
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=cfg.startup_timeout_s))
    return device_of(backend)
