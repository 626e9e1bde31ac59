"""The benchmark suites' arithmetic and plans, without a GPU."""

import pytest

from clusterlab import simulator
from clusterlab.bench import primitives, report
from clusterlab.bench.fused import layers_for_l2, ragged_lengths


def test_bus_bytes_follow_the_nccl_convention():
    # all-gather: N-1 rows arrive in each block; all-reduce: 2 (N-1)/N rows (float32)
    assert primitives.gather_bus_bytes(8, 256, 4) == 7 * 1024
    assert primitives.gather_bus_bytes(1, 256, 2) == 0
    assert primitives.reduce_bus_bytes(4, 256) == pytest.approx(2 * 3 / 4 * 1024)
    assert primitives.reduce_bus_bytes(1, 256) == 0


def test_shared_memory_of_each_point_matches_the_host_api():
    # direct: staged [n] + work [n]; bulk: staged + mbarrier + N slots; the steady loop: two buffers (the
    # results fold into the other one)
    assert primitives.reduce_shared_bytes("direct", 256, 4) == 2 * 256 * 4
    assert primitives.reduce_shared_bytes("bulk", 256, 4) == (256 + 4 + 4 * 256) * 4
    assert primitives.reduce_shared_bytes("direct_1barrier", 256, 4) == 2 * 256 * 4
    # the steady bulk two_shot: its one row [256], then 2 mbarriers (16 bytes) and 4 inbox rows of 64
    assert primitives.reduce_shared_bytes("bulk_two_shot_0barrier", 256, 4) == (256 + 4 + 4 * 64) * 4
    assert primitives.gather_shared_bytes("direct_v4", 100, 3, 2) == 3 * 100 * 2
    assert primitives.gather_shared_bytes("bulk", 100, 3, 2) == 3 * 104 * 2  # rows padded to 16 bytes


class _PlanOnly:
    """Stands in for a PrimitivesBench: every point "measures" 1 µs and nothing touches a GPU."""

    cluster_sizes = (1, 2, 4)

    def memo(self, key, measure):
        return {"clusters": 1, "latency_us": {"median": 1.0, "min": 1.0, "max": 1.0, "repeats": 5}}

    def __getattr__(self, name):  # barrier, reduce_per_op, ...: bound into the tasks, never called here
        return lambda *args: pytest.fail(f"the plan called {name}")


def test_the_sweep_times_every_implementation_the_report_reads_and_the_spinning_kernels_last():
    message_bytes, dtypes, configs = (64, 1024), ("float32", "float16"), ("one", "chip")
    tasks = primitives._tasks(_PlanOnly(), message_bytes, dtypes, configs)
    labels = [label for _, label, _ in tasks]
    assert len(set(labels)) == len(labels)
    records = [thunk() for _, _, thunk in tasks]
    timed = [r for r in records if "primitive" in r]
    for primitive, method, listed in (
        ("reduce", "per_op", report.REDUCE_PER_OP),
        ("gather", "per_op", report.GATHER_PER_OP),
        ("reduce", "single_launch", report.REDUCE_SINGLE_LAUNCH),
        ("gather", "single_launch", report.GATHER_SINGLE_LAUNCH),
    ):
        found = [r["implementation"] for r in timed if (r["primitive"], r["method"]) == (primitive, method)]
        assert set(found) == set(listed), (primitive, method)
        points = len(_PlanOnly.cluster_sizes) * len(message_bytes) * len(dtypes) * len(configs)
        assert len(found) == points * len(listed), (primitive, method)
    spinning = [r["implementation"] in primitives.SPINNING for r in timed]
    assert any(spinning) and all(spinning[spinning.index(True):])  # once they start, nothing else runs

    # The records carry the fields the report looks them up by: it compares them and ranks them.
    results = {
        "settings": {"cluster_sizes": list(_PlanOnly.cluster_sizes), "message_bytes": list(message_bytes),
                     "dtypes": list(dtypes), "configs": list(configs)},
        "floors": [],  # what a floor measured names its own point, so the stand-in's say nothing
        "measurements": timed,
    }
    report.complete(results)
    assert results["targets"] == []  # every target compares with a floor
    assert {c["method"] for c in results["global_comparison"]} == {"per_op", "single_launch"}
    choice = results["choice"]
    assert {row["working_bytes"] for row in choice["reduce"]} == {64, 128, 1024, 2048}  # float16: n = bytes / 2
    assert all(set(row["ranking"]) == set(simulator.REDUCE_ALGORITHMS) for row in choice["reduce"])
    assert all(set(row["ranking"]) == set(simulator.GATHER_ALGORITHMS) for row in choice["gather"])


