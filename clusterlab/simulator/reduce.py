"""ClusterReduce (all-reduce) on the simulator, in a fixed, documented floating-point order.

``cluster_reduce(x, op, algorithm)`` takes ``x`` [N, n] (row r lives in block r) and returns
``out`` [N, n], every row the reduction of all rows, and the :class:`Trace`. A GPU kernel that
runs the same algorithm in the same order gets the same bits; this docstring is that contract.

Arithmetic (see :mod:`clusterlab.simulator.dtypes`)
---------------------------------------------------
- Accumulation dtype A: float32 for float16 / bfloat16 / float32, float64 for float64, int32
  for int32 (wrapping). Each block converts its row to A when it stages it in shared memory
  (the steady ``direct`` and ``two_shot`` reduces stage it as it is, in the input dtype X, and widen
  what they pull: they exchange inputs and results only, so a float16 / bfloat16 row moves half the
  bytes); every partial exchanged between blocks is in A; the result is rounded once to the input
  dtype (round to nearest even), at the end or, in the steady ``two_shot``, before its owner pushes it.
- ``a ⊕ b`` is ``np.add`` / ``np.maximum`` / ``np.minimum`` in A, elementwise, in that operand
  order (the programs' ``combine(a, b)``); folds are explicit left folds (no pairwise or fused sums).
- NaN: where a result is NaN is part of the contract, which NaN is not. A GPU's ``add.f32`` returns
  the canonical NaN, NumPy an operand's (its sign and payload), so "the same bits" holds for every
  result that is not a NaN.

Algorithms
----------
Chunk c of a row (``ring``) is elements ``[c*n//N, (c+1)*n//N)``; chunks may be empty.

``direct`` — stage; barrier; every block pulls all N staged rows (its own with ``ld.shared``)
and folds in rank order: ``acc = x0; acc = acc ⊕ x_s for s = 1 .. N-1``. Identical on every
block. 2 cluster barriers (after staging; before exit).

``ring`` — reduce-scatter then all-gather, one cluster barrier per step (N=4 shown)::

    shared memory per block: staged A[n] | partial A[2, max chunk] | result A[n]

    reduce-scatter step s = 0 .. N-2: block r pulls chunk c = (r-s-1) mod N from block
    (r-1) mod N (its staged row at s = 0, its partial[(s-1) % 2] later) and stores
    received ⊕ staged[c] into partial[s % 2] (into result[c] at the last step):

        chunk 0:  x0 --> x0⊕x1 --> (x0⊕x1)⊕x2 --> ((x0⊕x1)⊕x2)⊕x3   ends on block 3
                 blk 0   blk 1        blk 2              blk 3

    so chunk c = x[c] ⊕ x[c+1] ⊕ ... ⊕ x[c+N-1] (ranks mod N, left fold), finished on block
    (c-1) mod N: block r owns chunk (r+1) mod N.

    all-gather step s = 0 .. N-2: block r pulls chunk (r-s) mod N of block (r-1) mod N's
    result into the same place of its own result.

  2N-1 cluster barriers (staging, N-1 + N-1 steps; the last one is the exit barrier), then
  each block reads its own ``result`` (``staged`` when N = 1) locally.

``butterfly`` — recursive doubling for any N. P = largest power of two <= N::

    shared memory per block: staged A[n] | acc A[2, n]   (double buffer)

    fold (only if N > P):   block q < N-P:        acc[0] = staged_q ⊕ staged_{q+P}
                            block N-P <= q < P:   acc[0] = staged_q
    mask = 1, 2, .., P/2:   block r < P, partner p = r ^ mask, lo = min(r, p), hi = max(r, p):
                            acc[next] = value_lo ⊕ value_hi      (both blocks: same bits)
    unfold (only if N > P): block r >= P loads the result from block r-P

  The current value lives in ``staged`` (no fold) or ``acc[0]`` (after the fold); each step
  reads it and writes ``acc[0]`` if it was in ``staged``, else the other ``acc`` row. Cluster
  barriers: 1 (staging) + [fold] + log2(P) + [unfold]; the last one is the exit barrier.

``cluster_reduce_steady`` — back-to-back ``direct`` all-reduces in a steady state of **one
cluster barrier per operation** (``xs`` [steps, N, n], operation k reduces ``xs[k]``)::

    shared memory per block: staged X[2, n]   (double buffer, in the input dtype)

    operation k: stage x_k into staged[k % 2]; barrier k; pull staged[k % 2] of every block and
                 fold in rank order, each row widened to A (the ``direct`` fold, the same bits)
    after the last operation: one exit barrier

  The rules that make one barrier enough: (1) operation k writes only buffer k % 2, and only
  before its barrier; (2) it reads peers' buffer k % 2 only after that barrier; (3) so the next
  write of that buffer, in operation k + 2, comes after barrier k + 1, which no block passes
  before every block has finished operation k's reads. With one buffer (``buffers=1``) operation
  k + 1 overwrites the row a peer may still be reading for operation k: a race, which the
  simulator reports. steps + 1 cluster barriers, against 2 * steps for separate ``direct`` calls.
  The GPU's twin is the device function ``direct_steady_reduce`` of
  :func:`clusterlab.primitives.steady_reduce_device_function` (host API
  :func:`clusterlab.primitives.cluster_reduce_steady`).

``cluster_reduce_steady(xs, algorithm="two_shot")`` — back-to-back ``two_shot`` all-reduces at
**two cluster barriers per operation**, the fewest bytes an all-reduce moves::

    shared memory per block: staged X[n] | result X[n]   (one buffer each, in the input dtype)

    operation k: stage x_k into staged; barrier k.a; block r pulls chunk r of every block's staged
                 row, folds it in rank order, widened to A (the ``direct`` fold, the same bits),
                 rounds it into result[chunk r] and pushes that into result[chunk r] of every peer;
                 barrier k.b

  Its chunks are :func:`steady_chunk_start`'s: ``two_shot``'s, cut at quads of the row as staged (4
  elements; for float16 and bfloat16, whose rows and results move 16-bit, 4 words of two elements: 16
  bytes either way but for float64).

  The rules: (1) staged is read by peers only between barriers k.a and k.b, so staging operation
  k + 1 after operation k returns (past k.b) overwrites nothing a peer still reads; (2) result's
  chunk c of block r is written by block c only between k.a and k.b, and read by block r only
  after k.b, until it arrives at (k + 1).a, before which no peer writes it again. Drop either
  barrier and a row is overwritten while a peer reads it; the simulator reports it. Past k.b no
  block touches a peer's memory, so the chain needs no exit barrier. The two arrays may swap roles
  from one operation to the next (operation k's result is operation k + 1's staged row): the same
  two rules cover a chain that copies nothing.

``cluster_reduce_steady(xs, algorithm="bulk_two_shot")`` — back-to-back ``bulk_two_shot``
all-reduces at **no cluster barrier per operation** (one before the first publishes the
mbarriers, one after the last): every hand-over is a copy completing on the receiver's mbarrier,
followed by a release arrival of its sender there::

    shared memory per block: staged A[slot] | inbox A[N, chunk slot] | scattered, gathered mbarriers
                             (each expects N arrivals a phase: this block's expect_tx, one per peer)

    operation k: stage x_k into staged; expect_tx on scattered and gathered (phase k); copy chunk c
                 of staged into inbox[r] of block c and arrive there, for every peer c; wait for
                 scattered; fold chunk r in rank order (the ``direct`` fold, the same bits) into
                 staged[chunk r] and into inbox[r]; copy inbox[r] into staged[chunk r] of every peer
                 and arrive on its gathered; wait for gathered: staged holds the reduction

  The rules: (1) a copy's completion orders only the bytes it moved, so each copy is followed by a
  release arrival: the one on a peer's ``scattered`` orders this block's staging before the peer's
  push lands on it, the one on ``gathered`` orders the peer's own reads (its copies of operation
  k) before it stages operation k + 1 over them; (2) the pushes copy ``inbox[r]``, not
  ``staged[chunk r]``, which the next operation stages over before any peer is known to have
  received them; ``inbox[r]`` is written again only after ``scattered`` of k + 1, whose arrivals
  come after every peer's ``gathered`` of k; (3) a peer's bytes may land before this block's
  expect_tx: its own arrival keeps the phase open. Drop either kind of arrival and the simulator
  reports the race. The ``two_shot`` bytes, in 2 (N - 1) copies a block and operation, all issued
  by one thread.

``two_shot`` — reduce-scatter then all-gather, each in one step (the ``ring``'s data movement
without its N-1 + N-1 steps)::

    shared memory per block: staged A[n] | result A[n]

    barrier; block r pulls its chunk r of every block's staged row, folds them in rank order (the
    ``direct`` fold: the same bits) into result[chunk r] and pushes that chunk into result[chunk r]
    of every peer (remote stores, the next rank first); barrier; result copied into staged

  Chunk c is ``[two_shot_chunk_start(c), two_shot_chunk_start(c + 1))``: the row cut at multiples
  of 4 elements (16 bytes of float32), so that a GPU moves it with 16-byte accesses. Each block
  pulls ``(N - 1) / N`` of a row from its peers and pushes as much into them, ``2 (N - 1) / N`` rows'
  worth against ``direct``'s ``N - 1``: the fewest bytes an all-reduce can move, in 2 cluster
  barriers. The all-gather pushes rather than pulls: a store needs no round trip, so a GPU thread
  has all of its stores in flight at once, and past the second barrier no block touches a peer's
  memory, so that barrier is also the exit barrier.

``bulk_two_shot`` — ``two_shot``'s data movement by the copy engine: the chunks travel as
``cp.async.bulk`` copies, each completing on the receiver's mbarrier, so the threads only fold::

    shared memory per block: staged A[slot] | inbox A[N, chunk slot] | scattered, gathered mbarriers

    stage; barrier; block r copies chunk c of its staged
    row into inbox[r] of block c, for every peer c (complete_tx on c's ``scattered``); waits for
    the N-1 chunks of its own chunk r; folds them in rank order (staged for its own row: the
    ``direct`` fold, the same bits) into staged[chunk r]; copies that chunk into staged[chunk r]
    of every peer (complete_tx on the peer's ``gathered``); waits for the N-1 other chunks; barrier

  Chunks as ``two_shot``'s, each copied whole in 16-byte units: the last one with the row's padding,
  which nobody folds or reads. Writing a peer's staged[chunk r] is safe without a barrier: that chunk is read only
  by the peer's own copy to block r, which has landed before block r's fold. 2 cluster barriers
  (the last one the exit barrier: peers' copies may read this block's chunk until then); the
  ``two_shot`` bytes.

``bulk`` — the ClusterFusion push: :func:`~clusterlab.simulator.gather.bulk_push_rows` copies
every block's staged row (in A, padded to a 16-byte slot) into slot r of every peer with
``cp.async.bulk`` completing on the receiver's mbarrier (``expect_tx = (N-1) * slot bytes``),
then each block folds its N slots in rank order exactly as ``direct`` (same bits as
``direct``). 2 cluster barriers.
"""

