"""Timeline of one fused decode step: when every block crosses each phase boundary, and on which SM it ran.

    python -m clusterlab.bench.fused_timeline [--preset llama2-7b] [--kv 1024] [--batch 1] [--shape 4x8 8x4]
    python -m clusterlab.bench.fused_timeline --preset qwen2.5-7b --batch 8 --kv 16384 --shape 16x4x1x4 16x8x1x2
    python -m clusterlab.bench.fused_timeline --preset llama3-8b --shape 16x4x2 --spec default split_kv_rows=True
    python -m clusterlab.bench.fused_timeline --layer mlp [--preset llama3-8b] [--batch 1] [--shape 2x8 2x16]
    python -m clusterlab.bench.fused_timeline --layer mla [--batch 1] [--kv 1024] --spec default one_launch=True

The kernel is the layer's own (the attention block's, or with ``--layer mlp`` the MLP block's),
built with its spec's ``timeline`` on (:func:`clusterlab.fused.kernel.build_kernel`,
:func:`clusterlab.fused.mlp_kernel.build_mlp_kernel`: the stamps sit at the phase boundaries of the
kernel's source and are compiled only into this variant; with ``--layer mla`` the MLA block's kernels,
:attr:`clusterlab.fused.mla_kernel.MLASpec.timeline`). Thread 0 of every block records
``ptx.clock64()`` (cycle-exact, per SM) and ``ptx.global_timer()`` (one clock for the whole GPU, 256
ns steps on an H100) at each boundary, and ``ptx.sm_id()`` once. Thread 0 belongs to warp 0, so a
boundary inside a phase ("W_qkv stream", "rope", "merge") is where warp 0 got to; the boundaries
after a barrier or ``syncthreads`` hold for the whole block. The phases are
:data:`clusterlab.fused.kernel.TIMELINE_PHASES`, :data:`clusterlab.fused.mlp_kernel.TIMELINE_PHASES` and
:data:`clusterlab.fused.mla_kernel.MLA_TIMELINE_PHASES`.

The MLA block (``--layer mla``, the ``deepseek-v2-lite`` shape, its layer's launch rule) is recorded once for
each ``--spec`` (its kernel options: ``default``, the three launches, and ``one_launch=True``): every block
of every launch of one step on one clock, each with its role (``projections``, ``attention``, ``output``:
the launch it belongs to, or the ticket its cluster took in the one launch), so the launches' gaps and the
one launch's waits show beside the work (no block is called crowded: the roles' blocks do not all run at once).

Each launch shape (attention: ``CxW``, ``CxWxS`` or ``CxWxSxP``, cluster size x warps per block x head
split x sets of clusters the batch is split over, the kernel option ``batch_parts``; MLP: ``CxW``, the
clusters following :func:`~clusterlab.fused.mlp.mlp_shape`, by default the layer's own shape; for the attention
block, each shape with each of the ``--spec`` kernel options, as ``clusterlab bench fused`` takes them) is timed plain
and instrumented as CUDA-graph replays (the stores cost about 1%), then one step is recorded as a graph
replays it (no host gaps between the MLA block's launches). Printed: per-phase durations over the blocks
(min / median / max), how many blocks each SM held, and when the blocks finished. A block is *crowded* when
its SM holds more blocks than an even spread of the grid over the SMs it used would give. Written:
``fused_timeline_<tag>.json`` (``mlp_timeline_<tag>`` with ``--layer mlp``, ``mla_timeline_<tag>`` with
``--layer mla``: every block's SM, start and phase durations) and ``.png`` (one bar per block, coloured by
phase, crowded blocks on top, marked; the MLA block's by role).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from ..argtypes import Distinct, argument_type, dimensions, integer, results_folder, results_tag
from ..fused import PRESETS, AttentionWeights, DecodeAttention, KVCache, reference_step, relative_error
from ..fused import kernel, mlp_kernel
from ..fused.config import MAX_BATCH, MAX_POSITIONS
from ..fused.layer import kernel_launcher
from ..fused.mla import MLA_PRESETS, LatentCache, MLAWeights
from ..fused.mla_kernel import MLA_TIMELINE_PHASES, MLA_TIMELINE_STAMPS
from ..fused.mla_layer import DecodeMLA, mla_launchers, mla_step_launcher
from ..fused.mla_reference import mla_reference_step
from ..fused.mlp import DecodeMLP, MLPWeights, mlp_launcher, reference_mlp
from ..gpu import device_info, require_hopper
from ..fused.plan import KERNEL_CHOICES, MLA_KERNEL_CHOICES, check_kernel_options
from .fused import check_variant, parse_options
from .mlp import mlp_config
from .timing import capture_graph, card_tag, graph_per_op_us, results_header, write_json

#: Each phase's colour in the plot: streams blue / teal, DSMEM work orange, barrier waits red, the
#: rest grey and brown.
PHASE_COLOURS = {
    "inputs": "#b0b0b0", "W_qkv stream": "#4c72b0", "B1 wait": "#c44e52", "rope + push": "#dd8452",
    "B2 wait": "#e8a0a0", "attention": "#64b5cd", "block merge": "#f0c080", "B3 wait": "#c44e52",
    "o merge + B4": "#dd8452", "W_o stream + red.add": "#2a9d8f", "fence + arrive": "#937860", "finish": "#6b6b6b",
    "inputs + W_gate/W_up stream": "#4c72b0", "act + push": "#dd8452", "W_down stream + red.add": "#2a9d8f",
    "ticket": "#b0b0b0", "loads + wait": "#c44e52", "work": "#4c72b0", "count in + finish": "#6b6b6b",
}
#: The MLA block's roles in the order a step runs them (launches 1, 2, 3, or the one launch's tickets).
MLA_ROLES = ("projections", "attention", "output")


def record_shape(config, weights, dtype, batch, kv_len, cluster_size, warps, head_split=None, batch_parts=None,
                 options=None):
    """Time one launch shape of the attention block (``batch_parts`` sets of its clusters, None: one;
    ``options``: the layer's ``kernel_options``) and record one step's stamps: a dict for the JSON."""
    options = dict(options or {}) | ({} if batch_parts is None else {"batch_parts": batch_parts})
    layer = DecodeAttention(config, weights, cluster_size=cluster_size, warps=warps, head_split=head_split,
                            kernel_options=options)
    cache = KVCache.random(config, batch, kv_len, dtype, "cuda", seed=1)
    hidden, residual = torch.randn(2, batch, config.hidden_size, device="cuda").to(dtype)
    out, new_residual = torch.empty_like(hidden), torch.empty_like(hidden)
    position = kv_len - 1
    want = reference_step(config, weights, hidden, residual, cache.clone(), position)
    spec = layer.kernel_spec(dtype, batch)
    blocks = spec.clusters * cluster_size
    stamps = torch.zeros(blocks * kernel.TIMELINE_STAMPS * 2, dtype=torch.uint64, device="cuda")
    sms = torch.full((blocks,), 2**32 - 1, dtype=torch.uint32, device="cuda")
    args = layer.launch_args(hidden, residual, cache, position, out, new_residual) + (stamps, sms)
    plain = functools.partial(layer, hidden, residual, cache, position, out=out, residual_out=new_residual)
    step = functools.partial(kernel_launcher(dataclasses.replace(spec, timeline=True)), *args)
    return _record(plain, step, out, want.out, stamps, sms, blocks, cluster_size,
                   {"cluster_size": cluster_size, "warps": warps, "head_split": spec.head_split,
                    "batch_parts": spec.batch_parts, "kv_rows_split": spec.kv_rows_split, "options": options})


def record_mlp_shape(config, weights, dtype, batch, cluster_size=None, warps=None):
    """Time one launch shape of the MLP block (None: the layer's own) and record one step's stamps: a
    dict for the JSON."""
    layer = DecodeMLP(config, weights, cluster_size=cluster_size, warps=warps)
    hidden, residual = torch.randn(2, batch, config.hidden_size, device="cuda").to(dtype)
    out, new_residual = torch.empty_like(hidden), torch.empty_like(hidden)
    want, _ = reference_mlp(weights, hidden, residual, config.rms_eps)
    spec = layer.kernel_spec(dtype, batch)
    cluster_size, warps = spec.cluster_size, spec.warps
    blocks = spec.clusters * cluster_size
    stamps = torch.zeros(blocks * mlp_kernel.TIMELINE_STAMPS * 2, dtype=torch.uint64, device="cuda")
    sms = torch.full((blocks,), 2**32 - 1, dtype=torch.uint32, device="cuda")
    args = layer.launch_args(hidden, residual, out, new_residual) + (stamps, sms)
    plain = functools.partial(layer, hidden, residual, out=out, residual_out=new_residual)
    step = functools.partial(mlp_launcher(dataclasses.replace(spec, timeline=True)), *args)
    return _record(plain, step, out, want, stamps, sms, blocks, cluster_size,
                   {"cluster_size": cluster_size, "clusters": spec.clusters, "warps": warps})


def record_mla_step(config, weights, dtype, batch, kv_len, options=None, warps=None):
    """Time one step of the MLA block (``options``: the layer's ``kernel_options``; ``warps``: of launches 1
    and 3, None: the layer's default) and record its stamps, every block of every launch on one clock: a
    dict for the JSON, each block with its role."""
    layer = DecodeMLA(config, weights, warps=warps, kernel_options=options)
    cache = LatentCache.random(config, batch, kv_len, dtype, "cuda", seed=1)
    hidden, residual = torch.randn(2, batch, config.hidden_size, device="cuda").to(dtype)
    out, new_residual = torch.empty_like(hidden), torch.empty_like(hidden)
    positions = torch.full((batch,), kv_len - 1, dtype=torch.int32, device="cuda")
    want = mla_reference_step(config, weights, hidden, residual, cache.clone(), [kv_len - 1] * batch)
    spec = layer.kernel_spec(dtype, batch, longest=kv_len)
    timed = dataclasses.replace(spec, timeline=True)
    heads, attention = spec.heads, spec.attention_clusters * batch
    if layer.one_launch:
        kernels = {"step": (mla_step_launcher(timed), spec.step_clusters)}
    else:
        kernels = dict(zip(MLA_ROLES, zip(mla_launchers(timed), (heads, attention, heads))))
    sizes = [spec.cluster_blocks(name) for name in kernels]  # blocks a cluster of each launch
    counts = [clusters * size for size, (_, clusters) in zip(sizes, kernels.values())]
    blocks = sum(counts)
    stamps = torch.zeros(blocks * MLA_TIMELINE_STAMPS * 2, dtype=torch.uint64, device="cuda")
    roles = torch.full((blocks, 2), 2**32 - 1, dtype=torch.uint32, device="cuda")
    args = layer.launch_args(hidden, residual, cache, positions, out, new_residual)
    starts = np.cumsum([0] + counts)

    def step():
        for (name, (launcher, _)), first, last in zip(kernels.items(), starts, starts[1:]):
            launcher(*args[name], stamps[first * MLA_TIMELINE_STAMPS * 2: last * MLA_TIMELINE_STAMPS * 2],
                     roles[first:last].view(-1))

    plain = functools.partial(layer, hidden, residual, cache, positions, out=out, residual_out=new_residual,
                              longest=kv_len)
    record = _record(plain, step, out, want.out, stamps, roles[:, 0], blocks, spec.cluster_size,
                     {"cluster_size": spec.cluster_size, "warps": spec.warps,
                      "attention_clusters": spec.attention_clusters,
                      "attention_cluster_size": spec.attention_cluster_size, "options": dict(options or {})})
    tickets = roles[:, 1].cpu().numpy().astype(np.int64)
    # Blocks per SM mean what runs at once; the launches' blocks do not, and the roles' only in part.
    del record["blocks_per_sm"]
    for b, block in enumerate(record["block"]):
        del block["sm_blocks"], block["crowded"]
        if layer.one_launch:  # the ticket's role: projections, attention, output, in that order
            bounds = np.cumsum([heads, attention])
            role = int(np.searchsorted(bounds, tickets[b], side="right"))
            block["cluster"] = int(tickets[b] - (0, *bounds)[role])
        else:
            role = int(np.searchsorted(starts[1:], b, side="right"))
            block["cluster"] = int(tickets[b])
            block["rank"] = int((b - starts[role]) % sizes[role])
        block["role"] = MLA_ROLES[role]
    return record


def mla_summary(shape, phases) -> str:
    """The MLA step by role: when its blocks started and ended, and each phase's median and largest."""
    lines = [f"{options_of(shape)[2:] or 'three launches'}: cluster {shape['cluster_size']} x {shape['warps']} "
             f"warps, {shape['attention_clusters']} attention clusters of "
             f"{shape.get('attention_cluster_size', shape['cluster_size'])} a sequence, {shape['blocks']} blocks on "
             f"{shape['sms_used']} SMs; step {shape['step_us']:.1f} µs (instrumented {shape['instrumented_us']:.1f}), "
             f"SM clock {shape['sm_clock_ghz']:.2f} GHz, rel err {shape['rel_err']:.0e}",
             f"  {'role':<12} {'blocks':>6} {'start':>13} {'end':>13}   " + "  ".join(
                 f"{name:>17}" for name in phases) + "   (µs: first/last; phases median/max)"]
    for role in MLA_ROLES:
        mine = [b for b in shape["block"] if b["role"] == role]
        if not mine:
            continue
        phase = np.array([b["phase_us"] for b in mine])
        start = np.array([b["start_us"] for b in mine])
        end = start + phase.sum(axis=1)
        cells = "  ".join(f"{np.median(col):8.2f}/{col.max():<8.2f}" for col in phase.T)
        lines.append(f"  {role:<12} {len(mine):>6} {start.min():6.1f}/{start.max():<6.1f} "
                     f"{end.min():6.1f}/{end.max():<6.1f}   {cells}")
    return "\n".join(lines)


def _record(plain, step, out, want, stamps, sms, blocks, cluster_size, shape) -> dict:
    """Check the instrumented ``step`` against ``want``, time it and ``plain`` as graph replays, keep
    one step's stamps: ``shape`` with the figures and every block's SM, start and phases added."""
    out.fill_(float("nan"))
    step()
    err = relative_error(out, want)
    plain_us = graph_per_op_us(plain).median
    timed_us = graph_per_op_us(step).median
    capture_graph(step).replay()  # the step whose stamps are kept: caches warm, its launches as a graph runs them
    torch.cuda.synchronize()
    t = stamps.view(blocks, -1, 2).cpu().numpy().astype(np.int64)
    sm = sms.cpu().numpy().astype(np.int64)
    cycles, ns = t[:, :, 0], t[:, :, 1]
    ghz = float(np.median((cycles[:, -1] - cycles[:, 0]) / (ns[:, -1] - ns[:, 0])))
    phase_us = np.diff(cycles, axis=1) / ghz / 1e3
    start_us = (ns[:, 0] - ns[:, 0].min()) / 1e3
    per_sm = np.bincount(sm, minlength=int(sm.max()) + 1)
    typical = round(blocks / int((per_sm > 0).sum()))  # blocks an SM holds when the grid spreads evenly
    return {
        **shape, "blocks": blocks, "rel_err": err,
        "step_us": plain_us, "instrumented_us": timed_us, "sm_clock_ghz": ghz,
        "sms_used": int((per_sm > 0).sum()),
        "blocks_per_sm": {str(k): int((per_sm == k).sum()) for k in range(1, int(per_sm.max()) + 1)},
        "block": [
            {"sm": int(sm[b]), "cluster": b // cluster_size, "rank": b % cluster_size,
             "sm_blocks": int(per_sm[sm[b]]), "crowded": bool(per_sm[sm[b]] > typical),
             "start_us": round(float(start_us[b]), 3),
             "phase_us": [round(float(x), 3) for x in phase_us[b]]}
            for b in range(blocks)
        ],
    }


def sets_of(shape) -> int:
    """Sets of clusters a recorded shape ran as (``batch_parts``; 1 in records without it)."""
    return shape.get("batch_parts", 1)


def options_of(shape) -> str:
    """A shape's kernel options other than ``batch_parts`` (shown as its sets), as ``", name=value"``."""
    return "".join(f", {name}={value}" for name, value in shape.get("options", {}).items() if name != "batch_parts")


def summary(shape, phases) -> str:
    phase = np.array([b["phase_us"] for b in shape["block"]])
    done = np.array([b["start_us"] for b in shape["block"]]) + phase.sum(axis=1)
    arrive = done - phase[:, -1]
    split = f", head split {shape['head_split']}" if "head_split" in shape else f", {shape['clusters']} clusters"
    split += (f", {sets_of(shape)} sets" if sets_of(shape) > 1 else "") + options_of(shape)
    if shape.get("kv_rows_split") and shape.get("options", {}).get("split_kv_rows") is not True:
        split += ", K/V rows shared out"  # the rule's (KernelSpec.kv_rows_split), not asked for by name
    lines = [f"cluster {shape['cluster_size']} x {shape['warps']} warps{split}, {shape['blocks']} blocks on "
             f"{shape['sms_used']} SMs (SMs holding k blocks: {shape['blocks_per_sm']}); step {shape['step_us']:.1f} µs "
             f"(instrumented {shape['instrumented_us']:.1f}), SM clock {shape['sm_clock_ghz']:.2f} GHz, "
             f"rel err {shape['rel_err']:.0e}",
             f"  blocks arrive after the {phases[-3]} between {arrive.min():.1f} and {arrive.max():.1f} µs "
             f"(median {np.median(arrive):.1f}); last finish {done.max():.1f} µs",
             f"  {'phase':<18} {'min':>6} {'median':>7} {'max':>6}   µs; max on crowded SMs / on the others"]
    shared = np.array([b["crowded"] for b in shape["block"]])
    for j, name in enumerate(phases):
        col = phase[:, j]
        split = (f"{col[shared].max():6.2f} / {col[~shared].max():6.2f}" if shared.any() and (~shared).any() else "")
        lines.append(f"  {name:<18} {col.min():6.2f} {np.median(col):7.2f} {col.max():6.2f}   {split}")
    return "\n".join(lines)


def plot(record, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is
    from matplotlib.patches import Patch

    shapes, phases = record["shapes"], record["phases"]
    colours = [PHASE_COLOURS[name] for name in phases]
    fig = Figure(figsize=(6.5 * len(shapes), 7.5))
    axes = fig.subplots(1, len(shapes), squeeze=False, sharex=True)[0]
    for ax, shape in zip(axes, shapes):
        roles = "role" in shape["block"][0]  # MLA: blocks by role, then by start; no crowding marked
        if roles:
            order = sorted(range(shape["blocks"]), key=lambda b: (MLA_ROLES.index(shape["block"][b]["role"]),
                                                                  shape["block"][b]["start_us"]))
        else:
            order = sorted(range(shape["blocks"]), key=lambda b: (shape["block"][b]["crowded"], b))
        for y, b in enumerate(order):
            block = shape["block"][b]
            left = block["start_us"]
            for j, width in enumerate(block["phase_us"]):
                ax.barh(y, width, left=left, height=1.0, color=colours[j], linewidth=0)
                left += width
            if not roles and block["crowded"]:
                ax.plot(-1.0, y, marker="4", color="crimson", ms=3)
            if roles and y and block["role"] != shape["block"][order[y - 1]]["role"]:
                ax.axhline(y - 0.5, color="black", linewidth=0.6)
            if roles and (y == 0 or block["role"] != shape["block"][order[y - 1]]["role"]):
                ax.annotate(block["role"], (0, y), xycoords=("axes fraction", "data"), xytext=(3, 3),
                            textcoords="offset points", fontsize=8)
        sets = f"{sets_of(shape)} sets of " if sets_of(shape) > 1 else ""
        ax.set(title=f"{sets}cluster {shape['cluster_size']} x {shape['warps']} warps"
                     f"{options_of(shape) or (', three launches' if roles else '')}: "
                     f"step {shape['step_us']:.1f} µs, {shape['sms_used']} SMs",
               xlabel="µs since the first block started",
               ylabel="block, by role and start" if roles else "block (on crowded SMs: on top, marked)")
        ax.set_ylim(-0.5, shape["blocks"] - 0.5)
    handles = [Patch(color=colour, label=name) for colour, name in zip(colours, phases)]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    positions = f", {record['kv_len']} positions" if record.get("kv_len") else ""
    fig.suptitle(f"{record.get('layer', 'attention')} block, {record['preset']} {record['dtype']} batch "
                 f"{record['batch']}{positions}: {record['card']}, {record['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


_shape_form = dimensions("CWSP", "cluster size x warps [x head split [x sets of clusters]]", "4x8 or 16x4x1x4")


@argument_type
def parse_shape(text: str) -> tuple[int, ...]:
    """``"16x4x1x4"`` -> ``(16, 4, 1, 4)``: cluster size x warps [x head split [x sets of clusters]] (an
    argparse ``type=``); sizes no layer takes (:func:`~clusterlab.bench.fused.check_variant`, sets below 1)
    raise ``ArgumentTypeError``."""
    numbers = _shape_form(text)
    check_variant(numbers[:3])
    if len(numbers) == 4 and numbers[3] < 1:
        raise ValueError(f"shape {numbers!r}: its sets of clusters must be >= 1, got {numbers[3]}")
    return numbers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="attention", choices=("attention", "mlp", "mla"),
                        help="the fused block to record (default: attention; mla: DeepSeek-V2-Lite's MLA block)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS) + list(MLA_PRESETS),
                        help="default: llama2-7b (mla: deepseek-v2-lite)")
    parser.add_argument("--kv", type=integer(1, MAX_POSITIONS), default=1024, help="cached positions (attention and mla)")
    parser.add_argument("--batch", type=integer(1, MAX_BATCH), default=1)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--shape", nargs="+", action=Distinct, default=None, metavar="CxW[xS[xP]]", type=parse_shape,
                        help="launch shapes as cluster_size x warps [x head_split [x sets of clusters]] (the MLP: "
                             "cluster_size x warps; default: 4x8 8x4, the MLP its layer's own)")
    parser.add_argument("--spec", nargs="+", default=[{}], metavar="NAME=VALUE,...",
                        type=functools.partial(parse_options, choices=KERNEL_CHOICES | MLA_KERNEL_CHOICES),
                        help="kernel options of the attention or MLA block, each recorded at every shape, e.g. "
                             "default split_kv_rows=True, or for mla default one_launch=True (default: the launch "
                             "rule's kernel alone)")
    parser.add_argument("--out-dir", type=results_folder, default="benchmarks/results")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the output files (default: the card's name)")
    args = parser.parse_args(argv)
    mlp, mla = args.layer == "mlp", args.layer == "mla"
    preset = args.preset or ("deepseek-v2-lite" if mla else "llama2-7b")
    if mla != (preset in MLA_PRESETS):
        parser.error(f"argument --preset: {preset} is not a preset of the {args.layer} block")
    if mlp and args.spec != [{}]:
        parser.error("argument --spec: kernel options are the attention or MLA block's")
    for options in args.spec:
        try:
            check_kernel_options(options, MLA_KERNEL_CHOICES if mla else KERNEL_CHOICES)
        except ValueError as exc:
            parser.error(f"argument --spec: for the {args.layer} block: {exc}")
    if mla and args.shape:
        parser.error("argument --shape: the MLA block runs its layer's launch rule")
    shapes = args.shape or ([()] if mlp else [(4, 8), (8, 4)])
    if mlp and args.shape and any(len(numbers) != 2 for numbers in shapes):
        parser.error(f"argument --shape: the MLP's launch shapes are cluster_size x warps, got "
                     f"{' '.join('x'.join(map(str, numbers)) for numbers in shapes)}")
    require_hopper()
    dtype = getattr(torch, args.dtype)
    if mlp:
        config = mlp_config(preset)
        weights = MLPWeights.random(config, dtype, "cuda", seed=0)
    elif mla:
        config = MLA_PRESETS[preset]
        weights = MLAWeights.random(config, dtype, "cuda", seed=0)
    else:
        config = PRESETS[preset]
        weights = AttentionWeights.random(config, dtype, "cuda", seed=0)
    info = device_info()
    tag = card_tag(info["gpu"]) if args.tag is None else args.tag
    record = {
        **results_header(info), "layer": args.layer,
        "preset": preset, "dtype": args.dtype, "batch": args.batch, "kv_len": None if mlp else args.kv,
        "phases": list(MLA_TIMELINE_PHASES if mla else (mlp_kernel if mlp else kernel).TIMELINE_PHASES), "shapes": [],
    }
    if mla:
        for options in args.spec:
            shape = record_mla_step(config, weights, dtype, args.batch, args.kv, options)
            record["shapes"].append(shape)
            print(mla_summary(shape, record["phases"]), flush=True)
    for options, numbers in itertools.product([] if mla else args.spec, shapes):
        if mlp:
            shape = record_mlp_shape(config, weights, dtype, args.batch, *numbers)
        else:
            shape = record_shape(config, weights, dtype, args.batch, args.kv, *numbers, options=options)
        record["shapes"].append(shape)
        print(summary(shape, record["phases"]), flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.layer if mlp or mla else 'fused'}_timeline_{tag}"
    write_json(record, out / f"{name}.json")
    plot(record, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
