"""Inputs with IEEE special values, the poison an output buffer holds before a launch, and the comparison the
reduces promise on them."""

import numpy as np

from clusterlab import simulator

#: ±inf, ±0, NaN, ±6e4 (sums past float16's 65504) and 1e-7 (under float16's normal range).
SPECIALS = np.array([np.inf, -np.inf, 0.0, -0.0, np.nan, 6.0e4, -6.0e4, 1.0e-7], dtype=np.float32)


#: The bits of a signalling NaN of each dtype: what a GPU test fills an output with before a launch. Arithmetic
#: never returns it (a GPU's add and max return the canonical NaN, 0x7fffffff / 0x7fff) and the inputs' NaNs are
#: NumPy's quiet ones, so an element that still holds it was never written, even where the result is NaN.
POISON_BITS = {"float32": 0x7FA5A5A5, "float16": 0x7D5A, "bfloat16": 0x7FA5}


def rows_with_specials(rng, shape, dtype, fraction):
    """Standard-normal values of ``dtype`` in ``shape``, about ``fraction`` of them drawn from :data:`SPECIALS`."""
    x = rng.standard_normal(shape).astype(np.float32)
    chosen = rng.random(shape) < fraction
    x[chosen] = rng.choice(SPECIALS, size=int(chosen.sum()))
    return x.astype(simulator.numpy_dtype(dtype))


def as_bits(x):
    """``x`` (float32, float16 or bfloat16) viewed as unsigned integers of its size."""
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_same_values(got, expected, context):
    """No element left with :data:`POISON_BITS` (never written), NaNs where ``expected`` has them (their bits
    are not the contract: a GPU's add returns the canonical NaN), every other element bit for bit."""
    assert got.shape == expected.shape, context
    unwritten = np.flatnonzero(as_bits(got) == POISON_BITS[got.dtype.name])
    assert unwritten.size == 0, f"{context}: {unwritten.size} elements never written, first {unwritten[:3]}"
    nan_got, nan_expected = np.isnan(got.astype(np.float32)), np.isnan(expected.astype(np.float32))
    assert np.array_equal(nan_got, nan_expected), f"{context}: NaNs at {np.argwhere(nan_got != nan_expected)[:3]}"
    differ = np.flatnonzero((as_bits(got) != as_bits(expected)) & ~nan_expected)
    assert differ.size == 0, f"{context}: {differ.size} elements differ, first {differ[:3]}"
