"""Host time per cluster launch: clusterlab's launcher next to numba's dispatch and the driver floor.

Run on a Hopper GPU::

    python -m clusterlab.bench.launch_overhead --output benchmarks/results/launch_overhead_h100.json

What is timed: the host wall time of ``--launches`` back-to-back launches of a tiny cluster kernel
(16 blocks in clusters of 4, 128 threads; two float32 torch tensors of 2048 elements and a float
scalar), divided by ``--launches``. The GPU finishes each launch faster than the host issues the
next, so the figure is host cost. ``--repeats`` such batches per variant, the variants interleaved
round-robin so that clock drift hits all alike; the JSON records median, 10th and 90th percentile.

Variants (``host_us_per_launch`` keys):

- ``clusterlab-torch``: a cached :class:`clusterlab.ClusterKernel` called with torch tensors,
  stream looked up from torch at each call (the default);
- ``clusterlab-torch-fixed-stream``: the same with ``stream=`` given once;
- ``clusterlab-launch-idiom``: ``clusterlab.launch(kernel, grid=..., ...)(args)`` each time;
- ``clusterlab-numba-arrays``: a ClusterKernel called with numba device arrays (numba packs them);
- ``numba-dispatch``: numba's own ``kernel[grid, block](tensors)`` (no clusters);
- ``cuda-core-prepacked``: ``cuda.core.launch`` of the same kernel with arguments packed once;
- ``driver-prepacked``: ``cuLaunchKernelEx`` with a parameter block built once (the floor);
- ``graph-replay``: replay of a torch CUDA graph holding one cluster launch.

``torch_stream_lookup_us`` times the two ways of asking torch for its current stream.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import time
import warnings

import numpy as np

from ..argtypes import integer, results_file
from ..gpu import require_hopper
from .timing import commit, driver_release, write_json

#: Host time per launch the launcher must stay under, with torch tensors.
TARGET_US = 8.0
GRID, CLUSTER, BLOCK = 16, 4, 128
ELEMENTS = GRID * BLOCK


def build_kernel():
    from numba import cuda

    from .. import ptx

    @cuda.jit
    def scale_and_rank(out, x, alpha):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = x[i] * alpha + ptx.cluster_rank()

    return scale_and_rank


def driver_floor(kernel, args, stream):
    """A launch function that only calls cuLaunchKernelEx with a parameter block packed once."""
    from cuda.bindings import driver
    from numba.cuda.typing.typeof import typeof

    from .. import _numba_private

    overload = kernel.compile(tuple(typeof(a) for a in args))
    items = [i for a in args for i in _numba_private.pack_argument(overload, typeof(a), a)]
    slots = [
        (type(item)(item.value) if isinstance(item, ctypes._SimpleCData) else ctypes.c_int64(item)) for item in items
    ]
    pointers = (ctypes.c_void_p * len(slots))(*(ctypes.addressof(s) for s in slots))
    _, function = driver.cuKernelGetFunction(driver.CUkernel(_numba_private.kernel_handle(overload)))
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = GRID, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = BLOCK, 1, 1
    config.hStream = stream
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attribute.value.clusterDim.x, attribute.value.clusterDim.y, attribute.value.clusterDim.z = CLUSTER, 1, 1
    config.attrs, config.numAttrs = [attribute], 1
    address = ctypes.addressof(pointers)

    def run():
        driver.cuLaunchKernelEx(config, function, address, 0)

    run.keep = (slots, pointers)  # the parameter block must outlive the closure
    return run


def cuda_core_floor(kernel, args, stream):
    """A launch function calling cuda.core's launch with arguments packed once."""
    from cuda.core import Kernel, LaunchConfig, Stream, launch
    from numba.cuda.typing.typeof import typeof

    from .. import _numba_private

    overload = kernel.compile(tuple(typeof(a) for a in args))
    packed = [i for a in args for i in _numba_private.pack_argument(overload, typeof(a), a)]
    core_kernel = Kernel.from_handle(_numba_private.kernel_handle(overload))
    config = LaunchConfig(grid=GRID // CLUSTER, cluster=CLUSTER, block=BLOCK)
    core_stream = Stream.from_handle(stream)
    return lambda: launch(core_stream, config, core_kernel, *packed)


def stats(samples_us):
    values = np.asarray(samples_us)
    return {
        "median": round(float(np.median(values)), 3),
        "p10": round(float(np.percentile(values, 10)), 3),
        "p90": round(float(np.percentile(values, 90)), 3),
        "min": round(float(values.min()), 3),
        "max": round(float(values.max()), 3),
    }


def machine_facts():
    from cuda.bindings import driver
    from numba import cuda

    device = cuda.get_current_device()
    _, cuda_version = driver.cuDriverGetVersion()
    name = device.name.decode() if isinstance(device.name, bytes) else device.name
    driver_version = driver_release() or "unknown"
    from ..gpu import software_versions

    return {
        "card": name,
        "driver": driver_version,
        "cuda_driver_api": f"{cuda_version // 1000}.{cuda_version % 1000 // 10}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit(),
        "software": software_versions(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=integer(1), default=400, help="launches per timed batch")
    parser.add_argument("--repeats", type=integer(1), default=25, help="timed batches per variant")
    parser.add_argument("--output", type=results_file, help="write the JSON record here")
    options = parser.parse_args(argv)
    require_hopper()
    warnings.simplefilter("ignore")  # numba's low-occupancy warning for the 16-block grid

    import torch
    from numba import cuda

    import clusterlab

    kernel = build_kernel()
    x = torch.randn(ELEMENTS, device="cuda")
    out = torch.full_like(x, float("nan"))
    alpha = 1.5
    stream = torch.cuda.current_stream().cuda_stream
    x_numba, out_numba = cuda.as_cuda_array(x), cuda.as_cuda_array(out)

    step = clusterlab.launch(kernel, grid=GRID, cluster=CLUSTER, block=BLOCK)
    fixed = clusterlab.launch(kernel, grid=GRID, cluster=CLUSTER, block=BLOCK, stream=stream)
    step(out, x, alpha)
    torch.cuda.synchronize()
    ranks = (torch.arange(ELEMENTS, device="cuda") // BLOCK) % CLUSTER
    expected = (x.double() * alpha + ranks).float()  # the kernel computes in float64 (alpha is a float)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6), "the launch under test computes the wrong result"

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(out, x, alpha)

    variants = {
        "clusterlab-torch": lambda: step(out, x, alpha),
        "clusterlab-torch-fixed-stream": lambda: fixed(out, x, alpha),
        "clusterlab-launch-idiom": lambda: clusterlab.launch(kernel, grid=GRID, cluster=CLUSTER, block=BLOCK)(
            out, x, alpha
        ),
        "clusterlab-numba-arrays": lambda: fixed(out_numba, x_numba, alpha),
        "numba-dispatch": lambda: kernel[GRID, BLOCK](out, x, alpha),
        "cuda-core-prepacked": cuda_core_floor(kernel, (out, x, alpha), stream),
        "driver-prepacked": driver_floor(kernel, (out, x, alpha), stream),
        "graph-replay": graph.replay,
    }
    samples = {name: [] for name in variants}
    for name, run in variants.items():  # warm-up: compile, load, fill caches
        for _ in range(50):
            run()
    torch.cuda.synchronize()
    for _ in range(options.repeats):
        for name, run in variants.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(options.launches):
                run()
            samples[name].append((time.perf_counter() - start) / options.launches * 1e6)
    torch.cuda.synchronize()
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6), "a timed launch computed the wrong result"

    lookups = {
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream(0).cuda_stream,
        "torch._C._cuda_getCurrentRawStream": lambda: torch._C._cuda_getCurrentRawStream(0),
    }
    lookup_us = {}
    for name, run in lookups.items():
        start = time.perf_counter()
        for _ in range(20000):
            run()
        lookup_us[name] = round((time.perf_counter() - start) / 20000 * 1e6, 3)

    results = {name: stats(values) for name, values in samples.items()}
    record = {
        **machine_facts(),
        "kernel": "out[i] = x[i] * alpha + cluster_rank(); two float32 torch tensors + a float",
        "grid_blocks": GRID,
        "cluster_blocks": CLUSTER,
        "block_threads": BLOCK,
        "launches_per_batch": options.launches,
        "batches": options.repeats,
        "host_us_per_launch": results,
        "torch_stream_lookup_us": lookup_us,
        "target_us": TARGET_US,
        "meets_target": results["clusterlab-torch"]["median"] <= TARGET_US,
    }
    if options.output:
        write_json(record, options.output)
    print(f"{record['card']}, driver {record['driver']}: host microseconds per launch (median [p10, p90])")
    for name, value in results.items():
        print(f"  {name:32s} {value['median']:8.2f}  [{value['p10']:.2f}, {value['p90']:.2f}]")
    for name, value in lookup_us.items():
        print(f"  lookup {name:42s} {value:6.3f}")


if __name__ == "__main__":
    main()
