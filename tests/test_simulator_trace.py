"""Traces: the traffic matrices, the phase table and the pictures match what the algorithms do."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from clusterlab import simulator as sim


def rows(size, n, dtype=np.float32):
    x = np.random.default_rng(size * 100 + n).standard_normal((size, n)).astype(dtype)
    x[x == 0] = 1
    return x


def cluster_barriers(trace) -> int:
    return sum(1 for e in trace.events if e.kind == "barrier.cluster.wait.acquire" and e.block == 0)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 12, 16])
def test_barrier_counts_per_algorithm_are_the_documented_ones(size):
    power = 1 << (size.bit_length() - 1)
    folded = 2 if size > power else 0
    expected = {
        ("reduce", "direct"): 2,
        ("reduce", "ring"): 2 * size - 1,
        ("reduce", "butterfly"): 1 + folded + power.bit_length() - 1,
        ("reduce", "bulk"): 2,
        ("gather", "direct"): 2,
        ("gather", "ring"): size,
        ("gather", "bulk"): 2,
    }
    x = rows(size, 6)
    for (primitive, algorithm), count in expected.items():
        run = sim.cluster_reduce if primitive == "reduce" else sim.cluster_gather
        _, trace = run(x, algorithm=algorithm)
        assert cluster_barriers(trace) == count, (primitive, algorithm)


@pytest.mark.parametrize("size, n", [(4, 8), (5, 3), (16, 37)])
def test_ring_reduce_traffic_is_left_neighbour_only_and_sized_by_chunks(size, n):
    _, trace = sim.cluster_reduce(rows(size, n), "sum", "ring")
    traffic = trace.traffic()
    assert traffic.total.shape == (size, size)
    assert traffic.per_phase.shape == (2 * size, size, size)
    assert (traffic.per_phase.sum(axis=0) == traffic.total).all()
    chunk = [(c + 1) * n // size - c * n // size for c in range(size)]
    expected = np.zeros((size, size), dtype=np.int64)
    for r in range(size):
        expected[(r - 1) % size, r] = 4 * (2 * n - chunk[r] - chunk[(r + 1) % size])
    assert (traffic.total == expected).all()
    assert traffic.per_phase[0].sum() == 0  # staging is local


@pytest.mark.parametrize("dtype, row_bytes, slot_bytes", [
    ("float32", 40, 48),  # 40 B rows in 48 B slots
    ("int32", 40, 48),  # int32 accumulates in int32
    ("float16", 40, 48),  # staged widened to float32
    ("float64", 80, 80),
])
def test_direct_and_bulk_traffic_is_all_to_all(dtype, row_bytes, slot_bytes):
    """Every block pulls (or is sent) every peer's staged row, in the accumulation dtype."""
    size, n = 6, 10
    x = rows(size, n, sim.numpy_dtype(dtype))
    _, direct = sim.cluster_reduce(x, "sum", "direct")
    _, bulk = sim.cluster_reduce(x, "sum", "bulk")
    off_diagonal = 1 - np.eye(size, dtype=np.int64)
    assert (direct.traffic().total == row_bytes * off_diagonal).all()
    assert (bulk.traffic().total == slot_bytes * off_diagonal).all()
    assert {e.kind for e in bulk.events if e.kind in sim.DSMEM_KINDS} == {"cp.async.bulk"}


def test_a_remote_atomic_add_is_dsmem_traffic_from_the_adding_block_to_the_owner():
    """``red.shared::cluster.add`` moves its operands over DSMEM, as a store does: block 1's add into
    block 0 counts, block 0's add into its own memory (through the cluster window too) does not."""
    values = np.random.default_rng().integers(1, 100, size=(2, 4), dtype=np.int32)

    def program(b):
        total = b.shared_array("total", (4,), np.int32)
        total[:] = 0
        yield b.cluster_sync()
        b.map_shared(total, 0).atomic_add(slice(None), values[b.cluster_rank])  # block 0's is local
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            assert (total[:] == values.sum(axis=0)).all()
        yield b.cluster_sync()

    trace = sim.launch(program, 2)
    assert trace.traffic().total.tolist() == [[0, 0], [16, 0]]  # [src, dst]: block 1 into block 0
    assert "total: 16 DSMEM bytes" in trace.phase_table()


