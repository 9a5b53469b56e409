"""Data parallelism of the student replicas: this process's place among them and its collectives."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from cot2align.distributed.transport import any_rank


@dataclass
class DataParallel:
    """This process's place among `size` data-parallel student replicas.

    Every replica derives every replica's micro-batches from the shared sampler, so the
    global token count needs no communication; only the logged loss parts are summed
    over `group`. Rank 0 logs, evaluates, saves and exports.
    """

    size: int = 1
    rank: int = 0
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where collectives' tensors live (the rank's GPU under nccl)."""

    @property
    def main(self) -> bool:
        """The first replica: it logs, evaluates, saves and exports."""
        return self.rank == 0

    def sum(self, parts: dict[str, float]) -> dict[str, float]:
        """Sum per-replica values over the replicas (keys may differ between replicas)."""
        if self.size == 1:
            return dict(parts)
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, dict(parts), group=self.group)
        out: dict[str, float] = defaultdict(float)
        for g in gathered:
            for k, v in g.items():
                out[k] += v
        return dict(out)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any replica (collective over the replicas)."""
        return flag if self.size == 1 else any_rank(flag, self.group, self.device)
