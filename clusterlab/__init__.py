"""clusterlab: Hopper thread-block clusters in Python.

- :mod:`clusterlab.simulator` — a NumPy reference simulator of distributed shared memory (DSMEM):
  remote loads and stores, cluster barriers, mbarriers and bulk copies, with hazard detection
  and traces. Runs anywhere.
- :mod:`clusterlab.primitives` — ClusterReduce and ClusterGather in Numba-CUDA with inline PTX,
  bit-exact against the simulator. Needs a Hopper GPU.
- :mod:`clusterlab.fused` — a decode attention layer fused into one cluster kernel.
"""

from .errors import HopperRequired

__version__ = "0.1.0"

__all__ = ["HopperRequired", "__version__"]

from .launch import ClusterKernel, cluster_sms, launch, max_active_clusters  # noqa: E402

__all__ += ["ClusterKernel", "cluster_sms", "launch", "max_active_clusters"]
