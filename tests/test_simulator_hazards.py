"""Every hazard the simulator reports, each proven by a program with one planted bug.

Each test asserts the exception type and its fields: the blocks involved, whose shared memory
and which bytes, and the program points (block, phase, step, operation, source line) in
conflict. The last section runs correct programs that use the same features and must raise
nothing.
"""

import numpy as np
import pytest

from clusterlab import simulator as sim

F32 = np.float32


def this_line(offset: int) -> str:
    """'test_simulator_hazards.py:<line of the caller + offset>' for matching ProgramPoint.line."""
    import sys

    return f"test_simulator_hazards.py:{sys._getframe(1).f_lineno + offset}"


def missing_proxy_fence(program, blocks: int, fenced: bool):
    """Launch ``program`` on ``blocks`` blocks: clean where ``fenced`` (returns None), else the
    :class:`~clusterlab.simulator.MissingProxyFence` it must raise."""
    if fenced:
        sim.launch(program, blocks)
        return None
    with pytest.raises(sim.MissingProxyFence) as info:
        sim.launch(program, blocks)
    return info.value


# ---------------------------------------------------------------------------------- data races


def test_read_of_peer_before_any_barrier_races_with_the_peers_store():
    lines = {}

    def program(b):
        rows = b.shared_array("rows", (4,), F32)
        b.step("stage")
        rows[:] = b.cluster_rank
        lines["store"] = this_line(-1)
        b.map_shared(rows, (b.cluster_rank + 1) % b.cluster_size)[:]  # bug: no barrier before
        lines["load"] = this_line(-1)
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.kind == "data race"
    assert race.conflict == "write after read"
    assert race.blocks == (0, 1)
    assert race.owner == 1
    assert race.byte_range == (0, 16)
    first, then = race.points
    assert (first.block, first.phase, first.step, first.line) == (0, 0, "stage", lines["load"])
    assert first.op.startswith("ld.shared::cluster rows[:]")
    assert (then.block, then.phase, then.step, then.line) == (1, 0, "stage", lines["store"])
    assert then.op.startswith("st.shared rows[:]")


def test_relaxed_arrive_does_not_publish_the_stores_before_it():
    def program(b):
        rows = b.shared_array("rows", (8,), F32)
        rows[:] = np.arange(8, dtype=F32) + b.cluster_rank
        b.cluster_arrive_relaxed()  # bug: relaxed, the store is not released
        yield b.cluster_wait_acquire()
        b.step("read peer")
        b.map_shared(rows, 1 - b.cluster_rank)[2:6]
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.conflict == "read after write"
    assert race.blocks == (1, 0)
    assert race.owner == 1
    assert race.byte_range == (8, 24)  # elements 2..5 of float32
    assert [p.phase for p in race.points] == [0, 1]
    assert race.points[1].step == "read peer"


@pytest.mark.parametrize("reads_the_late_store", [False, True])
def test_a_fence_then_a_relaxed_arrive_publishes_what_came_before_the_fence(reads_the_late_store):
    """PTX's split barrier: ``fence.acq_rel.cluster``, work, ``barrier.cluster.arrive.relaxed``. The
    arrive publishes the stores before the fence; a store between the fence and the arrive it does not."""

    def program(b):
        rows = b.shared_array("rows", (8,), F32)
        late = b.shared_array("late", (4,), F32)
        rows[:] = np.arange(8, dtype=F32) + b.cluster_rank
        b.fence_acq_rel_cluster()
        late[:] = b.cluster_rank  # after the fence: not published by the relaxed arrive
        b.cluster_arrive_relaxed()
        yield b.cluster_wait_acquire()
        b.step("read peer")
        peer = 1 - b.cluster_rank
        assert (b.map_shared(rows, peer)[:] == np.arange(8, dtype=F32) + peer).all()
        if reads_the_late_store:
            b.map_shared(late, peer)[:]  # bug: the store after the fence is not ordered before this
        yield b.cluster_sync()

    if not reads_the_late_store:
        sim.launch(program, 2)
        return
    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.conflict == "read after write" and race.byte_range == (32, 48)  # 'late' follows rows f32[8]
    assert race.points[1].step == "read peer"

def test_release_arrive_with_acquire_wait_orders_the_same_program():
    def program(b):
        rows = b.shared_array("rows", (8,), F32)
        rows[:] = np.arange(8, dtype=F32) + b.cluster_rank
        b.cluster_arrive_release()
        yield b.cluster_wait_acquire()
        b.map_shared(rows, 1 - b.cluster_rank)[2:6]
        yield b.cluster_sync()

    sim.launch(program, 2)


def test_single_buffered_ring_races_where_double_buffering_does_not():
    """A ring step that overwrites the buffer the right neighbour is still reading."""

    def ring(b, buffers):
        size, rank = b.cluster_size, b.cluster_rank
        partial = b.shared_array("partial", (2, 4), F32)
        partial[0] = rank
        yield b.cluster_sync()
        for s in range(3):
            b.step(f"step {s}")
            got = b.map_shared(partial, (rank - 1) % size)[s % buffers]
            partial[(s + 1) % buffers] = got + rank
            yield b.cluster_sync()

    sim.launch(ring, 4, 2)
    with pytest.raises(sim.DataRace) as info:
        sim.launch(ring, 4, 1)
    race = info.value
    # Block 0 overwrites its only buffer in step 0 while block 1 loads it in the same step.
    assert race.conflict == "read after write"
    assert race.blocks == (0, 1)
    assert race.owner == 0
    assert race.byte_range == (0, 16)
    assert [p.step for p in race.points] == ["step 0", "step 0"]


