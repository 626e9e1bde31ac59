"""The cluster launcher: argument validation (CPU) and launches on a Hopper GPU (``gpu``)."""

import math
import re
import secrets

import numpy as np
import pytest
from numba import cuda, types

import clusterlab
from clusterlab import HopperRequired, gpu, ptx
from clusterlab.launch import ClusterKernel, cluster_sms, launch, max_active_clusters, validate_launch


@cuda.jit
def rank_plus(out, x, alpha):
    """out[i] = x[i] * alpha + cluster_rank(), one element per thread of a 1-D grid."""
    i = cuda.grid(1)
    if i < x.size:
        out[i] = x[i] * alpha + ptx.cluster_rank()


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def no_driver_allowed(monkeypatch):
    """Fail loudly if the launcher touches the GPU check before validating its arguments."""

    def touched():
        raise AssertionError("the driver was touched before the arguments were validated")

    monkeypatch.setattr(gpu, "require_hopper", touched)


# ---------------------------------------------------------------------------------------------
# CPU: validation before any driver call
# ---------------------------------------------------------------------------------------------


def test_sizes_normalise_to_xyz():
    assert validate_launch(8, 4, 128) == ((8, 1, 1), (4, 1, 1), (128, 1, 1), 0)
    assert validate_launch((4, 6, 2), (2, 3, 1), (8, 8, 4), 1024) == ((4, 6, 2), (2, 3, 1), (8, 8, 4), 1024)
    assert validate_launch([32], [16], [64], non_portable=True)[1] == (16, 1, 1)


