"""Device-side pieces every primitive kernel shares: the reduction operators and dtype handling.

The operators reproduce :func:`clusterlab.simulator.op_ufunc` bit for bit, as ``op(left, right)``
in float32: ``sum`` is an IEEE add, ``max`` / ``min`` propagate NaN and otherwise return
``left`` only when it is strictly larger / smaller (so on a ``-0.0`` / ``+0.0`` tie the right
operand wins, as ``np.maximum`` / ``np.minimum`` do; PTX ``max.f32`` would pick ``+0.0``).

Storage: float32 rows travel as float32; float16 and bfloat16 rows travel as their 16-bit patterns
in uint16 arrays (numba has no bfloat16 arrays) and are widened with ``cvt`` when staged.
"""

from numba import cuda

from .. import ptx


@cuda.jit(device=True, inline=True)
def op_sum(left, right):
    return left + right


@cuda.jit(device=True, inline=True)
def op_max(left, right):
    if left != left:
        return left
    return left if left > right else right


@cuda.jit(device=True, inline=True)
def op_min(left, right):
    if left != left:
        return left
    return left if left < right else right


OPERATORS = {"sum": op_sum, "max": op_max, "min": op_min}


@cuda.jit(device=True, inline=True)
def open_bulk_exchange(full, incoming_bytes, iteration):
    """Prologue of an exchange in which every block pushes rows into its peers with the copy engine.

    ``full``: shared::cta address of this block's mbarrier (8 bytes, the same offset in every
    block); ``incoming_bytes``: what the peers will copy into this block; ``iteration``: earlier
    exchanges on this mbarrier in the kernel. On the first one thread 0 initialises the mbarrier
    (one arrival) and makes it visible to the cluster; every thread fences its staged rows for the
    copy engine; a cluster barrier publishes rows and mbarriers everywhere; thread 0 arrives
    expecting ``incoming_bytes``. Afterwards the caller issues its copies (each completing on the
    destination's ``full``) and waits with ``mbarrier_wait_parity(full, iteration % 2)``.
    """
    if cuda.threadIdx.x == 0 and iteration == 0:
        ptx.mbarrier_init(full, 1)
        ptx.fence_mbarrier_init_release_cluster()
    ptx.fence_proxy_async_shared_cta()  # staged rows (st.shared) -> copy engine reads after this
    ptx.cluster_sync()  # rows staged and mbarriers initialised everywhere before any push
    if cuda.threadIdx.x == 0:
        ptx.mbarrier_arrive_expect_tx(full, incoming_bytes)


@cuda.jit(device=True, inline=True)
def widen_float32(value):
    return value


@cuda.jit(device=True, inline=True)
def narrow_float32(value):
    return value


#: dtype name -> (device function storage value -> float32, float32 -> storage value).
CONVERSIONS = {
    "float32": (widen_float32, narrow_float32),
    "float16": (ptx.f16_to_f32, ptx.f32_to_f16),
    "bfloat16": (ptx.bf16_to_f32, ptx.f32_to_bf16),
}

#: dtypes the GPU primitives accept.
GPU_DTYPES = tuple(CONVERSIONS)
