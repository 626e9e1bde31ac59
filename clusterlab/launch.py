"""Launch any Numba-CUDA ``@cuda.jit`` kernel as thread-block clusters.

::

    import clusterlab

    step = clusterlab.launch(kernel, grid=16, cluster=4, block=256, shared_bytes=96 * 1024)
    step(x, y, 0.5)      # torch CUDA tensors, numba device arrays, scalars

Grid convention
---------------
``grid`` counts **blocks** per axis, as ``kernel[grid, block]`` and CUDA C's ``<<<grid, block>>>``
do, and must be a whole number of clusters on every axis. ``grid=16, cluster=4`` launches 16
blocks in 4 clusters of 4: in the kernel ``cuda.blockIdx.x`` runs 0..15, ``ptx.cluster_idx()[0]``
0..3 and ``ptx.cluster_rank()`` 0..3. (cuda.core's ``LaunchConfig`` counts *clusters* in
``grid`` once ``cluster`` is given; clusterlab does not.) 1-D and 3-D shapes are accepted for
``grid``, ``cluster`` and ``block`` (an int means ``(n, 1, 1)``).

Cluster sizes 1 to 8 are portable. 9 to 16 blocks per cluster need ``non_portable=True``
(Hopper's non-portable cluster size; the launcher sets the kernel attribute).

Shared memory
-------------
``shared_bytes`` is the dynamic shared memory per block, what a kernel declares with
``cuda.shared.array(0, dtype)`` (each such array starts at the same address; its length is
``shared_bytes // itemsize``; pass ``alignment=16`` or more when the copy engine uses it). Above
48 KB the launcher raises the kernel's limit, up to the device's opt-in maximum (227 KB on H100)
minus the kernel's static shared memory.

Streams
-------
With ``stream=None`` every call launches on torch's current stream for the device, so
``with torch.cuda.stream(s):`` and ``torch.cuda.graph(g)`` capture work as for torch's own
operations; before torch has initialised CUDA that is the legacy default stream. A fixed stream
may be given instead: a ``torch.cuda.Stream``, numba or cuda.core stream (anything with
``__cuda_stream__``), or a raw ``CUstream`` handle as an int.

What a call costs
-----------------
:func:`launch` returns a :class:`ClusterKernel`, cached: the same arguments return the same
object. Its first call for a set of argument types compiles the kernel, sets its attributes and
checks that a cluster fits on the GPU; later calls pack the arguments (torch tensors directly in
numba's array layout, only the fields that change) and call ``cuLaunchKernelEx``; numba device
arrays take numba's own, slower packing path. ``python -m clusterlab.bench.launch_overhead``
measures the host time per call against the bare driver call and numba's own
``kernel[grid, block](...)``; its results are in ``benchmarks/results/launch_overhead_*.json``.
Launch once before capturing a CUDA graph, as with any lazily compiled kernel.

Programmatic dependent launch
-----------------------------
``dependent=True`` lets the kernel start while the kernel before it in the stream is still
running (``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``): its blocks are placed as soon
as every block of the earlier kernel has called :func:`clusterlab.ptx.launch_dependents` (or
exited) and there is room, and each waits in :func:`clusterlab.ptx.grid_dependency_wait` until
the earlier kernel has completed and its writes are visible. What a block does before that wait
overlaps the earlier kernel's end: loads of data no kernel writes (weights), never a read of the
earlier kernel's results or a write to anything it reads. The attribute is kept when a CUDA graph
is captured (the graph gets a programmatic edge). The fused layers of :mod:`clusterlab.fused` do not
use it: on the H200 it made their back-to-back steps slower (``docs/fused-decode-notes.md``).

Clusters that wait for one another
----------------------------------
A kernel whose clusters wait for each other (a flag in device memory that one cluster raises and
another spins on) needs them all resident at once, or a waiting cluster may hold the room the
other needs. ``co_resident=True`` makes the first call for a set of argument types check the
occupancy query (:meth:`ClusterKernel.max_active_clusters`) against the grid's clusters and
raise ``ValueError`` before anything launches. It cannot see other work sharing the GPU (another
process, a kernel on another stream): such a kernel must not run beside work that fills the GPU.

Errors
------
Arguments are checked before the driver is touched: ``ValueError`` names the parameter, the value
and what is allowed (grid not a multiple of the cluster, more than 16 blocks per cluster or more
than 8 without ``non_portable=True``, more than 1024 threads per block, shared memory over the
limit). No GPU, or one below compute capability 9.0, raises :class:`clusterlab.HopperRequired`.
Host arrays (numpy, CPU tensors) raise ``TypeError``: nothing is copied behind the caller's back.
Kernels compiled with ``debug=True`` run, but device-side exceptions are not reported.
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
import sys
import threading

import numpy as np

from . import _numba_private, gpu

#: Per-axis limits of a launch, in blocks (grid) and threads (block).
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
#: Largest cluster everywhere, and with the non-portable opt-in (Hopper).
PORTABLE_CLUSTER_BLOCKS = gpu.PORTABLE_MAX_CLUSTER_SIZE
MAX_CLUSTER_BLOCKS = gpu.NON_PORTABLE_MAX_CLUSTER_SIZE
#: Dynamic shared memory a kernel gets without raising its attribute.
DEFAULT_SHARED_BYTES_LIMIT = 48 * 1024

_AXES = "xyz"


# --------------------------------------------------------------------------------------------
# Argument validation (pure Python: runs before anything touches the driver)
# --------------------------------------------------------------------------------------------


def _dim3(name, value, per_axis_max):
    """``value`` (int or 1..3 ints) as an (x, y, z) tuple of positive ints within ``per_axis_max``."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(items) <= 3:
        raise ValueError(f"{name}={value!r}: give an int or 1 to 3 sizes (x, y, z)")
    dims = []
    for axis, item, limit in zip(_AXES, items, per_axis_max):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"{name}={value!r}: sizes must be integers, got {item!r} on axis {axis}")
        if not 1 <= item <= limit:
            raise ValueError(f"{name}={value!r}: axis {axis} must be between 1 and {limit}, got {item}")
        dims.append(int(item))
    return tuple(dims) + (1,) * (3 - len(dims))


