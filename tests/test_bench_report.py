"""The benchmark report on made-up results: targets, choice tables, tables, plots and the auto module (CPU only)."""

import json
import re

import numpy as np
import pytest

from clusterlab import simulator
from clusterlab.bench import report
from clusterlab.bench.timing import Stat
from clusterlab.primitives import auto

SIZES = (1, 2, 3, 8, 16)
BYTES = (64, 1024, 16384)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # float16 first: the choice still ranks on bfloat16
#: Made-up bare cluster barrier (µs): cheap at N = 3, so that a small reduce there costs over 3 barriers.
BARRIER_US = {1: 0.4, 2: 0.4, 3: 0.15, 8: 0.4, 16: 0.25}
PEAK = 3.5e12
NOISY = Stat(0.01, -2.0, 3.0, 7).as_dict()  # would be the fastest by its median


def stat(median, spread=0.05):
    return Stat(median, median * (1 - spread), median * (1 + spread), 7).as_dict()


#: Made-up per-op µs: ring is fastest for small messages, direct for large ones, the variants faster still.
def cluster_us(primitive, implementation, size, nbytes):
    base = {"direct": 1.0, "ring": 0.8, "butterfly": 0.9, "bulk": 1.1, "two_shot": 1.3, "bulk_two_shot": 1.4, "direct_1barrier": 0.5,
            "two_shot_2barrier": 0.9, "bulk_two_shot_0barrier": 1.0, "direct_push": 0.3, "direct_v4": 0.9, "bulk_split": 1.2}
    per_byte = {"direct": 1e-5, "ring": 1e-3, "butterfly": 5e-4, "bulk": 2e-5, "two_shot": 3e-5, "bulk_two_shot": 4e-5,
                "direct_1barrier": 1e-5, "two_shot_2barrier": 2e-5, "bulk_two_shot_0barrier": 2e-5,
                "direct_push": 1e-6, "direct_v4": 5e-6,
                "bulk_split": 1.5e-5}
    return base[implementation] * (1 + size / 16) + per_byte[implementation] * nbytes * size


def timed(rec, latency):
    """``rec`` timed at ``latency`` (a Stat dict), with the bus bandwidth that follows (NCCL's convention)."""
    size, blocks = rec["cluster_size"], rec["cluster_size"] * rec["clusters"]
    if rec["primitive"] == "reduce":
        bus = 2 * (size - 1) / size * rec["working_bytes"] * blocks
    else:
        bus = (size - 1) * rec["message_bytes"] * blocks
    rec["latency_us"] = latency
    if bus:
        rec["bus_bandwidth_bytes_per_s"] = Stat.from_dict(latency).inverse(bus * 1e6).as_dict()
    return rec


def retime(results, latency, **criteria):
    for r in report.records(results, **criteria):
        timed(r, latency)


