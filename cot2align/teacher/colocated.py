"""The teacher in the student's process (the `colocated` mode): a `train.TeacherSource`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from cot2align.data.dataset import Batch
from cot2align.data.views import ResponseView
from cot2align.models import frozen, input_embed, num_layers, output_head, response_view


class ColocatedTeacher:
    """The teacher model in this process: runs its forward pass on the teacher tokenization."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = frozen(model)
        self.final_layer = num_layers(model)
        self.head = output_head(model)
        self.embed = input_embed(model)

    def start(self, first_step: int, total_steps: int, layers: list[int], fmts: list[str]) -> None:
        pass

    @torch.no_grad()
    def views(self, batch: Batch, fmts: list[str], layers: list[int]) -> dict[str, ResponseView]:
        """Teacher response views of `batch` per format: hidden states of `layers`, [B, N_t, d_t] each."""
        return {f: response_view(self.model, batch.seqs["teacher"][f], layers) for f in fmts}

    def stop(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}
