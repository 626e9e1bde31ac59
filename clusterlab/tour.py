"""``clusterlab tour``: both collectives over every cluster size, checked, in one table.

With a Hopper GPU each (primitive, algorithm, cluster size) runs as a kernel and is compared bit for
bit with the simulator running the same algorithm; its latency is the median GPU time of one launch,
replayed from a CUDA graph and timed with CUDA events. Without one, the simulator runs alone and is compared with NumPy.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from . import simulator
from .gpu import hopper_problem, require_hopper
from .simulator.gather import gather_shared_bytes
from .simulator.inputs import check_choice, check_fits, check_integer, largest_fitting
from .simulator.reduce import reduce_shared_bytes

#: The collectives the tour runs, each with its algorithms.
COLLECTIVES = (("reduce", simulator.REDUCE_ALGORITHMS), ("gather", simulator.GATHER_ALGORITHMS))


def random_rows(rng: np.random.Generator, cluster_size: int, n: int, dtype: str) -> np.ndarray:
    """Fresh random input for a collective: ``[cluster_size, n]`` of ``dtype``, never all zeros.

    Floats are standard normal (bfloat16 as ``ml_dtypes.bfloat16``); int32 is uniform in
    [-1000, 1000] so that a sum over 16 blocks cannot overflow.
    """
    dt = simulator.numpy_dtype(dtype)
    if dt == np.int32:
        return rng.integers(-1000, 1001, size=(cluster_size, n), dtype=np.int32)
    return rng.standard_normal((cluster_size, n)).astype(dt)


def _shared_bytes(primitive: str, algorithm: str, cluster_size: int, dtype: str):
    """``n -> `` the shared memory per block of ``primitive`` with ``algorithm`` for ``n`` elements a block."""
    shared_bytes = reduce_shared_bytes if primitive == "reduce" else gather_shared_bytes
    return lambda n: shared_bytes(algorithm, n, cluster_size, dtype)


def check_n_fits(parameter: str, n: int, primitive: str, algorithm: str, cluster_size: int, dtype: str) -> None:
    """ValueError naming ``parameter`` and the largest allowed ``n`` unless ``n`` elements per block fit
    in shared memory for ``primitive`` (``"reduce"`` or ``"gather"``) with ``algorithm`` on the simulator."""
    check_fits(parameter, n, _shared_bytes(primitive, algorithm, cluster_size, dtype),
               f"the {algorithm} {primitive} (cluster size {cluster_size}, {dtype})")


def check_tour_fits(parameter: str, n: int, cluster_sizes, dtype: str) -> None:
    """:func:`check_n_fits` for every run of the tour (each collective, algorithm and cluster size); where
    some do not fit, the error names the run that allows the fewest elements, so its limit fits the whole tour."""
    runs = [(primitive, algorithm, size) for primitive, algorithms in COLLECTIVES for algorithm in algorithms
            for size in cluster_sizes]
    tightest = min(runs, key=lambda run: largest_fitting(_shared_bytes(*run, dtype)))
    check_n_fits(parameter, n, *tightest, dtype)  # where it fits, every run does


@dataclass
class TourRow:
    primitive: str
    algorithm: str
    cluster_size: int
    backend: str
    check: str
    ok: bool
    dsmem_bytes: int
    latency_us: float  # GPU time of one launch (graph replay); simulator wall time otherwise


def _numpy_check(primitive: str, x: np.ndarray, out: np.ndarray) -> tuple[str, bool]:
    if primitive == "gather":
        ok = np.array_equal(out, np.broadcast_to(x.reshape(1, -1), out.shape))
        return ("equals NumPy" if ok else "DIFFERS from NumPy"), ok
    if np.issubdtype(out.dtype, np.integer):  # int32 sums of the drawn rows never overflow: exact
        ok = np.array_equal(out, np.broadcast_to(x.sum(0, dtype=np.int64), out.shape))
        return ("equals NumPy" if ok else "DIFFERS from NumPy"), ok
    exact = x.astype(np.float64).sum(0)
    err = np.abs(out.astype(np.float64) - exact).max() / max(np.abs(exact).max(), 1e-30)
    tolerance = 16 * np.finfo(out.dtype).eps * x.shape[0]
    return f"max rel err {err:.1e} vs NumPy", bool(err <= tolerance)


def _run_simulator(primitive, algorithm, x):
    start = time.perf_counter()
    if primitive == "reduce":
        out, trace = simulator.cluster_reduce(x, op="sum", algorithm=algorithm)
    else:
        out, trace = simulator.cluster_gather(x, algorithm=algorithm)
    return out, trace, (time.perf_counter() - start) * 1e6


def _run_gpu(primitive, algorithm, x):
    """The collective on the GPU: (result as NumPy, median µs of one launch replayed from a CUDA graph)."""
    from . import primitives
    from .bench.timing import graph_launch_us

    rows = primitives.to_device(x)
    if primitive == "reduce":
        run = functools.partial(primitives.cluster_reduce, rows, op="sum", algorithm=algorithm)
    else:
        run = functools.partial(primitives.cluster_gather, rows, algorithm=algorithm)
    out = run()
    latency = graph_launch_us(functools.partial(run, out=out))
    return primitives.to_numpy(out), latency.median


def _gpu_dtypes() -> tuple[str, ...]:
    """The dtypes the GPU kernels take; imported only when the GPU may run (it loads torch and numba)."""
    from .primitives import GPU_DTYPES

    return GPU_DTYPES


def run_tour(cluster_sizes=range(1, 17), n: int = 1024, dtype: str = "float32", backend: str = "auto",
             seed: int | None = None) -> list[TourRow]:
    """Run every algorithm of both collectives (reduce with ``op="sum"``) for each cluster size.

    ``backend``: ``"gpu"`` (raises :class:`clusterlab.HopperRequired` without a Hopper GPU; dtype
    float32, float16 or bfloat16), ``"simulator"``, or ``"auto"`` (the GPU when usable and it
    takes ``dtype``). Every argument is checked, ``n`` against the shared memory of every run,
    before anything runs.
    """
    check_choice("backend", backend, ("auto", "gpu", "simulator"))
    check_choice("dtype", dtype, simulator.DTYPES)
    check_integer("n", n, 1)
    if seed is not None:
        check_integer("seed", seed, 0)
    cluster_sizes = list(cluster_sizes)
    for i, size in enumerate(cluster_sizes):
        check_integer(f"cluster_sizes[{i}]", size, 1, simulator.MAX_CLUSTER_SIZE)
    check_tour_fits("n", n, cluster_sizes, dtype)
    if backend == "gpu":
        if dtype not in _gpu_dtypes():
            raise ValueError(
                f"dtype must be one of {_gpu_dtypes()} on the GPU; got {dtype!r} (the simulator takes any of DTYPES)"
            )
        require_hopper()
    on_gpu = backend == "gpu" or (backend == "auto" and hopper_problem() is None and dtype in _gpu_dtypes())

    rng = np.random.default_rng(seed)
    rows = []
    for primitive, algorithms in COLLECTIVES:
        for algorithm in algorithms:
            for size in cluster_sizes:
                x = random_rows(rng, size, n, dtype)
                expected, trace, sim_us = _run_simulator(primitive, algorithm, x)
                dsmem_bytes = int(trace.traffic().total.sum())
                if on_gpu:
                    out, latency_us = _run_gpu(primitive, algorithm, x)
                    ok = np.array_equal(out.view(np.uint8), expected.view(np.uint8))
                    check = "bit-exact vs simulator" if ok else "DIFFERS from simulator"
                    rows.append(TourRow(primitive, algorithm, size, "gpu", check, ok, dsmem_bytes, latency_us))
                else:
                    check, ok = _numpy_check(primitive, x, expected)
                    rows.append(TourRow(primitive, algorithm, size, "simulator", check, ok, dsmem_bytes, sim_us))
    return rows


def format_tour(rows: list[TourRow]) -> str:
    """The tour as a text table, one line per (primitive, algorithm, cluster size)."""
    if not rows:
        return "(nothing run)"
    timing = "launch µs" if rows[0].backend == "gpu" else "simulator µs"
    header = f"{'primitive':<9} {'algorithm':<10} {'cluster':>7} {'DSMEM bytes':>12} {timing:>13}  check"
    lines = [f"backend: {rows[0].backend}", header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.primitive:<9} {row.algorithm:<10} {row.cluster_size:>7} {row.dsmem_bytes:>12} "
            f"{row.latency_us:>13.1f}  {row.check}"
        )
    failed = sum(not row.ok for row in rows)
    lines.append(f"{len(rows) - failed} passed, {failed} failed")
    return "\n".join(lines)
