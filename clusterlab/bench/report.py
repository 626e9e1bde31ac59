"""Reading a ``primitives_<tag>.json``: targets, the algorithm-choice table, text tables and plots.

Everything here runs on the CPU from the results dict, so the committed H100 results can be
re-plotted and re-tabulated anywhere::

    python -m clusterlab.bench.report benchmarks/results/primitives_h100.json

Records (``results["measurements"]``) are flat dicts: ``primitive`` (reduce / gather), ``method``
(per_op / single_launch), ``implementation``, ``family`` (cluster, variant, global, torch),
``config`` (one / chip), ``cluster_size``, ``dtype``, ``message_bytes``, ``n``, and either
``latency_us`` (a :class:`~clusterlab.bench.timing.Stat` as a dict; per-op records may add
``bus_bandwidth_bytes_per_s``) or ``skipped`` / ``error`` with the reason. ``floors`` holds the
``barrier``, ``launch``, ``dsmem_read`` and ``copy`` records; ``targets`` (:data:`TARGETS`),
``global_comparison``, ``choice`` and ``barriers_per_op`` are derived from the records by
:func:`complete`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import simulator
from ..argtypes import results_tag
from .timing import Stat, card_tag, short_commit, write_json

SCHEMA = "clusterlab.bench.primitives/1"

#: The public steady-state reduces: :func:`clusterlab.primitives.reduce.steady_reduce_device_function`
#: (the double-buffered direct reduce, the steady two_shot and the steady bulk_two_shot), timed per
#: operation only, with their cluster barriers per operation.
REDUCE_STEADY = {"direct_1barrier": 1, "two_shot_2barrier": 2, "bulk_two_shot_0barrier": 0}
#: The reduce of the public contract: the host API's algorithms and the steady-state reduce.
REDUCE_PUBLIC = (*simulator.REDUCE_ALGORITHMS, *REDUCE_STEADY)
#: Benchmark-only implementations (not in clusterlab.primitives), each with its cluster barriers
#: per operation in steady state.
REDUCE_VARIANTS = {"direct_push": 0}
GATHER_VARIANTS = {"direct_v4": 2, "bulk_split": 2}
VARIANTS = (*REDUCE_VARIANTS, *GATHER_VARIANTS)
#: The global-memory baselines of the reduce: every block ends with the full result of its group
#: of N, as with the cluster reduce.
GLOBAL = ("global_kernel_boundary", "global_grid_barrier")
#: What the sweep times per operation, in the order of the tables and plots.
REDUCE_PER_OP = (*REDUCE_PUBLIC, *REDUCE_VARIANTS, *GLOBAL, "torch")
GATHER_PER_OP = (*simulator.GATHER_ALGORITHMS, *GATHER_VARIANTS)
#: What the sweep times as a single launch (one graph replay): the host API's kernels and baselines.
REDUCE_SINGLE_LAUNCH = (*simulator.REDUCE_ALGORITHMS, "global_kernel_boundary", "torch")
GATHER_SINGLE_LAUNCH = simulator.GATHER_ALGORITHMS

#: Target thresholds.
SMALL_MESSAGE_BYTES = 2048  # small_reduce_vs_barrier: messages up to this many bytes per block
LARGE_MESSAGE_BYTES = 16384  # large_reduce_vs_dsmem_bound, gather_vs_dsmem_peak: messages from this size
REDUCE_BARRIER_RATIO = 3.0  # fastest public reduce per op <= 3 bare cluster barriers, N <= SMALL_CLUSTER_MAX
REDUCE_BARRIER_RATIO_LARGE_CLUSTER = 5.0  # the same, N > SMALL_CLUSTER_MAX
SMALL_CLUSTER_MAX = 8
REDUCE_PEAK_FRACTION = 0.7  # reduce bus bandwidth >= 70% of the DSMEM read peak
GATHER_PEAK_FRACTION = 0.9  # gather bus bandwidth >= 90% of the DSMEM read peak
#: A figure is trusted when its repeats agree: all positive, max - min within half the median.
#: Others stay in the results but get no verdict and no point in the plots, and a choice-table
#: point with one borrows the ranking of a neighbouring message size.
RELIABLE_SPREAD = 0.5
#: The dtype whose gathers rank each element size in the choice table, most preferred first.
CHOICE_DTYPES = ("float32", "bfloat16", "float16")


def reliable(stat: Stat | None) -> bool:
    """True when ``stat``'s repeats agree (see :data:`RELIABLE_SPREAD`)."""
    return stat is not None and stat.min > 0 and stat.max - stat.min <= RELIABLE_SPREAD * stat.median


def family(implementation: str) -> str:
    """cluster (a clusterlab primitive, the steady-state reduce included), variant, global or torch."""
    if implementation in VARIANTS:
        return "variant"
    if implementation in GLOBAL:
        return "global"
    if implementation == "torch":
        return "torch"
    return "cluster"


