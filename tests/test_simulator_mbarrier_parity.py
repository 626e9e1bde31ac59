"""mbarrier parity waits: what a wait observes must not depend on the simulator's schedule.

``try_wait.parity p`` only sees the parity of the barrier's current phase, so a wait cannot tell
phase 0 from phase 2. The simulator gives a wait the earliest phase of its parity the block may
observe, acquires that phase's completion only, and reports ``PhaseAliasing`` whenever the
barrier can get two phases ahead of a wait (or a signal can land in the phase before the one it
was meant for). ``PhaseNeverCompletes`` is the deadlock of a wait that nobody is left to end.
Planted bugs first, then correct programs that must run clean.
"""

import numpy as np
import pytest

from clusterlab import simulator as sim

F32 = np.float32


def this_line(offset: int) -> str:
    import sys

    return f"test_simulator_mbarrier_parity.py:{sys._getframe(1).f_lineno + offset}"


# ------------------------------------------------------------------------- phase aliasing


def test_producer_two_phases_ahead_of_the_waiter_is_phase_aliasing():
    """The reported case: block 1 completes phase 0, stores, completes phases 1 and 2; block 0
    waits on parity 0 and reads.

    The old simulator ran it clean: block 0 resumed after phase 2 and took phase 2's clock. On
    hardware block 0 may return right after phase 0 and read mid-store, or (looking while phase
    2 is under way) only after phase 2. The truthful report is ``PhaseAliasing``, not a
    ``DataRace``: the race is only one of the outcomes, the root cause is that the wait cannot
    tell which phase it saw, and it is a bug even with no data involved (the test below). It is
    raised where the barrier laps the wait, before the read.
    """
    lines = {}

    def program(b):
        data = b.shared_array("data", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            peer = b.map_shared(bar, 0)
            b.mbarrier_arrive(peer)  # phase 0
            b.map_shared(data, 0)[:] = 1.0
            lines["lap"] = this_line(1)
            b.mbarrier_arrive(peer)  # phase 1: laps block 0's wait
            b.mbarrier_arrive(peer)  # phase 2
        else:
            b.step("consume")
            lines["wait"] = this_line(1)
            yield b.mbarrier_wait(bar, 0)
            data[:]
        yield b.cluster_sync()

    with pytest.raises(sim.PhaseAliasing) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.kind == "phase aliasing"
    assert bad.mbarrier == "'bar'@block 0"
    assert bad.phases == (0, 2)
    assert bad.blocks == (0, 1)
    assert bad.owner == 0
    assert bad.byte_range == (16, 24)  # 'bar' follows the 16-byte 'data'
    wait, lap = bad.points
    assert (wait.block, wait.step, wait.line) == (0, "consume", lines["wait"])
    assert wait.op == "mbarrier.try_wait.parity 'bar'@block 0 parity 0"
    assert (lap.block, lap.line) == (1, lines["lap"])
    assert lap.op == "mbarrier.arrive 'bar'@block 0"


@pytest.mark.parametrize("completed", [2, 3])
def test_a_late_wait_cannot_take_a_later_phases_ordering(completed):
    """The wait starts only after all three phases completed; the old simulator let it acquire
    phase 2 (which orders the store). It may as well have seen phase 0: ``PhaseAliasing``. Two
    completed phases are already one too many: the barrier, in phase 2, shows parity 0 again."""

    def program(b):
        data = b.shared_array("data", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 0:  # runs first: every arrival lands before block 1 waits
            peer = b.map_shared(bar, 1)
            b.mbarrier_arrive(peer)
            b.map_shared(data, 1)[:] = 1.0
            for _ in range(completed - 1):
                b.mbarrier_arrive(peer)
        else:
            yield b.mbarrier_wait(bar, 0)
            data[:]
        yield b.cluster_sync()

    with pytest.raises(sim.PhaseAliasing) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.phases == (0, 2)
    lap, wait = bad.points  # earliest first: the lapping arrive happened before the wait began
    assert (lap.block, lap.op) == (0, "mbarrier.arrive 'bar'@block 1")
    assert (wait.block, wait.op) == (1, "mbarrier.try_wait.parity 'bar'@block 1 parity 0")


def lapping_program(b, producer_pauses):
    """Block 1 completes two phases of block 0's ``bar`` without waiting for block 0.

    With ``producer_pauses`` it waits, between them, on a signal from block 2 that has nothing
    to do with block 0, so the scheduler lets block 0's wait return in between: on hardware
    block 0 may still be slower. No data is involved: a wait that can be lapped is the bug.
    """
    bar = b.shared_mbarrier("bar")
    tick = b.shared_mbarrier("tick")
    b.mbarrier_init(bar, 1)
    b.mbarrier_init(tick, 1)
    yield b.cluster_sync()
    if b.cluster_rank == 0:
        yield b.mbarrier_wait(bar, 0)
    elif b.cluster_rank == 1:
        b.mbarrier_arrive(b.map_shared(bar, 0))
        if producer_pauses:
            yield b.mbarrier_wait(tick, 0)
        b.mbarrier_arrive(b.map_shared(bar, 0))
    else:
        b.mbarrier_arrive(b.map_shared(tick, 1))
    yield b.cluster_sync()


@pytest.mark.parametrize("producer_pauses", [False, True])
def test_phase_aliasing_does_not_depend_on_when_the_waiter_is_scheduled(producer_pauses):
    with pytest.raises(sim.PhaseAliasing) as info:
        sim.launch(lapping_program, 3, producer_pauses)
    bad = info.value
    assert bad.phases == (0, 2)
    assert bad.blocks == (0, 1)
    assert [p.block for p in bad.points] == [0, 1]


def test_waiting_on_parity_1_for_the_first_phase_is_phase_aliasing():
    """Off by one: parity 1 on a fresh mbarrier names the phase before phase 0, which counts as
    complete. The wait returns at once if it looks before block 1 arrives, or waits for phase 1
    (here: forever) if it looks after."""

    def program(b):
        data = b.shared_array("data", (4,), F32)
        full = b.shared_mbarrier("full")
        b.mbarrier_init(full, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 0:
            yield b.mbarrier_wait(full, 1)  # bug: the first phase has parity 0
            data[:]
        else:
            b.map_shared(data, 0)[:] = 1.0
            b.mbarrier_arrive(b.map_shared(full, 0))
        yield b.cluster_sync()

    with pytest.raises(sim.PhaseAliasing) as info:
        sim.launch(program, 2)
    bad = info.value
    assert bad.phases == (-1, 1)
    assert "the phase before phase 0" in bad.summary
    assert [p.op.split()[0] for p in bad.points] == ["mbarrier.try_wait.parity", "mbarrier.arrive"]


def test_a_copy_for_the_next_phase_issued_before_this_phase_is_known_complete():
    """Two rows, one mbarrier, two phases, no handshake: the second row's bytes may land while
    phase 0 still waits for the first, complete phase 0 early and leave phase 1 short."""

    def program(b, one_barrier_per_slot):
        slots = b.shared_array("slots", (2, 4), F32)
        bars = [b.shared_mbarrier("full0"), b.shared_mbarrier("full1")]
        for bar in bars:
            b.mbarrier_init(bar, 1)
        b.fence_mbarrier_init()
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            b.step("push")
            for k in range(2):
                bar = bars[k] if one_barrier_per_slot else bars[0]
                b.st_async(b.map_shared(slots, 0).at[k], np.full(4, k, F32), b.map_shared(bar, 0))
        else:
            for k in range(2):
                bar, parity = (bars[k], 0) if one_barrier_per_slot else (bars[0], k)
                b.mbarrier_arrive_expect_tx(bar, 16)
                yield b.mbarrier_wait(bar, parity)
                assert (slots[k] == k).all()
        yield b.cluster_sync()

    sim.launch(program, 2, True)
    with pytest.raises(sim.PhaseAliasing) as info:
        sim.launch(program, 2, False)
    bad = info.value
    assert bad.phases == (0, 1)
    assert bad.blocks == (1, 0)
    assert bad.owner == 0
    first, then = bad.points  # the copy that completed phase 0, then the early one
    assert first.op.startswith("st.async slots[0] @block 0")
    assert then.op.startswith("st.async slots[1] @block 0") and then.step == "push"


# ------------------------------------------------------------------ phase never completes


def test_waiting_on_parity_1_after_completing_phase_0_yourself_never_completes():
    lines = {}

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        b.mbarrier_arrive(bar)  # completes phase 0: the barrier is now in phase 1
        lines["arrive"] = this_line(-1)
        lines["wait"] = this_line(1)
        yield b.mbarrier_wait(bar, 1)  # bug: parity 1 is phase 1, which nobody completes

    with pytest.raises(sim.PhaseNeverCompletes) as info:
        sim.launch(program, 1)
    dead = info.value
    assert isinstance(dead, sim.BarrierDeadlock)
    assert dead.kind == "phase never completes"
    assert (dead.mbarrier, dead.phase, dead.parity, dead.missing_arrivals) == ("'bar'@block 0", 1, 1, 1)
    assert dead.blocks == (0,)
    assert dead.waits == {0: "mbarrier 'bar'@block 0 phase parity 1"}
    assert dead.owner == 0 and dead.byte_range == (0, 8)
    arrive, wait = dead.points
    assert (arrive.op, arrive.line) == ("mbarrier.arrive 'bar'@block 0", lines["arrive"])
    assert wait.line == lines["wait"]
    assert "if it meant phase 0, wait on parity 0" in dead.summary


def test_waiting_for_arrivals_from_a_block_that_has_exited_never_completes():
    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 2)  # bug: only one block ever arrives
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            b.mbarrier_arrive(b.map_shared(bar, 0))
            return
        yield b.mbarrier_wait(bar, 0)
        yield b.cluster_sync()

    with pytest.raises(sim.PhaseNeverCompletes) as info:
        sim.launch(program, 2)
    dead = info.value
    assert (dead.phase, dead.parity, dead.missing_arrivals) == (0, 0, 1)
    assert len(dead.points) == 1 and dead.points[0].block == 0


def test_a_wait_missing_both_an_arrival_and_its_bytes_never_completes():
    """The lone block arrives once on a count-2 barrier and expects 16 bytes nobody sends: the
    arrival that is missing is the hang to report (a tx-count mismatch only where every arrival is in)."""

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 2)
        b.mbarrier_arrive_expect_tx(bar, 16)  # bug: one arrival of two, and 16 bytes that never come
        yield b.mbarrier_wait(bar, 0)

    with pytest.raises(sim.PhaseNeverCompletes) as info:
        sim.launch(program, 1)
    dead = info.value
    assert (dead.mbarrier, dead.phase, dead.parity, dead.missing_arrivals) == ("'bar'@block 0", 0, 0, 1)
    assert dead.blocks == (0,) and dead.owner == 0 and dead.byte_range == (0, 8)
    assert "still needs 1 of its 2 arrivals" in dead.summary


def test_an_exited_blocks_arrival_is_known_to_a_cluster_barrier_it_stood_in_for():
    """Block 1 completes phase 0 of block 0's barrier and returns; its exit stands in for its arrival at
    the cluster barrier block 0 then passes, so block 0 knows phase 0 complete: parity 1 names phase 1,
    which nobody is left to complete (not the phase before phase 0, as if the arrival were unknown)."""
    lines = {}

    def program(b):
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 1:
            lines["arrive"] = this_line(1)
            b.mbarrier_arrive(b.map_shared(bar, 0))  # completes phase 0
            return
        yield b.cluster_sync()  # completes with block 1's exit
        lines["wait"] = this_line(1)
        yield b.mbarrier_wait(bar, 1)  # bug: phase 0 is known complete, so parity 1 is phase 1

    with pytest.raises(sim.PhaseNeverCompletes) as info:
        sim.launch(program, 2)
    dead = info.value
    assert (dead.mbarrier, dead.phase, dead.parity, dead.missing_arrivals) == ("'bar'@block 0", 1, 1, 1)
    assert dead.blocks == (0,) and dead.owner == 0
    arrive, wait = dead.points
    assert (arrive.block, arrive.op, arrive.line) == (1, "mbarrier.arrive 'bar'@block 0", lines["arrive"])
    assert (wait.block, wait.line) == (0, lines["wait"])


def test_parity_1_on_a_fresh_mbarrier_returns_at_once_and_orders_nothing():
    """No hang: the phase before phase 0 counts as complete. The wait orders nothing, so a read
    of data a peer stores without other ordering still races."""

    def program(b, peer_stores):
        data = b.shared_array("data", (4,), F32)
        bar = b.shared_mbarrier("bar")
        b.mbarrier_init(bar, 1)
        yield b.cluster_sync()
        if b.cluster_rank == 1 and peer_stores:
            b.map_shared(data, 0)[:] = 1.0
        if b.cluster_rank == 0:
            yield b.mbarrier_wait(bar, 1)
            data[:]
        yield b.cluster_sync()

    sim.launch(program, 2, False)
    with pytest.raises(sim.DataRace):
        sim.launch(program, 2, True)


# -------------------------------------------------------------------- correct programs


def pipeline(b, rounds, arm, copy, first_wait_parity_1):
    """Producer block 0 sends ``rounds`` rows through one slot of consumer block 1.

    ``full`` (in the consumer) counts the bytes of each round, ``empty`` (in the producer) the
    consumer's "done with the slot". ``arm``: who does the arrive.expect_tx on ``full``
    ("consumer" or "producer"); ``copy``: "bulk" (cp.async.bulk of a staged row) or "st_async";
    ``first_wait_parity_1``: the producer also waits before round 0, on parity 1 of the fresh
    ``empty`` (the usual start state: it returns at once).
    """
    slot = b.shared_array("slot", (4,), F32)
    stage = b.shared_array("stage", (4,), F32)
    full = b.shared_mbarrier("full")
    empty = b.shared_mbarrier("empty")
    b.mbarrier_init(full, 1)
    b.mbarrier_init(empty, 1)
    b.fence_mbarrier_init()  # for the copies that complete on full
    yield b.cluster_sync()
    seen = []
    if b.cluster_rank == 0:
        for k in range(rounds):
            if k or first_wait_parity_1:
                yield b.mbarrier_wait(empty, (k - 1) % 2)
            if arm == "producer":
                b.mbarrier_arrive_expect_tx(b.map_shared(full, 1), 16)
            if copy == "bulk":
                stage[:] = k + 1
                b.fence_proxy_async()
                b.bulk_copy(b.map_shared(slot, 1).at[:], stage.at[:], b.map_shared(full, 1))
            else:
                b.st_async(b.map_shared(slot, 1).at[:], np.full(4, k + 1, F32), b.map_shared(full, 1))
    else:
        for k in range(rounds):
            if arm == "consumer":
                b.mbarrier_arrive_expect_tx(full, 16)
            yield b.mbarrier_wait(full, k % 2)
            seen.append(float(slot[0]))
            b.mbarrier_arrive(b.map_shared(empty, 0))
        assert seen == [k + 1.0 for k in range(rounds)]
    yield b.cluster_sync()


@pytest.mark.parametrize("first_wait_parity_1", [False, True])
@pytest.mark.parametrize("copy", ["bulk", "st_async"])
@pytest.mark.parametrize("arm", ["consumer", "producer"])
def test_producer_consumer_with_matching_phases_runs_clean(arm, copy, first_wait_parity_1):
    sim.launch(pipeline, 2, 5, arm, copy, first_wait_parity_1)


def test_plain_stores_handed_over_phase_by_phase_run_clean():
    """The reported program done right: block 1 waits for block 0's acknowledgement before it
    starts the next phase, so the barrier is never more than one phase ahead."""

    def program(b):
        data = b.shared_array("data", (4,), F32)
        full = b.shared_mbarrier("full")
        ack = b.shared_mbarrier("ack")
        b.mbarrier_init(full, 1)
        b.mbarrier_init(ack, 1)
        yield b.cluster_sync()
        for k in range(3):
            if b.cluster_rank == 1:
                if k:
                    yield b.mbarrier_wait(ack, (k - 1) % 2)
                b.map_shared(data, 0)[:] = k
                b.mbarrier_arrive(b.map_shared(full, 0))
            else:
                yield b.mbarrier_wait(full, k % 2)
                assert (data[:] == k).all()
                b.mbarrier_arrive(b.map_shared(ack, 1))
        yield b.cluster_sync()

    sim.launch(program, 2)


def split_barrier_pipeline(b, slots):
    """Cluster barrier split across iterations: arrive at the end of step i, wait at the start of
    step i + 1. Each wait names its phase, so a block that runs a phase ahead (it may arrive at
    phase i + 1 before a peer's wait on phase i returns) never hands the peer phase i + 1's
    ordering; with one slot the early block overwrites the row its peer is still reading."""
    rank = b.cluster_rank
    row = b.shared_array("row", (slots, 4), F32)
    row[0] = rank
    b.cluster_arrive_release()
    for i in range(1, 4):
        yield b.cluster_wait_acquire()
        b.step(f"step {i}")
        got = b.map_shared(row, 1 - rank)[(i - 1) % slots]
        row[i % slots] = got + 1
        b.cluster_arrive_release()
    yield b.cluster_wait_acquire()


def test_split_cluster_barrier_across_iterations_orders_exactly_its_phase():
    sim.launch(split_barrier_pipeline, 2, 2)
    with pytest.raises(sim.DataRace) as info:
        sim.launch(split_barrier_pipeline, 2, 1)
    assert [p.step for p in info.value.points] == ["step 1", "step 1"]