def validate_launch(grid, cluster, block, shared_bytes=0, non_portable=False):
    """Normalised ``(grid, cluster, block, shared_bytes)`` as 3-tuples, or ValueError; no GPU needed."""
    if not isinstance(non_portable, (bool, np.bool_)):
        raise ValueError(f"non_portable={non_portable!r}: must be True or False")
    cluster3 = _dim3("cluster", cluster, (MAX_CLUSTER_BLOCKS,) * 3)
    cluster_blocks = math.prod(cluster3)
    if cluster_blocks > MAX_CLUSTER_BLOCKS:
        raise ValueError(
            f"cluster={cluster!r} has {cluster_blocks} blocks; a cluster holds at most "
            f"{MAX_CLUSTER_BLOCKS} blocks ({PORTABLE_CLUSTER_BLOCKS} portably)"
        )
    if cluster_blocks > PORTABLE_CLUSTER_BLOCKS and not non_portable:
        raise ValueError(
            f"cluster={cluster!r} has {cluster_blocks} blocks; more than {PORTABLE_CLUSTER_BLOCKS} "
            f"blocks per cluster is a non-portable size: pass non_portable=True (up to "
            f"{MAX_CLUSTER_BLOCKS} on H100/H200)"
        )
    block3 = _dim3("block", block, MAX_BLOCK)
    threads = math.prod(block3)
    if threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"block={block!r} has {threads} threads; a block holds at most {MAX_THREADS_PER_BLOCK}")
    grid3 = _dim3("grid", grid, MAX_GRID)
    for axis, blocks, per_cluster in zip(_AXES, grid3, cluster3):
        if blocks % per_cluster:
            raise ValueError(
                f"grid={grid!r} is not a whole number of clusters: axis {axis} has {blocks} blocks, "
                f"cluster={cluster!r} needs a multiple of {per_cluster} (grid counts blocks, not clusters)"
            )
    if isinstance(shared_bytes, (bool, np.bool_)) or not isinstance(shared_bytes, (int, np.integer)) or shared_bytes < 0:
        raise ValueError(f"shared_bytes={shared_bytes!r}: must be a non-negative number of bytes")
    return grid3, cluster3, block3, int(shared_bytes)


