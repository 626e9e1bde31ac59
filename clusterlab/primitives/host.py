"""Host API of the GPU primitives, mirroring the simulator's::

    out = primitives.cluster_reduce(x, op="sum", algorithm="ring")   # x [N, n] or [C, N, n]
    out = primitives.cluster_gather(x, algorithm="direct")            # -> [N, N*n] / [C, N, N*n]
    out = primitives.cluster_reduce_steady(xs, op="sum")              # xs [steps, N, n] / [steps, C, N, n]
    out = primitives.cluster_reduce_steady(xs, algorithm="two_shot")  # 2 barriers a step, the fewest bytes

``x`` is a torch CUDA tensor (float32, float16 or bfloat16) or a NumPy array (float32, float16,
``ml_dtypes.bfloat16``), copied to the GPU. ``[C, N, n]`` runs C independent clusters of N blocks
in one launch, cluster c reducing (gathering) ``x[c]``. The result is a torch CUDA tensor of x's
dtype, with the simulator's shape for each cluster. Arguments are checked before anything is
launched; a machine without a Hopper GPU raises :class:`clusterlab.HopperRequired`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..gpu import require_hopper
from ..launch import PORTABLE_CLUSTER_BLOCKS, launch
from ..simulator import (GATHER_ALGORITHMS, MAX_CLUSTER_SIZE, MAX_SMEM_BYTES_PER_BLOCK, OPS, REDUCE_ALGORITHMS,
                         STEADY_BUFFERS)
from ..simulator.inputs import check_choice
from .auto import choose_gather_algorithm, choose_reduce_algorithm
from .gather import gather_kernel, gather_shared_bytes, gather_stride
from .ops import GPU_DTYPES
from .reduce import (FLOAT32_BYTES, reduce_kernel, reduce_shared_bytes, steady_reduce_kernel, steady_result_offset,
                     steady_shared_bytes, work_offset)

#: Threads per block of the host API's kernels.
THREADS_PER_BLOCK = 256


def _torch_dtypes():
    import torch

    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _check_rows(x, name: str = "x"):
    """Validate ``x`` (called ``name`` in messages); return (dtype name, num_clusters, cluster_size, n). Touches no GPU."""
    import torch

    if isinstance(x, np.ndarray):
        dtype = _check_numpy(x, name)
    elif isinstance(x, torch.Tensor):
        dtype = _torch_dtypes().get(x.dtype)
        if dtype is None:
            raise TypeError(f"{name}.dtype must be one of torch.float32, torch.float16, torch.bfloat16; got {x.dtype}")
        if x.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor (or a NumPy array, copied over); got device {x.device}")
    else:
        raise TypeError(f"{name} must be a torch CUDA tensor or a NumPy array; got {type(x).__name__}")
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be [cluster_size, n] or [num_clusters, cluster_size, n]; got shape {tuple(x.shape)}")
    num_clusters, cluster_size, n = (1, *x.shape) if x.ndim == 2 else tuple(x.shape)
    if not 1 <= cluster_size <= MAX_CLUSTER_SIZE:
        raise ValueError(f"cluster_size ({name}.shape[-2]) must be in 1..{MAX_CLUSTER_SIZE}; got {cluster_size}")
    if n < 1 or num_clusters < 1:
        raise ValueError(f"{name} must have at least one cluster and one element per row; got shape {tuple(x.shape)}")
    return dtype, num_clusters, cluster_size, n


def _check_numpy(x: np.ndarray, name: str = "x") -> str:
    """The dtype name of NumPy input ``x`` (``name`` in messages); TypeError unless it is a plain array of one of GPU_DTYPES."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} must be a plain NumPy array; got a masked array (np.ma.MaskedArray), whose mask the GPU "
            f"would ignore: pass {name}.filled(value) to say what the masked elements hold"
        )
    dtype = np.dtype(x.dtype).name
    if dtype not in GPU_DTYPES:
        raise TypeError(f"{name}.dtype must be one of {GPU_DTYPES} on the GPU; got {dtype!r}")
    if not x.dtype.isnative:
        raise TypeError(f"{name} holds {dtype} in the other byte order ({x.dtype.str!r}); the GPU reads its own: "
                        f"pass {name}.astype({name}.dtype.newbyteorder('='))")
    return dtype


