"""The MLA decode step's math, twice: a float64 oracle and the unfused PyTorch layer.

Both compute the *absorbed* dataflow a fused kernel implements: the cache holds one latent row
per token, and no head's key or value is ever formed. Per sequence ``b`` and head ``h``
(``r = kv_lora_rank``, ``d_n``/``d_r``/``d_v`` the nope/rope/value head sizes)::

    hidden, residual  [H]  ──add──▶ h ──RMSNorm──▶ n [H]
    n ──q_proj (or q_a_proj, RMSNorm, q_b_proj)──▶ q_nope [heads, d_n], q_pe [heads, d_r]
    n ──kv_a_proj_with_mqa──▶ [c_raw (r) | k_pe (d_r)];  c = RMSNorm(c_raw) * kv_a_layernorm
    q_pe, k_pe ──RoPE at positions[b]──▶                     new cache row [c | k_pe]  (r + d_r)
    q_lat[h] = q_nope[h] @ W_UK[h]                          [r]     (absorbs the key up-projection)
    s[h, t]  = (q_lat[h] · c_t + q_pe[h] · k_pe_t) * softmax_scale     t = 0 .. positions[b]
    o_lat[h] = Σ_t softmax(s[h])_t c_t                        [r]     (rows read once for all heads)
    o[h]     = o_lat[h] @ W_UV[h]                             [d_v]   (absorbs the value up-projection)
    out      = concat_h(o[h]) @ o_proj.T                      [H]

:func:`mla_reference_step` is the specification; it computes in float64 and touches nothing
it is given. :class:`UnfusedMLA` is the same block as separate PyTorch calls with every
intermediate in device memory; it appends the new row to the cache and can be captured in a
CUDA graph, which makes it the benchmark's baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mla import (
    LATENT_RMS_EPS,
    LatentCache,
    MLAConfig,
    MLAWeights,
    check_mla_activations,
    check_mla_weights,
    mla_rope_frequencies,
)
from .reference import apply_rope
from .validate import check_host_positions, check_range, sequence_positions


def _rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * gain


def _rope_style(config: MLAConfig) -> str:
    """:func:`~clusterlab.fused.reference.apply_rope`'s name of the config's pairing."""
    return "gptj" if config.rope_interleaved else "neox"


@dataclass
class MLAStepResult:
    """What one MLA decode step produces, float64: ``out``/``residual`` ``[batch, hidden_size]`` and
    the new cache rows ``latent`` ``[batch, kv_lora_rank + qk_rope_head_dim]`` (``c``, then ``k_pe``
    after RoPE)."""

    out: torch.Tensor
    residual: torch.Tensor
    latent: torch.Tensor


def mla_reference_step(
    config: MLAConfig,
    weights: MLAWeights,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    cache: LatentCache,
    positions,
) -> MLAStepResult:
    """One MLA decode step in float64; sequence ``b`` reads cache rows ``0 .. positions[b]-1``,
    nothing is appended (the new rows are returned).

    ``hidden``, ``residual``: ``[batch, hidden_size]``, batch 1..8, in the weights' dtype (one of
    :data:`~clusterlab.fused.mla.MLA_DTYPES`); ``cache``: a :class:`LatentCache` of that batch;
    ``positions``: an int for the whole batch, or one per sequence (a list of ints or an int32 or
    int64 tensor ``[batch]`` on any device, read to the host), each below the cache's capacity.
    """
    check_mla_weights(config, weights)
    check_mla_activations(config, weights, hidden, residual, cache)
    batch, heads, r = hidden.shape[0], config.heads, config.kv_lora_rank
    positions = sequence_positions(positions, batch)
    check_range(positions, cache.capacity)
    w = {name: (t if t is None else t.to(torch.float64)) for name, t in vars(weights).items()}
    w_uk, w_uv = (t.to(torch.float64) for t in weights.absorbed(config))  # [heads, d_n, r], [heads, r, d_v]
    h = hidden.to(torch.float64) + residual.to(torch.float64)  # [B, H], the new residual
    n = _rms_norm(h, w["input_layernorm"], config.rms_eps)  # [B, H]
    if config.q_lora_rank is None:
        q = n @ w["q_proj"].T  # [B, heads * (d_n + d_r)]
    else:
        q_a = _rms_norm(n @ w["q_a_proj"].T, w["q_a_layernorm"], LATENT_RMS_EPS)  # [B, q_lora_rank]
        q = q_a @ w["q_b_proj"].T
    q_nope, q_pe = q.view(batch, heads, config.qk_head_dim).split([config.qk_nope_head_dim, config.qk_rope_head_dim], -1)
    kv = n @ w["kv_a_proj_with_mqa"].T  # [B, r + d_r]
    c = _rms_norm(kv[:, :r], w["kv_a_layernorm"], LATENT_RMS_EPS)  # [B, r], the cached latent
    k_pe = kv[:, r:]  # [B, d_r], one key part shared by every head
    freqs = mla_rope_frequencies(config).to(hidden.device)
    factor, style = config.rope_attention_factor, _rope_style(config)
    attn, rows = [], []
    for b, position in enumerate(positions):
        cos, sin = factor * (position * freqs).cos(), factor * (position * freqs).sin()  # [d_r/2]
        qb_pe = apply_rope(q_pe[b], cos, sin, style)  # [heads, d_r]
        kb_pe = apply_rope(k_pe[b], cos, sin, style)  # [d_r]
        row = torch.cat([c[b], kb_pe])  # [r + d_r], the row this step adds
        latents = torch.cat([cache.latent[b, :position].to(torch.float64), row[None]])  # [L, r + d_r]
        q_lat = torch.einsum("hn,hnr->hr", q_nope[b], w_uk)  # [heads, r]
        scores = (q_lat @ latents[:, :r].T + qb_pe @ latents[:, r:].T) * config.softmax_scale  # [heads, L]
        o_lat = scores.softmax(-1) @ latents[:, :r]  # [heads, r]
        attn.append(torch.einsum("hr,hrv->hv", o_lat, w_uv).reshape(config.attn_width))  # [heads * d_v]
        rows.append(row)
    out = torch.stack(attn) @ w["o_proj"].T  # [B, H]
    return MLAStepResult(out=out, residual=h, latent=torch.stack(rows))


class UnfusedMLA:
    """The MLA block as separate PyTorch calls, absorbed; same signature and effects as a fused layer.

    ``rope``: the table of :func:`~clusterlab.fused.mla.mla_rope_table`, on the weights' device.
    The up-projections are split out of ``kv_b_proj`` once, here. Per step: add, ``rms_norm``,
    the query and latent projections, RoPE in float32, the new rows written into the cache, the
    absorbed query (one batched matmul over heads), one ``scaled_dot_product_attention`` whose
    ``heads`` query rows share the cache's rows as keys (all ``r + d_r``) and values (the first
    ``r``), the value absorption (one batched matmul) and ``o_proj``.

    With an int position every sequence attends over rows ``0 .. position`` (no mask); a position
    tensor ``[batch]`` (int32 or int64, on the device) gives each sequence its own, read on the
    device: the attention runs over the first ``length`` rows (default: all of them) with a mask,
    and the rows are written with an index, so a CUDA graph captured with it replays whatever
    positions the tensor holds. Masked rows weigh 0, but a NaN there still gives NaN: rows up to
    ``length`` must hold numbers. Positions are checked against the cache's capacity and the
    table's length where that costs no sync (an int, or a tensor on the CPU).
    """

    def __init__(self, config: MLAConfig, weights: MLAWeights, rope: torch.Tensor):
        check_mla_weights(config, weights)
        self.config, self.weights, self.rope = config, weights, rope
        self.w_uk, self.w_uv = weights.absorbed(config)  # [heads, d_n, r], [heads, r, d_v]

    def __call__(self, hidden, residual, cache: LatentCache, positions, length: int | None = None):
        """One step: ``(out, new_residual)``, both ``[batch, hidden_size]``; row ``positions[b]`` of
        ``cache`` written."""
        c, w, r = self.config, self.weights, self.config.kv_lora_rank
        check_mla_activations(c, w, hidden, residual, cache)
        batch = hidden.shape[0]
        check_host_positions(positions, batch, cache.capacity, self.rope.shape[0])
        h = hidden + residual
        n = F.rms_norm(h, (c.hidden_size,), w.input_layernorm, c.rms_eps)
        if c.q_lora_rank is None:
            q = F.linear(n, w.q_proj)
        else:
            q = F.linear(F.rms_norm(F.linear(n, w.q_a_proj), (c.q_lora_rank,), w.q_a_layernorm, LATENT_RMS_EPS),
                         w.q_b_proj)
        q_nope, q_pe = q.view(batch, c.heads, c.qk_head_dim).split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
        kv = F.linear(n, w.kv_a_proj_with_mqa)
        latent = F.rms_norm(kv[:, :r], (r,), w.kv_a_layernorm, LATENT_RMS_EPS)
        if isinstance(positions, int):
            cos, sin = self.rope[positions, 0], self.rope[positions, 1]  # [d_r/2]
        else:
            table = self.rope[positions.long()]  # [batch, 2, d_r/2]
            cos, sin = table[:, None, 0], table[:, None, 1]
        style = _rope_style(c)
        q_pe = apply_rope(q_pe.float(), cos, sin, style).to(h.dtype)  # [batch, heads, d_r]
        k_pe = apply_rope(kv[:, None, r:].float(), cos, sin, style).to(h.dtype)[:, 0]  # [batch, d_r]
        row = torch.cat([latent, k_pe], dim=-1)  # [batch, r + d_r]
        if isinstance(positions, int):
            cache.latent[:, positions] = row
            rows, mask = cache.latent[:, : positions + 1], None
        else:
            cache.latent[torch.arange(batch, device=hidden.device), positions.long()] = row
            length = cache.capacity if length is None else length
            rows = cache.latent[:, :length]
            mask = (torch.arange(length, device=hidden.device) <= positions[:, None, None, None])  # [B, 1, 1, L]
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [batch, heads, r]
        query = torch.cat([q_lat, q_pe], dim=-1)[:, None]  # [batch, 1, heads, r + d_r]: heads as query rows
        o_lat = F.scaled_dot_product_attention(query, rows[:, None], rows[:, None, :, :r], attn_mask=mask,
                                               scale=c.softmax_scale)  # [batch, 1, heads, r]
        o = torch.bmm(o_lat[:, 0].transpose(0, 1), self.w_uv).transpose(0, 1)  # [batch, heads, d_v]
        return F.linear(o.reshape(batch, c.attn_width), w.o_proj), h