@pytest.mark.parametrize(
    "grid, block, normalised",
    [
        (4, (32, 32), ((4, 1, 1), (32, 32, 1))),
        (4, 1024, ((4, 1, 1), (1024, 1, 1))),
        (4, (16, 16, 4), ((4, 1, 1), (16, 16, 4))),
        ((4, 65535), 32, ((4, 65535, 1), (32, 1, 1))),
        ((4, 1, 65535), 32, ((4, 1, 65535), (32, 1, 1))),
    ],
)
def test_the_limits_themselves_are_accepted(grid, block, normalised):
    """A block of exactly 1024 threads and 65535 blocks on grid axis y or z are allowed; one more is refused below."""
    grid3, _, block3, _ = validate_launch(grid, 4, block)
    assert (grid3, block3) == normalised


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(grid=6, cluster=4, block=32), r"grid=6 is not a whole number of clusters: axis x has 6 blocks, cluster=4 needs a multiple of 4"),
        (dict(grid=(4, 3), cluster=(2, 2), block=32), r"grid=\(4, 3\).*axis y has 3 blocks"),
        (dict(grid=34, cluster=17, block=32, non_portable=True), r"cluster=17: axis x must be between 1 and 16"),
        (dict(grid=32, cluster=(4, 4, 2), block=32, non_portable=True), r"cluster=\(4, 4, 2\) has 32 blocks"),
        (dict(grid=32, cluster=16, block=32), r"cluster=16 has 16 blocks; more than 8 .* pass non_portable=True"),
        (dict(grid=9, cluster=9, block=32), r"non_portable=True"),
        (dict(grid=8, cluster=4, block=2048), r"block=2048: axis x must be between 1 and 1024"),
        (dict(grid=8, cluster=4, block=(64, 32)), r"block=\(64, 32\) has 2048 threads; a block holds at most 1024"),
        (dict(grid=8, cluster=4, block=(41, 25)), r"block=\(41, 25\) has 1025 threads; a block holds at most 1024"),
        (dict(grid=8, cluster=4, block=(1, 1, 65)), r"block=\(1, 1, 65\): axis z must be between 1 and 64"),
        (dict(grid=8, cluster=4, block=128, shared_bytes=-1), r"shared_bytes=-1: must be a non-negative number of bytes"),
        (dict(grid=8, cluster=4, block=128, shared_bytes=1.5), r"shared_bytes=1.5"),
        (dict(grid=0, cluster=1, block=128), r"grid=0: axis x must be between 1"),
        (dict(grid=(1, 65536), cluster=1, block=128), r"grid=\(1, 65536\): axis y must be between 1 and 65535"),
        (dict(grid=(1, 1, 65536), cluster=1, block=128), r"grid=\(1, 1, 65536\): axis z must be between 1 and 65535"),
        (dict(grid=(1, 1, 1, 1), cluster=1, block=128), r"grid=\(1, 1, 1, 1\): give an int or 1 to 3 sizes"),
        (dict(grid=8.0, cluster=4, block=128), r"grid=8.0: sizes must be integers"),
        (dict(grid=8, cluster=True, block=128), r"cluster=True: sizes must be integers"),
        (dict(grid=8, cluster=0, block=128), r"cluster=0: axis x must be between 1 and 16"),
        (dict(grid=8, cluster=2, block=128, non_portable="yes"), r"non_portable='yes': must be True or False"),
        (dict(grid=8, cluster=2, block=128, dependent="yes"), r"dependent='yes': must be True or False"),
        (dict(grid=8, cluster=2, block=128, co_resident=1), r"co_resident=1: must be True or False"),
    ],
)
def test_invalid_configuration_is_a_value_error_naming_parameter_and_limit(kwargs, pattern, no_driver_allowed):
    with pytest.raises(ValueError, match=pattern):
        ClusterKernel(rank_plus, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        launch(rank_plus, **kwargs)


def test_non_kernels_are_type_errors(no_driver_allowed):
    @cuda.jit(device=True)
    def helper(x):
        return x

    with pytest.raises(TypeError, match="must be a @numba.cuda.jit kernel"):
        ClusterKernel(lambda: None, grid=2, cluster=2, block=32)
    with pytest.raises(TypeError, match="is a device function"):
        ClusterKernel(helper, grid=2, cluster=2, block=32)


def test_bad_stream_is_a_type_error(no_driver_allowed):
    with pytest.raises(TypeError, match="stream must be None"):
        ClusterKernel(rank_plus, grid=2, cluster=2, block=32, stream="default")
    with pytest.raises(ValueError, match="stream=-1"):
        ClusterKernel(rank_plus, grid=2, cluster=2, block=32, stream=-1)


def test_stream_objects_are_read_through_cuda_stream_protocol(monkeypatch):
    class FakeStream:
        def __cuda_stream__(self):
            return (0, 0xABC)

    seen = {}

    def stop():
        seen["checked"] = True
        raise HopperRequired("stop here")

    monkeypatch.setattr(gpu, "require_hopper", stop)
    with pytest.raises(HopperRequired):
        ClusterKernel(rank_plus, grid=2, cluster=2, block=32, stream=FakeStream())
    assert seen == {"checked": True}


@pytest.mark.parametrize(
    "problem",
    [
        "no NVIDIA driver: libcuda could not be loaded",
        "device 0 has compute capability 8.0; thread-block clusters need 9.0 or higher (Hopper)",
    ],
)
def test_valid_configuration_without_hopper_raises_hopper_required(monkeypatch, problem):
    monkeypatch.setattr(gpu, "hopper_problem", lambda: problem)
    with pytest.raises(HopperRequired, match=re.escape(problem)):
        ClusterKernel(rank_plus, grid=8, cluster=4, block=128)
    with pytest.raises(HopperRequired):
        max_active_clusters(rank_plus, (), cluster=4, block=128)


@pytest.mark.skipif(gpu.hopper_problem() is None, reason="this machine has a Hopper GPU")
def test_this_machine_without_hopper_gets_hopper_required():
    with pytest.raises(HopperRequired, match="a Hopper GPU is required"):
        clusterlab.launch(rank_plus, grid=8, cluster=4, block=128)


def test_public_names_are_exported():
    assert clusterlab.launch is launch
    assert clusterlab.ClusterKernel is ClusterKernel
    assert clusterlab.max_active_clusters is max_active_clusters


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

gpu_test = pytest.mark.gpu


def _expected_rank_plus(x, alpha, cluster_blocks, block_threads):
    """The kernel computes in float64 (alpha is a Python float) and stores float32."""
    ranks = (np.arange(x.size) // block_threads) % cluster_blocks
    return (x.astype(np.float64) * alpha + ranks).astype(np.float32)


@gpu_test
@pytest.mark.parametrize("cluster_blocks", [1, 2, 3, 4, 8, 16])
def test_torch_tensors_and_scalars(cluster_blocks, rng):
    import torch

    block, grid = 64, 2 * cluster_blocks
    n = grid * block - 5  # a ragged tail: the kernel's bounds check matters
    x = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).cuda()
    out = torch.full((n,), float("nan"), device="cuda")
    alpha = float(rng.uniform(0.5, 2.0))
    launch(rank_plus, grid=grid, cluster=cluster_blocks, block=block, non_portable=cluster_blocks > 8)(out, x, alpha)
    torch.cuda.synchronize()
    expected = _expected_rank_plus(x.cpu().numpy(), alpha, cluster_blocks, block)
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-6, atol=1e-7)


