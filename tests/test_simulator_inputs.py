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
    reduce_allowed = r"\('direct', 'ring', 'butterfly', 'bulk', 'two_shot', 'bulk_two_shot'\)"
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
    with pytest.raises(TypeError, match=r"program must be a generator function taking the block .* got NoneType"):
        sim.launch(None, 2)


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


@pytest.mark.parametrize("call, error, words", [
    (lambda b, bar, fresh: b.mbarrier_init(fresh, True), ValueError,
     "arrival_count must be an integer in 1..1048575; got True"),
    (lambda b, bar, fresh: b.mbarrier_wait(bar, True), ValueError, "phase_parity must be 0 or 1; got True"),
    (lambda b, bar, fresh: b.mbarrier_wait(bar, 0.0), ValueError, "phase_parity must be 0 or 1; got 0.0"),
    (lambda b, bar, fresh: b.mbarrier_wait(bar, np.float64(1.0)), ValueError,
     "phase_parity must be 0 or 1; got np.float64(1.0)"),
    (lambda b, bar, fresh: b.mbarrier_arrive_expect_tx(bar, True), ValueError,
     "tx_bytes must be an integer in 0..1048575"),
    (lambda b, bar, fresh: b.shared_array("rows", (True, 4), np.float32), ValueError,
     "shape of shared array 'rows' must be non-negative integers"),
    (lambda b, bar, fresh: b.shared_array("rows", 4, "foo"), TypeError,
     "dtype of shared array 'rows' must be a NumPy dtype"),
    (lambda b, bar, fresh: b.shared_array("rows", 4, object), TypeError,
     "dtype of shared array 'rows' must hold plain bytes"),
])
def test_block_operations_refuse_bools_and_dtypes_that_are_no_bytes(call, error, words):
    """``True`` is an int to Python (1) and to NumPy's ``in``, and ``0.0`` equals 0: never an arrival count, a
    parity, a byte count or an extent here."""

    def program(b):
        bar, fresh = b.shared_mbarrier("bar"), b.shared_mbarrier("fresh")
        b.mbarrier_init(bar, 1)
        call(b, bar, fresh)
        yield b.cluster_sync()

    with pytest.raises(error) as info:
        sim.launch(program, 1)
    assert words in str(info.value)


@pytest.mark.parametrize("name, least, call", [
    ("arrival_count", 1, lambda b, bar, fresh, count: b.mbarrier_init(fresh, count)),
    ("tx_bytes", 0, lambda b, bar, fresh, count: b.mbarrier_arrive_expect_tx(bar, count)),
], ids=["arrival_count", "tx_bytes"])
def test_mbarrier_counts_reach_ptx_limit_and_no_further(name, least, call):
    """PTX's mbarrier counts go up to 2**20 - 1: that count is taken, one more is refused."""

    def program(b, count):
        bar, fresh = b.shared_mbarrier("bar"), b.shared_mbarrier("fresh")
        b.mbarrier_init(bar, 1)
        call(b, bar, fresh, count)
        yield b.cluster_sync()

    sim.launch(program, 1, 2**20 - 1)
    with pytest.raises(ValueError, match=rf"{name} must be an integer in {least}\.\.1048575; got 1048576"):
        sim.launch(program, 1, 2**20)


def test_launch_refuses_a_bool_smem_bytes():
    def program(b):
        yield b.cluster_sync()

    with pytest.raises(ValueError, match="smem_bytes must be an integer in 1..232448; got True"):
        sim.launch(program, 1, smem_bytes=True)

@pytest.mark.parametrize("key", [True, np.bool_(False), (0, True)])
def test_a_bool_index_is_refused(key):
    """NumPy reads a bool as a mask over a new axis (all elements), not as the element 1 or 0."""

    def program(b):
        rows = b.shared_array("rows", (2, 4), np.float32)
        rows[key] = 1.0
        yield b.cluster_sync()

    with pytest.raises(IndexError, match=r"shared arrays take integer indices or slices; got a bool"):
        sim.launch(program, 1)


@pytest.mark.parametrize("dtype, red_add_has_it", [(np.uint8, False), (np.int16, False), (np.float16, True),
                                                   (np.int64, True)])
