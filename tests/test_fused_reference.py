"""The float64 reference, the unfused PyTorch layer and the input checks, on the CPU."""

import numpy as np
import pytest
import torch
from rounding import STEP_TOLERANCE

from clusterlab.fused.config import (
    LLAMA2_7B,
    LLAMA3_8B,
    AttentionConfig,
    AttentionWeights,
    KVCache,
    rope_angles,
    rope_table,
)
from clusterlab.fused.reference import UnfusedAttention, reference_step, relative_error
from clusterlab.fused.validate import check_step, check_weights

SMALL = {
    "mha-neox": AttentionConfig(hidden_size=96, heads=4, kv_heads=4, head_dim=64),
    "gqa-gptj": AttentionConfig(hidden_size=128, heads=4, kv_heads=2, head_dim=64, rope_style="gptj"),
    "mqa-128": AttentionConfig(hidden_size=64, heads=2, kv_heads=1, head_dim=128, rope_theta=500000.0),
}


def naive_step(config, weights, hidden, residual, cache, position):
    """The same step written out element by element in NumPy float64, one head at a time."""
    d, half = config.head_dim, config.head_dim // 2

    def f64(t):
        return t.to(torch.float64).numpy()

    wqkv, wo, gain = f64(weights.qkv), f64(weights.o), f64(weights.norm)
    outs, residuals = [], []
    theta = position * config.rope_theta ** (-np.arange(half) * 2.0 / d)
    rotation = np.exp(1j * theta)

    def rope(x):
        if config.rope_style == "neox":
            z = (x[:half] + 1j * x[half:]) * rotation
            return np.concatenate([z.real, z.imag])
        z = (x[0::2] + 1j * x[1::2]) * rotation
        return np.stack([z.real, z.imag], axis=-1).reshape(-1)

    for b in range(hidden.shape[0]):
        h = f64(hidden[b]) + f64(residual[b])
        n = h / np.sqrt(np.mean(h * h) + config.rms_eps) * gain
        qkv = wqkv @ n
        attn = []
        for head in range(config.heads):
            g = head // config.group_size
            q = rope(qkv[head * d : (head + 1) * d])
            k_new = rope(qkv[(config.heads + g) * d :][:d])
            v_new = qkv[(config.heads + config.kv_heads + g) * d :][:d]
            keys = np.vstack([f64(cache.k[b, g, :position]), k_new])
            values = np.vstack([f64(cache.v[b, g, :position]), v_new])
            s = keys @ q / np.sqrt(d)
            p = np.exp(s - s.max())
            attn.append(p @ values / p.sum())
        outs.append(wo @ np.concatenate(attn))
        residuals.append(h)
    return np.array(outs), np.array(residuals)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("position", [0, 1, 37])
def test_reference_matches_naive_loops(name, position):
    config = SMALL[name]
    weights = AttentionWeights.random(config, torch.float16)
    cache = KVCache.random(config, batch=2, capacity=48, dtype=torch.float16)
    hidden = torch.randn(2, config.hidden_size).half()
    residual = torch.randn(2, config.hidden_size).half()
    got = reference_step(config, weights, hidden, residual, cache, position)
    want_out, want_residual = naive_step(config, weights, hidden, residual, cache, position)
    np.testing.assert_allclose(got.out.numpy(), want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.residual.numpy(), want_residual, rtol=1e-12)