from __future__ import annotations

import numpy as np

from .cluster import Block, SharedArray, launch
from .dtypes import OPS, accumulation_dtype, dtype_name, op_ufunc
from .gather import bulk_push_rows, left_neighbour, ring_chunk, slot_elements
from .inputs import check_choice, check_fits, check_rows
from .memory import MBARRIER_BYTES, layout_bytes

#: ClusterReduce algorithms, by name.
REDUCE_ALGORITHMS = ("direct", "ring", "butterfly", "bulk", "two_shot", "bulk_two_shot")
#: Algorithms of :func:`cluster_reduce_steady`, with the staging buffers of their contract.
STEADY_BUFFERS = {"direct": 2, "two_shot": 1, "bulk_two_shot": 1}
#: The steady algorithms whose chain ends with a cluster barrier after its last operation (peers may
#: still read a block's memory until then; past ``two_shot``'s k.b none does).
STEADY_EXIT_BARRIER = ("direct", "bulk_two_shot")


def cluster_reduce(x: np.ndarray, op: str = "sum", algorithm: str = "ring"):
    """All-reduce the rows of ``x`` across a simulated cluster.

    ``x``: [cluster_size, n], cluster_size 1..16, n >= 1, dtype one of ``DTYPES``; row r is
    block r's input. ``op``: one of ``OPS``; ``algorithm``: one of ``REDUCE_ALGORITHMS``.
    Returns ``(out, trace)``: ``out`` [cluster_size, n] in x's dtype, every row the same
    reduction (bit for bit) computed in the order the module docstring fixes.
    """
    check_rows(x)
    name = dtype_name(x.dtype)
    check_choice("op", op, OPS)
    check_choice("algorithm", algorithm, REDUCE_ALGORITHMS)
    size, n = x.shape
    check_fits(
        "n (x.shape[1])", n, lambda m: reduce_shared_bytes(algorithm, m, size, name),
        f"the {algorithm} reduce (cluster size {size}, {name})",
    )
    out = np.empty_like(x)
    title = (
        f"cluster_reduce(op={op!r}, algorithm={algorithm!r}): {size} blocks x {n} {name}, "
        f"accumulating in {accumulation_dtype(x.dtype).name}"
    )
    trace = launch(_PROGRAMS[algorithm], size, x, out, op_ufunc(op), title=title)
    return out, trace