@gpu_test
def test_numba_device_arrays_and_numpy_scalars(rng):
    x_host = rng.standard_normal(512).astype(np.float32)
    x = cuda.to_device(x_host)
    out = cuda.to_device(np.full(512, np.nan, np.float32))
    launch(rank_plus, grid=8, cluster=2, block=64)(out, x, np.float32(3.0))
    cuda.synchronize()
    np.testing.assert_allclose(out.copy_to_host(), _expected_rank_plus(x_host, 3.0, 2, 64), rtol=1e-6, atol=1e-7)


@cuda.jit
def copy_2d(out, x):
    i, j = cuda.grid(2)
    if i < x.shape[0] and j < x.shape[1]:
        out[i, j] = x[i, j]


@gpu_test
@pytest.mark.parametrize("view", ["contiguous", "transposed", "strided"])
def test_strided_tensors_use_their_strides(view, rng):
    import torch

    base = torch.from_numpy(rng.standard_normal((48, 40), dtype=np.float32)).cuda()
    x = {"contiguous": base, "transposed": base.t(), "strided": base[::2, 1::3]}[view]
    out = torch.full(x.shape, float("nan"), device="cuda")
    grid = (math.ceil(x.shape[0] / 8) * 2, math.ceil(x.shape[1] / 8))
    launch(copy_2d, grid=grid, cluster=(2, 1), block=(8, 8))(out, x)
    torch.cuda.synchronize()
    assert torch.equal(out, x)


@cuda.jit
def fill_dynamic(out):
    """Every block fills its whole dynamic shared memory, then reads its peer's copy over DSMEM."""
    data = cuda.shared.array(0, types.float32)
    rank, size = ptx.cluster_rank(), ptx.cluster_size()
    n = data.shape[0]
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        data[i] = cuda.blockIdx.x * 1000003.0 + i
    ptx.cluster_sync()
    peer = (rank + 1) % size
    base = cuda.blockIdx.x * n
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        out[base + i] = ptx.remote_load(data, n - 1 - i, peer)
    ptx.cluster_sync()


@gpu_test
@pytest.mark.parametrize("shared_kib", [1, 47, 100, 200, 227])
def test_dynamic_shared_memory_beyond_48_kib(shared_kib):
    import torch

    shared_bytes = shared_kib * 1024
    n = shared_bytes // 4
    grid, cluster = 4, 2
    out = torch.full((grid * n,), float("nan"), device="cuda", dtype=torch.float64)
    launch(fill_dynamic, grid=grid, cluster=cluster, block=256, shared_bytes=shared_bytes)(out)
    torch.cuda.synchronize()
    blocks = np.arange(grid)
    peers = blocks - blocks % cluster + (blocks % cluster + 1) % cluster
    index = np.arange(n)[::-1]
    expected = (peers[:, None] * 1000003.0 + index[None, :]).astype(np.float32).ravel()
    np.testing.assert_array_equal(out.cpu().numpy(), expected)


