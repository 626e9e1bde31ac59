"""What GPU this process can use, asked of the CUDA driver without ever raising a raw driver error.

``hopper_problem()`` returns why no Hopper GPU is usable (or ``None``); ``require_hopper()`` turns
that into :class:`clusterlab.HopperRequired`; ``device_info()`` collects what ``clusterlab info``
prints. All three are safe on a machine with no NVIDIA driver at all.
"""

from __future__ import annotations

import functools
import importlib.metadata

from .errors import HopperRequired

#: Thread-block clusters, DSMEM and the cluster barrier exist from compute capability 9.0 on.
MIN_COMPUTE_CAPABILITY = (9, 0)
#: Largest cluster every Hopper part accepts, and the largest with the non-portable opt-in.
PORTABLE_MAX_CLUSTER_SIZE = 8
NON_PORTABLE_MAX_CLUSTER_SIZE = 16


def _driver():
    """Initialise the CUDA driver; return the bindings module or a sentence saying what is missing."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # cuda-bindings is a dependency; a broken install lands here
        return f"the cuda-bindings package cannot be imported ({exc})"
    try:
        (err,) = driver.cuInit(0)
    except Exception:  # the loader raises when libcuda.so is absent
        return "no NVIDIA driver: libcuda could not be loaded"
    if err == driver.CUresult.CUDA_ERROR_NO_DEVICE:
        return "the NVIDIA driver sees no CUDA device"
    if err != driver.CUresult.CUDA_SUCCESS:
        return f"the NVIDIA driver failed to initialise ({err.name})"
    return driver


def _attribute(driver, device, name):
    err, value = driver.cuDeviceGetAttribute(getattr(driver.CUdevice_attribute, name), device)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDeviceGetAttribute({name}) failed: {err.name}")
    return value


@functools.cache
def _device0():
    """(driver module, device 0 handle, compute capability) or a sentence saying what is missing."""
    driver = _driver()
    if isinstance(driver, str):
        return driver
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return "the NVIDIA driver sees no CUDA device"
    _, device = driver.cuDeviceGet(0)
    cc = (
        _attribute(driver, device, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
        _attribute(driver, device, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"),
    )
    return driver, device, cc


def hopper_problem() -> str | None:
    """Why this process cannot run clusterlab's kernels, or ``None`` when device 0 is Hopper or newer
    and numba-cuda can compile (:func:`clusterlab._numba_private.compiler_problem`)."""
    found = _device0()
    if isinstance(found, str):
        return found
    _, _, cc = found
    if cc < MIN_COMPUTE_CAPABILITY:
        return (
            f"device 0 has compute capability {cc[0]}.{cc[1]}; thread-block clusters need "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or higher (Hopper)"
        )
    from ._numba_private import compiler_problem

    return compiler_problem()


def require_hopper() -> None:
    """Raise :class:`HopperRequired` unless a Hopper (cc >= 9.0) GPU is usable."""
    problem = hopper_problem()
    if problem is not None:
        raise HopperRequired(f"a Hopper GPU is required: {problem}")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """Versions of the Python packages clusterlab's GPU path is built on."""
    return {name: _version(name) for name in ("numba-cuda", "cuda-core", "cuda-bindings", "numpy", "torch")}


#: What :func:`device_limits` reads, by driver attribute.
LIMIT_ATTRIBUTES = {
    "sm_count": "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT",
    "shared_bytes_per_sm": "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR",
    "shared_bytes_per_block": "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN",
    "reserved_shared_bytes_per_block": "CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK",
    "registers_per_sm": "CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR",
    "l2_bytes": "CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE",
}


def device_limits(index: int = 0) -> dict[str, int]:
    """SM count, shared memory (per SM, per block with the opt-in, reserved per block), registers
    per SM and L2 bytes of CUDA device ``index``, as the driver reports them. Raises
    :class:`HopperRequired` where no usable GPU is found."""
    require_hopper()
    driver = _driver()
    err, device = driver.cuDeviceGet(index)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise ValueError(f"no CUDA device {index}: {err.name}")
    return {name: _attribute(driver, device, attribute) for name, attribute in LIMIT_ATTRIBUTES.items()}


def device_info() -> dict[str, object]:
    """Facts about device 0 for ``clusterlab info``; ``{"gpu": None, "reason": ...}`` without one."""
    found = _device0()
    if isinstance(found, str):
        return {"gpu": None, "reason": found, **software_versions()}
    driver, device, cc = found
    _, name = driver.cuDeviceGetName(256, device)
    _, driver_version = driver.cuDriverGetVersion()
    return {
        "gpu": name.split(b"\0", 1)[0].decode(),
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "sm_count": _attribute(driver, device, "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT"),
        "max_cluster_size": (
            f"{PORTABLE_MAX_CLUSTER_SIZE} portable, {NON_PORTABLE_MAX_CLUSTER_SIZE} non-portable"
            if _attribute(driver, device, "CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH")
            else "no cluster launch"
        ),
        "max_shared_bytes_per_block_optin": _attribute(
            driver, device, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"
        ),
        "l2_bytes": _attribute(driver, device, LIMIT_ATTRIBUTES["l2_bytes"]),
        "driver_cuda_version": f"{driver_version // 1000}.{driver_version % 1000 // 10}",
        "reason": hopper_problem(),
        **software_versions(),
    }
