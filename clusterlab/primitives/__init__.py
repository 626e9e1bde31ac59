"""ClusterReduce and ClusterGather on Hopper, bit-exact against :mod:`clusterlab.simulator`.

Two levels:

- device functions for your own ``@cuda.jit`` kernels — :func:`reduce_device_function`
  (``direct``, ``ring``, ``butterfly``, ``bulk``, ``two_shot``, ``bulk_two_shot``; ops ``sum``, ``max``,
  ``min``), :func:`steady_reduce_device_function` (back-to-back reduces: ``direct`` at one cluster barrier
  each, ``two_shot`` at two, ``bulk_two_shot`` at none, mbarriers only) and the gathers
  ``direct_gather``, ``ring_gather``, ``bulk_gather``; each module docstring states the contract
  (barriers issued, scratch needed, when buffers are free again);
- the host API :func:`cluster_reduce` / :func:`cluster_reduce_steady` / :func:`cluster_gather`,
  which mirrors the simulator's.
"""

from .gather import GATHER_DEVICE_FUNCTIONS, bulk_gather, direct_gather, gather_stride, ring_gather
from .host import THREADS_PER_BLOCK, cluster_gather, cluster_reduce, cluster_reduce_steady, to_device, to_numpy
from .ops import GPU_DTYPES, OPERATORS
from .reduce import reduce_device_function, reduce_scratch_elements, steady_reduce_device_function

__all__ = [
    "GATHER_DEVICE_FUNCTIONS",
    "GPU_DTYPES",
    "OPERATORS",
    "THREADS_PER_BLOCK",
    "bulk_gather",
    "cluster_gather",
    "cluster_reduce",
    "cluster_reduce_steady",
    "direct_gather",
    "gather_stride",
    "reduce_device_function",
    "reduce_scratch_elements",
    "ring_gather",
    "steady_reduce_device_function",
    "to_device",
    "to_numpy",
]
