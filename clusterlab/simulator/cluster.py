"""A cluster of thread blocks, run deterministically, with every DSMEM hazard checked.

Programs
--------
A program is written once, for one block, as a Python generator function over a :class:`Block`.
Work on shared memory is vectorised over the block's threads (one NumPy call = what all its
threads do in one statement); the program ``yield``\\ s wherever the hardware would wait::

    def swap_with_neighbour(b, x):                 # b: Block, x: host array [cluster_size, n]
        row = b.shared_array("row", x.shape[1:], x.dtype)
        row[:] = x[b.cluster_rank]                 # st.shared
        yield b.cluster_sync()                     # barrier.cluster.arrive.release + wait.acquire
        peer = b.map_shared(row, b.cluster_rank ^ 1)   # mapa
        got = peer[:]                              # ld.shared::cluster
        yield b.cluster_sync()                     # nobody exits while a peer still reads it

    trace = launch(swap_with_neighbour, 2, x)

:func:`launch` creates one generator per block and a deterministic scheduler runs them: in
rank order, each block runs until it yields a wait; a waiting block resumes once its wait is
satisfied. When every live block waits and none can resume, that is a deadlock, reported as
:class:`~clusterlab.simulator.hazards.BarrierDeadlock` (or ``TransactionMismatch``, or
``PhaseNeverCompletes``), never a hang.

The scheduler runs one interleaving, but no conclusion may depend on which: a hazard is reported
if *some* legal interleaving has it, and a wait acquires only what *every* interleaving gives it.

Memory model
------------
Happens-before is tracked with vector clocks, one entry per *actor*: each block, and each
mbarrier instance (standing for the bulk copies that complete on it).

- ``cluster_arrive_release`` publishes the block's clock to the barrier phase it arrives at;
  ``cluster_wait_acquire`` joins that phase's clock into the waiter's. A relaxed arrive counts
  as an arrival but publishes nothing, except what the block's last ``fence_acq_rel_cluster``
  ordered (PTX's fence, then relaxed arrive). A phase completes once every block has arrived or
  exited (exited blocks no longer take part, as on hardware).
- mbarriers work the same way per phase: release arrivals publish, a successful
  ``mbarrier_wait`` acquires the completion of the one phase it observes (see below). A phase
  completes when its pending arrival count is zero *and* the transaction bytes expected
  (``expect_tx``) equal those delivered (``complete_tx``).
- ``bulk_copy`` / ``st_async`` data is written when issued, but its bytes are labelled as
  accesses of the destination mbarrier's actor at that phase. Only a block that observes the
  phase complete (directly, or transitively through later barriers) is ordered after them;
  anyone else touching those bytes races. The copy's reads of its source are labelled the same
  way, so overwriting a source before the copy is known complete is a race too. A copy reads
  through the async proxy: every generic-proxy write to its source (the block's own ``st`` or
  ``red.shared``, a peer's ``::cluster`` ones) needs a ``fence_proxy_async`` of the copying block
  ordered after it (``MissingProxyFence``), and a copy writes another block's memory, never its
  issuer's (``InvalidRank``). The copy's ``complete_tx`` reaches the destination's mbarrier through
  the async proxy too: the owner's ``fence_mbarrier_init`` (or ``fence_proxy_async``) after its
  ``mbarrier_init`` must be ordered before the copy (``MissingProxyFence``). ``st_async`` stores,
  and signals its mbarrier, through the generic proxy (PTX): it needs no such fence, but a bulk
  copy of the bytes it wrote does, as of any other store.
- ``fence_mbarrier_init`` releases the block's inits through its next cluster arrival, relaxed or
  not: a block that waited on that barrier phase may use them (PTX's idiom).
- PTX's rules of an mbarrier phase: an arrival in phase ``k > 0`` must come after a wait that
  returned on phase ``k - 1`` (``BarrierMisuse``, reported when the launch ends unless a lapped
  wait was reported first); an ``expect_tx`` without an arrival must come before one of its
  phase's arrivals, else the phase may complete without it (``PhaseAliasing``); the tx-count
  stays within ``±(2**20 - 1)`` (``TransactionMismatch``).
- A block's shared memory exists while it runs, and every block of the cluster is known to run
  only once a cluster barrier's phase completes: a peer access before the accessing block's first
  cluster wait is ``BarrierMisuse`` (reported at the launch's end, so a race it is part of is
  reported first). When a block exits its shared memory vanishes: every earlier peer access to it,
  and every peer's signal on its mbarriers, must be ordered before the exit, and later ones raise
  ``ExitedBlockAccess``.

Hazards are checked on every access against the owner's shadow memory
(:mod:`clusterlab.simulator.memory`) and raised with both program points.

Phases and parity
-----------------
``mbarrier.try_wait.parity p`` does not name a phase: it returns once the barrier's current
phase has parity ``!= p``, i.e. once "the phase of parity ``p``" (the current one, or the one
just before it) is complete. Which phase that is depends on when the block looks, so the
simulator decides it from what the block *knows*, never from the schedule it happens to run.

A second vector clock per block, the *causal* clock, records what must have happened before
the block's current point in every interleaving: every arrival and every copy that completes
on a barrier phase comes before that phase's completion (relaxed arrivals too: ordering of
memory does not matter here, only what was waited for), and a block that waited on a phase
comes after it. Its entry for an mbarrier is how many of that barrier's phases the block
knows to be complete; its own entry counts its returned mbarrier waits, so "this completion
comes after block ``w``'s wait returned" reads ``causes[w] >= the wait's count``, ``causes``
being the join of the causal clocks of every signal the barrier received so far. A block also
knows a phase is complete when its own operation completed it and no transaction bytes were
involved (with bytes, a copy may still be in flight on hardware).

- A wait on parity ``p`` refers to the *earliest* phase of parity ``p`` the block may observe:
  with ``K`` phases known complete, phase ``K`` if it has parity ``p`` (the wait blocks until
  it completes), else phase ``K - 1`` (it returns at once; ``-1`` is the phase before phase
  0, which counts as complete and orders nothing). The wait acquires that phase's completion.
- If the next phase completes before the wait is known to have returned, the barrier may be
  back at parity ``p`` when the block looks: it may then wait for a phase two later instead.
  That is ``PhaseAliasing``, reported with the wait and the signal that lapped it.
- Likewise an arrival, a (non-zero) ``expect_tx`` or a copy issued by a block that does not
  know the previous phase completed may count toward that phase instead of the current one:
  ``PhaseAliasing`` too. A block whose own arrival completed a phase knows it only if no bytes
  were involved and every other arrival of the phase is ordered before its own (else another
  may come last on hardware).

The cluster barrier needs no such care: its waits name their phase (each block arrives once
per phase and must wait before arriving again), so a block can never be lapped.
"""

from __future__ import annotations

import inspect
import os
import sys

import ml_dtypes
import numpy as np

from . import hazards
from .memory import (
    ALLOCATION_ALIGN_BYTES,
    MBARRIER_BYTES,
    ATOMIC,
    READ,
    WRITE,
    IndexOutOfRange,
    LayoutEntry,
    SharedAllocation,
    SharedLayout,
)
from .trace import Trace, TraceEvent

#: Largest cluster (the non-portable Hopper limit; 8 is the portable one).
MAX_CLUSTER_SIZE = 16
#: Shared memory one Hopper block can use (227 KiB, with the opt-in attribute).
MAX_SMEM_BYTES_PER_BLOCK = 232_448
#: mbarriers a layout may declare (each is a vector-clock actor per block).
MAX_MBARRIERS = 32
#: Largest arrival count and |tx-count| of an mbarrier phase (PTX: 2**20 - 1).
MBARRIER_MAX_COUNT = 2**20 - 1

_BASENAMES: dict[str, str] = {}
#: Element types ``red.shared{::cluster}.add`` takes (PTX ``.u32 .s32 .u64 .s64 .f32 .f64``, ``.noftz.f16 .bf16``).
_RED_ADD_DTYPES = frozenset(map(np.dtype, (np.int32, np.uint32, np.int64, np.uint64, np.float16, ml_dtypes.bfloat16,
                                           np.float32, np.float64)))


def _line_of(frame) -> str:
    """'file.py:123' of a frame (the program statement that issued an operation)."""
    filename = frame.f_code.co_filename
    base = _BASENAMES.get(filename)
    if base is None:
        base = _BASENAMES[filename] = os.path.basename(filename)
    return f"{base}:{frame.f_lineno}"


def _format_key(key) -> str:
    parts = []
    for k in key if isinstance(key, tuple) else (key,):
        if isinstance(k, slice):
            text = f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}"
            parts.append(text if k.step in (None, 1) else f"{text}:{k.step}")
        elif isinstance(k, (int, np.integer)):
            parts.append(str(int(k)))
        else:
            parts.append(f"<{np.size(k)} indices>")
    return ", ".join(parts)


class _SharedObject:
    """Something declared in a block's shared memory (``owner``), as seen by one block (``mapped``:
    through the cluster window, i.e. a ``mapa``-mapped address, rather than the block's own)."""

    __slots__ = ("_block", "owner", "_entry", "mapped")

    def __init__(self, block: "Block", owner: int, entry: LayoutEntry, mapped: bool):
        self._block = block
        self.owner = owner
        self._entry = entry
        self.mapped = mapped

    name = property(lambda self: self._entry.name, doc="Name given at declaration.")
    offset = property(lambda self: self._entry.offset, doc="Byte offset in the shared memory window.")


