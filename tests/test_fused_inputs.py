"""Bad inputs to the fused layer's public entry points: each a clear error naming the parameter, raised before any work."""

import dataclasses
import functools
import re

import pytest
import torch

from clusterlab import HopperRequired
from clusterlab.bench import timing
from clusterlab.bench.fused import main as bench_main
from clusterlab.bench.fused import parse_options, parse_variant, run_bench
from clusterlab.fused import (
    AttentionConfig,
    AttentionWeights,
    DecodeAttention,
    KVCache,
    LatentCache,
    Llama3RopeScaling,
    MLPWeights,
    UnfusedAttention,
    mla_rope_table,
    reference_step,
    rope_table,
)
from clusterlab.gpu import hopper_problem

CONFIG = AttentionConfig(hidden_size=128, heads=4, kv_heads=2, head_dim=64)
BATCH, CAPACITY = 2, 16
no_hopper = pytest.mark.skipif(hopper_problem() is None, reason="a Hopper GPU is usable here")


def _inputs():
    weights = AttentionWeights.random(CONFIG, torch.float16, seed=1)
    cache = KVCache.random(CONFIG, BATCH, CAPACITY, torch.float16, seed=2)
    hidden, residual = torch.randn(2, BATCH, CONFIG.hidden_size).half()
    return weights, hidden, residual, cache


@pytest.mark.parametrize(
    "positions, error, words",
    [
        (-1, ValueError, "positions must be >= 0, got -1"),
        (CAPACITY, ValueError, "position 16 overflows the cache: it holds 16 positions (0..15)"),
        ([3, -2], ValueError, "positions must be >= 0, got -2"),
        ((3, 16), ValueError, "position 16 overflows the cache"),
        ([3], ValueError, "positions has length 1; expected 2, one per sequence"),
        ([3, 1.0], TypeError, "positions must be an int, a list of 2 ints or an int32/int64 tensor"),
        (True, TypeError, "positions must be an int"),
        (torch.tensor([3, 16], dtype=torch.int32), ValueError, "position 16 overflows the cache"),
        (torch.tensor([-1, 3]), ValueError, "positions must be >= 0, got -1"),
        (torch.tensor([3.0, 4.0]), TypeError, "positions has dtype torch.float32; expected torch.int32 or torch.int64"),
        (torch.tensor([3, 4, 5]), ValueError, "positions has shape (3,); expected (2,), one per sequence"),
    ],
)
def test_reference_step_refuses_positions_outside_the_cache(positions, error, words):
    weights, hidden, residual, cache = _inputs()
    with pytest.raises(error) as info:
        reference_step(CONFIG, weights, hidden, residual, cache, positions)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a.update(config={"hidden_size": 128}), TypeError, "config must be an AttentionConfig, got dict"),
        (lambda a: a.update(hidden=a["hidden"].float()), TypeError, "hidden has dtype torch.float32"),
        (lambda a: a.update(residual=a["residual"][:1]), ValueError, "residual has shape (1, 128)"),
        (lambda a: a.update(cache=(a["cache"].k, a["cache"].v)), TypeError, "cache must be a KVCache"),
    ],
)
def test_reference_step_checks_its_inputs_as_the_layer_does(change, error, words):
    weights, hidden, residual, cache = _inputs()
    args = {"config": CONFIG, "weights": weights, "hidden": hidden, "residual": residual, "cache": cache,
            "positions": 5}
    change(args)
    with pytest.raises(error) as info:
        reference_step(**args)
    assert words in str(info.value)


def test_reference_step_takes_positions_as_an_int_a_list_or_a_tensor():
    weights, hidden, residual, cache = _inputs()
    want = reference_step(CONFIG, weights, hidden, residual, cache, 7).out
    for positions in ([7, 7], (7, 7), torch.tensor([7, 7], dtype=torch.int32), torch.tensor([7, 7])):
        assert torch.equal(reference_step(CONFIG, weights, hidden, residual, cache, positions).out, want)


@pytest.mark.parametrize(
    "table, positions, words",
    [
        (10, 10, "position 10 overflows the rope table: it holds 10 positions (0..9)"),
        (10, torch.tensor([1, 12], dtype=torch.int32), "position 12 overflows the rope table"),
        (100, CAPACITY, "position 16 overflows the cache: it holds 16 positions"),
        (100, torch.tensor([16, 1]), "position 16 overflows the cache"),
        (100, -1, "positions must be >= 0, got -1"),
    ],
)
def test_unfused_layer_checks_host_positions_against_the_rope_table_and_the_cache(table, positions, words):
    weights, hidden, residual, cache = _inputs()
    before = cache.clone()
    with pytest.raises(ValueError) as info:
        UnfusedAttention(CONFIG, weights, rope_table(CONFIG, table))(hidden, residual, cache, positions)
    assert words in str(info.value)
    assert torch.equal(cache.k.view(torch.int16), before.k.view(torch.int16))