def barrier_counts(cluster_sizes) -> dict:
    """Cluster barriers per call of every algorithm, counted on the simulator's trace (block 0).

    ``{"reduce": {algorithm: {"N": barriers}}, "gather": {...}}``; the steady-state reduce's and
    the variants' counts are their barriers per operation in steady state.
    """
    counts: dict = {"reduce": {}, "gather": {}}
    for primitive, algorithms, run in (
        ("reduce", simulator.REDUCE_ALGORITHMS, simulator.cluster_reduce),
        ("gather", simulator.GATHER_ALGORITHMS, simulator.cluster_gather),
    ):
        for algorithm in algorithms:
            per_size = counts[primitive].setdefault(algorithm, {})
            for size in cluster_sizes:
                _, trace = run(np.ones((size, 4), dtype=np.float32), algorithm=algorithm)
                per_size[str(size)] = sum(
                    1 for e in trace.events if e.kind == "barrier.cluster.wait.acquire" and e.block == 0
                )
    for primitive, variants in (("reduce", {**REDUCE_STEADY, **REDUCE_VARIANTS}), ("gather", GATHER_VARIANTS)):
        for variant, barriers in variants.items():
            counts[primitive][variant] = {str(s): barriers for s in cluster_sizes}
    return counts


# --------------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------------


#: The fields a lookup names with every query; :func:`records` finds its candidates by them.
INDEXED_FIELDS = ("primitive", "method", "implementation", "config")
#: ``(measurements, its length then, {values of INDEXED_FIELDS: records})``, the latest few, newest last.
_indexes: list[tuple[list, int, dict]] = []


def _candidates(measurements: list[dict], criteria: dict) -> list[dict]:
    """The records of ``measurements`` that may match ``criteria``: those with its values of
    :data:`INDEXED_FIELDS` where it names all of them (through an index of the list, built on first
    use and again when the list has grown), else all of them."""
    if not all(field in criteria for field in INDEXED_FIELDS):
        return measurements
    for listed, length, index in _indexes:
        if listed is measurements and length == len(measurements):
            break
    else:
        index = {}
        for r in measurements:
            index.setdefault(tuple(r.get(field) for field in INDEXED_FIELDS), []).append(r)
        _indexes[:] = [*_indexes[-3:], (measurements, len(measurements), index)]
    return index.get(tuple(criteria[field] for field in INDEXED_FIELDS), [])


def records(results: dict, **criteria) -> list[dict]:
    """Measurements matching every ``key=value`` given (timed ones only), in the order of the file.

    A sweep holds about 9000 records and its report looks up thousands of figures, so a query
    naming all of :data:`INDEXED_FIELDS` reads only the records with those values. Records are
    appended, never edited in those fields: the index follows the list's length.
    """
    return [
        r for r in _candidates(results["measurements"], criteria)
        if "latency_us" in r and all(r.get(k) == v for k, v in criteria.items())
    ]


def record(results: dict, **criteria) -> dict | None:
    found = records(results, **criteria)
    return found[0] if found else None


def latency(results: dict, **criteria) -> Stat | None:
    found = record(results, **criteria)
    return Stat.from_dict(found["latency_us"]) if found else None


def barrier_floor(results: dict, config: str, cluster_size: int, kind: str = "barrier") -> Stat | None:
    """µs per bare cluster barrier at this size and configuration (``kind="launch"``: an empty launch)."""
    for r in results["floors"]:
        if r.get("kind") == kind and r.get("config") == config and r.get("cluster_size") == cluster_size:
            return Stat.from_dict(r["latency_us"]) if "latency_us" in r else None
    return None


def dsmem_peak(results: dict, config: str, cluster_size: int) -> dict | None:
    """The DSMEM read-stream record with the highest median bandwidth at this size and configuration."""
    found = [
        r for r in results["floors"]
        if r.get("kind") == "dsmem_read" and r.get("config") == config and r.get("cluster_size") == cluster_size
        and "bandwidth_bytes_per_s" in r
    ]
    return max(found, key=lambda r: r["bandwidth_bytes_per_s"]["median"], default=None)


def copy_bandwidth(results: dict) -> Stat | None:
    for r in results["floors"]:
        if r.get("kind") == "copy" and "bandwidth_bytes_per_s" in r:
            return Stat.from_dict(r["bandwidth_bytes_per_s"])
    return None


def _configs(results: dict) -> list[str]:
    return list(results["settings"]["configs"])


def _choice_config(results: dict) -> str:
    return "chip" if "chip" in _configs(results) else _configs(results)[0]


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


