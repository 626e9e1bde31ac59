"""Checks on what the public entry points accept, with messages naming the parameter."""

from __future__ import annotations

import numpy as np

from .cluster import MAX_CLUSTER_SIZE, MAX_SMEM_BYTES_PER_BLOCK


def check_choice(parameter: str, value, allowed: tuple[str, ...]) -> None:
    """Raise TypeError / ValueError naming ``parameter``, ``value`` and ``allowed`` unless it is one."""
    if not isinstance(value, str):
        raise TypeError(f"{parameter} must be a string, one of {allowed}; got {value!r}")
    if value not in allowed:
        raise ValueError(f"{parameter} must be one of {allowed}; got {value!r}")


def check_integer(parameter: str, value, minimum: int, maximum: int | None = None) -> None:
    """Raise TypeError / ValueError naming ``parameter`` unless ``value`` is an integer in minimum..maximum."""
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{parameter} must be {allowed}; got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{parameter} must be {allowed}; got {value}")


def check_rows(x, name: str = "x") -> None:
    """``x`` (the parameter ``name``) must be a NumPy array [cluster_size, n] with 1 <= cluster_size <= 16
    and n >= 1."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array [cluster_size, n]; got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must be a plain NumPy array; got a masked array (np.ma.MaskedArray), whose mask the "
            f"simulator would ignore: pass {name}.filled(value) to say what the masked elements hold"
        )
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [cluster_size, n], one row per block; got shape {x.shape} (ndim {x.ndim})"
        )
    cluster_size, n = x.shape
    if not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(
            f"cluster_size ({name}.shape[0]) must be in 1..{MAX_CLUSTER_SIZE}; got {cluster_size} "
            f"({name}.shape {x.shape})"
        )
    if n < 1:
        raise ValueError(f"n ({name}.shape[1]) must be at least 1; got {n} ({name}.shape {x.shape})")


def check_fits(parameter: str, n: int, shared_bytes, what: str) -> None:
    """Raise ValueError naming ``parameter`` unless ``n`` elements per block fit in a block's shared memory.

    ``shared_bytes(n)``: the bytes of shared memory per block that ``what`` (say "the ring reduce
    (cluster size 8, float32)") declares for ``n`` elements per block; it grows with ``n``. Only
    arithmetic happens here, so a huge ``n`` is refused before anything is allocated.
    """
    needed = shared_bytes(n)
    if needed > MAX_SMEM_BYTES_PER_BLOCK:
        raise ValueError(
            f"{parameter} must be at most {largest_fitting(shared_bytes)} for {what}; got {n}, which needs "
            f"{needed} bytes of shared memory per block (a block has {MAX_SMEM_BYTES_PER_BLOCK})"
        )


def largest_fitting(shared_bytes) -> int:
    """The largest ``n`` with ``shared_bytes(n) <= MAX_SMEM_BYTES_PER_BLOCK``, found by bisection."""
    fits, too_big = 0, MAX_SMEM_BYTES_PER_BLOCK + 1  # every element takes at least a byte
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        if shared_bytes(middle) <= MAX_SMEM_BYTES_PER_BLOCK:
            fits = middle
        else:
            too_big = middle
    return fits
