"""The fused kernel: PTX that ptxas accepts (no GPU), and correct steps on a Hopper GPU."""

import re
import subprocess
import sys

import pytest
import torch
from rounding import assert_rounds_like

from clusterlab.fused import (
    LLAMA2_7B,
    LLAMA3_2_1B,
    LLAMA3_8B,
    QWEN2_5_7B,
    AttentionConfig,
    AttentionWeights,
    DecodeAttention,
    KVCache,
)
from clusterlab.fused.kernel import (MMA_BATCH, MMA_GROUP, PIPELINE_REGISTERS, KernelSpec, MmaTile, build_kernel,
                                     kernel_signature)
from clusterlab.fused.plan import (HALF_CLUSTERS_BELOW, HOPPER, KV_ROWS_SPLIT_FROM, LONG_CACHE, PAIRS_FROM,
                                   SHARED_QUERIES_FROM,
                                   SHARED_QUERIES_ROWS, SHARED_QUERIES_SHAPE, check_kernel_options, launch_shape,
                                   set_batch, shape_boundaries, shared_queries_shape, shares_queries)
from clusterlab.fused.reference import reference_step, relative_error


def spec_ptx(spec: KernelSpec) -> str:
    """PTX of the kernel of ``spec`` with the launch bound the layer gives it."""
    from clusterlab.toolchain import kernel_ptx

    return kernel_ptx(build_kernel(spec), kernel_signature(spec), launch_bounds=(spec.threads, spec.min_blocks_per_sm))


def code(ptx: str) -> str:
    """A kernel's PTX from its entry on, numba's generated names masked: what two builds compare by."""
    return re.sub(r"_cudapy_smem_\d+", "SMEM", re.sub(r"_ZN\w+", "NAME", ptx[ptx.index(".entry"):]))


# Contract of the layer: ‖out − ref‖/‖ref‖ ≤ 1e-2 for float16 and bfloat16 (bfloat16 rounds each
# stored value by up to 2^-9 relative; the kernel accumulates in float32).
TOLERANCE = 1e-2


# None of these shapes spills under the launch bound's registers (128, or 168 with the pipelined keys)
# with the test extra's ptxas (CUDA 13) since the thread and block numbers are unsigned (v54 of
# docs/fused-decode-notes.md; what spills held and cost before: v9, v10, v27, v51).
@pytest.mark.ptx
@pytest.mark.parametrize(
    "config, bf16, batch, longest, cluster_size, warps, head_split",
    [(LLAMA2_7B, False, 1, None, 8, 4, 1), (LLAMA2_7B, True, 4, None, 8, 4, 1),
     (LLAMA2_7B, True, 8, None, 4, 8, 1), (LLAMA2_7B, False, 8, 16384, 2, 16, 1),
     (LLAMA3_8B, False, 1, None, 8, 8, 2), (LLAMA3_8B, True, 4, None, 8, 8, 2),
     (LLAMA3_8B, False, 3, None, 8, 8, 2), (LLAMA3_8B, True, 5, None, 16, 8, 1),
     (LLAMA3_8B, False, 8, None, 16, 8, 1), (LLAMA3_2_1B, True, 2, None, 8, 8, 2),
     (LLAMA3_8B, True, 8, 1024, 8, 8, 2), (LLAMA3_2_1B, False, 5, 1024, 8, 8, 2),
     (QWEN2_5_7B, False, 1, None, 8, 4, 7), (QWEN2_5_7B, True, 8, None, 4, 8, 7)],
    ids=["llama2-7b-f16-b1", "llama2-7b-bf16-b4", "llama2-7b-bf16-b8", "llama2-7b-f16-b8-16k", "llama3-8b-f16-b1",
         "llama3-8b-bf16-b4", "llama3-8b-f16-b3", "llama3-8b-bf16-b5", "llama3-8b-f16-b8", "llama3.2-1b-bf16-b2",
         "llama3-8b-bf16-b8-1k", "llama3.2-1b-f16-b5-1k", "qwen2.5-7b-f16-b1", "qwen2.5-7b-bf16-b8"],
)
def test_kernel_assembles_for_sm90a_with_wide_loads_and_no_spill(config, bf16, batch, longest, cluster_size, warps,
                                                                 head_split):
    from clusterlab.toolchain import assemble

    # what an H100 or H200 runs (``longest``: the rows the step is told it attends to)
    assert launch_shape(config, batch, 132, longest=longest) == (cluster_size, warps, head_split)
    spec = KernelSpec.of(config, bf16, batch, cluster_size, warps, head_split)
    ptx = spec_ptx(spec)
    for instruction in ("mapa.shared::cluster.u32", "ld.shared::cluster.f32", "ld.shared::cluster.v4.f32",
                        "st.shared::cluster.v4.f32",
                        "barrier.cluster.arrive.release", "barrier.cluster.wait.acquire",
                        "ld.global.nc.L1::no_allocate.L2::256B.v4.b32", "atom.global.add.f32"):
        assert instruction in ptx, instruction
    assert "st.local" not in ptx  # every register array was indexed by constants
    assert "st.shared::cluster.f32" not in ptx  # the exchanges push 16 bytes at a time
    assert ".f64" not in ptx  # no float64: numba types uint64 with int64 as float64, so unsigned indices stay uint32
    # Batches multiply on the tensor cores, both projections (every preset's slices tile them);
    # attention over the cache does where a cluster has several query heads.
    assert spec.mma_attention == (MMA_GROUP <= spec.group <= 8)
    assert ("mma.sync.aligned.m16n8k16.row.col.f32" in ptx) == (batch >= MMA_BATCH or spec.mma_attention)
    assert ("prmt.b32" in ptx) == spec.mma_attention
    assert isinstance(spec.qkv_tile(), MmaTile) == isinstance(spec.o_tile(), MmaTile) == (batch >= MMA_BATCH)
    result = assemble(ptx)
    assert result.spill_bytes == 0
    # The register file (64K) holds the blocks the launch bound asks for: 16 warps an SM at 128
    # registers, 12 at 168 with the pipelined keys, unless shared memory allows fewer blocks (8
    # sequences of GQA states: one).
    assert result.registers * spec.threads * spec.min_blocks_per_sm <= 65536
    alone = 2 * (spec.shared_bytes + 1024) > 233472  # shared memory holds one block an SM
    shared = spec.shared_queries and spec.fits_at(PIPELINE_REGISTERS)
    assert spec.pipelined_kv == (spec.mma_attention and (warps == 4 or alone or shared))
    warps_an_sm = 12 if spec.pipelined_kv and warps == 4 else 16
    assert spec.min_blocks_per_sm * warps == warps_an_sm or 2 * (spec.shared_bytes + 1024) > 233472


# `bound`: bytes of machine code today and about 5% (ptxas releases differ a little). Code a step runs once
# is fetched from memory as it runs, and these kernels are larger than the SM's instruction cache (v50 of
# docs/fused-decode-notes.md); read signed, the thread and block numbers made them a quarter larger (v54),
# and the intrinsics' wrap-around of negative indices an eighth (v55).
@pytest.mark.ptx
@pytest.mark.parametrize("config, bound", [(LLAMA3_2_1B, 93_000), (LLAMA3_8B, 84_000)],
                         ids=["llama3.2-1b-f16-b1", "llama3-8b-f16-b1"])
def test_the_batch_1_kernel_keeps_its_machine_code_within_bounds(config, bound):
    from clusterlab.toolchain import assemble

    spec = KernelSpec.of(config, False, 1, *launch_shape(config, 1, 132))
    assert assemble(spec_ptx(spec)).code_bytes <= bound


@pytest.mark.ptx
@pytest.mark.parametrize("batch", [1, 3])
def test_a_hidden_slice_of_one_chunk_compiles(batch):
    """The tiny checkpoints' shape (hidden 64 over clusters of 8: 8 elements a block, one 16-byte
    chunk a sequence) has input segments of one lane, whose share of ``sum(h^2)`` needs no shuffle."""
    from clusterlab.toolchain import assemble

    config = AttentionConfig(hidden_size=64, heads=4, kv_heads=2, head_dim=64)
    spec = KernelSpec.of(config, False, batch, *launch_shape(config, batch, 132))
    assert spec.k_slice == 8
    ptx = spec_ptx(spec)
    assert "st.local" not in ptx
    assemble(ptx)


