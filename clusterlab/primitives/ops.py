"""Device-side pieces every primitive kernel shares: operators, ring indices, the bulk push, dtype handling.

The operators reproduce :func:`clusterlab.simulator.op_ufunc` bit for bit, as ``combine(left, right)``
in float32: ``sum`` is an IEEE add, ``max`` / ``min`` propagate NaN and otherwise return
``left`` only when it is strictly larger / smaller (so on a ``-0.0`` / ``+0.0`` tie the right
operand wins, as ``np.maximum`` / ``np.minimum`` do; PTX ``max.f32`` would pick ``+0.0``).

Storage: float32 rows travel as float32; float16 and bfloat16 rows travel as their 16-bit patterns
in uint16 arrays (numba has no bfloat16 arrays) and are widened with ``cvt`` when staged.
"""

import functools

from numba import cuda, float32

from .. import ptx
from ..simulator import MAX_CLUSTER_SIZE


@cuda.jit(device=True, inline=True)
def op_sum(left, right):
    return left + right


@cuda.jit(device=True, inline=True)
def op_max(left, right):
    if left != left:
        return left
    return left if left > right else right


@cuda.jit(device=True, inline=True)
def op_min(left, right):
    if left != left:
        return left
    return left if left < right else right


OPERATORS = {"sum": op_sum, "max": op_max, "min": op_min}


@functools.cache
def rank_fold(op: str):
    """``fold(shared, i, size)``: element ``i`` of ``shared`` of every block, combined in rank order 0..N-1.

    The fold of ``direct`` (the simulator's ``acc = rows[0]; acc = op(acc, rows[s])`` for s = 1..N-1).
    ``shared``: a shared float32 array at the same offset in every block; ``size``: cluster_size().
    All N remote loads are issued before the first combine, so they travel together (one round
    trip of the cluster network, not N): the loop runs to :data:`MAX_CLUSTER_SIZE` with the ranks
    past N predicated off, so it unrolls and ``pulled`` stays in registers.
    """
    combine = OPERATORS[op]

    @cuda.jit(device=True, inline=True)
    def fold(shared, i, size):
        pulled = cuda.local.array(MAX_CLUSTER_SIZE, float32)
        for s in range(MAX_CLUSTER_SIZE):
            if s < size:
                pulled[s] = ptx.remote_load(shared, i, s)
        acc = pulled[0]
        for s in range(1, MAX_CLUSTER_SIZE):
            if s < size:
                acc = combine(acc, pulled[s])
        return acc

    return fold


@cuda.jit(device=True, inline=True)
def open_bulk_exchange(full, incoming_bytes, iteration):
    """Prologue of an exchange in which every block pushes rows into its peers with the copy engine.

    ``full``: shared::cta address of this block's mbarrier (8 bytes, the same offset in every
    block); ``incoming_bytes``: what the peers will copy into this block; ``iteration``: earlier
    exchanges on this mbarrier in the kernel. On the first one thread 0 initialises the mbarrier
    (one arrival) and makes it visible to the cluster; every thread fences its staged rows for the
    copy engine; a cluster barrier publishes rows and mbarriers everywhere; thread 0 arrives
    expecting ``incoming_bytes``. Afterwards the caller issues its copies (each completing on the
    destination's ``full``) and waits with ``mbarrier_wait_parity(full, iteration % 2)``.
    """
    if cuda.threadIdx.x == 0 and iteration == 0:
        ptx.mbarrier_init(full, 1)
        ptx.fence_mbarrier_init_release_cluster()
    ptx.fence_proxy_async_shared_cta()  # staged rows (st.shared) -> copy engine reads after this
    ptx.cluster_sync()  # rows staged and mbarriers initialised everywhere before any push
    if cuda.threadIdx.x == 0:
        ptx.mbarrier_arrive_expect_tx(full, incoming_bytes)


@cuda.jit(device=True, inline=True)
def bulk_push_rows(shared, offset, slot, slot_bytes, full, size, rank, iteration):
    """Push this block's row into every peer with ``cp.async.bulk``; wait until the peers' rows have landed.

    Runs after :func:`open_bulk_exchange`; the two together are the simulator's
    :func:`~clusterlab.simulator.bulk_push_rows` without its staging. ``shared``: a shared array
    holding rows [N, slot] from element ``offset`` on (16-byte aligned; ``slot`` elements are
    ``slot_bytes``, a multiple of 16), this block's row already in rows[rank]; ``full``:
    shared::cta address of this block's mbarrier; ``size``, ``rank``: cluster_size(),
    cluster_rank(). Thread 0 copies rows[rank] into rows[rank] of every peer, completing on the
    peer's ``full``; every thread then waits on its own ``full`` (parity iteration & 1) for the
    N-1 incoming rows. The caller must end with a cluster barrier before exiting: peers' copies
    may still read its row.
    """
    if cuda.threadIdx.x == 0:
        source = ptx.shared_address(shared, offset + rank * slot)
        for k in range(1, size):
            peer = (rank + k) % size
            destination = ptx.map_shared(source, peer)
            ptx.bulk_copy_shared_to_cluster(destination, source, slot_bytes, ptx.map_shared(full, peer))
    ptx.mbarrier_wait_parity(full, iteration % 2)


@cuda.jit(device=True, inline=True)
def left_neighbour(rank, size):
    """Rank (rank - 1) mod N: the block a ring step reads from. ``rank``, ``size``: cluster_rank(), cluster_size()."""
    return (rank + size - 1) % size


@cuda.jit(device=True, inline=True)
def ring_chunk(rank, s, size):
    """The chunk (reduce) or row (gather) that block ``rank`` pulls from its left neighbour at ring step ``s``.

    (rank - 1 - s) mod N, as :func:`clusterlab.simulator.gather.ring_chunk`; s <= N - 2, so the + 2N
    keeps the dividend non-negative.
    """
    return (rank + 2 * size - s - 1) % size


@cuda.jit(device=True, inline=True)
def widen_float32(value):
    return value


@cuda.jit(device=True, inline=True)
def narrow_float32(value):
    return value


#: dtype name -> (device function storage value -> float32, float32 -> storage value).
CONVERSIONS = {
    "float32": (widen_float32, narrow_float32),
    "float16": (ptx.f16_to_f32, ptx.f32_to_f16),
    "bfloat16": (ptx.bf16_to_f32, ptx.f32_to_bf16),
}

#: dtypes the GPU primitives accept.
GPU_DTYPES = tuple(CONVERSIONS)