def test_atomic_add_takes_the_types_red_add_has(dtype, red_add_has_it):
    def program(b):
        rows = b.shared_array("rows", (4,), dtype)
        rows[:] = 0
        rows.atomic_add(slice(None), np.ones(4, dtype))
        assert (rows[:] == 1).all()
        yield b.cluster_sync()

    if red_add_has_it:
        sim.launch(program, 1)
        return
    with pytest.raises(TypeError, match=rf"red.add adds .* elements; 'rows' is {np.dtype(dtype).name}"):
        sim.launch(program, 1)

@pytest.mark.parametrize("run", [sim.cluster_reduce, sim.cluster_gather])
def test_masked_arrays_are_refused(run):
    x = np.ma.masked_array(GOOD, mask=GOOD > 0)
    with pytest.raises(TypeError, match=r"x must be a plain NumPy array; got a masked array .*x.filled\(value\)"):
        run(x)


LARGEST_N = [  # (primitive, algorithm, cluster size, dtype, largest n that fits)
    ("reduce", "ring", 8, np.float32, 25824),
    ("reduce", "ring", 1, np.float32, 14528),
    ("reduce", "butterfly", 4, np.float64, 9685),
    ("reduce", "bulk", 16, np.float16, 3628),
    ("gather", "direct", 16, np.float32, 3632),
    ("gather", "bulk", 5, np.int32, 11620),
]


@pytest.mark.parametrize(("primitive", "algorithm", "size", "dtype", "largest"), LARGEST_N)
def test_n_is_limited_by_the_shared_memory_of_a_block(primitive, algorithm, size, dtype, largest):
    """The largest n runs, and right: every block gets the gathered rows, or the sum within the
    left-fold error bound of the exact one; one more element is refused, naming what it needs."""
    run = sim.cluster_reduce if primitive == "reduce" else sim.cluster_gather
    rng = np.random.default_rng()
    if np.dtype(dtype).kind == "i":
        x = rng.integers(-(2**31), 2**31, size=(size, largest), dtype=np.int64).astype(dtype)
    else:
        x = rng.standard_normal((size, largest)).astype(dtype)
    x[x == 0] = 1
    out, _ = run(x, algorithm=algorithm)
    if primitive == "gather":
        assert out.shape == (size, size * largest) and (out == x.ravel()).all()
    else:
        wide = x.astype(np.float64)
        exact = wide.sum(axis=0)
        u_acc = 2.0**-53 if dtype == np.float64 else 2.0**-24  # float16 accumulates in float32
        bound = size * u_acc * np.abs(wide).sum(axis=0) + np.finfo(dtype).eps / 2 * np.abs(exact)
        assert out.shape == x.shape and (np.abs(out.astype(np.float64) - exact) <= bound).all()
    message = rf"n \(x.shape\[1\]\) must be at most {largest} for the {algorithm} {primitive} \(cluster size {size}, "
    with pytest.raises(ValueError, match=message + rf".*got {largest + 1}, which needs \d+ bytes .*a block has 232448"):
        run(np.ones((size, largest + 1), dtype=dtype), algorithm=algorithm)


@pytest.mark.parametrize(
    ("primitive", "algorithms"), [("reduce", sim.REDUCE_ALGORITHMS), ("gather", sim.GATHER_ALGORITHMS)]
)
@pytest.mark.parametrize("size", [1, 3, 8, 16])
@pytest.mark.parametrize("dtype", ["float16", "float64", "int32"])
def test_shared_bytes_are_exactly_what_the_programs_declare(primitive, algorithms, size, dtype):
    from clusterlab.simulator import gather, reduce

    module = reduce if primitive == "reduce" else gather
    shared_bytes = reduce.reduce_shared_bytes if primitive == "reduce" else gather.gather_shared_bytes
    x = np.ones((size, 13), dtype=sim.numpy_dtype(dtype))
    for algorithm in algorithms:
        program = getattr(module, f"{algorithm}_{primitive}")
        extra = (sim.op_ufunc("sum"),) if primitive == "reduce" else ()
        out = np.empty((size, 13 if primitive == "reduce" else 13 * size), dtype=x.dtype)
        needed = shared_bytes(algorithm, 13, size, dtype)
        sim.launch(program, size, x, out, *extra, smem_bytes=needed)
        with pytest.raises(sim.OutOfBounds, match="shared memory exhausted"):
            sim.launch(program, size, x, out, *extra, smem_bytes=needed - 1)


