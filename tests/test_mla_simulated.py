"""The MLA decode step's cluster dataflow on the DSMEM simulator (CPU): same answers as the float64 reference."""

import inspect
import re
import types

import pytest
import torch
from mla_shapes import SMALL, V2_YARN, shrunk
from rounding import STEP_TOLERANCE as TOLERANCE  # by dtype: how far a 16-bit step may lie from float64

from clusterlab import simulator
from clusterlab.fused import mla_simulated
from clusterlab.fused.mla import LatentCache, MLAConfig, MLAWeights
from clusterlab.fused.mla_reference import mla_reference_step
from clusterlab.fused.mla_simulated import simulated_mla_step
from clusterlab.fused.plan import attention_range, kv_a_rows, latent_columns, new_row_block, q_a_rows
from clusterlab.fused.reference import relative_error

CONFIGS = {
    "plain": MLAConfig(**SMALL),
    "yarn": MLAConfig(**SMALL, rope_scaling=V2_YARN),
    "rotate-half-yarn": MLAConfig(**SMALL, rope_interleaved=False, rope_scaling=V2_YARN, rope_theta=500.0),
    # odd shapes: 3 heads, a latent row (40 + 8) that the heads split unevenly in phase 1
    "odd": MLAConfig(hidden_size=64, heads=3, kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     v_head_dim=24),
    # the query LoRA (DeepSeek-V2/V3): q_a_proj's rows split over the heads, here evenly and not (20 = 7 + 7 + 6)
    "yarn-q-lora": MLAConfig(**SMALL, q_lora_rank=48, rope_scaling=V2_YARN),
    "odd-q-lora": MLAConfig(hidden_size=64, heads=3, kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
                            v_head_dim=24, q_lora_rank=20),
}
#: batch 1, and a ragged batch of 3: an empty cache beside longer ones (200 spreads over many blocks).
POSITIONS = [[7], [0, 45, 200]]


def run_step(config, dtype, positions, cluster_size, clusters_for_attention=None, seed=0, attention_cluster_size=None):
    batch = len(positions)
    weights = MLAWeights.random(config, dtype, seed=seed)
    cache = LatentCache.random(config, batch, max(positions) + 3, dtype, seed=seed + 1)
    before = cache.clone()
    gen = torch.Generator().manual_seed(seed + 2)
    hidden, residual = torch.randn(2, batch, config.hidden_size, generator=gen).to(dtype)
    want = mla_reference_step(config, weights, hidden, residual, before, positions)
    traces = []
    out, new_residual = simulated_mla_step(config, weights, hidden, residual, cache, positions, cluster_size,
                                           clusters_for_attention=clusters_for_attention, traces=traces,
                                           attention_cluster_size=attention_cluster_size)
    return out, new_residual, cache, before, hidden, residual, want, traces


