"""Shapes, presets, weights and the KV cache of one attention block at decode time.

Layouts (row-major, all contiguous, one dtype for everything: float16 or bfloat16):

=================  =====================================  ==========================================
name               shape                                  meaning
=================  =====================================  ==========================================
``hidden``         ``[batch, hidden_size]``               output of the previous layer
``residual``       ``[batch, hidden_size]``               residual stream before this block
``norm``           ``[hidden_size]``                      RMSNorm gain
``qkv``            ``[(heads + 2 * kv_heads) * head_dim,  rows: all query heads, then all key
                   hidden_size]``                         heads, then all value heads
``qkv_bias``       ``[(heads + 2 * kv_heads) * head_dim]`` added to the projection (Qwen2-style
                                                          models); ``None`` without one
``o``              ``[hidden_size, heads * head_dim]``    output projection
``k``, ``v``       ``[batch, kv_heads, capacity,          the cache; a step of sequence ``b``
                   head_dim]``                            reads rows ``0 .. positions[b] - 1`` of
                                                          each head and writes row ``positions[b]``
=================  =====================================  ==========================================

Presets: :data:`LLAMA2_7B`, :data:`LLAMA3_8B`, :data:`LLAMA3_2_1B` (RoPE with Llama 3's frequency
scaling), :data:`QWEN2_5_7B` (QKV bias), by name in :data:`PRESETS`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import HopperRequired
from ..gpu import hopper_problem

#: Activation, weight and cache dtypes the fused layer accepts.
DTYPES = (torch.float16, torch.bfloat16)
#: Head sizes the fused kernel is built for.
HEAD_DIMS = (64, 128)
#: RoPE variants: "neox" rotates the pairs (i, i + head_dim/2); "gptj" the pairs (2i, 2i + 1).
ROPE_STYLES = ("neox", "gptj")
#: Largest batch one decode step takes.
MAX_BATCH = 8
#: Most cache positions a sequence can have: the kernels read positions as int32.
MAX_POSITIONS = 2**31 - 1


def is_int(value) -> bool:
    """An int, not a bool (``True`` is an ``int`` to Python, never a count or a position here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_batch(value) -> bool:
    """The sequences of one step: an int from 1 to :data:`MAX_BATCH`."""
    return is_int(value) and 1 <= value <= MAX_BATCH


def check_batch(batch) -> None:
    """``batch``: the sequences of one step, an int from 1 to :data:`MAX_BATCH`."""
    if not is_batch(batch):
        raise ValueError(f"batch must be an int in 1..{MAX_BATCH}, got {batch!r}")


def is_number_in(value, minimum: float, maximum: float) -> bool:
    """An int or a float (not a bool) in ``minimum .. maximum``: a setting's range check."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and minimum <= value <= maximum


def check_number(name: str, value) -> None:
    """A real number (an int or a float, not a bool), so that the range checks can compare it."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def check_rope_theta(name: str, value) -> None:
    """A RoPE base: a number (TypeError otherwise), finite and > 1 (ValueError otherwise)."""
    check_number(name, value)
    if not (value > 1.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 1, got {value!r}")


def check_rms_eps(name: str, value) -> None:
    """An RMSNorm's epsilon: a number (TypeError otherwise) in (0, 1) (ValueError otherwise)."""
    check_number(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1+'s RoPE frequency scaling (``rope_type: "llama3"`` in a checkpoint's config).

    Wavelengths ``2*pi/f`` longer than ``original_max_position / low_freq_factor`` are stretched
    ``factor`` times, those shorter than ``original_max_position / high_freq_factor`` kept, and the
    band between interpolated linearly in ``original_max_position / wavelength``.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            check_number(f"Llama3RopeScaling.{name}", getattr(self, name))
        if not (self.factor >= 1.0 and math.isfinite(self.factor)):
            raise ValueError(f"Llama3RopeScaling.factor must be a finite number >= 1, got {self.factor!r}")
        if not (0.0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError(
                "Llama3RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor!r} and {self.high_freq_factor!r}"
            )
        if not (is_int(self.original_max_position) and self.original_max_position > 0):
            raise ValueError(
                f"Llama3RopeScaling.original_max_position must be a positive int, got {self.original_max_position!r}"
            )

    def apply(self, freqs: torch.Tensor) -> torch.Tensor:
        """The scaled frequencies (float64, same shape as ``freqs``)."""
        ratio = self.original_max_position * freqs / (2 * math.pi)  # original context / wavelength
        smooth = ((ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)).clamp(0.0, 1.0)
        return (1.0 - smooth) * freqs / self.factor + smooth * freqs


@dataclass(frozen=True)
class AttentionConfig:
    """Shapes and constants of one attention block (pre-norm, RoPE, grouped-query attention).

    ``heads`` query heads share ``kv_heads`` key/value heads in groups of ``heads // kv_heads``
    (``kv_heads == heads`` is multi-head attention).
    """

    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_style: str = "neox"
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    rope_scaling: Llama3RopeScaling | None = None

    def __post_init__(self):
        for name in ("hidden_size", "heads", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"AttentionConfig.{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"AttentionConfig.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"AttentionConfig.head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if self.hidden_size % 8:
            raise ValueError(
                f"AttentionConfig.hidden_size must be a multiple of 8 (16-byte rows), got {self.hidden_size}"
            )
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"AttentionConfig.rope_style must be one of {ROPE_STYLES}, got {self.rope_style!r}")
        check_rope_theta("AttentionConfig.rope_theta", self.rope_theta)
        check_rms_eps("AttentionConfig.rms_eps", self.rms_eps)
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"AttentionConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ValueError(
                f"AttentionConfig.rope_scaling must be None or a Llama3RopeScaling, got {self.rope_scaling!r}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def attn_width(self) -> int:
        """Width of the attention output, the inner size of the output projection."""
        return self.heads * self.head_dim

    def weight_bytes(self, itemsize: int = 2) -> int:
        """Bytes of the RMSNorm gain, the QKV projection (and its bias) and the output projection."""
        bias = self.qkv_rows if self.qkv_bias else 0
        return itemsize * (self.hidden_size + self.qkv_rows * self.hidden_size + bias
                           + self.hidden_size * self.attn_width)

    def step_bytes(self, batch: int, kv_len, itemsize: int = 2) -> int:
        """Fewest bytes one decode step moves through device memory.

        ``kv_len``: the keys each sequence attends over (``positions[b] + 1``), one int for the
        whole batch or one per sequence. Weights once; per sequence and KV head ``kv_len - 1``
        cached rows of K and V read and one new row of each written; ``hidden`` and ``residual``
        read, ``out`` and the new residual written.
        """
        lengths = [kv_len] * batch if isinstance(kv_len, int) else list(kv_len)
        if len(lengths) != batch:
            raise ValueError(f"kv_len has {len(lengths)} lengths for a batch of {batch}")
        cache_row = self.kv_heads * self.head_dim * itemsize
        return (
            self.weight_bytes(itemsize)
            + 2 * cache_row * sum(lengths)
            + batch * 4 * self.hidden_size * itemsize
        )

    def step_flops(self, batch: int, kv_len) -> int:
        """Multiply-adds × 2 of one step: the two projections and attention (norm and RoPE ignored).

        ``kv_len`` as for :meth:`step_bytes`.
        """
        lengths = [kv_len] * batch if isinstance(kv_len, int) else list(kv_len)
        projections = 2 * batch * self.hidden_size * (self.qkv_rows + self.attn_width)
        attention = 2 * self.heads * sum(lengths) * self.head_dim * 2
        return projections + attention


#: Llama-2-7B: 4096 hidden, 32 heads of 128, multi-head attention.
LLAMA2_7B = AttentionConfig(hidden_size=4096, heads=32, kv_heads=32, head_dim=128, rope_theta=10000.0)
#: Llama-3-8B: 4096 hidden, 32 query heads sharing 8 key/value heads of 128.
LLAMA3_8B = AttentionConfig(hidden_size=4096, heads=32, kv_heads=8, head_dim=128, rope_theta=500000.0)
#: Llama-3.2-1B: 2048 hidden, 32 query heads sharing 8 key/value heads of 64, Llama 3 RoPE scaling.
LLAMA3_2_1B = AttentionConfig(
    hidden_size=2048, heads=32, kv_heads=8, head_dim=64, rope_theta=500000.0,
    rope_scaling=Llama3RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192),
)
#: Qwen2.5-7B: 3584 hidden, 28 query heads sharing 4 key/value heads of 128, QKV bias.
QWEN2_5_7B = AttentionConfig(hidden_size=3584, heads=28, kv_heads=4, head_dim=128, rope_theta=1000000.0,
                             rms_eps=1e-6, qkv_bias=True)
PRESETS = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "llama3.2-1b": LLAMA3_2_1B, "qwen2.5-7b": QWEN2_5_7B}


def check_dtype(dtype) -> None:
    """``dtype`` is one the fused layers run: torch.float16 or torch.bfloat16 (TypeError otherwise)."""
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")


def check_device(device) -> None:
    """``device`` a torch device or its name; a CUDA device needs a usable Hopper GPU
    (:class:`clusterlab.HopperRequired` without one)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):  # torch's words for a name it cannot parse, or not a name at all
        raise ValueError(f"device must be a torch.device or its name ('cpu', 'cuda', 'cuda:1'), "
                         f"got {device!r}") from None
    if kind == "cuda":
        problem = hopper_problem()
        if problem is not None:
            raise HopperRequired(f"device {device!r} needs a Hopper GPU: {problem}")


def check_type(name: str, value, cls: type) -> None:
    """``value`` (the parameter ``name``) is a ``cls``: TypeError naming both otherwise."""
    if not isinstance(value, cls):
        word = cls.__name__
        vowel_sound = "AEFHILMNORSX" if word[:2].isupper() else "AEIOU"  # an MLPConfig, an AttentionConfig
        article = "an" if word[0] in vowel_sound else "a"
        raise TypeError(f"{name} must be {article} {word}, got {type(value).__name__}")


def check_size(name: str, value) -> None:
    """``value`` (the parameter ``name``) is a positive int (ValueError otherwise)."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_seed(seed) -> None:
    """``seed``: None (from the OS) or an int a torch generator takes, -2**63 .. 2**64 - 1."""
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed must be None or an int, got {seed!r}")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an int in -2**63 .. 2**64 - 1 (a generator's 64 bits), got {seed}")


