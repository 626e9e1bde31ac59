"""The MLA kernels: PTX that ptxas accepts (no GPU), the layer on the simulator (CPU), and correct
steps on a Hopper GPU against the float64 reference."""

import pytest
import torch

from clusterlab.fused import DEEPSEEK_V2_LITE, DecodeMLA, LatentCache, MLAConfig, MLAWeights, mla_reference_step
from clusterlab.fused.mla_kernel import (
    MLASpec,
    build_attention_kernel,
    build_output_kernel,
    build_projections_kernel,
    build_step_kernel,
    mla_kernel_signatures,
)
from clusterlab.fused.mla_layer import WIDE_FROM_ROWS
from clusterlab.fused.reference import relative_error

# The layer's contract, as the Llama block's: outputs rounded once to float16 / bfloat16 on top of
# float32 arithmetic (the references land near 2e-4 / 2e-3).
TOLERANCE = 1e-2
#: A small shape the kernels take: 8 heads, a latent of 256 + 64 (40 rows a projection cluster).
SMALL = MLAConfig(hidden_size=512, heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64,
                  v_head_dim=64)
SMALL_HALF = MLAConfig(hidden_size=512, heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64, rope_interleaved=False, rope_scaling=DEEPSEEK_V2_LITE.rope_scaling)
KERNELS = {"projections": build_projections_kernel, "attention": build_attention_kernel,
           "output": build_output_kernel}


# No kernel spills at the 128-register launch bound with the test extra's ptxas (CUDA 13).
@pytest.mark.ptx
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(
    "config, bf16, batch, cluster_size, warps",
    [(DEEPSEEK_V2_LITE, False, 1, 8, 8), (DEEPSEEK_V2_LITE, True, 4, 8, 8), (DEEPSEEK_V2_LITE, False, 8, 8, 8),
     (DEEPSEEK_V2_LITE, True, 2, 8, 4), (SMALL, True, 5, 4, 8), (SMALL_HALF, False, 3, 2, 4)],
    ids=["v2-lite-f16-b1", "v2-lite-bf16-b4", "v2-lite-f16-b8", "v2-lite-bf16-b2-w4", "small-bf16-b5",
         "small-rotate-half-f16-b3"],
)
def test_kernels_assemble_for_sm90a(kernel, config, bf16, batch, cluster_size, warps):
    from clusterlab.toolchain import assemble, kernel_ptx

    spec = MLASpec.of(config, bf16, batch, cluster_size, config.heads, warps)
    signature = mla_kernel_signatures()[kernel]
    ptx = kernel_ptx(KERNELS[kernel](spec), signature, launch_bounds=spec.launch_bounds(kernel))
    for instruction in ("ld.shared::cluster.v4.f32", "barrier.cluster.arrive.release", "barrier.cluster.wait.acquire"):
        assert instruction in ptx, instruction
    gathers = {"projections": True, "attention": False, "output": True}[kernel]  # q_nope, o into every block
    assert ("st.shared::cluster.v4.f32" in ptx) == gathers
    assert ("atom.global.add.f32" in ptx) == (kernel == "output")
    assert ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx) == (kernel == "attention")  # the ring
    if kernel == "attention":  # scores and values on the tensor cores, the rows' halves paired by prmt
        assert "mma.sync.aligned.m16n8k16.row.col.f32" in ptx and "prmt.b32" in ptx
    if kernel == "projections":  # on the tensor cores from two sequences on, the kv_a rows padded to 16-row steps
        assert ("mma.sync.aligned.m16n8k16.row.col.f32" in ptx) == (batch >= 2)
        assert spec.slots == spec.q_width + (48 if batch >= 2 else spec.kv_rows)  # 36 or 40 rows padded to 48
    assert "st.local" not in ptx  # every register array indexed by constants
    assert ".f64" not in ptx  # no float64: numba types uint64 with int64 as float64, so unsigned indices stay uint32
    assert assemble(ptx).spill_bytes == 0


