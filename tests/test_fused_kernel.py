"""The fused kernel: PTX that ptxas accepts (no GPU), and correct steps on a Hopper GPU."""

import pytest
import torch

from clusterlab.fused import (
    LLAMA2_7B,
    LLAMA3_8B,
    AttentionConfig,
    AttentionWeights,
    DecodeAttention,
    KVCache,
)
from clusterlab.fused.kernel import KernelSpec, build_kernel, kernel_signature
from clusterlab.fused.plan import launch_shape
from clusterlab.fused.reference import reference_step, relative_error

# Contract of the layer: ‖out − ref‖/‖ref‖ ≤ 1e-2 for float16 and bfloat16 (bfloat16 rounds each
# stored value by up to 2^-9 relative; the kernel accumulates in float32).
TOLERANCE = 1e-2


@pytest.mark.ptx
@pytest.mark.parametrize(
    "config, bf16, batch, cluster_size, warps, head_split",
    [(LLAMA2_7B, False, 1, 8, 4, 1), (LLAMA2_7B, True, 4, 8, 4, 1), (LLAMA2_7B, True, 8, 4, 8, 1),
     (LLAMA3_8B, False, 1, 16, 4, 2), (LLAMA3_8B, True, 4, 16, 4, 2), (LLAMA3_8B, False, 3, 16, 4, 2),
     (LLAMA3_8B, False, 8, 16, 8, 1)],
    ids=["llama2-7b-f16-b1", "llama2-7b-bf16-b4", "llama2-7b-bf16-b8", "llama3-8b-f16-b1", "llama3-8b-bf16-b4",
         "llama3-8b-f16-b3", "llama3-8b-f16-b8"],
)
def test_kernel_assembles_for_sm90a_with_wide_loads_and_no_spills(config, bf16, batch, cluster_size, warps, head_split):
    from clusterlab.toolchain import assemble, kernel_ptx

    assert launch_shape(config, batch, 132) == (cluster_size, warps, head_split)  # what an H100 runs
    spec = KernelSpec.of(config, bf16, batch, cluster_size, warps, head_split)
    ptx = kernel_ptx(build_kernel(spec), kernel_signature(), launch_bounds=(spec.threads, spec.min_blocks_per_sm))
    for instruction in ("mapa.shared::cluster.u32", "ld.shared::cluster.f32", "st.shared::cluster.f32",
                        "barrier.cluster.arrive.release", "barrier.cluster.wait.acquire",
                        "ld.global.nc.L1::no_allocate.L2::256B.v4.b32", "atom.global.add.f32"):
        assert instruction in ptx, instruction
    assert "st.local" not in ptx  # every register array was indexed by constants
    result = assemble(ptx)
    assert result.spill_bytes == 0
    # The register file (64K) holds the blocks the launch bound asks for: 16 warps an SM at 128
    # registers, unless shared memory allows fewer blocks (8 sequences of GQA states: one).
    assert result.registers * spec.threads * spec.min_blocks_per_sm <= 65536
    assert spec.min_blocks_per_sm * warps == 16 or 2 * spec.shared_bytes > 226 * 1024


def _random_inputs(config, dtype, batch, capacity, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    residual = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    return hidden, residual, KVCache.random(config, batch, capacity, dtype, "cuda", seed=seed + 1)


def _check_steps(layer, dtype, batch, positions, seed=0):
    """Each position on fresh inputs: NaN-poisoned outputs fully written, cache row appended, others kept."""
    config = layer.config
    for i, position in enumerate(positions):
        hidden, residual, cache = _random_inputs(config, dtype, batch, position + 3, seed + 10 * i)
        before = cache.clone()
        want = reference_step(config, layer.weights, hidden, residual, before, position)
        out = torch.full_like(hidden, float("nan"))
        new_residual = torch.full_like(hidden, float("nan"))
        layer(hidden, residual, cache, position, out=out, residual_out=new_residual)
        torch.cuda.synchronize()
        where = f"position {position}, batch {batch}, {dtype}"
        assert relative_error(out, want.out) < TOLERANCE, where
        assert relative_error(new_residual, want.residual) < TOLERANCE, where
        assert relative_error(cache.k[:, :, position], want.k) < TOLERANCE, where
        assert relative_error(cache.v[:, :, position], want.v) < TOLERANCE, where
        others = torch.arange(cache.capacity, device="cuda") != position
        assert torch.equal(cache.k[:, :, others].view(torch.int16), before.k[:, :, others].view(torch.int16)), where
        assert torch.equal(cache.v[:, :, others].view(torch.int16), before.v[:, :, others].view(torch.int16)), where
        assert not layer._out_acc.any() and not layer._arrivals.any(), "workspace not left zero"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("preset", [LLAMA2_7B, LLAMA3_8B], ids=["llama2-7b", "llama3-8b"])
def test_presets_match_reference(preset, dtype, batch):
    weights = AttentionWeights.random(preset, dtype, "cuda", seed=batch)
    layer = DecodeAttention(preset, weights)
    # Empty cache, one row, lengths that are no multiple of any tile, and 32K.
    _check_steps(layer, dtype, batch, [0, 1, 1000, 4097, 32767 if batch == 1 else 16383])


SMALL = {
    "gqa-d64-gptj-c16": AttentionConfig(hidden_size=512, heads=8, kv_heads=2, head_dim=64, rope_style="gptj"),
    "mha-d128": AttentionConfig(hidden_size=1024, heads=4, kv_heads=4, head_dim=128),
    "mha-d64-c1": AttentionConfig(hidden_size=256, heads=4, kv_heads=4, head_dim=64),
}


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, cluster_size, warps, head_split, batch",
    [(name, c, None, 1, batch) for name, c in (("gqa-d64-gptj-c16", 16), ("mha-d128", 2), ("mha-d64-c1", 1))
     for batch in (1, 3, 8)]
    + [("mha-d128", 8, 4, 1, 1), ("mha-d128", 8, 4, 1, 3), ("mha-d128", 4, 16, 1, 8)]
    + [("gqa-d64-gptj-c16", 4, None, s, batch) for s in (2, 4) for batch in (1, 3)],
    ids=lambda v: v if isinstance(v, str) else f"{v}",
)
def test_small_shapes_cluster_sizes_warps_and_head_splits(name, cluster_size, warps, head_split, batch):
    weights = AttentionWeights.random(SMALL[name], torch.bfloat16, "cuda", seed=7)
    layer = DecodeAttention(SMALL[name], weights, cluster_size=cluster_size, warps=warps, head_split=head_split)
    _check_steps(layer, torch.bfloat16, batch, [0, 17, 300])


@pytest.mark.gpu
def test_step_replays_in_a_cuda_graph():
    config = AttentionConfig(hidden_size=1024, heads=8, kv_heads=8, head_dim=128)
    weights = AttentionWeights.random(config, torch.float16, "cuda", seed=3)
    layer = DecodeAttention(config, weights)
    hidden, residual, cache = _random_inputs(config, torch.float16, 2, 600, seed=5)
    want = reference_step(config, weights, hidden, residual, cache.clone(), 555)
    layer(hidden, residual, cache, 555)  # compile outside the capture
    out = torch.full_like(hidden, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(hidden, residual, cache, 555, out=out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, want.out) < TOLERANCE