def test_a_huge_input_is_refused_before_anything_is_allocated():
    x = np.broadcast_to(np.float32(1), (16, 10**9))  # 64 GB to read, no memory behind it
    with pytest.raises(ValueError, match=r"must be at most 3632 .* got 1000000000"):
        sim.cluster_gather(x)
    with pytest.raises(ValueError, match=r"must be at most 19370 .* got 1000000000"):
        sim.cluster_reduce(x, algorithm="butterfly")


def test_slot_elements_needs_a_count_and_an_element_size():
    assert sim.slot_elements(5, 4) == 8
    assert sim.slot_elements(0, 2) == 0
    with pytest.raises(ValueError, match=r"n must be an integer >= 0; got -5"):
        sim.slot_elements(-5, 4)
    with pytest.raises(TypeError, match=r"n must be an integer >= 0; got 2.5"):
        sim.slot_elements(2.5, 4)
    with pytest.raises(ValueError, match=r"itemsize must be an integer >= 1; got 0"):
        sim.slot_elements(5, 0)
    with pytest.raises(TypeError, match=r"itemsize must be an integer >= 1; got <class 'numpy.float32'>"):
        sim.slot_elements(5, np.float32)


@pytest.mark.parametrize("dtype", ["foo", None, np.int64, "complex64", 3])
def test_dtype_name_lists_the_dtypes(dtype):
    with pytest.raises(TypeError, match=r"x.dtype must be one of \('float32', 'float16', 'float64', 'int32', 'bfloat16'\)"):
        sim.dtype_name(dtype)
    assert sim.dtype_name("bfloat16") == "bfloat16"


@pytest.mark.parametrize(
    ("phases", "error", "message"),
    [
        (3, TypeError, r"phases must be a non-empty list of phase numbers in 0..2, such as \[0\] or range\(3\); got 3"),
        ("01", TypeError, r"phases must be a non-empty list .*; got '01'"),
        ([], ValueError, r"phases must be a non-empty list .*; got \[\]"),
        ([0, 1.5], TypeError, r"phases must be .*; got 1.5 among them"),
        ([True], TypeError, r"got True among them"),
        ([-1], ValueError, r"phases must lie in 0..2; got -1"),
    ],
)
def test_plot_checks_phases(phases, error, message):
    _, trace = sim.cluster_gather(GOOD[:3], "direct")
    with pytest.raises(error, match=message):
        trace.plot(phases=phases)
    assert len([ax for ax in trace.plot(phases=range(2)).axes if ax.get_title()]) == 2


def _peer_call(call):
    """A 2-block program: each block declares ``rows`` float32[2, 8], ``halves`` int16[16] and the
    mbarrier ``full`` (initialized), syncs, then makes ``call(b, own, peer)``: ``own`` and ``peer``
    hold the three as this block and as its peer's, through ``map_shared``."""

    def program(b):
        names = ("rows", "halves", "full")
        own = dict(zip(names, (b.shared_array("rows", (2, 8), np.float32), b.shared_array("halves", 16, np.int16),
                               b.shared_mbarrier("full"))))
        own["rows"][:] = 1.0
        b.mbarrier_init(own["full"], 1)
        yield b.cluster_sync()
        peer = {name: b.map_shared(obj, 1 - b.cluster_rank) for name, obj in own.items()}
        call(b, own, peer)
        yield b.cluster_sync()

    return program


