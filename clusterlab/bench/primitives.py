"""``clusterlab bench primitives``: what ClusterReduce and ClusterGather cost on this GPU, and why.

One run measures, on the same GPU in the same process:

- **floors**: the bare cluster barrier per cluster size, one graph replay of an empty cluster
  kernel (the launch latency under every single-launch figure), the peak DSMEM read bandwidth (128-bit
  remote loads streaming peers' shared memory, best of 3 block sizes and 2 access patterns)
  and the device-to-device copy bandwidth of HBM;
- **per-operation latency** of every algorithm: a kernel calls the device function ``R`` and
  ``2R`` times and the slope gives one operation, launch and staging excluded; from it the bus
  bandwidth (below);
- **single-launch latency**: one replay of a CUDA graph holding one launch of the host API's
  kernel (load rows from global memory, exchange, store), timed alone;
- **baselines**: the same reduction through global memory -- kernel 1 writes each block's row,
  kernel 2 (after the kernel boundary) folds the rows of its group; per operation as a graph of
  chained fold kernels and as one kernel with a software grid barrier per operation; every block
  ends with the full result of its group of N, as with the cluster reduce -- and, for scale only,
  ``torch.sum`` of the ``[clusters, N, n]`` tensor over N: one reduced row per cluster written to
  a separate ``[clusters, n]`` tensor, not a copy on every block, so not the same operation (per
  operation: a graph of sums of the same tensor, so it reads from L2 once the tensor fits there);
- **the steady-state reduces** ``direct_1barrier`` and ``two_shot_2barrier``: the library's
  :func:`~clusterlab.primitives.reduce.steady_reduce_device_function` (double-buffered direct
  reduce, one cluster barrier per operation; ``two_shot`` at two; the contract of back-to-back
  reduces), each result the next operation's row, per operation only, as they have no
  single-launch form apart from ``cluster_reduce_steady``;
- **benchmark variants** that are not in :mod:`clusterlab.primitives`: ``direct_push`` (direct
  reduce whose rows are pushed with ``st.async`` and handed over with mbarrier phases, no cluster
  barrier per operation), ``direct_v4`` (direct gather with 16-byte remote loads, 4 in flight
  per thread) and ``bulk_split`` (bulk gather in 4 KiB copies issued by many threads).

Sizes: cluster sizes 1, 2, 3, 4, 6, 8, 16; messages of 64 B to 64 KiB per block; float32 and
bfloat16 (float16 on request). Reduce device functions work on float32 rows in shared memory, so
a 16-bit reduce of ``B`` bytes is timed per operation on ``B / 2`` float32 elements
(``working_bytes`` in the records), except the steady direct and two_shot reduces (``direct_1barrier``,
``two_shot_2barrier``), which keep 16-bit rows as they are (``working_bytes`` = ``B``); gathers move the
16-bit patterns as they are. Points whose
shared memory exceeds a block's 227 KiB are recorded as skipped, with the bytes they need.

Configurations, both with 256 threads per block and every block alone on its SM (dynamic shared
memory padded to 116 KiB, more than half an SM's 228 KiB): ``one`` -- a single cluster; ``chip``
-- as many clusters as are resident at once (the occupancy API's answer; GPC boundaries make it
less than SMs / N).

Bus bandwidth (NCCL's convention, so algorithms compare on useful bytes): an all-gather moves
``(N - 1) * B`` bytes into each block, an all-reduce ``2 (N - 1) / N * B`` (``B`` the working bytes
of the reduces' records; the targets credit a 16-bit message with its own bytes, see
:func:`~clusterlab.bench.report.message_bus_bandwidth`); the figure is that times the blocks of the
launch over the per-operation time.

Every timed configuration is first run once and checked: reduces against a float64 sum
(normwise relative error), gathers bit for bit; outputs are poisoned with NaN first, inputs are
fresh standard-normal data. Method: :mod:`clusterlab.bench.timing` (CUDA events, warm-up, median
of ``repeats`` >= 5, min-max spread).

Results: ``primitives_<tag>.json`` (written after each section, so an interrupted run keeps what
it measured), ``primitives_*_<tag>.png`` (:mod:`clusterlab.bench.report`) and tables on stdout,
with the targets (:data:`~clusterlab.bench.report.TARGETS`: the fastest public reduce against one
cluster barrier and the DSMEM read peak, the fastest public gather against that peak) and the
comparison with the same all-reduce through global memory
(:func:`~clusterlab.bench.report.global_comparison`).
Run directly: ``python -m clusterlab.bench.primitives --out-dir benchmarks/results``.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import numpy as np

from .. import simulator
from ..argtypes import Distinct, integer, results_folder, results_tag
from ..fused.config import is_int
from ..launch import PORTABLE_CLUSTER_BLOCKS, launch
from ..primitives.gather import gather_kernel, gather_stride
from ..primitives.gather import gather_shared_bytes as primitive_gather_shared_bytes
from ..primitives.host import THREADS_PER_BLOCK
from ..primitives.reduce import (FLOAT32_BYTES, packed_rows, reduce_kernel, steady_result_offset, steady_shared_bytes,
                                 work_offset)
from ..primitives.reduce import reduce_shared_bytes as primitive_reduce_shared_bytes
from . import kernels, report, timing

CLUSTER_SIZES = (1, 2, 3, 4, 6, 8, 16)
MESSAGE_BYTES = tuple(64 << k for k in range(11))  # 64 B .. 64 KiB per block
DTYPES = ("float32", "bfloat16", "float16")
#: What a sweep times unless told otherwise.
DEFAULT_DTYPES = ("float32", "bfloat16")
CONFIGS = ("one", "chip")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

#: Dynamic shared memory every benchmark block asks for at least: over half of an SM's 228 KiB,
#: so each block has its SM to itself.
SOLO_SHARED_BYTES = 116 * 1024
#: Dynamic shared memory a block may have (227 KiB on Hopper), less room for static arrays.
MAX_DYNAMIC_SHARED_BYTES = simulator.MAX_SMEM_BYTES_PER_BLOCK - 64
#: DSMEM read floor: shared buffer per block and the block sizes tried.
STREAM_BUFFER_BYTES = 128 * 1024
STREAM_CONFIGS = (("neighbour", 256), ("neighbour", 512), ("neighbour", 1024), ("spread", 256), ("spread", 512))
#: Device time the R-operation launch of a per-operation measurement aims at.
TARGET_RUN_US = 300.0
#: Launches per graph when a per-operation cost comes from graphs of back-to-back launches.
GRAPH_CHAIN = 32
#: Normwise relative error a checked reduce may have (sums of at most 16 terms vs float64).
#: bfloat16 keeps 8 significant bits: one rounding of the float32 result is 2^-9 relative at most.
TOLERANCE = {"float32": 1e-5, "bfloat16": 4e-3, "float16": 2e-3}
#: The library's algorithm behind each steady-state reduce of the results.
STEADY_ALGORITHM = {"direct_1barrier": "direct", "two_shot_2barrier": "two_shot",
                    "bulk_two_shot_0barrier": "bulk_two_shot"}
#: Reduce implementations whose kernels spin on flags, timed after everything else (see :func:`_tasks`).
SPINNING = ("global_grid_barrier", "direct_push")


def packed(implementation: str, dtype: str) -> bool:
    """Whether ``implementation`` reduces 16-bit ``dtype`` rows as they are (the steady direct and two_shot
    reduces), not widened to float32 rows of twice the bytes."""
    return implementation in STEADY_ALGORITHM and packed_rows(STEADY_ALGORITHM[implementation], dtype)


def reduce_shared_bytes(implementation: str, n: int, cluster_size: int, dtype: str = "float32") -> int:
    """Dynamic shared memory a reduce loop of ``n`` elements per block needs (float32 rows, or ``dtype``'s
    packed where :func:`packed`)."""
    if implementation in STEADY_ALGORITHM:
        if STEADY_ALGORITHM[implementation] == "bulk_two_shot":  # its row [slot], then its work
            return steady_shared_bytes(n, "bulk_two_shot", cluster_size)
        words = steady_result_offset(n, "direct", dtype if packed(implementation, dtype) else "float32")
        return words * FLOAT32_BYTES  # rows [2, slot]; each result folds into the other
    if implementation == "direct_push":
        return (n + 2 * cluster_size * n) * FLOAT32_BYTES
    return primitive_reduce_shared_bytes(implementation, n, cluster_size)


def gather_shared_bytes(implementation: str, n: int, cluster_size: int, itemsize: int) -> int:
    """Dynamic shared memory a gather of ``n`` elements of ``itemsize`` bytes per block needs."""
    return primitive_gather_shared_bytes(kernels.GATHER_LAYOUT[implementation], n, cluster_size, itemsize)


def reduce_bus_bytes(cluster_size: int, n: int, itemsize: int = FLOAT32_BYTES) -> float:
    """Bytes an all-reduce of ``n`` elements of ``itemsize`` bytes per block moves into each block (NCCL's bus bytes)."""
    return 2 * (cluster_size - 1) / cluster_size * n * itemsize


def gather_bus_bytes(cluster_size: int, n: int, itemsize: int) -> int:
    """Bytes an all-gather of ``n`` elements per block moves into each block."""
    return (cluster_size - 1) * n * itemsize


class _Skip(Exception):
    """A point that cannot run here (e.g. too much shared memory); the message says why."""


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _storage(tensor):
    """What the kernels take: float32 as is, float16/bfloat16 as their uint16 bit patterns."""
    import torch

    return tensor if tensor.dtype == torch.float32 else tensor.view(torch.uint16)


def _poisoned(shape, dtype: str):
    import torch

    return torch.full(shape, float("nan"), dtype=_torch_dtype(dtype), device="cuda")


def _reduce_error(out, x, cluster_size: int) -> float:
    """Normwise relative error of ``out`` [blocks, n] against the float64 sum of each group of rows of ``x``."""
    blocks, n = x.shape
    want = x.double().view(blocks // cluster_size, cluster_size, n).sum(dim=1, keepdim=True)
    want = want.expand(-1, cluster_size, -1).reshape(blocks, n)
    error = float((out.double() - want).norm() / want.norm())
    return error if math.isfinite(error) else float("inf")


def _check_reduce(out, x, cluster_size: int, dtype: str) -> float:
    error = _reduce_error(out, x, cluster_size)
    if not error <= TOLERANCE[dtype]:
        raise RuntimeError(f"wrong result: relative error {error:.3g} > {TOLERANCE[dtype]:g}")
    return error


def _check_gather(out, x, cluster_size: int) -> None:
    blocks, n = x.shape
    want = x.view(blocks // cluster_size, 1, cluster_size * n).expand(-1, cluster_size, -1)
    got = _storage(out).view(blocks // cluster_size, cluster_size, cluster_size * n)
    if not bool((got == _storage(want)).all()):
        raise RuntimeError("wrong result: gathered rows differ from the inputs")


class PrimitivesBench:
    """State of one sweep: clusters per size, records, memoised measurements. See the module docstring."""

    def __init__(self, cluster_sizes, repeats: int, seed: int | None):
        import torch

        self.cluster_sizes = tuple(cluster_sizes)
        self.repeats = repeats
        self.generator = torch.Generator(device="cuda")
        self.generator.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
        self.clusters = {("one", n): 1 for n in self.cluster_sizes}
        for size in self.cluster_sizes:
            self.clusters[("chip", size)] = launch(
                kernels.barrier_loop, grid=size, cluster=size, block=THREADS_PER_BLOCK,
                shared_bytes=SOLO_SHARED_BYTES, non_portable=size > PORTABLE_CLUSTER_BLOCKS,
            ).max_active_clusters(torch.empty(size, dtype=torch.int32, device="cuda"), 1)
        self._memo: dict = {}

    # ---------------------------------------------------------------------------------------
    # helpers
    # ---------------------------------------------------------------------------------------

    def random(self, shape, dtype: str = "float32"):
        import torch

        return torch.randn(shape, generator=self.generator, device="cuda").to(_torch_dtype(dtype))

    @staticmethod
    def launcher(kernel, blocks: int, cluster_size: int, shared_bytes: int, threads: int = THREADS_PER_BLOCK):
        if shared_bytes > MAX_DYNAMIC_SHARED_BYTES:
            raise _Skip(f"needs {shared_bytes} B of shared memory per block; a block has {MAX_DYNAMIC_SHARED_BYTES}")
        return launch(
            kernel, grid=blocks, cluster=cluster_size, block=threads,
            shared_bytes=max(shared_bytes, SOLO_SHARED_BYTES), non_portable=cluster_size > PORTABLE_CLUSTER_BLOCKS,
        )

    def per_op(self, run, prepare=None) -> timing.Stat:
        count = timing.calibrate_count(run, TARGET_RUN_US, prepare=prepare)
        return timing.per_op_us(run, count, self.repeats, prepare=prepare)

    def memo(self, key, measure):
        """``measure()``'s dict, computed once per key (float16 reduce rows reuse float32 ones)."""
        if key not in self._memo:
            try:
                self._memo[key] = measure()
            except _Skip as skip:
                self._memo[key] = {"skipped": str(skip)}
            except Exception as error:  # recorded, and the sweep goes on
                self._memo[key] = {"error": f"{type(error).__name__}: {error}"}
        return self._memo[key]

    # ---------------------------------------------------------------------------------------
    # floors
    # ---------------------------------------------------------------------------------------

    def barrier(self, config: str, size: int) -> dict:
        import torch

        clusters = self.clusters[(config, size)]
        out = torch.empty(clusters * size, dtype=torch.int32, device="cuda")
        step = self.launcher(kernels.barrier_loop, clusters * size, size, 0)
        latency = self.per_op(lambda k: step(out, k))
        return {"config": config, "cluster_size": size, "clusters": clusters, "latency_us": latency.as_dict()}

    def empty_launch(self, config: str, size: int) -> dict:
        """Single-launch µs of a cluster kernel that does nothing (the floor of every single-launch figure)."""
        import torch

        clusters = self.clusters[(config, size)]
        out = torch.empty(clusters * size, dtype=torch.int32, device="cuda")
        step = self.launcher(kernels.barrier_loop, clusters * size, size, 0)
        step(out, 0)
        latency = timing.graph_launch_us(lambda: step(out, 0), self.repeats)
        return {"config": config, "cluster_size": size, "clusters": clusters, "latency_us": latency.as_dict()}

    def dsmem_read(self, config: str, size: int, pattern: str, threads: int) -> dict:
        import torch

        clusters = self.clusters[(config, size)]
        chunks = STREAM_BUFFER_BYTES // kernels.VECTOR_BYTES
        kernel = kernels.dsmem_read_stream(pattern == "spread")
        step = self.launcher(kernel, clusters * size, size, STREAM_BUFFER_BYTES, threads)
        out = torch.empty(clusters * size * threads, dtype=torch.int32, device="cuda")
        pass_us = self.per_op(lambda k: step(out, chunks, k))
        nbytes = clusters * size * STREAM_BUFFER_BYTES
        return {
            "config": config, "cluster_size": size, "clusters": clusters, "threads": threads, "pattern": pattern,
            "pass_us": pass_us.as_dict(), "bandwidth_bytes_per_s": pass_us.inverse(nbytes * 1e6).as_dict(),
        }

    # ---------------------------------------------------------------------------------------
    # reduce
    # ---------------------------------------------------------------------------------------

    def reduce_per_op(self, implementation: str, config: str, size: int, n: int, dtype: str = "float32") -> dict:
        """Per-operation µs of a reduce of n elements per block (cluster, variant or global): float32 rows, or
        ``dtype``'s as they are where the implementation keeps them (:func:`packed`)."""
        import torch

        clusters = self.clusters[(config, size)]
        blocks = clusters * size
        if not packed(implementation, dtype):
            dtype = "float32"
        x = self.random((blocks, n), dtype)
        out = _poisoned((blocks, n), dtype)
        prepare = None
        if implementation in simulator.REDUCE_ALGORITHMS:
            offset = work_offset(n)
            step = self.launcher(
                kernels.reduce_loop_kernel(implementation), blocks, size, reduce_shared_bytes(implementation, n, size)
            )
            run = functools.partial(step, x, out, n, offset)
        elif implementation in STEADY_ALGORITHM:
            step = self.launcher(kernels.steady_reduce_loop(STEADY_ALGORITHM[implementation], size, dtype), blocks,
                                 size, reduce_shared_bytes(implementation, n, size, dtype))
            run = functools.partial(step, _storage(x), _storage(out), n)
        elif implementation == "direct_push":
            failed = torch.zeros(1, dtype=torch.int32, device="cuda")
            step = self.launcher(kernels.direct_push_loop, blocks, size, reduce_shared_bytes(implementation, n, size))
            run = functools.partial(step, x, out, failed, n)
        elif implementation == "global_grid_barrier":
            buffers = torch.empty((2, blocks, n), device="cuda")
            counter = torch.zeros(1, dtype=torch.int32, device="cuda")
            step = self.launcher(kernels.global_exchange_loop, blocks, 1, 0)
            resident = step.max_active_clusters(x, buffers, out, counter, n, size, 1)
            if resident < blocks:
                raise _Skip(f"{blocks} blocks, but only {resident} are resident at once (the grid barrier needs all)")
            prepare = counter.zero_
            run = functools.partial(step, x, buffers, out, counter, n, size)
        elif implementation == "global_kernel_boundary":
            return self._reduce_kernel_boundary(config, size, n, x, out)
        else:
            raise ValueError(f"unknown reduce implementation {implementation!r}")
        if prepare is not None:
            prepare()
        run(1)
        error = _check_reduce(out, x, size, dtype)
        latency = self.per_op(run, prepare)
        if implementation == "direct_push" and int(failed.item()):
            raise RuntimeError("an mbarrier wait gave up: the push protocol lost a phase")
        bus_bytes = size * clusters * reduce_bus_bytes(size, n, ITEMSIZE[dtype])
        return self._per_op_record(latency, clusters, bus_bytes, rel_error=error)

    def _reduce_kernel_boundary(self, config, size, n, x, out) -> dict:
        """One fold kernel per operation, chained on alternating buffers in a CUDA graph."""
        clusters = self.clusters[(config, size)]
        blocks = clusters * size
        fold = self.launcher(kernels.fold_kernel("float32"), blocks, 1, 0)
        fold(x, out, n, size)
        error = _check_reduce(out, x, size, "float32")
        buffers = [x.clone(), out]
        turn = [0]

        def step():
            src = turn[0]
            fold(buffers[src], buffers[1 - src], n, size)
            turn[0] = 1 - src

        latency = timing.graph_per_op_us(step, GRAPH_CHAIN, self.repeats)
        return self._per_op_record(latency, clusters, size * clusters * reduce_bus_bytes(size, n), rel_error=error)

    def torch_reduce_per_op(self, config: str, size: int, n: int, dtype: str) -> dict:
        import torch

        clusters = self.clusters[(config, size)]
        x = self.random((clusters, size, n), dtype)
        result = torch.empty((clusters, n), dtype=x.dtype, device="cuda")
        torch.sum(x, dim=1, out=result)
        error = _check_reduce(result.repeat_interleave(size, dim=0), x.view(-1, n), size, dtype)
        latency = timing.graph_per_op_us(lambda: torch.sum(x, dim=1, out=result), GRAPH_CHAIN, self.repeats)
        return self._per_op_record(latency, clusters, None, rel_error=error)

    @staticmethod
    def _per_op_record(latency: timing.Stat, clusters: int, bus_bytes, **extra) -> dict:
        record = {"clusters": clusters, "latency_us": latency.as_dict(), **extra}
        if bus_bytes:
            record["bus_bandwidth_bytes_per_s"] = latency.inverse(bus_bytes * 1e6).as_dict()
        return record

    def reduce_single(self, implementation: str, config: str, size: int, n: int, dtype: str) -> dict:
        """Single-launch µs: one graph replay of the host API kernel, the global pair, or torch.sum."""
        import torch

        clusters = self.clusters[(config, size)]
        blocks = clusters * size
        x = self.random((blocks, n), dtype)
        out = _poisoned((blocks, n), dtype)
        if implementation in simulator.REDUCE_ALGORITHMS:
            offset = work_offset(n)
            kernel = self.launcher(
                reduce_kernel(implementation, "sum", dtype), blocks, size, reduce_shared_bytes(implementation, n, size)
            )
            rows, result = _storage(x), _storage(out)
            step = functools.partial(kernel, rows, result, n, offset)
        elif implementation == "global_kernel_boundary":
            rows, result = _storage(x), _storage(out)
            partials = torch.empty_like(rows)
            publish = self.launcher(kernels.publish_partials, blocks, 1, 0)
            fold = self.launcher(kernels.fold_kernel(dtype), blocks, 1, 0)

            def step():
                publish(rows, partials, n)
                fold(partials, result, n, size)

        elif implementation == "torch":
            grouped = x.view(clusters, size, n)
            result = torch.empty((clusters, n), dtype=x.dtype, device="cuda")
            torch.sum(grouped, dim=1, out=result)
            error = _check_reduce(result.repeat_interleave(size, dim=0), x, size, dtype)
            latency = timing.graph_launch_us(lambda: torch.sum(grouped, dim=1, out=result), self.repeats)
            return {"clusters": clusters, "latency_us": latency.as_dict(), "rel_error": error}
        else:
            raise ValueError(f"unknown reduce implementation {implementation!r}")
        step()
        error = _check_reduce(out, x, size, dtype)
        latency = timing.graph_launch_us(step, self.repeats)
        return {"clusters": clusters, "latency_us": latency.as_dict(), "rel_error": error}

    # ---------------------------------------------------------------------------------------
    # gather
    # ---------------------------------------------------------------------------------------

    def gather_per_op(self, implementation: str, config: str, size: int, n: int, dtype: str) -> dict:
        clusters = self.clusters[(config, size)]
        blocks = clusters * size
        itemsize = ITEMSIZE[dtype]
        x = _storage(self.random((blocks, n), dtype))
        out = _poisoned((blocks, size * n), dtype)
        stride = gather_stride(kernels.GATHER_LAYOUT[implementation], n, itemsize)
        step = self.launcher(
            kernels.gather_loop_kernel(implementation, np.dtype(np.float32 if dtype == "float32" else np.uint16)),
            blocks, size, gather_shared_bytes(implementation, n, size, itemsize),
        )
        result = _storage(out)
        run = functools.partial(step, x, result, n, stride)
        run(1)
        _check_gather(out, x, size)
        latency = self.per_op(run)
        return self._per_op_record(latency, clusters, blocks * gather_bus_bytes(size, n, itemsize))

    def gather_single(self, algorithm: str, config: str, size: int, n: int, dtype: str) -> dict:
        clusters = self.clusters[(config, size)]
        blocks = clusters * size
        itemsize = ITEMSIZE[dtype]
        x = _storage(self.random((blocks, n), dtype))
        out = _poisoned((blocks, size * n), dtype)
        stride = gather_stride(algorithm, n, itemsize)
        kernel = self.launcher(
            gather_kernel(algorithm, np.dtype(np.float32 if dtype == "float32" else np.uint16)),
            blocks, size, gather_shared_bytes(algorithm, n, size, itemsize),
        )
        result = _storage(out)
        step = functools.partial(kernel, x, result, n, stride)
        step()
        _check_gather(out, x, size)
        latency = timing.graph_launch_us(step, self.repeats)
        return {"clusters": clusters, "latency_us": latency.as_dict()}


def _tasks(bench: PrimitivesBench, message_bytes, dtypes, configs):
    """(section, label, thunk) for every measurement, grouped by section in run order.

    Each thunk returns one record (a dict) of the results file; measurements shared by several
    records (float16 reduce rows per operation are float32 rows of half the bytes) run once. The
    kernels that spin on flags come last: the software grid barrier (it would hang if its blocks
    were not all resident) and ``direct_push`` (its waits give up after about a second).
    """
    tasks = []

    def floor(kind, key, measure):
        tasks.append(("floors", " ".join(map(str, key)), lambda: {"kind": kind, **bench.memo(key, measure)}))

    def point(section, primitive, method, implementation, config, size, dtype, nbytes, key, measure):
        n = nbytes // ITEMSIZE[dtype]
        fields = {
            "primitive": primitive, "method": method, "implementation": implementation,
            "family": report.family(implementation), "config": config, "cluster_size": size, "dtype": dtype,
            "message_bytes": nbytes, "n": n,
        }
        if primitive == "reduce" and method == "per_op" and implementation != "torch":
            fields["working_bytes"] = n * (ITEMSIZE[dtype] if packed(implementation, dtype) else FLOAT32_BYTES)
        label = f"{primitive} {method} {implementation} {config} N={size} {dtype} {nbytes} B"
        tasks.append((section, label, lambda: {**fields, **bench.memo(key, measure)}))

    def sweep():
        for config in configs:
            for size in bench.cluster_sizes:
                for dtype in dtypes:
                    for nbytes in message_bytes:
                        yield config, size, dtype, nbytes, nbytes // ITEMSIZE[dtype]

    for config in configs:
        for size in bench.cluster_sizes:
            floor("barrier", ("barrier", config, size), functools.partial(bench.barrier, config, size))
            floor("launch", ("launch", config, size), functools.partial(bench.empty_launch, config, size))
    for config in configs:
        for size in [s for s in bench.cluster_sizes if s > 1]:
            for pattern, threads in STREAM_CONFIGS:
                floor("dsmem_read", ("dsmem", config, size, pattern, threads),
                      functools.partial(bench.dsmem_read, config, size, pattern, threads))
    floor("copy", ("copy",), lambda: {"bandwidth_bytes_per_s": timing.copy_bandwidth().as_dict()})

    for config, size, dtype, nbytes, n in sweep():
        for impl in (i for i in report.REDUCE_PER_OP if i not in SPINNING):
            if impl == "torch":
                key = ("torch", config, size, n, dtype)
                measure = functools.partial(bench.torch_reduce_per_op, config, size, n, dtype)
            elif packed(impl, dtype):
                key = ("reduce", impl, config, size, n, dtype)
                measure = functools.partial(bench.reduce_per_op, impl, config, size, n, dtype)
            else:
                key = ("reduce", impl, config, size, n)
                measure = functools.partial(bench.reduce_per_op, impl, config, size, n)
            point("reduce per op", "reduce", "per_op", impl, config, size, dtype, nbytes, key, measure)
    for config, size, dtype, nbytes, n in sweep():
        for impl in report.REDUCE_SINGLE_LAUNCH:
            point("reduce single launch", "reduce", "single_launch", impl, config, size, dtype, nbytes,
                  ("reduce single", impl, config, size, n, dtype),
                  functools.partial(bench.reduce_single, impl, config, size, n, dtype))
    for config, size, dtype, nbytes, n in sweep():
        for impl in report.GATHER_PER_OP:
            point("gather per op", "gather", "per_op", impl, config, size, dtype, nbytes,
                  ("gather", impl, config, size, n, dtype),
                  functools.partial(bench.gather_per_op, impl, config, size, n, dtype))
    for config, size, dtype, nbytes, n in sweep():
        for impl in report.GATHER_SINGLE_LAUNCH:
            point("gather single launch", "gather", "single_launch", impl, config, size, dtype, nbytes,
                  ("gather single", impl, config, size, n, dtype),
                  functools.partial(bench.gather_single, impl, config, size, n, dtype))
    for impl in SPINNING:
        for config, size, dtype, nbytes, n in sweep():
            point(impl, "reduce", "per_op", impl, config, size, dtype, nbytes, ("reduce", impl, config, size, n),
                  functools.partial(bench.reduce_per_op, impl, config, size, n))
    return tasks


def _progress(tasks, enabled: bool):
    if not enabled:
        return tasks
    from tqdm import tqdm

    return tqdm(tasks, desc="bench primitives", unit="pt", mininterval=2.0)


def run_primitives_bench(
    cluster_sizes=CLUSTER_SIZES,
    message_bytes=MESSAGE_BYTES,
    dtypes=DEFAULT_DTYPES,
    configs=CONFIGS,
    repeats: int = 7,
    out_dir: str | Path = "benchmarks/results",
    tag: str | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> dict:
    """Run the sweep on GPU 0; write ``primitives_<tag>.json`` and ``primitives_*_<tag>.png`` into ``out_dir``.

    ``cluster_sizes`` (1..16), ``message_bytes`` (bytes per block, multiples of 16),
    ``dtypes`` (``float32``/``bfloat16``/``float16``) and ``configs`` (``one``/``chip``) span the sweep;
    ``repeats`` (>= 5) timings give each figure's median and spread. Prints the tables and
    returns the results dict (the JSON's content; ``report`` reads it back). ``tag`` defaults to
    the card's (:func:`~clusterlab.bench.timing.card_tag`: ``h200`` on an NVIDIA H200).
    """
    from ..gpu import device_info, require_hopper

    top, check = simulator.MAX_CLUSTER_SIZE, timing.check_settings_list
    cluster_sizes = check("cluster_sizes", cluster_sizes, f"integers in 1..{top}",
                          lambda size: is_int(size) and 1 <= size <= top)
    message_bytes = check("message_bytes", message_bytes, "positive multiples of 16 (bytes per block)",
                          lambda nbytes: is_int(nbytes) and nbytes >= 16 and nbytes % 16 == 0)
    dtypes = check("dtypes", dtypes, f"among {DTYPES}", DTYPES.__contains__)
    configs = check("configs", configs, f"among {CONFIGS}", CONFIGS.__contains__)
    if not (is_int(repeats) and repeats >= timing.MIN_REPEATS):
        raise ValueError(f"repeats must be an int >= {timing.MIN_REPEATS}, got {repeats!r}")
    if seed is not None and not (is_int(seed) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an int in 0 .. 2**63 - 1, got {seed!r}")
    timing.writable_dir(out_dir)
    require_hopper()
    tag = timing.card_tag(device_info()["gpu"]) if tag is None else tag

    out_dir = Path(out_dir)
    json_path = out_dir / f"primitives_{tag}.json"
    started = time.time()
    bench = PrimitivesBench(cluster_sizes, repeats, seed)
    tasks = _tasks(bench, tuple(message_bytes), tuple(dtypes), tuple(configs))
    clocks = timing.ClockSampler()
    results = {
        "schema": report.SCHEMA,
        "settings": {
            "cluster_sizes": list(cluster_sizes), "message_bytes": list(message_bytes), "dtypes": list(dtypes),
            "configs": list(configs), "repeats": repeats, "threads_per_block": THREADS_PER_BLOCK,
            "solo_shared_bytes": SOLO_SHARED_BYTES, "stream_buffer_bytes": STREAM_BUFFER_BYTES,
            "target_run_us": TARGET_RUN_US, "graph_chain": GRAPH_CHAIN, "tolerance": TOLERANCE,
        },
        "clusters": [{"config": c, "cluster_size": s, "clusters": k} for (c, s), k in bench.clusters.items()
                     if c in configs],
        "floors": [],
        "measurements": [],
    }
    print("clusters per launch: " + ", ".join(
        f"N={s}: {bench.clusters[('chip', s)]}" for s in cluster_sizes) + " (chip); 1 (one)", flush=True)
    section = None
    bar = _progress(tasks, progress)
    for name, label, thunk in bar:
        clocks.sample()
        if name != section:
            if section is not None:
                timing.write_json({**results, **timing.run_record(clocks)}, json_path)
            section = name
        record = thunk()
        if "error" in record:
            (bar.write if progress else print)(f"{label}: {record['error']}")
        (results["floors"] if name == "floors" else results["measurements"]).append(record)
    results.update(timing.run_record(clocks))
    report.complete(results)
    results["elapsed_s"] = round(time.time() - started, 1)
    timing.write_json(results, json_path)
    paths = report.plot_all(results, out_dir, tag)
    print(report.format_sweep(results))
    print(report.format_summary(results))
    print(f"wrote {json_path} and {', '.join(str(p) for p in paths)}")
    return results


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m clusterlab.bench.primitives",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", type=integer(1, simulator.MAX_CLUSTER_SIZE), nargs="+", action=Distinct,
                        default=list(CLUSTER_SIZES), help="cluster sizes")
    parser.add_argument("--bytes", type=integer(16, multiple_of=16), nargs="+", action=Distinct,
                        default=list(MESSAGE_BYTES),
                        help="message bytes per block")
    parser.add_argument("--dtype", nargs="+", action=Distinct, default=list(DEFAULT_DTYPES), choices=DTYPES)
    parser.add_argument("--config", nargs="+", action=Distinct, default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--repeats", type=integer(timing.MIN_REPEATS), default=7)
    parser.add_argument("--out-dir", type=results_folder, default="benchmarks/results")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the output files (default: the card's name)")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run_primitives_bench(
        cluster_sizes=args.cluster, message_bytes=args.bytes, dtypes=args.dtype, configs=args.config,
        repeats=args.repeats, out_dir=args.out_dir, tag=args.tag, progress=not args.no_progress, seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
