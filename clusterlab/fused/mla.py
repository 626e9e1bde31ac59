"""Multi-head latent attention (MLA, DeepSeek-V2) at decode time: shapes, weights, the latent cache, YaRN RoPE.

MLA caches one *latent* row per token instead of a key and a value per head: the RMS-normalized
compression ``c`` of the token (``kv_lora_rank`` wide) and one RoPE'd key part ``k_pe``
(``qk_rope_head_dim`` wide) that every head shares. A head's key is ``[W_UK[h] @ c | k_pe]`` and
its value ``W_UV[h]^T @ c``; decode never forms them: the up-projections are *absorbed* into
the query and the output (``q_nope @ W_UK[h]`` is a query against ``c`` itself, and
``(Σ_t p_t c_t) @ W_UV[h]`` is the head's output), so a step reads each cached row once for all
heads. The dataflow, line by line: :func:`clusterlab.fused.mla_reference.mla_reference_step`.

Layouts (row-major, contiguous, one dtype for everything; checkpoint names and shapes, as
transformers' ``DeepseekV2Attention`` stores them; ``r = kv_lora_rank``, ``d_n = qk_nope_head_dim``,
``d_r = qk_rope_head_dim``, ``d_v = v_head_dim``):

========================  ==================================  ========================================
name                      shape                               meaning
========================  ==================================  ========================================
``hidden``, ``residual``  ``[batch, hidden_size]``            as for the Llama block
``input_layernorm``       ``[hidden_size]``                   RMSNorm gain before the block
``q_proj``                ``[heads*(d_n+d_r), hidden]``       query rows, per head ``d_n`` rows for
                                                              ``q_nope`` then ``d_r`` for ``q_pe``
                                                              (without query LoRA)
``q_a_proj``              ``[q_lora_rank, hidden]``           query down-projection (with query LoRA)
``q_a_layernorm``         ``[q_lora_rank]``                   its RMSNorm gain
``q_b_proj``              ``[heads*(d_n+d_r), q_lora_rank]``  query up-projection, rows as ``q_proj``
``kv_a_proj_with_mqa``    ``[r + d_r, hidden]``               rows: the latent ``c`` (``r``), then the
                                                              shared ``k_pe`` (``d_r``)
``kv_a_layernorm``        ``[r]``                             RMSNorm gain of ``c``
``kv_b_proj``             ``[heads*(d_n+d_v), r]``            per head ``d_n`` rows of ``W_UK[h]``,
                                                              then ``d_v`` rows of ``W_UV[h]^T``
``o_proj``                ``[hidden, heads*d_v]``             output projection
``latent`` (the cache)    ``[batch, capacity, r + d_r]``      row ``t`` of sequence ``b``: ``c`` then
                                                              ``k_pe`` (RoPE'd at position ``t``); a
                                                              step reads rows ``0 .. positions[b]-1``
                                                              and writes row ``positions[b]``
========================  ==================================  ========================================

RoPE rotates only ``q_pe`` and ``k_pe``. DeepSeek's checkpoints pair neighbours ``(2i, 2i+1)``
(``rope_interleaved=True``; transformers rotates them as complex numbers, and k_pe stays in
that element order in the cache); ``rope_interleaved=False`` pairs ``(i, i + d_r/2)`` (for
weights whose ``q_pe``/``k_pe`` rows were permuted to rotate halves). YaRN changes the
frequencies (:class:`YarnRopeScaling`), multiplies cos and sin by ``attention_factor`` and the
softmax scale by ``softmax_factor``.

Preset: :data:`DEEPSEEK_V2_LITE`, by name in :data:`MLA_PRESETS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import (
    check_cache_request,
    check_device,
    check_number,
    check_rms_eps,
    check_rope_theta,
    check_size,
    check_type,
    is_int,
    seeded_generator,
)
from .validate import check_hidden_residual, check_tensor

#: Dtypes of the reference and the unfused layer: float32 as well as the fused layer's two.
MLA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: eps of ``q_a_layernorm`` and ``kv_a_layernorm``: DeepSeek's model code builds them with RMSNorm's
#: default, whatever the checkpoint's ``rms_norm_eps`` (which only the block's input norm uses).
LATENT_RMS_EPS = 1e-6


@dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN RoPE scaling as DeepSeek-V2 configures it (``rope_scaling: {"type": "yarn", ...}``).

    Frequencies, per pair ``i < d_r/2`` with ``f_i = theta**(-2i/d_r)``: pairs that turn more than
    ``beta_fast`` times over the original context keep ``f_i``; pairs that turn fewer than
    ``beta_slow`` times get ``f_i / factor``; between, a linear ramp over the pair index. The
    ramp's ends are the pair indices of ``beta_fast`` and ``beta_slow`` turns, rounded outwards
    (floor, ceil) and clamped to ``0 .. d_r-1``.

    Magnitudes, with ``m(k) = 1 + 0.1 * k * ln(factor)`` (1 where ``factor <= 1``): cos and sin
    are multiplied by ``attention_factor = m(mscale) / m(mscale_all_dim)`` (1 in DeepSeek-V2,
    where the two are equal) and the softmax scale by ``softmax_factor = m(mscale_all_dim)**2``
    (1.59 in DeepSeek-V2-Lite). ``mscale_all_dim = 0`` gives ``m = 1``, DeepSeek's default
    (transformers 5.24 then scales cos and sin by ``m(1)`` whatever ``mscale``: the two agree
    where ``mscale = 1``).
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        for name in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            check_number(f"YarnRopeScaling.{name}", getattr(self, name))
        if not (self.factor >= 1.0 and math.isfinite(self.factor)):
            raise ValueError(f"YarnRopeScaling.factor must be a finite number >= 1, got {self.factor!r}")
        if not (is_int(self.original_max_position) and self.original_max_position > 0):
            raise ValueError(
                f"YarnRopeScaling.original_max_position must be a positive int, got {self.original_max_position!r}"
            )
        if not (0.0 < self.beta_slow < self.beta_fast and math.isfinite(self.beta_fast)):
            raise ValueError(
                "YarnRopeScaling needs 0 < beta_slow < beta_fast (finite), got "
                f"beta_slow={self.beta_slow!r} and beta_fast={self.beta_fast!r}"
            )
        if not (self.mscale > 0.0 and math.isfinite(self.mscale)):
            raise ValueError(f"YarnRopeScaling.mscale must be a finite number > 0, got {self.mscale!r}")
        if not (self.mscale_all_dim >= 0.0 and math.isfinite(self.mscale_all_dim)):
            raise ValueError(
                f"YarnRopeScaling.mscale_all_dim must be a finite number >= 0, got {self.mscale_all_dim!r}"
            )

    def _magnitude(self, mscale: float) -> float:
        return 1.0 if self.factor <= 1.0 else 1.0 + 0.1 * mscale * math.log(self.factor)

    @property
    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: ``m(mscale) / m(mscale_all_dim)``."""
        return self._magnitude(self.mscale) / self._magnitude(self.mscale_all_dim)

    @property
    def softmax_factor(self) -> float:
        """What the softmax scale ``1/sqrt(d_n + d_r)`` is multiplied by: ``m(mscale_all_dim)**2``."""
        return self._magnitude(self.mscale_all_dim) ** 2

    def apply(self, freqs: torch.Tensor, theta: float) -> torch.Tensor:
        """The scaled frequencies (float64, shape of ``freqs``); ``freqs[i] = theta**(-2i/d_r)``."""
        dim = 2 * freqs.numel()

        def pair_turning(turns: float) -> float:
            # The (fractional) pair i whose wavelength 2*pi/f_i fits `turns` times in the original context.
            return dim * math.log(self.original_max_position / (2 * math.pi * turns)) / (2 * math.log(theta))

        low = max(math.floor(pair_turning(self.beta_fast)), 0)
        high = min(math.ceil(pair_turning(self.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        i = torch.arange(freqs.numel(), dtype=torch.float64)
        ramp = ((i - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep f_i; 1: f_i / factor
        return freqs * (1.0 - ramp) + freqs / self.factor * ramp


@dataclass(frozen=True)
class MLAConfig:
    """Shapes and constants of one multi-head latent attention block (pre-norm, decode).

    ``q_lora_rank=None``: the query is one projection (``q_proj``), as in DeepSeek-V2-Lite; an
    int: down-projection, RMSNorm, up-projection (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``).
    ``rms_eps`` is the input norm's; the latent norms use :data:`LATENT_RMS_EPS`.
    """

    hidden_size: int
    heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnRopeScaling | None = None
    rope_interleaved: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"MLAConfig.{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and not (is_int(self.q_lora_rank) and self.q_lora_rank > 0):
            raise ValueError(f"MLAConfig.q_lora_rank must be None or a positive int, got {self.q_lora_rank!r}")
        if self.hidden_size % 8:
            raise ValueError(f"MLAConfig.hidden_size must be a multiple of 8 (16-byte rows), got {self.hidden_size}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}"
            )
        check_rope_theta("MLAConfig.rope_theta", self.rope_theta)
        check_rms_eps("MLAConfig.rms_eps", self.rms_eps)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnRopeScaling):
            raise TypeError(f"MLAConfig.rope_scaling must be None or a YarnRopeScaling, got {self.rope_scaling!r}")
        if not isinstance(self.rope_interleaved, bool):
            raise TypeError(f"MLAConfig.rope_interleaved must be a bool, got {self.rope_interleaved!r}")

    @property
    def qk_head_dim(self) -> int:
        """Width of a head's query and (decompressed) key: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def q_rows(self) -> int:
        """Rows of ``q_proj`` / ``q_b_proj``: every head's ``[q_nope | q_pe]``."""
        return self.heads * self.qk_head_dim

    @property
    def kv_b_rows(self) -> int:
        """Rows of ``kv_b_proj``: every head's ``W_UK`` then ``W_UV^T``."""
        return self.heads * (self.qk_nope_head_dim + self.v_head_dim)

    @property
    def latent_width(self) -> int:
        """Elements of one cache row: ``kv_lora_rank + qk_rope_head_dim`` (576 in DeepSeek-V2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def attn_width(self) -> int:
        """Width of the attention output, the inner size of ``o_proj``."""
        return self.heads * self.v_head_dim

    @property
    def softmax_scale(self) -> float:
        """``1/sqrt(qk_head_dim)``, times YaRN's ``softmax_factor`` where the config scales RoPE."""
        scale = self.qk_head_dim**-0.5
        return scale if self.rope_scaling is None else scale * self.rope_scaling.softmax_factor

    @property
    def rope_attention_factor(self) -> float:
        """What cos and sin are multiplied by (YaRN's ``attention_factor``; 1 without scaling)."""
        return 1.0 if self.rope_scaling is None else self.rope_scaling.attention_factor

    def weight_bytes(self, itemsize: int = 2) -> int:
        """Bytes of every weight of the block (the layouts of the module docstring)."""
        h = self.hidden_size
        if self.q_lora_rank is None:
            query = self.q_rows * h
        else:
            query = self.q_lora_rank * (h + 1 + self.q_rows)
        return itemsize * (h + query + self.latent_width * h + self.kv_lora_rank
                           + self.kv_b_rows * self.kv_lora_rank + h * self.attn_width)

    def cache_row_bytes(self, itemsize: int = 2) -> int:
        """Bytes one token adds to the cache: one latent row, shared by every head."""
        return self.latent_width * itemsize

    def step_bytes(self, batch: int, kv_len, itemsize: int = 2) -> int:
        """Fewest bytes one decode step moves through device memory.

        ``kv_len``: the rows each sequence attends over (``positions[b] + 1``), one int for the whole
        batch or one per sequence. Weights once; per sequence ``kv_len - 1`` latent rows read and
        one written; ``hidden`` and ``residual`` read, ``out`` and the new residual written.
        """
        lengths = [kv_len] * batch if isinstance(kv_len, int) else list(kv_len)
        if len(lengths) != batch:
            raise ValueError(f"kv_len has {len(lengths)} lengths for a batch of {batch}")
        return (
            self.weight_bytes(itemsize)
            + self.cache_row_bytes(itemsize) * sum(lengths)
            + batch * 4 * self.hidden_size * itemsize
        )

    def step_flops(self, batch: int, kv_len) -> int:
        """Multiply-adds × 2 of one absorbed step (norms, RoPE and softmax ignored); ``kv_len`` as
        for :meth:`step_bytes`.

        Per sequence: the projections, the absorption (``q_nope @ W_UK``, ``o_lat @ W_UV``, per
        head); per head and cached row ``latent_width`` multiply-adds for the score and
        ``kv_lora_rank`` for the output.
        """
        lengths = [kv_len] * batch if isinstance(kv_len, int) else list(kv_len)
        h = self.hidden_size
        query = self.q_rows * h if self.q_lora_rank is None else self.q_lora_rank * (h + self.q_rows)
        projections = query + self.latent_width * h + h * self.attn_width
        absorption = self.heads * self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim)
        attention = self.heads * (self.latent_width + self.kv_lora_rank) * sum(lengths)
        return 2 * (batch * (projections + absorption) + attention)


#: DeepSeek-V2-Lite (its published config.json): 2048 hidden, 16 heads, latent 512 + 64, no query
#: LoRA, YaRN x40 over an original 4096 positions with mscale = mscale_all_dim = 0.707.
DEEPSEEK_V2_LITE = MLAConfig(
    hidden_size=2048, heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    q_lora_rank=None, rms_eps=1e-6, rope_theta=10000.0,
    rope_scaling=YarnRopeScaling(factor=40.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=0.707, mscale_all_dim=0.707),
)
MLA_PRESETS = {"deepseek-v2-lite": DEEPSEEK_V2_LITE}


def _check_mla_dtype(dtype) -> None:
    if dtype not in MLA_DTYPES:
        raise TypeError(f"dtype must be one of {MLA_DTYPES}, got {dtype}")


@dataclass
class MLAWeights:
    """The block's parameters; see the module docstring for shapes. With ``config.q_lora_rank``
    ``None`` only ``q_proj`` is set; otherwise only ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``."""

    input_layernorm: torch.Tensor
    kv_a_proj_with_mqa: torch.Tensor
    kv_a_layernorm: torch.Tensor
    kv_b_proj: torch.Tensor
    o_proj: torch.Tensor
    q_proj: torch.Tensor | None = None
    q_a_proj: torch.Tensor | None = None
    q_a_layernorm: torch.Tensor | None = None
    q_b_proj: torch.Tensor | None = None

    @classmethod
    def random(cls, config: MLAConfig, dtype=torch.float16, device="cpu", seed: int | None = None):
        """Fresh weights scaled like a trained model's (unit-variance outputs), never zeros.

        Norm gains are drawn around 1 (std 0.1); projections are normal with std ``1/sqrt(fan_in)``.
        ``dtype``: one of :data:`MLA_DTYPES`. A seed repeats the draw; without one it is fresh.
        """
        check_type("config", config, MLAConfig)
        _check_mla_dtype(dtype)
        check_device(device)
        gen = seeded_generator(seed)
        h = config.hidden_size

        def gain(n):
            return (1.0 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float32)).to(dtype).to(device)

        def projection(rows, fan_in):
            return (torch.randn(rows, fan_in, generator=gen, dtype=torch.float32) * fan_in**-0.5).to(dtype).to(device)

        query = {}
        if config.q_lora_rank is None:
            query["q_proj"] = projection(config.q_rows, h)
        else:
            query["q_a_proj"] = projection(config.q_lora_rank, h)
            query["q_a_layernorm"] = gain(config.q_lora_rank)
            query["q_b_proj"] = projection(config.q_rows, config.q_lora_rank)
        return cls(
            input_layernorm=gain(h),
            kv_a_proj_with_mqa=projection(config.latent_width, h),
            kv_a_layernorm=gain(config.kv_lora_rank),
            kv_b_proj=projection(config.kv_b_rows, config.kv_lora_rank),
            o_proj=projection(h, config.attn_width),
            **query,
        )

    def absorbed(self, config: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_UK, W_UV)``, the per-head up-projections of ``kv_b_proj``, contiguous, in its dtype.

        ``kv_b_proj`` viewed as ``[heads, d_n + d_v, r]``: its first ``d_n`` rows of head ``h`` are
        ``W_UK[h]`` ``[heads, d_n, r]`` (the key ``k_nope = W_UK[h] @ c``, so the score
        ``q_nope · k_nope = (q_nope @ W_UK[h]) · c``), the last ``d_v`` rows transposed are
        ``W_UV[h]`` ``[heads, r, d_v]`` (the value ``v = c @ W_UV[h]``, so the output
        ``Σ_t p_t v_t = (Σ_t p_t c_t) @ W_UV[h]``).
        """
        per_head = self.kv_b_proj.view(config.heads, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)
        w_uk, w_uv_t = per_head.split([config.qk_nope_head_dim, config.v_head_dim], dim=1)
        return w_uk.contiguous(), w_uv_t.transpose(1, 2).contiguous()


def check_mla_weights(config: MLAConfig, weights: MLAWeights) -> None:
    """``config`` is an MLAConfig; the weights match it (the query path its ``q_lora_rank`` names),
    share one dtype of :data:`MLA_DTYPES` and one device, and are contiguous."""
    check_type("config", config, MLAConfig)
    check_type("weights", weights, MLAWeights)
    if not isinstance(weights.kv_b_proj, torch.Tensor):
        raise TypeError(f"weights.kv_b_proj must be a torch.Tensor, got {type(weights.kv_b_proj).__name__}")
    dtype, device, h = weights.kv_b_proj.dtype, weights.kv_b_proj.device, config.hidden_size
    if dtype not in MLA_DTYPES:
        raise TypeError(f"weights.kv_b_proj has dtype {dtype}; allowed: {MLA_DTYPES}")
    lora = config.q_lora_rank
    shapes = {
        "input_layernorm": (h,),
        "kv_a_proj_with_mqa": (config.latent_width, h),
        "kv_a_layernorm": (config.kv_lora_rank,),
        "kv_b_proj": (config.kv_b_rows, config.kv_lora_rank),
        "o_proj": (h, config.attn_width),
        "q_proj": (config.q_rows, h) if lora is None else None,
        "q_a_proj": None if lora is None else (lora, h),
        "q_a_layernorm": None if lora is None else (lora,),
        "q_b_proj": None if lora is None else (config.q_rows, lora),
    }
    for name, shape in shapes.items():
        tensor = getattr(weights, name)
        if shape is None and tensor is not None:
            raise ValueError(f"weights.{name} is given but the config has q_lora_rank={lora}")
        if shape is not None and tensor is None:
            raise ValueError(f"weights.{name} is None but the config has q_lora_rank={lora}")
        if shape is not None:
            check_tensor(f"weights.{name}", tensor, shape, dtype, device, "the weights")


@dataclass
class LatentCache:
    """The latent rows of ``batch`` sequences, ``capacity`` positions each: ``latent``
    ``[batch, capacity, kv_lora_rank + qk_rope_head_dim]``, per row ``c`` then RoPE'd ``k_pe``."""

    latent: torch.Tensor

    @classmethod
    def empty(cls, config: MLAConfig, batch: int, capacity: int, dtype=torch.float16, device="cpu"):
        """A cache filled with NaN: a step that reads a row nothing wrote returns NaN."""
        check_cache_request(config, MLAConfig, batch, capacity, dtype, device, _check_mla_dtype)
        return cls(torch.full((batch, capacity, config.latent_width), float("nan"), dtype=dtype, device=device))

    @classmethod
    def random(cls, config: MLAConfig, batch: int, capacity: int, dtype=torch.float16, device="cpu",
               seed: int | None = None):
        """A cache of standard-normal rows, as if ``capacity`` tokens had been seen: a normalized
        latent has unit RMS, and ``k_pe`` (a projection of a normalized input) unit variance."""
        check_cache_request(config, MLAConfig, batch, capacity, dtype, device, _check_mla_dtype)
        gen = seeded_generator(seed, device)
        shape = (batch, capacity, config.latent_width)
        return cls(torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype))

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    @property
    def capacity(self) -> int:
        return self.latent.shape[1]

    def clone(self) -> LatentCache:
        return LatentCache(self.latent.clone())


def check_mla_activations(config: MLAConfig, weights: MLAWeights, hidden, residual, cache: LatentCache) -> None:
    """``hidden``, ``residual`` ``[batch, hidden_size]`` (batch 1..8) and ``cache`` of one step, in
    the weights' dtype and on their device (the weights already checked)."""
    dtype, device = weights.kv_b_proj.dtype, weights.kv_b_proj.device
    batch = check_hidden_residual(config.hidden_size, hidden, residual, dtype, device)
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache must be a LatentCache, got {type(cache).__name__}")
    if cache.latent.dim() != 3:
        raise ValueError(f"cache.latent has shape {tuple(cache.latent.shape)}; expected (batch, capacity, "
                         f"{config.latent_width})")
    check_tensor("cache.latent", cache.latent, (batch, cache.latent.shape[1], config.latent_width), dtype, device,
                 "the weights")


def mla_rope_frequencies(config: MLAConfig) -> torch.Tensor:
    """The RoPE frequency of each pair ``i < qk_rope_head_dim/2``: ``theta**(-2i/d_r)``, YaRN-scaled
    where the config says so; float64."""
    i = torch.arange(config.qk_rope_head_dim // 2, dtype=torch.float64)
    freqs = config.rope_theta ** (-2.0 * i / config.qk_rope_head_dim)
    return freqs if config.rope_scaling is None else config.rope_scaling.apply(freqs, config.rope_theta)


def mla_rope_table(config: MLAConfig, capacity: int, device="cpu") -> torch.Tensor:
    """``attention_factor`` × cos and sin of every position's RoPE angles: ``[capacity, 2, d_r/2]``
    float32, computed in float64 and rounded once."""
    check_type("config", config, MLAConfig)
    check_size("capacity", capacity)
    angles = torch.arange(capacity, dtype=torch.float64)[:, None] * mla_rope_frequencies(config)
    table = torch.stack([angles.cos(), angles.sin()], dim=1) * config.rope_attention_factor
    return table.to(torch.float32).contiguous().to(device)
