"""On a Hopper GPU: the benchmark's own kernels compute what they claim, and a small sweep runs end to end."""

import json

import numpy as np
import pytest

from clusterlab import launch, simulator
from clusterlab.bench import kernels, run_primitives_bench
from clusterlab.primitives.gather import gather_stride
from clusterlab.primitives.host import THREADS_PER_BLOCK
from clusterlab.primitives.reduce import reduce_shared_bytes, steady_result_offset, work_offset

pytestmark = pytest.mark.gpu


def direct_folds(x, size, reps):
    """``reps`` rank-order float32 sums over groups of ``size`` rows of ``x`` [blocks, n], each the next input."""
    rows = x.astype(np.float32).reshape(-1, size, x.shape[1])
    for _ in range(reps):
        acc = rows[:, 0].copy()
        for s in range(1, size):
            acc = acc + rows[:, s]
        rows = np.repeat(acc[:, None], size, axis=1)
    return rows.reshape(x.shape)


@pytest.mark.parametrize("algorithm", simulator.REDUCE_ALGORITHMS)
@pytest.mark.parametrize("size", [2, 3, 8])
def test_reduce_loop_equals_the_simulator_applied_again_and_again(algorithm, size):
    """Three calls at one call site (``iteration`` 0, 1, 2: the bulk algorithms' mbarrier phases
    alternate), each result the next input, on two clusters: the bits of three simulator runs."""
    import torch

    n, reps = 301, 3
    rng = np.random.default_rng()
    x = rng.standard_normal((2 * size, n)).astype(np.float32)
    out = torch.full(x.shape, float("nan"), device="cuda")
    launch(kernels.reduce_loop_kernel(algorithm), grid=2 * size, cluster=size, block=THREADS_PER_BLOCK,
           shared_bytes=reduce_shared_bytes(algorithm, n, size))(torch.from_numpy(x).cuda(), out, n, work_offset(n), reps)
    want = x.reshape(2, size, n)
    for _ in range(reps):
        want = np.stack([simulator.cluster_reduce(cluster, op="sum", algorithm=algorithm)[0] for cluster in want])
    np.testing.assert_array_equal(out.cpu().numpy(), want.reshape(x.shape))


@pytest.mark.parametrize("algorithm", ["direct", "two_shot"])
@pytest.mark.parametrize("size", [1, 3, 8, 16])
@pytest.mark.parametrize("reps", [1, 2, 3])
@pytest.mark.parametrize("n", [301, 4099])
def test_steady_reduce_loops_equal_repeated_direct_folds(algorithm, size, reps, n):
    import torch

    rng = np.random.default_rng()
    x = rng.standard_normal((2 * size, n)).astype(np.float32)
    out = torch.full(x.shape, float("nan"), device="cuda")
    launch(kernels.steady_reduce_loop(algorithm, size), grid=2 * size, cluster=size, block=THREADS_PER_BLOCK,
           shared_bytes=4 * steady_result_offset(n), non_portable=size > 8)(torch.from_numpy(x).cuda(), out, n, reps)
    np.testing.assert_array_equal(out.cpu().numpy(), direct_folds(x, size, reps))


