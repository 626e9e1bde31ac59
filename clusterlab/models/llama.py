"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) whose attention blocks are
:class:`~clusterlab.fused.DecodeAttention`.

Read a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``), prefill prompts with plain PyTorch, then decode token by token
with one fused attention layer per transformer layer::

    model = LlamaModel.from_pretrained("path/to/llama", dtype=torch.bfloat16)
    new_ids = model.generate([[1, 15043, 29892], [1, 450]], max_new_tokens=8)

Dataflow of one decode step (``B`` sequences, ``H`` hidden size, ``V`` vocabulary; every
activation in the model dtype, float16 or bfloat16)::

    x        = embed[tokens]                                   [B, H]
    hidden, residual = x, zeros                                layer 0
    for each layer:
        out, h = attention(hidden, residual, cache, positions)  fused: h = hidden + residual,
                                                               RMSNorm, QKV(+bias), RoPE, cache row
                                                               positions[b] appended, attention, O
        out      = out + o_bias                                (Llama with attention_bias only)
        hidden, residual = mlp(out, h)                         fused: h2 = out + h, RMSNorm,
                                                               gate/up, SiLU * up, down
                    i.e. h2 = out + h; n = RMSNorm(h2) * post_attention_layernorm;
                         hidden = down(silu(gate(n)) * up(n)); residual = h2   [B, H]
    logits   = lm_head(RMSNorm(hidden + residual) * norm)      [B, V] float32

Shapes of the weights (:class:`LayerWeights`, :class:`ModelWeights`): ``embed`` ``[V, H]``;
per layer the attention's :class:`~clusterlab.fused.AttentionWeights` (``qkv`` rows: all query
heads, then key heads, then value heads, i.e. ``q_proj``, ``k_proj``, ``v_proj`` stacked),
``post_norm`` ``[H]``, ``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``; ``norm`` ``[H]``,
``lm_head`` ``[V, H]`` (the embeddings when tied). The KV cache of layer ``l`` is a
:class:`~clusterlab.fused.KVCache` ``[B, kv_heads, capacity, head_dim]`` holding rotated keys.

Precision, as transformers' Llama computes it: every matmul, add and the SiLU run in the model
dtype (PyTorch accumulates matmuls in float32); RMSNorm normalizes in float32, casts back and then
multiplies by its gain in the model dtype. Prefill's attention (RoPE, softmax) runs in float32 on
the rounded q/k/v, like the fused kernel. ``lm_head`` runs in the model dtype too, and its logits
are then widened to float32 (each exactly a model-dtype value, so ties are possible: greedy takes
the lowest id, as transformers does).

Where it runs: on CPU tensors the fused attention runs on the DSMEM simulator
(:mod:`clusterlab.fused.simulated`), slow and meant for tiny models and checks; on a Hopper GPU
the cluster kernel, and :meth:`LlamaModel.generate` replays one CUDA graph per token
(:mod:`clusterlab.models.decode`). The MLP block of a decode step is
:class:`~clusterlab.fused.DecodeMLP` (one cluster kernel; the simulator on the CPU) by default.
``attention="unfused"`` swaps in the attention block as separate PyTorch calls
(:class:`~clusterlab.fused.UnfusedAttention`) and ``mlp="unfused"`` the MLP block (the
:func:`mlp` chain); both together are the baseline of ``clusterlab bench decode``. Prefill always
runs both blocks in PyTorch. :func:`random` builds the models of :data:`MODEL_PRESETS` without a checkpoint.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fused.config import (
    LLAMA2_7B,
    LLAMA3_2_1B,
    LLAMA3_8B,
    MAX_BATCH,
    MAX_POSITIONS,
    QWEN2_5_7B,
    AttentionConfig,
    AttentionWeights,
    KVCache,
    Llama3RopeScaling,
    check_batch,
    check_device,
    is_int,
    rope_table,
    seeded_generator,
)
from ..fused.layer import DecodeAttention
from ..fused.mlp import DecodeMLP, MLPConfig, MLPWeights, mlp_shape
from ..fused.reference import UnfusedAttention, apply_rope
from ..fused.validate import BACKENDS, check_positions, check_range, resolve_backend, sequence_positions
from .decode import Decoder, check_sampling, token_ids
from .final_norm import final_norm

#: ``model_type`` values this module reads.
MODEL_TYPES = ("llama", "mistral", "qwen2")
#: RoPE variants (``rope_type``) the fused layer implements.
ROPE_TYPES = ("default", "llama3")
#: How a model's decode steps compute attention: the cluster kernel (the simulator on a CPU), or
#: the unfused PyTorch block.
ATTENTIONS = ("fused", "unfused")
#: How a model's decode steps compute the MLP block: the cluster kernel (the simulator on a CPU),
#: or the chain of PyTorch calls of :func:`mlp`.
MLPS = ("fused", "unfused")
#: Largest batch whose decode steps run the fused MLP kernel under ``mlp="fused"``, by the MLP's shape
#: ``(hidden_size, intermediate_size)``; larger batches run the PyTorch chain, and shapes not listed
#: run the kernel for one sequence (see :func:`fused_mlp_max_batch`). From the H200 measurements of
#: batches 2, 4 and 8 (fp16, µs a layer against the chain): Llama-3-8B's and Llama-3.2-1B's shapes in
#: blocks of 16 warps won at every batch (1.06-1.17x and 1.44-1.66x,
#: ``benchmarks/results/mlp_h200_v27_pairs16.json``), Llama-2-7B's at every batch (1.13-1.29x) and
#: Qwen2.5-7B's up to four sequences (1.11-1.15x; 0.96x at 8) with the gate/up rows in parts of up to
#: 8 spans (``mlp_h200_v27_wide.json``).
FUSED_MLP_MAX_BATCH = {(2048, 8192): 8, (4096, 11008): 8, (3584, 18944): 4, (4096, 14336): 8}
def fused_mlp_max_batch(config: ModelConfig) -> int:
    """Most sequences whose decode steps run the fused MLP kernel (:data:`FUSED_MLP_MAX_BATCH`; 1 for
    a shape it does not list: one sequence is where the kernel's matrix-vector steps were measured
    at or ahead of the chain on every shape)."""
    return FUSED_MLP_MAX_BATCH.get((config.hidden_size, config.intermediate_size), 1)


