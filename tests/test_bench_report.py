"""The benchmark report on made-up results: targets, choice tables, tables, plots and the auto module (CPU only)."""

import json

import pytest

from clusterlab import simulator
from clusterlab.bench import report
from clusterlab.bench.timing import Stat
from clusterlab.primitives import auto

SIZES = (1, 2, 3, 8)
BYTES = (64, 1024, 16384)


def stat(median, spread=0.05):
    return Stat(median, median * (1 - spread), median * (1 + spread), 7).as_dict()


#: Made-up per-op µs: ring is fastest for small messages, direct for large ones.
def cluster_us(primitive, implementation, size, nbytes):
    base = {"direct": 1.0, "ring": 0.8, "butterfly": 0.9, "bulk": 1.1, "two_shot": 1.3, "direct_1barrier": 0.5,
            "direct_v4": 0.9}
    per_byte = {"direct": 1e-5, "ring": 1e-3, "butterfly": 5e-4, "bulk": 2e-5, "two_shot": 3e-5, "direct_1barrier": 1e-5,
                "direct_v4": 5e-6}
    return base[implementation] * (1 + size / 16) + per_byte[implementation] * nbytes * size


def synthetic_results():
    floors = [{"kind": "copy", "bandwidth_bytes_per_s": stat(3.0e12)}]
    measurements = []
    for config in ("one", "chip"):
        clusters = {s: (1 if config == "one" else 132 // s) for s in SIZES}
        for size in SIZES:
            floors.append({"kind": "barrier", "config": config, "cluster_size": size, "clusters": clusters[size],
                           "latency_us": stat(0.4)})
            floors.append({"kind": "launch", "config": config, "cluster_size": size, "clusters": clusters[size],
                           "latency_us": stat(3.5)})
            if size > 1:
                for threads, bw in ((256, 2.0e12), (512, 3.5e12)):
                    floors.append({"kind": "dsmem_read", "config": config, "cluster_size": size,
                                   "clusters": clusters[size], "threads": threads, "pattern": "neighbour",
                                   "pass_us": stat(size * clusters[size] * 131072 / bw * 1e6),
                                   "bandwidth_bytes_per_s": stat(bw)})
            for dtype, itemsize in (("float32", 4), ("float16", 2)):
                for nbytes in BYTES:
                    n = nbytes // itemsize
                    common = {"config": config, "cluster_size": size, "dtype": dtype, "message_bytes": nbytes, "n": n,
                              "clusters": clusters[size]}
                    for impl in (*simulator.REDUCE_ALGORITHMS, "direct_1barrier"):
                        us = cluster_us("reduce", impl, size, 4 * n)
                        rec = dict(primitive="reduce", method="per_op", implementation=impl,
                                   family=report.family(impl), working_bytes=4 * n, latency_us=stat(us), **common)
                        if impl == "bulk" and size * nbytes > 16384:
                            rec = {k: v for k, v in rec.items() if k != "latency_us"}
                            rec["skipped"] = "needs too much shared memory"
                        measurements.append(rec)
                    for impl, us in (("global_kernel_boundary", 6.0), ("global_grid_barrier", 3.0), ("torch", 5.0)):
                        measurements.append(dict(primitive="reduce", method="per_op", implementation=impl,
                                                 family=report.family(impl), latency_us=stat(us), **common))
                    for impl, us in (("direct", 4.0), ("ring", 5.0), ("butterfly", 4.5), ("bulk", 4.2),
                                     ("global_kernel_boundary", 9.0), ("torch", 7.0)):
                        measurements.append(dict(primitive="reduce", method="single_launch", implementation=impl,
                                                 family=report.family(impl), latency_us=stat(us), **common))
                    for impl in (*simulator.GATHER_ALGORITHMS, "direct_v4"):
                        us = cluster_us("gather", impl, size, nbytes)
                        rec = dict(primitive="gather", method="per_op", implementation=impl,
                                   family=report.family(impl), latency_us=stat(us), **common)
                        if size > 1:
                            bus = (size - 1) * nbytes * size * clusters[size]
                            per_op = Stat.from_dict(rec["latency_us"])
                            rec["bus_bandwidth_bytes_per_s"] = per_op.inverse(bus * 1e6).as_dict()
                        measurements.append(rec)
    results = {
        "schema": report.SCHEMA,
        "system": {"gpu": "Test GPU", "driver_version": "1.0"},
        "clocks_seen": {"clocks.sm": stat(1755.0)},
        "commit": "0123456789abcdef",
        "date": "2026-11-27T00:00:00+00:00",
        "settings": {"cluster_sizes": list(SIZES), "message_bytes": list(BYTES), "dtypes": ["float32", "float16"],
                     "configs": ["one", "chip"], "repeats": 7},
        "floors": floors,
        "measurements": measurements,
    }
    results["barriers_per_op"] = report.barrier_counts(SIZES)
    results["targets"] = report.evaluate_targets(results)
    results["choice"] = report.choice_tables(results)
    return results


@pytest.fixture(scope="module")
def results():
    return synthetic_results()


def test_barrier_counts_follow_the_simulator_trace():
    counts = report.barrier_counts((1, 2, 3, 4, 16))
    assert counts["reduce"]["direct"] == {"1": 2, "2": 2, "3": 2, "4": 2, "16": 2}
    assert counts["reduce"]["ring"] == {str(n): max(1, 2 * n - 1) for n in (1, 2, 3, 4, 16)}
    assert counts["reduce"]["butterfly"]["4"] == 3 and counts["reduce"]["butterfly"]["3"] == 4
    assert counts["gather"]["ring"]["16"] == 16
    assert counts["reduce"]["direct_1barrier"]["16"] == 1
    assert counts["reduce"]["direct_push"]["16"] == 0


def test_dsmem_peak_takes_the_fastest_configuration(results):
    peak = report.dsmem_peak(results, "chip", 2)
    assert peak["threads"] == 512 and peak["bandwidth_bytes_per_s"]["median"] == pytest.approx(3.5e12)
    assert report.dsmem_peak(results, "chip", 1) is None


def test_reduce_vs_barrier_target_compares_per_op_with_one_barrier(results):
    rows = [t for t in results["targets"] if t["target"] == "reduce_vs_barrier"]
    assert {t["cluster_size"] for t in rows} == {1, 2, 3, 8}  # sizes up to 8 only
    row = next(t for t in rows if t["implementation"] == "ring" and t["cluster_size"] == 3 and t["config"] == "chip")
    per_op = cluster_us("reduce", "ring", 3, 1024)
    assert row["value"] == pytest.approx(per_op / 0.4)
    assert row["pass"] == (per_op / 0.4 <= 1.5)
    assert row["barriers_per_op"] == 5
    assert row["per_barrier_ratio"] == pytest.approx(per_op / (5 * 0.4))
    variant = next(t for t in rows if t["implementation"] == "direct_1barrier" and t["cluster_size"] == 1)
    assert variant["pass"] is (variant["value"] <= 1.5)


def test_global_targets_use_the_fastest_cluster_algorithm(results):
    rows = [t for t in results["targets"] if t["target"] == "reduce_vs_global_per_op" and t["config"] == "one"
            and t["cluster_size"] == 2 and t["baseline"] == "global_kernel_boundary"]
    best = min(simulator.REDUCE_ALGORITHMS, key=lambda a: cluster_us("reduce", a, 2, 1024))
    first = next(t for t in rows if t["implementation"] == best)
    assert first["value"] == pytest.approx(6.0 / cluster_us("reduce", best, 2, 1024))
    single = [t for t in results["targets"] if t["target"] == "reduce_vs_global_single_launch"]
    assert all(t["implementation"] == "direct" and t["value"] == pytest.approx(9.0 / 4.0) and not t["pass"]
               for t in single)


def test_gather_target_uses_the_largest_message_and_the_same_size_peak(results):
    rows = [t for t in results["targets"] if t["target"] == "gather_vs_dsmem_peak"]
    assert rows and all(t["message_bytes"] == max(BYTES) and t["cluster_size"] > 1 for t in rows)
    row = next(t for t in rows if t["implementation"] == "direct_v4" and t["cluster_size"] == 8
               and t["config"] == "chip" and t["dtype"] == "float32")
    us = cluster_us("gather", "direct_v4", 8, max(BYTES))
    bus = 7 * max(BYTES) * 8 * (132 // 8) / us * 1e6
    assert row["value"] == pytest.approx(bus / 3.5e12)
    assert row["pass"] == (row["value"] >= 0.8)


def test_choice_table_ranks_primitives_only_and_puts_unmeasured_last(results):
    choice = results["choice"]
    assert choice["config"] == "chip"
    for row in choice["reduce"]:
        assert sorted(row["ranking"]) == sorted(simulator.REDUCE_ALGORITHMS)
        timed = [a for a in row["ranking"] if a in row["latency_us"]]
        assert [row["latency_us"][a] for a in timed] == sorted(row["latency_us"].values())
        assert row["ranking"][: len(timed)] == timed
    big = next(r for r in choice["reduce"] if r["cluster_size"] == 8 and r["working_bytes"] == 32768)
    assert big["ranking"][-1] == "bulk" and "bulk" not in big["latency_us"]
    small = next(r for r in choice["reduce"] if r["cluster_size"] == 2 and r["working_bytes"] == 64)
    assert small["ranking"][0] == "ring"
    assert {r["itemsize"] for r in choice["gather"]} == {2, 4}


def test_results_survive_a_json_round_trip(results):
    again = json.loads(json.dumps(results))
    assert report.evaluate_targets(again) == json.loads(json.dumps(results["targets"]))


def test_text_tables_name_every_implementation_and_target(results):
    sweep = report.format_sweep(results)
    for implementation in (*simulator.REDUCE_ALGORITHMS, "direct_1barrier", "global_grid_barrier", "torch",
                           "direct_v4"):
        assert implementation in sweep
    summary = report.format_summary(results)
    for name in report.TARGETS:
        assert f"{name} (chip)" in summary
    ring_ratio = cluster_us("reduce", "ring", 8, 1024) / 0.4
    assert f"{ring_ratio:.2f}*" in summary  # a miss is starred
    assert "fastest reduce per operation" in summary and "Test GPU" in summary


def test_plots_are_written(results, tmp_path):
    paths = report.plot_all(results, tmp_path, "test")
    assert {p.name for p in paths} == {
        "primitives_reduce_latency_test.png", "primitives_gather_latency_test.png",
        "primitives_single_launch_test.png", "primitives_bandwidth_test.png",
    }
    assert all(p.stat().st_size > 10_000 for p in paths)


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
    assert not report.reliable(Stat(1.0, 0.4, 1.2, 7))  # spread wider than half the median
    assert not report.reliable(Stat(0.5, -0.1, 0.6, 7))  # a negative slope is no measurement
    assert not report.reliable(None)


def test_a_noisy_figure_gets_no_verdict_and_its_point_borrows_a_ranking():
    results = synthetic_results()
    noisy = Stat(0.01, -2.0, 3.0, 7).as_dict()  # would be the fastest by its median
    for r in results["measurements"]:
        if (r["implementation"], r["config"], r["cluster_size"], r["dtype"], r["message_bytes"], r["method"]) == (
            "bulk", "chip", 2, "float32", 1024, "per_op"
        ):
            r["latency_us"] = noisy
    targets = report.evaluate_targets(results)
    row = next(t for t in targets if t["target"] == "reduce_vs_barrier" and t["implementation"] == "bulk"
               and t["config"] == "chip" and t["cluster_size"] == 2)
    assert row["pass"] is None and row["reliable"] is False
    best = next(t for t in targets if t["target"] == "reduce_vs_global_per_op" and t["side"] == "best"
                and t["config"] == "chip" and t["cluster_size"] == 2)
    assert best["implementation"] != "bulk"
    rows = {(r["cluster_size"], r["working_bytes"]): r for r in report.choice_tables(results)["reduce"]}
    noisy_row = rows[(2, 1024)]
    assert noisy_row["ranking_from_bytes"] == 2048  # the nearest message size with reliable figures only
    assert noisy_row["ranking"] == rows[(2, 2048)]["ranking"] and noisy_row["ranking"][0] != "bulk"
    results["targets"] = targets
    assert "?" in report.format_summary(results) and "?" in report.format_sweep(results)

