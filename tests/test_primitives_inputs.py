"""The GPU primitives reject bad input with a clear error before anything is launched."""

import ml_dtypes
import numpy as np
import pytest
import torch

from clusterlab import HopperRequired, primitives
from clusterlab.gpu import hopper_problem
from clusterlab.primitives.reduce import steady_result_offset, steady_shared_bytes, work_offset

rng = np.random.default_rng()


def rows(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: primitives.cluster_reduce(rows(4, 8), op="prod"), ValueError, "op must be one of"),
        (lambda: primitives.cluster_reduce(rows(4, 8), algorithm="tree"), ValueError, "algorithm must be one of"),
        (lambda: primitives.cluster_gather(rows(4, 8), algorithm="butterfly"), ValueError, "algorithm must be one of"),
        (lambda: primitives.cluster_reduce(rows(4, 8, dtype=np.float64)), TypeError, "x.dtype must be one of"),
        (lambda: primitives.cluster_gather(rows(4, 8).astype(np.int32)), TypeError, "x.dtype must be one of"),
        (lambda: primitives.cluster_reduce(torch.ones(4, 8, dtype=torch.int64)), TypeError, "x.dtype"),
        (lambda: primitives.cluster_reduce(torch.randn(4, 8)), ValueError, "CUDA tensor.*device cpu"),
        (lambda: primitives.cluster_reduce(rows(4 * 8).tolist()), TypeError, "torch CUDA tensor or a NumPy array"),
        (lambda: primitives.cluster_reduce(rows(32)), ValueError, r"\[cluster_size, n\]"),
        (lambda: primitives.cluster_gather(rows(2, 2, 2, 2)), ValueError, r"got shape \(2, 2, 2, 2\)"),
        (lambda: primitives.cluster_reduce(rows(17, 8)), ValueError, "cluster_size.*1..16; got 17"),
        (lambda: primitives.cluster_gather(rows(3, 0, 8)), ValueError, "cluster_size.*got 0"),
        (lambda: primitives.cluster_reduce(rows(4, 0)), ValueError, "at least one"),
        (lambda: primitives.cluster_reduce(rows(2, 30_000), algorithm="butterfly"), ValueError, "n=30000 needs"),
        (lambda: primitives.cluster_gather(rows(16, 4000)), ValueError, "n=4000 needs .* bytes"),
        (lambda: primitives.cluster_reduce_steady(rows(3, 4, 8), op="prod"), ValueError, "op must be one of"),
        (lambda: primitives.cluster_reduce_steady(rows(4, 8)), ValueError, r"\[steps, cluster_size, n\]"),
        (lambda: primitives.cluster_reduce_steady(rows(0, 4, 8)), ValueError, "steps >= 1; got \\(0, 4, 8\\)"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 4, 8, dtype=np.float64)), TypeError, r"xs\[0\]\.dtype must be"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 17, 8)), ValueError, "cluster_size.*1..16; got 17"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 2, 20_000)), ValueError, "n=20000 needs .* steady"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 4, 8), algorithm="ring"), ValueError,
         "algorithm must be one of"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 2, 40_000), algorithm="two_shot"), ValueError,
         "n=40000 needs .* steady two_shot"),
        (lambda: primitives.cluster_reduce_steady([[[1.0]]]), TypeError,
         "xs must be a torch CUDA tensor or a NumPy array; got list"),
        (lambda: primitives.cluster_reduce(rows(4, 8), out=[0.0] * 32), TypeError,
         "out must be None or a contiguous CUDA tensor; got list"),
        (lambda: primitives.cluster_gather(rows(4, 8), out=torch.empty(4, 32)), ValueError,
         "out must be a contiguous CUDA tensor; got a tensor on cpu"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 4, 8), out=np.empty((2, 4, 8), np.float32)), TypeError,
         "out must be None or a contiguous CUDA tensor; got ndarray"),
        (lambda: primitives.cluster_reduce(rows(4, 8).astype(">f4")), TypeError,
         r"x holds float32 in the other byte order \('>f4'\); the GPU reads its own"),
        (lambda: primitives.cluster_reduce_steady(rows(2, 2, 80_000, dtype=ml_dtypes.bfloat16), algorithm="two_shot"),
         ValueError, "n=80000 needs .* steady two_shot"),
        (lambda: primitives.steady_reduce_device_function("sum", 4, "bulk_two_shot", "bfloat16"), ValueError,
         "dtype must be 'float32' for the steady bulk_two_shot reduce .*; got 'bfloat16'"),
        (lambda: primitives.steady_reduce_device_function("sum", 4, "direct", "float64"), ValueError,
         "dtype must be one of"),
        # arguments that cannot be a cache key reach the checks, which name them
        (lambda: primitives.reduce_device_function(["ring"], "sum"), TypeError,
         r"algorithm must be a string, one of .*; got \['ring'\]"),
        (lambda: primitives.steady_reduce_device_function("sum", 4, ["direct"]), TypeError,
         r"algorithm must be a string, one of .*; got \['direct'\]"),
        (lambda: primitives.steady_reduce_device_function("sum", 4, "direct", ["float16"]), TypeError,
         r"dtype must be a string, one of .*; got \['float16'\]"),
        (lambda: primitives.steady_reduce_device_function({"sum"}, 4), TypeError, r"op must be a string"),
    ],
)
def test_bad_input_is_rejected_before_launch(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.skipif(hopper_problem() is None, reason="this machine has a Hopper GPU")
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_valid_input_without_a_gpu_asks_for_hopper(dtype):
    with pytest.raises(HopperRequired, match="a Hopper GPU is required"):
        primitives.cluster_reduce(rows(4, 8, dtype=dtype))
    with pytest.raises(HopperRequired):
        primitives.cluster_gather(rows(2, 3, 8, dtype=dtype), algorithm="bulk")
    with pytest.raises(HopperRequired):
        primitives.cluster_reduce_steady(rows(3, 2, 4, 8, dtype=dtype))


@pytest.mark.skipif(hopper_problem() is None, reason="this machine has a Hopper GPU")
def test_auto_is_an_accepted_algorithm():
    with pytest.raises(HopperRequired):
        primitives.cluster_reduce(rows(4, 256), algorithm="auto")
    with pytest.raises(HopperRequired):
        primitives.cluster_gather(rows(4, 256, dtype=np.float16), algorithm="auto")


def test_masked_arrays_are_refused():
    x = np.ma.masked_array(rows(4, 8), mask=False)
    for call in (primitives.cluster_reduce, primitives.cluster_gather, primitives.to_device):
        with pytest.raises(TypeError, match=r"x must be a plain NumPy array; got a masked array .*x.filled\(value\)"):
            call(x)
    with pytest.raises(TypeError, match=r"xs\[0\] must be a plain NumPy array; got a masked array .*xs\[0\].filled"):
        primitives.cluster_reduce_steady(np.ma.masked_array(rows(2, 4, 8), mask=False))


@pytest.mark.parametrize(
    ("x", "message"),
    [([1.0, 2.0], "x must be a NumPy array; got list"), (rows(2, 3, dtype=np.float64), "x.dtype must be one of")],
)
def test_to_device_checks_its_input(x, message):
    with pytest.raises(TypeError, match=message):
        primitives.to_device(x)


@pytest.mark.skipif(hopper_problem() is None, reason="this machine has a Hopper GPU")
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_to_device_without_a_gpu_asks_for_hopper(dtype):
    with pytest.raises(HopperRequired, match="a Hopper GPU is required"):
        primitives.to_device(rows(4, 8, dtype=dtype))


def test_reduce_device_function_names_the_operators_and_algorithms():
    with pytest.raises(ValueError, match=r"op must be one of \('sum', 'max', 'min'\); got 'avg'"):
        primitives.reduce_device_function("ring", "avg")
    with pytest.raises(ValueError, match=r"algorithm must be one of \('direct', 'ring', 'butterfly', 'bulk', 'two_shot', 'bulk_two_shot'\)"):
        primitives.reduce_device_function("tree", "sum")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: work_offset(-5), ValueError, r"n must be an integer >= 0; got -5"),
        (lambda: primitives.to_numpy(np.zeros(3)), TypeError, r"tensor must be a torch.Tensor \(a result on the GPU\), "
                                                              r"got ndarray"),
        (lambda: primitives.gather_stride("bulk", -5, 4), ValueError, r"n must be an integer >= 0; got -5"),
        (lambda: primitives.gather_stride("tree", 8, 4), ValueError, r"algorithm must be one of \('direct'"),
        (lambda: primitives.gather_stride("bulk", 8, 0), ValueError, r"itemsize must be an integer >= 1; got 0"),
        (lambda: primitives.reduce_scratch_elements("ring", 8, 0), ValueError, r"cluster_size must be .*1..16; got 0"),
        (lambda: primitives.reduce_scratch_elements("ring", 0, 4), ValueError, r"n must be an integer >= 1; got 0"),
        (lambda: primitives.reduce_scratch_elements("tree", 8, 4), ValueError, r"algorithm must be one of"),
        (lambda: steady_result_offset(5, "ring"), ValueError, r"algorithm must be one of \('direct'"),
        (lambda: steady_shared_bytes(-1, "direct", 2, "float16"), ValueError, r"n must be an integer >= 1; got -1"),
        (lambda: steady_shared_bytes(0, "two_shot", 2, "bfloat16"), ValueError, r"n must be an integer >= 1; got 0"),
        (lambda: steady_shared_bytes(1.5, "direct", 2, "float16"), TypeError, r"n must be an integer >= 1; got 1.5"),
    ],
)
def test_layout_helpers_check_their_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
    assert work_offset(5) == 8 and primitives.gather_stride("bulk", 5, 2) == 8


@pytest.mark.parametrize("algorithm", ["direct", "two_shot"])
def test_steady_reduces_keep_16_bit_rows_in_half_the_shared_memory(algorithm):
    """Packed two to a word, n float16 / bfloat16 elements take the shared memory of n / 2 float32 ones."""
    for n in (1, 37, 4099, 40_000):
        for dtype in ("float16", "bfloat16"):
            assert steady_shared_bytes(n, algorithm, 4, dtype) == steady_shared_bytes((n + 1) // 2, algorithm, 4)
    assert steady_shared_bytes(37, "bulk_two_shot", 4, "bfloat16") == steady_shared_bytes(37, "bulk_two_shot", 4)