def _check_kernel(kernel):
    from numba.cuda.dispatcher import CUDADispatcher

    if not isinstance(kernel, CUDADispatcher):
        raise TypeError(f"kernel must be a @numba.cuda.jit kernel, got {type(kernel).__name__}")
    if kernel.targetoptions.get("device"):
        raise TypeError(f"kernel {kernel.__name__!r} is a device function (device=True); launch a kernel")


def _stream_handle(stream):
    """``CUstream`` handle as an int, or None to follow torch's current stream at each call."""
    if stream is None:
        return None
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, (bool, np.bool_)):
        if stream < 0:
            raise ValueError(f"stream={stream!r}: a stream handle is a non-negative address")
        return int(stream)
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is None:
        raise TypeError(
            "stream must be None (torch's current stream), an int CUstream handle, or a stream "
            f"object with __cuda_stream__ (torch, numba, cuda.core); got {type(stream).__name__}"
        )
    return int(protocol()[1])


# --------------------------------------------------------------------------------------------
# Binding arguments: one pass per call appends each argument's kernel parameters to a list and
# returns its key; the tuple of keys selects a compiled plan
# --------------------------------------------------------------------------------------------


class _Deferred:
    """Placeholder in the parameter list for an argument that numba packs once the plan is known."""

    __slots__ = ("value", "ty")

    def __init__(self, value, ty):
        self.value, self.ty = value, ty


def _bind_scalar(value, out):
    out.append(value)
    return value.__class__


def _bind_numba(value, out):
    from numba.cuda.typing.typeof import typeof

    ty = typeof(value)
    out.append(_Deferred(value, ty))
    return ty


def _classify(value, out):
    """Binder for a Python class not seen before; remembered in ``_BINDERS``."""
    from numba.cuda.typing.typeof import typeof

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        binder = _numba_private.pack_tensor
    elif isinstance(value, np.ndarray):
        raise TypeError("numpy arrays live in host memory; pass a torch CUDA tensor or a numba device array")
    elif isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)) and _scalar_code(typeof(value)):
        binder = _bind_scalar
    else:
        binder = _bind_numba
    _BINDERS[value.__class__] = binder
    return binder(value, out)


#: Python class of an argument -> its binder ``bind(value, out) -> key``.
_BINDERS: dict = {}


def _bind(args):
    """(key, parameter values) of a call's arguments."""
    values = []
    key = tuple([_BINDERS.get(arg.__class__, _classify)(arg, values) for arg in args])
    return key, values


# --------------------------------------------------------------------------------------------
# Kernel parameters: one 8-byte slot per flattened parameter, filled with struct.pack_into
# --------------------------------------------------------------------------------------------

#: struct code of each ctypes scalar numba packs (``_prepare_args``).
_CTYPE_CODES = {
    ctypes.c_int8: "b",
    ctypes.c_uint8: "B",
    ctypes.c_int16: "h",
    ctypes.c_uint16: "H",
    ctypes.c_int32: "i",
    ctypes.c_uint32: "I",
    ctypes.c_int64: "q",
    ctypes.c_uint64: "Q",
    ctypes.c_float: "f",
    ctypes.c_double: "d",
    ctypes.c_bool: "?",
}
_INTEGER_CODES = {8: "b", 16: "h", 32: "i", 64: "q"}
_SLOT_BYTES = 8


def _scalar_code(ty):
    """struct code for a numba scalar type clusterlab passes by value, or None (numba packs it)."""
    from numba.cuda import types

    if isinstance(ty, types.Boolean):
        return "?"
    if isinstance(ty, types.Integer):
        code = _INTEGER_CODES[ty.bitwidth]
        return code if ty.signed else code.upper()
    if isinstance(ty, types.Float) and ty.bitwidth in (32, 64):
        return "f" if ty.bitwidth == 32 else "d"
    return None


def _numba_items(overload, deferred):
    """numba's packing of a deferred argument, as (struct code, value) pairs."""
    pairs = []
    for item in _numba_private.pack_argument(overload, deferred.ty, deferred.value):
        if isinstance(item, ctypes._SimpleCData):
            pairs.append((_CTYPE_CODES[type(item)], item.value))
        else:
            pairs.append(("?" if isinstance(item, bool) else "q", item))
    return pairs


