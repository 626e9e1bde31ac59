"""``clusterlab bench decode``: time per output token (TPOT) of whole models, fused against unfused, transformers and the floor.

For each preset (default ``llama3-8b`` and ``llama3.2-1b``, random weights from
:func:`clusterlab.models.random`, float16 unless ``--dtype`` says otherwise), batch (1, 4, 8) and
context (1024, 4096, 16384 tokens) it times, on one Hopper GPU in one process, the decode step
that every sequence takes at position ``context``: the step attends over ``context + 1`` keys.
No prefill runs: every layer's cache is filled with standard-normal keys and values
(:meth:`LlamaModel.random_caches`, ``capacity = context + REPLAYS`` rows), as if ``context``
tokens had been seen. One token of every sequence is::

    tokens [B] int64, positions [B] int32 (= context)         static buffers of the Decoder
    x = embed[tokens]                                         [B, H]
    per layer: attention block (appends cache row positions[b]), SwiGLU MLP block
    logits = lm_head(RMSNorm(x))                              [B, V] float32
    positions += 1; next = argmax(logits); history[b, count] = next; tokens = next

- **fused**: :class:`~clusterlab.models.decode.Decoder` over the model with the fused attention
  and MLP blocks (:class:`~clusterlab.fused.DecodeAttention`, :class:`~clusterlab.fused.DecodeMLP`):
  the step above captured once as a CUDA graph, one replay per token;
- **fused attention**: the same with the MLP block as PyTorch calls (``mlp="unfused"``), to show
  what each fused block brings;
- **unfused**: the same weights and the same caches (shared) in a model with
  ``attention="unfused"`` (:class:`~clusterlab.fused.UnfusedAttention`: separate PyTorch calls
  over all ``context + REPLAYS`` cache rows under a mask, as a static-cache PyTorch model
  attends) and the MLP block as PyTorch calls, through the same Decoder, one CUDA graph per token;
- **hf**: transformers' ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` for Qwen2) built on the
  ``meta`` device and handed views of the same weights (:func:`~clusterlab.models.to_transformers`;
  q/k/v are row slices of the fused ``qkv``, nothing is copied). ``generate`` greedy with
  ``cache_implementation="static"`` and ``min_new_tokens == max_new_tokens`` on ``context``
  random ids per sequence; eager (``disable_compile=True``), or with ``--hf-compile``
  transformers' automatic compilation of the decode steps (``compile_config``: ``torch.compile``
  of the forward, mode ``reduce-overhead``); the JSON's ``hf`` says which ran. TPOT is the slope
  between ``HF_TOKENS`` and ``2 * HF_TOKENS`` new tokens (:func:`clusterlab.bench.timing.per_op_us`,
  device time from CUDA events): the prefill cancels;
- **floor**: :func:`bytes_per_token` (every weight matrix once, the cache rows attended) over the
  device-to-device copy bandwidth measured at the start of the run
  (:func:`clusterlab.bench.timing.copy_bandwidth`).

Method: a Decoder's TPOT is the device time (CUDA events) of ``REPLAYS`` back-to-back graph
replays divided by ``REPLAYS``, median of ``REPEATS`` after an untimed run
(:func:`replay_us`). Before each timed run, outside the timed region, ``Decoder.start`` puts the
positions back to ``context`` and resets the token count and history, so every timed token
attends over ``context + 1 .. context + REPLAYS`` keys. At batch 1 the step is also taken apart
(:func:`breakdown`): all layers' attention blocks, all MLP blocks, and the rest (embedding,
final norm, LM head, greedy pick), each captured as a CUDA graph of its own and timed the same
way, beside their sum and the whole step. Before a preset is timed, the fused model's logits of
one step are checked against the unfused model's on the same tokens and positions
(relative error above ``MAX_ERROR`` raises).

Memory: one model's weights per preset (the unfused model and transformers' share them); each
configuration's caches, graphs, transformers model and static cache are freed before the next,
and our caches before transformers allocates its own.
Results: a table on stdout, ``decode_<card>.json`` and ``decode_<card>.png`` under ``out_dir``
(written after every row: a cut-short run keeps its rows), ``<card>`` read from the device
(``h200`` for an NVIDIA H200). transformers is optional: without it the hf column is skipped.

Run: ``clusterlab bench decode`` (``--quick``: llama3.2-1b, batch 1, context 1024 only).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..argtypes import Distinct, integer, results_folder, results_tag
from ..fused.config import MAX_BATCH, MAX_POSITIONS, is_batch, is_int
from ..fused.reference import relative_error
from ..models.argmax import pick_and_record
from ..models.final_norm import final_norm
from ..models.decode import Decoder
from ..models.llama import DTYPES, MODEL_PRESETS, LlamaModel, ModelConfig, fused_mlp_max_batch, random, to_transformers
from .timing import (
    MIN_REPEATS,
    Stat,
    capture_graph,
    check_settings_list,
    event_time_us,
    measure_card,
    per_op_us,
    results_header,
    short_commit,
    writable_dir,
    write_json,
)

PRESETS = ("llama3-8b", "llama3.2-1b")
BATCHES = (1, 4, 8)
CONTEXTS = (1024, 4096, 16384)
#: Back-to-back graph replays (tokens) one timing covers, and the timings a figure is the median of.
REPLAYS = 16
REPEATS = 9
#: transformers' TPOT: the slope between generating HF_TOKENS and 2 * HF_TOKENS new tokens.
HF_TOKENS = 16
#: Largest relative error of the fused model's logits against the unfused model's.
MAX_ERROR = 2e-2
#: ``--quick``: one small configuration, the fewest repeats.
QUICK = {"presets": ("llama3.2-1b",), "batches": (1,), "contexts": (1024,), "repeats": MIN_REPEATS}


@dataclass
class DecodeRow:
    """One (preset, dtype, batch, context): µs per token of each model and the floor."""

    preset: str
    dtype: str
    batch: int
    context: int
    fused_us: float
    unfused_us: float
    hf_us: float | None
    floor_us: float
    bytes_per_token: int
    #: the fused attention with the MLP block in PyTorch (None in results written before it existed)
    fused_attention_us: float | None = None

    @property
    def fraction_of_floor(self) -> float:
        """floor / fused: how close the fused model's token comes to moving its bytes at copy bandwidth."""
        return self.floor_us / self.fused_us

    @property
    def tokens_per_s(self) -> float:
        """Tokens the fused model makes per second, all sequences of the batch together."""
        return self.batch * 1e6 / self.fused_us


