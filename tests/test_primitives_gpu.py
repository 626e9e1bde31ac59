"""On a Hopper GPU, ClusterReduce and ClusterGather equal the simulator bit for bit."""

import numpy as np
import pytest

from clusterlab import primitives, simulator
from clusterlab.tour import random_rows
from special_values import POISON_BITS, assert_same_values, rows_with_specials

pytestmark = pytest.mark.gpu

CLUSTER_SIZES = range(1, 17)
#: n = 1, odd, smaller than most clusters, not a multiple of the vector width, several per thread.
ROW_LENGTHS = (1, 3, 13, 256, 1027)
#: The steady reduces' too: rows the block's 256 threads fold a pair each (301: 150 pairs and a tail), and
#: rows whose two_shot chunks they fold so at N = 2 and 3 (777).
STEADY_ROW_LENGTHS = (*ROW_LENGTHS, 301, 777)


def poisoned(shape, dtype):
    """An output of ``shape`` on the GPU, every element a NaN no reduce or gather writes (:data:`POISON_BITS`)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    bits = {2: torch.int16, 4: torch.int32}[torch_dtype.itemsize]
    return torch.full(shape, POISON_BITS[dtype], dtype=bits, device="cuda").view(torch_dtype)


def assert_same_bits(got, expected, context):
    assert got.shape == expected.shape, context
    mismatched = np.flatnonzero(got.view(np.uint8) != expected.view(np.uint8))
    assert mismatched.size == 0, f"{context}: {mismatched.size} bytes differ, first at byte {mismatched[0]}"


@pytest.mark.parametrize("dtype", primitives.GPU_DTYPES)
@pytest.mark.parametrize("op", simulator.OPS)
@pytest.mark.parametrize("algorithm", simulator.REDUCE_ALGORITHMS)
def test_reduce_equals_simulator_bit_for_bit(algorithm, op, dtype):
    rng = np.random.default_rng()
    for size in CLUSTER_SIZES:
        for n in ROW_LENGTHS:
            x = random_rows(rng, size, n, dtype)
            expected, _ = simulator.cluster_reduce(x, op=op, algorithm=algorithm)
            out = primitives.cluster_reduce(x, op=op, algorithm=algorithm, out=poisoned(x.shape, dtype))
            assert_same_bits(primitives.to_numpy(out), expected, f"{algorithm} {op} {dtype} N={size} n={n}")


@pytest.mark.parametrize("size", (2, 3, 5, 8, 16))
def test_two_shot_equals_simulator_when_each_thread_runs_several_rounds(size):
    """n = 20003: two_shot's reduce-scatter runs two rounds of LOADS_IN_FLIGHT loads a thread (its
    rounds hold LOADS_IN_FLIGHT // N quads, so N = 3 and 5 leave loads unused) and its all-gather
    pushes several quads a thread into every peer, plus the row's tail of 3 elements."""
    rng = np.random.default_rng()
    x = random_rows(rng, size, 20003, "float32")
    expected, _ = simulator.cluster_reduce(x, op="sum", algorithm="two_shot")
    out = primitives.cluster_reduce(x, op="sum", algorithm="two_shot", out=poisoned(x.shape, "float32"))
    assert_same_bits(primitives.to_numpy(out), expected, f"two_shot N={size} n=20003")


@pytest.mark.parametrize("dtype", primitives.GPU_DTYPES)
@pytest.mark.parametrize("op", simulator.OPS)
def test_steady_reduce_equals_simulator_bit_for_bit(op, dtype):
    """Back-to-back operations at one cluster barrier each, a fresh input each: any read of a
    buffer a peer had already overwritten would change some operation's bits."""
    rng = np.random.default_rng()
    for size in CLUSTER_SIZES:
        for n in STEADY_ROW_LENGTHS:
            steps = int(rng.integers(2, 7))
            xs = np.stack([random_rows(rng, size, n, dtype) for _ in range(steps)])
            expected, _ = simulator.cluster_reduce_steady(xs, op=op)
            out = primitives.cluster_reduce_steady(xs, op=op, out=poisoned(xs.shape, dtype))
            assert_same_bits(primitives.to_numpy(out), expected, f"steady {op} {dtype} N={size} n={n} steps={steps}")


@pytest.mark.parametrize("dtype", primitives.GPU_DTYPES)
@pytest.mark.parametrize("algorithm", ["two_shot", "bulk_two_shot"])
def test_steady_two_shots_equal_simulator_bit_for_bit(algorithm, dtype):
    """Two barriers an operation (two_shot) or none (bulk_two_shot): a read of a row or chunk a peer
    had already overwritten, or a chunk pushed or gathered before its owner folded it, would change
    some operation's bits."""
    rng = np.random.default_rng()
    for size in CLUSTER_SIZES:
        for n in STEADY_ROW_LENGTHS:
            steps = int(rng.integers(2, 7))
            xs = np.stack([random_rows(rng, size, n, dtype) for _ in range(steps)])
            expected, _ = simulator.cluster_reduce_steady(xs, algorithm=algorithm)
            out = primitives.cluster_reduce_steady(xs, algorithm=algorithm, out=poisoned(xs.shape, dtype))
            assert_same_bits(primitives.to_numpy(out), expected,
                             f"steady {algorithm} {dtype} N={size} n={n} steps={steps}")


