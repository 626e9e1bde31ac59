"""``algorithm="auto"``: the fastest ClusterReduce / ClusterGather algorithm, from measured data.

``auto_table.json`` beside this module ranks the algorithms (fastest first) by per-operation
latency measured by ``clusterlab bench primitives`` on an H200 (its ``source`` names the card,
driver, date, commit, configuration and results file). Regenerate it after a new run with::

    python -m clusterlab.bench.report benchmarks/results/primitives_h200.json \\
        --auto-table clusterlab/primitives/auto_table.json

Lookup: the nearest measured cluster size (ties go to the larger), then the nearest measured
message size on a log scale (ties go to the larger); the first algorithm of that ranking whose
shared memory fits in a block. Other GPUs get the H200's choice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..simulator import MAX_CLUSTER_SIZE, MAX_SMEM_BYTES_PER_BLOCK
from .gather import gather_shared_bytes
from .reduce import FLOAT32_BYTES, reduce_shared_bytes

TABLE_PATH = Path(__file__).with_name("auto_table.json")


def load_table(path=TABLE_PATH):
    """(source, reduce ranking, gather ranking) from a table written by ``clusterlab.bench.report``.

    reduce ranking: cluster size -> ((float32 bytes per block, algorithms fastest first), ...);
    gather ranking: element bytes -> cluster size -> ((message bytes, algorithms), ...).
    """
    data = json.loads(Path(path).read_text())

    def rows(entries):
        return tuple((int(nbytes), tuple(ranking)) for nbytes, ranking in entries)

    reduce_ranking = {int(size): rows(entries) for size, entries in data["reduce"].items()}
    gather_ranking = {
        int(itemsize): {int(size): rows(entries) for size, entries in table.items()}
        for itemsize, table in data["gather"].items()
    }
    return data["source"], reduce_ranking, gather_ranking


SOURCE, REDUCE_RANKING, GATHER_RANKING = load_table()


def _nearest(candidates, value):
    """The candidate closest to ``value`` (on a log scale for bytes); ties go to the larger."""
    return min(candidates, key=lambda c: (abs(math.log2(c) - math.log2(value)), -c))


def _ranking(table, cluster_size, n_bytes):
    if not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(f"cluster_size must be in 1..{MAX_CLUSTER_SIZE}; got {cluster_size}")
    if n_bytes < 1:
        raise ValueError(f"n_bytes must be positive; got {n_bytes}")
    rows = table[min(table, key=lambda s: (abs(s - cluster_size), -s))]
    return dict(rows)[_nearest([nbytes for nbytes, _ in rows], n_bytes)]


def choose_reduce_algorithm(cluster_size: int, n_bytes: int, ranking=None) -> str:
    """Fastest ``cluster_reduce`` algorithm for ``cluster_size`` blocks of ``n_bytes`` each.

    ``n_bytes`` counts the row as the device functions hold it, in float32: ``4 * n`` for n
    elements of any input dtype. Returns the best-ranked algorithm that fits in shared memory
    (the top-ranked one when none fits; the host API then reports the size). ``ranking``: a
    reduce ranking from :func:`load_table` (default: the committed one).
    """
    ranked = _ranking(REDUCE_RANKING if ranking is None else ranking, cluster_size, n_bytes)
    n = -(-n_bytes // FLOAT32_BYTES)
    for algorithm in ranked:
        if reduce_shared_bytes(algorithm, n, cluster_size) <= MAX_SMEM_BYTES_PER_BLOCK:
            return algorithm
    return ranked[0]


def choose_gather_algorithm(cluster_size: int, n_bytes: int, itemsize: int = 4, ranking=None) -> str:
    """Fastest ``cluster_gather`` algorithm for ``cluster_size`` rows of ``n_bytes`` of ``itemsize``-byte elements.

    ``itemsize`` is 4 (float32) or 2 (float16 / bfloat16). Returns the best-ranked algorithm
    whose ``cluster_size`` rows fit in shared memory (the top-ranked one when none fits).
    ``ranking``: a gather ranking from :func:`load_table` (default: the committed one).
    """
    table = GATHER_RANKING if ranking is None else ranking
    if itemsize not in table:
        raise ValueError(f"itemsize must be one of {tuple(table)}; got {itemsize}")
    ranked = _ranking(table[itemsize], cluster_size, n_bytes)
    n = -(-n_bytes // itemsize)
    for algorithm in ranked:
        if gather_shared_bytes(algorithm, n, cluster_size, itemsize) <= MAX_SMEM_BYTES_PER_BLOCK:
            return algorithm
    return ranked[0]
