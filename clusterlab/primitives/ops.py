"""Device-side pieces every primitive kernel shares: operators, ring indices, the bulk push, dtype handling.

The operators reproduce :func:`clusterlab.simulator.op_ufunc` bit for bit, as ``combine(left, right)``
in float32: ``sum`` is an IEEE add, ``max`` / ``min`` propagate NaN and otherwise return
``left`` only when it is strictly larger / smaller (so on a ``-0.0`` / ``+0.0`` tie the right
operand wins, as ``np.maximum`` / ``np.minimum`` do; PTX ``max.f32`` would pick ``+0.0``).

Storage: float32 rows travel as float32; float16 and bfloat16 rows travel as their 16-bit patterns
in uint16 arrays (numba has no bfloat16 arrays) and are widened with ``cvt`` when staged, except in
the steady direct and two_shot reduces, which keep them packed two to a 32-bit word in shared memory
(:func:`unrolled_fold_packed_row`) and widen them as they fold.
"""

import functools

from numba import cuda, float32, uint16, uint32, uint64

from .. import ptx
from ..simulator import reduce as simulator_reduce


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


#: 16-byte remote loads a thread of ``fold_quads`` (:func:`rank_folds`) issues before using any, as the DSMEM
#: bandwidth floor's kernel does (``bench.kernels.dsmem_read_stream``).
LOADS_IN_FLIGHT = 8


@functools.cache
def rank_folds(op: str):
    """``(fold, fold_quads, fold_row)``: the fold of ``direct`` (ranks 0..N-1 in order, the simulator's
    ``acc = rows[0]; acc = op(acc, rows[s])``) over every block's copy of a shared float32 array.

    ``fold(shared, i, size)`` returns element ``i`` folded; ``size`` is cluster_size().

    ``fold_quads(shared, source, dest, target, quads, size)`` folds the quads (4 float32, 16 bytes)
    ``shared[source + 4 q ..]`` for q = 0..quads-1 into this block's ``dest[target + 4 q ..]``;
    ``source`` and ``target`` are multiples of 4. The block's threads share the quads (thread t:
    t, t + blockDim, ..). A thread walks the sequence (quad, rank) = (t, 0), (t, 1), .., (t, N-1),
    (t + blockDim, 0), .. in rounds of :data:`LOADS_IN_FLIGHT` 16-byte loads, all issued before
    the first combine of the round, so the cluster network carries them together (a round holds
    every rank of LOADS_IN_FLIGHT / N quads, or part of one quad's ranks when N is larger); the
    running fold of a quad carries over from one round to the next.

    ``fold_row(shared, source, dest, n, size)`` folds the row ``shared[source .. source + n - 1]``
    into ``dest[0 .. n - 1]``: with ``fold_quads`` when the row is longer than the block has threads,
    else an element a thread with ``fold`` (4-byte loads, which a warp coalesces); the row's tail
    after its whole quads with ``fold``.
    """
    combine = OPERATORS[op]
    PULLED_WORDS = 4 * LOADS_IN_FLIGHT

    @cuda.jit(device=True, inline=True)
    def fold(shared, i, size):
        acc = ptx.remote_load(shared, i, 0)
        for s in range(1, size):
            acc = combine(acc, ptx.remote_load(shared, i, s))
        return acc

    @cuda.jit(device=True, inline=True)
    def fold_quads(shared, source, dest, target, quads, size):
        stride = cuda.blockDim.x
        pulled = cuda.local.array(PULLED_WORDS, float32)  # load j's quad: pulled[4 j .. 4 j + 3]
        q = cuda.threadIdx.x  # the next load to fold: rank s of quad q (counters: no division)
        s = 0
        a0 = a1 = a2 = a3 = float32(0)
        while q < quads:
            lq = q  # this round's loads, from (q, s) on
            ls = s
            for j in range(LOADS_IN_FLIGHT):
                if lq < quads:
                    pulled[4 * j], pulled[4 * j + 1], pulled[4 * j + 2], pulled[4 * j + 3] = \
                        ptx.remote_load_v4_f32(shared, source + 4 * lq, ls)
                ls += 1
                if ls == size:
                    ls = 0
                    lq += stride
            for j in range(LOADS_IN_FLIGHT):  # then the same (q, s) sequence folded, rank by rank
                if q < quads:
                    if s == 0:
                        a0, a1, a2, a3 = pulled[4 * j], pulled[4 * j + 1], pulled[4 * j + 2], pulled[4 * j + 3]
                    else:
                        a0 = combine(a0, pulled[4 * j])
                        a1 = combine(a1, pulled[4 * j + 1])
                        a2 = combine(a2, pulled[4 * j + 2])
                        a3 = combine(a3, pulled[4 * j + 3])
                    if s == size - 1:
                        at = target + 4 * q
                        dest[at], dest[at + 1], dest[at + 2], dest[at + 3] = a0, a1, a2, a3
                s += 1
                if s == size:
                    s = 0
                    q += stride

    @cuda.jit(device=True, inline=True)
    def fold_row(shared, source, dest, n, size):
        whole = n // 4 if n > cuda.blockDim.x else 0  # long rows in quads, short ones an element a thread
        fold_quads(shared, source, dest, 0, whole, size)
        for i in range(4 * whole + cuda.threadIdx.x, n, cuda.blockDim.x):
            dest[i] = fold(shared, source + i, size)

    return fold, fold_quads, fold_row