def test_a_block_reading_its_own_shared_memory_through_the_cluster_window_moves_no_dsmem_bytes():
    """An exchange whose lanes pull from every rank, the block's own included: the own rank's loads
    are events (ld.shared::cluster) but not traffic, in the matrices, the table and the picture."""
    size, n = 4, 6
    x = rows(size, n)

    def program(b):
        part = b.shared_array("part", (n,), np.float32)
        part[:] = x[b.cluster_rank]
        yield b.cluster_sync()
        got = sum(b.map_shared(part, r)[:] for r in range(size))  # rank b.cluster_rank too
        yield b.cluster_sync()
        np.testing.assert_allclose(got, x.sum(axis=0), rtol=1e-6)

    trace = sim.launch(program, size)
    own = [e for e in trace.events if e.kind == "ld.shared::cluster" and e.src == e.dst]
    assert len(own) == size and all(e.nbytes == 4 * n for e in own)
    off_diagonal = 1 - np.eye(size, dtype=np.int64)
    assert (trace.traffic().total == 4 * n * off_diagonal).all()
    assert f"total: {4 * n * size * (size - 1)} DSMEM bytes" in trace.phase_table()
    arrows = [p for p in trace.plot().axes[1].patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == size * (size - 1)


def test_butterfly_traffic_pairs_partners_per_phase():
    _, trace = sim.cluster_reduce(rows(6, 4), "sum", "butterfly")  # P = 4: fold, masks 1 and 2, unfold
    per_phase = trace.traffic().per_phase
    pairs = [sorted(zip(*np.nonzero(per_phase[p]))) for p in range(per_phase.shape[0])]
    assert pairs[1] == [(4, 0), (5, 1)]
    assert pairs[2] == [(0, 1), (1, 0), (2, 3), (3, 2)]
    assert pairs[3] == [(0, 2), (1, 3), (2, 0), (3, 1)]
    assert pairs[4] == [(0, 4), (1, 5)]


def test_every_event_names_a_phase_kind_and_blocks():
    _, trace = sim.cluster_gather(rows(3, 4), "ring")
    for event in trace.events:
        assert 0 <= event.phase < trace.num_phases
        assert 0 <= event.src < 3 and 0 <= event.dst < 3
    loads = [e for e in trace.events if e.kind == "ld.shared::cluster"]
    assert all(e.src == (e.dst - 1) % 3 and e.nbytes == 16 for e in loads)


def test_phase_table_has_a_row_per_phase_with_steps_bytes_and_barriers():
    _, trace = sim.cluster_reduce(rows(4, 8), "sum", "ring")
    table = trace.phase_table()
    lines = table.splitlines()
    assert lines[0] == trace.title
    assert lines[1].split() == ["phase", "step", "DSMEM", "bytes", "barriers", "operations"]
    body = lines[3:-1]
    assert len(body) == trace.num_phases == 8
    assert body[1].split()[:4] == ["1", "reduce-scatter", "0", "32"]
    assert "4 arrive.release, 4 wait.acquire" in body[1]
    assert "4 ld.shared::cluster (32 B)" in body[1]
    assert "all-gather 2" in body[6]
    assert lines[-1] == "total: 192 DSMEM bytes in 8 phases, 7 cluster barriers (counted on block 0)"


def test_phase_table_lists_mbarrier_work_of_the_bulk_algorithm():
    _, trace = sim.cluster_reduce(rows(3, 4), "max", "bulk")
    push = trace.phase_table().splitlines()[4]
    assert "6 cp.async.bulk (96 B)" in push
    assert "3 mbarrier.complete" in push


def test_plot_draws_one_panel_per_phase_with_one_arrow_per_transfer(tmp_path):
    _, trace = sim.cluster_reduce(rows(4, 8), "sum", "ring")
    fig = trace.plot()
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == trace.num_phases
    arrows = [sum(isinstance(p, FancyArrowPatch) for p in ax.patches) for ax in panels]
    assert arrows == [0] + [4] * 6 + [0]
    assert panels[1].get_title() == "phase 1: reduce-scatter 0\n32 B over DSMEM"
    path = tmp_path / "ring.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_selects_phases_and_rejects_unknown_ones():
    _, trace = sim.cluster_gather(rows(5, 2), "direct")
    fig = trace.plot(phases=[1])
    (panel,) = [ax for ax in fig.axes if ax.get_title()]
    assert sum(isinstance(p, FancyArrowPatch) for p in panel.patches) == 5 * 4
    with pytest.raises(ValueError, match="phases must lie in 0..2; got 7"):
        trace.plot(phases=[7])