def test_interleaved_inputs_put_each_warp_load_on_consecutive_words():
    """``input_word``'s interleaved order is a permutation of a slice's words in which the 32 lanes
    of a CUDA-core step (chunk ``c`` on lane ``c % 32``) read consecutive words at each load."""
    from clusterlab.fused.kernel import input_word

    for columns in (256, 448, 2048):
        chunks = [(c, e) for c in range(columns // 8) for e in range(8)]
        assert sorted(input_word(c, e, columns, True) for c, e in chunks) == list(range(columns))
        assert [input_word(c, e, columns, False) for c, e in chunks] == list(range(columns))
        for first_chunk in range(0, columns // 8 - 31, 32):
            for element in range(8):  # the eight floats of a chunk, one load each
                loads = [input_word(first_chunk + lane, element, columns, True) for lane in range(32)]
                assert loads == list(range(loads[0], loads[0] + 32))


@pytest.mark.ptx
@pytest.mark.parametrize("config, batch", [(LLAMA2_7B, 1), (QWEN2_5_7B, 1), (LLAMA3_8B, 4)])
def test_interleaved_inputs_change_only_the_cuda_core_qkv_steps(config, batch):
    """The option compiles into kernels whose W_qkv steps run on the CUDA cores, without local
    memory or spills, and leaves tensor-core steps' kernels as they are."""
    import dataclasses
    from clusterlab.toolchain import assemble, without_names

    spec = KernelSpec.of(config, False, batch, *launch_shape(config, batch, 132))
    on = dataclasses.replace(spec, interleave_inputs=True)
    assert on.inputs_interleaved == (not isinstance(spec.qkv_tile(), MmaTile)) == (batch == 1)
    full, interleaved = spec_ptx(spec), spec_ptx(on)
    assert (without_names(full) != without_names(interleaved)) == on.inputs_interleaved
    assert ("st.local" in interleaved) <= ("st.local" in full)  # no local arrays it did not have
    assert assemble(interleaved).spill_bytes <= assemble(full).spill_bytes


@pytest.mark.ptx
def test_measurement_switches_change_the_kernel_only_when_set():
    """The timeline adds its stamps and two arguments; the ablation switches change the code."""
    import dataclasses

    from clusterlab.toolchain import without_names

    def ptx_of(**switches):
        return without_names(spec_ptx(dataclasses.replace(KernelSpec.of(LLAMA2_7B, False, 1, 8, 4, 1), **switches)))

    full, timeline = ptx_of(), ptx_of(timeline=True)
    for register in ("%clock64", "%globaltimer", "%smid"):
        assert register not in full and register in timeline
    assert timeline.count(".param .") == full.count(".param .") + 14  # two arrays of 7 fields each
    assert ptx_of(qkv_stream=False, kv_stream=False, o_stream=False, finish=False) != full


def test_attention_runs_on_the_tensor_cores_from_two_query_heads_a_cluster():
    """Where attention over the cache runs, and the keys a warp step loads there (16-byte loads a
    lane: a 16-key tile of 128 dims takes 16, of 64 dims 8, so two tiles a step)."""
    import dataclasses

    def spec(config, head_split, **switches):
        return dataclasses.replace(KernelSpec.of(config, False, 1, 8, 4, head_split), **switches)

    assert not spec(LLAMA2_7B, 1).mma_attention and spec(LLAMA2_7B, 1).keys_per_step == 16
    assert spec(LLAMA2_7B, 1, attention_mma=True).mma_attention
    assert spec(LLAMA3_8B, 2).mma_attention and spec(LLAMA3_8B, 2).keys_per_step == 16
    assert not spec(LLAMA3_8B, 2, attention_mma=False).mma_attention
    assert spec(LLAMA3_2_1B, 1).keys_per_step == 32 and spec(LLAMA3_2_1B, 1).attention_groups == 1
    assert not spec(QWEN2_5_7B, 7).mma_attention  # one query head a cluster
    wide = AttentionConfig(hidden_size=2048, heads=32, kv_heads=2, head_dim=64)
    assert not spec(wide, 1).mma_attention and spec(wide, 2).mma_attention  # 16 heads a cluster: CUDA cores
    with pytest.raises(ValueError, match="at most 8 query heads a cluster, got 16"):
        spec(wide, 1, attention_mma=True).mma_attention


def test_the_next_keys_load_ahead_on_the_tensor_cores_in_blocks_of_four_warps():
    """Pipelined keys where tensor-core attention runs in blocks of 4 warps, at 168 registers (three
    blocks an SM), in blocks alone on their SM, or in the query projection's shared split where its
    grid fits at one block an SM; two blocks of 8 warps an SM and the CUDA cores keep 128; given
    switches win."""
    import dataclasses

    from clusterlab.fused.kernel import REGISTERS_PER_THREAD

    def spec(config, batch, warps, head_split, **switches):
        return dataclasses.replace(KernelSpec.of(config, False, batch, 16, warps, head_split), **switches)

    four = spec(LLAMA3_8B, 4, 4, 2)
    assert four.pipelined_kv and four.register_bound == PIPELINE_REGISTERS == 168
    assert four.min_blocks_per_sm == 3  # 65536 registers / (168 x 128 threads)
    # with every shared region in its own words, one block an SM for its shared memory: the
    # registers are free
    eight = spec(LLAMA3_8B, 8, 8, 1, overlay=False)
    assert eight.pipelined_kv and eight.min_blocks_per_sm == 1
    for two in (spec(LLAMA3_8B, 8, 8, 1), spec(LLAMA3_2_1B, 8, 8, 1)):  # two blocks an SM
        assert not two.pipelined_kv and two.register_bound == REGISTERS_PER_THREAD and two.min_blocks_per_sm == 2
    assert not spec(LLAMA3_8B, 4, 4, 2, attention_mma=False).pipelined_kv  # the CUDA cores load ahead their own way
    assert not spec(LLAMA3_8B, 4, 4, 2, kv_pipeline=False).pipelined_kv
    assert spec(LLAMA3_8B, 4, 4, 2, kv_pipeline=False).register_bound == REGISTERS_PER_THREAD
    assert spec(LLAMA3_8B, 8, 8, 1, kv_pipeline=True).pipelined_kv
    assert spec(LLAMA3_8B, 4, 4, 2, registers=128).min_blocks_per_sm == 4
    # the query projection's shared split: blocks of 8 warps, one an SM at 168 registers
    shared = KernelSpec.of(QWEN2_5_7B, False, 5, *shared_queries_shape(QWEN2_5_7B), split_positions=True,
                           shared_queries=True)
    assert shared.pipelined_kv and shared.warps == 8 and shared.min_blocks_per_sm == 1
    assert shared.fits_at_once and not dataclasses.replace(shared, kv_pipeline=False).pipelined_kv
    # 48 clusters of 4 x 8 warps (Llama-3-8B split in 2, batch 5 in three sets): 30 fit at one block an SM
    # on 120 SMs, 60 at two; they wait for each other, so the grid keeps 128 registers
    sets = KernelSpec.of(LLAMA3_8B, True, 5, 4, 8, 2, split_positions=True, shared_queries=True, batch_parts=3)
    assert not sets.fits_at(PIPELINE_REGISTERS) and sets.fits_at(REGISTERS_PER_THREAD)
    assert not sets.pipelined_kv and sets.min_blocks_per_sm == 2 and sets.fits_at_once
    assert dataclasses.replace(sets, kv_pipeline=True).pipelined_kv
    assert not dataclasses.replace(sets, kv_pipeline=True).fits_at_once


def test_tiles_of_the_matrix_vector_steps():
    """One sequence on the CUDA cores; batches on the tensor cores where rows of 32-column spans
    and 16-row blocks tile the slice, in parts of at most LOADS_PER_STEP loads a lane."""
    from clusterlab.fused.kernel import LOADS_PER_STEP, GemvTile, gemv_tile, mma_tile

    assert gemv_tile("w", 64, 128, 1) == GemvTile(32, 2, 8, 1)
    assert gemv_tile("w", 64, 128, 2) == MmaTile(1, 4, 4)  # 512 columns: 4 parts of 4 spans, 8 loads each
    assert gemv_tile("w", 16, 128, 8) == MmaTile(2, 4, 1)  # 128 columns: one part, two row blocks (16 loads)
    assert gemv_tile("w", 28, 128, 4) == MmaTile(1, 7, 1)  # 224 columns: 7 spans in one part (14 loads)
    assert gemv_tile("w", 112, 128, 4) == MmaTile(1, 7, 4)  # Qwen2.5-7B's 896-wide slices: not 7 parts of 4
    assert gemv_tile("w", 128, 128, 4) == MmaTile(1, 8, 4)  # 1024 columns: not 8 parts of 4
    assert gemv_tile("w", 56, 128, 4) == MmaTile(1, 7, 2)  # 448 columns: 2 parts of 7, not 7 parts of 2 x 2 rows
    assert KernelSpec.of(QWEN2_5_7B, False, 8, 16, 4, 1, batch_parts=4).o_tile() == MmaTile(1, 7, 4)
    assert gemv_tile("w", 14, 128, 4) == GemvTile(2, 7, 2, 2)  # 112 columns: not whole spans
    assert gemv_tile("w", 16, 24, 4) == GemvTile(16, 1, 4, 2)  # 24 rows: not whole row blocks
    for chunks in range(4, 257, 4):
        tile, spans = mma_tile("w", chunks, 64), chunks // 4
        assert tile.spans * tile.parts * 4 == chunks
        # Several parts of up to 4 spans issue half the loads a lane; where those would be more than
        # 4 parts, a part is the widest that divides the row up to the full loads.
        narrow = 1 < tile.parts <= 4 and tile.spans <= 4
        assert 2 * tile.row_blocks * tile.spans <= (LOADS_PER_STEP // 2 if narrow else LOADS_PER_STEP)
        assert tile.parts <= 4 or not any(spans % s == 0 for s in range(tile.spans + 1, LOADS_PER_STEP // 2 + 1))
    with pytest.raises(ValueError, match="multiple of 32 columns and a multiple of 16 rows, got 112 columns"):
        mma_tile("w", 14, 64)
    from clusterlab.fused.kernel import make_gemv

    with pytest.raises(ValueError, match="clamped steps run on the tensor cores only"):
        make_gemv(1, False, GemvTile(32, 2, 8, 1), x_stride=512, out_stride=128, atomic=False, clamped=True)


def test_a_warp_keeps_two_small_steps_in_flight():
    """``steps_in_flight``: two where a warp has more than one step and two steps' loads (every part of a
    tensor-core step) fit LOADS_PER_STEP a lane: MLA's launch 1 at batch 1 (57 steps of 4 loads over 8
    warps), not its tensor-core steps of two parts of 8 loads from batch 2 on."""
    from clusterlab.fused.kernel import GemvTile, make_gemv, steps_in_flight
    from clusterlab.fused.mla import DEEPSEEK_V2_LITE
    from clusterlab.fused.mla_kernel import MLASpec

    small, half, full = GemvTile(32, 1, 4, 1), GemvTile(32, 2, 4, 1), GemvTile(32, 2, 8, 1)  # 4, 8, 16 loads a lane
    assert [steps_in_flight(t, 4 * t.chunks_per_lane * t.rows_per_lane, 57, 8) for t in (small, half, full)] == [2, 2, 1]
    assert steps_in_flight(small, 16, 8, 8) == 1  # one step a warp: nothing to load ahead
    assert steps_in_flight(MmaTile(1, 4, 2), 32, 15, 8) == 1  # two parts of 8 loads
    assert steps_in_flight(MmaTile(1, 2, 1), 16, 15, 8) == 2  # one part of 4
    for batch, want in ((1, 2), (2, 1), (8, 1)):
        spec = MLASpec.of(DEEPSEEK_V2_LITE, False, batch, 8, 3, 8)
        tile = spec.projections_tile()
        _, _, words = make_gemv(batch, False, tile, spec.k_slice, spec.partial_stride, False, select_past_batch=False)
        assert steps_in_flight(tile, words, spec.slots // tile.step_rows, spec.warps) == want, batch


@pytest.mark.ptx
@pytest.mark.parametrize("config, bf16, batch", [(LLAMA3_8B, False, 1), (LLAMA3_8B, True, 4), (LLAMA3_2_1B, False, 8)],
                         ids=["llama3-8b-f16-b1", "llama3-8b-bf16-b4", "llama3.2-1b-f16-b8"])
def test_the_handoff_kernel_drops_the_finish_and_keeps_the_register_budget(config, bf16, batch):
    """``KernelSpec.handoff``: no arrival counter and no fence (nobody converts), the same cluster
    barriers, no spill the plain kernel lacks; the float32 sums come in 16 bytes at a time."""
    import dataclasses

    from clusterlab.toolchain import assemble

    spec = KernelSpec.of(config, bf16, batch, *launch_shape(config, batch, 132))
    plain, handoff = spec_ptx(spec), spec_ptx(dataclasses.replace(spec, handoff=True))
    assert "atom.global.add.u32" in plain and "membar.gl" in plain
    assert "atom.global.add.u32" not in handoff and "membar.gl" not in handoff
    for instruction in ("barrier.cluster.arrive.release", "barrier.cluster.wait.acquire", "atom.global.add.f32"):
        assert handoff.count(instruction) == plain.count(instruction), instruction
    assert "st.local" not in handoff
    assert assemble(handoff).spill_bytes <= assemble(plain).spill_bytes


@pytest.mark.ptx
@pytest.mark.parametrize("config, bf16, batch, cluster_size, warps, head_split",
                         [(LLAMA3_8B, False, 1, 16, 4, 2), (QWEN2_5_7B, True, 4, 8, 4, 7),
                          (QWEN2_5_7B, False, 1, 16, 4, 2)],
                         ids=["llama3-8b-f16-b1", "qwen2.5-7b-bf16-b4", "qwen2.5-7b-f16-b1-two-parts"])
def test_the_position_split_gives_a_cluster_all_query_heads_and_counts_the_parts_in(config, bf16, batch,
                                                                                   cluster_size, warps, head_split):
    """``split_positions``: each of ``head_split`` clusters (Qwen2.5-7B: 2, which does not divide its
    7 query heads) projects all ``G`` query heads of its KV head (rows, W_o columns) as one cluster
    a KV head does; the grid is ``head_split`` times that one's; one more arrival counter (the
    parts') beside the finish's, the same cluster barriers, no local memory, no spill."""
    import dataclasses

    from clusterlab.toolchain import assemble

    spec = KernelSpec.of(config, bf16, batch, cluster_size, warps)  # one cluster a KV head
    split = KernelSpec.of(config, bf16, batch, cluster_size, warps, head_split, split_positions=True)
    assert (split.parts, split.query_split, split.group) == (head_split, 1, config.group_size)
    assert (split.rows, split.attn_width) == (spec.rows, spec.attn_width) == ((config.group_size + 2) * config.head_dim,
                                                                              config.group_size * config.head_dim)
    assert split.clusters == head_split * spec.clusters
    assert split.part_state_words() == config.kv_heads * head_split * batch * config.group_size * (config.head_dim + 2)
    assert dataclasses.replace(spec, split_positions=True).parts == 1  # nothing to split
    plain, ptx = spec_ptx(spec), spec_ptx(split)
    assert ptx.count("atom.global.add.u32") == plain.count("atom.global.add.u32") + 1
    for instruction in ("barrier.cluster.arrive.release", "barrier.cluster.wait.acquire"):
        assert ptx.count(instruction) == plain.count(instruction), instruction
    assert "st.local" not in ptx
    assert assemble(ptx).spill_bytes == 0


@pytest.mark.ptx
@pytest.mark.parametrize("config, bf16, batch, cluster_size, head_split, parts, spill",
                         [(LLAMA3_8B, False, 8, 8, 1, 2, 8), (QWEN2_5_7B, True, 4, 16, 1, 2, 0),
                          (QWEN2_5_7B, False, 7, 16, 1, 4, 0), (LLAMA3_8B, True, 5, 8, 1, 2, 8)],
                         ids=["llama3-8b-f16-b8-two-sets", "qwen2.5-7b-bf16-b4-two-sets",
                              "qwen2.5-7b-f16-b7-sets-2-2-2-1", "llama3-8b-bf16-b5-sets-3-2"])
def test_a_batch_split_runs_the_kernel_of_a_share_on_each_set_of_clusters(config, bf16, batch, cluster_size,
                                                                        head_split, parts, spill):
    """``batch_parts``: the grid is ``parts`` sets of the clusters that step ``ceil(batch / parts)``
    sequences (the last set the rest), each block the shared memory and launch bound of that smaller
    step; the same barriers and counters a block, no local memory, and the spill of slicing the
    arguments (``docs/fused-decode-notes.md``, v22; 8 bytes at Llama-3-8B with CUDA 13's ptxas) within
    ``spill`` bytes. A last set with fewer sequences is built in (``uneven``): its phantoms' guards
    change the kernel of an even split of as many sets."""
    from clusterlab.toolchain import assemble

    share = KernelSpec.of(config, bf16, set_batch(batch, parts), cluster_size, 8, head_split)
    split = KernelSpec.of(config, bf16, batch, cluster_size, 8, head_split, batch_parts=parts)
    assert (split.batch, split.step_batch, split.batch_parts) == (set_batch(batch, parts), batch, parts)
    assert split.uneven == (batch % parts != 0)
    assert (split.part_clusters, split.clusters) == (share.clusters, parts * share.clusters)
    assert (split.shared_bytes, split.min_blocks_per_sm) == (share.shared_bytes, share.min_blocks_per_sm)
    plain, ptx = spec_ptx(share), spec_ptx(split)
    for instruction in ("barrier.cluster.arrive.release", "barrier.cluster.wait.acquire", "atom.global.add.u32"):
        assert ptx.count(instruction) == plain.count(instruction), instruction
    assert "st.local" not in ptx
    assert assemble(ptx).spill_bytes <= spill
    if split.uneven:
        even = KernelSpec.of(config, bf16, parts * split.batch, cluster_size, 8, head_split, batch_parts=parts)
        assert not even.uneven and code(ptx) != code(spec_ptx(even))


@pytest.mark.ptx
@pytest.mark.parametrize("config, bf16, batch, cluster_size, warps, parts, spill",
                         [(QWEN2_5_7B, False, 8, 16, 4, 4, 16), (LLAMA2_7B, True, 8, 2, 16, 1, 420)],
                         ids=["qwen2.5-7b-f16-b8-four-sets", "llama2-7b-bf16-b8"])
def test_the_work_queue_kernel_takes_chunks_with_atomics_and_assembles(config, bf16, batch, cluster_size, warps, parts,
                                                                       spill):
    """``work_queue``: tickets (``atom.add``), a first chunk and a state slot of another cluster's KV
    head in one compare-and-swap, the flags raised with ``atom.exch``; the same cluster barriers as
    the rule's kernel, no local memory, the grid's shared memory still two or three blocks an SM and
    no more than the rule's and a query region a warp (a smaller L1 slowed every phase: v66, v67).
    Spills within ``spill`` bytes with CUDA 13's ptxas: 16 on the tensor cores at 168 registers, 420
    in Llama-2-7B's blocks of 16 warps, whose 128 registers a thread the CUDA-core steps fill (336
    before the inputs' four rounds of loads went out together; ``docs/fused-decode-notes.md``, v66,
    v67, v78)."""
    from clusterlab.toolchain import assemble

    rule = KernelSpec.of(config, bf16, batch, cluster_size, warps, 1, batch_parts=parts)
    queue = KernelSpec.of(config, bf16, batch, cluster_size, warps, 1, batch_parts=parts, work_queue=True)
    assert queue.queue_words == 3 * batch * config.kv_heads + 1
    assert queue.min_blocks_per_sm == rule.min_blocks_per_sm
    # runs of other clusters' chunks go from registers to device memory: only the warps' queries are added
    assert queue.shared_bytes <= rule.shared_bytes + 4 * queue.smem_sizes()["foreign_q"]
    plain, ptx = spec_ptx(rule), spec_ptx(queue)
    for instruction in ("atom.global.cas.b32", "atom.global.exch.b32", "trap;"):
        assert instruction in ptx and instruction not in plain, instruction
    assert ptx.count("atom.global.add.u32") > plain.count("atom.global.add.u32")
    for instruction in ("barrier.cluster.arrive.release", "barrier.cluster.wait.acquire"):
        assert ptx.count(instruction) == plain.count(instruction), instruction
    assert "st.local" not in ptx
    assert assemble(ptx).spill_bytes <= spill


def _random_inputs(config, dtype, batch, capacity, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    residual = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    return hidden, residual, KVCache.random(config, batch, capacity, dtype, "cuda", seed=seed + 1)


#: What the row after each output holds (no step writes it): a value no step computes from random inputs
SENTINEL = 1234.5


def _check_steps(layer, dtype, batch, positions, seed=0, hint=False):
    """Each step on fresh inputs: NaN-poisoned outputs fully written and nothing past them (a row of
    :data:`SENTINEL` after each), cache rows appended, others kept.

    ``positions``: a list of steps, each an int (the whole batch) or a list (one per sequence,
    passed as an int32 tensor on the GPU). ``hint``: tell the layer the longest sequence's rows.
    """
    config = layer.config
    for i, step in enumerate(positions):
        per_sequence = [step] * batch if isinstance(step, int) else list(step)
        given = step if isinstance(step, int) else torch.tensor(step, dtype=torch.int32, device="cuda")
        hidden, residual, cache = _random_inputs(config, dtype, batch, max(per_sequence) + 3, seed + 10 * i)
        before = cache.clone()
        want = reference_step(config, layer.weights, hidden, residual, before, per_sequence)
        outputs = torch.full((2, batch + 1, config.hidden_size), float("nan"), dtype=dtype, device="cuda")
        outputs[:, batch] = SENTINEL
        out, new_residual = outputs[0, :batch], outputs[1, :batch]
        longest = max(per_sequence) + 1 if hint else None
        layer(hidden, residual, cache, given, out=out, residual_out=new_residual, longest=longest)
        torch.cuda.synchronize()
        where = f"positions {per_sequence}, {dtype}, shape {layer.shape(batch, longest)}"
        assert (outputs[:, batch] == SENTINEL).all(), f"written past the outputs: {where}"
        assert relative_error(out, want.out) < TOLERANCE, where
        assert relative_error(new_residual, want.residual) < TOLERANCE, where
        rows = torch.arange(batch, device="cuda")
        written = torch.tensor(per_sequence, device="cuda")
        assert relative_error(cache.k[rows, :, written], want.k) < TOLERANCE, where
        assert relative_error(cache.v[rows, :, written], want.v) < TOLERANCE, where
        others = torch.ones(batch, cache.capacity, dtype=torch.bool, device="cuda")
        others[rows, written] = False
        for got, old in ((cache.k, before.k), (cache.v, before.v)):
            assert torch.equal(got.transpose(1, 2)[others].view(torch.int16),
                               old.transpose(1, 2)[others].view(torch.int16)), where
        assert not layer._out_acc.any() and not layer._arrivals.any(), "workspace not left zero"


PRESETS = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "llama3.2-1b": LLAMA3_2_1B, "qwen2.5-7b": QWEN2_5_7B}


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_match_reference(preset, dtype, batch):
    config = PRESETS[preset]
    weights = AttentionWeights.random(config, dtype, "cuda", seed=batch)
    layer = DecodeAttention(config, weights)
    # Empty cache, one row, lengths that are no multiple of any tile, and 32K.
    _check_steps(layer, dtype, batch, [0, 1, 1000, 4097, 32767 if batch == 1 else 16383])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [2, 5, 8])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_ragged_batches_each_sequence_at_its_own_position(preset, batch):
    config = PRESETS[preset]
    weights = AttentionWeights.random(config, torch.bfloat16, "cuda", seed=batch)
    layer = DecodeAttention(config, weights)
    gen = torch.Generator().manual_seed(batch)
    ragged = torch.randint(0, 6000, (batch,), generator=gen).tolist()
    ragged[0] = 0  # an empty cache beside long ones
    _check_steps(layer, torch.bfloat16, batch, [ragged, [3 * b + 1 for b in range(batch)]])


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llama3-8b", "llama3.2-1b"])
def test_ragged_batches_told_their_longest_cache_take_the_long_cache_shape(preset):
    """Positions on the device, their longest told by the host: from a batch of 3's LONG_CACHE rows
    one cluster of 16 reads each KV head's rows (a sequence with an empty cache beside), below it the
    head split."""
    config = PRESETS[preset]
    weights = AttentionWeights.random(config, torch.float16, "cuda", seed=3)
    layer = DecodeAttention(config, weights)
    assert layer.backend == "gpu"
    long = LONG_CACHE[3 - 1]
    steps = [[long + 900, 0, 17], [long - 2, 4000, 1]]  # long + 901 rows, then long - 1
    assert layer.shape(3, long + 901) == (16, 8, 1) != layer.shape(3, long - 1)
    _check_steps(layer, torch.float16, 3, steps, hint=True)


@pytest.mark.gpu
@pytest.mark.parametrize("preset, batch, dtype", [("llama3.2-1b", 8, torch.float16), ("llama3-8b", 5, torch.bfloat16)])
def test_a_batch_of_5_to_8_told_a_short_cache_runs_clusters_of_8_with_twice_the_head_split(preset, batch, dtype):
    """Below HALF_CLUSTERS_BELOW rows the rule runs a batch of 5 to 8 in clusters of 8 x 8 warps, two a
    KV head (ragged: the longest cache beside an empty one), from it in clusters of 16, one a KV head;
    each step against the reference."""
    config = PRESETS[preset]
    layer = DecodeAttention(config, AttentionWeights.random(config, dtype, "cuda", seed=batch))
    below = HALF_CLUSTERS_BELOW - 1
    assert layer.shape(batch, below) == (8, 8, 2) and layer.shape(batch, below + 1) == (16, 8, 1)
    ragged = torch.randint(0, below - 1, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    ragged[0], ragged[-1] = below - 1, 0
    _check_steps(layer, dtype, batch, [ragged, [below] + ragged[1:]], hint=True)


@pytest.mark.gpu
@pytest.mark.parametrize("preset, shape", [("llama3-8b", (16, 4, 1)), ("llama3.2-1b", (16, 4, 1))])
def test_a_batch_of_2_told_its_longest_cache_runs_two_sets_of_one_sequence(preset, shape):
    """From PAIRS_FROM rows a GQA batch of 2 runs as two sets of clusters, a sequence each
    (``plan.batch_sets``), ragged (an empty cache beside a long one) and uniform, against the reference;
    below it one set."""
    config = PRESETS[preset]
    weights = AttentionWeights.random(config, torch.float16, "cuda", seed=6)
    layer = DecodeAttention(config, weights)
    assert layer.shape(2, PAIRS_FROM + 301) == shape and layer.batch_parts(2, PAIRS_FROM + 301) == 2
    assert layer.shape(2, PAIRS_FROM - 1) == (16, 8, 1) and layer.batch_parts(2, PAIRS_FROM - 1) == 1
    _check_steps(layer, torch.float16, 2, [[PAIRS_FROM + 300, 0], PAIRS_FROM + 40, [PAIRS_FROM - 2, 5000]], hint=True)


@pytest.mark.gpu
@pytest.mark.parametrize("preset, batch, longest, sets, shape",
                         [("llama3-8b", 5, PAIRS_FROM + 301, 3, (8, 4, 1)),
                          ("llama3.2-1b", 7, LONG_CACHE[7 - 1] + 301, 2, (8, 8, 1))])
def test_an_odd_batch_told_its_longest_cache_runs_the_rules_sets_the_last_a_sequence_short(preset, batch, longest,
                                                                                          sets, shape):
    """``plan.batch_sets`` for an odd batch on this card: from PAIRS_FROM rows Llama-3-8B's batch of 5 in
    sets of pairs (2, 2, 1); Llama-3.2-1B's weights fit in half the L2, so its batch of 7 runs in two sets
    (4, 3) from LONG_CACHE rows. Ragged (the longest cache beside an empty one) against the reference."""
    config = PRESETS[preset]
    layer = DecodeAttention(config, AttentionWeights.random(config, torch.float16, "cuda", seed=8))
    assert layer.batch_parts(batch, longest) == sets and layer.shape(batch, longest) == shape
    assert layer.kernel_spec(torch.float16, batch, longest).uneven
    ragged = torch.randint(0, longest - 1, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    ragged[0], ragged[-1] = longest - 1, 0
    _check_steps(layer, torch.float16, batch, [ragged], hint=True)


@pytest.mark.gpu
def test_the_timeline_records_every_block_of_a_batch_split_over_sets():
    """``python -m clusterlab.bench.fused_timeline --shape CxWxSxP`` in small: two sets of clusters,
    the instrumented step against the reference, every block of both sets with its SM and phases."""
    from clusterlab.bench.fused_timeline import record_shape
    from clusterlab.fused.kernel import TIMELINE_PHASES

    config = AttentionConfig(hidden_size=1024, heads=8, kv_heads=2, head_dim=128)
    weights = AttentionWeights.random(config, torch.float16, "cuda", seed=12)
    shape = record_shape(config, weights, torch.float16, 4, 700, 4, 4, 1, 2)
    assert shape["rel_err"] < TOLERANCE and shape["batch_parts"] == 2
    assert shape["blocks"] == 2 * config.kv_heads * 4 == len(shape["block"])
    assert {block["cluster"] for block in shape["block"]} == set(range(2 * config.kv_heads))
    for block in shape["block"]:
        assert 0 <= block["sm"] < torch.cuda.get_device_properties(0).multi_processor_count
        assert len(block["phase_us"]) == len(TIMELINE_PHASES) and min(block["phase_us"]) >= 0


@pytest.mark.gpu
def test_long_mha_batches_run_one_16_warp_block_every_other_sm():
    """Llama-2-7B at a batch of 6 told its longest cache: from LONG_CACHE rows 32 clusters of 2 x 16
    warps (``plan.wide_blocks``), ragged (an empty cache among long ones) and uniform, against the
    reference; below it 32 clusters of 4 x 8."""
    weights = AttentionWeights.random(LLAMA2_7B, torch.float16, "cuda", seed=5)
    layer = DecodeAttention(LLAMA2_7B, weights)
    long = LONG_CACHE[6 - 1]
    assert layer.shape(6, long + 301) == (2, 16, 1) and layer.shape(6, long - 1) == (4, 8, 1)
    _check_steps(layer, torch.float16, 6, [[long + 300, 0, 17, long - 1, 2000, 1], long + 40, long - 2], hint=True)


def _gqa_layer_and_inputs(batch, **options):
    """A float16 GQA layer (8 query heads, 2 KV heads of 128; ``options`` for the layer) on the GPU and
    inputs of ``batch`` sequences with a cache of 64 positions: ``config, weights, layer, hidden,
    residual, cache``."""
    config = AttentionConfig(hidden_size=1024, heads=8, kv_heads=2, head_dim=128)
    weights = AttentionWeights.random(config, torch.float16, "cuda", seed=4)
    layer = DecodeAttention(config, weights, **options)
    return config, weights, layer, *_random_inputs(config, torch.float16, batch, 64, seed=9)


@pytest.mark.gpu
@pytest.mark.parametrize("options, shared", [({"kernel_options": {"split_kv_rows": False}}, False),
                                             ({"head_split": 2, "kernel_options": {"split_kv_rows": True}}, True),
                                             ({}, True)],
                         ids=["each-cluster-both-heads", "kv_rows_split-2", "rule-split-4"])
def test_out_of_range_positions_give_nan_for_their_sequence_and_leave_its_cache(options, shared):
    """Such a sequence attends to nothing and writes no row (with the K/V rows shared out it reads no
    row of the other clusters either): NaN out, its cache as it was, the others' steps right."""
    config, weights, layer, hidden, residual, cache = _gqa_layer_and_inputs(3, **options)
    assert layer.kernel_spec(torch.float16, 3).kv_rows_split == shared
    before = cache.clone()
    positions = torch.tensor([10, 64, -1], dtype=torch.int32, device="cuda")
    want = reference_step(config, weights, hidden[:1], residual[:1], KVCache(before.k[:1], before.v[:1]), [10])
    out, _ = layer(hidden, residual, cache, positions)
    torch.cuda.synchronize()
    assert relative_error(out[:1], want.out) < TOLERANCE
    assert out[1:].isnan().all()
    assert torch.equal(cache.k[1:].view(torch.int16), before.k[1:].view(torch.int16))
    assert torch.equal(cache.v[1:].view(torch.int16), before.v[1:].view(torch.int16))
    assert not layer._out_acc.any() and not layer._arrivals.any()
    with pytest.raises(ValueError, match="position 64 overflows the cache: it holds 64 positions"):
        DecodeAttention.check_positions(positions, cache)


@pytest.mark.gpu
def test_a_cuda_view_off_a_16_byte_boundary_is_refused_before_the_launch():
    config, weights, layer, hidden, residual, cache = _gqa_layer_and_inputs(2)
    shifted = torch.empty(hidden.numel() + 1, dtype=hidden.dtype, device="cuda")[1:].view_as(hidden)
    shifted.copy_(hidden)  # contiguous, 2 bytes past the boundary
    out = torch.full_like(hidden, float("nan"))
    with pytest.raises(ValueError, match="hidden starts 2 bytes past a 16-byte boundary"):
        layer(shifted, residual, cache, 10, out=out)
    torch.cuda.synchronize()
    assert out.isnan().all()  # nothing launched
    out, _ = layer(shifted.clone(), residual, cache, 10)
    want = reference_step(config, weights, hidden, residual, cache, 10)
    assert relative_error(out, want.out) < TOLERANCE


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
@pytest.mark.parametrize("name, head_split, mma", [("gqa-d64-gptj-c16", 2, False), ("gqa-d64-gptj-c16", 4, True),
                                                   ("mha-d128", 1, True)])
def test_attention_on_either_kind_of_core_matches_the_reference(name, head_split, mma):
    """The kernel option ``attention_mma`` against the rule: GQA on the CUDA cores, one query head a
    cluster on the tensor cores (seven of its eight B columns empty)."""
    weights = AttentionWeights.random(SMALL[name], torch.float16, "cuda", seed=11)
    ruled = DecodeAttention(SMALL[name], weights, cluster_size=4, head_split=head_split)
    layer = DecodeAttention(SMALL[name], weights, cluster_size=4, head_split=head_split,
                            kernel_options={"attention_mma": mma})
    assert layer.kernel_spec(torch.float16, 3).mma_attention == mma != ruled.kernel_spec(torch.float16, 3).mma_attention
    _check_steps(layer, torch.float16, 3, [0, 17, [300, 41, 5]])


@pytest.mark.gpu
@pytest.mark.parametrize("overlay", [True, False])
def test_overlaid_and_separate_shared_regions_match_the_reference(overlay):
    """The kernel option ``overlay`` both ways, at batch 8 in blocks of 8 warps (every region at its
    largest): the words ``xs``/``partial``, ``scratch`` and ``o`` share hold each in its turn."""
    weights = AttentionWeights.random(SMALL["gqa-d64-gptj-c16"], torch.float16, "cuda", seed=13)
    layer = DecodeAttention(SMALL["gqa-d64-gptj-c16"], weights, cluster_size=4,
                            kernel_options={"overlay": overlay})
    spec = layer.kernel_spec(torch.float16, 8)
    layout = spec.smem_layout()
    assert spec.overlay == overlay and (layout["xs"] == layout["scratch_m"] == layout["o"]) == overlay
    _check_steps(layer, torch.float16, 8, [[300, 41, 5, 0, 77, 1000, 16, 33], 17])


@pytest.mark.gpu
@pytest.mark.parametrize("name, dtype", [("mha-d128", torch.float16), ("gqa-d64-gptj-c16", torch.bfloat16)])
def test_interleaved_inputs_match_the_reference(name, dtype):
    """The kernel option ``interleave_inputs`` at batch 1, where the W_qkv steps run on the CUDA cores."""
    weights = AttentionWeights.random(SMALL[name], dtype, "cuda", seed=19)
    layer = DecodeAttention(SMALL[name], weights, cluster_size=4, kernel_options={"interleave_inputs": True})
    assert layer.kernel_spec(dtype, 1).inputs_interleaved
    _check_steps(layer, dtype, 1, [0, 17, 300])


def test_the_kv_rows_split_applies_to_a_query_split():
    """``split_kv_rows`` shares out a KV head's key and value heads where its query heads are split
    over clusters (2, 4 or 7 of them), and changes nothing elsewhere (one cluster a KV head, the
    positions split, a cluster of one block)."""
    import dataclasses

    def spec(config, head_split, cluster_size=16, **switches):
        return KernelSpec.of(config, False, 1, cluster_size, 4, head_split, split_kv_rows=True, **switches)

    for on in (spec(LLAMA3_8B, 2), spec(LLAMA3_8B, 4), spec(LLAMA3_2_1B, 2), spec(QWEN2_5_7B, 7, 8)):
        assert on.kv_rows_split and on.arrival_words == on.cluster_size * (1 + on.kv_heads)
    for off in (spec(LLAMA3_8B, 1), spec(LLAMA3_8B, 2, split_positions=True), spec(LLAMA2_7B, 1),
                spec(SMALL["mha-d64-c1"], 1, 1), dataclasses.replace(spec(LLAMA3_8B, 2), split_kv_rows=False)):
        assert not off.kv_rows_split
    assert check_kernel_options({"split_kv_rows": None}) == {"split_kv_rows": None}
    with pytest.raises(ValueError, match="kernel_options: split_kv_rows=1; allowed: None, True or False"):
        check_kernel_options({"split_kv_rows": 1})


def test_shared_queries_take_a_position_split_that_divides_the_query_heads():
    """``shared_queries`` shares a KV head's query heads out evenly over the parts of its positions:
    each part projects ``G / parts`` heads and their W_o columns (its ``partial`` rows and ``o``
    shrink, its ``qkv`` keeps all ``G``), the K/V rows shared out unless asked otherwise, one more
    counter a KV head and the queries after the part states; refused without ``split_positions`` or
    where the parts do not divide ``G``, naming what is allowed, before anything is built."""
    for config, batch, cluster_size, warps, parts in ((QWEN2_5_7B, 8, 4, 8, 7), (LLAMA3_8B, 4, 8, 4, 4),
                                                       (LLAMA3_8B, 1, 16, 4, 2)):
        split = KernelSpec.of(config, False, batch, cluster_size, warps, parts, split_positions=True)
        shared = KernelSpec.of(config, False, batch, cluster_size, warps, parts, split_positions=True,
                               shared_queries=True)
        g, d = config.group_size, config.head_dim
        assert (shared.parts, shared.group, shared.projected_group, shared.projection_split) == (parts, g, g // parts,
                                                                                                parts)
        assert (split.projected_group, split.projection_split, split.projected_rows) == (g, 1, split.rows)
        assert (shared.rows, shared.projected_rows, shared.projected_width) == ((g + 2) * d, (g // parts + 2) * d,
                                                                                g // parts * d)
        assert shared.partial_stride == shared.projected_rows + 4
        assert shared.smem_sizes()["qkv"] == split.smem_sizes()["qkv"] == batch * (g + 2) * d
        assert shared.smem_sizes()["o"] == batch * g // parts * d
        assert shared.kv_rows_split and shared.waits_across_clusters and not split.waits_across_clusters
        assert not KernelSpec.of(config, False, batch, cluster_size, warps, parts, split_positions=True,
                                 shared_queries=True, split_kv_rows=False).kv_rows_split
        assert shared.arrival_words == split.arrival_words + config.kv_heads
        assert shared.part_state_words() == split.part_state_words() + config.kv_heads * batch * g * d
    for switches, head_split in (({}, 7), ({"split_positions": True}, 2), ({"split_positions": True}, 1)):
        with pytest.raises(ValueError, match=r"shared_queries takes split_positions and a head_split that divides "
                                             r"the 7 query heads of a KV head \(one of \[7\]\), got head_split "
                                             + str(head_split)):
            KernelSpec.of(QWEN2_5_7B, False, 1, 8, 4, head_split, shared_queries=True, **switches)
    assert check_kernel_options({"shared_queries": True}) == {"shared_queries": True}
    with pytest.raises(ValueError, match="kernel_options: shared_queries=None; allowed: True or False"):
        check_kernel_options({"shared_queries": None})


def test_the_rule_shares_out_the_query_projection_at_long_caches_of_few_kv_heads_at_every_batch():
    """``plan.shares_queries``: Qwen2.5-7B (4 KV heads: one cluster of 16 each fills 64 of 132 SMs) from
    a batch of ``SHARED_QUERIES_FROM`` (1: every batch) from its ``SHARED_QUERIES_ROWS`` (the long-cache
    rows, 4K at batch 2) takes 4 x 8 warps x 7 parts, the query projection shared out; below those rows,
    and at the presets whose KV heads fill the GPU, never; nor where the 28 clusters of 4 would not all fit
    at once (112 SMs for such clusters hold them, 108 do not) or half the SMs would not hold the KV heads'
    clusters of 16."""
    import dataclasses

    assert (SHARED_QUERIES_FROM, SHARED_QUERIES_SHAPE) == (1, (4, 8))
    assert SHARED_QUERIES_ROWS == (8192, 4096) + LONG_CACHE[2:] and LONG_CACHE[1] == 8192
    for batch in range(1, 9):
        rows = SHARED_QUERIES_ROWS[batch - 1]
        assert shares_queries(QWEN2_5_7B, batch, rows)
        assert not shares_queries(QWEN2_5_7B, batch, rows - 1) and not shares_queries(QWEN2_5_7B, batch, None)
        for config in (LLAMA2_7B, LLAMA3_8B, LLAMA3_2_1B):
            assert not shares_queries(config, batch, 32768)
    for group, shared in ((1, False), (2, True), (8, True), (9, False)):  # 2 to 8 query heads a KV head
        config = AttentionConfig(hidden_size=2048, heads=2 * group, kv_heads=2, head_dim=128)
        assert shares_queries(config, 1, 32768) == shared, group
    assert shared_queries_shape(QWEN2_5_7B) == (4, 8, 7)
    for sms, fits in ((112, True), (108, False)):
        limits = dataclasses.replace(HOPPER, cluster_sms=HOPPER.cluster_sms[:2] + (sms, sms, 100))
        assert shares_queries(QWEN2_5_7B, 8, 32768, limits) == fits
    fewer = dataclasses.replace(HOPPER, sm_count=127, cluster_sms=(127, 127, 120, 120, 112))
    assert not shares_queries(QWEN2_5_7B, 8, 32768, fewer)  # 4 clusters of 16 on more than 63 SMs
    spec = KernelSpec.of(QWEN2_5_7B, False, 8, *shared_queries_shape(QWEN2_5_7B), split_positions=True,
                         shared_queries=True)
    assert spec.fits_at_once and spec.clusters * spec.cluster_size == 112 and spec.min_blocks_per_sm == 1


def test_the_rule_shares_out_the_kv_rows_from_a_split_of_three_where_the_grid_fits_at_once():
    """``split_kv_rows`` None (the default): the K/V rows are shared out from a query split of
    ``KV_ROWS_SPLIT_FROM`` (3), so at Qwen2.5-7B's split of 7 at every batch, not at the splits of 2
    (Llama-3-8B, Llama-3.2-1B) or where the cache takes one cluster a KV head; and not where the plan's
    count of resident blocks (the launch bound's blocks on the SMs clusters of that size fill) is
    short of the grid, whose clusters would wait for each other without all running."""
    import dataclasses

    assert KV_ROWS_SPLIT_FROM == 3

    def rule(config, batch, longest=None, limits=HOPPER):
        return KernelSpec.of(config, False, batch, *launch_shape(config, batch, limits.sm_count, longest=longest),
                             limits=limits)

    for batch in range(1, 9):
        qwen = rule(QWEN2_5_7B, batch)
        assert qwen.split_kv_rows is None and qwen.head_split == 7 and qwen.fits_at_once and qwen.kv_rows_split
        assert not rule(QWEN2_5_7B, batch, longest=LONG_CACHE[batch - 1]).kv_rows_split  # one cluster a KV head
        for config in (LLAMA3_8B, LLAMA3_2_1B, LLAMA2_7B):
            assert not rule(config, batch).kv_rows_split
    spec = rule(QWEN2_5_7B, 1)  # 28 clusters of 8 x 4 warps, 4 blocks an SM
    blocks = spec.clusters * spec.cluster_size
    assert (blocks, spec.min_blocks_per_sm) == (224, 4)
    for sms, fits in ((56, True), (55, False)):  # 4 x 56 SMs hold the 224 blocks, 4 x 55 do not
        limits = dataclasses.replace(HOPPER, cluster_sms=HOPPER.cluster_sms[:3] + (sms, 112))
        small = dataclasses.replace(spec, limits=limits)
        assert (small.fits_at_once, small.kv_rows_split) == (fits, fits)
        assert dataclasses.replace(small, split_kv_rows=True).kv_rows_split  # asked for: the launcher checks


@pytest.mark.parametrize("config", [LLAMA2_7B, LLAMA3_8B, LLAMA3_2_1B, QWEN2_5_7B],
                         ids=["llama2-7b", "llama3-8b", "llama3.2-1b", "qwen2.5-7b"])
def test_every_grid_the_rule_launches_fits_the_gpu_at_once(config):
    """Every step the rule plans for a preset, at every batch, in both dtypes, at one row, on both sides
    of each of :func:`shape_boundaries` and at 32K rows, launches a grid that an H100 or H200 holds at
    once at the register bound its kernel is built for (:attr:`KernelSpec.fits_at_once`, the plan's
    count). A grid that does not fit runs its last clusters after the others: the next keys in flight at
    168 registers in Llama-3.2-1B's 16 clusters of 8 x 8 warps left the 16th without an SM, 40-55% slower
    (``docs/fused-decode-notes.md``, v87)."""
    layer = DecodeAttention(config, AttentionWeights.random(config, torch.float16, "cpu", seed=0),
                            backend="simulator", limits=HOPPER)
    for batch in range(1, 9):
        lengths = {1, 32768, *(row + d for row in shape_boundaries(batch) for d in (-1, 0))}
        for dtype in (torch.float16, torch.bfloat16):
            for longest in sorted(lengths):
                spec = layer.kernel_spec(dtype, batch, longest)
                assert spec.fits_at_once, (batch, dtype, longest, layer.shape(batch, longest))


@pytest.mark.ptx
@pytest.mark.parametrize("config, bf16, batch, cluster_size, warps, parts",
                         [(QWEN2_5_7B, False, 8, 4, 8, 7), (QWEN2_5_7B, True, 5, 4, 8, 7),
                          (LLAMA3_8B, True, 4, 8, 4, 4)],
                         ids=["qwen2.5-7b-f16-b8-split7", "qwen2.5-7b-bf16-b5-split7", "llama3-8b-bf16-b4-split4"])
def test_shared_queries_assemble_with_their_waits_and_no_spill(config, bf16, batch, cluster_size, warps, parts):
    """``shared_queries`` beside the positions split it shares out: the same four cluster barriers,
    more atomic adds (the queries' count, probe and second count; the parts' the same in place of
    the last part's arrival), two more fences (the hand-off's release and acquire; the parts' wait
    takes the two of the last part's arrival), no local memory, no spill (CUDA 13's ptxas)."""
    from clusterlab.toolchain import assemble

    split = KernelSpec.of(config, bf16, batch, cluster_size, warps, parts, split_positions=True)
    shared = KernelSpec.of(config, bf16, batch, cluster_size, warps, parts, split_positions=True, shared_queries=True)
    plain, ptx = spec_ptx(split), spec_ptx(shared)
    assert ptx.count("atom.global.add.u32") >= plain.count("atom.global.add.u32") + 4
    assert ptx.count("membar.gl") == plain.count("membar.gl") + 2
    assert ptx.count("trap;") == plain.count("trap;") + 2  # the hand-off's and the parts' waits: fail, never hang
    for instruction in ("barrier.cluster.arrive.release", "barrier.cluster.wait.acquire"):
        assert ptx.count(instruction) == plain.count(instruction) == 4, instruction
    assert "st.local" not in ptx
    assert assemble(ptx).spill_bytes == 0


@pytest.mark.ptx
@pytest.mark.parametrize("config, bf16, batch", [(LLAMA3_8B, True, 4), (QWEN2_5_7B, False, 1)],
                         ids=["llama3-8b-bf16-b4", "qwen2.5-7b-f16-b1"])
def test_the_kv_rows_split_assembles_with_its_flags_and_no_spill(config, bf16, batch):
    """The rule's head split of 2 (of 7 for Qwen2.5-7B) with ``split_kv_rows``: atomic adds raise the
    flags, probe them and count them down, fenced; the four cluster barriers as before, no local
    memory, no spill (with CUDA 13's ptxas; Qwen2.5-7B's spilled 16 bytes before v54)."""
    import dataclasses

    from clusterlab.toolchain import assemble

    rule = KernelSpec.of(config, bf16, batch, *launch_shape(config, batch, 132))
    assert rule.kv_rows_split == (config is QWEN2_5_7B)  # the rule shares them out from a split of 3
    spec, split = (dataclasses.replace(rule, split_kv_rows=on) for on in (False, True))
    assert split.kv_rows_split and not spec.kv_rows_split
    plain, ptx = spec_ptx(spec), spec_ptx(split)
    assert ptx.count("atom.global.add.u32") >= plain.count("atom.global.add.u32") + 3  # raise, probe, count down
    assert ptx.count("membar.gl") == plain.count("membar.gl") + 2  # the release before, the acquire after
    assert "trap;" in ptx and "trap;" not in plain  # a flag that never comes fails the launch (wait_until)
    for instruction in ("barrier.cluster.arrive.release", "barrier.cluster.wait.acquire"):
        assert ptx.count(instruction) == plain.count(instruction) == 4, instruction
    assert "st.local" not in ptx
    assert assemble(ptx).spill_bytes == 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, batch, dtype, options, steps",
    [(LLAMA3_8B, 1, torch.float16, {}, [0, 1, 1000, 4097, 32767]),
     (QWEN2_5_7B, 4, torch.bfloat16, {}, [[5000, 0, 17, 300], 1000]),
     (LLAMA3_2_1B, 8, torch.float16, {"head_split": 2}, [[300, 41, 5, 0, 77, 6000, 16, 33]]),
     (SMALL["gqa-d64-gptj-c16"], 3, torch.bfloat16, {"cluster_size": 4, "head_split": 4}, [0, 17, [300, 41, 5]]),
     (QWEN2_5_7B, 2, torch.float16, {"cluster_size": 16, "head_split": 2}, [[9000, 0], 1])],
    ids=["llama3-8b-b1-f16", "qwen2.5-7b-b4-bf16", "llama3.2-1b-b8-f16", "gqa-d64-split4-b3-bf16",
         "qwen2.5-7b-b2-f16-two-parts"],
)
def test_the_position_split_matches_the_reference(config, batch, dtype, options, steps):
    """``kernel_options={"split_positions": True}`` on the rule's shapes (a head split of 2 or 7),
    a split of 4, and 2 parts of Qwen2.5-7B's 7 query heads: empty and one-row caches (whole parts
    with nothing to attend), ragged batches, 32K; the parts' counters left zero (``_check_steps``)."""
    weights = AttentionWeights.random(config, dtype, "cuda", seed=37)
    layer = DecodeAttention(config, weights, kernel_options={"split_positions": True}, **options)
    spec = layer.kernel_spec(dtype, batch)
    assert spec.parts == spec.head_split > 1 and spec.group == config.group_size
    _check_steps(layer, dtype, batch, steps)


# The GPU tests of the shared split: (config, batch, dtype, layer arguments, steps), its kernel_options
# added to SHARED_QUERIES_OPTIONS.
SHARED_QUERIES_OPTIONS = {"split_positions": True, "shared_queries": True}
SHARED_QUERIES_CASES = [
    pytest.param(QWEN2_5_7B, 8, torch.float16, {"cluster_size": 4, "warps": 8, "head_split": 7},
                 [[300, 0, 17, 1000, 5, 4097, 1, 64], 1024], id="qwen2.5-7b-b8-f16-split7"),
    pytest.param(QWEN2_5_7B, 3, torch.bfloat16, {"cluster_size": 8, "warps": 4, "head_split": 7}, [0, [300, 41, 5]],
                 id="qwen2.5-7b-b3-bf16-split7"),
    pytest.param(LLAMA3_8B, 4, torch.float16, {"cluster_size": 8, "warps": 4, "head_split": 4}, [[5000, 0, 17, 300], 1],
                 id="llama3-8b-b4-f16-split4"),
    pytest.param(LLAMA3_2_1B, 2, torch.bfloat16, {"cluster_size": 8, "warps": 4, "head_split": 2}, [[300, 0], 77],
                 id="llama3.2-1b-b2-bf16"),
    pytest.param(SMALL["gqa-d64-gptj-c16"], 3, torch.float16,
                 {"cluster_size": 4, "head_split": 2, "kernel_options": {"split_kv_rows": False}}, [[300, 0, 5], 17],
                 id="gqa-d64-gptj-c4-b3-f16-kv-rows-each"),
    pytest.param(LLAMA3_8B, 5, torch.bfloat16,
                 {"cluster_size": 4, "warps": 8, "head_split": 2, "kernel_options": {"batch_parts": 3}},
                 [[300, 5000, 0, 17, 1]], id="llama3-8b-b5-bf16-sets-2-2-1"),
]
# The GPU tests of the K/V rows split (kernel_options KV_ROWS_OPTIONS), as SHARED_QUERIES_CASES.
KV_ROWS_OPTIONS = {"split_kv_rows": True}
KV_ROWS_CASES = [
    pytest.param(LLAMA3_8B, 1, torch.float16, {}, [0, 1, 1000, 4097], id="llama3-8b-b1-f16"),
    pytest.param(LLAMA3_8B, 4, torch.bfloat16, {}, [[5000, 0, 17, 300], 1000], id="llama3-8b-b4-bf16"),
    pytest.param(LLAMA3_2_1B, 2, torch.float16, {}, [[300, 0], 77], id="llama3.2-1b-b2-f16"),
    pytest.param(QWEN2_5_7B, 1, torch.float16, {}, [0, 1000, 4097], id="qwen2.5-7b-b1-f16-split7"),
    pytest.param(SMALL["gqa-d64-gptj-c16"], 3, torch.bfloat16, {"cluster_size": 4, "head_split": 2},
                 [0, 17, [300, 41, 5]], id="gqa-d64-gptj-c4-b3-bf16"),
    pytest.param(SMALL["gqa-d64-gptj-c16"], 3, torch.float16, {"cluster_size": 4, "head_split": 4}, [[300, 0, 5], 17],
                 id="gqa-d64-gptj-c4-split4-b3-f16"),
]


def split_layer(base: dict, config, dtype, options: dict, device: str, seed: int) -> DecodeAttention:
    """The layer of a case of SHARED_QUERIES_CASES or KV_ROWS_CASES: its ``kernel_options`` added to ``base``."""
    options = dict(options)
    kernel_options = {**base, **options.pop("kernel_options", {})}
    return DecodeAttention(config, AttentionWeights.random(config, dtype, device, seed=seed),
                           kernel_options=kernel_options, **options)


def test_the_gpu_tests_that_wait_across_clusters_launch_grids_that_fit_at_once():
    """The shared split's and the K/V rows split's GPU tests step layers whose clusters wait for each
    other: by the plan's count (:attr:`KernelSpec.fits_at_once`, on an H100 or H200) every grid they
    launch is resident at once at the register bound its kernel is built for. The launcher refuses
    one that is not (``co_resident``), so a default that grew a kernel's registers past it would
    otherwise fail on the GPU only."""
    for base, cases in ((SHARED_QUERIES_OPTIONS, SHARED_QUERIES_CASES), (KV_ROWS_OPTIONS, KV_ROWS_CASES)):
        for case in cases:
            config, batch, dtype, options, _ = case.values
            spec = split_layer(base, config, dtype, options, "cpu", 0).kernel_spec(dtype, batch)
            assert spec.waits_across_clusters and spec.fits_at_once, case.id


@pytest.mark.gpu
@pytest.mark.parametrize("config, batch, dtype, options, steps", SHARED_QUERIES_CASES)
def test_shared_queries_match_the_reference(config, batch, dtype, options, steps):
    """``kernel_options={"split_positions": True, "shared_queries": True}``: each part projects its
    share of the query heads (Qwen2.5-7B's 7 one each, with its QKV bias), hands them over through
    device memory, attends with all of them over its share of the positions and projects its own
    heads after merging every part's states; the K/V rows shared out (the rule) or each part
    projecting both, GPT-J's RoPE, ragged batches with empty caches, an uneven split over sets of
    clusters; the counters left zero (``_check_steps``)."""
    layer = split_layer(SHARED_QUERIES_OPTIONS, config, dtype, options, "cuda", 47)
    spec = layer.kernel_spec(dtype, batch)
    assert spec.parts == spec.head_split and spec.projected_group * spec.parts == spec.group == config.group_size
    assert spec.kv_rows_split == layer.kernel_options.get("split_kv_rows", True)
    _check_steps(layer, dtype, batch, steps)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, dtype, steps", [(8, torch.float16, [[5000, 0, 1, 129, 300, 4095, 9000, 17]]),
                                                 (3, torch.bfloat16, [[16384, 0, 4097]]),
                                                 (6, torch.float16, [[8191, 77, 0, 1, 4096, 300]]),
                                                 (1, torch.bfloat16, [[8191], [20000]])],
                         ids=["b8-f16", "b3-bf16-16k", "b6-f16-8k", "b1-bf16-8k-20k"])
def test_the_rule_s_shared_queries_at_qwen_s_long_caches_match_the_reference(batch, dtype, steps):
    """The launch rule's own shared split at Qwen2.5-7B's long caches (told the longest row): 28 clusters
    of 4 x 8 warps, one set, the next keys in flight, ragged with empty caches, and one sequence at 8K and
    20K rows; a row short of the long-cache rows the rule does not share."""
    weights = AttentionWeights.random(QWEN2_5_7B, dtype, "cuda", seed=53)
    layer = DecodeAttention(QWEN2_5_7B, weights)
    longest = max(steps[0]) + 1
    assert layer.shares_queries(batch, longest) and layer.shape(batch, longest) == (4, 8, 7)
    spec = layer.kernel_spec(dtype, batch, longest)
    assert spec.shared_queries and spec.split_positions and spec.batch_parts == 1 and spec.pipelined_kv
    assert not layer.shares_queries(batch, SHARED_QUERIES_ROWS[batch - 1] - 1)
    _check_steps(layer, dtype, batch, steps, hint=True)


@pytest.mark.gpu
@pytest.mark.parametrize("config, batch, dtype, options, steps", KV_ROWS_CASES)
def test_the_kv_rows_split_matches_the_reference(config, batch, dtype, options, steps):
    """``kernel_options={"split_kv_rows": True}`` on the rule's head splits (2; Qwen2.5-7B's 7 with its
    QKV bias) and a split of 4, GPT-J's RoPE in clusters of 4: the key's and the value's clusters
    rotate and append their heads, every cluster reads the heads it lacks back from the cache for
    the new token; ragged batches and empty caches; the flags left zero (``_check_steps``)."""
    layer = split_layer(KV_ROWS_OPTIONS, config, dtype, options, "cuda", 43)
    assert layer.kernel_spec(dtype, batch).kv_rows_split
    _check_steps(layer, dtype, batch, steps)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, batch, dtype, options, steps",
    [(LLAMA3_8B, 8, torch.float16, {"cluster_size": 8, "warps": 8, "head_split": 1},
      [[300, 41, 5, 0, 77, 6000, 16, 33], 4097]),
     (QWEN2_5_7B, 4, torch.bfloat16, {"cluster_size": 16, "warps": 8, "head_split": 1}, [[9000, 0, 17, 300], 1]),
     (LLAMA3_2_1B, 8, torch.float16, {"kernel_options": {"batch_parts": 4}}, [[0, 1, 2, 3, 1000, 20000, 7, 64]]),
     (QWEN2_5_7B, 4, torch.float16, {"cluster_size": 16, "head_split": 2, "kernel_options": {"split_positions": True}},
      [[5000, 0, 17, 300]]),
     (QWEN2_5_7B, 7, torch.float16, {"cluster_size": 16, "warps": 4, "kernel_options": {"batch_parts": 4}},
      [[17000, 0, 1, 129, 300, 4095, 9000], 16384]),
     (LLAMA3_8B, 5, torch.bfloat16, {"cluster_size": 8, "warps": 8, "kernel_options": {"batch_parts": 3}},
      [[300, 5000, 0, 17, 1]]),
     (LLAMA3_2_1B, 3, torch.float16, {"cluster_size": 16, "head_split": 2, "kernel_options": {"split_positions": True}},
      [[0, 7000, 33]])],
    ids=["llama3-8b-b8-f16", "qwen2.5-7b-b4-bf16", "llama3.2-1b-b8-four-sets", "qwen2.5-7b-b4-positions-split",
         "qwen2.5-7b-b7-f16-sets-2-2-2-1", "llama3-8b-b5-bf16-sets-2-2-1", "llama3.2-1b-b3-positions-split-sets-2-1"],
)
def test_a_batch_split_over_sets_of_clusters_matches_the_reference(config, batch, dtype, options, steps):
    """``kernel_options={"batch_parts": 2}`` (or 3, 4): each set of clusters steps its share of a ragged
    batch (empty caches, 20K beside a few rows) as the rule's one launch would, with the positions
    split too, and a last set with fewer sequences than the others (its phantoms write nothing);
    every output written and nothing past it, each set's counters left zero (``_check_steps``)."""
    options = dict(options)
    kernel_options = {"batch_parts": 2, **options.pop("kernel_options", {})}
    weights = AttentionWeights.random(config, dtype, "cuda", seed=41)
    layer = DecodeAttention(config, weights, kernel_options=kernel_options, **options)
    spec = layer.kernel_spec(dtype, batch)
    assert spec.step_batch == batch and spec.clusters == spec.batch_parts * spec.part_clusters
    assert spec.uneven == (batch % spec.batch_parts != 0)
    _check_steps(layer, dtype, batch, steps)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, batch, dtype, options, steps",
    [(QWEN2_5_7B, 8, torch.float16, {"cluster_size": 16, "warps": 4, "kernel_options": {"batch_parts": 4}},
      [[0, 1, 128, 129, 20000, 4095, 8191, 300], 16384]),
     (LLAMA3_8B, 8, torch.bfloat16, {"cluster_size": 8, "warps": 4, "kernel_options": {"batch_parts": 4}},
      [[33000, 0, 17, 300, 1, 129, 4096, 7]]),
     (LLAMA2_7B, 8, torch.float16, {"cluster_size": 2, "warps": 16}, [[3000, 0, 1, 128, 129, 10000, 77, 64]]),
     (SMALL["gqa-d64-gptj-c16"], 3, torch.bfloat16, {"cluster_size": 4, "kernel_options": {"queue_rows": 64}},
      [[300, 0, 5], 17, 0]),
     (LLAMA3_2_1B, 2, torch.float16, {"kernel_options": {"queue_rows": 4096}}, [[9000, 4096]]),
     (QWEN2_5_7B, 7, torch.bfloat16, {"cluster_size": 16, "warps": 4, "kernel_options": {"batch_parts": 4}},
      [[0, 129, 20000, 300, 1, 8191, 4095]])],
    ids=["qwen2.5-7b-b8-f16-four-sets", "llama3-8b-b8-bf16-four-sets", "llama2-7b-b8-f16", "gqa-d64-c4-b3-bf16",
         "llama3.2-1b-b2-f16-4096-rows", "qwen2.5-7b-b7-bf16-sets-2-2-2-1"],
)
def test_the_work_queue_matches_the_reference(config, batch, dtype, options, steps):
    """``kernel_options={"work_queue": True}``: chunks of every KV head taken by whichever warp is free,
    other clusters' states merged from device memory, on the rule's long-cache shapes (four sets of
    Qwen2.5-7B and Llama-3-8B, Llama-2-7B's 16-warp blocks) and small ones: empty caches, one row,
    a chunk and one row more, 33K beside 7 rows, a whole chunk of 4096; every output written, the
    queue's words left zero for the next step (``_check_steps``)."""
    options = dict(options)
    kernel_options = {"work_queue": True, **options.pop("kernel_options", {})}
    weights = AttentionWeights.random(config, dtype, "cuda", seed=47)
    layer = DecodeAttention(config, weights, head_split=1, kernel_options=kernel_options, **options)
    assert layer.kernel_spec(dtype, batch).work_queue
    _check_steps(layer, dtype, batch, steps)


@pytest.mark.gpu
def test_the_benchmark_times_kernel_options_beside_the_rule_and_records_them(tmp_path):
    """``clusterlab bench fused --spec default kv_pipeline=False`` in small: one row a kernel, each
    checked against the reference, the options and the driver in the results file."""
    import json

    from clusterlab.bench.fused import run_bench

    rows = run_bench(presets=("llama3.2-1b",), kv_lens=(1024,), batches=(2,), options=[{}, {"kv_pipeline": False}],
                     ragged=False, out_dir=tmp_path, tag="test")
    assert [r.options for r in rows] == ["", "kv_pipeline=False"]
    assert all(r.rel_err < 1e-2 and r.fused_us > 0.9 * r.floor_us for r in rows)
    record = json.loads((tmp_path / "fused_test.json").read_text())
    assert [r["options"] for r in record["rows"]] == ["", "kv_pipeline=False"] and record["driver"]


@pytest.mark.gpu
def test_the_benchmark_skips_the_lengths_where_the_rule_s_shape_refuses_the_options(tmp_path, capsys):
    """``--spec split_positions=True,shared_queries=True`` on the launch rule's shapes: Qwen2.5-7B's
    split of 7 at 1K takes the options and is timed; its long-cache shape at 8K (one cluster a KV
    head) refuses them and is skipped at that length, saying why, the run going on."""
    from clusterlab.bench.fused import run_bench

    rows = run_bench(presets=("qwen2.5-7b",), kv_lens=(1024, 8192), batches=(1,),
                     options=[{"split_positions": True, "shared_queries": True}], ragged=False, out_dir=tmp_path,
                     tag="test")
    assert [(r.kv_len, r.head_split, r.options) for r in rows] == [
        (1024, 7, "split_positions=True,shared_queries=True")]
    assert rows[0].rel_err < 1e-2
    assert ("qwen2.5-7b float16 batch 1 kv 8192: the rule's shape with [split_positions=True,shared_queries=True] "
            "skipped: ") in capsys.readouterr().out


@pytest.mark.gpu
def test_the_benchmark_compiles_ahead_in_processes_and_times_the_same_kernels(tmp_path, capsys, monkeypatch):
    """``--jobs 2``: two spawned processes compile the run's kernels into a fresh kernel cache, and the
    timing process loads them from it (its launchers compile nothing) and times the same rows."""
    from clusterlab import _numba_private
    from clusterlab.bench.fused import run_bench
    from clusterlab.fused.layer import kernel_launcher

    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", str(tmp_path / "kernels"))
    kernel_launcher.cache_clear()  # this process compiles nothing the workers did
    rows = run_bench(presets=("llama3.2-1b",), kv_lens=(256,), batches=(1, 2), variants=[(16, 4, 2), (16, 8, 1)],
                     ragged=False, out_dir=tmp_path, tag="test", jobs=2)
    assert "compiled the kernels of 4 configurations in" in capsys.readouterr().out
    assert [(r.batch, r.cluster_size, r.warps, r.head_split) for r in rows] == [
        (1, 16, 4, 2), (1, 16, 8, 1), (2, 16, 4, 2), (2, 16, 8, 1)]
    assert all(r.rel_err < 1e-2 for r in rows)
    weights = AttentionWeights.random(PRESETS["llama3.2-1b"], torch.float16, "cuda", seed=0)
    for row in rows:
        layer = DecodeAttention(PRESETS["llama3.2-1b"], weights, cluster_size=row.cluster_size, warps=row.warps,
                                head_split=row.head_split)
        assert _numba_private.cache_hits(kernel_launcher(layer.kernel_spec(torch.float16, row.batch)).kernel) == 1


@pytest.mark.gpu
def test_the_benchmark_skips_a_variant_a_batch_cannot_run(tmp_path, capsys):
    """A ``--variant`` with fewer warps than the batch has sequences is skipped with the reason,
    and the run goes on with the variants that can run it."""
    from clusterlab.bench.fused import run_bench

    rows = run_bench(presets=("llama3.2-1b",), kv_lens=(256,), batches=(8,), variants=[(16, 4, 2), (16, 8, 2)],
                     ragged=False, out_dir=tmp_path, tag="test")
    assert [(r.cluster_size, r.warps, r.head_split) for r in rows] == [(16, 8, 2)] and rows[0].rel_err < 1e-2
    assert "batch 8: variant 16x4x2 skipped: " in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config, options, positions, dtype",
    [(LLAMA3_8B, {}, [700], torch.float16), (LLAMA3_8B, {}, [5, 300, 0, 77], torch.bfloat16),
     (SMALL["gqa-d64-gptj-c16"], {"cluster_size": 4, "head_split": 2}, [3, 40, 0], torch.float16),
     (SMALL["mha-d128"], {"cluster_size": 8, "warps": 8}, [130, 5, 64, 9, 1, 0, 12, 300], torch.bfloat16),
     (LLAMA3_8B, {"kernel_options": {"split_positions": True}}, [5, 3000, 0, 77], torch.bfloat16),
     (QWEN2_5_7B, {"cluster_size": 16, "warps": 8, "head_split": 1, "kernel_options": {"batch_parts": 2}},
      [5, 3000, 0, 77], torch.bfloat16),
     (QWEN2_5_7B, {"cluster_size": 16, "warps": 8, "head_split": 1, "kernel_options": {"batch_parts": 2}},
      [5, 3000, 77], torch.float16)],
    ids=["llama3-8b-b1", "llama3-8b-b4-bf16", "gqa-split-b3", "mha-b8-bf16", "llama3-8b-b4-bf16-positions-split",
         "qwen2.5-7b-b4-batch-parts", "qwen2.5-7b-b3-sets-2-1"],
)
def test_a_handoff_step_computes_what_the_plain_step_does(config, options, positions, dtype):
    """``DecodeAttention.handoff`` against ``__call__`` on the same inputs: ``hidden`` as float32 sums
    (values no 16-bit type holds, so its rounding on the way in counts), the output's sums rounded
    as the plain step's ``out``, the same residual and cache rows, and the third buffer cleared."""
    weights = AttentionWeights.random(config, dtype, "cuda", seed=23)
    layer = DecodeAttention(config, weights, **options)
    batch = len(positions)
    gen = torch.Generator(device="cuda").manual_seed(29)
    sums = torch.randn(3, batch, config.hidden_size, generator=gen, device="cuda")
    sums[1].zero_()
    sums[2].fill_(float("nan"))
    residual = torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
    cache = KVCache.random(config, batch, max(positions) + 2, dtype, "cuda", seed=31)
    plain_cache = cache.clone()
    at = torch.tensor(positions, dtype=torch.int32, device="cuda")
    want = reference_step(config, weights, sums[0].to(dtype), residual, cache.clone(), positions)
    out, h = layer(sums[0].to(dtype), residual, plain_cache, at)
    got_h = layer.handoff(sums[0], residual, cache, at, sums_out=sums[1], clear=sums[2])
    torch.cuda.synchronize()
    assert relative_error(out, want.out) < TOLERANCE
    assert_rounds_like(sums[1], out)
    assert torch.equal(got_h, h) and torch.equal(cache.k, plain_cache.k) and torch.equal(cache.v, plain_cache.v)
    assert (sums[2] == 0).all()


#: Run in a process of its own: a trapped launch loses the CUDA context. Exits 3 where a wait that is
#: never met failed its launch (0.2 s limit) after the same kernel ran clean with its count met.
WAIT_SCRIPT = """
import sys
import numpy as np
from numba import cuda
from clusterlab.fused.kernel import wait_until

@cuda.jit
def waiter(words, count, done):
    if cuda.threadIdx.x == 0:
        wait_until(words, 0, count[0], 64, 200_000_000)
    done[cuda.blockIdx.x] = 1

words, done = cuda.to_device(np.array([2], np.int32)), cuda.device_array(4, np.int32)
waiter[4, 32](words, cuda.to_device(np.array([2], np.int32)), done)
cuda.synchronize()
assert (done.copy_to_host() == 1).all()
print("ran clean", flush=True)
try:
    waiter[4, 32](words, cuda.to_device(np.array([3], np.int32)), done)
    cuda.synchronize()
except Exception as exc:
    print("failed:", type(exc).__name__, exc, flush=True)
    sys.exit(3)
"""


@pytest.mark.gpu
def test_a_wait_for_other_clusters_that_never_ends_fails_the_launch_instead_of_hanging():
    """``wait_until``, the kernels' one wait for blocks of other clusters (the positions split's parts,
    the shared queries, the KV rows' flags, the work queue, MLA's one launch), traps past its limit."""
    done = subprocess.run([sys.executable, "-c", WAIT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "ran clean" in done.stdout


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


@pytest.mark.gpu
@pytest.mark.parametrize("preset, options", [("llama3-8b", {}), ("qwen2.5-7b", {}),
                                             ("qwen2.5-7b", {"split_positions": True}),
                                             ("llama3-8b", {"split_kv_rows": True}),
                                             ("qwen2.5-7b", {"work_queue": True})],
                         ids=["llama3-8b", "qwen2.5-7b", "qwen2.5-7b-positions-split", "llama3-8b-kv-rows-split",
                              "qwen2.5-7b-work-queue"])
def test_one_graph_replays_step_after_step_while_positions_advance_on_the_device(preset, options):
    """Decode-loop shape: positions live on the device and a kernel in the graph advances them (with
    the work queue, its words reset by each replay's last block for the next)."""
    config = PRESETS[preset]
    weights = AttentionWeights.random(config, torch.bfloat16, "cuda", seed=11)
    layer = DecodeAttention(config, weights, kernel_options=options,
                            **({"head_split": 1} if options.get("work_queue") else {}))
    hidden, residual, cache = _random_inputs(config, torch.bfloat16, 3, 2100, seed=12)
    positions = torch.tensor([5, 2000, 700], dtype=torch.int32, device="cuda")
    out = torch.full_like(hidden, float("nan"))
    layer(hidden, residual, cache.clone(), positions, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(hidden, residual, cache, positions, out=out)
        positions.add_(1)
    for step in range(4):
        at = [5 + step, 2000 + step, 700 + step]
        want = reference_step(config, weights, hidden, residual, cache.clone(), at)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert positions.tolist() == [a + 1 for a in at]
        assert relative_error(out, want.out) < TOLERANCE, f"step {step}"
        rows = torch.arange(3, device="cuda")
        assert relative_error(cache.k[rows, :, torch.tensor(at, device="cuda")], want.k) < TOLERANCE
