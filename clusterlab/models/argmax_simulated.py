"""The cluster argmax (:mod:`clusterlab.models.argmax`) as a simulator program: runs on the CPU and checks
its DSMEM accesses.

:func:`argmax_block` is what one block of the kernel does, step for step (the numbered comments
match), with the block's threads folded into one NumPy call: its slice's winner, in the order the
kernel's shuffles keep (:func:`winner`). The winners cross the cluster through the simulator's
distributed shared memory, so a missing cluster barrier is reported as a hazard: without the first,
block 0 reads a winner before its block has written it (a race); without the second, a block exits
while block 0 still reads its winner.

Global memory is not simulated: :func:`argmax_rows` holds the logits and the indices as NumPy
arrays and runs the rows' clusters one after another.
"""

from __future__ import annotations

import numpy as np

from .. import simulator
from .argmax import CLUSTER_SIZE


def winner(values: np.ndarray, indices: np.ndarray) -> tuple[np.float32, int]:
    """The winning ``(value, index)`` of candidates ``values`` (float32) at ``indices``, in
    ``torch.argmax``'s order: NaN over any number, then the larger value, then the smaller index."""
    nan = np.isnan(values)
    best = nan if nan.any() else values == values.max()
    at = np.argmin(np.where(best, np.asarray(indices, np.int64), np.iinfo(np.int64).max))
    return values[at], int(indices[at])


def argmax_block(b: simulator.Block, row: np.ndarray, out: np.ndarray, r: int):
    """One block of row ``r``'s cluster: ``row`` float32 ``[vocab]``; block 0 writes the index into ``out[r]``."""
    C, rank, vocab = b.cluster_size, b.cluster_rank, row.shape[0]
    values = b.shared_array("values", (1,), np.float32)  # the block's winner (the kernel's values[0])
    indices = b.shared_array("indices", (1,), np.int32)  # and its index (indices[0])

    # -- 1 this block's slice: its winner; an empty slice's loses to every element ----------------------------
    b.step("1 the slice's winner")
    span = -(-vocab // C)
    first, stop = min(rank * span, vocab), min((rank + 1) * span, vocab)
    candidates = np.append(row[first:stop], np.float32(-np.inf))
    values[0], indices[0] = winner(candidates, np.append(np.arange(first, stop), vocab))
    yield b.cluster_sync()  # 1: every block's winner is written

    # -- 2 block 0 compares the blocks' winners ---------------------------------------------------------------
    if rank == 0:
        b.step("2 the blocks' winners")
        peers = [(b.map_shared(values, c)[0], b.map_shared(indices, c)[0]) for c in range(C)]
        out[r] = winner(np.array([v for v, _ in peers], np.float32), np.array([i for _, i in peers]))[1]
    yield b.cluster_sync()  # 3: no block exits while block 0 reads its winner


def argmax_rows(logits: np.ndarray, cluster_size: int = CLUSTER_SIZE) -> np.ndarray:
    """``logits.argmax(-1)`` of float32 ``logits`` ``[rows, vocab]`` by :func:`argmax_block`, one simulated
    cluster of ``cluster_size`` blocks a row: ``[rows]`` int64."""
    logits = np.asarray(logits)
    if logits.dtype != np.float32 or logits.ndim != 2 or 0 in logits.shape:
        raise ValueError(f"logits must be a float32 array [rows, vocab] with at least one of each, got "
                         f"{logits.dtype} of shape {logits.shape}")
    out = np.full(logits.shape[0], -1, np.int64)
    for r in range(logits.shape[0]):
        simulator.launch(argmax_block, cluster_size, logits[r], out, r, title=f"argmax of row {r}")
    return out
