"""Where the GPU places the blocks of a cluster launch: the clusters that fit at once, the SMs they use, the
blocks each SM holds, and the GPCs that shows.

    python -m clusterlab.bench.placement [--cluster 2 4 8 16] [--per-sm 1 2 3 4] [--warps 4] [--blocks 256]

The GPU places a cluster whole or not at all, every block of it on an SM of one GPC (GPU processing cluster),
so where a grid of clusters lands depends on the sizes of the GPCs, not only on the SM count: a grid of 256
blocks in clusters of 16 fits an H200's 132 SMs three blocks an SM but not two (14 clusters of 16 at once), and
the fused attention's batch-1 grid of that shape runs on 116 SMs, 32 of them holding three blocks
(``docs/fused-decode-notes.md``). This study shows the rule for any cluster size on the card at hand.

For each cluster size ``C`` and blocks an SM ``k`` (the dynamic shared memory each block asks for leaves room
for ``k``: :func:`shared_bytes_for`) it reads how many clusters fit at once
(:meth:`clusterlab.launch.ClusterKernel.max_active_clusters`, the driver's occupancy query) and launches

- as many clusters as fit (everything the GPU holds at once), and
- each ``--blocks`` grid, in whole clusters (e.g. 256: the fused attention's batch-1 grids);

thread 0 of every block of :func:`probe` records its SM (``%smid``) and when it started and ended
(``%globaltimer``) around a spin of ``--spin-us``. A block that starts after another block of its launch has
ended waited for room: it ran in a later wave.

SMs that held blocks of one cluster are SMs of one GPC. The study joins them over all its launches
(:func:`sm_groups`) and reports the groups: each lies within one GPC, and a GPC whose SMs never shared a
cluster shows as more than one group, so the groups are the GPCs or parts of them.

Printed: one line a launch and the groups. Written: ``placement_<tag>.json`` (every block's SM, start and
end) and ``.png`` (a row a launch, a column an SM in the groups' order, coloured by the blocks it held).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from numba import cuda

from .. import ptx
from ..argtypes import Distinct, integer, number, results_folder, results_tag
from ..fused.config import is_number_in
from ..fused.plan import DeviceLimits
from ..gpu import device_info, require_hopper
from ..launch import MAX_CLUSTER_BLOCKS, PORTABLE_CLUSTER_BLOCKS
from .timing import card_tag, results_header, write_json

#: Threads an SM holds at most (Hopper), which bounds the blocks an SM of ``warps`` warps.
THREADS_PER_SM = 2048
#: How long each block spins, µs: long enough that the blocks of one wave all overlap; at most a second,
#: so that no probe holds the GPU for long.
SPIN_US = 30.0
MAX_SPIN_US = 1e6


@cuda.jit
def probe(out, spin_ns):
    """``out [blocks, 3]`` int64: each block's SM, then its start and end on the global timer (ns), thread 0
    recording them around a spin of ``spin_ns``. The other threads exit at once; the block keeps its
    resources (its shared memory) until thread 0 is done."""
    if cuda.threadIdx.x == 0:
        start = ptx.global_timer()
        now = start
        while now - start < spin_ns:
            now = ptx.global_timer()
        out[cuda.blockIdx.x, 0] = ptx.sm_id()
        out[cuda.blockIdx.x, 1] = start
        out[cuda.blockIdx.x, 2] = now


def shared_bytes_for(per_sm: int, limits: DeviceLimits) -> int:
    """Dynamic shared memory a block asks for so that ``per_sm`` blocks fit an SM and ``per_sm + 1`` do not:
    the SM's shared memory over ``per_sm``, less what the GPU reserves a block."""
    if not 1 <= per_sm <= limits.shared_bytes_per_sm // (limits.reserved_shared_bytes_per_block + 1):
        raise ValueError(f"per_sm={per_sm!r}: shared memory can hold 1 to "
                         f"{limits.shared_bytes_per_sm // (limits.reserved_shared_bytes_per_block + 1)} blocks an SM")
    return min(limits.shared_bytes_per_block,
               limits.shared_bytes_per_sm // per_sm - limits.reserved_shared_bytes_per_block)


def placement(stamps: np.ndarray, cluster_size: int) -> dict:
    """What one launch's stamps (``[blocks, 3]``: SM, start, end, as :func:`probe` writes them) show:
    ``sms_used``, ``blocks_per_sm`` (``{k: SMs holding k blocks}`` over the whole launch), ``late_blocks``
    (blocks that started after another block had ended: a later wave) and ``waves`` (1 + how many times
    a block waited so).

    ``waves`` counts the chain: block ``b`` is in wave ``w + 1`` if it started after a block of wave ``w``
    ended; blocks that started before any ended are wave 1."""
    sm, start, end = (stamps[:, i].astype(np.int64) for i in range(3))
    held = np.bincount(sm)
    wave = np.ones(len(sm), dtype=np.int64)
    for b in np.argsort(start, kind="stable"):
        waited = end < start[b]
        if waited.any():
            wave[b] = wave[waited].max() + 1
    counts = np.bincount(held)
    return {"cluster_size": cluster_size, "blocks": len(sm), "sms_used": int((held > 0).sum()),
            "blocks_per_sm": {str(k): int(n) for k, n in enumerate(counts) if k and n},
            "late_blocks": int((wave > 1).sum()), "waves": int(wave.max())}


def sm_groups(launches, sm_count: int) -> list[list[int]]:
    """SMs joined by the clusters of ``launches`` (each ``(sms, cluster_size)``: every block's SM, block ``b``
    of cluster ``b // cluster_size``): two SMs are in one group when blocks of one cluster ran on them,
    directly or through others. Every SM is in one group (alone if no cluster joined it to another); groups
    largest first, each sorted."""
    parent = list(range(sm_count))

    def root(s):
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for sms, cluster_size in launches:
        for cluster in np.asarray(sms).reshape(-1, cluster_size):
            for s in cluster[1:]:
                parent[root(int(s))] = root(int(cluster[0]))
    groups = {}
    for s in range(sm_count):
        groups.setdefault(root(s), []).append(s)
    return sorted(groups.values(), key=lambda group: (-len(group), group[0]))


def record_launch(cluster_size: int, per_sm: int, warps: int, blocks: int | None, spin_us: float,
                  limits: DeviceLimits) -> dict:
    """Launch :func:`probe` as clusters of ``cluster_size`` blocks of ``warps`` warps, ``per_sm`` of them to
    an SM, ``blocks`` blocks (rounded down to whole clusters; None: as many clusters as fit at once), and
    return the launch's figures (:func:`placement`) with its configuration and every block's SM, start and end
    (ns after the first start)."""
    import torch

    from ..launch import launch, max_active_clusters

    if not is_number_in(spin_us, 1, MAX_SPIN_US):
        raise ValueError(f"spin_us must be a number in 1..{MAX_SPIN_US:g} (µs), got {spin_us!r}")
    shared = shared_bytes_for(per_sm, limits)
    config = {"cluster": cluster_size, "block": 32 * warps, "shared_bytes": shared,
              "non_portable": cluster_size > PORTABLE_CLUSTER_BLOCKS}
    spin = np.uint64(round(spin_us * 1000))
    out = torch.empty((cluster_size, 3), dtype=torch.int64, device="cuda")
    fits = max_active_clusters(probe, (out, spin), **config)
    grid = fits * cluster_size if blocks is None else blocks // cluster_size * cluster_size
    out = torch.full((grid, 3), -1, dtype=torch.int64, device="cuda")  # unwritten rows stay -1
    launch(probe, grid=grid, **config)(out, spin)
    torch.cuda.synchronize()
    stamps = out.cpu().numpy()
    if (stamps < 0).any():
        raise RuntimeError(f"{int((stamps < 0).any(axis=1).sum())} of {grid} probe blocks left no stamps")
    stamps[:, 1:] -= stamps[:, 1].min()
    return {**placement(stamps, cluster_size), "warps": warps, "per_sm": per_sm, "shared_bytes": shared,
            "max_active_clusters": fits, "asked": "fit" if blocks is None else blocks,
            "sm": stamps[:, 0].tolist(), "start_ns": stamps[:, 1].tolist(), "end_ns": stamps[:, 2].tolist()}


def summary(launch: dict) -> str:
    held = ", ".join(f"{k}: {n}" for k, n in launch["blocks_per_sm"].items())
    late = f", {launch['late_blocks']} blocks in {launch['waves'] - 1} later waves" if launch["late_blocks"] else ""
    return (f"cluster {launch['cluster_size']:2d}, {launch['per_sm']} an SM: {launch['max_active_clusters']:4d} "
            f"clusters fit; {launch['blocks']:4d} blocks on {launch['sms_used']:3d} SMs (SMs holding k blocks: "
            f"{held}){late}")


def plot(record, path: Path) -> None:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    order = [s for group in record["groups"] for s in group]
    column = {s: i for i, s in enumerate(order)}
    launches = record["launches"]
    held = np.zeros((len(launches), record["sm_count"]), dtype=np.int64)
    for row, launch in enumerate(launches):
        for s in launch["sm"]:
            held[row, column[s]] += 1
    top = max(4, int(held.max()))
    colours = ListedColormap(["#ffffff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"] + ["#c44e52"] * (top - 4))
    fig = Figure(figsize=(13, 1.5 + 0.32 * len(launches)))
    ax = fig.subplots()
    image = ax.imshow(held, aspect="auto", interpolation="nearest", cmap=colours,
                      norm=BoundaryNorm(np.arange(-0.5, top + 1), top + 1))
    edges = np.cumsum([len(group) for group in record["groups"]])[:-1] - 0.5
    for x in edges:
        ax.axvline(x, color="#999999", linewidth=0.6)
    labels = [f"C {launch['cluster_size']}, {launch['per_sm']} an SM: {launch['blocks']} blocks "
              f"({launch['max_active_clusters']} clusters fit)" + (", waves" if launch["late_blocks"] else "")
              for launch in launches]
    ax.set_yticks(range(len(launches)), labels, fontsize=7)
    ax.set_xlabel("SM, in the order of the groups clusters joined them into (grey lines between groups)")
    fig.colorbar(image, ax=ax, ticks=range(top + 1), label="blocks on the SM", fraction=0.03)
    fig.suptitle(f"Where the blocks of a cluster launch ran: cluster size C, blocks an SM, blocks launched "
                 f"({record['card']}, {record['sm_count']} SMs, {record['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", nargs="+", action=Distinct, type=integer(1, MAX_CLUSTER_BLOCKS),
                        default=[2, 4, 8, 16], help="cluster sizes (default: 2 4 8 16)")
    parser.add_argument("--per-sm", nargs="+", action=Distinct, type=integer(1, 32), default=[1, 2, 3, 4],
                        help="blocks an SM, set through each block's shared memory (default: 1 2 3 4)")
    parser.add_argument("--warps", type=integer(1, 32), default=4, help="warps a block (default: 4)")
    parser.add_argument("--blocks", nargs="*", action=Distinct, type=integer(1), default=[256],
                        help="grids to launch besides the clusters that fit, in blocks (default: 256)")
    parser.add_argument("--spin-us", type=number(1, MAX_SPIN_US), default=SPIN_US,
                        help=f"how long each block spins, µs (default: {SPIN_US:g}; at most {MAX_SPIN_US:g})")
    parser.add_argument("--out-dir", type=results_folder, default="benchmarks/results")
    parser.add_argument("--tag", default=None, type=results_tag,
                        help="suffix of the output files (default: the card's name)")
    args = parser.parse_args(argv)
    for per_sm in args.per_sm:
        if per_sm * 32 * args.warps > THREADS_PER_SM:
            parser.error(f"argument --per-sm: {per_sm} blocks of {args.warps} warps exceed the {THREADS_PER_SM} "
                         "threads an SM holds")
    if args.blocks and min(args.blocks) < max(args.cluster):
        parser.error(f"argument --blocks: {min(args.blocks)} blocks make no cluster of {max(args.cluster)}")
    require_hopper()
    limits = DeviceLimits.of(0)
    info = device_info()
    tag = card_tag(info["gpu"]) if args.tag is None else args.tag
    record = {**results_header(info), "sm_count": limits.sm_count, "warps": args.warps, "spin_us": args.spin_us,
              "launches": []}
    for cluster_size in args.cluster:
        for per_sm in args.per_sm:
            for blocks in [None, *args.blocks]:
                launch = record_launch(cluster_size, per_sm, args.warps, blocks, args.spin_us, limits)
                record["launches"].append(launch)
                print(summary(launch), flush=True)
    record["groups"] = sm_groups([(launch["sm"], launch["cluster_size"]) for launch in record["launches"]],
                                 limits.sm_count)
    print(f"SMs joined by clusters: {len(record['groups'])} groups of "
          f"{', '.join(str(len(group)) for group in record['groups'])} SMs")
    out = Path(args.out_dir)
    write_json(record, out / f"placement_{tag}.json")
    plot(record, out / f"placement_{tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
