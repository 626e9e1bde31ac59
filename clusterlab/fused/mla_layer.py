"""``DecodeMLA``: a DeepSeek-V2 multi-head latent attention block as three cluster launches a step.

::

    layer = DecodeMLA(DEEPSEEK_V2_LITE, MLAWeights.random(DEEPSEEK_V2_LITE, torch.float16, "cuda"))
    cache = LatentCache.empty(DEEPSEEK_V2_LITE, batch=2, capacity=4096, device="cuda")
    positions = torch.tensor([17, 930], dtype=torch.int32, device="cuda")
    out, residual = layer(hidden, residual, cache, positions)   # appends row positions[b] of sequence b
    out, residual = layer(hidden, residual, cache, positions, longest=931)   # the host knows the lengths

The step is :func:`~clusterlab.fused.mla_reference.mla_reference_step`'s absorbed dataflow split as
``docs/mla-decode-design.md`` plans: launch 1 projects the query and the latent row by head and
gathers each head's ``q_nope`` in its cluster, launch 2 attends over the latent cache split by
position (``attention_clusters`` clusters a sequence, more of them where the host says the caches
are long: :func:`attention_clusters`; clusters of 8 or 4 blocks: :func:`attention_cluster_size`),
launch 3 merges the softmax states by head and projects out;
with ``kernel_options={"one_launch": True}`` the three run as one launch, each cluster taking its
role from a ticket as it starts (``docs/mla-decode-design.md``). CUDA tensors run the kernels of
:mod:`clusterlab.fused.mla_kernel` on torch's current stream (capturable in a CUDA graph; the
positions are read on the device, as the Llama block's are); CPU tensors run
:func:`~clusterlab.fused.mla_simulated.simulated_mla_step`, the same dataflow on the simulator. The
kernels take no query LoRA yet; the simulator does.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .config import MAX_BATCH, MAX_POSITIONS, check_batch, check_dtype, is_int
from .mla import LatentCache, MLAConfig, MLAWeights, check_mla_activations, check_mla_weights, mla_rope_table
from .plan import CLUSTER_SIZES, MLA_KERNEL_CHOICES, WARP_COUNTS, DeviceLimits, check_kernel_options, check_one_of
from .validate import check_longest, check_outputs, check_positions, kernel_bits, known_longest, resolve_backend

#: Blocks a cluster and warps a block unless told (DeepSeek-V2-Lite: 16 clusters of 8 for the heads).
DEFAULT_CLUSTER_SIZE = 8
DEFAULT_WARPS = 8
#: Cache rows each block of the one-block-an-SM grid would fold from which launch 2 takes the wider grid.
WIDE_FROM_ROWS = 320
#: Blocks of launch 2's wider grid for every SM (two fit an SM; see :func:`attention_clusters`).
WIDE_BLOCKS_PER_SM = 1.75


#: The smallest cluster launch 2 takes unless told: clusters of 2 or 1 mean 2-4 times the softmax states for
#: launch 3 to merge, and were slower at every batch measured (``docs/mla-decode-design.md``).
SMALLEST_ATTENTION_CLUSTER = 4


def _one_an_sm(batch: int, cluster_size: int, limits: DeviceLimits) -> int:
    """Clusters of ``cluster_size`` a sequence that put one block on each SM those clusters fill at
    once, for ``batch`` sequences (0 where not even one a sequence fits)."""
    return limits.sms_for(cluster_size) // (cluster_size * batch)


def attention_cluster_size(batch: int, cluster_size: int, limits: DeviceLimits) -> int:
    """Blocks a cluster of launch 2 for a step of ``batch`` sequences under launches 1 and 3 of
    ``cluster_size``: of ``cluster_size`` and the sizes of :data:`~clusterlab.fused.plan.CLUSTER_SIZES`
    below it down to :data:`SMALLEST_ATTENTION_CLUSTER`, the one whose one-block-an-SM grid
    (as many clusters a sequence as put one block on each SM they fill) holds the most blocks, the
    largest of those.

    A cluster of 8 blocks a sequence is a coarse step where the batch is large: at batch 8 one
    cluster of 8 a sequence is 64 blocks on the 120 SMs that clusters of 8 fill at once, three of 4
    are 96. So batches 2, 4, 6 and 8 take clusters of 4 and the others (where 8 fills as many SMs)
    clusters of 8 on an H100 or H200. DeepSeek-V2-Lite on an H100, float16, µs a step at 1K / 8K /
    32K (``docs/fused-decode-notes.md``, v74): batch 4 35.9 / 52.0 / 96.0 in clusters of 4 against
    37.0 / 55.3 / 97.5 in clusters of 8, batch 8 43.6 / 71.2 / 155.9 against 46.9 / 72.2 / 155.3;
    batch 1 36.6 / 41.1 / 53.1 against 34.9 / 39.8 / 51.8 (clusters of 8, which fill as many SMs).
    """
    check_batch(batch)
    check_one_of("cluster_size", cluster_size, CLUSTER_SIZES)
    sizes = [c for c in CLUSTER_SIZES if SMALLEST_ATTENTION_CLUSTER <= c <= cluster_size] or [cluster_size]
    return max(reversed(sizes), key=lambda size: _one_an_sm(batch, size, limits) * size)  # the first of the most


def attention_clusters(batch: int, cluster_size: int, limits: DeviceLimits, longest: int | None = None) -> int:
    """Clusters a sequence in launch 2 (``A``): one block an SM of those clusters of ``cluster_size``
    fill (``limits.sms_for(cluster_size) // (cluster_size * batch)``, at least 1), unless the host
    says the longest sequence attends to ``longest`` rows and those would give each block at least
    :data:`WIDE_FROM_ROWS` of them; then :data:`WIDE_BLOCKS_PER_SM` blocks an SM of all
    ``limits.sm_count``.

    GPCs hold whole clusters: clusters of 8 fill 120 of the H100's and H200's 132 SMs at once, so
    a grid of 16 clusters of 8 puts two blocks on eight SMs, which finish last. A block's tile chain
    (the copy engine's wait, the scores, one barrier, the softmax and the values) leaves its SM
    idle between tiles; a second block on the SM fills those gaps, but each cluster more is a
    softmax state more for launch 3 to merge, which pays only where the caches are long. Two blocks
    of launch 2 fit an SM, and 30 clusters of 8 are resident at once; 1.75 blocks an SM keeps
    within them (28 clusters at batch 1, 7 at batch 4, 3 at batch 8). DeepSeek-V2-Lite on an H100,
    float16, µs a step for ``A`` (``docs/mla-decode-design.md``, v73): batch 1 at 1K / 8K / 32K
    35.3 / 39.5 / 51.8 for 15, 36.8 / 42.8 / 58.3 for 16, 40.5 / 44.8 / 55.2 for 28; batch 4 at
    4K / 8K / 32K 46.1 / 55.9 / 114.9 for 3, 48.2 / 54.6 / 93.1 for 7; batch 8 at 1K / 4K / 32K
    46.6 / 68.3 / 266.2 for 1, 48.2 / 58.2 / 155.5 for 3.
    """
    check_batch(batch)
    check_longest(longest)
    one_an_sm = max(1, _one_an_sm(batch, cluster_size, limits))
    if longest is None or longest < WIDE_FROM_ROWS * one_an_sm * cluster_size:
        return one_an_sm
    return max(one_an_sm, int(WIDE_BLOCKS_PER_SM * limits.sm_count) // (cluster_size * batch))


@functools.cache
def _rope_table(config: MLAConfig, capacity: int, device: torch.device) -> torch.Tensor:
    """The flat table of :func:`~clusterlab.fused.mla.mla_rope_table` on ``device``, built once per
    (config, capacity, device)."""
    return mla_rope_table(config, capacity, device=device).view(-1)


@functools.cache
def mla_launchers(spec):
    """The three kernels of ``spec`` (:class:`~clusterlab.fused.mla_kernel.MLASpec`) as cluster
    launchers ``(projections, attention, output)``: one compilation per spec in a process."""
    from .mla_kernel import build_attention_kernel, build_output_kernel, build_projections_kernel

    return (_launcher(spec, "projections", build_projections_kernel, spec.heads),
            _launcher(spec, "attention", build_attention_kernel, spec.attention_clusters * spec.batch),
            _launcher(spec, "output", build_output_kernel, spec.heads))


@functools.cache
def mla_step_launcher(spec):
    """The three launches of ``spec`` as one (:func:`~clusterlab.fused.mla_kernel.build_step_kernel`), a
    cluster launcher: one compilation per spec in a process."""
    from .mla_kernel import build_step_kernel

    return _launcher(spec, "step", build_step_kernel, spec.step_clusters)


def _launcher(spec, name, build, clusters):
    from .. import kernel_cache
    from ..launch import launch

    threads, min_blocks = spec.launch_bounds(name)
    kernel = kernel_cache.jit(build, spec, (threads, min_blocks))
    size = spec.cluster_blocks(name)
    return launch(kernel, grid=clusters * size, cluster=size, block=threads, shared_bytes=4 * spec.shared_words(name),
                  non_portable=size > 8)


class DecodeMLA:
    """Residual add + RMSNorm + query and latent projections + RoPE + latent cache append +
    absorbed attention + output projection, three cluster launches a step.

    ``config``: :class:`~clusterlab.fused.mla.MLAConfig`; ``weights``: float16 or bfloat16
    :class:`~clusterlab.fused.mla.MLAWeights` on one device. ``cluster_size`` (1, 2, 4, 8, 16;
    default 8), ``attention_clusters`` (clusters a sequence in launch 2; default:
    :func:`attention_clusters`, one block an SM, more at long caches where a step says how long) and
    ``warps`` (4, 8, 16; default 8: of launches 1 and 3, launch 2 has one a 64 latent dims) shape
    the launches; launch 2's clusters are of :func:`attention_cluster_size` blocks. ``kernel_options``
    (:data:`~clusterlab.fused.plan.MLA_KERNEL_CHOICES`): ``{"one_launch": True}`` runs the three
    launches as one, each cluster taking its role from a ticket as it starts
    (:func:`~clusterlab.fused.mla_kernel.build_step_kernel`; ``warps`` must then be launch 2's,
    ``kv_lora_rank / 64``, and launch 2's clusters those of ``cluster_size``);
    ``{"attention_cluster_size": 4}`` gives launch 2 clusters of 4 blocks at every batch, whatever
    ``cluster_size`` launches 1 and 3 take; the outputs are the same. ``backend``: ``"auto"``
    follows the weights' device; ``"gpu"`` / ``"simulator"`` insist. ``limits``: the simulator
    backend's GPU limits (read from the device on the GPU backend). The simulator backend runs the
    launches' dataflow in the order one launch's tickets can give too (every cluster of a role after
    those of the role before).

    On the GPU a layer keeps ``W_UK[h]^T`` (``kv_b_proj``'s key rows of each head, transposed:
    ``heads * kv_lora_rank * qk_nope_head_dim`` values) beside the weights, float32 workspaces for
    what crosses from one launch to the next, and an ``out_acc`` accumulator and arrival counters
    left zero by every step; do not run one object on two streams at once.
    """

    def __init__(self, config: MLAConfig, weights: MLAWeights, *, cluster_size: int | None = None,
                 attention_clusters: int | None = None, warps: int | None = None, kernel_options: dict | None = None,
                 backend: str = "auto", limits: DeviceLimits | None = None):
        check_mla_weights(config, weights)
        device = weights.kv_b_proj.device
        backend, self.limits = resolve_backend(backend, device, limits)
        if cluster_size is not None:
            check_one_of("cluster_size", cluster_size, CLUSTER_SIZES)
        if attention_clusters is not None and not (is_int(attention_clusters) and attention_clusters >= 1):
            raise ValueError(f"attention_clusters must be a positive int, got {attention_clusters!r}")
        if warps is not None:
            check_one_of("warps", warps, WARP_COUNTS)
        self.kernel_options = check_kernel_options(kernel_options, MLA_KERNEL_CHOICES)
        self.one_launch = self.kernel_options.get("one_launch", False)
        self.cluster_size = DEFAULT_CLUSTER_SIZE if cluster_size is None else cluster_size
        given = self.kernel_options.get("attention_cluster_size")
        if self.one_launch:
            from .mla_kernel import check_one_launch

            check_one_launch(config.kv_lora_rank, DEFAULT_WARPS if warps is None else warps, self.cluster_size,
                             self.cluster_size if given is None else given)
            given = self.cluster_size
        self._attention_cluster_size = given
        self.config, self.weights, self.backend = config, weights, backend
        self.attention_clusters = attention_clusters
        self.warps = warps
        self._specs: dict = {}
        if backend == "gpu":
            from ..gpu import require_hopper

            require_hopper()
            h, r, heads, width = config.hidden_size, config.kv_lora_rank, config.heads, config.latent_width
            w_uk, _ = weights.absorbed(config)
            self._w_uk_t = w_uk.transpose(1, 2).contiguous()  # [heads, r, d_n]: rows of q_lat[h]'s columns
            f32 = functools.partial(torch.empty, dtype=torch.float32, device=device)
            self._q_lat = f32(MAX_BATCH * heads * r)
            self._q_pe = f32(MAX_BATCH * heads * config.qk_rope_head_dim)
            self._kv_raw = f32(MAX_BATCH * width)
            # (sequence, cluster, head) for the most clusters a step may take: those of the longest caches
            states = max(b * self.shape(b, MAX_POSITIONS)[2] for b in range(1, MAX_BATCH + 1)) * heads
            self._state_m = f32(states)
            self._state_l = f32(states)
            self._state_acc = f32(states * r)
            self._out_acc = torch.zeros(MAX_BATCH * h, dtype=torch.float32, device=device)
            self._arrivals = torch.zeros(max(CLUSTER_SIZES), dtype=torch.int32, device=device)
            from .mla_kernel import STEP_WORDS

            self._step_words = torch.zeros(STEP_WORDS, dtype=torch.int32, device=device)  # one launch's counters
            self._positions = torch.zeros(MAX_BATCH, dtype=torch.int32, device=device)

    def attention_cluster_size(self, batch: int) -> int:
        """Blocks a cluster of launch 2 in a step of ``batch`` sequences: the kernel option where given
        (with ``one_launch``, ``cluster_size``), else :func:`attention_cluster_size` for this GPU."""
        if self._attention_cluster_size is not None:
            check_batch(batch)
            return self._attention_cluster_size
        return attention_cluster_size(batch, self.cluster_size, self.limits)

    def shape(self, batch: int, longest: int | None = None) -> tuple[int, int, int]:
        """``(cluster_size, warps, attention_clusters)`` a step of ``batch`` sequences runs with, the
        longest of them attending to ``longest`` rows where known (launch 2 has
        ``attention_clusters * batch`` clusters): the constructor's values where given, else
        :func:`attention_clusters` for this GPU's SMs and launch 2's :meth:`attention_cluster_size`."""
        rule = attention_clusters(batch, self.attention_cluster_size(batch), self.limits, longest)  # checks both
        return self.cluster_size, self.warps or DEFAULT_WARPS, self.attention_clusters or rule

    def kernel_spec(self, dtype: torch.dtype, batch: int, longest: int | None = None):
        """The :class:`~clusterlab.fused.mla_kernel.MLASpec` of one dtype and batch, in the
        :meth:`shape` of ``longest`` (raises where the kernels cannot run this step: the query LoRA,
        shapes they do not tile, shared memory)."""
        from .mla_kernel import MLASpec

        check_dtype(dtype)
        _, warps, clusters = self.shape(batch, longest)
        key = (dtype, batch, clusters)
        if key not in self._specs:
            size = self.attention_cluster_size(batch)
            try:
                self._specs[key] = MLASpec.of(self.config, dtype == torch.bfloat16, batch, self.cluster_size,
                                              clusters, warps, limits=self.limits, attention_cluster_size=size)
            except ValueError as exc:
                raise ValueError(f"a {dtype} MLA step of batch {batch} with cluster_size={self.cluster_size}, "
                                 f"attention_clusters={clusters}, attention_cluster_size={size}, warps={warps}: "
                                 f"{exc}") from exc
        return self._specs[key]

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor, cache: LatentCache, positions, *,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
                 longest: int | None = None):
        """One decode step: ``(out, new_residual)``, both ``[batch, hidden_size]``; row ``positions[b]``
        of ``cache`` written.

        ``hidden``, ``residual``: ``[batch, hidden_size]`` (batch 1..8) in the weights' dtype and on
        their device; ``cache``: a :class:`~clusterlab.fused.mla.LatentCache` of that batch;
        ``positions``: an int for the whole batch, or an int32 tensor ``[batch]`` on the layer's
        device (its values are checked by the kernels: a position outside ``0 .. capacity-1``
        makes its sequence's outputs NaN and leaves its cache row alone). ``longest``: at least
        ``positions[b] + 1`` for every ``b``, where the host knows it (an int position says it):
        launch 2's grid for that length (:meth:`shape`); the outputs are the same whatever it is.
        Returns ``(out, new_residual)``, into ``out`` / ``residual_out`` when given (buffers that share
        no byte with each other or with ``hidden`` and ``residual``). Every check runs before the
        first launch.
        """
        check_mla_activations(self.config, self.weights, hidden, residual, cache)
        batch = hidden.shape[0]
        check_positions(positions, batch, cache.capacity, hidden.device)
        longest = known_longest(positions, longest, cache.capacity)
        check_outputs(hidden, residual, out, residual_out)
        out = torch.empty_like(hidden) if out is None else out
        residual_out = torch.empty_like(hidden) if residual_out is None else residual_out
        if self.backend == "simulator":
            from .mla_simulated import simulated_mla_step

            got, new_residual = simulated_mla_step(self.config, self.weights, hidden, residual, cache, positions,
                                                   self.cluster_size,
                                                   clusters_for_attention=self.shape(batch, longest)[2],
                                                   attention_cluster_size=self.attention_cluster_size(batch))
            out.copy_(got)
            residual_out.copy_(new_residual)
            return out, residual_out
        spec = self.kernel_spec(hidden.dtype, batch, longest)
        if isinstance(positions, int):
            positions = self._positions[:batch].fill_(positions)
        args = self.launch_args(hidden, residual, cache, positions, out, residual_out)
        if self.one_launch:
            mla_step_launcher(spec)(*args["step"])
        else:
            for name, launcher in zip(("projections", "attention", "output"), mla_launchers(spec)):
                launcher(*args[name])
        return out, residual_out

    def launch_args(self, hidden: torch.Tensor, residual: torch.Tensor, cache: LatentCache, positions: torch.Tensor,
                    out: torch.Tensor, residual_out: torch.Tensor) -> dict[str, tuple]:
        """The kernels' arguments for one step on the GPU, by kernel (``"projections"``, ``"attention"``,
        ``"output"``: the three launches; ``"step"``: the one launch), as
        :func:`~clusterlab.fused.mla_kernel.mla_kernel_signatures` orders them; ``positions``: int32
        ``[batch]`` on the device. Nothing is checked: :meth:`__call__` checks, then launches these."""
        capacity = np.int32(cache.capacity)
        rope = _rope_table(self.config, cache.capacity, hidden.device)
        w = self.weights
        inputs = (hidden, residual, w.input_layernorm, w.q_proj, w.kv_a_proj_with_mqa, self._w_uk_t)
        projected = (*map(kernel_bits, inputs), rope, positions, capacity, kernel_bits(residual_out), self._q_lat,
                     self._q_pe, self._kv_raw)
        states = (self._state_m, self._state_l, self._state_acc)
        outputs = (kernel_bits(w.kv_b_proj), kernel_bits(w.o_proj), kernel_bits(out),
                   self._out_acc[: hidden.shape[0] * self.config.hidden_size], self._arrivals)
        return {
            "projections": projected,
            "attention": (self._q_lat, self._q_pe, self._kv_raw, kernel_bits(w.kv_a_layernorm),
                          kernel_bits(cache.latent), rope, positions, capacity, *states),
            "output": (*states, *outputs),
            "step": (*projected, kernel_bits(w.kv_a_layernorm), kernel_bits(cache.latent), *states, *outputs,
                     self._step_words),
        }
