"""HF -> megatron-core mapping for Llama-family checkpoints (Llama, Mistral, SmolLM2, Qwen2).

Each teacher rank reads only its own slices from the (possibly sharded) safetensors
checkpoint with ``safe_open(...).get_slice``; no rank ever holds the full model.
For pipeline stage ``s`` of ``PP`` and local layer ``l``, the HF layer is
``g = s * L / PP + l``. For tensor-parallel rank ``r`` of ``TP`` (megatron local spec):

====================================  ==========================================  ============================
HF                                    megatron                                    TP split
====================================  ==========================================  ============================
model.embed_tokens                    embedding.word_embeddings (first stage)     vocab rows of padded vocab
layers.g.input_layernorm              decoder.layers.l.input_layernorm            replicated
layers.g.self_attn.q/k/v_proj         decoder.layers.l.self_attention.linear_qkv  per local query group:
                                                                                  [q rows of its heads; k; v]
layers.g.self_attn.o_proj             decoder.layers.l.self_attention.linear_proj columns of local heads
layers.g.post_attention_layernorm     decoder.layers.l.pre_mlp_layernorm          replicated
layers.g.mlp.gate_proj + up_proj      decoder.layers.l.mlp.linear_fc1             [gate f_lo:f_hi; up f_lo:f_hi]
layers.g.mlp.down_proj                decoder.layers.l.mlp.linear_fc2             columns f_lo:f_hi
model.norm                            decoder.final_layernorm (last stage)        replicated
lm_head (or embed_tokens if tied)     output_layer (last stage)                   vocab rows of padded vocab
====================================  ==========================================  ============================

Biases follow the rows of their weights (q/k/v biases of Qwen2 -> linear_qkv.bias);
row-parallel biases (o_proj, down_proj) are replicated. Megatron has one switch for
"all other linears have biases" (add_bias_linear); a bias absent in HF but present
in megatron is loaded as zeros. RoPE needs no permutation (rotary_interleaved=False
matches HF's rotate_half).

Vocabulary padding: megatron splits vocab rows evenly over TP, so the vocabulary is
padded to a multiple of ``make_vocab_size_divisible_by * TP`` and the pad rows are
zero (embedding and output layer). Pad ids never occur as inputs; their logits are
exactly 0 (not -inf), so logits MUST be sliced to ``[..., :vocab_size]`` before any
softmax -- `MegatronTeacher.logits` does this.

Tied embeddings: with PP = 1 megatron shares the embedding matrix with the output
layer; with PP > 1 the last stage gets its own copy of the output layer read from
``embed_tokens`` (no embedding-group all-reduce needed; the teacher is frozen).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaFamilyConfig:
    """The numbers of an HF Llama-family config that the megatron teacher needs."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    """Llama-3.1 style ("llama3") RoPE scaling factor, None without scaling."""
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    sliding_window: int | None
    """Attention window of Mistral / Qwen2; sequences must not be longer (checked at forward)."""

    @classmethod
    def from_hf(cls, hf_config: Any) -> LlamaFamilyConfig:
        """Read an HF `PretrainedConfig` (transformers 4.x or 5.x attribute layout)."""
        model_type = getattr(hf_config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"megatron teacher supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r} "
                "(use the hf teacher backend for other models)"
            )
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"megatron teacher mapping expects hidden_act='silu' (SwiGLU), got {act!r}")
        rope = dict(
            getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        )
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        factor: float | None = None
        if rope_type == "llama3":
            # megatron's _apply_scaling hard-codes these three; only the factor is a parameter.
            expected = {
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
            for k, v in expected.items():
                if float(rope.get(k, v)) != v:
                    raise ValueError(
                        f"llama3 RoPE scaling with {k}={rope[k]} is not supported (megatron uses {v})"
                    )
            factor = float(rope["factor"])
        elif rope_type != "default":
            raise ValueError(f"RoPE type {rope_type!r} is not supported by the megatron teacher mapping")
        heads = int(hf_config.num_attention_heads)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        window = getattr(hf_config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
            window = None
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls(
            model_type=model_type,
            num_layers=int(hf_config.num_hidden_layers),
            hidden_size=int(hf_config.hidden_size),
            num_heads=heads,
            num_query_groups=int(getattr(hf_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            ffn_hidden_size=int(hf_config.intermediate_size),
            vocab_size=int(hf_config.vocab_size),
            norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(theta),
            rope_scaling_factor=factor,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 4096)),
            sliding_window=int(window) if window else None,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LlamaFamilyConfig:
        """Read `config.json` of an HF checkpoint directory."""
        from transformers import AutoConfig

        return cls.from_hf(AutoConfig.from_pretrained(str(path)))


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest multiple of divisible_by * tp that is >= vocab_size (megatron's convention)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def build_transformer_config(
    cfg: LlamaFamilyConfig,
    tp: int,
    pp: int,
    dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
) -> Any:
    """megatron `TransformerConfig` for a frozen Llama-family teacher (local spec, no fusions)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    for n, what in ((cfg.num_heads, "attention heads"), (cfg.num_query_groups, "query groups")):
        if n % tp:
            raise ValueError(f"tensor-parallel size {tp} must divide the {n} {what}")
    if cfg.num_layers % pp:
        raise ValueError(f"pipeline-parallel size {pp} must divide the {cfg.num_layers} layers")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], silu(gate) * up
        activation_func=F.silu,
        add_bias_linear=cfg.o_bias or cfg.mlp_bias,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=False,  # every weight is loaded from the checkpoint
        # No fused kernels: they need CUDA / Apex / TE; the teacher's cost is matmuls anyway.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # torch.cuda.synchronize() after batched p2p is only a guard for old PyTorch.
        batch_p2p_sync=False,
    )


