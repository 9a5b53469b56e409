"""Loading and building HF causal LMs, and reading their response-position states.

`response_view` is the one place that turns a model forward pass into the
`ResponseView` the losses consume (hidden states at response positions only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cot2align.configbase import ConfigBase, require
from cot2align.data.dataset import SeqBatch
from cot2align.data.views import ResponseView

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TinyModelConfig(ConfigBase):
    """A small model built from a config (embedded task, tests)."""

    arch: Literal["llama", "gpt2", "qwen2"] = "llama"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    """Query groups (llama / qwen2); gpt2 ignores it."""
    intermediate: int = 384
    max_positions: int = 512

    def check(self, prefix: str) -> None:
        require(self.hidden % self.heads == 0, f"{prefix}.hidden",
                f"{self.hidden} is not divisible by heads={self.heads}")
        require(self.heads % self.kv_heads == 0, f"{prefix}.kv_heads",
                f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}")


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A freshly initialised causal LM sized for `tokenizer`, deterministic in `seed`."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model: PreTrainedModel
    if cfg.arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_positions=cfg.max_positions, n_embd=cfg.hidden, n_layer=cfg.layers,
            n_head=cfg.heads, n_inner=cfg.intermediate, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **special))
    else:
        common = dict(vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                      num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
                      tie_word_embeddings=False, **special)
        if cfg.arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**common))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load an HF tokenizer from a local folder; pad falls back to EOS."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: str = "float32") -> PreTrainedModel:
    """Load an HF causal LM from a local folder (no hub access)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF checkpoint folder (no config.json)")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)


def num_layers(model: PreTrainedModel) -> int:
    """L: the index of the final-norm output in `hidden_states` (0 = embeddings)."""
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)


def resolve_layers(layers: list[int], L: int) -> list[int]:
    """Map -1 (and other negatives) to L + 1 + idx; check range."""
    out = []
    for layer in layers:
        r = layer if layer >= 0 else L + 1 + layer
        if not 0 <= r <= L:
            raise ValueError(f"layer {layer} is out of range for a model with {L} layers (0..{L} or -1)")
        out.append(r)
    return out


def response_view(model: PreTrainedModel, batch: SeqBatch, layers: list[int]) -> ResponseView:
    """Run `model` on a padded batch and keep the requested layers at response positions.

    layers: resolved indices (0 = embedding output, L = final-norm output).
    Returns hidden[layer] [B, N, d] gathered at batch.resp_index.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    idx = batch.resp_index
    hidden = {}
    for layer in layers:
        h = out.hidden_states[layer]  # (B, T, d)
        hidden[layer] = torch.gather(h, 1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    return ResponseView(hidden=hidden, mask=batch.resp_mask, inputs=batch.inputs, targets=batch.targets)


def output_head(model: PreTrainedModel) -> nn.Module:
    """The output layer (hidden [..., d] -> logits [..., V])."""
    head = model.get_output_embeddings()
    assert head is not None, f"{type(model).__name__} has no output layer"
    return head


def input_embed(model: PreTrainedModel) -> nn.Module:
    """The input embedding (ids [...] -> [..., d])."""
    return model.get_input_embeddings()


M = TypeVar("M", bound=nn.Module)


def frozen(model: M) -> M:
    """Eval mode and requires_grad False on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hidden_size(model: PreTrainedModel) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def logits_at(head: nn.Module, hidden: Tensor) -> Tensor:
    """head(hidden) in float32: [B, N, d] -> [B, N, V]."""
    return head(hidden).float()
