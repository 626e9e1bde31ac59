"""Inputs with IEEE special values, and the comparison the reduces promise on them."""

import numpy as np

from clusterlab import simulator

#: ±inf, ±0, NaN, ±6e4 (sums past float16's 65504) and 1e-7 (under float16's normal range).
SPECIALS = np.array([np.inf, -np.inf, 0.0, -0.0, np.nan, 6.0e4, -6.0e4, 1.0e-7], dtype=np.float32)


def rows_with_specials(rng, shape, dtype, fraction):
    """Standard-normal values of ``dtype`` in ``shape``, about ``fraction`` of them drawn from :data:`SPECIALS`."""
    x = rng.standard_normal(shape).astype(np.float32)
    chosen = rng.random(shape) < fraction
    x[chosen] = rng.choice(SPECIALS, size=int(chosen.sum()))
    return x.astype(simulator.numpy_dtype(dtype))


def assert_same_values(got, expected, context):
    """NaNs where ``expected`` has them (their bits are not the contract: a GPU's add returns the canonical NaN),
    every other element bit for bit."""
    assert got.shape == expected.shape, context
    nan_got, nan_expected = np.isnan(got.astype(np.float32)), np.isnan(expected.astype(np.float32))
    assert np.array_equal(nan_got, nan_expected), f"{context}: NaNs at {np.argwhere(nan_got != nan_expected)[:3]}"
    as_int = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    differ = np.flatnonzero((got.view(as_int) != expected.view(as_int)) & ~nan_expected)
    assert differ.size == 0, f"{context}: {differ.size} elements differ, first {differ[:3]}"
