"""The placement study: its shared-memory sizing, its reading of the stamps, the SM groups, the report (CPU),
its probe kernel through ptxas, and on a Hopper GPU the driver's occupancy figure against where blocks ran."""

import numpy as np
import pytest
from numba import types

from clusterlab.bench.placement import (main, placement, plot, probe, record_launch, shared_bytes_for, sm_groups,
                                        summary)
from clusterlab.fused.plan import HOPPER
from clusterlab.toolchain import assemble, kernel_ptx

SPIN_NS = 30_000


@pytest.mark.parametrize("per_sm", range(1, 33))
def test_the_shared_memory_leaves_room_for_per_sm_blocks_and_no_more(per_sm):
    shared = shared_bytes_for(per_sm, HOPPER)
    assert HOPPER.blocks_per_sm(shared, threads=32, registers_per_thread=16) == per_sm
    assert shared <= HOPPER.shared_bytes_per_block


@pytest.mark.parametrize("per_sm", [0, -1, 500])
def test_a_blocks_per_sm_that_shared_memory_cannot_give_is_refused(per_sm):
    with pytest.raises(ValueError, match=rf"per_sm={per_sm}: shared memory can hold 1 to \d+ blocks an SM"):
        shared_bytes_for(per_sm, HOPPER)


@pytest.mark.parametrize("spin_us", [0.5, 1e6 + 1, float("inf"), "30", None])
def test_a_spin_that_would_hold_the_gpu_long_or_is_no_number_is_refused_before_any_launch(spin_us):
    with pytest.raises(ValueError, match=r"spin_us must be a number in 1..1e\+06 \(µs\), got "):
        record_launch(2, 1, 4, None, spin_us, HOPPER)


@pytest.mark.parametrize("text", ["0", "2e6", "inf", "long"])
def test_the_command_line_refuses_such_a_spin_naming_the_flag(text, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--spin-us", text])
    assert exited.value.code == 2
    assert f"argument --spin-us: must be a number in 1..1e+06; got '{text}'" in capsys.readouterr().err


def _stamps(rng, sms, waves):
    """Stamps as :func:`probe` writes them for blocks on ``sms``, block ``b`` in wave ``waves[b]`` (1, 2, ...):
    the blocks of a wave start within 2 µs, the first wave at 0, a later one after a block of the wave before
    it ended."""
    start, end = np.zeros(len(sms), dtype=np.int64), np.zeros(len(sms), dtype=np.int64)
    for w in range(1, int(waves.max()) + 1):
        now = waves == w
        base = 0 if w == 1 else end[waves == w - 1].min() + 1
        start[now] = base + rng.integers(0, 2000, int(now.sum()))
        end[now] = start[now] + SPIN_NS + rng.integers(0, 500, int(now.sum()))
    return np.stack([sms, start, end], axis=1)


def test_placement_counts_the_sms_the_blocks_they_held_and_the_waves():
    rng = np.random.default_rng()
    blocks = int(rng.integers(40, 200))
    sms = rng.integers(0, 132, blocks)
    waves = np.ones(blocks, dtype=np.int64)
    late = rng.choice(blocks, int(rng.integers(2, 10)), replace=False)
    waves[late] = 2
    waves[late[:1]] = 3
    got = placement(_stamps(rng, sms, waves), cluster_size=1)
    held = np.bincount(sms)
    assert got["blocks"] == blocks and got["sms_used"] == len(set(sms.tolist()))
    assert got["blocks_per_sm"] == {str(k): int((held == k).sum()) for k in set(held.tolist()) - {0}}
    assert got["late_blocks"] == len(late) and got["waves"] == 3
    assert placement(_stamps(rng, sms, np.ones(blocks, dtype=np.int64)), cluster_size=1)["late_blocks"] == 0


def _gpcs(rng, sm_count=132):
    """A random split of the SMs into GPCs of at most 20 SMs (8 or more but the last), in a shuffled order."""
    order = rng.permutation(sm_count)
    cuts = []
    while sm_count - (cuts[-1] if cuts else 0) > 20:
        cuts.append((cuts[-1] if cuts else 0) + int(rng.integers(8, 21)))
    return [sorted(part.tolist()) for part in np.split(order, cuts)]


def test_sm_groups_are_the_gpcs_where_one_cluster_spans_each_and_parts_of_them_otherwise():
    rng = np.random.default_rng()
    gpcs = _gpcs(rng)
    whole = [(rng.permutation(gpc), len(gpc)) for gpc in gpcs]  # one cluster a GPC over all its SMs
    assert sorted(map(sorted, sm_groups(whole, 132))) == sorted(gpcs)
    pairs = []  # clusters of 2 within GPCs: every group lies within one GPC
    for gpc in gpcs:
        pairs.append((rng.choice(gpc, 2 * int(rng.integers(1, 4))), 2))
    groups = sm_groups(pairs, 132)
    assert sorted(s for group in groups for s in group) == list(range(132))
    assert all(any(set(group) <= set(gpc) for gpc in gpcs) for group in groups)
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)