#: What each target compares; every figure is per operation, at the same cluster size N >= 2 and
#: configuration as the floor it is compared with.
TARGETS = {
    "small_reduce_vs_barrier": "fastest public reduce (the host API's algorithms and the steady-state reduces "
    f"direct_1barrier and two_shot_2barrier), messages up to {SMALL_MESSAGE_BYTES} B per block of each dtype / one "
    f"bare cluster barrier, <= {REDUCE_BARRIER_RATIO:g} at N <= {SMALL_CLUSTER_MAX}, "
    f"<= {REDUCE_BARRIER_RATIO_LARGE_CLUSTER:g} above",
    "large_reduce_vs_dsmem_bound": "bus bandwidth of the fastest public reduce, messages from "
    f"{LARGE_MESSAGE_BYTES // 1024} KiB per block of each dtype / peak DSMEM read bandwidth, >= {REDUCE_PEAK_FRACTION:g}"
    " (bus bytes counted on the message, 2 (N - 1) / N x its bytes, whether a 16-bit message of B bytes moved as it "
    "is, in the steady direct and two_shot reduces, or as the float32 rows of 2B, in the others)",
    "gather_vs_dsmem_peak": "bus bandwidth of the fastest public gather (the host API's algorithms), messages "
    f"from {LARGE_MESSAGE_BYTES // 1024} KiB per block (the largest timed one where none of them fits) / peak "
    f"DSMEM read bandwidth, >= {GATHER_PEAK_FRACTION:g}",
}
#: What :func:`global_comparison` compares (a comparison, not a target), and why ``torch`` is not in it.
GLOBAL_COMPARISON = (
    "reduce_vs_global: the same all-reduce through global memory, every block ending with the full result "
    "of its group of N; per operation, the faster of global_kernel_boundary and global_grid_barrier / the "
    "fastest public reduce; as a single launch (one graph replay), the global_kernel_boundary pair / the "
    "fastest host-API kernel; float32, N >= 2. The sweep's torch column is torch.sum of the [clusters, N, n] "
    "tensor over N: one reduced row per cluster (not a copy on every block) written to a separate "
    "[clusters, n] tensor, and per operation it reads an input that stays in L2; not the same operation, "
    "shown for scale only"
)


def reduce_barrier_threshold(cluster_size: int) -> float:
    """The most bare cluster barriers a small public reduce may cost at this cluster size."""
    return REDUCE_BARRIER_RATIO if cluster_size <= SMALL_CLUSTER_MAX else REDUCE_BARRIER_RATIO_LARGE_CLUSTER


def _target(name, passed, value, threshold, stats, noisy_faster=(), **fields) -> dict:
    """A target row; ``pass`` is None (no verdict) when any of the figures ``stats`` it compares is
    noisy, or when it misses and a noisy figure ``noisy_faster`` might have passed it."""
    trusted = all(reliable(s) for s in stats) and (passed or not noisy_faster)
    return {"target": name, "pass": bool(passed) if trusted else None, "reliable": trusted, "value": value,
            "threshold": threshold, **fields}


class Best(NamedTuple):
    """The fastest implementation at a point (:func:`_best`) and the noisy figures that might have beaten it."""

    implementation: str
    stat: Stat
    #: The point's noisy figures with a lower median than ``stat``'s: any of them might have been the fastest.
    noisy_faster: tuple[Stat, ...]


def _best(results: dict, implementations, **criteria) -> Best | None:
    """The implementation with the lowest median here, and its figure.

    Only reliable figures compete; when none here is, the lowest noisy one stands (so its row
    gets no verdict rather than no row). The noisy figures below the winner's median are kept
    beside it (``noisy_faster``): a miss of the winner is then no verdict, as one of them might
    have passed, rather than a repeat that went wrong deciding it.
    """
    timed = [(i, latency(results, implementation=i, **criteria)) for i in implementations]
    timed = [(i, s) for i, s in timed if s is not None]
    winner = min([t for t in timed if reliable(t[1])] or timed, key=lambda item: item[1].median, default=None)
    if winner is None:
        return None
    implementation, stat = winner
    return Best(implementation, stat, tuple(s for _, s in timed if not reliable(s) and s.median < stat.median))


def message_bus_bandwidth(found: dict) -> dict:
    """Bus bandwidth of the reduce record ``found`` counted on its message: 2 (N - 1) / N x ``message_bytes``
    into each block of the launch over the per-operation time, whatever its rows moved in (a 16-bit
    message reduced as float32 rows moves twice the bytes it is credited with)."""
    size = found["cluster_size"]
    nbytes = 2 * (size - 1) / size * found["message_bytes"] * found["clusters"] * size
    return Stat.from_dict(found["latency_us"]).inverse(nbytes * 1e6).as_dict()


