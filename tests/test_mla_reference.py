"""The MLA float64 reference against transformers' own DeepSeek-V2 attention, the unfused layer against
the reference, and the input checks; on the CPU.

transformers' ``DeepseekV2Attention`` is an independent implementation of the same block: it
decompresses every cached latent row into per-head keys and values with ``kv_b_proj`` and runs
ordinary attention over them, while :func:`mla_reference_step` never forms a key or a value
(absorbed query and output). Its RoPE is its own too: YaRN frequencies and magnitudes from
``modeling_rope_utils``, neighbours ``(2i, 2i+1)`` rotated as complex numbers. Our cache rows are
its cache rows (it caches the normalized latent and the RoPE'd ``k_pe``, exactly our layout), so
the two caches are filled from the same random latents, or (``test_..._prefill``) ours is filled
step by step while transformers processes the whole prefix at once under a causal mask.

The softmax scale: DeepSeek's YaRN multiplies it by ``m(mscale_all_dim)**2`` (1.59 in
DeepSeek-V2-Lite). transformers added that factor to ``DeepseekV2Attention`` in pull request
#47435 (merged 2026-07-20, function ``yarn_apply_mscale``); the version these tests were written
against, 5.24.0, has it (``DeepseekV2Attention.scaling`` read and asserted below), so no
correction is applied here. A version without it fails ``hf_block``'s check by name.

Tolerance: both sides run in float64, but transformers rounds to float32 inside: RMSNorm
normalizes in float32, RoPE rotates ``q_pe``/``k_pe`` as complex64 with float32 angles, the
softmax is taken in float32. So the two agree to float32 rounding (about 1e-7 relative).
"""

import dataclasses
import math

import pytest
import torch
from mla_shapes import SMALL, V2_YARN, shrunk

from clusterlab.fused.mla import (
    DEEPSEEK_V2_LITE,
    MLA_PRESETS,
    LatentCache,
    MLAConfig,
    MLAWeights,
    YarnRopeScaling,
    check_mla_weights,
    mla_rope_frequencies,
    mla_rope_table,
)
from clusterlab.fused.mla_reference import UnfusedMLA, mla_reference_step
from clusterlab.fused.reference import relative_error

transformers = pytest.importorskip("transformers", reason="the cross-check needs transformers (the test extra)")
deepseek = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2",
                               reason="the cross-check needs transformers' DeepSeek-V2 model")

#: transformers' float32 rounding (module docstring) cost at most 2.5e-7 over 100 random draws of
#: each small config and 2.0e-7 over 20 of DeepSeek-V2-Lite's shapes. Mistakes cost far more (5
#: draws each): the mscale**2 softmax factor left out 4e-1 to 6e-1; YaRN's frequencies left out
#: 2e-2 and up; the cos/sin attention factor left out 8e-2; rotate-half for interleaved pairs 1; W_UK
#: split off by one head 1; the latent norms' eps at rms_eps (1e-5) instead of 1e-6 5e-6.
STEP_TOLERANCE = 1e-6
#: transformers computes ``inv_freq`` in float32: a few float32 ulps (1.2e-7 each) from ours.
FREQUENCY_TOLERANCE = 1e-6

#: mscale != mscale_all_dim: cos and sin are scaled too (attention_factor 1.16), not only the softmax.
UNEQUAL_YARN = YarnRopeScaling(factor=16.0, original_max_position=64, beta_fast=32.0, beta_slow=1.0,
                               mscale=1.0, mscale_all_dim=0.5)

CONFIGS = {
    "plain": MLAConfig(**SMALL),
    "yarn": MLAConfig(**SMALL, rope_scaling=V2_YARN),
    "yarn-q-lora": MLAConfig(**SMALL, q_lora_rank=96, rope_scaling=V2_YARN),
    "yarn-unequal-mscale": MLAConfig(**SMALL, rope_theta=500.0, rope_scaling=UNEQUAL_YARN, rms_eps=1e-5),
    "rotate-half-q-lora": MLAConfig(**SMALL, q_lora_rank=48, rope_interleaved=False, rope_scaling=V2_YARN),
}