@pytest.mark.parametrize("call, error, words", [
    (lambda u, h, r, cache: u(h, r, cache, torch.tensor([5, 5]), length=3), ValueError,
     "position 5 overflows the rows length=3 attends to: it holds 3 positions (0..2)"),
    (lambda u, h, r, cache: u(h, r, cache, torch.tensor([5, 5]), length=CAPACITY + 1), ValueError,
     "length must be None or an int in 1..16 (the cache's rows), got 17"),
    (lambda u, h, r, cache: u(h, r, cache, torch.tensor([5, 5]), length=2.0), ValueError,
     "length must be None or an int in 1..16"),
    (lambda u, h, r, cache: u(h.float(), r, cache, 3), TypeError, "hidden has dtype torch.float32"),
    (lambda u, h, r, cache: u(h, r[:1], cache, 3), ValueError, "residual has shape (1, 128); expected (2, 128)"),
])
def test_unfused_layer_checks_its_tensors_and_length_as_the_fused_layer(call, error, words):
    """The baseline's "same signature and effects" include the checks: a ``length`` shorter than a
    position would leave the new token out of its own attention."""
    weights, hidden, residual, cache = _inputs()
    before = cache.clone()
    with pytest.raises(error) as info:
        call(UnfusedAttention(CONFIG, weights, rope_table(CONFIG, CAPACITY)), hidden, residual, cache)
    assert words in str(info.value)
    assert torch.equal(cache.k.view(torch.int16), before.k.view(torch.int16))


@pytest.mark.parametrize("make", [KVCache.empty, KVCache.random])
@pytest.mark.parametrize(
    "batch, capacity, words",
    [(0, 4, "batch must be an int in 1..8, got 0"), (-2, 4, "batch must be an int in 1..8, got -2"),
     (9, 4, "batch must be an int in 1..8, got 9"),
     (2, 0, "capacity must be an int in 1..2147483647 (the kernels read positions as int32), got 0"),
     (2, -1, "capacity must be an int in 1..2147483647"), (2, 4.0, "capacity must be an int in 1..2147483647"),
     (2, 2**40, "capacity must be an int in 1..2147483647 (the kernels read positions as int32), got 1099511627776")],
)
def test_cache_sizes_are_what_a_step_takes_checked_before_allocating(make, batch, capacity, words):
    with pytest.raises(ValueError) as info:
        make(CONFIG, batch, capacity)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "make, fields, words",
    [
        (AttentionConfig, {"rope_theta": "10000"}, "AttentionConfig.rope_theta must be a number, got '10000'"),
        (AttentionConfig, {"rope_theta": None}, "AttentionConfig.rope_theta must be a number, got None"),
        (AttentionConfig, {"rms_eps": None}, "AttentionConfig.rms_eps must be a number, got None"),
        (AttentionConfig, {"rms_eps": True}, "AttentionConfig.rms_eps must be a number, got True"),
        (Llama3RopeScaling, {"factor": "8"}, "Llama3RopeScaling.factor must be a number, got '8'"),
        (Llama3RopeScaling, {"low_freq_factor": None}, "Llama3RopeScaling.low_freq_factor must be a number"),
        (Llama3RopeScaling, {"high_freq_factor": [4.0]}, "Llama3RopeScaling.high_freq_factor must be a number"),
    ],
)
def test_numeric_fields_must_be_numbers(make, fields, words):
    shape = {"hidden_size": 64, "heads": 4, "kv_heads": 4, "head_dim": 64} if make is AttentionConfig else {}
    with pytest.raises(TypeError) as info:
        make(**shape, **fields)
    assert words in str(info.value)