@pytest.mark.ptx
@pytest.mark.parametrize("attention_clusters", [15, 28])
def test_launch_3_has_a_group_of_states_in_flight_at_once(attention_clusters):
    """Launch 3 merges a head's ``A`` states ``MERGE_GROUP_STATES`` at a time, a group's loads in registers
    before any is used: the group's loop unrolled (one ``ex2`` a state of a group, one for the rescale between
    groups) and no local memory. With each state loaded where it was used, LLVM unrolled the loop three times
    and the merge waited for a round trip every three states."""
    from clusterlab.fused.mla_kernel import MERGE_GROUP_STATES
    from clusterlab.toolchain import kernel_ptx

    spec = MLASpec.of(DEEPSEEK_V2_LITE, False, 1, 8, attention_clusters, 8)
    ptx = kernel_ptx(build_output_kernel(spec), mla_kernel_signatures()["output"],
                     launch_bounds=spec.launch_bounds("output"))
    assert ptx.count("ex2.approx") == min(attention_clusters, MERGE_GROUP_STATES) + 1
    assert "ld.local" not in ptx and "st.local" not in ptx


# One launch a step: every role's instructions in one kernel, the tickets and counters as atomics on device
# memory. Its registers are the largest role's; no spill under the 128-register bound with the test extra's
# ptxas (CUDA 13) since launch 3 merges its states in groups (at batch 1 the roles together spilled 96 bytes
# before).
@pytest.mark.ptx
@pytest.mark.parametrize(
    "config, bf16, batch, cluster_size, attention_clusters, warps",
    [(DEEPSEEK_V2_LITE, False, 1, 8, 16, 8), (DEEPSEEK_V2_LITE, True, 4, 8, 4, 8),
     (DEEPSEEK_V2_LITE, False, 8, 8, 3, 8), (SMALL_HALF, False, 3, 2, 5, 4)],
    ids=["v2-lite-f16-b1", "v2-lite-bf16-b4", "v2-lite-f16-b8", "small-rotate-half-f16-b3"],
)
def test_the_one_launch_kernel_assembles_for_sm90a(config, bf16, batch, cluster_size, attention_clusters, warps):
    from clusterlab.toolchain import assemble, kernel_ptx

    spec = MLASpec.of(config, bf16, batch, cluster_size, attention_clusters, warps)
    ptx = kernel_ptx(build_step_kernel(spec), mla_kernel_signatures()["step"], launch_bounds=spec.launch_bounds("step"))
    for instruction in ("st.shared::cluster.v4.f32", "atom.global.add.f32", "mma.sync.aligned.m16n8k16.row.col.f32",
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes", "atom.global.add.u32",
                        "membar.gl", "trap;"):  # trap: a role's wait for another's count fails, never hangs
        assert instruction in ptx, instruction
    assert "st.local" not in ptx  # every register array indexed by constants
    assert ".f64" not in ptx
    assert assemble(ptx).spill_bytes == 0
    roles = ("projections", "attention", "output")
    assert spec.shared_words("step") == max(spec.shared_words(k) for k in roles)
    assert spec.launch_bounds("step") == (spec.threads, min(spec.launch_bounds(k)[1] for k in roles))
    assert spec.step_clusters == 2 * config.heads + attention_clusters * batch


def test_one_launch_needs_launch_2s_warps():
    weights = MLAWeights.random(SMALL, torch.float16)
    one = {"one_launch": True}
    with pytest.raises(ValueError, match=r"one_launch needs warps=4 \(launch 2's: kv_lora_rank / 64\), got warps=8"):
        DecodeMLA(SMALL, weights, kernel_options=one)
    with pytest.raises(ValueError, match="kernel_options: one_launch='yes'; allowed: True or False"):
        DecodeMLA(SMALL, weights, kernel_options={"one_launch": "yes"})
    with pytest.raises(ValueError, match="kernel_options: unknown name 'registers'; allowed: one_launch, "
                                         "attention_cluster_size"):
        DecodeMLA(SMALL, weights, kernel_options={"registers": 168})
    spec = MLASpec.of(SMALL, False, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="one_launch needs warps=4"):
        build_step_kernel(spec)
    assert DecodeMLA(SMALL, weights, warps=4, kernel_options=one).one_launch
    assert not DecodeMLA(SMALL, weights).one_launch