#: A ragged batch: the first step of one sequence, and two further along.
POSITIONS = [0, 5, 11]


def rope_parameters(config: MLAConfig) -> dict:
    """``config``'s RoPE as a transformers config's ``rope_parameters``."""
    yarn = config.rope_scaling
    if yarn is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    return {
        "rope_type": "yarn", "rope_theta": config.rope_theta, "factor": yarn.factor,
        "original_max_position_embeddings": yarn.original_max_position,
        "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
        "mscale": yarn.mscale, "mscale_all_dim": yarn.mscale_all_dim,
    }


def hf_config(config: MLAConfig):
    """A one-layer ``DeepseekV2Config`` with ``config``'s shapes and RoPE, eager attention."""
    yarn = config.rope_scaling
    return transformers.DeepseekV2Config(
        hidden_size=config.hidden_size,
        num_attention_heads=config.heads,
        kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rms_norm_eps=config.rms_eps,
        rope_parameters=rope_parameters(config),
        # YaRN's extended context, which transformers checks against factor × the original.
        max_position_embeddings=163840 if yarn is None else round(yarn.factor * yarn.original_max_position),
        num_hidden_layers=1,
        attn_implementation="eager",
    )


def interleaving(config: MLAConfig) -> torch.Tensor:
    """Where transformers' (interleaved) RoPE elements come from in ours: ``theirs = ours[..., perm]``.

    With ``rope_interleaved`` the identity; otherwise our pair ``(i, i + d_r/2)`` becomes their
    ``(2i, 2i+1)``, so a model that rotates halves is theirs with permuted ``q_pe``/``k_pe`` rows.
    """
    d = config.qk_rope_head_dim
    if config.rope_interleaved:
        return torch.arange(d)
    return torch.arange(d).view(2, d // 2).T.reshape(d)


def hf_block(config: MLAConfig, weights: MLAWeights):
    """transformers' input RMSNorm, rotary embedding and ``DeepseekV2Attention`` in float64, holding
    ``weights`` (q_pe and k_pe rows permuted by :func:`interleaving`)."""
    hf = hf_config(config)
    norm = deepseek.DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_eps).double()
    rotary = deepseek.DeepseekV2RotaryEmbedding(hf).double()
    attention = deepseek.DeepseekV2Attention(hf, layer_idx=0).double().eval()
    assert attention.scaling == pytest.approx(config.softmax_scale, rel=1e-12), (
        f"transformers {transformers.__version__} scales the softmax by {attention.scaling}, the config by "
        f"{config.softmax_scale}; transformers before its pull request #47435 lacks YaRN's m(mscale_all_dim)**2"
    )
    perm, r, d_n = interleaving(config), config.kv_lora_rank, config.qk_nope_head_dim
    q_rows = torch.cat([torch.arange(d_n), d_n + perm])  # one head's rows, theirs from ours
    q_rows = (torch.arange(config.heads)[:, None] * config.qk_head_dim + q_rows).reshape(-1)
    kv_a_rows = torch.cat([torch.arange(r), r + perm])
    with torch.no_grad():
        norm.weight.copy_(weights.input_layernorm.double())
        if config.q_lora_rank is None:
            attention.q_proj.weight.copy_(weights.q_proj.double()[q_rows])
        else:
            attention.q_a_proj.weight.copy_(weights.q_a_proj.double())
            attention.q_a_layernorm.weight.copy_(weights.q_a_layernorm.double())
            attention.q_b_proj.weight.copy_(weights.q_b_proj.double()[q_rows])
        attention.kv_a_proj_with_mqa.weight.copy_(weights.kv_a_proj_with_mqa.double()[kv_a_rows])
        attention.kv_a_layernorm.weight.copy_(weights.kv_a_layernorm.double())
        attention.kv_b_proj.weight.copy_(weights.kv_b_proj.double())
        attention.o_proj.weight.copy_(weights.o_proj.double())
    return norm, rotary, attention


