"""The benchmark harness's arithmetic and records, without a GPU."""

import json

import pytest

from clusterlab.bench import common, primitives


def test_stat_is_median_and_spread():
    stat = common.Stat.of([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (stat.median, stat.min, stat.max, stat.repeats) == (3.0, 1.0, 10.0, 5)
    assert common.Stat.from_dict(json.loads(json.dumps(stat.as_dict()))) == stat
    with pytest.raises(ValueError):
        common.Stat.of([])


def test_rates_from_times_swap_the_spread():
    times_us = common.Stat(2.0, 1.0, 4.0, 5)
    rate = times_us.inverse(8e6)  # 8 bytes per op -> bytes/s
    assert rate.median == pytest.approx(4e6)
    assert (rate.min, rate.max) == (pytest.approx(2e6), pytest.approx(8e6))
    assert times_us.scaled(1e3) == common.Stat(2e3, 1e3, 4e3, 5)


def test_slope_cancels_the_fixed_cost():
    fixed, per_op = 7.5, 0.42
    count = 100
    assert common.slope(fixed + count * per_op, fixed + 2 * count * per_op, count) == pytest.approx(per_op)
    with pytest.raises(ValueError):
        common.slope(1.0, 2.0, 0)


def test_fewer_than_five_repeats_are_refused():
    with pytest.raises(ValueError, match="at least 5"):
        common.per_op_us(lambda k: None, 10, repeats=4)
    with pytest.raises(ValueError, match="at least 5"):
        common.graph_launch_us(lambda: None, repeats=3)


def test_clock_summary_of_samples():
    sampler = common.ClockSampler()
    sampler.samples = [
        ["1755", "2619", "1980", "2619", "40", "120.5", "P0"],
        ["1980", "2619", "1980", "2619", "45", "[N/A]", "P0"],
        ["1800", "2619", "1980", "2619", "44", "300.0", "P0"],
    ]
    summary = sampler.summary()
    assert summary["samples"] == 3
    assert summary["clocks.sm"] == {"median": 1800.0, "min": 1755.0, "max": 1980.0, "repeats": 3}
    assert summary["power.draw"]["repeats"] == 2  # "[N/A]" is not a number
    assert summary["pstate"] == ["P0"]
    assert common.ClockSampler().summary() == {}


def test_commit_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("CLUSTERLAB_COMMIT", "abc123")
    assert common.commit() == "abc123"


def test_write_json_creates_parents(tmp_path):
    path = common.write_json({"a": [1, 2]}, tmp_path / "x" / "r.json")
    assert json.loads(path.read_text()) == {"a": [1, 2]}


def test_bus_bytes_follow_the_nccl_convention():
    # all-gather: N-1 rows arrive in each block; all-reduce: 2 (N-1)/N rows (float32)
    assert primitives.gather_bus_bytes(8, 256, 4) == 7 * 1024
    assert primitives.gather_bus_bytes(1, 256, 2) == 0
    assert primitives.reduce_bus_bytes(4, 256) == pytest.approx(2 * 3 / 4 * 1024)
    assert primitives.reduce_bus_bytes(1, 256) == 0


def test_shared_memory_of_each_point_matches_the_host_api():
    # direct: staged [n] + work [n]; bulk: staged + mbarrier + N slots; the variant: two buffers
    assert primitives.reduce_shared_bytes("direct", 256, 4) == 2 * 256 * 4
    assert primitives.reduce_shared_bytes("bulk", 256, 4) == (256 + 4 + 4 * 256) * 4
    assert primitives.reduce_shared_bytes("direct_1barrier", 256, 4) == 2 * 256 * 4
    assert primitives.gather_shared_bytes("direct_v4", 100, 3, 2) == 3 * 100 * 2
    assert primitives.gather_shared_bytes("bulk", 100, 3, 2) == 3 * 104 * 2  # rows padded to 16 bytes


def test_the_sweep_covers_the_documented_sizes():
    assert primitives.CLUSTER_SIZES == (1, 2, 3, 4, 6, 8, 16)
    assert primitives.MESSAGE_BYTES[0] == 64 and primitives.MESSAGE_BYTES[-1] == 64 * 1024
    assert primitives.DTYPES == ("float32", "float16")
    # every block alone on its SM: two padded blocks exceed an SM's 228 KiB
    assert 2 * (primitives.SOLO_SHARED_BYTES + 1024) > 228 * 1024


def test_clock_sampler_queries_at_most_once_per_period(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "_smi", lambda fields: calls.append(fields) or ["1980"] * len(fields))
    sampler = common.ClockSampler(period_s=3600)
    for _ in range(5):
        sampler.sample()
    assert len(calls) == 1 and len(sampler.samples) == 1


@pytest.mark.parametrize(
    "name, tag",
    [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200 NVL", "h200"),
     ("NVIDIA GeForce RTX 4090", "nvidia_geforce_rtx_4090")],
)
def test_results_are_tagged_with_the_cards_model(name, tag):
    assert common.card_tag(name) == tag


def test_a_card_without_a_name_is_an_error():
    with pytest.raises(ValueError, match="card_tag needs the card's name"):
        common.card_tag(None)


def test_ragged_batches_spread_lengths_over_the_range_and_rotation_covers_the_l2():
    from clusterlab.fused.bench import layers_for_l2, ragged_lengths

    lengths = ragged_lengths(5, [1024, 4096, 32768], seed=3)
    assert sorted(lengths) == [1024, 8960, 16896, 24832, 32768]
    assert ragged_lengths(5, [1024, 32768], seed=3) == lengths  # shuffled the same way for a seed
    assert layers_for_l2(step_bytes=23 << 20, l2_bytes=60 << 20) == 8  # 3 L2s between two visits
    assert layers_for_l2(step_bytes=400 << 20, l2_bytes=60 << 20) == 1
    assert layers_for_l2(step_bytes=1 << 20, l2_bytes=60 << 20, turnover=0) == 1