def _check_shared_bytes(shared_bytes: int, n: int, what: str) -> None:
    if shared_bytes > MAX_SMEM_BYTES_PER_BLOCK:
        raise ValueError(
            f"n={n} needs {shared_bytes} bytes of shared memory per block for {what}; a Hopper block "
            f"has at most {MAX_SMEM_BYTES_PER_BLOCK}"
        )


def to_device(x: np.ndarray):
    """A NumPy array (float32, float16, ``ml_dtypes.bfloat16``) as a CUDA tensor of the same dtype.

    Raises TypeError for anything else and :class:`clusterlab.HopperRequired` without a Hopper GPU.
    """
    import torch

    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array; got {type(x).__name__}")
    _check_numpy(x)
    require_hopper()
    if np.dtype(x.dtype) == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).cuda().view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x)).cuda()


def _storage_rows(x, dtype: str, n: int, out):
    """``x`` on the GPU as [blocks, n]: float32, or the uint16 bit patterns of float16/bfloat16. ``out``
    (None or a CUDA tensor) must be on the device the rows are on (a NumPy array's: the current one),
    checked before they are copied there."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if isinstance(x, np.ndarray) else x.device
    if out is not None and out.device != device:
        raise ValueError(f"out is on {out.device}; expected {device}, where the rows are")
    x = to_device(x) if isinstance(x, np.ndarray) else x.contiguous()
    return (x if dtype == "float32" else x.view(torch.uint16)).reshape(-1, n)


def _result(storage, dtype: str, shape):
    import torch

    if dtype != "float32":
        storage = storage.view(torch.float16 if dtype == "float16" else torch.bfloat16)
    return storage.reshape(shape)


def _check_out(out, dtype: str, shape) -> None:
    """``out``: None, or a contiguous CUDA tensor of ``dtype`` and ``shape``. Touches no GPU."""
    import torch

    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be None or a contiguous CUDA tensor; got {type(out).__name__}")
    if out.device.type != "cuda" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous CUDA tensor; got {'a strided' if out.is_cuda else 'a'} tensor "
                         f"on {out.device}")
    if _torch_dtypes().get(out.dtype) != dtype or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must be {dtype} of shape {tuple(shape)}; got {out.dtype} of shape {tuple(out.shape)}")


def _output(out, dtype: str, shape, rows):
    """The result's storage [blocks, m]: ``out`` (checked by :func:`_check_out` and :func:`_storage_rows`) viewed,
    or a new tensor."""
    import torch

    if out is None:
        return rows.new_empty((rows.shape[0], shape[-1]))
    return (out if dtype == "float32" else out.view(torch.uint16)).view(rows.shape[0], shape[-1])


def _launch(kernel, blocks: int, cluster_size: int, shared_bytes: int, *args):
    launch(
        kernel,
        grid=blocks,
        cluster=cluster_size,
        block=THREADS_PER_BLOCK,
        shared_bytes=shared_bytes,
        non_portable=cluster_size > PORTABLE_CLUSTER_BLOCKS,
    )(*args)


def cluster_reduce(x, op: str = "sum", algorithm: str = "ring", *, out=None):
    """All-reduce the rows of each cluster of ``x`` on the GPU (see the module docstring).

    ``x``: [N, n] or [C, N, n]; returns a CUDA tensor of the same shape and dtype (``out`` if
    given), every row of a cluster its reduction, bit for bit what ``simulator.cluster_reduce``
    returns (NaNs where it has NaNs, not their bits: :mod:`clusterlab.simulator.reduce`).
    ``algorithm="auto"`` picks the fastest one measured for this cluster size and row
    size (:mod:`clusterlab.primitives.auto`).
    """
    check_choice("op", op, OPS)
    check_choice("algorithm", algorithm, (*REDUCE_ALGORITHMS, "auto"))
    dtype, num_clusters, cluster_size, n = _check_rows(x)
    if algorithm == "auto":
        algorithm = choose_reduce_algorithm(cluster_size, n * FLOAT32_BYTES)
    shared_bytes = reduce_shared_bytes(algorithm, n, cluster_size)
    _check_shared_bytes(shared_bytes, n, f"the {algorithm} reduce")
    _check_out(out, dtype, tuple(x.shape))
    require_hopper()
    rows = _storage_rows(x, dtype, n, out)
    result = _output(out, dtype, tuple(x.shape), rows)
    _launch(reduce_kernel(algorithm, op, dtype), rows.shape[0], cluster_size, shared_bytes, rows, result, n, work_offset(n))
    return _result(result, dtype, tuple(x.shape))


def cluster_reduce_steady(xs, op: str = "sum", *, algorithm: str = "direct", out=None):
    """Back-to-back all-reduces in one launch: ``direct`` at one cluster barrier each
    (``direct_steady_reduce``), ``two_shot`` at two (``two_shot_steady_reduce``, the fewest bytes), both
    keeping float16 / bfloat16 rows 16-bit, ``bulk_two_shot`` at none (``bulk_two_shot_steady_reduce``:
    the same bytes moved by the copy engine, float32 rows).

    ``xs``: [steps, N, n] or [steps, C, N, n], ``xs[k]`` operation k's rows; returns a CUDA tensor
    of the same shape and dtype (``out`` if given), ``out[k]`` bit for bit what
    ``simulator.cluster_reduce_steady(xs, op, algorithm=algorithm)`` (and ``cluster_reduce(xs[k], op,
    "direct")``) returns (NaNs where it has NaNs, not their bits).
    """
    import torch

    check_choice("op", op, OPS)
    check_choice("algorithm", algorithm, tuple(STEADY_BUFFERS))
    if not isinstance(xs, (np.ndarray, torch.Tensor)):
        raise TypeError(f"xs must be a torch CUDA tensor or a NumPy array; got {type(xs).__name__}")
    if xs.ndim not in (3, 4) or xs.shape[0] < 1:
        raise ValueError(f"xs must be [steps, cluster_size, n] or [steps, num_clusters, cluster_size, n] with "
                         f"steps >= 1; got {tuple(xs.shape)}")
    dtype, num_clusters, cluster_size, n = _check_rows(xs[0], "xs[0]")
    shared_bytes = steady_shared_bytes(n, algorithm, cluster_size, dtype)
    _check_shared_bytes(shared_bytes, n, f"the steady {algorithm} reduce (its staged rows and the result)")
    _check_out(out, dtype, tuple(xs.shape))
    require_hopper()
    steps = xs.shape[0]
    rows = _storage_rows(xs, dtype, n, out)
    result = _output(out, dtype, tuple(xs.shape), rows)
    blocks = num_clusters * cluster_size
    _launch(steady_reduce_kernel(op, dtype, cluster_size, algorithm), blocks, cluster_size, shared_bytes,
            rows.view(steps, blocks, n), result.view(steps, blocks, n), n, steady_result_offset(n, algorithm, dtype))
    return _result(result, dtype, tuple(xs.shape))


def cluster_gather(x, algorithm: str = "direct", *, out=None):
    """All-gather the rows of each cluster of ``x`` on the GPU (see the module docstring).

    ``x``: [N, n] or [C, N, n]; returns a CUDA tensor [N, N*n] or [C, N, N*n] of x's dtype
    (``out`` if given), row r of a cluster the concatenation of all its rows. ``algorithm="auto"``
    picks the fastest one measured for this cluster size and row size.
    """
    check_choice("algorithm", algorithm, (*GATHER_ALGORITHMS, "auto"))
    dtype, num_clusters, cluster_size, n = _check_rows(x)
    itemsize = 4 if dtype == "float32" else 2
    if algorithm == "auto":
        algorithm = choose_gather_algorithm(cluster_size, n * itemsize, itemsize)
    shared_bytes = gather_shared_bytes(algorithm, n, cluster_size, itemsize)
    _check_shared_bytes(shared_bytes, n, f"the {algorithm} gather of {cluster_size} rows")
    shape = (*x.shape[:-1], cluster_size * n)
    _check_out(out, dtype, shape)
    require_hopper()
    rows = _storage_rows(x, dtype, n, out)
    result = _output(out, dtype, shape, rows)
    kernel = gather_kernel(algorithm, np.dtype(np.float32 if dtype == "float32" else np.uint16))
    _launch(kernel, rows.shape[0], cluster_size, shared_bytes, rows, result, n, gather_stride(algorithm, n, itemsize))
    return _result(result, dtype, shape)


def to_numpy(tensor) -> np.ndarray:
    """A GPU result as a NumPy array (bfloat16 as ``ml_dtypes.bfloat16``), for bitwise comparisons."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor (a result on the GPU), got {type(tensor).__name__}")
    host = tensor.detach().cpu()
    if host.dtype == torch.bfloat16:
        return host.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return host.numpy()
