"""The decode step's math, twice: a float64 oracle and the unfused PyTorch layer.

:func:`reference_step` is the specification every other path is checked against. It computes in
float64 on whatever device its inputs live on and touches nothing it is given.

:class:`UnfusedAttention` is the same block as a PyTorch model would run it: six library calls
(add, ``rms_norm``, ``linear``, RoPE, ``scaled_dot_product_attention``, ``linear``) with every
intermediate in device memory. It appends to the cache in place, like the fused layer, and can be
captured in a CUDA graph, which makes it the benchmark's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import AttentionConfig, AttentionWeights, KVCache, is_int, rope_angles
from .validate import check_activations, check_host_positions, check_range, check_weights, sequence_positions


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate ``x`` (``[..., head_dim]``) by the angles whose ``cos``/``sin`` are ``[head_dim/2]``.

    NeoX pairs element ``i`` with ``i + head_dim/2``; GPT-J pairs ``2i`` with ``2i + 1``.
    """
    if style == "neox":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


@dataclass
class StepResult:
    """What one decode step produces, float64: ``out``/``residual`` ``[batch, hidden_size]``, the new
    cache rows ``k``/``v`` ``[batch, kv_heads, head_dim]`` (after RoPE for ``k``)."""

    out: torch.Tensor
    residual: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def reference_step(
    config: AttentionConfig,
    weights: AttentionWeights,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    cache: KVCache,
    positions,
) -> StepResult:
    """One decode step in float64; sequence ``b`` reads cache rows ``0 .. positions[b]-1``, nothing is appended.

    ``positions``: an int for the whole batch, or one per sequence (a list of ints or an int32 or
    int64 tensor ``[batch]`` on any device, read to the host). The inputs are checked as the
    layer checks them, every position against the cache's capacity.
    ::

        h    = hidden + residual                         (the new residual)
        n    = h / sqrt(mean(h**2) + eps) * norm
        q, k, v = split(n @ qkv.T + qkv_bias)            per head, head_dim wide
        q, k = rope(q, position), rope(k, position)      the sequence's own position
        attn[head] = softmax(q[head] . K[group]^T / sqrt(head_dim)) V[group]
                     over the cached rows 0..position-1 and the new k, v
        out  = attn @ o.T
    """
    check_weights(config, weights)
    check_activations(config, weights, hidden, residual, cache)
    batch, d = hidden.shape[0], config.head_dim
    positions = sequence_positions(positions, batch)
    check_range(positions, cache.capacity)
    f64 = torch.float64
    h = hidden.to(f64) + residual.to(f64)
    n = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + config.rms_eps) * weights.norm.to(f64)
    qkv = n @ weights.qkv.to(f64).T
    if weights.qkv_bias is not None:
        qkv = qkv + weights.qkv_bias.to(f64)
    q, k, v = qkv.split([config.heads * d, config.kv_heads * d, config.kv_heads * d], dim=-1)
    q = q.view(batch, config.heads, d)
    k = k.view(batch, config.kv_heads, d)
    v = v.view(batch, config.kv_heads, d)
    group = config.group_size
    attn, k_rot = [], []
    for b, position in enumerate(positions):
        angles = rope_angles(config, position).to(hidden.device)
        qb = apply_rope(q[b], angles.cos(), angles.sin(), config.rope_style)
        kb = apply_rope(k[b], angles.cos(), angles.sin(), config.rope_style)
        keys = torch.cat([cache.k[b, :, :position].to(f64), kb[:, None]], dim=1)  # [KV, L, d]
        values = torch.cat([cache.v[b, :, :position].to(f64), v[b, :, None]], dim=1)
        qg = qb.view(config.kv_heads, group, d)
        scores = torch.einsum("kgd,kld->kgl", qg, keys) / d**0.5
        attn.append(torch.einsum("kgl,kld->kgd", scores.softmax(-1), values).reshape(config.attn_width))
        k_rot.append(kb)
    out = torch.stack(attn) @ weights.o.to(f64).T
    return StepResult(out=out, residual=h, k=torch.stack(k_rot), v=v)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64; NaN anywhere in ``got`` gives ``inf``."""
    got64, want64 = got.to(torch.float64), want.to(torch.float64)
    if not torch.isfinite(got64).all():
        return float("inf")
    return float((got64 - want64).norm() / want64.norm())


class UnfusedAttention:
    """The block as separate PyTorch calls; same signature and effects as the fused layer.

    ``rope`` is the cos/sin table of :func:`~clusterlab.fused.config.rope_table`, on the weights'
    device. With an int position every sequence attends over rows ``0 .. position`` (no mask); a
    position tensor ``[batch]`` (int32 or int64, on the device) gives each sequence its own, read
    on the device: the attention runs over the first ``length`` rows of the cache (default: all of
    them) with a mask, and the cache rows are written with an index. A CUDA graph captured with a
    tensor replays whatever positions the tensor holds; one captured with an int replays that int.

    The tensors are checked as the fused layer's are (:func:`~clusterlab.fused.validate.check_activations`),
    ``length`` against the cache, and positions against the cache's capacity, ``length`` and the rope
    table's length where that costs no sync: an int always, a tensor on the CPU. A tensor on a GPU is
    not read (the baseline is captured in CUDA graphs, where reading it would break the capture); an
    out-of-range value there indexes out of bounds on the device.
    """

    def __init__(self, config: AttentionConfig, weights: AttentionWeights, rope: torch.Tensor):
        check_weights(config, weights)
        self.config, self.weights, self.rope = config, weights, rope

    def __call__(self, hidden, residual, cache: KVCache, positions, length: int | None = None):
        c, w, d = self.config, self.weights, self.config.head_dim
        check_activations(c, w, hidden, residual, cache)
        batch = hidden.shape[0]
        if length is not None and not (is_int(length) and 1 <= length <= cache.capacity):
            raise ValueError(f"length must be None or an int in 1..{cache.capacity} (the cache's rows), got {length!r}")
        attended, holder = (
            (cache.capacity, "the cache") if length is None else (length, f"the rows length={length} attends to"))
        check_host_positions(positions, batch, attended, self.rope.shape[0], holder)
        h = hidden + residual
        n = F.rms_norm(h, (c.hidden_size,), w.norm, c.rms_eps)
        q, k, v = F.linear(n, w.qkv, w.qkv_bias).split([c.heads * d, c.kv_heads * d, c.kv_heads * d], dim=-1)
        if isinstance(positions, int):
            cos, sin = self.rope[positions, 0], self.rope[positions, 1]  # [d/2]
        else:
            table = self.rope[positions.long()]  # [batch, 2, d/2]
            cos, sin = table[:, None, 0], table[:, None, 1]
        q = apply_rope(q.view(batch, c.heads, d).float(), cos, sin, c.rope_style).to(h.dtype)
        k = apply_rope(k.view(batch, c.kv_heads, d).float(), cos, sin, c.rope_style).to(h.dtype)
        v = v.view(batch, c.kv_heads, d)
        if isinstance(positions, int):
            cache.k[:, :, positions] = k
            cache.v[:, :, positions] = v
            keys, values, mask = cache.k[:, :, : positions + 1], cache.v[:, :, : positions + 1], None
        else:
            rows = torch.arange(batch, device=hidden.device)
            cache.k[rows, :, positions.long()] = k
            cache.v[rows, :, positions.long()] = v
            length = cache.capacity if length is None else length
            keys, values = cache.k[:, :, :length], cache.v[:, :, :length]
            mask = torch.arange(length, device=hidden.device) <= positions[:, None, None, None]
        attn = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, enable_gqa=c.group_size > 1)
        return F.linear(attn.reshape(batch, c.attn_width), w.o), h