def _slot(code):
    return code + "x" * (_SLOT_BYTES - struct.calcsize("<" + code))


# --------------------------------------------------------------------------------------------
# Plans: one compiled kernel + launch state per argument-type key
# --------------------------------------------------------------------------------------------

#: Streams whose launch configs a plan keeps before starting over.
_MAX_CACHED_STREAMS = 64


class _Plan:
    """Everything a repeated launch needs for one set of argument types.

    ``params`` has one entry per flattened kernel parameter: an int, the index of a per-launch
    value (packed with ``codes[index]``), or a ``Constant``. ``buffer`` holds one 8-byte slot per
    per-launch value, then one per constant (written once); ``pointers[i]`` points at parameter
    i's slot: the ``void**`` the driver reads. A launch packs only the per-launch values.
    """

    __slots__ = (
        "owner", "overload", "function", "deferred", "layout", "buffer", "pointers", "params", "lock", "configs",
        "driver",
    )

    def __init__(self, owner, overload, function, params, codes, deferred, driver):
        self.owner = owner
        self.overload = overload
        self.function = function
        self.deferred = deferred
        self.layout = struct.Struct("<" + "".join(_slot(code) for code in codes))
        constants = [p for p in params if isinstance(p, _numba_private.Constant)]
        self.buffer = (ctypes.c_uint64 * (len(codes) + len(constants)))(*([0] * len(codes) + [int(c) for c in constants]))
        base = ctypes.addressof(self.buffer)
        slots, constant_slot = [], len(codes)
        for param in params:
            if isinstance(param, _numba_private.Constant):
                slots.append(constant_slot)
                constant_slot += 1
            else:
                slots.append(param)
        self.pointers = (ctypes.c_void_p * len(params))(*(base + _SLOT_BYTES * slot for slot in slots))
        self.params = ctypes.addressof(self.pointers) if params else 0
        self.lock = threading.Lock()
        self.configs = {}
        self.driver = driver

    def config(self, stream):
        """``CUlaunchConfig`` for ``stream``, kept for the next launch there."""
        config = self.configs.get(stream)
        if config is not None:
            return config
        config = self._new_config(stream, self.owner.dependent)
        if len(self.configs) >= _MAX_CACHED_STREAMS:
            self.configs.clear()
        self.configs[stream] = config
        return config

    def _new_config(self, stream, dependent):
        """Grid in blocks, the cluster shape as a launch attribute, and programmatic dependent
        launch as another where ``dependent``."""
        driver, owner = self.driver, self.owner
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = owner.grid
        config.blockDimX, config.blockDimY, config.blockDimZ = owner.block
        config.sharedMemBytes = owner.shared_bytes
        config.hStream = stream
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        shape = attribute.value.clusterDim
        shape.x, shape.y, shape.z = owner.cluster
        attributes = [attribute]
        if dependent:
            attribute = driver.CUlaunchAttribute()
            attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attribute.value.programmaticStreamSerializationAllowed = 1
            attributes.append(attribute)
        config.attrs = attributes
        config.numAttrs = len(attributes)
        return config

    def launch(self, values, stream):
        """Launch with the per-launch ``values`` from :func:`_bind` on ``stream`` (an int handle)."""
        if self.deferred:
            expanded = []
            for item in values:
                if item.__class__ is _Deferred:
                    expanded += [value for _, value in _numba_items(self.overload, item)]
                else:
                    expanded.append(item)
            values = expanded
        config = self.configs.get(stream) or self.config(stream)
        with self.lock:
            self.layout.pack_into(self.buffer, 0, *values)
            (err,) = self.driver.cuLaunchKernelEx(config, self.function, self.params, 0)
        if err:
            self._retry(err, config, values)

    def _retry(self, err, config, values):
        """A thread without numba's context gets it made current once; any other error raises.

        (compute-sanitizer lists that first CUDA_ERROR_INVALID_CONTEXT among API errors.)
        """
        if err == self.driver.CUresult.CUDA_ERROR_INVALID_CONTEXT:
            from numba import cuda

            cuda.current_context()
            with self.lock:
                self.layout.pack_into(self.buffer, 0, *values)
                (err,) = self.driver.cuLaunchKernelEx(config, self.function, self.params, 0)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx failed with {err.name} for {self.owner!r}")

    def max_active_clusters(self):
        err, count = self.driver.cuOccupancyMaxActiveClusters(self.function, self._new_config(0, False))
        if err:
            raise RuntimeError(f"cuOccupancyMaxActiveClusters failed with {err.name} for {self.owner!r}")
        return count


