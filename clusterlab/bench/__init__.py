"""Benchmarks of clusterlab on a Hopper GPU, with the results and plots they write.

- :func:`run_primitives_bench` (``clusterlab bench primitives``): ClusterReduce / ClusterGather
  per operation and per launch, against their floors (cluster barrier, DSMEM and HBM bandwidth)
  and baselines (global memory, torch); see :mod:`clusterlab.bench.primitives`.
- :mod:`clusterlab.bench.common`: the timing method and run records every benchmark shares.
- :mod:`clusterlab.bench.report`: targets, algorithm-choice tables, text tables and plots from a
  results file, on any machine.
"""

__all__ = ["run_primitives_bench"]


def __getattr__(name):
    # Imported on first use, so that ``python -m clusterlab.bench.<module>`` finds its module unimported.
    if name == "run_primitives_bench":
        from .primitives import run_primitives_bench

        return run_primitives_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