def gpt_model_kwargs(cfg: LlamaFamilyConfig, tp: int, pp: int, divisible_by: int = 128) -> dict[str, Any]:
    """Keyword arguments of `GPTModel` (besides config, spec, pre/post_process, pg_collection)."""
    kwargs: dict[str, Any] = {
        "vocab_size": padded_vocab_size(cfg.vocab_size, tp, divisible_by),
        "max_sequence_length": cfg.max_position_embeddings,
        "position_embedding_type": "rope",
        "rotary_base": cfg.rope_theta,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings and pp == 1,
    }
    if cfg.rope_scaling_factor is not None:
        kwargs.update(rope_scaling=True, rope_scaling_factor=cfg.rope_scaling_factor)
    return kwargs


class CheckpointReader:
    """Lazy, slice-wise access to an HF safetensors checkpoint (single file or sharded).

    `read(name, rows, cols)` returns only the requested block of a tensor; files are
    opened on first use and closed by `close()` / the context manager.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.directory}"
            )
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.directory}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(
                safe_open(str(self.directory / file), framework="pt", device="cpu")
            )
        return self._handles[file]

    def shape(self, name: str) -> list[int]:
        """Full shape of a stored tensor (reads only the header)."""
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Rows (dim 0) and columns (dim 1) of a stored tensor; None = all."""
        sl = self._handle(name).get_slice(name)
        ndim = len(sl.get_shape())
        index = (rows or slice(None),) if ndim == 1 else (rows or slice(None), cols or slice(None))
        return sl[index]

    def close(self) -> None:
        """Close every opened file."""
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prefix(reader: CheckpointReader) -> str:
    for prefix in ("model.", ""):
        if f"{prefix}embed_tokens.weight" in reader:
            return prefix
    raise KeyError(f"no embed_tokens.weight in {reader.directory}: not a Llama-family checkpoint")


