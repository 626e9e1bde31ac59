"""``clusterlab bench fused``: the fused layer against PyTorch and the bytes-moved floor, in one run.

For each preset, dtype, batch and KV length (every sequence's step at ``position = kv_len - 1``
attends over ``kv_len`` keys; the *ragged* rows give the sequences of a batch lengths spread
evenly over the KV lengths asked for, in shuffled order) it times, on the same GPU in the same
process:

- **fused**: one :class:`~clusterlab.fused.layer.DecodeAttention` step (for the MLA preset
  ``deepseek-v2-lite``, :class:`~clusterlab.fused.mla_layer.DecodeMLA`), positions as an int32
  tensor on the device, captured in a CUDA graph;
- **torch**: :class:`~clusterlab.fused.reference.UnfusedAttention` (add, rms_norm, linear, RoPE,
  SDPA, linear; a mask for ragged batches; for MLA :class:`~clusterlab.fused.mla_reference.UnfusedMLA`)
  captured in a CUDA graph;
- **floor**: the config's ``step_bytes`` over the device-to-device copy bandwidth measured
  at the start of the run (bytes read + written by ``Tensor.copy_`` of 1 GiB).

Each time is one step's cost inside CUDA graphs of back-to-back steps: the slope between graphs
of 20 and 40 steps, median of 9 repeats (:func:`clusterlab.bench.timing.graph_per_op_us`), after
a warm-up. Back-to-back steps of one layer would find its weights in L2 when they fit there (a
Llama-3.2-1B block is 21 MB, an H200's L2 50 MB), so the steps cycle through as many layers,
each with weights, cache and inputs of its own, as it takes to move three times the L2 between
two visits of a layer: what a model's decode step does. Every fused configuration is checked
against the float64 reference before it is timed. Results: a table on stdout,
``fused_<card>.json`` (card, driver, date, commit) and ``fused_<card>.png`` under ``out_dir``,
``<card>`` read from the device (``h200`` for an NVIDIA H200).

Run directly: ``python -m clusterlab.bench.fused --batch 1 4 --kv 1024 4096 16384 32768``. ``--jobs 16``
compiles every kernel of the run first, 16 at once (a kernel takes 20-30 s on one core, and each launch shape,
batch and dtype is one), into the kernel cache (:mod:`clusterlab.kernel_cache`) the timing then loads them from.
``--variant 16x4x2 16x8x1`` times other launch shapes (``rule`` among them: the launch rule's own, which may
differ by preset, batch and length), ``--spec default registers=168`` other kernels of the Llama-style layer
(its ``kernel_options``, :data:`~clusterlab.fused.plan.KERNEL_CHOICES`; the MLA layer's,
:data:`~clusterlab.fused.plan.MLA_KERNEL_CHOICES`, e.g. ``--preset deepseek-v2-lite --spec default
one_launch=True``), each checked against the reference like the default; a length where the rule's shape
refuses the options (``shared_queries`` at the long-cache shape) is skipped, saying why.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..argtypes import Distinct, argument_type, dimensions, integer, number, results_folder, results_tag
from ..fused.config import PRESETS as ATTENTION_PRESETS
from ..fused.config import (MAX_BATCH, MAX_POSITIONS, AttentionWeights, KVCache, is_batch, is_int, is_number_in,
                            rope_table)
from ..fused.layer import DecodeAttention
from ..fused.mla import MLA_PRESETS, LatentCache, MLAConfig, MLAWeights, mla_rope_table
from ..fused.mla_layer import DecodeMLA
from ..fused.mla_reference import UnfusedMLA, mla_reference_step
from ..fused.plan import (CLUSTER_SIZES, KERNEL_CHOICES, MLA_KERNEL_CHOICES, WARP_COUNTS, check_kernel_options,
                          set_batch)
from ..fused.reference import UnfusedAttention, reference_step, relative_error
from ..kernel_cache import CACHE_DIR_ENV, cache_dir
from .timing import (check_settings_list, graph_per_op_us, measure_card, results_header, short_commit, writable_dir,
                     write_json)

#: Every preset the benchmark takes: the Llama-style blocks' and the MLA block's.
PRESETS = {**ATTENTION_PRESETS, **MLA_PRESETS}
KV_LENGTHS = (1024, 4096, 16384, 32768)
BATCHES = (1, 2, 4, 8)
#: Steps per captured graph, and repeats each figure is the median of.
GRAPH_STEPS = 20
REPEATS = 9
#: Bytes the rotation of layers moves between two visits of one layer, in units of the L2 size, and
#: the most it may be (64 L2s of an H200 are 3.8 GB of layers).
L2_TURNOVER = 3
MAX_L2_TURNOVER = 64
#: Name of the ragged rows' KV length column: the mean length of the batch.
RAGGED = "ragged"


@dataclass
class BenchRow:
    preset: str
    dtype: str
    batch: int
    kv_len: int
    ragged: bool
    cluster_size: int
    warps: int
    head_split: int  # MLA: the attention clusters a sequence
    layers: int
    fused_us: float
    torch_us: float
    floor_us: float
    rel_err: float
    #: the fused layer's ``kernel_options`` as ``name=value,...`` ("": the launch rule's kernel)
    options: str = ""
    #: sets of clusters the batch was split over (``KernelSpec.batch_parts``)
    batch_parts: int = 1
    #: whether the head split's clusters split the positions, sharing out the query projection
    #: (``KernelSpec.shared_queries``: the options', or the rule's: ``plan.shares_queries``)
    shared_queries: bool = False

    @property
    def fraction_of_copy_bw(self) -> float:
        """floor / fused: the fraction of measured copy bandwidth the fused step sustains."""
        return self.floor_us / self.fused_us


def graph_time_us(step, warmup: int = 1) -> float:
    """Median µs of one ``step()`` inside CUDA graphs of back-to-back steps (see :mod:`clusterlab.bench.timing`).

    ``warmup`` steps run first (compile, load, allocate: nothing of that may happen in a capture).
    """
    for _ in range(warmup):
        step()
    return graph_per_op_us(step, count=GRAPH_STEPS, repeats=REPEATS).median


def ragged_lengths(batch: int, kv_lens, seed: int) -> list[int]:
    """``batch`` lengths spread evenly from ``min(kv_lens)`` to ``max(kv_lens)``, shuffled."""
    low, high = min(kv_lens), max(kv_lens)
    lengths = [low + round((high - low) * i / max(batch - 1, 1)) for i in range(batch)]
    random.Random(seed).shuffle(lengths)
    return lengths


def check_l2_turnover(turnover) -> None:
    """Refuse an ``l2_turnover`` that is not a number in 0..:data:`MAX_L2_TURNOVER` (before any GPU work)."""
    if not is_number_in(turnover, 0, MAX_L2_TURNOVER):
        raise ValueError(f"l2_turnover must be a number in 0..{MAX_L2_TURNOVER}, got {turnover!r}")


def layers_for_l2(step_bytes: int, l2_bytes: int, turnover: float = L2_TURNOVER) -> int:
    """How many layers a rotation needs so that a pass over them moves ``turnover`` L2s (0: one layer)."""
    return max(1, math.ceil(turnover * l2_bytes / step_bytes))


class _Family(NamedTuple):
    """The classes and functions one kind of attention block is benchmarked with, and what the third
    number of its launch shape is (a keyword of its fused layer, a letter in the table)."""

    weights: type
    cache: type
    fused: type
    torch: type
    rope_table: Callable
    reference_step: Callable
    third: str
    letter: str


_LLAMA = _Family(AttentionWeights, KVCache, DecodeAttention, UnfusedAttention, rope_table, reference_step,
                 "head_split", "S")
_MLA = _Family(MLAWeights, LatentCache, DecodeMLA, UnfusedMLA, mla_rope_table, mla_reference_step,
               "attention_clusters", "A")


def _family(config) -> _Family:
    return _MLA if isinstance(config, MLAConfig) else _LLAMA


def variant_options(config, variant: tuple[int, ...]) -> dict:
    """A ``--variant`` tuple as the fused layer's keyword arguments: the third number is the head
    split of a Llama-style block, the attention clusters a sequence of an MLA block."""
    return dict(zip(("cluster_size", "warps", _family(config).third), variant))


class _Rotation:
    """``copies`` layers, each with weights, cache and inputs of its own; ``step()`` runs the next.

    ``weights``: a list the rotation takes its layers' weights from, drawn as needed and kept
    (one list per preset and dtype, so a run draws each layer's weights once).
    """

    def __init__(self, config, dtype, batch, lengths, copies, seed, variant, weights: list):
        family = _family(config)
        capacity = max(lengths)
        self.positions = torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device="cuda")
        self.lengths = lengths
        # the rows the longest sequence attends to, as a decode loop knows it: picks the launch shape
        self.hint = {"longest": max(lengths)}
        while len(weights) < copies:
            weights.append(family.weights.random(config, dtype, "cuda", seed=seed + 3 * len(weights)))
        rope = family.rope_table(config, capacity, device="cuda")
        self.sets = []
        for copy in range(copies):
            gen = torch.Generator(device="cuda").manual_seed(seed + 3 * copy + 1)
            hidden, residual = (torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
                                for _ in range(2))
            self.sets.append({
                "weights": weights[copy], "hidden": hidden, "residual": residual,
                "cache": family.cache.random(config, batch, capacity, dtype, "cuda", seed=seed + 3 * copy + 2),
                "fused": family.fused(config, weights[copy], **variant),
                "torch": family.torch(config, weights[copy], rope),
            })
        self.config, self.family, self._next = config, family, itertools.cycle(range(copies))

    def fused(self):
        s = self.sets[next(self._next)]
        s["fused"](s["hidden"], s["residual"], s["cache"], self.positions, **self.hint)

    def torch(self, ragged: bool):
        s = self.sets[next(self._next)]
        if ragged:
            s["torch"](s["hidden"], s["residual"], s["cache"], self.positions, length=max(self.lengths))
        else:
            s["torch"](s["hidden"], s["residual"], s["cache"], self.lengths[0] - 1)

    def error(self) -> float:
        """Relative error of the first layer's step against the float64 reference (its cache untouched)."""
        s = self.sets[0]
        positions = self.positions.tolist()
        want = self.family.reference_step(self.config, s["weights"], s["hidden"], s["residual"], s["cache"], positions)
        out, _ = s["fused"](s["hidden"], s["residual"], s["cache"].clone(), self.positions, **self.hint)
        return relative_error(out, want.out)

    def clusters_fit(self) -> tuple[int, int] | None:
        """(clusters one step launches, clusters the GPU can hold at once) for the first layer's
        one launch; ``None`` for the MLA block's three."""
        if self.family is _MLA:
            return None
        s = self.sets[0]
        layer, batch = s["fused"], len(self.lengths)
        out = torch.empty_like(s["hidden"])
        args = layer.launch_args(s["hidden"], s["residual"], s["cache"], self.positions, out, torch.empty_like(out))
        spec = layer.kernel_spec(out.dtype, batch, **self.hint)
        return spec.clusters, layer.launcher(out.dtype, batch, **self.hint).max_active_clusters(*args)


def bench_kernels(presets, batches, dtypes, variants, options):
    """``(preset, dtype name, batch, variant)`` of every fused kernel configuration a run times, in
    its order; ``variant``: the fused layer's keyword arguments (a launch shape, ``kernel_options``)."""
    options = [{}] if options is None else options
    for name, dtype_name in itertools.product(presets, dtypes):
        config = PRESETS[name]
        shapes = [{}] if variants is None else [variant_options(config, v) for v in variants]
        shapes = [shape | ({"kernel_options": o} if o else {}) for shape in shapes for o in options]
        for batch, variant in itertools.product(batches, shapes):
            yield name, dtype_name, batch, variant


def bench_cases(batch: int, kv_lens, ragged: bool, seed: int) -> list[tuple[bool, list[int]]]:
    """``(is_ragged, lengths)`` of the rows a run times at ``batch``: each KV length for every
    sequence, then (``ragged``, batch > 1) lengths spread over them."""
    cases = [(False, [kv] * batch) for kv in kv_lens]
    if ragged and batch > 1:
        cases.append((True, ragged_lengths(batch, kv_lens, seed + batch)))
    return cases


def compile_kernels(task) -> float:
    """Run one fused step of every row of a (preset, dtype, batch, variant), one layer each, timing
    nothing: the kernels those rows launch get compiled and kept in the kernel cache
    (:mod:`clusterlab.kernel_cache`) for the process that times them. A worker of
    :func:`precompile`; ``task``: ``(preset, dtype name, batch, variant, kv_lens, ragged, seed)``.
    Returns the seconds it took; a variant the layer refuses is left to the timing run to name."""
    start = time.perf_counter()
    name, dtype_name, batch, variant, kv_lens, ragged, seed = task
    config, dtype, weights = PRESETS[name], getattr(torch, dtype_name), []
    for _, lengths in bench_cases(batch, kv_lens, ragged, seed):
        try:
            _Rotation(config, dtype, batch, lengths, 1, seed, variant, weights).fused()
        except ValueError:
            break
    torch.cuda.synchronize()
    return time.perf_counter() - start


def precompile(tasks: list, jobs: int, worker: Callable = compile_kernels) -> None:
    """Compile the kernels of ``tasks`` in ``jobs`` processes at once, ``worker(task)`` (a module-level
    function returning the seconds it took; default :func:`compile_kernels`) in each (spawned: each
    has a CUDA context of its own), so that the timing run finds them in the kernel cache instead of
    compiling one after another: numba compiles a fused kernel in 20-30 s on one CPU core."""
    import concurrent.futures
    import multiprocessing

    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        spent = sum(pool.map(worker, tasks))
    print(f"compiled the kernels of {len(tasks)} configurations in {time.perf_counter() - start:.0f} s "
          f"({spent:.0f} s of work in {jobs} processes)", flush=True)


def run_bench(
    presets=tuple(PRESETS),
    kv_lens=KV_LENGTHS,
    batches=BATCHES,
    dtypes=("float16",),
    variants=None,
    options=None,
    ragged: bool = True,
    out_dir: str | os.PathLike = "benchmarks/results",
    tag: str | None = None,
    seed: int = 0,
    l2_turnover: float = L2_TURNOVER,
    jobs: int = 1,
) -> list[BenchRow]:
    """Time every (preset, dtype, batch, kv_len), and the ragged batches; write ``fused_<tag>.json`` / ``.png``.

    ``variants``: ``(cluster_size, warps)`` or ``(cluster_size, warps, head_split)`` tuples to time
    for the fused kernel (``()`` among them, or ``None``: the launch rule's shape; an MLA preset reads the third number as
    its attention clusters a sequence). ``options``: dicts of the Llama-style layer's
    ``kernel_options`` (:data:`~clusterlab.fused.plan.KERNEL_CHOICES`) to time, each with every
    variant (``None``: the launch rule's kernel). ``tag``: the results' suffix, by
    default the card's (:func:`~clusterlab.bench.timing.card_tag`). ``l2_turnover``: see
    :func:`layers_for_l2` (0 times one layer over and over, as runs before the rotation did).
    ``jobs``: above 1, first compile every kernel the run needs in that many processes at once
    (:func:`precompile`; needs the kernel cache, :func:`clusterlab.kernel_cache.cache_dir`), then time
    them one after another as always. Returns the rows (also printed as a table).
    """
    presets = check_settings_list("presets", presets, f"among {list(PRESETS)}", PRESETS.__contains__)
    check_settings_list("kv_lens", kv_lens, f"integers in 1..{MAX_POSITIONS}",
                        lambda n: is_int(n) and 1 <= n <= MAX_POSITIONS)
    check_settings_list("batches", batches, f"integers in 1..{MAX_BATCH}", is_batch)
    check_settings_list("dtypes", dtypes, "among ('float16', 'bfloat16')", ("float16", "bfloat16").__contains__)
    for variant in variants or ():
        check_variant(variant)
    options = [{}] if options is None else options
    for name in presets:  # each preset's layer takes its own kernel_options: the Llama block's, or the MLA block's
        choices = MLA_KERNEL_CHOICES if isinstance(PRESETS[name], MLAConfig) else KERNEL_CHOICES
        for o in options:
            try:
                check_kernel_options(o, choices)
            except ValueError as exc:
                raise ValueError(f"--spec for {name}: {exc}") from None
    if not (is_int(jobs) and jobs >= 1):
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    check_l2_turnover(l2_turnover)
    if jobs > 1 and cache_dir() is None:
        raise ValueError(f"jobs={jobs} compiles ahead into the kernel cache, which ${CACHE_DIR_ENV} turns off")
    writable_dir(out_dir)
    info, tag, bandwidth = measure_card(tag)
    l2_bytes = info["l2_bytes"]  # the driver's figure, as DeviceLimits.of reads it
    kernels = list(bench_kernels(presets, batches, dtypes, variants, options))
    if jobs > 1:
        precompile([(*kernel, tuple(kv_lens), ragged, seed) for kernel in kernels], jobs)
    rows: list[BenchRow] = []
    weights, drawn_for = [], None  # the layers' weights of one preset and dtype, drawn once for its rows
    for name, dtype_name, batch, variant in kernels:
        config, dtype = PRESETS[name], getattr(torch, dtype_name)
        if (name, dtype_name) != drawn_for:
            weights, drawn_for = [], (name, dtype_name)
        label = options_label(variant.get("kernel_options", {}))
        shown = None  # the launch shape last described (it may change with the cache length)
        for is_ragged, lengths in bench_cases(batch, kv_lens, ragged, seed):
            step_bytes = config.step_bytes(batch, lengths)
            copies = layers_for_l2(step_bytes, l2_bytes, l2_turnover)
            try:
                run = _Rotation(config, dtype, batch, lengths, copies, seed, variant, weights)
                run.sets[0]["fused"].kernel_spec(dtype, batch, **run.hint)
            except ValueError as exc:
                run = None  # frees a rotation that was built
                if "cluster_size" not in variant:  # the launch rule's shape, which may change with the length
                    if not label:
                        raise  # the launch rule's own kernel must run
                    print(f"{name} {dtype_name} batch {batch} kv {max(lengths)}: the rule's shape with [{label}] "
                          f"skipped: {exc}", flush=True)
                    continue
                given = "x".join(str(variant[k]) for k in ("cluster_size", "warps", _family(config).third)
                                 if k in variant)  # the variant as --variant names it
                print(f"{name} {dtype_name} batch {batch}: variant {given} skipped: {exc}", flush=True)
                break
            cluster_size, warps, head_split = run.sets[0]["fused"].shape(batch, **run.hint)
            mla = _family(config) is _MLA
            parts = run.sets[0]["fused"].batch_parts(batch, **run.hint) if not mla else 1
            shared = not mla and run.sets[0]["fused"].shares_queries(batch, **run.hint)
            if (cluster_size, warps, head_split, parts, shared) != shown:
                shown = (cluster_size, warps, head_split, parts, shared)
                fit = run.clusters_fit()
                third = (f"head split {head_split}: {fit[0]} clusters launched, {fit[1]} fit at once" if fit
                         else f"{head_split} attention clusters of "
                              f"{run.sets[0]['fused'].attention_cluster_size(batch)} a sequence")
                if parts > 1:
                    share = set_batch(batch, parts)
                    last = batch - (parts - 1) * share
                    third += f", {parts} sets of {share} sequences" + (f" (the last {last})" if last < share else "")
                if shared and not label:  # the rule's (plan.shares_queries), not asked for by name
                    third += ", positions split, query projection shared out"
                print(f"{name} {dtype_name} batch {batch}: clusters of {cluster_size} x {warps} warps, {third}"
                      + (f" [{label}]" if label else ""), flush=True)
            err = run.error()
            row = BenchRow(
                name, dtype_name, batch, round(sum(lengths) / batch), is_ragged, cluster_size, warps, head_split,
                len(run.sets), fused_us=graph_time_us(run.fused, warmup=len(run.sets)),
                torch_us=graph_time_us(functools.partial(run.torch, is_ragged), warmup=len(run.sets)),
                floor_us=step_bytes / bandwidth * 1e6, rel_err=err,
                options=label, batch_parts=parts, shared_queries=shared,
            )
            rows.append(row)
            print(_format_row(row), flush=True)
            _write(rows, bandwidth, l2_bytes, Path(out_dir), tag, info)  # after each row: a cut-short run keeps its rows
            del run
    print(format_table(rows, bandwidth))
    return rows


def _format_row(r: BenchRow) -> str:
    kv = f"{RAGGED}~{r.kv_len:5d}" if r.ragged else f"kv={r.kv_len:6d}"
    return (
        f"{r.preset:11s} {r.dtype:8s} b={r.batch} {kv:12s} C={r.cluster_size:2d} W={r.warps:2d} "
        f"{_family(PRESETS[r.preset]).letter}={r.head_split} P={r.batch_parts} x{r.layers:<2d} "
        f"fused {r.fused_us:7.1f} us  torch {r.torch_us:7.1f} us  floor {r.floor_us:7.1f} us  "
        f"{100 * r.fraction_of_copy_bw:5.1f}% of copy BW  {r.torch_us / r.fused_us:4.2f}x torch  err {r.rel_err:.1e}"
        + (f"  [{r.options}]" if r.options else "")
    )


def format_table(rows: list[BenchRow], bandwidth: float) -> str:
    lines = [f"fused decode attention vs PyTorch graph vs floor at {bandwidth / 1e12:.2f} TB/s"]
    lines += [_format_row(r) for r in rows]
    return "\n".join(lines)


def _write(rows, bandwidth, l2_bytes: int, out_dir: Path, tag: str, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **results_header(info),
        "copy_bandwidth_tbps": bandwidth / 1e12,
        "l2_bytes": l2_bytes,  # the launch rule reads it (plan.batch_sets)
        "rows": [asdict(r) | {"fraction_of_copy_bw": r.fraction_of_copy_bw} for r in rows],
    }
    write_json(record, out_dir / f"fused_{tag}.json")
    _plot(rows, record, out_dir / f"fused_{tag}.png")


def variant_key(row: BenchRow) -> tuple:
    """What tells apart the fused kernels a run times at one (preset, dtype, batch): the launch shape,
    whether the split shares out the query projection, and the options."""
    return row.cluster_size, row.warps, row.head_split, row.shared_queries, row.options


def _plot(rows, record, path: Path) -> None:
    """One panel a (preset, dtype): µs per step against KV length, a colour per batch and a fused line per
    kernel (launch shape and options, named where a batch has several); ragged batches as stars."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    panels = sorted({(r.preset, r.dtype) for r in rows})
    fig = Figure(figsize=(4.4 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (preset, dtype) in zip(axes[0], panels):
        mine = [r for r in rows if (r.preset, r.dtype) == (preset, dtype)]
        for i, batch in enumerate(sorted({r.batch for r in mine})):
            color = f"C{i}"
            even = sorted((r for r in mine if r.batch == batch and not r.ragged), key=lambda r: r.kv_len)
            kernels = list(dict.fromkeys(variant_key(r) for r in mine if r.batch == batch))
            for j, kernel in enumerate(kernels):
                its = [r for r in even if variant_key(r) == kernel]
                c, w, s, shared, options = kernel
                split = " queries shared" if shared and not options else ""  # the rule's (plan.shares_queries)
                name = f" {c}x{w}x{s}{split}" + (f" [{options}]" if options else "") if len(kernels) > 1 else ""
                ax.plot([r.kv_len for r in its], [r.fused_us for r in its], "o^vDsP"[j % 6] + "-", color=color,
                        alpha=1 - 0.3 * (j > 0), label=f"fused, batch {batch}{name}")
            baseline: dict = {}  # the PyTorch step and the floor once a KV length: its first row (the
            for r in even:       # rule's kernel may change shape with the length, each a line of its own)
                baseline.setdefault(r.kv_len, r)
            baseline = list(baseline.values())
            ax.plot([r.kv_len for r in baseline], [r.torch_us for r in baseline], "s:", color=color, alpha=0.6,
                    label=f"PyTorch graph, batch {batch}")
            ax.plot([r.kv_len for r in baseline], [r.floor_us for r in baseline], "--", color="k", alpha=0.25)
            for r in mine:
                if r.batch == batch and r.ragged:
                    ax.plot([r.kv_len], [r.fused_us], "*", color=color, markersize=11)
                    ax.plot([r.kv_len], [r.torch_us], "x", color=color, markersize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV length (ragged: mean length, stars fused, x PyTorch)")
        ax.set_ylabel("µs per decode step")
        ax.set_title(f"{preset}, {dtype} (dashed: floor)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{record['card']}, copy {record['copy_bandwidth_tbps']:.2f} TB/s, {record['date'][:10]}, "
                 f"{short_commit(record['commit'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_LAUNCH_SHAPE = dimensions("CWS", "cluster size x warps [x head split]", "8x4 or 16x4x2, or rule")


def check_variant(variant: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``variant`` is ``()`` (the launch rule's shape) or ``(cluster_size,
    warps)`` / ``(cluster_size, warps, third)`` with a cluster size of
    :data:`~clusterlab.fused.plan.CLUSTER_SIZES`, warps of :data:`~clusterlab.fused.plan.WARP_COUNTS`
    and a positive third number (a head split, or an MLA block's attention clusters a sequence):
    what every fused layer refuses, checked before the run touches the GPU."""
    if variant == ():
        return
    if not (isinstance(variant, tuple) and len(variant) in (2, 3) and all(is_int(v) for v in variant)):
        raise ValueError(f"a variant is () or (cluster_size, warps[, head split or attention clusters]) ints, "
                         f"got {variant!r}")
    cluster_size, warps, *third = variant
    if cluster_size not in CLUSTER_SIZES:
        raise ValueError(f"variant {variant!r}: cluster size must be one of {CLUSTER_SIZES}, got {cluster_size}")
    if warps not in WARP_COUNTS:
        raise ValueError(f"variant {variant!r}: warps must be one of {WARP_COUNTS}, got {warps}")
    if third and third[0] < 1:
        raise ValueError(f"variant {variant!r}: its third number (head split, or MLA's attention clusters) must be "
                         f">= 1, got {third[0]}")


@argument_type
def parse_variant(text: str) -> tuple[int, ...]:
    """``"8x4"`` -> ``(8, 4)``, ``"16x4x2"`` -> ``(16, 4, 2)``: cluster size x warps [x head split];
    ``"rule"`` -> ``()``, the launch rule's shape (nothing given). Values :func:`check_variant` refuses
    raise ``ArgumentTypeError``."""
    if text == "rule":
        return ()
    variant = _LAUNCH_SHAPE(text)
    check_variant(variant)
    return variant


def options_label(options: dict) -> str:
    """``{"registers": 168, "kv_pipeline": False}`` -> ``"registers=168,kv_pipeline=False"``: how a
    results row names its ``kernel_options`` (what :func:`parse_options` reads back)."""
    return ",".join(f"{k}={v}" for k, v in options.items())


@argument_type
def parse_options(text: str, choices: dict = KERNEL_CHOICES) -> dict:
    """``"registers=168,kv_pipeline=False"`` -> ``{"registers": 168, "kv_pipeline": False}``: the
    fused layer's ``kernel_options`` (values ``None``, ``True``, ``False`` or an int), checked
    against ``choices`` (:data:`~clusterlab.fused.plan.KERNEL_CHOICES`, or the MLP's);
    ``"default"`` -> ``{}``, the launch rule's kernel."""
    if text == "default":
        return {}
    literals = {"None": None, "True": True, "False": False}
    options = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not (value in literals or value.isdigit()):
            raise argparse.ArgumentTypeError(
                "must look like name=value[,name=value] with values None, True, False or an int, e.g. "
                f"registers=168 or attention_mma=False,kv_pipeline=None; got {text!r}"
            )
        options[name] = literals[value] if value in literals else int(value)
    return check_kernel_options(options, choices)


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m clusterlab.bench.fused",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", action=Distinct, default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--kv", nargs="+", action=Distinct, type=integer(1, MAX_POSITIONS), default=list(KV_LENGTHS),
                        help="cached positions a sequence attends to, its new token included")
    parser.add_argument("--batch", nargs="+", action=Distinct, type=integer(1, MAX_BATCH), default=list(BATCHES))
    parser.add_argument("--dtype", nargs="+", action=Distinct, default=["float16"], choices=("float16", "bfloat16"))
    parser.add_argument("--no-ragged", action="store_true", help="skip the ragged batches")
    parser.add_argument("--variant", nargs="+", action=Distinct, default=None, metavar="CxW", type=parse_variant,
                        help="fused variants as cluster_size x warps [x head_split; MLA: x attention clusters a "
                             "sequence], e.g. 8x4 16x4x2, or rule (the launch rule's shape), e.g. rule 16x8x1")
    parser.add_argument("--spec", nargs="+", default=None, metavar="NAME=VALUE,...",
                        type=functools.partial(parse_options, choices=KERNEL_CHOICES | MLA_KERNEL_CHOICES),
                        help="time the fused kernel with these kernel_options (each with every variant), e.g. "
                             f"default registers=168 attention_mma=False ('default': the launch rule's kernel); "
                             f"names: {', '.join(KERNEL_CHOICES)}; for deepseek-v2-lite: "
                             f"{', '.join(MLA_KERNEL_CHOICES)}")
    parser.add_argument("--out-dir", type=results_folder, default="benchmarks/results")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the output files (default: the card's name)")
    parser.add_argument("--l2-turnover", type=number(0, MAX_L2_TURNOVER), default=L2_TURNOVER,
                        help="L2 sizes moved between two visits of a layer (0: one layer, no rotation)")
    parser.add_argument("--jobs", type=integer(1, 64), default=1,
                        help="compile every kernel of the run first, in this many processes at once (into the kernel "
                             "cache), then time them one after another; 1: compile each when its first row needs it")
    args = parser.parse_args(argv)
    run_bench(args.preset, args.kv, args.batch, args.dtype, args.variant, args.spec, not args.no_ragged, args.out_dir,
              args.tag, l2_turnover=args.l2_turnover, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