def check_step(config, dtype, positions, cluster_size, clusters_for_attention=None, attention_cluster_size=None):
    out, new_residual, cache, before, hidden, residual, want, traces = run_step(
        config, dtype, positions, cluster_size, clusters_for_attention, attention_cluster_size=attention_cluster_size)
    batch = len(positions)
    assert out.dtype == dtype and new_residual.dtype == dtype
    assert relative_error(out, want.out) < TOLERANCE[dtype]
    # the new residual is hidden + residual in float32, rounded once: bit for bit
    assert torch.equal(new_residual, (hidden.float() + residual.float()).to(dtype))
    rows, pos = torch.arange(batch), torch.tensor(positions)
    assert relative_error(cache.latent[rows, pos], want.latent) < TOLERANCE[dtype]
    kept = torch.ones(batch, cache.capacity, dtype=torch.bool)
    kept[rows, pos] = False
    assert torch.equal(cache.latent[kept].view(torch.int16), before.latent[kept].view(torch.int16))
    # one trace a cluster a launch; the simulator raised on any hazard, so every one is hazard-free
    clusters = config.heads if clusters_for_attention is None else clusters_for_attention
    head_launches = 2 if config.q_lora_rank is None else 3  # projections (query), output
    assert len(traces) == head_launches * config.heads + clusters * batch  # attention: clusters a sequence
    return traces


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cluster_size", [1, 2, 4])
@pytest.mark.parametrize("positions", POSITIONS, ids=["batch1", "batch3"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_simulated_mla_step_matches_reference(name, positions, cluster_size, dtype):
    check_step(CONFIGS[name], dtype, positions, cluster_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["yarn", "yarn-q-lora"])
def test_a_step_of_small_inputs_and_latents_keeps_every_norm_s_epsilon(name, dtype):
    """Inputs and down-projections shrunk to put each RMSNorm's mean square near its epsilon (the
    input's, the latent's and, with the query LoRA, the query's): the step is still the reference's."""
    config, positions = CONFIGS[name], [0, 45, 200]
    weights = MLAWeights.random(config, dtype)
    cache = LatentCache.random(config, len(positions), max(positions) + 3, dtype)
    hidden, residual = torch.randn(2, len(positions), config.hidden_size).to(dtype)
    weights, hidden, residual = shrunk(weights, hidden, residual, 1e-3)
    want = mla_reference_step(config, weights, hidden, residual, cache.clone(), positions)
    out, _ = simulated_mla_step(config, weights, hidden, residual, cache, positions, 2)
    assert relative_error(out, want.out) < TOLERANCE[dtype]
    assert relative_error(cache.latent[torch.arange(len(positions)), positions], want.latent) < TOLERANCE[dtype]


@pytest.mark.parametrize("clusters_for_attention", [1, 3, 8])
def test_attention_grid_independent_of_the_heads(clusters_for_attention):
    check_step(CONFIGS["yarn"], torch.float16, [0, 45, 200], 2, clusters_for_attention)


@pytest.mark.parametrize("attention_cluster_size", [1, 4, 8])
def test_attention_clusters_of_their_own_size(attention_cluster_size):
    """Launch 2's clusters of another size than launches 1 and 3's (2): the same step, each attention
    cluster's trace with that many blocks."""
    traces = check_step(CONFIGS["yarn"], torch.float16, [0, 45, 200], 2, 3, attention_cluster_size)
    heads = CONFIGS["yarn"].heads
    assert {trace.cluster_size for trace in traces[heads:-heads]} == {attention_cluster_size}
    assert {trace.cluster_size for trace in traces[:heads] + traces[-heads:]} == {2}


def test_attention_clusters_need_only_split_the_latent():
    """Launch 2's clusters split only ``kv_lora_rank``: clusters of 5 run it under launches of 2 at a
    shape (hidden 64, latent 40, query LoRA 20) whose other launches could not take 5."""
    config = CONFIGS["odd-q-lora"]
    check_step(config, torch.float16, [0, 45, 200], 2, 3, 5)
    with pytest.raises(ValueError, match="cluster_size 5 does not divide hidden_size 64"):
        run_step(config, torch.float16, [7], 5, attention_cluster_size=5)


@pytest.mark.parametrize("name", ["plain", "yarn-q-lora"])
def test_traces_show_the_phases_and_their_barriers(name):
    config = CONFIGS[name]
    traces = check_step(config, torch.float16, [0, 45, 200], 4)
    heads = config.heads
    if config.q_lora_rank is None:
        launches = [(traces[:heads], ("1 projections", "2 absorb"), 2)]
    else:  # the query in a launch of its own
        launches = [(traces[:heads], ("1 projections",), 2), (traces[heads: 2 * heads], ("1b query", "2 absorb"), 2)]
    attention, output = traces[len(launches) * heads: -heads], traces[-heads:]
    assert len(attention) == heads * 3  # clusters a sequence (default: heads) x batch
    for group, steps, barriers in launches + [(attention, ("3 attention",), 2), (output, ("4 output",), 2)]:
        for trace in group:
            table = trace.phase_table()
            assert all(step in table for step in steps), table
            assert f"{barriers} cluster barriers" in table, table
            assert any("shared::cluster" in line for line in table.splitlines()), table


def test_phase_headers_follow_the_design():
    lines = "".join(inspect.getsource(f) for f in (
        mla_simulated.projections_block, mla_simulated.query_block, mla_simulated.absorb,
        mla_simulated.attention_block, mla_simulated.output_block, mla_simulated.simulated_mla_step)).splitlines()
    headers = [line.strip().removeprefix("# -- ").split(":")[0] for line in lines if line.strip().startswith("# -- ")]
    assert headers == ["1 projections", "1b query", "2 absorb", "3 attention", "4 output", "5 finish"]


BARRIER_LINES = [i for i, line in enumerate(inspect.getsource(mla_simulated).splitlines())
                 if "yield b.cluster_sync()" in line]


@pytest.mark.parametrize("line", BARRIER_LINES)
def test_every_cluster_barrier_is_needed(line):
    """The module with one ``yield b.cluster_sync()`` left out: the simulator reports a hazard (with the
    query LoRA or without, whichever runs that barrier)."""
    lines = inspect.getsource(mla_simulated).splitlines()
    # `yield from ()` keeps a generator with a single barrier a generator, barrier-free
    lines[line] = re.sub(r"yield b\.cluster_sync\(\).*", "yield from ()", lines[line])
    mutant = types.ModuleType("clusterlab.fused._mla_simulated_mutant")
    mutant.__package__ = "clusterlab.fused"
    exec(compile("\n".join(lines), "mla_simulated_mutant", "exec"), mutant.__dict__)  # noqa: S102 (our own source)
    hazards = []
    for name in ("plain", "yarn-q-lora"):
        config = CONFIGS[name]
        weights = MLAWeights.random(config, torch.float16, seed=0)
        cache = LatentCache.random(config, 3, 203, torch.float16, seed=1)
        hidden, residual = torch.randn(2, 3, config.hidden_size).half()
        try:
            mutant.simulated_mla_step(config, weights, hidden, residual, cache, [0, 45, 200], 4)
        except simulator.Hazard as hazard:
            hazards.append((name, hazard))
    assert hazards


def test_bad_cluster_shapes_are_refused():
    config = CONFIGS["odd"]  # hidden 64
    weights = MLAWeights.random(config, torch.float16, seed=0)
    cache = LatentCache.random(config, 1, 8, torch.float16, seed=1)
    hidden, residual = torch.randn(2, 1, config.hidden_size).half()
    with pytest.raises(ValueError, match="cluster_size"):
        simulated_mla_step(config, weights, hidden, residual, cache, 3, 3)
    with pytest.raises(ValueError, match="clusters_for_attention"):
        simulated_mla_step(config, weights, hidden, residual, cache, 3, 2, clusters_for_attention=0)
    with pytest.raises(ValueError, match="attention_cluster_size must be an int in 1..16, got 32"):
        simulated_mla_step(config, weights, hidden, residual, cache, 3, 2, attention_cluster_size=32)
    with pytest.raises(ValueError, match="attention_cluster_size 3 does not divide kv_lora_rank 40"):
        simulated_mla_step(config, weights, hidden, residual, cache, 3, 2, attention_cluster_size=3)
    config = CONFIGS["odd-q-lora"]  # q_lora_rank 20: phase 1b's slices need a cluster size dividing it
    weights = MLAWeights.random(config, torch.float16, seed=0)
    with pytest.raises(ValueError, match="cluster_size 8 does not divide q_lora_rank 20"):
        simulated_mla_step(config, weights, hidden, residual, cache, 3, 8)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_plan_covers_every_row_and_position_once(config):
    rows = [i for c in range(config.heads) for i in range(*kv_a_rows(config, c))]
    assert rows == list(range(config.latent_width))
    if config.q_lora_rank is not None:
        rows = [i for c in range(config.heads) for i in range(*q_a_rows(config, c))]
        assert rows == list(range(config.q_lora_rank))
    for size in (1, 2, 4):
        assert [i for k in range(size) for i in range(*latent_columns(config, k, size))] == list(
            range(config.kv_lora_rank))
    for cached in (0, 1, 17, 200):
        for clusters, size in ((1, 1), (3, 2), (4, 4)):
            seen = [t for c in range(clusters) for k in range(size)
                    for t in range(*attention_range(cached, c, k, clusters, size))]
            assert seen == list(range(cached))
            cluster, rank = new_row_block(clusters, size)
            assert 0 <= cluster < clusters and 0 <= rank < size
