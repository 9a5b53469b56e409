"""The tiny models every test builds (a plain module, not a conftest): a 2-layer Llama teacher with
grouped-query attention and a 2-layer GPT-2 student, different architectures and hidden sizes."""

from __future__ import annotations

from cot2align.models import TinyModelConfig

TEACHER = TinyModelConfig(arch="llama", layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
STUDENT = TinyModelConfig(arch="gpt2", layers=2, hidden=24, heads=2, kv_heads=2, intermediate=48)
