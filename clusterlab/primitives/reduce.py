"""ClusterReduce on the GPU: the simulator's six algorithms as Numba-CUDA device functions.

Each function here has the same name as the simulator program that models it
(:mod:`clusterlab.simulator.reduce`) and folds in the same order, so the two agree bit for bit;
that module's docstring is the contract (fold orders, chunking, barrier counts). The two read line
for line: the same names (``combine``, ``staged``, ``partial`` / ``result``, ``acc`` rows,
``rows`` / ``slot`` / ``full``, ``inbox`` / ``scattered`` / ``gathered``, ``left``, chunk ``c`` =
[lo, hi)) and index helpers
(``left_neighbour``, ``ring_chunk``, ``chunk_start``; ``two_shot_chunk_start`` and ``quad_padded`` are
the simulator's own functions, compiled; ``push_chunk`` is the simulator's ``_push``); the simulator's 2-D shared
arrays are laid out flat in ``work`` here, at the offsets each function names.

Device-function contract (all six)::

    reduce(staged, work, n, iteration)

    staged     shared float32 [n] and its padding to 16 bytes (``bulk_two_shot`` copies that along),
               16-byte aligned (rows move 16 bytes at a time), at the same offset in every block:
               this block's row on entry (every thread's stores done; no
               barrier needed before the call), the reduction of all rows on return, on every block
    work       shared float32 scratch of reduce_scratch_elements(algorithm, n, cluster_size)
               elements, 16-byte aligned
    n          elements per row (same on every block)
    iteration  how many times this call site ran before in this kernel (0 for a single call);
               ``bulk`` and ``bulk_two_shot`` keep their mbarriers in ``work`` and wait on phase parity
               iteration & 1

Every block of the cluster must call it with all its threads, at most 512 (``direct`` and
``two_shot`` keep 8 loads of 16 bytes a thread in registers, the steady reduces N x ceil(4 / N)). It opens with a
cluster barrier (publishing ``staged``) and ends with one, after which no peer touches this block's shared memory:
``staged`` and ``work`` are free to reuse and the block may exit. (``two_shot``'s last cluster barrier publishes
the chunks its peers pushed into ``work``; a block barrier follows it, once ``staged`` holds the result.)

Back-to-back all-reduces at **one cluster barrier each** (the simulator's
``direct_steady_reduce``, whose rules its module docstring states)::

    direct_steady_reduce(staged, result, n, k)      from steady_reduce_device_function(op, cluster_size)

    staged     shared float32 [2, slot], slot = n rounded up to a multiple of 4, 16-byte aligned:
               buffer k % 2 (elements (k % 2) * slot ..) holds this block's row of operation k on
               entry (every thread's stores done); buffer (k + 1) % 2 is free for operation k + 1's
               row once the call returns
    result     shared float32 [n], this block's own: the reduction of operation k's rows on return,
               the ``direct`` fold (rank order 0..N-1), so bit for bit ``direct``'s. It may be
               ``staged``'s buffer (k + 1) % 2 itself (16-byte aligned): a chain of reductions, each
               result the next operation's row, then copies nothing
    k          the operation's index: 0, 1, 2, .. at one call site

It opens with the operation's cluster barrier and ends with a block barrier; peers may still read
``staged`` buffer k % 2 until every block has passed the next call's barrier. After the last
operation call ``ptx.cluster_sync()`` once before the block exits or reuses ``staged``: steps + 1
cluster barriers for ``steps`` operations, against 2 x steps for separate ``direct`` calls. Writing
buffer (k + 1) % 2 during operation k is the simulator's rule (3): that buffer's last readers were
operation k - 1's, and every block had finished them before it arrived at barrier k.

The function is compiled for one cluster size (launch it in clusters of exactly that many blocks):
its fold is :func:`~clusterlab.primitives.ops.unrolled_fold_row`, all of an element's N remote
loads in flight at once, so an operation costs its barrier and about one DSMEM round trip.

Back-to-back ``two_shot`` all-reduces at **two cluster barriers each**, moving 2 (N - 1) / N rows a
block instead of ``direct``'s N - 1 (the simulator's ``two_shot_steady_reduce``, its rules in that
module's docstring)::

    two_shot_steady_reduce(staged, result, n, k)    from steady_reduce_device_function(op, N, "two_shot")

    staged     shared float32 [slot], 16-byte aligned, the same offset in every block: this block's
               row of operation k on entry; free for operation k + 1's row once the call returns
    result     shared float32 [slot], 16-byte aligned, the same offset in every block: the reduction
               on return (chunk ``rank`` folded here, the others pushed by their owners between the
               call's two barriers), this block's own until it calls again. ``staged`` and ``result``
               may swap from one operation to the next (a chain: operation k's result is operation
               k + 1's row)

Barrier k.a opens the call (rows staged, and every block done with its result of operation k - 1), k.b
closes it (every chunk folded and pushed: up to :data:`PUSH_WHILE_FOLDING` blocks each quad as soon as
it is folded, beyond that the whole chunk after the fold). Past k.b no peer touches this block's shared memory, so no
barrier is needed after the last operation: 2 x steps cluster barriers, as many as separate ``two_shot``
calls, without their copy of the result into ``staged``.

The steady ``direct`` and ``two_shot`` reduces keep float16 and bfloat16 rows 16-bit (as the simulator's steady ``direct`` and ``two_shot`` stage
them, in their input dtype): ``steady_reduce_device_function(op, cluster_size, algorithm, dtype)`` takes
``staged`` and ``result`` as shared uint32 words, two elements a word (element 2w in the low half of
word w; a slot ceil(n / 2) words rounded up to a multiple of 4), and the same ``n`` (elements) and
``k``. Their fold, :func:`~clusterlab.primitives.ops.unrolled_fold_packed_row`, widens each pulled word
to two float32, folds in rank order and rounds once into ``result`` (``two_shot``'s chunks are cut in
words, and each rounded word, pair or quad is pushed as it is folded, at every cluster size): bit for
bit the float32 reduce of the widened rows rounded, as the host API's, at half the DSMEM bytes. (An odd
``n`` leaves a padding half in the last word, folded and rounded like the rest;
:func:`~clusterlab.primitives.ops.pack_row` stages it as zero.)

Back-to-back ``bulk_two_shot`` all-reduces at **no cluster barrier** an operation (the simulator's
``bulk_two_shot_steady_reduce``, its rules in that module's docstring)::

    bulk_two_shot_steady_reduce(staged, work, n, k)    from steady_reduce_device_function(op, N, "bulk_two_shot")

    staged     shared float32 [slot], 16-byte aligned, the same offset in every block: this block's
               row of operation k on entry (every thread's stores done), the reduction on return; the
               next row may be staged over it once the call returns (a chain: leave the result there)
    work       shared float32 scratch of reduce_scratch_elements("bulk_two_shot", n, N) elements,
               16-byte aligned, the same offset in every block: the mbarriers ``scattered`` and
               ``gathered`` and the inbox [N, chunk slot]; the caller leaves it alone between calls
    k          the operation's index: 0, 1, 2, .. at one call site (operation 0 initialises the
               mbarriers and opens with the chain's one cluster barrier)

The chunks go out and the folded chunks come back as ``cp.async.bulk`` copies issued by thread 0, each
followed by a release arrival on the receiver's mbarrier; every thread waits on its own ``scattered``,
then on ``gathered``. After the last operation call ``ptx.cluster_sync()`` once before the block
exits or reuses ``staged`` and ``work``: 2 cluster barriers for any number of operations.

The host API, :func:`cluster_reduce`, stages rows from global memory, widening float16/bfloat16
to float32, runs one of these, and rounds the result once to the input dtype;
:func:`cluster_reduce_steady` does so for a sequence of operations (its ``direct`` and ``two_shot``
staging float16/bfloat16 rows packed, as they are).
"""