@pytest.mark.parametrize("op", simulator.OPS)
@pytest.mark.parametrize("size", (2, 5, 16))
def test_steady_two_shots_equal_simulator_on_long_rows(op, size):
    """n = 20003 over 6 operations: every thread pushes several quads into every peer (two_shot) and
    folds several quads (bulk_two_shot), plus the row's tail of 3 elements."""
    rng = np.random.default_rng()
    xs = np.stack([random_rows(rng, size, 20003, "float32") for _ in range(6)])
    for algorithm in ("two_shot", "bulk_two_shot"):
        expected, _ = simulator.cluster_reduce_steady(xs, op=op, algorithm=algorithm)
        out = primitives.cluster_reduce_steady(xs, op=op, algorithm=algorithm, out=poisoned(xs.shape, "float32"))
        assert_same_bits(primitives.to_numpy(out), expected, f"steady {algorithm} {op} N={size} n=20003")


@pytest.mark.parametrize("algorithm", ["direct", "two_shot"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op", simulator.OPS)
@pytest.mark.parametrize("size", (1, 2, 3, 16))
def test_steady_reduces_on_long_16_bit_rows_equal_simulator(algorithm, dtype, op, size):
    """n = 20003 over 4 operations: 10002 packed words, so every thread folds (and two_shot pushes) whole rounds
    of quads of words (``ceil(4 / N)`` at a time) and the last quads one by one, plus the tail word by word,
    the row's last word half padding."""
    rng = np.random.default_rng()
    xs = np.stack([random_rows(rng, size, 20003, dtype) for _ in range(4)])
    expected, _ = simulator.cluster_reduce_steady(xs, op=op, algorithm=algorithm)
    out = primitives.cluster_reduce_steady(xs, op=op, algorithm=algorithm, out=poisoned(xs.shape, dtype))
    assert_same_bits(primitives.to_numpy(out), expected, f"steady {algorithm} {op} {dtype} N={size} n=20003")


@pytest.mark.parametrize("dtype", primitives.GPU_DTYPES)
@pytest.mark.parametrize("op", simulator.OPS)
def test_reduces_keep_special_values_as_the_simulator_does(op, dtype):
    """±inf, ±0, NaN and overflowing sums through every single and steady reduce: inf - inf, NaN against a
    number in max/min, a -0.0 / +0.0 tie and a float16 sum past 65504 give the simulator's results."""
    rng = np.random.default_rng()
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf and sums past the range, as IEEE has them
        for size in (1, 2, 3, 8, 16):
            for n in (1, 13, 301):
                x = rows_with_specials(rng, (size, n), dtype, 0.25)
                for algorithm in simulator.REDUCE_ALGORITHMS:
                    expected, _ = simulator.cluster_reduce(x, op=op, algorithm=algorithm)
                    out = primitives.cluster_reduce(x, op=op, algorithm=algorithm, out=poisoned(x.shape, dtype))
                    assert_same_values(primitives.to_numpy(out), expected, f"{algorithm} {op} {dtype} N={size} n={n}")
                xs = rows_with_specials(rng, (3, size, n), dtype, 0.25)
                for algorithm in simulator.STEADY_BUFFERS:
                    expected, _ = simulator.cluster_reduce_steady(xs, op=op, algorithm=algorithm)
                    out = primitives.cluster_reduce_steady(xs, op=op, algorithm=algorithm, out=poisoned(xs.shape, dtype))
                    assert_same_values(primitives.to_numpy(out), expected,
                                       f"steady {algorithm} {op} {dtype} N={size} n={n}")


def test_steady_reduce_runs_many_clusters_independently():
    rng = np.random.default_rng()
    xs = np.stack([np.stack([random_rows(rng, 4, 300, "float32") for _ in range(5)]) for _ in range(3)])  # [3, 5, 4, n]
    out = primitives.to_numpy(primitives.cluster_reduce_steady(xs, out=poisoned(xs.shape, "float32")))
    for k in range(3):
        for c in range(5):
            expected, _ = simulator.cluster_reduce(xs[k, c], algorithm="direct")
            assert_same_bits(out[k, c], expected, f"operation {k}, cluster {c}")


@pytest.mark.parametrize("dtype", primitives.GPU_DTYPES)
@pytest.mark.parametrize("algorithm", simulator.GATHER_ALGORITHMS)
def test_gather_equals_simulator_bit_for_bit(algorithm, dtype):
    rng = np.random.default_rng()
    for size in CLUSTER_SIZES:
        for n in ROW_LENGTHS:
            x = random_rows(rng, size, n, dtype)
            expected, _ = simulator.cluster_gather(x, algorithm=algorithm)
            out = primitives.cluster_gather(x, algorithm=algorithm, out=poisoned(expected.shape, dtype))
            assert_same_bits(primitives.to_numpy(out), expected, f"{algorithm} {dtype} N={size} n={n}")


def test_each_algorithm_keeps_its_own_summation_order():
    # 1e8 + 1 rounds back to 1e8 in float32, so the three orders give three different sums.
    x = np.array([[1e8], [1.0], [-1e8], [1.0]], dtype=np.float32)
    expected = {"direct": 1.0, "bulk": 1.0, "ring": 0.0, "butterfly": 0.0}
    for algorithm, value in expected.items():
        out = primitives.to_numpy(primitives.cluster_reduce(x, algorithm=algorithm))
        simulated, _ = simulator.cluster_reduce(x, algorithm=algorithm)
        assert np.all(out == value) and np.array_equal(out, simulated), algorithm


@pytest.mark.parametrize("algorithm", simulator.REDUCE_ALGORITHMS)
def test_many_clusters_in_one_launch_reduce_independently(algorithm):
    rng = np.random.default_rng()
    x = rng.standard_normal((37, 6, 301)).astype(np.float32)
    out = primitives.to_numpy(primitives.cluster_reduce(x, op="max", algorithm=algorithm, out=poisoned(x.shape, "float32")))
    for c in range(x.shape[0]):
        expected, _ = simulator.cluster_reduce(x[c], op="max", algorithm=algorithm)
        assert_same_bits(out[c], expected, f"cluster {c}")


@pytest.mark.parametrize("algorithm", simulator.GATHER_ALGORITHMS)
def test_many_clusters_in_one_launch_gather_independently(algorithm):
    rng = np.random.default_rng()
    x = random_rows(rng, 5 * 16, 77, "bfloat16").reshape(5, 16, 77)
    out = primitives.to_numpy(primitives.cluster_gather(x, algorithm=algorithm, out=poisoned((5, 16, 16 * 77), "bfloat16")))
    for c in range(x.shape[0]):
        assert_same_bits(out[c], np.broadcast_to(x[c].reshape(1, -1), (16, 16 * 77)), f"cluster {c}")


@pytest.mark.parametrize("algorithm", simulator.REDUCE_ALGORITHMS)
def test_reduce_is_deterministic(algorithm):
    import torch

    x = torch.randn(64, 12, 999, device="cuda", dtype=torch.float16)
    first = primitives.cluster_reduce(x, algorithm=algorithm).clone()
    for _ in range(5):
        assert torch.equal(primitives.cluster_reduce(x, algorithm=algorithm).view(torch.int16), first.view(torch.int16))


def test_torch_tensor_input_stays_on_the_gpu_and_keeps_its_dtype():
    import torch

    x = torch.randn(8, 100, device="cuda", dtype=torch.bfloat16)
    out = primitives.cluster_reduce(x, op="sum", algorithm="butterfly")
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == x.shape
    reference = x.float().sum(0)
    assert torch.allclose(out[3].float(), reference, rtol=1e-2, atol=1e-2)


def test_auto_runs_the_algorithm_the_measured_table_chooses():
    from clusterlab.primitives.auto import choose_gather_algorithm, choose_reduce_algorithm

    rng = np.random.default_rng()
    for size, n in ((2, 64), (3, 1000), (8, 4096), (16, 256)):
        x = random_rows(rng, size, n, "float32")
        expected, _ = simulator.cluster_reduce(x, algorithm=choose_reduce_algorithm(size, 4 * n))
        assert_same_bits(primitives.to_numpy(primitives.cluster_reduce(x, algorithm="auto")), expected, f"N={size} n={n}")
        expected, _ = simulator.cluster_gather(x, algorithm=choose_gather_algorithm(size, 4 * n))
        assert_same_bits(primitives.to_numpy(primitives.cluster_gather(x, algorithm="auto")), expected, f"N={size} n={n}")


@pytest.mark.parametrize("algorithm", simulator.GATHER_ALGORITHMS)
def test_gather_of_exactly_48_kib_runs_beside_static_shared_memory(algorithm):
    # 12 rows of 1024 float32 fill the 48 KB a kernel gets without the opt-in; bulk's mbarrier
    # adds static shared memory on top, so the launcher must raise the limit.
    x = random_rows(np.random.default_rng(), 12, 1024, "float32")
    expected, _ = simulator.cluster_gather(x, algorithm=algorithm)
    assert_same_bits(primitives.to_numpy(primitives.cluster_gather(x, algorithm=algorithm)), expected, algorithm)
