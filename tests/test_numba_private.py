"""Pins the numba-cuda internals that clusterlab._numba_private relies on.

If numba-cuda changes one of them, these tests fail before a kernel receives garbage arguments.
CPU tests pin the data layout and call signatures; GPU tests pin the behaviour end to end.
"""

import ctypes
import inspect
import struct
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
from numba import cuda, types
from numba.cuda.descriptor import cuda_target
from numba.cuda.dispatcher import _Kernel

from clusterlab import _numba_private
from clusterlab.launch import _scalar_code


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_array_argument_layout_is_meminfo_parent_nitems_itemsize_data_shape_strides(ndim):
    arrty = types.Array(types.float32, ndim, "A")
    model = cuda_target.target_context.data_model_manager[arrty]
    assert model._fields == _numba_private.ARRAY_MEMBERS
    flattened = cuda_target.target_context.get_arg_packer([arrty]).argument_types
    assert len(flattened) == 5 + 2 * ndim
    assert str(flattened[4]) == "float*"  # the data pointer is the fifth parameter
    assert all(str(t) == "i64" for t in flattened[2:4] + flattened[5:])


def test_prepare_args_keeps_its_signature():
    params = list(inspect.signature(_Kernel._prepare_args).parameters)
    assert params == ["self", "ty", "val", "stream", "retr", "kernelargs"]


@pytest.mark.parametrize(
    "ty, value",
    [
        (types.int8, -5),
        (types.uint8, 250),
        (types.int16, -30000),
        (types.uint16, 65000),
        (types.int32, -(2**31) + 3),
        (types.uint32, 2**32 - 3),
        (types.int64, -(2**62)),
        (types.uint64, 2**64 - 5),
        (types.float32, 1.25),
        (types.float64, -2.5e300),
        (types.boolean, True),
    ],
)
def test_scalars_pack_as_launch_py_assumes(ty, value):
    """launch.py packs these scalars itself with struct codes; they must match numba's bytes."""
    packed = []
    _Kernel._prepare_args(SimpleNamespace(extensions=[]), ty, value, 0, [], packed)
    assert len(packed) == 1
    item = packed[0]
    numba_bytes = bytes(item) if isinstance(item, ctypes._SimpleCData) else struct.pack("<?", item)
    assert struct.pack("<" + _scalar_code(ty), value) == numba_bytes


@pytest.mark.parametrize("view", ["1d", "1d-strided", "2d-transposed"])
def test_pack_tensor_lays_out_numba_array_fields(view):
    """On the CPU: the fields pack_tensor appends, placed by tensor_parameters, in numba's order."""
    import torch

    base = torch.arange(60, dtype=torch.float64)
    tensor = {"1d": base, "1d-strided": base[::4], "2d-transposed": base.reshape(6, 10).t()}[view]
    values = []
    key = _numba_private.pack_tensor(tensor, values)
    fields = [int(p) if isinstance(p, _numba_private.Constant) else values[p] for p in _numba_private.tensor_parameters(key)]
    strides = [s * 8 for s in tensor.stride()]
    assert fields == [0, 0, tensor.numel(), 8, tensor.data_ptr(), *tensor.shape, *strides]
    assert key == (torch.float64, tensor.dim(), tensor.is_contiguous(), -1)


def test_code_library_exposes_cufunc_with_a_cuda_core_kernel():
    from numba.cuda.codegen import CUDACodeLibrary
    from numba.cuda.cudadrv.driver import CudaPythonFunction

    assert callable(CUDACodeLibrary.get_cufunc)
    assert "kernel" in CudaPythonFunction.__slots__


# ---------------------------------------------------------------------------------------------
# GPU: behaviour
# ---------------------------------------------------------------------------------------------


@cuda.jit
def _scale(out, x, factor):
    i = cuda.grid(1)
    if i < x.size:
        out[i] = x[i] * factor


def _overload_for(*args):
    from numba.cuda.typing.typeof import typeof

    return _scale.compile(tuple(typeof(a) for a in args))


@pytest.mark.gpu
def test_kernel_handle_is_the_compiled_overload():
    import torch
    from cuda.bindings import driver

    x = torch.rand(64, device="cuda")
    overload = _overload_for(x, x, 2.0)
    handle = driver.CUkernel(_numba_private.kernel_handle(overload))
    err, regs = driver.cuKernelGetAttribute(
        driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS, handle, driver.CUdevice(0)
    )
    assert not err
    assert regs == overload.regs_per_thread


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.rand(1000, device="cuda"),
        lambda t: t.rand(300, device="cuda", dtype=t.float64)[::3],
        lambda t: t.rand(7, 33, device="cuda"),
        lambda t: t.rand(40, 30, device="cuda")[:, ::3],
        lambda t: t.rand(16, 24, device="cuda").t(),
        lambda t: t.rand(2, 1, 5, device="cuda", dtype=t.float64),
        lambda t: t.randint(0, 100, (3, 4, 5), device="cuda", dtype=t.int16)[1:, :, ::2],
    ],
    ids=["1d", "1d-strided", "2d", "2d-strided", "transposed", "size-1-dim", "3d-int16-sliced"],
)
def test_pack_tensor_and_its_parameter_layout_match_numba_packing(make):
    import torch
    from numba.cuda.typing.typeof import typeof

    tensor = make(torch)
    overload = _overload_for(torch.empty(1, device="cuda"), torch.empty(1, device="cuda"), 1.0)
    numba_values = [
        item.value if isinstance(item, ctypes._SimpleCData) else item
        for item in _numba_private.pack_argument(overload, typeof(tensor), tensor)
    ]
    values = []
    key = _numba_private.pack_tensor(tensor, values)
    assert key == (tensor.dtype, tensor.dim(), tensor.is_contiguous(), 0)
    rebuilt = [
        int(p) if isinstance(p, _numba_private.Constant) else values[p] for p in _numba_private.tensor_parameters(key)
    ]
    assert rebuilt == numba_values


