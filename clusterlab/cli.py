"""The ``clusterlab`` command.

    clusterlab info                          what GPU (if any) clusterlab can use, and versions
    clusterlab tour                          ClusterReduce / ClusterGather over cluster sizes 1-16
    clusterlab trace reduce --cluster 8 --algorithm ring [--save ring.png]
                                             one primitive on the simulator, phase by phase
    clusterlab bench primitives [...]        microbenchmarks of the collectives (Hopper GPU)
    clusterlab bench fused [...]             the fused decode layer vs PyTorch and the floor (Hopper GPU)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .errors import HopperRequired


def _info(args: argparse.Namespace) -> int:
    from .gpu import device_info

    info = device_info()
    if info["gpu"] is None:
        print(f"no CUDA GPU: simulator only ({info['reason']})")
    elif info["reason"] is not None:
        print(f"GPU found but unusable for clusters: {info['reason']}")
    width = max(map(len, info))
    for key, value in info.items():
        if key not in ("reason",) and value is not None:
            print(f"  {key:<{width}}  {value}")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from . import simulator
    from .tour import random_rows

    x = random_rows(np.random.default_rng(args.seed), args.cluster, args.n, args.dtype)
    if args.primitive == "reduce":
        _, trace = simulator.cluster_reduce(x, op=args.op, algorithm=args.algorithm)
    else:
        _, trace = simulator.cluster_gather(x, algorithm=args.algorithm)
    print(trace.phase_table())
    if args.save:
        trace.plot().savefig(args.save, dpi=120, bbox_inches="tight")
        print(f"picture saved to {args.save}")
    return 0


def _tour(args: argparse.Namespace) -> int:
    from .tour import format_tour, run_tour

    rows = run_tour(cluster_sizes=args.cluster, n=args.n, dtype=args.dtype, backend=args.backend, seed=args.seed)
    print(format_tour(rows))
    return 0 if all(row.ok for row in rows) else 1


def _bench(args: argparse.Namespace) -> int:
    if args.suite == "primitives":
        from .bench.primitives import main as bench_main
    else:
        from .fused.bench import main as bench_main
    return bench_main(args.options)


def build_parser() -> argparse.ArgumentParser:
    from . import simulator

    parser = argparse.ArgumentParser(prog="clusterlab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="the GPU clusterlab can use (or why none), and versions")
    info.set_defaults(run=_info)

    tour = commands.add_parser(
        "tour",
        help="ClusterReduce and ClusterGather over cluster sizes 1-16: on the GPU checked bit for bit "
        "against the simulator, else on the simulator checked against NumPy",
    )
    tour.add_argument("--cluster", type=int, nargs="+", default=list(range(1, 17)), help="cluster sizes (1-16)")
    tour.add_argument("--n", type=int, default=1024, help="elements per block (default 1024)")
    tour.add_argument("--dtype", default="float32", choices=simulator.DTYPES)
    tour.add_argument("--backend", default="auto", choices=("auto", "gpu", "simulator"))
    tour.add_argument("--seed", type=int, default=None)
    tour.set_defaults(run=_tour)

    trace = commands.add_parser("trace", help="run one primitive on the simulator and show its data movement")
    trace.add_argument("primitive", choices=("reduce", "gather"))
    trace.add_argument("--cluster", type=int, default=8, help="cluster size (1-16)")
    trace.add_argument("--algorithm", default="ring")
    trace.add_argument("--op", default="sum", choices=simulator.OPS, help="reduce only")
    trace.add_argument("--n", type=int, default=64, help="elements per block")
    trace.add_argument("--dtype", default="float32", choices=simulator.DTYPES)
    trace.add_argument("--seed", type=int, default=None)
    trace.add_argument("--save", metavar="PNG", help="save the per-phase picture")
    trace.set_defaults(run=_trace)

    bench = commands.add_parser(
        "bench",
        help="benchmarks on a Hopper GPU; results as a table, JSON and PNG under benchmarks/results/",
        description="Options after the suite name go to it: clusterlab bench primitives --help",
    )
    bench.add_argument("suite", choices=("primitives", "fused"))
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the suite's own options")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except HopperRequired as exc:
        print(f"clusterlab {args.command}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"clusterlab {args.command}: {exc}", file=sys.stderr)
        return 2