def _versus_peak(name, threshold, winner, found, peak, bus, **fields) -> dict:
    """A target row: the bus bandwidth ``bus`` of ``found`` (the record of ``winner``) / the DSMEM read ``peak``."""
    fraction = bus["median"] / peak["bandwidth_bytes_per_s"]["median"]
    return _target(
        name, fraction >= threshold, fraction, threshold, (winner.stat, Stat.from_dict(peak["pass_us"])),
        winner.noisy_faster, **fields, message_bytes=found["message_bytes"], implementation=winner.implementation,
        bus_bandwidth_bytes_per_s=bus, peak_bytes_per_s=peak["bandwidth_bytes_per_s"],
        peak_threads=peak["threads"], peak_pattern=peak["pattern"],
    )


def evaluate_targets(results: dict) -> list[dict]:
    """Every row of every target (:data:`TARGETS`), passed, missed or noisy, with what it compares."""
    out = []
    message_bytes = results["settings"]["message_bytes"]
    for config in _configs(results):
        for size in [s for s in results["settings"]["cluster_sizes"] if s > 1]:
            point = {"config": config, "cluster_size": size}
            floor = barrier_floor(results, config, size)
            peak = dsmem_peak(results, config, size)
            for dtype in results["settings"]["dtypes"]:
                for nbytes in message_bytes:
                    reduce = {**point, "primitive": "reduce", "method": "per_op", "dtype": dtype,
                              "message_bytes": nbytes}
                    winner = _best(results, REDUCE_PUBLIC, **reduce)
                    if winner is None:
                        continue
                    if nbytes <= SMALL_MESSAGE_BYTES and floor is not None:
                        ratio = winner.stat.median / floor.median
                        threshold = reduce_barrier_threshold(size)
                        out.append(_target(
                            "small_reduce_vs_barrier", ratio <= threshold, ratio, threshold, (winner.stat, floor),
                            winner.noisy_faster, **point, dtype=dtype, message_bytes=nbytes,
                            implementation=winner.implementation, per_op_us=winner.stat.as_dict(),
                            barrier_us=floor.as_dict(),
                        ))
                    if nbytes >= LARGE_MESSAGE_BYTES and peak is not None:
                        found = record(results, implementation=winner.implementation, **reduce)
                        out.append(_versus_peak("large_reduce_vs_dsmem_bound", REDUCE_PEAK_FRACTION, winner, found,
                                                peak, message_bus_bandwidth(found), **point, dtype=dtype))
            if peak is None:
                continue
            for dtype in results["settings"]["dtypes"]:
                gather = {**point, "primitive": "gather", "method": "per_op", "dtype": dtype}
                timed = sorted({
                    r["message_bytes"] for a in simulator.GATHER_ALGORITHMS
                    for r in records(results, implementation=a, **gather) if "bus_bandwidth_bytes_per_s" in r
                })
                for nbytes in [b for b in timed if b >= LARGE_MESSAGE_BYTES] or timed[-1:]:
                    winner = _best(results, simulator.GATHER_ALGORITHMS, message_bytes=nbytes, **gather)
                    found = record(results, implementation=winner.implementation, message_bytes=nbytes, **gather)
                    out.append(_versus_peak("gather_vs_dsmem_peak", GATHER_PEAK_FRACTION, winner, found, peak,
                                            found["bus_bandwidth_bytes_per_s"], **point, dtype=dtype))
    return out


def global_comparison(results: dict) -> list[dict]:
    """The cluster reduce against the same all-reduce through global memory (:data:`GLOBAL_COMPARISON`).

    One row per method (``per_op``, ``single_launch``), configuration, cluster size N >= 2 and
    float32 message size where both sides were timed: the fastest cluster side and baseline, their
    figures, ``speedup`` = baseline / cluster (medians) and whether both figures are reliable.
    """
    out = []
    sides = {
        "per_op": (REDUCE_PUBLIC, GLOBAL),
        "single_launch": (simulator.REDUCE_ALGORITHMS, ("global_kernel_boundary",)),
    }
    for method, (clusters, baselines) in sides.items():
        for config in _configs(results):
            for size in [s for s in results["settings"]["cluster_sizes"] if s > 1]:
                for nbytes in results["settings"]["message_bytes"]:
                    point = {"primitive": "reduce", "method": method, "config": config, "cluster_size": size,
                             "dtype": "float32", "message_bytes": nbytes}
                    cluster = _best(results, clusters, **point)
                    baseline = _best(results, baselines, **point)
                    if cluster is None or baseline is None:
                        continue
                    out.append({
                        "method": method, "config": config, "cluster_size": size, "message_bytes": nbytes,
                        "cluster": cluster.implementation, "cluster_us": cluster.stat.as_dict(),
                        "baseline": baseline.implementation, "baseline_us": baseline.stat.as_dict(),
                        "speedup": baseline.stat.median / cluster.stat.median,
                        "reliable": reliable(cluster.stat) and reliable(baseline.stat),
                    })
    return out


