"""Every use of a private numba-cuda interface in clusterlab, in one place.

numba-cuda 0.30 has no public way to launch a compiled kernel with launch attributes (clusters)
or to pack its arguments outside its own launcher. clusterlab needs seven things from
inside numba-cuda, and takes them only from here:

1. the driver handle of a compiled kernel: ``overload._codelibrary.get_cufunc().kernel`` (a
   cuda.core ``Kernel`` wrapping a ``CUkernel`` of the CUDA library API);
2. numba's own argument packing, ``overload._prepare_args(ty, val, stream, retr, kernelargs)``
   with a stream from ``numba.cuda.cudadrv.driver._to_core_stream``, for argument types
   clusterlab does not pack itself;
3. compiling device functions for a chosen compute capability: numba's
   ``CUDADispatcher.compile_device`` takes the cc from ``numba.cuda.dispatcher.get_current_device()``,
   which needs a GPU, even inside ``compile_ptx(..., cc=...)``; :func:`device_functions_compiled_for`
   substitutes the requested cc so PTX checks of kernels that call device functions run anywhere;
4. the flattened layout of an array argument (numba's ``ArrayModel``): ``meminfo, parent,
   nitems, itemsize, data, shape[0..ndim), strides[0..ndim)`` with strides in bytes; clusterlab
   packs torch tensors in this layout directly, which is what makes a launch cost microseconds;
5. numba's on-disk kernel cache (``numba.cuda.dispatcher.CUDACache``) under a key and in a folder
   of clusterlab's choosing (:func:`cache_on_disk`): numba's own key hashes the pickled closure of
   the kernel, and the device functions in a fused kernel's closure pickle with an id that is new
   in every process, so it would never find an entry; its freshness stamp is one file's mtime,
   while a fused kernel's code spans several modules;
6. a faster copy in numba's IR inliner (:func:`copy_inlined_callees_whole`). Before it inlines a
   device function (``inline=True``, i.e. ``"always"``), ``InlineWorker.inline_ir`` deep-copies the
   callee's IR twice, one ``copy.deepcopy`` per basic block. Every block refers to the function's
   scope, which holds every variable, so each block's copy copies all of them again: the cost grows
   with blocks x variables (NVIDIA/numba-cuda#688), and it was 70-80% of the time numba took to
   compile a fused kernel. Within one ``inline_ir`` call, clusterlab has the blocks of one IR copied
   with one memo, as one object graph: the same IR, one scope copy instead of one per block, and
   the same PTX byte for byte;
7. whether numba-cuda can compile here at all (:func:`compiler_problem`): whether it finds libNVVM
   (``numba.cuda.cudadrv.nvvm.is_available``), and whether its target context loads
   (``cuda_target.target_context.refresh()``, as every compilation does first): that imports its NumPy
   array support, which registers its overloads by looking NumPy's functions up, so a NumPy without
   one of them fails every compilation with an ``AttributeError`` (numba-cuda 0.30 looks up
   ``np.row_stack``, which numpy 2.5 removed).

``tests/test_numba_private.py`` pins each of these; if numba-cuda changes one, that test fails
before a kernel receives garbage.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
import warnings

#: Member names of numba's array data model, in the order a kernel receives them.
ARRAY_MEMBERS = ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides")


@functools.cache
def compiler_problem() -> str | None:
    """Why numba-cuda cannot compile a kernel in this process (a sentence), or ``None``.

    Asks numba-cuda whether it finds libNVVM, then loads its target context as a compilation does
    first, and names the NumPy that breaks it; the result is kept for the process.
    """
    import importlib.metadata

    import numpy
    from numba.cuda.cudadrv import nvvm
    from numba.cuda.descriptor import cuda_target

    if not nvvm.is_available():
        return ("numba-cuda finds no libNVVM to compile with: install clusterlab's cu13 or cu12 extra (the one of "
                "your driver's CUDA version), or a CUDA toolkit")
    try:
        cuda_target.target_context.refresh()
    except AttributeError as exc:  # a NumPy function numba-cuda names is missing
        version = importlib.metadata.version("numba-cuda")
        return (f"numba-cuda {version} cannot compile with numpy {numpy.__version__} ({exc}); install the numpy "
                "clusterlab requires (numpy<2.5)")
    return None


def kernel_handle(overload) -> int:
    """``CUkernel`` handle (an int) of a compiled overload, loaded in the current context."""
    return int(overload._codelibrary.get_cufunc().kernel.handle)


@contextlib.contextmanager
def device_functions_compiled_for(cc: tuple[int, int]):
    """Within the block, device functions a kernel calls are compiled for ``cc``, GPU or not."""
    from numba.cuda import dispatcher

    current = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = current


@functools.cache
def _default_stream():
    from numba.cuda.cudadrv.driver import _to_core_stream

    return _to_core_stream(0)


def pack_argument(overload, ty, value) -> list:
    """numba's flattened kernel arguments for ``value`` of numba type ``ty`` (ints and ctypes scalars).

    Packs exactly as numba's own launcher does on the default stream. Raises TypeError when numba
    copied host memory to the device for it: a cluster launch never transfers data behind the
    caller's back.
    """
    writebacks, packed = [], []
    overload._prepare_args(ty, value, _default_stream(), writebacks, packed)
    if writebacks:
        raise TypeError(f"argument of type {type(value).__name__} is in host memory; pass a device array")
    return packed


class Constant(int):
    """A kernel parameter whose value is the same for every launch of a plan."""


def pack_tensor(tensor, out) -> tuple:
    """Append the per-launch fields of a torch tensor's array argument to ``out``; return its key.

    A one-dimensional contiguous tensor appends ``(count, data pointer)``, any other
    ``(nitems, data pointer, *shape, *strides in bytes)``; :func:`tensor_parameters` places them
    among the kernel's parameters. The key ``(dtype, ndim, contiguous, device index)`` holds
    everything numba's type for the tensor, the parameter layout and the validity of the launch
    depend on: tensors with equal keys share a compiled kernel. Five tensor attribute reads.
    """
    dtype = tensor.dtype
    shape = tensor.shape
    contiguous = tensor.is_contiguous()
    if contiguous and len(shape) == 1:
        out += (shape[0], tensor.data_ptr())
    else:
        itemsize = dtype.itemsize
        out += (tensor.numel(), tensor.data_ptr(), *shape)
        out += [stride * itemsize for stride in tensor.stride()]
    return (dtype, len(shape), contiguous, tensor.get_device())


def tensor_parameters(key) -> list:
    """numba's kernel parameters for a tensor with :func:`pack_tensor` key ``key``, in order.

    meminfo, parent, nitems, itemsize, data, shape..., strides...: each is an ``int`` index into
    the values :func:`pack_tensor` appended for the tensor, or a :class:`Constant` (null meminfo
    and parent: the kernel never owns the memory; the itemsize; the unit stride of a 1-D
    contiguous tensor).
    """
    dtype, ndim, contiguous, _ = key
    itemsize = Constant(dtype.itemsize)
    null = Constant(0)
    if contiguous and ndim == 1:
        return [null, null, 0, itemsize, 1, 0, itemsize]
    shape = list(range(2, 2 + ndim))
    strides = list(range(2 + ndim, 2 + 2 * ndim))
    return [null, null, 0, itemsize, 1, *shape, *strides]


#: What numba names the files of a kernel kept by :func:`cache_on_disk`: an index per key
#: (``<base>.nbi``) and a data file per compilation (``<base>.<n>.nbc``), ``<base>`` starting with
#: ``clusterlab.`` and the kernel function's name.
CACHE_FILE_PATTERNS = ("clusterlab.*.nbi", "clusterlab.*.nbc")


def cache_on_disk(dispatcher, directory: str, key: str) -> None:
    """Have ``dispatcher`` (a ``cuda.jit`` kernel) keep its compilations in numba's on-disk cache in
    ``directory``, found again under ``key`` (with numba's signature, versions and compute
    capability). ``key`` must name everything the compiled code depends on
    (:func:`clusterlab.kernel_cache.kernel_key`). A folder that cannot be written leaves the
    dispatcher uncached; an entry that cannot be stored or read back warns and compiles.
    """
    try:
        dispatcher._cache = _keyed_cache_class()(dispatcher.py_func, directory, key)
    except (OSError, RuntimeError) as exc:  # numba found no writable folder
        warnings.warn(f"clusterlab: compiled kernels are not kept in {directory} ({exc})", stacklevel=3)


@functools.cache
def _keyed_cache_class():
    """numba's CUDA kernel cache, keyed and placed by clusterlab (built on first use: importing
    numba's dispatcher is not free)."""
    from numba.cuda.core.caching import _CacheLocator
    from numba.cuda.dispatcher import CUDACache, CUDACacheImpl

    class Locator(_CacheLocator):
        """``directory``; one index file per key (the disambiguator), stamped with the key."""

        def __init__(self, directory, key):
            self._directory, self._key = directory, key

        def get_cache_path(self):
            return self._directory

        def get_source_stamp(self):
            return self._key

        def get_disambiguator(self):
            return self._key[:32]

    class Impl(CUDACacheImpl):
        def __init__(self, py_func, directory, key):
            self._locator = Locator(directory, key)
            self._locator.ensure_cache_path()  # OSError where it cannot be written
            self._lineno = py_func.__code__.co_firstlineno
            self._filename_base = self.get_filename_base(f"clusterlab.{py_func.__name__}", "")

    class KeyedCache(CUDACache):
        def __init__(self, py_func, directory, key):
            self._impl_args = (directory, key)
            super().__init__(py_func)

        # numba's Cache.__init__ builds its impl as ``self._impl_class(py_func)``
        def _impl_class(self, py_func):
            return Impl(py_func, *self._impl_args)

        def _index_key(self, sig, codegen):
            key = sig, codegen.magic_tuple(), self._impl_args[1]
            # numba adds the launch configuration for kernels whose code depends on it
            return key if self._launch_config_key is None else key + (("launch_config", self._launch_config_key),)

        def load_overload(self, sig, target_context):
            try:
                return super().load_overload(sig, target_context)
            except Exception as exc:  # an entry another version or a crash left: compile instead
                warnings.warn(f"clusterlab: a cached kernel in {self._cache_path} could not be read ({exc})",
                              stacklevel=2)
                return None

        def save_overload(self, sig, data):
            try:
                super().save_overload(sig, data)
            except Exception as exc:  # the kernel runs; only the next process compiles it again
                warnings.warn(f"clusterlab: a compiled kernel could not be kept in {self._cache_path} ({exc})",
                              stacklevel=2)

    return KeyedCache