def test_ragged_batches_spread_lengths_over_the_range_and_rotation_covers_the_l2():
    lengths = ragged_lengths(5, [1024, 4096, 32768], seed=3)
    assert sorted(lengths) == [1024, 8960, 16896, 24832, 32768]
    assert ragged_lengths(5, [1024, 32768], seed=3) == lengths  # shuffled the same way for a seed
    assert layers_for_l2(step_bytes=23 << 20, l2_bytes=60 << 20) == 8  # 3 L2s between two visits
    assert layers_for_l2(step_bytes=400 << 20, l2_bytes=60 << 20) == 1
    assert layers_for_l2(step_bytes=1 << 20, l2_bytes=60 << 20, turnover=0) == 1



def test_the_fused_plot_draws_a_line_per_kernel_a_batch_times(tmp_path, monkeypatch):
    """A run of two kernels (the rule's and one with options) at one batch: two fused lines named by
    shape and options, one PyTorch line; a run of one kernel a batch names none."""
    import dataclasses
    import json
    from pathlib import Path

    import matplotlib.axes

    from clusterlab.bench.fused import BenchRow, _plot

    record = json.loads((Path(__file__).parents[1] / "benchmarks/results/fused_h200_split_positions_b4.json")
                        .read_text())
    rows = [BenchRow(**{k: v for k, v in r.items() if k in BenchRow.__dataclass_fields__}) for r in record["rows"]]
    drawn = []  # the label of every line drawn
    torch_lengths = []  # the KV lengths of the last plot's PyTorch lines
    plot = matplotlib.axes.Axes.plot

    def recording_plot(ax, *args, label=None, **kwargs):
        drawn.append(label)
        if label and label.startswith("PyTorch"):
            torch_lengths.append(list(args[0]))
        return plot(ax, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)

    def labels(rows, name):
        drawn.clear()
        torch_lengths.clear()
        _plot(rows, record, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0
        return [label for label in drawn if label]

    both = labels(rows, "both.png")
    assert both.count("fused, batch 4 16x4x2") == 1 and both.count("fused, batch 4 16x4x2 [split_positions=True]") == 1
    assert both.count("fused, batch 4 8x4x7 [split_positions=True]") == 1 and both.count("PyTorch graph, batch 4") == 2
    assert labels([r for r in rows if not r.options], "rule.png") == [
        "fused, batch 4", "PyTorch graph, batch 4"] * 2
    # the rule's kernel changing shape with the length (the long-cache shape from 32K): a fused line
    # for each shape, the PyTorch line over every length
    rule = [dataclasses.replace(r, cluster_size=16, warps=8, head_split=1) if r.kv_len >= 32768 else r
            for r in rows if not r.options and r.preset == "llama3-8b"]
    assert labels(rule, "long.png") == ["fused, batch 4 16x4x2", "fused, batch 4 16x8x1", "PyTorch graph, batch 4"]
    assert torch_lengths == [sorted({r.kv_len for r in rule})]


def test_a_fused_run_lists_its_kernels_and_rows_in_the_order_it_times_them():
    from clusterlab.bench.fused import bench_cases, bench_kernels

    kernels = list(bench_kernels(("llama3-8b", "qwen2.5-7b"), (1, 4), ("float16",), [(16, 8, 1), ()],
                                 [{}, {"registers": 168}]))
    assert len(kernels) == 2 * 2 * 2 * 2
    assert kernels[0] == ("llama3-8b", "float16", 1, {"cluster_size": 16, "warps": 8, "head_split": 1})
    assert kernels[1] == ("llama3-8b", "float16", 1, {"cluster_size": 16, "warps": 8, "head_split": 1,
                                                      "kernel_options": {"registers": 168}})
    assert kernels[2] == ("llama3-8b", "float16", 1, {})  # "rule": the layer picks its shape
    assert [k[:3] for k in kernels[-4:]] == [("qwen2.5-7b", "float16", 4)] * 4
    assert list(bench_kernels(("llama3-8b",), (2,), ("float16", "bfloat16"), None, None)) == [
        ("llama3-8b", "float16", 2, {}), ("llama3-8b", "bfloat16", 2, {})]
    cases = bench_cases(3, (1024, 4096), ragged=True, seed=0)
    assert cases[:2] == [(False, [1024] * 3), (False, [4096] * 3)]
    assert cases[2][0] and sorted(cases[2][1]) == [1024, 2560, 4096]
    assert bench_cases(1, (1024,), ragged=True, seed=0) == [(False, [1024])]  # one sequence is never ragged


@pytest.mark.parametrize("jobs, match", [(0, "jobs must be an int >= 1, got 0"), (2.0, "got 2.0"),
                                         (True, "got True"), (4, r"jobs=4 compiles ahead into the kernel cache")])
def test_a_fused_run_checks_jobs_before_anything_runs(jobs, match, monkeypatch):
    from clusterlab.bench.fused import run_bench

    monkeypatch.setenv("CLUSTERLAB_CACHE_DIR", "")  # the cache off: precompiling would be lost
    with pytest.raises(ValueError, match=match):
        run_bench(presets=("llama3-8b",), jobs=jobs)


@pytest.mark.parametrize("suite", ["fused", "mlp", "decode", "primitives"])
def test_a_suite_checks_its_out_dir_before_any_gpu_work(suite, tmp_path):
    """A results folder that cannot be written is found before the run, not after its timings: even
    before the check for a Hopper GPU (without one, that would raise HopperRequired instead)."""
    import importlib

    module = importlib.import_module(f"clusterlab.bench.{suite}")
    run = module.run_primitives_bench if suite == "primitives" else module.run_bench
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"out_dir '.*a-file/results' is not a directory results can be written"):
        run(out_dir=blocker / "results")