@cuda.jit(device=True, inline=True)
def push_element(array, i, value, size, rank):
    """``array[i] = value`` in every other block of a cluster of ``size``, the next rank first (rank + 1, ..)."""
    for s in range(1, size):
        peer = rank + s
        if peer >= size:
            peer -= size
        ptx.remote_store(array, i, peer, value)


@cuda.jit(device=True, inline=True)
def push_pair(array, at, x0, x1, size, rank):
    """``array[at], array[at + 1] = x0, x1`` in every other block, one 8-byte store each, the next rank first."""
    address = ptx.shared_address(array, at)
    for s in range(1, size):
        peer = rank + s
        if peer >= size:
            peer -= size
        ptx.st_shared_cluster_v2_f32(ptx.map_shared(address, peer), x0, x1)


@cuda.jit(device=True, inline=True)
def push_quad(array, at, x0, x1, x2, x3, size, rank):
    """``array[at .. at + 3] = x0 .. x3`` in every other block, one 16-byte store each, the next rank first."""
    for s in range(1, size):
        peer = rank + s
        if peer >= size:
            peer -= size
        ptx.remote_store_v4_f32(array, at, peer, x0, x1, x2, x3)


#: 16-byte remote loads a thread of :func:`unrolled_fold_row` keeps in flight at least: ceil(4 / N) quads of
#: N ranks each (two quads at N = 2 and 3: 82% instead of 72% of the DSMEM read peak at 64 KiB, N = 2).
UNROLLED_LOADS = 4