def test_rope_table_rounds_float64_angles_once():
    table = rope_table(LLAMA3_8B, 40000)
    for position in (0, 1, 31999, 39999):
        angles = rope_angles(LLAMA3_8B, position)
        torch.testing.assert_close(table[position, 0], angles.cos().float(), rtol=0, atol=0)
        torch.testing.assert_close(table[position, 1], angles.sin().float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_unfused_layer_matches_reference_and_appends(name, dtype):
    config = SMALL[name]
    position, batch = 29, 3
    weights = AttentionWeights.random(config, dtype)
    cache = KVCache.random(config, batch, capacity=32, dtype=dtype)
    before = cache.clone()
    hidden, residual = torch.randn(2, batch, config.hidden_size).to(dtype)
    want = reference_step(config, weights, hidden, residual, before, position)
    out, new_residual = UnfusedAttention(config, weights, rope_table(config, 32))(hidden, residual, cache, position)
    # every intermediate is rounded once or twice to the dtype
    assert relative_error(out, want.out) < STEP_TOLERANCE[dtype]
    assert relative_error(new_residual, want.residual) < STEP_TOLERANCE[dtype]
    assert relative_error(cache.k[:, :, position], want.k) < STEP_TOLERANCE[dtype]
    assert relative_error(cache.v[:, :, position], want.v) < STEP_TOLERANCE[dtype]
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[position] = False
    assert torch.equal(cache.k[:, :, untouched], before.k[:, :, untouched])
    assert torch.equal(cache.v[:, :, untouched], before.v[:, :, untouched])


def test_presets_count_the_paper_bytes():
    # Llama-2-7B at 1K/4K/16K: 50/67/134 us at 3.01 TB/s.
    for kv_len, floor_us in [(1024, 50), (4096, 67), (16384, 134)]:
        assert round(LLAMA2_7B.step_bytes(1, kv_len) / 3.01e12 * 1e6) == floor_us
    assert LLAMA3_8B.group_size == 4 and LLAMA3_8B.qkv_rows == 6144


def test_random_inputs_draw_fresh_values_and_leave_the_global_generator_alone():
    config = SMALL["gqa-gptj"]
    state = torch.random.get_rng_state()
    first, second = (AttentionWeights.random(config, torch.float16) for _ in range(2))
    caches = [KVCache.random(config, 1, 8, torch.float16) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(first.qkv, second.qkv) and not torch.equal(caches[0].k, caches[1].k)
    same = AttentionWeights.random(config, torch.float16, seed=3), AttentionWeights.random(config, torch.float16, seed=3)
    assert torch.equal(same[0].qkv, same[1].qkv)


# -- input checks ---------------------------------------------------------------------------------

CONFIG = SMALL["gqa-gptj"]


def _good():
    weights = AttentionWeights.random(CONFIG, torch.float16, seed=1)
    cache = KVCache.random(CONFIG, 2, 16, torch.float16, seed=2)
    hidden, residual = torch.randn(2, 2, CONFIG.hidden_size).half()
    return {"config": CONFIG, "weights": weights, "hidden": hidden, "residual": residual, "cache": cache, "positions": 5}


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a.update(hidden=a["hidden"].float()), TypeError, "hidden has dtype torch.float32"),
        (lambda a: a.update(hidden=a["hidden"].numpy()), TypeError, "hidden must be a torch.Tensor"),
        (lambda a: a.update(residual=a["residual"].bfloat16()), TypeError, "residual has dtype"),
        (lambda a: a.update(hidden=a["hidden"][:, :64]), ValueError, "expected (batch, 128)"),
        (lambda a: a.update(hidden=torch.zeros(9, 128).half()), ValueError, "batch 9; allowed 1..8"),
        (lambda a: a.update(residual=a["residual"][:1]), ValueError, "residual has shape (1, 128)"),
        (lambda a: a.update(hidden=torch.randn(128, 2).half().t()), ValueError, "hidden must be contiguous"),
        (lambda a: a.update(cache=KVCache(a["cache"].k[:1], a["cache"].v)), ValueError, "cache.k has shape"),
        (lambda a: a.update(cache=KVCache(a["cache"].k, a["cache"].v.transpose(2, 3).contiguous().transpose(2, 3))),
         ValueError, "cache.v must be contiguous"),
        (lambda a: a.update(cache=(a["cache"].k, a["cache"].v)), TypeError, "cache must be a KVCache"),
        (lambda a: a.update(positions=16), ValueError, "position 16 overflows the cache: it holds 16 positions"),
        (lambda a: a.update(positions=-1), ValueError, "positions must be >= 0, got -1"),
        (lambda a: a.update(positions=3.0), TypeError, "positions must be an int or an int32 tensor of shape (2,)"),
        (lambda a: a.update(positions=True), TypeError, "positions must be an int or an int32 tensor of shape (2,)"),
        (lambda a: a.update(positions=torch.tensor([3, 16], dtype=torch.int32)), ValueError,
         "position 16 overflows the cache"),
        (lambda a: a.update(positions=torch.tensor([3, 4], dtype=torch.int64)), TypeError,
         "positions has dtype torch.int64; expected torch.int32"),
        (lambda a: a.update(positions=torch.tensor([3], dtype=torch.int32)), ValueError,
         "positions has shape (1,); expected (2,), one per sequence"),
        (lambda a: a.update(positions=torch.tensor([3, 0, 4, 0], dtype=torch.int32)[::2]), ValueError,
         "positions must be contiguous; call .contiguous() first"),
        (lambda a: a.update(hidden=a["hidden"].bfloat16(), residual=a["residual"].bfloat16()), TypeError,
         "hidden has dtype torch.bfloat16 but the weights are torch.float16"),
        (lambda a: a.update(cache=KVCache(a["cache"].k[0], a["cache"].v[0])), ValueError,
         "cache.k has shape (2, 16, 64); expected (batch, kv_heads, capacity, head_dim)"),
    ],
)
def test_bad_step_inputs_are_named(change, error, words):
    args = _good()
    change(args)
    with pytest.raises(error) as info:
        check_step(**args)
    assert words in str(info.value)


def test_bad_weights_and_configs_are_named():
    weights = AttentionWeights.random(CONFIG, torch.float16, seed=1)
    with pytest.raises(ValueError, match=r"weights.o has shape \(128, 128\); expected \(128, 256\)"):
        check_weights(CONFIG, AttentionWeights(weights.norm, weights.qkv, weights.o[:, :128].contiguous()))
    with pytest.raises(TypeError, match="weights.norm has dtype torch.float32"):
        check_weights(CONFIG, AttentionWeights(weights.norm.float(), weights.qkv, weights.o))
    with pytest.raises(TypeError, match="weights.qkv has dtype torch.float32"):
        check_weights(CONFIG, AttentionWeights(weights.norm, weights.qkv.float(), weights.o))
    with pytest.raises(ValueError, match="weights.qkv_bias is given but the config has qkv_bias=False"):
        check_weights(CONFIG, AttentionWeights(weights.norm, weights.qkv, weights.o, weights.qkv[:, 0].contiguous()))
    biased = AttentionConfig(hidden_size=128, heads=4, kv_heads=2, head_dim=64, qkv_bias=True)
    with pytest.raises(ValueError, match="weights.qkv_bias is None but the config has qkv_bias=True"):
        check_weights(biased, weights)
    with pytest.raises(ValueError, match=r"weights.qkv_bias has shape \(100,\); expected \(512,\)"):
        check_weights(biased, AttentionWeights(weights.norm, weights.qkv, weights.o, weights.qkv[:100, 0].contiguous()))
    with pytest.raises(ValueError, match="heads .6. must be a multiple of kv_heads .4."):
        AttentionConfig(hidden_size=64, heads=6, kv_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="head_dim must be one of .64, 128., got 96"):
        AttentionConfig(hidden_size=64, heads=4, kv_heads=4, head_dim=96)
    with pytest.raises(ValueError, match="rope_style must be one of"):
        AttentionConfig(hidden_size=64, heads=4, kv_heads=4, head_dim=64, rope_style="llama")