@pytest.mark.ptx
@pytest.mark.parametrize("cluster_size, attention_cluster_size", [(8, 4), (8, 16), (4, 1)])
def test_launch_2_takes_a_cluster_size_of_its_own(cluster_size, attention_cluster_size):
    """Launch 2's clusters need not be launches 1 and 3's: each block of its cluster owns R / its size
    columns of the merged state, and the launches are built and launched with their own sizes."""
    from clusterlab.toolchain import assemble, kernel_ptx, without_names

    spec = MLASpec.of(DEEPSEEK_V2_LITE, False, 8, cluster_size, 7, 8, attention_cluster_size=attention_cluster_size)
    assert [spec.cluster_blocks(k) for k in ("projections", "attention", "output", "step")] == [
        cluster_size, attention_cluster_size, cluster_size, cluster_size]
    assert (spec.cols, spec.attention_cols) == (512 // cluster_size, 512 // attention_cluster_size)
    signature = mla_kernel_signatures()["attention"]
    ptx = kernel_ptx(build_attention_kernel(spec), signature, launch_bounds=spec.launch_bounds("attention"))
    same = MLASpec.of(DEEPSEEK_V2_LITE, False, 8, attention_cluster_size, 7, 8)  # the merge depends on launch 2's size
    assert without_names(ptx) == without_names(
        kernel_ptx(build_attention_kernel(same), signature, launch_bounds=same.launch_bounds("attention")))
    assert "st.local" not in ptx
    assert assemble(ptx).spill_bytes == 0
    assert MLASpec.of(DEEPSEEK_V2_LITE, False, 8, cluster_size, 7, 8).attention_cluster_size == cluster_size


def test_launch_2s_cluster_size_is_checked_before_any_launch():
    weights = MLAWeights.random(SMALL, torch.float16)
    with pytest.raises(ValueError, match=r"attention_cluster_size must be one of \(1, 2, 4, 8, 16\), got 3"):
        MLASpec.of(SMALL, False, 1, 4, 8, 8, attention_cluster_size=3)
    for bad in (3, True, 4.0, "4"):
        with pytest.raises(ValueError, match=f"kernel_options: attention_cluster_size={bad!r}; allowed: None or one "
                                             r"of \(1, 2, 4, 8, 16\)"):
            DecodeMLA(SMALL, weights, kernel_options={"attention_cluster_size": bad})
    one = {"one_launch": True, "attention_cluster_size": 4}
    with pytest.raises(ValueError, match=r"one_launch needs attention_cluster_size=8 \(the cluster_size of the grid's "
                                         r"other roles\), got attention_cluster_size=4"):
        DecodeMLA(SMALL, weights, warps=4, kernel_options=one)
    assert DecodeMLA(SMALL, weights, cluster_size=4, warps=4, kernel_options=one).one_launch
    with pytest.raises(ValueError, match="one_launch needs attention_cluster_size=8"):
        build_step_kernel(MLASpec.of(SMALL, False, 1, 8, 8, 4, attention_cluster_size=2))


def test_specs_refuse_what_the_kernels_do_not_take():
    with pytest.raises(ValueError, match="no query LoRA yet"):
        MLASpec.of(MLAConfig(**{**vars(SMALL), "q_lora_rank": 64}), False, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="kv_lora_rank 64 must be 256 or 512"):
        MLASpec.of(MLAConfig(hidden_size=256, heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
                             v_head_dim=32), False, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="cluster_size must be one of"):
        MLASpec.of(SMALL, False, 1, 3, 8, 8)
    MLASpec.of(SMALL, False, 1, 4, 8, 16)  # launch 2's warps follow kv_lora_rank, not `warps`
    many_heads = MLAConfig(hidden_size=2048, heads=36, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128)
    with pytest.raises(ValueError, match="36 heads do not fit launch 2's mma tile of 16 rows"):
        MLASpec.of(many_heads, False, 1, 8, 36, 4)


def test_layer_on_the_simulator_matches_the_reference():
    weights = MLAWeights.random(SMALL, torch.bfloat16)
    layer = DecodeMLA(SMALL, weights, cluster_size=4, attention_clusters=3)
    assert layer.backend == "simulator"
    gen = torch.Generator().manual_seed(3)
    hidden, residual = torch.randn(2, 3, SMALL.hidden_size, generator=gen).to(torch.bfloat16)
    cache = LatentCache.random(SMALL, 3, 64, torch.bfloat16)
    before = cache.clone()
    positions = torch.tensor([0, 17, 50], dtype=torch.int32)
    want = mla_reference_step(SMALL, weights, hidden, residual, before, positions)
    out = torch.full_like(hidden, float("nan"))
    got, new_residual = layer(hidden, residual, cache, positions, out=out)
    assert got is out and relative_error(out, want.out) < TOLERANCE
    assert torch.equal(new_residual, (hidden.float() + residual.float()).to(torch.bfloat16))
    with pytest.raises(TypeError, match="positions has dtype torch.int64; expected torch.int32"):
        layer(hidden, residual, cache, positions.long())
    with pytest.raises(ValueError, match="position 64 overflows the cache"):
        layer(hidden, residual, cache, 64)
    with pytest.raises(ValueError, match=r"out has shape \(2, 512\); expected \(3, 512\)"):
        layer(hidden, residual, cache, 5, out=out[:2])
    with pytest.raises(ValueError, match="attention_clusters must be a positive int, got 0"):
        DecodeMLA(SMALL, weights, attention_clusters=0)
    with pytest.raises(ValueError, match="longest must be from 1 to the cache's capacity 64"):
        layer(hidden, residual, cache, positions, longest=65)
    with pytest.raises(ValueError, match="longest must be at least positions \\+ 1 = 6"):
        layer(hidden, residual, cache, 5, longest=5)
    # a longest the host knows gives the same outputs (the simulator's grid of 3 clusters is the layer's)
    again, _ = layer(hidden, residual, before.clone(), positions, longest=64)
    assert torch.equal(again, out)
    # launch 2 in clusters of 2 under launches of 4: the same step within the dtype's rounding
    other = DecodeMLA(SMALL, weights, cluster_size=4, attention_clusters=3,
                      kernel_options={"attention_cluster_size": 2})
    other_out, _ = other(hidden, residual, before.clone(), positions)
    assert relative_error(other_out, want.out) < TOLERANCE


def test_attention_clusters_fill_the_sms_once_unless_the_caches_are_long():
    weights = MLAWeights.random(DEEPSEEK_V2_LITE, torch.float16)
    layer = DecodeMLA(DEEPSEEK_V2_LITE, weights)  # the simulator plans for HOPPER's 132 SMs
    # launch 2 in clusters of 8 where they fill as many SMs as clusters of 4, else of 4 (batches 2, 4, 6, 8)
    assert [layer.attention_cluster_size(batch) for batch in range(1, 9)] == [8, 4, 8, 4, 8, 4, 8, 4]
    # one block an SM of the 120 that clusters of 8 or 4 fill at once (GPCs hold whole clusters)
    assert [layer.shape(batch) for batch in (1, 3, 4, 8)] == [(8, 8, 15), (8, 8, 5), (8, 8, 7), (8, 8, 3)]
    assert [batch * layer.shape(batch)[2] * layer.attention_cluster_size(batch) for batch in range(1, 9)] == [
        120, 120, 120, 112, 120, 120, 112, 96]
    # from 320 rows a block of that grid on: 1.75 blocks an SM (231 of 132 x 2), within the 240 blocks that
    # two blocks an SM of those 120 hold at once
    assert [layer.shape(1, n)[2] for n in (32768, 38399, 38400)] == [15, 15, 28]
    assert [layer.shape(batch, 1 << 20)[2] for batch in (2, 3, 4, 5, 8)] == [28, 9, 14, 5, 7]
    assert [layer.shape(batch, WIDE_FROM_ROWS * layer.attention_cluster_size(batch) * layer.shape(batch)[2])
            == layer.shape(batch, 1 << 20) for batch in range(1, 9)] == [True] * 8
    assert all(batch * layer.shape(batch, 1 << 20)[2] * layer.attention_cluster_size(batch) <= 240
               for batch in range(1, 9))
    assert [layer.shape(4, n)[2] for n in (8959, 8960)] == [7, 14]
    assert [layer.shape(8, n)[2] for n in (3839, 3840)] == [3, 7]
    assert DecodeMLA(DEEPSEEK_V2_LITE, weights, cluster_size=16).shape(8) == (16, 8, 3)  # clusters of 4
    assert DecodeMLA(DEEPSEEK_V2_LITE, weights, cluster_size=2).attention_cluster_size(8) == 2  # none below 4
    assert DecodeMLA(DEEPSEEK_V2_LITE, weights, attention_clusters=3).shape(8, 1 << 20) == (8, 8, 3)
    assert layer.kernel_spec(torch.float16, 8).attention_clusters == 3
    assert layer.kernel_spec(torch.float16, 8).attention_cluster_size == 4
    assert layer.kernel_spec(torch.float16, 8, 32768).attention_clusters == 7
    # a given size holds at every batch; one launch keeps the grid's one size
    fours = DecodeMLA(DEEPSEEK_V2_LITE, weights, kernel_options={"attention_cluster_size": 4})
    assert [fours.shape(batch)[2] for batch in (1, 4, 8)] == [30, 7, 3]
    assert [fours.shape(batch, 1 << 20)[2] for batch in (1, 4, 8)] == [57, 14, 7]
    one = DecodeMLA(DEEPSEEK_V2_LITE, weights, kernel_options={"one_launch": True})
    assert [one.attention_cluster_size(batch) for batch in (1, 4, 8)] == [8, 8, 8] and one.shape(8) == (8, 8, 1)
    twos = DecodeMLA(DEEPSEEK_V2_LITE, weights, cluster_size=16, kernel_options={"attention_cluster_size": 2})
    assert twos.shape(1) == (16, 8, 66) and twos.kernel_spec(torch.float16, 1).cluster_blocks("attention") == 2
    with pytest.raises(ValueError, match="longest must be a positive int"):
        layer.shape(1, 0)
    for bad in (0, 9):
        with pytest.raises(ValueError, match="batch"):
            layer.attention_cluster_size(bad)
        with pytest.raises(ValueError, match="batch"):
            fours.attention_cluster_size(bad)
    given = DecodeMLA(DEEPSEEK_V2_LITE, weights, attention_clusters=3)  # a given grid still checks its inputs
    with pytest.raises(ValueError, match="batch"):
        given.shape(0)
    with pytest.raises(ValueError, match="longest must be a positive int"):
        given.shape(1, 0)


# ---------------------------------------------------------------------------------------------- GPU


def _inputs(config, dtype, batch, capacity, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    residual = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    return hidden, residual, LatentCache.random(config, batch, capacity, dtype, "cuda", seed=seed + 1)


def _check_steps(layer, dtype, batch, positions, seed=0):
    """Each step on fresh inputs: NaN-poisoned outputs fully written, the new rows appended, every
    other cache row kept bit for bit, the workspaces left zero."""
    config = layer.config
    for i, step in enumerate(positions):
        per_sequence = [step] * batch if isinstance(step, int) else list(step)
        given = step if isinstance(step, int) else torch.tensor(step, dtype=torch.int32, device="cuda")
        hidden, residual, cache = _inputs(config, dtype, batch, max(per_sequence) + 3, seed + 10 * i)
        before = cache.clone()
        want = mla_reference_step(config, layer.weights, hidden, residual, before, per_sequence)
        out = torch.full_like(hidden, float("nan"))
        new_residual = torch.full_like(hidden, float("nan"))
        layer(hidden, residual, cache, given, out=out, residual_out=new_residual)
        torch.cuda.synchronize()
        where = f"positions {per_sequence}, {dtype}"
        assert relative_error(out, want.out) < TOLERANCE, where
        assert relative_error(new_residual, want.residual) < TOLERANCE, where
        rows, written = torch.arange(batch, device="cuda"), torch.tensor(per_sequence, device="cuda")
        assert relative_error(cache.latent[rows, written], want.latent) < TOLERANCE, where
        others = torch.ones(batch, cache.capacity, dtype=torch.bool, device="cuda")
        others[rows, written] = False
        assert torch.equal(cache.latent[others].view(torch.int16), before.latent[others].view(torch.int16)), where
        assert not layer._out_acc.any() and not layer._arrivals.any(), "workspace not left zero"
        assert not layer._step_words.any(), "one launch's words not left zero"


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", [False, True], ids=["three-launches", "one-launch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_deepseek_v2_lite_matches_reference(dtype, batch, one_launch):
    weights = MLAWeights.random(DEEPSEEK_V2_LITE, dtype, "cuda", seed=batch)
    layer = DecodeMLA(DEEPSEEK_V2_LITE, weights, kernel_options={"one_launch": one_launch})
    gen = torch.Generator().manual_seed(batch)
    ragged = torch.randint(0, 5000, (batch,), generator=gen).tolist()
    ragged[0] = 0  # an empty cache beside longer ones
    # one row, lengths that are no multiple of the blocks' chunks, ragged, and 32K
    _check_steps(layer, dtype, batch, [0, 1, 1000, ragged, 32767 if batch == 1 else 8191])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, cluster_size, attention_clusters, warps, batch, one_launch",
    [(SMALL, 4, 8, 8, 3, False), (SMALL, 2, 1, 4, 2, False), (SMALL, 16, 3, 8, 5, False),
     (SMALL_HALF, 1, 5, 8, 1, False), (SMALL_HALF, 8, 2, 4, 8, False), (SMALL, 2, 1, 4, 2, True),
     (SMALL, 16, 3, 4, 5, True), (SMALL_HALF, 1, 5, 4, 1, True)],
    ids=["small-c4", "small-c2-a1", "small-c16", "rotate-half-c1", "rotate-half-c8-b8", "small-c2-a1-one-launch",
         "small-c16-one-launch", "rotate-half-c1-one-launch"],
)
def test_small_shapes_cluster_sizes_and_attention_grids(config, cluster_size, attention_clusters, warps, batch,
                                                        one_launch):
    weights = MLAWeights.random(config, torch.bfloat16, "cuda", seed=7)
    layer = DecodeMLA(config, weights, cluster_size=cluster_size, attention_clusters=attention_clusters, warps=warps,
                      kernel_options={"one_launch": one_launch})
    # 17 and 27: the new row's tile holds 1 or 11 cached rows in the smaller grids; then ragged caches whose
    # new row comes in a refill of the ring
    _check_steps(layer, torch.bfloat16, batch, [0, 17, 27, [300 + 280 * b for b in range(batch)]])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "cluster_size, attention_cluster_size, attention_clusters",
    [(8, 4, None), (8, 16, 2), (16, 2, None)], ids=["c8-a4", "c8-a16", "c16-a2"],
)
def test_launch_2_in_clusters_of_its_own_size(cluster_size, attention_cluster_size, attention_clusters):
    weights = MLAWeights.random(DEEPSEEK_V2_LITE, torch.float16, "cuda", seed=cluster_size + attention_cluster_size)
    layer = DecodeMLA(DEEPSEEK_V2_LITE, weights, cluster_size=cluster_size, attention_clusters=attention_clusters,
                      kernel_options={"attention_cluster_size": attention_cluster_size})
    _check_steps(layer, torch.float16, 4, [0, 1000, [0, 4097, 33, 8190]])


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", [False, True], ids=["three-launches", "one-launch"])
def test_out_of_range_positions_give_nan_for_their_sequence_and_leave_its_cache(one_launch):
    weights = MLAWeights.random(SMALL, torch.float16, "cuda", seed=4)
    layer = DecodeMLA(SMALL, weights, cluster_size=4, warps=4 if one_launch else None,
                      kernel_options={"one_launch": one_launch})
    hidden, residual, cache = _inputs(SMALL, torch.float16, 3, 64, seed=9)
    before = cache.clone()
    positions = torch.tensor([10, 64, -1], dtype=torch.int32, device="cuda")
    want = mla_reference_step(SMALL, weights, hidden[:1], residual[:1], LatentCache(before.latent[:1]), [10])
    out, _ = layer(hidden, residual, cache, positions)
    torch.cuda.synchronize()
    assert relative_error(out[:1], want.out) < TOLERANCE
    assert out[1:].isnan().all()
    assert torch.equal(cache.latent[1:].view(torch.int16), before.latent[1:].view(torch.int16))
    assert not layer._out_acc.any() and not layer._arrivals.any() and not layer._step_words.any()


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", [False, True], ids=["three-launches", "one-launch"])
def test_one_graph_replays_step_after_step_while_positions_advance_on_the_device(one_launch):
    weights = MLAWeights.random(DEEPSEEK_V2_LITE, torch.bfloat16, "cuda", seed=11)
    layer = DecodeMLA(DEEPSEEK_V2_LITE, weights, kernel_options={"one_launch": one_launch})
    hidden, residual, cache = _inputs(DEEPSEEK_V2_LITE, torch.bfloat16, 3, 2100, seed=12)
    positions = torch.tensor([5, 2000, 700], dtype=torch.int32, device="cuda")
    out = torch.full_like(hidden, float("nan"))
    layer(hidden, residual, cache.clone(), positions, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(hidden, residual, cache, positions, out=out)
        positions.add_(1)
    for step in range(4):
        at = [5 + step, 2000 + step, 700 + step]
        want = mla_reference_step(DEEPSEEK_V2_LITE, weights, hidden, residual, cache.clone(), at)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert positions.tolist() == [a + 1 for a in at]
        assert relative_error(out, want.out) < TOLERANCE, f"step {step}"
        rows = torch.arange(3, device="cuda")
        assert relative_error(cache.latent[rows, torch.tensor(at, device="cuda")], want.latent) < TOLERANCE
        assert not layer._step_words.any()  # one launch leaves its words zero for the next replay


# The timeline variant (MLASpec.timeline): every kernel of both forms takes two more arguments and reads the
# clocks at the phase boundaries; the plain kernels read no clock.
@pytest.mark.ptx
@pytest.mark.parametrize("kernel", [*KERNELS, "step"])
def test_timeline_kernels_read_the_clocks_and_plain_ones_do_not(kernel):
    import dataclasses

    from clusterlab.toolchain import assemble, kernel_ptx

    build = {**KERNELS, "step": build_step_kernel}[kernel]
    spec = MLASpec.of(SMALL, True, 2, 4, 3, 4)
    timed = dataclasses.replace(spec, timeline=True)
    plain_ptx = kernel_ptx(build(spec), mla_kernel_signatures()[kernel], launch_bounds=spec.launch_bounds(kernel))
    timed_ptx = kernel_ptx(build(timed), mla_kernel_signatures(timeline=True)[kernel],
                           launch_bounds=timed.launch_bounds(kernel))
    assert "%clock64" not in plain_ptx and "%smid" not in plain_ptx
    waits = plain_ptx.count("trap;")  # the one launch's two waits for other roles (wait_until) time their limit
    assert waits == (2 if kernel == "step" else 0) and plain_ptx.count("%globaltimer") == 2 * waits
    assert timed_ptx.count("%globaltimer") > 2 * waits and "%clock64" in timed_ptx and "%smid" in timed_ptx
    assert mla_kernel_signatures(timeline=True)[kernel][:-2] == mla_kernel_signatures()[kernel]
    assemble(timed_ptx)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"one_launch": True}, {"attention_cluster_size": 4}],
                         ids=["three-launches", "one-launch", "attention-clusters-of-4"])
