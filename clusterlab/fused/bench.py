"""``clusterlab bench fused``: the fused layer against PyTorch and the bytes-moved floor, in one run.

For each preset, batch and KV length (the step at ``position = kv_len - 1`` attends over
``kv_len`` keys) it times, on the same GPU in the same process:

- **fused**: one :class:`~clusterlab.fused.layer.DecodeAttention` step, captured in a CUDA graph;
- **torch**: :class:`~clusterlab.fused.reference.UnfusedAttention` (add, rms_norm, linear, RoPE,
  SDPA, linear) captured in a CUDA graph;
- **floor**: :meth:`AttentionConfig.step_bytes` over the device-to-device copy bandwidth measured
  at the start of the run (bytes read + written by ``Tensor.copy_`` of 1 GiB).

Each time is one step's cost inside CUDA graphs of back-to-back steps: the slope between graphs
of 20 and 40 steps, median of 9 repeats (:func:`clusterlab.bench.common.graph_per_op_us`), after
a warm-up. Every fused configuration is checked against the float64 reference before it is
timed. Results: a table on stdout, ``fused_<tag>.json`` (card, driver, date, commit) and
``fused_<tag>.png`` under ``out_dir``.

Run directly: ``python -m clusterlab.fused.bench --batch 1 4 --kv 1024 4096 16384 32768``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..bench.common import commit, copy_bandwidth, graph_per_op_us, write_json
from .config import PRESETS, AttentionWeights, KVCache, rope_table
from .layer import DecodeAttention
from .reference import UnfusedAttention, reference_step, relative_error

KV_LENGTHS = (1024, 4096, 16384, 32768)
#: Steps per captured graph, and repeats each figure is the median of.
GRAPH_STEPS = 20
REPEATS = 9


@dataclass
class BenchRow:
    preset: str
    dtype: str
    batch: int
    kv_len: int
    cluster_size: int
    warps: int
    head_split: int
    fused_us: float
    torch_us: float
    floor_us: float
    rel_err: float

    @property
    def fraction_of_copy_bw(self) -> float:
        """floor / fused: the fraction of measured copy bandwidth the fused step sustains."""
        return self.floor_us / self.fused_us


def graph_time_us(step) -> float:
    """Median µs of one ``step()`` inside CUDA graphs of back-to-back steps (see ``bench.common``)."""
    step()  # compile, load and warm up before the capture
    return graph_per_op_us(step, count=GRAPH_STEPS, repeats=REPEATS).median


def run_bench(
    presets=("llama2-7b", "llama3-8b"),
    kv_lens=KV_LENGTHS,
    batches=(1, 4),
    dtype: str = "float16",
    variants=None,
    out_dir: str | os.PathLike = "benchmarks/results",
    tag: str = "h100",
    seed: int = 0,
) -> list[BenchRow]:
    """Time every (preset, batch, kv_len) and write ``fused_<tag>.json`` / ``.png`` into ``out_dir``.

    ``variants``: ``(cluster_size, warps)`` or ``(cluster_size, warps, head_split)`` tuples to time
    for the fused kernel (``None``: the layer's defaults). Returns the rows (also printed as a table).
    """
    from ..gpu import device_info, require_hopper

    require_hopper()
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    bandwidth = copy_bandwidth().median
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows: list[BenchRow] = []
    for name in presets:
        config = PRESETS[name]
        weights = AttentionWeights.random(config, torch_dtype, "cuda", seed=seed)
        capacity = max(kv_lens)
        rope = rope_table(config, capacity, device="cuda")
        unfused = UnfusedAttention(config, weights, rope)
        layers = [DecodeAttention(config, weights)] if variants is None else [
            DecodeAttention(config, weights, **dict(zip(("cluster_size", "warps", "head_split"), v))) for v in variants
        ]
        for batch in batches:
            cache = KVCache.random(config, batch, capacity, torch_dtype, "cuda", seed=seed + 1)
            hidden = torch.randn(batch, config.hidden_size, device="cuda").to(torch_dtype)
            residual = torch.randn(batch, config.hidden_size, device="cuda").to(torch_dtype)
            for kv_len in kv_lens:
                position = kv_len - 1
                floor_us = config.step_bytes(batch, kv_len) / bandwidth * 1e6
                torch_us = graph_time_us(functools.partial(unfused, hidden, residual, cache, position))
                for layer in layers:
                    cluster_size, warps, head_split = layer.shape(batch)
                    want = reference_step(config, weights, hidden, residual, cache, position)
                    out, new_residual = layer(hidden, residual, cache, position)
                    if kv_len == kv_lens[0]:
                        args = layer.launch_args(hidden, residual, cache, position, out, new_residual)
                        clusters = layer.launcher(torch_dtype, batch).max_active_clusters(*args)
                        print(f"{name} batch {batch} cluster {cluster_size} x {warps} warps, head split {head_split}: "
                              f"{config.kv_heads * head_split} clusters launched, {clusters} fit at once", flush=True)
                    err = relative_error(out, want.out)
                    fused_us = graph_time_us(functools.partial(layer, hidden, residual, cache, position))
                    row = BenchRow(name, dtype, batch, kv_len, cluster_size, warps, head_split,
                                   fused_us, torch_us, floor_us, err)
                    rows.append(row)
                    print(_format_row(row), flush=True)
    print(format_table(rows, bandwidth))
    _write(rows, bandwidth, Path(out_dir), tag, device_info())
    return rows


def _format_row(r: BenchRow) -> str:
    return (
        f"{r.preset:10s} {r.dtype:8s} b={r.batch} kv={r.kv_len:6d} C={r.cluster_size:2d} W={r.warps:2d} "
        f"S={r.head_split}  "
        f"fused {r.fused_us:7.1f} us  torch {r.torch_us:7.1f} us  floor {r.floor_us:7.1f} us  "
        f"{100 * r.fraction_of_copy_bw:5.1f}% of copy BW  {r.torch_us / r.fused_us:4.2f}x torch  err {r.rel_err:.1e}"
    )


def format_table(rows: list[BenchRow], bandwidth: float) -> str:
    lines = [f"fused decode attention vs PyTorch graph vs floor at {bandwidth / 1e12:.2f} TB/s"]
    lines += [_format_row(r) for r in rows]
    return "\n".join(lines)


def _write(rows, bandwidth, out_dir: Path, tag: str, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "card": info.get("gpu"),
        "driver_cuda_version": info.get("driver_cuda_version"),
        "software": {k: info.get(k) for k in ("numba-cuda", "cuda-core", "torch")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "copy_bandwidth_tbps": bandwidth / 1e12,
        "rows": [asdict(r) | {"fraction_of_copy_bw": r.fraction_of_copy_bw} for r in rows],
    }
    write_json(record, out_dir / f"fused_{tag}.json")
    _plot(rows, record, out_dir / f"fused_{tag}.png")


def _plot(rows, record, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    panels = sorted({(r.preset, r.batch) for r in rows})
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (preset, batch) in zip(axes[0], panels):
        mine = [r for r in rows if (r.preset, r.batch) == (preset, batch)]
        kv = sorted({r.kv_len for r in mine})
        first = {k: next(r for r in mine if r.kv_len == k) for k in kv}
        ax.plot(kv, [first[k].torch_us for k in kv], "s-", label="PyTorch (CUDA graph)")
        ax.plot(kv, [first[k].floor_us for k in kv], "k--", label="floor (bytes / copy BW)")
        ax.plot(kv, [first[k].floor_us / 0.85 for k in kv], "k:", label="85% of copy BW")
        for c, w, s in sorted({(r.cluster_size, r.warps, r.head_split) for r in mine}):
            pts = {r.kv_len: r.fused_us for r in mine if (r.cluster_size, r.warps, r.head_split) == (c, w, s)}
            split = f", head split {s}" if s > 1 else ""
            ax.plot(kv, [pts[k] for k in kv], "o-", label=f"fused (cluster {c}, {w} warps{split})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV length")
        ax.set_ylabel("µs per decode step")
        ax.set_title(f"{preset}, batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{record['card']}, copy {record['copy_bandwidth_tbps']:.2f} TB/s, {record['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--kv", nargs="+", type=int, default=list(KV_LENGTHS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--variant", nargs="*", default=None, metavar="CxW",
                        help="fused variants as cluster_size x warps [x head_split], e.g. 8x4 16x4x2")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--tag", default="h100")
    args = parser.parse_args(argv)
    variants = None if args.variant is None else [tuple(int(x) for x in v.split("x")) for v in args.variant]
    run_bench(args.preset, args.kv, args.batch, args.dtype, variants, args.out_dir, args.tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