@pytest.mark.parametrize("through_view", [False, True])
def test_reading_bulk_copied_bytes_before_the_mbarrier_wait_races_with_the_copy(through_view):
    """Also where the copy writes a view and the early read goes through its storage."""

    def program(b):
        if through_view:
            read = b.shared_array("region", (2, 4), F32)
            rows = b.shared_view("rows", read, (2, 4), F32)
        else:
            read = rows = b.shared_array("rows", (2, 4), F32)
        full = b.shared_mbarrier("full")
        rows[b.cluster_rank] = b.cluster_rank + 1
        b.mbarrier_init(full, 1)
        b.fence_proxy_async()
        yield b.cluster_sync()
        peer = 1 - b.cluster_rank
        b.mbarrier_arrive_expect_tx(full, 16)
        b.step("push")
        mine = b.cluster_rank
        b.bulk_copy(b.map_shared(rows, peer).at[mine], rows.at[mine], b.map_shared(full, peer))
        if b.cluster_rank == 1:
            b.step("early read")
            read[peer]  # bug: before mbarrier_wait
        yield b.mbarrier_wait(full, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.conflict == "read after write"
    assert race.blocks == (0, 1)  # the copy was issued by block 0
    assert race.owner == 1
    assert race.byte_range == (0, 16)
    assert race.points[0].op.startswith("cp.async.bulk rows[0] @block 1")
    assert race.points[1].step == "early read"
    assert "asynchronous copy" in str(race)
    assert ("of 'rows', which shares those bytes," in str(race)) == through_view


def staged_rows(b, width: int = 4):
    """Each block stores its row of ``rows`` float32[2, width] and initializes the mbarrier ``full``
    (count 1) with a proxy fence, then all meet at a cluster barrier: bulk copies between them may
    start. In a program: ``rows, full = yield from staged_rows(b)``."""
    rows = b.shared_array("rows", (2, width), F32)
    full = b.shared_mbarrier("full")
    rows[b.cluster_rank] = 1.0
    b.mbarrier_init(full, 1)
    b.fence_proxy_async()
    yield b.cluster_sync()
    return rows, full


def test_overwriting_a_bulk_copy_source_before_it_is_known_complete_races():
    def program(b):
        rows, full = yield from staged_rows(b)
        peer = 1 - b.cluster_rank
        b.mbarrier_arrive_expect_tx(full, 16)
        mine = b.cluster_rank
        b.bulk_copy(b.map_shared(rows, peer).at[mine], rows.at[mine], b.map_shared(full, peer))
        b.step("reuse source")
        rows[b.cluster_rank] = 2.0  # bug: the peer's copy may still be reading it
        yield b.mbarrier_wait(full, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.conflict == "write after read"
    assert race.blocks == (0, 1)  # block 0's copy into block 1, then block 0's store
    assert race.owner == 0
    assert race.byte_range == (0, 16)
    assert race.points[0].op.startswith("cp.async.bulk")
    assert race.points[1].step == "reuse source"


@pytest.mark.parametrize("waits_first", [False, True])
def test_forwarding_bytes_a_copy_is_still_writing_races_with_that_copy(waits_first):
    """Block 0 bulk-copies a row into block 1's ``buf``, and block 1 bulk-copies ``buf`` on to
    block 2: the second copy reads what the first writes, so block 1 must observe the first copy's
    mbarrier phase complete before it issues the second."""

    def program(b):
        buf = b.shared_array("buf", (4,), F32)
        out = b.shared_array("out", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        buf[:] = b.cluster_rank + 1
        b.fence_proxy_async()
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.step("send")
            b.bulk_copy(b.map_shared(buf, 1).at[:], buf.at[:], b.map_shared(bar, 1))
        elif b.cluster_rank == 1:
            b.mbarrier_arrive_expect_tx(bar, 16)
            if waits_first:
                yield b.mbarrier_wait(bar, 0)
            b.step("forward")
            b.bulk_copy(b.map_shared(out, 2).at[:], buf.at[:], b.map_shared(bar, 2))  # bug unless waits_first
            if not waits_first:
                yield b.mbarrier_wait(bar, 0)
        else:
            b.mbarrier_arrive_expect_tx(bar, 16)
            yield b.mbarrier_wait(bar, 0)
            assert (out[:] == 1).all()
        yield b.cluster_sync()

    if waits_first:
        sim.launch(program, 3)
        return
    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 3)
    race = info.value
    assert race.conflict == "read after write"
    assert race.blocks == (0, 1)
    assert race.owner == 1
    assert race.byte_range == (0, 16)
    sent, forwarded = race.points
    assert (sent.block, sent.step) == (0, "send") and sent.op.startswith("cp.async.bulk buf[:] @block 1")
    assert (forwarded.block, forwarded.step) == (1, "forward")
    assert forwarded.op.startswith("cp.async.bulk out[:] @block 2 <- buf[:]")
    assert "an asynchronous copy into block 1 by block 0" in str(race)


def test_peer_using_an_mbarrier_before_its_init_is_ordered_races():
    def program(b):
        slot = b.shared_array("slot", (4,), F32)
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        if b.cluster_rank == 1:  # bug: no cluster barrier between the peer's init and this
            b.st_async(b.map_shared(slot, 0).at[:], np.ones(4, F32), b.map_shared(full, 0))
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.mbarrier_arrive_expect_tx(full, 16)
            yield b.mbarrier_wait(full, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.conflict == "mbarrier use after init"
    assert race.blocks == (0, 1)
    assert race.owner == 0
    assert race.byte_range == (16, 24)  # 'full' sits after the 16-byte 'slot'
    assert race.points[0].op.startswith("mbarrier.init")
    assert race.points[1].op.startswith("st.async")


def test_atomic_adds_from_many_blocks_do_not_race_but_a_plain_read_does():
    def program(b, read_early):
        total = b.shared_array("total", (4,), np.int32)
        if b.cluster_rank == 0:
            total[:] = 0
        yield b.cluster_sync()
        b.map_shared(total, 0).atomic_add(slice(None), np.full(4, b.cluster_rank + 1, np.int32))
        if read_early and b.cluster_rank == 2:
            b.map_shared(total, 0)[1]  # bug: other blocks' atomics are not ordered yet
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            assert (total[:] == 1 + 2 + 3).all()
        yield b.cluster_sync()

    sim.launch(program, 3, False)
    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 3, True)
    assert info.value.conflict == "read after atomic"
    assert info.value.blocks == (0, 2)  # block 0's own add is the first unordered one
    assert info.value.owner == 0
    assert info.value.byte_range == (4, 8)


@pytest.mark.parametrize("access", ["store", "load"])
@pytest.mark.parametrize("plain_first", [True, False], ids=["plain-first", "atomic-first"])
def test_a_peers_atomic_add_races_with_an_unordered_plain_store_or_load(access, plain_first):
    """Atomics are atomic only with atomics: an owner's own ``st.shared`` or ``ld.shared`` of the
    words a peer adds into with ``red.shared::cluster``, no barrier between them, races whichever
    of the two the scheduler runs first (``plain_first``: the owner is block 0 and runs first)."""
    owner = 0 if plain_first else 1

    def program(b):
        total = b.shared_array("total", (4,), np.int32)
        total[:] = 0
        yield b.cluster_sync()
        if b.cluster_rank == owner:
            b.step("plain")
            if access == "store":
                total[:] = 5  # bug: unordered with the peer's add
            else:
                total[:]  # bug: likewise
        else:
            b.step("add")
            b.map_shared(total, owner).atomic_add(slice(None), np.full(4, 3, np.int32))
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    plain = {"store": "write", "load": "read"}[access]
    assert race.conflict == (f"atomic after {plain}" if plain_first else f"{plain} after atomic")
    assert race.blocks == (0, 1)
    assert race.owner == owner
    assert race.byte_range == (0, 16)
    plain_op = {"store": "st.shared total[:]", "load": "ld.shared total[:]"}[access]
    add_op = f"red.shared::cluster.add total[:] @block {owner}"
    plain_point, add_point = race.points if plain_first else race.points[::-1]
    assert (plain_point.step, add_point.step) == ("plain", "add")
    assert plain_point.op.startswith(plain_op) and add_point.op.startswith(add_op)


@pytest.mark.parametrize("first_read, then_read, written", [
    (slice(4, 8), slice(0, 4), slice(4, 8)),  # the window grows down over bytes 0..16
    (slice(0, 4), slice(4, 8), slice(0, 4)),  # the window grows up over bytes 16..32
], ids=["grows-down", "grows-up"])
def test_a_read_still_races_after_the_same_block_reads_more_of_the_array(first_read, then_read, written):
    """Block 1 reads half of block 0's ``rows``, then the other half; block 0 then overwrites the first
    half, ordered after neither read (it waits on a signal of block 2, which knows nothing of them).
    The second read widens what block 1 is known to have read; the first read must stay on record."""

    def program(b):
        rows = b.shared_array("rows", (8,), F32)
        tick = b.shared_mbarrier("tick")
        rows[:] = 1.0
        b.mbarrier_init(tick, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            yield b.mbarrier_wait(tick, 0)  # runs after block 1's reads, but is not ordered after them
            b.step("overwrite")
            rows[written] = 2.0  # bug: block 1 may still be reading these bytes
        elif b.cluster_rank == 1:
            b.step("read")
            peer = b.map_shared(rows, 0)
            peer[first_read]
            peer[then_read]
        else:
            b.mbarrier_arrive(b.map_shared(tick, 0))
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 3)
    race = info.value
    assert race.conflict == "write after read"
    assert race.blocks == (1, 0)
    assert race.owner == 0
    assert race.byte_range == (4 * written.start, 4 * written.stop)
    read, write = race.points
    assert (read.block, read.step) == (1, "read")
    assert read.op.startswith(f"ld.shared::cluster rows[{written.start}:{written.stop}] @block 0")
    assert (write.block, write.step) == (0, "overwrite")


# ------------------------------------------------------------------------ bounds and ranks


def test_local_slice_past_the_end_is_out_of_bounds_not_clipped():
    lines = {}

    def program(b):
        rows = b.shared_array("pad", (4,), F32)
        rows = b.shared_array("rows", (6,), F32)
        lines["declare"] = this_line(-1)
        b.step("stage")
        lines["store"] = this_line(1)
        rows[2:8] = 1.0  # bug: 6 elements
        yield b.cluster_sync()

    with pytest.raises(sim.OutOfBounds) as info:
        sim.launch(program, 1)
    oob = info.value
    assert type(oob) is sim.OutOfBounds
    assert oob.kind == "out of bounds"
    assert oob.blocks == (0,)
    assert oob.owner == 0
    assert oob.byte_range == (16 + 8, 16 + 32)  # 'rows' starts at 16; elements 2..7
    declared, store = oob.points
    assert declared.op.startswith("declare shared array 'rows'") and declared.line == lines["declare"]
    assert (store.step, store.line) == ("stage", lines["store"])


@pytest.mark.parametrize("key, span, byte_range", [
    (slice(2, 7), "2..6", (8, 28)),
    (slice(-2, 4), "-2..3", (-8, 16)),
    (np.array([1, 6]), "1..6", (4, 28)),
], ids=["stop-one-past-the-end", "negative-start", "index-array-one-past-the-end"])
def test_an_index_one_element_outside_the_array_is_out_of_bounds(key, span, byte_range):
    """The edges of the check: a slice whose stop is one past the extent, a slice with a negative
    start (not counted from the end) and an index array reaching the extent are all OutOfBounds,
    with the bytes they would touch, not an IndexError or a clipped or wrapped access."""

    def program(b):
        rows = b.shared_array("rows", (6,), F32)
        b.step("stage")
        rows[key] = 1.0
        yield b.cluster_sync()

    with pytest.raises(sim.OutOfBounds) as info:
        sim.launch(program, 1)
    oob = info.value
    assert type(oob) is sim.OutOfBounds
    assert oob.blocks == (0,) and oob.owner == 0
    assert oob.byte_range == byte_range
    assert f"with {span} along axis 0, whose extent is 6" in str(oob)
    declared, store = oob.points
    assert declared.op.startswith("declare shared array 'rows'")
    assert store.step == "stage" and store.op.startswith("st.shared rows[")


def test_remote_index_past_the_end_is_out_of_bounds_in_the_owner():
    def program(b):
        rows = b.shared_array("rows", (2, 3), F32)
        rows[:] = 0.0
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.map_shared(rows, 2)[2, 0]  # bug: rows has 2 rows
        yield b.cluster_sync()

    with pytest.raises(sim.OutOfBounds) as info:
        sim.launch(program, 3)
    oob = info.value
    assert oob.blocks == (0, 2)
    assert oob.owner == 2
    assert oob.byte_range == (24, 28)
    assert oob.points[1].op.startswith("ld.shared::cluster rows[2, 0] @block 2")


def test_negative_index_is_out_of_bounds_not_wrapped():
    def program(b):
        rows = b.shared_array("rows", (4,), F32)
        rows[-1] = 1.0
        yield b.cluster_sync()

    with pytest.raises(sim.OutOfBounds) as info:
        sim.launch(program, 1)
    assert info.value.byte_range == (-4, 0)


def test_allocation_past_the_shared_memory_window_is_out_of_bounds():
    def program(b):
        b.shared_array("big", (300,), F32)
        yield b.cluster_sync()

    with pytest.raises(sim.OutOfBounds) as info:
        sim.launch(program, 1, smem_bytes=1024)
    assert info.value.byte_range == (0, 1200)
    assert "exhausted" in str(info.value)


@pytest.mark.parametrize("rank", [-1, 4])
def test_mapping_a_rank_outside_the_cluster_is_an_invalid_rank(rank):
    def program(b):
        rows = b.shared_array("rows", (4,), F32)
        yield b.cluster_sync()
        if b.cluster_rank == 3:
            b.step("map")
            b.map_shared(rows, rank)
        yield b.cluster_sync()

    with pytest.raises(sim.InvalidRank) as info:
        sim.launch(program, 4)
    bad = info.value
    assert isinstance(bad, sim.OutOfBounds)
    assert bad.kind == "invalid rank"
    assert bad.blocks == (3,)
    assert bad.owner == rank
    assert bad.byte_range == (0, 16)
    assert bad.points[0].op == f"mapa rows -> block {rank}"
    assert bad.points[0].step == "map"


# ------------------------------------------------------------------------------- deadlocks


def test_wait_without_arrive_is_a_deadlock_naming_who_never_arrived():
    def program(b):
        b.shared_array("rows", (4,), F32)
        if b.cluster_rank == 2:
            yield b.cluster_wait_acquire()  # bug: never arrived
        else:
            yield b.cluster_sync()

    with pytest.raises(sim.BarrierDeadlock) as info:
        sim.launch(program, 4)
    dead = info.value
    assert dead.kind == "deadlock"
    assert dead.never_arrived == (2,)
    assert dead.blocks == (0, 1, 2, 3)
    assert dead.waits == {r: "cluster barrier phase 0" for r in range(4)}
    assert dead.owner is None and dead.byte_range is None
    assert dead.points[0].block == 0
    assert dead.points[1].block == 2
    assert dead.points[1].op == "barrier.cluster.wait.acquire phase 0"


def test_rank_dependent_barrier_with_an_mbarrier_handshake_deadlocks():
    """Block 0 skips the barrier and waits for data that block 1 sends only after it."""

    def program(b):
        b.shared_array("slot", (4,), F32)
        ready = b.shared_mbarrier("ready")
        b.mbarrier_init(ready, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.step("consume")
            yield b.mbarrier_wait(ready, 0)  # bug: block 0 never reaches the barrier below
        else:
            b.step("produce")
            yield b.cluster_sync()
            b.mbarrier_arrive(b.map_shared(ready, 0))
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierDeadlock) as info:
        sim.launch(program, 2)
    dead = info.value
    assert type(dead) is sim.BarrierDeadlock  # not PhaseNeverCompletes: block 1 could still arrive
    assert dead.never_arrived == (0,)
    assert dead.waits == {0: "mbarrier 'ready'@block 0 phase parity 0", 1: "cluster barrier phase 1"}
    assert dead.owner == 0 and dead.byte_range == (16, 24)
    assert [p.step for p in dead.points] == ["consume", "produce"]


# ----------------------------------------------------------------------------- block exit


@pytest.mark.parametrize("access, op, mode", [
    ("load", "ld.shared::cluster", "read"),
    ("atomic_add", "red.shared::cluster.add", "atomic"),
])
def test_block_that_skips_the_final_barrier_exits_under_a_peers_access(access, op, mode):
    """A peer's load from, or ``red.shared::cluster`` add into, the block's memory, which nothing
    orders before the block's exit."""

    def program(b):
        rows = b.shared_array("rows", (4,), F32)
        rows[:] = b.cluster_rank
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.step("use peer")
            peer = b.map_shared(rows, 1)
            if access == "load":
                peer[:]
            else:
                peer.atomic_add(slice(None), np.full(4, 2.0, F32))
            yield b.cluster_sync()
        # bug: block 1 returns at once, while block 0 may still be using its rows

    with pytest.raises(sim.ExitedBlockAccess) as info:
        sim.launch(program, 2)
    gone = info.value
    assert gone.kind == "exited block access"
    assert gone.blocks == (0, 1)
    assert gone.owner == 1
    assert gone.byte_range == (0, 16)
    used, exit_point = gone.points
    assert (used.block, used.step) == (0, "use peer") and used.op.startswith(f"{op} rows[:] @block 1")
    assert (exit_point.block, exit_point.op) == (1, "exit")
    assert f"block 1 exits while the {mode} of its 'rows' by block 0 is not ordered before the exit" in str(gone)


def test_access_after_the_owner_exited_is_reported_with_the_exit_point():
    def program(b):
        rows = b.shared_array("rows", (4,), F32)
        rows[:] = b.cluster_rank
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            b.step("late read")
            b.map_shared(rows, 0)[:]  # block 0 has already returned
            yield b.cluster_sync()

    with pytest.raises(sim.ExitedBlockAccess) as info:
        sim.launch(program, 2)
    gone = info.value
    assert gone.blocks == (0, 1)
    assert gone.owner == 0
    assert gone.byte_range == (0, 16)
    assert (gone.points[0].block, gone.points[0].op) == (0, "exit")
    assert gone.points[1].step == "late read"


def test_receiver_exiting_before_its_incoming_copy_is_complete():
    def program(b):
        rows, full = yield from staged_rows(b)
        if b.cluster_rank == 0:
            b.bulk_copy(b.map_shared(rows, 1).at[0], rows.at[0], b.map_shared(full, 1))
            yield b.cluster_sync()
        # bug: block 1 neither waits on 'full' nor on the final barrier

    with pytest.raises(sim.ExitedBlockAccess) as info:
        sim.launch(program, 2)
    gone = info.value
    assert gone.blocks == (0, 1)
    assert gone.owner == 1
    assert gone.byte_range == (0, 16)
    assert gone.points[0].op.startswith("cp.async.bulk")


@pytest.mark.parametrize("owner", [0, 1])
def test_a_peers_mbarrier_arrival_not_ordered_before_the_owners_exit(owner):
    """Whichever block runs first, the arrival may reach the mbarrier after its block exited."""
    lines = {}

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        yield b.cluster_sync()
        if b.cluster_rank != owner:
            lines["arrive"] = this_line(1)
            b.mbarrier_arrive(b.map_shared(bar, owner))  # bug: nobody waits, and both return

    with pytest.raises(sim.ExitedBlockAccess) as info:
        sim.launch(program, 2)
    gone = info.value
    assert gone.owner == owner
    assert gone.byte_range == (0, 8)
    assert set(gone.blocks) == {0, 1}
    arrive = next(p for p in gone.points if p.op.startswith("mbarrier.arrive"))
    assert (arrive.block, arrive.line) == (1 - owner, lines["arrive"])
    assert any(p.op == "exit" and p.block == owner for p in gone.points)


# -------------------------------------------------------------------- mbarrier transactions


def push_program(b, expect_extra_bytes):
    """Each block bulk-copies its 16-byte row to its right neighbour."""
    size, rank = b.cluster_size, b.cluster_rank
    rows = b.shared_array("rows", (size, 4), F32)
    full = b.shared_mbarrier("full")
    rows[rank] = rank
    b.mbarrier_init(full, 1)
    b.fence_proxy_async()
    yield b.cluster_sync()
    b.step("push")
    right = (rank + 1) % size
    if rank != 1:
        b.bulk_copy(b.map_shared(rows, right).at[rank], rows.at[rank], b.map_shared(full, right))
    b.mbarrier_arrive_expect_tx(full, 16 + expect_extra_bytes)
    yield b.mbarrier_wait(full, 0)
    yield b.cluster_sync()


def test_push_ring_with_matching_transaction_bytes_runs_clean():
    def program(b):
        size, rank = b.cluster_size, b.cluster_rank
        rows = b.shared_array("rows", (size, 4), F32)
        full = b.shared_mbarrier("full")
        rows[rank] = rank
        b.mbarrier_init(full, 1)
        b.fence_proxy_async()
        yield b.cluster_sync()
        right = (rank + 1) % size
        b.bulk_copy(b.map_shared(rows, right).at[rank], rows.at[rank], b.map_shared(full, right))
        b.mbarrier_arrive_expect_tx(full, 16)
        yield b.mbarrier_wait(full, 0)
        assert (rows[(rank - 1) % size] == (rank - 1) % size).all()
        yield b.cluster_sync()

    sim.launch(program, 3)


def test_too_few_bytes_delivered_is_a_transaction_mismatch_not_a_hang():
    # Block 1 never sends (the planted bug), so block 2 waits for 16 bytes that never come.
    with pytest.raises(sim.TransactionMismatch) as info:
        sim.launch(push_program, 3, 0)
    bad = info.value
    assert bad.kind == "transaction mismatch"
    assert (bad.expected_bytes, bad.delivered_bytes) == (16, 0)
    assert bad.blocks == (2,)
    assert bad.owner == 2
    assert bad.byte_range == (48, 56)  # 'full' follows rows f32[3, 4]
    expect, wait = bad.points
    assert expect.op.startswith("mbarrier.arrive.expect_tx 'full'@block 2 tx 16 B")
    assert wait.op.startswith("mbarrier.try_wait.parity 'full'@block 2")


def test_more_bytes_delivered_than_expected_is_a_transaction_mismatch():
    with pytest.raises(sim.TransactionMismatch) as info:
        sim.launch(push_program, 3, -8)
    bad = info.value
    assert (bad.expected_bytes, bad.delivered_bytes) == (8, 16)
    assert bad.owner == 1
    assert bad.blocks == (1, 0)


def test_a_tx_count_beyond_ptx_range_is_a_transaction_mismatch():
    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.mbarrier_expect_tx(bar, 2**20 - 1)
        b.mbarrier_expect_tx(bar, 1)  # bug: the tx-count reaches 2**20, one past PTX's range
        b.mbarrier_arrive(bar)
        yield b.mbarrier_wait(bar, 0)

    with pytest.raises(sim.TransactionMismatch) as info:
        sim.launch(program, 1)
    bad = info.value
    assert (bad.expected_bytes, bad.delivered_bytes) == (2**20, 0)
    assert "outside PTX's range -1048575..1048575" in str(bad)
    assert bad.points[-1].op == "mbarrier.expect_tx 'bar'@block 0 tx 1 B"


def expect_then_copy(b, consumer, producer_arrives):
    """The producer expects 16 bytes on the consumer's ``bar`` (no arrival) and copies them there;
    the consumer arrives and waits. Safe only if an arrival of the phase comes after the expect_tx:
    with ``producer_arrives`` the producer's own (count 2)."""
    src = b.shared_array("src", (4,), F32)
    buf = b.shared_array("buf", (4,), F32)
    bar = b.shared_mbarrier("bar")
    b.mbarrier_init(bar, 2 if producer_arrives else 1)
    src[:] = b.cluster_rank + 1
    b.fence_proxy_async()
    yield b.cluster_sync()
    if b.cluster_rank != consumer:
        b.step("push")
        peer_bar = b.map_shared(bar, consumer)
        b.mbarrier_expect_tx(peer_bar, 16)
        b.bulk_copy(b.map_shared(buf, consumer).at[:], src.at[:], peer_bar)
        if producer_arrives:
            b.mbarrier_arrive(peer_bar)
    else:
        b.step("consume")
        b.mbarrier_arrive(bar)
        yield b.mbarrier_wait(bar, 0)
        assert (buf[:] == 2 - consumer).all()
    yield b.cluster_sync()


@pytest.mark.parametrize("consumer", [0, 1])
def test_an_expect_tx_that_no_arrival_comes_after_is_phase_aliasing(consumer):
    """The consumer's arrival may complete phase 0 before the producer's expect_tx lands: the wait
    then returns before the copy's bytes, whichever block the scheduler runs first."""
    with pytest.raises(sim.PhaseAliasing) as info:
        sim.launch(expect_then_copy, 2, consumer, False)
    bad = info.value
    assert bad.mbarrier == f"'bar'@block {consumer}"
    assert set(bad.blocks) == {0, 1}
    assert {p.step for p in bad.points} == {"push", "consume"}


@pytest.mark.parametrize("consumer", [0, 1])
def test_an_expect_tx_before_an_arrival_of_its_phase_runs_clean(consumer):
    sim.launch(expect_then_copy, 2, consumer, True)


# ----------------------------------------------------------------- bulk copy address rules


def bulk_program(b, src_key, dst_key):
    rows, full = yield from staged_rows(b, width=8)
    if b.cluster_rank == 0:
        b.step("push")
        b.bulk_copy(b.map_shared(rows, 1).at[dst_key], rows.at[src_key], b.map_shared(full, 1))
    yield b.cluster_sync()


def test_bulk_copy_size_not_a_multiple_of_16_is_misaligned():
    with pytest.raises(sim.BulkCopyMisaligned) as info:
        sim.launch(bulk_program, 2, (0, slice(0, 2)), (1, slice(0, 2)))
    bad = info.value
    assert bad.kind == "misaligned bulk copy"
    assert bad.blocks == (0, 1)
    assert bad.owner == 1
    assert bad.byte_range == (32, 40)
    assert "size 8 B is not a multiple of 16" in str(bad)
    assert bad.points[1].step == "push"


@pytest.mark.parametrize("src_key, dst_key, error, blocks, owner, byte_range, words", [
    ((0, slice(1, 5)), (1, slice(0, 4)), sim.BulkCopyMisaligned, (0, 1), 0, (4, 20),
     "src address 4 is not 16-byte aligned"),
    ((0, slice(0, 4)), (1, slice(2, 6)), sim.BulkCopyMisaligned, (0, 1), 1, (40, 56),
     "dst address 40 is not 16-byte aligned"),
    ((0, slice(0, 4)), (2, slice(0, 4)), sim.OutOfBounds, (0, 1), 1, (64, 80),
     "block 0 indexes 'rows' (shape (2, 8)) of block 1 with 2..2 along axis 0, whose extent is 2"),
    ((0, slice(4, 12)), (1, slice(0, 8)), sim.OutOfBounds, (0,), 0, (16, 48),
     "block 0 indexes 'rows' (shape (2, 8)) of block 0 with 4..11 along axis 1, whose extent is 8"),
], ids=["src-unaligned", "dst-unaligned", "dst-past-the-end", "src-past-the-end"])
def test_a_bulk_copy_off_its_addresses_names_the_blocks_and_the_bytes(src_key, dst_key, error, blocks, owner,
                                                                      byte_range, words):
    with pytest.raises(error) as info:
        sim.launch(bulk_program, 2, src_key, dst_key)
    bad = info.value
    assert type(bad) is error
    assert bad.blocks == blocks and bad.owner == owner and bad.byte_range == byte_range
    assert words in str(bad)
    declared, copy = bad.points
    assert declared.op.startswith("declare shared array 'rows'") and copy.op.startswith("cp.async.bulk")
    assert copy.step == "push"


@pytest.mark.parametrize("through_view", [False, True])
def test_bulk_copy_of_stored_bytes_without_a_proxy_fence(through_view):
    """Also where the store goes through the storage and the copy reads a view of the same bytes."""
    base = 32 if through_view else 0  # the copied rows' first byte in the storage

    def program(b):
        if through_view:
            stored = b.shared_array("region", (4, 4), F32)
            rows = b.shared_view("rows", stored, (2, 4), F32, offset=base)  # region rows 2-3
        else:
            stored = rows = b.shared_array("rows", (2, 4), F32)
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.step("stage")
            stored[base // 16, 1:3] = 5.0  # bug: no fence_proxy_async before the copy reads it
            b.step("push")
            b.bulk_copy(b.map_shared(rows, 1).at[0], rows.at[0], b.map_shared(full, 1))
        else:
            b.mbarrier_arrive_expect_tx(full, 16)
            yield b.mbarrier_wait(full, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.MissingProxyFence) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (0,)
    assert bad.owner == 0
    assert bad.byte_range == (base + 4, base + 12)
    assert [p.step for p in bad.points] == ["stage", "push"]


@pytest.mark.parametrize("stored, copied", [(1, 0), (0, 1)])
def test_a_store_next_to_the_copied_bytes_needs_no_proxy_fence(stored, copied):
    """The fence is needed only for bytes the copy reads: an unfenced store to the row right after
    (or right before) the copied one, sharing no byte with it, leaves the program clean."""
    value = np.random.default_rng().uniform(1.0, 2.0, 4).astype(F32)

    def program(b):
        rows = b.shared_array("rows", (2, 4), F32)
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        rows[copied] = value
        b.fence_proxy_async()
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            rows[stored] = -value  # not copied: no fence before the copy
            b.bulk_copy(b.map_shared(rows, 1).at[copied], rows.at[copied], b.map_shared(full, 1))
        else:
            b.mbarrier_arrive_expect_tx(full, 16)
            yield b.mbarrier_wait(full, 0)
            assert (rows[copied] == value).all()
        yield b.cluster_sync()

    sim.launch(program, 2)


@pytest.mark.parametrize("op", ["bulk_copy", "st_async"])
@pytest.mark.parametrize("mapped", [False, True])
def test_an_asynchronous_copy_into_the_issuing_block_is_an_invalid_rank(op, mapped):
    """PTX's cp.async.bulk.shared::cluster and st.async write another block's memory; into the
    issuer's own, through its own address or mapped to its own rank, is undefined."""

    def program(b):
        src = b.shared_array("src", (4,), F32)
        dst = b.shared_array("dst", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        src[:] = 1.0
        b.fence_proxy_async()
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            me = b.cluster_rank
            into, done = (b.map_shared(dst, me), b.map_shared(bar, me)) if mapped or op == "st_async" else (dst, bar)
            b.mbarrier_arrive_expect_tx(bar, 16)
            if op == "bulk_copy":
                b.bulk_copy(into.at[:], src.at[:], done)
            else:
                b.st_async(into.at[:], np.ones(4, F32), done)
            yield b.mbarrier_wait(bar, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.InvalidRank) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (0,) and bad.owner == 0
    assert bad.byte_range == (16, 32)  # 'dst' follows the 16-byte 'src'
    assert bad.points[0].op.startswith({"bulk_copy": "cp.async.bulk", "st_async": "st.async"}[op])


@pytest.mark.parametrize("write", ["store", "atomic"])
@pytest.mark.parametrize("fenced", [False, True])
def test_a_peers_write_into_a_copy_source_needs_a_proxy_fence_of_the_copying_block(write, fenced):
    """Block 1 writes block 0's ``src`` through the generic proxy (``st`` or ``red.shared::cluster``),
    a cluster barrier orders it, and block 0 bulk-copies ``src``: only block 0's fence after the
    barrier puts the write in front of the async proxy's read."""

    def program(b):
        src = b.shared_array("src", (4,), np.int32)
        dst = b.shared_array("dst", (4,), np.int32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.fence_mbarrier_init()
        if b.cluster_rank == 0:
            src[:] = 1
            b.fence_proxy_async()
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            b.step("write")
            peer_src = b.map_shared(src, 0)
            if write == "store":
                peer_src[:] = 7
            else:
                peer_src.atomic_add(slice(None), np.full(4, 6, np.int32))
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            if fenced:
                b.fence_proxy_async()
            b.step("copy")
            b.bulk_copy(b.map_shared(dst, 1).at[:], src.at[:], b.map_shared(bar, 1))
        else:
            b.mbarrier_arrive_expect_tx(bar, 16)
            yield b.mbarrier_wait(bar, 0)
            assert (dst[:] == 7).all()
        yield b.cluster_sync()

    bad = missing_proxy_fence(program, 2, fenced)
    if fenced:
        return
    assert bad.blocks == (1, 0) and bad.owner == 0
    assert bad.byte_range == (0, 16)
    written, copied = bad.points
    assert (written.block, written.step, copied.block, copied.step) == (1, "write", 0, "copy")
    assert written.op.startswith({"store": "st.shared::cluster", "atomic": "red.shared::cluster.add"}[write])


@pytest.mark.parametrize("copier", [0, 1])
def test_a_fence_before_a_peers_write_does_not_cover_it(copier):
    """The copying block's fence must come after the write it publishes: one in the same phase as
    the peer's store, unordered with it, leaves that store unfenced, whichever of the two the
    scheduler runs first (``copier`` 1: the store runs before the fence, but is not ordered before it)."""
    writer = 1 - copier

    def program(b):
        src = b.shared_array("src", (4,), F32)
        dst = b.shared_array("dst", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.fence_mbarrier_init()
        yield b.cluster_sync()
        if b.cluster_rank == writer:
            b.step("write")
            b.map_shared(src, copier)[:] = 7.0
        else:
            b.fence_proxy_async()  # bug: not after the store it should publish
        yield b.cluster_sync()
        if b.cluster_rank == copier:
            b.step("copy")
            b.bulk_copy(b.map_shared(dst, writer).at[:], src.at[:], b.map_shared(bar, writer))
        else:
            b.mbarrier_arrive_expect_tx(bar, 16)
            yield b.mbarrier_wait(bar, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.MissingProxyFence) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (writer, copier) and bad.owner == copier
    assert bad.byte_range == (0, 16)
    assert f"block {copier} bulk-copies 'src' bytes block {writer} wrote with st.shared::cluster" in str(bad)
    written, copied = bad.points
    assert (written.block, written.step, copied.block, copied.step) == (writer, "write", copier, "copy")



@pytest.mark.parametrize("view_dtype, offset, races", [
    (np.int32, 4, True),  # a 4-byte atomic inside an 8-byte one
    (np.int64, 0, False),  # the same elements
    (np.uint64, 0, False),  # the same elements, another type: PTX asks the same size and bytes only
])
@pytest.mark.parametrize("first", [0, 1])
def test_atomics_race_unless_they_cover_the_same_elements(view_dtype, offset, races, first):
    """Block 0 adds into ``acc`` (int64), block 1 through a view of the same bytes, unordered."""

    def program(b):
        acc = b.shared_array("acc", (2,), np.int64)
        view = b.shared_view("view", acc, (16 // np.dtype(view_dtype).itemsize,), view_dtype)
        if b.cluster_rank == 0:
            acc[:] = 0
        yield b.cluster_sync()
        whole, part = (acc, view) if b.cluster_rank == 0 else (b.map_shared(acc, 0), b.map_shared(view, 0))
        if b.cluster_rank == first:
            whole.atomic_add(0, np.int64(1))
        else:
            part.atomic_add(offset // np.dtype(view_dtype).itemsize, view_dtype(1))
        yield b.cluster_sync()

    if not races:
        sim.launch(program, 2)
        return
    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.conflict == "atomic after atomic" and bad.owner == 0 and bad.byte_range == (4, 8)
    assert "over different elements" in str(bad)

def push_into_uninitialised_looking_barrier(b, copy, fence, owner):
    """Block ``owner`` initialises ``bar`` and the other block completes bytes on it with the copy
    engine (``copy``: ``bulk_copy`` or ``st_async``). ``fence``: what the owner does to show the init
    to the async proxy: ``fence_mbarrier_init`` or ``fence_proxy_async`` before the cluster barrier,
    the same after it (ordered before nothing the other block does next), or nothing."""
    src = b.shared_array("src", (4,), F32)
    dst = b.shared_array("dst", (4,), F32)
    bar = b.shared_mbarrier("bar")
    if b.cluster_rank != owner:
        src[:] = 1.0
        b.fence_proxy_async()  # the row, for this block's own copy
    else:
        b.mbarrier_init(bar, 1)
        if fence in ("fence_mbarrier_init", "fence_proxy_async"):
            getattr(b, fence)()
    yield b.cluster_sync()
    if b.cluster_rank != owner:
        b.step("push")
        if copy == "bulk_copy":
            b.bulk_copy(b.map_shared(dst, owner).at[:], src.at[:], b.map_shared(bar, owner))
        else:
            b.st_async(b.map_shared(dst, owner).at[:], np.full(4, 1.0, F32), b.map_shared(bar, owner))
    else:
        if fence == "after the barrier":
            b.fence_mbarrier_init()
        b.mbarrier_arrive_expect_tx(bar, 16)
        yield b.mbarrier_wait(bar, 0)
        assert (dst[:] == 1.0).all()
    yield b.cluster_sync()


@pytest.mark.parametrize("owner", [0, 1])
@pytest.mark.parametrize("copy", ["bulk_copy", "st_async"])
@pytest.mark.parametrize("fence", ["fence_mbarrier_init", "fence_proxy_async"])
def test_a_copy_completes_on_a_barrier_whose_init_the_owner_fenced(copy, fence, owner):
    sim.launch(push_into_uninitialised_looking_barrier, 2, copy, fence, owner)


@pytest.mark.parametrize("owner", [0, 1])
@pytest.mark.parametrize("fence", ["none", "after the barrier"])
def test_a_bulk_copy_on_a_barrier_whose_init_is_not_fenced_before_it_is_a_missing_proxy_fence(fence, owner):
    """The cluster barrier orders the init before the copy for the generic proxy only: the copy
    engine's complete_tx may reach an mbarrier it still sees uninitialised. A fence after the
    barrier is ordered before nothing the copying block does, even where it runs first (owner 0)."""
    pusher = 1 - owner
    with pytest.raises(sim.MissingProxyFence) as info:
        sim.launch(push_into_uninitialised_looking_barrier, 2, "bulk_copy", fence, owner)
    bad = info.value
    assert bad.kind == "missing proxy fence"
    assert bad.blocks == (owner, pusher) and bad.owner == owner
    init, pushed = bad.points
    assert (init.block, init.op) == (owner, f"mbarrier.init 'bar'@block {owner} count 1")
    assert (pushed.block, pushed.step) == (pusher, "push")
    assert pushed.op.startswith("cp.async.bulk")
    assert f"no fence_mbarrier_init (or fence_proxy_async) of block {owner}" in str(bad)


@pytest.mark.parametrize("owner", [0, 1])
def test_st_async_signals_through_the_generic_proxy_so_a_cluster_barrier_after_the_init_is_enough(owner):
    """PTX: st.async stores, and reaches its mbarrier, through the generic proxy; no proxy fence."""
    sim.launch(push_into_uninitialised_looking_barrier, 2, "st_async", "none", owner)


@pytest.mark.parametrize("fenced", [True, False])
def test_bytes_an_st_async_wrote_need_a_proxy_fence_before_a_bulk_copy_sends_them_on(fenced):
    """Block 0 st.async's a row into block 1, which waits for it and bulk-copies it on to block 2:
    st.async wrote it through the generic proxy, so block 1 fences before its copy reads it."""

    def program(b):
        inbox = b.shared_array("inbox", (4,), F32)
        out = b.shared_array("out", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.fence_mbarrier_init()
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            b.st_async(b.map_shared(inbox, 1).at[:], np.full(4, 9, F32), b.map_shared(bar, 1))
        else:
            b.mbarrier_arrive_expect_tx(bar, 16)
            yield b.mbarrier_wait(bar, 0)
            if b.cluster_rank == 1:
                if fenced:
                    b.fence_proxy_async()
                b.step("forward")
                b.bulk_copy(b.map_shared(out, 2).at[:], inbox.at[:], b.map_shared(bar, 2))
            else:
                assert (out[:] == 9).all()
        yield b.cluster_sync()

    bad = missing_proxy_fence(program, 3, fenced)
    if fenced:
        return
    assert bad.blocks == (0, 1) and bad.owner == 1
    assert "block 1 bulk-copies 'inbox' bytes block 0 wrote with st.async" in str(bad)
    assert [(p.block, p.op.split()[0]) for p in bad.points] == [(0, "st.async"), (1, "cp.async.bulk")]


@pytest.mark.parametrize("fence", ["fence_mbarrier_init", "fence_acq_rel_cluster", None])
def test_a_relaxed_cluster_arrival_publishes_the_inits_a_fence_released(fence):
    """PTX's idiom: mbarrier.init; fence.mbarrier_init.release.cluster; barrier.cluster.arrive.relaxed;
    barrier.cluster.wait. The relaxed arrival alone publishes nothing."""

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 2)
        if fence:
            getattr(b, fence)()
        b.cluster_arrive_relaxed()
        yield b.cluster_wait_acquire()
        b.step("arrive")
        b.mbarrier_arrive(b.map_shared(bar, 0))  # both blocks on block 0's barrier
        if b.cluster_rank == 0:
            yield b.mbarrier_wait(bar, 0)
        yield b.cluster_sync()

    if fence:
        sim.launch(program, 2)
        return
    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    assert info.value.conflict == "mbarrier use after init"
    assert info.value.blocks == (0, 1)


@pytest.mark.parametrize("owner", [0, 1])
def test_an_arrival_that_completes_a_phase_only_in_one_order_does_not_tell_its_block_so(owner):
    """The peer's arrival is the last of phase 0 in one rank order only: on hardware the owner's may
    come last, so the peer's copy, meant for phase 1, may land in phase 0 (whose tx-count then never
    balances). Reported in both rank orders."""

    def program(b):
        buf = b.shared_array("buf", (4,), F32)
        stage = b.shared_array("stage", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 2)
        b.fence_mbarrier_init()
        stage[:] = 7.0
        b.fence_proxy_async()
        yield b.cluster_sync()
        if b.cluster_rank == owner:
            b.mbarrier_arrive(bar)
            yield b.mbarrier_wait(bar, 0)
            b.mbarrier_arrive_expect_tx(bar, 16)
            b.mbarrier_arrive(bar)
            yield b.mbarrier_wait(bar, 1)
        else:
            peer = b.map_shared(bar, owner)
            b.mbarrier_arrive(peer)
            b.bulk_copy(b.map_shared(buf, owner).at[:], stage.at[:], peer)  # meant for phase 1
        yield b.cluster_sync()

    # owner 0: the peer's arrival completes phase 0 here, and its copy is the aliasing signal;
    # owner 1: the copy lands in phase 0 here, more bytes than it expects
    with pytest.raises(sim.PhaseAliasing if owner == 0 else sim.TransactionMismatch) as info:
        sim.launch(program, 2)
    assert info.value.owner == owner


def test_a_peer_access_before_the_first_cluster_barrier_is_barrier_misuse():
    """Block 1 stores into block 0 before any cluster barrier: block 0 may not have started yet.
    No race (the barrier after orders the store before block 0's read), so it is reported at the
    launch's end."""

    def program(b):
        box = b.shared_array("box", (4,), F32)
        if b.cluster_rank == 1:
            b.map_shared(box, 0)[:] = 5.0
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            assert (box[:] == 5.0).all()
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (0, 1) and bad.owner == 0 and bad.byte_range == (0, 16)
    assert "block 1 accesses 'box' of block 0 before its first cluster barrier" in str(bad)
    assert bad.points[0].op.startswith("st.shared::cluster box")


def test_a_peer_access_after_the_first_arrive_but_before_its_wait_is_barrier_misuse():
    """Arriving at the first cluster barrier is not enough: until its wait returns, block 1 does not
    know that block 0 has started, so a store into block 0 between the two is as early as one before."""

    def program(b):
        box = b.shared_array("box", (4,), F32)
        b.cluster_arrive_release()
        if b.cluster_rank == 1:
            b.step("early store")
            b.map_shared(box, 0)[:] = 5.0  # bug: block 0 may not have started
        yield b.cluster_wait_acquire()
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (0, 1) and bad.owner == 0 and bad.byte_range == (0, 16)
    assert "block 1 accesses 'box' of block 0 before its first cluster barrier" in str(bad)
    (store,) = bad.points
    assert store.step == "early store" and store.op.startswith("st.shared::cluster box[:] @block 0")


# --------------------------------------------------------------------------- views: shared words

def exchange_then_output(b, barrier_between: bool):
    """Each block pulls row 0 of its next peer's ``partial``, then pushes it into its previous
    peer's ``o``, a view over the same words: safe only once every block has pulled (a barrier)."""
    region = b.shared_array("exchange", (12, 4), F32)
    partial = b.shared_view("partial", region, (4, 4), F32)
    o = b.shared_view("o", region, (2, 4), F32, offset=16)  # rows 1-2 of partial
    n, me = b.cluster_size, b.cluster_rank
    b.step("stage")
    partial[:, :] = np.full((4, 4), me + 1, F32)
    yield b.cluster_sync()
    b.step("pull")
    x = b.map_shared(partial, (me + 1) % n)[1, :]
    if barrier_between:
        yield b.cluster_sync()
    b.step("push")
    b.map_shared(o, (me - 1) % n)[0, :] = x
    yield b.cluster_sync()
    want = (me + 2) % n + 1  # pushed by block me + 1, pulled from block me + 2
    assert np.all(o[0, :] == want) and np.all(region[1, :] == want)  # o[0] is partial[1] is region[1]


def test_a_view_over_words_a_peer_still_reads_races_and_names_both_arrays():
    with pytest.raises(sim.DataRace) as info:
        sim.launch(exchange_then_output, 3, False)
    race = info.value
    assert race.conflict in ("read after write", "write after read")
    assert race.byte_range == (16, 32)  # o[0] = partial[1]: the storage's bytes 16..32
    assert {p.step for p in race.points} == {"pull", "push"}
    ops = sorted(p.op.split()[1][:1] for p in race.points)
    assert ops == ["o", "p"] and "which shares those bytes" in str(race)


def test_views_separated_by_a_cluster_barrier_share_words_cleanly():
    sim.launch(exchange_then_output, 3, True)


def test_exiting_under_a_peers_read_of_a_view_names_the_view():
    def program(b):
        region = b.shared_array("region", (8,), F32)
        tail = b.shared_view("tail", region, (4,), F32, offset=16)
        tail[:] = 1.0
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            b.map_shared(tail, 0)[:]  # block 0 may already be gone: no barrier after this read

    with pytest.raises(sim.ExitedBlockAccess) as info:
        sim.launch(program, 2)
    assert info.value.byte_range == (16, 32) and "'tail'" in str(info.value)


@pytest.mark.parametrize("read_through, write_through", [("region", "tail"), ("tail", "region")])
def test_a_write_races_with_a_peers_read_of_the_same_bytes_through_another_view(read_through, write_through):
    """``tail`` lies over bytes 16..32 of ``region``: block 0 reads those bytes of block 1 through one
    name and block 1 overwrites them through the other, with no barrier between."""

    def program(b):
        region = b.shared_array("region", (8,), F32)
        tail = b.shared_view("tail", region, (4,), F32, offset=16)
        keys = {"region": (region, slice(4, 8)), "tail": (tail, slice(None))}
        region[:] = 1.0
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            array, key = keys[read_through]
            b.step("read")
            b.map_shared(array, 1)[key]
        else:
            array, key = keys[write_through]
            b.step("write")
            array[key] = 2.0  # bug: block 0 may be reading these bytes
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    race = info.value
    assert race.conflict == "write after read"
    assert race.blocks == (0, 1)
    assert race.owner == 1
    assert race.byte_range == (16, 32)
    read, write = race.points
    assert (read.block, read.step) == (0, "read") and read.op.startswith(f"ld.shared::cluster {read_through}[")
    assert (write.block, write.step) == (1, "write") and write.op.startswith(f"st.shared {write_through}[")
    assert f"earlier read of {read_through!r}, which shares those bytes," in str(race)


@pytest.mark.parametrize(
    "offset, shape, words",
    [(8, (4,), "offset=8 must be a non-negative multiple of 16 bytes"),
     (16, (8,), "view 'v' of 32 bytes at byte 16 does not fit inside 'region' (32 bytes)")],
)
def test_a_view_must_be_aligned_and_fit_inside_its_storage(offset, shape, words):
    def program(b):
        region = b.shared_array("region", (8,), F32)
        b.shared_view("v", region, shape, F32, offset=offset)
        yield b.cluster_sync()

    with pytest.raises(ValueError) as info:
        sim.launch(program, 2)
    assert words in str(info.value)


def test_an_array_one_block_declares_as_a_view_and_another_as_its_own_is_refused():
    def program(b):
        region = b.shared_array("region", (8,), F32)
        if b.cluster_rank == 0:
            b.shared_view("v", region, (4,), F32)
        else:
            b.shared_array("v", (4,), F32)  # bug: not the layout block 0 declared
        yield b.cluster_sync()

    with pytest.raises(ValueError, match=r"'v' is declared as float32\[4\] here but as float32\[4\] \(a view of "
                                         r"'region'\) by another block"):
        sim.launch(program, 2)


def test_views_add_no_bytes_and_a_view_of_a_view_lies_over_the_storage():
    def program(b):
        region = b.shared_array("region", (4, 4), F32)
        inner = b.shared_view("inner", region, (3, 4), F32, offset=16)
        deepest = b.shared_view("deepest", inner, (4,), F32, offset=32)  # region row 3
        after = b.shared_array("after", (4,), F32)
        assert (inner.offset, deepest.offset, after.offset) == (16, 48, 64)
        deepest[:] = 7.0
        assert np.all(region[3, :] == 7.0)
        yield b.cluster_sync()

    sim.launch(program, 2)


# --------------------------------------------------------------------------- barrier misuse


def test_arriving_twice_without_waiting_is_barrier_misuse():
    def program(b):
        b.cluster_arrive_release()
        b.cluster_arrive_release()
        yield b.cluster_wait_acquire()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    assert info.value.blocks == (0,)
    assert info.value.points[0].op == "barrier.cluster.arrive.release phase 1"


def test_a_wait_that_is_not_yielded_is_caught_at_the_next_operation():
    def program(b):
        rows = b.shared_array("rows", (4,), F32)
        rows[:] = 1.0
        b.cluster_sync()  # bug: not yielded, so nothing waits
        b.map_shared(rows, 1 - b.cluster_rank)[:]
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    assert "did not yield it" in str(info.value)
    assert info.value.points[0].op == "barrier.cluster.wait.acquire phase 0"


def test_waiting_on_a_peers_mbarrier_is_barrier_misuse():
    def program(b):
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        yield b.cluster_sync()
        yield b.mbarrier_wait(b.map_shared(full, 1 - b.cluster_rank), 0)

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    assert info.value.blocks == (0, 1)
    assert info.value.owner == 1


def test_initializing_an_mbarrier_twice_is_barrier_misuse():
    def program(b):
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        b.mbarrier_init(full, 2)
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 1)
    assert [p.op for p in info.value.points] == [
        "mbarrier.init 'full'@block 0 count 1",
        "mbarrier.init 'full'@block 0 count 2",
    ]


def test_waiting_on_an_mbarrier_before_its_init_is_barrier_misuse():
    def program(b):
        bar = b.shared_mbarrier("bar")
        yield b.mbarrier_wait(bar, 0)  # bug: never initialized

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 1)
    bad = info.value
    assert bad.blocks == (0,) and bad.owner == 0 and bad.byte_range == (0, 8)
    assert "mbarrier 'bar'@block 0 is waited on before mbarrier_init" in str(bad)
    assert bad.points[0].op == "mbarrier.try_wait.parity 'bar'@block 0 parity 0"


def test_arriving_on_an_mbarrier_before_its_init_is_barrier_misuse():
    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_arrive(bar)  # bug: the init comes after
        b.mbarrier_init(bar, 1)
        yield b.mbarrier_wait(bar, 0)

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 1)
    bad = info.value
    assert bad.blocks == (0,) and bad.owner == 0 and bad.byte_range == (0, 8)
    assert "mbarrier 'bar'@block 0 is used before mbarrier_init" in str(bad)
    assert bad.points[0].op.startswith("mbarrier.arrive 'bar'@block 0")


def test_more_arrivals_than_the_count_while_bytes_are_due_is_barrier_misuse():
    """With 16 bytes still due the phase cannot complete, so a second arrival of a count-1 barrier
    lands in the same phase: PTX leaves the pending count going below zero undefined."""

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.mbarrier_arrive_expect_tx(bar, 16)
        b.mbarrier_arrive(bar)  # bug: one arrival too many
        yield b.mbarrier_wait(bar, 0)

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 1)
    bad = info.value
    assert bad.blocks == (0, 0) and bad.owner == 0 and bad.byte_range == (0, 8)
    assert "mbarrier 'bar'@block 0 gets more than its 1 arrivals in one phase" in str(bad)
    init, arrive = bad.points
    assert init.op == "mbarrier.init 'bar'@block 0 count 1" and arrive.op.startswith("mbarrier.arrive 'bar'@block 0")


def test_a_copy_completing_on_another_blocks_mbarrier_is_barrier_misuse():
    def program(b):
        rows, full = yield from staged_rows(b)
        if b.cluster_rank == 0:
            b.bulk_copy(b.map_shared(rows, 1).at[0], rows.at[0], full)  # bug: block 0's own 'full'
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (0, 1, 0) and bad.owner == 0 and bad.byte_range == (32, 40)
    assert "cp.async.bulk into block 1 must complete on an mbarrier of block 1, not on 'full'@block 0" in str(bad)


def test_a_bulk_copy_into_a_block_that_exited_is_reported_with_the_exit_point():
    def program(b):
        rows, full = yield from staged_rows(b)
        if b.cluster_rank == 1:
            yield b.cluster_sync()  # completes once block 0 has exited
            b.step("late copy")
            b.bulk_copy(b.map_shared(rows, 0).at[1], rows.at[1], b.map_shared(full, 0))

    with pytest.raises(sim.ExitedBlockAccess) as info:
        sim.launch(program, 2)
    gone = info.value
    assert gone.blocks == (0, 1) and gone.owner == 0 and gone.byte_range == (16, 32)
    exit_point, copy = gone.points
    assert (exit_point.block, exit_point.op) == (0, "exit")
    assert copy.step == "late copy" and copy.op.startswith("cp.async.bulk rows[1] @block 0")


def test_arriving_in_the_next_phase_before_a_wait_saw_the_last_is_barrier_misuse():
    """PTX: a try_wait must return true on a phase before anyone arrives in the next one. Here
    nobody waits on phase 0, so no wait can be lapped: the rule itself is the report."""
    lines = {}

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.mbarrier_arrive(bar)  # completes phase 0
        lines["first"] = this_line(-1)
        b.mbarrier_arrive(bar)  # bug: phase 1, with no wait on phase 0 before it
        lines["second"] = this_line(-1)
        yield b.mbarrier_wait(bar, 1)

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 1)
    bad = info.value
    assert bad.blocks == (0,) and bad.owner == 0 and bad.byte_range == (0, 8)
    assert [p.line for p in bad.points] == [lines["first"], lines["second"]]
    assert "in phase 1, but no wait that observed phase 0 complete" in str(bad)


def test_a_peer_arriving_in_the_next_phase_must_come_after_a_wait_on_the_last():
    """Block 1 completes phases 0 and 1 of block 0's barrier; block 0 waits on parity 1 after a
    cluster barrier, which returns at once (it knows both phases complete), so nothing laps: the
    arrival in phase 1 still came before any wait saw phase 0."""
    lines = {}

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            b.mbarrier_arrive(b.map_shared(bar, 0))
            lines["second"] = this_line(1)
            b.mbarrier_arrive(b.map_shared(bar, 0))  # bug: phase 1, no wait on phase 0 before it
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            yield b.mbarrier_wait(bar, 1)
        yield b.cluster_sync()

    with pytest.raises(sim.BarrierMisuse) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.blocks == (1, 0) and bad.owner == 0
    assert bad.points[1].line == lines["second"]


def test_arrivals_each_after_a_wait_on_the_phase_before_run_clean():
    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        for phase in range(4):
            b.mbarrier_arrive(bar)
            yield b.mbarrier_wait(bar, phase % 2)

    sim.launch(program, 1)


# ---------------------------------------------------------------- correct programs run clean


def test_producer_consumer_with_st_async_and_remote_arrivals_reuses_a_slot_safely():
    """Two rounds through one slot: full/empty mbarriers order every reuse, so no hazard."""
    rounds = 3
    seen = []

    def program(b):
        slot = b.shared_array("slot", (4,), F32)
        full = b.shared_mbarrier("full")
        empty = b.shared_mbarrier("empty")
        b.mbarrier_init(full, 1)
        b.mbarrier_init(empty, 1)
        b.fence_mbarrier_init()  # for the st_async that completes on full
        yield b.cluster_sync()
        if b.cluster_rank == 0:  # producer
            for k in range(rounds):
                if k:
                    yield b.mbarrier_wait(empty, (k - 1) % 2)
                b.st_async(b.map_shared(slot, 1).at[:], np.full(4, k + 1, F32), b.map_shared(full, 1))
        else:  # consumer
            for k in range(rounds):
                b.mbarrier_arrive_expect_tx(full, 16)
                yield b.mbarrier_wait(full, k % 2)
                seen.append(slot[:].copy())
                b.mbarrier_arrive(b.map_shared(empty, 0))
        yield b.cluster_sync()

    trace = sim.launch(program, 2)
    assert [s.tolist() for s in seen] == [[k + 1.0] * 4 for k in range(rounds)]
    assert trace.traffic().total.tolist() == [[0, 16 * rounds], [0, 0]]


def test_the_same_slot_reuse_without_the_empty_barrier_races():
    def program(b):
        slot = b.shared_array("slot", (4,), F32)
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        b.fence_mbarrier_init()
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            for k in range(2):  # bug: the second store does not wait for the consumer
                b.st_async(b.map_shared(slot, 1).at[:], np.full(4, k + 1, F32), b.map_shared(full, 1))
        else:
            for k in range(2):
                b.mbarrier_arrive_expect_tx(full, 16)
                yield b.mbarrier_wait(full, k % 2)
                slot[:]
        yield b.cluster_sync()

    with pytest.raises(sim.DataRace) as info:
        sim.launch(program, 2)
    assert info.value.conflict == "write after write"
    assert info.value.owner == 1


@pytest.mark.parametrize("algorithm", sim.REDUCE_ALGORITHMS)
@pytest.mark.parametrize("size", [1, 2, 3, 8, 13, 16])
def test_every_reduce_algorithm_runs_without_a_hazard(algorithm, size):
    """And every block's row of the result is the sum, within float32's left-fold error bound of the
    exact one (a row some block never wrote would hold whatever the output held before)."""
    x = np.random.default_rng().standard_normal((size, 37)).astype(F32)
    out, trace = sim.cluster_reduce(x, "sum", algorithm)
    assert trace.events[-1].kind == "exit"
    wide = x.astype(np.float64)
    bound = size * 2.0**-24 * np.abs(wide).sum(axis=0)  # (size - 1) roundings of partials, one of the result
    assert (np.abs(out - wide.sum(axis=0)) <= bound).all()


@pytest.mark.parametrize("algorithm", sim.GATHER_ALGORITHMS)
@pytest.mark.parametrize("size", [1, 2, 5, 16])
def test_every_gather_algorithm_runs_without_a_hazard(algorithm, size):
    x = np.random.default_rng(size).standard_normal((size, 3)).astype(F32)
    out, _ = sim.cluster_gather(x, algorithm)
    assert (out == x.ravel()).all()


def relay_program(b, relay_waits_first):
    """Block 0 writes a value, block 1 relays a signal to block 2, block 2 reads block 0's value.

    Ordered only if block 1 waits for block 0's signal before signalling block 2 (happens-before
    is transitive through mbarriers); otherwise block 2's read races with block 0's store.
    """
    value = b.shared_array("value", (4,), F32)
    signal = b.shared_mbarrier("signal")
    b.mbarrier_init(signal, 1)
    yield b.cluster_sync()
    rank = b.cluster_rank
    if rank == 0:
        value[:] = 7.0
        b.mbarrier_arrive(b.map_shared(signal, 1))
    elif rank == 1:
        if relay_waits_first:
            yield b.mbarrier_wait(signal, 0)
        b.mbarrier_arrive(b.map_shared(signal, 2))
        if not relay_waits_first:
            yield b.mbarrier_wait(signal, 0)
    else:
        b.mbarrier_expect_tx(signal, 0)
        yield b.mbarrier_wait(signal, 0)
        b.step("read")
        assert (b.map_shared(value, 0)[:] == 7.0).all()
    yield b.cluster_sync()


def test_happens_before_is_transitive_through_mbarrier_arrivals():
    sim.launch(relay_program, 3, True)
    with pytest.raises(sim.DataRace) as info:
        sim.launch(relay_program, 3, False)
    race = info.value
    assert race.conflict == "read after write"
    assert race.blocks == (0, 2)
    assert race.owner == 0
    assert race.points[1].step == "read"
