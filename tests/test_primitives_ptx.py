"""Every primitive kernel compiles for cc 9.0 and ptxas assembles it for sm_90a; no GPU needed."""

import numpy as np
import pytest
from numba import types

from clusterlab.primitives.gather import gather_kernel
from clusterlab.primitives.ops import GPU_DTYPES
from clusterlab.primitives.reduce import PUSH_WHILE_FOLDING, reduce_kernel, steady_reduce_kernel
from clusterlab.simulator import GATHER_ALGORITHMS, OPS, REDUCE_ALGORITHMS
from clusterlab.toolchain import assemble, kernel_ptx

pytestmark = pytest.mark.ptx

#: Instructions each algorithm must contain (beyond the cluster barrier every one issues).
EXPECTED = {
    "direct": ("mapa.shared::cluster", "ld.shared::cluster"),
    "ring": ("mapa.shared::cluster", "ld.shared::cluster"),
    "butterfly": ("mapa.shared::cluster", "ld.shared::cluster"),
    "bulk": ("mbarrier.init", "fence.proxy.async", "cp.async.bulk.shared::cluster", "mbarrier.try_wait.parity"),
    "two_shot": ("mapa.shared::cluster", "ld.shared::cluster.v4.f32", "st.shared::cluster.v4.f32"),  # 16 bytes a remote access
    "bulk_two_shot": ("mbarrier.init", "fence.proxy.async", "cp.async.bulk.shared::cluster", "mbarrier.try_wait.parity"),
}


def signature(storage):
    rows = storage[:, ::1]
    return (rows, rows, types.int64, types.int64)


def check(ptx, algorithm):
    for instruction in ("barrier.cluster.arrive", "barrier.cluster.wait", *EXPECTED[algorithm]):
        assert instruction in ptx, f"{algorithm}: {instruction} missing from the PTX"
    assert "st.local" not in ptx, f"{algorithm}: a register array went to local memory"
    assembly = assemble(ptx)
    assert assembly.spill_bytes == 0, assembly.log


@pytest.mark.parametrize("algorithm", REDUCE_ALGORITHMS)
@pytest.mark.parametrize("op", OPS)
def test_reduce_kernel_assembles(algorithm, op):
    check(kernel_ptx(reduce_kernel(algorithm, op, "float32"), signature(types.float32)), algorithm)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cluster_size", [1, 3, 16])
def test_steady_reduce_kernel_assembles_with_one_barrier_an_operation(op, cluster_size):
    """The loop over operations holds one cluster barrier (in the device function) and the exit one; the
    fold's loads of a row element are one per rank, unrolled (scalar for short rows, 8 bytes for rows up to
    twice the block, 16 bytes for longer ones)."""
    steps = types.float32[:, :, ::1]
    ptx = kernel_ptx(steady_reduce_kernel(op, "float32", cluster_size), (steps, steps, types.int64, types.int64))
    check(ptx, "direct")
    assert ptx.count("barrier.cluster.arrive") == 2 and ptx.count("barrier.cluster.wait") == 2
    # every copy of an element's fold (short rows, the tail of long ones) and of a quad's fold (however
    # often the compiler unrolls the loops over elements) loads each of the N ranks: no loop over ranks
    # (the sum's; max and min carry a NaN test a combine, and at N = 16 the compiler keeps part of
    # their loop over ranks rolled)
    loads = [ptx.count(f"ld.shared::cluster{width}.f32") for width in ("", ".v2", ".v4")]  # elements, pairs, quads
    assert loads[0] >= 2 * cluster_size and loads[1] >= cluster_size and loads[2] >= cluster_size
    if op == "sum":
        assert all(count % cluster_size == 0 for count in loads)