@pytest.mark.parametrize("algorithm", ["direct", "two_shot"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("size", [1, 3, 8, 16])
@pytest.mark.parametrize("reps", [1, 2, 3])
@pytest.mark.parametrize("n", [301, 4099])
def test_steady_loops_on_16_bit_rows_equal_the_simulator_applied_again_and_again(algorithm, dtype, size, reps, n):
    """The packed 16-bit loops: each result the next operation's rows, rounded each time, as ``reps``
    steady reduces of the simulator on two clusters."""
    import torch

    rng = np.random.default_rng()
    x = rng.standard_normal((2 * size, n)).astype(simulator.numpy_dtype(dtype))
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    out = torch.full(x.shape, float("nan"), dtype=torch_dtype, device="cuda").view(torch.uint16)
    launch(kernels.steady_reduce_loop(algorithm, size, dtype), grid=2 * size, cluster=size, block=THREADS_PER_BLOCK,
           shared_bytes=4 * steady_result_offset(n, "direct", dtype), non_portable=size > 8)(
        torch.from_numpy(x.view(np.uint16)).cuda(), out, n, reps)
    want = x.reshape(2, size, n)
    for _ in range(reps):
        want = np.stack([simulator.cluster_reduce_steady(cluster[None], algorithm=algorithm)[0][0] for cluster in want])
    np.testing.assert_array_equal(out.cpu().numpy(), want.reshape(x.shape).view(np.uint16))


@pytest.mark.parametrize("size", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("reps", [1, 2, 3, 6])
def test_push_variant_equals_repeated_direct_folds(size, reps):
    import torch

    n = 1028
    rng = np.random.default_rng()
    x = rng.standard_normal((3 * size, n)).astype(np.float32)
    out = torch.full(x.shape, float("nan"), device="cuda")
    failed = torch.zeros(1, dtype=torch.int32, device="cuda")
    launch(kernels.direct_push_loop, grid=3 * size, cluster=size, block=THREADS_PER_BLOCK,
           shared_bytes=(n + 2 * size * n) * 4, non_portable=size > 8)(torch.from_numpy(x).cuda(), out, failed, n, reps)
    assert int(failed.item()) == 0
    np.testing.assert_array_equal(out.cpu().numpy(), direct_folds(x, size, reps))


@pytest.mark.parametrize("reps", [1, 2, 5])
def test_grid_barrier_exchange_equals_repeated_direct_folds(reps):
    import torch

    size, blocks, n = 4, 32, 257
    rng = np.random.default_rng()
    x = rng.standard_normal((blocks, n)).astype(np.float32)
    out = torch.full(x.shape, float("nan"), device="cuda")
    buffers = torch.empty((2, blocks, n), device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    launch(kernels.global_exchange_loop, grid=blocks, cluster=1, block=THREADS_PER_BLOCK)(
        torch.from_numpy(x).cuda(), buffers, out, counter, n, size, reps
    )
    np.testing.assert_array_equal(out.cpu().numpy(), direct_folds(x, size, reps))
    assert int(counter.item()) == blocks * reps


@pytest.mark.parametrize("storage", [np.float32, np.uint16])
@pytest.mark.parametrize("variant", ["direct_v4", "bulk_split"])
def test_gather_variants_move_every_row(variant, storage):
    import torch

    size, n, reps = 6, 2600, 3  # rows of 10400 / 5200 bytes: several 4 KiB pieces, a short last one
    rng = np.random.default_rng()
    x = rng.integers(1, 60000, size=(3 * size, n)).astype(storage)
    out = torch.zeros((3 * size, size * n), dtype=torch.float32 if storage is np.float32 else torch.uint16,
                      device="cuda")
    stride = gather_stride(kernels.GATHER_LAYOUT[variant], n, x.itemsize)
    launch(kernels.gather_loop_kernel(variant, np.dtype(storage)), grid=3 * size, cluster=size,
           block=THREADS_PER_BLOCK, shared_bytes=size * stride * x.itemsize)(torch.from_numpy(x).cuda(), out, n,
                                                                              stride, reps)
    want = np.repeat(x.reshape(3, 1, size * n), size, axis=1).reshape(3 * size, size * n)
    np.testing.assert_array_equal(out.cpu().numpy(), want)


def test_small_sweep_writes_json_and_plots(tmp_path):
    results = run_primitives_bench(
        cluster_sizes=(1, 2, 3), message_bytes=(64, 4096), configs=("one",), repeats=5, out_dir=tmp_path,
        tag="test", progress=False,
    )
    saved = json.loads((tmp_path / "primitives_test.json").read_text())
    assert saved["system"]["gpu"] and saved["commit"] and saved["date"]
    assert [r for r in saved["measurements"] if "error" in r] == []
    assert all("latency_us" in r or "skipped" in r for r in saved["measurements"])
    assert all(r["latency_us"]["repeats"] == 5 for r in saved["measurements"] if "latency_us" in r)
    kinds = {r["kind"] for r in saved["floors"]}
    assert kinds == {"barrier", "launch", "dsmem_read", "copy"}
    assert {r["implementation"] for r in saved["measurements"]} >= {
        *simulator.REDUCE_ALGORITHMS, "direct_1barrier", "direct_push", "direct_v4",
        "bulk_split", "global_kernel_boundary", "global_grid_barrier", "torch",
    }
    assert results["targets"] and results["choice"]["reduce"]
    assert len(list(tmp_path.glob("primitives_*_test.png"))) == 4
