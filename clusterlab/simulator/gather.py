"""ClusterGather on the simulator: every block ends with every block's row.

``cluster_gather(x)`` takes ``x`` [N, n] (row r lives in block r) and returns ``out``
[N, N * n] with ``out[r] = x.ravel()`` on every block r, and the :class:`Trace`. Gathers copy
bits and never convert, so they are bit-exact by construction. Each block holds the gathered
rows in one shared array, ``rows`` [N, n] (``[N, slot]`` for ``bulk``), its own row staged at
``rows[r]``::

    block r's shared memory:  rows = | x0 | x1 | ... | x_r (staged) | ... | x_{N-1} |

Algorithms (each ends with a cluster barrier, so no block exits while a peer reads it):

``direct`` — one barrier after staging, then block r pulls ``rows[s]`` from every peer s
(``ld.shared::cluster``, ranks in order) into its own ``rows[s]``; 2 cluster barriers.

``ring`` — N-1 steps, one cluster barrier each; at step s block r pulls slice
``j = (r-1-s) mod N`` from its left neighbour ``(r-1) mod N``, which received it the step
before (its own row at step 0)::

    step 0:  0 <- 3: x3    1 <- 0: x0    2 <- 1: x1    3 <- 2: x2        (N = 4)
    step 1:  0 <- 3: x2    1 <- 0: x3    2 <- 1: x0    3 <- 2: x1
    step 2:  0 <- 3: x1    1 <- 0: x2    2 <- 1: x3    3 <- 2: x0

N cluster barriers in all (staging + N-1 steps).

``bulk`` — push instead of pull (:func:`bulk_push_rows`): each block initializes an mbarrier
``full`` (count 1), fences, and after one cluster barrier copies its row into ``rows[r]`` of every
peer with ``cp.async.bulk`` completing on that peer's ``full``; it expects
``(N-1) * slot_bytes`` and waits on parity 0. Rows are padded to 16-byte slots
(:func:`slot_elements`: ``slot_bytes = ceil(n * itemsize / 16) * 16``) because bulk copies need
16-byte aligned addresses and sizes. 2 cluster barriers.
"""

from __future__ import annotations

import numpy as np

from .cluster import Block, launch
from .dtypes import dtype_name, numpy_dtype
from .inputs import check_choice, check_fits, check_integer, check_rows
from .memory import MBARRIER_BYTES, aligned, layout_bytes

#: ClusterGather algorithms, by name.
GATHER_ALGORITHMS = ("direct", "ring", "bulk")


def cluster_gather(x: np.ndarray, algorithm: str = "direct"):
    """All-gather the rows of ``x`` across a simulated cluster.

    ``x``: [cluster_size, n], cluster_size 1..16, n >= 1, dtype one of ``DTYPES``; row r is
    block r's input. Returns ``(out, trace)``: ``out`` [cluster_size, cluster_size * n], same
    dtype, ``out[r]`` block r's gathered copy (equal to ``x.ravel()``), and the :class:`Trace`.
    """
    check_rows(x)
    name = dtype_name(x.dtype)
    check_choice("algorithm", algorithm, GATHER_ALGORITHMS)
    size, n = x.shape
    check_fits(
        "n (x.shape[1])", n, lambda m: gather_shared_bytes(algorithm, m, size, name),
        f"the {algorithm} gather (cluster size {size}, {name})",
    )
    out = np.empty((size, size * n), dtype=x.dtype)
    title = f"cluster_gather(algorithm={algorithm!r}): {size} blocks x {n} {name}"
    trace = launch(_PROGRAMS[algorithm], size, x, out, title=title)
    return out, trace


def gather_shared_bytes(algorithm: str, n: int, cluster_size: int, dtype) -> int:
    """Shared memory per block that ``algorithm`` declares to gather ``cluster_size`` rows of ``n`` ``dtype``.

    ``rows`` [N, n] for ``direct`` and ``ring``; ``rows`` [N, slot] then the mbarrier ``full`` for ``bulk``.
    """
    check_choice("algorithm", algorithm, GATHER_ALGORITHMS)
    itemsize = numpy_dtype(dtype_name(dtype)).itemsize
    if algorithm == "bulk":
        return layout_bytes([cluster_size * slot_elements(n, itemsize) * itemsize, MBARRIER_BYTES])
    return layout_bytes([cluster_size * n * itemsize])


