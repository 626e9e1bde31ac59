"""Bad inputs fail early with a message naming the parameter, the value and what is allowed."""

import numpy as np
import pytest

from clusterlab import simulator as sim

GOOD = np.ones((4, 8), dtype=np.float32)


@pytest.mark.parametrize("run", [sim.cluster_reduce, sim.cluster_gather])
def test_x_must_be_a_numpy_array(run):
    with pytest.raises(TypeError, match=r"x must be a NumPy array \[cluster_size, n\]; got list"):
        run([[1.0, 2.0]])


@pytest.mark.parametrize("run", [sim.cluster_reduce, sim.cluster_gather])
@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_x_must_be_two_dimensional(run, shape):
    with pytest.raises(ValueError, match=rf"x must be 2-D \[cluster_size, n\].*got shape {re_shape(shape)}"):
        run(np.ones(shape, dtype=np.float32))


def re_shape(shape):
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("run", [sim.cluster_reduce, sim.cluster_gather])
@pytest.mark.parametrize("size", [0, 17, 32])
def test_cluster_size_must_be_1_to_16(run, size):
    with pytest.raises(ValueError, match=rf"cluster_size \(x.shape\[0\]\) must be in 1..16; got {size}"):
        run(np.ones((size, 4), dtype=np.float32))


@pytest.mark.parametrize("run", [sim.cluster_reduce, sim.cluster_gather])
def test_rows_must_not_be_empty(run):
    with pytest.raises(ValueError, match=r"n \(x.shape\[1\]\) must be at least 1; got 0"):
        run(np.ones((4, 0), dtype=np.float32))


@pytest.mark.parametrize("run", [sim.cluster_reduce, sim.cluster_gather])
@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.bool_, np.uint32])
def test_dtype_must_be_one_of_the_supported(run, dtype):
    allowed = r"\('float32', 'float16', 'float64', 'int32', 'bfloat16'\)"
    with pytest.raises(TypeError, match=rf"x.dtype must be one of {allowed}; got '{np.dtype(dtype).name}'"):
        run(GOOD.astype(dtype))


def test_op_must_be_known():
    with pytest.raises(ValueError, match=r"op must be one of \('sum', 'max', 'min'\); got 'prod'"):
        sim.cluster_reduce(GOOD, op="prod")
    with pytest.raises(TypeError, match=r"op must be a string, one of \('sum', 'max', 'min'\); got None"):
        sim.cluster_reduce(GOOD, op=None)


def test_algorithm_must_be_known_for_each_primitive():
    reduce_allowed = r"\('direct', 'ring', 'butterfly', 'bulk'\)"
    with pytest.raises(ValueError, match=rf"algorithm must be one of {reduce_allowed}; got 'tree'"):
        sim.cluster_reduce(GOOD, algorithm="tree")
    gather_allowed = r"\('direct', 'ring', 'bulk'\)"
    with pytest.raises(ValueError, match=rf"algorithm must be one of {gather_allowed}; got 'butterfly'"):
        sim.cluster_gather(GOOD, algorithm="butterfly")


def test_dtype_names_map_to_numpy_and_back():
    for name in sim.DTYPES:
        assert sim.dtype_name(sim.numpy_dtype(name)) == name
    with pytest.raises(ValueError, match=r"dtype must be one of .*got 'float8'"):
        sim.numpy_dtype("float8")
    assert sim.accumulation_dtype(sim.numpy_dtype("bfloat16")) == np.float32


def idle(b):
    yield b.cluster_sync()


@pytest.mark.parametrize("size", [0, 17])
def test_launch_checks_the_cluster_size(size):
    with pytest.raises(ValueError, match=rf"cluster_size must be in 1..16; got {size}"):
        sim.launch(idle, size)
    with pytest.raises(TypeError, match=r"cluster_size must be an integer in 1..16; got 2.0"):
        sim.launch(idle, 2.0)


def test_launch_wants_a_generator_function():
    def not_a_generator(b):
        return None

    with pytest.raises(TypeError, match=r"program must be a generator function .* returned NoneType"):
        sim.launch(not_a_generator, 2)


def test_programs_yield_only_their_own_waits():
    def yields_garbage(b):
        yield 3

    with pytest.raises(TypeError, match=r"block 0's program yielded 3"):
        sim.launch(yields_garbage, 2)


def test_layouts_must_agree_between_blocks():
    def diverging(b):
        b.shared_array("rows", (4 + b.cluster_rank,), np.float32)
        yield b.cluster_sync()

    message = r"shared 'rows' is declared as float32\[5\] here but as float32\[4\]"
    with pytest.raises(ValueError, match=message):
        sim.launch(diverging, 2)