def _check(result, call):
    err, *values = result
    if err:
        raise RuntimeError(f"{call} failed with {err.name}")
    return values[0] if values else None


class ClusterKernel:
    """A numba kernel bound to a cluster launch configuration; call it with the kernel's arguments.

    ``grid``, ``cluster``, ``block``: an int or a tuple of 1 to 3 ints (x, y, z); ``grid`` counts
    blocks and is a multiple of ``cluster`` per axis (see the module docstring). ``shared_bytes``:
    dynamic shared memory per block. ``stream``: None follows torch's current stream at each call.
    ``non_portable``: allow 9 to 16 blocks per cluster. ``dependent``: programmatic dependent
    launch (see the module docstring). ``co_resident``: the grid's clusters wait for each other, so
    the first call checks that all of them fit on the GPU at once (see the module docstring).

    Attributes ``grid``, ``cluster``, ``block`` hold the normalised 3-tuples and ``clusters`` the
    grid in clusters per axis. Prefer :func:`launch`, which caches these objects.
    """

    __slots__ = (
        "kernel", "grid", "cluster", "block", "shared_bytes", "non_portable", "dependent", "co_resident", "_stream",
        "_plans",
        "_device_id", "_shared_limit",
    )

    def __init__(self, kernel, *, grid, cluster, block, shared_bytes=0, stream=None, non_portable=False,
                 dependent=False, co_resident=False):
        _check_kernel(kernel)
        self.grid, self.cluster, self.block, self.shared_bytes = validate_launch(
            grid, cluster, block, shared_bytes, non_portable
        )
        if not isinstance(dependent, (bool, np.bool_)):
            raise ValueError(f"dependent={dependent!r}: must be True or False")
        if not isinstance(co_resident, (bool, np.bool_)):
            raise ValueError(f"co_resident={co_resident!r}: must be True or False")
        self.kernel = kernel
        self.non_portable = bool(non_portable)
        self.dependent = bool(dependent)
        self.co_resident = bool(co_resident)
        self._stream = _stream_handle(stream)
        self._plans = {}
        gpu.require_hopper()

        from numba import cuda

        device = cuda.current_context().device
        self._device_id = device.id
        self._shared_limit = device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        if self.shared_bytes > self._shared_limit:
            raise ValueError(
                f"shared_bytes={shared_bytes!r} exceeds this GPU's limit of {self._shared_limit} bytes of "
                "shared memory per block"
            )

    @property
    def clusters(self):
        """Grid in clusters per axis: ``grid[i] // cluster[i]``."""
        return tuple(g // c for g, c in zip(self.grid, self.cluster))

    def __repr__(self):
        return (
            f"ClusterKernel({getattr(self.kernel, '__name__', self.kernel)!s}, grid={self.grid}, "
            f"cluster={self.cluster}, block={self.block}, shared_bytes={self.shared_bytes})"
        )

    def __call__(self, *args):
        """Launch on the configured stream (torch's current one by default); returns immediately."""
        key, values = _bind(args)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(args, key)
            fit = plan.max_active_clusters()
            if fit == 0:
                raise ValueError(
                    f"{self!r} cannot run: not one cluster of {math.prod(self.cluster)} blocks x "
                    f"{math.prod(self.block)} threads with {self.shared_bytes} bytes of dynamic shared "
                    "memory (plus the kernel's static shared memory and registers) fits on the GPU; "
                    "use a smaller cluster, block or shared_bytes"
                )
            if self.co_resident and fit < math.prod(self.clusters):
                raise ValueError(
                    f"{self!r} has co_resident=True but only {fit} of its {math.prod(self.clusters)} clusters "
                    "fit on the GPU at once: its clusters wait for each other, so it could hang; use a "
                    "smaller grid"
                )
            self._plans[key] = plan
        stream = self._stream
        if stream is None:
            stream = _torch_current_stream(self._device_id)
        plan.launch(values, stream)

    def max_active_clusters(self, *args) -> int:
        """How many clusters of this configuration can be resident on the GPU at once (0: none fits).

        ``args`` are example arguments (only their types matter: they pick the compiled kernel).
        """
        key, _ = _bind(args)
        plan = self._plans.get(key) or self._plan(args, key)
        return plan.max_active_clusters()

    def _plan(self, args, key):
        """Compile for the argument types, set the kernel's attributes, lay out the parameters."""
        from cuda.bindings import driver
        from numba.cuda.typing.typeof import typeof

        argtypes = []
        for position, (arg, arg_key) in enumerate(zip(args, key)):
            binder = _BINDERS[arg.__class__]
            if binder is _numba_private.pack_tensor:
                _, _, contiguous, device = arg_key
                if device != self._device_id:
                    where = "the CPU" if device < 0 else f"cuda:{device}"
                    raise TypeError(
                        f"argument {position} is a tensor on {where}; {self!r} launches on cuda:{self._device_id}"
                    )
                ty = typeof(arg)
                argtypes.append(ty if contiguous else ty.copy(layout="A"))
            elif binder is _bind_scalar:
                argtypes.append(typeof(arg))
            else:
                argtypes.append(arg_key)
        _numba_private.copy_inlined_callees_whole()
        overload = self.kernel.compile(tuple(argtypes))

        params, codes, deferred = [], [], False
        for arg, arg_key, ty in zip(args, key, argtypes):
            binder = _BINDERS[arg.__class__]
            if binder is _numba_private.pack_tensor:
                tensor_params = _numba_private.tensor_parameters(arg_key)
                first = len(codes)
                params += [p if isinstance(p, _numba_private.Constant) else first + p for p in tensor_params]
                codes += "q" * (1 + max(p for p in tensor_params if not isinstance(p, _numba_private.Constant)))
            elif binder is _bind_scalar:
                params.append(len(codes))
                codes.append(_scalar_code(ty))
            else:
                for code, _ in _numba_items(overload, _Deferred(arg, ty)):
                    params.append(len(codes))
                    codes.append(code)
                deferred = True

        self._check_fit(overload)
        kernel = driver.CUkernel(_numba_private.kernel_handle(overload))
        device = driver.CUdevice(self._device_id)
        self._set_attributes(driver, kernel, device, overload.shared_mem_per_block)
        function = _check(driver.cuKernelGetFunction(kernel), "cuKernelGetFunction")
        return _Plan(self, overload, function, params, codes, deferred, driver)

    def _check_fit(self, overload):
        threads = math.prod(self.block)
        limit = overload.max_threads_per_block
        if threads > limit:
            raise ValueError(
                f"block={self.block} has {threads} threads; kernel {self.kernel.__name__!r} allows at most "
                f"{limit} (its registers per thread, or its launch_bounds)"
            )
        static = overload.shared_mem_per_block
        if static + self.shared_bytes > self._shared_limit:
            raise ValueError(
                f"shared_bytes={self.shared_bytes} plus the kernel's {static} bytes of static shared memory "
                f"exceeds this GPU's limit of {self._shared_limit} bytes per block"
            )

    def _set_attributes(self, driver, kernel, device, static_bytes):
        """Raise the dynamic shared memory limit (never lower it) and allow non-portable clusters.

        Without the opt-in, static plus dynamic shared memory must stay within 48 KB, so the limit
        is raised whenever the two together exceed it.
        """
        attribute = driver.CUfunction_attribute
        if static_bytes + self.shared_bytes > DEFAULT_SHARED_BYTES_LIMIT:
            current = _check(
                driver.cuKernelGetAttribute(attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel, device),
                "cuKernelGetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
            )
            if current < self.shared_bytes:
                _check(
                    driver.cuKernelSetAttribute(
                        attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.shared_bytes, kernel, device
                    ),
                    "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                )
        if math.prod(self.cluster) > PORTABLE_CLUSTER_BLOCKS:
            _check(
                driver.cuKernelSetAttribute(
                    attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1, kernel, device
                ),
                "cuKernelSetAttribute(NON_PORTABLE_CLUSTER_SIZE_ALLOWED)",
            )


def _torch_current_stream(device_id):
    """torch's current stream on ``device_id`` as an int handle; 0 (legacy default) before torch uses CUDA.

    ``torch._C._cuda_getCurrentRawStream`` is the lookup torch's own compiled code (inductor's
    ``get_raw_stream``) makes per kernel launch, far cheaper than ``torch.cuda.current_stream()``,
    which builds a Stream object under a device guard (both timed by
    :mod:`clusterlab.bench.launch_overhead`).
    Once torch has initialised CUDA it stays initialised, so the lookup function is kept.
    """
    global _raw_stream
    if _raw_stream is None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return 0
        _raw_stream = torch._C._cuda_getCurrentRawStream
    return _raw_stream(device_id)


_raw_stream = None


@functools.lru_cache(maxsize=256)
def _cached_launcher(kernel, grid, cluster, block, shared_bytes, stream, non_portable, dependent, co_resident):
    return ClusterKernel(
        kernel, grid=grid, cluster=cluster, block=block, shared_bytes=shared_bytes, stream=stream,
        non_portable=non_portable, dependent=dependent, co_resident=co_resident,
    )


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def launch(kernel, *, grid, cluster, block, shared_bytes=0, stream=None, non_portable=False,
           dependent=False, co_resident=False) -> ClusterKernel:
    """Launcher for ``kernel`` as clusters: ``launch(kernel, grid=..., cluster=..., block=...)(*args)``.

    ``grid`` counts blocks per axis and must be a multiple of ``cluster`` per axis; see
    :class:`ClusterKernel` and the module docstring for every parameter. Repeated calls with the
    same configuration return the same cached :class:`ClusterKernel`.
    """
    key = (kernel, _frozen(grid), _frozen(cluster), _frozen(block), shared_bytes, stream, non_portable, dependent,
           co_resident)
    try:
        hash(key)
    except TypeError:  # an unhashable stream object: no caching, same behaviour
        return ClusterKernel(
            kernel, grid=grid, cluster=cluster, block=block, shared_bytes=shared_bytes, stream=stream,
            non_portable=non_portable, dependent=dependent, co_resident=co_resident,
        )
    return _cached_launcher(*key)


def max_active_clusters(kernel, args, *, cluster, block, shared_bytes=0, non_portable=False) -> int:
    """Clusters of shape ``cluster`` x ``block`` threads that can be resident on the GPU at once.

    ``args`` is a tuple of example arguments for ``kernel`` (their types select the compiled
    kernel, whose registers and static shared memory count). 0 means not even one cluster fits.
    The number of SMs divided by ``cluster_size`` is an upper bound; GPC boundaries lower it.
    """
    launcher = ClusterKernel(
        kernel, grid=cluster, cluster=cluster, block=block, shared_bytes=shared_bytes, non_portable=non_portable
    )
    return launcher.max_active_clusters(*args)


@functools.cache
def _idle_kernel():
    """A kernel only the occupancy query asks about (:func:`cluster_sms`); never launched."""
    from numba import cuda

    def idle(out):
        pass

    return cuda.jit(idle)


def cluster_sms(cluster_size: int) -> int:
    """SMs of the current CUDA device that clusters of ``cluster_size`` blocks fill at once at one
    block an SM: ``cluster_size`` times the clusters of blocks that each take an SM's shared memory
    that may be resident (:func:`max_active_clusters`).

    GPCs hold whole clusters, so where the cluster size does not divide a GPC's SMs some of them stay
    out of such a grid: on the H100 and H200 (132 SMs) 132 for clusters of 1 and 2, 120 for 4 and 8, 112
    for 16 (``python -m clusterlab.bench.placement``). A grid of more blocks than these puts two of them
    on some SMs. ``cluster_size``: 1 to 16."""
    from numba import cuda

    if not (isinstance(cluster_size, int) and 1 <= cluster_size <= MAX_CLUSTER_BLOCKS):
        raise ValueError(f"cluster_size must be an int in 1..{MAX_CLUSTER_BLOCKS}, got {cluster_size!r}")
    gpu.require_hopper()
    shared = cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    clusters = max_active_clusters(_idle_kernel(), (cuda.device_array(1, np.int32),), cluster=cluster_size, block=32,
                                   shared_bytes=shared, non_portable=cluster_size > PORTABLE_CLUSTER_BLOCKS)
    return cluster_size * clusters
