"""The float64 reference against Hugging Face transformers' own Llama and Qwen2 attention, on the CPU.

Every fused and unfused path is checked against :func:`reference_step`, and the reference itself
only against loops written from the same reading of the models (test_fused_reference.py), so a
shared misreading (which elements RoPE pairs, which query heads share a key/value head, where the
QKV bias goes, Llama 3's frequency bands) would pass them all. Here transformers' RMSNorm, rotary
embedding and attention modules, the code that runs the released checkpoints, compute the same
decode step from the same weights (our fused ``qkv`` rows split into q_proj / k_proj / v_proj)
with our cache rows as their past keys and values. Only "neox" RoPE is covered: these models
rotate halves (``rotate_half``); none pairs neighbours as GPT-J does.

Tolerance: both sides run in float64, but transformers rounds to float32 inside its modules
whatever their dtype: RMSNorm normalizes in float32, the rotary embedding computes ``inv_freq``
and ``position * inv_freq`` in float32, and eager attention takes its softmax in float32. So the
two sides agree to float32 rounding (about 1e-7 relative), not to float64's 1e-15.
"""

import dataclasses

import pytest
import torch

from clusterlab.fused.config import (
    LLAMA3_2_1B,
    AttentionConfig,
    AttentionWeights,
    KVCache,
    Llama3RopeScaling,
    rope_frequencies,
)
from clusterlab.fused.reference import reference_step, relative_error

transformers = pytest.importorskip("transformers", reason="the cross-check needs transformers (the test extra)")
llama = pytest.importorskip("transformers.models.llama.modeling_llama")
qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")

#: transformers' float32 rounding (see the module docstring) cost at most 2.4e-7 over 200 random
#: draws of each config. Mistakes cost more: a wrong RoPE pairing, position, theta or weight row
#: 1e-1 and up; Llama 3's scaling left out 3e-3 (at these small positions); a Qwen2 rms_eps of 1e-5
#: instead of 1e-6 2e-6.
STEP_TOLERANCE = 1e-6
#: Its ``inv_freq`` is computed in float32: a few float32 ulps (1.2e-7 each) apart from ours.
FREQUENCY_TOLERANCE = 1e-6

LLAMA3_SCALING = Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

