"""The mistakes the simulator catches, one exception type each.

Every hazard carries the same fields, so a test or a tutorial can point at the exact bug:

- ``kind``: what went wrong, in words (``"data race"``, ``"deadlock"``, ...);
- ``blocks``: the cluster ranks involved, earliest actor first (for a bulk copy: its issuer and
  its destination);
- ``owner`` / ``byte_range``: whose shared memory, and which bytes ``[lo, hi)`` as offsets from
  the start of that block's shared memory window (``None`` where no memory is involved);
- ``points``: the program points in conflict, earliest first, each a :class:`ProgramPoint`
  (block, cluster-barrier phase, algorithm step, the PTX-style operation, source line).

On hardware most of these are silent: a race returns stale data, a transaction mismatch or a
missing arrival hangs the GPU, an access to an exited block's memory reads garbage or faults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProgramPoint:
    """Where one operation of one block happened.

    ``phase`` is the cluster-barrier phase the block was in (how many ``cluster_wait_acquire``
    it had completed); ``step`` is the label the program gave with ``Block.step`` (``""`` if
    none); ``op`` is the operation, named like its PTX instruction, with its operands; ``line``
    is ``"file.py:123"`` of the program statement that issued it.
    """

    block: int
    phase: int
    step: str
    op: str
    line: str

    def __str__(self) -> str:
        step = f" [{self.step}]" if self.step else ""
        return f"block {self.block}, phase {self.phase}{step}: {self.op}  ({self.line})"


class Hazard(RuntimeError):
    """Base class of every hazard the simulator reports (see the module docstring for the fields)."""

    kind = "hazard"

    def __init__(self, summary: str, *, blocks, owner=None, byte_range=None, points=()):
        self.blocks = tuple(int(b) for b in blocks)
        self.owner = owner
        self.byte_range = byte_range
        self.points = tuple(points)
        self.summary = summary
        lines = [f"{self.kind}: {summary}"]
        if owner is not None and byte_range is not None:
            lines.append(f"  memory: block {owner}'s shared memory, bytes [{byte_range[0]}, {byte_range[1]})")
        lines.extend(f"  {label}: {point}" for label, point in zip(_POINT_LABELS, self.points))
        super().__init__("\n".join(lines))


_POINT_LABELS = ("first", "then", "also")


class DataRace(Hazard):
    """Two accesses to the same bytes, at least one a write, from different actors, unordered.

    ``conflict`` says which pair, e.g. ``"write after read"``. An actor is a block, or the bulk
    copies completing on one mbarrier phase (their writes become visible only to whoever
    observes that phase complete).
    """

    kind = "data race"

    def __init__(self, summary, *, conflict: str, **fields):
        self.conflict = conflict
        super().__init__(summary, **fields)


class OutOfBounds(Hazard):
    """An index outside a shared array (local or mapped), or an allocation past the window."""

    kind = "out of bounds"


class InvalidRank(OutOfBounds):
    """A cluster rank outside ``0 .. cluster_size - 1`` given to ``map_shared``, or a block that an
    operation may not target: ``bulk_copy`` and ``st_async`` into the issuing block's own memory."""

    kind = "invalid rank"


class BarrierDeadlock(Hazard):
    """Every live block waits and nothing can progress (on hardware: a hang).

    ``waits`` maps each waiting block to what it waits on; ``never_arrived`` lists the live
    blocks that never arrived at the cluster-barrier phase someone waits on.
    """

    kind = "deadlock"

    def __init__(self, summary, *, waits: dict, never_arrived: tuple, **fields):
        self.waits = dict(waits)
        self.never_arrived = tuple(never_arrived)
        super().__init__(summary, **fields)


class PhaseNeverCompletes(BarrierDeadlock):
    """A block waits on an mbarrier phase that can never complete: a deadlock with a known cause.

    Reported instead of a plain :class:`BarrierDeadlock` when the waiting block is the last one
    running (every other block has exited), so nobody is left to give the phase the
    ``missing_arrivals`` it still needs. ``mbarrier`` names the barrier, ``phase`` the phase
    waited on (0-based) and ``parity`` the parity the program passed.

    The usual cause is a parity that names the wrong phase. ``try_wait.parity`` never refers to
    a phase by number: parity ``p`` means "the phase of parity ``p`` that is current, or the one
    just before it". A block that completes phase 0 itself (its own arrival, no transaction
    bytes) and then waits on parity 1 waits for phase 1, which nobody starts; the report then
    names the point that completed the previous phase, first. (On a fresh mbarrier, parity 1
    names the phase before phase 0, which counts as complete: that wait passes at once and
    orders nothing. It is no hang, and it is how a producer's first wait on an "empty" barrier
    is usually written.)
    """

    kind = "phase never completes"

    def __init__(self, summary, *, mbarrier: str, phase: int, parity: int, missing_arrivals: int, **fields):
        self.mbarrier = mbarrier
        self.phase = int(phase)
        self.parity = int(parity)
        self.missing_arrivals = int(missing_arrivals)
        super().__init__(summary, **fields)