def hf_step(config: MLAConfig, block, h: torch.Tensor, past: torch.Tensor, position: int):
    """One sequence's step through transformers: the attention output ``[hidden_size]`` and the row
    its cache appended ``[latent_width]``, in our element order.

    ``h``: hidden + residual ``[hidden_size]``; ``past``: our cache rows ``0 .. position-1``
    ``[position, latent_width]``. No mask: the single query may see every cached row and its own.
    """
    norm, rotary, attention = block
    perm, r = interleaving(config), config.kv_lora_rank
    past = past.double()
    cache = transformers.DynamicCache()
    cache.update(past[None, None, :, :r], past[None, None, :, r:][..., perm], layer_idx=0)
    x = norm(h.double()[None, None])  # [batch 1, seq 1, hidden]
    rotation = rotary(x, torch.tensor([[position]]))
    with torch.no_grad():
        out, _ = attention(x, attention_mask=None, cache=cache, position_embeddings=rotation)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == position + 1
    k_pe = torch.empty(config.qk_rope_head_dim, dtype=torch.float64)
    k_pe[perm] = layer.values[0, 0, position]  # their cache's "values" hold k_pe
    return out[0, 0], torch.cat([layer.keys[0, 0, position], k_pe])


def step_inputs(config: MLAConfig, dtype, batch: int, capacity: int):
    weights = MLAWeights.random(config, dtype)
    cache = LatentCache.random(config, batch, capacity, dtype)
    hidden, residual = torch.randn(2, batch, config.hidden_size).to(dtype)
    return weights, cache, hidden, residual


@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit", "tiny"])  # tiny: every norm's epsilon matters
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_step_matches_transformers_deepseek_v2_attention_on_a_ragged_batch(name, scale):
    config = CONFIGS[name]
    weights, cache, hidden, residual = step_inputs(config, torch.float16, len(POSITIONS), max(POSITIONS) + 4)
    weights, hidden, residual = shrunk(weights, hidden, residual, scale)
    want = mla_reference_step(config, weights, hidden, residual, cache, POSITIONS)
    block = hf_block(config, weights)
    for b, position in enumerate(POSITIONS):
        h = hidden[b].double() + residual[b].double()
        out, row = hf_step(config, block, h, cache.latent[b, :position], position)
        assert relative_error(out, want.out[b]) < STEP_TOLERANCE, (name, position)
        assert relative_error(row, want.latent[b]) < STEP_TOLERANCE, (name, position)
    torch.testing.assert_close(want.residual, hidden.double() + residual.double(), rtol=0, atol=0)


def test_reference_step_matches_transformers_on_deepseek_v2_lite_shapes():
    config = DEEPSEEK_V2_LITE
    positions = [0, 9, 30]
    weights, cache, hidden, residual = step_inputs(config, torch.bfloat16, len(positions), 32)
    want = mla_reference_step(config, weights, hidden, residual, cache, positions)
    block = hf_block(config, weights)
    for b, position in enumerate(positions):
        h = hidden[b].double() + residual[b].double()
        out, row = hf_step(config, block, h, cache.latent[b, :position], position)
        assert relative_error(out, want.out[b]) < STEP_TOLERANCE, position
        assert relative_error(row, want.latent[b]) < STEP_TOLERANCE, position