def synthetic_results():
    floors = [{"kind": "copy", "bandwidth_bytes_per_s": stat(3.0e12)}]
    measurements = []
    for config in ("one", "chip"):
        clusters = {s: (1 if config == "one" else 132 // s) for s in SIZES}
        for size in SIZES:
            floors.append({"kind": "barrier", "config": config, "cluster_size": size, "clusters": clusters[size],
                           "latency_us": stat(BARRIER_US[size])})
            floors.append({"kind": "launch", "config": config, "cluster_size": size, "clusters": clusters[size],
                           "latency_us": stat(3.5)})
            if size > 1:
                for threads, bw in ((256, 2.0e12), (512, PEAK)):
                    floors.append({"kind": "dsmem_read", "config": config, "cluster_size": size,
                                   "clusters": clusters[size], "threads": threads, "pattern": "neighbour",
                                   "pass_us": stat(size * clusters[size] * 131072 / bw * 1e6),
                                   "bandwidth_bytes_per_s": stat(bw)})
            for dtype, itemsize in ITEMSIZE.items():
                for nbytes in BYTES:
                    n = nbytes // itemsize
                    common = {"config": config, "cluster_size": size, "dtype": dtype, "message_bytes": nbytes, "n": n,
                              "clusters": clusters[size]}
                    per_op = {**common, "primitive": "reduce", "method": "per_op", "working_bytes": 4 * n}
                    for impl in (*report.REDUCE_PUBLIC, *report.REDUCE_VARIANTS):
                        rec = dict(per_op, implementation=impl, family=report.family(impl))
                        if impl == "bulk" and size * nbytes > 16384:
                            rec["skipped"] = "needs too much shared memory"
                        else:
                            timed(rec, stat(cluster_us("reduce", impl, size, 4 * n)))
                        measurements.append(rec)
                    for impl, us in (("global_kernel_boundary", 6.0), ("global_grid_barrier", 3.0)):
                        measurements.append(timed(dict(per_op, implementation=impl, family=report.family(impl)),
                                                  stat(us)))
                    measurements.append(dict(common, primitive="reduce", method="per_op", implementation="torch",
                                             family="torch", latency_us=stat(5.0)))
                    for impl, us in (("direct", 4.0), ("ring", 5.0), ("butterfly", 4.5), ("bulk", 4.2),
                                     ("global_kernel_boundary", 9.0), ("torch", 7.0)):
                        measurements.append(dict(primitive="reduce", method="single_launch", implementation=impl,
                                                 family=report.family(impl), latency_us=stat(us), **common))
                    for impl in report.GATHER_PER_OP:
                        rec = dict(common, primitive="gather", method="per_op", implementation=impl,
                                   family=report.family(impl))
                        if size * nbytes > 131072:
                            rec["skipped"] = "needs too much shared memory"
                        else:  # float16's direct gather is made slow, so its ranking differs from bfloat16's
                            slow = 10 if (dtype, impl) == ("float16", "direct") else 1
                            timed(rec, stat(slow * cluster_us("gather", impl, size, nbytes)))
                        measurements.append(rec)
    results = {
        "schema": report.SCHEMA,
        "system": {"gpu": "Test GPU", "driver_version": "1.0"},
        "clocks_seen": {"clocks.sm": stat(1755.0)},
        "commit": "0123456789abcdef",
        "date": "2026-11-27T00:00:00+00:00",
        "settings": {"cluster_sizes": list(SIZES), "message_bytes": list(BYTES), "dtypes": list(ITEMSIZE),
                     "configs": ["one", "chip"], "repeats": 7},
        "floors": floors,
        "measurements": measurements,
    }
    return report.complete(results)


@pytest.fixture(scope="module")
def results():
    return synthetic_results()


def rows_of(targets, name, **fields):
    return [t for t in targets if t["target"] == name and all(t[k] == v for k, v in fields.items())]


def test_records_match_a_linear_scan_and_follow_appended_records():
    results = synthetic_results()
    rng = np.random.default_rng()
    measurements = results["measurements"]

    def scanned(**criteria):
        return [r for r in measurements if "latency_us" in r and all(r.get(k) == v for k, v in criteria.items())]

    timed_ones = [r for r in measurements if "latency_us" in r]
    for r in rng.choice(timed_ones, size=20, replace=False):
        full = {field: r[field] for field in report.INDEXED_FIELDS}
        for criteria in (full, {**full, "cluster_size": r["cluster_size"]}, {"implementation": r["implementation"]}):
            found = report.records(results, **criteria)
            assert found == scanned(**criteria) and r in found
    first = timed_ones[0]
    query = {field: first[field] for field in report.INDEXED_FIELDS}
    before = report.records(results, **query)
    added = {**first, "cluster_size": 99}
    measurements.append(added)  # the index built above must not hide it
    assert report.records(results, **query) == [*before, added]
    assert report.record(results, **query, cluster_size=99) is added


def test_barrier_counts_follow_the_simulator_trace():
    counts = report.barrier_counts((1, 2, 3, 4, 16))
    assert counts["reduce"]["direct"] == {"1": 2, "2": 2, "3": 2, "4": 2, "16": 2}
    assert counts["reduce"]["ring"] == {str(n): max(1, 2 * n - 1) for n in (1, 2, 3, 4, 16)}
    assert counts["reduce"]["butterfly"]["4"] == 3 and counts["reduce"]["butterfly"]["3"] == 4
    assert counts["gather"]["ring"]["16"] == 16
    assert counts["reduce"]["direct_1barrier"]["16"] == 1 and counts["reduce"]["two_shot_2barrier"]["16"] == 2
    assert counts["reduce"]["bulk_two_shot_0barrier"]["16"] == 0
    assert counts["reduce"]["direct_push"]["16"] == 0


def test_the_steady_reduces_are_public_and_direct_push_a_variant():
    assert report.REDUCE_PUBLIC == (*simulator.REDUCE_ALGORITHMS, "direct_1barrier", "two_shot_2barrier",
                                    "bulk_two_shot_0barrier")
    assert report.family("direct_1barrier") == "cluster" and report.family("direct_push") == "variant"
    assert "direct_1barrier" in report.REDUCE_PER_OP and "direct_1barrier" not in report.VARIANTS


def test_dsmem_peak_takes_the_fastest_configuration(results):
    peak = report.dsmem_peak(results, "chip", 2)
    assert peak["threads"] == 512 and peak["bandwidth_bytes_per_s"]["median"] == pytest.approx(PEAK)
    assert report.dsmem_peak(results, "chip", 1) is None


def test_dsmem_peak_ranks_by_median_not_by_max():
    """A noisy read pattern whose max beats the peak's but whose median does not is not the peak."""
    results = synthetic_results()
    for r in results["floors"]:
        if (r["kind"], r.get("config"), r.get("cluster_size"), r.get("threads")) == ("dsmem_read", "chip", 2, 256):
            r["bandwidth_bytes_per_s"] = Stat(3.0e12, 1.0e12, 9.0e12, 7).as_dict()
    peak = report.dsmem_peak(results, "chip", 2)
    assert peak["threads"] == 512 and peak["bandwidth_bytes_per_s"]["median"] == pytest.approx(PEAK)


def test_small_reduce_target_is_the_fastest_public_reduce_over_one_barrier(results):
    rows = rows_of(results["targets"], "small_reduce_vs_barrier", dtype="float32")
    assert {t["cluster_size"] for t in rows} == {2, 3, 8, 16}  # N = 1 has nothing to exchange
    assert {t["message_bytes"] for t in rows} == {64, 1024}  # up to 2 KiB
    assert {(t["config"], t["cluster_size"], t["message_bytes"]) for t in rows} == {
        (c, s, b) for c in ("one", "chip") for s in (2, 3, 8, 16) for b in (64, 1024)}
    # direct_push is faster still, but a benchmark variant
    assert {t["implementation"] for t in rows} == {"direct_1barrier"}
    row = rows_of(rows, "small_reduce_vs_barrier", config="chip", cluster_size=2, message_bytes=1024)[0]
    per_op = cluster_us("reduce", "direct_1barrier", 2, 1024)
    assert row["value"] == pytest.approx(per_op / 0.4) and row["threshold"] == 3 and row["pass"] is True
    assert row["per_op_us"]["median"] == pytest.approx(per_op) and row["barrier_us"]["median"] == 0.4
    miss = rows_of(rows, "small_reduce_vs_barrier", config="chip", cluster_size=3, message_bytes=1024)[0]
    assert miss["value"] == pytest.approx(cluster_us("reduce", "direct_1barrier", 3, 1024) / 0.15)
    assert miss["value"] > 3 and miss["pass"] is False


def test_small_reduce_allows_5_barriers_beyond_8_blocks(results):
    row = rows_of(results["targets"], "small_reduce_vs_barrier", config="chip", cluster_size=16, message_bytes=64,
                  dtype="float32")[0]
    assert row["threshold"] == 5 and 3 < row["value"] <= 5 and row["pass"] is True
    assert row["value"] == pytest.approx(cluster_us("reduce", "direct_1barrier", 16, 64) / 0.25)
    assert all(t["threshold"] == 3 for t in rows_of(results["targets"], "small_reduce_vs_barrier")
               if t["cluster_size"] <= 8)


def test_a_message_of_exactly_the_small_limit_gets_a_small_reduce_row():
    """SMALL_MESSAGE_BYTES (2 KiB per block) is itself a small message."""
    results = synthetic_results()
    results["settings"]["message_bytes"] = [*BYTES, report.SMALL_MESSAGE_BYTES]
    template = report.record(results, primitive="reduce", method="per_op", implementation="direct_1barrier",
                             config="chip", cluster_size=2, dtype="float32", message_bytes=1024)
    n = report.SMALL_MESSAGE_BYTES // 4
    results["measurements"].append(timed(dict(template, message_bytes=report.SMALL_MESSAGE_BYTES, n=n,
                                              working_bytes=4 * n), stat(0.6)))
    rows = rows_of(report.evaluate_targets(results), "small_reduce_vs_barrier", config="chip", cluster_size=2,
                   message_bytes=report.SMALL_MESSAGE_BYTES)
    assert len(rows) == 1 and rows[0]["implementation"] == "direct_1barrier"
    assert rows[0]["value"] == pytest.approx(0.6 / 0.4) and rows[0]["pass"] is True


def test_a_faster_public_reduce_wins_the_small_target():
    results = synthetic_results()
    point = dict(primitive="reduce", method="per_op", config="chip", cluster_size=2, dtype="float32",
                 message_bytes=1024)
    retime(results, stat(0.1), implementation="ring", **point)
    row = rows_of(report.evaluate_targets(results), "small_reduce_vs_barrier", config="chip", cluster_size=2,
                  message_bytes=1024, dtype="float32")[0]
    assert row["implementation"] == "ring" and row["value"] == pytest.approx(0.1 / 0.4)


def test_large_reduce_target_compares_bus_bandwidth_with_the_dsmem_peak(results):
    rows = rows_of(results["targets"], "large_reduce_vs_dsmem_bound", dtype="float32")
    assert {(t["cluster_size"], t["message_bytes"]) for t in rows} == {(s, 16384) for s in (2, 3, 8, 16)}
    row = rows_of(rows, "large_reduce_vs_dsmem_bound", config="chip", cluster_size=8)[0]
    bus = 2 * 7 / 8 * 16384 * 8 * (132 // 8) / cluster_us("reduce", "direct_1barrier", 8, 16384) * 1e6
    assert row["implementation"] == "direct_1barrier"
    assert row["value"] == pytest.approx(bus / PEAK) and row["threshold"] == 0.7 and row["pass"] is False
    assert row["bus_bandwidth_bytes_per_s"]["median"] == pytest.approx(bus)
    assert row["peak_bytes_per_s"]["median"] == pytest.approx(PEAK)


def test_a_faster_public_reduce_can_meet_the_large_target():
    results = synthetic_results()
    blocks = 2 * (132 // 2)
    us = 16384 * blocks / (0.8 * PEAK) * 1e6  # 80% of the peak: 2 (N-1)/N = 1 at N = 2
    retime(results, stat(us), primitive="reduce", method="per_op", implementation="two_shot", config="chip",
           cluster_size=2, dtype="float32", message_bytes=16384)
    row = rows_of(report.evaluate_targets(results), "large_reduce_vs_dsmem_bound", config="chip", cluster_size=2,
                  dtype="float32")[0]
    assert row["implementation"] == "two_shot" and row["value"] == pytest.approx(0.8) and row["pass"] is True


def test_exactly_70_percent_of_the_dsmem_peak_meets_the_large_target():
    """The large reduce target is ``>= 0.7``: a bus bandwidth of exactly 0.7 x the peak passes."""
    results = synthetic_results()
    bus_bytes = 16384 * 2 * (132 // 2)  # 2 (N-1)/N = 1 at N = 2
    us = bus_bytes * 1e6 / (0.7 * PEAK)  # 0.7 x 3.5e12 = 2.45e12 and back are exact in floats
    retime(results, stat(us), primitive="reduce", method="per_op", implementation="direct_1barrier", config="chip",
           cluster_size=2, dtype="float32", message_bytes=16384)
    row = rows_of(report.evaluate_targets(results), "large_reduce_vs_dsmem_bound", config="chip", cluster_size=2,
                  dtype="float32")[0]
    assert row["implementation"] == "direct_1barrier" and row["value"] == 0.7 and row["pass"] is True


def test_every_dtype_gets_its_reduce_rows_judged_on_its_own_records(results):
    """A 16-bit message of B bytes reduced as float32 rows is the float32 reduce of 2B (the records' working bytes):
    its own rows, its own figures, not the float32 row of the same message size; its bus bytes are the message's
    (B), not the 2B its float32 rows moved."""
    small = rows_of(results["targets"], "small_reduce_vs_barrier", config="chip", cluster_size=8, message_bytes=1024)
    assert sorted(t["dtype"] for t in small) == sorted(ITEMSIZE)
    for row in small:
        working = 4 * 1024 // ITEMSIZE[row["dtype"]]
        assert row["value"] == pytest.approx(cluster_us("reduce", "direct_1barrier", 8, working) / 0.4)
    assert len({t["value"] for t in small}) == 2  # float16 and bfloat16 share their records' working bytes
    large = rows_of(results["targets"], "large_reduce_vs_dsmem_bound", config="chip", cluster_size=8, dtype="bfloat16")[0]
    bus = 2 * 7 / 8 * 16384 * 8 * (132 // 8) / cluster_us("reduce", "direct_1barrier", 8, 32768) * 1e6
    assert large["message_bytes"] == 16384 and large["value"] == pytest.approx(bus / PEAK)
    results_text = report.format_summary(results)
    assert "small_reduce_vs_barrier (chip)" in results_text and "bfloat16" in results_text


def test_gather_target_takes_the_fastest_public_gather_from_16_kib(results):
    rows = rows_of(results["targets"], "gather_vs_dsmem_peak")
    assert {t["dtype"] for t in rows} == set(ITEMSIZE) and {t["cluster_size"] for t in rows} == {2, 3, 8, 16}
    assert all(t["implementation"] in simulator.GATHER_ALGORITHMS for t in rows)  # direct_v4 is faster
    assert all(t["message_bytes"] == (1024 if t["cluster_size"] == 16 else 16384) for t in rows)  # 16 x 16 KiB: too big
    row = rows_of(rows, "gather_vs_dsmem_peak", config="chip", cluster_size=8, dtype="float32")[0]
    bus = 7 * 16384 * 8 * (132 // 8) / cluster_us("gather", "direct", 8, 16384) * 1e6
    assert row["implementation"] == "direct" and row["value"] == pytest.approx(bus / PEAK)
    assert row["threshold"] == 0.9 and row["pass"] is True
    alone = rows_of(rows, "gather_vs_dsmem_peak", config="one", cluster_size=8, dtype="float32")[0]
    assert alone["pass"] is False
    slow_direct = rows_of(rows, "gather_vs_dsmem_peak", config="chip", cluster_size=8, dtype="float16")[0]
    assert slow_direct["implementation"] == "bulk"


def test_noisy_figures_give_no_verdict():
    results = synthetic_results()
    for k, implementation in enumerate(reversed(report.REDUCE_PUBLIC)):  # none trusted: the fastest stands, unjudged
        retime(results, Stat(0.01 * (k + 1), -2.0, 3.0, 7).as_dict(), primitive="reduce", method="per_op",
               implementation=implementation, config="chip", cluster_size=2, dtype="float32", message_bytes=64)
    for r in results["floors"]:
        if (r["kind"], r.get("config"), r.get("cluster_size")) == ("barrier", "chip", 8):
            r["latency_us"] = stat(0.4, spread=0.9)
    targets = report.evaluate_targets(results)
    unjudged = rows_of(targets, "small_reduce_vs_barrier", config="chip", cluster_size=2, message_bytes=64,
                       dtype="float32")[0]
    assert unjudged["pass"] is None and unjudged["reliable"] is False
    assert unjudged["implementation"] == report.REDUCE_PUBLIC[-1] and unjudged["value"] == pytest.approx(0.01 / 0.4)
    noisy_floor = rows_of(targets, "small_reduce_vs_barrier", config="chip", cluster_size=8)
    assert noisy_floor and all(t["pass"] is None for t in noisy_floor)
    assert all(t["pass"] is not None for t in rows_of(targets, "small_reduce_vs_barrier", config="one"))
    results["targets"] = targets
    assert f"{unjudged['value']:.2f}? {report.SHORT[report.REDUCE_PUBLIC[-1]]}" in report.format_summary(results)


def test_a_noisy_figure_faster_than_the_winner_withholds_the_verdict():
    results = synthetic_results()
    point = dict(primitive="reduce", method="per_op", config="chip", dtype="float32", message_bytes=64)

    def small(cluster_size):
        return rows_of(report.evaluate_targets(results), "small_reduce_vs_barrier", config="chip",
                       cluster_size=cluster_size, message_bytes=64, dtype="float32")[0]

    assert small(3)["implementation"] == "direct_1barrier" and small(3)["pass"] is False  # over 3 barriers of 0.15 µs
    retime(results, Stat(5.0, -1.0, 9.0, 7).as_dict(), implementation="ring", cluster_size=3, **point)
    assert small(3)["pass"] is False and small(3)["reliable"]  # a noisy figure slower than the winner changes nothing
    retime(results, NOISY, implementation="direct_1barrier", cluster_size=3, **point)
    withheld = small(3)
    assert withheld["implementation"] != "direct_1barrier" and withheld["pass"] is None and not withheld["reliable"]
    assert small(2)["pass"] is True
    retime(results, NOISY, implementation="direct_1barrier", cluster_size=2, **point)
    assert small(2)["pass"] is True and small(2)["reliable"]  # the slower winner passes: so would a faster one


def test_global_comparison_is_the_fastest_baseline_over_the_fastest_cluster_reduce(results):
    rows = results["global_comparison"]
    assert {c["cluster_size"] for c in rows} == {2, 3, 8, 16} and {c["message_bytes"] for c in rows} == set(BYTES)
    assert all("target" not in c and "pass" not in c for c in rows)  # a comparison, not a target
    per_op = [c for c in rows if c["method"] == "per_op"]
    assert {(c["cluster"], c["baseline"]) for c in per_op} == {("direct_1barrier", "global_grid_barrier")}
    one = next(c for c in per_op if (c["config"], c["cluster_size"], c["message_bytes"]) == ("chip", 2, 1024))
    assert one["speedup"] == pytest.approx(3.0 / cluster_us("reduce", "direct_1barrier", 2, 1024))
    assert one["reliable"] and one["baseline_us"]["median"] == 3.0
    single = [c for c in rows if c["method"] == "single_launch"]
    assert len(single) == len(per_op)
    assert all(c["cluster"] == "direct" and c["baseline"] == "global_kernel_boundary"
               and c["speedup"] == pytest.approx(9.0 / 4.0) for c in single)


def test_global_comparison_follows_the_figures():
    results = synthetic_results()
    point = dict(primitive="reduce", method="per_op", config="chip", cluster_size=3, dtype="float32",
                 message_bytes=64)
    retime(results, stat(1.0), implementation="global_kernel_boundary", **point)
    for baseline in ("global_grid_barrier", "global_kernel_boundary"):
        retime(results, NOISY, implementation=baseline, **dict(point, message_bytes=1024))
    rows = {(c["method"], c["config"], c["cluster_size"], c["message_bytes"]): c
            for c in report.global_comparison(results)}
    faster = rows[("per_op", "chip", 3, 64)]
    assert faster["baseline"] == "global_kernel_boundary"
    assert faster["speedup"] == pytest.approx(1.0 / cluster_us("reduce", "direct_1barrier", 3, 64))
    assert rows[("per_op", "chip", 3, 1024)]["reliable"] is False


def test_choice_table_ranks_primitives_only_and_puts_unmeasured_last(results):
    choice = results["choice"]
    assert choice["config"] == "chip"
    for row in choice["reduce"]:
        assert sorted(row["ranking"]) == sorted(simulator.REDUCE_ALGORITHMS)
        timed_here = [a for a in row["ranking"] if a in row["latency_us"]]
        assert [row["latency_us"][a] for a in timed_here] == sorted(row["latency_us"].values())
        assert row["ranking"][: len(timed_here)] == timed_here
    big = next(r for r in choice["reduce"] if r["cluster_size"] == 8 and r["working_bytes"] == 32768)
    assert big["ranking"][-1] == "bulk" and "bulk" not in big["latency_us"]
    small = next(r for r in choice["reduce"] if r["cluster_size"] == 2 and r["working_bytes"] == 64)
    assert small["ranking"][0] == "ring"
    assert {r["itemsize"] for r in choice["gather"]} == {2, 4}


def test_gather_choice_ranks_2_byte_elements_on_bfloat16(results):
    rows = [r for r in results["choice"]["gather"] if r["itemsize"] == 2]
    assert len(rows) == len({(r["cluster_size"], r["message_bytes"]) for r in rows})  # one dtype, one row
    for r in rows:
        assert r["latency_us"]["direct"] == pytest.approx(
            cluster_us("gather", "direct", r["cluster_size"], r["message_bytes"]))  # not float16's, 10 x slower
    without_bfloat16 = synthetic_results()
    without_bfloat16["measurements"] = [r for r in without_bfloat16["measurements"] if r["dtype"] != "bfloat16"]
    half = [r for r in report.choice_tables(without_bfloat16)["gather"] if r["itemsize"] == 2]
    assert len(half) == len(rows) and all(r["latency_us"]["direct"] == pytest.approx(
        10 * cluster_us("gather", "direct", r["cluster_size"], r["message_bytes"])) for r in half)


def test_results_survive_a_json_round_trip(results):
    again = json.loads(json.dumps(results))
    assert report.evaluate_targets(again) == json.loads(json.dumps(results["targets"]))
    assert report.global_comparison(again) == json.loads(json.dumps(results["global_comparison"]))


def test_text_tables_name_every_implementation_and_target(results):
    sweep = report.format_sweep(results)
    for implementation in (*simulator.REDUCE_ALGORITHMS, "direct_1barrier", "global_grid_barrier", "torch",
                           "direct_v4"):
        assert implementation in sweep
    summary = report.format_summary(results)
    for name in report.TARGETS:
        assert f"{name} (chip)" in summary and f"{name} (one)" in summary
    assert "reduce_vs_global, per op (chip)" in summary and "reduce_vs_global, single launch (one)" in summary
    assert "torch.sum" in summary  # what the torch column is, beside the comparison
    miss = cluster_us("reduce", "direct_1barrier", 3, 1024) / 0.15
    assert f"{miss:.2f}* 1barrier" in summary  # a miss is starred, with the fastest implementation
    assert f"{9.0 / 4.0:.2f}" in summary and "bfloat16" in summary
    assert "fastest reduce per operation" in summary and "Test GPU" in summary


def test_sweep_table_puts_each_figure_under_its_implementation(results):
    """Each cell of the per-operation reduce table (N = 2, 1 KiB) is its column's implementation's median, as
    ``{:.2f}``; the barrier column is the bare cluster barrier."""
    lines = report.format_sweep(results).split("\n\n")[0].splitlines()[1:]
    spans = [m.span() for m in re.finditer("-+", lines[1])]  # the dashes line marks every column

    def cells(line):
        return [line[a:b].strip() for a, b in spans]

    header = cells(lines[0])
    row = next(dict(zip(header, cells(line))) for line in lines[2:] if cells(line)[:2] == ["2", "1 KiB"])
    assert header[:3] == ["N", "bytes", "barrier"] and row["barrier"] == "0.40"
    point = dict(primitive="reduce", method="per_op", config="chip", cluster_size=2, dtype="float32",
                 message_bytes=1024)
    assert row["direct_1barrier"] == f"{cluster_us('reduce', 'direct_1barrier', 2, 1024):.2f}"
    for implementation in report.REDUCE_PER_OP:
        assert row[implementation] == f"{report.latency(results, implementation=implementation, **point).median:.2f}"


@pytest.mark.parametrize("nbytes, text", [(64, "64 B"), (1000, "1000 B"), (1023, "1023 B"), (1024, "1 KiB"),
                                         (65536, "64 KiB")])
def test_message_sizes_print_in_bytes_below_1_kib_and_in_kib_from_it(nbytes, text):
    assert report._bytes(nbytes) == text


def test_the_command_line_judges_a_file_by_todays_targets(results, tmp_path, capsys):
    stale = dict(results, targets=[], global_comparison=[])  # what a file written before these targets holds
    path = tmp_path / "primitives_test.json"
    path.write_text(json.dumps(stale))
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "small_reduce_vs_barrier (chip)" in out and "reduce_vs_global, per op (chip)" in out


def test_plots_are_written(results, tmp_path):
    paths = report.plot_all(results, tmp_path, "test")
    assert {p.name for p in paths} == {
        "primitives_reduce_latency_test.png", "primitives_gather_latency_test.png",
        "primitives_single_launch_test.png", "primitives_bandwidth_test.png",
    }
    assert all(p.stat().st_size > 10_000 for p in paths)
    labels = report._bandwidth_figure(results, "chip").axes[0].get_legend_handles_labels()[1]
    assert {"direct", "direct bf16", "direct fp16"} <= set(labels)


def test_written_auto_table_chooses_from_the_results(results, tmp_path):
    path = report.write_json(report.auto_table(results), tmp_path / "auto_table.json")
    source, reduce_ranking, gather_ranking = auto.load_table(path)
    assert source["card"] == "Test GPU"
    assert auto.choose_reduce_algorithm(2, 64, reduce_ranking) == "ring"
    assert auto.choose_reduce_algorithm(2, 70, reduce_ranking) == "ring"
    assert auto.choose_reduce_algorithm(8, 1 << 20, reduce_ranking) != "bulk"  # bulk's rows would not fit
    assert auto.choose_gather_algorithm(3, 16384, itemsize=2, ranking=gather_ranking) in simulator.GATHER_ALGORITHMS


def test_only_agreeing_repeats_are_trusted():
    assert report.reliable(Stat(1.0, 0.9, 1.2, 7))
    assert report.reliable(Stat(2.0, 1.5, 2.5, 5))  # a spread of exactly half the median is still trusted
    assert not report.reliable(Stat(1.0, 0.4, 1.2, 7))  # spread wider than half the median
    assert not report.reliable(Stat(0.5, -0.1, 0.6, 7))  # a negative slope is no measurement
    assert not report.reliable(None)


def test_a_noisy_figure_is_not_the_fastest_and_its_point_borrows_a_ranking():
    results = synthetic_results()
    retime(results, NOISY, primitive="reduce", method="per_op", implementation="bulk", config="chip", cluster_size=2,
           dtype="float32", message_bytes=1024)
    row = rows_of(report.evaluate_targets(results), "small_reduce_vs_barrier", config="chip", cluster_size=2,
                  message_bytes=1024, dtype="float32")[0]
    assert row["implementation"] == "direct_1barrier" and row["pass"] is True
    rows = {(r["cluster_size"], r["working_bytes"]): r for r in report.choice_tables(results)["reduce"]}
    noisy_row = rows[(2, 1024)]
    assert noisy_row["ranking_from_bytes"] == 2048  # the nearest message size with reliable figures only
    assert noisy_row["ranking"] == rows[(2, 2048)]["ranking"] and noisy_row["ranking"][0] != "bulk"
    assert "0.01?" in report.format_sweep(results)