class SharedArray(_SharedObject):
    """A typed array in one block's shared memory, as seen by one block.

    Made by :meth:`Block.shared_array` (the block's own memory: ``ld.shared`` / ``st.shared``)
    or :meth:`Block.map_shared` (any block's memory through the cluster window:
    ``ld.shared::cluster`` / ``st.shared::cluster``). Indexing loads (returns a NumPy copy),
    assigning stores; ``at[...]`` names a region for ``bulk_copy`` / ``st_async``. Indices are
    addresses: negative ones and ranges past the end are out of bounds (no wrap, no clipping).
    """

    __slots__ = ()

    shape = property(lambda self: self._entry.shape, doc="Shape of the array.")
    dtype = property(lambda self: self._entry.dtype, doc="Element dtype.")
    nbytes = property(lambda self: self._entry.nbytes, doc="Size in bytes.")

    def __getitem__(self, key) -> np.ndarray:
        return self._block._access(self, key, READ)

    def __setitem__(self, key, values) -> None:
        self._block._access(self, key, WRITE, values)

    def atomic_add(self, key, values) -> None:
        """``red.shared[::cluster].add``: add ``values`` into the elements (duplicates accumulate).

        Elements of the types ``red.add`` has: 32- and 64-bit integers, float16, bfloat16, float32
        and float64 (else ``TypeError``).
        """
        if self.dtype not in _RED_ADD_DTYPES:
            raise TypeError(f"red.add adds {', '.join(sorted(d.name for d in _RED_ADD_DTYPES))} elements; "
                            f"{self.name!r} is {self.dtype.name}")
        self._block._access(self, key, ATOMIC, values)

    @property
    def at(self) -> "_RegionIndexer":
        """``arr.at[key]``: the region ``key`` of this array, for ``bulk_copy`` / ``st_async``."""
        return _RegionIndexer(self)

    def __repr__(self) -> str:
        via = "mapped" if self.mapped else "local"
        return f"SharedArray({self.name!r}, {self.dtype.name}{list(self.shape)}, owner={self.owner}, {via})"


class Region:
    """Part of a shared array (``arr.at[key]``), the operand of bulk copies; not an access itself."""

    __slots__ = ("array", "key")

    def __init__(self, array: SharedArray, key):
        self.array = array
        self.key = key


class _RegionIndexer:
    __slots__ = ("_array",)

    def __init__(self, array: SharedArray):
        self._array = array

    def __getitem__(self, key) -> Region:
        return Region(self._array, key)