@pytest.mark.gpu
def test_pack_argument_refuses_host_arrays():
    import torch

    overload = _overload_for(torch.empty(1, device="cuda"), torch.empty(1, device="cuda"), 1.0)
    with pytest.raises(TypeError, match="host memory"):
        _numba_private.pack_argument(overload, types.float32[::1], np.ones(4, np.float32))


def test_device_functions_take_their_cc_from_get_current_device():
    # device_functions_compiled_for() replaces exactly this lookup; if numba moves it, fail here.
    from numba.cuda import dispatcher

    assert "get_current_device().compute_capability" in inspect.getsource(dispatcher.CUDADispatcher.compile_device)


@pytest.mark.ptx
def test_kernel_calling_a_device_function_compiles_without_a_gpu():
    from clusterlab import ptx
    from clusterlab.toolchain import assemble, kernel_ptx

    @cuda.jit(device=True)
    def peer_value(array, index):
        return ptx.remote_load(array, index, (ptx.cluster_rank() + 1) % ptx.cluster_size())

    @cuda.jit
    def kernel(out):
        staged = cuda.shared.array(32, dtype=types.float32)
        staged[cuda.threadIdx.x] = cuda.threadIdx.x
        ptx.cluster_sync()
        out[cuda.threadIdx.x] = peer_value(staged, cuda.threadIdx.x)
        ptx.cluster_sync()

    code = kernel_ptx(kernel, (types.float32[::1],))
    assert "ld.shared::cluster.f32" in code
    assemble(code)


def test_numba_cache_keeps_the_hooks_cache_on_disk_overrides():
    # Cache.__init__ builds its impl as self._impl_class(py_func) and keys entries by
    # _index_key(sig, codegen); CUDACache adds a launch-config key; the dispatcher counts hits.
    from numba.cuda.core.caching import Cache, CacheImpl, _CacheLocator
    from numba.cuda.dispatcher import CUDACache, CUDADispatcher

    assert "self._impl = self._impl_class(py_func)" in inspect.getsource(Cache.__init__)
    assert list(inspect.signature(Cache._index_key).parameters) == ["self", "sig", "codegen"]
    assert "_launch_config_key" in inspect.getsource(CUDACache.__init__)
    assert {"get_cache_path", "get_source_stamp", "get_disambiguator"} <= _CacheLocator.__abstractmethods__
    assert "get_filename_base" in vars(CacheImpl)
    assert "_cache_hits" in inspect.getsource(CUDADispatcher.compile)


def test_cache_on_disk_places_the_cache_and_warns_where_it_cannot(tmp_path):
    def kernel(x):
        x[0] = 1

    dispatcher = cuda.jit(kernel)
    _numba_private.cache_on_disk(dispatcher, str(tmp_path / "kernels"), "ab" * 32)
    assert dispatcher._cache.cache_path == str(tmp_path / "kernels")
    assert (tmp_path / "kernels").is_dir()
    assert _numba_private.cache_hits(dispatcher) == 0
    blocked = tmp_path / "a file"
    blocked.write_text("")
    other = cuda.jit(kernel)
    before = other._cache
    with pytest.warns(UserWarning, match="compiled kernels are not kept in"):
        _numba_private.cache_on_disk(other, str(blocked / "kernels"), "cd" * 32)
    assert other._cache is before  # left as numba made it


def test_cache_file_patterns_match_the_files_numba_names_for_a_kept_kernel(tmp_path):
    import fnmatch
    import os

    def kernel(x):
        x[0] = 1

    dispatcher = cuda.jit(kernel)
    _numba_private.cache_on_disk(dispatcher, str(tmp_path), "ef" * 32)
    names = dispatcher._cache._cache_file  # numba's IndexDataCacheFile: where save_overload writes
    index_pattern, data_pattern = _numba_private.CACHE_FILE_PATTERNS
    assert fnmatch.fnmatch(os.path.basename(names._index_path), index_pattern)
    assert fnmatch.fnmatch(names._data_name_pattern.format(number=3), data_pattern)
    assert not fnmatch.fnmatch(names._data_name_pattern.format(number=3), index_pattern)