#: Names of the dtypes a model runs in.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: The dtypes a checkpoint's tensors may have (cast to the model's dtype when read).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype(value, what: str) -> torch.dtype:
    """``value`` (a torch dtype or its name, ``"torch.float16"`` too) as float16 or bfloat16, else ValueError."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        name = str(value).removeprefix("torch.")
    else:
        name = str(value).removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"{what} must be float16 or bfloat16, got {name!r}")


def checked_directory(directory) -> Path:
    """``directory`` as a ``Path``: TypeError unless it is a path (a str or os.PathLike), ValueError unless it is a
    directory."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (a str or os.PathLike), got {directory!r}")
    if not Path(directory).is_dir():
        raise ValueError(f"{str(directory)!r} is not a directory")
    return Path(directory)


@dataclass(frozen=True)
class ModelConfig:
    """The shapes and constants of a Llama-family checkpoint, from its ``config.json``.

    ``dtype`` is the checkpoint's own (``dtype`` / ``torch_dtype``, None when it names none);
    ``model_type`` one of :data:`MODEL_TYPES` (Mistral's only without a sliding window: its layers are
    Llama's); ``attention_bias`` means a bias on q/k/v (Qwen2 always; Llama with ``attention_bias``) and
    ``o_bias`` one on the output projection too (Llama's ``attention_bias`` only);
    ``max_position_embeddings`` the positions the model was trained for (None where the config names
    none): :meth:`LlamaModel.generate` warns past it.
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    dtype: str | None = None
    max_position_embeddings: int | None = None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        """Read a parsed ``config.json``; ValueError naming what is missing or unsupported. Shapes the fused
        attention or MLP cannot run are refused too, even where ``attention="unfused"`` / ``mlp="unfused"``
        could: the fused blocks are the model's point, and the unfused ones its baseline."""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")

        def need(key):
            if key not in raw or raw[key] is None:
                raise ValueError(f"{source}: {model_type} config has no {key!r}")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' two names of x * sigmoid(x)
            raise ValueError(f"{source}: hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")
        rotary = raw.get("partial_rotary_factor")
        if rotary is None and isinstance(raw.get("rope_parameters"), dict):
            rotary = raw["rope_parameters"].get("partial_rotary_factor")
        if rotary is not None and (isinstance(rotary, bool) or rotary != 1):
            raise ValueError(f"{source}: partial_rotary_factor {rotary!r} is not supported; RoPE here rotates every "
                             "dim of a head (1.0)")
        if raw.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias is not supported (the MLP here has no biases)")
        if raw.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window is not supported (every layer attends to all tokens)")
        if model_type == "mistral" and raw.get("sliding_window") is not None:
            raise ValueError(f"{source}: sliding_window {raw['sliding_window']!r} is not supported (every layer "
                             "attends to all tokens); a Mistral checkpoint without one (sliding_window null) is")
        quantization = raw.get("quantization_config")
        if quantization:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
            raise ValueError(f"{source}: a quantized checkpoint (quantization_config, {method!r}) is not supported; "
                             "give the unquantized float16/bfloat16/float32 one")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"{source}: pretraining_tp {raw['pretraining_tp']!r} is not supported; only 1")

        def count(key, value=None):
            value = need(key) if value is None else value
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{source}: {key} must be a positive int, got {value!r}")
            return value

        def given(key, default):
            """``raw[key]``, or ``default`` where it is absent or null (a 0 is a value, and refused as one)."""
            return default if raw.get(key) is None else raw[key]

        def flag(key):
            value = given(key, False)
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
            return value

        hidden, heads = count("hidden_size"), count("num_attention_heads")
        head_dim = count("head_dim", given("head_dim", hidden // heads))
        theta, scaling = _rope(raw, source)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = flag("attention_bias")
        dtype = raw.get("dtype") or raw.get("torch_dtype")
        config = cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=count("intermediate_size"),
            num_hidden_layers=count("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=count("num_key_value_heads", given("num_key_value_heads", heads)),
            head_dim=head_dim,
            rms_norm_eps=_positive(source, "rms_norm_eps", raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_positive(source, "rope_theta", theta),
            vocab_size=count("vocab_size"),
            tie_word_embeddings=flag("tie_word_embeddings"),
            attention_bias=qkv_bias,
            o_bias=o_bias,
            rope_scaling=scaling,
            dtype=None if dtype is None else str(dtype).removeprefix("torch."),
            max_position_embeddings=None if raw.get("max_position_embeddings") is None
            else count("max_position_embeddings"),
        )
        for block, shapes in (("attention", config.attention), ("MLP", config.mlp)):
            try:
                shapes()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{source}: the fused {block} cannot run this model: {exc}") from None
        return config

    @classmethod
    def from_pretrained(cls, directory) -> ModelConfig:
        """Read ``directory/config.json``."""
        path = checked_directory(directory) / "config.json"
        if not path.is_file():
            raise ValueError(f"{str(directory)!r} has no config.json: not a Hugging Face model directory")
        return cls.from_dict(_json_object(path), str(path))

    def attention(self) -> AttentionConfig:
        """The fused layer's :class:`~clusterlab.fused.AttentionConfig` (NeoX RoPE, as these models rotate halves)."""
        return AttentionConfig(
            hidden_size=self.hidden_size,
            heads=self.num_attention_heads,
            kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=float(self.rope_theta),
            rope_style="neox",
            rms_eps=float(self.rms_norm_eps),
            qkv_bias=self.attention_bias,
            rope_scaling=self.rope_scaling,
        )

    def mlp(self) -> MLPConfig:
        """The fused MLP's :class:`~clusterlab.fused.MLPConfig`."""
        return MLPConfig(self.hidden_size, self.intermediate_size, float(self.rms_norm_eps))

    def resolve_dtype(self, dtype=None) -> torch.dtype:
        """``dtype`` when given (float16 / bfloat16), else the checkpoint's own if it is one of
        them, else bfloat16."""
        if dtype is not None:
            return _dtype(dtype, "dtype")
        if self.dtype in DTYPES:
            return DTYPES[self.dtype]
        return torch.bfloat16


def _json_object(path: Path) -> dict:
    """``path``'s JSON object; a ValueError naming the file if it is not valid JSON or not an object."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def _positive(source: str, key: str, value):
    """``value`` of ``config.json``'s ``key``, a finite number > 0 (ValueError naming both otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{source}: {key} must be a positive number, got {value!r}")
    return value


def _rope(raw: dict, source: str) -> tuple[float, Llama3RopeScaling | None]:
    """``(rope_theta, scaling)`` from transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = raw.get("rope_parameters")
    if params is None:
        scaling = raw.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"{source}: rope_scaling must be an object, got {scaling!r}")
        params = dict(scaling or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise ValueError(f"{source}: rope_parameters must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if params.get(key) is None:
            raise ValueError(f"{source}: llama3 RoPE scaling has no {key!r}")
    original = params["original_max_position_embeddings"]
    if not (is_int(original) and original >= 1):
        raise ValueError(f"{source}: llama3 RoPE scaling's original_max_position_embeddings must be a positive int, "
                         f"got {original!r}")
    factors = {key: float(_positive(source, f"llama3 RoPE scaling's {key}", params[key]))
               for key in ("factor", "low_freq_factor", "high_freq_factor")}
    try:
        return theta, Llama3RopeScaling(**factors, original_max_position=original)
    except ValueError as exc:  # the factors' ranges
        raise ValueError(f"{source}: llama3 RoPE scaling: {exc}") from None


def _preset(model_type: str, attention: AttentionConfig, intermediate: int, layers: int, vocab: int,
            tied: bool = False) -> ModelConfig:
    return ModelConfig(
        model_type=model_type, hidden_size=attention.hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=attention.heads, num_key_value_heads=attention.kv_heads,
        head_dim=attention.head_dim, rms_norm_eps=attention.rms_eps, rope_theta=attention.rope_theta,
        vocab_size=vocab, tie_word_embeddings=tied, attention_bias=attention.qkv_bias,
        rope_scaling=attention.rope_scaling,
    )


#: Whole models by name, with the shapes of their published ``config.json`` (the attention of
#: each is the fused preset of the same name): for :func:`random`, and the benchmarks.
MODEL_PRESETS = {
    "llama2-7b": _preset("llama", LLAMA2_7B, intermediate=11008, layers=32, vocab=32000),
    "llama3-8b": _preset("llama", LLAMA3_8B, intermediate=14336, layers=32, vocab=128256),
    "llama3.2-1b": _preset("llama", LLAMA3_2_1B, intermediate=8192, layers=16, vocab=128256, tied=True),
    "qwen2.5-7b": _preset("qwen2", QWEN2_5_7B, intermediate=18944, layers=28, vocab=152064),
}


@dataclass
class LayerWeights:
    """One transformer layer: the fused attention's weights, an output-projection bias (Llama
    ``attention_bias`` only), the post-attention RMSNorm gain and the SwiGLU MLP."""

    attention: AttentionWeights
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    o_bias: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


class _Checkpoint:
    """Tensors by name from ``model.safetensors`` or, where there is none, the shards
    ``model.safetensors.index.json`` lists (transformers' order: a directory saved whole over a sharded
    save keeps the old index beside the new file)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
        if single.is_file():
            files = None
        elif index.is_file():
            weight_map = _json_object(index).get("weight_map")
            if not (isinstance(weight_map, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v != ".."
                    for k, v in weight_map.items())):
                raise ValueError(f"{index}: its weight_map must map tensor names to the names of shard files "
                                 f"beside it, got {reprlib.repr(weight_map)}")
            files = {name: directory / shard for name, shard in weight_map.items()}
        else:
            raise ValueError(
                f"{str(directory)!r} has no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are read)"
            )
        self._open, self._files, self._single = safe_open, files, single
        self._handles: dict = {}
        if files is None:
            self.names = set(self._handle(single).keys())
        else:
            self.names = set(files)
            for path in set(files.values()):
                if not path.is_file():
                    raise ValueError(f"{index} lists shard {path.name!r}, which is missing")

    def _handle(self, path: Path):
        if path not in self._handles:
            from safetensors import SafetensorError

            try:
                self._handles[path] = self._open(str(path), framework="pt", device="cpu")
            except SafetensorError as exc:
                raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        return self._handles[path]

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        if name not in self.names:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        path = self._single if self._files is None else self._files[name]
        from safetensors import SafetensorError

        try:
            tensor = self._handle(path).get_tensor(name)
        except SafetensorError as exc:
            where = "" if self._files is None else " (model.safetensors.index.json places it there)"
            raise ValueError(f"{path}: tensor {name!r} cannot be read{where}: {exc}") from None
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; config.json implies {shape}")
        if tensor.dtype not in WEIGHT_DTYPES:  # quantized codes cast to floats would be garbage
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}; the weights must be float16, bfloat16, "
                             "float32 or float64 (a quantized checkpoint is not supported)")
        return tensor


