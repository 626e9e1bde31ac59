"""The fused layer's cluster dataflow on the DSMEM simulator (CPU): same answers as the reference."""

import dataclasses
import inspect
import itertools

import pytest
import torch
from rounding import STEP_TOLERANCE as TOLERANCE  # by dtype: how far a 16-bit step may lie from float64

from clusterlab.fused import (
    LLAMA2_7B,
    LLAMA3_2_1B,
    LLAMA3_8B,
    QWEN2_5_7B,
    AttentionConfig,
    AttentionWeights,
    DecodeAttention,
    KVCache,
    reference_step,
)
from clusterlab.fused.kernel import KernelSpec
from clusterlab.fused import plan
from clusterlab.fused.plan import (
    HALF_CLUSTERS_BELOW,
    HOPPER,
    LONG_CACHE,
    PAIRS_FROM,
    POSITION_ALIGN,
    batch_sets,
    DeviceLimits,
    cached_range,
    launch_shape,
    shape_boundaries,
    wide_blocks,
    new_token_rank,
)
from clusterlab.fused.reference import relative_error
from clusterlab.fused.simulated import SHARED_STAGES, queue_claims, simulated_step

CASES = [
    # (config, cluster_size, batch, head_split)
    (AttentionConfig(hidden_size=128, heads=4, kv_heads=2, head_dim=64), 4, 2, 1),
    (AttentionConfig(hidden_size=256, heads=2, kv_heads=2, head_dim=128, rope_style="gptj"), 2, 1, 1),
    (AttentionConfig(hidden_size=128, heads=8, kv_heads=1, head_dim=64, rope_theta=500000.0), 16, 3, 1),
    (AttentionConfig(hidden_size=128, heads=8, kv_heads=2, head_dim=64), 4, 2, 2),  # 2 clusters a KV head
    (AttentionConfig(hidden_size=128, heads=8, kv_heads=2, head_dim=64, rope_style="gptj"), 2, 1, 4),
    (AttentionConfig(hidden_size=224, heads=7, kv_heads=1, head_dim=64, qkv_bias=True), 2, 2, 7),  # Qwen2-like
]
# Each case as it is, those with a head split again with its clusters splitting the positions, and a
# split of the positions that does not divide the query heads (3 parts of a Qwen2-like KV head of 7).
SPLITS = ([(*case, False) for case in CASES] + [(*case, True) for case in CASES if case[3] > 1]
          + [(CASES[5][0], 2, 2, 3, True)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config, cluster_size, batch, head_split, split_positions", SPLITS)
def test_simulated_step_matches_reference(config, cluster_size, batch, head_split, split_positions, dtype):
    for position in (0, 1, 2 * POSITION_ALIGN * cluster_size + 3):  # empty, tiny, ragged caches
        capacity = position + 5
        weights = AttentionWeights.random(config, dtype)
        cache = KVCache.random(config, batch, capacity, dtype)
        before = cache.clone()
        hidden, residual = torch.randn(2, batch, config.hidden_size).to(dtype)
        want = reference_step(config, weights, hidden, residual, before, position)
        out, new_residual = simulated_step(config, weights, hidden, residual, cache, position, cluster_size,
                                           head_split=head_split, split_positions=split_positions)
        assert relative_error(out, want.out) < TOLERANCE[dtype]
        assert relative_error(new_residual, want.residual) < TOLERANCE[dtype]
        assert relative_error(cache.k[:, :, position], want.k) < TOLERANCE[dtype]
        assert relative_error(cache.v[:, :, position], want.v) < TOLERANCE[dtype]
        others = torch.arange(capacity) != position
        for got, was in ((cache.k, before.k), (cache.v, before.v)):
            assert torch.equal(got[:, :, others].view(torch.int16), was[:, :, others].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_simulated_handoff_reads_rounded_sums_and_leaves_its_own_unconverted(dtype):
    """``DecodeAttention.handoff`` on the simulator backend: float32 sums in (values the dtype cannot
    hold), read rounded; the output sums left in ``sums_out`` unconverted (rounded, they are the
    plain step's ``out`` bit for bit: the same simulated arithmetic), the residual and the cache
    row as the plain step's, the third buffer cleared."""
    config, cluster_size, batch, head_split = CASES[3]
    weights = AttentionWeights.random(config, dtype, seed=7)
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=head_split)
    sums = torch.randn(3, batch, config.hidden_size)
    sums[1].zero_()
    residual = torch.randn(batch, config.hidden_size).to(dtype)
    cache = KVCache.random(config, batch, 40, dtype, seed=8)
    plain_cache = cache.clone()
    positions = torch.tensor([33, 4], dtype=torch.int32)
    out, h = layer(sums[0].to(dtype), residual, plain_cache, positions)
    got_h = layer.handoff(sums[0], residual, cache, positions, sums_out=sums[1], clear=sums[2])
    assert torch.equal(sums[1].to(dtype), out) and not torch.equal(sums[1], out.float())
    assert torch.equal(got_h, h) and torch.equal(cache.k, plain_cache.k) and torch.equal(cache.v, plain_cache.v)
    assert not sums[2].any()


@pytest.mark.parametrize("config, cluster_size, batch, head_split, split_positions",
                         [case for case in SPLITS if case[2] > 1])
def test_simulated_ragged_batch_each_sequence_at_its_own_position(config, cluster_size, batch, head_split,
                                                                  split_positions):
    """A sequence whose cache is shorter than a split's share leaves blocks (and, with the positions
    split, whole clusters) nothing to attend: their states are empty and must merge as such."""
    gen = torch.Generator().manual_seed(batch)
    positions = torch.randint(0, 4 * POSITION_ALIGN * cluster_size, (batch,), generator=gen, dtype=torch.int32)
    positions[0] = 0  # an empty cache beside longer ones
    weights = AttentionWeights.random(config, torch.float16)
    cache = KVCache.random(config, batch, int(positions.max()) + 3, torch.float16)
    before = cache.clone()
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    want = reference_step(config, weights, hidden, residual, before, positions)
    out, _ = simulated_step(config, weights, hidden, residual, cache, positions, cluster_size, head_split=head_split,
                            split_positions=split_positions)
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]
    rows = torch.arange(batch)
    assert relative_error(cache.k[rows, :, positions.long()], want.k) < TOLERANCE[torch.float16]
    assert relative_error(cache.v[rows, :, positions.long()], want.v) < TOLERANCE[torch.float16]
    kept = torch.ones(batch, cache.capacity, dtype=torch.bool)
    kept[rows, positions.long()] = False
    for got, was in ((cache.k, before.k), (cache.v, before.v)):
        assert torch.equal(got.transpose(1, 2)[kept].view(torch.int16), was.transpose(1, 2)[kept].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_step_of_small_inputs_keeps_the_norm_s_epsilon(dtype):
    """Inputs of size 1e-3, a mean square near 2e-6 beside the RMSNorm's epsilon of 1e-5: the step is
    still the reference's, and a norm that dropped its epsilon would be far from it."""
    config, cluster_size, batch, head_split = CASES[3]
    weights = AttentionWeights.random(config, dtype)
    cache = KVCache.random(config, batch, 40, dtype)
    hidden, residual = (torch.randn(2, batch, config.hidden_size) * 1e-3).to(dtype)
    want = reference_step(config, weights, hidden, residual, cache.clone(), 33)
    out, _ = simulated_step(config, weights, hidden, residual, cache, 33, cluster_size, head_split=head_split)
    assert relative_error(out, want.out) < TOLERANCE[dtype]
    no_epsilon = dataclasses.replace(config, rms_eps=1e-12)
    assert relative_error(reference_step(no_epsilon, weights, hidden, residual, cache, 33).out, want.out) > 0.1


def test_layer_on_cpu_runs_the_simulator_into_poisoned_outputs():
    config, _, batch, _ = CASES[0]
    weights = AttentionWeights.random(config, torch.bfloat16)
    layer = DecodeAttention(config, weights)
    assert layer.backend == "simulator"
    cache = KVCache.random(config, batch, 40, torch.bfloat16)
    hidden, residual = torch.randn(2, batch, config.hidden_size).bfloat16()
    want = reference_step(config, weights, hidden, residual, cache.clone(), 39)
    out = torch.full_like(hidden, float("nan"))
    new_residual = torch.full_like(hidden, float("nan"))
    layer(hidden, residual, cache, 39, out=out, residual_out=new_residual)
    assert relative_error(out, want.out) < TOLERANCE[torch.bfloat16]
    assert relative_error(new_residual, want.residual) < TOLERANCE[torch.bfloat16]


def test_trace_shows_four_cluster_barriers_and_the_dsmem_exchanges():
    config, cluster_size, batch, _ = CASES[0]
    traces = []
    weights = AttentionWeights.random(config, torch.float16)
    cache = KVCache.random(config, batch, 20, torch.float16)
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    simulated_step(config, weights, hidden, residual, cache, 19, cluster_size, traces)
    assert len(traces) == config.kv_heads
    table = traces[0].phase_table()
    for step in ("1 qkv", "2 rope", "3 attention", "4 merge", "5 o proj"):
        assert step in table
    assert "4 cluster barriers" in table
    # Only phases 2 (pull partials, push q/k/v) and 4 (pull states, push o) touch peers.
    rows = [line for line in table.splitlines() if "shared::cluster" in line]
    assert len(rows) == 2 and "2 rope" in rows[0] and "4 merge" in rows[1]


def test_kernel_and_simulator_head_their_phases_alike():
    """Kernel and simulator model mark each phase with the same ``# -- N name: what`` line, in order
    (the model's block program in its three stretches, then the step's finish)."""
    from clusterlab.fused import kernel, simulated

    def headers(*functions):
        lines = "".join(inspect.getsource(f) for f in functions).splitlines()
        return [line.strip().rstrip("- ") for line in lines if line.strip().startswith("# -- ")]

    steps = ["1 qkv", "2 rope", "3 attention", "4 merge", "5 o proj", "6 finish"]
    in_kernel = headers(kernel.build_kernel)
    assert [header.removeprefix("# -- ")[: len(step)] for header, step in zip(in_kernel, steps)] == steps
    assert headers(simulated.project, simulated.attend, simulated.project_o, simulated.simulated_step) == in_kernel


@pytest.mark.parametrize("cached", [0, 1, 15, 16, 17, 1000, 32767])
@pytest.mark.parametrize("cluster_size", [1, 2, 8, 16])
def test_cached_ranges_cover_each_position_once(cached, cluster_size):
    seen = []
    for rank in range(cluster_size):
        start, end = cached_range(cached, rank, cluster_size)
        assert start % POSITION_ALIGN == 0 or start == cached
        seen += range(start, end)
    assert seen == list(range(cached))
    assert new_token_rank(cluster_size) == cluster_size - 1


def test_layer_rejects_bad_input_before_running():
    config = CASES[0][0]
    layer = DecodeAttention(config, AttentionWeights.random(config, torch.float16))
    cache = KVCache.random(config, 2, 8, torch.float16)
    hidden = torch.randn(2, config.hidden_size).half()
    with pytest.raises(ValueError, match="position 8 overflows the cache"):
        layer(hidden, hidden, cache, 8)
    with pytest.raises(ValueError, match="position 8 overflows the cache"):
        layer(hidden, hidden, cache, torch.tensor([3, 8], dtype=torch.int32))
    with pytest.raises(TypeError, match="positions has dtype torch.int64; expected torch.int32"):
        layer(hidden, hidden, cache, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"positions has shape \(3,\); expected \(2,\), one per sequence"):
        layer(hidden, hidden, cache, torch.tensor([3, 4, 5], dtype=torch.int32))
    with pytest.raises(TypeError, match="positions must be an int or an int32 tensor of shape"):
        layer(hidden, hidden, cache, 3.0)
    with pytest.raises(ValueError, match=rf"out has shape \(2, 7\); expected \(2, {config.hidden_size}\)"):
        layer(hidden, hidden, cache, 3, out=torch.empty(2, 7).half())
    for wrong, error in ((0, ValueError), (9, ValueError), (3, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=rf"longest must be .* got {wrong}"):
            layer(hidden, hidden, cache, 3, longest=wrong)
    with pytest.raises(ValueError, match="cluster_size must be one of"):
        DecodeAttention(config, layer.weights, cluster_size=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        DecodeAttention(config, layer.weights, backend="cuda")


def test_launch_shape_spreads_a_step_over_the_sms():
    # On an H100's 132 SMs, up to batch 4: 256 blocks of 4 warps (two an SM). Llama-2-7B gets them
    # as 32 clusters of 8; Llama-3-8B's 8 KV heads allow 8 x 16 = 128 blocks, so each KV head's
    # query heads go to 2 clusters, of 16 x 4 warps, which run as 8 x 8 warps (clusters of 16 fill
    # fewer SMs), unless the warps or the head split are given. A batch of 5 to 8 needs 8 warps: 128 blocks.
    for batch in (1, 4):
        assert launch_shape(LLAMA2_7B, batch, 132) == launch_shape(LLAMA2_7B, batch, 132, warps=4) == (8, 4, 1)
        assert launch_shape(LLAMA3_8B, batch, 132) == (8, 8, 2)
        assert launch_shape(LLAMA3_8B, batch, 132, warps=4) == (16, 4, 2)
        assert launch_shape(LLAMA3_8B, batch, 132, warps=8) == (16, 4, 2)  # the layer gives it 8 warps
        assert launch_shape(LLAMA3_8B, batch, 132, head_split=2) == (16, 4, 2)
        assert launch_shape(QWEN2_5_7B, batch, 132) == (8, 4, 7)  # clusters of 8 already
    for batch in (5, 8):
        assert launch_shape(LLAMA2_7B, batch, 132) == (4, 8, 1)
        assert launch_shape(LLAMA3_8B, batch, 132) == (16, 8, 1)
        # below HALF_CLUSTERS_BELOW rows told, the clusters of 16 x 8 warps run as twice as many of 8 x 8
        for config in (LLAMA3_8B, LLAMA3_2_1B):
            assert launch_shape(config, batch, 132, longest=1) == (8, 8, 2)
            assert launch_shape(config, batch, 132, longest=HALF_CLUSTERS_BELOW - 1) == (8, 8, 2)
            assert launch_shape(config, batch, 132, longest=HALF_CLUSTERS_BELOW) == (16, 8, 1)
            assert launch_shape(config, batch, 132, longest=1, cluster_size=16) == (16, 8, 1)  # given values kept
            assert launch_shape(config, batch, 132, longest=1, head_split=1) == (16, 8, 1)
            assert launch_shape(config, batch, 132, longest=1, warps=8) == (16, 8, 1)
        assert launch_shape(LLAMA2_7B, batch, 132, longest=1) == (4, 8, 1)  # clusters of 4 already
        assert launch_shape(QWEN2_5_7B, batch, 132, longest=1) == (4, 8, 7)
    for batch in (1, 4):  # blocks of 4 warps up to a batch of 4: the length does not matter there
        assert launch_shape(LLAMA3_8B, batch, 132, longest=1) == launch_shape(LLAMA3_8B, batch, 132) == (8, 8, 2)
        assert HALF_CLUSTERS_BELOW not in shape_boundaries(batch)
    assert all(HALF_CLUSTERS_BELOW in shape_boundaries(batch) for batch in range(5, 9))
    assert launch_shape(LLAMA2_7B, 1, 132, cluster_size=4) == (4, 8, 1)  # one block an SM: 8 warps
    assert launch_shape(LLAMA2_7B, 1, 66, cluster_size=4) == (4, 4, 1)  # two an SM: 4 warps
    assert launch_shape(LLAMA3_8B, 1, 132, cluster_size=8) == (8, 4, 4)
    assert launch_shape(LLAMA3_8B, 1, 132, head_split=1) == (16, 8, 1)
    tiny = AttentionConfig(hidden_size=128, heads=8, kv_heads=1, head_dim=64)
    assert launch_shape(tiny, 1, 132) == (16, 8, 8)  # hidden 128 still splits into 16 slices of 16 bytes
    assert launch_shape(AttentionConfig(hidden_size=64, heads=1, kv_heads=1, head_dim=64), 1, 132) == (8, 8, 1)
    many = AttentionConfig(hidden_size=4096, heads=512, kv_heads=512, head_dim=64)
    assert launch_shape(many, 1, 132) == (1, 4, 1)  # over the limit even at one block a cluster


def test_launch_shape_reads_long_caches_once_a_kv_head():
    # From the batch's LONG_CACHE rows (8192 at batches 1 and 2, 4096 beyond) a GQA step leaves the
    # head split for one cluster of 8-warp blocks a KV head; given values are as at short caches (MHA:
    # the next test).
    assert LONG_CACHE == (8192, 8192, 4096, 4096, 4096, 4096, 4096, 4096)
    shorts = {LLAMA3_8B: {1: (8, 8, 2), 2: (8, 8, 2), 3: (8, 8, 2), 4: (8, 8, 2), 5: (16, 8, 1), 8: (16, 8, 1)},
              QWEN2_5_7B: {1: (8, 4, 7), 2: (8, 4, 7), 3: (8, 4, 7), 4: (8, 4, 7), 5: (4, 8, 7), 8: (4, 8, 7)}}
    for batch in (1, 2, 3, 4, 5, 8):
        long = LONG_CACHE[batch - 1]
        for config, short in ((LLAMA3_8B, shorts[LLAMA3_8B][batch]), (QWEN2_5_7B, shorts[QWEN2_5_7B][batch])):
            assert launch_shape(config, batch, 132, longest=long - 1) == short
            assert launch_shape(config, batch, 132) == short  # the length unknown: the short-cache shape
            one_set = launch_shape(config, batch, 132, longest=long, batch_parts=1)
            assert one_set == launch_shape(config, batch, 132, longest=10 * long, batch_parts=1) == (16, 8, 1)
            sets = batch_sets(config, batch, longest=long)
            # from BATCH_SETS_FROM; an odd batch where one set leaves half the SMs idle (Qwen2.5-7B: 64 blocks)
            assert sets == (2 if batch in (4, 8) or (batch > 4 and config is QWEN2_5_7B) else 1)
            assert batch_sets(config, batch, longest=long - 1) == batch_sets(config, batch) == 1
            # two sets: each the largest grid within half the SMs (Llama-3-8B: 8 clusters of 8, 64 blocks)
            want = (16, 8, 1) if sets == 1 or config is QWEN2_5_7B else (8, 8, 1)
            assert launch_shape(config, batch, 132, longest=long) == want
        assert batch_sets(LLAMA2_7B, batch, longest=long) == 1
    assert launch_shape(QWEN2_5_7B, 2, 132, longest=4096) == (8, 4, 7)  # batch 2 keeps the split at 4K
    assert launch_shape(QWEN2_5_7B, 3, 132, longest=4096) == (16, 8, 1)
    assert launch_shape(LLAMA3_8B, 1, 132, head_split=2, longest=LONG_CACHE[0]) == (16, 4, 2)
    assert launch_shape(LLAMA3_8B, 1, 132, cluster_size=8, longest=LONG_CACHE[0]) == (8, 8, 1)
    assert batch_sets(LLAMA3_8B, 8, longest=4096, cluster_size=16) == batch_sets(LLAMA3_8B, 7, longest=4096) == 1
    assert batch_sets(QWEN2_5_7B, 7, longest=4096) == 2 and batch_sets(QWEN2_5_7B, 7, longest=4096, sm_count=127) == 1
    assert launch_shape(LLAMA3_8B, 8, 132, cluster_size=16, longest=4096) == (16, 8, 1)  # given: one set


def test_launch_shape_pairs_the_sequences_of_a_batch_at_the_longest_caches():
    # From PAIRS_FROM rows an even batch goes to sets of two sequences, at least two sets (a batch of 2:
    # two sets of one), each set's grid planned for two 4-warp blocks an SM (the limit of 264 blocks
    # shared by the sets); below, two sets of 8-warp blocks from a batch of 4, one set at batch 2; an
    # odd batch of 5 or 7 too, the last set one sequence short, and below or at batch 3 where one set
    # leaves half the SMs idle (Qwen2.5-7B); the other odd batches, MHA and a given cluster size keep
    # one set.
    assert PAIRS_FROM == 16384
    # (Qwen2.5-7B's 4 KV heads: one cluster of 16 a KV head, 64 blocks a set; two sets of them fit
    # the SMs in 8-warp blocks)
    pairs = {(LLAMA3_8B, 2): (2, (16, 4, 1)), (LLAMA3_8B, 4): (2, (16, 4, 1)), (LLAMA3_8B, 6): (3, (8, 4, 1)),
             (LLAMA3_8B, 8): (4, (8, 4, 1)), (QWEN2_5_7B, 2): (2, (16, 8, 1)), (QWEN2_5_7B, 4): (2, (16, 8, 1)),
             (QWEN2_5_7B, 8): (4, (16, 4, 1)), (QWEN2_5_7B, 5): (3, (16, 4, 1)), (QWEN2_5_7B, 7): (4, (16, 4, 1))}
    for (config, batch), (sets, shape) in pairs.items():
        for longest in (PAIRS_FROM, 2 * PAIRS_FROM):
            assert batch_sets(config, batch, longest=longest) == sets
            assert launch_shape(config, batch, 132, longest=longest) == shape
            assert launch_shape(config, batch, 132, longest=longest, batch_parts=sets) == shape
        assert batch_sets(config, batch, longest=PAIRS_FROM - 1) == (1 if batch == 2 else 2)
        assert launch_shape(config, batch, 132, longest=PAIRS_FROM - 1) == launch_shape(config, batch, 132,
                                                                                         longest=LONG_CACHE[batch - 1])
    assert launch_shape(LLAMA3_8B, 2, 132, longest=PAIRS_FROM - 1) == (16, 8, 1)
    for batch in (1, 3):  # below BATCH_SETS_FROM Llama-3-8B's one set fills the SMs
        assert batch_sets(LLAMA3_8B, batch, longest=PAIRS_FROM) == 1
        assert launch_shape(LLAMA3_8B, batch, 132, longest=PAIRS_FROM) == (16, 8, 1)
    for batch, sets in ((5, 3), (7, 4)):  # sets of pairs, the last a sequence short
        assert batch_sets(LLAMA3_8B, batch, longest=PAIRS_FROM) == sets
        assert launch_shape(LLAMA3_8B, batch, 132, longest=PAIRS_FROM) == (8, 4, 1)
        assert batch_sets(LLAMA3_8B, batch, longest=PAIRS_FROM - 1) == 1
    assert batch_sets(QWEN2_5_7B, 3, longest=PAIRS_FROM) == 2 and batch_sets(QWEN2_5_7B, 3, longest=PAIRS_FROM - 1) == 1
    assert batch_sets(QWEN2_5_7B, 1, longest=PAIRS_FROM) == 1  # one sequence: one set
    assert launch_shape(QWEN2_5_7B, 3, 132, longest=PAIRS_FROM) == (16, 8, 1)  # sets of 2 and 1, 64 blocks each
    assert batch_sets(LLAMA2_7B, 8, longest=PAIRS_FROM) == 1
    assert launch_shape(LLAMA2_7B, 8, 132, longest=PAIRS_FROM) == (2, 16, 1)  # one set (the next test)
    assert batch_sets(LLAMA3_8B, 8, longest=PAIRS_FROM, cluster_size=8) == 1
    # sets given: pairs take the 4-warp plan, larger shares the 8-warp one
    assert launch_shape(LLAMA3_8B, 8, 132, longest=PAIRS_FROM, batch_parts=2) == (8, 8, 1)
    assert launch_shape(LLAMA3_8B, 8, 132, longest=PAIRS_FROM, batch_parts=8) == (4, 4, 1)
    assert launch_shape(LLAMA3_8B, 8, 132, longest=PAIRS_FROM - 1, batch_parts=4) == (4, 8, 1)


def test_odd_batches_whose_weights_fit_half_the_l2_are_split_as_even_ones():
    # Llama-3.2-1B's one set of 16 x 8 warps a KV head fills the SMs (128 blocks), but its 21 MB of
    # weights, streamed once a set, fit in half of a 50 MiB L2: its odd batches take the even batches'
    # sets, the last set a sequence short; Llama-3-8B's 84 MB do not (the previous tests).
    assert 2 * LLAMA3_2_1B.weight_bytes() <= HOPPER.l2_bytes < 2 * LLAMA3_8B.weight_bytes()
    small_l2 = 2 * LLAMA3_2_1B.weight_bytes() - 1
    for batch, below, pairs in ((3, 1, 2), (5, 2, 3), (7, 2, 4)):
        long = LONG_CACHE[batch - 1]
        assert batch_sets(LLAMA3_2_1B, batch, longest=long) == below  # two sets from BATCH_SETS_FROM
        assert batch_sets(LLAMA3_2_1B, batch, longest=long, l2_bytes=small_l2 + 1) == below  # just fits half
        assert batch_sets(LLAMA3_2_1B, batch, longest=PAIRS_FROM) == pairs
        assert launch_shape(LLAMA3_2_1B, batch, 132, longest=PAIRS_FROM) == (16 if batch == 3 else 8, 4, 1)
        # with less L2 only the sets of pairs from a batch of 5 stay (as Llama-3-8B's)
        for longest in (long, PAIRS_FROM) if batch == 3 else (long,):
            assert batch_sets(LLAMA3_2_1B, batch, longest=longest, l2_bytes=small_l2) == 1
            assert launch_shape(LLAMA3_2_1B, batch, 132, longest=longest, l2_bytes=small_l2) == (16, 8, 1)
        if batch > 3:
            assert batch_sets(LLAMA3_2_1B, batch, longest=PAIRS_FROM, l2_bytes=small_l2) == pairs
    assert batch_sets(LLAMA3_2_1B, 1, longest=PAIRS_FROM) == 1


def test_launch_shape_gives_long_mha_batches_of_5_to_8_one_16_warp_block_every_other_sm():
    # Llama-2-7B's 32 clusters of 4 x 8 warps do not all fit (clusters of 4 reach 120 SMs); from the
    # batch's LONG_CACHE rows a batch of 5 to 8 takes 32 clusters of 2 x 16 warps, 64 blocks.
    for batch in range(1, 9):
        long = LONG_CACHE[batch - 1]
        short = (8, 4, 1) if batch <= 4 else (4, 8, 1)
        assert launch_shape(LLAMA2_7B, batch, 132) == launch_shape(LLAMA2_7B, batch, 132, longest=long - 1) == short
        want = short if batch <= 4 else (2, 16, 1)
        assert wide_blocks(LLAMA2_7B, batch, long) == (batch > 4)
        for longest in (long, PAIRS_FROM, 2 * PAIRS_FROM):
            assert launch_shape(LLAMA2_7B, batch, 132, longest=longest) == want
            assert batch_sets(LLAMA2_7B, batch, longest=longest) == 1
    assert not wide_blocks(LLAMA3_8B, 8, PAIRS_FROM) and not wide_blocks(LLAMA2_7B, 8, None)
    # given values: a cluster size whose grid cannot be one block every other SM keeps 8 warps; so do
    # given sets (their grids share the SMs)
    assert launch_shape(LLAMA2_7B, 8, 132, cluster_size=4, longest=PAIRS_FROM) == (4, 8, 1)
    assert launch_shape(LLAMA2_7B, 8, 132, cluster_size=1, longest=PAIRS_FROM) == (1, 16, 1)
    assert launch_shape(LLAMA2_7B, 8, 132, longest=PAIRS_FROM, batch_parts=2) == (2, 8, 1)
    # the grid within half the SMs: 66 on an H200, 32 on 64 SMs
    assert launch_shape(LLAMA2_7B, 8, 64, longest=PAIRS_FROM) == (1, 16, 1)


@pytest.mark.parametrize("batch", [0, 9, -1, 2.0, True])
def test_launch_shape_names_a_batch_outside_1_to_8(batch):
    # batch 0 would read LONG_CACHE[-1], the threshold of batch 8
    with pytest.raises(ValueError, match=rf"batch must be an int in 1..8, got {batch!r}"):
        launch_shape(LLAMA3_8B, batch, 132, longest=4096)


def test_layer_shape_follows_the_batch_unless_given():
    config = AttentionConfig(hidden_size=256, heads=4, kv_heads=4, head_dim=64)
    layer = DecodeAttention(config, AttentionWeights.random(config, torch.float16))
    assert layer.shape(1) == layer.shape(8) == (16, 8, 1)  # 4 x 16 blocks: one an SM
    fixed = DecodeAttention(config, layer.weights, cluster_size=2, warps=16, head_split=1)
    assert fixed.shape(1) == fixed.shape(8) == (2, 16, 1)
    with pytest.raises(ValueError, match=r"head_split must divide the 1 query heads of a KV head \(one of \[1\]\), got 2"):
        DecodeAttention(config, layer.weights, head_split=2)
    split = {"split_positions": True}  # then the clusters split positions, as many as 16
    assert DecodeAttention(config, layer.weights, head_split=3, kernel_options=split).shape(4) == (16, 4, 3)
    for wrong in (0, 17, 2.0, True):
        with pytest.raises(ValueError, match=r"head_split with split_positions \(the clusters a KV head's cached "
                                             rf"positions are split over\) must be an int from 1 to 16, got {wrong}"):
            DecodeAttention(config, layer.weights, head_split=wrong, kernel_options=split)


@pytest.mark.parametrize("warps, blocks", [(4, 4), (8, 2), (16, 1)])
def test_launch_bound_asks_for_16_warps_an_sm(warps, blocks):
    spec = KernelSpec.of(LLAMA2_7B, False, 1, 8, warps)
    assert spec.min_blocks_per_sm == blocks
    # 8 sequences' states: with every region in its own words shared memory allows one block, with
    # the regions overlaid two
    big = dataclasses.replace(KernelSpec.of(LLAMA3_8B, True, 8, 16, 8), overlay=False)
    assert 2 * (big.shared_bytes + HOPPER.reserved_shared_bytes_per_block) > HOPPER.shared_bytes_per_sm
    assert big.min_blocks_per_sm == 1 and big.pipelined_kv
    overlaid = dataclasses.replace(big, overlay=True)
    assert overlaid.min_blocks_per_sm == 2 and not overlaid.pipelined_kv


#: When each shared region of the Llama kernel is live, as spans of the intervals between its
#: cluster barriers (0: before B1, 1: B1 to B2, 2: B2 to B3, 3: B3 to B4, 4: after B4), from the
#: first write (a peer's push included) to the last read (a peer's pull included).
LIFETIMES = {"xs": (0, 0), "red": (0, 0), "partial": (0, 1), "qkv": (1, 2), "scratch_m": (2, 2),
             "scratch_l": (2, 2), "scratch_acc": (2, 2), "state_m": (2, 3), "state_l": (2, 3),
             "state_acc": (2, 3), "foreign_q": (2, 2), "o": (3, 4)}


@pytest.mark.parametrize("overlay", [True, False])
@pytest.mark.parametrize("config, batch, work_queue", [(LLAMA2_7B, 1, False), (LLAMA3_8B, 8, False),
                                                       (LLAMA3_8B, 3, False), (LLAMA3_8B, 8, True)])
def test_shared_regions_share_words_only_when_never_live_at_once(config, batch, work_queue, overlay):
    """Two regions may overlap only where a cluster barrier separates their lifetimes: the layout
    against :data:`LIFETIMES`, and the overlay does save words (with the work queue, the warps' query
    regions live beside the scratch states)."""
    cluster_size, warps, head_split = launch_shape(config, batch, 132)
    spec = dataclasses.replace(KernelSpec.of(config, False, batch, cluster_size, warps, head_split,
                                             work_queue=work_queue), overlay=overlay)
    assert (spec.smem_sizes()["foreign_q"] > 0) == work_queue
    layout = spec.smem_layout()
    sizes = spec.smem_sizes()
    assert set(layout) == set(LIFETIMES) | {"total"} and set(sizes) == set(LIFETIMES)
    words = {name: range(layout[name], layout[name] + sizes[name]) for name in LIFETIMES}
    assert max(w.stop for w in words.values()) <= layout["total"]
    for a, b in itertools.combinations(LIFETIMES, 2):
        live_apart = LIFETIMES[a][1] < LIFETIMES[b][0] or LIFETIMES[b][1] < LIFETIMES[a][0]
        shared = set(words[a]) & set(words[b])
        assert live_apart or not shared, (a, b)
        assert overlay or not shared, (a, b)
    separate = dataclasses.replace(spec, overlay=False).shared_bytes
    assert (spec.shared_bytes < separate) == overlay


def test_shapes_beyond_the_cards_shared_memory_are_refused():
    small = DeviceLimits(sm_count=132, shared_bytes_per_sm=65536, shared_bytes_per_block=48 * 1024,
                         reserved_shared_bytes_per_block=1024, registers_per_sm=65536, l2_bytes=40 * 2**20,
                         cluster_sms=(132, 132, 120, 120, 112))
    assert KernelSpec.of(LLAMA2_7B, False, 1, 8, 4, limits=small).min_blocks_per_sm == 4
    with pytest.raises(ValueError, match=r"needs \d+ bytes of shared memory; the GPU allows 49152"):
        KernelSpec.of(LLAMA3_8B, True, 8, 16, 8, limits=small)
    # The switches a spec is built with count: all of Qwen2.5-7B's query heads a cluster need more.
    half = dataclasses.replace(small, shared_bytes_per_block=100 * 1024)
    assert KernelSpec.of(QWEN2_5_7B, True, 8, 4, 8, 7, limits=half).shared_bytes < 100 * 1024
    with pytest.raises(ValueError, match=r"needs \d+ bytes of shared memory; the GPU allows 102400"):
        KernelSpec.of(QWEN2_5_7B, True, 8, 4, 8, 7, limits=half, split_positions=True)
    with pytest.raises(ValueError, match="attention on the tensor cores takes at most 8 query heads a cluster"):
        KernelSpec.of(AttentionConfig(hidden_size=1024, heads=16, kv_heads=1, head_dim=64), False, 1, 8, 4,
                      attention_mma=True)


def _step_matches_reference(layer, batch):
    """One float16 step of ``layer`` (simulator backend) on a ragged batch of 2 (250 rows and an empty
    cache) against the reference; returns its inputs ``(hidden, residual, cache, positions)``."""
    config = layer.config
    cache = KVCache.random(config, batch, 300, torch.float16, seed=6)
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    positions = torch.tensor([250, 0], dtype=torch.int32)
    want = reference_step(config, layer.weights, hidden, residual, cache.clone(), positions)
    out, _ = layer(hidden, residual, cache, positions)
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]
    return hidden, residual, cache, positions


def test_the_layer_runs_the_position_split_on_the_simulator():
    """``kernel_options={"split_positions": True}`` reaches the simulator backend: the same step as the
    reference, and the trace names each cluster by its part of the positions."""
    config, cluster_size, batch, head_split = CASES[3]
    weights = AttentionWeights.random(config, torch.float16, seed=5)
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=head_split,
                            kernel_options={"split_positions": True})
    hidden, residual, cache, positions = _step_matches_reference(layer, batch)
    traces = []
    simulated_step(config, weights, hidden, residual, cache, positions, cluster_size, traces, head_split, False, True)
    assert [trace.title for trace in traces] == [f"decode step, KV head {g} positions {s}" for g in (0, 1)
                                                 for s in (0, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case, batch_parts", [(CASES[3], 1), (CASES[4], 1), (CASES[5], 1), (CASES[3], 2)],
                         ids=["split2", "gptj-split4", "qwen2-like-split7", "split2-sets"])
def test_shared_queries_on_the_simulator_match_the_reference(case, batch_parts, dtype):
    """``shared_queries``: each part projects its share of the query heads and hands them over, all
    parts attend with every head over their share of the positions and project their own heads;
    ragged batches with an empty cache, QKV bias, GPT-J's RoPE, sets of clusters (the last with
    fewer sequences); a cache row appended for every sequence. The trace has each cluster's three
    stretches, every cluster of a set through one before the next."""
    config, cluster_size, batch, head_split = case
    batch = max(batch, 3)
    gen = torch.Generator().manual_seed(head_split)
    positions = torch.randint(1, 4 * POSITION_ALIGN * cluster_size, (batch,), generator=gen, dtype=torch.int32)
    positions[1] = 0
    weights = AttentionWeights.random(config, dtype)
    cache = KVCache.random(config, batch, int(positions.max()) + 3, dtype)
    before = cache.clone()
    hidden, residual = torch.randn(2, batch, config.hidden_size).to(dtype)
    want = reference_step(config, weights, hidden, residual, before, positions)
    traces = []
    out, new_residual = simulated_step(config, weights, hidden, residual, cache, positions, cluster_size, traces,
                                       head_split, split_positions=True, batch_parts=batch_parts,
                                       shared_queries=True)
    assert relative_error(out, want.out) < TOLERANCE[dtype]
    assert relative_error(new_residual, want.residual) < TOLERANCE[dtype]
    rows = torch.arange(batch)
    assert relative_error(cache.k[rows, :, positions], want.k) < TOLERANCE[dtype]
    assert relative_error(cache.v[rows, :, positions], want.v) < TOLERANCE[dtype]
    clusters = config.kv_heads * head_split
    stages = [trace.title.rsplit(", ", 1)[1] for trace in traces]
    assert stages == [stage for _ in range(batch_parts) for stage in SHARED_STAGES for _ in range(clusters)]


def test_shared_queries_are_refused_where_the_parts_do_not_divide_the_query_heads():
    """``shared_queries`` without ``split_positions``, or with parts that do not divide ``G`` (3 of a
    Qwen2-like KV head's 7), is refused by name before anything runs, on the layer and the step."""
    config, cluster_size, batch, _ = CASES[5]
    weights = AttentionWeights.random(config, torch.float16)
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    cache = KVCache.random(config, batch, 8, torch.float16)
    message = r"shared_queries takes split_positions and a head_split that divides the 7 query heads"
    with pytest.raises(ValueError, match=message + r".*got head_split 3, split_positions True"):
        simulated_step(config, weights, hidden, residual, cache, 3, cluster_size, head_split=3, split_positions=True,
                       shared_queries=True)
    with pytest.raises(ValueError, match=message + r".*got head_split 7, split_positions False"):
        simulated_step(config, weights, hidden, residual, cache, 3, cluster_size, head_split=7, shared_queries=True)
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=3,
                            kernel_options={"split_positions": True, "shared_queries": True})
    with pytest.raises(ValueError, match=message):
        layer(hidden, residual, cache, 3)


def test_the_layer_runs_shared_queries_on_the_simulator():
    """``kernel_options={"split_positions": True, "shared_queries": True}`` reaches the simulator
    backend, and its hand-off runs there too: float32 sums in and out."""
    config, cluster_size, batch, head_split = CASES[5]
    weights = AttentionWeights.random(config, torch.float16, seed=7)
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=head_split,
                            kernel_options={"split_positions": True, "shared_queries": True})
    assert layer.kernel_spec(torch.float16, batch).shared_queries
    hidden, residual, cache, positions = _step_matches_reference(layer, batch)
    sums = torch.randn(batch, config.hidden_size)
    want = reference_step(config, weights, sums.half(), residual, cache.clone(), positions)
    sums_out, clear = torch.zeros(batch, config.hidden_size), torch.full((batch, config.hidden_size), float("nan"))
    layer.handoff(sums, residual, cache, positions, sums_out=sums_out, clear=clear)
    assert relative_error(sums_out, want.out) < TOLERANCE[torch.float16] and (clear == 0).all()


def test_the_rule_s_shared_queries_run_on_the_simulator_and_name_their_step_shape():
    """A GQA block of 2 KV heads (one cluster of 16 each would fill 32 of 132 SMs) told a long cache
    at a batch of 4: the layer's rule takes 4 x 8 warps x 4 parts with the query projection shared
    out, one set, and steps into the reference's answer (a wrong ``longest`` costs time, never
    correctness); a model keys its CUDA graphs by that choice too, at every batch at its long-cache
    rows. Below those rows, or with a launch shape or a split asked for, the rule's other shapes as
    before."""
    config = AttentionConfig(hidden_size=256, heads=8, kv_heads=2, head_dim=64)
    weights = AttentionWeights.random(config, torch.float16, seed=13)
    layer = DecodeAttention(config, weights)
    batch, longest = 4, LONG_CACHE[3]
    assert layer.shares_queries(batch, longest) and layer.shape(batch, longest) == (4, 8, 4)
    assert layer.batch_parts(batch, longest) == 1
    spec = layer.kernel_spec(torch.float16, batch, longest)
    assert (spec.split_positions, spec.shared_queries, spec.parts, spec.projected_group) == (True, True, 4, 1)
    assert not layer.shares_queries(batch, longest - 1) and not layer.shares_queries(1, LONG_CACHE[0] - 1)
    assert all(layer.shares_queries(b, LONG_CACHE[b - 1]) for b in range(1, 9))
    assert layer.shape(batch, longest - 1) == launch_shape(config, batch, HOPPER.sm_count, longest=longest - 1)
    for given in ({"cluster_size": 4}, {"head_split": 2}, {"kernel_options": {"batch_parts": 2}},
                  {"kernel_options": {"split_positions": True}}):
        assert not DecodeAttention(config, weights, **given).shares_queries(batch, longest)
    cache = KVCache.random(config, batch, longest, torch.float16, seed=14)
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    positions = torch.tensor([250, 0, 17, 129], dtype=torch.int32)
    want = reference_step(config, weights, hidden, residual, cache.clone(), positions)
    out, _ = layer(hidden, residual, cache, positions, longest=longest)
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("head_split, split_positions", [(1, False), (2, False), (2, True)])
def test_a_batch_split_over_sets_of_clusters_runs_each_set_on_its_own_sequences(head_split, split_positions):
    """``kernel_options={"batch_parts": 2}`` on the simulator backend: each set of clusters steps its
    half of a ragged batch (an empty cache among them) into the reference's answer, and the trace
    names each set's sequences; three sequences run in sets of 2 and 1; a count that leaves a set
    nothing is refused by name."""
    config, cluster_size = CASES[3][0], 4
    batch = 4
    weights = AttentionWeights.random(config, torch.float16, seed=11)
    options = {"batch_parts": 2, "split_positions": split_positions}
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=head_split, kernel_options=options)
    cache = KVCache.random(config, batch, 300, torch.float16, seed=12)
    before = cache.clone()
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    positions = torch.tensor([250, 0, 37, 129], dtype=torch.int32)
    want = reference_step(config, weights, hidden, residual, before, positions)
    out = torch.full_like(hidden, float("nan"))
    new_residual = torch.full_like(hidden, float("nan"))
    layer(hidden, residual, cache, positions, out=out, residual_out=new_residual)
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]
    assert relative_error(new_residual, want.residual) < TOLERANCE[torch.float16]
    rows = torch.arange(batch)
    assert relative_error(cache.k[rows, :, positions.long()], want.k) < TOLERANCE[torch.float16]
    assert relative_error(cache.v[rows, :, positions.long()], want.v) < TOLERANCE[torch.float16]
    traces = []
    simulated_step(config, weights, hidden, residual, before.clone(), positions, cluster_size, traces, head_split,
                   split_positions=split_positions, batch_parts=2)
    sets = config.kv_heads * head_split  # traces a set of clusters
    assert len(traces) == 2 * sets
    assert all(trace.title.endswith(", sequences 0..1") for trace in traces[:sets])
    assert all(trace.title.endswith(", sequences 2..3") for trace in traces[sets:])
    spec = layer.kernel_spec(torch.float16, batch)
    assert (spec.batch, spec.step_batch, spec.clusters, spec.uneven) == (2, 4, 2 * spec.part_clusters, False)
    # three sequences: sets of 2 and 1
    three = KVCache.random(config, 3, 300, torch.float16, seed=13)
    want = reference_step(config, weights, hidden[:3], residual[:3], three.clone(), positions[:3])
    out, new_residual = layer(hidden[:3], residual[:3], three.clone(), positions[:3])
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]
    assert relative_error(new_residual, want.residual) < TOLERANCE[torch.float16]
    traces = []
    simulated_step(config, weights, hidden[:3], residual[:3], three, positions[:3], cluster_size, traces,
                   head_split, split_positions=split_positions, batch_parts=2)
    assert [trace.title.rsplit(", ", 1)[1] for trace in traces[::sets]] == ["sequences 0..1", "sequences 2..2"]
    spec = layer.kernel_spec(torch.float16, 3)
    assert (spec.batch, spec.step_batch, spec.clusters, spec.uneven) == (2, 3, 2 * spec.part_clusters, True)
    with pytest.raises(ValueError, match=r"batch_parts must leave each set of clusters at least one of the batch's 3 "
                                         r"sequences .*: one of \[1, 2, 3\], got 4"):
        DecodeAttention(config, weights, kernel_options={"batch_parts": 4})(
            hidden[:3], residual[:3], KVCache.random(config, 3, 300, torch.float16), 5)
    with pytest.raises(ValueError, match=r"kernel_options: batch_parts=9; allowed: None or an int from 1 to 8"):
        DecodeAttention(config, weights, kernel_options={"batch_parts": 9})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_layer_takes_the_long_cache_shape_where_the_host_says_how_long(monkeypatch, dtype):
    """``longest`` (or an int position) picks the launch shape and nothing else: a tiny GQA layer on
    the simulator, LONG_CACHE lowered to its cache, runs head split 4 below it and one cluster a KV
    head from it, each matching the reference. (The shared split that the rule takes for so few KV
    heads at long caches, ``plan.shares_queries``, is switched off.)"""
    monkeypatch.setattr(plan, "LONG_CACHE", (64,) * len(plan.LONG_CACHE))
    monkeypatch.setattr(plan, "SHARED_QUERIES_FROM", plan.MAX_BATCH + 1)
    config, batch = CASES[3][0], 2
    weights = AttentionWeights.random(config, dtype, seed=7)
    layer = DecodeAttention(config, weights)
    assert layer.shape(batch) == layer.shape(batch, 63) == (16, 8, 4)
    assert layer.shape(batch, 64) == (16, 8, 1)
    positions = torch.tensor([70, 5], dtype=torch.int32)
    for given, shape in ((None, (16, 8, 4)), (71, (16, 8, 1)), (80, (16, 8, 1)), (1, (16, 8, 4))):
        cache = KVCache.random(config, batch, 80, dtype, seed=8)
        hidden, residual = torch.randn(2, batch, config.hidden_size).to(dtype)
        want = reference_step(config, weights, hidden, residual, cache.clone(), positions)
        out = torch.full_like(hidden, float("nan"))
        layer(hidden, residual, cache, positions, out=out, longest=given)
        assert relative_error(out, want.out) < TOLERANCE[dtype], given
        assert layer.shape(batch, given) == shape
    assert {key[2] for key in layer._specs} == {(16, 8, 4), (16, 8, 1)}  # both kernels were planned


