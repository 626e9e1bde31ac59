"""``algorithm="auto"``: the fastest ClusterReduce / ClusterGather algorithm, from measured data.

The tables below rank the algorithms (fastest first) by per-operation latency measured by
``clusterlab bench primitives`` (``benchmarks/results/primitives_h100.json``):

- card: NVIDIA H100 80GB HBM3, driver 580.159.04
- date: 2026-11-26T18:36:16+00:00
- commit: 35b0cae
- configuration ``chip``: every block alone on its SM, as many clusters as are resident at
  once, 256 threads per block.

A point whose figures were noisy took the ranking of the nearest message size with reliable
figures (``clusterlab.bench.report.choice_tables``). Regenerate after a new run with::

    python -m clusterlab.bench.report benchmarks/results/primitives_h100.json \
        --auto-module clusterlab/primitives/auto.py

Lookup: the nearest measured cluster size (ties go to the larger), then the nearest measured
message size on a log scale (ties go to the larger); the first algorithm of that ranking whose
shared memory fits in a block. Other GPUs get the H100's choice.
"""

from __future__ import annotations

import math

from ..simulator import MAX_CLUSTER_SIZE, MAX_SMEM_BYTES_PER_BLOCK
from .gather import gather_shared_bytes
from .reduce import FLOAT32_BYTES, reduce_shared_bytes

SOURCE = {
    "card": "NVIDIA H100 80GB HBM3",
    "driver": "580.159.04",
    "date": "2026-11-26T18:36:16+00:00",
    "commit": "35b0cae",
    "config": "chip",
    "results": "benchmarks/results/primitives_h100.json",
}

