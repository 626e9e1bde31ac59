"""Every benchmark kernel compiles for cc 9.0, ptxas assembles it for sm_90a, and it issues what it claims."""

import numpy as np
import pytest
from numba import types

from clusterlab import simulator
from clusterlab.bench import kernels
from clusterlab.toolchain import assemble, kernel_ptx

pytestmark = pytest.mark.ptx

I64 = types.int64
F32 = types.float32[:, ::1]
U16 = types.uint16[:, ::1]


def assembled(kernel, signature, **options):
    ptx = kernel_ptx(kernel, signature, **options)
    assembly = assemble(ptx)
    assert assembly.spill_bytes == 0, assembly.log
    return ptx


def test_barrier_loop_is_only_cluster_barriers():
    ptx = assembled(kernels.barrier_loop, (types.int32[::1], I64))
    assert "barrier.cluster.arrive.release" in ptx and "barrier.cluster.wait.acquire" in ptx
    assert "ld.shared" not in ptx


@pytest.mark.parametrize("spread", [False, True])
def test_dsmem_stream_issues_eight_128_bit_remote_loads_before_using_them(spread):
    options = {} if spread else {"launch_bounds": (1024, 1)}  # as the kernel's own decorator
    ptx = assembled(kernels.dsmem_read_stream(spread), (types.uint32[::1], I64, I64), **options)
    body = ptx[ptx.index("ld.shared::cluster.v4.b32"):]
    first_use = body.index("xor.b32")
    assert body[:first_use].count("ld.shared::cluster.v4.b32") == kernels.STREAM_LOADS_IN_FLIGHT


@pytest.mark.parametrize("algorithm", simulator.REDUCE_ALGORITHMS)
def test_reduce_loops_assemble(algorithm):
    ptx = assembled(kernels.reduce_loop_kernel(algorithm), (F32, F32, I64, I64, I64))
    assert "barrier.cluster.wait.acquire" in ptx


@pytest.mark.parametrize("algorithm, barriers, at_exit", [("direct", 1, 1), ("two_shot", 2, 0)])
@pytest.mark.parametrize("size", [2, 8])
def test_steady_reduce_loops_have_their_barriers_in_the_loop_and_at_exit_where_peers_read(algorithm, barriers, at_exit,
                                                                                          size):
    """``direct``'s peers read a block's row until a barrier after its last operation; past two_shot's
    k.b no peer touches a block (its all-gather pushes with 16-byte remote stores)."""
    ptx = assembled(kernels.steady_reduce_loop(algorithm, size), (F32, F32, I64, I64))
    assert ptx.count("barrier.cluster.arrive.release") == barriers + at_exit
    loads = ptx.count("ld.shared::cluster.v4.f32")
    assert loads and (algorithm == "two_shot" or loads % size == 0)
    assert ("st.shared::cluster.v4.f32" in ptx) == (algorithm == "two_shot")


@pytest.mark.parametrize("algorithm, barriers", [("direct", 2), ("two_shot", 2)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("size", [2, 8])
def test_steady_loops_move_16_bit_rows_packed(algorithm, barriers, dtype, size):
    """The 16-bit steady loops: direct's barrier an operation and the exit one, two_shot's two an operation;
    the rows' words pulled (16 bytes a load for the long rows, one per rank), no float32 row anywhere."""
    ptx = assembled(kernels.steady_reduce_loop(algorithm, size, dtype), (U16, U16, I64, I64))
    assert ptx.count("barrier.cluster.arrive.release") == barriers
    loads = ptx.count("ld.shared::cluster.v4.b32")
    assert loads and loads % size == 0
    assert ("st.shared::cluster.v4.b32" in ptx) == (algorithm == "two_shot")
    assert "ld.shared::cluster.v4.f32" not in ptx and "st.shared.f32" not in ptx


@pytest.mark.parametrize("size", [2, 8])
def test_steady_bulk_two_shot_loop_has_no_barrier_in_the_loop(size):
    ptx = assembled(kernels.steady_reduce_loop("bulk_two_shot", size), (F32, F32, I64, I64))
    assert ptx.count("barrier.cluster.arrive.release") == 2  # operation 0's (the mbarriers), the exit one
    assert "cp.async.bulk.shared::cluster.shared::cta" in ptx and "ld.shared::cluster" not in ptx


def test_push_variant_uses_st_async_and_mbarriers_and_no_barrier_per_operation():
    ptx = assembled(kernels.direct_push_loop, (F32, F32, types.int32[::1], I64, I64))
    assert ptx.count("barrier.cluster.arrive.release") == 2  # after mbarrier init, before exit
    for instruction in ("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32", "mbarrier.init",
                        "mbarrier.arrive.expect_tx", "mbarrier.arrive.release.cluster.shared::cluster",
                        "mbarrier.try_wait.parity.acquire.cluster"):
        assert instruction in ptx, instruction


@pytest.mark.parametrize("algorithm", sorted(kernels.GATHERS))
@pytest.mark.parametrize("storage", [np.float32, np.uint16])
def test_gather_loops_assemble(algorithm, storage):
    signature = (F32, F32, I64, I64, I64) if storage is np.float32 else (U16, U16, I64, I64, I64)
    ptx = assembled(kernels.gather_loop_kernel(algorithm, np.dtype(storage)), signature)
    if algorithm == "direct_v4":
        assert "ld.shared::cluster.v4.b32" in ptx and "st.shared::cluster.v4.b32" in ptx


def test_global_baselines_assemble_without_cluster_instructions():
    for kernel, signature in (
        (kernels.publish_partials, (F32, F32, I64)),
        (kernels.fold_kernel("float16"), (U16, U16, I64, I64)),
        (kernels.global_exchange_loop, (F32, types.float32[:, :, ::1], F32, types.int32[::1], I64, I64, I64)),
    ):
        ptx = assembled(kernel, signature)
        assert "shared::cluster" not in ptx and "barrier.cluster" not in ptx
    signature = (F32, types.float32[:, :, ::1], F32, types.int32[::1], I64, I64, I64)
    ptx = kernel_ptx(kernels.global_exchange_loop, signature)
    assert "atom.global.add" in ptx or "atom.add" in ptx
    assert "membar.gl" in ptx or "fence.sc.gpu" in ptx