def seeded_generator(seed: int | None, device="cpu") -> torch.Generator:
    """A generator of its own on ``device``: seeded with ``seed``, else from the OS (torch's global one untouched)."""
    check_seed(seed)
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass
class AttentionWeights:
    """The block's parameters; see the module docstring for shapes (``qkv_bias`` is ``None``
    unless the config has ``qkv_bias``)."""

    norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    qkv_bias: torch.Tensor | None = None

    @classmethod
    def random(cls, config: AttentionConfig, dtype=torch.float16, device="cpu", seed: int | None = None):
        """Fresh weights scaled like a trained model's (unit-variance outputs), never zeros.

        The norm gain is drawn around 1; projections are normal with std ``1/sqrt(fan_in)``; a
        QKV bias (where the config has one) is normal with std 0.5, about a trained one's size.
        """
        check_type("config", config, AttentionConfig)
        check_dtype(dtype)
        check_device(device)
        gen = seeded_generator(seed)
        h = config.hidden_size

        def draw(*shape, std):
            return (torch.randn(*shape, generator=gen, dtype=torch.float32) * std).to(dtype).to(device)

        return cls(
            norm=(1.0 + 0.1 * torch.randn(h, generator=gen)).to(dtype).to(device),
            qkv=draw(config.qkv_rows, h, std=h**-0.5),
            o=draw(h, config.attn_width, std=config.attn_width**-0.5),
            qkv_bias=draw(config.qkv_rows, std=0.5) if config.qkv_bias else None,
        )

    def to(self, device) -> AttentionWeights:
        bias = None if self.qkv_bias is None else self.qkv_bias.to(device)
        return AttentionWeights(self.norm.to(device), self.qkv.to(device), self.o.to(device), bias)