@dataclass
class BreakdownRow:
    """One model's batch-1 token taken apart: µs of every attention block, every MLP block, the rest."""

    preset: str
    dtype: str
    batch: int
    context: int
    model: str
    attention_us: float
    mlp_us: float
    rest_us: float
    step_us: float


def bytes_per_token(config: ModelConfig, batch: int, context: int, itemsize: int = 2) -> int:
    """Fewest bytes one decode step of ``batch`` sequences at position ``context`` reads.

    Every weight matrix once: per layer the input RMSNorm gain, ``qkv`` (and its bias), ``o``
    (and its bias), the post-attention gain, ``gate``, ``up`` and ``down``; the final norm's gain
    and ``lm_head`` (``[V, H]`` once, tied to the embeddings or not: the embedding table itself
    is only gathered, ``batch`` rows). Plus the cache rows attended: ``batch * context`` rows of
    K and V per layer and KV head, ``head_dim`` elements each. The embedding rows, the new cache
    rows and the activations are left out (under 0.01% of the total at these shapes).
    """
    a, h = config.attention(), config.hidden_size
    per_layer = (a.weight_bytes(itemsize) + itemsize * (h * config.o_bias + h + 3 * config.intermediate_size * h))
    weights = config.num_hidden_layers * per_layer + itemsize * (h + config.vocab_size * h)
    cache = batch * context * config.num_hidden_layers * a.kv_heads * a.head_dim * 2 * itemsize
    return weights + cache


def replay_us(replay, replays: int = REPLAYS, repeats: int = REPEATS, prepare=None) -> Stat:
    """µs per call of ``replay()`` (one CUDA graph replay) over ``replays`` back-to-back calls.

    Device time from CUDA events (:func:`~clusterlab.bench.timing.event_time_us`) of the whole
    run, divided by ``replays``; ``repeats`` runs after an untimed one. ``prepare()`` runs before
    each, outside the timed region.
    """
    def enqueue():
        for _ in range(replays):
            replay()

    event_time_us(enqueue, prepare)
    return Stat.of([event_time_us(enqueue, prepare) for _ in range(repeats)]).scaled(1 / replays)