@pytest.mark.parametrize("name", ["yarn-q-lora", "rotate-half-q-lora"])
def test_reference_steps_reproduce_transformers_causal_prefill(name):
    """Our cache filled one step at a time equals transformers' after it processed the whole prefix
    at once, and every step's output its output at that position."""
    config, length = CONFIGS[name], 9
    weights = MLAWeights.random(config, torch.float32)
    hidden, residual = torch.randn(2, length, config.hidden_size)
    cache = LatentCache.empty(config, 1, length, torch.float32)
    outs = []
    for t in range(length):
        step = mla_reference_step(config, weights, hidden[t : t + 1], residual[t : t + 1], cache, t)
        cache.latent[0, t] = step.latent[0].float()
        outs.append(step.out[0])
    norm, rotary, attention = hf_block(config, weights)
    x = norm((hidden.double() + residual.double())[None])  # [1, length, hidden]
    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    theirs = transformers.DynamicCache()
    with torch.no_grad():
        out, _ = attention(x, attention_mask=causal, cache=theirs,
                           position_embeddings=rotary(x, torch.arange(length)[None]))
    layer, perm = theirs.layers[0], interleaving(config)
    k_pe = torch.empty_like(layer.values[0, 0])
    k_pe[:, perm] = layer.values[0, 0]
    assert relative_error(torch.stack(outs), out[0]) < STEP_TOLERANCE
    assert relative_error(cache.latent[0], torch.cat([layer.keys[0, 0], k_pe], dim=-1)) < STEP_TOLERANCE


@pytest.mark.parametrize("name", ["yarn-q-lora", "rotate-half-q-lora"])
def test_absorbed_matrices_are_transformers_decompression_per_head(name):
    config = CONFIGS[name]
    weights = MLAWeights.random(config, torch.float32)
    _, _, attention = hf_block(config, weights)
    latent = torch.randn(1, 1, 7, config.kv_lora_rank, dtype=torch.float64)
    k_pe = torch.randn(1, 1, 7, config.qk_rope_head_dim, dtype=torch.float64)
    with torch.no_grad():
        keys, values = attention.expand_kv(latent, k_pe)  # [1, heads, 7, d_n + d_r], [1, heads, 7, d_v]
    w_uk, w_uv = weights.absorbed(config)
    assert w_uk.shape == (config.heads, config.qk_nope_head_dim, config.kv_lora_rank) and w_uk.is_contiguous()
    assert w_uv.shape == (config.heads, config.kv_lora_rank, config.v_head_dim) and w_uv.is_contiguous()
    for head in range(config.heads):
        torch.testing.assert_close(keys[0, head, :, : config.qk_nope_head_dim], latent[0, 0] @ w_uk[head].double().T)
        torch.testing.assert_close(values[0, head], latent[0, 0] @ w_uv[head].double())


def test_transformers_scales_the_softmax_by_yarn_mscale_squared():
    """DeepSeek-V2-Lite: m(0.707) = 1 + 0.0707 ln 40 = 1.26080; the scale is 1.26080**2 / sqrt(192) = 1.58963 / sqrt(192)."""
    attention = deepseek.DeepseekV2Attention(hf_config(DEEPSEEK_V2_LITE), layer_idx=0)
    assert DEEPSEEK_V2_LITE.softmax_scale == pytest.approx(1.589626 / 192**0.5, rel=1e-6)
    assert attention.scaling == pytest.approx(DEEPSEEK_V2_LITE.softmax_scale, rel=1e-12)
    unscaled = dataclasses.replace(DEEPSEEK_V2_LITE, rope_scaling=None)
    assert unscaled.softmax_scale == pytest.approx(192**-0.5, rel=1e-15)


@pytest.mark.parametrize("config", [DEEPSEEK_V2_LITE, CONFIGS["yarn-unequal-mscale"], CONFIGS["plain"]],
                         ids=["deepseek-v2-lite", "unequal-mscale", "plain"])
