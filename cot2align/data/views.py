"""What a model's forward pass hands to the losses: hidden states at response positions."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ResponseView:
    """One model's view of one format at response positions.

    hidden: layer -> [B, N, d] (fp32 or bf16); N = max response length in the batch.
    mask:   [B, N] bool, True on real response positions (left-aligned, then padding).
    inputs: [B, N] long, token id at each position (this model's vocabulary; 0 on padding).
    targets:[B, N] long, next token id (the label) at each position (0 on padding).
    """

    hidden: dict[int, Tensor]
    mask: Tensor
    inputs: Tensor
    targets: Tensor

    @property
    def lengths(self) -> Tensor:
        """[B] long: number of response positions per row."""
        return self.mask.sum(dim=1)
