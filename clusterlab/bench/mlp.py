"""``clusterlab bench mlp``: the fused MLP block against the same block as PyTorch calls and the bytes-moved floor, per layer.

For each preset (the MLP shapes of :data:`clusterlab.models.llama.MODEL_PRESETS`: ``hidden_size``,
``intermediate_size`` and ``rms_norm_eps`` of each model's config; default llama3-8b,
llama3.2-1b, llama2-7b and qwen2.5-7b), dtype (float16 unless ``--dtype`` says otherwise) and
batch (1, 2, 4, 8 sequences) it times, on one Hopper GPU in one process, one decoder layer's MLP
block on ``[batch, hidden_size]`` activations::

    h2  = out + h                               the new residual (out: the attention's output)
    n   = RMSNorm(h2) * post_attention_norm
    y   = down(silu(gate(n)) * up(n))

- **fused**: one :class:`~clusterlab.fused.mlp.DecodeMLP` step (one cluster kernel), into output
  buffers allocated once, at the launch shape :func:`~clusterlab.fused.mlp.mlp_shape` picks, or
  at each ``--variant CxW`` (cluster size x warps a block) asked for, and with each ``--spec``
  of ``kernel_options`` (:data:`~clusterlab.fused.plan.MLP_KERNEL_CHOICES`; ``default``: none);
- **torch**: the same block as the PyTorch calls a :class:`~clusterlab.models.llama.LlamaModel`
  with ``mlp="unfused"`` makes (``out + h``, :func:`~clusterlab.models.llama.rms_norm`,
  :func:`~clusterlab.models.llama.mlp`: three ``F.linear`` and a ``silu``);
- **floor**: :meth:`MLPConfig.step_bytes` (W_gate, W_up, W_down and the norm's gain read once,
  the two inputs read and the two outputs written) over the device-to-device copy bandwidth
  measured at the start of the run (bytes read + written by ``Tensor.copy_`` of 1 GiB,
  :func:`clusterlab.bench.timing.copy_bandwidth`).

Method: each time is one step's cost inside CUDA graphs of back-to-back steps, the slope between
graphs of 20 and 40 steps, median of 9 repeats (:func:`clusterlab.bench.timing.graph_per_op_us`,
through :func:`clusterlab.bench.fused.graph_time_us`), after a warm-up that runs every layer
once (compilation, cuBLAS workspaces: nothing of that may happen in a capture). Back-to-back
steps of one layer would find part of its weights in L2 (a Llama-3.2-1B MLP block is 96 MiB, an
H200's L2 50 MB), so the steps cycle through as many layers, each with weights and inputs of its
own, as it takes to move three times the L2 between two visits of a layer
(:func:`clusterlab.bench.fused.layers_for_l2`): what a model's decode step does. Before it is
timed, every (preset, dtype, batch, shape) checks the first layer's fused output, and PyTorch's,
against :func:`~clusterlab.fused.mlp.reference_mlp` (float64): the relative errors are columns
of the table. The shape used is printed with the clusters one step launches and the clusters the
GPU holds at once.

Results: a table on stdout, ``mlp_<card>.json`` (card, driver, software versions, date, commit,
copy bandwidth, L2 size, the rows) and ``mlp_<card>.png`` (µs per layer against batch, a panel
per preset and dtype: fused, PyTorch and the floor) under ``out_dir`` (default
``benchmarks/results``), written after every row so that a cut-short run keeps its rows;
``<card>`` read from the device (``h200`` for an NVIDIA H200) unless ``--tag`` names it. Without a
Hopper GPU the command exits 1 before it touches CUDA.

Run: ``clusterlab bench mlp`` or ``python -m clusterlab.bench.mlp`` (``--preset llama3.2-1b
--batch 1`` for a quick look; ``--variant 2x8 4x8 8x4`` to sweep launch shapes, ``--spec default
interleave_inputs=False`` for an A/B of the kernel).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..argtypes import Distinct, dimensions, integer, number, results_folder, results_tag
from ..fused.config import MAX_BATCH, is_batch
from ..fused.mlp import DecodeMLP, MLPConfig, MLPWeights, mlp_shape, reference_mlp
from ..fused.plan import HOPPER, MLP_KERNEL_CHOICES, check_kernel_options
from ..fused.reference import relative_error
from ..models.llama import DTYPES, MODEL_PRESETS, mlp, rms_norm
from .fused import (L2_TURNOVER, MAX_L2_TURNOVER, check_l2_turnover, graph_time_us, layers_for_l2, options_label,
                    parse_options)
from .timing import check_settings_list, measure_card, results_header, short_commit, writable_dir, write_json

PRESETS = tuple(p for p in ("llama3-8b", "llama3.2-1b", "llama2-7b", "qwen2.5-7b") if p in MODEL_PRESETS)
BATCHES = (1, 2, 4, 8)


@dataclass
class MLPRow:
    """One (preset, dtype, batch, launch shape): µs per layer of the fused and PyTorch blocks and the floor."""

    preset: str
    dtype: str
    batch: int
    cluster_size: int
    clusters: int
    warps: int
    blocks: int
    #: distinct layers the timed graphs cycle through
    layers: int
    fused_us: float
    torch_us: float
    floor_us: float
    #: MLPConfig.step_bytes(batch): what the floor moves
    step_bytes: int
    #: ‖fused − reference‖ / ‖reference‖ of the first layer's output (reference: float64)
    rel_err: float
    #: the same of the PyTorch block: the rounding the model dtype itself costs
    torch_rel_err: float
    #: the fused layer's ``kernel_options`` as ``name=value,...`` ("": the default kernel)
    options: str = ""

    @property
    def fraction_of_copy_bw(self) -> float:
        """floor / fused: the fraction of the measured copy bandwidth the fused step sustains."""
        return self.floor_us / self.fused_us

    @property
    def speedup(self) -> float:
        """torch / fused."""
        return self.torch_us / self.fused_us


def mlp_config(preset: str) -> MLPConfig:
    """The MLP block of ``MODEL_PRESETS[preset]``: its hidden and intermediate sizes and RMSNorm epsilon."""
    c = MODEL_PRESETS[preset]
    return MLPConfig(c.hidden_size, c.intermediate_size, float(c.rms_norm_eps))


def torch_mlp_block(weights: MLPWeights, out: torch.Tensor, h: torch.Tensor, eps: float):
    """``(next hidden, next residual)`` as PyTorch calls, as ``LlamaModel._mlp_block`` makes them
    (:func:`~clusterlab.models.llama.rms_norm`, :func:`~clusterlab.models.llama.mlp`; ``weights``
    has the ``gate`` / ``up`` / ``down`` that ``mlp`` reads)."""
    h2 = out + h
    return mlp(weights, rms_norm(h2, weights.norm, eps)), h2


class _Rotation:
    """``copies`` layers, each with weights and inputs of its own; ``fused()`` / ``torch()`` run the next.

    ``weights``: a list the rotation takes its layers' weights from, drawn as needed and kept
    (one list per preset and dtype, so a run draws each layer's weights once).
    """

    def __init__(self, config: MLPConfig, dtype, batch: int, copies: int, seed: int, variant: dict, weights: list):
        while len(weights) < copies:
            weights.append(MLPWeights.random(config, dtype, "cuda", seed=seed + 2 * len(weights)))
        self.sets = []
        for copy in range(copies):
            gen = torch.Generator(device="cuda").manual_seed(seed + 2 * copy + 1)
            hidden, residual = (torch.randn(batch, config.hidden_size, generator=gen, device="cuda").to(dtype)
                                for _ in range(2))
            self.sets.append({
                "weights": weights[copy], "hidden": hidden, "residual": residual,
                "out": torch.empty_like(hidden), "residual_out": torch.empty_like(hidden),
                "fused": DecodeMLP(config, weights[copy], **variant),
            })
        self.config, self.batch, self._next = config, batch, itertools.cycle(range(copies))

    def fused(self):
        s = self.sets[next(self._next)]
        s["fused"](s["hidden"], s["residual"], out=s["out"], residual_out=s["residual_out"])

    def torch(self):
        s = self.sets[next(self._next)]
        torch_mlp_block(s["weights"], s["hidden"], s["residual"], self.config.rms_eps)

    def errors(self) -> tuple[float, float]:
        """Relative errors of the first layer's fused and PyTorch outputs against the float64 reference."""
        s = self.sets[0]
        want, _ = reference_mlp(s["weights"], s["hidden"], s["residual"], self.config.rms_eps)
        out, residual = s["fused"](s["hidden"], s["residual"])
        if not torch.equal(residual, (s["hidden"] + s["residual"])):
            raise RuntimeError("the fused block's residual output is not hidden + residual")
        torch_out, _ = torch_mlp_block(s["weights"], s["hidden"], s["residual"], self.config.rms_eps)
        return relative_error(out, want), relative_error(torch_out, want)

    def clusters_fit(self) -> tuple[int, int]:
        """(clusters one step launches, clusters the GPU can hold at once) for the first layer."""
        s = self.sets[0]
        layer, dtype = s["fused"], s["hidden"].dtype
        args = layer.launch_args(s["hidden"], s["residual"], s["out"], s["residual_out"])
        fit = layer.launcher(dtype, self.batch).max_active_clusters(*args)
        return layer.kernel_spec(dtype, self.batch).clusters, fit


def check_settings(presets, batches, dtypes, variants) -> None:
    """Raise ``ValueError`` for settings no run could use, before anything touches CUDA.

    A variant must be a launch shape :func:`~clusterlab.fused.mlp.mlp_shape` accepts for at least
    one of the presets (a cluster size whose slices of the hidden size are multiples of 8 and
    whose clusters can tile the intermediate size; 4, 8 or 16 warps). The (preset, batch) pairs a
    variant cannot run, here or on the device (a batch's shared memory), are skipped in the run,
    with the reason printed.
    """
    presets = check_settings_list("presets", presets, f"among {sorted(MODEL_PRESETS)}", MODEL_PRESETS.__contains__)
    check_settings_list("batches", batches, f"integers in 1..{MAX_BATCH}", is_batch)
    check_settings_list("dtypes", dtypes, f"among {tuple(DTYPES)}", DTYPES.__contains__)
    for variant in variants or ():
        if len(variant) != 2:
            raise ValueError(f"a variant is (cluster_size, warps), got {variant!r}")
        reasons = []
        for preset in presets:
            try:
                mlp_shape(mlp_config(preset), 1, HOPPER.sm_count, *variant)
            except ValueError as exc:
                reasons.append(f"{preset}: {exc}")
        if len(reasons) == len(presets):
            raise ValueError(f"variant {variant[0]}x{variant[1]} can run none of the presets asked for ("
                             + "; ".join(reasons) + ")")


def run_bench(
    presets=PRESETS,
    batches=BATCHES,
    dtypes=("float16",),
    variants=None,
    out_dir: str | os.PathLike = "benchmarks/results",
    tag: str | None = None,
    seed: int = 0,
    l2_turnover: float = L2_TURNOVER,
    options=None,
) -> list[MLPRow]:
    """Time every (preset, dtype, batch, variant, options); write ``mlp_<tag>.json`` / ``.png`` after each row.

    ``variants``: ``(cluster_size, warps)`` pairs to time the fused block at (``None``: the
    layer's own :func:`~clusterlab.fused.mlp.mlp_shape`). ``options``: dicts of the layer's
    ``kernel_options`` (:data:`~clusterlab.fused.plan.MLP_KERNEL_CHOICES`) to time, each with every
    variant (``None``: the default kernel only). ``tag``: the results' suffix, by
    default the card's (:func:`~clusterlab.bench.timing.card_tag`). ``l2_turnover``: see
    :func:`~clusterlab.bench.fused.layers_for_l2` (0: one layer over and over). Returns the rows
    (also printed as a table).
    """
    check_settings(presets, batches, dtypes, variants)
    check_l2_turnover(l2_turnover)
    options = [{}] if options is None else [check_kernel_options(o, MLP_KERNEL_CHOICES) for o in options]
    writable_dir(out_dir)
    info, tag, bandwidth = measure_card(tag)
    l2_bytes = info["l2_bytes"]  # the driver's figure, as DeviceLimits.of reads it
    shapes = [{}] if variants is None else [dict(zip(("cluster_size", "warps"), v)) for v in variants]
    shapes = [shape | ({"kernel_options": o} if o else {}) for shape in shapes for o in options]
    rows: list[MLPRow] = []
    for preset in presets:
        config = mlp_config(preset)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            weights: list = []
            for batch, variant in itertools.product(batches, shapes):
                step_bytes = config.step_bytes(batch, dtype.itemsize)
                copies = layers_for_l2(step_bytes, l2_bytes, l2_turnover)
                label = options_label(variant.get("kernel_options", {}))
                try:
                    run = _Rotation(config, dtype, batch, copies, seed, variant, weights)
                    spec = run.sets[0]["fused"].kernel_spec(dtype, batch)  # the work queue's: clusters of 1
                    cluster_size, clusters, warps = spec.cluster_size, spec.clusters, spec.warps
                except ValueError as exc:
                    if "cluster_size" not in variant:
                        raise
                    print(f"{preset} {dtype_name} batch {batch}: variant {variant['cluster_size']}x"
                          f"{variant['warps']} skipped: {exc}", flush=True)
                    continue
                launched, fit = run.clusters_fit()
                print(f"{preset} {dtype_name} batch {batch}: clusters of {cluster_size} x {warps} warps, "
                      f"{launched} clusters ({launched * cluster_size} blocks) launched, {fit} fit at once; "
                      f"{copies} layer{'s' if copies > 1 else ''} of {step_bytes / 2**20:.1f} MiB cycled"
                      + (f" [{label}]" if label else ""), flush=True)
                fused_err, torch_err = run.errors()
                row = MLPRow(
                    preset, dtype_name, batch, cluster_size, clusters, warps, cluster_size * clusters, copies,
                    fused_us=graph_time_us(run.fused, warmup=copies),
                    torch_us=graph_time_us(run.torch, warmup=copies),
                    floor_us=step_bytes / bandwidth * 1e6, step_bytes=step_bytes, rel_err=fused_err,
                    torch_rel_err=torch_err, options=label,
                )
                rows.append(row)
                print(_format_row(row), flush=True)
                write_results(rows, bandwidth, info, Path(out_dir), tag, l2_bytes=l2_bytes, l2_turnover=l2_turnover)
                del run
            del weights
            torch.cuda.empty_cache()
    print(format_table(rows, bandwidth))
    return rows


# -- tables, JSON, picture ----------------------------------------------------------------------

_HEADER = (f"{'preset':11s} {'dtype':8s} {'batch':>5s} {'C':>2s} {'clusters':>8s} {'W':>2s} {'blocks':>6s} "
           f"{'layers':>6s} {'fused us':>9s} {'torch us':>9s} {'floor us':>9s} {'% copy BW':>9s} {'x torch':>7s} "
           f"{'err':>8s} {'torch err':>9s}")


def _format_row(r: MLPRow) -> str:
    return (f"{r.preset:11s} {r.dtype:8s} {r.batch:5d} {r.cluster_size:2d} {r.clusters:8d} {r.warps:2d} "
            f"{r.blocks:6d} {r.layers:6d} {r.fused_us:9.1f} {r.torch_us:9.1f} {r.floor_us:9.1f} "
            f"{100 * r.fraction_of_copy_bw:9.1f} {r.speedup:7.2f} {r.rel_err:8.1e} {r.torch_rel_err:9.1e}"
            + (f"  [{r.options}]" if r.options else ""))


def format_table(rows: list[MLPRow], bandwidth: float) -> str:
    """The rows as a table: the launch shape, µs per layer of the fused block, PyTorch's and the
    floor at ``bandwidth`` bytes/s, the fused block's % of copy bandwidth, its speedup over
    PyTorch, and both blocks' relative errors against the float64 reference."""
    lines = [f"fused MLP block vs PyTorch graph vs floor at {bandwidth / 1e12:.2f} TB/s, µs per layer", _HEADER]
    return "\n".join(lines + [_format_row(r) for r in rows])


def write_results(rows: list[MLPRow], bandwidth: float, info: dict, out_dir: str | os.PathLike, tag: str, *,
                  l2_bytes: int | None = None, l2_turnover: float = L2_TURNOVER) -> tuple[Path, Path]:
    """Write ``mlp_<tag>.json`` and ``mlp_<tag>.png`` under ``out_dir``; return their paths.

    ``bandwidth``: the copy bandwidth in bytes/s; ``info``: :func:`clusterlab.gpu.device_info`'s dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **results_header(info),
        "copy_bandwidth_tbps": bandwidth / 1e12,
        "l2_bytes": l2_bytes,
        "l2_turnover": l2_turnover,
        "rows": [asdict(r) | {"fraction_of_copy_bw": r.fraction_of_copy_bw, "speedup": r.speedup} for r in rows],
    }
    json_path, png_path = out_dir / f"mlp_{tag}.json", out_dir / f"mlp_{tag}.png"
    write_json(record, json_path)
    _plot(rows, record, png_path)
    return json_path, png_path


def _plot(rows: list[MLPRow], record: dict, path: Path) -> None:
    """One panel a (preset, dtype): µs per layer against batch; fused (a line per launch shape), PyTorch, floor."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    panels = list(dict.fromkeys((r.preset, r.dtype) for r in rows))
    fig = Figure(figsize=(4.4 * max(len(panels), 1), 3.8))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    for ax, (preset, dtype) in zip(axes[0], panels):
        mine = [r for r in rows if (r.preset, r.dtype) == (preset, dtype)]
        batches = sorted({r.batch for r in mine})
        firsts = [next(r for r in mine if r.batch == b) for b in batches]  # torch and floor: one per batch
        shapes = list(dict.fromkeys((r.cluster_size, r.warps, r.options) for r in mine))
        for i, (c, w, o) in enumerate(shapes):
            line = sorted((r for r in mine if (r.cluster_size, r.warps, r.options) == (c, w, o)), key=lambda r: r.batch)
            label = "fused" if len(shapes) == 1 else f"fused, {c}x{w}" + (f" [{o}]" if o else "")
            ax.plot([r.batch for r in line], [r.fused_us for r in line], "o-", color=f"C{i}", label=label)
        ax.plot(batches, [r.torch_us for r in firsts], "s:", color="C3" if len(shapes) < 4 else "k", alpha=0.7,
                label="PyTorch graph")
        ax.plot(batches, [r.floor_us for r in firsts], "--", color="k", alpha=0.35, label="floor (copy BW)")
        ax.set_xticks(batches)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch (sequences per step)")
        ax.set_ylabel("µs per layer")
        ax.set_title(f"{preset}, {dtype}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"fused MLP block: {record['card']}, copy {record['copy_bandwidth_tbps']:.2f} TB/s, "
                 f"{record['date'][:10]}, {short_commit(record['commit'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


#: ``"2x8"`` -> ``(2, 8)``: cluster size x warps a block (an argparse ``type=``).
parse_variant = dimensions("CW", "cluster size x warps", "2x8 or 4x16")


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m clusterlab.bench.mlp",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", action=Distinct, choices=list(MODEL_PRESETS), default=list(PRESETS),
                        help=f"default: {' '.join(PRESETS)}")
    parser.add_argument("--batch", nargs="+", action=Distinct, type=integer(1, MAX_BATCH), default=list(BATCHES),
                        help=f"sequences per step (default: {' '.join(map(str, BATCHES))})")
    parser.add_argument("--dtype", nargs="+", action=Distinct, default=["float16"], choices=tuple(DTYPES))
    parser.add_argument("--variant", nargs="+", action=Distinct, default=None, metavar="CxW", type=parse_variant,
                        help="fused launch shapes as cluster_size x warps, e.g. 2x8 4x8 (default: the layer's own)")
    parser.add_argument("--spec", nargs="+", default=None, metavar="NAME=VALUE,...",
                        type=functools.partial(parse_options, choices=MLP_KERNEL_CHOICES),
                        help="time the fused kernel with these kernel_options (each with every variant), e.g. "
                             f"default interleave_inputs=False ('default': the default kernel); names: "
                             f"{', '.join(MLP_KERNEL_CHOICES)}")
    parser.add_argument("--seed", type=integer(0, 2**63 - 1), default=0)
    parser.add_argument("--out-dir", type=results_folder, default="benchmarks/results")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the output files (default: the card's name)")
    parser.add_argument("--l2-turnover", type=number(0, MAX_L2_TURNOVER), default=L2_TURNOVER,
                        help="L2 sizes moved between two visits of a layer (0: one layer, no rotation)")
    args = parser.parse_args(argv)
    run_bench(args.preset, args.batch, args.dtype, args.variant, args.out_dir, args.tag, seed=args.seed,
              l2_turnover=args.l2_turnover, options=args.spec)
    return 0


if __name__ == "__main__":
    # Through the clusterlab command, so that a missing GPU or a bad setting is one line and an exit status.
    from ..cli import main as cli_main

    raise SystemExit(cli_main(["bench", "mlp", *sys.argv[1:]]))