from __future__ import annotations

import functools

from numba import cuda

from .. import ptx
from ..simulator import MAX_CLUSTER_SIZE, REDUCE_ALGORITHMS, slot_elements
from ..simulator.inputs import check_choice, check_integer
from ..simulator import reduce as simulator_reduce
from ..simulator.reduce import STEADY_BUFFERS, STEADY_EXIT_BARRIER, bulk_two_shot_chunk_slot, widest_chunk
from .ops import (CONVERSIONS, GPU_DTYPES, OPERATORS, PACKED_CONVERSIONS, bulk_push_rows, left_neighbour,
                  open_bulk_exchange, pack_row, packed_words, push_element, push_quad, rank_folds, ring_chunk,
                  unpack_row, unrolled_fold_packed_row, unrolled_fold_row)

#: Bytes reserved at the start of ``work`` for the mbarriers of ``bulk`` (one) and ``bulk_two_shot``
#: (two; 8 bytes each), keeping what follows 16-byte aligned.
MBARRIER_BYTES = 16
FLOAT32_BYTES = 4


def reduce_scratch_elements(algorithm: str, n: int, cluster_size: int) -> int:
    """float32 elements of ``work`` the device function of ``algorithm`` needs (n >= 1, cluster_size 1..16)."""
    check_choice("algorithm", algorithm, REDUCE_ALGORITHMS)
    check_integer("n", n, 1)
    check_integer("cluster_size", cluster_size, 1, MAX_CLUSTER_SIZE)
    if algorithm == "direct":
        return n  # the folded row, kept until no peer reads ``staged`` any more
    if algorithm == "ring":
        return 2 * widest_chunk(n, cluster_size) + n  # partial [2, widest] | result [n]
    if algorithm == "butterfly":
        return 2 * n  # acc [2, n]
    if algorithm == "two_shot":
        return n  # result [n]
    if algorithm == "bulk_two_shot":  # scattered, gathered mbarriers | inbox [N, chunk slot]
        return MBARRIER_BYTES // FLOAT32_BYTES + cluster_size * bulk_two_shot_chunk_slot(n, cluster_size, FLOAT32_BYTES)
    slot = slot_elements(n, FLOAT32_BYTES)
    return MBARRIER_BYTES // FLOAT32_BYTES + cluster_size * slot  # bulk: mbarrier | rows [N, slot]