def _vocab_rows(reader: CheckpointReader, name: str, vocab: int, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of a [vocab, d] matrix, zero-filled past the true vocabulary. Returns [hi-lo, d]."""
    real = reader.read(name, slice(lo, min(hi, vocab))) if lo < vocab else None
    d = reader.shape(name)[1]
    out = torch.zeros(hi - lo, d, dtype=real.dtype if real is not None else torch.float32)
    if real is not None:
        out[: real.shape[0]] = real
    return out


def megatron_shard_state(
    reader: CheckpointReader,
    cfg: LlamaFamilyConfig,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    divisible_by: int = 128,
) -> dict[str, torch.Tensor]:
    """This rank's megatron parameters {megatron name: tensor}, read slice by slice.

    Names are those of `GPTModel.named_parameters()` on stage pp_rank, TP rank tp_rank.
    """
    hf = _prefix(reader)
    out: dict[str, torch.Tensor] = {}
    hd = cfg.head_dim
    groups = cfg.num_query_groups // tp
    heads_per_group = cfg.num_heads // cfg.num_query_groups
    f = cfg.ffn_hidden_size // tp
    f_rows = slice(tp_rank * f, (tp_rank + 1) * f)
    head_cols = slice(tp_rank * cfg.num_heads // tp * hd, (tp_rank + 1) * cfg.num_heads // tp * hd)
    vocab_p = padded_vocab_size(cfg.vocab_size, tp, divisible_by)
    v_lo, v_hi = tp_rank * vocab_p // tp, (tp_rank + 1) * vocab_p // tp
    per_stage = cfg.num_layers // pp

    def zeros_if_absent(name: str, size: int) -> torch.Tensor:
        return reader.read(name) if name in reader else torch.zeros(size)

    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = _vocab_rows(
            reader, f"{hf}embed_tokens.weight", cfg.vocab_size, v_lo, v_hi
        )
    for local in range(per_stage):
        src, dst = f"{hf}layers.{pp_rank * per_stage + local}.", f"decoder.layers.{local}."
        out[dst + "input_layernorm.weight"] = reader.read(src + "input_layernorm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = reader.read(src + "post_attention_layernorm.weight")
        # linear_qkv: for each query group of this rank, [q rows of its heads; k rows; v rows].
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            blocks = []
            for g in range(tp_rank * groups, (tp_rank + 1) * groups):
                q = slice(g * heads_per_group * hd, (g + 1) * heads_per_group * hd)
                kv = slice(g * hd, (g + 1) * hd)
                blocks += [
                    reader.read(f"{src}self_attn.{p}_proj.{kind}", r)
                    for p, r in (("q", q), ("k", kv), ("v", kv))
                ]
            out[f"{dst}self_attention.linear_qkv.{kind}"] = torch.cat(blocks)
        out[dst + "self_attention.linear_proj.weight"] = reader.read(
            src + "self_attn.o_proj.weight", None, head_cols
        )
        gate, up = (reader.read(f"{src}mlp.{p}_proj.weight", f_rows) for p in ("gate", "up"))
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[dst + "mlp.linear_fc2.weight"] = reader.read(src + "mlp.down_proj.weight", None, f_rows)
        if cfg.o_bias or cfg.mlp_bias:  # megatron: add_bias_linear covers proj, fc1 and fc2
            d = cfg.hidden_size
            out[dst + "self_attention.linear_proj.bias"] = zeros_if_absent(src + "self_attn.o_proj.bias", d)
            gate_b, up_b = (
                reader.read(f"{src}mlp.{p}_proj.bias", f_rows) if cfg.mlp_bias else torch.zeros(f)
                for p in ("gate", "up")
            )
            out[dst + "mlp.linear_fc1.bias"] = torch.cat([gate_b, up_b])
            out[dst + "mlp.linear_fc2.bias"] = zeros_if_absent(src + "mlp.down_proj.bias", d)
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = reader.read(f"{hf}norm.weight")
        if not (cfg.tie_word_embeddings and pp == 1):  # PP = 1 + tied: shares embedding.word_embeddings
            head = f"{hf}embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            out["output_layer.weight"] = _vocab_rows(reader, head, cfg.vocab_size, v_lo, v_hi)
    return out


def load_megatron_shard(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    cfg: LlamaFamilyConfig,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    divisible_by: int = 128,
) -> None:
    """Copy this rank's slices of an HF checkpoint into `model` (a megatron GPTModel shard).

    Every parameter of `model` must be covered and shapes must match exactly; raises
    ValueError listing the differences otherwise.
    """
    with CheckpointReader(checkpoint_dir) as reader:
        state = megatron_shard_state(reader, cfg, tp_rank, tp, pp_rank, pp, divisible_by)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(params[k].shape)}"
        for k in params.keys() & state.keys()
        if state[k].shape != params[k].shape
    ]
    if missing or unexpected or bad:
        raise ValueError(
            f"HF -> megatron mapping mismatch: missing={missing} unexpected={unexpected} shapes={bad}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