def test_yarn_frequencies_and_magnitude_match_transformers_rotary_embedding(config):
    rotary = deepseek.DeepseekV2RotaryEmbedding(hf_config(config))
    ours = mla_rope_frequencies(config)
    torch.testing.assert_close(rotary.inv_freq.double(), ours, rtol=FREQUENCY_TOLERANCE, atol=0.0)
    assert rotary.attention_scaling == pytest.approx(config.rope_attention_factor, rel=1e-12)
    if config.rope_scaling is not None:
        # YaRN moved the low frequencies by `factor` and kept the highest: far beyond the tolerance.
        unscaled = mla_rope_frequencies(dataclasses.replace(config, rope_scaling=None))
        assert (unscaled / ours).max() == pytest.approx(config.rope_scaling.factor, rel=1e-12)
        assert ours[0] == unscaled[0]


def test_mla_rope_table_rounds_scaled_float64_angles_once():
    config = CONFIGS["yarn-unequal-mscale"]
    table = mla_rope_table(config, 5000)
    factor = config.rope_attention_factor
    assert factor == pytest.approx((1 + 0.1 * math.log(16)) / (1 + 0.05 * math.log(16)), rel=1e-15)  # 1.1218
    for position in (0, 1, 4095, 4999):
        angles = position * mla_rope_frequencies(config)
        torch.testing.assert_close(table[position, 0], (factor * angles.cos()).float(), rtol=0, atol=0)
        torch.testing.assert_close(table[position, 1], (factor * angles.sin()).float(), rtol=0, atol=0)


# -- the unfused layer ----------------------------------------------------------------------------

#: Measured worst over 90 draws of the small configs (positions 0..31, both position kinds) and 3 of
#: DeepSeek-V2-Lite's shapes: float32 7.7e-7 (rounding 6e-8 per value, sums of up to 2048 terms);
#: float16 9.3e-4 and bfloat16 7.9e-3 (2^-11 and 2^-8 per value, each intermediate rounded once or
#: twice, the attention's probabilities and o_lat included). float16's bound, three times its worst,
#: fails a slip of half a percent (a softmax scale, a norm's epsilon).
UNFUSED_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", sorted(UNFUSED_TOLERANCE, key=str))
@pytest.mark.parametrize("name", ["yarn", "yarn-q-lora", "rotate-half-q-lora"])
def test_unfused_layer_matches_reference_and_appends_one_row(name, dtype):
    config, position, batch, capacity = CONFIGS[name], 29, 3, 32
    weights, cache, hidden, residual = step_inputs(config, dtype, batch, capacity)
    before = cache.clone()
    want = mla_reference_step(config, weights, hidden, residual, before, position)
    layer = UnfusedMLA(config, weights, mla_rope_table(config, capacity))
    out, new_residual = layer(hidden, residual, cache, position)
    tolerance = UNFUSED_TOLERANCE[dtype]
    assert out.dtype == dtype and new_residual.dtype == dtype
    assert relative_error(out, want.out) < tolerance
    assert relative_error(new_residual, want.residual) < tolerance
    assert relative_error(cache.latent[:, position], want.latent) < tolerance
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[position] = False
    assert torch.equal(cache.latent[:, untouched], before.latent[:, untouched])


@pytest.mark.parametrize("dtype", sorted(UNFUSED_TOLERANCE, key=str))
def test_unfused_layer_with_a_position_tensor_gives_each_sequence_its_own(dtype):
    config, capacity = CONFIGS["yarn-q-lora"], 24
    positions = [0, 13, 23]
    weights, cache, hidden, residual = step_inputs(config, dtype, len(positions), capacity)
    before = cache.clone()
    want = mla_reference_step(config, weights, hidden, residual, before, positions)
    layer = UnfusedMLA(config, weights, mla_rope_table(config, capacity))
    out, _ = layer(hidden, residual, cache, torch.tensor(positions, dtype=torch.int32))
    tolerance = UNFUSED_TOLERANCE[dtype]
    assert relative_error(out, want.out) < tolerance
    for b, position in enumerate(positions):
        assert relative_error(cache.latent[b, position], want.latent[b]) < tolerance
        others = torch.arange(capacity) != position
        assert torch.equal(cache.latent[b, others], before.latent[b, others])


