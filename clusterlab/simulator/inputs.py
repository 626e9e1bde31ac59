"""Checks on what the public entry points accept, with messages naming the parameter."""

from __future__ import annotations

import numpy as np

from .cluster import MAX_CLUSTER_SIZE


def check_choice(parameter: str, value, allowed: tuple[str, ...]) -> None:
    """Raise TypeError / ValueError naming ``parameter``, ``value`` and ``allowed`` unless it is one."""
    if not isinstance(value, str):
        raise TypeError(f"{parameter} must be a string, one of {allowed}; got {value!r}")
    if value not in allowed:
        raise ValueError(f"{parameter} must be one of {allowed}; got {value!r}")


def check_rows(x) -> None:
    """``x`` must be a NumPy array [cluster_size, n] with 1 <= cluster_size <= 16 and n >= 1."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array [cluster_size, n]; got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(
            f"x must be 2-D [cluster_size, n], one row per block; got shape {x.shape} (ndim {x.ndim})"
        )
    cluster_size, n = x.shape
    if not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(
            f"cluster_size (x.shape[0]) must be in 1..{MAX_CLUSTER_SIZE}; got {cluster_size} (x.shape {x.shape})"
        )
    if n < 1:
        raise ValueError(f"n (x.shape[1]) must be at least 1; got {n} (x.shape {x.shape})")
