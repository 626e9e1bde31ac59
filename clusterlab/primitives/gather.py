"""ClusterGather on the GPU: the simulator's three algorithms as Numba-CUDA device functions.

Same names as the simulator programs that model them (:mod:`clusterlab.simulator.gather`).
Gathers copy bits and never convert, so they match the simulator bit for bit by construction;
the kernels move float16/bfloat16 as uint16 and float32 as float32.

Device-function contract (all three)::

    gather(rows, n, stride, iteration)

    rows       shared [N * stride] of any element type; on entry block r has staged its row in
               rows[r*stride : r*stride + n] (every thread's stores done, no barrier needed); on
               return rows[s*stride : s*stride + n] holds block s's row for every s, on every block
    n          elements per row; ``stride`` >= n is the row pitch. ``bulk`` needs
               stride * itemsize to be a multiple of 16 and ``rows`` 16-byte aligned
               (see gather_stride)
    iteration  how many times this function ran before in this kernel (0 for a single call);
               ``bulk`` keeps ONE mbarrier per kernel (a static shared slot) and waits on phase
               parity iteration & 1, so for ``bulk_gather`` count every earlier call of it in the
               kernel, from any call site

Every block calls it with all its threads. It opens with a cluster barrier (publishing the staged
row) and ends with one, after which no peer touches this block's shared memory.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from .. import ptx
from ..simulator import GATHER_ALGORITHMS, slot_elements
from ..simulator.inputs import check_choice, check_integer
from .ops import bulk_push_rows, left_neighbour, open_bulk_exchange, ring_chunk


def gather_stride(algorithm: str, n: int, itemsize: int) -> int:
    """Row pitch in elements: n >= 0, or n padded to 16 bytes for ``bulk`` (bulk copies need it)."""
    check_choice("algorithm", algorithm, GATHER_ALGORITHMS)
    check_integer("n", n, 0)
    check_integer("itemsize", itemsize, 1)
    if algorithm == "bulk":
        return slot_elements(n, itemsize)
    return n


def gather_shared_bytes(algorithm: str, n: int, cluster_size: int, itemsize: int) -> int:
    """Dynamic shared memory per block of :func:`gather_kernel`: ``cluster_size`` rows at the stride."""
    return cluster_size * gather_stride(algorithm, n, itemsize) * itemsize


@cuda.jit(device=True)
def direct_gather(rows, n, stride, iteration):
    """Pull every peer's row (ranks in order); 2 cluster barriers."""
    size = ptx.cluster_size()
    rank = ptx.cluster_rank()
    ptx.cluster_sync()
    for j in range(cuda.threadIdx.x, size * n, cuda.blockDim.x):
        s = j // n
        if s != rank:
            k = s * stride + j - s * n
            rows[k] = ptx.remote_load(rows, k, s)
    ptx.cluster_sync()  # peers may still be reading this block's row until here


@cuda.jit(device=True)
def ring_gather(rows, n, stride, iteration):
    """N-1 steps; at step s pull slice (r-1-s) mod N from the left neighbour; N cluster barriers."""
    size = ptx.cluster_size()
    rank = ptx.cluster_rank()
    left = left_neighbour(rank, size)
    ptx.cluster_sync()
    for s in range(size - 1):
        j = ring_chunk(rank, s, size)
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            rows[j * stride + i] = ptx.remote_load(rows, j * stride + i, left)
        ptx.cluster_sync()


@cuda.jit(device=True)
def bulk_gather(rows, n, stride, iteration):
    """Push the row into every peer with cp.async.bulk, wait on the own mbarrier; 2 barriers."""
    size = ptx.cluster_size()
    rank = ptx.cluster_rank()
    full_slot = cuda.shared.array(1, dtype=np.uint64)
    full = ptx.shared_address(full_slot, 0)
    slot_bytes = stride * rows.itemsize  # the stride of bulk is the 16-byte slot (gather_stride)
    open_bulk_exchange(full, (size - 1) * slot_bytes, iteration)
    bulk_push_rows(rows, 0, stride, slot_bytes, full, size, rank, iteration)
    ptx.cluster_sync()  # peers' copies may still read this block's row until here


GATHER_DEVICE_FUNCTIONS = {"direct": direct_gather, "ring": ring_gather, "bulk": bulk_gather}


@cuda.jit(device=True, forceinline=True)
def stage_row(rows, x, n, stride):
    """Block b (rank r) copies row b of ``x`` [blocks, n] to ``rows[r*stride : r*stride + n]``.

    1-D clusters: block b is rank b % N. No barrier: a gather opens with one.
    """
    rank = ptx.cluster_rank()
    block = cuda.blockIdx.x
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        rows[rank * stride + i] = x[block, i]


@cuda.jit(device=True, forceinline=True)
def store_rows(out, rows, n, stride):
    """Block b writes the N gathered rows of ``rows`` (at the stride) back to back into ``out[b]`` [N * n]."""
    size = ptx.cluster_size()
    block = cuda.blockIdx.x
    for j in range(cuda.threadIdx.x, size * n, cuda.blockDim.x):
        s = j // n
        out[block, j] = rows[s * stride + j - s * n]


@functools.cache
def gather_kernel(algorithm: str, storage: np.dtype):
    """Kernel: block b gathers row b of ``x`` [blocks, n] with its cluster into ``out`` [blocks, N*n].

    ``storage`` is the element type moved: float32, or uint16 for the bit patterns of
    float16/bfloat16. Dynamic shared memory: ``rows`` [N * stride], 16-byte aligned. 1-D
    clusters: block b is rank b % N.
    """
    gather = GATHER_DEVICE_FUNCTIONS[algorithm]

    @cuda.jit
    def cluster_gather_kernel(x, out, n, stride):
        rows = cuda.shared.array(0, dtype=storage, alignment=16)
        stage_row(rows, x, n, stride)
        gather(rows, n, stride, 0)
        store_rows(out, rows, n, stride)

    return cluster_gather_kernel