def test_a_step_that_reads_an_unwritten_row_returns_nan():
    config = CONFIGS["yarn"]
    weights = MLAWeights.random(config, torch.float16)
    cache = LatentCache.empty(config, 1, 8, torch.float16)
    hidden, residual = torch.randn(2, 1, config.hidden_size).half()
    assert torch.isfinite(mla_reference_step(config, weights, hidden, residual, cache, 0).out).all()
    assert torch.isnan(mla_reference_step(config, weights, hidden, residual, cache, 1).out).all()


# -- sizes, presets, random inputs ----------------------------------------------------------------


def test_deepseek_v2_lite_preset_counts_its_bytes_and_flops():
    config = MLA_PRESETS["deepseek-v2-lite"]
    assert config is DEEPSEEK_V2_LITE
    assert (config.qk_head_dim, config.latent_width, config.q_rows, config.kv_b_rows) == (192, 576, 3072, 4096)
    # norm 2048 + q 3072*2048 + kv_a 576*2048 + kv_a norm 512 + kv_b 4096*512 + o 2048*2048 = 13,765,120.
    assert config.weight_bytes(2) == 2 * 13_765_120
    assert config.cache_row_bytes(2) == 1152  # vs Llama-2-7B's 2 * 32 * 128 * 2 = 16 KiB a token
    # Two sequences of 100 and 4000 rows: weights once, 4100 rows, 4 activation rows each.
    assert config.step_bytes(2, [100, 4000], 2) == 2 * 13_765_120 + 1152 * 4100 + 2 * 4 * 2048 * 2
    # Per sequence (3072 + 576 + 2048) * 2048 projection and 16 * 512 * 256 absorption multiply-adds;
    # per row 16 heads * (576 + 512).
    assert config.step_flops(2, [100, 4000]) == 2 * (2 * (5696 * 2048 + 16 * 512 * 256) + 16 * 1088 * 4100)
    lora = dataclasses.replace(config, q_lora_rank=1536)
    assert lora.weight_bytes(2) - config.weight_bytes(2) == 2 * (1536 * (2048 + 1 + 3072) - 3072 * 2048)
    with pytest.raises(ValueError, match="kv_len has 1 lengths for a batch of 2"):
        config.step_bytes(2, [5])


def test_random_weights_are_nonzero_scaled_fresh_and_repeat_with_a_seed():
    config = CONFIGS["yarn-q-lora"]
    state = torch.random.get_rng_state()
    first, second = (MLAWeights.random(config, torch.float32) for _ in range(2))
    caches = [LatentCache.random(config, 2, 8, torch.float16) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.q_proj is None and MLAWeights.random(CONFIGS["yarn"], torch.float16).q_a_proj is None
    for name, tensor in vars(first).items():
        if tensor is None:
            continue
        assert tensor.dtype == torch.float32, name
        assert not torch.equal(tensor, getattr(second, name)), name
        if tensor.dim() == 1:  # gains drawn around 1
            assert 0.5 < tensor.min() and tensor.max() < 1.5, name
        else:  # unit-variance outputs for unit-variance inputs
            assert tensor.std().item() * tensor.shape[1] ** 0.5 == pytest.approx(1.0, rel=0.1), name
    assert not torch.equal(caches[0].latent, caches[1].latent) and (caches[0].latent != 0).all()
    seeded = [MLAWeights.random(config, torch.bfloat16, seed=3) for _ in range(2)]
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(vars(seeded[0]).values(), vars(seeded[1]).values()))
    assert torch.equal(LatentCache.random(config, 1, 4, seed=5).latent, LatentCache.random(config, 1, 4, seed=5).latent)
    assert torch.isnan(LatentCache.empty(config, 2, 3).latent).all()


# -- input checks ---------------------------------------------------------------------------------