# --------------------------------------------------------------------------------------------
# Algorithm choice
# --------------------------------------------------------------------------------------------


def _ranking(results: dict, algorithms, **criteria) -> dict:
    """A choice-table row: algorithms by median (fastest first) then the unmeasured, the medians, all reliable?"""
    timed = {a: latency(results, implementation=a, **criteria) for a in algorithms}
    medians = {a: s.median for a, s in timed.items() if s is not None}
    ranked = sorted(medians, key=medians.get) + [a for a in algorithms if a not in medians]
    return {"ranking": ranked, "latency_us": medians, "reliable": all(reliable(s) for s in timed.values() if s)}


def _borrow_noisy_rankings(rows: dict) -> None:
    """Give each row with a noisy figure the ranking of the nearest fully reliable message size of its group.

    ``rows`` maps (group..., bytes) to rows; the group is the key without its last item.
    """
    for key, row in rows.items():
        if row["reliable"]:
            continue
        donors = [k for k, r in rows.items() if k[:-1] == key[:-1] and r["reliable"]]
        if donors:
            donor = min(donors, key=lambda k: (abs(math.log2(k[-1]) - math.log2(key[-1])), k[-1]))
            row["ranking"] = list(rows[donor]["ranking"])
            row["ranking_from_bytes"] = donor[-1]


