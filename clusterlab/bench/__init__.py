"""Benchmarks of clusterlab on a Hopper GPU, with the results and plots they write.

- :mod:`clusterlab.bench.timing`: the timing method (CUDA events, warm-up, medians of repeats,
  slopes, CUDA-graph replays) and the run records every benchmark shares.

Suites, each also ``clusterlab bench <suite>``:

- :mod:`clusterlab.bench.primitives` (:func:`run_primitives_bench`): ClusterReduce /
  ClusterGather per operation and per launch, against their floors (cluster barrier, DSMEM and
  HBM bandwidth) and baselines (global memory, torch); the kernels it times are in
  :mod:`clusterlab.bench.kernels`, and :mod:`clusterlab.bench.report` reads its results back
  (targets, algorithm-choice tables, text tables and plots, on any machine);
- :mod:`clusterlab.bench.fused`: the fused decode attention layer against PyTorch and the
  bytes-moved floor;
- :mod:`clusterlab.bench.decode`: whole models' time per output token, fused against unfused,
  transformers and the floor;
- :mod:`clusterlab.bench.mlp`: the fused MLP block (:class:`~clusterlab.fused.mlp.DecodeMLP`)
  against the same block as PyTorch calls and the bytes-moved floor, per layer.

Studies, each run as ``python -m clusterlab.bench.<name>``:

- :mod:`clusterlab.bench.fused_ablation`: the fused kernel with one part switched off at a time;
- :mod:`clusterlab.bench.fused_timeline`: when every block of one fused step (the attention block,
  or with ``--layer mlp`` the MLP block) crosses each phase boundary, and on which SM;
- :mod:`clusterlab.bench.launch_overhead`: host time per cluster launch;
- :mod:`clusterlab.bench.placement`: where the GPU places the blocks of a cluster launch, per cluster size
  and blocks an SM, and the GPCs that shows.

The suites, the timeline and the placement write JSON and PNG into ``benchmarks/results/`` unless ``--out-dir``
says otherwise; the ablation prints its table; the launch overhead writes JSON where ``--output``
says.
"""

__all__ = ["run_primitives_bench"]


def __getattr__(name):
    # Imported on first use, so that ``python -m clusterlab.bench.<module>`` finds its module unimported.
    if name == "run_primitives_bench":
        from .primitives import run_primitives_bench

        return run_primitives_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