def test_the_rule_splits_an_even_batch_over_two_sets_at_long_caches(monkeypatch):
    """From a batch of 4 at long caches (LONG_CACHE lowered to a tiny layer's cache) the layer's
    step runs on two sets of clusters, each its half of a ragged batch, matching the reference;
    ``kernel_options={"batch_parts": 1}`` keeps one set, a batch of 3 has one. (The shared split that
    the rule takes for so few KV heads at long caches, ``plan.shares_queries``, is switched off.)"""
    monkeypatch.setattr(plan, "LONG_CACHE", (64,) * len(plan.LONG_CACHE))
    monkeypatch.setattr(plan, "SHARED_QUERIES_FROM", plan.MAX_BATCH + 1)
    config, batch = CASES[3][0], 4
    weights = AttentionWeights.random(config, torch.float16, seed=9)
    layer = DecodeAttention(config, weights)
    assert (layer.batch_parts(batch), layer.batch_parts(batch, 63), layer.batch_parts(batch, 64)) == (1, 1, 2)
    assert layer.batch_parts(3, 64) == 1 and layer.batch_parts(8, 64) == 2
    assert DecodeAttention(config, weights, kernel_options={"batch_parts": 1}).batch_parts(batch, 64) == 1
    positions = torch.tensor([70, 0, 33, 64], dtype=torch.int32)
    cache = KVCache.random(config, batch, 80, torch.float16, seed=10)
    hidden, residual = torch.randn(2, batch, config.hidden_size).half()
    want = reference_step(config, weights, hidden, residual, cache.clone(), positions)
    out = torch.full_like(hidden, float("nan"))
    layer(hidden, residual, cache, positions, out=out, longest=71)
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]
    assert [spec.batch_parts for spec in layer._specs.values()] == [2]


