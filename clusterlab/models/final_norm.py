"""The model's final RMSNorm on the last fused block's float32 sums, as one kernel.

A decode step's fused blocks hand their outputs on as float32 sums in three buffers
(:meth:`clusterlab.models.LlamaModel.forward_step`); after the last block the step needs ::

    hidden = sums.to(dtype)                                   # the last block's output, rounded
    n      = RMSNorm(hidden + residual) * norm                # transformers' LlamaRMSNorm
    sums   = 0                                                # all three buffers, for the next step

In PyTorch that is ten small kernels (a cast, a fill, an add and RMSNorm's seven), 14.4 µs of a
Llama-3-8B token on the H200 for 32 KiB of data; this kernel takes 3.7
(``benchmarks/results/decode_h200_v56_step_end.json``). It is one launch of one block a row,
:data:`THREADS` threads, each thread keeping its ``ceil(H / THREADS)`` elements in registers:

1. load the sums, the residual and the gain (elements ``tid``, ``tid + THREADS``, ...), all of
   them before zeroing the sums just read and the buffer the last block left (``clear``);
2. round as PyTorch does: ``x = round(round(s) + r)``, each a float32 in the model dtype;
3. the row's ``sum(x^2)``: shuffles in each warp, the warps' shares through shared memory;
4. ``n = round(gain * round(x * rsqrt(sum / H + eps)))``: PyTorch's normalize, cast, multiply.

Only the order of the ``sum(x^2)`` differs from PyTorch's, so ``n`` is within two ulps of the
model dtype of :func:`~clusterlab.models.llama.rms_norm`'s (one from the normalized value, one
more from the gain's product). A single block a row needs no
cluster: 16 KiB of float32 sums is a few loads a thread.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, uint32

from .. import ptx
from ..fused.kernel import FULL_MASK

#: Threads of the one block a row.
THREADS = 1024


@dataclass(frozen=True)
class FinalNormSpec:
    """The kernel's compile-time shape: rows of ``hidden_size`` elements, ``bf16`` (else float16),
    RMSNorm's ``eps``."""

    hidden_size: int
    bf16: bool
    eps: float


def build_final_norm_kernel(spec: FinalNormSpec):
    """``final_norm(sums, clear, residual, norm, out)``, launched as one block of :data:`THREADS`
    threads a row: ``sums`` float32 ``[rows * H]`` (row-major ``[rows, H]``, read, then set to zero),
    ``clear`` float32 ``[rows * H]`` (set to zero), ``residual`` and ``out`` ``[rows * H]`` and
    ``norm`` ``[H]``, 16-bit (int16 views of float16 or bfloat16): ``out`` = the module docstring's ``n``."""
    H = spec.hidden_size
    PER = -(-H // THREADS)  # elements a thread
    WARPS = THREADS // 32
    INV_H = np.float32(1.0 / H)
    EPS = np.float32(spec.eps)
    to_bits = ptx.f32_to_bf16 if spec.bf16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if spec.bf16 else ptx.f16_to_f32

    @cuda.jit(device=True, inline=True)
    def rounded(x):
        """``x`` rounded to the model dtype, as a float32."""
        return to_f32(to_bits(x))

    def final_norm(sums, clear, residual, norm, out):
        shares = cuda.shared.array(WARPS, float32)
        tid = uint32(cuda.threadIdx.x)
        lane, warp = tid % 32, tid // 32
        base = uint32(cuda.blockIdx.x) * H
        # 1, 2: this thread's elements tid + u * THREADS, rounded, and their share of sum(x^2); every
        # load is issued before the first store (the compiler keeps a load after a store that may alias it)
        x = cuda.local.array(PER, float32)
        gain = cuda.local.array(PER, float32)
        ss = float32(0.0)
        for u in range(PER):
            i = tid + u * THREADS
            if i < H:
                x[u] = rounded(rounded(sums[base + i]) + to_f32(residual[base + i]))
                gain[u] = to_f32(norm[i])
                ss += x[u] * x[u]
        for u in range(PER):
            i = tid + u * THREADS
            if i < H:
                sums[base + i] = float32(0.0)
                clear[base + i] = float32(0.0)
        # 3. the row's sum(x^2), in every thread
        for offset in (16, 8, 4, 2, 1):
            ss += cuda.shfl_xor_sync(FULL_MASK, ss, offset)
        if lane == 0:
            shares[warp] = ss
        cuda.syncthreads()
        ss = shares[lane] if lane < WARPS else float32(0.0)
        for offset in (16, 8, 4, 2, 1):
            ss += cuda.shfl_xor_sync(FULL_MASK, ss, offset)
        # 4. normalize, round, scale by the gain, round
        inv_rms = float32(1.0) / math.sqrt(ss * INV_H + EPS)
        for u in range(PER):
            i = tid + u * THREADS
            if i < H:
                out[base + i] = to_bits(gain[u] * rounded(x[u] * inv_rms))

    return final_norm


def final_norm_signature():
    """The kernel's argument types: ``(sums, clear, residual, norm, out)``."""
    from numba import types

    return (types.float32[::1], types.float32[::1], types.int16[::1], types.int16[::1], types.int16[::1])


@functools.cache
def final_norm_launcher(spec: FinalNormSpec, rows: int):
    """The kernel of ``spec`` as a launcher of ``rows`` rows, compiled once per process."""
    from .. import kernel_cache
    from ..launch import launch

    kernel = kernel_cache.jit(build_final_norm_kernel, spec, (THREADS, 1))
    return launch(kernel, grid=rows, cluster=1, block=THREADS)


def final_norm(sums, clear, residual, norm, eps: float, out=None):
    """``RMSNorm(sums.to(dtype) + residual) * norm`` ``[rows, H]`` in ``residual``'s dtype (into
    ``out`` where given), setting the float32 ``sums`` and ``clear`` ``[rows, H]`` to zero.

    ``residual`` ``[rows, H]`` and ``norm`` ``[H]``: float16 or bfloat16, all on one device. On a
    Hopper GPU one launch of :func:`build_final_norm_kernel` (on torch's current stream, so a CUDA
    graph captures it); elsewhere PyTorch's :func:`~clusterlab.models.llama.rms_norm`, the same
    rounding steps.
    """
    import torch

    from ..fused.validate import check_tensor, kernel_bits
    from ..gpu import hopper_problem
    from .llama import rms_norm

    if not (isinstance(residual, torch.Tensor) and residual.dim() == 2
            and residual.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(f"residual must be a float16 or bfloat16 tensor [rows, H], got "
                         f"{getattr(residual, 'dtype', type(residual).__name__)} of shape "
                         f"{tuple(getattr(residual, 'shape', ()))}")
    shape, dtype, device = tuple(residual.shape), residual.dtype, residual.device
    check_tensor("sums", sums, shape, torch.float32, device, "residual")
    check_tensor("clear", clear, shape, torch.float32, device, "residual")
    check_tensor("norm", norm, shape[1:], dtype, device, "residual")
    if out is None:
        out = torch.empty_like(residual)
    else:
        check_tensor("out", out, shape, dtype, device, "residual")
    if device.type == "cuda" and hopper_problem() is None:
        spec = FinalNormSpec(shape[1], dtype == torch.bfloat16, float(eps))
        final_norm_launcher(spec, shape[0])(*map(kernel_bits, (sums, clear, residual, norm, out)))
    else:
        out.copy_(rms_norm(sums.to(dtype) + residual, norm, eps))
        sums.zero_()
        clear.zero_()
    return out