def slot_elements(n: int, itemsize: int) -> int:
    """Elements of ``itemsize`` bytes in a row slot of ``n`` elements padded to a multiple of 16 bytes.

    The layout of every bulk algorithm, on the simulator and on the GPU: bulk copies need 16-byte
    aligned addresses and sizes. ``n >= 0``, ``itemsize >= 1``.
    """
    check_integer("n", n, 0)
    check_integer("itemsize", itemsize, 1)
    return aligned(n * itemsize) // itemsize


def left_neighbour(rank: int, size: int) -> int:
    """Rank (rank - 1) mod N: the block a ring step reads from."""
    return (rank - 1) % size


def ring_chunk(rank: int, s: int, size: int) -> int:
    """The chunk (reduce) or row (gather) block ``rank`` pulls from its left neighbour at ring step ``s``.

    (rank - 1 - s) mod N: the left neighbour pulled it at step s - 1, and at step 0 it is the
    neighbour's own row (gather) or the chunk whose fold the neighbour starts (reduce), so every
    chunk travels one block to the right per step.
    """
    return (rank - 1 - s) % size


def bulk_push_rows(b: Block, row: np.ndarray):
    """Give every block every block's ``row`` by pushing it with ``cp.async.bulk``.

    Generator, use as ``rows = yield from bulk_push_rows(b, row)``. ``row``: [n] values of
    block ``b`` (any dtype). Declares ``rows`` [N, slot_elements(n, itemsize)] and the mbarrier ``full``;
    returns the local ``rows`` once the N-1 incoming rows have landed: ``rows[s, :n]`` is block
    s's row. Costs one cluster barrier (after staging and mbarrier init); the caller must end
    with another before exiting, as peers' copies may still read ``rows[r]`` until then.
    """
    size, rank, n = b.cluster_size, b.cluster_rank, row.shape[0]
    slot = slot_elements(n, row.dtype.itemsize)
    rows = b.shared_array("rows", (size, slot), row.dtype)
    full = b.shared_mbarrier("full")
    b.step("stage")
    rows[rank, :n] = row
    b.mbarrier_init(full, 1)
    b.fence_proxy_async()  # st.shared above -> cp.async.bulk below
    yield b.cluster_sync()  # peers' mbarriers are initialized before anyone pushes
    b.step("push")
    b.mbarrier_arrive_expect_tx(full, (size - 1) * slot * row.dtype.itemsize)
    for k in range(1, size):
        peer = (rank + k) % size
        b.bulk_copy(b.map_shared(rows, peer).at[rank], rows.at[rank], b.map_shared(full, peer))
    yield b.mbarrier_wait(full, 0)
    return rows


def direct_gather(b: Block, x: np.ndarray, out: np.ndarray):
    """``direct``: stage, barrier, pull every peer's row, barrier. ``out[r]`` gets [N * n]."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    rows = b.shared_array("rows", (size, n), x.dtype)
    b.step("stage")
    rows[rank] = x[rank]
    yield b.cluster_sync()
    b.step("pull")
    for s in range(size):
        if s != rank:
            rows[s] = b.map_shared(rows, s)[s]
    yield b.cluster_sync()  # peers may still be reading rows[rank]
    b.step("read out")
    out[rank] = rows[:].reshape(-1)


def ring_gather(b: Block, x: np.ndarray, out: np.ndarray):
    """``ring``: N-1 steps; at step s pull slice (r-1-s) mod N from the left neighbour."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    left = left_neighbour(rank, size)
    rows = b.shared_array("rows", (size, n), x.dtype)
    b.step("stage")
    rows[rank] = x[rank]
    yield b.cluster_sync()
    for s in range(size - 1):
        b.step(f"ring {s}")
        j = ring_chunk(rank, s, size)
        rows[j] = b.map_shared(rows, left)[j]
        yield b.cluster_sync()
    b.step("read out")
    out[rank] = rows[:].reshape(-1)


def bulk_gather(b: Block, x: np.ndarray, out: np.ndarray):
    """``bulk``: push the row into every peer with cp.async.bulk, wait on the mbarrier, barrier."""
    n = x.shape[1]
    rows = yield from bulk_push_rows(b, x[b.cluster_rank])
    b.step("read out")
    out[b.cluster_rank] = rows[:, :n].reshape(-1)
    yield b.cluster_sync()  # peers' copies may still be reading rows[rank]


_PROGRAMS = {"direct": direct_gather, "ring": ring_gather, "bulk": bulk_gather}