#: cluster size -> ((float32 bytes per block, algorithms fastest first), ...).
REDUCE_RANKING = {
    1: (
        (64, ("butterfly", "ring", "direct", "bulk")),
        (128, ("butterfly", "ring", "direct", "bulk")),
        (256, ("butterfly", "ring", "direct", "bulk")),
        (512, ("butterfly", "ring", "direct", "bulk")),
        (1024, ("butterfly", "ring", "direct", "bulk")),
        (2048, ("butterfly", "ring", "direct", "bulk")),
        (4096, ("butterfly", "ring", "direct", "bulk")),
        (8192, ("butterfly", "ring", "direct", "bulk")),
        (16384, ("butterfly", "ring", "direct", "bulk")),
        (32768, ("butterfly", "ring", "direct", "bulk")),
        (65536, ("butterfly", "direct", "bulk", "ring")),
    ),
    2: (
        (64, ("direct", "butterfly", "bulk", "ring")),
        (128, ("direct", "butterfly", "bulk", "ring")),
        (256, ("direct", "butterfly", "bulk", "ring")),
        (512, ("butterfly", "direct", "bulk", "ring")),
        (1024, ("direct", "butterfly", "bulk", "ring")),
        (2048, ("direct", "butterfly", "bulk", "ring")),
        (4096, ("butterfly", "direct", "bulk", "ring")),
        (8192, ("butterfly", "bulk", "direct", "ring")),
        (16384, ("butterfly", "bulk", "direct", "ring")),
        (32768, ("butterfly", "bulk", "ring", "direct")),
        (65536, ("bulk", "butterfly", "ring", "direct")),
    ),
    3: (
        (64, ("direct", "bulk", "butterfly", "ring")),
        (128, ("direct", "bulk", "butterfly", "ring")),
        (256, ("direct", "bulk", "butterfly", "ring")),
        (512, ("direct", "bulk", "butterfly", "ring")),
        (1024, ("direct", "bulk", "butterfly", "ring")),
        (2048, ("direct", "bulk", "butterfly", "ring")),
        (4096, ("direct", "bulk", "butterfly", "ring")),
        (8192, ("bulk", "direct", "butterfly", "ring")),
        (16384, ("bulk", "direct", "butterfly", "ring")),
        (32768, ("bulk", "ring", "direct", "butterfly")),
        (65536, ("ring", "direct", "butterfly", "bulk")),
    ),
    4: (
        (64, ("direct", "bulk", "butterfly", "ring")),
        (128, ("direct", "bulk", "butterfly", "ring")),
        (256, ("direct", "bulk", "butterfly", "ring")),
        (512, ("direct", "bulk", "butterfly", "ring")),
        (1024, ("direct", "bulk", "butterfly", "ring")),
        (2048, ("direct", "bulk", "butterfly", "ring")),
        (4096, ("direct", "bulk", "butterfly", "ring")),
        (8192, ("direct", "bulk", "butterfly", "ring")),
        (16384, ("bulk", "butterfly", "direct", "ring")),
        (32768, ("bulk", "butterfly", "direct", "ring")),
        (65536, ("butterfly", "ring", "direct", "bulk")),
    ),
    6: (
        (64, ("direct", "bulk", "butterfly", "ring")),
        (128, ("direct", "bulk", "butterfly", "ring")),
        (256, ("direct", "bulk", "butterfly", "ring")),
        (512, ("direct", "bulk", "butterfly", "ring")),
        (1024, ("direct", "bulk", "butterfly", "ring")),
        (2048, ("direct", "bulk", "butterfly", "ring")),
        (4096, ("direct", "bulk", "butterfly", "ring")),
        (8192, ("direct", "bulk", "butterfly", "ring")),
        (16384, ("direct", "bulk", "butterfly", "ring")),
        (32768, ("direct", "bulk", "butterfly", "ring")),
        (65536, ("direct", "ring", "butterfly", "bulk")),
    ),
    8: (
        (64, ("direct", "bulk", "butterfly", "ring")),
        (128, ("direct", "bulk", "butterfly", "ring")),
        (256, ("direct", "bulk", "butterfly", "ring")),
        (512, ("direct", "bulk", "butterfly", "ring")),
        (1024, ("direct", "bulk", "butterfly", "ring")),
        (2048, ("direct", "bulk", "butterfly", "ring")),
        (4096, ("direct", "bulk", "butterfly", "ring")),
        (8192, ("direct", "butterfly", "bulk", "ring")),
        (16384, ("butterfly", "direct", "bulk", "ring")),
        (32768, ("butterfly", "direct", "ring", "bulk")),
        (65536, ("butterfly", "ring", "direct", "bulk")),
    ),
    16: (
        (64, ("direct", "bulk", "butterfly", "ring")),
        (128, ("direct", "butterfly", "bulk", "ring")),
        (256, ("direct", "butterfly", "bulk", "ring")),
        (512, ("direct", "butterfly", "bulk", "ring")),
        (1024, ("direct", "bulk", "butterfly", "ring")),
        (2048, ("direct", "bulk", "butterfly", "ring")),
        (4096, ("direct", "butterfly", "bulk", "ring")),
        (8192, ("butterfly", "direct", "bulk", "ring")),
        (16384, ("butterfly", "direct", "ring", "bulk")),
        (32768, ("butterfly", "direct", "ring", "bulk")),
        (65536, ("butterfly", "ring", "direct", "bulk")),
    ),
}