@pytest.mark.parametrize("make, fields, words", [
    (AttentionConfig, {"heads": 0}, "AttentionConfig.heads must be a positive int, got 0"),
    (AttentionConfig, {"kv_heads": 2.0}, "AttentionConfig.kv_heads must be a positive int, got 2.0"),
    (AttentionConfig, {"hidden_size": True}, "AttentionConfig.hidden_size must be a positive int, got True"),
    (AttentionConfig, {"hidden_size": 68}, "AttentionConfig.hidden_size must be a multiple of 8 (16-byte rows), "
                                           "got 68"),
    (AttentionConfig, {"qkv_bias": 1}, "AttentionConfig.qkv_bias must be a bool, got 1"),
    (AttentionConfig, {"rope_scaling": {"factor": 8.0}}, "AttentionConfig.rope_scaling must be None or a "
                                                         "Llama3RopeScaling, got {'factor': 8.0}"),
    (Llama3RopeScaling, {"factor": 0.5}, "Llama3RopeScaling.factor must be a finite number >= 1, got 0.5"),
    (Llama3RopeScaling, {"low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "Llama3RopeScaling needs 0 < low_freq_factor < high_freq_factor, got 4.0 and 1.0"),
    (Llama3RopeScaling, {"low_freq_factor": 0.0}, "Llama3RopeScaling needs 0 < low_freq_factor < high_freq_factor"),
])
def test_config_fields_out_of_range_are_named(make, fields, words):
    shape = {"hidden_size": 64, "heads": 4, "kv_heads": 4, "head_dim": 64} if make is AttentionConfig else {}
    with pytest.raises(ValueError) as info:
        make(**{**shape, **fields})
    assert words in str(info.value)


def test_step_bytes_take_one_length_or_one_a_sequence():
    assert CONFIG.step_bytes(2, [10, 30]) == CONFIG.step_bytes(2, 20)
    with pytest.raises(ValueError, match="kv_len has 1 lengths for a batch of 2"):
        CONFIG.step_bytes(2, [10])


def test_weights_move_to_a_device_whole_with_their_bias():
    biased = AttentionConfig(hidden_size=128, heads=4, kv_heads=2, head_dim=64, qkv_bias=True)
    for config in (CONFIG, biased):
        weights = AttentionWeights.random(config, torch.bfloat16, seed=3)
        moved = weights.to("meta")
        for name in ("norm", "qkv", "o", "qkv_bias"):
            was, now = getattr(weights, name), getattr(moved, name)
            if was is None:
                assert now is None
            else:
                assert (now.device.type, now.dtype, now.shape) == ("meta", was.dtype, was.shape)


def test_original_max_position_must_not_be_a_bool():
    with pytest.raises(ValueError, match="Llama3RopeScaling.original_max_position must be a positive int, got True"):
        Llama3RopeScaling(original_max_position=True)


@pytest.mark.parametrize("config", [None, {"hidden_size": 128}, "llama2-7b"])
def test_layer_config_must_be_an_attention_config(config):
    weights = AttentionWeights.random(CONFIG, torch.float16, seed=1)
    with pytest.raises(TypeError) as info:
        DecodeAttention(config, weights)
    assert f"config must be an AttentionConfig, got {type(config).__name__}" in str(info.value)


@pytest.mark.parametrize("name", ["out", "residual_out"])
@pytest.mark.parametrize("given", [[], (), "x"])
def test_layer_outputs_must_be_tensors(name, given):
    weights, hidden, residual, cache = _inputs()
    with pytest.raises(TypeError) as info:
        DecodeAttention(CONFIG, weights)(hidden, residual, cache, 3, **{name: given})
    assert f"{name} must be None or a torch.Tensor, got {type(given).__name__}" in str(info.value)


def test_a_cluster_size_must_split_the_hidden_size_into_16_byte_chunks():
    narrow = AttentionConfig(hidden_size=64, heads=1, kv_heads=1, head_dim=64)
    weights = AttentionWeights.random(narrow, torch.float16, seed=1)
    assert DecodeAttention(narrow, weights, cluster_size=8).shape(1)[0] == 8  # 64 = 8 slices of 8 halves
    with pytest.raises(ValueError, match=r"cluster_size 16 does not split hidden_size 64 into slices of whole 16-byte "
                                         r"chunks \(hidden_size must be a multiple of 128\)"):
        DecodeAttention(narrow, weights, cluster_size=16)


@pytest.mark.parametrize("block", ["attention", "mlp", "mla"])
@pytest.mark.parametrize("option, value, words", [
    ("cluster_size", True, "cluster_size must be one of"),
    ("cluster_size", 2.0, "cluster_size must be one of"),
    ("warps", 4.0, "warps must be one of (4, 8, 16)"),
    ("limits", "h100", "limits must be None or a DeviceLimits"),
])
def test_layer_shape_options_are_ints_and_limits_a_device_limits(block, option, value, words):
    """``2.0 in (1, 2, 4)`` is true and ``True == 1``: the layers take their counts as ints only."""
    from clusterlab.fused import DEEPSEEK_V2_LITE, DecodeMLA, DecodeMLP, MLAWeights, MLPConfig, MLPWeights

    if block == "attention":
        make = functools.partial(DecodeAttention, CONFIG, AttentionWeights.random(CONFIG, torch.float16, seed=1))
    elif block == "mla":
        weights = MLAWeights.random(DEEPSEEK_V2_LITE, torch.float16, seed=2)
        make = functools.partial(DecodeMLA, DEEPSEEK_V2_LITE, weights)
    else:
        mlp = MLPConfig(CONFIG.hidden_size, 256)
        make = functools.partial(DecodeMLP, mlp, MLPWeights.random(mlp, torch.float16, seed=3))
    error = TypeError if option == "limits" else ValueError
    with pytest.raises(error) as info:
        layer = make(**{option: value})
        layer.shape(BATCH) if block != "mla" else layer.kernel_spec(torch.float16, BATCH, None)
    assert words in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("field", ["sm_count", "shared_bytes_per_sm", "registers_per_sm", "l2_bytes"])
@pytest.mark.parametrize("value", [0, 132.0, None])
def test_device_limits_are_positive_ints(field, value):
    from clusterlab.fused.plan import HOPPER

    with pytest.raises(ValueError, match=rf"DeviceLimits.{field} must be an int >= 1, got {value!r}"):
        dataclasses.replace(HOPPER, **{field: value})


@pytest.mark.parametrize("value", [(132, 132, 120, 120), [132, 132, 120, 120, 112], (132, 132, 120, 120, 133),
                                   (132, 132, 120, 0, 112), (132, 132, 120, 120.0, 112)])
def test_device_limits_cluster_sms_are_one_count_a_cluster_size(value):
    from clusterlab.fused.plan import HOPPER

    with pytest.raises(ValueError, match=r"DeviceLimits.cluster_sms must be a tuple of 5 ints in 1..sm_count \(132\)"):
        dataclasses.replace(HOPPER, cluster_sms=value)


def test_device_limits_give_the_sms_of_each_cluster_size_and_refuse_other_sizes():
    from clusterlab.fused.plan import HOPPER

    assert [HOPPER.sms_for(size) for size in (1, 2, 4, 8, 16)] == [132, 132, 120, 120, 112]
    for size in (3, 32, 8.0):
        with pytest.raises(ValueError, match=rf"cluster_size must be one of \(1, 2, 4, 8, 16\), got {size!r}"):
            HOPPER.sms_for(size)


@pytest.mark.parametrize("make, words", [
    (lambda: AttentionWeights.random(None), "config must be an AttentionConfig, got NoneType"),
    (lambda: KVCache.empty(None, BATCH, CAPACITY), "config must be an AttentionConfig, got NoneType"),
    (lambda: KVCache.random("llama2-7b", BATCH, CAPACITY), "config must be an AttentionConfig, got str"),
    (lambda: rope_table(None, CAPACITY), "config must be an AttentionConfig, got NoneType"),
    (lambda: MLPWeights.random(CONFIG), "config must be an MLPConfig, got AttentionConfig"),
    (lambda: LatentCache.empty(CONFIG, 1, 8), "config must be an MLAConfig, got AttentionConfig"),
    (lambda: mla_rope_table(CONFIG, 8), "config must be an MLAConfig, got AttentionConfig"),
], ids=["attention-weights", "empty-cache", "random-cache", "rope-table", "mlp-weights", "latent-cache", "mla-rope"])
def test_weights_caches_and_tables_name_a_config_of_another_kind(make, words):
    with pytest.raises(TypeError) as info:
        make()
    assert words in str(info.value)


@pytest.mark.parametrize("make", [lambda device: AttentionWeights.random(CONFIG, device=device),
                                  lambda device: KVCache.empty(CONFIG, BATCH, CAPACITY, device=device)],
                         ids=["weights", "cache"])
@pytest.mark.parametrize("device", ["foo", 3.5, None])
def test_weights_and_caches_name_a_device_torch_cannot_read(make, device):
    with pytest.raises(ValueError, match=r"device must be a torch.device or its name \('cpu', 'cuda', 'cuda:1'\), got "
                                         + re.escape(repr(device))):
        make(device)


def test_a_rope_table_has_positive_rows():
    with pytest.raises(ValueError, match="capacity must be a positive int, got -1"):
        rope_table(CONFIG, -1)

@pytest.mark.parametrize("seed, error, words", [
    (1.5, TypeError, "seed must be None or an int, got 1.5"),
    (True, TypeError, "seed must be None or an int, got True"),
    (2**64, ValueError, "seed must be an int in -2**63 .. 2**64 - 1"),
])
def test_random_weights_and_caches_take_a_seed_a_generator_takes(seed, error, words):
    for make in (functools.partial(AttentionWeights.random, CONFIG, torch.float16),
                 functools.partial(KVCache.random, CONFIG, BATCH, CAPACITY)):
        with pytest.raises(error) as info:
            make(seed=seed)
        assert words in str(info.value)

def _step(block: str):
    """``(call, hidden, residual)``: a step of ``block`` (attention, mlp, mla) on the simulator, batch 2, taking
    ``out=`` and ``residual_out=``."""
    from clusterlab.fused import DEEPSEEK_V2_LITE, LatentCache

    layer = _planner(block)
    hidden_size = DEEPSEEK_V2_LITE.hidden_size if block == "mla" else CONFIG.hidden_size
    flat = torch.randn(3 * BATCH * hidden_size).half()  # residual: rows 0..1, then room for a shifted view
    hidden, residual = torch.randn(BATCH, hidden_size).half(), flat[: BATCH * hidden_size].view(BATCH, hidden_size)
    if block == "attention":
        call = functools.partial(layer, hidden, residual, _inputs()[3], 3)
    elif block == "mla":
        call = functools.partial(layer, hidden, residual, LatentCache.random(DEEPSEEK_V2_LITE, BATCH, 8, seed=4), 3)
    else:
        call = functools.partial(layer, hidden, residual)
    return call, hidden, residual, flat


@pytest.mark.parametrize("block", ["attention", "mlp", "mla"])
@pytest.mark.parametrize("outputs, words", [
    (lambda h, r, flat, spare: dict(out=spare, residual_out=spare), "out and residual_out share memory"),
    (lambda h, r, flat, spare: dict(residual_out=r), "residual and residual_out share memory"),
    (lambda h, r, flat, spare: dict(out=spare, residual_out=h), "hidden and residual_out share memory"),
    (lambda h, r, flat, spare: dict(out=h), "hidden and out share memory"),
    (lambda h, r, flat, spare: dict(residual_out=flat[r.shape[1]: r.shape[1] + r.numel()].view(r.shape)),
     "residual and residual_out share memory"),
], ids=["out-is-residual_out", "residual_out-is-residual", "residual_out-is-hidden", "out-is-hidden",
        "residual_out-overlaps-residual"])
def test_a_steps_outputs_share_no_byte_with_each_other_or_its_inputs(block, outputs, words):
    """A step's first cluster writes ``residual_out`` while the others still read ``hidden`` and
    ``residual`` (a race on the GPU), and ``out`` is written too: every output a buffer of its own,
    refused before any work."""
    call, hidden, residual, flat = _step(block)
    given = outputs(hidden, residual, flat, torch.empty_like(hidden))
    before = hidden.clone(), flat.clone()
    with pytest.raises(ValueError) as info:
        call(**given)
    assert words in str(info.value) and "pass buffers of their own" in str(info.value)
    assert torch.equal(hidden, before[0]) and torch.equal(flat, before[1])


def test_a_cache_whose_keys_are_its_values_is_refused():
    weights, hidden, residual, cache = _inputs()
    with pytest.raises(ValueError) as info:
        DecodeAttention(CONFIG, weights)(hidden, residual, KVCache(cache.k, cache.k), 3)
    assert "cache.k and cache.v share memory; a step writes its new key rows into cache.k" in str(info.value)


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_a_handoffs_residual_out_shares_no_byte_with_its_residual(block):
    from clusterlab.fused import DecodeMLP

    layer = _planner(block)
    _, _, residual, cache = _inputs()
    sums = torch.randn(3, BATCH, CONFIG.hidden_size)
    call = layer.handoff if isinstance(layer, DecodeMLP) else functools.partial(layer.handoff, cache=cache, positions=3)
    with pytest.raises(ValueError) as info:
        call(sums[0], residual, sums_out=sums[1], clear=sums[2], residual_out=residual)
    assert "residual and residual_out share memory" in str(info.value)

@no_hopper
@pytest.mark.parametrize(
    "make",
    [
        lambda: AttentionWeights.random(CONFIG, torch.float16, device="cuda"),
        lambda: KVCache.empty(CONFIG, BATCH, CAPACITY, device="cuda"),
        lambda: KVCache.random(CONFIG, BATCH, CAPACITY, device="cuda:0"),
        lambda: KVCache.random(CONFIG, BATCH, CAPACITY, device=torch.device("cuda")),
    ],
    ids=["weights", "empty-cache", "random-cache", "cache-torch-device"],
)
def test_cuda_inputs_need_a_hopper_gpu(make):
    with pytest.raises(HopperRequired) as info:
        make()
    assert "device" in str(info.value) and "needs a Hopper GPU" in str(info.value)


@pytest.mark.parametrize("method", ["launcher", "launch_args"])
def test_a_simulator_layer_has_no_kernel_to_launch(method):
    weights, hidden, residual, cache = _inputs()
    layer = DecodeAttention(CONFIG, weights)
    args = (torch.float16, BATCH) if method == "launcher" else (hidden, residual, cache, 3, hidden, residual)
    with pytest.raises(ValueError) as info:
        getattr(layer, method)(*args)
    assert f"{method} needs the 'gpu' backend" in str(info.value) and "runs on the simulator" in str(info.value)


def test_a_simulator_mlp_layer_has_no_kernel_to_launch():
    with pytest.raises(ValueError, match="launcher needs the 'gpu' backend; this layer runs on the simulator"):
        _planner("mlp").launcher(torch.float16, BATCH)


@no_hopper
@pytest.mark.parametrize(
    "timer",
    [
        lambda: timing.event_time_us(lambda: None),
        lambda: timing.per_op_us(lambda k: None, 8),
        lambda: timing.graph_per_op_us(lambda: None),
        lambda: timing.copy_bandwidth(),
        lambda: timing.capture_graph(lambda: None),
    ],
    ids=["event_time_us", "per_op_us", "graph_per_op_us", "copy_bandwidth", "capture_graph"],
)
def test_gpu_timers_need_a_hopper_gpu(timer):
    with pytest.raises(HopperRequired, match="a Hopper GPU is required"):
        timer()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
def test_shared_memory_overflow_is_reported_before_the_simulator_runs(batch, dtype):
    # 32 query heads of 128 on one KV head, all in one cluster: the block's states overflow shared memory.
    config = AttentionConfig(hidden_size=64, heads=32, kv_heads=1, head_dim=128)
    layer = DecodeAttention(config, AttentionWeights.random(config, dtype, seed=1), head_split=1)
    cache = KVCache.random(config, batch, 8, dtype, seed=2)
    before = cache.clone()
    hidden = torch.randn(batch, config.hidden_size).to(dtype)
    out = torch.full_like(hidden, float("nan"))
    with pytest.raises(ValueError) as info:
        layer(hidden, hidden, cache, 3, out=out)
    message = str(info.value)
    assert f"batch {batch}" in message and "head_split=1" in message and "bytes of shared memory" in message
    assert out.isnan().all() and torch.equal(cache.k.view(torch.int16), before.k.view(torch.int16))


def test_kernel_specs_are_built_once_per_dtype_and_batch():
    weights, hidden, residual, cache = _inputs()
    layer = DecodeAttention(CONFIG, weights)
    layer(hidden, residual, cache, 3)
    spec = layer.kernel_spec(torch.float16, BATCH)
    assert layer.kernel_spec(torch.float16, BATCH) is spec
    assert layer.kernel_spec(torch.bfloat16, BATCH) is not spec


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"kv_stream": False}, ValueError,
         "kernel_options: unknown name 'kv_stream'; allowed: attention_mma, kv_pipeline, registers, overlay, "
         "interleave_inputs"),
        ({"registers": 300}, ValueError, "kernel_options: registers=300; allowed: None or an int from 32 to 255"),
        ({"registers": True}, ValueError, "kernel_options: registers=True; allowed"),
        ({"attention_mma": 1}, ValueError, "kernel_options: attention_mma=1; allowed: None, True or False"),
        ({"overlay": None}, ValueError, "kernel_options: overlay=None; allowed: True or False"),
        ([("registers", 168)], TypeError, "kernel_options must be a mapping or None, got list"),
    ],
)
def test_kernel_options_are_checked_when_the_layer_is_built(options, error, words):
    weights, *_ = _inputs()
    with pytest.raises(error) as info:
        DecodeAttention(CONFIG, weights, kernel_options=options)
    assert words in str(info.value)