class Mbarrier(_SharedObject):
    """An mbarrier object in one block's shared memory, as seen by one block.

    Made by :meth:`Block.shared_mbarrier` (own) or :meth:`Block.map_shared` (a peer's, for
    remote arrivals and as the completion target of bulk copies into that peer).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Mbarrier({self.name!r}, owner={self.owner}, {'mapped' if self.mapped else 'local'})"


class Wait:
    """What a program yields to block: a cluster-barrier phase or an mbarrier phase parity.

    ``phase``: the cluster-barrier phase, or for an mbarrier the earliest phase of ``parity``
    the block may observe (``-1``: the phase before the first). ``released``: for an mbarrier
    wait, the block's causal-clock entry once it returned (0 while it waits).
    """

    __slots__ = ("block", "mbarrier", "phase", "parity", "point", "released")

    def __init__(self, block: "Block", mbarrier: "_MbarrierState | None", phase: int, parity: int, point):
        self.block = block
        self.mbarrier = mbarrier
        self.phase = phase
        self.parity = parity
        self.point = point
        self.released = 0

    def describe(self) -> str:
        if self.mbarrier is None:
            return f"cluster barrier phase {self.phase}"
        return f"mbarrier {self.mbarrier.label} phase parity {self.parity}"


class _MbarrierState:
    """One mbarrier instance: its counts, its current phase and the clocks it carries."""

    def __init__(self, owner: int, entry: LayoutEntry, actor: int, actors: int):
        self.owner = owner
        self.entry = entry
        self.actor = actor
        self.label = f"{entry.name!r}@block {owner}"
        self.byte_range = (entry.offset, entry.offset + MBARRIER_BYTES)
        self.initialized = False
        self.init_epoch = 0
        self.init_event = -1
        # the owner's clock at its first fence_mbarrier_init / fence_proxy_async after the init (-1: none
        # yet): the copy engine may complete transactions on it only once that is ordered before
        self.fence_epoch = -1
        self.init_released = False  # a fence_mbarrier_init came after the init
        # the cluster-barrier phase whose relaxed arrival of the owner, after that fence, publishes the init
        # to whoever waited on the phase (-1: none yet)
        self.init_release_phase = -1
        self.arrivals: list[tuple[int, int]] = []  # (block, epoch) of each arrival in the current phase
        self.count = 0
        self.pending = 0
        self.expected = 0
        self.delivered = 0
        self.phase = 0  # completed phases
        self.expect_event = -1  # last expect_tx of the current phase (for reports)
        self.senders: list[int] = []  # blocks whose transactions the current phase received
        self.peer_signals: dict[int, tuple[int, int]] = {}  # peer -> (epoch, event) of its last signal here
        # expect_tx without an arrival in the current phase that no arrival of it is ordered after yet:
        # (block, epoch, event)
        self.bare_expects: list[tuple[int, int, int]] = []
        self.observed: dict[int, int] = {}  # phase -> the owner's causal count once a wait on it first returned
        self.clock = np.zeros(actors, dtype=np.int32)  # join of every release arrival so far
        self.causes = np.zeros(actors, dtype=np.int32)  # join of the causal clocks of every signal so far
        # clock and causes at the completion of the last even / odd phase: what its waiters acquire
        self.completed = [np.zeros(actors, dtype=np.int32), np.zeros(actors, dtype=np.int32)]
        self.completed_causes = [np.zeros(actors, dtype=np.int32), np.zeros(actors, dtype=np.int32)]
        self.completions: list[int] = []  # per completed phase, the event of the signal that completed it
        self.waits: list[Wait] = []  # parity waits the next completion may still lap


class Block:
    """One thread block of a simulated cluster: the API a program is written against.

    Method names follow the PTX instructions they model. Everything is per block: one call is
    what the block's threads do together in one statement.
    """

    def __init__(self, cluster: "_Cluster", rank: int):
        self._cluster = cluster
        self._clock = cluster.clocks[rank]
        self._causal = cluster.causal[rank]  # see "Phases and parity" in the module docstring
        #: This block's rank in the cluster (``%cluster_ctarank``), 0 .. cluster_size - 1.
        self.cluster_rank = rank
        #: Number of blocks in the cluster (``%cluster_nctarank``).
        self.cluster_size = cluster.size
        self._step = ""
        self._arrived = 0  # cluster-barrier arrivals
        self._waited = 0  # completed cluster-barrier waits = current phase
        self._pending_wait: Wait | None = None
        self._fenced: np.ndarray | None = None  # the clock at the last fence_acq_rel_cluster
        # generic-proxy writes into this block's memory no fence of its own is ordered after yet:
        # (storage entry, lo, hi, writer actor: a block, or for an st.async its mbarrier, epoch, event)
        self._unfenced: list[tuple[int, int, int, int, int, int]] = []

    # ------------------------------------------------------------------ bookkeeping

    def step(self, label: str) -> None:
        """Name the algorithm step that follows (shown in traces and hazard reports)."""
        self._step = str(label)

    def _event(self, kind: str, src: int, dst: int, nbytes: int, target: str, line: str) -> int:
        events = self._cluster.trace.events
        rank = self.cluster_rank
        events.append(TraceEvent(self._waited, self._step, kind, rank, src, dst, nbytes, target, line))
        return len(events) - 1

    def _point(self, op: str, line: str) -> hazards.ProgramPoint:
        return hazards.ProgramPoint(self.cluster_rank, self._waited, self._step, op, line)

    def _ready(self, depth: int = 1) -> str:
        """Check that no wait is left unyielded; return the program's source line.

        ``depth``: how many simulator frames lie between the program and this call (1 when a
        public method calls it directly).
        """
        line = _line_of(sys._getframe(depth + 1))
        if self._pending_wait is not None:
            wait = self._pending_wait
            raise hazards.BarrierMisuse(
                f"block {self.cluster_rank} created a wait on {wait.describe()} but did not yield it; "
                "write `yield b.cluster_sync()` / `yield b.mbarrier_wait(...)`",
                blocks=(self.cluster_rank,),
                points=(wait.point, self._point("next operation", line)),
            )
        return line

    # ------------------------------------------------------------------ shared memory

    def shared_array(self, name: str, shape, dtype) -> SharedArray:
        """Declare (or look up) the shared array ``name``: ``dtype[shape]`` in every block.

        Every block must declare it alike (same kernel, same layout); the returned array is
        this block's own copy. Offsets are assigned in declaration order, 16-byte aligned.
        """
        line = self._ready()
        entry = self._cluster.declare(self, name, shape, dtype, mbarrier=False, line=line)
        return SharedArray(self, self.cluster_rank, entry, mapped=False)

    def shared_view(self, name: str, base: SharedArray, shape, dtype, offset: int = 0) -> SharedArray:
        """Declare (or look up) the view ``name``: ``dtype[shape]`` over the bytes of the shared array
        ``base`` from byte ``offset`` (16-byte aligned) on, in every block; return this block's.

        How a kernel lets buffers that are never alive at once share words: a view adds no bytes,
        and an access through it is checked against every earlier access to the same bytes,
        through ``base`` or any other view of them (a race names both arrays). Raises
        ``ValueError`` where the view would not fit inside ``base``.
        """
        line = self._ready()
        if not isinstance(base, SharedArray):
            raise TypeError(f"shared_view lies over a SharedArray; got {type(base).__name__}")
        entry = self._cluster.declare_view(self, name, base._entry, shape, dtype, offset, line)
        return SharedArray(self, self.cluster_rank, entry, mapped=False)

    def shared_mbarrier(self, name: str) -> Mbarrier:
        """Declare (or look up) the 8-byte mbarrier ``name`` in every block; return this block's."""
        line = self._ready()
        entry = self._cluster.declare(self, name, (MBARRIER_BYTES,), np.uint8, mbarrier=True, line=line)
        return Mbarrier(self, self.cluster_rank, entry, mapped=False)

    def map_shared(self, obj, rank: int):
        """``mapa``: the same array or mbarrier in block ``rank``'s shared memory.

        ``obj``: a SharedArray or Mbarrier; ``rank``: 0 .. cluster_size - 1 (else
        :class:`InvalidRank`). Accesses through the result are ``*.shared::cluster``.
        """
        line = self._ready()
        if not isinstance(obj, (SharedArray, Mbarrier)):
            raise TypeError(f"map_shared maps a SharedArray or Mbarrier; got {type(obj).__name__}")
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool):
            raise TypeError(f"rank must be an integer; got {rank!r}")
        rank = int(rank)
        entry = obj._entry
        target = f"{entry.name} -> block {rank}"
        event = self._event("mapa", self.cluster_rank, self.cluster_rank, 0, target, line)
        if not 0 <= rank < self.cluster_size:
            raise hazards.InvalidRank(
                f"block {self.cluster_rank} maps {entry.name!r} into block {rank}, but the cluster "
                f"has ranks 0..{self.cluster_size - 1}",
                blocks=(self.cluster_rank,),
                owner=rank,
                byte_range=(entry.offset, entry.offset + entry.nbytes),
                points=(self._cluster.point(event),),
            )
        return type(obj)(self, rank, entry, mapped=True)

    def _access(self, array: SharedArray, key, mode: str, values=None):
        """Load, store or atomically add through ``array`` (local or mapped), with every check."""
        line = self._ready(depth=2)
        cluster = self._cluster
        entry = array._entry
        owner = array.owner
        me = self.cluster_rank
        if mode == READ:
            kind, src, dst = ("ld.shared::cluster" if array.mapped else "ld.shared"), owner, me
        elif mode == WRITE:
            kind, src, dst = ("st.shared::cluster" if array.mapped else "st.shared"), me, owner
        else:
            kind, src, dst = ("red.shared::cluster.add" if array.mapped else "red.shared.add"), me, owner
        try:
            sel, lo, hi = entry.select(key)
        except IndexOutOfRange as oob:
            event = self._event(kind, src, dst, 0, f"{entry.name}[{_format_key(key)}] @block {owner}", line)
            cluster.raise_out_of_bounds(self, entry, owner, oob, event)
        alloc = cluster.allocations[owner][entry.index]
        if hi == lo:  # no thread has an element: nothing happens
            return alloc.view[key].copy() if mode == READ else None
        nbytes = hi - lo if isinstance(sel, slice) else sel.size
        event = self._event(kind, src, dst, nbytes, f"{entry.name}[{_format_key(key)}] @block {owner}", line)
        if cluster.exited[owner]:
            cluster.raise_exited_access(self, owner, entry, (lo, hi), event)
        clock = self._clock
        conflict = alloc.find_conflict(sel, lo, hi, clock, mode)
        if conflict is not None:
            cluster.raise_race(me, alloc, mode, conflict, event)
        if owner != me and self._waited == 0:  # reported at the launch's end, if nothing else is first
            cluster.unstarted.append((me, owner, entry, (lo, hi), event))
        epoch = int(clock[me])
        alloc.record(sel, lo, hi, me, epoch, mode)
        _, slo, shi = alloc.storage_bytes(sel, lo, hi)
        cluster.accesses.append((me, epoch, owner, entry.storage, slo, shi, mode, event, entry.index))
        if mode == READ:
            return alloc.view[key].copy()
        if mode == WRITE:
            alloc.view[key] = values
        else:
            np.add.at(alloc.view, key, values)
        # a write through the generic proxy: the owner's bulk copies may read it only after a fence
        cluster.blocks[owner]._unfenced.append((entry.storage, slo, shi, me, epoch, event))
        return None

    # ------------------------------------------------------------------ cluster barrier

    def cluster_arrive_release(self) -> None:
        """``barrier.cluster.arrive.release``: arrive, publishing every earlier access."""
        self._arrive(release=True, line=self._ready())

    def cluster_arrive_relaxed(self) -> None:
        """``barrier.cluster.arrive.relaxed``: arrive without ordering earlier accesses, but those
        before the block's last :meth:`fence_acq_rel_cluster`."""
        self._arrive(release=False, line=self._ready())

    def fence_acq_rel_cluster(self) -> None:
        """``fence.acq_rel.cluster``: every access before it is ordered before the block's later
        operations, so a later ``cluster_arrive_relaxed`` publishes them as a release arrival would
        (PTX's split barrier: the fence, then a relaxed arrive, with work between them that the
        arrive does not publish)."""
        line = self._ready()
        self._event("fence.acq_rel.cluster", self.cluster_rank, self.cluster_rank, 0, "", line)
        self._fenced = self._clock.copy()
        self._clock[self.cluster_rank] += 1  # accesses after the fence: a new epoch, not published by it

    def _arrive(self, release: bool, line: str) -> None:
        kind = "barrier.cluster.arrive.release" if release else "barrier.cluster.arrive.relaxed"
        event = self._event(kind, self.cluster_rank, self.cluster_rank, 0, f"phase {self._arrived}", line)
        if self._arrived > self._waited:
            raise hazards.BarrierMisuse(
                f"block {self.cluster_rank} arrives at cluster barrier phase {self._arrived} before "
                f"waiting on phase {self._waited}; each arrive must be followed by a wait",
                blocks=(self.cluster_rank,),
                points=(self._cluster.point(event),),
            )
        self._cluster.cluster_arrival(self, release)

    def cluster_wait_acquire(self) -> Wait:
        """``barrier.cluster.wait.acquire``: ``yield`` it; resumes once every live block arrived.

        Acquires what the release arrivals of the phase published.
        """
        return self._cluster_wait(self._ready())

    def cluster_sync(self) -> Wait:
        """``cluster.sync()``: arrive (release) and return the wait (acquire) to ``yield``."""
        line = self._ready()
        self._arrive(release=True, line=line)
        return self._cluster_wait(line)

    def _cluster_wait(self, line: str) -> Wait:
        op = f"barrier.cluster.wait.acquire phase {self._waited}"
        wait = Wait(self, None, self._waited, 0, self._point(op, line))
        self._pending_wait = wait
        return wait

    # ------------------------------------------------------------------ mbarriers

    def mbarrier_init(self, bar: Mbarrier, arrival_count: int) -> None:
        """``mbarrier.init.shared::cta``: expect ``arrival_count`` arrivals per phase (own mbarrier).

        Peers may use it only once the init is ordered before their use (a cluster barrier).
        """
        line = self._ready()
        state = self._mbarrier_state(bar, "mbarrier.init", line, local_only=True)
        if (not isinstance(arrival_count, (int, np.integer)) or isinstance(arrival_count, bool)
                or not 1 <= arrival_count <= MBARRIER_MAX_COUNT):
            raise ValueError(f"arrival_count must be an integer in 1..{MBARRIER_MAX_COUNT}; got {arrival_count!r}")
        target = f"{state.label} count {arrival_count}"
        event = self._event("mbarrier.init", self.cluster_rank, self.cluster_rank, 0, target, line)
        if state.initialized:
            raise hazards.BarrierMisuse(
                f"mbarrier {state.label} is initialized twice",
                blocks=(self.cluster_rank,),
                owner=state.owner,
                byte_range=state.byte_range,
                points=(self._cluster.point(state.init_event), self._cluster.point(event)),
            )
        state.initialized = True
        state.init_epoch = int(self._clock[self.cluster_rank])
        state.init_event = event
        state.count = state.pending = int(arrival_count)

    def fence_mbarrier_init(self) -> None:
        """``fence.mbarrier_init.release.cluster``: release this block's earlier ``mbarrier_init``\\ s
        to the cluster, the copy engine included; follow it by a cluster barrier, whose arrival may
        then be relaxed (PTX's idiom: the fence, ``cluster_arrive_relaxed``, ``cluster_wait_acquire``).

        A bulk copy completes its bytes on the destination's mbarrier through the async proxy,
        which sees the init only after this fence, or after a :meth:`fence_proxy_async`, of the
        owner (``MissingProxyFence``).
        """
        line = self._ready()
        self._event("fence.mbarrier_init", self.cluster_rank, self.cluster_rank, 0, "", line)
        self._fence_inits(release=True)

    def _fence_inits(self, release: bool) -> None:
        """Mark the block's initialised mbarriers visible to the async proxy from this point
        (``release``: and to the cluster through the block's next arrival, relaxed or not)."""
        epoch = int(self._clock[self.cluster_rank])
        for state in self._cluster.mbarriers[self.cluster_rank]:
            if state.initialized:
                state.fence_epoch = epoch if state.fence_epoch < 0 else state.fence_epoch
                state.init_released = state.init_released or release

    def mbarrier_arrive(self, bar: Mbarrier) -> None:
        """``mbarrier.arrive.release.cluster``: one arrival on ``bar`` (own or mapped)."""
        self._mbarrier_update(bar, "mbarrier.arrive", arrive=True, tx_bytes=0, line=self._ready())

    def mbarrier_arrive_expect_tx(self, bar: Mbarrier, tx_bytes: int) -> None:
        """``mbarrier.arrive.expect_tx.release.cluster``: expect ``tx_bytes`` more, then arrive."""
        self._mbarrier_update(bar, "mbarrier.arrive.expect_tx", arrive=True, tx_bytes=tx_bytes, line=self._ready())

    def mbarrier_expect_tx(self, bar: Mbarrier, tx_bytes: int) -> None:
        """``mbarrier.expect_tx.relaxed.cluster``: expect ``tx_bytes`` more in this phase, no arrival."""
        self._mbarrier_update(bar, "mbarrier.expect_tx", arrive=False, tx_bytes=tx_bytes, line=self._ready())

    def mbarrier_wait(self, bar: Mbarrier, phase_parity: int) -> Wait:
        """``mbarrier.try_wait.parity.acquire`` in a loop: ``yield`` it; resumes once the phase
        of parity ``phase_parity`` (0 or 1) has completed. Only on the block's own mbarrier.

        The phase is the earliest of that parity the block may observe, and the wait acquires
        that phase's completion only; a barrier that can get two phases ahead of the wait is
        :class:`PhaseAliasing` (see "Phases and parity" in the module docstring).
        """
        line = self._ready()
        state = self._mbarrier_state(bar, "mbarrier.try_wait.parity", line, local_only=True)
        integral = isinstance(phase_parity, (int, np.integer)) and not isinstance(phase_parity, bool)
        if not (integral and phase_parity in (0, 1)):
            raise ValueError(f"phase_parity must be 0 or 1; got {phase_parity!r}")
        op = f"mbarrier.try_wait.parity {state.label} parity {phase_parity}"
        if not state.initialized:
            raise hazards.BarrierMisuse(
                f"mbarrier {state.label} is waited on before mbarrier_init",
                blocks=(self.cluster_rank,), owner=state.owner, byte_range=state.byte_range,
                points=(self._point(op, line),),
            )
        known = int(self._causal[state.actor])  # phases this block knows to be complete
        phase = known if known % 2 == phase_parity else known - 1
        wait = Wait(self, state, phase, int(phase_parity), self._point(op, line))
        self._pending_wait = wait
        if state.phase > phase + 1:  # the phase after it completed, unknown to this block
            self._cluster.raise_lapped(wait, state.completions[phase + 1], wait_first=False)
        state.waits.append(wait)
        return wait

    def _mbarrier_state(self, bar: Mbarrier, kind: str, line: str, local_only: bool) -> _MbarrierState:
        if not isinstance(bar, Mbarrier):
            raise TypeError(f"{kind} takes an Mbarrier; got {type(bar).__name__}")
        if local_only and bar.owner != self.cluster_rank:
            raise hazards.BarrierMisuse(
                f"{kind} works on the block's own mbarrier (shared::cta); block {self.cluster_rank} "
                f"used block {bar.owner}'s",
                blocks=(self.cluster_rank, bar.owner),
                owner=bar.owner,
                byte_range=(bar.offset, bar.offset + MBARRIER_BYTES),
                points=(self._point(f"{kind} {bar.name!r}@block {bar.owner}", line),),
            )
        return self._cluster.mbarriers[bar.owner][bar._entry.mbarrier_slot]

    def _mbarrier_update(self, bar: Mbarrier, kind: str, arrive: bool, tx_bytes: int, line: str) -> None:
        state = self._mbarrier_state(bar, kind, line, local_only=False)
        if (not isinstance(tx_bytes, (int, np.integer)) or isinstance(tx_bytes, bool)
                or not 0 <= tx_bytes <= MBARRIER_MAX_COUNT):
            raise ValueError(f"tx_bytes must be an integer in 0..{MBARRIER_MAX_COUNT}; got {tx_bytes!r}")
        target = f"{state.label}" + (f" tx {tx_bytes} B" if kind != "mbarrier.arrive" else "")
        event = self._event(kind, self.cluster_rank, state.owner, 0, target, line)
        cluster = self._cluster
        cluster.check_mbarrier_visible(self, state, event)
        if arrive or tx_bytes:
            cluster.check_signal_phase(self, state, event)
        if self.cluster_rank != state.owner:  # the owner may exit only once this is ordered before
            state.peer_signals[self.cluster_rank] = (int(self._clock[self.cluster_rank]), event)
        if tx_bytes:
            state.expected += int(tx_bytes)
            state.expect_event = event
            cluster.check_tx_count(state, event)
            if not arrive:
                state.bare_expects.append((self.cluster_rank, int(self._clock[self.cluster_rank]), event))
        if arrive:
            if state.pending == 0:
                raise hazards.BarrierMisuse(
                    f"mbarrier {state.label} gets more than its {state.count} arrivals in one phase",
                    blocks=(self.cluster_rank, state.owner), owner=state.owner, byte_range=state.byte_range,
                    points=(cluster.point(state.init_event), cluster.point(event)),
                )
            state.pending -= 1
            clock = self._clock
            state.arrivals.append((self.cluster_rank, int(clock[self.cluster_rank])))
            state.bare_expects = [expect for expect in state.bare_expects if clock[expect[0]] < expect[1]]
            np.maximum(state.causes, self._causal, out=state.causes)
            np.maximum(state.clock, self._clock, out=state.clock)
            self._clock[self.cluster_rank] += 1
        if arrive and state.phase:
            cluster.check_previous_phase_observed(self, state, event)
        cluster.try_complete(state, event, self)

    # ------------------------------------------------------------------ asynchronous copies

    def fence_proxy_async(self) -> None:
        """``fence.proxy.async.shared::cta``: make the generic-proxy writes into this block's shared
        memory that are ordered before this point (its own ``st.shared`` and ``red.shared``, a peer's
        ``st`` / ``red.shared::cluster`` once a barrier ordered them) visible to the async proxy, i.e.
        to the bulk copies it issues next; its ``mbarrier_init``\\ s too, as :meth:`fence_mbarrier_init`."""
        line = self._ready()
        self._event("fence.proxy.async", self.cluster_rank, self.cluster_rank, 0, "", line)
        self._fence_inits(release=False)
        clock = self._clock
        self._unfenced = [write for write in self._unfenced if clock[write[3]] < write[4]]

    def bulk_copy(self, dst: Region, src: Region, mbar: Mbarrier) -> None:
        """``cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes``.

        Copies the contiguous region ``src`` of this block's own shared memory into ``dst``
        (a region of another block's shared memory, through ``map_shared``; into the issuing
        block itself is :class:`InvalidRank`, undefined in PTX) and signals
        ``complete_tx(nbytes)`` on ``mbar``, which must live in the destination block. Both
        addresses must be 16-byte aligned and the size a multiple of 16
        (:class:`BulkCopyMisaligned`). The bytes are visible only to whoever observes the
        mbarrier phase complete.
        """
        line = self._ready()
        if not isinstance(src, Region) or not isinstance(dst, Region):
            raise TypeError("bulk_copy takes regions: b.bulk_copy(peer.at[key], own.at[key], peer_mbarrier)")
        if src.array.owner != self.cluster_rank or src.array.mapped:
            raise TypeError("bulk_copy reads the issuing block's own shared memory (shared::cta): "
                            "src must come from b.shared_array(...), not map_shared")
        self._async_write(dst, mbar, "cp.async.bulk", line, src=src)

    def st_async(self, dst: Region, values, mbar: Mbarrier) -> None:
        """``st.async.shared::cluster.mbarrier::complete_tx::bytes``: asynchronous remote store.

        Stores ``values`` (registers; shape of the region) into ``dst`` of another block (not
        the issuing one: :class:`InvalidRank`) and signals ``complete_tx(nbytes)`` on ``mbar`` in
        that block. Elements must be 4 or 8 bytes (``.b32`` / ``.b64``, up to ``.v4``). Both the
        store and the signal go through the generic proxy: a bulk copy of the stored bytes needs
        a :meth:`fence_proxy_async` of its issuer after it observed the phase.
        """
        line = self._ready()
        if not isinstance(dst, Region):
            raise TypeError("st_async takes a region: b.st_async(peer.at[key], values, peer_mbarrier)")
        if not dst.array.mapped:
            raise TypeError("st_async writes through the cluster window: dst must come from map_shared")
        if dst.array.dtype.itemsize not in (4, 8):
            raise TypeError(f"st.async stores 4- or 8-byte elements; dst is {dst.array.dtype.name}")
        self._async_write(dst, mbar, "st.async", line, values=values)

    def _async_write(self, dst: Region, mbar: Mbarrier, kind: str, line: str, src: Region | None = None,
                     values=None) -> None:
        """Shared body of bulk_copy (``src``) and st_async (``values``): checks, copy, complete_tx."""
        cluster = self._cluster
        me = self.cluster_rank
        darray, dentry = dst.array, dst.array._entry
        try:
            dsel, dlo, dhi = dentry.select(dst.key)
        except IndexOutOfRange as oob:
            target = f"{dentry.name}[{_format_key(dst.key)}] @block {darray.owner}"
            event = self._event(kind, me, darray.owner, 0, target, line)
            cluster.raise_out_of_bounds(self, dentry, darray.owner, oob, event)
        if src is not None:
            sentry = src.array._entry
            try:
                ssel, slo, shi = sentry.select(src.key)
            except IndexOutOfRange as oob:
                event = self._event(kind, me, darray.owner, 0, f"<- {sentry.name}[{_format_key(src.key)}]", line)
                cluster.raise_out_of_bounds(self, sentry, me, oob, event)
        nbytes = dhi - dlo
        target = f"{dentry.name}[{_format_key(dst.key)}] @block {darray.owner}"
        if src is not None:
            target += f" <- {sentry.name}[{_format_key(src.key)}]"
        target += f" (mbarrier {mbar.name!r})" if isinstance(mbar, Mbarrier) else ""
        event = self._event(kind, me, darray.owner, nbytes, target, line)
        if darray.owner == me:
            raise hazards.InvalidRank(
                f"block {me} issues {kind} into its own shared memory ({dentry.name!r}); it writes another block's "
                "(PTX leaves a destination in the issuing block undefined): store locally with st.shared instead",
                blocks=(me,), owner=me, byte_range=(dentry.offset + dlo, dentry.offset + dhi),
                points=(cluster.point(event),),
            )
        if not isinstance(dsel, slice) or (src is not None and not isinstance(ssel, slice)):
            raise ValueError(f"{kind} moves one contiguous block of bytes; a region is strided or gathered")
        if src is not None and shi - slo != nbytes:
            raise ValueError(f"{kind}: src has {shi - slo} bytes but dst has {nbytes}")
        state = self._mbarrier_state(mbar, kind, line, local_only=False)
        if state.owner != darray.owner:
            raise hazards.BarrierMisuse(
                f"{kind} into block {darray.owner} must complete on an mbarrier of block {darray.owner}, "
                f"not on {state.label}",
                blocks=(me, darray.owner, state.owner), owner=state.owner, byte_range=state.byte_range,
                points=(cluster.point(event),),
            )
        if kind == "cp.async.bulk":
            cluster.check_bulk_alignment(self, dentry, darray.owner, dlo, dhi, sentry, slo, shi, event)
            self._check_fenced(sentry, slo, shi, event)
        if cluster.exited[darray.owner]:
            cluster.raise_exited_access(self, darray.owner, dentry, (dlo, dhi), event)
        cluster.check_mbarrier_visible(self, state, event)
        if kind == "cp.async.bulk":  # st.async signals the mbarrier through the generic proxy
            cluster.check_init_fenced(self, state, kind, event)
        cluster.check_signal_phase(self, state, event)
        # The copy is its own actor: the mbarrier's, at the phase it completes on.
        actor, epoch = state.actor, state.phase + 1
        clock = self._clock
        dalloc = cluster.allocations[darray.owner][dentry.index]
        if src is not None:
            salloc = cluster.allocations[me][sentry.index]
            conflict = salloc.find_conflict(ssel, slo, shi, clock, READ)
            if conflict is not None:
                cluster.raise_race(me, salloc, READ, conflict, event)
        conflict = dalloc.find_conflict(dsel, dlo, dhi, clock, WRITE)
        if conflict is not None:
            cluster.raise_race(me, dalloc, WRITE, conflict, event)
        if src is not None:
            salloc.record(ssel, slo, shi, actor, epoch, READ)
            _, lo, hi = salloc.storage_bytes(ssel, slo, shi)
            cluster.accesses.append((actor, epoch, me, sentry.storage, lo, hi, READ, event, sentry.index))
            dalloc.raw[dsel] = salloc.raw[ssel]
        else:
            dalloc.view[dst.key] = values
        dalloc.record(dsel, dlo, dhi, actor, epoch, WRITE)
        _, lo, hi = dalloc.storage_bytes(dsel, dlo, dhi)
        cluster.accesses.append((actor, epoch, darray.owner, dentry.storage, lo, hi, WRITE, event, dentry.index))
        if src is None:  # st.async writes through the generic proxy: a bulk copy of its bytes needs a fence
            cluster.blocks[darray.owner]._unfenced.append((dentry.storage, lo, hi, actor, epoch, event))
        state.delivered += nbytes
        state.senders.append(me)
        cluster.check_tx_count(state, event)
        np.maximum(state.causes, self._causal, out=state.causes)
        cluster.try_complete(state, event, self)

    def _check_fenced(self, entry: LayoutEntry, lo: int, hi: int, event: int) -> None:
        lo, hi = lo + entry.base, hi + entry.base  # in the storage's bytes, as _unfenced holds them
        for index, wlo, whi, _, _, store_event in self._unfenced:
            if index == entry.storage and wlo < hi and lo < whi:
                cluster = self._cluster
                me = self.cluster_rank
                how, writer = cluster.trace.events[store_event].kind, cluster.trace.events[store_event].block
                who = "it" if writer == me else f"block {writer}"
                raise hazards.MissingProxyFence(
                    f"block {me} bulk-copies {entry.name!r} bytes {who} wrote with {how} "
                    f"without a fence.proxy.async of block {me} after that write (b.fence_proxy_async())",
                    blocks=tuple(dict.fromkeys((writer, me))),
                    owner=self.cluster_rank,
                    byte_range=(entry.offset - entry.base + max(lo, wlo), entry.offset - entry.base + min(hi, whi)),
                    points=(cluster.point(store_event), cluster.point(event)),
                )


