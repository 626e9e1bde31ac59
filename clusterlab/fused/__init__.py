"""The decode attention block fused into one cluster kernel.

- :class:`DecodeAttention` — the layer: torch tensors in, ``(out, new_residual)`` out, KV cache
  appended; the cluster kernel on a Hopper GPU, the simulator on the CPU.
- :class:`AttentionConfig` with presets :data:`LLAMA2_7B`, :data:`LLAMA3_8B`, :data:`LLAMA3_2_1B`,
  :data:`QWEN2_5_7B`; :class:`Llama3RopeScaling`; :class:`AttentionWeights`; :class:`KVCache`.
- :class:`DecodeMLP` — a decoder layer's MLP block (residual add + RMSNorm + gate/up + SiLU * up +
  down) as one cluster kernel, :class:`MLPConfig`, :class:`MLPWeights`, :func:`reference_mlp`
  (:mod:`clusterlab.fused.mlp`).
- :func:`reference_step` — the float64 oracle; :class:`UnfusedAttention` — the same block as
  separate PyTorch calls (the benchmark's baseline).
- Multi-head latent attention (DeepSeek-V2), :mod:`clusterlab.fused.mla`: :class:`MLAConfig` with
  preset :data:`DEEPSEEK_V2_LITE` (by name in :data:`MLA_PRESETS`), :class:`YarnRopeScaling`,
  :class:`MLAWeights`, :class:`LatentCache`, :func:`mla_rope_table`; :func:`mla_reference_step` —
  its float64 oracle (the absorbed dataflow); :class:`UnfusedMLA` — its PyTorch baseline;
  :class:`DecodeMLA` — the layer: three cluster launches a step on a Hopper GPU
  (:mod:`clusterlab.fused.mla_kernel`), the simulator on the CPU.

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
from .mla import (
    DEEPSEEK_V2_LITE,
    MLA_PRESETS,
    LatentCache,
    MLAConfig,
    MLAWeights,
    YarnRopeScaling,
    mla_rope_table,
)
from .mla_layer import DecodeMLA
from .mla_reference import UnfusedMLA, mla_reference_step
from .mlp import DecodeMLP, MLPConfig, MLPWeights, reference_mlp
from .reference import UnfusedAttention, reference_step, relative_error

__all__ = [
    "DEEPSEEK_V2_LITE",
    "LLAMA2_7B",
    "LLAMA3_2_1B",
    "LLAMA3_8B",
    "MLA_PRESETS",
    "PRESETS",
    "QWEN2_5_7B",
    "AttentionConfig",
    "AttentionWeights",
    "DecodeAttention",
    "DecodeMLA",
    "DecodeMLP",
    "KVCache",
    "LatentCache",
    "Llama3RopeScaling",
    "MLAConfig",
    "MLAWeights",
    "MLPConfig",
    "MLPWeights",
    "UnfusedAttention",
    "UnfusedMLA",
    "YarnRopeScaling",
    "mla_reference_step",
    "mla_rope_table",
    "reference_mlp",
    "reference_step",
    "relative_error",
    "rope_table",
]
