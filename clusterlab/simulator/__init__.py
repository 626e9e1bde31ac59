"""A NumPy reference simulator of Hopper distributed shared memory (DSMEM).

A thread-block cluster is N blocks (1..16) that can read and write each other's shared memory.
This package runs per-block programs on a simulated cluster, deterministically, and checks
every access against the hardware's rules, so the simulator is both the oracle the GPU kernels
must match bit for bit and the engine that draws the tutorials' pictures.

What is modelled (names follow the PTX instructions, see :class:`Block`)::

     block 0                 block 1                 ...   block N-1
    +-----------------+     +-----------------+           +-----------------+
    | shared memory   |<--->| shared memory   |<--- ... ->| shared memory   |
    |  arrays,        | ld/st/red.shared::cluster,        |                 |
    |  mbarriers      | cp.async.bulk, st.async           |                 |
    +-----------------+     +-----------------+           +-----------------+
            \\________ barrier.cluster.arrive / wait (split cluster barrier) ________/

- local and remote (``map_shared`` = ``mapa``) loads, stores and atomic adds;
- the split cluster barrier (arrive release/relaxed, wait acquire; ``fence.acq_rel.cluster``
  before a relaxed arrive) and mbarriers with arrival counts and transaction bytes; bulk copies
  and ``st.async`` completing on the receiver's mbarrier (``fence.proxy.async`` before them);
- block exit: a block's shared memory vanishes when its program returns;
- views (``shared_view``): two names for the same words, as a kernel overlays buffers that are
  never alive at once; an access through one is checked against every access through the other.

Hazards (:mod:`clusterlab.simulator.hazards`), each its own exception: data races, out-of-bounds
indices and invalid ranks, deadlocks (never a hang), accesses to exited blocks, mbarrier
transaction mismatches, misaligned bulk copies, missing proxy fences, barrier misuse, mbarrier
phase aliasing (a parity wait or signal that cannot tell two phases apart) and waits on a phase
that can never complete.

Entry points::

    out, trace = cluster_reduce(x, op="sum", algorithm="ring")   # x [N, n] -> out [N, n]
    out, trace = cluster_reduce_steady(xs, op="sum")             # xs [steps, N, n]: 1 barrier a step
    out, trace = cluster_reduce_steady(xs, algorithm="two_shot") # 2 barriers a step, the fewest bytes
    out, trace = cluster_gather(x, algorithm="direct")            # x [N, n] -> out [N, N*n]
    print(trace.phase_table()); trace.plot().savefig("ring.png"); trace.traffic().total
    trace = launch(my_program, cluster_size, *args)                # your own per-block program
"""

from .cluster import MAX_CLUSTER_SIZE, MAX_SMEM_BYTES_PER_BLOCK, Block, Mbarrier, Region, SharedArray, Wait, launch
from .dtypes import DTYPES, OPS, accumulation_dtype, dtype_name, numpy_dtype, op_ufunc
from .gather import GATHER_ALGORITHMS, bulk_push_rows, cluster_gather, slot_elements
from .hazards import (
    BarrierDeadlock,
    BarrierMisuse,
    BulkCopyMisaligned,
    DataRace,
    ExitedBlockAccess,
    Hazard,
    InvalidRank,
    MissingProxyFence,
    OutOfBounds,
    PhaseAliasing,
    PhaseNeverCompletes,
    ProgramPoint,
    TransactionMismatch,
)
from .reduce import REDUCE_ALGORITHMS, STEADY_BUFFERS, cluster_reduce, cluster_reduce_steady
from .trace import DSMEM_KINDS, Trace, TraceEvent, Traffic

__all__ = [
    "BarrierDeadlock",
    "BarrierMisuse",
    "Block",
    "BulkCopyMisaligned",
    "DSMEM_KINDS",
    "DTYPES",
    "DataRace",
    "ExitedBlockAccess",
    "GATHER_ALGORITHMS",
    "Hazard",
    "InvalidRank",
    "MAX_CLUSTER_SIZE",
    "MAX_SMEM_BYTES_PER_BLOCK",
    "Mbarrier",
    "MissingProxyFence",
    "OPS",
    "OutOfBounds",
    "PhaseAliasing",
    "PhaseNeverCompletes",
    "ProgramPoint",
    "REDUCE_ALGORITHMS",
    "STEADY_BUFFERS",
    "Region",
    "SharedArray",
    "Trace",
    "TraceEvent",
    "Traffic",
    "TransactionMismatch",
    "Wait",
    "accumulation_dtype",
    "bulk_push_rows",
    "cluster_gather",
    "cluster_reduce",
    "cluster_reduce_steady",
    "dtype_name",
    "launch",
    "numpy_dtype",
    "op_ufunc",
    "slot_elements",
]
