"""The comparison the special-value tests rely on fails where it must: a NaN moved or dropped, a bit changed, an
element never written; and holds where NaNs differ only in their bits."""

import numpy as np
import pytest

from clusterlab import simulator
from special_values import POISON_BITS, as_bits, assert_same_values, rows_with_specials

#: The NaN a GPU's arithmetic returns, per dtype.
CANONICAL_NAN = {"float32": 0x7FFFFFFF, "float16": 0x7FFF, "bfloat16": 0x7FFF}


@pytest.mark.parametrize("dtype", sorted(POISON_BITS))
def test_the_poison_is_a_nan_that_neither_the_inputs_nor_arithmetic_hold(dtype):
    poison = np.zeros(1, simulator.numpy_dtype(dtype))
    as_bits(poison)[0] = POISON_BITS[dtype]
    assert np.isnan(poison.astype(np.float32)).all()
    quiet_nan = as_bits(np.array([np.nan], np.float32).astype(simulator.numpy_dtype(dtype)))
    assert POISON_BITS[dtype] not in (CANONICAL_NAN[dtype], int(quiet_nan[0]))


@pytest.mark.parametrize("dtype", sorted(POISON_BITS))
def test_same_values_fails_on_a_moved_nan_a_changed_bit_and_an_unwritten_element(dtype):
    rng = np.random.default_rng()
    expected = rows_with_specials(rng, (4, 301), dtype, 0.25)
    nans = np.flatnonzero(np.isnan(expected.astype(np.float32)))
    finite = np.flatnonzero(np.isfinite(expected.astype(np.float32)))  # a low bit flipped stays finite

    other_nan_bits = expected.copy()
    as_bits(other_nan_bits.reshape(-1))[nans] = CANONICAL_NAN[dtype]
    assert_same_values(other_nan_bits, expected, "NaN bits")

    moved = expected.copy()
    moved.reshape(-1)[nans[0]] = 1.0
    with pytest.raises(AssertionError, match="NaNs at"):
        assert_same_values(moved, expected, "moved")

    changed = expected.copy()
    as_bits(changed.reshape(-1))[finite[0]] ^= 1
    with pytest.raises(AssertionError, match="differ"):
        assert_same_values(changed, expected, "changed")

    unwritten = expected.copy()
    as_bits(unwritten.reshape(-1))[nans[0]] = POISON_BITS[dtype]  # where the result is NaN too
    with pytest.raises(AssertionError, match="never written"):
        assert_same_values(unwritten, expected, "unwritten")
