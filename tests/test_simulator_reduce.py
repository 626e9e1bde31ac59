"""ClusterReduce on the simulator: correct, deterministic, and in the documented FP order.

The documented order is restated here independently, in a few lines of plain NumPy per
algorithm, and compared bit for bit; that is the contract the GPU kernels are held to.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from program_variants import with_replaced, without_line
from special_values import assert_same_values, rows_with_specials

from clusterlab import simulator as sim
from clusterlab.simulator import reduce as sim_reduce
from clusterlab.simulator.reduce import two_shot_chunk_start

ACCUMULATE = {
    "float16": np.float32,
    "bfloat16": np.float32,
    "float32": np.float32,
    "float64": np.float64,
    "int32": np.int32,
}
UFUNC = {"sum": np.add, "max": np.maximum, "min": np.minimum}
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def random_rows(seed: int, size: int, n: int, dtype: str) -> np.ndarray:
    """Fresh random [size, n] rows of ``dtype``, no zeros; ints span the whole int32 range."""
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        x = rng.integers(-(2**31), 2**31, size=(size, n), dtype=np.int64).astype(np.int32)
    else:
        scale = 10.0 ** rng.integers(-2, 3, size=(size, 1))
        x = (rng.standard_normal((size, n)) * scale).astype(sim.numpy_dtype(dtype))
    x[x == 0] = 1
    return x


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def documented_order(x: np.ndarray, op: str, algorithm: str) -> np.ndarray:
    """The reduction each block must produce, restated from the reduce module's docstring."""
    size, n = x.shape
    f = UFUNC[op]
    rows = [row.astype(ACCUMULATE[np.dtype(x.dtype).name]) for row in x]
    if algorithm in ("direct", "bulk", "two_shot", "bulk_two_shot"):
        result = rows[0]
        for s in range(1, size):
            result = f(result, rows[s])
    elif algorithm == "ring":
        result = np.empty_like(rows[0])
        for c in range(size):
            lo, hi = c * n // size, (c + 1) * n // size
            chunk = rows[c][lo:hi]
            for k in range(1, size):
                chunk = f(chunk, rows[(c + k) % size][lo:hi])
            result[lo:hi] = chunk
    else:  # butterfly
        power = 1 << (size.bit_length() - 1)
        values = list(rows[:power])
        for q in range(size - power):
            values[q] = f(values[q], rows[q + power])
        mask = 1
        while mask < power:
            values = [f(values[min(r, r ^ mask)], values[max(r, r ^ mask)]) for r in range(power)]
            mask <<= 1
        result = values[0]
    return np.broadcast_to(result.astype(x.dtype), x.shape)


reduce_cases = given(
    size=st.integers(1, 16),
    n=st.integers(1, 40),
    dtype=st.sampled_from(sim.DTYPES),
    op=st.sampled_from(sim.OPS),
    algorithm=st.sampled_from(sim.REDUCE_ALGORITHMS),
    seed=st.integers(0, 2**32 - 1),
)


@reduce_cases
@settings(max_examples=200, deadline=None)
def test_reduce_is_bit_exact_with_the_documented_order(size, n, dtype, op, algorithm, seed):
    x = random_rows(seed, size, n, dtype)
    out, _ = sim.cluster_reduce(x, op, algorithm)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert (bits(out) == bits(documented_order(x, op, algorithm))).all()


@reduce_cases
@settings(max_examples=120, deadline=None)
def test_reduce_agrees_with_numpy(size, n, dtype, op, algorithm, seed):
    """Exact for ints and max/min; float sums within the left-fold error bound.

    Folding N terms in an accumulator of unit roundoff u_acc errs by at most
    (N-1) * u_acc * sum|x_i| (each partial is rounded once), and the final conversion adds
    u_out * |sum|. The reference is the correctly rounded float64 sum (math.fsum).
    """
    x = random_rows(seed, size, n, dtype)
    out, _ = sim.cluster_reduce(x, op, algorithm)
    if op == "max":
        expected = x.max(axis=0)
    elif op == "min":
        expected = x.min(axis=0)
    elif dtype == "int32":
        expected = ((x.astype(np.int64).sum(axis=0) + 2**31) % 2**32 - 2**31).astype(np.int32)
    else:
        wide = x.astype(np.float64)
        exact = np.array([math.fsum(column) for column in wide.T])
        u_acc = UNIT_ROUNDOFF[np.dtype(ACCUMULATE[dtype]).name]
        bound = (size - 1) * u_acc * np.abs(wide).sum(axis=0) + UNIT_ROUNDOFF[dtype] * np.abs(exact)
        bound += 2.0**-52 * np.abs(exact)  # the float64 reference itself
        assert (np.abs(out.astype(np.float64) - exact) <= bound).all()
        return
    assert (out == expected).all()