def load_weights(directory, config: ModelConfig, dtype=torch.bfloat16, device="cpu") -> ModelWeights:
    """Read every tensor of ``config``'s model from ``directory``'s safetensors, cast to ``dtype`` on ``device``."""
    dtype = _dtype(dtype, "dtype")
    ckpt = _Checkpoint(Path(directory))
    c, a = config, config.attention()
    h, inner, d = c.hidden_size, c.intermediate_size, c.head_dim

    def get(name, *shape):
        return ckpt.get(name, shape).to(device=device, dtype=dtype).contiguous()

    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        rows = {"q": a.heads * d, "k": a.kv_heads * d, "v": a.kv_heads * d}
        qkv = torch.cat([get(f"{p}self_attn.{x}_proj.weight", n, h) for x, n in rows.items()])
        bias = None
        if c.attention_bias:
            bias = torch.cat([get(f"{p}self_attn.{x}_proj.bias", n) for x, n in rows.items()])
        layers.append(LayerWeights(
            attention=AttentionWeights(norm=get(f"{p}input_layernorm.weight", h), qkv=qkv,
                                       o=get(f"{p}self_attn.o_proj.weight", h, a.attn_width), qkv_bias=bias),
            post_norm=get(f"{p}post_attention_layernorm.weight", h),
            gate=get(f"{p}mlp.gate_proj.weight", inner, h),
            up=get(f"{p}mlp.up_proj.weight", inner, h),
            down=get(f"{p}mlp.down_proj.weight", h, inner),
            o_bias=get(f"{p}self_attn.o_proj.bias", h) if c.o_bias else None,
        ))
    embed = get("model.embed_tokens.weight", c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else get("lm_head.weight", c.vocab_size, h)
    return ModelWeights(embed=embed, layers=layers, norm=get("model.norm.weight", h), lm_head=lm_head)


def random_weights(config: ModelConfig, dtype=torch.float16, device="cpu", seed: int | None = None) -> ModelWeights:
    """Weights for ``config`` drawn on ``device``, at a trained model's scale: projections normal
    with std ``1/sqrt(fan_in)`` (unit-variance outputs), embeddings standard normal, RMSNorm gains
    around 1, a QKV bias with std 0.5. Never zeros; the same ``seed`` gives the same weights."""
    dtype = _dtype(dtype, "dtype")
    gen = seeded_generator(seed, device)
    c, a = config, config.attention()
    h, inner = c.hidden_size, c.intermediate_size

    def normal(*shape, std=1.0, mean=0.0):
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std + mean).to(dtype)

    def gain():
        return normal(h, std=0.1, mean=1.0)

    layers = [
        LayerWeights(
            attention=AttentionWeights(norm=gain(), qkv=normal(a.qkv_rows, h, std=h**-0.5),
                                       o=normal(h, a.attn_width, std=a.attn_width**-0.5),
                                       qkv_bias=normal(a.qkv_rows, std=0.5) if c.attention_bias else None),
            post_norm=gain(),
            gate=normal(inner, h, std=h**-0.5),
            up=normal(inner, h, std=h**-0.5),
            down=normal(h, inner, std=inner**-0.5),
            o_bias=normal(h, std=0.5) if c.o_bias else None,
        )
        for _ in range(c.num_hidden_layers)
    ]
    embed = normal(c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else normal(c.vocab_size, h, std=h**-0.5)
    return ModelWeights(embed=embed, layers=layers, norm=gain(), lm_head=lm_head)


def random(preset: str, dtype=torch.float16, device="cpu", seed: int | None = None, *,
           attention: str = "fused") -> LlamaModel:
    """The model of ``MODEL_PRESETS[preset]`` with :func:`random_weights`: real shapes without a
    checkpoint (for benchmarks; its tokens mean nothing)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    check_choices(attention=attention, device=device)  # before the weights are drawn
    config = MODEL_PRESETS[preset]
    return LlamaModel(config, random_weights(config, dtype, device, seed), attention=attention)


#: ``max_position_embeddings`` of :func:`to_transformers`' configs (Llama 3.1 / 3.2's); transformers
#: only sizes buffers by it.
TRANSFORMERS_MAX_POSITIONS = 131072


def to_transformers(model: LlamaModel):
    """transformers' own ``LlamaForCausalLM`` (``MistralForCausalLM`` / ``Qwen2ForCausalLM`` for a
    Mistral / Qwen2 config) over ``model``'s weights, in eval mode on ``model``'s device: an
    independent implementation to check against, and the benchmark's baseline.

    The transformers config repeats ``model.config`` (shapes, RMSNorm eps, RoPE theta and the
    llama3 scaling as ``rope_parameters``, ties, biases; SDPA attention); the model is built on
    the ``meta`` device and ``load_state_dict(assign=True)`` hands it views of our tensors
    (``q_proj`` / ``k_proj`` / ``v_proj`` are row slices of ``qkv``): no weight is copied, so
    changing one model's weights changes the other's. Only the RoPE buffers are made anew.
    Needs transformers (clusterlab's ``test`` extra).
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"to_transformers needs transformers, which cannot be imported ({exc}); it is in "
                          "clusterlab's test extra: pip install 'clusterlab[test]'") from exc

    c, a = model.config, model.attention_config
    rope = {"rope_type": "default", "rope_theta": float(c.rope_theta)}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    shapes = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=TRANSFORMERS_MAX_POSITIONS, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, dtype=model.dtype, attn_implementation="sdpa",
    )
    if c.model_type == "qwen2":
        config, cls = transformers.Qwen2Config(**shapes), transformers.Qwen2ForCausalLM
    elif c.model_type == "mistral":
        config, cls = transformers.MistralConfig(**shapes, sliding_window=None), transformers.MistralForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**shapes, attention_bias=c.attention_bias), transformers.LlamaForCausalLM
    with torch.device("meta"):
        hf = cls(config)
    w, rows = model.weights, [a.heads * a.head_dim, a.kv_heads * a.head_dim, a.kv_heads * a.head_dim]
    state = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm, "lm_head.weight": w.lm_head}
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        for name, part in zip("qkv", lw.attention.qkv.split(rows)):
            state[f"{p}self_attn.{name}_proj.weight"] = part
        if lw.attention.qkv_bias is not None:
            for name, part in zip("qkv", lw.attention.qkv_bias.split(rows)):
                state[f"{p}self_attn.{name}_proj.bias"] = part
        if lw.o_bias is not None:
            state[f"{p}self_attn.o_proj.bias"] = lw.o_bias
        state |= {f"{p}self_attn.o_proj.weight": lw.attention.o, f"{p}input_layernorm.weight": lw.attention.norm,
                  f"{p}post_attention_layernorm.weight": lw.post_norm, f"{p}mlp.gate_proj.weight": lw.gate,
                  f"{p}mlp.up_proj.weight": lw.up, f"{p}mlp.down_proj.weight": lw.down}
    hf.load_state_dict(state, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(model.device)
    return hf.eval()


def checkpoint_eos(directory, vocab_size: int | None = None) -> list[int]:
    """The end-of-sequence ids ``directory``'s ``generation_config.json`` (else ``config.json``) names; [] when none.
    With ``vocab_size`` each must be one of the vocabulary's ids."""
    directory = checked_directory(directory)
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if path.is_file():
            value = _json_object(path).get("eos_token_id")
            if value is None:
                continue
            ids = [value] if not isinstance(value, list) else value
            if not all(is_int(v) and v >= 0 for v in ids):
                raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
            if vocab_size is not None and max(ids, default=0) >= vocab_size:
                raise ValueError(f"{path}: eos_token_id {value!r} is past the vocabulary's ids 0..{vocab_size - 1}")
            return ids
    return []


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in float32, cast back, multiply by the gain in ``x``'s dtype."""
    x32 = x.float()
    return gain * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def mlp(layer: LayerWeights, n: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``down(silu(gate(n)) * up(n))``, each op in ``n``'s dtype."""
    return F.linear(F.silu(F.linear(n, layer.gate)) * F.linear(n, layer.up), layer.down)


def check_choices(*, attention: str = "fused", backend: str = "auto", device=None) -> None:
    """A model's ``attention`` and ``backend`` options and, where given, its ``device`` (a CUDA device
    needs a Hopper GPU for the fused blocks), checked before any weight is built or read."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device is not None and attention == "fused":
        check_device(device)


def check_prompts(given, vocab_size: int | None = None) -> list[list[int]]:
    """``given``: 1 to :data:`MAX_BATCH` prompts, each a non-empty sequence of token ids (ints,
    NumPy integers, a 1-D integer tensor; with ``vocab_size`` each in ``0 .. vocab_size - 1``), as
    lists of ints."""
    if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
        raise TypeError(f"prompts must be a sequence of prompts, each a sequence of token ids; got "
                        f"{reprlib.repr(given)}")
    prompts = []
    for i, prompt in enumerate(given):
        if isinstance(prompt, (str, bytes)):
            raise TypeError(f"prompt {i} is text, {reprlib.repr(prompt)}: give its token ids (a tokenizer makes them; "
                            "clusterlab generate --prompt uses the checkpoint's)")
        if not hasattr(prompt, "__iter__") and hasattr(prompt, "__index__"):
            raise TypeError(f"prompt {i} is one token id, {prompt!r}: prompts is a list of prompts, each a list of "
                            f"ids (one prompt: [{reprlib.repr(given)}])")
        prompts.append(token_ids(prompt, f"prompt {i}"))
    if not prompts:
        raise ValueError("no prompts given")
    if len(prompts) > MAX_BATCH:
        raise ValueError(f"{len(prompts)} prompts; the fused layer takes at most {MAX_BATCH} sequences a step")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if vocab_size is not None and not all(0 <= t < vocab_size for t in p):
            raise ValueError(f"prompt {i}: token ids must be in 0..{vocab_size - 1}; got {reprlib.repr(p)}")
    return prompts


def cache_rows(prompts: list[list[int]], max_new_tokens: int) -> int:
    """Rows each sequence's cache needs to generate ``max_new_tokens`` after the longest of ``prompts``
    (checked by :func:`check_prompts` and :func:`~clusterlab.models.decode.check_sampling`): raises
    ``ValueError`` beyond the int32 the kernels take a cache's rows and positions in
    (:data:`~clusterlab.fused.config.MAX_POSITIONS`), before any weight is read or cache allocated."""
    longest = max(map(len, prompts))
    rows = longest + max_new_tokens
    if rows > MAX_POSITIONS:
        raise ValueError(f"max_new_tokens={max_new_tokens} after the longest prompt ({longest} token"
                         f"{'s' * (longest != 1)}) needs caches of {rows} rows; the kernels take at most "
                         f"{MAX_POSITIONS} (int32)")
    return rows


class LlamaModel:
    """A Llama / Qwen2 decoder: PyTorch prefill, fused decode steps.

    ``config``: :class:`ModelConfig`; ``weights``: :class:`ModelWeights` in float16 or bfloat16,
    all on one device (CPU: the fused blocks run on the simulator; a Hopper GPU: the cluster
    kernels). ``attention``: ``"fused"`` (:class:`~clusterlab.fused.DecodeAttention`) or
    ``"unfused"`` (:class:`~clusterlab.fused.UnfusedAttention`, separate PyTorch calls over the
    whole cache with a mask, like a static-cache PyTorch model). ``mlp``: ``"fused"``
    (:class:`~clusterlab.fused.DecodeMLP` for batches up to :func:`fused_mlp_max_batch`, the
    PyTorch chain beyond) or ``"unfused"`` (:func:`mlp`); None follows ``attention``. ``handoff``: where every
    block of a step is fused (and no layer has an output bias), the blocks hand their outputs on as
    float32 sums (:meth:`~clusterlab.fused.DecodeAttention.handoff`) instead of each converting its
    own; the logits are the same either way. The KV caches live on the model
    (``self.caches``, one per layer, made by :meth:`prefill` or :meth:`new_caches`) between steps;
    one model object decodes one batch at a time.
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, *, backend: str = "auto",
                 attention: str = "fused", mlp: str | None = None, handoff: bool = True):
        check_choices(attention=attention, backend=backend)
        mlp = attention if mlp is None else mlp
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS} (or None: as attention), got {mlp!r}")
        if not isinstance(handoff, bool):
            raise TypeError(f"handoff must be True or False, got {handoff!r}")
        self.config, self.weights, self.attention, self.mlp = config, weights, attention, mlp
        self.handoff = handoff and attention == mlp == "fused" and all(lw.o_bias is None for lw in weights.layers)
        self.attention_config = config.attention()
        self.dtype, self.device = weights.embed.dtype, weights.embed.device
        self.layers = [DecodeAttention(self.attention_config, lw.attention, backend=backend)
                       for lw in weights.layers] if attention == "fused" else []
        self.mlps = [DecodeMLP(config.mlp(), MLPWeights(lw.post_norm, lw.gate, lw.up, lw.down), backend=backend)
                     for lw in weights.layers] if mlp == "fused" else []
        self.caches: list[KVCache] | None = None

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device="cpu", *, backend: str = "auto") -> LlamaModel:
        """Read ``config.json`` and the safetensors of ``directory`` (no network). ``dtype``:
        float16 or bfloat16 (a torch dtype or its name); default the checkpoint's own if it is
        one of them, else bfloat16."""
        config = ModelConfig.from_pretrained(directory)
        dtype = config.resolve_dtype(dtype)
        check_choices(backend=backend, device=device)  # before the weights are read
        _, limits = resolve_backend(backend, torch.device(device), None)
        try:
            mlp_shape(config.mlp(), 1, limits.sm_count)
        except ValueError as exc:
            raise ValueError(f"{directory}: the fused MLP cannot run this model on {limits.sm_count} SMs: {exc}") from None
        return cls(config, load_weights(directory, config, dtype, device), backend=backend)

    @property
    def on_simulator(self) -> bool:
        """Whether the fused blocks run on the DSMEM simulator (a fused model on the CPU)."""
        fused = self.layers or self.mlps
        return bool(fused) and fused[0].backend == "simulator"

    # -- prefill -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, token_ids, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompts through plain PyTorch, filling fresh per-layer caches of ``capacity`` rows.

        ``token_ids``: one list of ints per sequence (ragged lengths allowed, at most 8
        sequences). Each prompt runs on its own (causal SDPA over its tokens), its rotated keys
        and values written to cache rows ``0 .. len-1``. Returns the float32 logits of each
        prompt's last token ``[batch, vocab]`` and the position of each sequence's next token
        (its prompt length), an int32 tensor ``[batch]`` on the model's device.
        """
        prompts = check_prompts(token_ids)
        longest = max(map(len, prompts))
        if not (is_int(capacity) and capacity >= longest + 1):
            raise ValueError(f"capacity must be an int > the longest prompt ({longest} tokens), got {capacity!r}")
        tokens = [self._tokens(prompt) for prompt in prompts]  # checked before the old caches are dropped
        self.new_caches(len(prompts), capacity)
        rope = rope_table(self.attention_config, capacity, self.device)
        logits = []
        for b, ids in enumerate(tokens):
            x = self.weights.embed[ids]  # [L, H]
            hidden, residual = x, torch.zeros_like(x)
            for cache, lw in zip(self.caches, self.weights.layers):
                out, h = self._prefill_attention(lw, cache, b, hidden, residual, rope)
                hidden, residual = self._mlp_block(lw, out, h)
            logits.append(self._logits(hidden[-1:], residual[-1:]))
        positions = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
        return torch.cat(logits), positions

    def new_caches(self, batch: int, capacity: int) -> None:
        """Fresh, empty per-layer caches of ``batch`` sequences and ``capacity`` rows (``prefill``
        makes its own)."""
        a = self.attention_config
        caches = self._allocated(lambda i: KVCache.empty(a, batch, capacity, self.dtype, self.device), batch, capacity)
        if self.attention == "unfused":
            for cache in caches:  # attended under a mask, whole: rows not yet written must be finite
                cache.k.zero_()
                cache.v.zero_()
        self.use_caches(caches)

    def random_caches(self, batch: int, capacity: int, seed: int | None = None) -> None:
        """Fresh per-layer caches of ``batch`` sequences and ``capacity`` rows, every row standard
        normal (:meth:`~clusterlab.fused.KVCache.random`, layer ``l`` seeded ``seed + l``): as if
        ``capacity`` tokens had been seen, without a prefill (``clusterlab bench decode``)."""
        a = self.attention_config
        self.use_caches(self._allocated(
            lambda i: KVCache.random(a, batch, capacity, self.dtype, self.device, None if seed is None else seed + i),
            batch, capacity))

    def _allocated(self, make, batch: int, capacity: int) -> list[KVCache]:
        """``make(layer)`` for every layer: the caches of ``batch`` sequences and ``capacity`` rows, or a
        ValueError saying how many bytes they would take where the device has not that much."""
        check_batch(batch)
        try:
            return [make(i) for i in range(len(self.weights.layers))]
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # RuntimeError: the CPU allocator's
            a, itemsize = self.attention_config, self.dtype.itemsize
            need = len(self.weights.layers) * 2 * batch * a.kv_heads * capacity * a.head_dim * itemsize
            raise ValueError(f"caches of {batch} sequences x {capacity} rows x {len(self.weights.layers)} layers "
                             f"need {need / 1e9:.1f} GB, more than {self.device} could allocate ({exc})") from None

    def use_caches(self, caches: list[KVCache]) -> None:
        """Decode with ``caches``: one :class:`~clusterlab.fused.KVCache` per layer, all of one shape
        ``[batch, kv_heads, capacity, head_dim]``, in the model's dtype and on its device. Another
        model's caches over the same weights may be passed (the two then read and write the same
        rows); an unfused model needs every row finite, as it attends to all of them under a mask."""
        a, layers = self.attention_config, len(self.weights.layers)
        if len(caches) != layers:
            raise ValueError(f"{len(caches)} caches for a model of {layers} layers")
        shape = tuple(caches[0].k.shape)
        for i, cache in enumerate(caches):
            for t in (cache.k, cache.v):
                if (tuple(t.shape) != shape or len(shape) != 4 or shape[1] != a.kv_heads or shape[3] != a.head_dim
                        or t.dtype != self.dtype or t.device != self.device):
                    raise ValueError(
                        f"cache {i} holds a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}; expected "
                        f"{self.dtype} [batch, {a.kv_heads}, capacity, {a.head_dim}] on {self.device}, all of "
                        f"cache 0's shape {shape}"
                    )
        check_batch(shape[0])
        self.caches = list(caches)
        # the hand-off's three float32 buffers, zero between steps (see forward_step)
        self._sums = torch.zeros(3, shape[0], self.config.hidden_size, dtype=torch.float32, device=self.device)
        if self.attention == "unfused":
            rope = rope_table(a, shape[2], self.device)
            self._unfused = [UnfusedAttention(a, lw.attention, rope) for lw in self.weights.layers]

    def _prefill_attention(self, lw: LayerWeights, cache: KVCache, b: int, hidden, residual, rope):
        """One prompt's attention block on ``[L, H]`` activations; writes cache rows ``0 .. L-1`` of sequence ``b``."""
        a, w, d = self.attention_config, lw.attention, self.attention_config.head_dim
        length = hidden.shape[0]
        h = hidden + residual
        n = rms_norm(h, w.norm, a.rms_eps)
        q, k, v = F.linear(n, w.qkv, w.qkv_bias).split([a.heads * d, a.kv_heads * d, a.kv_heads * d], dim=-1)
        cos, sin = rope[:length, None, 0], rope[:length, None, 1]  # [L, 1, d/2]
        q = apply_rope(q.view(length, a.heads, d).float(), cos, sin, a.rope_style).to(self.dtype)
        k = apply_rope(k.view(length, a.kv_heads, d).float(), cos, sin, a.rope_style).to(self.dtype)
        v = v.view(length, a.kv_heads, d)
        cache.k[b, :, :length] = k.transpose(0, 1)
        cache.v[b, :, :length] = v.transpose(0, 1)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
            is_causal=True, enable_gqa=a.group_size > 1,
        )  # [heads, L, d]
        out = F.linear(attn.transpose(0, 1).reshape(length, a.attn_width).to(self.dtype), w.o, lw.o_bias)
        return out, h

    # -- decode --------------------------------------------------------------------------------

    def _tokens(self, tokens) -> torch.Tensor:
        message = f"token ids must be in 0..{self.config.vocab_size - 1}; got {reprlib.repr(tokens)}"
        try:
            tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device)
        except (OverflowError, ValueError):  # an id past int64 ("Overflow when unpacking long long")
            raise ValueError(message) from None
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(message)
        return tokens

    def _mlp_block(self, lw: LayerWeights, out, h):
        """``(next hidden, next residual)``: the MLP's output and ``h2 = out + h``, in PyTorch."""
        h2 = out + h
        return mlp(lw, rms_norm(h2, lw.post_norm, self.config.rms_norm_eps)), h2

    def mlp_block(self, layer: int, out, h):
        """Layer ``layer``'s MLP block of a decode step on ``[batch, H]`` activations: ``(next hidden,
        next residual)``, fused as the model's ``mlp`` says up to :func:`fused_mlp_max_batch` sequences."""
        if self.mlp == "fused" and out.shape[0] <= fused_mlp_max_batch(self.config):
            return self.mlps[layer](out, h)
        return self._mlp_block(self.weights.layers[layer], out, h)

    def _logits(self, hidden, residual) -> torch.Tensor:
        return self._head(rms_norm(hidden + residual, self.weights.norm, self.config.rms_norm_eps))

    def _head(self, n) -> torch.Tensor:
        """The LM head on the normalized hidden state ``n`` ``[batch, H]``: float32 logits ``[batch, vocab]``."""
        return F.linear(n, self.weights.lm_head).float()

    @torch.no_grad()
    def decode_step(self, tokens, positions) -> torch.Tensor:
        """One token per sequence through every layer: float32 logits ``[batch, vocab]``.

        ``tokens``: ``[batch]`` ids (a list or tensor); ``positions``: each token's position
        (an int32 tensor ``[batch]`` on the model's device, or a list of ints), ``positions[b] <
        capacity``; the caches of :meth:`prefill` must hold rows ``0 .. positions[b]-1``.
        Appends row ``positions[b]`` to every layer's cache; ``positions`` is not advanced. Reads
        the positions to the host for the attention's launch shape (:meth:`forward_step`).
        """
        if self.caches is None:
            raise ValueError("decode_step needs the caches that prefill builds; call prefill first")
        tokens = self._tokens(tokens)
        batch = self.caches[0].batch
        if tuple(tokens.shape) != (batch,):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected ({batch},), one per sequence")
        capacity = self.caches[0].capacity
        if isinstance(positions, torch.Tensor):
            check_positions(positions, batch, capacity, self.device)  # dtype, device and shape first
            values = positions.tolist()
        else:
            values = sequence_positions(positions, batch)
            positions = torch.tensor(values, dtype=torch.int32, device=self.device)
        check_range(values, capacity)
        return self.forward_step(tokens, positions, longest=max(values) + 1)

    def forward_step(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int | None = None) -> torch.Tensor:
        """:meth:`decode_step` without its checks and host reads, so a CUDA graph can capture it:
        ``tokens`` ``[batch]`` int64 and ``positions`` ``[batch]`` int32, both on the model's
        device; float32 logits ``[batch, vocab]``. ``longest``: at least ``positions[b] + 1`` for
        every ``b``, where the host knows it: the fused attention's launch shape for that length
        (:meth:`step_shape`); the logits are the same whatever it is."""
        hidden = self.weights.embed[tokens]
        residual = torch.zeros_like(hidden)
        if self.handoff and hidden.shape[0] <= fused_mlp_max_batch(self.config):
            return self._handoff_step(hidden, residual, positions, longest)
        for i, lw in enumerate(self.weights.layers):
            out, h = self.attend(i, hidden, residual, positions, longest)
            hidden, residual = self.mlp_block(i, out, h)
        return self._logits(hidden, residual)

    def step_shape(self, batch: int, longest: int | None) -> tuple | None:
        """The fused attention's launch shape, sets of clusters and split ``(cluster_size, warps,
        head_split, batch_parts, shares_queries)`` for a step of ``batch`` sequences whose longest
        attends to ``longest`` rows (:meth:`DecodeAttention.shape <clusterlab.fused.DecodeAttention.shape>`,
        :meth:`~clusterlab.fused.DecodeAttention.batch_parts`,
        :meth:`~clusterlab.fused.DecodeAttention.shares_queries`); None for the unfused attention.
        Steps of one shape share a CUDA graph (:class:`~clusterlab.models.decode.Decoder`)."""
        if self.attention != "fused":
            return None
        layer = self.layers[0]
        return (*layer.shape(batch, longest), layer.batch_parts(batch, longest), layer.shares_queries(batch, longest))

    def _handoff_step(self, hidden, residual, positions, longest) -> torch.Tensor:
        """:meth:`forward_step`'s layers with every block handing its output on as float32 sums.

        Block ``k`` of the step (attention of layer ``k // 2``, then its MLP) reads buffer ``(k -
        1) % 3`` of ``self._sums``, adds its output into buffer ``k % 3`` (zero: block ``k - 1``
        cleared it) and clears buffer ``(k + 1) % 3`` (block ``k - 1`` has read it). Buffer 2 starts
        as the embedding, exact in float32; the last block's sums, rounded, are the final hidden
        state, which :func:`~clusterlab.models.final_norm.final_norm` normalizes in one kernel,
        leaving all three buffers zero for the next step."""
        sums = self._sums
        sums[2].copy_(hidden)
        k = 0
        for i in range(len(self.weights.layers)):
            residual = self.layers[i].handoff(sums[(k - 1) % 3], residual, self.caches[i], positions,
                                              sums_out=sums[k % 3], clear=sums[(k + 1) % 3], longest=longest)
            k += 1
            residual = self.mlps[i].handoff(sums[(k - 1) % 3], residual, sums_out=sums[k % 3], clear=sums[(k + 1) % 3])
            k += 1
        # the final norm reads buffer (k - 1) % 3 and clears it and (k + 1) % 3; block k - 1 cleared k % 3
        return self._head(final_norm(sums[(k - 1) % 3], sums[(k + 1) % 3], residual, self.weights.norm,
                                     self.config.rms_norm_eps))

    def attend(self, layer: int, hidden, residual, positions, longest: int | None = None):
        """Layer ``layer``'s attention block on ``[batch, H]`` activations: ``(out, hidden + residual)``,
        appending row ``positions[b]`` to its cache (``longest`` as :meth:`forward_step`)."""
        cache, lw = self.caches[layer], self.weights.layers[layer]
        if self.attention == "fused":
            out, h = self.layers[layer](hidden, residual, cache, positions, longest=longest)
        else:
            out, h = self._unfused[layer](hidden, residual, cache, positions)
        if lw.o_bias is not None:
            out = out + lw.o_bias
        return out, h

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, eos_token_id=None, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> list[list[int]]:
        """The new token ids of each prompt: greedy when ``temperature`` is 0, else sampled from
        ``softmax(logits / temperature)`` over the ``top_k`` likeliest (all when None), seeded
        with ``seed`` (from the OS when None).

        A sequence stops after emitting ``eos_token_id`` (an int or a list of ints; the eos is
        included in its ids), or after ``max_new_tokens``. The batch decodes in lockstep (a
        finished sequence's steps are computed and dropped) until every sequence is done. On a
        GPU each step is one CUDA graph replay (:class:`~clusterlab.models.decode.Decoder`); on
        CPU tensors every attention step runs on the DSMEM simulator: tiny models only.
        ``self.last_stats`` holds ``{"prefill_s", "decode_s", "decode_steps"}`` afterwards
        (``decode_s`` includes capturing the graph).
        """
        prompts = check_prompts(prompts, self.config.vocab_size)
        eos = check_sampling(max_new_tokens, temperature, top_k, eos_token_id, seed, self.config.vocab_size)
        capacity = cache_rows(prompts, max_new_tokens)
        trained = self.config.max_position_embeddings
        if trained is not None and capacity > trained:
            warnings.warn(f"generate: the longest prompt and max_new_tokens={max_new_tokens} reach {capacity} "
                          f"positions, past max_position_embeddings={trained} of the model's config: the tokens "
                          "from there on are the model's extrapolation",
                          stacklevel=3)  # the caller's line, past torch.no_grad's wrapper
        start = time.perf_counter()
        logits, positions = self.prefill(prompts, capacity)
        _sync(self.device)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        decoder = Decoder(self, max_new_tokens, temperature=temperature, top_k=top_k, eos=eos, seed=seed)
        decoder.start(logits, positions)
        steps = decoder.run()
        new = decoder.new_tokens()
        self.last_stats = {"prefill_s": prefill_s, "decode_s": time.perf_counter() - start, "decode_steps": steps}
        return new


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
