"""CPU shims for the places where megatron-core hard-codes CUDA.

megatron-core runs on CPU with gloo once two kinds of hard-coded CUDA device are
redirected (measured with megatron-core 0.16.1; see docs/architecture.md, "Platform facts"):

1. ``torch.cuda.current_device()`` used as a *device argument* when allocating
   tensors, e.g. (0.16.1 line numbers)
   - ``models/common/embeddings/rotary_pos_embedding.py:162,297`` (RoPE inv_freq),
   - ``utils.py:631`` ``GlobalMemoryBuffer.get_tensor`` (attention matmul buffer),
   - ``pipeline_parallel/p2p_communication.py:313,321`` (receive buffers between stages),
   - ``tensor_parallel/mappings.py:91,141,148,181`` (TP gather buffers, e.g. logits).
   On a CPU-only torch build the real function raises, so it is replaced by one
   returning ``"cpu"``; every such call site only passes the value on as a device.
2. ``torch.zeros([], dtype=torch.int, device="cuda")`` for the token counter in
   ``pipeline_parallel/schedules.py:596,983,2138`` (``forward_backward_no_pipelining``,
   the interleaved and the non-interleaved schedule). The ``torch`` name inside that
   module only is replaced by a proxy that maps ``device="cuda"`` to ``"cpu"`` for
   tensor factories and forwards everything else to the real ``torch``.

Not shimmed (avoided by configuration in ``megatron_model.py`` instead):
``torch.cuda.synchronize()`` after batched p2p (``batch_p2p_sync=False``),
``weight.data.cuda()`` in ``LanguageModule.setup_embeddings_and_output_layer``
(tied embeddings are not shared across pipeline stages; the last stage loads its own copy),
the CUDA RNG tracker (``initialize_rng_tracker(inference_rng_tracker=True)``) and
fused kernels (all fusions off).

The shims are applied only when CUDA is unavailable and at most once per process.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch

# Modules whose global name `torch` is replaced by `_CudaToCpuTorch`.
_PROXIED_MODULES = ("megatron.core.pipeline_parallel.schedules",)
_FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange"})

_applied = False


def _cpu_current_device() -> str:
    """Stand-in for `torch.cuda.current_device()` on CPU: the device to allocate on."""
    return "cpu"


def _to_cpu(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuTorch(types.ModuleType):
    """A stand-in for the `torch` module whose tensor factories map device="cuda" to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu(kwargs["device"])
            return attr(*args, **kwargs)

        return factory


def shims_needed() -> bool:
    """True when megatron-core would hit CUDA-only calls (no CUDA device available)."""
    return not torch.cuda.is_available()


def apply_cpu_shims() -> bool:
    """Apply the CPU shims if CUDA is unavailable (idempotent). Returns True if shims are active."""
    global _applied
    if not shims_needed():
        return False
    if _applied:
        return True
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]
    proxy = _CudaToCpuTorch()
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy  # type: ignore[attr-defined]
    _applied = True
    return True
