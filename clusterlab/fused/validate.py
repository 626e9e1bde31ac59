"""Checks run before anything is launched; each error names the parameter, its value and what is allowed."""

from __future__ import annotations

import reprlib

import torch

from .config import DTYPES, MAX_BATCH, AttentionConfig, AttentionWeights, KVCache, check_type, is_int
from .plan import HOPPER, DeviceLimits

#: Where a fused layer runs: ``"auto"`` follows its weights' device, ``"gpu"`` (the cluster kernel)
#: and ``"simulator"`` (the same dataflow on the CPU) insist.
BACKENDS = ("auto", "gpu", "simulator")


def resolve_backend(backend, device: torch.device, limits: DeviceLimits | None) -> tuple[str, DeviceLimits]:
    """``(backend, limits)`` of a layer whose weights are on ``device``: ``"auto"`` resolved (a CUDA
    device: ``"gpu"``, the CPU: ``"simulator"``); on the GPU backend the device's own limits (``limits``
    must be None), on the simulator ``limits`` or :data:`~clusterlab.fused.plan.HOPPER`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "gpu" if device.type == "cuda" else "simulator"
    if backend == "gpu" and device.type != "cuda":
        raise ValueError(f"backend 'gpu' needs the weights on a CUDA device; they are on {device}")
    if backend == "simulator" and device.type != "cpu":
        raise ValueError(f"backend 'simulator' needs the weights on the CPU; they are on {device}")
    if backend == "gpu":
        if limits is not None:
            raise ValueError("limits is read from the device on the 'gpu' backend; pass it only to the simulator")
        return backend, DeviceLimits.of(device)
    if limits is not None and not isinstance(limits, DeviceLimits):
        raise TypeError(f"limits must be None or a DeviceLimits (clusterlab.fused.plan), got {limits!r}")
    return backend, HOPPER if limits is None else limits


def check_tensor(name: str, x, shape: tuple, dtype, device: torch.device, like: str) -> None:
    """``x`` is a contiguous torch tensor of ``shape`` with ``dtype`` and on ``device``, those of
    ``like`` (named in the message), and on a GPU starts on a 16-byte boundary (a view at another
    offset would fault the kernels' 16-byte loads); TypeError / ValueError naming ``name`` otherwise.
    CPU tensors may start anywhere: the simulator reads them element by element."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}; expected {dtype} (the dtype of {like})")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}; expected {device} (the device of {like})")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {shape}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major); call .contiguous() first")
    if x.is_cuda and x.data_ptr() % 16:
        raise ValueError(f"{name} starts {x.data_ptr() % 16} bytes past a 16-byte boundary; the kernels read it "
                         "16 bytes at a time: pass a tensor that starts on one (a fresh tensor, or .clone())")