def cluster_reduce_steady(xs: np.ndarray, op: str = "sum", buffers: int | None = None, algorithm: str = "direct"):
    """``steps`` all-reduces back to back: ``direct`` at one cluster barrier each, ``two_shot`` at two,
    ``bulk_two_shot`` at none (see the module docstring).

    ``xs``: [steps, cluster_size, n], steps >= 1, dtype one of ``DTYPES``; ``xs[k]`` is operation
    k's input, row r in block r. ``op``: one of ``OPS``; ``algorithm``: one of ``STEADY_BUFFERS``.
    ``buffers``: the staging buffers, by default the contract's (``direct`` 2, ``two_shot`` 1);
    ``direct`` also takes 1, the single-buffered version the race checker rejects. Returns
    ``(out, trace)``: ``out`` [steps, cluster_size, n] in xs' dtype, ``out[k]`` bit for bit
    ``cluster_reduce(xs[k], op, "direct")``'s.
    """
    if not isinstance(xs, np.ndarray):
        raise TypeError(f"xs must be a NumPy array [steps, cluster_size, n]; got {type(xs).__name__}")
    if xs.ndim != 3 or xs.shape[0] < 1:
        raise ValueError(f"xs must be a NumPy array [steps, cluster_size, n] with steps >= 1; got shape {xs.shape}")
    check_rows(xs[0], "xs[0]")
    check_choice("op", op, OPS)
    check_choice("algorithm", algorithm, tuple(STEADY_BUFFERS))
    if buffers is None:
        buffers = STEADY_BUFFERS[algorithm]
    allowed = (1, 2) if algorithm == "direct" else (1,)
    if not isinstance(buffers, (int, np.integer)) or isinstance(buffers, bool) or buffers not in allowed:
        error = ValueError if isinstance(buffers, (int, np.integer)) and not isinstance(buffers, bool) else TypeError
        raise error(f"buffers must be {' or '.join(map(str, reversed(allowed)))} for the steady {algorithm} "
                    f"reduce ({STEADY_BUFFERS[algorithm]} is its contract); got {buffers!r}")
    steps, size, n = xs.shape
    name = dtype_name(xs.dtype)
    row = n * (accumulation_dtype(xs.dtype) if algorithm == "bulk_two_shot" else xs.dtype).itemsize  # rows as staged
    arrays = [buffers * row] if algorithm == "direct" else [row, row]  # staged | result

    def layout(m):  # bulk_two_shot: the layout of the single operation
        if algorithm == "bulk_two_shot":
            return reduce_shared_bytes(algorithm, m, size, xs.dtype)
        return layout_bytes([a // n * m for a in arrays])

    check_fits("n (xs.shape[2])", n, layout,
               f"the steady {algorithm} reduce ({buffers} buffer{'s' if buffers > 1 else ''}, {name})")
    out = np.empty_like(xs)
    title = (f"cluster_reduce_steady(op={op!r}, algorithm={algorithm!r}, buffers={buffers}): {steps} steps of "
             f"{size} blocks x {n} {name}, accumulating in {accumulation_dtype(xs.dtype).name}")
    if algorithm == "direct":
        trace = launch(direct_steady_reduce, size, xs, out, op_ufunc(op), buffers, title=title)
    elif algorithm == "two_shot":
        trace = launch(two_shot_steady_reduce, size, xs, out, op_ufunc(op), title=title)
    else:
        trace = launch(bulk_two_shot_steady_reduce, size, xs, out, op_ufunc(op), title=title)
    return out, trace


def reduce_shared_bytes(algorithm: str, n: int, cluster_size: int, dtype) -> int:
    """Shared memory per block that ``algorithm`` declares to reduce ``cluster_size`` rows of ``n`` ``dtype``.

    The layouts of the module docstring, every array in the accumulation dtype.
    """
    check_choice("algorithm", algorithm, REDUCE_ALGORITHMS)
    acc_dtype = accumulation_dtype(dtype)
    row = n * acc_dtype.itemsize
    widest = widest_chunk(n, cluster_size) * acc_dtype.itemsize
    slot = slot_elements(n, acc_dtype.itemsize) * acc_dtype.itemsize
    arrays = {
        "direct": [row],  # staged
        "ring": [row, 2 * widest, row],  # staged | partial | result
        "butterfly": [row, 2 * row],  # staged | acc
        "bulk": [cluster_size * slot, MBARRIER_BYTES],  # rows | full
        "two_shot": [row, row],  # staged | result
        "bulk_two_shot": [slot, cluster_size * bulk_two_shot_chunk_slot(n, cluster_size, acc_dtype.itemsize)
                          * acc_dtype.itemsize, MBARRIER_BYTES, MBARRIER_BYTES],  # staged | inbox | 2 mbarriers
    }[algorithm]
    return layout_bytes(arrays)


def chunk_start(c: int, n: int, size: int) -> int:
    """First element of ``ring`` chunk ``c`` (0..size) of a row of ``n`` elements cut into ``size`` chunks.

    Chunk c is ``[chunk_start(c, n, size), chunk_start(c + 1, n, size))``, i.e. ``[c*n//N, (c+1)*n//N)``.
    """
    return c * n // size


def two_shot_chunk_start(c: int, n: int, size: int) -> int:
    """First element of ``two_shot`` chunk ``c`` (0..size): the row's ceil(n / 4) quads of 4 elements
    cut into ``size`` chunks as :func:`chunk_start` cuts elements; the last chunk ends at ``n``."""
    return min(n, 4 * (c * ((n + 3) // 4) // size))  # plain arithmetic: the GPU compiles this function too


def steady_chunk_start(c: int, n: int, size: int, dtype) -> int:
    """First element of chunk ``c`` of the steady ``two_shot`` over a row of ``n`` elements of ``dtype``: the chunks
    of :func:`two_shot_chunk_start` (cut at quads of elements), counted in the row's 32-bit words (two elements
    each) for float16 and bfloat16, whose rows stay 16-bit: 16-byte cuts of the row as staged."""
    if np.dtype(dtype).itemsize != 2:
        return two_shot_chunk_start(c, n, size)
    return min(n, 2 * two_shot_chunk_start(c, packed_words(n), size))


def packed_words(n: int) -> int:
    """32-bit words of a row of ``n`` 16-bit elements packed two to a word (element 2w in the low half of word w):
    ceil(n / 2)."""
    return (n + 1) // 2  # plain arithmetic: the GPU compiles this function too


def quad_padded(k: int) -> int:
    """``k`` elements rounded up to whole quads (4 elements: 16 bytes of float32, a bulk copy's unit)."""
    return (k + 3) // 4 * 4  # plain arithmetic: the GPU compiles this function too


def bulk_two_shot_chunk_slot(n: int, size: int, itemsize: int) -> int:
    """Elements of an inbox slot of ``bulk_two_shot``: the widest ``two_shot`` chunk (ceil(ceil(n / 4) / N)
    quads), padded to 16 bytes."""
    return slot_elements(4 * -(-(-(-n // 4)) // size), itemsize)


def widest_chunk(n: int, size: int) -> int:
    """Elements of the widest ``ring`` chunk of a row of ``n`` cut into ``size`` chunks: ceil(n / size)."""
    return -(-n // size)


def _load(b: Block, array, rank: int, key):
    """``array[key]`` of block ``rank``: ``ld.shared`` for the own block, else ``ld.shared::cluster``."""
    return array[key] if rank == b.cluster_rank else b.map_shared(array, rank)[key]


def _push(b: Block, array, key, values):
    """``array[key] = values`` in every peer, ``st.shared::cluster``, the next rank first (rank + 1, rank + 2, ..)."""
    size, rank = b.cluster_size, b.cluster_rank
    for s in range(1, size):
        b.map_shared(array, (rank + s) % size)[key] = values


def _stage(b: Block, x: np.ndarray) -> SharedArray:
    """Declare ``staged`` A[n] and store the block's row, converted to A, into it."""
    acc_dtype = accumulation_dtype(x.dtype)
    staged = b.shared_array("staged", (x.shape[1],), acc_dtype)
    b.step("stage")
    staged[:] = x[b.cluster_rank].astype(acc_dtype)
    return staged


def direct_reduce(b: Block, x: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``direct``: pull all staged rows, fold in rank order. Writes ``out[rank]`` [n]."""
    size, rank = b.cluster_size, b.cluster_rank
    staged = _stage(b, x)
    yield b.cluster_sync()
    b.step("pull and fold")
    acc = _load(b, staged, 0, slice(None))
    for s in range(1, size):
        acc = combine(acc, _load(b, staged, s, slice(None)))
    out[rank] = acc.astype(x.dtype)
    yield b.cluster_sync()  # peers may still be reading staged


def direct_steady_reduce(b: Block, xs: np.ndarray, out: np.ndarray, combine: np.ufunc, buffers: int):
    """``direct`` once per operation, one barrier each: operation k stages its row, in the input dtype, into
    buffer k % buffers, and every block widens the rows it pulls to A as it folds them.
    Writes ``out[k, rank]`` [n] for every operation k."""
    size, rank, n = b.cluster_size, b.cluster_rank, xs.shape[2]
    acc_dtype = accumulation_dtype(xs.dtype)
    staged = b.shared_array("staged", (buffers, n), xs.dtype)
    for k in range(xs.shape[0]):
        buffer = k % buffers
        b.step(f"stage {k}")
        staged[buffer] = xs[k, rank]
        yield b.cluster_sync()
        b.step(f"pull and fold {k}")
        acc = _load(b, staged, 0, (buffer, slice(None))).astype(acc_dtype)
        for s in range(1, size):
            acc = combine(acc, _load(b, staged, s, (buffer, slice(None))).astype(acc_dtype))
        out[k, rank] = acc.astype(xs.dtype)
    yield b.cluster_sync()  # peers may still be reading the last operation's buffer


def _bulk_two_shot_shared(b: Block, n: int, acc_dtype):
    """``bulk_two_shot``'s shared memory: ``(staged [slot], inbox [N, chunk slot], scattered, gathered,
    chunk)``, ``chunk(c)`` the ``(lo, hi, end)`` of chunk c, its end rounded up to 16 bytes (what a copy moves)."""
    size, itemsize = b.cluster_size, acc_dtype.itemsize
    staged = b.shared_array("staged", (slot_elements(n, itemsize),), acc_dtype)
    inbox = b.shared_array("inbox", (size, bulk_two_shot_chunk_slot(n, size, itemsize)), acc_dtype)

    def chunk(c):
        lo, hi = two_shot_chunk_start(c, n, size), two_shot_chunk_start(c + 1, n, size)
        return lo, hi, lo + slot_elements(hi - lo, itemsize)

    return staged, inbox, b.shared_mbarrier("scattered"), b.shared_mbarrier("gathered"), chunk


def _bulk_two_shot_fold(b: Block, staged: SharedArray, inbox: SharedArray, lo: int, hi: int, combine: np.ufunc):
    """The ``direct`` fold of chunk [lo, hi): rank order, this block's row from ``staged``, the peers'
    from ``inbox``."""
    rank = b.cluster_rank
    acc = staged[lo:hi] if rank == 0 else inbox[0, : hi - lo]
    for s in range(1, b.cluster_size):
        acc = combine(acc, staged[lo:hi] if s == rank else inbox[s, : hi - lo])
    return acc


def _bulk_two_shot_scatter(b: Block, staged: SharedArray, inbox: SharedArray, scattered, chunk, arrive: bool):
    """The reduce-scatter's copies: chunk c of this block's row into inbox[rank] of every peer c,
    completing on c's ``scattered``; ``arrive``: each followed by a release arrival there (the steady
    reduce's: it orders this block's staging before the peer's pushes into the row)."""
    size, rank = b.cluster_size, b.cluster_rank
    for j in range(1, size):
        c = (rank + j) % size
        c_lo, _, c_end = chunk(c)
        if c_end > c_lo:
            b.bulk_copy(b.map_shared(inbox, c).at[rank, : c_end - c_lo], staged.at[c_lo:c_end],
                        b.map_shared(scattered, c))
        if arrive:
            b.mbarrier_arrive(b.map_shared(scattered, c))


def bulk_two_shot_steady_reduce(b: Block, xs: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``bulk_two_shot`` once per operation, no cluster barrier (one before the first operation, one
    after the last). Writes ``out[k, rank]`` [n] for every operation k."""
    size, rank, n = b.cluster_size, b.cluster_rank, xs.shape[2]
    acc_dtype = accumulation_dtype(xs.dtype)
    itemsize = acc_dtype.itemsize
    staged, inbox, scattered, gathered, chunk = _bulk_two_shot_shared(b, n, acc_dtype)

    lo, hi, end = chunk(rank)
    scattered_bytes = (size - 1) * (end - lo) * itemsize
    gathered_bytes = sum((chunk(c)[2] - chunk(c)[0]) * itemsize for c in range(size) if c != rank)
    b.step("initialise")
    b.mbarrier_init(scattered, size)  # this block's expect_tx and every peer's arrival
    b.mbarrier_init(gathered, size)
    b.fence_mbarrier_init()  # the inits, for the peers' copies that complete on them
    yield b.cluster_sync()  # mbarriers initialised everywhere
    for k in range(xs.shape[0]):
        b.step(f"stage {k}")
        staged[:n] = xs[k, rank].astype(acc_dtype)
        b.fence_proxy_async()  # st.shared above -> cp.async.bulk below
        b.step(f"reduce-scatter {k}")
        # phase k of both: peers' bytes may land before these, this block's arrival keeps the phase open
        b.mbarrier_arrive_expect_tx(scattered, scattered_bytes)
        b.mbarrier_arrive_expect_tx(gathered, gathered_bytes)
        _bulk_two_shot_scatter(b, staged, inbox, scattered, chunk, arrive=True)
        yield b.mbarrier_wait(scattered, k % 2)
        b.step(f"fold {k}")
        acc = _bulk_two_shot_fold(b, staged, inbox, lo, hi, combine)
        staged[lo:hi] = acc
        inbox[rank, : hi - lo] = acc  # what the pushes below copy: staged[lo:hi] takes the next row before they land
        b.fence_proxy_async()  # the folded chunk -> the copies below
        b.step(f"all-gather {k}")
        for j in range(1, size):
            c = (rank + j) % size
            if end > lo:
                b.bulk_copy(b.map_shared(staged, c).at[lo:end], inbox.at[rank, : end - lo],
                            b.map_shared(gathered, c))
            b.mbarrier_arrive(b.map_shared(gathered, c))  # release: what this block read before, peers' copies too
        yield b.mbarrier_wait(gathered, k % 2)
        out[k, rank] = staged[:n].astype(xs.dtype)
    yield b.cluster_sync()  # peers' copies may still read this block's inbox[rank]


def two_shot_steady_reduce(b: Block, xs: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``two_shot`` once per operation, two barriers each, its rows staged and its folded chunks (rounded once)
    pushed in the input dtype. Writes ``out[k, rank]`` [n] for every operation k."""
    size, rank, n = b.cluster_size, b.cluster_rank, xs.shape[2]
    acc_dtype = accumulation_dtype(xs.dtype)
    staged = b.shared_array("staged", (n,), xs.dtype)
    result = b.shared_array("result", (n,), xs.dtype)
    lo, hi = steady_chunk_start(rank, n, size, xs.dtype), steady_chunk_start(rank + 1, n, size, xs.dtype)
    for k in range(xs.shape[0]):
        b.step(f"stage {k}")
        staged[:] = xs[k, rank]
        yield b.cluster_sync()  # k.a: every row of operation k is staged; every block has read its result of k - 1
        b.step(f"reduce-scatter {k}")
        acc = _load(b, staged, 0, slice(lo, hi)).astype(acc_dtype)
        for s in range(1, size):
            acc = combine(acc, _load(b, staged, s, slice(lo, hi)).astype(acc_dtype))
        folded = acc.astype(xs.dtype)  # the chunk's result, rounded once
        result[lo:hi] = folded
        b.step(f"all-gather {k}")
        _push(b, result, slice(lo, hi), folded)
        yield b.cluster_sync()  # k.b: every chunk is reduced and pushed; nobody reads staged any more
        out[k, rank] = result[:]


def ring_reduce(b: Block, x: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``ring``: reduce-scatter then all-gather over N chunks. Writes ``out[rank]`` [n]."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    left = left_neighbour(rank, size)
    widest = widest_chunk(n, size)
    staged = _stage(b, x)
    partial = b.shared_array("partial", (2, widest), staged.dtype)
    result = b.shared_array("result", (n,), staged.dtype)
    yield b.cluster_sync()
    for s in range(size - 1):
        b.step(f"reduce-scatter {s}")
        c = ring_chunk(rank, s, size)
        lo = chunk_start(c, n, size)
        hi = chunk_start(c + 1, n, size)
        if s == 0:
            received = b.map_shared(staged, left)[lo:hi]
        else:
            received = b.map_shared(partial, left)[(s - 1) % 2, : hi - lo]
        combined = combine(received, staged[lo:hi])
        if s == size - 2:
            result[lo:hi] = combined
        else:
            partial[s % 2, : hi - lo] = combined
        yield b.cluster_sync()
    for s in range(size - 1):
        b.step(f"all-gather {s}")
        # chunk (rank - s) mod N: the left neighbour finished it (s = 0) or pulled it at step s - 1
        c = (rank - s) % size
        lo = chunk_start(c, n, size)
        hi = chunk_start(c + 1, n, size)
        result[lo:hi] = b.map_shared(result, left)[lo:hi]
        yield b.cluster_sync()
    b.step("read out")
    final = result if size > 1 else staged
    out[rank] = final[:].astype(x.dtype)


def butterfly_reduce(b: Block, x: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``butterfly``: fold to a power of two, recursive doubling, unfold. Writes ``out[rank]`` [n]."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    power = 1 << (size.bit_length() - 1)  # P, the largest power of two <= N
    staged = _stage(b, x)
    acc = b.shared_array("acc", (2, n), staged.dtype)
    yield b.cluster_sync()

    def butterfly_value(owner: int, row: int):
        """Block ``owner``'s running value [n]: staged (row -1) or acc[row]."""
        if row < 0:
            return _load(b, staged, owner, slice(None))
        return _load(b, acc, owner, (row, slice(None)))

    row = -1
    if size > power:
        b.step("fold")
        if rank < size - power:
            acc[0] = combine(staged[:], _load(b, staged, rank + power, slice(None)))
        elif rank < power:
            acc[0] = staged[:]
        row = 0
        yield b.cluster_sync()
    mask = 1
    while mask < power:
        b.step(f"butterfly mask {mask}")
        write = 0 if row < 0 else 1 - row
        if rank < power:
            low = min(rank, rank ^ mask)
            high = max(rank, rank ^ mask)
            acc[write] = combine(butterfly_value(low, row), butterfly_value(high, row))
        row = write
        mask *= 2
        yield b.cluster_sync()
    source = rank - power if rank >= power else rank
    b.step("unfold" if size > power else "read out")
    final = butterfly_value(source, row)
    if size > power:
        yield b.cluster_sync()  # block rank-power must not exit while it is read
    out[rank] = final.astype(x.dtype)


def bulk_reduce(b: Block, x: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``bulk``: cp.async.bulk push of every staged row, then the ``direct`` fold, locally. Writes ``out[rank]`` [n]."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    rows = yield from bulk_push_rows(b, x[rank].astype(accumulation_dtype(x.dtype)))
    b.step("fold")
    acc = rows[0, :n]
    for s in range(1, size):
        acc = combine(acc, rows[s, :n])
    out[rank] = acc.astype(x.dtype)
    yield b.cluster_sync()  # peers' copies may still be reading rows[rank]


def two_shot_reduce(b: Block, x: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``two_shot``: each block folds its chunk of all rows and pushes it into every peer's result. Writes ``out[rank]`` [n]."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    staged = _stage(b, x)
    result = b.shared_array("result", (n,), staged.dtype)
    yield b.cluster_sync()  # every row is staged
    b.step("reduce-scatter")
    lo, hi = two_shot_chunk_start(rank, n, size), two_shot_chunk_start(rank + 1, n, size)
    acc = _load(b, staged, 0, slice(lo, hi))
    for s in range(1, size):
        acc = combine(acc, _load(b, staged, s, slice(lo, hi)))
    result[lo:hi] = acc
    b.step("all-gather")
    _push(b, result, slice(lo, hi), acc)
    yield b.cluster_sync()  # every chunk is reduced and pushed; nobody reads staged any more
    staged[:] = result[:]
    out[rank] = staged[:].astype(x.dtype)


def bulk_two_shot_reduce(b: Block, x: np.ndarray, out: np.ndarray, combine: np.ufunc):
    """``bulk_two_shot``: chunks scattered and gathered by bulk copies, folded in between. Writes ``out[rank]`` [n]."""
    size, rank, n = b.cluster_size, b.cluster_rank, x.shape[1]
    acc_dtype = accumulation_dtype(x.dtype)
    itemsize = acc_dtype.itemsize
    staged, inbox, scattered, gathered, chunk = _bulk_two_shot_shared(b, n, acc_dtype)

    b.step("stage")
    staged[:n] = x[rank].astype(acc_dtype)
    b.mbarrier_init(scattered, 1)
    b.mbarrier_init(gathered, 1)
    b.fence_proxy_async()  # st.shared above -> cp.async.bulk below
    yield b.cluster_sync()  # rows staged, mbarriers initialised everywhere
    b.step("reduce-scatter")
    lo, hi, end = chunk(rank)
    b.mbarrier_arrive_expect_tx(scattered, (size - 1) * (end - lo) * itemsize)
    b.mbarrier_arrive_expect_tx(gathered, sum((chunk(c)[2] - chunk(c)[0]) * itemsize for c in range(size) if c != rank))
    _bulk_two_shot_scatter(b, staged, inbox, scattered, chunk, arrive=False)
    yield b.mbarrier_wait(scattered, 0)
    b.step("fold")
    staged[lo:hi] = _bulk_two_shot_fold(b, staged, inbox, lo, hi, combine)
    b.fence_proxy_async()  # the folded chunk -> the copies below
    b.step("all-gather")
    for k in range(1, size):
        c = (rank + k) % size
        if end > lo:
            b.bulk_copy(b.map_shared(staged, c).at[lo:end], staged.at[lo:end], b.map_shared(gathered, c))
    yield b.mbarrier_wait(gathered, 0)
    out[rank] = staged[:n].astype(x.dtype)
    yield b.cluster_sync()  # peers' copies may still be reading staged[chunk rank]


_PROGRAMS = {"direct": direct_reduce, "ring": ring_reduce, "butterfly": butterfly_reduce, "bulk": bulk_reduce,
             "two_shot": two_shot_reduce, "bulk_two_shot": bulk_two_shot_reduce}
