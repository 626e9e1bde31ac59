"""``DecodeMLP``: a decoder layer's MLP block fused into one cluster kernel.

::

    config = MLPConfig(hidden_size=4096, intermediate_size=14336, rms_eps=1e-5)   # Llama-3-8B
    layer = DecodeMLP(config, MLPWeights.random(config, torch.float16, "cuda"))
    out, residual = layer(hidden, residual)

computes, for ``[batch, hidden_size]`` activations (batch 1..8), as a Llama or Qwen2 layer does
after its attention::

    h   = hidden + residual                     the new residual
    n   = RMSNorm(h) * norm
    out = down(silu(gate(n)) * up(n))           [batch, hidden_size]

One launch of ``clusters`` clusters of ``cluster_size`` blocks. Cluster ``cluster`` owns
``inter_slice = intermediate_size / clusters`` rows of W_gate and of W_up (its *slots*: gate
rows first, then up rows) and the same columns of W_down; block ``rank`` of it owns the slice
``k0 = rank * k_slice`` of the hidden size (``k_slice = hidden_size / cluster_size``) and the
rows ``rank * out_rows ..`` of the output (``out_rows = k_slice``). Per step::

    1 gate_up   the block adds hidden + residual on its hidden slice, keeps xs = h * norm (float32,
                shared memory) and sum(h^2), and dots xs with its slice of the cluster's 2 x
                inter_slice weight rows: partial dots in its shared memory (B1: cluster barrier)
    2 act       the owner of intermediate element j (rank (j // 4) % cluster_size: quads of four
                elements, see plan.owned_quads) sums the cluster's partials of gate row j, up row j
                and sum(h^2) from every block's shared memory
                (DSMEM), normalises, computes a = silu(gate) * up (each rounded to the model dtype,
                as PyTorch's separate ops round) and pushes a to every block (a ClusterGather by
                stores) (B2: cluster barrier)
    3 down      each block dots its out_rows rows of W_down, restricted to the cluster's columns,
                with a and adds the sums into a float32 accumulator in global memory (red.add):
                every cluster adds its share of the intermediate dimension
    4 finish    the last block of each rank to arrive converts its rows to the model dtype

So the intermediate activations never leave the chip: the gate/up result is exchanged through
DSMEM inside a cluster, and the only grid-wide exchange is the float32 accumulation of the
down projection, finished by the last block to arrive (no second launch). The kernel is
:mod:`clusterlab.fused.mlp_kernel`; the same dataflow on the DSMEM simulator (CPU tensors) is
:mod:`clusterlab.fused.mlp_simulated`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .config import (DTYPES, MAX_BATCH, check_batch, check_device, check_dtype, check_rms_eps, check_size,
                     check_type, seeded_generator)
from .plan import CLUSTER_SIZES, MLP_KERNEL_CHOICES, WARP_COUNTS, DeviceLimits, check_kernel_options, check_one_of
from .validate import check_handoff, check_hidden_residual, check_outputs, check_tensor, kernel_bits, resolve_backend

#: Cluster size of an even split unless told (:func:`mlp_shape`), and of an uneven one.
DEFAULT_CLUSTER_SIZE = 2
UNEVEN_CLUSTER_SIZE = 4
#: A split is even when its blocks fill this share of the SMs' block slots (blocks over SMs x the
#: most blocks an SM gets).
BALANCED = 0.9
#: Warps of a block unless told: two blocks an SM, 16 warps an SM at 128 registers a thread; first
#: one block an SM of :data:`ONE_BLOCK_WARPS` where clusters of 2 of them split evenly.
DEFAULT_WARPS = 8
ONE_BLOCK_WARPS = 16


@dataclass(frozen=True)
class MLPConfig:
    """Shapes of a SwiGLU MLP block: ``hidden_size``, ``intermediate_size``, the RMSNorm's ``rms_eps``."""

    hidden_size: int
    intermediate_size: int
    rms_eps: float = 1e-5

    def __post_init__(self):
        check_size("hidden_size", self.hidden_size)
        check_size("intermediate_size", self.intermediate_size)
        if self.hidden_size % 8 or self.intermediate_size % 8:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) and intermediate_size ({self.intermediate_size}) must be "
                "multiples of 8 (16-byte rows of 16-bit weights)"
            )
        check_rms_eps("MLPConfig.rms_eps", self.rms_eps)

    def weight_bytes(self, itemsize: int = 2) -> int:
        """Bytes of W_gate, W_up, W_down and the norm's gain: what a step must read at least."""
        return (3 * self.intermediate_size + 1) * self.hidden_size * itemsize

    def step_bytes(self, batch: int, itemsize: int = 2) -> int:
        """Bytes a step moves at least: the weights, the two inputs read and the two outputs written."""
        return self.weight_bytes(itemsize) + 4 * batch * self.hidden_size * itemsize