def choice_tables(results: dict) -> dict:
    """Per-operation ranking of the primitives' algorithms (fastest first) at every measured point.

    ``reduce``: keyed by cluster size and ``working_bytes`` (float32 bytes per block, 4 n);
    ``gather``: by itemsize, cluster size and message bytes, each itemsize ranked on one dtype (the
    first of :data:`CHOICE_DTYPES` the results timed with it). Algorithms with no timing there
    (e.g. too much shared memory) come last, in the primitives' order. Where any figure of a
    point is noisy (:func:`reliable`), the point takes the ranking of the nearest message size of
    the same cluster size whose figures are all reliable (``ranking_from_bytes`` says which).
    Uses the ``chip`` configuration when it was measured.
    """
    config = _choice_config(results)
    reduce_rows, gather_rows = {}, {}
    gathers = records(results, primitive="gather", method="per_op", config=config)
    ranked_dtype: dict = {}  # itemsize -> the dtype that ranks it
    for r in sorted(gathers, key=lambda r: CHOICE_DTYPES.index(r["dtype"])):
        ranked_dtype.setdefault(r["message_bytes"] // r["n"], r["dtype"])
    for r in records(results, method="per_op", config=config):
        if r["primitive"] == "reduce" and r["implementation"] in simulator.REDUCE_ALGORITHMS:
            key = (r["cluster_size"], r["working_bytes"])
            if key not in reduce_rows:
                reduce_rows[key] = {"cluster_size": key[0], "working_bytes": key[1], **_ranking(
                    results, simulator.REDUCE_ALGORITHMS, primitive="reduce", method="per_op", config=config,
                    cluster_size=key[0], n=r["n"], dtype=r["dtype"])}
        elif r["primitive"] == "gather" and r["implementation"] in simulator.GATHER_ALGORITHMS:
            itemsize = r["message_bytes"] // r["n"]
            if r["dtype"] != ranked_dtype[itemsize]:
                continue
            key = (itemsize, r["cluster_size"], r["message_bytes"])
            if key not in gather_rows:
                gather_rows[key] = {"itemsize": itemsize, "cluster_size": key[1], "message_bytes": key[2], **_ranking(
                    results, simulator.GATHER_ALGORITHMS, primitive="gather", method="per_op", config=config,
                    cluster_size=key[1], message_bytes=key[2], dtype=r["dtype"])}
    _borrow_noisy_rankings(reduce_rows)
    _borrow_noisy_rankings(gather_rows)
    return {
        "config": config,
        "reduce": [reduce_rows[k] for k in sorted(reduce_rows)],
        "gather": [gather_rows[k] for k in sorted(gather_rows)],
    }


def complete(results: dict) -> dict:
    """Add ``barriers_per_op``, ``targets``, ``global_comparison`` and ``choice`` where missing (a file cut short)."""
    if "barriers_per_op" not in results:
        results["barriers_per_op"] = barrier_counts(results["settings"]["cluster_sizes"])
    if "targets" not in results:
        results["targets"] = evaluate_targets(results)
    if "global_comparison" not in results:
        results["global_comparison"] = global_comparison(results)
    if "choice" not in results:
        results["choice"] = choice_tables(results)
    return results


def auto_table(results: dict, path: str = "") -> dict:
    """The algorithm rankings of ``results`` (fastest first) as the JSON :mod:`clusterlab.primitives.auto` reads.

    ``{"source": {card, driver, date, commit, config, results}, "reduce": {cluster size:
    [[float32 bytes per block, [algorithms]], ...]}, "gather": {element bytes: {cluster size:
    [[message bytes, [algorithms]], ...]}}}``; ``path`` names the results file in ``source``.
    """
    choice = choice_tables(results)  # the algorithms of today, those the run did not time last
    reduce_table: dict = {}
    for row in choice["reduce"]:
        reduce_table.setdefault(row["cluster_size"], []).append([row["working_bytes"], row["ranking"]])
    gather_table: dict = {}
    for row in choice["gather"]:
        gather_table.setdefault(row["itemsize"], {}).setdefault(row["cluster_size"], []).append(
            [row["message_bytes"], row["ranking"]]
        )
    system = results["system"]
    source = {
        "card": system.get("gpu"),
        "driver": system.get("driver_version"),
        "date": results["date"],
        "commit": results["commit"],
        "config": choice["config"],
        "results": path,
    }
    return {"source": source, "reduce": reduce_table, "gather": gather_table}


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


_VERDICT = {True: "", False: "*", None: "?"}
#: Implementation names shortened in the target tables.
SHORT = {"direct_1barrier": "1barrier", "two_shot_2barrier": "2shot2b", "bulk_two_shot_0barrier": "bulk2shot0b"}


def _bytes(nbytes: int) -> str:
    return f"{nbytes // 1024} KiB" if nbytes >= 1024 else f"{nbytes} B"


def _table(header, rows) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _grid(rows, cell) -> str:
    """``rows`` as a table: a line per cluster size (and dtype, where rows have one), a column per message size."""
    def line(row):
        return (row["cluster_size"], row["dtype"]) if "dtype" in row else (row["cluster_size"],)

    columns = sorted({r["message_bytes"] for r in rows})
    cells = {(*line(r), r["message_bytes"]): cell(r) for r in rows}
    header = ["N", "dtype"] if "dtype" in rows[0] else ["N"]
    return _table([*header, *map(_bytes, columns)], [
        [*key, *(cells.get((*key, c), "-") for c in columns)] for key in dict.fromkeys(map(line, rows))
    ])


def _cell(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    return f"{stat.median:.2f}" + ("" if reliable(stat) else "?")


def format_sweep(results: dict) -> str:
    """Per-operation µs (median) of every implementation, float32, in the choice configuration.

    The ``torch`` column is not the same operation as the others (see :data:`GLOBAL_COMPARISON`).
    """
    config = _choice_config(results)
    parts = []
    for primitive, implementations in (("reduce", REDUCE_PER_OP), ("gather", GATHER_PER_OP)):
        rows = []
        for size in results["settings"]["cluster_sizes"]:
            floor = barrier_floor(results, config, size)
            for nbytes in results["settings"]["message_bytes"]:
                cells = [
                    _cell(latency(results, primitive=primitive, method="per_op", implementation=i, config=config,
                                  cluster_size=size, dtype="float32", message_bytes=nbytes))
                    for i in implementations
                ]
                if any(c != "-" for c in cells):
                    rows.append([size, _bytes(nbytes), _cell(floor), *cells])
        parts.append(f"{primitive}, per operation, float32, config {config} (µs, median)\n"
                     + _table(["N", "bytes", "barrier", *implementations], rows))
    return "\n\n".join(parts)


def format_summary(results: dict) -> str:
    """Floors, the targets and the global-memory comparison (N x message size per configuration), the choice tables."""
    configs = _configs(results)
    sizes = results["settings"]["cluster_sizes"]
    system = results["system"]
    lines = [f"{system.get('gpu')}, driver {system.get('driver_version')}, {results['date']}, "
             + f"commit {short_commit(results['commit'], 12)}"]
    clocks = results.get("clocks_seen", {}).get("clocks.sm")
    if isinstance(clocks, dict):
        lines.append(f"SM clock seen: {clocks['min']:.0f}-{clocks['max']:.0f} MHz (median {clocks['median']:.0f})")
    copy = copy_bandwidth(results)
    if copy is not None:
        lines.append(f"HBM copy bandwidth: {copy.scaled(1e-12)} TB/s (read + write)")
    rows = []
    for size in sizes:
        row = [size]
        for config in configs:
            floor = barrier_floor(results, config, size)
            empty = barrier_floor(results, config, size, "launch")
            peak = dsmem_peak(results, config, size)
            row += [str(floor) if floor else "-", f"{empty.median:.2f}" if empty else "-",
                    f"{peak['bandwidth_bytes_per_s']['median'] / 1e12:.2f}" if peak else "-"]
        rows.append(row)
    header = ["N"] + [h for c in configs for h in (f"barrier µs ({c})", f"launch µs ({c})", f"DSMEM TB/s ({c})")]
    lines += ["", "floors", _table(header, rows), "", "targets"]
    lines += [f"  {name}: {text}" for name, text in TARGETS.items()]
    shortened = ", ".join(f"{short} = {name}" for name, short in SHORT.items())
    lines.append(f"  (cells: value and the fastest implementation, {shortened}; * marks a miss, ? a noisy figure: "
                 f"min <= 0 or max - min > {RELIABLE_SPREAD:g} x median, no verdict)")

    def verdict(t):
        return f"{t['value']:.2f}{_VERDICT[t['pass']]} {SHORT.get(t['implementation'], t['implementation'])}"

    for name in TARGETS:
        for config in configs:
            found = [t for t in results["targets"] if t["target"] == name and t["config"] == config]
            if found:
                lines += ["", f"{name} ({config})", _grid(found, verdict)]
    comparison = results["global_comparison"]
    lines += ["", GLOBAL_COMPARISON, "  (cells: global-memory figure / cluster figure; ? marks a noisy figure)"]
    for method in ("per_op", "single_launch"):
        for config in configs:
            found = [c for c in comparison if c["method"] == method and c["config"] == config]
            if found:
                lines += ["", f"reduce_vs_global, {method.replace('_', ' ')} ({config})",
                          _grid(found, lambda c: f"{c['speedup']:.2f}{'' if c['reliable'] else '?'}")]
    choice = results["choice"]
    for primitive, key, label in (("reduce", "working_bytes", "float32 bytes"), ("gather", "message_bytes", "bytes")):
        groups = sorted({r.get("itemsize", 4) for r in choice[primitive]})
        for itemsize in groups:
            table_rows = [r for r in choice[primitive] if r.get("itemsize", 4) == itemsize]
            columns = sorted({r[key] for r in table_rows})
            grid = {(r["cluster_size"], r[key]): r["ranking"][0] for r in table_rows}
            suffix = f", {itemsize}-byte elements" if primitive == "gather" else ""
            lines += ["", f"fastest {primitive} per operation ({choice['config']}{suffix}), columns: {label}"]
            lines.append(_table(["N", *map(_bytes, columns)],
                                [[s, *(grid.get((s, c), "-") for c in columns)] for s in sizes]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

#: Message sizes that get a latency panel (when measured).
PANEL_BYTES = (64, 256, 1024, 4096, 16384, 65536)
#: A colour and line style per implementation, in every plot of primitives results.
STYLE = {
    "direct": ("C0", "-"), "ring": ("C1", "-"), "butterfly": ("C2", "-"), "bulk": ("C3", "-"), "two_shot": ("C6", "-"),
    "bulk_two_shot": ("C9", "-"),
    "direct_1barrier": ("C0", "--"), "two_shot_2barrier": ("C6", "--"), "bulk_two_shot_0barrier": ("C9", "--"),
    "direct_push": ("C4", "--"),
    "direct_v4": ("C0", "--"),
    "bulk_split": ("C3", "--"),
    "global_kernel_boundary": ("C7", "-."), "global_grid_barrier": ("C5", "-."), "torch": ("C8", ":"),
}
#: A marker per dtype in the bandwidth plot, and the 16-bit dtypes' names in its legend.
DTYPE_MARKER = {"float32": "o", "bfloat16": "x", "float16": "+"}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


def _errorbar(ax, xs, stats, label, implementation, marker="o"):
    pairs = [(x, s) for x, s in zip(xs, stats) if reliable(s)]
    if not pairs:
        return
    x = [p[0] for p in pairs]
    med = np.array([p[1].median for p in pairs])
    low = np.clip(med - np.array([p[1].min for p in pairs]), 0, None)
    high = np.clip(np.array([p[1].max for p in pairs]) - med, 0, None)
    color, style = STYLE.get(implementation, ("k", "-"))
    ax.errorbar(x, med, yerr=[low, high], label=label, color=color, linestyle=style, marker=marker, markersize=3,
                capsize=2, linewidth=1)


def _size_axis(ax, sizes):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_xlabel("cluster size N")


def _latency_figure(results, primitive, implementations, method, dtype, config, title):
    from matplotlib.figure import Figure

    sizes = results["settings"]["cluster_sizes"]
    measured = results["settings"]["message_bytes"]
    panels = [b for b in PANEL_BYTES if b in measured] or measured[:6]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5 * columns, 3.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, nbytes in zip(axes.flat, panels):
        for implementation in implementations:
            stats = [latency(results, primitive=primitive, method=method, implementation=implementation, config=config,
                             cluster_size=s, dtype=dtype, message_bytes=nbytes) for s in sizes]
            _errorbar(ax, sizes, stats, implementation, implementation)
        kind, label = ("barrier", "1 cluster barrier") if method == "per_op" else ("launch", "empty cluster launch")
        floors = [barrier_floor(results, config, s, kind) for s in sizes]
        if any(floors):
            ax.plot(sizes, [f.median if f else np.nan for f in floors], "k:", linewidth=1.5, label=label)
        ax.set_yscale("log")
        ax.set_title(f"{_bytes(nbytes)} per block")
        ax.set_ylabel("µs")
        _size_axis(ax, sizes)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _bandwidth_figure(results, config):
    from matplotlib.figure import Figure

    sizes = [s for s in results["settings"]["cluster_sizes"] if s > 1]
    shown = [s for s in (2, 4, 8, 16) if s in sizes] or sizes[:4]
    nbytes = results["settings"]["message_bytes"]
    fig = Figure(figsize=(4.2 * len(shown), 7.2))
    axes = fig.subplots(2, len(shown), squeeze=False)
    copy = copy_bandwidth(results)
    for column, size in enumerate(shown):
        peak = dsmem_peak(results, config, size)
        for row, (primitive, implementations) in enumerate(
            (("gather", GATHER_PER_OP), ("reduce", (*REDUCE_PUBLIC, *REDUCE_VARIANTS)))
        ):
            ax = axes[row][column]
            for implementation in implementations:
                for dtype in results["settings"]["dtypes"]:
                    if primitive == "reduce" and dtype != "float32":
                        continue  # the reduces' bandwidth in float32 only
                    stats = []
                    for b in nbytes:
                        r = record(results, primitive=primitive, method="per_op", implementation=implementation,
                                   config=config, cluster_size=size, dtype=dtype, message_bytes=b)
                        bw = r.get("bus_bandwidth_bytes_per_s") if r else None
                        stats.append(Stat.from_dict(bw).scaled(1e-12) if bw else None)
                    label = implementation if dtype == "float32" else f"{implementation} {SHORT_DTYPE[dtype]}"
                    _errorbar(ax, nbytes, stats, label, implementation, DTYPE_MARKER[dtype])
            if peak is not None:
                ax.axhline(peak["bandwidth_bytes_per_s"]["median"] / 1e12, color="k", linestyle=":",
                           label="DSMEM read peak")
            if copy is not None:
                ax.axhline(copy.median / 1e12, color="k", linestyle="--", linewidth=0.8, label="HBM copy")
            ax.set_xscale("log", base=2)
            ax.set_xticks(nbytes[::2])
            ax.set_xticklabels([_bytes(b) for b in nbytes[::2]], fontsize=7)
            ax.set_title(f"{primitive}, N={size}")
            ax.set_xlabel("message per block")
            ax.set_ylabel("bus bandwidth, TB/s (chip)")
            ax.grid(True, alpha=0.3)
            if column == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"Bus bandwidth vs message size ({config}; reduce in float32 working bytes)")
    fig.tight_layout()
    return fig


def plot_all(results: dict, out_dir, tag: str) -> list[Path]:
    """Write the PNGs; return their paths. Latency vs cluster size per message size, bandwidth vs message size.

    Figures are built without pyplot, so plotting never changes the caller's matplotlib backend.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _choice_config(results)
    card = results["system"].get("gpu")
    figures = {
        "reduce_latency": _latency_figure(
            results, "reduce", REDUCE_PER_OP, "per_op", "float32", config,
            f"ClusterReduce (sum, float32) per operation, {config}, {card}"),
        "gather_latency": _latency_figure(
            results, "gather", GATHER_PER_OP, "per_op", "float32", config,
            f"ClusterGather (float32) per operation, {config}, {card}"),
        "single_launch": _latency_figure(
            results, "reduce", REDUCE_SINGLE_LAUNCH, "single_launch", "float32", config,
            f"ClusterReduce (sum, float32) single launch: one graph replay, {config}, {card}"),
        "bandwidth": _bandwidth_figure(results, config),
    }
    paths = []
    for name, fig in figures.items():
        path = out_dir / f"primitives_{name}_{tag}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterlab.bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a primitives_<tag>.json")
    parser.add_argument("--plots", metavar="DIR", help="write the PNGs into DIR")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the PNGs (default: the card the results name)")
    parser.add_argument("--auto-table", metavar="PATH", help="write the algorithm-choice table (JSON) to PATH")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.results).read_text())
    for derived in ("targets", "global_comparison"):  # recomputed: a file may hold an older report's
        results.pop(derived, None)
    results = complete(results)
    print(format_sweep(results))
    print(format_summary(results))
    if args.plots:
        tag = args.tag or card_tag(results["system"]["gpu"])
        for path in plot_all(results, args.plots, tag):
            print(f"wrote {path}")
    if args.auto_table:
        print(f"wrote {write_json(auto_table(results, args.results), args.auto_table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