@pytest.mark.parametrize("algorithm", sim.REDUCE_ALGORITHMS)
def test_every_block_ends_with_the_same_bits(algorithm):
    x = random_rows(7, 11, 29, "float32")
    out, _ = sim.cluster_reduce(x, "sum", algorithm)
    assert (bits(out) == bits(np.broadcast_to(out[0], out.shape))).all()


@pytest.mark.parametrize("algorithm", sim.REDUCE_ALGORITHMS)
def test_repeated_runs_give_the_same_bits_and_the_same_trace(algorithm):
    x = random_rows(3, 13, 50, "bfloat16")
    first, first_trace = sim.cluster_reduce(x, "sum", algorithm)
    second, second_trace = sim.cluster_reduce(x.copy(), "sum", algorithm)
    assert (bits(first) == bits(second)).all()
    assert first_trace.events == second_trace.events


@pytest.mark.parametrize("algorithm", ["bulk", "two_shot", "bulk_two_shot"])
def test_bulk_and_two_shot_fold_as_direct_does(algorithm):
    x = random_rows(11, 9, 33, "float16")
    direct, _ = sim.cluster_reduce(x, "sum", "direct")
    other, _ = sim.cluster_reduce(x, "sum", algorithm)
    assert (bits(direct) == bits(other)).all()


@pytest.mark.parametrize("size", [2, 3, 8, 16])
def test_two_shot_moves_the_fewest_bytes_in_two_barriers(size):
    """Each block pulls (N - 1) / N of a row (its chunk of every peer) and pushes as much (its folded
    chunk into every peer): 2 (N - 1) / N rows, where ``direct`` pulls N - 1 rows; chunks start on
    16-byte boundaries."""
    n = 4 * size * 5
    x = random_rows(3, size, n, "float32")
    _, trace = sim.cluster_reduce(x, "sum", "two_shot")
    _, direct = sim.cluster_reduce(x, "sum", "direct")
    row = 4 * n
    assert trace.traffic().total.sum() == size * 2 * (size - 1) * row // size
    pushed = sum(e.nbytes for e in trace.events if e.kind == "st.shared::cluster")
    assert pushed == size * (size - 1) * row // size
    assert direct.traffic().total.sum() == size * (size - 1) * row
    assert "2 cluster barriers" in trace.phase_table()
    starts = [two_shot_chunk_start(c, 1001, size) for c in range(size + 1)]
    assert starts[0] == 0 and starts[-1] == 1001 and all(s % 4 == 0 for s in starts[:-1])
    assert starts == sorted(starts)


@pytest.mark.parametrize("size", [2, 3, 8, 16])
def test_bulk_two_shot_moves_two_shots_bytes_with_the_copy_engine_in_two_barriers(size):
    """The same bytes as ``two_shot`` (chunks whole, 16-byte multiples here), every one of them by
    ``cp.async.bulk``, behind 2 cluster barriers as ``two_shot``'s."""
    n = 4 * size * 5
    x = random_rows(4, size, n, "float32")
    _, trace = sim.cluster_reduce(x, "sum", "bulk_two_shot")
    _, two_shot = sim.cluster_reduce(x, "sum", "two_shot")
    assert (trace.traffic().total == two_shot.traffic().total).all()
    copies = [e for e in trace.events if e.kind == "cp.async.bulk"]
    assert len(copies) == 2 * size * (size - 1) and sum(e.nbytes for e in copies) == trace.traffic().total.sum()
    assert not [e for e in trace.events if e.kind.startswith("ld.shared::cluster")]
    assert "2 cluster barriers" in trace.phase_table()


def test_the_orders_are_distinguishable_so_the_bit_exact_test_has_teeth():
    """1e8 + 1 - 1e8 is 0 in float32 one way round and 1 another: orders show in the bits."""
    column = np.array([1e8, 1.0, -1e8], dtype=np.float32)
    x = np.tile(column[:, None], (1, 3))  # 3 blocks, 3 elements: ring chunk c = element c
    direct, _ = sim.cluster_reduce(x, "sum", "direct")
    ring, _ = sim.cluster_reduce(x, "sum", "ring")
    butterfly, _ = sim.cluster_reduce(x, "sum", "butterfly")
    assert direct[0].tolist() == [0.0, 0.0, 0.0]  # (x0 + x1) + x2 everywhere
    assert ring[0].tolist() == [0.0, 0.0, 1.0]  # chunk 2 is (x2 + x0) + x1
    assert butterfly[0].tolist() == [1.0, 1.0, 1.0]  # (x0 + x2) + x1
    for out, algorithm in ((direct, "direct"), (ring, "ring"), (butterfly, "butterfly")):
        assert (bits(out) == bits(documented_order(x, "sum", algorithm))).all()


