"""``DecodeAttention``: the fused attention block as a callable on torch tensors.

::

    layer = DecodeAttention(LLAMA2_7B, AttentionWeights.random(LLAMA2_7B, torch.float16, "cuda"))
    cache = KVCache.empty(LLAMA2_7B, batch=1, capacity=4096, device="cuda")
    out, residual = layer(hidden, residual, cache, position)   # appends cache row `position`

CUDA tensors run the cluster kernel of :mod:`clusterlab.fused.kernel` (one launch on torch's
current stream, capturable in a CUDA graph); CPU tensors run the same dataflow on the simulator
(:mod:`clusterlab.fused.simulated`), for small shapes.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import MAX_BATCH, AttentionConfig, AttentionWeights, KVCache, rope_table
from .plan import CLUSTER_SIZES, check_cluster_size, check_head_split, launch_shape
from .validate import check_step, check_weights

BACKENDS = ("auto", "gpu", "simulator")
#: SM count the simulator's default decomposition assumes (an H100 SXM).
SIMULATED_SM_COUNT = 132


class DecodeAttention:
    """Residual add + RMSNorm + QKV + RoPE + cache append + attention + O projection, one kernel.

    ``config``: shapes (:class:`~clusterlab.fused.config.AttentionConfig`); ``weights``: float16 or
    bfloat16 :class:`~clusterlab.fused.config.AttentionWeights`, all on one device.
    ``cluster_size`` (1, 2, 4, 8, 16), ``warps`` per block (4, 8, 16) and ``head_split`` (clusters
    per KV head, each with a part of its query heads) default, per batch size, to what spreads a
    step over the GPU (:func:`~clusterlab.fused.plan.launch_shape`; :meth:`shape` says what a
    batch gets). ``backend``: ``"auto"`` follows the tensors' device; ``"gpu"`` /
    ``"simulator"`` insist.

    One layer object owns a float32 ``out_acc`` workspace and arrival counters on its device,
    both left zero by every step; do not run one object on two streams at once.
    """

    def __init__(self, config: AttentionConfig, weights: AttentionWeights, *, cluster_size: int | None = None,
                 warps: int | None = None, head_split: int | None = None, backend: str = "auto"):
        check_weights(config, weights)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        device = weights.qkv.device
        if backend == "auto":
            backend = "gpu" if device.type == "cuda" else "simulator"
        if backend == "gpu" and device.type != "cuda":
            raise ValueError(f"backend 'gpu' needs the weights on a CUDA device; they are on {device}")
        if backend == "simulator" and device.type != "cpu":
            raise ValueError(f"backend 'simulator' needs the weights on the CPU; they are on {device}")
        if warps not in (None, 4, 8, 16):
            raise ValueError(f"warps must be one of (4, 8, 16) (at least the batch size), got {warps!r}")
        if cluster_size is not None:
            check_cluster_size(config, cluster_size)
        if head_split is not None:
            check_head_split(config, head_split)
        self.sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                         if backend == "gpu" else SIMULATED_SM_COUNT)
        self.config, self.weights, self.backend = config, weights, backend
        # None: chosen per batch by shape()
        self.cluster_size, self.warps, self.head_split = cluster_size, warps, head_split
        self._kernels: dict = {}
        self._rope: dict = {}
        if backend == "gpu":
            from ..gpu import require_hopper

            require_hopper()
            self._out_acc = torch.zeros(MAX_BATCH * config.hidden_size, dtype=torch.float32, device=device)
            self._arrivals = torch.zeros(max(CLUSTER_SIZES), dtype=torch.int32, device=device)

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor, cache: KVCache, position: int, *,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
        """One decode step.

        ``hidden``, ``residual``: ``[batch, hidden_size]`` (batch 1..8), the weights' dtype and
        device; ``cache``: :class:`~clusterlab.fused.config.KVCache` ``[batch, kv_heads, capacity,
        head_dim]``; ``position``: the new token's position, ``0 <= position < capacity`` (cache rows
        ``0 .. position-1`` are attended to, row ``position`` is written). Returns ``(out,
        new_residual)``, both ``[batch, hidden_size]``: into ``out`` / ``residual_out`` when given.
        Every check runs before the launch.
        """
        check_step(self.config, self.weights, hidden, residual, cache, position)
        shape = tuple(hidden.shape)
        for name, given in (("out", out), ("residual_out", residual_out)):
            if given is not None and (given.shape != hidden.shape or given.dtype != hidden.dtype
                                      or given.device != hidden.device or not given.is_contiguous()):
                raise ValueError(
                    f"{name} must be a contiguous {hidden.dtype} tensor of shape {shape} on {hidden.device}; "
                    f"got {given.dtype} {tuple(given.shape)} on {given.device}"
                )
        out = torch.empty_like(hidden) if out is None else out
        residual_out = torch.empty_like(hidden) if residual_out is None else residual_out
        if self.backend == "simulator":
            from .simulated import simulated_step

            cluster_size, _, head_split = self.shape(hidden.shape[0])
            got, new_residual = simulated_step(self.config, self.weights, hidden, residual, cache, position,
                                               cluster_size, head_split=head_split)
            out.copy_(got)
            residual_out.copy_(new_residual)
        else:
            self._launch(hidden, residual, cache, position, out, residual_out)
        return out, residual_out

    def shape(self, batch: int) -> tuple[int, int, int]:
        """``(cluster_size, warps, head_split)`` a step of ``batch`` sequences runs with: the
        constructor's values where given, else :func:`~clusterlab.fused.plan.launch_shape` for this
        GPU's SM count."""
        cluster_size, warps, head_split = launch_shape(self.config, batch, self.sm_count, self.cluster_size,
                                                       self.head_split)
        return cluster_size, self.warps or warps, head_split

    def kernel_spec(self, dtype: torch.dtype, batch: int):
        """The :class:`~clusterlab.fused.kernel.KernelSpec` a step of this dtype and batch compiles."""
        from .kernel import KernelSpec

        return KernelSpec.of(self.config, dtype == torch.bfloat16, batch, *self.shape(batch))

    def launcher(self, dtype: torch.dtype, batch: int):
        """The cluster launcher (:class:`clusterlab.launch.ClusterKernel`) of one dtype and batch."""
        key = (dtype, batch)
        if key not in self._kernels:
            from numba import cuda

            from ..launch import launch
            from .kernel import build_kernel

            spec = self.kernel_spec(dtype, batch)
            kernel = cuda.jit(launch_bounds=(spec.threads, spec.min_blocks_per_sm))(build_kernel(spec))
            self._kernels[key] = launch(
                kernel, grid=spec.clusters * spec.cluster_size, cluster=spec.cluster_size,
                block=spec.threads, shared_bytes=spec.shared_bytes, non_portable=spec.cluster_size > 8,
            )
        return self._kernels[key]

    def launch_args(self, hidden, residual, cache, position, out, residual_out) -> tuple:
        """The kernel's arguments for one step (see :func:`~clusterlab.fused.kernel.build_kernel`)."""
        batch, capacity = hidden.shape[0], cache.capacity
        if capacity not in self._rope:
            self._rope[capacity] = rope_table(self.config, capacity, device=hidden.device).view(-1)

        def bits(t):
            return t.view(-1).view(torch.int16)

        w = self.weights
        return (
            bits(hidden), bits(residual), bits(w.norm), bits(w.qkv), bits(w.o), bits(cache.k), bits(cache.v),
            self._rope[capacity], bits(out), bits(residual_out),
            self._out_acc[: batch * self.config.hidden_size], self._arrivals,
            np.int32(position), np.int32(capacity),
        )

    def _launch(self, hidden, residual, cache, position, out, residual_out):
        args = self.launch_args(hidden, residual, cache, position, out, residual_out)
        self.launcher(hidden.dtype, hidden.shape[0])(*args)