def kernel_bits(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as the flat array a kernel takes: float32 as it is, float16 and bfloat16 as
    int16 views of their bits (the kernels convert them with :mod:`clusterlab.ptx`'s intrinsics)."""
    return t.view(-1) if t.dtype == torch.float32 else t.view(-1).view(torch.int16)


def check_rows(name: str, x, hidden_size: int) -> int:
    """``x`` is a torch tensor ``[batch, hidden_size]`` with batch 1..8 (TypeError / ValueError naming
    ``name`` otherwise); returns the batch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, {hidden_size})")
    batch = x.shape[0]
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"{name} has batch {batch}; allowed 1..{MAX_BATCH}")
    return batch


def check_hidden_residual(hidden_size: int, hidden, residual, dtype, device: torch.device) -> int:
    """``hidden`` and ``residual`` of one step: ``[batch, hidden_size]`` with batch 1..8, ``dtype``
    and ``device`` (the weights'), contiguous; returns the batch."""
    batch = check_rows("hidden", hidden, hidden_size)
    check_tensor("hidden", hidden, (batch, hidden_size), dtype, device, "the weights")
    check_tensor("residual", residual, (batch, hidden_size), dtype, device, "the weights")
    return batch


def check_weights(config: AttentionConfig, weights: AttentionWeights) -> None:
    """``config`` is an AttentionConfig; the weights match it, share one dtype (float16 or bfloat16)
    and one device, and are contiguous."""
    check_type("config", config, AttentionConfig)
    check_type("weights", weights, AttentionWeights)
    dtype, device = weights.qkv.dtype, weights.qkv.device
    if dtype not in DTYPES:
        raise TypeError(f"weights.qkv has dtype {dtype}; allowed: {DTYPES}")
    h = config.hidden_size
    check_tensor("weights.qkv", weights.qkv, (config.qkv_rows, h), dtype, device, "weights.qkv")
    check_tensor("weights.norm", weights.norm, (h,), dtype, device, "weights.qkv")
    check_tensor("weights.o", weights.o, (h, config.attn_width), dtype, device, "weights.qkv")
    if config.qkv_bias and weights.qkv_bias is None:
        raise ValueError("weights.qkv_bias is None but the config has qkv_bias=True")
    if not config.qkv_bias and weights.qkv_bias is not None:
        raise ValueError("weights.qkv_bias is given but the config has qkv_bias=False")
    if weights.qkv_bias is not None:
        check_tensor("weights.qkv_bias", weights.qkv_bias, (config.qkv_rows,), dtype, device, "weights.qkv")


def check_step(
    config: AttentionConfig,
    weights: AttentionWeights,
    hidden,
    residual,
    cache: KVCache,
    positions,
) -> None:
    """Everything one decode step of the layer needs, against ``config`` and ``weights`` (already checked)."""
    check_activations(config, weights, hidden, residual, cache)
    check_positions(positions, hidden.shape[0], cache.capacity, hidden.device)


def check_activations(config: AttentionConfig, weights: AttentionWeights, hidden, residual, cache: KVCache) -> None:
    """``hidden``, ``residual`` and ``cache`` of one step, against ``config`` and ``weights`` (already checked)."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in DTYPES:
        raise TypeError(f"hidden has dtype {hidden.dtype}; allowed: {DTYPES}")
    if hidden.dtype != weights.qkv.dtype:
        raise TypeError(f"hidden has dtype {hidden.dtype} but the weights are {weights.qkv.dtype}")
    if hidden.device != weights.qkv.device:
        raise ValueError(f"hidden is on {hidden.device} but the weights are on {weights.qkv.device}")
    batch = check_rows("hidden", hidden, config.hidden_size)
    check_tensor("hidden", hidden, (batch, config.hidden_size), hidden.dtype, hidden.device, "hidden")
    check_tensor("residual", residual, (batch, config.hidden_size), hidden.dtype, hidden.device, "hidden")
    check_cache(config, cache, batch, hidden.dtype, hidden.device, "hidden")


def check_cache(config: AttentionConfig, cache: KVCache, batch: int, dtype, device: torch.device, like: str) -> None:
    """``cache`` is a :class:`KVCache` of ``batch`` sequences for ``config``, in ``dtype`` on ``device``
    (those of ``like``, named in the message)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if cache.k.dim() != 4:
        raise ValueError(f"cache.k has shape {tuple(cache.k.shape)}; expected (batch, kv_heads, capacity, head_dim)")
    shape = (batch, config.kv_heads, cache.k.shape[2], config.head_dim)
    check_tensor("cache.k", cache.k, shape, dtype, device, like)
    check_tensor("cache.v", cache.v, shape, dtype, device, like)
    check_apart("a step writes its new key rows into cache.k and its value rows into cache.v",
                **{"cache.k": cache.k, "cache.v": cache.v})


#: Why a step's outputs share no byte with each other or with its inputs.
OUTPUTS_APART = ("a step writes out and residual_out while its clusters still read hidden and residual: pass "
                 "buffers of their own")


def check_handoff(hidden_size: int, hidden_sums, residual, sums_out, clear, residual_out, dtype,
                  device: torch.device) -> int:
    """The tensors of a hand-off step (``DecodeAttention.handoff``, ``DecodeMLP.handoff``):
    ``hidden_sums``, ``sums_out`` and ``clear`` float32 ``[batch, hidden_size]`` (batch 1..8),
    three buffers that share no byte; ``residual`` and ``residual_out`` (None: the step allocates it)
    ``[batch, hidden_size]`` in ``dtype``, ``residual_out`` apart from the step's inputs (its first
    cluster writes it while the others still read them); all on ``device`` (the weights'),
    contiguous. Returns the batch."""
    batch = check_rows("hidden_sums", hidden_sums, hidden_size)
    buffers = {"hidden_sums": hidden_sums, "sums_out": sums_out, "clear": clear}
    for name, x in buffers.items():
        check_tensor(name, x, (batch, hidden_size), torch.float32, device, "a hand-off's sums, on the weights' device")
    check_tensor("residual", residual, (batch, hidden_size), dtype, device, "the weights")
    check_apart("a hand-off step reads hidden_sums, adds into sums_out and clears clear: three separate buffers",
                **buffers)
    if residual_out is not None:
        check_tensor("residual_out", residual_out, (batch, hidden_size), dtype, device, "the weights")
    check_apart(OUTPUTS_APART, hidden_sums=hidden_sums, residual=residual, residual_out=residual_out)
    return batch


def check_apart(why: str, **tensors) -> None:
    """No two of ``tensors`` (contiguous; None ones left out) share a byte: ValueError naming the
    first two that do, in address order, and ``why`` they must not."""
    spans = sorted((x.data_ptr(), x.data_ptr() + x.element_size() * x.numel(), name)
                   for name, x in tensors.items() if x is not None)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{first} and {second} share memory; {why}")


def check_outputs(hidden, residual, out, residual_out) -> None:
    """``out`` and ``residual_out`` of a step, each None (the step allocates it) or a contiguous tensor
    like ``hidden`` (its shape, dtype and device) that shares no byte with the other or with ``hidden``
    and ``residual`` (:data:`OUTPUTS_APART`)."""
    for name, given in (("out", out), ("residual_out", residual_out)):
        if given is None:
            continue
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"{name} must be None or a torch.Tensor, got {type(given).__name__}")
        check_tensor(name, given, tuple(hidden.shape), hidden.dtype, hidden.device, "hidden")
    for read in ({"hidden": hidden}, {"residual": residual}):
        check_apart(OUTPUTS_APART, **read, out=out, residual_out=residual_out)


def check_positions(positions, batch: int, capacity: int, device: torch.device) -> None:
    """An int for the whole batch, or an int32 tensor ``[batch]`` on ``device``; every value in ``0 .. capacity-1``.

    The values of a tensor on a CUDA device are not read here (that would cost a host sync per
    step): the kernel checks them (see :class:`~clusterlab.fused.layer.DecodeAttention`).
    """
    if isinstance(positions, torch.Tensor):
        if positions.dtype != torch.int32:
            raise TypeError(f"positions has dtype {positions.dtype}; expected torch.int32")
        if positions.device != device:
            raise ValueError(f"positions is on {positions.device}; expected {device} (the device of hidden)")
        if tuple(positions.shape) != (batch,):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({batch},), one per sequence")
        if not positions.is_contiguous():
            raise ValueError("positions must be contiguous; call .contiguous() first")
        if positions.device.type == "cuda":
            return
        values = positions.tolist()
    elif is_int(positions):
        values = [positions]
    else:
        raise TypeError(f"positions must be an int or an int32 tensor of shape ({batch},), got {type(positions).__name__}")
    check_range(values, capacity)


def check_longest(longest, capacity: int | None = None) -> None:
    """None, or an int in ``1 .. capacity`` (any positive int where no cache is named): the most
    rows a sequence of the step attends to (its cached rows and the new token), as the host knows
    it (it picks the launch shape; see :func:`~clusterlab.fused.plan.launch_shape`)."""
    if longest is None:
        return
    if not is_int(longest):
        raise TypeError(f"longest must be None or an int (rows a sequence attends to), got {longest!r} "
                        f"({type(longest).__name__})")
    if capacity is None:
        if longest < 1:
            raise ValueError(f"longest must be a positive int (rows a sequence attends to), got {longest}")
        return
    if not 1 <= longest <= capacity:
        raise ValueError(f"longest must be from 1 to the cache's capacity {capacity} (rows a sequence attends to, "
                         f"its new token included), got {longest}")


def known_longest(positions, longest, capacity: int) -> int | None:
    """``longest`` checked (:func:`check_longest` against the cache's ``capacity``) and returned as
    given, else what an int position says (its rows and the new one); one below what an int
    position says is refused (a tensor's positions stay on the device, unread)."""
    check_longest(longest, capacity)
    if isinstance(positions, int):
        if longest is None:
            return positions + 1
        if longest < positions + 1:
            raise ValueError(f"longest must be at least positions + 1 = {positions + 1} (the rows the new "
                             f"token attends to, itself included), got {longest}")
    return longest


def sequence_positions(positions, batch: int) -> list[int]:
    """``positions`` as one int per sequence, read to the host: an int (the whole batch), a list or
    tuple of ``batch`` ints, or an int32 or int64 tensor ``[batch]`` on any device (a CUDA tensor
    costs a sync)."""
    if isinstance(positions, torch.Tensor):
        if positions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"positions has dtype {positions.dtype}; expected torch.int32 or torch.int64")
        if tuple(positions.shape) != (batch,):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({batch},), one per sequence")
        return positions.tolist()
    if is_int(positions):
        return [int(positions)] * batch
    if isinstance(positions, (list, tuple)) and all(is_int(p) for p in positions):
        if len(positions) != batch:
            raise ValueError(f"positions has length {len(positions)}; expected {batch}, one per sequence")
        return [int(p) for p in positions]
    raise TypeError(
        f"positions must be an int, a list of {batch} ints or an int32/int64 tensor of shape ({batch},), "
        f"got {reprlib.repr(positions)}"
    )


def check_host_positions(positions, batch: int, capacity: int, rope_rows: int, holder: str = "the cache") -> None:
    """Positions the host holds (an int, or a tensor on the CPU): every one within the ``capacity``
    rows of ``holder`` (the cache, or the part of it a step attends to) and the RoPE table's
    ``rope_rows``. A CUDA tensor is not read: a step that takes one may be captured in a CUDA graph,
    where reading it would break the capture."""
    if isinstance(positions, int) or positions.device.type == "cpu":
        values = sequence_positions(positions, batch)
        check_range(values, capacity, holder)
        check_range(values, rope_rows, "the rope table")


def check_range(values: list[int], capacity: int, holder: str = "the cache") -> None:
    """Every position in ``values`` is in ``0 .. capacity-1``, the rows ``holder`` has."""
    for value in values:
        if value < 0:
            raise ValueError(f"positions must be >= 0, got {value}")
        if value >= capacity:
            raise ValueError(
                f"position {value} overflows {holder}: it holds {capacity} positions (0..{capacity - 1})"
            )