@dataclass
class MLPWeights:
    """``norm`` ``[H]`` (the post-attention RMSNorm's gain), ``gate``, ``up`` ``[I, H]``, ``down`` ``[H, I]``:
    the checkpoint's own layout (``post_attention_layernorm``, ``mlp.gate_proj``, ``mlp.up_proj``,
    ``mlp.down_proj``), one dtype (float16 or bfloat16), one device."""

    norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def random(cls, config: MLPConfig, dtype=torch.float16, device="cpu", seed: int | None = None) -> MLPWeights:
        """Weights drawn like a trained layer's in scale: N(0, 1/fan_in) matrices, gains near 1."""
        check_type("config", config, MLPConfig)
        check_dtype(dtype)
        check_device(device)
        g = seeded_generator(seed)
        h, i = config.hidden_size, config.intermediate_size

        def draw(*shape, std):
            return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

        norm = (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype).to(device)
        return cls(norm, draw(i, h, std=h**-0.5), draw(i, h, std=h**-0.5), draw(h, i, std=i**-0.5))


def check_mlp_weights(config: MLPConfig, weights: MLPWeights) -> None:
    """``config`` is an MLPConfig; the weights match it, share one dtype (float16 or bfloat16) and
    one device, and are contiguous."""
    check_type("config", config, MLPConfig)
    check_type("weights", weights, MLPWeights)
    dtype, device = weights.gate.dtype, weights.gate.device
    if dtype not in DTYPES:
        raise TypeError(f"weights.gate has dtype {dtype}; allowed: {DTYPES}")
    h, i = config.hidden_size, config.intermediate_size
    check_tensor("weights.gate", weights.gate, (i, h), dtype, device, "weights.gate")
    check_tensor("weights.up", weights.up, (i, h), dtype, device, "weights.gate")
    check_tensor("weights.down", weights.down, (h, i), dtype, device, "weights.gate")
    check_tensor("weights.norm", weights.norm, (h,), dtype, device, "weights.gate")


def check_mlp_step(config: MLPConfig, weights: MLPWeights, hidden, residual) -> None:
    """``hidden`` and ``residual`` of one step: ``[batch, hidden_size]``, batch 1..8, the weights'
    dtype and device, contiguous."""
    check_hidden_residual(config.hidden_size, hidden, residual, weights.gate.dtype, weights.gate.device)