def _good():
    config = CONFIGS["yarn-q-lora"]
    weights, cache, hidden, residual = step_inputs(config, torch.float16, 2, 16)
    return {"config": config, "weights": weights, "hidden": hidden, "residual": residual, "cache": cache,
            "positions": 5}


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a.update(positions=16), ValueError, "position 16 overflows the cache: it holds 16 positions"),
        (lambda a: a.update(positions=-1), ValueError, "positions must be >= 0, got -1"),
        (lambda a: a.update(positions=torch.tensor([3, 16], dtype=torch.int32)), ValueError,
         "position 16 overflows the cache"),
        (lambda a: a.update(positions=[3]), ValueError, "positions has length 1; expected 2"),
        (lambda a: a.update(positions=2.0), TypeError, "positions must be an int, a list of 2 ints"),
        (lambda a: a.update(hidden=a["hidden"].float()), TypeError,
         "hidden has dtype torch.float32; expected torch.float16"),
        (lambda a: a.update(hidden=a["hidden"][:, :128]), ValueError, "expected (batch, 256)"),
        (lambda a: a.update(hidden=torch.zeros(9, 256).half()), ValueError, "batch 9; allowed 1..8"),
        (lambda a: a.update(residual=a["residual"][:1]), ValueError, "residual has shape (1, 256)"),
        (lambda a: a.update(cache=LatentCache(a["cache"].latent[:1])), ValueError, "cache.latent has shape (1, 16, 80)"),
        (lambda a: a.update(cache=LatentCache(a["cache"].latent[..., :64].contiguous())), ValueError,
         "expected (2, 16, 80)"),
        (lambda a: a.update(cache=a["cache"].latent), TypeError, "cache must be a LatentCache"),
        (lambda a: a.update(cache=LatentCache(a["cache"].latent[0])), ValueError,
         "cache.latent has shape (16, 80); expected (batch, capacity, 80)"),
        (lambda a: a.update(weights=dataclasses.replace(a["weights"], kv_b_proj=a["weights"].kv_b_proj.numpy())),
         TypeError, "weights.kv_b_proj must be a torch.Tensor, got ndarray"),
        (lambda a: a.update(weights=dataclasses.replace(a["weights"], q_proj=a["weights"].q_b_proj)), ValueError,
         "weights.q_proj is given but the config has q_lora_rank=96"),
        (lambda a: a.update(weights=dataclasses.replace(a["weights"], q_a_layernorm=None)), ValueError,
         "weights.q_a_layernorm is None but the config has q_lora_rank=96"),
        (lambda a: a.update(weights=dataclasses.replace(a["weights"], kv_b_proj=a["weights"].kv_b_proj[:64].contiguous())),
         ValueError, "weights.kv_b_proj has shape (64, 64); expected (256, 64)"),
        (lambda a: a.update(weights=dataclasses.replace(a["weights"], o_proj=a["weights"].o_proj.float())), TypeError,
         "weights.o_proj has dtype torch.float32; expected torch.float16"),
        (lambda a: a.update(weights=dataclasses.replace(a["weights"], kv_b_proj=a["weights"].kv_b_proj.double())),
         TypeError, "weights.kv_b_proj has dtype torch.float64; allowed"),
        (lambda a: a.update(config=dataclasses.replace(a["config"], q_lora_rank=None)), ValueError,
         "weights.q_proj is None but the config has q_lora_rank=None"),
        (lambda a: a.update(config=DEEPSEEK_V2_LITE), ValueError,
         "weights.input_layernorm has shape (256,); expected (2048,)"),
    ],
)
def test_bad_step_inputs_are_named(change, error, words):
    args = _good()
    change(args)
    with pytest.raises(error) as info:
        mla_reference_step(**args)
    assert words in str(info.value)


