"""Whole models decoded with the fused attention layer.

- :class:`LlamaModel` — a Llama / Qwen2 decoder read from a Hugging Face checkpoint directory:
  PyTorch prefill, one :class:`~clusterlab.fused.DecodeAttention` per layer at decode time,
  :meth:`LlamaModel.generate` (greedy or temperature / top-k sampling).
- :class:`ModelConfig` — the checkpoint's ``config.json``; :func:`load_weights` — its safetensors.
"""

from .llama import (
    LayerWeights,
    LlamaModel,
    ModelConfig,
    ModelWeights,
    checkpoint_eos,
    load_weights,
)

__all__ = ["LayerWeights", "LlamaModel", "ModelConfig", "ModelWeights", "checkpoint_eos", "load_weights"]
