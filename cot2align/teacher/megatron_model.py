"""A frozen megatron-core GPTModel teacher on a subset of the world's ranks.

The model is built with explicit process groups (a `ProcessGroupCollection` from
`Topology.teacher_pg_collection()`), never with
`parallel_state.initialize_model_parallel` (which would span the whole world).
Hidden states are captured by forward hooks while megatron's pipeline schedule
runs (all megatron activations are [T, B, d]):

* layer 0: output of `model.embedding` (first stage) == HF hidden_states[0];
* layer j in 1..L-1: output[0] of `model.decoder.layers[j - 1 - offset]` on the stage
  owning global layer j == HF hidden_states[j];
* layer L (or -1): output of `model.decoder.final_layernorm` (last stage) == HF
  hidden_states[L] (post-norm).

Without sequence parallelism, every TP rank of a stage holds the full, identical
hidden states after each layer (the row-parallel linears all-reduce), so no TP gather
is needed; any TP rank can serve them (the topology picks tp-rank 0).

Positions are 0..T-1 for every row (HF's default without explicit position_ids), so
batches should be right-padded; padded keys are masked out by `attention_mask`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cot2align.teacher.hf_to_megatron import (
    LlamaFamilyConfig,
    build_transformer_config,
    gpt_model_kwargs,
    load_megatron_shard,
)
from cot2align.teacher.megatron_shim import apply_cpu_shims


def _init_megatron_globals() -> None:
    """Process-wide megatron state the forward pass needs (no collectives; idempotent)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    apply_cpu_shims()
    # Dropout is off (eval, p=0) but attention still forks the RNG tracker: a no-op tracker.
    initialize_rng_tracker(inference_rng_tracker=True)
    # Scratch buffer used by DotProductAttention; normally created by initialize_model_parallel.
    if getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None) is None:
        parallel_state._set_global_memory_buffer()


