"""Every intrinsic of clusterlab.ptx compiles for cc 9.0, emits its instruction, and ptxas accepts it.

NVVM copies inline asm into the PTX without reading it, so these tests assemble each kernel with
``ptxas -arch=sm_90a`` (the nvidia-cuda-nvcc wheel's): a typo in a PTX string fails here, on a
machine without a GPU. A missing ptxas fails too (PtxasNotFound), it never skips.
"""

import re
import textwrap
from pathlib import Path

import pytest
from numba import cuda, types

from clusterlab import ptx, toolchain
from clusterlab.toolchain import PtxasError, PtxasNotFound, assemble, kernel_ptx

pytestmark = pytest.mark.ptx

#: Arguments of every test kernel: outputs of each width, then inputs of each width.
SIGNATURE = (
    types.uint32[::1],
    types.uint64[::1],
    types.float32[::1],
    types.float64[::1],
    types.uint16[::1],
    types.uint32[::1],
    types.uint64[::1],
    types.float32[::1],
    types.float64[::1],
    types.uint16[::1],
)

#: intrinsic name -> (kernel body, text the PTX must contain). In a body, ``o32 o64 of32 of64 o16``
#: are outputs and ``i32 i64 if32 if64 i16`` inputs; ``smem`` is a static shared uint32 array.
CASES = {
    "cluster_rank": ("o32[0] = ptx.cluster_rank()", "mov.u32 %r1, %cluster_ctarank;"),
    "cluster_size": ("o32[0] = ptx.cluster_size()", "%cluster_nctarank;"),
    "cluster_idx": ("x, y, z = ptx.cluster_idx()\no32[0] = x + y + z", "%clusterid.z;"),
    "cluster_grid_dim": ("x, y, z = ptx.cluster_grid_dim()\no32[0] = x + y + z", "%nclusterid.y;"),
    "block_idx_in_cluster": ("x, y, z = ptx.block_idx_in_cluster()\no32[0] = x + y + z", "%cluster_ctaid.x;"),
    "cluster_dim": ("x, y, z = ptx.cluster_dim()\no32[0] = x + y + z", "%cluster_nctaid.z;"),
    "sm_id": ("o32[0] = ptx.sm_id()", "%smid;"),
    "global_timer": ("o64[0] = ptx.global_timer()", "%globaltimer;"),
    "clock64": ("o64[0] = ptx.clock64()", "%clock64;"),
    "is_explicit_cluster": ("o32[0] = 1 if ptx.is_explicit_cluster() else 2", "mov.pred p, %is_explicit_cluster;"),
    "cluster_arrive_release": ("ptx.cluster_arrive_release()", "barrier.cluster.arrive.release;"),
    "cluster_arrive_relaxed": ("ptx.cluster_arrive_relaxed()", "barrier.cluster.arrive.relaxed;"),
    "cluster_wait_acquire": ("ptx.cluster_wait_acquire()", "barrier.cluster.wait.acquire;"),
    "cluster_sync": ("ptx.cluster_sync()", "barrier.cluster.arrive.release; barrier.cluster.wait.acquire;"),
    "fence_acq_rel_cluster": ("ptx.fence_acq_rel_cluster()", "fence.acq_rel.cluster;"),
    "shared_address": ("o32[0] = ptx.shared_address(smem, i32[0])", "_cudapy_smem"),
    "map_shared": ("o32[0] = ptx.map_shared(i32[0], i32[1])", "mapa.shared::cluster.u32"),
    "ld_shared_cluster_u16": ("o16[0] = ptx.ld_shared_cluster_u16(i32[0])", "ld.shared::cluster.u16"),
    "ld_shared_cluster_i32": ("o32[0] = ptx.ld_shared_cluster_i32(i32[0])", "ld.shared::cluster.s32"),
    "ld_shared_cluster_u32": ("o32[0] = ptx.ld_shared_cluster_u32(i32[0])", "ld.shared::cluster.u32"),
    "ld_shared_cluster_i64": ("o64[0] = ptx.ld_shared_cluster_i64(i32[0])", "ld.shared::cluster.s64"),
    "ld_shared_cluster_u64": ("o64[0] = ptx.ld_shared_cluster_u64(i32[0])", "ld.shared::cluster.u64"),
    "ld_shared_cluster_f32": ("of32[0] = ptx.ld_shared_cluster_f32(i32[0])", "ld.shared::cluster.f32"),
    "ld_shared_cluster_f64": ("of64[0] = ptx.ld_shared_cluster_f64(i32[0])", "ld.shared::cluster.f64"),
    "ld_shared_cluster_v2_f32": (
        "a, b = ptx.ld_shared_cluster_v2_f32(i32[0])\nof32[0] = a\nof32[1] = b",
        "ld.shared::cluster.v2.f32",
    ),
    "ld_shared_cluster_v4_f32": (
        "a, b, c, d = ptx.ld_shared_cluster_v4_f32(i32[0])\nof32[0] = a + b + c + d",
        "ld.shared::cluster.v4.f32",
    ),
    "ld_shared_cluster_v4_b32": (
        "a, b, c, d = ptx.ld_shared_cluster_v4_b32(i32[0])\no32[0] = a ^ b ^ c ^ d",
        "ld.shared::cluster.v4.b32",
    ),
    "st_shared_cluster_u16": ("ptx.st_shared_cluster_u16(i32[0], i16[0])", "st.shared::cluster.u16"),
    "st_shared_cluster_i32": ("ptx.st_shared_cluster_i32(i32[0], i32[1])", "st.shared::cluster.s32"),
    "st_shared_cluster_u32": ("ptx.st_shared_cluster_u32(i32[0], i32[1])", "st.shared::cluster.u32"),
    "st_shared_cluster_i64": ("ptx.st_shared_cluster_i64(i32[0], i64[0])", "st.shared::cluster.s64"),
    "st_shared_cluster_u64": ("ptx.st_shared_cluster_u64(i32[0], i64[0])", "st.shared::cluster.u64"),
    "st_shared_cluster_f32": ("ptx.st_shared_cluster_f32(i32[0], if32[0])", "st.shared::cluster.f32"),
    "st_shared_cluster_f64": ("ptx.st_shared_cluster_f64(i32[0], if64[0])", "st.shared::cluster.f64"),
    "st_shared_cluster_v2_f32": ("ptx.st_shared_cluster_v2_f32(i32[0], if32[0], if32[1])", "st.shared::cluster.v2.f32"),
    "st_shared_cluster_v4_f32": (
        "ptx.st_shared_cluster_v4_f32(i32[0], if32[0], if32[1], if32[2], if32[3])",
        "st.shared::cluster.v4.f32",
    ),
    "st_shared_cluster_v4_b32": (
        "ptx.st_shared_cluster_v4_b32(i32[0], i32[1], i32[2], i32[3], i32[4])",
        "st.shared::cluster.v4.b32",
    ),
    "red_add_shared_cluster_f32": ("ptx.red_add_shared_cluster_f32(i32[0], if32[0])", "red.relaxed.cluster.shared::cluster.add.f32"),
    "red_add_shared_cluster_f64": ("ptx.red_add_shared_cluster_f64(i32[0], if64[0])", "red.relaxed.cluster.shared::cluster.add.f64"),
    "red_add_shared_cluster_i32": ("ptx.red_add_shared_cluster_i32(i32[0], i32[1])", "red.relaxed.cluster.shared::cluster.add.s32"),
    "red_add_shared_cluster_u32": ("ptx.red_add_shared_cluster_u32(i32[0], i32[1])", "red.relaxed.cluster.shared::cluster.add.u32"),
    "red_add_shared_cluster_u64": ("ptx.red_add_shared_cluster_u64(i32[0], i64[0])", "red.relaxed.cluster.shared::cluster.add.u64"),
    "red_max_shared_cluster_i32": ("ptx.red_max_shared_cluster_i32(i32[0], i32[1])", "red.relaxed.cluster.shared::cluster.max.s32"),
    "red_max_shared_cluster_u32": ("ptx.red_max_shared_cluster_u32(i32[0], i32[1])", "red.relaxed.cluster.shared::cluster.max.u32"),
    "red_min_shared_cluster_i32": ("ptx.red_min_shared_cluster_i32(i32[0], i32[1])", "red.relaxed.cluster.shared::cluster.min.s32"),
    "red_min_shared_cluster_u32": ("ptx.red_min_shared_cluster_u32(i32[0], i32[1])", "red.relaxed.cluster.shared::cluster.min.u32"),
    "atom_add_shared_cluster_f32": (
        "of32[0] = ptx.atom_add_shared_cluster_f32(i32[0], if32[0])",
        "atom.relaxed.cluster.shared::cluster.add.f32",
    ),
    "atom_add_shared_cluster_i32": (
        "o32[0] = ptx.atom_add_shared_cluster_i32(i32[0], i32[1])",
        "atom.relaxed.cluster.shared::cluster.add.s32",
    ),
    "atom_add_shared_cluster_u32": (
        "o32[0] = ptx.atom_add_shared_cluster_u32(i32[0], i32[1])",
        "atom.relaxed.cluster.shared::cluster.add.u32",
    ),
    "remote_load": ("sf = cuda.shared.array(64, float32)\nof32[0] = ptx.remote_load(sf, i32[0], i32[1])", "ld.shared::cluster.f32"),
    "remote_store": ("sf = cuda.shared.array(64, float32)\nptx.remote_store(sf, i32[0], i32[1], if32[0])", "st.shared::cluster.f32"),
    "remote_load_v4_f32": ("sf = cuda.shared.array(64, float32)\nof32[0], of32[1], of32[2], of32[3] = "
                           "ptx.remote_load_v4_f32(sf, 4 * i32[0], i32[1])", "ld.shared::cluster.v4.f32"),
    "remote_store_v4_f32": ("sf = cuda.shared.array(64, float32)\n"
                            "ptx.remote_store_v4_f32(sf, 4 * i32[0], i32[1], if32[0], if32[1], if32[2], if32[3])",
                            "st.shared::cluster.v4.f32"),
    "remote_add": ("sf = cuda.shared.array(64, float32)\nptx.remote_add(sf, i32[0], i32[1], if32[0])", "shared::cluster.add.f32"),
    "remote_max": ("ptx.remote_max(smem, i32[0], i32[1], i32[2])", "shared::cluster.max.u32"),
    "remote_min": ("ptx.remote_min(smem, i32[0], i32[1], i32[2])", "shared::cluster.min.u32"),
    "mbarrier_init": ("ptx.mbarrier_init(i32[0], i32[1])", "mbarrier.init.shared::cta.b64"),
    "fence_mbarrier_init_release_cluster": ("ptx.fence_mbarrier_init_release_cluster()", "fence.mbarrier_init.release.cluster;"),
    "mbarrier_arrive": ("o64[0] = ptx.mbarrier_arrive(i32[0])", "mbarrier.arrive.release.cta.shared::cta.b64"),
    "mbarrier_arrive_cluster": ("ptx.mbarrier_arrive_cluster(i32[0])", "mbarrier.arrive.release.cluster.shared::cluster.b64 _,"),
    "mbarrier_arrive_expect_tx": (
        "o64[0] = ptx.mbarrier_arrive_expect_tx(i32[0], i32[1])",
        "mbarrier.arrive.expect_tx.release.cta.shared::cta.b64",
    ),
    "mbarrier_expect_tx": ("ptx.mbarrier_expect_tx(i32[0], i32[1])", "mbarrier.expect_tx.relaxed.cta.shared::cta.b64"),
    "mbarrier_try_wait_parity": (
        "o32[0] = 3 if ptx.mbarrier_try_wait_parity(i32[0], i32[1]) else 4",
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64",
    ),
    "mbarrier_wait_parity": ("ptx.mbarrier_wait_parity(i32[0], i32[1])",
                             "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%r1], %r2; @!p bra"),
    "mbarrier_wait_parity_cta": ("ptx.mbarrier_wait_parity_cta(i32[0], i32[1])",
                                 "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%r1], %r2; @!p bra"),
    "fence_proxy_async_shared_cta": ("ptx.fence_proxy_async_shared_cta()", "fence.proxy.async.shared::cta;"),
    "fence_proxy_async_global": ("ptx.fence_proxy_async_global()", "fence.proxy.async.global;"),
    "bulk_copy_global_to_shared": (
        "ptx.bulk_copy_global_to_shared(ptx.shared_address(smem, 4 * i32[1]), i16, 8 * i32[0], i32[2], i32[3])",
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
    ),
    "bulk_copy_shared_to_cluster": (
        "ptx.bulk_copy_shared_to_cluster(i32[0], i32[1], i32[2], i32[3])",
        "cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes",
    ),
    "st_async_u32": ("ptx.st_async_u32(i32[0], i32[1], i32[2])", "st.async.shared::cluster.mbarrier::complete_tx::bytes.u32"),
    "st_async_f32": ("ptx.st_async_f32(i32[0], if32[0], i32[2])", "st.async.shared::cluster.mbarrier::complete_tx::bytes.f32"),
    "st_async_u64": ("ptx.st_async_u64(i32[0], i64[0], i32[2])", "st.async.shared::cluster.mbarrier::complete_tx::bytes.u64"),
    "st_async_f64": ("ptx.st_async_f64(i32[0], if64[0], i32[2])", "st.async.shared::cluster.mbarrier::complete_tx::bytes.f64"),
    "st_async_v2_f32": (
        "ptx.st_async_v2_f32(i32[0], if32[0], if32[1], i32[2])",
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32",
    ),
    "st_async_v4_f32": (
        "ptx.st_async_v4_f32(i32[0], if32[0], if32[1], if32[2], if32[3], i32[2])",
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32",
    ),
    "st_async_v4_b32": (
        "ptx.st_async_v4_b32(i32[0], i32[1], i32[2], i32[3], i32[4], i32[5])",
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32",
    ),
    "ld_global_nc_v4": ("a, b, c, d = ptx.ld_global_nc_v4(i16, 8 * i32[0])\no32[0] = a ^ b ^ c ^ d", "ld.global.nc.v4.b32"),
    "ld_global_nc_v4_no_allocate": (
        "a, b, c, d = ptx.ld_global_nc_v4_no_allocate(i32, 4 * i32[0])\no32[0] = a ^ b ^ c ^ d",
        "ld.global.nc.L1::no_allocate.L2::256B.v4.b32",
    ),
    "ld_global_nc_v4_policy": (
        "a, b, c, d = ptx.ld_global_nc_v4_policy(i32, 4 * i32[0], i64[0])\no32[0] = a ^ b ^ c ^ d",
        "ld.global.nc.L1::no_allocate.L2::cache_hint.v4.b32",
    ),
    "ld_relaxed_gpu_v4": (
        "a, b, c, d = ptx.ld_relaxed_gpu_v4(i32, 4 * i32[0])\no32[0] = a ^ b ^ c ^ d", "ld.relaxed.gpu.global.v4.b32",
    ),
    "prefetch_l2_bulk": ("ptx.prefetch_l2_bulk(i16, 8 * i32[0], 16 * i32[1])", "cp.async.bulk.prefetch.L2.global"),
    "cp_async_16": ("ptx.cp_async_16(ptx.shared_address(smem, 4 * i32[1]), i32, 4 * i32[0])",
                    "cp.async.cg.shared.global ["),
    "cp_async_commit": ("ptx.cp_async_commit()", "cp.async.commit_group;"),
    "trap": ("ptx.trap()", "trap;"),
    "grid_dependency_wait": ("ptx.grid_dependency_wait()", "griddepcontrol.wait;"),
    "launch_dependents": ("ptx.launch_dependents()", "griddepcontrol.launch_dependents;"),
    "cp_async_wait": ("ptx.cp_async_wait(3)", "cp.async.wait_group 3;"),
    "ld_shared_v4_b32": ("a, b, c, d = ptx.ld_shared_v4_b32(ptx.shared_address(smem, 4 * i32[0]))\no32[0] = a ^ b ^ c ^ d",
                         "ld.shared.v4.b32"),
    "ld_shared_v4_f32": ("a, b, c, d = ptx.ld_shared_v4_f32(ptx.shared_address(smem, 4 * i32[0]))\nof32[0] = a + b + c + d",
                         "ld.shared.v4.f32"),
    "st_shared_v4_f32": ("ptx.st_shared_v4_f32(ptx.shared_address(smem, 4 * i32[0]), if32[0], if32[1], if32[2], "
                         "if32[3])", "st.shared.v4.f32"),
    "l2_evict_first_policy": ("o64[0] = ptx.l2_evict_first_policy()", "createpolicy.fractional.L2::evict_first.b64"),
    "l2_evict_last_policy": ("o64[0] = ptx.l2_evict_last_policy()", "createpolicy.fractional.L2::evict_last.b64"),
    "f16_to_f32": ("of32[0] = ptx.f16_to_f32(i16[0])", "cvt.f32.f16"),
    "f32_to_f16": ("o16[0] = ptx.f32_to_f16(if32[0])", "cvt.rn.f16.f32"),
    "bf16_to_f32": ("of32[0] = ptx.bf16_to_f32(i16[0])", "cvt.f32.bf16"),
    "f32_to_bf16": ("o16[0] = ptx.f32_to_bf16(if32[0])", "cvt.rn.bf16.f32"),
    "f16x2_to_f32x2": ("a, b = ptx.f16x2_to_f32x2(i32[0])\nof32[0] = a\nof32[1] = b", "mov.b32 {lo, hi}"),
    "bf16x2_to_f32x2": ("a, b = ptx.bf16x2_to_f32x2(i32[0])\nof32[0] = a\nof32[1] = b", "and.b32 hi, %r1, 0xFFFF0000;"),
    "f32x2_to_f16x2": ("o32[0] = ptx.f32x2_to_f16x2(if32[0], if32[1])", "cvt.rn.f16x2.f32"),
    "f32x2_to_bf16x2": ("o32[0] = ptx.f32x2_to_bf16x2(if32[0], if32[1])", "cvt.rn.bf16x2.f32"),
    "permute_bytes": ("o32[0] = ptx.permute_bytes(i32[0], i32[1], i32[2])", "prmt.b32"),
    "ex2_approx_ftz": ("of32[0] = ptx.ex2_approx_ftz(if32[0])", "ex2.approx.ftz.f32"),
    "mma_f16_m16n8k16": ("a, b, c, d = ptx.mma_f16_m16n8k16(i32[0], i32[1], i32[2], i32[3], i32[4], i32[5], if32[0], "
                         "if32[1], if32[2], if32[3])\nof32[0] = a + b + c + d",
                         "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
    "mma_bf16_m16n8k16": ("a, b, c, d = ptx.mma_bf16_m16n8k16(i32[0], i32[1], i32[2], i32[3], i32[4], i32[5], "
                          "if32[0], if32[1], if32[2], if32[3])\nof32[0] = a + b + c + d",
                          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"),
}

_TEMPLATE = """\
def kernel(o32, o64, of32, of64, o16, i32, i64, if32, if64, i16):
    smem = cuda.shared.array(64, uint32)
{body}
"""


def make_kernel(body):
    """A Python function with the SIGNATURE arguments whose body is ``body``."""
    scope = {"cuda": cuda, "ptx": ptx, "types": types, "uint32": types.uint32, "float32": types.float32}
    exec(_TEMPLATE.format(body=textwrap.indent(body, "    ")), scope)
    return scope["kernel"]


def compile_and_assemble(body):
    source = kernel_ptx(make_kernel(body), SIGNATURE)
    return source, assemble(source)


def test_every_intrinsic_has_a_case():
    assert set(CASES) == set(ptx.__all__)


def test_every_intrinsic_runs_in_a_gpu_test_kernel():
    """Each public intrinsic appears in a kernel of ``test_intrinsics_gpu.py``, which runs them on a
    Hopper GPU; read from its source here, so that one without a GPU test fails without a GPU."""
    source = (Path(__file__).parent / "test_intrinsics_gpu.py").read_text()
    used = set(re.findall(r"ptx\.(\w+)", source))
    assert set(ptx.__all__) <= used, sorted(set(ptx.__all__) - used)


@pytest.mark.parametrize("name", sorted(CASES))
def test_intrinsic_compiles_and_assembles(name):
    body, expected = CASES[name]
    source, assembly = compile_and_assemble(body)
    assert expected in source, f"{name}: {expected!r} not in the PTX"
    assert assembly.cubin, f"{name}: ptxas produced no cubin"


def test_shared_address_needs_no_generic_round_trip():
    """A static shared array's address is its .shared symbol: no cvta between windows."""
    source, _ = compile_and_assemble("o32[0] = ptx.map_shared(ptx.shared_address(smem, i32[0]), i32[1])")
    assert "mov.u64 \t%rd" in source and "_cudapy_smem" in source
    assert "cvta.shared" not in source and "cvta.to.shared" not in source


@pytest.mark.parametrize(
    "body",
    [
        "a, b, c, d = ptx.ld_global_nc_v4(i32, types.int64(i64[0]) - 8)\no32[0] = a ^ b ^ c ^ d",
        "of32[0] = ptx.remote_load(cuda.shared.array(64, float32), types.int64(i64[0]) - 8, i32[0])",
    ],
    ids=["global", "cluster"],
)
def test_a_signed_index_counts_from_the_start_of_the_array_with_no_wrap_around(body):
    """numba would add the array's length to a negative index: a compare and a select at every access
    (or a shift right by 63 and a mask). The intrinsics address ``array[index]`` from the start, as PTX does."""
    source, _ = compile_and_assemble(body)
    assert not re.search(r"setp\.\w+\.s64|selp\.b64|shr\.s64", source), "the index wraps around"


#: shared array dtype -> PTX type of its remote loads and stores.
_REMOTE_DTYPES = {
    "float16": "b16",
    "uint16": "u16",
    "int16": "s16",
    "int32": "s32",
    "uint32": "u32",
    "int64": "s64",
    "uint64": "u64",
    "float32": "f32",
    "float64": "f64",
}


@pytest.mark.parametrize("dtype", sorted(_REMOTE_DTYPES))
def test_remote_load_and_store_dispatch_on_dtype(dtype):
    ptx_type = _REMOTE_DTYPES[dtype]
    body = (
        f"s = cuda.shared.array(64, types.{dtype})\n"
        "v = ptx.remote_load(s, i32[0], i32[1])\n"
        "ptx.remote_store(s, i32[2], i32[3], v)"
    )
    source = kernel_ptx(make_kernel(body), SIGNATURE)
    assert f"ld.shared::cluster.{ptx_type}" in source
    assert f"st.shared::cluster.{ptx_type}" in source
    assemble(source)


@pytest.mark.parametrize(
    "op, dtype, ptx_type",
    [
        ("add", "float32", "f32"),
        ("add", "float64", "f64"),
        ("add", "int32", "s32"),
        ("add", "uint32", "u32"),
        ("add", "int64", "u64"),
        ("add", "uint64", "u64"),
        ("max", "int32", "s32"),
        ("max", "uint32", "u32"),
        ("min", "int32", "s32"),
        ("min", "uint32", "u32"),
    ],
)
def test_remote_reductions_dispatch_on_dtype(op, dtype, ptx_type):
    body = f"s = cuda.shared.array(64, types.{dtype})\nptx.remote_{op}(s, i32[0], i32[1], i32[2])"
    source = kernel_ptx(make_kernel(body), SIGNATURE)
    assert f"red.relaxed.cluster.shared::cluster.{op}.{ptx_type}" in source
    assemble(source)


def test_remote_access_on_a_2d_shared_array_takes_a_tuple_index():
    body = (
        "s = cuda.shared.array((4, 8), types.float32)\n"
        "of32[0] = ptx.remote_load(s, (i32[0], i32[1]), i32[2])"
    )
    source, _ = compile_and_assemble(body)
    assert "ld.shared::cluster.f32" in source


@pytest.mark.parametrize(
    "body, message",
    [
        ("ptx.remote_max(cuda.shared.array(8, float32), 0, 1, 2.0)", "remote_max: arrays of float32 are not supported"),
        ("ptx.remote_min(cuda.shared.array(8, types.int64), 0, 1, 2)", "remote_min: arrays of int64 are not supported"),
        ("ptx.remote_load(smem, 0.5, 1)", "index must be an integer"),
        ("ptx.remote_load(smem, 0, 1.0)", "rank must be an integer"),
        ("o32[0] = ptx.map_shared(if32[0], 1)", "map_shared: argument 0 must be an integer"),
        ("ptx.shared_address(cuda.shared.array((2, 2), uint32), 0)", "2-d array needs a tuple of 2 indices"),
        ("ptx.cp_async_wait(i32[0])", "cp_async_wait: the number of pending groups must be a compile-time constant"),
    ],
)
def test_misuse_is_a_typing_error_naming_the_intrinsic(body, message):
    # numba raises its own TypingError class, or numba-cuda's when numba proper is absent.
    with pytest.raises(Exception, match=message) as failure:
        kernel_ptx(make_kernel(body), SIGNATURE)
    assert type(failure.value).__name__ == "TypingError"


def test_a_typo_in_ptx_text_fails_at_ptxas():
    """The safety net of this file: ptxas, not NVVM, is what catches a misspelt instruction."""
    good, _ = compile_and_assemble("o32[0] = ptx.map_shared(i32[0], i32[1])")
    bad = good.replace("mapa.shared::cluster.u32", "mapa.shared::clustr.u32")
    assert bad != good
    with pytest.raises(PtxasError, match="ptxas"):
        assemble(bad)


def test_assembly_reports_registers_and_spills():
    _, assembly = compile_and_assemble("o32[0] = ptx.cluster_rank()")
    assert assembly.registers > 0
    assert assembly.spill_bytes == 0


def test_assembly_reports_its_machine_code_in_whole_instructions_and_more_for_more_work():
    _, one = compile_and_assemble("o32[0] = ptx.cluster_rank()")
    _, two = compile_and_assemble("o32[0] = ptx.cluster_rank()\no32[1] = ptx.map_shared(i32[0], i32[1])")
    assert one.code_bytes > 0 and one.code_bytes % 16 == 0  # Hopper instructions are 16 bytes
    assert two.code_bytes > one.code_bytes


def test_missing_ptxas_is_an_error_with_instructions(monkeypatch):
    monkeypatch.setattr(toolchain, "_wheel_ptxas", lambda: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(toolchain, "_DEFAULT_TOOLKIT_PTXAS", toolchain.Path("/nonexistent/ptxas"))
    toolchain.find_ptxas.cache_clear()
    try:
        with pytest.raises(PtxasNotFound, match="nvidia-cuda-nvcc"):
            toolchain.find_ptxas()
    finally:
        toolchain.find_ptxas.cache_clear()


def test_kernel_ptx_targets_hopper_and_accepts_dispatchers():
    @cuda.jit
    def kernel(out):
        out[0] = ptx.cluster_size()

    source = kernel_ptx(kernel, (types.uint32[::1],))
    assert ".target sm_90" in source