def test_a_step_plans_its_launch_shape_once(monkeypatch):
    """The launch rule runs once a step, plain or handed off (the spec and the kernel are looked up
    by its shape), and the step still matches the reference."""
    config, batch, dtype = CASES[3][0], 2, torch.float16
    layer = DecodeAttention(config, AttentionWeights.random(config, dtype, seed=5))
    calls = []
    monkeypatch.setattr("clusterlab.fused.layer.launch_shape",
                        lambda *args, **kw: calls.append(args) or launch_shape(*args, **kw))
    cache = KVCache.random(config, batch, 40, dtype, seed=6)
    hidden, residual = torch.randn(2, batch, config.hidden_size).to(dtype)
    want = reference_step(config, layer.weights, hidden, residual, cache.clone(), 30)
    out, _ = layer(hidden, residual, cache, 30)
    assert len(calls) == 1 and relative_error(out, want.out) < TOLERANCE[dtype]
    sums = torch.stack([hidden.float(), torch.zeros_like(hidden, dtype=torch.float32)])
    clear = torch.randn_like(sums[0])
    layer.handoff(sums[0], residual, cache, 30, sums_out=sums[1], clear=clear)
    assert len(calls) == 2 and relative_error(sums[1], want.out) < TOLERANCE[dtype] and not clear.any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch_parts", [1, 2])
