"""Shared memory of one block: the static layout, typed arrays, and the shadow that finds races.

Layout
------
Every block of a cluster runs the same kernel, so every block's shared memory has the same
arrays at the same offsets. The first block to declare an array fixes its place for all::

    offset 0                      4096                   4608
           | staged f32[1024] ........ | partial f32[2, 64] .. | full (mbarrier, 8 B) |
           <---------------- one block's shared memory window -------------------------->

Offsets are 16-byte aligned (what ``cp.async.bulk`` needs). Fresh shared memory is not zeroed on
hardware; here it reads as ``0xFF`` bytes (NaN for floats, -1 for ints), so a missed write shows.

A *view* is a named array over bytes of an array declared before it (its *storage*), as a kernel
puts two buffers that are never alive at once in the same words::

    offset 0                                   8192
           | exchange f32[2048] ...................... |
           | partial f32[4, 260] .........|              (a view at byte 0 of exchange)
           | o f32[4, 128] ....|                         (a view at byte 0 of exchange)

Views add no bytes to the layout, and share their storage's bytes and shadow: an access through
one is checked against every earlier access to the same bytes, through any view.

Shadow memory
-------------
Each array keeps, per byte, who touched it last and when, as vector-clock *epochs*:

- ``writer[byte]``, ``write_epoch[byte]``: the actor of the last write and its epoch;
- ``reads[actor]``: per-byte epochs of that actor's last reads (only over the bytes it read);
- ``atomics[actor]``: likewise for ``red.add`` (atomics do not race with each other).

An earlier access by actor ``a`` at epoch ``e`` is ordered before the current one iff the
current actor's vector clock has ``clock[a] >= e``. Checks are vectorised over the accessed bytes
and skipped outright when the per-actor maxima (``write_max`` etc.) show that everything earlier
is already ordered, which is the common case after a barrier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Alignment of every shared-memory allocation, in bytes (``cp.async.bulk`` needs 16).
ALLOCATION_ALIGN_BYTES = 16
#: Size of one mbarrier object in shared memory.
MBARRIER_BYTES = 8
#: What never-written shared memory reads as.
UNINITIALIZED_BYTE = 0xFF

READ, WRITE, ATOMIC = "read", "write", "atomic"
#: For each access mode, the earlier modes it conflicts with. Atomics also conflict with atomics
#: of another grain (element size, or element boundaries) over the same bytes: PTX makes two
#: atomics atomic together only where they overlap completely.
CONFLICTS = {READ: (WRITE, ATOMIC), WRITE: (WRITE, READ, ATOMIC), ATOMIC: (WRITE, READ, ATOMIC)}


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALLOCATION_ALIGN_BYTES`."""
    return -(-nbytes // ALLOCATION_ALIGN_BYTES) * ALLOCATION_ALIGN_BYTES


def layout_bytes(array_bytes) -> int:
    """Where a layout of arrays of ``array_bytes`` bytes each, declared in that order, ends.

    Each array starts at the next aligned offset, as :meth:`SharedLayout.declare` places them, so
    this is the shared memory a block needs for them: ``layout_bytes([4, 8]) == 24``.
    """
    end = 0
    for nbytes in array_bytes:
        end = aligned(end) + nbytes
    return end


class IndexOutOfRange(Exception):
    """An index outside an array's extent; the caller turns it into an ``OutOfBounds`` hazard."""

    def __init__(self, dim: int, lo: int, hi: int, extent: int, byte_range: tuple[int, int]):
        self.dim, self.lo, self.hi, self.extent, self.byte_range = dim, lo, hi, extent, byte_range
        super().__init__(f"index {lo}..{hi - 1} along axis {dim} of extent {extent}")


@dataclass(frozen=True)
class LayoutEntry:
    """One array (or mbarrier) of the cluster-wide shared-memory layout."""

    name: str
    index: int
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    mbarrier_slot: int | None  # k for the k-th mbarrier of the layout, None for arrays
    # remaining[d] = prod(shape[d:]): one index along axis d spans remaining[d + 1] elements
    remaining: tuple[int, ...] = field(repr=False)
    # the entry whose bytes this one uses (its own index, unless a view) and where in them it starts
    storage: int = -1
    base: int = 0

    @property
    def is_view(self) -> bool:
        return self.storage != self.index

    def select(self, key) -> tuple[slice | np.ndarray, int, int]:
        """Validate an index; return (byte selection, lo, hi) relative to the array's first byte.

        The selection is a ``slice`` when the indexed elements are contiguous, else an integer
        array of byte offsets; ``[lo, hi)`` spans them. Indices are addresses: negative values
        and ranges past the end raise :class:`IndexOutOfRange` instead of wrapping or clipping.
        """
        if not isinstance(key, tuple):
            key = (key,)
        if any(isinstance(k, (bool, np.bool_)) for k in key):
            # NumPy reads a bool as a mask over a new axis, not as the element 0 or 1
            raise IndexError(f"shared arrays take integer indices or slices; got a bool in {key!r}")
        if len(key) > len(self.shape):
            raise IndexError(f"too many indices ({len(key)}) for shared array {self.name!r} of shape {self.shape}")
        first = 0  # first element, as long as the selection is contiguous
        count = None  # elements selected, set once a slice (or the end of the key) is reached
        contiguous = True
        for dim, k in enumerate(key):
            extent = self.shape[dim]
            if isinstance(k, slice):
                if k.step not in (None, 1):
                    if not isinstance(k.step, (int, np.integer)) or k.step <= 0:
                        raise IndexError(f"slice step must be a positive integer; got {k.step!r}")
                    contiguous = False
                lo = 0 if k.start is None else int(k.start)
                hi = extent if k.stop is None else int(k.stop)
                if lo < 0 or hi < 0 or hi > extent:
                    raise self._out_of_range(key, dim, min(lo, hi), max(lo, hi))
                if count is None:
                    first += lo * self.remaining[dim + 1]
                    count = max(hi - lo, 0) * self.remaining[dim + 1]
                elif (lo, hi) != (0, extent):
                    contiguous = False
            elif isinstance(k, (int, np.integer)):
                if not 0 <= k < extent:
                    raise self._out_of_range(key, dim, int(k), int(k) + 1)
                if count is None:
                    first += int(k) * self.remaining[dim + 1]
                else:
                    contiguous = False
            else:
                positions = np.asarray(k)
                if positions.dtype.kind not in "iu":
                    raise IndexError(f"shared arrays take integer indices or slices; got {positions.dtype} array")
                if positions.size and (positions.min() < 0 or positions.max() >= extent):
                    raise self._out_of_range(key, dim, int(positions.min()), int(positions.max()) + 1)
                contiguous = False
        itemsize = self.dtype.itemsize
        if contiguous:
            if count is None:
                count = self.remaining[len(key)]
            lo, hi = first * itemsize, (first + count) * itemsize
            return slice(lo, hi), lo, hi
        elements = np.arange(self.remaining[0]).reshape(self.shape)[key].ravel()
        if elements.size == 0:
            return slice(0, 0), 0, 0
        byte_offsets = (elements[:, None] * itemsize + np.arange(itemsize)).ravel()
        return byte_offsets, int(byte_offsets.min()), int(byte_offsets.max()) + 1

    def _out_of_range(self, key, dim, lo, hi):
        """The IndexOutOfRange for ``key``, with the bytes it would touch (unclipped)."""
        itemsize = self.dtype.itemsize
        first = last = 0
        for d, k in enumerate(key):
            span = self.remaining[d + 1]
            if d == dim:
                a, b = lo, hi - 1
            elif isinstance(k, slice):
                a = 0 if k.start is None else int(k.start)
                b = (self.shape[d] if k.stop is None else int(k.stop)) - 1
            elif isinstance(k, (int, np.integer)):
                a = b = int(k)
            else:
                positions = np.asarray(k)
                a, b = int(positions.min()), int(positions.max())
            first += a * span
            last += b * span
        last += self.remaining[len(key)] - 1
        byte_range = (self.offset + first * itemsize, self.offset + (last + 1) * itemsize)
        return IndexOutOfRange(dim, lo, hi, self.shape[dim], byte_range)


class SharedLayout:
    """The cluster-wide list of shared arrays and mbarriers, in declaration order."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.entries: dict[str, LayoutEntry] = {}
        self.in_order: list[LayoutEntry] = []  # entry i is in_order[i]
        self.end_bytes = 0
        self.mbarrier_count = 0

    def declare(self, name: str, shape, dtype, *, mbarrier: bool) -> tuple[LayoutEntry, bool]:
        """The entry for ``name`` (declaring it if new) and whether it was new.

        Raises ValueError if ``name`` was declared before with another shape or dtype, and
        returns an entry past ``capacity_bytes`` unchanged for the caller to report.
        """
        shape, dtype = _checked(name, shape, dtype)
        known = self.entries.get(name)
        if known is not None:
            declared = (known.shape, known.dtype, known.mbarrier_slot is not None, known.is_view)
            if declared != (shape, dtype, mbarrier, False):
                raise ValueError(
                    f"shared {name!r} is declared as {_describe(shape, dtype, mbarrier)} here but as "
                    f"{_describe(known.shape, known.dtype, known.mbarrier_slot is not None)}"
                    f"{f' (a view of {self.in_order[known.storage].name!r})' if known.is_view else ''} by another "
                    "block; every block of a cluster runs the same kernel and has the same layout"
                )
            return known, False
        nbytes = math.prod(shape) * dtype.itemsize
        offset = aligned(self.end_bytes)
        remaining = tuple(math.prod(shape[d:]) for d in range(len(shape) + 1))
        slot = self.mbarrier_count if mbarrier else None
        index = len(self.entries)
        entry = LayoutEntry(name, index, offset, shape, dtype, nbytes, slot, remaining, storage=index)
        self.entries[name] = entry
        self.in_order.append(entry)
        self.end_bytes = offset + nbytes
        self.mbarrier_count += mbarrier
        return entry, True

    def declare_view(self, name: str, base: LayoutEntry, shape, dtype, offset: int) -> tuple[LayoutEntry, bool]:
        """The entry of the view ``name`` (declaring it if new) over ``base``'s bytes from byte
        ``offset`` on, and whether it was new. Raises ValueError where it would not fit inside
        ``base``, ``offset`` is not 16-byte aligned, ``base`` is an mbarrier, or another block
        declared ``name`` otherwise."""
        shape, dtype = _checked(name, shape, dtype)
        if base.mbarrier_slot is not None:
            raise ValueError(f"view {name!r}: {base.name!r} is an mbarrier; views lie over shared arrays")
        if not isinstance(offset, (int, np.integer)) or offset < 0 or offset % ALLOCATION_ALIGN_BYTES:
            raise ValueError(f"view {name!r}: offset={offset!r} must be a non-negative multiple of "
                             f"{ALLOCATION_ALIGN_BYTES} bytes")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > base.nbytes:
            raise ValueError(f"view {name!r} of {nbytes} bytes at byte {offset} does not fit inside {base.name!r} "
                             f"({base.nbytes} bytes)")
        storage, start = self.in_order[base.storage], base.base + int(offset)
        known = self.entries.get(name)
        if known is not None:
            if (known.shape, known.dtype, known.storage, known.base) != (shape, dtype, storage.index, start):
                raise ValueError(
                    f"shared {name!r} is declared as a view of {_describe(shape, dtype, False)} at byte {start} of "
                    f"{storage.name!r} here but otherwise by another block; every block of a cluster runs the same "
                    "kernel and has the same layout"
                )
            return known, False
        remaining = tuple(math.prod(shape[d:]) for d in range(len(shape) + 1))
        entry = LayoutEntry(name, len(self.entries), storage.offset + start, shape, dtype, nbytes, None, remaining,
                            storage=storage.index, base=start)
        self.entries[name] = entry
        self.in_order.append(entry)
        return entry, True


def _checked(name, shape, dtype) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a declaration as a tuple of ints and a NumPy dtype; raises for a name
    that is not a non-empty string or a shape that is not non-negative integers."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"shared memory name must be a non-empty string; got {name!r}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape of shared array {name!r} must be non-negative integers; got {shape}")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype of shared array {name!r} must be a NumPy dtype; got {dtype!r}") from None
    if dtype.hasobject:
        raise TypeError(f"dtype of shared array {name!r} must hold plain bytes (shared memory holds no Python "
                        f"objects); got {dtype}")
    return tuple(int(s) for s in shape), dtype


def _describe(shape, dtype, mbarrier) -> str:
    return "an mbarrier" if mbarrier else f"{dtype.name}{list(shape)}"


class SharedAllocation:
    """One array in one block's shared memory: its bytes, a typed view, and its shadow.

    A view's allocation (``storage``: the allocation of the bytes it lies over) has no bytes or
    shadow of its own: ``find_conflict`` and ``record`` take the view's byte selections, and its
    shadow, its conflicts' byte offsets and its log entries are its storage's (:meth:`storage_bytes`).
    """

    def __init__(self, owner: int, entry: LayoutEntry, storage: SharedAllocation | None = None):
        self.owner = owner
        self.entry = entry
        self.storage = self if storage is None else storage
        if storage is not None:
            self.raw = storage.raw[entry.base : entry.base + entry.nbytes]
            self.view = self.raw.view(entry.dtype).reshape(entry.shape)
            return
        self.raw = np.full(entry.nbytes, UNINITIALIZED_BYTE, dtype=np.uint8)
        self.view = self.raw.view(entry.dtype).reshape(entry.shape)
        self.writer = np.zeros(entry.nbytes, dtype=np.int32)
        self.write_epoch = np.zeros(entry.nbytes, dtype=np.int32)
        self.write_max: dict[int, int] = {}
        self.reads: dict[int, _WindowShadow] = {}
        self.read_max: dict[int, int] = {}
        # per grain (itemsize, storage offset of element boundaries modulo itemsize): (windows, maxima)
        self.atomics: dict[tuple[int, int], tuple[dict[int, _WindowShadow], dict[int, int]]] = {}

    @property
    def grain(self) -> tuple[int, int]:
        """This array's elements as bytes of its storage: (itemsize, where they start modulo itemsize)."""
        itemsize = self.entry.dtype.itemsize
        return itemsize, self.entry.base % itemsize

    def storage_bytes(self, sel, lo: int, hi: int):
        """``(sel, lo, hi)``, a byte selection of this array, in its storage's bytes."""
        base = self.entry.base
        if not base:
            return sel, lo, hi
        shifted = slice(sel.start + base, sel.stop + base) if isinstance(sel, slice) else sel + base
        return shifted, lo + base, hi + base

    def find_conflict(self, sel, lo: int, hi: int, clock: np.ndarray, mode: str, grain=None):
        """The first earlier access to ``sel`` (spanning ``[lo, hi)``) unordered with an access
        of ``mode`` by ``clock`` (``grain``: of an atomic, its view's; default this array's).

        Returns ``(earlier mode, actor, epoch, bad byte offsets)`` or ``None``; byte offsets are
        relative to the storage's first byte (the array's own, unless it is a view).
        """
        grain = self.grain if grain is None else grain
        if self.storage is not self:
            return self.storage.find_conflict(*self.storage_bytes(sel, lo, hi), clock, mode, grain)
        for earlier in CONFLICTS[mode]:
            if earlier == WRITE:
                if not _any_unordered(self.write_max, clock):
                    continue
                actors = self.writer[sel]
                epochs = self.write_epoch[sel]
                bad = epochs > clock[actors]
                if bad.any():
                    first = int(np.argmax(bad))
                    actor, epoch = int(actors[first]), int(epochs[first])
                    return WRITE, actor, epoch, _positions(sel, bad & (actors == actor))
            else:
                for shadows, maxima in self._shadows(earlier, skip=grain if mode == ATOMIC else None):
                    for actor, latest in maxima.items():
                        shadow = shadows[actor]
                        if latest > clock[actor] and shadow.lo < hi and lo < shadow.hi:
                            positions, epochs = shadow.overlap(sel, lo, hi)
                            bad = epochs > clock[actor]
                            if bad.any():
                                return earlier, actor, int(epochs[int(np.argmax(bad))]), positions[bad]
        return None

    def record(self, sel, lo: int, hi: int, actor: int, epoch: int, mode: str, grain=None) -> None:
        """Note an access of ``mode`` to ``sel`` (spanning ``[lo, hi)``) by ``actor`` at ``epoch``
        (``grain`` as :meth:`find_conflict`)."""
        grain = self.grain if grain is None else grain
        if self.storage is not self:
            self.storage.record(*self.storage_bytes(sel, lo, hi), actor, epoch, mode, grain)
            return
        if mode == WRITE:
            self.writer[sel] = actor
            self.write_epoch[sel] = epoch
            self.write_max[actor] = epoch
            return
        shadows, maxima = (self.reads, self.read_max) if mode == READ else self.atomics.setdefault(grain, ({}, {}))
        shadow = shadows.get(actor)
        if shadow is None:
            shadow = shadows[actor] = _WindowShadow(lo, hi)
        shadow.store(sel, lo, hi, epoch)
        maxima[actor] = epoch

    def unordered_accesses(self, clock: np.ndarray):
        """Every (mode, actor, epoch, byte offsets) of an access not ordered before ``clock``.

        Used when the owner exits: whatever a peer did to this memory must have happened before.
        """
        found = []
        for actor, latest in self.write_max.items():
            if latest > clock[actor]:
                bad = (self.writer == actor) & (self.write_epoch > clock[actor])
                found.append((WRITE, actor, int(self.write_epoch[bad].max()), np.flatnonzero(bad)))
        for mode in (READ, ATOMIC):
            for shadows, maxima in self._shadows(mode):
                for actor, latest in maxima.items():
                    if latest > clock[actor]:
                        shadow = shadows[actor]
                        positions = shadow.lo + np.flatnonzero(shadow.epochs > clock[actor])
                        found.append((mode, actor, int(latest), positions))
        return found

    def _shadows(self, mode: str, skip=None) -> list:
        """The (windows, maxima) pairs of the reads, or of the atomics of every grain but ``skip``."""
        if mode == READ:
            return [(self.reads, self.read_max)]
        return [pair for grain, pair in self.atomics.items() if grain != skip]


class _WindowShadow:
    """Per-byte epochs of one actor's reads (or atomics), kept only over the bytes it touched.

    Most actors touch a small part of an array (a copy reads one row slot, a ring step one
    chunk), so the epochs live in a window ``[lo, hi)`` that grows to cover each new access.
    """

    __slots__ = ("lo", "hi", "epochs")

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.epochs = np.zeros(hi - lo, dtype=np.int32)

    def store(self, sel, lo: int, hi: int, epoch: int) -> None:
        if lo < self.lo or hi > self.hi:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            grown = np.zeros(new_hi - new_lo, dtype=np.int32)
            grown[self.lo - new_lo : self.hi - new_lo] = self.epochs
            self.lo, self.hi, self.epochs = new_lo, new_hi, grown
        if isinstance(sel, slice):
            self.epochs[sel.start - self.lo : sel.stop - self.lo] = epoch
        else:
            self.epochs[sel - self.lo] = epoch

    def overlap(self, sel, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(byte offsets, epochs) of the bytes of ``sel`` inside the window."""
        if isinstance(sel, slice):
            start, stop = max(lo, self.lo), min(hi, self.hi)
            return np.arange(start, stop), self.epochs[start - self.lo : stop - self.lo]
        positions = sel[(sel >= self.lo) & (sel < self.hi)]
        return positions, self.epochs[positions - self.lo]


def _any_unordered(maxima: dict[int, int], clock: np.ndarray) -> bool:
    for actor, latest in maxima.items():
        if latest > clock[actor]:
            return True
    return False


def _positions(sel, bad: np.ndarray) -> np.ndarray:
    """Byte offsets (relative to the array) of the True entries of ``bad`` within ``sel``."""
    where = np.flatnonzero(bad)
    return where + sel.start if isinstance(sel, slice) else sel[where]