class _Cluster:
    """The state shared by all blocks of one launch, and the scheduler."""

    def __init__(self, size: int, smem_bytes: int, title: str):
        self.size = size
        self.layout = SharedLayout(smem_bytes)
        self.actors = size + size * MAX_MBARRIERS
        self.clocks = np.zeros((size, self.actors), dtype=np.int32)
        self.clocks[np.arange(size), np.arange(size)] = 1
        self.causal = np.zeros((size, self.actors), dtype=np.int32)
        self.trace = Trace(size, title)
        self.allocations: list[list[SharedAllocation | None]] = [[] for _ in range(size)]
        self.mbarriers: list[list[_MbarrierState]] = [[] for _ in range(size)]
        self.accesses: list[tuple] = []  # (actor, epoch, owner, entry, lo, hi, mode, event)
        self.barrier_arrivals: list[int] = []  # per cluster-barrier phase
        self.barrier_clocks: list[np.ndarray] = []
        self.barrier_causes: list[np.ndarray] = []  # per phase: join of every arrival's causal clock
        self.exited = [False] * size
        self.unobserved: list[tuple[_MbarrierState, int, int]] = []  # arrivals before their previous phase was seen
        self.unstarted: list[tuple] = []  # (block, owner, entry, span, event): DSMEM accesses before a cluster barrier
        self.exit_events = [-1] * size
        self.blocks = [Block(self, rank) for rank in range(size)]
        self.declared_at: dict[str, int] = {}

    # ---------------------------------------------------------------- reports

    def point(self, event: int) -> hazards.ProgramPoint:
        e = self.trace.events[event]
        op = f"{e.kind} {e.target}".rstrip()
        return hazards.ProgramPoint(e.block, e.phase, e.step, op, e.line)

    def raise_out_of_bounds(self, block: Block, entry: LayoutEntry, owner: int, oob: IndexOutOfRange, event: int):
        raise hazards.OutOfBounds(
            f"block {block.cluster_rank} indexes {entry.name!r} (shape {entry.shape}) of block {owner} "
            f"with {oob.lo}..{oob.hi - 1} along axis {oob.dim}, whose extent is {oob.extent}",
            blocks=tuple(dict.fromkeys((block.cluster_rank, owner))),
            owner=owner,
            byte_range=oob.byte_range,
            points=(self.point(self.declared_at[entry.name]), self.point(event)),
        )

    def raise_exited_access(self, block: Block, owner: int, entry: LayoutEntry, span, event: int):
        raise hazards.ExitedBlockAccess(
            f"block {block.cluster_rank} touches {entry.name!r} of block {owner}, which has already "
            "exited and whose shared memory is gone (end the kernel with a cluster barrier)",
            blocks=(owner, block.cluster_rank),
            owner=owner,
            byte_range=(entry.offset + span[0], entry.offset + span[1]),
            points=(self.point(self.exit_events[owner]), self.point(event)),
        )

    def actor_block(self, actor: int) -> int:
        """The block an actor stands for: itself, or the owner of the mbarrier."""
        return actor if actor < self.size else (actor - self.size) % self.size

    def find_access(self, actor, owner, storage, modes, lo, hi, epoch_ok) -> tuple[int, int]:
        """``(event index, entry index)`` of the latest logged access matching the arguments
        (``storage``, ``lo``, ``hi``: the bytes' storage entry and their offsets in it)."""
        for a, epoch, o, index, alo, ahi, mode, event, through in reversed(self.accesses):
            if (a, o, index) == (actor, owner, storage) and mode in modes and alo < hi and lo < ahi:
                if epoch_ok(epoch):
                    return event, through
        raise AssertionError("shadow memory and access log disagree")

    def raise_race(self, me: int, alloc: SharedAllocation, mode: str, conflict, event: int):
        earlier_mode, actor, epoch, positions = conflict
        entry, storage = alloc.entry, alloc.storage.entry
        lo, hi = int(positions.min()), int(positions.max()) + 1
        earlier, through = self.find_access(actor, alloc.owner, storage.index, (earlier_mode,), lo, hi,
                                            lambda e: e == epoch)
        earlier_block = self.trace.events[earlier].block
        via_copy = actor >= self.size
        what = earlier_mode
        if through != entry.index:
            what += f" of {self.layout.in_order[through].name!r}, which shares those bytes,"
        if mode == earlier_mode == ATOMIC:  # atomics of one grain never conflict
            what += " over different elements (atomics are atomic together only on the same elements),"
        if via_copy:
            what += f" by an asynchronous copy into block {self.actor_block(actor)}"
        ordered_by = (
            "observe the copy's mbarrier phase complete (mbarrier_wait) before this access"
            if via_copy
            else "put a cluster barrier (arrive.release ... wait.acquire) between them"
        )
        raise hazards.DataRace(
            f"{mode} of {entry.name!r} in block {alloc.owner} by block {me} is unordered with an "
            f"earlier {what} by block {earlier_block}; {ordered_by}",
            conflict=f"{mode} after {earlier_mode}",
            blocks=tuple(dict.fromkeys((earlier_block, me, self.actor_block(actor)))),
            owner=alloc.owner,
            byte_range=(storage.offset + lo, storage.offset + hi),
            points=(self.point(earlier), self.point(event)),
        )

    # ---------------------------------------------------------------- layout

    def declare(self, block: Block, name, shape, dtype, mbarrier: bool, line: str) -> LayoutEntry:
        entry, new = self.layout.declare(name, shape, dtype, mbarrier=mbarrier)
        if not new:
            return entry
        kind = "mbarrier" if mbarrier else "shared array"
        event = block._event("declare", block.cluster_rank, block.cluster_rank, 0,
                             f"{kind} {name!r} at [{entry.offset}, {entry.offset + entry.nbytes})", line)
        self.declared_at[name] = event
        if entry.offset + entry.nbytes > self.layout.capacity_bytes:
            raise hazards.OutOfBounds(
                f"shared memory exhausted: {name!r} needs bytes [{entry.offset}, {entry.offset + entry.nbytes}) "
                f"but a block has {self.layout.capacity_bytes}",
                blocks=(block.cluster_rank,),
                owner=block.cluster_rank,
                byte_range=(entry.offset, entry.offset + entry.nbytes),
                points=(self.point(event),),
            )
        if mbarrier:
            if entry.mbarrier_slot >= MAX_MBARRIERS:
                raise ValueError(f"the simulator models at most {MAX_MBARRIERS} mbarriers per block")
            for owner in range(self.size):
                actor = self.size + entry.mbarrier_slot * self.size + owner
                self.mbarriers[owner].append(_MbarrierState(owner, entry, actor, self.actors))
                self.allocations[owner].append(None)
        else:
            for owner in range(self.size):
                self.allocations[owner].append(SharedAllocation(owner, entry))
        return entry

    def declare_view(self, block: Block, name, base: LayoutEntry, shape, dtype, offset, line: str) -> LayoutEntry:
        entry, new = self.layout.declare_view(name, base, shape, dtype, offset)
        if not new:
            return entry
        event = block._event("declare", block.cluster_rank, block.cluster_rank, 0,
                             f"view {name!r} at [{entry.offset}, {entry.offset + entry.nbytes}) of {base.name!r}", line)
        self.declared_at[name] = event
        for owner in range(self.size):
            storage = self.allocations[owner][entry.storage]
            self.allocations[owner].append(SharedAllocation(owner, entry, storage=storage))
        return entry

    # ---------------------------------------------------------------- barriers

    def cluster_arrival(self, block: Block, release: bool) -> None:
        phase = block._arrived
        block._arrived += 1
        if phase == len(self.barrier_arrivals):
            self.barrier_arrivals.append(0)
            self.barrier_clocks.append(np.zeros(self.actors, dtype=np.int32))
            self.barrier_causes.append(np.zeros(self.actors, dtype=np.int32))
        self.barrier_arrivals[phase] += 1
        np.maximum(self.barrier_causes[phase], block._causal, out=self.barrier_causes[phase])
        if release:
            np.maximum(self.barrier_clocks[phase], block._clock, out=self.barrier_clocks[phase])
            block._clock[block.cluster_rank] += 1
        elif block._fenced is not None:  # a relaxed arrival publishes what its last fence ordered
            np.maximum(self.barrier_clocks[phase], block._fenced, out=self.barrier_clocks[phase])
        for state in self.mbarriers[block.cluster_rank]:  # and the inits a fence_mbarrier_init released
            if state.init_released and state.init_release_phase < 0:
                state.init_release_phase = phase

    def cluster_phase_done(self, phase: int) -> bool:
        """Every block arrived at ``phase`` or exited (exited blocks are excused, as on hardware)."""
        arrived = self.barrier_arrivals[phase] if phase < len(self.barrier_arrivals) else 0
        if arrived == self.size:
            return True
        excused = sum(1 for b in self.blocks if self.exited[b.cluster_rank] and b._arrived <= phase)
        return arrived + excused == self.size

    def check_mbarrier_visible(self, block: Block, state: _MbarrierState, event: int) -> None:
        """A peer may touch an mbarrier only after its init is ordered before (a barrier)."""
        me = block.cluster_rank
        if not state.initialized and me == state.owner:
            raise hazards.BarrierMisuse(
                f"mbarrier {state.label} is used before mbarrier_init",
                blocks=(me,), owner=state.owner, byte_range=state.byte_range, points=(self.point(event),),
            )
        if me != state.owner and not (state.initialized and (block._clock[state.owner] >= state.init_epoch
                                                             or self.init_published(block, state))):
            points = ((self.point(state.init_event),) if state.initialized else ()) + (self.point(event),)
            raise hazards.DataRace(
                f"block {me} uses mbarrier {state.label} before its mbarrier_init is ordered before the use "
                "(initialize, then cluster_sync, then let peers use it)",
                conflict="mbarrier use after init",
                blocks=(state.owner, me), owner=state.owner, byte_range=state.byte_range, points=points,
            )
        if self.exited[state.owner]:
            raise hazards.ExitedBlockAccess(
                f"block {me} signals mbarrier {state.label}, but block {state.owner} has exited",
                blocks=(state.owner, me), owner=state.owner, byte_range=state.byte_range,
                points=(self.point(self.exit_events[state.owner]), self.point(event)),
            )

    @staticmethod
    def init_published(block: Block, state: _MbarrierState) -> bool:
        """Whether ``block`` waited on the cluster-barrier phase whose (relaxed) arrival of the
        owner published the mbarrier's init after a ``fence_mbarrier_init``."""
        return 0 <= state.init_release_phase < block._waited

    def check_init_fenced(self, block: Block, state: _MbarrierState, kind: str, event: int) -> None:
        """The copy engine completes on an mbarrier only after the owner fenced its init for the
        async proxy, the fence ordered before the copy's issue (``MissingProxyFence``)."""
        if 0 <= state.fence_epoch <= block._clock[state.owner] or self.init_published(block, state):
            return
        me, owner = block.cluster_rank, state.owner
        raise hazards.MissingProxyFence(
            f"block {me}'s {kind} completes on mbarrier {state.label}, but no fence_mbarrier_init (or "
            f"fence_proxy_async) of block {owner} after its mbarrier_init is ordered before the copy: the "
            f"copy engine may find the mbarrier uninitialised (b.fence_mbarrier_init() after the init, "
            "before the cluster barrier that lets peers copy)",
            blocks=(owner, me), owner=owner, byte_range=state.byte_range,
            points=(self.point(state.init_event), self.point(event)),
        )

    def expect_points(self, state: _MbarrierState) -> tuple:
        """The point of the phase's last expect_tx, if any (first point of a mismatch report)."""
        return (self.point(state.expect_event),) if state.expect_event >= 0 else ()

    def check_signal_phase(self, block: Block, state: _MbarrierState, event: int) -> None:
        """An arrive, non-zero expect_tx or complete_tx counts toward the current phase only if
        the block knows the previous phase completed; otherwise it may land in that one
        (PhaseAliasing)."""
        current = state.phase
        if block._causal[state.actor] >= current:
            return
        me = block.cluster_rank
        previous = self.point(state.completions[current - 1])
        raise hazards.PhaseAliasing(
            f"block {me} signals mbarrier {state.label} in phase {current}, but nothing orders the "
            f"completion of phase {current - 1} (block {previous.block}) before it: on hardware the signal "
            f"may count toward phase {current - 1} or phase {current}; have block {me} wait for phase "
            f"{current - 1} (or for its consumer) first",
            mbarrier=state.label, phases=(current - 1, current),
            blocks=tuple(dict.fromkeys((previous.block, me, state.owner))),
            owner=state.owner, byte_range=state.byte_range, points=(previous, self.point(event)),
        )

    def raise_lapped(self, wait: Wait, lapping: int, wait_first: bool) -> None:
        """PhaseAliasing: event ``lapping`` completed the phase after ``wait``'s before the wait
        is known to have returned (``wait_first``: the wait began before ``lapping``)."""
        state, me = wait.mbarrier, wait.block.cluster_rank
        phase = wait.phase
        lapper = self.point(lapping)
        refers = "the phase before phase 0, which counts as complete" if phase < 0 else f"phase {phase}"
        then = "returns at once" if phase < 0 else f"returns after phase {phase}"
        points = (wait.point, lapper) if wait_first else (lapper, wait.point)
        raise hazards.PhaseAliasing(
            f"block {me} waits on parity {wait.parity} of mbarrier {state.label}, which refers to {refers}, "
            f"but block {lapper.block} completes phase {phase + 1} before that wait is known to have returned: "
            f"on hardware the wait {then} or, finding parity {wait.parity} again, only after phase {phase + 2}; "
            f"make block {lapper.block} wait for block {me} (e.g. an 'empty' mbarrier) before phase {phase + 1}",
            mbarrier=state.label, phases=(phase, phase + 2),
            blocks=tuple(dict.fromkeys((points[0].block, points[1].block, state.owner))),
            owner=state.owner, byte_range=state.byte_range, points=points,
        )

    def check_previous_phase_observed(self, block: Block, state: _MbarrierState, event: int) -> None:
        """PTX: a try_wait must have returned true on the previous phase before an arrival in the
        current one. The arrival of ``block`` (``event``) must come after such a wait in every
        interleaving (waits are the owner's, so: after the owner's first wait that returned on it).
        A violation is kept and reported once the launch ends (:meth:`raise_unobserved_phase`), so
        that a wait it laps, the likelier symptom, is reported first as PhaseAliasing."""
        phase = state.phase
        released = state.observed.get(phase - 1)
        if released is None or block._causal[state.owner] < released:
            self.unobserved.append((state, phase, event))

    def raise_unobserved_phase(self) -> None:
        """BarrierMisuse for the first arrival :meth:`check_previous_phase_observed` kept, if any."""
        if not self.unobserved:
            return
        state, phase, event = self.unobserved[0]
        previous, arrival = self.point(state.completions[phase - 1]), self.point(event)
        raise hazards.BarrierMisuse(
            f"block {arrival.block} arrives on mbarrier {state.label} in phase {phase}, but no wait that "
            f"observed phase {phase - 1} complete is ordered before it (PTX: a try_wait must return true on a "
            "phase before an arrival in the next); have the owner wait on the phase first, and order the "
            "arrival after that wait",
            blocks=tuple(dict.fromkeys((previous.block, arrival.block, state.owner))),
            owner=state.owner, byte_range=state.byte_range, points=(previous, arrival),
        )

    def raise_unstarted_access(self) -> None:
        """BarrierMisuse for the first peer access made before the block's first cluster barrier:
        the owner may not have started (CUDA runs a cluster's blocks together, but guarantees
        they all run only once a cluster barrier's phase completes)."""
        if not self.unstarted:
            return
        me, owner, entry, span, event = self.unstarted[0]
        raise hazards.BarrierMisuse(
            f"block {me} accesses {entry.name!r} of block {owner} before its first cluster barrier: block "
            f"{owner} may not have started yet; yield b.cluster_sync() first (every block of the cluster is "
            "running once a phase of the cluster barrier completes)",
            blocks=(owner, me), owner=owner, byte_range=(entry.offset + span[0], entry.offset + span[1]),
            points=(self.point(event),),
        )

    def raise_unordered_expect(self, state: _MbarrierState, event: int) -> None:
        """PhaseAliasing: ``event`` completes the phase while an ``expect_tx`` of it (no arrival)
        is ordered before none of its arrivals: in another interleaving the phase completes first."""
        block, _, expect = state.bare_expects[0]
        current = state.phase
        points = (self.point(expect), self.point(event))
        raise hazards.PhaseAliasing(
            f"block {block}'s expect_tx on mbarrier {state.label} in phase {current} is ordered before none of "
            f"that phase's arrivals: on hardware the phase may complete (every arrival in, the bytes balanced) "
            f"before the expect_tx lands, its waiters returning before the bytes it announces, and the expect_tx "
            f"counting toward phase {current + 1}; expect the bytes with an arrival (mbarrier_arrive_expect_tx) or "
            "before one",
            mbarrier=state.label, phases=(current, current + 1),
            blocks=tuple(dict.fromkeys((block, self.trace.events[event].block, state.owner))),
            owner=state.owner, byte_range=state.byte_range, points=points,
        )

    def check_tx_count(self, state: _MbarrierState, event: int) -> None:
        """The phase's tx-count (bytes expected less bytes delivered) stays within PTX's range,
        -(2**20 - 1) .. 2**20 - 1; out of it the mbarrier's behaviour is undefined."""
        if abs(state.expected - state.delivered) <= MBARRIER_MAX_COUNT:
            return
        self.raise_tx_mismatch(
            state, event,
            f"mbarrier {state.label} phase {state.phase} has a tx-count of {state.expected - state.delivered} "
            f"bytes ({state.expected} expected, {state.delivered} delivered), outside PTX's range "
            f"-{MBARRIER_MAX_COUNT}..{MBARRIER_MAX_COUNT}: keep the bytes expected and those delivered within "
            f"{MBARRIER_MAX_COUNT} of each other",
        )

    def raise_tx_mismatch(self, state: _MbarrierState, event: int, summary: str) -> None:
        """TransactionMismatch of ``state``'s current phase at ``event`` (after its last expect_tx)."""
        raise hazards.TransactionMismatch(
            summary, expected_bytes=state.expected, delivered_bytes=state.delivered,
            blocks=tuple(dict.fromkeys([state.owner, *state.senders])),
            owner=state.owner, byte_range=state.byte_range,
            points=self.expect_points(state) + (self.point(event),),
        )

    def try_complete(self, state: _MbarrierState, event: int, block: Block) -> None:
        """Complete the mbarrier's phase if nothing is pending; flag over-delivered bytes.

        ``block`` issued ``event``. A completed phase is checked against the waits it may lap:
        a wait on the phase before it must be known to have returned (the completion's causes
        include the wait's return), else PhaseAliasing.
        """
        if state.pending:
            return
        if state.delivered > state.expected:
            self.raise_tx_mismatch(
                state, event,
                f"mbarrier {state.label} phase {state.phase} received {state.delivered} bytes but expected "
                f"only {state.expected} (expect_tx must equal the bytes the copies deliver)",
            )
        if state.delivered < state.expected:
            return
        if state.bare_expects:
            self.raise_unordered_expect(state, event)
        done = state.phase
        state.phase += 1
        state.completions.append(event)
        for snapshot, clock in ((state.completed, state.clock), (state.completed_causes, state.causes)):
            snapshot[done % 2][:] = clock
            snapshot[done % 2][state.actor] = state.phase
        # the block knows the phase is complete if no bytes could still be in flight and every other
        # arrival of the phase is ordered before its signal (else one of them may come last on hardware)
        if state.expected == 0 and all(block._clock[rank] >= epoch for rank, epoch in state.arrivals
                                       if rank != block.cluster_rank):
            block._causal[state.actor] = state.phase
        owner = self.blocks[state.owner]
        self.trace.events.append(
            TraceEvent(owner._waited, owner._step, "mbarrier.complete", state.owner, state.owner, state.owner,
                       state.delivered, f"{state.label} phase {done} ({state.delivered} B tx)",
                       self.trace.events[event].line)
        )
        for wait in state.waits:  # a wait on the phase before is lapped unless it returned before this
            returned = wait.released and state.causes[wait.block.cluster_rank] >= wait.released
            if wait.phase == done - 1 and not returned:
                self.raise_lapped(wait, event, wait_first=True)
        state.waits = [wait for wait in state.waits if wait.phase >= done]
        state.pending = state.count
        state.expected = state.delivered = 0
        state.expect_event = -1
        state.senders = []
        state.bare_expects = []
        state.arrivals = []

    # ---------------------------------------------------------------- scheduler

    def satisfied(self, wait: Wait) -> bool:
        if wait.mbarrier is None:
            return self.cluster_phase_done(wait.phase)
        return wait.mbarrier.phase > wait.phase

    def acquire(self, wait: Wait) -> None:
        """Complete a satisfied wait: join the clock it acquires, advance the block."""
        block = wait.block
        if wait.mbarrier is None:
            np.maximum(block._clock, self.barrier_clocks[wait.phase], out=block._clock)
            np.maximum(block._causal, self.barrier_causes[wait.phase], out=block._causal)
            for other in self.blocks:  # an exit stands in for the arrival of an exited block
                if self.exited[other.cluster_rank] and other._arrived <= wait.phase:
                    np.maximum(block._causal, other._causal, out=block._causal)
            block._event("barrier.cluster.wait.acquire", block.cluster_rank, block.cluster_rank, 0,
                         f"phase {wait.phase}", wait.point.line)
            block._waited += 1
        else:
            state = wait.mbarrier
            if wait.phase >= 0:  # the phase before phase 0 orders nothing
                np.maximum(block._clock, state.completed[wait.phase % 2], out=block._clock)
                np.maximum(block._causal, state.completed_causes[wait.phase % 2], out=block._causal)
            block._causal[block.cluster_rank] += 1
            wait.released = int(block._causal[block.cluster_rank])
            state.observed.setdefault(wait.phase, wait.released)
            block._event("mbarrier.try_wait.parity", block.cluster_rank, block.cluster_rank, 0,
                         f"{state.label} parity {wait.parity}", wait.point.line)

    def exit(self, block: Block) -> None:
        """The block's program returned: check that every peer access to its memory is ordered
        before this point, then drop its shared memory."""
        me = block.cluster_rank
        if block._pending_wait is not None:
            block._ready()
        block.step("exit")
        event = block._event("exit", me, me, 0, "", "return")
        for alloc in self.allocations[me]:
            if alloc is None or alloc.storage is not alloc:  # an mbarrier, or a view (its storage's bytes)
                continue
            for mode, actor, epoch, positions in alloc.unordered_accesses(block._clock):
                entry = alloc.entry
                lo, hi = int(positions.min()), int(positions.max()) + 1
                seen = int(block._clock[actor])
                earlier, through = self.find_access(actor, me, entry.index, (mode,), lo, hi, lambda e: e > seen)
                peer = self.trace.events[earlier].block
                target = self.actor_block(actor)
                by = f"an asynchronous copy into block {target} issued by " if actor >= self.size else ""
                raise hazards.ExitedBlockAccess(
                    f"block {me} exits while the {mode} of its {self.layout.in_order[through].name!r} by {by}block "
                    f"{peer} is not "
                    "ordered before the exit; end with a cluster barrier so no peer still uses its memory",
                    blocks=tuple(dict.fromkeys((peer, target, me))), owner=me,
                    byte_range=(entry.offset + lo, entry.offset + hi),
                    points=(self.point(earlier), self.point(event)),
                )
        for state in self.mbarriers[me]:
            for peer, (epoch, signal) in state.peer_signals.items():
                if block._clock[peer] < epoch:
                    raise hazards.ExitedBlockAccess(
                        f"block {me} exits while block {peer}'s signal on its mbarrier {state.label} is not ordered "
                        "before the exit; end with a cluster barrier (or wait for that phase) so no peer still "
                        "uses its memory",
                        blocks=(peer, me), owner=me, byte_range=state.byte_range,
                        points=(self.point(signal), self.point(event)),
                    )
        self.exited[me] = True
        self.exit_events[me] = event

    def raise_deadlock(self, waits: list[Wait | None]) -> None:
        live = [w for w in waits if w is not None]
        for wait in live:
            state = wait.mbarrier
            if state is not None and state.pending == 0 and state.expected != state.delivered:
                raise hazards.TransactionMismatch(
                    f"block {wait.block.cluster_rank} waits on mbarrier {state.label} phase {state.phase}, "
                    f"which expects {state.expected} transaction bytes but only {state.delivered} were "
                    "delivered and nothing else is in flight (on hardware: a hang)",
                    expected_bytes=state.expected, delivered_bytes=state.delivered,
                    blocks=tuple(dict.fromkeys([state.owner, *state.senders])),
                    owner=state.owner, byte_range=state.byte_range,
                    points=self.expect_points(state) + (wait.point,),
                )
        if len(live) == 1 and live[0].mbarrier is not None:
            self.raise_phase_never_completes(live[0])
        describe = {w.block.cluster_rank: w.describe() for w in live}
        never_arrived: list[int] = []
        lines = []
        for wait in live:
            rank = wait.block.cluster_rank
            if wait.mbarrier is None:
                missing = [w.block.cluster_rank for w in live if w.block._arrived <= wait.phase]
                never_arrived.extend(r for r in missing if r not in never_arrived)
                lines.append(f"block {rank} waits on cluster barrier phase {wait.phase}; never arrived: {missing}")
            else:
                state = wait.mbarrier
                lines.append(f"block {rank} waits on mbarrier {state.label} phase {wait.phase}: "
                             f"{state.pending} of {state.count} arrivals missing")
        first = live[0]
        stuck = next((w for w in live if w.block.cluster_rank in never_arrived and w is not first), None)
        if stuck is None:
            stuck = next((w for w in live if w is not first), None)
        mbar = first.mbarrier
        raise hazards.BarrierDeadlock(
            "every live block waits and none can proceed:\n    " + "\n    ".join(lines),
            waits=describe, never_arrived=tuple(never_arrived),
            blocks=tuple(describe),
            owner=None if mbar is None else mbar.owner,
            byte_range=None if mbar is None else mbar.byte_range,
            points=(first.point,) + (() if stuck is None else (stuck.point,)),
        )

    def raise_phase_never_completes(self, wait: Wait) -> None:
        """The last running block waits on an mbarrier phase that still lacks arrivals."""
        state, me, phase = wait.mbarrier, wait.block.cluster_rank, wait.phase
        summary = (
            f"block {me} waits on parity {wait.parity} of mbarrier {state.label}, i.e. on phase {phase}, "
            f"which still needs {state.pending} of its {state.count} arrivals, but no other block is running "
            "to give them: the phase can never complete (on hardware: a hang)"
        )
        points = (wait.point,)
        if phase > 0:
            previous = self.point(state.completions[phase - 1])
            points = (previous,) + points
            summary += (f"; parity {wait.parity} names phase {phase} because phase {phase - 1} completed before "
                        f"the wait (first point): if it meant phase {phase - 1}, wait on parity {(phase - 1) % 2}")
        raise hazards.PhaseNeverCompletes(
            summary,
            mbarrier=state.label, phase=phase, parity=wait.parity, missing_arrivals=state.pending,
            waits={me: wait.describe()}, never_arrived=(),
            blocks=(me,), owner=state.owner, byte_range=state.byte_range, points=points,
        )

    def check_bulk_alignment(self, block, dentry, downer, dlo, dhi, sentry, slo, shi, event) -> None:
        """cp.async.bulk: 16-byte aligned addresses, size a multiple of 16 (PTX's rules; 0 bytes move nothing)."""
        daddr, saddr, nbytes = dentry.offset + dlo, sentry.offset + slo, dhi - dlo
        problems = []
        if daddr % ALLOCATION_ALIGN_BYTES:
            problems.append(f"dst address {daddr} is not 16-byte aligned")
        if saddr % ALLOCATION_ALIGN_BYTES:
            problems.append(f"src address {saddr} is not 16-byte aligned")
        if nbytes % ALLOCATION_ALIGN_BYTES:
            problems.append(f"size {nbytes} B is not a multiple of 16 (pad the rows)")
        if problems:
            bad_dst = bool(daddr % ALLOCATION_ALIGN_BYTES or nbytes % ALLOCATION_ALIGN_BYTES)
            raise hazards.BulkCopyMisaligned(
                f"block {block.cluster_rank}: cp.async.bulk " + "; ".join(problems),
                blocks=tuple(dict.fromkeys((block.cluster_rank, downer))),
                owner=downer if bad_dst else block.cluster_rank,
                byte_range=(daddr, daddr + nbytes) if bad_dst else (saddr, saddr + nbytes),
                points=(self.point(self.declared_at[sentry.name]), self.point(event)),
            )

    def run(self, programs) -> None:
        """Run the block generators to completion (see the module docstring for the order)."""
        size = self.size
        waits: list[Wait | None] = [None] * size
        done = [False] * size
        remaining = size
        while remaining:
            progressed = False
            for rank in range(size):
                if done[rank]:
                    continue
                block = self.blocks[rank]
                wait = waits[rank]
                if wait is not None:
                    if not self.satisfied(wait):
                        continue
                    self.acquire(wait)
                    waits[rank] = None
                progressed = True
                try:
                    yielded = next(programs[rank])
                except StopIteration:
                    self.exit(block)
                    done[rank] = True
                    remaining -= 1
                    continue
                if yielded is not block._pending_wait or yielded is None:
                    raise TypeError(
                        f"block {rank}'s program yielded {yielded!r}; a program yields only the wait it just "
                        "created: `yield b.cluster_sync()`, `yield b.cluster_wait_acquire()`, "
                        "`yield b.mbarrier_wait(bar, parity)`"
                    )
                block._pending_wait = None
                waits[rank] = yielded
            if remaining and not progressed:
                self.raise_deadlock(waits)