def cache_hits(dispatcher) -> int:
    """How many of ``dispatcher``'s compilations its on-disk cache supplied in this process."""
    return sum(dispatcher._cache_hits.values())


class _InlinerCopy:
    """The ``copy`` module as numba-cuda's inliner sees it once :func:`copy_inlined_callees_whole` ran:
    ``deepcopy(block)`` inside an ``inline_ir`` call shares one memo with the other blocks of that
    call's IR (the blocks of one IR share their scope object); every other call is ``copy``'s own."""

    def __init__(self, block_type: type):
        self.block_type = block_type  # numba's ir.Block
        self.memos = []  # one {id(source scope): memo} per inline_ir call in progress, innermost last

    def __getattr__(self, name):
        return getattr(copy, name)

    def deepcopy(self, value, memo=None):
        if memo is None and self.memos and isinstance(value, self.block_type):
            memo = self.memos[-1].setdefault(id(value.scope), {})
        return copy.deepcopy(value, memo)


@functools.cache
def copy_inlined_callees_whole() -> _InlinerCopy:
    """Make numba-cuda's inliner copy a callee's IR as one graph (item 6 of the module docstring);
    once per process, before clusterlab compiles. Returns the stand-in ``copy`` module it installed.

    numba compiles under one global lock, so one ``inline_ir`` call at a time runs in a thread;
    calls nest (typing the inlined code may compile another function) and each has its own memos.
    """
    from numba.cuda.core import inline_closurecall, ir

    stand_in = _InlinerCopy(ir.Block)
    inline_ir = inline_closurecall.InlineWorker.inline_ir

    @functools.wraps(inline_ir)
    def inline_ir_copying_whole(self, *args, **kwargs):
        stand_in.memos.append({})
        try:
            return inline_ir(self, *args, **kwargs)
        finally:
            stand_in.memos.pop()

    inline_closurecall.copy = stand_in
    inline_closurecall.InlineWorker.inline_ir = inline_ir_copying_whole
    return stand_in
