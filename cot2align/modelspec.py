"""Architecture numbers of decoder-only transformers, read from HF ``config.json`` files.

`ModelSpec` counts parameters and matmul FLOPs (no weights, no torch); the planner
(`cot2align.plan`) builds its memory and throughput model on it. Model presets usable by
name live in ``configs/models/<name>/config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot2align.configbase import ConfigError

MODEL_PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
"""Folders with HF config.json files usable by name (e.g. `llama-3-70b`)."""
_GEMMA_TYPES = {"gemma", "gemma2", "gemma3", "gemma3_text"}
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", *_GEMMA_TYPES}



@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder-only transformer, enough to count parameters and FLOPs."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    """Query groups (GQA); equal to num_heads for multi-head attention."""
    head_dim: int
    ffn_size: int
    vocab_size: int
    tied_embeddings: bool
    gated_mlp: bool
    """SwiGLU/GeGLU (three FFN matrices) instead of a GELU MLP (two)."""
    norm_weights: int = 1
    """Parameters per hidden unit of one norm: 1 RMSNorm, 2 LayerNorm (weight + bias)."""
    norms_per_layer: int = 2
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys (Qwen3, Gemma-3)."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    learned_positions: int = 0
    """Rows of a learned position embedding (GPT-2); 0 for rotary models."""
    notes: tuple[str, ...] = ()
    """Assumptions made while parsing (shown as plan warnings)."""

    @property
    def q_dim(self) -> int:
        """Width of the query projection: heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections: query groups * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        """h*q_dim + 2*h*kv_dim + q_dim*h (+ q/k/v biases, + o bias)."""
        h = self.hidden_size
        n = 2 * h * self.q_dim + 2 * h * self.kv_dim
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            n += h
        return n

    @property
    def mlp_params(self) -> int:
        """Gated: 3*h*f (+ 2f + h biases); GELU: 2*h*f (+ f + h biases)."""
        h, f = self.hidden_size, self.ffn_size
        if self.gated_mlp:
            return 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        return 2 * h * f + ((f + h) if self.mlp_bias else 0)

    @property
    def layer_norm_params(self) -> int:
        """Norm parameters inside one layer (incl. per-head q/k norms)."""
        return self.norms_per_layer * self.norm_weights * self.hidden_size + (
            2 * self.head_dim if self.qk_norm else 0
        )

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer (P_layer)."""
        return self.attention_params + self.mlp_params + self.layer_norm_params

    @property
    def embedding_params(self) -> int:
        """Token embedding V*h."""
        return self.vocab_size * self.hidden_size

    @property
    def position_params(self) -> int:
        """Learned position embedding rows * h (0 for rotary models)."""
        return self.learned_positions * self.hidden_size

    @property
    def final_norm_params(self) -> int:
        """The final norm before the LM head."""
        return self.norm_weights * self.hidden_size

    @property
    def head_params(self) -> int:
        """Untied output layer V*h; 0 when tied to the embedding."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """All parameters: L*P_layer + embeddings + final norm + untied head."""
        return (
            self.num_layers * self.layer_params
            + self.embedding_params
            + self.position_params
            + self.final_norm_params
            + self.head_params
        )


def _field(data: Mapping[str, Any], names: Sequence[str], where: str, default: Any = ConfigError) -> Any:
    """First present key of `names` in `data`; raise ConfigError naming `where` if required and absent."""
    for n in names:
        if data.get(n) is not None:
            return data[n]
    if default is ConfigError:
        raise ConfigError(f"{where}: missing {' / '.join(names)}")
    return default


def model_spec_from_hf_config(data: Mapping[str, Any], name: str = "model") -> ModelSpec:
    """Parse a HF config.json mapping (GPT-2, Llama, Mistral, Qwen2/3, Gemma 1/2/3) into a ModelSpec."""
    outer = data
    if "text_config" in data and "num_hidden_layers" not in data:  # multimodal wrappers (Gemma-3)
        data = {**data["text_config"], "model_type": data["text_config"].get("model_type", "")}
    mt = str(data.get("model_type", "")).lower()
    notes: list[str] = []
    if mt == "gpt2" or "n_embd" in data:
        h = int(_field(data, ["n_embd", "hidden_size"], name))
        heads = int(_field(data, ["n_head", "num_attention_heads"], name))
        return ModelSpec(
            name=name,
            model_type=mt or "gpt2",
            num_layers=int(_field(data, ["n_layer", "num_hidden_layers"], name)),
            hidden_size=h,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=h // heads,
            ffn_size=int(_field(data, ["n_inner"], name, 4 * h)),
            vocab_size=int(_field(data, ["vocab_size"], name)),
            tied_embeddings=bool(outer.get("tie_word_embeddings", True)),
            gated_mlp=False,
            norm_weights=2,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            learned_positions=int(_field(data, ["n_positions", "max_position_embeddings"], name, 1024)),
        )
    if mt not in _LLAMA_LIKE:
        notes.append(f"{name}: model_type {mt!r} not known; assumed a Llama-like gated-MLP RMSNorm decoder")
    h = int(_field(data, ["hidden_size"], name))
    heads = int(_field(data, ["num_attention_heads"], name))
    gemma = mt in _GEMMA_TYPES
    return ModelSpec(
        name=name,
        model_type=mt,
        num_layers=int(_field(data, ["num_hidden_layers"], name)),
        hidden_size=h,
        num_heads=heads,
        num_kv_heads=int(_field(data, ["num_key_value_heads"], name, heads)),
        head_dim=int(_field(data, ["head_dim"], name, h // heads)),
        ffn_size=int(_field(data, ["intermediate_size"], name)),
        vocab_size=int(_field(data, ["vocab_size"], name)),
        tied_embeddings=bool(outer.get("tie_word_embeddings", data.get("tie_word_embeddings", gemma))),
        gated_mlp=True,
        norms_per_layer=4 if mt in {"gemma2", "gemma3", "gemma3_text"} else 2,
        qk_norm=mt in {"qwen3", "gemma3", "gemma3_text"},
        qkv_bias=mt == "qwen2" or bool(data.get("attention_bias", False)),
        o_bias=bool(data.get("attention_bias", False)),
        mlp_bias=bool(data.get("mlp_bias", False)),
        notes=tuple(notes),
    )


def resolve_model_config(ref: str | Path) -> Path:
    """A config.json path from a file, a folder holding one, or a preset name in configs/models/."""
    p = Path(ref)
    for cand in (p, p / "config.json", MODEL_PRESETS_DIR / str(ref) / "config.json"):
        if cand.is_file():
            return cand
    presets = sorted(d.name for d in MODEL_PRESETS_DIR.iterdir()) if MODEL_PRESETS_DIR.is_dir() else []
    raise ConfigError(f"model config {str(ref)!r}: no such file or folder; presets: {', '.join(presets)}")


def load_model_spec(ref: str | Path) -> ModelSpec:
    """Read a HF config.json (file, folder or preset name) into a ModelSpec named after its folder."""
    path = resolve_model_config(ref)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    return model_spec_from_hf_config(data, name=path.parent.name)
