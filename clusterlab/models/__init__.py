"""Whole models decoded with the fused layers.

- :class:`LlamaModel` — a Llama / Mistral / Qwen2 decoder read from a Hugging Face checkpoint directory:
  PyTorch prefill, one :class:`~clusterlab.fused.DecodeAttention` and (for the batches where it was
  measured faster, :func:`fused_mlp_max_batch`) one :class:`~clusterlab.fused.DecodeMLP` per layer at
  decode time,
  :meth:`LlamaModel.generate` (greedy or temperature / top-k sampling), one CUDA graph per token
  on a GPU (:class:`Decoder`).
- :class:`ModelConfig` — the checkpoint's ``config.json``; :func:`load_weights` — its safetensors.
- :func:`random` — the models of :data:`MODEL_PRESETS` (Llama-2-7B, Llama-3-8B, Llama-3.2-1B,
  Qwen2.5-7B) with random weights, for benchmarks; :func:`to_transformers` — transformers' own
  model over the same weights, to check against.
"""

from .decode import Decoder
from .llama import (
    FUSED_MLP_MAX_BATCH,
    MODEL_PRESETS,
    LayerWeights,
    LlamaModel,
    ModelConfig,
    ModelWeights,
    checkpoint_eos,
    fused_mlp_max_batch,
    load_weights,
    random,
    random_weights,
    to_transformers,
)

__all__ = [
    "FUSED_MLP_MAX_BATCH",
    "MODEL_PRESETS",
    "Decoder",
    "LayerWeights",
    "LlamaModel",
    "ModelConfig",
    "ModelWeights",
    "checkpoint_eos",
    "fused_mlp_max_batch",
    "load_weights",
    "random",
    "random_weights",
    "to_transformers",
]