@gpu_test
def test_shared_bytes_over_the_device_limit_is_a_value_error():
    with pytest.raises(ValueError, match=r"shared_bytes=300000 exceeds this GPU's limit of \d+ bytes"):
        launch(fill_dynamic, grid=2, cluster=2, block=32, shared_bytes=300_000)


@cuda.jit
def static_48k(out):
    big = cuda.shared.array(12288, types.float32)
    big[cuda.threadIdx.x] = cuda.threadIdx.x
    cuda.syncthreads()
    out[cuda.threadIdx.x] = big[cuda.blockDim.x - 1 - cuda.threadIdx.x]


@gpu_test
def test_static_plus_dynamic_shared_memory_over_the_limit_is_a_value_error():
    import torch

    out = torch.zeros(32, device="cuda")
    step = launch(static_48k, grid=2, cluster=2, block=32, shared_bytes=200 * 1024)
    with pytest.raises(ValueError, match=r"plus the kernel's 49152 bytes of static shared memory exceeds"):
        step(out)


@cuda.jit(launch_bounds=(64,))
def bounded(out):
    out[cuda.threadIdx.x] = 1.0


@gpu_test
def test_block_above_the_kernel_limit_is_a_value_error():
    import torch

    with pytest.raises(ValueError, match="allows at most"):
        launch(bounded, grid=2, cluster=2, block=128)(torch.zeros(128, device="cuda"))


@gpu_test
def test_host_arrays_are_type_errors():
    import torch

    step = launch(rank_plus, grid=2, cluster=2, block=32)
    with pytest.raises(TypeError, match="numpy arrays live in host memory"):
        step(np.zeros(64, np.float32), np.zeros(64, np.float32), 1.0)
    with pytest.raises(TypeError, match="tensor on the CPU"):
        step(torch.zeros(64), torch.zeros(64), 1.0)


@gpu_test
def test_launch_returns_a_cached_launcher_and_repeats_do_not_recompile():
    import torch

    first = launch(rank_plus, grid=8, cluster=4, block=32)
    assert launch(rank_plus, grid=8, cluster=4, block=32) is first
    x = torch.rand(256, device="cuda")
    out = torch.empty_like(x)
    for alpha in (1.0, 2.0, 3.0):
        first(out, x, alpha)
    compiled = len(rank_plus.overloads)
    first(out, x, 4.0)
    first(out, x + 1, 5.0)
    assert len(rank_plus.overloads) == compiled
    assert first.clusters == (2, 1, 1)


@gpu_test
def test_launch_from_a_thread_without_a_current_context(rng):
    """The first launch on a fresh thread finds no CUDA context current; the launcher makes it current."""
    import threading

    import torch

    x = torch.from_numpy(rng.standard_normal(256, dtype=np.float32)).cuda()
    out = torch.full_like(x, float("nan"))
    step = launch(rank_plus, grid=8, cluster=4, block=32)
    step(out, x, 1.0)  # compiled on this thread
    out.fill_(float("nan"))
    torch.cuda.synchronize()
    failures = []

    def worker():
        try:
            step(out, x, 2.0)
        except Exception as failure:  # reported below, on the test's thread
            failures.append(failure)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    torch.cuda.synchronize()
    assert not failures, failures
    np.testing.assert_allclose(out.cpu().numpy(), _expected_rank_plus(x.cpu().numpy(), 2.0, 4, 32), rtol=1e-6, atol=1e-7)