def decoder_tpot_us(model: LlamaModel, context: int, replays: int = REPLAYS, repeats: int = REPEATS,
                    seed: int = 0) -> Stat:
    """µs per token of ``model``'s :class:`Decoder` (one graph replay per token, greedy), its caches
    holding ``context`` rows per sequence and at least ``replays`` more.

    Every timed run starts from position ``context`` (``Decoder.start`` with random first logits
    ``[B, V]`` float32, outside the timed region) and replays ``replays`` tokens.
    """
    batch, vocab = model.caches[0].batch, model.config.vocab_size
    gen = torch.Generator(device=model.device).manual_seed(seed)
    first = torch.randn(batch, vocab, generator=gen, device=model.device)
    positions = torch.full((batch,), context, dtype=torch.int32, device=model.device)
    decoder = Decoder(model, replays + 1)
    return replay_us(decoder.step, replays, repeats, prepare=lambda: decoder.start(first, positions))


def breakdown(model: LlamaModel, context: int, replays: int = REPLAYS, repeats: int = REPEATS,
              seed: int = 0) -> dict[str, float]:
    """µs per token of the parts of ``model``'s step, each a CUDA graph timed like :func:`replay_us`:
    ``attention_us`` (every layer's attention block, appending cache row ``context``), ``mlp_us``
    (every layer's MLP block) and ``rest_us`` (embedding gather, final norm, LM head, the pick and its record).

    Each part runs on static random ``[batch, H]`` activations in the model dtype.
    """
    batch, h, device = model.caches[0].batch, model.config.hidden_size, model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden, residual, out, h_in = (torch.randn(batch, h, generator=gen, device=device).to(model.dtype)
                                   for _ in range(4))
    tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=gen, device=device)
    positions = torch.full((batch,), context, dtype=torch.int32, device=device)

    def attention():
        for i in range(len(model.weights.layers)):
            model.attend(i, hidden, residual, positions, context + 1)

    def mlp():
        for i in range(len(model.weights.layers)):
            model.mlp_block(i, out, h_in)

    handoff = model.handoff and batch <= fused_mlp_max_batch(model.config)
    record = {"tokens": tokens.clone(), "history": torch.zeros(batch, 1, dtype=torch.int64, device=device),
              "counts": torch.zeros(batch, dtype=torch.int64, device=device),
              "done": torch.zeros(batch, dtype=torch.bool, device=device),
              "eos": torch.full((1,), -1, dtype=torch.int64, device=device), "positions": positions.clone()}

    def rest():  # what the step runs outside the blocks (LlamaModel.forward_step, Decoder's step)
        x = model.weights.embed[tokens]
        residual = torch.zeros_like(x)
        if handoff:
            model._sums[2].copy_(x)
            logits = model._head(final_norm(model._sums[2], model._sums[0], residual, model.weights.norm,
                                            model.config.rms_norm_eps))
        else:
            logits = model._logits(x, residual)
        pick_and_record(logits, **record, advance=1)  # history[b, 0] only: the kernel skips counts >= 1

    times = {}
    for name, part in (("attention_us", attention), ("mlp_us", mlp), ("rest_us", rest)):
        part()  # compile, load, allocate: nothing of that may happen in a capture
        graph = capture_graph(part)
        times[name] = replay_us(graph.replay, replays, repeats).median
        del graph
    return times


def check_fused(fused: LlamaModel, unfused: LlamaModel, context: int, seed: int = 0) -> float:
    """Relative error of the fused model's float32 logits ``[B, V]`` of one step against the
    unfused model's, on the same random tokens at position ``context`` of the caches they share;
    RuntimeError above :data:`MAX_ERROR`."""
    batch = fused.caches[0].batch
    gen = torch.Generator(device=fused.device).manual_seed(seed)
    tokens = torch.randint(0, fused.config.vocab_size, (batch,), generator=gen, device=fused.device)
    positions = torch.full((batch,), context, dtype=torch.int32, device=fused.device)
    with torch.no_grad():
        got = fused.forward_step(tokens, positions, context + 1)
        want = unfused.forward_step(tokens, positions, context + 1)
    error = relative_error(got, want)
    if not error <= MAX_ERROR:
        raise RuntimeError(f"the fused model's logits differ from the unfused model's by {error:.2e} "
                           f"(relative; at most {MAX_ERROR} allowed), batch {batch}, position {context}")
    return error