def launch(
    program, cluster_size: int, *args, smem_bytes: int = MAX_SMEM_BYTES_PER_BLOCK, title: str = "", **kwargs
) -> Trace:
    """Run ``program(block, *args, **kwargs)`` on every block of a simulated cluster.

    ``program``: a generator function taking a :class:`Block` first (it yields every wait);
    ``cluster_size``: 1..16 blocks; ``smem_bytes``: each block's shared memory window.
    Returns the :class:`Trace`; raises a :class:`~clusterlab.simulator.hazards.Hazard` on the
    first hazard. Results leave the program the way a kernel's do: it writes them into host
    arrays it was given (global memory is not modelled).
    """
    if not callable(program):
        raise TypeError(
            f"program must be a generator function taking the block (`def program(b): ... yield "
            f"b.cluster_sync()`); got {type(program).__name__}"
        )
    if not isinstance(cluster_size, (int, np.integer)) or isinstance(cluster_size, bool):
        raise TypeError(f"cluster_size must be an integer in 1..{MAX_CLUSTER_SIZE}; got {cluster_size!r}")
    if not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(f"cluster_size must be in 1..{MAX_CLUSTER_SIZE}; got {cluster_size}")
    if (not isinstance(smem_bytes, (int, np.integer)) or isinstance(smem_bytes, bool)
            or not 0 < smem_bytes <= MAX_SMEM_BYTES_PER_BLOCK):
        raise ValueError(f"smem_bytes must be an integer in 1..{MAX_SMEM_BYTES_PER_BLOCK}; got {smem_bytes!r}")
    cluster = _Cluster(int(cluster_size), int(smem_bytes), title)
    programs = []
    for block in cluster.blocks:
        generator = program(block, *args, **kwargs)
        if not inspect.isgenerator(generator):
            raise TypeError(
                f"program must be a generator function that yields its waits (`yield b.cluster_sync()`); "
                f"{getattr(program, '__name__', program)!r} returned {type(generator).__name__}"
            )
        programs.append(generator)
    cluster.run(programs)
    cluster.raise_unobserved_phase()
    cluster.raise_unstarted_access()
    return cluster.trace