class PhaseAliasing(Hazard):
    """An mbarrier operation that cannot tell two phases of the same parity apart.

    An mbarrier only exposes the parity of its current phase, so phases ``k`` and ``k + 2``
    look the same. Which phase an operation meets must not depend on timing; it does when the
    barrier can run two phases ahead of a block:

    - a **wait** on parity ``p`` refers to the earliest phase of parity ``p`` it may observe
      (``phases[0]``: the phase the waiting block knows to be current, or the one just before
      it; ``-1`` is the phase before the first, which counts as complete). If the next phase
      can complete before the wait is known to have returned, the barrier may be back at
      parity ``p`` when the block looks: it then waits for ``phases[1] = phases[0] + 2``
      (seeing newer data, or hanging if that phase never comes) instead of returning;
    - an **arrive**, ``expect_tx`` or transaction bytes of a bulk copy / ``st.async`` issued
      while the block does not know that the previous phase ``phases[0]`` completed may count
      toward that phase instead of the current one ``phases[1]``;
    - an ``expect_tx`` without an arrival that none of its phase's arrivals is ordered after may
      land once that phase ``phases[0]`` has completed, and count toward the next ``phases[1]``.

    ``mbarrier`` names the barrier; ``points`` are the two operations, earliest first: the
    wait and the signal that completed the next phase (it "lapped" the waiter), or the
    completion of the previous phase and the early signal. Fix it by making the faster side
    wait for the slower one (for a producer and a consumer: an "empty" mbarrier the consumer
    arrives on once it is done with the data).
    """

    kind = "phase aliasing"

    def __init__(self, summary, *, mbarrier: str, phases: tuple[int, int], **fields):
        self.mbarrier = mbarrier
        self.phases = tuple(int(p) for p in phases)
        super().__init__(summary, **fields)


class BarrierMisuse(Hazard):
    """A barrier or mbarrier used against its rules (arrive twice, wait unyielded, no init...), or
    a peer's shared memory touched before the first cluster barrier says that the peer runs."""

    kind = "barrier misuse"


class ExitedBlockAccess(Hazard):
    """A peer touched a block's shared memory after (or not ordered before) that block exited."""

    kind = "exited block access"


class TransactionMismatch(Hazard):
    """An mbarrier phase whose expected transaction bytes differ from the bytes delivered.

    ``expected_bytes`` / ``delivered_bytes`` are the phase's totals. Too few bytes hang the
    waiters on hardware; too many complete the phase early or corrupt the next one.
    """

    kind = "transaction mismatch"

    def __init__(self, summary, *, expected_bytes: int, delivered_bytes: int, **fields):
        self.expected_bytes = int(expected_bytes)
        self.delivered_bytes = int(delivered_bytes)
        super().__init__(summary, **fields)


class BulkCopyMisaligned(Hazard):
    """A ``cp.async.bulk`` whose address is not 16-byte aligned or whose size is not a multiple of 16."""

    kind = "misaligned bulk copy"


class MissingProxyFence(Hazard):
    """A bulk copy reads bytes written through the generic proxy with no proxy fence between.

    ``st.shared``, ``red.shared`` and their ``::cluster`` forms from a peer go through the generic
    proxy and ``cp.async.bulk`` reads through the async proxy: the issuing block's
    ``fence.proxy.async.shared::cta`` (``Block.fence_proxy_async``) must come after the write (a
    peer's write ordered before it by a barrier) and before the copy; ``st.async`` writes through
    the generic proxy too. Likewise the copy's ``complete_tx`` on the destination's mbarrier: the owner's ``fence.mbarrier_init.release.cluster``
    (``Block.fence_mbarrier_init``) or ``fence.proxy.async`` after its ``mbarrier.init`` must be
    ordered before the copy.
    """

    kind = "missing proxy fence"