#: name: (model family, config); tiny, but each with the shape quirk its model has.
CONFIGS = {
    "llama-mha": ("llama", AttentionConfig(hidden_size=192, heads=4, kv_heads=4, head_dim=64)),
    "llama-gqa": ("llama", AttentionConfig(hidden_size=256, heads=8, kv_heads=2, head_dim=64, rope_theta=500000.0)),
    "llama3-scaled": ("llama", AttentionConfig(hidden_size=256, heads=4, kv_heads=2, head_dim=128,
                                               rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "qwen2-bias": ("qwen2", AttentionConfig(hidden_size=224, heads=7, kv_heads=1, head_dim=64,
                                            rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True)),
}

#: family: (config class, RMSNorm, rotary embedding, attention)
MODULES = {
    "llama": (transformers.LlamaConfig, llama.LlamaRMSNorm, llama.LlamaRotaryEmbedding, llama.LlamaAttention),
    "qwen2": (transformers.Qwen2Config, qwen2.Qwen2RMSNorm, qwen2.Qwen2RotaryEmbedding, qwen2.Qwen2Attention),
}

#: A ragged batch: the first step of one sequence, and two further along.
POSITIONS = [0, 5, 11]


def rope_parameters(config: AttentionConfig) -> dict:
    """``config``'s RoPE as a transformers config's ``rope_parameters``."""
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": config.rope_theta,
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position,
    }


def hf_config(family: str, config: AttentionConfig):
    """A one-layer transformers config of ``family`` with ``config``'s shapes, eager attention."""
    config_class = MODULES[family][0]
    return config_class(
        hidden_size=config.hidden_size,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_eps,
        rope_parameters=rope_parameters(config),
        max_position_embeddings=131072,  # transformers wants it above Llama 3's original 8192
        num_hidden_layers=1,
        attn_implementation="eager",
    )


def hf_block(family: str, config: AttentionConfig, weights: AttentionWeights):
    """transformers' RMSNorm, rotary embedding and attention (layer 0) in float64, holding ``weights``."""
    hf = hf_config(family, config)
    _, norm_class, rotary_class, attention_class = MODULES[family]
    norm = norm_class(config.hidden_size, eps=config.rms_eps).double()
    rotary = rotary_class(hf).double()
    attention = attention_class(hf, layer_idx=0).double().eval()
    d = config.head_dim
    rows = [config.heads * d, config.kv_heads * d, config.kv_heads * d]
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    biases = weights.qkv_bias.double().split(rows) if config.qkv_bias else (None,) * 3
    with torch.no_grad():
        norm.weight.copy_(weights.norm.double())
        for projection, weight, bias in zip(projections, weights.qkv.double().split(rows), biases):
            projection.weight.copy_(weight)
            if bias is not None:
                projection.bias.copy_(bias)
        attention.o_proj.weight.copy_(weights.o.double())
    assert attention.head_dim == d and (attention.q_proj.bias is not None) == config.qkv_bias
    return norm, rotary, attention


def hf_step(block, h: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, position: int):
    """One sequence's step through transformers: the attention output ``[hidden_size]`` and the
    key and value rows its cache appended ``[kv_heads, head_dim]``.

    ``h``: hidden + residual ``[hidden_size]``; ``past_k``/``past_v``: our cache rows
    ``0 .. position-1`` ``[kv_heads, position, head_dim]``, keys already rotated, as transformers
    caches them. No mask: the single query may see every cached key and itself.
    """
    norm, rotary, attention = block
    cache = transformers.DynamicCache()
    cache.update(past_k[None].double(), past_v[None].double(), layer_idx=0)
    x = norm(h.double()[None, None])  # [batch 1, seq 1, hidden]
    cos_sin = rotary(x, torch.tensor([[position]]))
    with torch.no_grad():
        out, _ = attention(x, position_embeddings=cos_sin, attention_mask=None, cache=cache)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == position + 1
    return out[0, 0], layer.keys[0, :, position], layer.values[0, :, position]


#: Input sizes: about 1, and small enough (a mean square near 2e-6) that the RMSNorm's epsilon
#: (1e-5, Qwen2's 1e-6) moves the normalized input by much more than the tolerance.
SCALES = {"unit": 1.0, "tiny": 1e-3}


@pytest.mark.parametrize("scale", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_step_matches_transformers_attention_on_a_ragged_batch(name, scale):
    family, config = CONFIGS[name]
    batch = len(POSITIONS)
    weights = AttentionWeights.random(config, torch.float16)
    cache = KVCache.random(config, batch=batch, capacity=max(POSITIONS) + 4, dtype=torch.float16)
    hidden = (torch.randn(batch, config.hidden_size) * scale).half()
    residual = (torch.randn(batch, config.hidden_size) * scale).half()
    want = reference_step(config, weights, hidden, residual, cache, POSITIONS)
    block = hf_block(family, config, weights)
    for b, position in enumerate(POSITIONS):
        h = hidden[b].double() + residual[b].double()
        out, k, v = hf_step(block, h, cache.k[b, :, :position], cache.v[b, :, :position], position)
        assert relative_error(out, want.out[b]) < STEP_TOLERANCE, (name, position)
        assert relative_error(k, want.k[b]) < STEP_TOLERANCE, (name, position)
        assert relative_error(v, want.v[b]) < STEP_TOLERANCE, (name, position)


@pytest.mark.parametrize(
    "config",
    [LLAMA3_2_1B, AttentionConfig(hidden_size=256, heads=2, kv_heads=1, head_dim=128, rope_theta=500000.0,
                                  rope_scaling=Llama3RopeScaling(factor=8.0))],
    ids=["llama3.2-1b", "llama3.1-head128"],
)
def test_llama3_rope_scaling_frequencies_match_transformers_inv_freq(config):
    rotary = llama.LlamaRotaryEmbedding(hf_config("llama", config))
    assert rotary.rope_type == "llama3"
    ours = rope_frequencies(config)
    theirs = rotary.inv_freq.double()
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=FREQUENCY_TOLERANCE, atol=0.0)
    # The scaling moved frequencies by up to `factor`: the tolerance is far below what it changes.
    unscaled = rope_frequencies(dataclasses.replace(config, rope_scaling=None))
    assert (unscaled / ours).max() == pytest.approx(config.rope_scaling.factor, rel=1e-3)