def megatron_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal + key-padding mask in megatron's convention (True = masked out).

    attention_mask: [B, T] with 1 for real tokens. Returns [B, 1, T, T] bool.
    """
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).triu(1)  # [T, T]
    return causal[None, None] | (attention_mask[:, None, None, :] == 0)


class MegatronTeacher:
    """A frozen Llama-family teacher sharded over one replica's TP x PP ranks.

    Every rank of the replica must call `forward_hidden` / `logits` with the same
    batch (same shapes) at the same time: the calls run megatron's pipeline schedule
    (p2p between stages, all-reduce within TP).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        pg_collection: Any,
        dtype: torch.dtype = torch.float32,
        make_vocab_size_divisible_by: int = 128,
    ) -> None:
        """Build this rank's shard and load its slices of the HF checkpoint.

        pg_collection: megatron `ProcessGroupCollection` of this rank's replica
        (`Topology.teacher_pg_collection()`). On GPU, set the CUDA device first.
        """
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        _init_megatron_globals()
        self.hf_config = LlamaFamilyConfig.from_pretrained(checkpoint_dir)
        self.pg_collection = pg_collection
        self.tp, self.tp_rank = pg_collection.tp.size(), pg_collection.tp.rank()
        self.pp, self.pp_rank = pg_collection.pp.size(), pg_collection.pp.rank()
        self.is_first_stage, self.is_last_stage = self.pp_rank == 0, self.pp_rank == self.pp - 1
        self.num_layers = self.hf_config.num_layers
        self.layers_per_stage = self.num_layers // self.pp
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        on_cpu = self.device is None
        self.config = build_transformer_config(
            self.hf_config, self.tp, self.pp, dtype=dtype, use_cpu_initialization=on_cpu
        )
        self.model = GPTModel(
            config=self.config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            pre_process=self.is_first_stage,
            post_process=self.is_last_stage,
            pg_collection=pg_collection,
            **gpt_model_kwargs(self.hf_config, self.tp, self.pp, make_vocab_size_divisible_by),
        )
        load_megatron_shard(
            self.model,
            checkpoint_dir,
            self.hf_config,
            self.tp_rank,
            self.tp,
            self.pp_rank,
            self.pp,
            make_vocab_size_divisible_by,
        )
        self.model.eval()
        self.model.requires_grad_(False)
        self.vocab_size = self.hf_config.vocab_size
        self.hidden_size = self.hf_config.hidden_size

    # ------------------------------------------------------------------ layers
    def normalize_layer(self, layer: int) -> int:
        """Map a served layer index (negative counts from L + 1) to 0..L."""
        n = self.num_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"teacher layer {layer} is outside [-{n + 1}, {n}] (the teacher has {n} layers)")
        return layer % (n + 1)

    def stage_of(self, layer: int) -> int:
        """Pipeline stage that owns served layer `layer`."""
        layer = self.normalize_layer(layer)
        return 0 if layer == 0 else (layer - 1) // self.layers_per_stage

    def owned_layers(self, layers: Sequence[int]) -> list[int]:
        """The normalised layers of `layers` that this stage captures, deduplicated, in order."""
        return list(
            dict.fromkeys(x for x in map(self.normalize_layer, layers) if self.stage_of(x) == self.pp_rank)
        )

    def _module_for(self, layer: int) -> torch.nn.Module:
        if layer == 0:
            return self.model.embedding
        if layer == self.num_layers:
            return self.model.decoder.final_layernorm
        return self.model.decoder.layers[layer - 1 - self.pp_rank * self.layers_per_stage]

    @contextmanager
    def _capture(self, layers: list[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Forward hooks appending each micro-batch's [T, mb, d] output of `layers`."""
        store: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
        handles = []
        for x in layers:

            def hook(_m: torch.nn.Module, _inp: Any, out: Any, x: int = x) -> None:
                hidden = out[0] if isinstance(out, tuple | list) else out
                store[x].append(hidden.detach().clone())  # clone: later code may write in place

            handles.append(self._module_for(x).register_forward_hook(hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ forward
    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: list[int],
        want_logits: bool,
        micro_batch_size: int | None,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        b, t = input_ids.shape
        mb = micro_batch_size or b
        if b % mb:
            raise ValueError(f"batch size {b} is not a multiple of micro_batch_size {mb}")
        window = self.hf_config.sliding_window
        if window is not None and t > window:
            raise ValueError(
                f"sequence length {t} exceeds the teacher's sliding window {window} (not supported)"
            )
        if self.device is not None:
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        mask = megatron_attention_mask(attention_mask)  # [B, 1, T, T]
        positions = torch.arange(t, device=input_ids.device).expand(mb, t)  # [mb, T]
        batches = [
            {"input_ids": input_ids[i : i + mb], "attention_mask": mask[i : i + mb]} for i in range(0, b, mb)
        ]

        def forward_step(data: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module) -> tuple[Any, Any]:
            batch = next(data)
            out = model(batch["input_ids"], positions, batch["attention_mask"], runtime_gather_output=True)

            def collect(output: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor | None:
                # Last stage only: logits [mb, T, V_padded] (gathered over TP), or None.
                return output[..., : self.vocab_size].clone() if want_logits else None

            return out, collect

        schedule = get_forward_backward_func(pp_size=self.pp, vp_size=None)
        # Without logits the last stage stops after final_layernorm: GPTModel._postprocess
        # returns the decoder output early when post_process is False.
        captured: dict[int, list[torch.Tensor]]
        try:
            self.model.post_process = self.is_last_stage and want_logits
            with torch.no_grad(), self._capture(self.owned_layers(layers)) as captured:
                collected = schedule(
                    forward_step_func=forward_step,
                    data_iterator=iter(batches),
                    model=[self.model],
                    num_microbatches=len(batches),
                    seq_length=t,
                    micro_batch_size=mb,
                    forward_only=True,
                    collect_non_loss_data=True,
                    p2p_communicator=P2PCommunicator(self.pg_collection.pp, self.config),
                    pg_collection=self.pg_collection,
                )
        finally:
            self.model.post_process = self.is_last_stage
        hidden = {x: torch.cat(chunks, dim=1).transpose(0, 1) for x, chunks in captured.items()}  # [B, T, d]
        logits = torch.cat(collected) if want_logits and self.is_last_stage else None  # [B, T, V]
        return hidden, logits

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: Sequence[int],
        micro_batch_size: int | None = None,
    ) -> dict[int, torch.Tensor]:
        """Hidden states of the requested layers that live on this pipeline stage.

        input_ids, attention_mask: [B, T] (1 = real token; right padding). layers: served
        layer indices (0 = embedding output, L or -1 = final-norm output). Returns
        {normalised layer: [B, T, d]} for the layers this stage owns (other stages return
        the rest); identical on every TP rank of the stage. micro_batch_size splits B into
        micro-batches that flow through the pipeline (must divide B; default B).
        """
        hidden, _ = self._run(input_ids, attention_mask, list(layers), False, micro_batch_size)
        return hidden

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, micro_batch_size: int | None = None
    ) -> torch.Tensor | None:
        """Full-vocabulary logits [B, T, vocab_size] on the last stage (gathered over TP, pad
        columns removed); None on other stages. For tests and tools, not for serving."""
        _, logits = self._run(input_ids, attention_mask, [], True, micro_batch_size)
        return logits