@pytest.mark.parametrize("algorithm", ["direct", "two_shot"])
@pytest.mark.parametrize("dtype", [d for d in GPU_DTYPES if d != "float32"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cluster_size", [1, 3, 8, 16])
def test_steady_kernels_keep_16_bit_rows_packed(algorithm, dtype, op, cluster_size):
    """float16 / bfloat16 rows stay two to a 32-bit word: the fold's remote loads move words (4, 8 and
    16 bytes: a word, two words, a quad of words a thread), one per rank, and round once with a packed
    ``cvt.rn``; the cluster barriers of float32 (direct: one an operation and the exit one; two_shot: two an
    operation), and two_shot pushes its words as wide as it loads them."""
    steps = types.uint16[:, :, ::1]
    ptx = kernel_ptx(steady_reduce_kernel(op, dtype, cluster_size, algorithm), (steps, steps, types.int64, types.int64))
    assert ptx.count("barrier.cluster.arrive") == 2 and ptx.count("barrier.cluster.wait") == 2
    pushes = [ptx.count(f"st.shared::cluster{width}") for width in (".u32", ".u64", ".v4.b32")]
    assert all(pushes) == (algorithm == "two_shot" and cluster_size > 1) and "st.shared::cluster.f32" not in ptx
    assert ".f32" not in "".join(line for line in ptx.splitlines() if "ld.shared::cluster" in line)
    loads = [ptx.count(f"ld.shared::cluster{width}") for width in (".u32", ".u64", ".v4.b32")]
    if op == "sum":  # every rank's load of a word or a pair unrolled, a quad's (8 values a rank) 8 ranks at least
        ranks = min(cluster_size, 8)
        assert loads[0] >= 2 * cluster_size and loads[1] >= cluster_size and loads[2] >= ranks
        assert loads[0] % cluster_size == 0 and loads[1] % cluster_size == 0 and loads[2] % ranks == 0
    else:  # max and min test each half for NaN: from N = 8 the compiler keeps part of a quad's loop over ranks
        assert all(loads)
    suffix = "f16" if dtype == "float16" else "bf16"
    assert f"cvt.rn.{suffix}x2.f32" in ptx
    assert "st.local" not in ptx, "a register array went to local memory"
    assembly = assemble(ptx)
    assert assembly.spill_bytes == 0, assembly.log


@pytest.mark.parametrize("cluster_size", [1, 3, 16])
def test_steady_two_shot_kernel_assembles_with_two_barriers_an_operation(cluster_size):
    """Two cluster barriers in the loop over operations (rows staged; chunks folded and pushed), none at exit."""
    steps = types.float32[:, :, ::1]
    ptx = kernel_ptx(steady_reduce_kernel("sum", "float32", cluster_size, "two_shot"),
                     (steps, steps, types.int64, types.int64))
    check(ptx, "two_shot" if cluster_size > 1 else "direct")  # a cluster of one has no peer to push to
    assert ptx.count("barrier.cluster.arrive") == 2 and ptx.count("barrier.cluster.wait") == 2
    # up to PUSH_WHILE_FOLDING blocks each quad is pushed as it is folded; beyond, a block barrier
    # separates the fold from the chunk's pushes
    assert ptx.count("bar.sync") == (cluster_size > PUSH_WHILE_FOLDING)
    assert "ld.shared::cluster.v4.f32" in ptx


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cluster_size", [2, 3, 16])
def test_steady_bulk_two_shot_kernel_assembles_with_no_barrier_an_operation(op, cluster_size):
    """The cluster barriers are operation 0's (publishing the mbarriers) and the exit one; each operation
    moves its chunks with bulk copies, each followed by a release arrival on the peer's mbarrier, and
    folds 16 bytes of shared memory a load."""
    steps = types.float32[:, :, ::1]
    ptx = kernel_ptx(steady_reduce_kernel(op, "float32", cluster_size, "bulk_two_shot"),
                     (steps, steps, types.int64, types.int64))
    check(ptx, "bulk_two_shot")
    assert ptx.count("barrier.cluster.arrive") == 2 and ptx.count("barrier.cluster.wait") == 2
    for instruction in ("mbarrier.arrive.release.cluster.shared::cluster", "mbarrier.try_wait.parity.acquire.cluster",
                        "ld.shared.v4.f32", "st.shared.v4.f32"):
        assert instruction in ptx, instruction


@pytest.mark.parametrize("dtype", [d for d in GPU_DTYPES if d != "float32"])
def test_half_precision_reduce_converts_with_cvt(dtype):
    ptx = kernel_ptx(reduce_kernel("ring", "sum", dtype), signature(types.uint16))
    suffix = "f16" if dtype == "float16" else "bf16"
    assert f"cvt.f32.{suffix}" in ptx and f"cvt.rn.{suffix}.f32" in ptx
    check(ptx, "ring")


@pytest.mark.parametrize("algorithm", GATHER_ALGORITHMS)
@pytest.mark.parametrize("storage", [types.float32, types.uint16])
def test_gather_kernel_assembles(algorithm, storage):
    check(kernel_ptx(gather_kernel(algorithm, np.dtype(str(storage))), signature(storage)), algorithm)
