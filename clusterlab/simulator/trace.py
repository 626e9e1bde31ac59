"""What a simulated cluster did: every operation, the DSMEM traffic, a table and a picture.

Each operation a block performs becomes one :class:`TraceEvent`. ``src`` and ``dst`` name the
blocks the bytes move between: for a load ``src`` is the block whose shared memory is read and
``dst`` the loading block; for a store, an atomic, a bulk copy or ``st.async`` ``src`` is the
issuing block and ``dst`` the owner of the memory written. Barrier operations have ``nbytes``
0. ``phase`` is the issuing block's cluster-barrier phase: phase k runs from the k-th completed
``barrier.cluster.wait`` to the next, so a ring reduce over N blocks has 2N phases::

    phase 0        phase 1            ...  phase N-1           phase N   ...  phase 2N-1
    stage rows --| reduce-scatter 0 --| ... reduce-scatter N-2 --| all-gather 0 ... | read out, exit
               barrier             barrier                   barrier

Traffic counts only distributed-shared-memory operations (``ld/st/red.shared::cluster``,
``cp.async.bulk``, ``st.async``) between two blocks; local ``ld.shared`` / ``st.shared``, and a
block's accesses to its own shared memory through the cluster window (``map_shared`` of its own
rank, as an exchange whose lanes pull from every rank does), are in the events but not in the
traffic matrices: their bytes never leave the SM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: Operation kinds that move bytes between blocks over DSMEM.
DSMEM_KINDS = frozenset(
    {"ld.shared::cluster", "st.shared::cluster", "red.shared::cluster.add", "cp.async.bulk", "st.async"}
)
_BARRIER_KINDS = frozenset(
    {
        "barrier.cluster.arrive.release",
        "barrier.cluster.arrive.relaxed",
        "barrier.cluster.wait.acquire",
        "mbarrier.arrive",
        "mbarrier.arrive.expect_tx",
        "mbarrier.expect_tx",
        "mbarrier.try_wait.parity",
        "mbarrier.complete",
    }
)
# Bookkeeping events: recorded (hazard reports point at them) but not listed as operations.
_BOOKKEEPING_KINDS = frozenset({"declare", "mapa"})
# Arrow colour per DSMEM operation in the pictures.
_ARROW_COLOURS = {
    "ld.shared::cluster": "tab:blue",
    "st.shared::cluster": "tab:orange",
    "red.shared::cluster.add": "tab:red",
    "cp.async.bulk": "tab:green",
    "st.async": "tab:purple",
}


class TraceEvent(NamedTuple):
    """One operation of one block (see the module docstring for ``src`` / ``dst``)."""

    phase: int
    step: str
    kind: str
    block: int
    src: int
    dst: int
    nbytes: int
    target: str
    line: str


@dataclass(frozen=True)
class Traffic:
    """DSMEM bytes moved between blocks.

    ``total[src, dst]`` ([N, N], int64) sums all phases; ``per_phase[phase, src, dst]``
    ([phases, N, N]) splits them by cluster-barrier phase. The diagonals are zero: a block's own
    shared memory through the cluster window is not traffic.
    """

    total: np.ndarray
    per_phase: np.ndarray


class Trace:
    """The record of one simulated launch: ``events`` in the order the scheduler ran them."""

    def __init__(self, cluster_size: int, title: str = ""):
        self.cluster_size = cluster_size
        self.title = title
        self.events: list[TraceEvent] = []

    @property
    def num_phases(self) -> int:
        """Number of cluster-barrier phases any block reached (at least 1)."""
        return 1 + max((e.phase for e in self.events), default=0)

    def traffic(self) -> Traffic:
        """DSMEM bytes per (source, destination) block, in total and per phase."""
        n = self.cluster_size
        per_phase = np.zeros((self.num_phases, n, n), dtype=np.int64)
        for e in self.events:
            if _is_traffic(e):
                per_phase[e.phase, e.src, e.dst] += e.nbytes
        return Traffic(total=per_phase.sum(axis=0), per_phase=per_phase)

    def phase_table(self) -> str:
        """A text table, one row per phase: its steps, DSMEM bytes, barriers and operations."""
        rows = [("phase", "step", "DSMEM bytes", "barriers", "operations")]
        per_phase = self.traffic().per_phase
        for phase, events in enumerate(self._events_by_phase()):
            steps = list(dict.fromkeys(e.step for e in events if e.step))
            rows.append(
                (
                    str(phase),
                    _summarise_steps(steps),
                    str(int(per_phase[phase].sum())),
                    _count_kinds([e for e in events if e.kind in _BARRIER_KINDS], with_bytes=False),
                    _count_kinds(
                        [e for e in events if e.kind not in _BARRIER_KINDS and e.kind not in _BOOKKEEPING_KINDS],
                        with_bytes=True,
                    ),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [self.title] if self.title else []
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        cluster_barriers = sum(
            1 for e in self.events if e.kind == "barrier.cluster.wait.acquire" and e.block == 0
        )
        lines.append(
            f"total: {int(per_phase.sum())} DSMEM bytes in {self.num_phases} phases, "
            f"{cluster_barriers} cluster barriers (counted on block 0)"
        )
        return "\n".join(lines)

    def plot(self, phases=None, *, columns: int = 4, panel_inches: float = 3.2):
        """Draw the DSMEM traffic of each phase: blocks as boxes on a circle, arrows for transfers.

        ``phases``: a non-empty list (or other iterable) of phase numbers, ``[0, 2]`` or
        ``range(3)`` (default: every phase). Arrow width grows with the bytes moved; colour says
        the operation (legend at the bottom). Returns a ``matplotlib.figure.Figure`` built without
        pyplot, so it works on headless machines: ``trace.plot().savefig("ring.png")``.
        """
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

        phases = list(range(self.num_phases)) if phases is None else self._check_phases(phases)
        by_phase = self._events_by_phase()
        flows = [_flows(by_phase[p]) for p in phases]
        peak = max((b for flow in flows for b in flow.values()), default=1)
        ncols = max(1, min(columns, len(phases)))
        nrows = max(1, -(-len(phases) // ncols))
        fig = Figure(figsize=(panel_inches * ncols, panel_inches * nrows + 1.0), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        n = self.cluster_size
        centres = _circle(n)
        half = 0.2 if n <= 8 else 0.13
        for ax, phase, flow in zip(axes, phases, flows):
            for rank, (x, y) in enumerate(centres):
                ax.add_patch(
                    FancyBboxPatch(
                        (x - half, y - half), 2 * half, 2 * half, boxstyle="round,pad=0.02",
                        facecolor="whitesmoke", edgecolor="black", linewidth=1,
                    )
                )
                ax.text(x, y, str(rank), ha="center", va="center", fontsize=9 if n <= 8 else 7)
            crowding = min(1.0, 16 / max(1, len(flow))) ** 0.5  # thinner arrows when many
            for (src, dst, kind), nbytes in flow.items():
                start, end = _between_boxes(centres[src], centres[dst], 1.5 * half)
                ax.add_patch(
                    FancyArrowPatch(
                        start, end, arrowstyle="-|>", mutation_scale=9 * crowding,
                        connectionstyle="arc3,rad=0.15", shrinkA=0, shrinkB=0,
                        linewidth=(0.6 + 2.4 * nbytes / peak) * crowding, alpha=0.4 + 0.6 * crowding,
                        color=_ARROW_COLOURS[kind],
                    )
                )
            events = by_phase[phase]
            steps = list(dict.fromkeys(e.step for e in events if e.step))
            moved = sum(flow.values())
            ax.set_title(f"phase {phase}: {_summarise_steps(steps)}\n{moved} B over DSMEM", fontsize=9)
            ax.set_xlim(-1.45, 1.45)
            ax.set_ylim(-1.45, 1.45)
            ax.set_aspect("equal")
            ax.axis("off")
        for ax in axes[len(phases):]:
            ax.axis("off")
        used = sorted({kind for flow in flows for (_, _, kind) in flow}, key=list(_ARROW_COLOURS).index)
        if used:
            fig.legend(
                handles=[Line2D([], [], color=_ARROW_COLOURS[k], lw=2, label=k) for k in used],
                loc="outside lower center", ncols=len(used), fontsize=8, frameon=False,
            )
        if self.title:
            fig.suptitle(self.title, fontsize=10)
        return fig

    def _check_phases(self, phases) -> list[int]:
        """``phases`` as a list, or TypeError / ValueError naming it and the phases there are."""
        last = self.num_phases - 1
        wanted = f"a non-empty list of phase numbers in 0..{last}, such as [0] or range({self.num_phases})"
        if isinstance(phases, (str, bytes)) or not hasattr(phases, "__iter__"):
            raise TypeError(f"phases must be {wanted}; got {phases!r}")
        phases = list(phases)
        if not phases:
            raise ValueError(f"phases must be {wanted}; got []")
        for p in phases:
            if not isinstance(p, (int, np.integer)) or isinstance(p, bool):
                raise TypeError(f"phases must be {wanted}; got {p!r} among them")
            if not 0 <= p <= last:
                raise ValueError(f"phases must lie in 0..{last}; got {p}")
        return [int(p) for p in phases]

    def _events_by_phase(self) -> list[list[TraceEvent]]:
        grouped: list[list[TraceEvent]] = [[] for _ in range(self.num_phases)]
        for e in self.events:
            grouped[e.phase].append(e)
        return grouped


def _is_traffic(e: TraceEvent) -> bool:
    """A DSMEM operation between two blocks (see the module docstring)."""
    return e.kind in DSMEM_KINDS and e.src != e.dst


def _flows(events) -> dict[tuple[int, int, str], int]:
    """Bytes per (src, dst, kind) over the DSMEM events of one phase between two blocks."""
    flow: dict[tuple[int, int, str], int] = {}
    for e in events:
        if _is_traffic(e):
            key = (e.src, e.dst, e.kind)
            flow[key] = flow.get(key, 0) + e.nbytes
    return flow


def _circle(n: int) -> list[tuple[float, float]]:
    """Box centres: rank 0 at the top, ranks clockwise around a unit circle."""
    if n == 1:
        return [(0.0, 0.0)]
    angles = np.pi / 2 - 2 * np.pi * np.arange(n) / n
    return [(float(np.cos(a)), float(np.sin(a))) for a in angles]


def _between_boxes(a, b, gap: float):
    """The segment from box centre ``a`` to box centre ``b``, cut back by ``gap`` at both ends."""
    a, b = np.asarray(a), np.asarray(b)
    unit = (b - a) / np.linalg.norm(b - a)
    return tuple(a + gap * unit), tuple(b - gap * unit)


def _summarise_steps(steps: list[str]) -> str:
    if len(steps) <= 2:
        return ", ".join(steps)
    return f"{steps[0]} ... {steps[-1]} ({len(steps)} steps)"


def _count_kinds(events, *, with_bytes: bool) -> str:
    """'16 ld.shared::cluster (4096 B), 16 st.shared (4096 B)': count (and bytes) per kind.

    Cluster-barrier kinds lose their ``barrier.cluster.`` prefix ('16 arrive.release').
    """
    counts: dict[str, list[int]] = {}
    for e in events:
        entry = counts.setdefault(e.kind, [0, 0])
        entry[0] += 1
        entry[1] += e.nbytes
    parts = []
    for kind, (count, nbytes) in counts.items():
        kind = kind.removeprefix("barrier.cluster.")
        parts.append(f"{count} {kind} ({nbytes} B)" if with_bytes and nbytes else f"{count} {kind}")
    return ", ".join(parts)