#: element bytes -> cluster size -> ((message bytes per block, algorithms fastest first), ...).
GATHER_RANKING = {
    2: {
        1: (
            (64, ("ring", "direct", "bulk")),
            (128, ("ring", "direct", "bulk")),
            (256, ("ring", "direct", "bulk")),
            (512, ("ring", "direct", "bulk")),
            (1024, ("ring", "bulk", "direct")),
            (2048, ("ring", "bulk", "direct")),
            (4096, ("ring", "bulk", "direct")),
            (8192, ("ring", "bulk", "direct")),
            (16384, ("ring", "bulk", "direct")),
            (32768, ("ring", "bulk", "direct")),
            (65536, ("ring", "bulk", "direct")),
        ),
        2: (
            (64, ("ring", "direct", "bulk")),
            (128, ("ring", "direct", "bulk")),
            (256, ("ring", "direct", "bulk")),
            (512, ("ring", "bulk", "direct")),
            (1024, ("bulk", "ring", "direct")),
            (2048, ("bulk", "ring", "direct")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
            (65536, ("bulk", "ring", "direct")),
        ),
        3: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("bulk", "direct", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "ring", "direct")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
            (65536, ("bulk", "ring", "direct")),
        ),
        4: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("bulk", "direct", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "ring", "direct")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
        ),
        6: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("bulk", "direct", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
        ),
        8: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("bulk", "direct", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
        ),
        16: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("bulk", "direct", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
        ),
    },
    4: {
        1: (
            (64, ("ring", "direct", "bulk")),
            (128, ("ring", "direct", "bulk")),
            (256, ("ring", "direct", "bulk")),
            (512, ("ring", "direct", "bulk")),
            (1024, ("ring", "direct", "bulk")),
            (2048, ("ring", "bulk", "direct")),
            (4096, ("ring", "bulk", "direct")),
            (8192, ("ring", "bulk", "direct")),
            (16384, ("ring", "bulk", "direct")),
            (32768, ("ring", "bulk", "direct")),
            (65536, ("ring", "bulk", "direct")),
        ),
        2: (
            (64, ("direct", "ring", "bulk")),
            (128, ("ring", "direct", "bulk")),
            (256, ("ring", "direct", "bulk")),
            (512, ("ring", "direct", "bulk")),
            (1024, ("ring", "bulk", "direct")),
            (2048, ("bulk", "ring", "direct")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
            (65536, ("bulk", "ring", "direct")),
        ),
        3: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("bulk", "direct", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
            (65536, ("bulk", "ring", "direct")),
        ),
        4: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("direct", "bulk", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "ring", "direct")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
        ),
        6: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("direct", "bulk", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "direct", "ring")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
            (32768, ("bulk", "ring", "direct")),
        ),
        8: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("direct", "bulk", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "direct", "ring")),
            (8192, ("bulk", "ring", "direct")),
            (16384, ("bulk", "ring", "direct")),
        ),
        16: (
            (64, ("direct", "bulk", "ring")),
            (128, ("direct", "bulk", "ring")),
            (256, ("direct", "bulk", "ring")),
            (512, ("direct", "bulk", "ring")),
            (1024, ("bulk", "direct", "ring")),
            (2048, ("bulk", "direct", "ring")),
            (4096, ("bulk", "direct", "ring")),
            (8192, ("bulk", "ring", "direct")),
        ),
    },
}


def _nearest(candidates, value):
    """The candidate closest to ``value`` (on a log scale for bytes); ties go to the larger."""
    return min(candidates, key=lambda c: (abs(math.log2(c) - math.log2(value)), -c))


def _ranking(table, cluster_size, n_bytes):
    if not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(f"cluster_size must be in 1..{MAX_CLUSTER_SIZE}; got {cluster_size}")
    if n_bytes < 1:
        raise ValueError(f"n_bytes must be positive; got {n_bytes}")
    rows = table[min(table, key=lambda s: (abs(s - cluster_size), -s))]
    sizes = [nbytes for nbytes, _ in rows]
    return dict(rows)[_nearest(sizes, n_bytes)]


def choose_reduce_algorithm(cluster_size: int, n_bytes: int) -> str:
    """Fastest ``cluster_reduce`` algorithm for ``cluster_size`` blocks of ``n_bytes`` each.

    ``n_bytes`` counts the row as the device functions hold it, in float32: ``4 * n`` for n
    elements of any input dtype. Returns the best-ranked algorithm that fits in shared memory
    (the top-ranked one when none fits; the host API then reports the size).
    """
    ranking = _ranking(REDUCE_RANKING, cluster_size, n_bytes)
    n = -(-n_bytes // FLOAT32_BYTES)
    for algorithm in ranking:
        if reduce_shared_bytes(algorithm, n, cluster_size) <= MAX_SMEM_BYTES_PER_BLOCK:
            return algorithm
    return ranking[0]


def choose_gather_algorithm(cluster_size: int, n_bytes: int, itemsize: int = 4) -> str:
    """Fastest ``cluster_gather`` algorithm for ``cluster_size`` rows of ``n_bytes`` of ``itemsize``-byte elements.

    ``itemsize`` is 4 (float32) or 2 (float16 / bfloat16). Returns the best-ranked algorithm
    whose ``cluster_size`` rows fit in shared memory (the top-ranked one when none fits).
    """
    if itemsize not in GATHER_RANKING:
        raise ValueError(f"itemsize must be one of {tuple(GATHER_RANKING)}; got {itemsize}")
    ranking = _ranking(GATHER_RANKING[itemsize], cluster_size, n_bytes)
    n = -(-n_bytes // itemsize)
    for algorithm in ranking:
        if gather_shared_bytes(algorithm, n, cluster_size, itemsize) <= MAX_SMEM_BYTES_PER_BLOCK:
            return algorithm
    return ranking[0]