def test_the_primitives_sweep_takes_a_seed_a_generator_takes(capsys):
    with pytest.raises(ValueError, match=r"seed must be None or an int in 0 .. 2\*\*63 - 1, got -1"):
        primitives.run_primitives_bench(seed=-1)
    with pytest.raises(SystemExit) as info:
        primitives.main(["--seed", str(2**64)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --seed: must be an integer in 0..9223372036854775807" in err

def test_bench_fused_takes_jobs_from_the_command_line(capsys):
    from clusterlab.bench.fused import main

    with pytest.raises(SystemExit) as info:
        main(["--jobs", "0"])
    assert info.value.code == 2 and "argument --jobs: must be an integer in 1..64; got '0'" in capsys.readouterr().err


def test_the_ablation_switches_off_parts_of_the_kernel_each_length_runs():
    """At a long cache a step takes another kernel (the rule's positions split with the query
    projection shared out for Qwen2.5-7B at batch 8, in the short caches' launch shape): the ablation
    times variants of that kernel, not of the short caches' one."""
    import dataclasses

    import torch

    from clusterlab.bench.fused_ablation import ABLATIONS, ablation_specs
    from clusterlab.fused import QWEN2_5_7B, AttentionWeights, DecodeAttention

    layer = DecodeAttention(QWEN2_5_7B, AttentionWeights.random(QWEN2_5_7B, torch.float16, "cpu", seed=0))
    for kv_len in (1024, 16384):
        specs = ablation_specs(layer, torch.float16, 8, kv_len)
        full = specs.pop("full kernel")
        assert full == layer.kernel_spec(torch.float16, 8, longest=kv_len)
        assert specs == {name: dataclasses.replace(full, **switches) for name, switches in ABLATIONS.items()}
    short, long = (ablation_specs(layer, torch.float16, 8, n)["full kernel"] for n in (1024, 16384))
    assert (long.batch_parts, long.cluster_size, long.warps, long.head_split, long.shared_queries) == (1, 4, 8, 7, True)
    assert (short.batch_parts, short.cluster_size, short.warps, short.head_split, short.shared_queries) == (
        1, 4, 8, 7, False)
