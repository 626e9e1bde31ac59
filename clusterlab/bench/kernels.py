"""The kernels ``clusterlab bench primitives`` times, grouped by what each one measures.

Floors (what no exchange can beat)::

    barrier_loop               reps x cluster_sync()                   -> µs per cluster barrier
    dsmem_read_stream(spread)  128-bit ld.shared::cluster of peers'    -> peak DSMEM read bytes/s
                               shared buffers, 8 loads in flight per thread

Per-operation loops (one launch runs ``reps`` back-to-back operations; the benchmark times
``reps`` and ``2 * reps`` and takes the slope, so launch, staging and exit cancel)::

    reduce_loop_kernel(algorithm)   the primitives' reduce device function, called reps times
    gather_loop_kernel(algorithm)   the primitives' gather device function, called reps times
    steady_reduce_loop(alg, N)      the primitives' steady reduces: direct (double-buffered, 1 barrier/op)
                                    and two_shot (2 barriers/op, the fewest bytes)
    direct_push_loop                benchmark variant: direct reduce pushed with st.async, mbarrier
                                    handshakes, no cluster barrier per op
    direct_gather_v4                benchmark variant: direct gather with 16-byte remote loads
    bulk_gather_split               benchmark variant: bulk gather in 4 KiB copies from many threads

Baselines through global memory (launched without clusters, one block per SM)::

    publish_partials + fold_kernel  kernel 1 writes each block's row, kernel 2 (after the kernel
                                    boundary) folds its cluster's rows: the single-launch pair;
                                    fold_kernel alone, chained on alternating buffers, is one op
    global_exchange_loop            reps ops in one launch, a software grid barrier per op

Every reduction here is a float32 sum folded in rank order 0..N-1 (the order of ``direct``), so
each variant's result can be checked against a float64 reference. Repeated sums grow by N per
operation and reach inf after about 128 / log2(N) operations; GPU float adds take the same time
on every input, inf included, so the timed instruction stream is unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from .. import ptx
from ..primitives.gather import GATHER_DEVICE_FUNCTIONS, stage_row, store_rows
from ..primitives.ops import CONVERSIONS, open_bulk_exchange, packed_words
from ..primitives.reduce import (packed_rows, quad_padded, reduce_device_function, steady_reduce_device_function,
                                 steady_row_copies)
from ..simulator.reduce import STEADY_EXIT_BARRIER

#: 16-byte remote loads each thread of dsmem_read_stream has in flight.
STREAM_LOADS_IN_FLIGHT = 8
#: Bytes of one 128-bit access.
VECTOR_BYTES = 16


# --------------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------------


@cuda.jit
def barrier_loop(out, reps):
    """``reps`` full cluster barriers (arrive.release + wait.acquire) back to back.

    ``out``: int32 [blocks]; block b writes its cluster rank (keeps the launch observable).
    """
    for _ in range(reps):
        ptx.cluster_sync()
    if cuda.threadIdx.x == 0:
        out[cuda.blockIdx.x] = ptx.cluster_rank()


@cuda.jit(device=True, forceinline=True)
def _stream_address(base, neighbour, rank, size, chunk, spread):
    """shared::cluster address of 16-byte ``chunk``: in the right neighbour, or (spread) one peer per warp slice."""
    if not spread:
        return neighbour + chunk * VECTOR_BYTES
    others = size - 1 if size > 1 else 1
    return ptx.map_shared(base + chunk * VECTOR_BYTES, (rank + 1 + (chunk // 32) % others) % size)


@cuda.jit(device=True, forceinline=True)
def _xor4(words):
    return words[0] ^ words[1] ^ words[2] ^ words[3]


@functools.cache
def dsmem_read_stream(spread: bool):
    """Kernel streaming a peer block's shared buffer ``passes`` times with 128-bit DSMEM loads.

    ``dsmem_read_stream(spread)(out, chunks, passes)``. Dynamic shared memory: ``chunks`` 16-byte
    chunks per block, filled with a nonzero pattern. Each thread issues 8 independent
    ``ld.shared::cluster.v4.b32`` before using any, XOR-folds the words and writes one uint32 to
    ``out`` [blocks * blockDim] (so no load is dead). ``spread`` False: every block reads its
    right neighbour's buffer; True: each warp-wide slice of 32 chunks comes from another peer,
    cycling over all N-1 of them (the all-to-all pattern of a gather). ``chunks`` must be a
    multiple of 8 * blockDim. Up to 1024 threads for the neighbour kernel (its registers are
    capped at 64), 512 for the spread one (its peer arithmetic needs more). Bytes read remotely
    per block per pass: ``16 * chunks``.
    """

    @cuda.jit(**({} if spread else {"launch_bounds": (1024, 1)}))
    def dsmem_stream(out, chunks, passes):
        words = cuda.shared.array(0, dtype=np.uint32, alignment=16)
        rank = ptx.cluster_rank()
        size = ptx.cluster_size()
        for i in range(cuda.threadIdx.x, chunks * 4, cuda.blockDim.x):
            words[i] = np.uint32(i) * np.uint32(2654435761) + rank + np.uint32(1)
        base = ptx.shared_address(words, 0)
        neighbour = ptx.map_shared(base, (rank + 1) % size)
        ptx.cluster_sync()
        step = cuda.blockDim.x
        acc = np.uint32(0)
        for _ in range(passes):
            for first in range(cuda.threadIdx.x, chunks, STREAM_LOADS_IN_FLIGHT * step):
                a = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first, spread))
                b = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + step, spread))
                c = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + 2 * step, spread))
                d = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + 3 * step, spread))
                e = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + 4 * step, spread))
                f = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + 5 * step, spread))
                g = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + 6 * step, spread))
                h = ptx.ld_shared_cluster_v4_b32(_stream_address(base, neighbour, rank, size, first + 7 * step, spread))
                acc ^= _xor4(a) ^ _xor4(b) ^ _xor4(c) ^ _xor4(d) ^ _xor4(e) ^ _xor4(f) ^ _xor4(g) ^ _xor4(h)
        ptx.cluster_sync()  # peers read this block's buffer until here
        out[cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x] = acc

    return dsmem_stream


# --------------------------------------------------------------------------------------------
# Per-operation loops over the primitives' device functions
# --------------------------------------------------------------------------------------------


@functools.cache
def reduce_loop_kernel(algorithm: str):
    """Kernel running the ``algorithm`` sum reduce ``reps`` times on each block's row.

    ``x``, ``out``: float32 [blocks, n]; block b (rank b % N) stages row b, calls
    ``reduce(staged, work, n, it)`` for it = 0..reps-1 (each result is the next input) and
    writes the last result to ``out[b]``. With reps = 1, ``out`` is the cluster's sum. Dynamic
    shared memory as in the host API: ``staged`` [n] at 0, ``work`` at ``work_offset`` floats.
    """
    reduce = reduce_device_function(algorithm, "sum")

    @cuda.jit
    def reduce_loop(x, out, n, work_offset, reps):
        smem = cuda.shared.array(0, dtype=np.float32, alignment=16)
        staged = smem[:n]
        work = smem[work_offset:]
        row = cuda.blockIdx.x
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            staged[i] = x[row, i]
        for it in range(reps):
            reduce(staged, work, n, it)
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            out[row, i] = staged[i]

    return reduce_loop


@functools.cache
def steady_reduce_loop(algorithm: str, cluster_size: int, dtype: str = "float32"):
    """Kernel calling the library's steady reduce (:func:`~clusterlab.primitives.reduce.steady_reduce_device_function`,
    ``sum``, clusters of ``cluster_size``) ``reps`` times, each result the next operation's input.

    ``steady_reduce_loop(algorithm, cluster_size)(x, out, n, reps)``. ``x``, ``out``: float32
    [blocks, n]; dynamic shared memory ``rows`` [2, slot] (``steady_result_offset(n)`` float32
    elements; for ``bulk_two_shot`` [slot] and its ``work``, ``steady_shared_bytes(n, "bulk_two_shot", N)``).
    ``dtype`` float16 or bfloat16 (``direct`` and ``two_shot``): ``x``, ``out`` their uint16 bit patterns,
    ``rows`` [2, slot] of packed words (``steady_result_offset(n, "direct", dtype)`` of them), each result
    rounded. Rows are staged and stored as the host API's kernel does
    (:func:`~clusterlab.primitives.reduce.steady_row_copies`).
    Operation k reduces rows[k % 2] into rows[(k + 1) % 2], the contract's chain, which copies
    nothing: ``direct`` (``direct_1barrier`` in the results, one barrier an operation) takes both rows
    as its double buffer and folds into the other one; ``two_shot`` (``two_shot_2barrier``, two
    barriers) takes them as ``staged`` and ``result``, swapped every operation; ``bulk_two_shot``
    (``bulk_two_shot_0barrier``, no barrier) reduces its one row in place::

        direct         stage row0 | barrier | row0 of all -> row1 | barrier | row1 of all -> row0 | ...
        two_shot       stage row0 | barrier | chunk r of all row0 -> row1, pushed to every row1 | barrier | ...
        bulk_two_shot  stage row0 | barrier | chunks to their owners, folded, copied back into row0 | ...

    The final barrier (not ``two_shot``'s, whose k.b ends every remote access) keeps each block alive
    until no peer reads it. Bit for bit the result of
    ``reps`` calls of ``direct``.
    """
    steady_sum = steady_reduce_device_function("sum", cluster_size, algorithm, dtype)
    words, stage_row, store_row = steady_row_copies(algorithm, dtype)
    packed = packed_rows(algorithm, dtype)
    direct = algorithm == "direct"
    in_place = algorithm == "bulk_two_shot"
    exit_barrier = algorithm in STEADY_EXIT_BARRIER

    @cuda.jit
    def steady_loop(x, out, n, reps):
        rows = cuda.shared.array(0, dtype=words, alignment=16)
        slot = quad_padded(packed_words(n) if packed else n)
        row = cuda.blockIdx.x
        stage_row(rows, 0, x[row], n)
        for it in range(reps):
            if direct:  # the double buffer, folded into its other row
                steady_sum(rows, rows[((it + 1) & 1) * slot:], n, it)
            elif in_place:  # the row, then the work of its mbarriers and inbox
                steady_sum(rows, rows[slot:], n, it)
            else:  # staged and result, swapped
                current = (it & 1) * slot
                steady_sum(rows[current:], rows[slot - current:], n, it)
        if exit_barrier:  # peers may still be reading this block's rows
            ptx.cluster_sync()
        store_row(out[row], rows, 0 if in_place else (reps & 1) * slot, n)

    return steady_loop


#: try_wait attempts after which :func:`direct_push_loop` gives up on an mbarrier phase: a hang
#: guard (a second or so), never reached by a correct run.
WAIT_ATTEMPTS = 1 << 20


@cuda.jit(device=True, forceinline=True)
def _wait_or_give_up(addr, parity):
    """Wait for the mbarrier phase of ``parity``; False after :data:`WAIT_ATTEMPTS` tries."""
    attempts = 0
    while not ptx.mbarrier_try_wait_parity(addr, parity):
        attempts += 1
        if attempts == WAIT_ATTEMPTS:
            return False
    return True


@cuda.jit
def direct_push_loop(x, out, failed, n, reps):
    """Benchmark variant: ``direct`` sum reduce by pushing rows with ``st.async``; no cluster barrier per operation.

    ``x``, ``out``: float32 [blocks, n], n a multiple of 4; ``failed``: int32 [1], set to 1 if a
    wait gave up (a bug, never a correct run). Dynamic shared memory float32: ``row`` [n] |
    ``inbox`` [2, N, n] (``(n + 2 N n) * 4`` bytes); static: four mbarriers.

    Operation k uses slot s = k % 2. Each thread sends 16-byte chunks of this block's row to every
    peer's ``inbox[s][rank]`` with ``st.async``, which counts the bytes on the peer's ``full[s]``
    mbarrier; each block waits on its own ``full[s]`` for (N-1) rows, folds ranks 0..N-1 in order
    (the ``direct`` order, its own row from ``row``) into ``row``, and then tells every peer that
    its slot s is free again by arriving on the peer's ``empty[s]``. Before reusing slot s
    (operation k + 2) a block waits on its own ``empty[s]`` for all N-1 peers::

        op k:  [wait empty[s] (k >= 2)] -> st.async row -> peers' inbox[s]   (one way, no round trip)
               wait full[s] -> fold inbox[s] + row -> row -> arrive on peers' empty[s]

    Every wait is on a phase a peer completes one-way, so an operation costs about one DSMEM
    delivery instead of a cluster barrier's round trip. One cluster barrier after the mbarrier
    initialisation and one before exit. Bit for bit the result of ``reps`` calls of ``direct``.
    """
    smem = cuda.shared.array(0, dtype=np.float32, alignment=16)
    bars = cuda.shared.array(4, dtype=np.uint64)  # full[0], full[1], empty[0], empty[1]
    size = ptx.cluster_size()
    rank = ptx.cluster_rank()
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    for i in range(tid, n, step):
        smem[i] = x[row, i]
    if tid == 0:
        ptx.mbarrier_init(ptx.shared_address(bars, 0), 1)
        ptx.mbarrier_init(ptx.shared_address(bars, 1), 1)
        ptx.mbarrier_init(ptx.shared_address(bars, 2), max(size - 1, 1))
        ptx.mbarrier_init(ptx.shared_address(bars, 3), max(size - 1, 1))
        ptx.fence_mbarrier_init_release_cluster()
    ptx.cluster_sync()
    inbox_bytes = (size - 1) * n * 4
    ok = True
    for it in range(reps):
        s = it % 2
        full = ptx.shared_address(bars, s)
        empty = ptx.shared_address(bars, 2 + s)
        inbox = n + s * size * n
        if it >= 2 and size > 1 and ok:  # a cluster of one has no peer to free its slots
            ok = _wait_or_give_up(empty, (it // 2 - 1) % 2)
        if tid == 0:
            ptx.mbarrier_arrive_expect_tx(full, inbox_bytes)
        for c in range(tid, n // 4, step):
            v0, v1, v2, v3 = smem[4 * c], smem[4 * c + 1], smem[4 * c + 2], smem[4 * c + 3]
            mine = ptx.shared_address(smem, inbox + rank * n + 4 * c)
            for k in range(1, size):
                peer = (rank + k) % size
                ptx.st_async_v4_f32(ptx.map_shared(mine, peer), v0, v1, v2, v3, ptx.map_shared(full, peer))
        if ok:
            ok = _wait_or_give_up(full, (it // 2) % 2)
        for i in range(tid * 4, n, step * 4):
            for e in range(4):
                own = smem[i + e]
                acc = own if rank == 0 else smem[inbox + i + e]
                for q in range(1, size):
                    acc = acc + (own if q == rank else smem[inbox + q * n + i + e])
                smem[i + e] = acc
        cuda.syncthreads()  # every thread's reads of inbox[s] are done
        if tid == 0:
            for k in range(1, size):
                ptx.mbarrier_arrive_cluster(ptx.map_shared(empty, (rank + k) % size))
    if not ok:
        failed[0] = 1
    ptx.cluster_sync()  # no peer sends to or arrives on this block after this
    for i in range(tid, n, step):
        out[row, i] = smem[i]


@cuda.jit(device=True, forceinline=True)
def _chunk_addresses(base, chunk, row_chunks, pitch, rank):
    """(peer's shared::cluster address, own shared::cluster address) of 16-byte ``chunk`` of the peers' rows."""
    p = chunk // row_chunks
    s = p + 1 if p >= rank else p  # peers in rank order, skipping this block
    offset = base + s * pitch + (chunk - p * row_chunks) * VECTOR_BYTES
    return ptx.map_shared(offset, s), ptx.map_shared(offset, rank)


@cuda.jit(device=True)
def direct_gather_v4(rows, n, stride, iteration):
    """Benchmark variant of ``direct_gather``: 16-byte remote loads, 4 in flight per thread.

    Same contract and barriers (2) as the primitives' gathers, for rows whose byte length
    ``n * itemsize`` and pitch ``stride * itemsize`` are multiples of 16 and ``rows`` 16-byte
    aligned. Each thread pulls 4 chunks (``ld.shared::cluster.v4.b32``) before storing any.
    """
    size = ptx.cluster_size()
    rank = ptx.cluster_rank()
    row_chunks = n * rows.itemsize // VECTOR_BYTES
    pitch = stride * rows.itemsize
    base = ptx.shared_address(rows, 0)
    total = (size - 1) * row_chunks
    step = cuda.blockDim.x
    ptx.cluster_sync()
    j = cuda.threadIdx.x
    while j + 3 * step < total:
        r0, l0 = _chunk_addresses(base, j, row_chunks, pitch, rank)
        r1, l1 = _chunk_addresses(base, j + step, row_chunks, pitch, rank)
        r2, l2 = _chunk_addresses(base, j + 2 * step, row_chunks, pitch, rank)
        r3, l3 = _chunk_addresses(base, j + 3 * step, row_chunks, pitch, rank)
        a = ptx.ld_shared_cluster_v4_b32(r0)
        b = ptx.ld_shared_cluster_v4_b32(r1)
        c = ptx.ld_shared_cluster_v4_b32(r2)
        d = ptx.ld_shared_cluster_v4_b32(r3)
        ptx.st_shared_cluster_v4_b32(l0, a[0], a[1], a[2], a[3])
        ptx.st_shared_cluster_v4_b32(l1, b[0], b[1], b[2], b[3])
        ptx.st_shared_cluster_v4_b32(l2, c[0], c[1], c[2], c[3])
        ptx.st_shared_cluster_v4_b32(l3, d[0], d[1], d[2], d[3])
        j += 4 * step
    while j < total:
        r0, l0 = _chunk_addresses(base, j, row_chunks, pitch, rank)
        a = ptx.ld_shared_cluster_v4_b32(r0)
        ptx.st_shared_cluster_v4_b32(l0, a[0], a[1], a[2], a[3])
        j += step
    ptx.cluster_sync()  # peers may still be reading this block's row until here


#: Bytes per copy of :func:`bulk_gather_split`.
SPLIT_BYTES = 4096


@cuda.jit(device=True)
def bulk_gather_split(rows, n, stride, iteration):
    """Benchmark variant of ``bulk_gather``: each row goes out as 4 KiB copies issued by many threads.

    Same contract, layout (``gather_stride("bulk", ...)``) and barriers (2) as ``bulk_gather``;
    thread t < (N-1) * pieces issues piece t % pieces of the row to peer rank + 1 + t // pieces,
    so the copy engine has up to (N-1) * ceil(row bytes / 4096) copies in flight instead of N-1.
    """
    size = ptx.cluster_size()
    rank = ptx.cluster_rank()
    full_slot = cuda.shared.array(1, dtype=np.uint64)
    full = ptx.shared_address(full_slot, 0)
    row_bytes = stride * rows.itemsize
    pieces = (row_bytes + SPLIT_BYTES - 1) // SPLIT_BYTES
    open_bulk_exchange(full, (size - 1) * row_bytes, iteration)
    source = ptx.shared_address(rows, rank * stride)
    for t in range(cuda.threadIdx.x, (size - 1) * pieces, cuda.blockDim.x):
        peer = (rank + 1 + t // pieces) % size
        offset = (t % pieces) * SPLIT_BYTES
        nbytes = min(SPLIT_BYTES, row_bytes - offset)
        ptx.bulk_copy_shared_to_cluster(
            ptx.map_shared(source + offset, peer), source + offset, nbytes, ptx.map_shared(full, peer)
        )
    ptx.mbarrier_wait_parity(full, iteration % 2)
    ptx.cluster_sync()  # peers' copies may still read this block's row until here


#: Gather device functions the benchmark times: the primitives' three and the two variants.
GATHERS = {**GATHER_DEVICE_FUNCTIONS, "direct_v4": direct_gather_v4, "bulk_split": bulk_gather_split}
#: The primitive whose row layout (``gather_stride``) each gather uses.
GATHER_LAYOUT = {"direct": "direct", "ring": "ring", "bulk": "bulk", "direct_v4": "direct", "bulk_split": "bulk"}


@functools.cache
def gather_loop_kernel(algorithm: str, storage: np.dtype):
    """Kernel running gather ``algorithm`` (a key of :data:`GATHERS`) ``reps`` times.

    ``x``: [blocks, n] and ``out``: [blocks, N * n] of ``storage`` (float32, or uint16 holding
    float16 bits). Dynamic shared memory: ``rows`` [N * stride] of ``storage``, 16-byte aligned.
    The host API's kernel (:func:`~clusterlab.primitives.gather.gather_kernel`) with the gather
    repeated: block b (rank r) stages row b at ``rows[r * stride]``, gathers ``reps`` times
    (every repetition moves the same bits again) and writes the N rows to ``out[b]``.
    """
    gather = GATHERS[algorithm]

    @cuda.jit
    def gather_loop(x, out, n, stride, reps):
        rows = cuda.shared.array(0, dtype=storage, alignment=16)
        stage_row(rows, x, n, stride)
        for it in range(reps):
            gather(rows, n, stride, it)
        store_rows(out, rows, n, stride)

    return gather_loop


# --------------------------------------------------------------------------------------------
# Baselines through global memory
# --------------------------------------------------------------------------------------------


@cuda.jit
def publish_partials(x, partials, n):
    """Kernel 1 of the global exchange: block b writes its row ``x[b]`` to ``partials[b]`` ([blocks, n], any dtype)."""
    row = cuda.blockIdx.x
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        partials[row, i] = x[row, i]


@functools.cache
def fold_kernel(dtype: str):
    """Kernel 2 of the global exchange: block b sums the ``size`` rows of its group into ``out[b]``.

    ``partials``, ``out``: [blocks, n] of float32, or uint16 bits of float16/bfloat16 (``dtype``
    names which), widened to float32, folded in order, rounded once. Blocks b and b' are in one
    group when b // size == b' // size, as the blocks of a cluster are.
    """
    widen, narrow = CONVERSIONS[dtype]

    @cuda.jit
    def fold_partials(partials, out, n, size):
        row = cuda.blockIdx.x
        first = row - row % size
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            acc = widen(partials[first, i])
            for s in range(1, size):
                acc = acc + widen(partials[first + s, i])
            out[row, i] = narrow(acc)

    return fold_partials


@cuda.jit(device=True)
def grid_barrier(counter, target):
    """Software barrier over the whole grid: ``counter`` int32 [1] counts arrivals, zero at launch.

    Thread 0 of each block publishes its block's writes (``__threadfence``), arrives, and spins
    until ``target`` arrivals (blocks x barriers so far) are in. Every block of the grid must be
    resident at once, or this never returns.
    """
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        cuda.threadfence()
        cuda.atomic.add(counter, 0, 1)
        while cuda.atomic.add(counter, 0, 0) < target:
            pass
        cuda.threadfence()
    cuda.syncthreads()


@cuda.jit
def global_exchange_loop(x, buffers, out, counter, n, size, reps):
    """``reps`` sum reductions over groups of ``size`` blocks through global memory, in one launch.

    ``x``, ``out``: float32 [blocks, n]; ``buffers``: float32 [2, blocks, n]; ``counter``: int32
    [1], zeroed before the launch. Operation k: grid barrier, then block b folds its group's rows
    of ``buffers[k % 2]`` (rank order) into ``buffers[(k + 1) % 2][b]`` -- double-buffered like
    :func:`steady_reduce_loop`, one grid barrier per operation. All blocks must be resident.
    """
    row = cuda.blockIdx.x
    first = row - row % size
    blocks = cuda.gridDim.x
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        buffers[0, row, i] = x[row, i]
    for it in range(reps):
        grid_barrier(counter, (it + 1) * blocks)
        src = it % 2
        for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
            acc = buffers[src, first, i]
            for s in range(1, size):
                acc = acc + buffers[src, first + s, i]
            buffers[1 - src, row, i] = acc
    for i in range(cuda.threadIdx.x, n, cuda.blockDim.x):
        out[row, i] = buffers[reps % 2, row, i]