def test_the_work_queue_gives_the_same_step_whoever_takes_the_chunks(seed, batch_parts):
    """``work_queue`` on the simulator: each draw of :func:`queue_claims` hands a sequence's chunks
    to its cluster's blocks in another split and to other clusters' runs (states in device memory);
    a cache of no row, one row, a chunk and a row more, and 5 chunks and a row: the step is the
    reference's whatever the order, and every draw gave some chunks to other clusters' runs and left
    some block of a cluster without a chunk (what the merge must take as it comes)."""
    config, cluster_size, rows = CASES[0][0], 4, 64
    batch = 4
    positions = torch.tensor([0, 1, rows + 1, 5 * rows + 1], dtype=torch.int32)
    weights = AttentionWeights.random(config, torch.float16, seed=seed)
    cache = KVCache.random(config, batch, 400, torch.float16, seed=seed + 1)
    before = cache.clone()
    hidden, residual = torch.randn(2, batch, config.hidden_size, generator=torch.Generator().manual_seed(seed)).half()
    want = reference_step(config, weights, hidden, residual, before, positions)
    out, _ = simulated_step(config, weights, hidden, residual, cache, positions, cluster_size, batch_parts=batch_parts,
                            work_queue=True, queue_rows=rows, claim_seed=seed)
    assert relative_error(out, want.out) < TOLERANCE[torch.float16]
    rows_of = torch.arange(batch)
    assert relative_error(cache.k[rows_of, :, positions.long()], want.k) < TOLERANCE[torch.float16]
    claims = [queue_claims(positions.tolist(), cluster_size, rows, seed * config.kv_heads + g)
              for g in range(config.kv_heads)]
    assert any(claim["runs"] for per_head in claims for claim in per_head)
    assert any(not own for per_head in claims for claim in per_head[2:] for own in claim["own"])