def test_kernel_options_choose_the_kernel_and_the_simulator_runs_its_one_dataflow():
    weights, hidden, residual, cache = _inputs()
    plain = DecodeAttention(CONFIG, weights)
    default = plain.kernel_spec(torch.float16, BATCH)
    flipped = not default.mma_attention
    layer = DecodeAttention(CONFIG, weights, kernel_options={"attention_mma": flipped, "registers": 168})
    spec = layer.kernel_spec(torch.float16, BATCH)
    assert spec == dataclasses.replace(default, attention_mma=flipped, registers=168)
    assert spec.mma_attention is flipped and spec.register_bound == 168 and spec.min_blocks_per_sm < 4
    positions = torch.tensor([3, 9], dtype=torch.int32)
    want, _ = plain(hidden, residual, cache.clone(), positions)
    got, _ = layer(hidden, residual, cache.clone(), positions, out=torch.full_like(hidden, float("nan")))
    assert torch.equal(got, want)


def test_an_option_the_shape_cannot_take_is_refused_before_the_step():
    config = AttentionConfig(hidden_size=128, heads=16, kv_heads=1, head_dim=64)
    layer = DecodeAttention(config, AttentionWeights.random(config, torch.float16, seed=1), head_split=1,
                            kernel_options={"attention_mma": True})
    hidden = torch.randn(1, config.hidden_size).half()
    out = torch.full_like(hidden, float("nan"))
    with pytest.raises(ValueError) as info:
        layer(hidden, hidden, KVCache.random(config, 1, 8, torch.float16, seed=2), 3, out=out)
    message = str(info.value)
    assert "head_split=1, attention_mma=True" in message and "at most 8 query heads a cluster, got 16" in message
    assert out.isnan().all()


