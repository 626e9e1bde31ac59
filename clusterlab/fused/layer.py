"""``DecodeAttention``: the fused attention block as a callable on torch tensors.

::

    layer = DecodeAttention(LLAMA2_7B, AttentionWeights.random(LLAMA2_7B, torch.float16, "cuda"))
    cache = KVCache.empty(LLAMA2_7B, batch=2, capacity=4096, device="cuda")
    positions = torch.tensor([17, 930], dtype=torch.int32, device="cuda")
    out, residual = layer(hidden, residual, cache, positions)   # appends row positions[b] of sequence b
    positions += 1                                               # the next step, on the device

CUDA tensors run the cluster kernel of :mod:`clusterlab.fused.kernel` (one launch on torch's
current stream, capturable in a CUDA graph); CPU tensors run the same dataflow on the simulator
(:mod:`clusterlab.fused.simulated`), for small shapes.

The kernel reads the positions from device memory, so a CUDA graph captured once replays step
after step while something on the device advances them. No host sync reads them: the kernel
itself treats a position outside ``0 .. capacity-1`` as an error of that sequence, writing NaN
for its outputs and leaving its cache untouched (:meth:`DecodeAttention.check_positions` raises
on the host instead, at the cost of one sync).

The launch shape depends on how long the caches are only where the host says so (``longest``, the
most rows a sequence attends to; an int position says it by itself): from
:data:`~clusterlab.fused.plan.LONG_CACHE` rows (by batch) a GQA step reads each KV head's rows with one cluster
(:func:`~clusterlab.fused.plan.launch_shape`), from a batch of 4 split over two sets of clusters
(:func:`~clusterlab.fused.plan.batch_sets`), and from :data:`~clusterlab.fused.plan.PAIRS_FROM` rows over
sets of two sequences (a batch of 2 over two sets of one), so a decode loop keeps a graph for each range of lengths
(:class:`clusterlab.models.decode.Decoder`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .config import MAX_BATCH, MAX_POSITIONS, AttentionConfig, AttentionWeights, KVCache, check_dtype, rope_table
from .plan import (
    CLUSTER_SIZES,
    MAX_BATCH_PARTS,
    WARP_COUNTS,
    DeviceLimits,
    batch_sets,
    check_cluster_size,
    check_head_split,
    check_kernel_options,
    check_one_of,
    launch_shape,
    queue_state_words,
    queue_words,
    set_sequences,
    shared_queries_shape,
    shares_queries,
)
from .validate import (check_cache, check_handoff, check_longest, check_outputs, check_positions, check_step,
                       check_weights, kernel_bits, known_longest, resolve_backend)



@functools.cache
def _rope_table(config: AttentionConfig, capacity: int, device: torch.device) -> torch.Tensor:
    """The flat cos/sin table of :func:`~clusterlab.fused.config.rope_table` on ``device``, built once
    per (config, capacity, device) and shared by every layer that asks."""
    return rope_table(config, capacity, device=device).view(-1)


@functools.cache
def kernel_launcher(spec):
    """The kernel of ``spec`` (a :class:`~clusterlab.fused.kernel.KernelSpec`, its measurement
    variants included) as a cluster launcher: one compilation per spec in a process, shared by
    every layer of that shape (a model's layers all use one)."""
    from .. import kernel_cache
    from ..launch import launch
    from .kernel import build_kernel

    kernel = kernel_cache.jit(build_kernel, spec, (spec.threads, spec.min_blocks_per_sm))
    return launch(kernel, grid=spec.clusters * spec.cluster_size, cluster=spec.cluster_size, block=spec.threads,
                  shared_bytes=spec.shared_bytes, non_portable=spec.cluster_size > 8,
                  co_resident=spec.waits_across_clusters)


class DecodeAttention:
    """Residual add + RMSNorm + QKV + RoPE + cache append + attention + O projection, one kernel.

    ``config``: shapes (:class:`~clusterlab.fused.config.AttentionConfig`); ``weights``: float16 or
    bfloat16 :class:`~clusterlab.fused.config.AttentionWeights`, all on one device.
    ``cluster_size`` (1, 2, 4, 8, 16), ``warps`` per block (4, 8, 16) and ``head_split`` (clusters
    per KV head, each with a part of its query heads, or with the kernel option ``split_positions``
    a part of its cached positions: then any of 1 to 16) default, per batch size, to what spreads a
    step over the GPU, and at long caches to what reads each KV head's rows once
    (:func:`~clusterlab.fused.plan.launch_shape`; :meth:`shape` says what a batch gets), where the
    KV heads are few a positions split sharing out the query projection (:meth:`shares_queries`).
    ``backend``: ``"auto"`` follows the tensors' device; ``"gpu"`` / ``"simulator"`` insist.
    ``limits``: the GPU's SM count and shared memory, read from the device on the GPU backend; the
    simulator backend plans for ``limits`` (default: an H100 or H200,
    :data:`~clusterlab.fused.plan.HOPPER`). ``kernel_options``: how the kernel runs a step where
    the launch rule would choose otherwise, its outputs correct either way (the names and values of
    :data:`~clusterlab.fused.plan.KERNEL_CHOICES`: ``attention_mma``, ``kv_pipeline``, ``registers``,
    ``overlay``, ``interleave_inputs``, ``split_positions``, ``shared_queries``, ``split_kv_rows``, ``batch_parts``,
    ``work_queue``, ``queue_rows``), for measurements such as ``clusterlab bench fused --spec registers=168``;
    the simulator backend checks them and runs its dataflow (with or without the positions split or the
    work queue, with or without the parts sharing out the query projection; the clusters of a KV head
    always project both its key and value heads there).

    One layer object owns a float32 ``out_acc`` workspace, arrival counters (and the work queue's
    words), a buffer of softmax states (for ``split_positions`` and the work queue) and a positions
    buffer on its device, the first two left zero by every step; do not run one object on two
    streams at once.
    """

    def __init__(self, config: AttentionConfig, weights: AttentionWeights, *, cluster_size: int | None = None,
                 warps: int | None = None, head_split: int | None = None, backend: str = "auto",
                 limits: DeviceLimits | None = None, kernel_options: dict | None = None):
        check_weights(config, weights)
        self.kernel_options = check_kernel_options(kernel_options)
        device = weights.qkv.device
        backend, self.limits = resolve_backend(backend, device, limits)
        if warps is not None:
            check_one_of("warps", warps, WARP_COUNTS, " (at least the batch size)")
        if cluster_size is not None:
            check_cluster_size(config, cluster_size)
        split_positions = self.kernel_options.get("split_positions", False)
        if head_split is not None:
            check_head_split(config, head_split, split_positions)
        self.config, self.weights, self.backend = config, weights, backend
        # None: chosen per batch by shape()
        self.cluster_size, self.warps, self.head_split = cluster_size, warps, head_split
        self._specs: dict = {}  # (dtype, batch, shape, batch_parts, shares_queries) -> KernelSpec
        self._shared_builds: dict = {}  # batch -> whether the rule's shared split can be built
        # whether the rule is free to choose the split and takes the shared one at some batch (shares_queries:
        # from SHARED_QUERIES_FROM up, so at MAX_BATCH where at any)
        chosen = (cluster_size, warps, head_split) != (None, None, None) or any(
            name in self.kernel_options for name in ("split_positions", "shared_queries", "batch_parts", "work_queue"))
        self._rule_may_share = not chosen and shares_queries(config, MAX_BATCH, MAX_POSITIONS, self.limits)
        self._kernels: dict = {}  # ((dtype, batch, shape), handoff) -> launcher
        if backend == "gpu":
            from ..gpu import require_hopper

            require_hopper()
            self._out_acc = torch.zeros(MAX_BATCH * config.hidden_size, dtype=torch.float32, device=device)
            # the counters of each set of clusters (KernelSpec.arrival_words), as many sets as the batch may have
            # and after them the work queue's words (KernelSpec.queue_words) at the largest batch
            queue = self.kernel_options.get("work_queue", False)
            pairs = MAX_BATCH * config.kv_heads if queue else 0
            arrivals = MAX_BATCH_PARTS * (max(CLUSTER_SIZES) * (1 + config.kv_heads) + config.kv_heads)
            self._arrivals = torch.zeros(arrivals + queue_words(pairs), dtype=torch.int32, device=device)
            # the parts' softmax states (KernelSpec.part_state_words) for every sequence of the sets (phantoms
            # too), for the head split given or the largest the rule chooses (all the query heads; a part a
            # query head where the rule may share them out: shares_queries), a state (head_dim + 2 words) of
            # each, and the queries the parts hand each other (shared_queries: a head_dim each); at least a
            # word for each set of clusters; then the work queue's (KernelSpec.queue_state_words)
            ruled = self._rule_may_share
            parts = (head_split or config.group_size) if split_positions else (config.group_size if ruled else 0)
            shared = self.kernel_options.get("shared_queries", False) or ruled
            words = config.kv_heads * set_sequences() * config.group_size * (
                parts * (config.head_dim + 2) + (config.head_dim if shared else 0))
            states = queue_state_words(pairs, config.group_size, config.head_dim)
            self._part_states = torch.empty(max(MAX_BATCH_PARTS, words) + states, dtype=torch.float32, device=device)
            self._positions = torch.zeros(MAX_BATCH, dtype=torch.int32, device=device)
            self._no_bias = torch.zeros(1, dtype=weights.qkv.dtype, device=device)

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor, cache: KVCache, positions, *,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                 longest: int | None = None):
        """One decode step.

        ``hidden``, ``residual``: ``[batch, hidden_size]`` (batch 1..8), the weights' dtype and
        device; ``cache``: :class:`~clusterlab.fused.config.KVCache` ``[batch, kv_heads, capacity,
        head_dim]``; ``positions``: each sequence's new token, an int32 tensor ``[batch]`` on the
        layer's device, or one int for the whole batch; ``0 <= positions[b] < capacity`` (sequence
        ``b`` attends to its cache rows ``0 .. positions[b]-1`` and its new token, and row
        ``positions[b]`` is written). ``longest``: at least ``positions[b] + 1`` for every ``b``
        where the host knows it (an int position: ``positions + 1`` by default), for the launch
        shape (:meth:`shape`); the outputs are the same whatever it is. Returns ``(out,
        new_residual)``, both ``[batch, hidden_size]``: into ``out`` / ``residual_out`` when
        given, buffers that share no byte with each other or with ``hidden`` and ``residual``. Every
        check runs before the launch; a position tensor's values are checked by the
        kernel (see the module docstring).
        The simulator backend also checks that the GPU could run the step (:meth:`kernel_spec`).
        """
        check_step(self.config, self.weights, hidden, residual, cache, positions)
        longest = known_longest(positions, longest, cache.capacity)
        check_outputs(hidden, residual, out, residual_out)
        key = self._key(hidden.dtype, hidden.shape[0], longest)
        self._spec(key)  # raises where the GPU could not run the step, on both backends
        out = torch.empty_like(hidden) if out is None else out
        residual_out = torch.empty_like(hidden) if residual_out is None else residual_out
        if self.backend == "simulator":
            got, new_residual = self._simulated_step(hidden, residual, cache, positions, key)
            out.copy_(got)
            residual_out.copy_(new_residual)
        else:
            args = self.launch_args(hidden, residual, cache, positions, out, residual_out)
            self._launcher(key, handoff=False)(*args)
        return out, residual_out

    def handoff(self, hidden_sums: torch.Tensor, residual: torch.Tensor, cache: KVCache, positions, *,
                sums_out: torch.Tensor, clear: torch.Tensor, residual_out: torch.Tensor | None = None,
                longest: int | None = None):
        """One decode step that takes its input and leaves its output as float32 sums: for a chain
        of fused blocks (a model's layers), where no kernel converts its output to the model dtype.

        ``hidden_sums``: float32 ``[batch, hidden_size]``, the block before's output sums; the step
        reads them rounded to the weights' dtype, which is the ``hidden`` :meth:`__call__` would
        get. ``sums_out``: float32, zero on entry: the step adds its output into it (rounded to the
        weights' dtype it is the ``out`` of :meth:`__call__`). ``clear``: float32, set to zero by the
        step. Three buffers in turn make the chain: step ``k`` reads buffer ``(k - 1) % 3``, adds
        into ``k % 3`` and clears ``(k + 1) % 3``, the one step ``k - 1`` read (see
        :meth:`clusterlab.models.LlamaModel.forward_step`). ``residual``, ``cache``, ``positions``,
        ``longest`` as :meth:`__call__`; returns ``hidden + residual`` (into ``residual_out`` when
        given). The simulator backend runs the same hand-off
        (:func:`~clusterlab.fused.simulated.simulated_step`).
        """
        dtype, device = self.weights.qkv.dtype, self.weights.qkv.device
        batch = check_handoff(self.config.hidden_size, hidden_sums, residual, sums_out, clear, residual_out, dtype,
                              device)
        check_cache(self.config, cache, batch, dtype, device, "the weights")
        check_positions(positions, batch, cache.capacity, device)
        longest = known_longest(positions, longest, cache.capacity)
        key = self._key(dtype, batch, longest)
        self._spec(key)  # raises where the GPU could not run the step, on both backends
        residual_out = torch.empty_like(residual) if residual_out is None else residual_out
        if self.backend == "simulator":
            out, new_residual = self._simulated_step(hidden_sums, residual, cache, positions, key, handoff=True)
            sums_out.add_(out)
            residual_out.copy_(new_residual)
            clear.zero_()
        else:
            args = self.launch_args(hidden_sums, residual, cache, positions, clear, residual_out, out_acc=sums_out)
            self._launcher(key, handoff=True)(*args)
        return residual_out

    @staticmethod
    def check_positions(positions: torch.Tensor, cache: KVCache) -> None:
        """Raise ``ValueError`` unless every ``positions[b]`` is in ``0 .. cache.capacity-1``.

        Reads the tensor to the host (one sync): for debugging, or a loop that can afford it.
        """
        check_positions(positions.cpu(), cache.batch, cache.capacity, torch.device("cpu"))

    def shares_queries(self, batch: int, longest: int | None = None) -> bool:
        """Whether a step of ``batch`` sequences, the longest attending to ``longest`` rows, runs the
        positions split with the query projection shared out (``shared_queries``): where the kernel
        options say so, else where the rule takes it (:func:`~clusterlab.fused.plan.shares_queries`,
        from :data:`~clusterlab.fused.plan.SHARED_QUERIES_ROWS` for a model with few KV heads; not where the
        constructor is given a launch shape, or the options a split: ``split_positions``, ``batch_parts``,
        ``work_queue``)."""
        check_longest(longest)
        return self._plan(batch, longest)[2]

    def _rule_shares_queries(self, batch: int, longest: int | None) -> bool:
        """:func:`~clusterlab.fused.plan.shares_queries` where the rule chooses the split (:meth:`shares_queries`)
        and the split's kernel can be built for this model and GPU."""
        return (self._rule_may_share and shares_queries(self.config, batch, longest, self.limits)
                and self._shared_queries_build(batch))

    def _shared_queries_build(self, batch: int) -> bool:
        """Whether the kernel of the rule's shared split (:func:`~clusterlab.fused.plan.shared_queries_shape`)
        can be built for ``batch`` sequences of this model on this GPU (hidden slices, shared memory)."""
        from .kernel import KernelSpec

        if batch not in self._shared_builds:
            try:
                KernelSpec.of(self.config, False, batch, *shared_queries_shape(self.config), limits=self.limits,
                              **{**self.kernel_options, "split_positions": True, "shared_queries": True})
                self._shared_builds[batch] = True
            except ValueError:
                self._shared_builds[batch] = False
        return self._shared_builds[batch]

    def shape(self, batch: int, longest: int | None = None) -> tuple[int, int, int]:
        """``(cluster_size, warps, head_split)`` a step of ``batch`` sequences runs with, the
        longest of them attending to ``longest`` rows where known: the constructor's values where
        given, else :func:`~clusterlab.fused.plan.launch_shape` for this GPU's SM count (which
        checks the batch), or where the rule shares out the query projection (:meth:`shares_queries`)
        :func:`~clusterlab.fused.plan.shared_queries_shape`, its ``head_split`` the parts."""
        check_longest(longest)
        return self._plan(batch, longest)[0]

    def _plan(self, batch: int, longest: int | None) -> tuple[tuple[int, int, int], int, bool]:
        """``(shape, batch_parts, shares_queries)`` of a step (:meth:`shape`, :meth:`batch_parts`,
        :meth:`shares_queries`), the rule asked once."""
        if self._rule_shares_queries(batch, longest):
            return shared_queries_shape(self.config), 1, True
        cluster_size, warps, head_split = launch_shape(self.config, batch, self.limits.sm_count, self.cluster_size,
                                                       self.head_split, longest,
                                                       self.kernel_options.get("batch_parts"), self.limits.l2_bytes,
                                                       self.warps)
        parts = self.kernel_options.get("batch_parts") or batch_sets(self.config, batch, longest, self.cluster_size,
                                                                     self.head_split, self.limits.sm_count,
                                                                     self.limits.l2_bytes)
        return (cluster_size, self.warps or warps, head_split), parts, self.kernel_options.get("shared_queries", False)

    def batch_parts(self, batch: int, longest: int | None = None) -> int:
        """Sets of clusters a step of ``batch`` sequences splits them over, each :meth:`shape`'s grid:
        the ``batch_parts`` of ``kernel_options`` where given, else
        :func:`~clusterlab.fused.plan.batch_sets` (at long caches from a batch of 4: two, from
        :data:`~clusterlab.fused.plan.PAIRS_FROM` rows one a pair of sequences, a batch of 2 two sets of one;
        an odd batch so in pairs from a batch of 5, else only where one set leaves half the SMs idle or
        the weights fit in half the L2, its last set a sequence short)."""
        check_longest(longest)
        return self._plan(batch, longest)[1]

    def kernel_spec(self, dtype: torch.dtype, batch: int, longest: int | None = None):
        """The :class:`~clusterlab.fused.kernel.KernelSpec` a step of this dtype and batch compiles,
        in the :meth:`shape` of ``longest`` (built once per shape). Pure Python, also on the
        simulator backend: it raises where the GPU of ``self.limits`` could not run the step (e.g.
        too much shared memory)."""
        check_dtype(dtype)
        return self._spec(self._key(dtype, batch, longest))

    def launcher(self, dtype: torch.dtype, batch: int, handoff: bool = False, longest: int | None = None):
        """The cluster launcher (:class:`clusterlab.launch.ClusterKernel`) of one dtype, batch and
        :meth:`shape` (``handoff``: of :meth:`handoff`'s kernel)."""
        self._require_kernel("launcher")
        check_dtype(dtype)
        return self._launcher(self._key(dtype, batch, longest), handoff)

    def _key(self, dtype: torch.dtype, batch: int, longest: int | None) -> tuple:
        """``(dtype, batch, shape, batch_parts, shares_queries)``: what a step's kernel is planned and
        built for, the launch rule asked once a step."""
        check_longest(longest)
        return (dtype, batch, *self._plan(batch, longest))

    def _spec(self, key: tuple):
        """:meth:`kernel_spec` of a :meth:`_key`."""
        from .kernel import KernelSpec

        if key not in self._specs:
            dtype, batch, (cluster_size, warps, head_split), batch_parts, shared = key
            switches = {**self.kernel_options, "batch_parts": batch_parts}
            if shared:
                switches.update(split_positions=True, shared_queries=True)
            try:
                self._specs[key] = KernelSpec.of(self.config, dtype == torch.bfloat16, batch, cluster_size, warps,
                                                 head_split, limits=self.limits, **switches)
            except ValueError as exc:
                options = "".join(f", {k}={v}" for k, v in self.kernel_options.items())
                raise ValueError(f"a {dtype} step of batch {batch} with cluster_size={cluster_size}, warps={warps}, "
                                 f"head_split={head_split}{options}: {exc}") from exc
        return self._specs[key]

    def _launcher(self, key: tuple, handoff: bool):
        """:meth:`launcher` of a :meth:`_key`."""
        if (key, handoff) not in self._kernels:
            self._kernels[key, handoff] = kernel_launcher(dataclasses.replace(self._spec(key), handoff=handoff))
        return self._kernels[key, handoff]

    def launch_args(self, hidden, residual, cache, positions, out, residual_out, out_acc=None) -> tuple:
        """The kernel's arguments for one step (see :func:`~clusterlab.fused.kernel.build_kernel`):
        16-bit tensors as int16 views, float32 ones (a hand-off's ``hidden`` and ``out``) as they
        are; ``out_acc`` by default the layer's own workspace.

        An int position is written into the layer's positions buffer (on the stream, no sync).
        """
        self._require_kernel("launch_args")
        batch, capacity = hidden.shape[0], cache.capacity
        if isinstance(positions, int):
            positions = self._positions[:batch].fill_(positions)

        w = self.weights
        bias = self._no_bias if w.qkv_bias is None else w.qkv_bias
        out_acc = self._out_acc[: batch * self.config.hidden_size] if out_acc is None else out_acc.view(-1)
        return (
            *map(kernel_bits, (hidden, residual, w.norm, w.qkv, bias, w.o, cache.k, cache.v)),
            _rope_table(self.config, capacity, hidden.device), kernel_bits(out), kernel_bits(residual_out),
            out_acc, self._arrivals, self._part_states, positions, np.int32(capacity),
        )

    def _simulated_step(self, hidden, residual, cache, positions, key, handoff=False):
        """:func:`~clusterlab.fused.simulated.simulated_step` in the launch shape and split of the kernel
        the GPU would run (the spec of :meth:`_key` ``key``)."""
        from .simulated import simulated_step

        spec = self._spec(key)
        return simulated_step(self.config, self.weights, hidden, residual, cache, positions, spec.cluster_size,
                              head_split=spec.head_split, handoff=handoff, split_positions=spec.split_positions,
                              batch_parts=spec.batch_parts, work_queue=spec.work_queue,
                              queue_rows=spec.queue_rows, shared_queries=spec.shared_queries)

    def _require_kernel(self, what: str) -> None:
        if self.backend != "gpu":
            raise ValueError(f"{what} needs the 'gpu' backend; this layer has no kernel: it runs on the "
                             f"{self.backend} (its weights are on {self.weights.qkv.device})")