@pytest.mark.parametrize("size", [6, 13])
@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("algorithm", sim.REDUCE_ALGORITHMS)
def test_signed_zero_ties_follow_the_documented_operand_order(op, algorithm, size):
    """max/min of -0.0 and +0.0 keep the right operand's sign, so the fold order shows.

    With zeros alone only the last fold's operand order shows (the result takes the sign of its right
    operand). So the zeros sit among values every zero beats (-1 for max, +1 for min): for each pair
    of rows a column with -0.0 and +0.0 there, both ways round, and losers elsewhere, whose result is
    the right operand of the combination where the two zeros meet, whichever that is (the butterfly's
    fold of the rows past its power of two included: sizes 6 and 13); then fresh random columns."""
    loser = {"max": -1.0, "min": 1.0}[op]
    pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
    x = np.full((size, 2 * len(pairs)), loser, dtype=np.float32)
    for c, (i, j) in enumerate(pairs):
        x[[i, j], 2 * c] = -0.0, 0.0
        x[[i, j], 2 * c + 1] = 0.0, -0.0
    mixed = np.random.default_rng().choice(np.array([-0.0, 0.0, loser], dtype=np.float32), size=(size, 32))
    x = np.concatenate([x, mixed], axis=1)
    out, _ = sim.cluster_reduce(x, op, algorithm)
    assert (bits(out) == bits(documented_order(x, op, algorithm))).all()


def test_int32_sums_wrap_like_add_s32():
    x = np.full((4, 3), 2**30, dtype=np.int32)
    x[:, 1] = -(2**31) + 1
    for algorithm in sim.REDUCE_ALGORITHMS:
        out, _ = sim.cluster_reduce(x, "sum", algorithm)
        assert out[0].tolist() == [0, 4, 0]


@pytest.mark.parametrize("dtype, big", [(np.float16, 2048.0), (ml_dtypes.bfloat16, 256.0)])
def test_half_precision_inputs_are_accumulated_in_float32_and_rounded_once(dtype, big):
    """big + 1 + 1 stays big when every step rounds to the 16-bit type, but is big + 2 (exactly
    representable) when accumulated in float32 and rounded once."""
    x = np.array([[big], [1.0], [1.0]], dtype=dtype)
    assert float((x[0, 0] + x[1, 0]) + x[2, 0]) == big
    for algorithm in sim.REDUCE_ALGORITHMS:
        out, _ = sim.cluster_reduce(x, "sum", algorithm)
        assert out.dtype == dtype and float(out[0, 0]) == big + 2


# ------------------------------------------------------------------- back to back: one barrier a step


@pytest.mark.parametrize("algorithm, barriers_a_step, barriers_once", [  # separate calls: 2, 2, 2
    ("direct", 1, 1), ("two_shot", 2, 0), ("bulk_two_shot", 0, 2)])
