"""ClusterGather on the simulator: every block gets every row, bit for bit, with any bits."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterlab import simulator as sim

UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def random_bit_patterns(seed: int, size: int, n: int, dtype: str) -> np.ndarray:
    """Fresh random bits of ``dtype`` (NaNs with payloads and infinities included), none zero."""
    dt = sim.numpy_dtype(dtype)
    raw = np.random.default_rng(seed).integers(1, 2 ** (8 * dt.itemsize), size=(size, n), dtype=np.uint64)
    return raw.astype(UNSIGNED[dt.itemsize]).view(dt)


@given(
    size=st.integers(1, 16),
    n=st.integers(1, 40),
    dtype=st.sampled_from(sim.DTYPES),
    algorithm=st.sampled_from(sim.GATHER_ALGORITHMS),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=120, deadline=None)
def test_gather_copies_every_row_bit_for_bit(size, n, dtype, algorithm, seed):
    x = random_bit_patterns(seed, size, n, dtype)
    out, _ = sim.cluster_gather(x, algorithm)
    assert out.dtype == x.dtype and out.shape == (size, size * n)
    unsigned = UNSIGNED[x.dtype.itemsize]
    assert (out.view(unsigned) == x.view(unsigned).reshape(1, -1)).all()


@pytest.mark.parametrize("algorithm", sim.GATHER_ALGORITHMS)
def test_gather_is_deterministic(algorithm):
    x = random_bit_patterns(2, 7, 9, "float64")
    first, first_trace = sim.cluster_gather(x, algorithm)
    second, second_trace = sim.cluster_gather(x, algorithm)
    assert (first.view(np.uint64) == second.view(np.uint64)).all()
    assert first_trace.events == second_trace.events


def test_slots_of_the_bulk_layout_are_padded_to_16_bytes():
    assert sim.slot_elements(1, 4) == 4
    assert sim.slot_elements(5, 2) == 8
    assert sim.slot_elements(3, 8) == 4
    assert sim.slot_elements(8, 4) == 8


def test_bulk_gather_moves_whole_padded_slots():
    x = random_bit_patterns(4, 3, 5, "float16")  # 10 bytes per row -> 16-byte slots
    _, trace = sim.cluster_gather(x, "bulk")
    copies = [e for e in trace.events if e.kind == "cp.async.bulk"]
    assert len(copies) == 3 * 2
    assert {e.nbytes for e in copies} == {16}


def test_strided_reads_count_the_bytes_read_not_their_span():
    x = random_bit_patterns(6, 5, 3, "bfloat16")  # 6-byte rows in 16-byte slots
    _, trace = sim.cluster_gather(x, "bulk")
    read_out = [e for e in trace.events if e.kind == "ld.shared" and e.step == "read out"]
    assert [e.nbytes for e in read_out] == [5 * 6] * 5