def work_offset(n: int) -> int:
    """float32 element where ``work`` starts in the host kernel's shared memory: n padded to 16 bytes."""
    return slot_elements(n, FLOAT32_BYTES)


def reduce_shared_bytes(algorithm: str, n: int, cluster_size: int) -> int:
    """Dynamic shared memory per block of :func:`reduce_kernel`: ``staged`` (padded) then ``work``."""
    return (work_offset(n) + reduce_scratch_elements(algorithm, n, cluster_size)) * FLOAT32_BYTES


@cuda.jit(device=True, inline=True)
def chunk_start(c, n, size):
    """First element of chunk ``c`` of a row of ``n`` cut into ``size`` chunks (as the simulator's ``chunk_start``)."""
    return c * n // size


two_shot_chunk_start = cuda.jit(device=True, inline=True)(simulator_reduce.two_shot_chunk_start)
quad_padded = cuda.jit(device=True, inline=True)(simulator_reduce.quad_padded)


@cuda.jit(device=True, inline=True)
def push_chunk(result, lo, hi, size, rank):
    """``two_shot``'s all-gather (the simulator's ``_push``): ``result[lo .. hi - 1]``, this block's folded
    chunk, stored into the same elements of every peer's ``result``, the next rank first; 16 bytes a
    remote store (thread t: quads t, t + blockDim, ..), the chunk's tail after its whole quads an
    element a thread. Stores need no round trip, so a thread has all of its quads' N - 1 stores in
    flight; the cluster barrier after the call publishes them."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    quads = (hi - lo) // 4
    for q in range(t, quads, threads):
        at = lo + 4 * q
        push_quad(result, at, result[at], result[at + 1], result[at + 2], result[at + 3], size, rank)
    for i in range(lo + 4 * quads + t, hi, threads):
        push_element(result, i, result[i], size, rank)


def _cache_checked(function):
    """``functools.cache(function)``, save that a call whose arguments cannot be a key (a list, a set) goes to
    ``function`` itself, whose checks name the argument and what it may be (not "unhashable type")."""
    cached = functools.cache(function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            hash((args, tuple(kwargs.items())))
        except TypeError:
            return function(*args, **kwargs)
        return cached(*args, **kwargs)

    return call


@_cache_checked
def reduce_device_function(algorithm: str, op: str):
    """The device function running ClusterReduce ``algorithm`` with operator ``op`` (see module doc)."""
    check_choice("algorithm", algorithm, REDUCE_ALGORITHMS)
    check_choice("op", op, tuple(OPERATORS))
    combine = OPERATORS[op]
    fold, fold_quads, fold_row = rank_folds(op)

    @cuda.jit(device=True)
    def direct_reduce(staged, work, n, iteration):
        """Pull all staged rows, fold in rank order 0..N-1; 2 cluster barriers. A row of more
        elements than the block has threads moves in quads (``fold_quads``, 16 bytes a load, in
        rounds); a shorter one an element a thread (4-byte loads, which a warp coalesces)."""
        size = ptx.cluster_size()
        ptx.cluster_sync()
        fold_row(staged, 0, work, n, size)
        ptx.cluster_sync()  # peers may still be reading staged until here
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            staged[i] = work[i]
        cuda.syncthreads()

    @cuda.jit(device=True)
    def ring_reduce(staged, work, n, iteration):
        """Reduce-scatter then all-gather over N chunks; 2N-1 cluster barriers."""
        size = ptx.cluster_size()
        rank = ptx.cluster_rank()
        left = left_neighbour(rank, size)
        widest = (n + size - 1) // size  # widest_chunk(n, size), which device code cannot call
        partial = 0  # work = partial [2, widest] | result [n]: partial[p, k] is work[partial + p * widest + k]
        result = partial + 2 * widest  # result[i] is work[result + i]
        ptx.cluster_sync()
        for s in range(size - 1):
            c = ring_chunk(rank, s, size)
            lo = chunk_start(c, n, size)
            hi = chunk_start(c + 1, n, size)
            for i in range(lo + cuda.threadIdx.x, hi, cuda.blockDim.x):
                if s == 0:
                    received = ptx.remote_load(staged, i, left)
                else:  # the left neighbour's partial[(s - 1) % 2, i - lo]
                    received = ptx.remote_load(work, partial + ((s - 1) % 2) * widest + i - lo, left)
                combined = combine(received, staged[i])
                if s == size - 2:
                    work[result + i] = combined
                else:  # partial[s % 2, i - lo]
                    work[partial + (s % 2) * widest + i - lo] = combined
            ptx.cluster_sync()
        for s in range(size - 1):
            # chunk (rank - s) mod N: the left neighbour finished it (s = 0) or pulled it at step s - 1
            c = (rank + size - s) % size
            for i in range(
                chunk_start(c, n, size) + cuda.threadIdx.x, chunk_start(c + 1, n, size), cuda.blockDim.x
            ):
                work[result + i] = ptx.remote_load(work, result + i, left)
            ptx.cluster_sync()
        if size > 1:
            for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                staged[i] = work[result + i]
        cuda.syncthreads()

    @cuda.jit(device=True)
    def butterfly_value(staged, work, n, owner, row, i):
        """Element i of block ``owner``'s running value: staged (row -1) or acc[row] (work = acc [2, n])."""
        if row < 0:
            return ptx.remote_load(staged, i, owner)
        return ptx.remote_load(work, row * n + i, owner)

    @cuda.jit(device=True)
    def butterfly_reduce(staged, work, n, iteration):
        """Fold to a power of two P, recursive doubling, unfold; 1 + [1] + log2 P + [1] barriers."""
        size = ptx.cluster_size()
        rank = ptx.cluster_rank()
        power = 1  # P, the largest power of two <= N
        while power * 2 <= size:
            power *= 2
        ptx.cluster_sync()
        row = -1
        if size > power:
            if rank < size - power:  # work[i] is acc[0, i]
                for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                    work[i] = combine(staged[i], ptx.remote_load(staged, i, rank + power))
            elif rank < power:
                for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                    work[i] = staged[i]
            row = 0
            ptx.cluster_sync()
        mask = 1
        while mask < power:
            write = 0 if row < 0 else 1 - row
            if rank < power:
                low = min(rank, rank ^ mask)
                high = max(rank, rank ^ mask)
                for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                    work[write * n + i] = combine(
                        butterfly_value(staged, work, n, low, row, i), butterfly_value(staged, work, n, high, row, i)
                    )
            row = write
            mask *= 2
            ptx.cluster_sync()
        source = rank - power if rank >= power else rank
        if row >= 0:
            for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                staged[i] = butterfly_value(staged, work, n, source, row, i)
        if size > power:
            ptx.cluster_sync()  # block rank-power must not exit while it is read
        cuda.syncthreads()

    @cuda.jit(device=True)
    def bulk_reduce(staged, work, n, iteration):
        """cp.async.bulk push of every row into every peer's slot, then the direct fold; 2 barriers."""
        size = ptx.cluster_size()
        rank = ptx.cluster_rank()
        slot = quad_padded(n)  # slot_elements(n, FLOAT32_BYTES)
        rows = MBARRIER_BYTES // FLOAT32_BYTES  # work = mbarrier | rows [N, slot]
        full = ptx.shared_address(work, 0)
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            work[rows + rank * slot + i] = staged[i]
        open_bulk_exchange(full, (size - 1) * slot * FLOAT32_BYTES, iteration)
        bulk_push_rows(work, rows, slot, slot * FLOAT32_BYTES, full, size, rank, iteration)
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            acc = work[rows + i]
            for s in range(1, size):
                acc = combine(acc, work[rows + s * slot + i])
            staged[i] = acc
        ptx.cluster_sync()  # peers' copies may still read this block's slot until here

    @cuda.jit(device=True)
    def two_shot_reduce(staged, work, n, iteration):
        """Reduce-scatter (``fold_quads`` of the own chunk, 16 bytes a remote load,
        :data:`~clusterlab.primitives.ops.LOADS_IN_FLIGHT` loads in flight per thread), then the folded
        chunk pushed into every peer's result (:func:`push_chunk`); 2 cluster barriers."""
        size = ptx.cluster_size()
        rank = ptx.cluster_rank()
        result = 0  # work = result [n]: result[i] is work[result + i]
        stride = cuda.blockDim.x
        ptx.cluster_sync()  # every row is staged
        lo = two_shot_chunk_start(rank, n, size)
        hi = two_shot_chunk_start(rank + 1, n, size)
        quads = (hi - lo) // 4  # whole quads of the chunk; the row's tail (last chunk only) one by one
        fold_quads(staged, lo, work, result + lo, quads, size)
        for j in range(lo + 4 * quads + cuda.threadIdx.x, hi, stride):
            work[result + j] = fold(staged, j, size)
        cuda.syncthreads()  # the block's chunk is folded
        push_chunk(work, lo, hi, size, rank)
        ptx.cluster_sync()  # every chunk is reduced and pushed; nobody reads staged any more
        for j in range(cuda.threadIdx.x, n, stride):
            staged[j] = work[result + j]
        cuda.syncthreads()

    @cuda.jit(device=True)
    def bulk_two_shot_reduce(staged, work, n, iteration):
        """``two_shot``'s chunks moved by the copy engine (cp.async.bulk, completing on mbarriers), the
        threads only folding; 2 cluster barriers. Copies whole chunks, so the last one takes the row's
        padding to 16 bytes along (``staged`` must have it, as the host kernel's ``work_offset`` gives)."""
        size = ptx.cluster_size()
        rank = ptx.cluster_rank()
        slot = 4 * ((quad_padded(n) // 4 + size - 1) // size)  # bulk_two_shot_chunk_slot(n, N, 4): the widest chunk
        inbox = MBARRIER_BYTES // FLOAT32_BYTES  # work = scattered, gathered | inbox [N, slot]
        scattered = ptx.shared_address(work, 0)
        gathered = scattered + 8
        lo = two_shot_chunk_start(rank, n, size)
        hi = two_shot_chunk_start(rank + 1, n, size)
        end = lo + quad_padded(hi - lo)  # what a copy of chunk rank moves: [lo, end)
        if cuda.threadIdx.x == 0 and iteration == 0:
            ptx.mbarrier_init(gathered, 1)  # published with scattered by open_bulk_exchange
        open_bulk_exchange(scattered, (size - 1) * (end - lo) * FLOAT32_BYTES, iteration)
        if cuda.threadIdx.x == 0:
            ptx.mbarrier_arrive_expect_tx(gathered, (quad_padded(n) - (end - lo)) * FLOAT32_BYTES)
            for k in range(1, size):  # reduce-scatter: chunk c of this row into inbox[rank] of block c
                c = (rank + k) % size
                c_lo = two_shot_chunk_start(c, n, size)
                c_end = c_lo + quad_padded(two_shot_chunk_start(c + 1, n, size) - c_lo)
                if c_end > c_lo:
                    destination = ptx.map_shared(ptx.shared_address(work, inbox + rank * slot), c)
                    ptx.bulk_copy_shared_to_cluster(destination, ptx.shared_address(staged, c_lo),
                                                    (c_end - c_lo) * FLOAT32_BYTES, ptx.map_shared(scattered, c))
        ptx.mbarrier_wait_parity(scattered, iteration % 2)
        for i in range(lo + cuda.threadIdx.x, hi, cuda.blockDim.x):  # the direct fold of chunk rank
            acc = staged[i] if rank == 0 else work[inbox + i - lo]
            for s in range(1, size):
                acc = combine(acc, staged[i] if s == rank else work[inbox + s * slot + i - lo])
            staged[i] = acc
        ptx.fence_proxy_async_shared_cta()  # the folded chunk (st.shared) -> the copies below
        cuda.syncthreads()
        if cuda.threadIdx.x == 0 and end > lo:
            source = ptx.shared_address(staged, lo)
            for k in range(1, size):  # all-gather: the folded chunk into staged of every peer
                c = (rank + k) % size
                ptx.bulk_copy_shared_to_cluster(ptx.map_shared(source, c), source, (end - lo) * FLOAT32_BYTES,
                                                ptx.map_shared(gathered, c))
        ptx.mbarrier_wait_parity(gathered, iteration % 2)
        ptx.cluster_sync()  # peers' copies may still be reading staged[chunk rank] until here

    return {"direct": direct_reduce, "ring": ring_reduce, "butterfly": butterfly_reduce, "bulk": bulk_reduce,
            "two_shot": two_shot_reduce, "bulk_two_shot": bulk_two_shot_reduce}[algorithm]


@functools.cache
def reduce_kernel(algorithm: str, op: str, dtype: str):
    """Kernel: block b of the grid reduces row b of ``x`` [blocks, n] with its cluster into ``out``.

    ``x``/``out``: [num_clusters * cluster_size, n], float32, or uint16 bit patterns for
    float16/bfloat16. Dynamic shared memory: ``staged`` [n] at 0, ``work`` at ``work_offset``
    (float32 elements, 16-byte aligned). 1-D clusters, so block b is rank b % cluster_size.
    """
    reduce = reduce_device_function(algorithm, op)
    widen, narrow = CONVERSIONS[dtype]

    @cuda.jit
    def cluster_reduce_kernel(x, out, n, work_offset):
        smem = cuda.shared.array(0, dtype="float32", alignment=16)
        staged = smem[:n]
        work = smem[work_offset:]
        row = cuda.blockIdx.x
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            staged[i] = widen(x[row, i])
        reduce(staged, work, n, 0)
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            out[row, i] = narrow(staged[i])

    return cluster_reduce_kernel


#: The steady reduces that keep float16 and bfloat16 rows packed two to a 32-bit word (they exchange inputs and
#: results only); ``bulk_two_shot`` stages float32.
PACKED_STEADY = ("direct", "two_shot")


def packed_rows(algorithm: str, dtype: str) -> bool:
    """Whether the steady ``algorithm`` keeps rows of ``dtype`` packed two to a 32-bit word in shared memory:
    :data:`PACKED_STEADY` do for float16 and bfloat16."""
    check_choice("algorithm", algorithm, tuple(STEADY_BUFFERS))
    check_choice("dtype", dtype, GPU_DTYPES)
    return algorithm in PACKED_STEADY and dtype in PACKED_CONVERSIONS


def steady_row_words(n: int, algorithm: str = "direct", dtype: str = "float32") -> int:
    """32-bit words of a row of ``n`` elements in the steady reduce's shared memory: ``n`` float32, or
    ceil(n / 2) words where its rows stay packed (:func:`packed_rows`); ``n`` >= 1."""
    check_integer("n", n, 1)
    return simulator_reduce.packed_words(n) if packed_rows(algorithm, dtype) else n


def steady_result_offset(n: int, algorithm: str = "direct", dtype: str = "float32") -> int:
    """32-bit word where ``result`` (``work`` for ``bulk_two_shot``) starts after the steady reduce's
    ``staged``: [2, slot] for ``direct``, [slot] for ``two_shot`` and ``bulk_two_shot``, a slot the row's
    words (:func:`steady_row_words`) padded to 16 bytes."""
    check_choice("algorithm", algorithm, tuple(STEADY_BUFFERS))
    return STEADY_BUFFERS[algorithm] * slot_elements(steady_row_words(n, algorithm, dtype), FLOAT32_BYTES)


def steady_shared_bytes(n: int, algorithm: str = "direct", cluster_size: int = 1, dtype: str = "float32") -> int:
    """Dynamic shared memory per block of :func:`steady_reduce_kernel`: ``staged``, then ``result``
    [slot] (``direct``, ``two_shot``) or ``bulk_two_shot``'s ``work`` (its mbarriers and the inbox
    of ``cluster_size`` chunks)."""
    after = (reduce_scratch_elements("bulk_two_shot", n, cluster_size) if algorithm == "bulk_two_shot"
             else slot_elements(steady_row_words(n, algorithm, dtype), FLOAT32_BYTES))
    return (steady_result_offset(n, algorithm, dtype) + after) * FLOAT32_BYTES


#: The largest cluster whose steady ``two_shot`` stores each folded quad into its peers as soon as it is
#: folded (``unrolled_fold_row(push=True)``); larger ones fold their chunk, then push it (``push_chunk``).
#: Measured on the H200 (lab log v42): folding and pushing together is 6-34% faster at N = 2-8 with
#: rows of 4-64 KiB; at N = 16 it is 2-14% faster up to 16 KiB but 2-5% slower with 32-64 KiB, the
#: rows this algorithm is for.
PUSH_WHILE_FOLDING = 8


@_cache_checked
def steady_reduce_device_function(op: str, cluster_size: int, algorithm: str = "direct", dtype: str = "float32"):
    """``direct_steady_reduce(staged, result, n, k)``, ``two_shot_steady_reduce(staged, result, n, k)`` or
    ``bulk_two_shot_steady_reduce(staged, work, n, k)`` with operator ``op`` for clusters of
    ``cluster_size`` blocks, on rows of ``dtype`` (float16 and bfloat16 packed two to a word, ``direct`` and
    ``two_shot`` only; see the module docstring)."""
    check_choice("op", op, tuple(OPERATORS))
    check_integer("cluster_size", cluster_size, 1, MAX_CLUSTER_SIZE)
    if dtype != "float32" and not packed_rows(algorithm, dtype):
        raise ValueError(f"dtype must be 'float32' for the steady {algorithm} reduce (only {PACKED_STEADY} keep "
                         f"{dtype} rows); got {dtype!r}")
    if packed_rows(algorithm, dtype):
        return _packed_steady_reduce(op, cluster_size, algorithm, dtype)
    fold_row = unrolled_fold_row(op, cluster_size)
    fold_push_row = unrolled_fold_row(op, cluster_size, push=True)
    pushes_while_folding = cluster_size <= PUSH_WHILE_FOLDING
    combine = OPERATORS[op]
    size = cluster_size

    @cuda.jit(device=True)
    def direct_steady_reduce(staged, result, n, k):
        """Operation k: barrier k, then pull buffer k % 2 of every block and fold in rank order."""
        buffer = (k & 1) * quad_padded(n)  # staged[buffer, i] is staged[buffer + i]; slot_elements(n, FLOAT32_BYTES)
        ptx.cluster_sync()  # every row of operation k is staged; every read of operation k - 1 is done
        fold_row(staged, buffer, result, n)
        cuda.syncthreads()

    @cuda.jit(device=True)
    def two_shot_steady_reduce(staged, result, n, k):
        """Operation k: barrier k.a, fold chunk ``rank`` of every block's staged row into result and push
        it into every peer's result; barrier k.b."""
        rank = ptx.cluster_rank()
        lo = two_shot_chunk_start(rank, n, size)
        hi = two_shot_chunk_start(rank + 1, n, size)
        ptx.cluster_sync()  # k.a: every row of operation k is staged; every block has read its result of k - 1
        if pushes_while_folding:  # each quad into the peers as soon as it is folded
            fold_push_row(staged, lo, result[lo:], hi - lo)
        else:  # the chunk folded, then pushed
            fold_row(staged, lo, result[lo:], hi - lo)
            cuda.syncthreads()
            push_chunk(result, lo, hi, size, rank)
        ptx.cluster_sync()  # k.b: every chunk is reduced and pushed; nobody reads staged any more

    @cuda.jit(device=True)
    def bulk_two_shot_steady_reduce(staged, work, n, k):
        """Operation k: the chunks scattered into the peers' inboxes and the folded chunks gathered back
        by bulk copies, each block's copies followed by a release arrival on the peer's mbarrier; no
        cluster barrier (one before operation 0 publishes the mbarriers)."""
        rank = ptx.cluster_rank()
        tid = cuda.threadIdx.x
        slot = quad_padded(n)
        chunk_slot = 4 * ((slot // 4 + size - 1) // size)  # bulk_two_shot_chunk_slot(n, N, 4): the widest chunk
        inbox = MBARRIER_BYTES // FLOAT32_BYTES  # work = scattered, gathered | inbox [N, chunk slot]
        scattered = ptx.shared_address(work, 0)
        gathered = scattered + 8
        row_at = ptx.shared_address(staged, 0)
        inbox_at = ptx.shared_address(work, inbox)
        own_at = inbox_at + rank * chunk_slot * FLOAT32_BYTES  # inbox[rank]: the folded chunk the pushes copy
        lo = two_shot_chunk_start(rank, n, size)
        hi = two_shot_chunk_start(rank + 1, n, size)
        end = lo + quad_padded(hi - lo)  # what a copy of chunk rank moves: [lo, end)
        if k == 0:
            if tid == 0:
                ptx.mbarrier_init(scattered, size)  # this block's expect_tx and every peer's arrival
                ptx.mbarrier_init(gathered, size)
                ptx.fence_mbarrier_init_release_cluster()
            ptx.cluster_sync()  # mbarriers initialised everywhere
        ptx.fence_proxy_async_shared_cta()  # the staged row (st.shared) -> the copies below
        cuda.syncthreads()
        if tid == 0:
            # phase k of both: peers' bytes may land before these, this block's arrival keeps the phase open
            ptx.mbarrier_arrive_expect_tx(scattered, (size - 1) * (end - lo) * FLOAT32_BYTES)
            ptx.mbarrier_arrive_expect_tx(gathered, (slot - (end - lo)) * FLOAT32_BYTES)
            for j in range(1, size):  # reduce-scatter: chunk c of this row into inbox[rank] of block c
                c = (rank + j) % size
                c_lo = two_shot_chunk_start(c, n, size)
                c_end = c_lo + quad_padded(two_shot_chunk_start(c + 1, n, size) - c_lo)
                if c_end > c_lo:
                    ptx.bulk_copy_shared_to_cluster(ptx.map_shared(own_at, c), row_at + c_lo * FLOAT32_BYTES,
                                                    (c_end - c_lo) * FLOAT32_BYTES, ptx.map_shared(scattered, c))
                ptx.mbarrier_arrive_cluster(ptx.map_shared(scattered, c))  # release: the row staged before
        ptx.mbarrier_wait_parity(scattered, k & 1)
        for q in range(lo // 4 + tid, hi // 4, cuda.blockDim.x):  # the direct fold of chunk rank, a quad a thread
            at = (4 * q - lo) * FLOAT32_BYTES  # the quad's byte offset in an inbox row
            a0, a1, a2, a3 = ptx.ld_shared_v4_f32(row_at + 16 * q if rank == 0 else inbox_at + at)
            for s in range(1, size):
                b0, b1, b2, b3 = ptx.ld_shared_v4_f32(
                    row_at + 16 * q if s == rank else inbox_at + s * chunk_slot * FLOAT32_BYTES + at)
                a0 = combine(a0, b0)
                a1 = combine(a1, b1)
                a2 = combine(a2, b2)
                a3 = combine(a3, b3)
            ptx.st_shared_v4_f32(row_at + 16 * q, a0, a1, a2, a3)
            ptx.st_shared_v4_f32(own_at + at, a0, a1, a2, a3)
        for i in range(4 * (hi // 4) + tid, hi, cuda.blockDim.x):  # the row's tail (last chunk only)
            acc = staged[i] if rank == 0 else work[inbox + i - lo]
            for s in range(1, size):
                acc = combine(acc, staged[i] if s == rank else work[inbox + s * chunk_slot + i - lo])
            staged[i] = acc
            work[inbox + rank * chunk_slot + i - lo] = acc
        ptx.fence_proxy_async_shared_cta()  # the folded chunk -> the copies below
        cuda.syncthreads()
        if tid == 0:
            for j in range(1, size):  # all-gather: the folded chunk into staged of every peer
                c = (rank + j) % size
                if end > lo:
                    ptx.bulk_copy_shared_to_cluster(ptx.map_shared(row_at + lo * FLOAT32_BYTES, c), own_at,
                                                    (end - lo) * FLOAT32_BYTES, ptx.map_shared(gathered, c))
                ptx.mbarrier_arrive_cluster(ptx.map_shared(gathered, c))  # release: this block's reads before
        ptx.mbarrier_wait_parity(gathered, k & 1)

    return {"direct": direct_steady_reduce, "two_shot": two_shot_steady_reduce,
            "bulk_two_shot": bulk_two_shot_steady_reduce}[algorithm]


def _packed_steady_reduce(op: str, cluster_size: int, algorithm: str, dtype: str):
    """``direct_steady_reduce(staged, result, n, k)`` or ``two_shot_steady_reduce(staged, result, n, k)`` on
    float16 or bfloat16 rows packed two to a word."""
    fold_row = unrolled_fold_packed_row(op, cluster_size, dtype)
    fold_push_row = unrolled_fold_packed_row(op, cluster_size, dtype, push=True)
    size = cluster_size

    @cuda.jit(device=True)
    def direct_steady_reduce(staged, result, n, k):
        """Operation k: barrier k, then pull buffer k % 2 of every block, widen, fold in rank order, round."""
        words = packed_words(n)
        buffer = (k & 1) * quad_padded(words)  # staged[buffer, w] is staged[buffer + w]
        ptx.cluster_sync()  # every row of operation k is staged; every read of operation k - 1 is done
        fold_row(staged, buffer, result, words)
        cuda.syncthreads()

    @cuda.jit(device=True)
    def two_shot_steady_reduce(staged, result, n, k):
        """Operation k: barrier k.a, fold chunk ``rank`` (in words) of every block's staged row, round it into
        result and push each word, pair or quad into every peer's result as it is folded; barrier k.b."""
        rank = ptx.cluster_rank()
        words = packed_words(n)
        lo = two_shot_chunk_start(rank, words, size)
        hi = two_shot_chunk_start(rank + 1, words, size)
        ptx.cluster_sync()  # k.a: every row of operation k is staged; every block has read its result of k - 1
        fold_push_row(staged, lo, result[lo:], hi - lo)
        ptx.cluster_sync()  # k.b: every chunk is reduced and pushed; nobody reads staged any more

    return {"direct": direct_steady_reduce, "two_shot": two_shot_steady_reduce}[algorithm]


@functools.cache
def steady_reduce_kernel(op: str, dtype: str, cluster_size: int, algorithm: str = "direct"):
    """Kernel: block b reduces row b of ``xs[k]`` with its cluster into ``out[k]``, for every operation k.

    ``xs``/``out``: [steps, num_clusters * cluster_size, n], float32, or uint16 bit patterns for
    float16/bfloat16; launched in clusters of ``cluster_size``. Dynamic shared memory
    (:func:`steady_shared_bytes`): ``staged`` at 0 ([2, slot] for ``direct``, operation k in buffer
    k % 2; [slot] for ``two_shot`` and ``bulk_two_shot``), ``result`` at ``result_offset``
    (:func:`steady_result_offset`; ``bulk_two_shot``'s ``work`` there, its result in ``staged``), in
    float32, or in uint32 words where float16 / bfloat16 rows stay packed (:func:`packed_rows`).
    """
    packed = packed_rows(algorithm, dtype)
    reduce = steady_reduce_device_function(op, cluster_size, algorithm, dtype if packed else "float32")
    words, stage_row, store_row = steady_row_copies(algorithm, dtype)
    buffers = STEADY_BUFFERS[algorithm]

    in_place = algorithm == "bulk_two_shot"  # its result is ``staged``, and ``result`` is its ``work``
    exit_barrier = algorithm in STEADY_EXIT_BARRIER

    @cuda.jit
    def cluster_reduce_steady_kernel(xs, out, n, result_offset):
        smem = cuda.shared.array(0, dtype=words, alignment=16)
        staged = smem[:result_offset]
        result = smem[result_offset:]
        reduced = staged if in_place else result
        row = cuda.blockIdx.x
        for k in range(xs.shape[0]):
            stage_row(staged, (k % buffers) * (result_offset // buffers), xs[k, row], n)
            reduce(staged, result, n, k)
            store_row(out[k, row], reduced, 0, n)
        if exit_barrier:  # peers may still be reading the last operation's rows
            ptx.cluster_sync()

    return cluster_reduce_steady_kernel


@functools.cache
def steady_row_copies(algorithm: str, dtype: str):
    """``(words, stage_row, store_row)`` of the steady ``algorithm`` on rows of ``dtype``: the element type of its
    shared memory, ``stage_row(staged, at, row, n)`` and ``store_row(row, reduced, at, n)`` moving ``row`` [n] of
    ``dtype`` (uint16 bit patterns for 16-bit dtypes) into ``staged[at ..]`` and ``reduced[at ..]`` back, the block's
    threads sharing the row. Packed rows (:func:`packed_rows`): ``"uint32"`` words, two elements a word
    (:func:`~clusterlab.primitives.ops.pack_row`, ``unpack_row``); otherwise ``"float32"``, an element a thread,
    widened when staged and rounded when stored."""
    if packed_rows(algorithm, dtype):
        return "uint32", pack_row, unpack_row
    widen, narrow = CONVERSIONS[dtype]

    @cuda.jit(device=True, inline=True)
    def stage_row(staged, at, row, n):
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            staged[at + i] = widen(row[i])

    @cuda.jit(device=True, inline=True)
    def store_row(row, reduced, at, n):
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            row[i] = narrow(reduced[at + i])

    return "float32", stage_row, store_row