@pytest.mark.parametrize("size", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("dtype, op", [("float32", "sum"), ("bfloat16", "sum"), ("int32", "sum"), ("float16", "max")])
def test_steady_reduces_are_direct_bit_for_bit_with_their_barriers_a_step(algorithm, barriers_a_step, barriers_once,
                                                                          size, dtype, op):
    seed = int(np.random.default_rng().integers(2**31))
    steps, n = 5, 37
    xs = np.stack([random_rows(seed + k, size, n, dtype) for k in range(steps)])
    out, trace = sim.cluster_reduce_steady(xs, op, algorithm=algorithm)
    for k in range(steps):
        assert np.array_equal(bits(out[k]), bits(documented_order(xs[k], op, "direct"))), k
        once, _ = sim.cluster_reduce(xs[k], op, "direct")
        assert np.array_equal(bits(out[k]), bits(once)), k
    barriers = sum(1 for e in trace.events if e.kind == "barrier.cluster.wait.acquire" and e.block == 0)
    assert barriers == barriers_a_step * steps + barriers_once


@pytest.mark.parametrize("algorithm, moved", [("direct", lambda size, n: size * (size - 1) * n),  # N - 1 rows pulled
                                               ("two_shot", lambda size, n: 2 * (size - 1) * n)])  # chunks in and out
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_steady_reduces_move_16_bit_rows_as_they_are(algorithm, moved, dtype):
    """The steady direct and two_shot reduces stage a 16-bit row as it is and widen what they pull (two_shot
    pushes its chunk rounded): half the DSMEM bytes of the same rows widened to float32 first, the same bits."""
    size, n, steps = 4, 37, 3
    seed = int(np.random.default_rng().integers(2**31))
    xs = np.stack([random_rows(seed + k, size, n, dtype) for k in range(steps)])
    out, trace = sim.cluster_reduce_steady(xs, algorithm=algorithm)
    wide, wide_trace = sim.cluster_reduce_steady(xs.astype(np.float32), algorithm=algorithm)
    assert np.array_equal(bits(out), bits(wide.astype(xs.dtype)))
    assert int(trace.traffic().total.sum()) == 2 * steps * moved(size, n)
    assert int(wide_trace.traffic().total.sum()) == 4 * steps * moved(size, n)


@pytest.mark.parametrize("algorithm", ["direct", "two_shot"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_16_bit_steady_reduces_keep_special_values_and_short_odd_rows(algorithm, dtype, op):
    """Rows of 1, 3, 9 and 17 elements (an odd row's padding half, chunks shorter than a word), with
    ±inf, ±0, NaN and sums past float16's range among random values: the 16-bit rows give
    ``direct``'s results (NaNs where it has NaNs: their bits are not the contract)."""
    rng = np.random.default_rng()
    for size in (2, 3, 8):
        for n in (1, 3, 9, 17):
            xs = rows_with_specials(rng, (2, size, n), dtype, 0.4)
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf and sums past the range, as IEEE has them
                out, _ = sim.cluster_reduce_steady(xs, op, algorithm=algorithm)
                once_each = [sim.cluster_reduce(xs[k], op, "direct")[0] for k in range(2)]
            for k, once in enumerate(once_each):
                assert_same_values(out[k], once, (size, n, k))


def test_steady_two_shot_cuts_16_bit_rows_at_16_bytes():
    """Chunks of 16-bit rows start at multiples of 8 elements (16 bytes, a 16-byte access's worth)."""
    for n in (1, 7, 37, 1027):
        for size in (2, 3, 8, 16):
            starts = [sim_reduce.steady_chunk_start(c, n, size, np.float16) for c in range(size + 1)]
            assert starts[0] == 0 and starts[-1] == n and starts == sorted(starts)
            assert all(s % 8 == 0 for s in starts[:-1] if s < n)
            assert [sim_reduce.steady_chunk_start(c, n, size, np.float32) for c in range(size + 1)] == \
                [sim_reduce.two_shot_chunk_start(c, n, size) for c in range(size + 1)]


def test_steady_reduce_agrees_with_numpy():
    rng = np.random.default_rng()
    xs = rng.standard_normal((4, 6, 50)).astype(np.float32)
    out, _ = sim.cluster_reduce_steady(xs)
    want = xs.astype(np.float64).sum(axis=1, keepdims=True)
    assert np.allclose(out, np.broadcast_to(want, xs.shape), rtol=6 * 2.0**-24 * 4, atol=1e-5)


@pytest.mark.parametrize("size", [2, 4])
def test_one_buffer_lets_the_next_step_overwrite_a_row_a_peer_still_reads(size):
    xs = np.stack([random_rows(k, size, 8, "float32") for k in range(3)])
    sim.cluster_reduce_steady(xs, buffers=2)
    with pytest.raises(sim.DataRace) as info:
        sim.cluster_reduce_steady(xs, buffers=1)
    race = info.value
    # A block stages step 1 into the row a peer still pulls for step 0, with no barrier between.
    assert {p.step for p in race.points} == {"pull and fold 0", "stage 1"}
    assert race.owner in race.blocks and race.byte_range == (0, 8 * 4)


@pytest.mark.parametrize("marker", ["yield b.cluster_sync()  # k.a", "yield b.cluster_sync()  # k.b"])
def test_steady_two_shot_needs_both_barriers(marker):
    """Without k.a a block folds rows its peers are still staging; without k.b the next operation's
    staging overwrites a row a peer still folds."""
    xs = np.stack([random_rows(k, 4, 16, "float32") for k in range(3)])
    program = without_line(sim_reduce.two_shot_steady_reduce, marker)
    with pytest.raises(sim.DataRace):
        sim.launch(program, 4, xs, np.empty_like(xs), np.add)


@pytest.mark.parametrize("mbarrier, steps", [("scattered", {"stage 0", "all-gather 0"}),
                                             ("gathered", {"reduce-scatter 0", "stage 1"})])
def test_steady_bulk_two_shot_needs_the_release_arrivals_beside_its_copies(mbarrier, steps):
    """A copy's completion orders only the bytes it moved. Without the peers' release arrivals on
    ``scattered`` a peer's push lands on the row this block staged, unordered with that staging; without
    those on ``gathered`` this block stages its next row over a chunk its own copy may still read."""
    size = 4
    xs = np.stack([random_rows(k, size, 24, "float32") for k in range(3)])
    sim.cluster_reduce_steady(xs, algorithm="bulk_two_shot")
    dropped = {"scattered": "arrive=True", "gathered": "b.mbarrier_arrive(b.map_shared(gathered, c))"}[mbarrier]
    program = with_replaced(sim_reduce.bulk_two_shot_steady_reduce, {
        f"b.mbarrier_init({mbarrier}, size)": f"b.mbarrier_init({mbarrier}, 1)",
        dropped: "arrive=False" if mbarrier == "scattered" else "pass"})
    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, size, xs, np.empty_like(xs), np.add)
    assert {p.step for p in info.value.points} == steps


def chained_two_shot(b, x, out, steps):
    """The GPU contract's two_shot chain: operation k reduces rows[k % 2] into rows[(k + 1) % 2], so
    staged and result swap every operation. Writes ``out[rank]``, the last result."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    rows = b.shared_array("rows", (2, n), np.float32)
    lo, hi = two_shot_chunk_start(rank, n, size), two_shot_chunk_start(rank + 1, n, size)
    b.step("stage 0")
    rows[0] = x[rank]
    for k in range(steps):
        staged, result = k % 2, (k + 1) % 2
        yield b.cluster_sync()
        b.step(f"reduce-scatter {k}")
        acc = sim_reduce._load(b, rows, 0, (staged, slice(lo, hi)))
        for s in range(1, size):
            acc = np.add(acc, sim_reduce._load(b, rows, s, (staged, slice(lo, hi))))
        rows[result, lo:hi] = acc
        b.step(f"all-gather {k}")
        sim_reduce._push(b, rows, (result, slice(lo, hi)), acc)
        yield b.cluster_sync()
    out[rank] = rows[steps % 2]


@pytest.mark.parametrize("size", [2, 3, 8])
def test_a_chain_of_steady_two_shots_may_swap_staged_and_result(size):
    steps, n = 5, 29
    x = random_rows(int(np.random.default_rng().integers(2**31)), size, n, "float32")
    out = np.full_like(x, np.nan)
    sim.launch(chained_two_shot, size, x, out, steps)
    want = x
    for _ in range(steps):
        want, _ = sim.cluster_reduce(want, "sum", "direct")
    assert np.array_equal(bits(out), bits(want))


def chained_steady_reduce(b, x, out, steps, buffers):
    """The GPU contract's chain (``primitives.reduce``'s docstring): operation k folds straight into this
    block's buffer (k + 1) % buffers, the row of operation k + 1. Writes ``out[rank]``, the last result."""
    rank, n = b.cluster_rank, x.shape[1]
    staged = b.shared_array("staged", (buffers, n), np.float32)
    b.step("stage 0")
    staged[0] = x[rank]
    for k in range(steps):
        yield b.cluster_sync()
        b.step(f"pull and fold {k}")
        acc = sim_reduce._load(b, staged, 0, (k % buffers, slice(None)))
        for s in range(1, b.cluster_size):
            acc = np.add(acc, sim_reduce._load(b, staged, s, (k % buffers, slice(None))))
        staged[(k + 1) % buffers] = acc
    out[rank] = staged[steps % buffers]
    yield b.cluster_sync()


@pytest.mark.parametrize("size", [2, 3, 8])
def test_a_chain_of_steady_reduces_may_fold_into_the_next_buffer(size):
    """Folding operation k into buffer (k + 1) % 2 during operation k races with nobody (its last
    readers finished before barrier k); with one buffer the fold overwrites a row peers still pull."""
    steps, n = 4, 9
    x = random_rows(int(np.random.default_rng().integers(2**31)), size, n, "float32")
    out = np.full_like(x, np.nan)
    sim.launch(chained_steady_reduce, size, x, out, steps, 2)
    want = x
    for _ in range(steps):
        want, _ = sim.cluster_reduce(want, "sum", "direct")
    assert np.array_equal(bits(out), bits(want))
    with pytest.raises(sim.DataRace) as info:
        sim.launch(chained_steady_reduce, size, x, np.empty_like(x), steps, 1)
    assert {p.step for p in info.value.points} == {"pull and fold 0"}


@pytest.mark.parametrize("xs, buffers, error, match", [
    (np.ones((2, 4), np.float32), 2, ValueError, r"xs must be a NumPy array \[steps, cluster_size, n\]"),
    (np.ones((0, 2, 4), np.float32), 2, ValueError, "steps >= 1"),
    (np.ones((2, 2, 4), np.float32), 3, ValueError, r"buffers must be 2 or 1 for the steady direct reduce"),
    (np.ones((2, 17, 4), np.float32), 2, ValueError, r"cluster_size \(xs\[0\].shape\[0\]\) must be in 1..16"),
    (np.ones((2, 2, 4), np.float32), 2.0, TypeError, r"buffers must be 2 or 1 .*; got 2.0"),
    (np.ones((2, 2, 4), np.float32), "2", TypeError, r"buffers must be 2 or 1 .*; got '2'"),
    (np.ones((2, 2, 4), np.float32), True, TypeError, r"buffers must be 2 or 1 .*; got True"),
    (np.ones((2, 2, 4), np.float32), np.int64(0), ValueError, r"buffers must be 2 or 1 .*; got np.int64\(0\)"),
    ([[[1.0]]], 2, TypeError, r"xs must be a NumPy array \[steps, cluster_size, n\]; got list"),
])
def test_steady_reduce_rejects_bad_inputs(xs, buffers, error, match):
    with pytest.raises(error, match=match):
        sim.cluster_reduce_steady(xs, buffers=buffers)


def test_steady_two_shot_takes_only_its_one_buffer_and_known_algorithms():
    xs = np.ones((2, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"buffers must be 1 for the steady two_shot reduce"):
        sim.cluster_reduce_steady(xs, buffers=2, algorithm="two_shot")
    with pytest.raises(ValueError, match="algorithm"):
        sim.cluster_reduce_steady(xs, algorithm="ring")


@pytest.mark.parametrize("marker, hazard", [
    ("yield b.cluster_sync()  # every row is staged", sim.DataRace),
    ("yield b.cluster_sync()  # every chunk is reduced and pushed", sim.ExitedBlockAccess),
])
def test_each_two_shot_barrier_is_needed(marker, hazard):
    """Without either of its two barriers the checker rejects ``two_shot``: a peer's staged row read
    unordered with its staging, or a block gone while its peers still read its row and push into it."""
    x = random_rows(5, 4, 40, "float32")
    sim.launch(sim_reduce.two_shot_reduce, 4, x, np.empty_like(x), np.add)  # as written: clean
    with pytest.raises(hazard):
        sim.launch(without_line(sim_reduce.two_shot_reduce, marker), 4, x, np.empty_like(x), np.add)


@pytest.mark.parametrize("marker, hazard", [
    ("yield b.cluster_sync()  # rows staged", sim.DataRace),
    ("b.fence_proxy_async()  # st.shared above", sim.MissingProxyFence),
    ("yield b.mbarrier_wait(scattered, 0)", sim.DataRace),
    ("b.fence_proxy_async()  # the folded chunk", sim.MissingProxyFence),
    ("yield b.mbarrier_wait(gathered, 0)", sim.DataRace),
    ("yield b.cluster_sync()  # peers' copies", sim.ExitedBlockAccess),
])
def test_each_bulk_two_shot_barrier_fence_and_wait_is_needed(marker, hazard):
    """Without its first barrier a copy completes on a peer's mbarrier before it is initialised;
    without a proxy fence a copy reads bytes stored with st.shared; without a wait the fold reads
    the inbox, or the block reads its staged row, unordered with the copies; without the exit
    barrier a block exits while its chunk is still being copied out."""
    x = random_rows(6, 4, 40, "float32")
    sim.launch(sim_reduce.bulk_two_shot_reduce, 4, x, np.empty_like(x), np.add)  # as written: clean
    with pytest.raises(hazard):
        sim.launch(without_line(sim_reduce.bulk_two_shot_reduce, marker), 4, x, np.empty_like(x), np.add)