def _best_split(config: MLPConfig, batch: int, sm_count: int, cluster_size: int, warps: int):
    """``((balance, blocks), clusters)`` of the best split for clusters of ``cluster_size``, or None;
    from a batch of :data:`~clusterlab.fused.kernel.MMA_BATCH` on, a split whose two projections
    both run on the tensor cores comes first."""
    from .kernel import MmaTile
    from .mlp_kernel import MLPSpec

    best = None
    chunks = config.intermediate_size // 8
    for clusters in (n for n in range(1, chunks + 1) if chunks % n == 0):
        try:
            spec = MLPSpec.of(config, False, batch, cluster_size, clusters, warps)
        except ValueError:
            continue
        blocks = clusters * cluster_size
        if blocks > spec.min_blocks_per_sm * sm_count:
            continue  # not resident at once (a larger split needs less shared memory a block: go on)
        tensor_cores = isinstance(spec.gate_up_tile(), MmaTile) and isinstance(spec.down_tile(), MmaTile)
        score = (tensor_cores, blocks / (sm_count * -(-blocks // sm_count)), blocks)
        if best is None or score > best[0]:
            best = (score, clusters)
    return best and (best[0][1:], best[1])


def mlp_shape(config: MLPConfig, batch: int, sm_count: int, cluster_size: int | None = None,
              warps: int | None = None) -> tuple[int, int, int]:
    """``(cluster_size, clusters, warps)`` of a step.

    For a cluster size, the split of the intermediate size into ``clusters`` slices the kernel can
    tile, with every block resident at once, that loads the SMs most evenly (blocks over SMs x the
    most blocks an SM gets), then the one with the most blocks: every block streams the same
    bytes, so a step lasts as long as its busiest SM. From a batch of two on, a split whose two
    projections run on the tensor cores comes before either (Llama-3-8B: 64 clusters, not 128,
    whose 112-wide slices of W_down are not whole 32-column spans). ``warps`` defaults to 8 (two
    blocks an SM at 128 registers a thread).

    Without a ``cluster_size``: clusters of 2 where that split is even (at least
    :data:`BALANCED`), else of 4, else whichever size has a split. Without ``warps`` either, first
    clusters of 2 blocks of 16 warps (one an SM) where that split is even. What this follows,
    measured at batch 1 on the H200 (``clusterlab bench mlp --variant``): Llama-3-8B
    and Llama-3.2-1B split evenly into 128 clusters of 2 x 8 warps (256 blocks) and ran so at 110
    and 32 µs a layer (118 and 37 in clusters of 4); with ``h * norm`` interleaved
    (``MLPSpec.interleave_inputs``) 64 clusters of 2 x 16 warps ran 92.4 and 31.6 against 96.7 and
    32.4 for 2 x 8, and 120.5 and 42.5 for 4 x 16. Llama-2-7B (11008 = 2^8 x 43) and Qwen2.5-7B
    (18944 = 2^8 x 74) split into 172 or 148 blocks of 8 warps, and ran 77 / 126 µs in clusters of
    4 against 104 / 173 in clusters of 2. At batches, Llama-3-8B's tensor-core split in blocks of 8 warps
    is 64 clusters, one block an SM: in blocks of 16 it ran 103.0 / 114.4 µs at batch 4 / 8 against
    124.5 / 137.0 (``docs/fused-decode-notes.md``, v27).
    """
    if cluster_size is None and warps is None:
        pair = _best_split(config, batch, sm_count, DEFAULT_CLUSTER_SIZE, ONE_BLOCK_WARPS)
        if pair is not None and pair[0][0] >= BALANCED:
            return DEFAULT_CLUSTER_SIZE, pair[1], ONE_BLOCK_WARPS
    warps = DEFAULT_WARPS if warps is None else warps
    check_one_of("warps", warps, WARP_COUNTS)
    allowed = [c for c in CLUSTER_SIZES if config.hidden_size % (8 * c) == 0]
    if cluster_size is not None:
        check_one_of("cluster_size", cluster_size, allowed,
                     f" (8 * cluster_size must divide hidden_size {config.hidden_size})")
    if cluster_size is None:
        splits = {c: _best_split(config, batch, sm_count, c, warps) for c in allowed}
        even = splits.get(DEFAULT_CLUSTER_SIZE)
        if even is not None and even[0][0] >= BALANCED:
            return DEFAULT_CLUSTER_SIZE, even[1], warps
        for size in (UNEVEN_CLUSTER_SIZE, DEFAULT_CLUSTER_SIZE, *allowed):
            if splits.get(size) is not None:
                return size, splits[size][1], warps
    else:
        best = _best_split(config, batch, sm_count, cluster_size, warps)
        if best is not None:
            return cluster_size, best[1], warps
    sizes = [cluster_size] if cluster_size is not None else allowed  # 1 at least: MLPConfig asks multiples of 8
    raise ValueError(f"hidden_size {config.hidden_size} and intermediate_size {config.intermediate_size} have no split "
                     f"the fused MLP can tile: clusters of {sizes} blocks (8 * cluster_size must divide "
                     f"hidden_size; sizes {CLUSTER_SIZES}) of {warps} warps, with every block resident on {sm_count} "
                     "SMs at once")


@functools.cache
def mlp_launcher(spec):
    """The kernel of ``spec`` (an :class:`~clusterlab.fused.mlp_kernel.MLPSpec`) as a cluster launcher,
    compiled once per spec in a process and shared by every layer of that shape."""
    from .. import kernel_cache
    from ..launch import launch
    from .mlp_kernel import build_mlp_kernel

    kernel = kernel_cache.jit(build_mlp_kernel, spec, (spec.threads, spec.min_blocks_per_sm))
    return launch(kernel, grid=spec.clusters * spec.cluster_size, cluster=spec.cluster_size, block=spec.threads,
                  shared_bytes=spec.shared_bytes, non_portable=spec.cluster_size > 8)


class DecodeMLP:
    """Residual add + RMSNorm + gate/up + SiLU * up + down, one cluster kernel per step.

    ``config``: :class:`MLPConfig`; ``weights``: :class:`MLPWeights` (float16 or bfloat16, one
    device). ``cluster_size``, ``warps``: the launch shape (default :func:`mlp_shape`);
    ``backend``: ``"auto"`` follows the weights' device (CUDA: the kernel, CPU: the simulator),
    ``"gpu"`` / ``"simulator"`` insist; ``limits``: the GPU's SM count and shared memory, read
    from the device on the GPU backend (the simulator plans for ``limits``, default an H100/H200).
    ``kernel_options``: how the kernel runs a step, its outputs correct either way (the names and
    values of :data:`~clusterlab.fused.plan.MLP_KERNEL_CHOICES`), for measurements such as
    ``clusterlab bench mlp --spec default interleave_inputs=False``; the simulator backend checks
    them and runs its one dataflow. ``work_queue`` applies to steps of one sequence (the batches
    run the cluster kernel): :func:`~clusterlab.fused.mlp_kernel.build_mlp_queue_kernel`.

    One layer object owns a float32 ``out_acc`` workspace and arrival counters on its device,
    both left zero by every step (with ``work_queue`` also the ``act`` words it hands between
    its blocks, left unwritten); do not run one object on two streams at once.
    """

    def __init__(self, config: MLPConfig, weights: MLPWeights, *, cluster_size: int | None = None,
                 warps: int | None = None, backend: str = "auto", limits: DeviceLimits | None = None,
                 kernel_options: dict | None = None):
        check_mlp_weights(config, weights)
        self.kernel_options = check_kernel_options(kernel_options, MLP_KERNEL_CHOICES)
        device = weights.gate.device
        backend, self.limits = resolve_backend(backend, device, limits)
        self.config, self.weights, self.backend = config, weights, backend
        mlp_shape(config, 1, self.limits.sm_count, cluster_size, warps)  # raises where they cannot work
        if self.kernel_options.get("work_queue"):
            from .mlp_kernel import MLPSpec

            MLPSpec.queue(config, False, 1, self.limits)  # raises where it cannot work
        self.cluster_size, self.warps = cluster_size, warps
        self._specs: dict = {}
        if backend == "gpu":
            from ..gpu import require_hopper
            from .mlp_kernel import QUEUE_ARRIVALS, UNWRITTEN_INT32

            require_hopper()
            self._out_acc = torch.zeros(MAX_BATCH * config.hidden_size, dtype=torch.float32, device=device)
            queue = self.kernel_options.get("work_queue", False)
            self._arrivals = torch.zeros(QUEUE_ARRIVALS if queue else max(CLUSTER_SIZES), dtype=torch.int32,
                                         device=device)
            self._act = torch.full((config.intermediate_size,), UNWRITTEN_INT32, dtype=torch.int32,
                                   device=device) if queue else None

    def shape(self, batch: int) -> tuple[int, int, int]:
        """``(cluster_size, clusters, warps)`` a step of ``batch`` sequences runs with."""
        check_batch(batch)
        return mlp_shape(self.config, batch, self.limits.sm_count, self.cluster_size, self.warps)

    def queued(self, batch: int) -> bool:
        """Whether a step of ``batch`` sequences runs the work-queue kernel (``work_queue``, one sequence)."""
        return self.kernel_options.get("work_queue", False) and batch == 1

    def kernel_spec(self, dtype: torch.dtype, batch: int):
        """The :class:`~clusterlab.fused.mlp_kernel.MLPSpec` of a step of this dtype and batch (pure
        Python, on both backends: raises where the GPU of ``self.limits`` could not run it)."""
        from .mlp_kernel import MLPSpec

        check_dtype(dtype)
        key = (dtype, batch)
        if key not in self._specs:
            options = {name: value for name, value in self.kernel_options.items() if name != "work_queue"}
            if self.queued(batch):
                spec = MLPSpec.queue(self.config, dtype == torch.bfloat16, batch, limits=self.limits)
            else:
                cluster_size, clusters, warps = self.shape(batch)
                spec = MLPSpec.of(self.config, dtype == torch.bfloat16, batch, cluster_size, clusters, warps,
                                  limits=self.limits)
            self._specs[key] = dataclasses.replace(spec, **options)
        return self._specs[key]

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor, *, out: torch.Tensor | None = None,
                 residual_out: torch.Tensor | None = None):
        """One step: ``(out, hidden + residual)``, both ``[batch, hidden_size]`` in the weights' dtype
        (into ``out`` / ``residual_out`` when given: buffers that share no byte with each other or with
        ``hidden`` and ``residual``). Every check runs before the launch."""
        check_mlp_step(self.config, self.weights, hidden, residual)
        check_outputs(hidden, residual, out, residual_out)
        self.kernel_spec(hidden.dtype, hidden.shape[0])  # raises where the GPU could not run this step
        out = torch.empty_like(hidden) if out is None else out
        residual_out = torch.empty_like(hidden) if residual_out is None else residual_out
        if self.backend == "simulator":
            from .mlp_simulated import simulated_mlp_step

            cluster_size, clusters, _ = self.shape(hidden.shape[0])
            got, new_residual = simulated_mlp_step(self.config, self.weights, hidden, residual, cluster_size, clusters)
            out.copy_(got)
            residual_out.copy_(new_residual)
        else:
            self.launcher(hidden.dtype, hidden.shape[0])(*self.launch_args(hidden, residual, out, residual_out))
        return out, residual_out

    def handoff(self, hidden_sums: torch.Tensor, residual: torch.Tensor, *, sums_out: torch.Tensor,
                clear: torch.Tensor, residual_out: torch.Tensor | None = None):
        """One step that takes its input and leaves its output as float32 sums, in a chain of fused
        blocks: as :meth:`clusterlab.fused.DecodeAttention.handoff` (``hidden_sums`` read rounded to
        the weights' dtype, the output added into ``sums_out``, ``clear`` set to zero). Returns
        ``hidden + residual`` (into ``residual_out`` when given). The simulator backend runs the same
        hand-off (:func:`~clusterlab.fused.mlp_simulated.simulated_mlp_step`)."""
        dtype, device = self.weights.gate.dtype, self.weights.gate.device
        batch = check_handoff(self.config.hidden_size, hidden_sums, residual, sums_out, clear, residual_out, dtype,
                              device)
        self.kernel_spec(dtype, batch)  # raises where the GPU could not run this step, on both backends
        residual_out = torch.empty_like(residual) if residual_out is None else residual_out
        if self.backend == "simulator":
            from .mlp_simulated import simulated_mlp_step

            cluster_size, clusters, _ = self.shape(batch)
            out, new_residual = simulated_mlp_step(self.config, self.weights, hidden_sums, residual, cluster_size,
                                                   clusters, handoff=True)
            sums_out.add_(out)
            residual_out.copy_(new_residual)
            clear.zero_()
        else:
            args = self.launch_args(hidden_sums, residual, clear, residual_out, out_acc=sums_out)
            self.launcher(dtype, batch, handoff=True)(*args)
        return residual_out

    def launcher(self, dtype: torch.dtype, batch: int, handoff: bool = False):
        """The cluster launcher of one dtype and batch (GPU backend; ``handoff``: of :meth:`handoff`'s kernel)."""
        if self.backend != "gpu":
            raise ValueError(f"launcher needs the 'gpu' backend; this layer runs on the {self.backend}")
        return mlp_launcher(dataclasses.replace(self.kernel_spec(dtype, batch), handoff=handoff))

    def launch_args(self, hidden, residual, out, residual_out, out_acc=None) -> tuple:
        """The kernel's arguments for one step (see :func:`~clusterlab.fused.mlp_kernel.build_mlp_kernel`):
        16-bit tensors as int16 views, float32 ones (a hand-off's ``hidden`` and ``out``) as they
        are; ``out_acc`` by default the layer's own workspace; the work-queue kernel's ``act`` last."""

        w = self.weights
        batch = hidden.shape[0]
        out_acc = self._out_acc[: batch * self.config.hidden_size] if out_acc is None else out_acc.view(-1)
        args = (*map(kernel_bits, (hidden, residual, w.norm, w.gate, w.up, w.down, out, residual_out)), out_acc,
                self._arrivals)
        return args + (self._act,) if self.queued(batch) else args


def reference_mlp(weights: MLPWeights, hidden: torch.Tensor, residual: torch.Tensor, eps: float):
    """The block in float64 from the same inputs: ``(out, hidden + residual)`` as float64 tensors."""
    h = hidden.double() + residual.double()
    n = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * weights.norm.double()
    gate, up = n @ weights.gate.double().T, n @ weights.up.double().T
    return (torch.nn.functional.silu(gate) * up) @ weights.down.double().T, h