@functools.cache
def unrolled_fold_row(op: str, cluster_size: int, push: bool = False):
    """``fold_row(shared, source, dest, n)``: :func:`rank_folds`' ``fold_row``, the same bits, for clusters
    of exactly ``cluster_size`` blocks, its loop over the ranks unrolled so that all of an element's
    (or a quad's) loads are in flight before the first combine.

    A row no longer than the block folds an element a thread (thread t: element t, no loop); one up to
    twice as long a pair a thread (thread t: elements 2t and 2t + 1, 8 bytes a load, so that every
    thread has loads in flight where quads would leave half of them idle; an odd row's last element
    goes to thread n // 2, which has no pair); a longer row folds 16 bytes a load,
    ``ceil(UNROLLED_LOADS / N)`` quads a thread at a time (thread t: quads t, t + blockDim, ..), and
    its tail after the whole quads an element a thread. ``source`` is a multiple of 4.

    ``push``: each folded element, pair or quad is also stored into the same place of every peer's
    ``dest`` (one remote store as wide as the loads, the next rank first) as soon as it is folded, so
    that the stores go out while the thread's next loads are in flight: ``two_shot``'s all-gather inside
    its reduce-scatter (the simulator's ``_push``). A cluster barrier after the call publishes them.
    """
    combine = OPERATORS[op]
    size = cluster_size
    together = -(-UNROLLED_LOADS // size)  # quads a thread folds at a time

    @cuda.jit(device=True, inline=True)
    def fold_element(shared, i):
        acc = ptx.remote_load(shared, i, 0)
        for s in range(1, size):
            acc = combine(acc, ptx.remote_load(shared, i, s))
        return acc

    @cuda.jit(device=True, inline=True)
    def fold_pair(shared, i):
        """``shared[i]`` and ``shared[i + 1]`` folded, all N ranks' 8-byte loads issued before the first combine."""
        loaded = cuda.local.array((size, 2), float32)  # rank s's pair: loaded[s]
        address = ptx.shared_address(shared, i)
        for s in range(size):
            loaded[s, 0], loaded[s, 1] = ptx.ld_shared_cluster_v2_f32(ptx.map_shared(address, s))
        a0, a1 = loaded[0, 0], loaded[0, 1]
        for s in range(1, size):
            a0 = combine(a0, loaded[s, 0])
            a1 = combine(a1, loaded[s, 1])
        return a0, a1

    @cuda.jit(device=True, inline=True)
    def fold_quad(acc, j, shared, at, s):
        """Rank ``s``'s quad ``shared[at ..]`` into ``acc[j]`` (rank 0's copied, the others combined)."""
        b0, b1, b2, b3 = ptx.remote_load_v4_f32(shared, at, s)
        if s == 0:
            acc[j, 0], acc[j, 1], acc[j, 2], acc[j, 3] = b0, b1, b2, b3
        else:
            acc[j, 0] = combine(acc[j, 0], b0)
            acc[j, 1] = combine(acc[j, 1], b1)
            acc[j, 2] = combine(acc[j, 2], b2)
            acc[j, 3] = combine(acc[j, 3], b3)

    @cuda.jit(device=True, inline=True)
    def store_pair(dest, i, x0, x1, rank):
        dest[i], dest[i + 1] = x0, x1
        if push:
            push_pair(dest, i, x0, x1, size, rank)

    @cuda.jit(device=True, inline=True)
    def store_quad(dest, at, acc, j, rank):
        dest[at], dest[at + 1], dest[at + 2], dest[at + 3] = acc[j, 0], acc[j, 1], acc[j, 2], acc[j, 3]
        if push:
            push_quad(dest, at, acc[j, 0], acc[j, 1], acc[j, 2], acc[j, 3], size, rank)

    return _tiered_fold_row(size, push, fold_element, fold_pair, store_pair, (together, 4), fold_quad, store_quad)


def _tiered_fold_row(size, push, fold_one, fold_two, store_two, acc_shape, fold_quad, store_quad):
    """``fold_row(shared, source, dest, n)`` over ``n`` units (float32 elements, or the 32-bit words of packed
    rows) in the tiers of :func:`unrolled_fold_row`, from the unit folds of one kind of row: ``fold_one(shared,
    i)`` and ``fold_two(shared, i)`` return one and two folded units, stored (and, with ``push``, pushed) one
    by ``dest[i] = unit`` and two by ``store_two(dest, i, unit0, unit1, rank)``; ``fold_quad(acc, j, shared, at,
    s)`` folds rank ``s``'s 16 bytes at ``at`` into the ``j``-th quad of ``acc`` (a local array of
    ``acc_shape``), ``store_quad(dest, at, acc, j, rank)`` stores it."""
    together = -(-UNROLLED_LOADS // size)  # quads a thread folds at a time

    @cuda.jit(device=True, inline=True)
    def store_one(dest, i, value, rank):
        dest[i] = value
        if push:
            push_element(dest, i, value, size, rank)

    @cuda.jit(device=True, inline=True)
    def fold_row(shared, source, dest, n):
        t = cuda.threadIdx.x
        threads = cuda.blockDim.x
        rank = ptx.cluster_rank() if push else 0
        if n <= threads:
            if t < n:
                store_one(dest, t, fold_one(shared, source + t), rank)
            return
        if n <= 2 * threads:
            pairs = n // 2
            if t < pairs:
                x0, x1 = fold_two(shared, source + 2 * t)
                store_two(dest, 2 * t, x0, x1, rank)
            elif t == pairs and n % 2 == 1:
                store_one(dest, n - 1, fold_one(shared, source + n - 1), rank)
            return
        whole = n // 4
        acc = cuda.local.array(acc_shape, float32)  # quad q + j * threads: the j-th quad of acc
        q = t
        while q + (together - 1) * threads < whole:
            for s in range(size):  # rank by rank, every quad of the round: size x together loads in flight
                for j in range(together):
                    fold_quad(acc, j, shared, source + 4 * (q + j * threads), s)
            for j in range(together):
                store_quad(dest, 4 * (q + j * threads), acc, j, rank)
            q += together * threads
        while q < whole:  # the last quads, fewer than a round
            for s in range(size):
                fold_quad(acc, 0, shared, source + 4 * q, s)
            store_quad(dest, 4 * q, acc, 0, rank)
            q += threads
        for i in range(4 * whole + t, n, threads):
            store_one(dest, i, fold_one(shared, source + i), rank)

    return fold_row


#: dtype name -> (word -> (lo, hi) float32, (lo, hi) float32 -> word): float16 and bfloat16 rows kept
#: two to a 32-bit word in shared memory, element 2w in the low half of word w (the lower address).
PACKED_CONVERSIONS = {
    "float16": (ptx.f16x2_to_f32x2, ptx.f32x2_to_f16x2),
    "bfloat16": (ptx.bf16x2_to_f32x2, ptx.f32x2_to_bf16x2),
}


@functools.cache
def unrolled_fold_packed_row(op: str, cluster_size: int, dtype: str, push: bool = False):
    """``fold_row(shared, source, dest, words)``: :func:`unrolled_fold_row` over rows of float16 or
    bfloat16 (``dtype``) packed two to a 32-bit word (uint32 arrays, :data:`PACKED_CONVERSIONS`), bit for
    bit the float32 fold of the widened rows, rounded once: the same elements at half the bytes.

    Folds ``shared[source .. source + words - 1]`` of every block (``source`` a multiple of 4) into this
    block's ``dest[0 .. words - 1]``, with :func:`unrolled_fold_row`'s tiers counted in words: a word a
    thread (4-byte loads) up to the block, two words a thread (8 bytes) up to twice it, 16-byte quads of
    words beyond (``ceil(UNROLLED_LOADS / N)`` at a time, every rank's loads issued before the first
    combine) and the tail word by word (words and pairs: each rank's load followed by its combine in the
    PTX, as they come; ptxas schedules them). Each word's halves are widened to float32 (exactly), folded in rank
    order with ``op`` and rounded to nearest even into a word of ``dest``. An odd row's padding half is
    folded and rounded like the rest; nobody reads it.

    ``push``: each rounded word, pair or quad is also stored into the same place of every peer's ``dest``
    (one remote store as wide as the loads, the next rank first) as soon as it is folded: the steady
    ``two_shot``'s all-gather. A cluster barrier after the call publishes the stores.
    """
    combine = OPERATORS[op]
    widen, narrow = PACKED_CONVERSIONS[dtype]
    size = cluster_size
    together = -(-UNROLLED_LOADS // size)  # quads of words a thread folds at a time
    held = 4 * together  # words of those quads

    @cuda.jit(device=True, inline=True)
    def fold_word(acc, j, word, s):
        """Rank ``s``'s ``word`` into ``acc[j, 0..1]`` (rank 0's widened, the others combined)."""
        b0, b1 = widen(word)
        if s == 0:
            acc[j, 0], acc[j, 1] = b0, b1
        else:
            acc[j, 0] = combine(acc[j, 0], b0)
            acc[j, 1] = combine(acc[j, 1], b1)

    @cuda.jit(device=True, inline=True)
    def fold_quad(acc, j, shared, at, s):
        """Rank ``s``'s quad of words ``shared[at ..]`` (one 16-byte load) into ``acc[4 j .. 4 j + 3]``."""
        w0, w1, w2, w3 = ptx.ld_shared_cluster_v4_b32(ptx.map_shared(ptx.shared_address(shared, at), s))
        fold_word(acc, 4 * j, w0, s)
        fold_word(acc, 4 * j + 1, w1, s)
        fold_word(acc, 4 * j + 2, w2, s)
        fold_word(acc, 4 * j + 3, w3, s)

    @cuda.jit(device=True, inline=True)
    def fold_one(shared, w):
        """Word ``shared[w]`` folded over the ranks, rounded."""
        acc = cuda.local.array((1, 2), float32)
        for s in range(size):
            fold_word(acc, 0, ptx.remote_load(shared, w, s), s)
        return narrow(acc[0, 0], acc[0, 1])

    @cuda.jit(device=True, inline=True)
    def fold_two(shared, w):
        """Words ``shared[w]``, ``shared[w + 1]`` (one 8-byte load a rank) folded over the ranks, rounded."""
        acc = cuda.local.array((2, 2), float32)
        address = ptx.shared_address(shared, w)
        for s in range(size):
            both = ptx.ld_shared_cluster_u64(ptx.map_shared(address, s))
            fold_word(acc, 0, uint32(both & 0xFFFFFFFF), s)
            fold_word(acc, 1, uint32(both >> 32), s)
        return narrow(acc[0, 0], acc[0, 1]), narrow(acc[1, 0], acc[1, 1])

    @cuda.jit(device=True, inline=True)
    def store_two(dest, w, w0, w1, rank):
        """The words ``dest[w]``, ``dest[w + 1]`` (pushed as one 8-byte store)."""
        dest[w], dest[w + 1] = w0, w1
        if push:
            both = uint64(w0) | (uint64(w1) << 32)
            address = ptx.shared_address(dest, w)
            for s in range(1, size):
                peer = rank + s
                if peer >= size:
                    peer -= size
                ptx.st_shared_cluster_u64(ptx.map_shared(address, peer), both)

    @cuda.jit(device=True, inline=True)
    def store_quad(dest, at, acc, j, rank):
        """``acc[4 j .. 4 j + 3]`` rounded into the words ``dest[at .. at + 3]`` (pushed as one 16-byte store)."""
        w0 = narrow(acc[4 * j, 0], acc[4 * j, 1])
        w1 = narrow(acc[4 * j + 1, 0], acc[4 * j + 1, 1])
        w2 = narrow(acc[4 * j + 2, 0], acc[4 * j + 2, 1])
        w3 = narrow(acc[4 * j + 3, 0], acc[4 * j + 3, 1])
        dest[at], dest[at + 1], dest[at + 2], dest[at + 3] = w0, w1, w2, w3
        if push:
            address = ptx.shared_address(dest, at)
            for s in range(1, size):
                peer = rank + s
                if peer >= size:
                    peer -= size
                ptx.st_shared_cluster_v4_b32(ptx.map_shared(address, peer), w0, w1, w2, w3)

    return _tiered_fold_row(size, push, fold_one, fold_two, store_two, (held, 2), fold_quad, store_quad)


packed_words = cuda.jit(device=True, inline=True)(simulator_reduce.packed_words)


@cuda.jit(device=True, inline=True)
def pack_row(words, at, row, n):
    """``row`` [n] (uint16 bit patterns) into ``words[at ..]``, two to a word (element 2w in the low half of
    word w, an odd row's padding half zero); the block's threads share the words."""
    for w in range(cuda.threadIdx.x, packed_words(n), cuda.blockDim.x):
        high = uint32(row[2 * w + 1]) if 2 * w + 1 < n else uint32(0)
        words[at + w] = uint32(row[2 * w]) | (high << 16)


@cuda.jit(device=True, inline=True)
def unpack_row(row, words, at, n):
    """``words[at ..]`` back into ``row`` [n] (uint16), as :func:`pack_row` packed them."""
    for w in range(cuda.threadIdx.x, packed_words(n), cuda.blockDim.x):
        word = words[at + w]
        row[2 * w] = uint16(word & 0xFFFF)
        if 2 * w + 1 < n:
            row[2 * w + 1] = uint16(word >> 16)


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