@pytest.mark.parametrize("call, error, words", [
    (lambda b, own, peer: b.map_shared(3.0, 1), TypeError, "map_shared maps a SharedArray or Mbarrier; got float"),
    (lambda b, own, peer: b.map_shared(own["rows"], 1.0), TypeError, "rank must be an integer; got 1.0"),
    (lambda b, own, peer: b.map_shared(own["rows"], True), TypeError, "rank must be an integer; got True"),
    (lambda b, own, peer: b.shared_view("v", np.zeros(4), 4, np.float32), TypeError,
     "shared_view lies over a SharedArray; got ndarray"),
    (lambda b, own, peer: b.shared_array("", 4, np.float32), TypeError,
     "shared memory name must be a non-empty string; got ''"),
    (lambda b, own, peer: b.mbarrier_arrive(own["rows"]), TypeError, "mbarrier.arrive takes an Mbarrier; got "
                                                                     "SharedArray"),
    (lambda b, own, peer: b.bulk_copy(np.zeros(8, np.float32), own["rows"].at[0], peer["full"]), TypeError,
     "bulk_copy takes regions: b.bulk_copy(peer.at[key], own.at[key], peer_mbarrier)"),
    (lambda b, own, peer: b.bulk_copy(peer["rows"].at[0], peer["rows"].at[1], peer["full"]), TypeError,
     "bulk_copy reads the issuing block's own shared memory (shared::cta): src must come from b.shared_array"),
    (lambda b, own, peer: b.st_async(np.zeros(8, np.float32), np.ones(8, np.float32), peer["full"]), TypeError,
     "st_async takes a region: b.st_async(peer.at[key], values, peer_mbarrier)"),
    (lambda b, own, peer: b.st_async(own["rows"].at[0], np.ones(8, np.float32), peer["full"]), TypeError,
     "st_async writes through the cluster window: dst must come from map_shared"),
    (lambda b, own, peer: b.st_async(peer["halves"].at[:8], np.ones(8, np.int16), peer["full"]), TypeError,
     "st.async stores 4- or 8-byte elements; dst is int16"),
    (lambda b, own, peer: b.bulk_copy(peer["rows"].at[0, ::2], own["rows"].at[0, ::2], peer["full"]), ValueError,
     "cp.async.bulk moves one contiguous block of bytes; a region is strided or gathered"),
    (lambda b, own, peer: b.bulk_copy(peer["rows"].at[0], own["rows"].at[0, :4], peer["full"]), ValueError,
     "cp.async.bulk: src has 16 bytes but dst has 32"),
    (lambda b, own, peer: own["rows"][0, 0, 0], IndexError, "too many indices (3) for shared array 'rows' of shape "
                                                            "(2, 8)"),
    (lambda b, own, peer: own["rows"][0, ::-1], IndexError, "slice step must be a positive integer; got -1"),
    (lambda b, own, peer: own["rows"][0, ::0.5], IndexError, "slice step must be a positive integer; got 0.5"),
    (lambda b, own, peer: peer["rows"][np.array([0.0, 1.0])], IndexError,
     "shared arrays take integer indices or slices; got float64 array"),
], ids=["map-float", "rank-float", "rank-bool", "view-of-ndarray", "empty-name", "arrive-on-array", "copy-to-ndarray",
        "copy-from-peer", "st-async-to-ndarray", "st-async-local", "st-async-int16", "copy-strided", "copy-sizes",
        "too-many-indices", "negative-step", "float-step", "float-indices"])
def test_block_operations_name_a_wrong_operand(call, error, words):
    with pytest.raises(error) as info:
        sim.launch(_peer_call(call), 2)
    assert words in str(info.value)


def test_strided_slices_read_and_write_the_elements_numpy_does():
    got = {}

    def program(b):
        rows = b.shared_array("rows", (3, 8), np.float32)
        rows[:] = np.arange(24, dtype=np.float32).reshape(3, 8) * (b.cluster_rank + 1)
        rows[1, 1::3] = -1.0
        yield b.cluster_sync()
        got[b.cluster_rank] = b.map_shared(rows, 1 - b.cluster_rank)[::2, 1::3]
        yield b.cluster_sync()

    sim.launch(program, 2)
    want = np.arange(24, dtype=np.float32).reshape(3, 8)
    want[1, 1::3] = -1.0
    for rank in (0, 1):
        peer = want * (2 - rank)
        peer[1, 1::3] = -1.0
        np.testing.assert_array_equal(got[rank], peer[::2, 1::3])


def test_views_must_agree_between_blocks():
    def diverging(b):
        region = b.shared_array("region", (8, 4), np.float32)
        b.shared_view("part", region, (4, 4), np.float32, offset=16 * b.cluster_rank)
        yield b.cluster_sync()

    message = (r"shared 'part' is declared as a view of float32\[4, 4\] at byte 16 of 'region' here but otherwise by "
               r"another block")
    with pytest.raises(ValueError, match=message):
        sim.launch(diverging, 2)


def test_a_block_declares_at_most_32_mbarriers():
    def program(b):
        for i in range(33):
            b.shared_mbarrier(f"bar{i}")
        yield b.cluster_sync()

    with pytest.raises(ValueError, match="the simulator models at most 32 mbarriers per block"):
        sim.launch(program, 1)