@cuda.jit
def where_am_i(out):
    """Per thread: blockIdx (x, y, z), cluster_idx, block_idx_in_cluster and rank, flattened."""
    bx, by, bz = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    gx, gy = cuda.gridDim.x, cuda.gridDim.y
    block = bx + gx * (by + gy * bz)
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0 and cuda.threadIdx.z == 0:
        cx, cy, cz = ptx.cluster_idx()
        ix, iy, iz = ptx.block_idx_in_cluster()
        out[block, 0] = cx
        out[block, 1] = cy
        out[block, 2] = cz
        out[block, 3] = ix
        out[block, 4] = iy
        out[block, 5] = iz
        out[block, 6] = ptx.cluster_rank()


@gpu_test
def test_three_dimensional_grid_counts_blocks():
    import torch

    grid, cluster = (4, 6, 2), (2, 3, 1)
    blocks = math.prod(grid)
    out = torch.full((blocks, 7), -1, dtype=torch.int64, device="cuda")
    launch(where_am_i, grid=grid, cluster=cluster, block=(4, 2, 2))(out)
    torch.cuda.synchronize()
    z, y, x = np.meshgrid(np.arange(grid[2]), np.arange(grid[1]), np.arange(grid[0]), indexing="ij")
    x, y, z = x.ravel(), y.ravel(), z.ravel()
    ix, iy, iz = x % cluster[0], y % cluster[1], z % cluster[2]
    expected = np.stack(
        [x // cluster[0], y // cluster[1], z // cluster[2], ix, iy, iz, ix + cluster[0] * (iy + cluster[1] * iz)], axis=1
    )
    np.testing.assert_array_equal(out.cpu().numpy(), expected)


@gpu_test
@pytest.mark.parametrize("cluster_blocks", [2, 8, 16])
def test_max_active_clusters(cluster_blocks):
    import torch

    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    args = (torch.empty(1, device="cuda"),)
    small = max_active_clusters(fill_dynamic, args, cluster=cluster_blocks, block=256, non_portable=True)
    large = max_active_clusters(
        fill_dynamic, args, cluster=cluster_blocks, block=256, shared_bytes=200 * 1024, non_portable=True
    )
    assert 0 < large <= small <= sms * 8 // cluster_blocks
    assert large <= sms // cluster_blocks  # 200 KB: one block per SM


@gpu_test
def test_cluster_sms_shrink_as_clusters_grow():
    """GPCs hold whole clusters: the larger the cluster, the fewer SMs a grid of them fills at one block an SM."""
    sms = [cluster_sms(size) for size in (1, 2, 4, 8, 16)]
    assert sms[0] == cuda.get_current_device().MULTIPROCESSOR_COUNT
    assert all(a >= b > 0 and b % size == 0 for a, b, size in zip(sms, sms[1:], (2, 4, 8, 16)))
    if sms[0] == 132:  # an H100 SXM or H200: what the placement study saw (benchmarks/results/placement_h200.json)
        assert sms == [132, 132, 120, 120, 112]


@pytest.mark.parametrize("cluster_size", [0, 17, 8.0, None])
def test_cluster_sms_refuses_what_is_not_a_cluster_size(cluster_size):
    with pytest.raises(ValueError, match=rf"cluster_size must be an int in 1..16, got {cluster_size!r}"):
        cluster_sms(cluster_size)  # before any GPU is looked for


@cuda.jit
def block_rank(out):
    """out[block] = the block's rank in its cluster."""
    if cuda.threadIdx.x == 0:
        out[cuda.blockIdx.x] = ptx.cluster_rank()


@gpu_test
def test_a_co_resident_grid_larger_than_fits_is_refused_before_it_launches():
    """``co_resident=True``: a grid of as many clusters as the occupancy query says fit runs; one
    cluster more raises on the first call, naming both counts, and launches nothing."""
    import torch

    shape = dict(cluster=16, block=256, shared_bytes=200 * 1024, non_portable=True)  # one block an SM
    fit = max_active_clusters(block_rank, (torch.empty(1, device="cuda"),), **shape)
    out = torch.full((16 * (fit + 1),), float("nan"), device="cuda")
    launch(block_rank, grid=16 * fit, co_resident=True, **shape)(out)
    torch.cuda.synchronize()
    assert torch.equal(out[: 16 * fit].cpu(), torch.arange(16 * fit, dtype=torch.float32) % 16)
    out.fill_(float("nan"))
    with pytest.raises(ValueError, match=f"co_resident=True but only {fit} of its {fit + 1} clusters fit"):
        launch(block_rank, grid=16 * (fit + 1), co_resident=True, **shape)(out)
    torch.cuda.synchronize()
    assert out.isnan().all()


@gpu_test
def test_graph_capture_and_replay(rng):
    import torch

    x = torch.from_numpy(rng.standard_normal(1024, dtype=np.float32)).cuda()
    out = torch.full_like(x, float("nan"))
    step = launch(rank_plus, grid=16, cluster=4, block=64)
    step(out, x, 2.0)  # warm-up: compiles and loads outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out, x, 2.0)
    for _ in range(2):
        fresh = rng.standard_normal(1024, dtype=np.float32)
        x.copy_(torch.from_numpy(fresh))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_allclose(out.cpu().numpy(), _expected_rank_plus(fresh, 2.0, 4, 64), rtol=1e-6, atol=1e-7)


@cuda.jit
def waits_then_doubles_plus_rank(out, x):
    """out = 2 * x + cluster rank, read after the previous kernel in the stream has completed."""
    ptx.grid_dependency_wait()
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = 2.0 * x[i] + ptx.cluster_rank()


@gpu_test
def test_graph_of_dependent_launches_replays_in_order(rng):
    """Three chained kernels launched with programmatic dependent launch, captured and replayed:
    each reads what the one before wrote."""
    import torch

    x = torch.from_numpy(rng.standard_normal(1024, dtype=np.float32)).cuda()
    a, b, c = (torch.full_like(x, float("nan")) for _ in range(3))
    step = launch(waits_then_doubles_plus_rank, grid=16, cluster=4, block=64, dependent=True)
    chain = [(a, x), (b, a), (c, b)]
    for out, src in chain:  # warm-up: compiles and loads outside the capture
        step(out, src)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for out, src in chain:
            step(out, src)
    rank = (np.arange(1024) // 64 % 4).astype(np.float32)
    for _ in range(2):
        fresh = rng.standard_normal(1024, dtype=np.float32)
        x.copy_(torch.from_numpy(fresh))
        for out in (a, b, c):
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = fresh
        for out in (a, b, c):
            expected = 2 * expected + rank
            np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-6, atol=1e-6)


def _ran_on(stream, run):
    """True if ``run()`` enqueued its kernel on ``stream``: it must wait behind a sleep there. A first
    ``run()`` compiles the kernel, whose seconds on the host would outlast the sleep."""
    import torch

    x = torch.rand(256, device="cuda")
    run(torch.empty_like(x), x)
    out = torch.full_like(x, float("nan"))
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the launch on ``stream``
    run(out, x)
    observer = torch.cuda.Stream()
    with torch.cuda.stream(observer):
        early = out.cpu()  # the observer stream is not ordered after ``stream``
    stream.synchronize()
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "the launch never wrote its output"
    return bool(torch.isnan(early).all())


@gpu_test
def test_default_stream_follows_torch_current_stream():
    import torch

    side = torch.cuda.Stream()
    step = launch(rank_plus, grid=8, cluster=4, block=32)

    def run(out, x):
        with torch.cuda.stream(side):
            step(out, x, 1.0)

    assert _ran_on(side, run)


@gpu_test
@pytest.mark.parametrize("kind", ["torch", "int", "numba"])
def test_explicit_stream(kind):
    import torch

    side = torch.cuda.Stream()
    stream = {"torch": side, "int": side.cuda_stream, "numba": cuda.external_stream(side.cuda_stream)}[kind]
    step = launch(rank_plus, grid=8, cluster=4, block=32, stream=stream)
    assert _ran_on(side, lambda out, x: step(out, x, 1.0))