def _record(rng):
    gpcs = _gpcs(rng)
    launches = []
    for cluster_size, per_sm, asked in ((2, 1, "fit"), (4, 3, 256), (16, 2, 256)):
        sms = np.concatenate([rng.choice(gpc, cluster_size) for gpc in gpcs])
        waves = np.where(np.arange(len(sms)) < len(sms) - cluster_size, 1, 1 if asked == "fit" else 2)
        launch = placement(_stamps(rng, sms, waves), cluster_size)
        launch.update({"per_sm": per_sm, "warps": 4, "max_active_clusters": len(sms) // cluster_size, "asked": asked,
                       "sm": sms.tolist()})
        launches.append(launch)
    return {"card": "NVIDIA H200", "date": "2026-12-02T00:00:00+00:00", "sm_count": 132, "launches": launches,
            "groups": sm_groups([(launch["sm"], launch["cluster_size"]) for launch in launches], 132)}


def test_summary_and_plot(tmp_path):
    record = _record(np.random.default_rng())
    for launch in record["launches"]:
        text = summary(launch)
        assert f"cluster {launch['cluster_size']:2d}, {launch['per_sm']} an SM" in text
        assert f"{launch['blocks']:4d} blocks on {launch['sms_used']:3d} SMs" in text
        assert ("later waves" in text) == (launch["late_blocks"] > 0)
    plot(record, tmp_path / "placement.png")
    assert (tmp_path / "placement.png").stat().st_size > 10_000


@pytest.mark.ptx
def test_the_probe_reads_the_sm_and_the_global_timer_and_assembles():
    ptx = kernel_ptx(probe, (types.int64[:, ::1], types.uint64))
    assert "%smid" in ptx and ptx.count("%globaltimer") == 2
    assert assemble(ptx).spill_bytes == 0


@pytest.mark.gpu
@pytest.mark.parametrize("cluster_size, per_sm", [(2, 1), (4, 3), (16, 3)])
def test_the_clusters_that_fit_run_in_one_wave_and_one_more_waits(cluster_size, per_sm):
    from clusterlab.fused.plan import DeviceLimits

    limits = DeviceLimits.of(0)
    fit = record_launch(cluster_size, per_sm, 4, None, SPIN_NS / 1000, limits)
    assert fit["blocks"] == fit["max_active_clusters"] * cluster_size > 0
    assert fit["late_blocks"] == 0 and fit["waves"] == 1
    assert max(map(int, fit["blocks_per_sm"])) <= per_sm and max(fit["sm"]) < limits.sm_count
    more = record_launch(cluster_size, per_sm, 4, (fit["max_active_clusters"] + 1) * cluster_size,
                         SPIN_NS / 1000, limits)
    assert more["late_blocks"] >= cluster_size and more["waves"] == 2


def test_the_recorded_h200_placement_reads_back(tmp_path):
    """The committed H200 record: its groups follow from its launches, every launch of as many clusters as fit
    ran in one wave, and it plots again."""
    import json
    from pathlib import Path

    record = json.loads((Path(__file__).parents[1] / "benchmarks/results/placement_h200.json").read_text())
    assert record["card"] == "NVIDIA H200"
    launches = record["launches"]
    assert sm_groups([(run["sm"], run["cluster_size"]) for run in launches], record["sm_count"]) == record["groups"]
    for run in launches:
        again = placement(np.array([run["sm"], run["start_ns"], run["end_ns"]]).T, run["cluster_size"])
        assert {k: run[k] for k in again} == again
        if run["asked"] == "fit":
            assert run["waves"] == 1 and run["blocks"] == run["max_active_clusters"] * run["cluster_size"]
    plot(record, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 10_000
