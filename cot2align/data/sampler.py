"""Deterministic, resumable global-batch order shared by every rank.

Every rank (teachers and students alike) derives the same sample order from
(seed, epoch, step), so only hidden states ever need to cross the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplerState:
    """Where the sampler stands: the next global step to produce."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


class GlobalBatchSampler:
    """Splits a shuffled epoch into global batches of micro_batch x accum x dp samples.

    The last incomplete global batch of an epoch is dropped (every rank does equal work);
    `dropped_per_epoch` says how many samples that is.
    """

    def __init__(self, num_samples: int, micro_batch: int, accum: int, dp: int, seed: int) -> None:
        self.num_samples = num_samples
        self.micro_batch = micro_batch
        self.accum = accum
        self.dp = dp
        self.seed = seed
        self.global_batch = micro_batch * accum * dp
        if num_samples < self.global_batch:
            raise ValueError(
                f"{num_samples} training samples cannot fill one global batch of {self.global_batch} "
                f"(train.micro_batch_size {micro_batch} x train.grad_accum {accum} x dp {dp})"
            )
        self.steps_per_epoch = num_samples // self.global_batch
        self.dropped_per_epoch = num_samples - self.steps_per_epoch * self.global_batch
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def micro_batches(self, step: int, dp_rank: int) -> list[list[int]]:
        """Sample indices of this data-parallel rank's micro-batches at global `step`: [accum][micro_batch]."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        start = k * self.global_batch
        out = []
        for a in range(self.accum):
            off = start + (a * self.dp + dp_rank) * self.micro_batch
            out.append(perm[off : off + self.micro_batch])
        return out

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
