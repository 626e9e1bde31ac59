"""The comparison the special-value tests rely on fails where it must: a NaN moved or dropped, a bit changed, an
element never written; and holds where NaNs differ only in their bits."""

import ml_dtypes
import numpy as np
import pytest

from special_values import POISON_BITS, assert_same_values, rows_with_specials

AS_INT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}


@pytest.mark.parametrize("dtype", sorted(POISON_BITS))
def test_the_poison_is_a_nan_that_neither_the_inputs_nor_arithmetic_hold(dtype):
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    poison = np.array([POISON_BITS[dtype]], AS_INT[dtype]).view(numpy_dtype)
    assert np.isnan(poison.astype(np.float32)).all()
    canonical = {"float32": 0x7FFFFFFF, "float16": 0x7FFF, "bfloat16": 0x7FFF}[dtype]
    quiet_nan = np.array([np.nan], np.float32).astype(numpy_dtype).view(AS_INT[dtype])
    assert POISON_BITS[dtype] not in (canonical, int(quiet_nan[0]))


@pytest.mark.parametrize("dtype", sorted(POISON_BITS))
def test_same_values_fails_on_a_moved_nan_a_changed_bit_and_an_unwritten_element(dtype):
    rng = np.random.default_rng()
    expected = rows_with_specials(rng, (4, 301), dtype, 0.25)
    nans = np.flatnonzero(np.isnan(expected.astype(np.float32)))
    finite = np.flatnonzero(np.isfinite(expected.astype(np.float32)))  # a low bit flipped stays finite
    as_int = AS_INT[dtype]

    other_nan_bits = expected.copy()
    other_nan_bits.reshape(-1).view(as_int)[nans] = {"float32": 0x7FFFFFFF}.get(dtype, 0x7FFF)  # canonical NaNs
    assert_same_values(other_nan_bits, expected, "NaN bits")

    moved = expected.copy()
    moved.reshape(-1)[nans[0]] = 1.0
    with pytest.raises(AssertionError, match="NaNs at"):
        assert_same_values(moved, expected, "moved")

    changed = expected.copy()
    changed.reshape(-1).view(as_int)[finite[0]] ^= 1
    with pytest.raises(AssertionError, match="differ"):
        assert_same_values(changed, expected, "changed")

    unwritten = expected.copy()
    unwritten.reshape(-1).view(as_int)[nans[0]] = POISON_BITS[dtype]  # where the result is NaN too
    with pytest.raises(AssertionError, match="never written"):
        assert_same_values(unwritten, expected, "unwritten")
