"""The decode attention block fused into one cluster kernel.

- :class:`DecodeAttention` — the layer: torch tensors in, ``(out, new_residual)`` out, KV cache
  appended; the cluster kernel on a Hopper GPU, the simulator on the CPU.
- :class:`AttentionConfig` with presets :data:`LLAMA2_7B`, :data:`LLAMA3_8B`, :data:`LLAMA3_2_1B`,
  :data:`QWEN2_5_7B`; :class:`Llama3RopeScaling`; :class:`AttentionWeights`; :class:`KVCache`.
- :func:`reference_step` — the float64 oracle; :class:`UnfusedAttention` — the same block as
  separate PyTorch calls (the benchmark's baseline).

How the work is split over clusters and blocks: :mod:`clusterlab.fused.plan`.
"""

from .config import (
    LLAMA2_7B,
    LLAMA3_2_1B,
    LLAMA3_8B,
    PRESETS,
    QWEN2_5_7B,
    AttentionConfig,
    AttentionWeights,
    KVCache,
    Llama3RopeScaling,
    rope_table,
)
from .layer import DecodeAttention
from .reference import UnfusedAttention, reference_step, relative_error

__all__ = [
    "LLAMA2_7B",
    "LLAMA3_2_1B",
    "LLAMA3_8B",
    "PRESETS",
    "QWEN2_5_7B",
    "AttentionConfig",
    "AttentionWeights",
    "DecodeAttention",
    "KVCache",
    "Llama3RopeScaling",
    "UnfusedAttention",
    "reference_step",
    "relative_error",
    "rope_table",
]
