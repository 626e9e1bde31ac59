"""Exceptions raised by clusterlab.

Every GPU entry point checks its inputs and the machine *before* it launches anything, so a
mistake surfaces as one of these (or a plain ``ValueError`` / ``TypeError`` naming the
parameter) rather than as a driver error, a hang or a corrupted result.
"""


class HopperRequired(RuntimeError):
    """A GPU path was asked for, but this machine has no usable Hopper GPU.

    The message says what is missing: the NVIDIA driver, a visible CUDA device, or a device of
    compute capability 9.0 or higher (thread-block clusters and DSMEM are Hopper features).
    """