def test_unfused_layer_checks_positions_against_the_cache_and_the_rope_table():
    args = _good()
    config, weights = args["config"], args["weights"]
    short = UnfusedMLA(config, weights, mla_rope_table(config, 4))
    with pytest.raises(ValueError, match="position 5 overflows the rope table: it holds 4 positions"):
        short(args["hidden"], args["residual"], args["cache"], 5)
    layer = UnfusedMLA(config, weights, mla_rope_table(config, 64))
    with pytest.raises(ValueError, match="position 16 overflows the cache: it holds 16 positions"):
        layer(args["hidden"], args["residual"], args["cache"], torch.tensor([1, 16], dtype=torch.int32))
    with pytest.raises(TypeError, match="config must be an MLAConfig"):
        UnfusedMLA(object(), weights, mla_rope_table(config, 4))


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: MLAConfig(**{**SMALL, "heads": 0}), "MLAConfig.heads must be a positive int, got 0"),
        (lambda: MLAConfig(**{**SMALL, "kv_lora_rank": 64.0}), "MLAConfig.kv_lora_rank must be a positive int, got 64.0"),
        (lambda: MLAConfig(**{**SMALL, "qk_rope_head_dim": 15}), "MLAConfig.qk_rope_head_dim must be even"),
        (lambda: MLAConfig(**{**SMALL, "hidden_size": 260}), "MLAConfig.hidden_size must be a multiple of 8"),
        (lambda: MLAConfig(**SMALL, q_lora_rank=0), "MLAConfig.q_lora_rank must be None or a positive int, got 0"),
        (lambda: MLAConfig(**SMALL, rms_eps=0.0), "MLAConfig.rms_eps must be in (0, 1), got 0.0"),
        (lambda: MLAConfig(**SMALL, rope_theta=1.0), "MLAConfig.rope_theta must be a finite number > 1, got 1.0"),
        (lambda: YarnRopeScaling(factor=0.5, original_max_position=4096),
         "YarnRopeScaling.factor must be a finite number >= 1, got 0.5"),
        (lambda: YarnRopeScaling(factor=4.0, original_max_position=0),
         "YarnRopeScaling.original_max_position must be a positive int, got 0"),
        (lambda: YarnRopeScaling(factor=4.0, original_max_position=64, beta_fast=1.0, beta_slow=32.0),
         "0 < beta_slow < beta_fast (finite), got beta_slow=32.0 and beta_fast=1.0"),
        (lambda: YarnRopeScaling(factor=4.0, original_max_position=64, mscale=0.0),
         "YarnRopeScaling.mscale must be a finite number > 0, got 0.0"),
        (lambda: YarnRopeScaling(factor=4.0, original_max_position=64, mscale_all_dim=-1.0),
         "YarnRopeScaling.mscale_all_dim must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_configs_are_named(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert words in str(info.value)


def test_bad_dtypes_and_types_are_named():
    config = CONFIGS["yarn"]
    with pytest.raises(TypeError, match="dtype must be one of .* got torch.float64"):
        MLAWeights.random(config, torch.float64)
    with pytest.raises(TypeError, match="dtype must be one of .* got torch.int8"):
        LatentCache.empty(config, 1, 4, torch.int8)
    with pytest.raises(ValueError, match=r"capacity must be an int in 1\.\.2147483647 \(the kernels read positions as "
                                         r"int32\), got 0"):
        LatentCache.random(config, 1, 0)
    with pytest.raises(TypeError, match="YarnRopeScaling.factor must be a number, got '40'"):
        YarnRopeScaling(factor="40", original_max_position=4096)
    with pytest.raises(TypeError, match="MLAConfig.rope_interleaved must be a bool, got 1"):
        MLAConfig(**SMALL, rope_interleaved=1)
    with pytest.raises(TypeError, match="MLAConfig.rope_scaling must be None or a YarnRopeScaling, got {'factor': 40}"):
        MLAConfig(**SMALL, rope_scaling={"factor": 40})
    with pytest.raises(TypeError, match="weights must be an MLAWeights, got dict"):
        check_mla_weights(config, {})