@pytest.mark.parametrize("args, message", [
    (["--kv", "0"], "argument --kv: must be an integer in 1..2147483647; got '0'"),
    (["--kv", "4k"], "argument --kv: must be an integer in 1..2147483647; got '4k'"),
    (["--batch", "9"], "argument --batch: must be an integer in 1..8; got '9'"),
    (["--l2-turnover", "-1"], "argument --l2-turnover: must be a number in 0..64; got '-1'"),
    (["--l2-turnover", "inf"], "argument --l2-turnover: must be a number in 0..64; got 'inf'"),
    (["--l2-turnover", "1e9"], "argument --l2-turnover: must be a number in 0..64; got '1e9'"),
    (["--variant", "8x3"], "argument --variant: variant (8, 3): warps must be one of (4, 8, 16), got 3"),
    (["--variant", "3x4"], "argument --variant: variant (3, 4): cluster size must be one of (1, 2, 4, 8, 16), got 3"),
    (["--variant", "8x4x0"], "argument --variant: variant (8, 4, 0): its third number (head split, or MLA's "
                             "attention clusters) must be"),
])
def test_bench_fused_bad_numbers_exit_2_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench_main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.rstrip("\n").splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("text", ["8xfoo", "8", "8x", "x4", "8x4x2x1", "8,4", "8x-4", ""])
def test_bench_variant_must_look_like_cxw(text, capsys):
    with pytest.raises(SystemExit) as info:
        bench_main(["--variant", "8x4", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --variant: must look like CxW or CxWxS" in err and f"got {text!r}" in err


@pytest.mark.parametrize("text, variant", [("8x4", (8, 4)), ("16x4x2", (16, 4, 2)), ("rule", ())])
def test_bench_variants_parse(text, variant):
    assert parse_variant(text) == variant


def test_bench_variant_rule_gives_the_layer_nothing_so_it_takes_the_rules_shape():
    from clusterlab.bench.fused import variant_options
    from clusterlab.fused.plan import LONG_CACHE, launch_shape, shared_queries_shape

    config = AttentionConfig(hidden_size=256, heads=8, kv_heads=2, head_dim=64)
    options = variant_options(config, parse_variant("rule"))
    assert options == {} and variant_options(config, parse_variant("16x8x1")) != {}
    layer = DecodeAttention(config, AttentionWeights.random(config, torch.float16, seed=1), **options)
    for longest in (None, LONG_CACHE[0] - 1):
        assert layer.shape(1, longest) == launch_shape(config, 1, 132, longest=longest)
    assert layer.shape(1, LONG_CACHE[0]) == shared_queries_shape(config)  # its few KV heads share the queries
    assert layer.shape(1) != layer.shape(1, LONG_CACHE[0])  # the rule's shape follows the length


def test_bench_reads_a_variants_third_number_by_the_presets_block():
    from clusterlab.bench.fused import PRESETS, variant_options
    from clusterlab.fused import DEEPSEEK_V2_LITE, DecodeMLA, MLAWeights

    assert PRESETS["deepseek-v2-lite"] is DEEPSEEK_V2_LITE and "llama3-8b" in PRESETS
    assert variant_options(PRESETS["llama3-8b"], (16, 4, 2)) == {"cluster_size": 16, "warps": 4, "head_split": 2}
    options = variant_options(DEEPSEEK_V2_LITE, (4, 16, 32))
    assert options == {"cluster_size": 4, "warps": 16, "attention_clusters": 32}
    weights = MLAWeights.random(DEEPSEEK_V2_LITE, torch.bfloat16, seed=5)
    assert DecodeMLA(DEEPSEEK_V2_LITE, weights, **options).shape(3) == (4, 16, 32)
    # no variant: the launch rule's shape, one block on each of the 120 SMs clusters of 8 fill
    assert DecodeMLA(DEEPSEEK_V2_LITE, weights).shape(1) == (8, 8, 15)


@pytest.mark.parametrize("text, options", [
    ("registers=168", {"registers": 168}),
    ("attention_mma=False,kv_pipeline=None", {"attention_mma": False, "kv_pipeline": None}),
    ("default", {}),
])
def test_bench_kernel_options_parse(text, options):
    assert parse_options(text) == options


@pytest.mark.parametrize("text, words", [
    ("registers", "must look like name=value[,name=value]"),
    ("registers=16x", "must look like name=value"),
    ("registers=-8", "must look like name=value"),
    ("kv_stream=False", "kernel_options: unknown name 'kv_stream'"),
    ("registers=400", "kernel_options: registers=400; allowed: None or an int from 32 to 255"),
])
def test_bench_kernel_options_must_be_kernel_choices(text, words, capsys):
    with pytest.raises(SystemExit) as info:
        bench_main(["--spec", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --spec:" in err and words in err


def test_bench_mlp_takes_the_mlp_kernel_options_only(capsys):
    from clusterlab.bench.mlp import main as mlp_main

    with pytest.raises(SystemExit) as info:
        mlp_main(["--spec", "registers=168"])
    assert info.value.code == 2
    assert "kernel_options: unknown name 'registers'; allowed: interleave_inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        mlp_main(["--spec", "default", "interleave_inputs=True", "--help"])
    assert info.value.code == 0 and "interleave_inputs" in capsys.readouterr().out


def test_bench_kernel_options_are_each_presets_own_and_refused_before_anything_runs():
    """The Llama block's options are no MLA block's, and the MLA block's (``one_launch``) no Llama block's."""
    with pytest.raises(ValueError, match="--spec for deepseek-v2-lite: kernel_options: unknown name 'registers'; "
                                         "allowed: one_launch"):
        run_bench(presets=("llama3-8b", "deepseek-v2-lite"), options=[{"registers": 168}])
    with pytest.raises(ValueError, match="--spec for llama3-8b: kernel_options: unknown name 'one_launch'"):
        run_bench(presets=("deepseek-v2-lite", "llama3-8b"), options=[{}, {"one_launch": True}])


@pytest.mark.parametrize("turnover", [-1, 65, float("nan"), "3", True])
def test_bench_l2_turnover_out_of_range_is_refused_before_anything_runs(turnover):
    with pytest.raises(ValueError, match=r"l2_turnover must be a number in 0..64, got "):
        run_bench(presets=("deepseek-v2-lite",), l2_turnover=turnover)


@pytest.mark.parametrize("settings, words", [
    ({"presets": ("llama4",)}, "presets must be among ['llama2-7b', "),
    ({"presets": "llama3-8b"}, "presets must be among ['llama2-7b', "),
    ({"presets": ()}, "presets must be among ['llama2-7b', "),
    ({"presets": (["llama3-8b"],)}, "presets must be among ['llama2-7b', "),
    ({"kv_lens": (1024, 0)}, "kv_lens must be integers in 1..2147483647, got [1024, 0]"),
    ({"kv_lens": 4096}, "kv_lens must be integers in 1..2147483647, got 4096"),
    ({"batches": (1, 9)}, "batches must be integers in 1..8, got [1, 9]"),
    ({"batches": (True,)}, "batches must be integers in 1..8, got [True]"),
    ({"dtypes": ("float32",)}, "dtypes must be among ('float16', 'bfloat16'), got ['float32']"),
], ids=["unknown-preset", "preset-as-text", "no-presets", "preset-in-a-list", "zero-kv", "kv-not-a-list", "batch-9", "bool-batch",
        "float32"])
def test_bench_settings_no_run_could_use_are_refused_before_anything_runs(settings, words):
    with pytest.raises(ValueError) as info:
        run_bench(**{"presets": ("llama3-8b",), **settings})
    assert words in str(info.value)


def _overlapping(buffers):
    """hidden_sums and sums_out as two views of one buffer, 64 floats apart."""
    flat = torch.zeros(BATCH * CONFIG.hidden_size + 64)
    buffers["hidden_sums"] = flat[: BATCH * CONFIG.hidden_size].view(BATCH, CONFIG.hidden_size)
    buffers["sums_out"] = flat[64:].view(BATCH, CONFIG.hidden_size)


@pytest.mark.parametrize("block", ["attention", "mlp"])
@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda b: b.update(hidden_sums=b["hidden_sums"].half()), TypeError,
         "hidden_sums has dtype torch.float16; expected torch.float32"),
        (lambda b: b.update(sums_out=torch.zeros(BATCH, 64)), ValueError, "sums_out has shape (2, 64); expected (2, 128)"),
        (lambda b: b.update(clear=torch.zeros(2 * BATCH, CONFIG.hidden_size)[::2]), ValueError,
         "clear must be contiguous"),
        (lambda b: b.update(hidden_sums=torch.zeros(9, CONFIG.hidden_size)), ValueError,
         "hidden_sums has batch 9; allowed 1..8"),
        (lambda b: b.update(residual=b["residual"].float()), TypeError,
         "residual has dtype torch.float32; expected torch.float16"),
        (lambda b: b.update(clear=b["sums_out"]), ValueError, "clear and sums_out share memory"),
        (_overlapping, ValueError, "hidden_sums and sums_out share memory; a hand-off step reads hidden_sums"),
    ],
)
def test_handoff_refuses_bad_buffers_before_any_work(block, change, error, words):
    """``DecodeAttention.handoff`` and ``DecodeMLP.handoff`` check their float32 buffers (dtype,
    shape, layout, batch, three that share no byte) and the residual, naming the argument, and
    leave every buffer as it was."""
    from clusterlab.fused import DecodeMLP, MLPConfig, MLPWeights

    weights, _, residual, cache = _inputs()
    sums = torch.randn(3, BATCH, CONFIG.hidden_size)
    buffers = {"hidden_sums": sums[0], "sums_out": sums[1], "clear": sums[2], "residual": residual}
    change(buffers)
    before = {name: t.clone() for name, t in buffers.items()}
    if block == "attention":
        layer = DecodeAttention(CONFIG, weights)
        call = functools.partial(layer.handoff, buffers["hidden_sums"], buffers["residual"], cache, 3)
    else:
        config = MLPConfig(CONFIG.hidden_size, 256)
        layer = DecodeMLP(config, MLPWeights.random(config, torch.float16, seed=3))
        call = functools.partial(layer.handoff, buffers["hidden_sums"], buffers["residual"])
    with pytest.raises(error) as info:
        call(sums_out=buffers["sums_out"], clear=buffers["clear"])
    assert words in str(info.value)
    for name, t in buffers.items():
        assert torch.equal(t, before[name]), name


def _planner(block: str):
    """A layer of ``block`` on the simulator backend, in a shape its kernels take: "attention",
    "mla" (DeepSeek-V2-Lite's: the MLA kernels tile only its latent widths) or "mlp"."""
    from clusterlab.fused import DEEPSEEK_V2_LITE, DecodeMLA, DecodeMLP, MLAWeights, MLPConfig, MLPWeights

    if block == "attention":
        return DecodeAttention(CONFIG, AttentionWeights.random(CONFIG, torch.float16, seed=1))
    if block == "mla":
        return DecodeMLA(DEEPSEEK_V2_LITE, MLAWeights.random(DEEPSEEK_V2_LITE, torch.float16, seed=2))
    mlp = MLPConfig(CONFIG.hidden_size, 256)
    return DecodeMLP(mlp, MLPWeights.random(mlp, torch.float16, seed=3))


@pytest.mark.parametrize("block", ["attention", "mla", "mlp"])
@pytest.mark.parametrize("call, error, words", [
    (lambda layer: layer.shape(0), ValueError, "batch must be an int in 1..8, got 0"),
    (lambda layer: layer.shape(9), ValueError, "batch must be an int in 1..8, got 9"),
    (lambda layer: layer.shape(2.0), ValueError, "batch must be an int in 1..8, got 2.0"),
    (lambda layer: layer.shape(True), ValueError, "batch must be an int in 1..8, got True"),
    (lambda layer: layer.kernel_spec(torch.float16, 0), ValueError, "batch must be an int in 1..8, got 0"),
    (lambda layer: layer.kernel_spec(torch.float32, 1), TypeError, "dtype must be torch.float16 or torch.bfloat16"),
])
def test_a_layers_planning_methods_refuse_what_no_step_takes(block, call, error, words):
    """``shape`` and ``kernel_spec`` of every block name the bad batch or dtype (a float32 spec was
    a float16 one, a batch of 0 or 9 a plan for a step that cannot run); good values still plan."""
    layer = _planner(block)
    with pytest.raises(error, match=words.replace(".", r"\.")):
        call(layer)
    assert len(layer.shape(2)) == 3 and layer.kernel_spec(torch.bfloat16, 2).batch == 2


def test_the_attention_layers_longest_and_head_split_take_ints_not_bools():
    layer = _planner("attention")
    with pytest.raises(ValueError, match="longest must be a positive int"):
        layer.shape(2, 0)
    with pytest.raises(TypeError, match="longest must be None or an int"):
        layer.shape(2, True)
    with pytest.raises(ValueError, match="head_split must divide the 2 query heads of a KV head"):
        DecodeAttention(CONFIG, layer.weights, head_split=True)