def check_cache_request(config, config_type: type, batch, capacity, dtype, device, dtype_check=check_dtype) -> None:
    """The arguments of a cache's ``empty`` / ``random``: ``config`` a ``config_type``, ``batch`` as a step
    takes it (:func:`check_batch`), ``capacity`` an int from 1 to :data:`MAX_POSITIONS`, ``dtype`` one
    ``dtype_check`` takes, ``device`` usable; checked before anything is allocated."""
    check_type("config", config, config_type)
    check_batch(batch)
    if not (is_int(capacity) and 1 <= capacity <= MAX_POSITIONS):
        raise ValueError(f"capacity must be an int in 1..{MAX_POSITIONS} (the kernels read positions as int32), "
                         f"got {capacity!r}")
    dtype_check(dtype)
    check_device(device)


@dataclass
class KVCache:
    """Keys and values of ``batch`` sequences, ``capacity`` positions each; see the module docstring."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, config: AttentionConfig, batch: int, capacity: int, dtype=torch.float16, device="cpu"):
        """A cache filled with NaN: a step that reads a row nothing wrote returns NaN."""
        check_cache_request(config, AttentionConfig, batch, capacity, dtype, device)
        shape = (batch, config.kv_heads, capacity, config.head_dim)
        return cls(
            torch.full(shape, float("nan"), dtype=dtype, device=device),
            torch.full(shape, float("nan"), dtype=dtype, device=device),
        )

    @classmethod
    def random(cls, config: AttentionConfig, batch: int, capacity: int, dtype=torch.float16, device="cpu",
               seed: int | None = None):
        """A cache of standard-normal keys and values, as if ``capacity`` tokens had been seen."""
        check_cache_request(config, AttentionConfig, batch, capacity, dtype, device)
        gen = seeded_generator(seed, device)
        shape = (batch, config.kv_heads, capacity, config.head_dim)
        return cls(
            torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype),
            torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype),
        )

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def clone(self) -> KVCache:
        return KVCache(self.k.clone(), self.v.clone())


def rope_frequencies(config: AttentionConfig) -> torch.Tensor:
    """The RoPE frequency of each pair ``i < head_dim/2``: ``theta**(-2i/head_dim)``, scaled by
    ``config.rope_scaling`` where it is set; float64."""
    i = torch.arange(config.head_dim // 2, dtype=torch.float64)
    freqs = config.rope_theta ** (-2.0 * i / config.head_dim)
    return freqs if config.rope_scaling is None else config.rope_scaling.apply(freqs)


def rope_angles(config: AttentionConfig, position: int) -> torch.Tensor:
    """``position`` times every pair's frequency (:func:`rope_frequencies`), float64 ``[head_dim/2]``."""
    return position * rope_frequencies(config)


def rope_table(config: AttentionConfig, capacity: int, device="cpu") -> torch.Tensor:
    """cos and sin of every position's RoPE angles: ``[capacity, 2, head_dim/2]`` float32.

    Computed in float64 and rounded once, so no large angle is ever formed in float32.
    """
    check_type("config", config, AttentionConfig)
    check_size("capacity", capacity)
    angles = torch.arange(capacity, dtype=torch.float64)[:, None] * rope_frequencies(config)
    return torch.stack([angles.cos(), angles.sin()], dim=1).to(torch.float32).contiguous().to(device)