def test_the_timeline_records_every_block_of_every_role(options):
    """``python -m clusterlab.bench.fused_timeline --layer mla`` in small: the instrumented step against the
    reference, every block of every launch (or of every ticket) with its role, SM and phases."""
    from clusterlab.bench.fused_timeline import MLA_ROLES, record_mla_step
    from clusterlab.fused.mla_kernel import MLA_TIMELINE_PHASES

    weights = MLAWeights.random(SMALL, torch.float16, "cuda", seed=13)
    planned = DecodeMLA(SMALL, weights, warps=4, kernel_options=options)
    batch, clusters = 3, planned.shape(3, 900)[2]
    shape = record_mla_step(SMALL, weights, torch.float16, batch, 900, options, warps=4)  # launch 2's: 256 / 64
    assert shape["rel_err"] < TOLERANCE and shape["options"] == options
    blocks = {role: [b for b in shape["block"] if b["role"] == role] for role in MLA_ROLES}
    clusters = {"projections": SMALL.heads, "attention": clusters * batch, "output": SMALL.heads}
    sizes = {"projections": 8, "attention": planned.attention_cluster_size(batch), "output": 8}
    assert shape["attention_cluster_size"] == sizes["attention"]
    for role, mine in blocks.items():
        assert sorted((b["cluster"], b["rank"]) for b in mine) == [
            (c, r) for c in range(clusters[role]) for r in range(sizes[role])], role
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for block in shape["block"]:
        assert 0 <= block["sm"] < sms
        assert len(block["phase_us"]) == len(MLA_TIMELINE_PHASES) and min(block["phase_us"]) >= 0
    # Each role's work starts after the role before it is done: three launches in stream order; one launch's
    # attention blocks wait for every projection block's count, its output blocks for every attention block's.
    slack = 0.5  # µs: starts are globaltimer readings (up to 256 ns steps), phases SM cycles
    done = {role: max(b["start_us"] + sum(b["phase_us"][:3]) for b in mine) for role, mine in blocks.items()}
    work = {role: min(b["start_us"] + sum(b["phase_us"][:2]) for b in mine) for role, mine in blocks.items()}
    assert done["projections"] <= work["attention"] + slack and done["attention"] <= work["output"] + slack