# -- transformers -------------------------------------------------------------------------------


def hf_tpot_us(hf, batch: int, context: int, compiled: bool, seed: int = 0) -> float:
    """µs per token of transformers' greedy ``generate`` with a static cache: the slope between
    :data:`HF_TOKENS` and ``2 * HF_TOKENS`` new tokens after ``context`` random prompt ids per
    sequence (median of :data:`~clusterlab.bench.timing.MIN_REPEATS`; the prefill cancels).

    ``compiled``: let ``generate`` compile the decode steps (``compile_config``, its automatic
    compilation of a static-cache forward); else ``disable_compile=True``. The warm-up generates
    the longer run first: transformers (5.24) then makes every later static cache as long, so
    both lengths attend over caches of one size.
    """
    import transformers

    gen = torch.Generator(device=hf.device).manual_seed(seed)
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), generator=gen, device=hf.device)
    mask = torch.ones_like(ids)
    options = {"compile_config": transformers.CompileConfig()} if compiled else {"disable_compile": True}

    def run(new_tokens: int) -> None:
        hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    cache_implementation="static", **options)

    tpot = per_op_us(run, HF_TOKENS).median
    if compiled and getattr(hf, "_compiled_call", None) is None:  # set by transformers' get_compiled_call
        raise RuntimeError("transformers' generate ran without compiling the forward")
    return tpot


class _HuggingFace:
    """transformers' TPOT for the run: ``mode`` is ``"eager"``, ``"compiled"`` or ``"skipped: <reason>"``.

    Each configuration gets a model of its own over the weights
    (:func:`~clusterlab.models.to_transformers`: views, built in about a second), so nothing of an earlier one carries over: transformers sizes a new
    static cache to the longest it has made before, which would have a short context attend over
    an earlier, longer one's cache. ``compiled`` falls back to eager, with a printed reason,
    when the first configuration fails to compile; a failure after that raises.
    """

    def __init__(self, mode: str | None):
        self.version, self.timed = None, 0
        if mode is None:
            self.mode = "skipped: --no-hf"
            return
        try:
            import transformers
        except ImportError as exc:
            self.mode = f"skipped: transformers cannot be imported ({exc}); pip install transformers"
            print(f"hf column {self.mode}", flush=True)
            return
        self.mode, self.version = mode, transformers.__version__

    def tpot_us(self, model: LlamaModel, batch: int, context: int, seed: int) -> float | None:
        """:func:`hf_tpot_us` of a transformers model over ``model``'s weights; None when skipped."""
        if self.mode.startswith("skipped"):
            return None
        tpot = None
        if self.mode == "compiled":
            torch.compiler.reset()  # compiled graphs of one configuration at a time
            try:
                tpot = hf_tpot_us(to_transformers(model), batch, context, compiled=True, seed=seed)
            except Exception as exc:
                if self.timed:
                    raise
                print(f"transformers' compiled generate failed ({type(exc).__name__}: {exc}); "
                      "timing it eager instead", flush=True)
                self.mode = "eager"
            torch.compiler.reset()
        if self.mode == "eager":
            tpot = hf_tpot_us(to_transformers(model), batch, context, compiled=False, seed=seed)
        self.timed += 1
        return tpot


# -- the run ------------------------------------------------------------------------------------