def test_the_inliner_copies_each_block_with_copy_deepcopy_inside_inline_ir():
    # copy_inlined_callees_whole() stands in for this module-level copy and wraps this method.
    from numba.cuda.core import inline_closurecall

    source = inspect.getsource(inspect.unwrap(inline_closurecall.InlineWorker.inline_ir))
    assert "copy.deepcopy(block)" in source


def _blocks_sharing_a_scope(count):
    from numba.cuda.core import ir

    loc = ir.Loc("f.py", 1)
    scope = ir.Scope(None, loc)
    names = [f"v{k}" for k in range(8)]
    variables = [scope.define(name, loc) for name in names]
    blocks = []
    for k in range(count):
        block = ir.Block(scope, loc)
        block.append(ir.Assign(ir.Const(k, loc), variables[k % len(variables)], loc))
        blocks.append(block)
    return scope, blocks


def test_within_an_inline_ir_call_the_blocks_of_one_ir_share_one_scope_copy():
    stand_in = _numba_private.copy_inlined_callees_whole()
    scope, blocks = _blocks_sharing_a_scope(5)
    outside = [stand_in.deepcopy(block) for block in blocks]  # no inline_ir call in progress
    assert len({id(copied.scope) for copied in outside}) == 5  # copy's own: a scope copy per block
    stand_in.memos.append({})
    try:
        inside = [stand_in.deepcopy(block) for block in blocks]
    finally:
        stand_in.memos.pop()
    (shared,) = {id(copied.scope) for copied in inside}
    assert shared != id(scope) and inside[0].scope == scope  # a copy, equal to the source
    assert inside[0].scope.localvars is not scope.localvars
    # each statement's variable is the copied scope's own, as in the source
    for copied in inside:
        target = copied.body[0].target
        assert target is copied.scope.localvars.get(target.name)
    assert [copied.body[0].value.value for copied in inside] == list(range(5))


@pytest.mark.ptx
def test_the_one_graph_copy_leaves_the_ptx_as_it_was(monkeypatch):
    import copy

    from numba.cuda.core import inline_closurecall

    from clusterlab.toolchain import kernel_ptx, without_names

    @cuda.jit(device=True, inline=True)
    def clipped_sum(values, count, limit):
        total = 0.0
        for k in range(count):
            v = values[k]
            if v > limit:
                v = limit
            elif v < -limit:
                v = -limit
            total += v
        return total

    @cuda.jit(device=True, inline=True)
    def twice(values, count, limit):
        return clipped_sum(values, count, limit) + clipped_sum(values, count, 0.5 * limit)

    def kernel(values, out, count):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = twice(values, count, float(i))

    signature = (types.float32[::1], types.float32[::1], types.int32)
    whole = kernel_ptx(kernel, signature)  # kernel_ptx installs the one-graph copy
    assert isinstance(inline_closurecall.copy, _numba_private._InlinerCopy)
    monkeypatch.setattr(inline_closurecall, "copy", copy)
    monkeypatch.setattr(inline_closurecall.InlineWorker, "inline_ir",
                        inline_closurecall.InlineWorker.inline_ir.__wrapped__)
    per_block = kernel_ptx(kernel, signature)
    assert without_names(whole) == without_names(per_block)  # numba numbers each compilation's names


def _python_output(script: str) -> str:
    """What ``script`` (indented source) prints in a fresh Python process, stripped; it must exit 0."""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_compiler_problem_is_none_where_numba_cuda_compiles():
    assert _numba_private.compiler_problem() is None


def test_a_numpy_that_breaks_numba_cuda_s_array_support_is_named_before_a_compilation():
    """numba-cuda 0.30's array support looks up np.row_stack, which numpy 2.5 removed: without it,
    the GPU is refused with the reason (not an AttributeError at the first launch), and kernel_ptx
    says the same."""
    out = _python_output("""
        import numpy
        del numpy.row_stack  # as numpy 2.5 has it
        from clusterlab import _numba_private, gpu, toolchain
        problem = _numba_private.compiler_problem()
        print(problem)
        gpu._device0 = lambda: (None, 0, (9, 0))  # a Hopper GPU, as far as the driver goes
        assert gpu.hopper_problem() == problem
        try:
            toolchain.kernel_ptx(lambda x: None, ())
        except RuntimeError as exc:
            print(exc)
    """)
    problem, ptx_error = out.splitlines()
    assert problem.startswith("numba-cuda ") and f"with numpy {np.__version__}" in problem
    assert "has no attribute 'row_stack'" in problem
    assert problem.endswith("install the numpy clusterlab requires (numpy<2.5)")
    assert ptx_error == f"kernel_ptx cannot compile: {problem}"


def test_a_numba_cuda_without_libnvvm_is_named_before_a_compilation():
    out = _python_output("""
        from numba.cuda.cudadrv import nvvm
        nvvm.is_available = lambda: False  # as where neither extra nor a toolkit brought libNVVM
        from clusterlab import _numba_private
        print(_numba_private.compiler_problem())
    """)
    assert out == ("numba-cuda finds no libNVVM to compile with: install clusterlab's cu13 or cu12 "
                                   "extra (the one of your driver's CUDA version), or a CUDA toolkit")