def test_the_work_queue_claims_every_chunk_once():
    """:func:`queue_claims`: every chunk of every sequence exactly once, in at most ``QUEUE_SLOTS``
    runs of other clusters, none of them empty."""
    positions = [0, 1, 64, 65, 64 * 40 + 3]
    for seed in range(20):
        for cached, claim in zip(positions, queue_claims(positions, 4, 64, seed)):
            taken = sorted(int(k) for chunks in claim["own"] + claim["runs"] for k in chunks)
            assert taken == list(range(-(-cached // 64)))
            assert len(claim["runs"]) <= plan.QUEUE_SLOTS and all(claim["runs"])


def test_the_layer_runs_the_work_queue_on_the_simulator_and_refuses_a_head_split():
    """``kernel_options={"work_queue": True}`` reaches the simulator backend; a head split, or positions split, is
    refused by name, by the kernel's spec and by the simulator alike."""
    config, cluster_size, batch, _ = CASES[3]
    weights = AttentionWeights.random(config, torch.float16, seed=5)
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=1,
                            kernel_options={"work_queue": True, "queue_rows": 64})
    assert layer.kernel_spec(torch.float16, batch).queue_rows == 64
    hidden, residual, cache, positions = _step_matches_reference(layer, batch)
    split = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=2, kernel_options={"work_queue": True})
    refusal = "work_queue takes a cluster a KV head .head_split 1, no split_positions., got head_split"
    with pytest.raises(ValueError, match=f"{refusal} 2, split_positions False"):
        split(hidden, residual, cache, positions)
    positions_split = DecodeAttention(config, weights, cluster_size=cluster_size, head_split=1,
                                      kernel_options={"work_queue": True, "split_positions": True})
    with pytest.raises(ValueError, match=f"{refusal} 1, split_positions True"):
        positions_split(hidden, residual, cache, positions)
    with pytest.raises(ValueError, match=f"{refusal} 1, split_positions True"):
        simulated_step(config, weights, hidden, residual, cache, positions, cluster_size, split_positions=True,
                       work_queue=True)
    with pytest.raises(ValueError, match="queue_rows=100; allowed: an int, a multiple of 64 from 64 to 4096"):
        DecodeAttention(config, weights, kernel_options={"work_queue": True, "queue_rows": 100})