def _free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def run_bench(
    presets=PRESETS,
    batches=BATCHES,
    contexts=CONTEXTS,
    dtype: str = "float16",
    hf: str | None = "eager",
    repeats: int = REPEATS,
    out_dir: str | os.PathLike = "benchmarks/results",
    tag: str | None = None,
    seed: int = 0,
    handoff: bool = True,
) -> tuple[list[DecodeRow], list[BreakdownRow]]:
    """Time every (preset, batch, context); write ``decode_<tag>.json`` / ``.png`` after each row.

    ``hf``: ``"eager"``, ``"compiled"`` (transformers' compiled decode steps, eager if that
    fails) or None (no transformers column). ``tag``: the results' suffix, by default the card's
    (:func:`~clusterlab.bench.timing.card_tag`). ``handoff``: the fused model's blocks hand their
    outputs on as float32 sums (:class:`~clusterlab.models.LlamaModel`'s default; False: each kernel
    converts its own, recorded in the results). Returns the rows and the batch-1 breakdowns (also
    printed as tables).
    """
    if hf not in ("eager", "compiled", None):
        raise ValueError(f"hf must be 'eager', 'compiled' or None, got {hf!r}")
    presets = check_settings_list("presets", presets, f"among {sorted(MODEL_PRESETS)}", MODEL_PRESETS.__contains__)
    batches = check_settings_list("batches", batches, f"integers in 1..{MAX_BATCH}", is_batch)
    longest = MAX_POSITIONS - REPLAYS  # a run's caches hold context + REPLAYS rows
    contexts = check_settings_list("contexts", contexts, f"integers in 1..{longest}",
                                   lambda c: is_int(c) and 1 <= c <= longest)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not (is_int(repeats) and repeats >= MIN_REPEATS):
        raise ValueError(f"repeats must be an int >= {MIN_REPEATS}, got {repeats!r}")
    if not (is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(handoff, bool):
        raise ValueError(f"handoff must be True or False, got {handoff!r}")
    writable_dir(out_dir)
    info, tag, bandwidth = measure_card(tag)
    torch_dtype = DTYPES[dtype]
    baseline = _HuggingFace(hf)
    info["transformers"] = baseline.version
    info["handoff"] = handoff
    print(_HEADER, flush=True)
    rows: list[DecodeRow] = []
    parts: list[BreakdownRow] = []
    for preset in presets:
        fused = random(preset, torch_dtype, "cuda", seed=seed)
        fused = fused if handoff else LlamaModel(fused.config, fused.weights, handoff=False)
        unfused = LlamaModel(fused.config, fused.weights, attention="unfused")
        fused_attention = LlamaModel(fused.config, fused.weights, attention="fused", mlp="unfused")
        models = (("fused", fused), ("fused_attention", fused_attention), ("unfused", unfused))
        for batch in batches:
            for context in contexts:
                fused.random_caches(batch, context + REPLAYS, seed=seed + 1)
                unfused.use_caches(fused.caches)
                fused_attention.use_caches(fused.caches)
                if (batch, context) == (batches[0], contexts[0]):
                    error = check_fused(fused, unfused, context, seed)
                    print(f"{preset} {dtype}: fused logits vs unfused, batch {batch}, position {context}: "
                          f"relative error {error:.1e}", flush=True)
                times = {name: decoder_tpot_us(model, context, REPLAYS, repeats, seed).median for name, model in models}
                if batch == 1:
                    for name, model in models:
                        parts.append(BreakdownRow(preset, dtype, batch, context, name,
                                                  **breakdown(model, context, REPLAYS, repeats, seed),
                                                  step_us=times[name]))
                        part = parts[-1]
                        print(f"{preset} {dtype} batch 1 context {context}, {name} taken apart: attention "
                              f"{part.attention_us:.1f} + MLP {part.mlp_us:.1f} + rest {part.rest_us:.1f} = "
                              f"{part.attention_us + part.mlp_us + part.rest_us:.1f} us; whole step "
                              f"{part.step_us:.1f} us", flush=True)
                fused.caches = unfused.caches = fused_attention.caches = None
                _free()
                hf_us = baseline.tpot_us(fused, batch, context, seed)
                _free()
                nbytes = bytes_per_token(fused.config, batch, context, torch_dtype.itemsize)
                rows.append(DecodeRow(preset, dtype, batch, context, times["fused"], times["unfused"], hf_us,
                                      nbytes / bandwidth * 1e6, nbytes, times["fused_attention"]))
                print(_format_row(rows[-1]), flush=True)
                write_results(rows, parts, bandwidth, baseline.mode, info, Path(out_dir), tag)
        del fused, unfused, fused_attention, models
        _free()
    print(format_table(rows, bandwidth))
    if parts:
        print(format_breakdown(parts))
    return rows, parts


# -- tables, JSON, picture ----------------------------------------------------------------------

_HEADER = (f"{'preset':11s} {'dtype':8s} {'batch':>5s} {'context':>7s} {'fused us':>9s} {'attn-only':>9s} "
           f"{'unfused us':>10s} "
           f"{'hf us':>9s} {'floor us':>9s} {'% floor':>7s} {'x unfused':>9s} {'x hf':>6s} {'tokens/s':>9s}")


def _format_row(r: DecodeRow) -> str:
    hf = "-" if r.hf_us is None else f"{r.hf_us:.1f}"
    over_hf = "-" if r.hf_us is None else f"{r.hf_us / r.fused_us:.2f}"
    attention_only = "-" if r.fused_attention_us is None else f"{r.fused_attention_us:.1f}"
    return (f"{r.preset:11s} {r.dtype:8s} {r.batch:5d} {r.context:7d} {r.fused_us:9.1f} {attention_only:>9s} "
            f"{r.unfused_us:10.1f} "
            f"{hf:>9s} {r.floor_us:9.1f} {100 * r.fraction_of_floor:7.1f} {r.unfused_us / r.fused_us:9.2f} "
            f"{over_hf:>6s} {r.tokens_per_s:9.0f}")


def format_table(rows: list[DecodeRow], bandwidth: float) -> str:
    """The rows as a table: µs per token of each model, the floor at ``bandwidth`` bytes/s, the
    fused model's % of the floor, its speedups over unfused and transformers, its tokens/s."""
    lines = [f"decode TPOT: fused vs unfused vs transformers vs floor at {bandwidth / 1e12:.2f} TB/s", _HEADER]
    return "\n".join(lines + [_format_row(r) for r in rows])


def _format_part(p: BreakdownRow) -> str:
    total = p.attention_us + p.mlp_us + p.rest_us
    return (f"{p.preset:11s} {p.dtype:8s} {p.batch:5d} {p.context:7d} {p.model:15s} {p.attention_us:10.1f} "
            f"{p.mlp_us:9.1f} {p.rest_us:8.1f} {total:9.1f} {p.step_us:9.1f}")


def format_breakdown(parts: list[BreakdownRow]) -> str:
    """The batch-1 breakdowns as a table: µs of the attention blocks, MLP blocks and the rest,
    their sum, and the whole step."""
    header = (f"{'preset':11s} {'dtype':8s} {'batch':>5s} {'context':>7s} {'model':15s} {'attention':>10s} "
              f"{'mlp':>9s} {'rest':>8s} {'sum':>9s} {'step':>9s}")
    return "\n".join(["batch-1 token taken apart, µs", header] + [_format_part(p) for p in parts])


def write_results(rows: list[DecodeRow], parts: list[BreakdownRow], bandwidth: float, hf: str, info: dict,
                  out_dir: Path, tag: str) -> tuple[Path, Path]:
    """Write ``decode_<tag>.json`` and ``decode_<tag>.png`` under ``out_dir``; return their paths.

    ``bandwidth``: the copy bandwidth in bytes/s; ``hf``: how transformers ran (``"eager"``,
    ``"compiled"`` or ``"skipped: <reason>"``); ``info``: :func:`clusterlab.gpu.device_info`'s
    dict, ``"transformers"``'s version (None without it) and whether the fused model's kernels
    hand their outputs on (``"handoff"``, recorded as such).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **results_header(info, ("numba-cuda", "cuda-core", "torch", "transformers")),
        "copy_bandwidth_tbps": bandwidth / 1e12,
        "hf": hf,
        "handoff": info.get("handoff", True),
        "rows": [asdict(r) for r in rows],
        "breakdown": [asdict(p) for p in parts],
    }
    json_path, png_path = out_dir / f"decode_{tag}.json", out_dir / f"decode_{tag}.png"
    write_json(record, json_path)
    _plot(rows, parts, record, png_path)
    return json_path, png_path


def _plot(rows: list[DecodeRow], parts: list[BreakdownRow], record: dict, path: Path) -> None:
    """A panel per preset (ms per token against context, a colour per batch: fused solid, unfused
    dotted, transformers dash-dot, floor thin dashed), and the batch-1 breakdowns as stacked bars."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    presets = list(dict.fromkeys(r.preset for r in rows))
    fig = Figure(figsize=(4.6 * (len(presets) + bool(parts)), 4.2))
    axes = fig.subplots(1, len(presets) + bool(parts), squeeze=False)[0]
    for ax, preset in zip(axes, presets):
        mine = [r for r in rows if r.preset == preset]
        for i, batch in enumerate(sorted({r.batch for r in mine})):
            line = sorted((r for r in mine if r.batch == batch), key=lambda r: r.context)
            x, color = [r.context for r in line], f"C{i}"
            ax.plot(x, [r.fused_us / 1e3 for r in line], "o-", color=color, label=f"fused, batch {batch}")
            if any(r.fused_attention_us is not None for r in line):
                ax.plot(x, [math.nan if r.fused_attention_us is None else r.fused_attention_us / 1e3 for r in line],
                        "d--", color=color, alpha=0.6, label=f"fused attention only, batch {batch}")
            ax.plot(x, [r.unfused_us / 1e3 for r in line], "s:", color=color, label=f"unfused, batch {batch}")
            if any(r.hf_us is not None for r in line):
                ax.plot(x, [math.nan if r.hf_us is None else r.hf_us / 1e3 for r in line], "^-.", color=color,
                        label=f"transformers, batch {batch}")
            ax.plot(x, [r.floor_us / 1e3 for r in line], "_--", color=color, linewidth=0.8, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens in the cache)")
        ax.set_ylabel("ms per token (TPOT)")
        ax.set_title(f"{preset}, {mine[0].dtype} (thin dashed: floor)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if parts:
        ax = axes[-1]
        x = range(len(parts))
        attention = [p.attention_us / 1e3 for p in parts]
        mlp = [p.mlp_us / 1e3 for p in parts]
        rest = [p.rest_us / 1e3 for p in parts]
        ax.bar(x, attention, label="attention blocks")
        ax.bar(x, mlp, bottom=attention, label="MLP blocks")
        ax.bar(x, rest, bottom=[a + m for a, m in zip(attention, mlp)], label="embed, norm, LM head, pick")
        ax.plot(x, [p.step_us / 1e3 for p in parts], "k_", markersize=14, label="whole step")
        ax.set_xticks(list(x), [f"{p.preset} {p.context}\n{p.model}" for p in parts], rotation=90, fontsize=6)
        ax.set_ylabel("ms per token, batch 1")
        ax.set_title("batch 1 taken apart", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"{record['card']}, copy {record['copy_bandwidth_tbps']:.2f} TB/s, {record['date'][:10]}, "
                 f"{short_commit(record['commit'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m clusterlab.bench.decode",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", action=Distinct, choices=list(MODEL_PRESETS), default=None,
                        help=f"default: {' '.join(PRESETS)}")
    parser.add_argument("--batch", nargs="+", action=Distinct, type=integer(1, MAX_BATCH), default=None,
                        help=f"sequences per step (default: {' '.join(map(str, BATCHES))})")
    parser.add_argument("--context", nargs="+", action=Distinct, type=integer(1), default=None,
                        help=f"tokens in every sequence's cache (default: {' '.join(map(str, CONTEXTS))})")
    parser.add_argument("--dtype", default="float16", choices=tuple(DTYPES))
    parser.add_argument("--repeats", type=integer(MIN_REPEATS), default=None,
                        help=f"timings each figure is the median of (default {REPEATS})")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=0)
    parser.add_argument("--out-dir", type=results_folder, default="benchmarks/results")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the output files (default: the card's name)")
    parser.add_argument("--quick", action="store_true",
                        help="llama3.2-1b, batch 1, context 1024, fewest repeats (flags given still apply)")
    parser.add_argument("--no-handoff", action="store_true",
                        help="the fused model's kernels each convert their own output (no float32 hand-off)")
    hf = parser.add_mutually_exclusive_group()
    hf.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    hf.add_argument("--hf-compile", action="store_true",
                    help="let transformers compile its decode steps (torch.compile); default eager")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"presets": PRESETS, "batches": BATCHES, "contexts": CONTEXTS,
                                         "repeats": REPEATS}
    run_bench(
        presets=args.preset or defaults["presets"],
        batches=args.batch or defaults["batches"],
        contexts=args.context or defaults["contexts"],
        dtype=args.dtype,
        hf=None if args.no_hf else "compiled" if args.hf_compile else "eager",
        repeats=args.repeats or defaults["repeats"],
        out_dir=args.out_dir,
        tag=args.tag,
        seed=args.seed,
        handoff=not args.no_handoff,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
