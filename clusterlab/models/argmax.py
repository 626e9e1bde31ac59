"""The index of each row's largest logit, as ``torch.argmax(logits, -1)``: one cluster a row.

Greedy decoding and the exponential race of sampling (:mod:`clusterlab.models.decode`) end each
token with an argmax over the vocabulary: 128,256 float32 logits a sequence for Llama 3. PyTorch
reduces such a row in one block, and on the H200 that took 27 µs of a token
(``benchmarks/results/decode_h200_v55_argmax.json``), as long as 11% of the LM head's whole
read. Here the row is split over a cluster of :data:`CLUSTER_SIZE` blocks:

1. each block finds the winner of its slice of ``ceil(V / C)`` logits: each thread keeps its own
   best ``(value, index)`` over the elements it loads (:data:`LOADS_IN_FLIGHT` at a time, so that
   the loads overlap), then the block's warps compare theirs with shuffles and through shared
   memory;
2. a cluster barrier; block 0's first warp reads the C blocks' winners from their shared memory
   (distributed shared memory, lane r from rank r), compares them with shuffles and writes the
   row's index;
3. a second cluster barrier, so that no block exits while block 0 still reads its winner.

"Wins" is ``torch.argmax``'s order: NaN over any number, then the larger value, then the smaller
index (the first of equal values), so ties and NaN give the same index as PyTorch. The same steps
run on the simulator in :mod:`clusterlab.models.argmax_simulated`, every DSMEM access checked.

The decoder's step ends with the pick and its bookkeeping (the token fed next, the history, the
counts, the end-of-sequence flags, the positions advanced: :mod:`clusterlab.models.decode`), six
more small kernels in PyTorch. :func:`pick_and_record` is the same kernel with block 0's thread 0
writing all of those for its row once it has the winner: one launch for the whole end of a step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from numba import cuda, float32, int32, int64, uint8, uint32

from .. import ptx
from ..fused.kernel import FULL_MASK

#: Blocks a row is split over (a non-portable cluster size on Hopper).
CLUSTER_SIZE = 16
#: Threads a block.
THREADS = 512
#: Loads a thread issues before comparing any of them.
LOADS_IN_FLIGHT = 8


@dataclass(frozen=True)
class ArgmaxSpec:
    """The kernel's compile-time shape: ``cluster_size`` blocks a row of ``threads`` threads each;
    ``records``: the decoder's :func:`pick_and_record` kernel, else :func:`argmax_rows`'."""

    cluster_size: int = CLUSTER_SIZE
    threads: int = THREADS
    records: bool = False


def build_argmax_kernel(spec: ArgmaxSpec):
    """``argmax_rows(logits, vocab, out)``: ``logits`` float32 ``[rows * vocab]`` (row-major ``[rows,
    vocab]``), ``vocab`` < 2^31, ``out`` int64 ``[rows]``; launched as ``rows`` clusters of
    ``spec.cluster_size`` blocks of ``spec.threads`` threads (:func:`argmax_rows` does).

    With ``spec.records``: ``pick_and_record(logits, vocab, tokens, history, max_new, counts, done,
    eos, positions, advance)``, the same winner ``w`` of row ``b`` recorded as the decoder's step
    records it (:func:`pick_and_record`): ``tokens[b] = w`` (int64 ``[rows]``), ``history[b *
    max_new + counts[b]] = w`` (int64 ``[rows * max_new]``, where ``counts[b] < max_new``) and
    ``counts[b] += 1`` (int64 ``[rows]``), ``done[b] = 1`` where ``w`` is one of ``eos`` (uint8
    ``[rows]``; int64 ids ``[n >= 1]``), ``positions[b] += advance`` (int32 ``[rows]``, int64)."""
    C, BLOCK = spec.cluster_size, spec.threads
    WARPS = BLOCK // 32
    NEG_INF = float32(-math.inf)

    @cuda.jit(device=True, inline=True)
    def wins(a, i, b, j):
        """Whether ``(value a, index i)`` wins over ``(b, j)``: NaN over any number, then the larger
        value, then the smaller index."""
        if a != a:
            return b == b or i < j
        return b == b and (a > b or (a == b and i < j))

    @cuda.jit(device=True, inline=True)
    def warp_winner(value, index):
        """The winner of the warp's 32 ``(value, index)`` pairs, in every lane."""
        for offset in (16, 8, 4, 2, 1):
            other = cuda.shfl_xor_sync(FULL_MASK, value, offset)
            at = cuda.shfl_xor_sync(FULL_MASK, index, offset)
            if wins(other, at, value, index):
                value, index = other, at
        return value, index

    @cuda.jit(device=True, inline=True)
    def row_winner(logits, vocab, row, values, indices, tid):
        """Steps 1 and 2 for row ``row``: its winner's index, valid in block 0's thread 0
        (``values`` / ``indices``: the block's shared ``[WARPS]`` arrays)."""
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        span = (vocab + C - 1) // C
        first = rank * span
        stop = min(first + span, vocab)
        base = row * vocab
        # 1. this thread's winner over its elements first + tid, first + tid + BLOCK, ..
        value, index = NEG_INF, int32(vocab)  # loses to every element
        loaded = cuda.local.array(LOADS_IN_FLIGHT, float32)
        for start in range(first + tid, stop, BLOCK * LOADS_IN_FLIGHT):
            for u in range(LOADS_IN_FLIGHT):
                i = start + u * BLOCK
                if i < stop:
                    loaded[u] = logits[base + i]
            for u in range(LOADS_IN_FLIGHT):
                i = start + u * BLOCK
                if i < stop and wins(loaded[u], int32(i), value, index):
                    value, index = loaded[u], int32(i)
        value, index = warp_winner(value, index)
        if lane == 0:
            values[warp], indices[warp] = value, index
        cuda.syncthreads()
        if warp == 0:
            value, index = NEG_INF, int32(vocab)
            if lane < WARPS:
                value, index = values[lane], indices[lane]
            value, index = warp_winner(value, index)
            if lane == 0:
                values[0], indices[0] = value, index
        # 2. the blocks' winners, compared by block 0
        ptx.cluster_sync()
        if rank == 0 and warp == 0:
            value, index = NEG_INF, int32(vocab)
            if lane < C:
                value, index = ptx.remote_load(values, 0, lane), ptx.remote_load(indices, 0, lane)
            value, index = warp_winner(value, index)
        return index

    def argmax_rows(logits, vocab, out):
        values = cuda.shared.array(WARPS, float32)  # the warps' winners, then the block's in [0]
        indices = cuda.shared.array(WARPS, int32)
        tid = uint32(cuda.threadIdx.x)
        row = uint32(cuda.blockIdx.x) // C
        index = row_winner(logits, vocab, row, values, indices, tid)
        if ptx.cluster_rank() == 0 and tid == 0:
            out[row] = int64(index)
        # 3. every block stays until block 0 has read its winner
        ptx.cluster_sync()

    def pick_and_record(logits, vocab, tokens, history, max_new, counts, done, eos, positions, advance):
        values = cuda.shared.array(WARPS, float32)
        indices = cuda.shared.array(WARPS, int32)
        tid = uint32(cuda.threadIdx.x)
        row = uint32(cuda.blockIdx.x) // C
        index = row_winner(logits, vocab, row, values, indices, tid)
        if ptx.cluster_rank() == 0 and tid == 0:  # the decoder's record (clusterlab.models.decode)
            token = int64(index)
            tokens[row] = token
            count = counts[row]
            if count < max_new:
                history[row * max_new + count] = token
            counts[row] = count + 1
            ended = done[row]
            for e in range(eos.shape[0]):
                if eos[e] == token:
                    ended = uint8(1)
            done[row] = ended
            positions[row] += advance
        ptx.cluster_sync()  # 3.

    return pick_and_record if spec.records else argmax_rows


def argmax_signature(spec: ArgmaxSpec = ArgmaxSpec()):
    """The kernel's argument types: ``(logits, vocab, out)``, or with ``spec.records`` ``(logits,
    vocab, tokens, history, max_new, counts, done, eos, positions, advance)``."""
    from numba import types

    if spec.records:
        return (types.float32[::1], types.int64, types.int64[::1], types.int64[::1], types.int64, types.int64[::1],
                types.uint8[::1], types.int64[::1], types.int32[::1], types.int64)
    return (types.float32[::1], types.int64, types.int64[::1])


@functools.cache
def argmax_launcher(spec: ArgmaxSpec, rows: int):
    """The kernel of ``spec`` as a cluster launcher of ``rows`` rows, compiled once per process."""
    from .. import kernel_cache
    from ..launch import launch

    kernel = kernel_cache.jit(build_argmax_kernel, spec, (spec.threads, 1))
    return launch(kernel, grid=rows * spec.cluster_size, cluster=spec.cluster_size, block=spec.threads,
                  non_portable=spec.cluster_size > 8)


def _check_logits(logits, name: str = "logits", on_cuda: bool = True) -> tuple[int, int]:
    """``logits`` is a float32 tensor ``[rows >= 1, 1 <= vocab < 2**31]`` (on a CUDA device where
    ``on_cuda``); ValueError naming it ``name`` otherwise. Returns ``(rows, vocab)``."""
    import torch

    if not (isinstance(logits, torch.Tensor) and (logits.is_cuda or not on_cuda) and logits.dtype == torch.float32
            and logits.dim() == 2):
        raise ValueError(f"{name} must be a float32{' CUDA' if on_cuda else ''} tensor [rows, vocab], got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} of shape "
                         f"{tuple(getattr(logits, 'shape', ()))} on {getattr(logits, 'device', 'the host')}")
    rows, vocab = logits.shape
    if not (rows >= 1 and 1 <= vocab < 2**31):
        raise ValueError(f"{name} must have at least one row and 1 to 2**31 - 1 columns, got shape {(rows, vocab)}")
    return rows, vocab


def argmax_rows(logits, out=None, spec: ArgmaxSpec = ArgmaxSpec()):
    """``logits.argmax(-1)`` of float32 ``logits`` ``[rows, vocab]`` on a Hopper GPU: ``[rows]``
    int64, on the same device (written into ``out`` where given); a launch on torch's current
    stream (a CUDA graph captures it)."""
    import torch

    rows, vocab = _check_logits(logits)
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.int64 and tuple(out.shape) == (rows,)
              and out.device == logits.device and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous int64 tensor of shape ({rows},) on {logits.device}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    argmax_launcher(spec, rows)(logits.contiguous().view(-1), vocab, out)
    return out


def pick_and_record(scores, tokens, history, counts, done, eos, positions, advance: int) -> None:
    """The end of a decode step (:class:`~clusterlab.models.decode.Decoder`): each row's winner
    ``w = scores[b].argmax()`` recorded, in place, on the device::

        tokens[b] = w;  history[b, counts[b]] = w;  counts[b] += 1
        done[b] |= w in eos;  positions[b] += advance

    ``scores`` float32 ``[B, V]``; ``tokens``, ``counts`` int64 ``[B]``; ``history`` int64 ``[B,
    max_new]`` with every ``counts[b] < max_new``; ``done`` bool ``[B]``; ``eos`` int64 ``[n >= 1]`` (no
    end-of-sequence id: pass ``[-1]``); ``positions`` int32 ``[B]``; all on one device. On a Hopper GPU
    one launch of the cluster argmax (``ArgmaxSpec(records=True)``), which a CUDA graph captures;
    elsewhere the same steps in PyTorch.
    """
    import torch

    from ..fused.validate import check_tensor
    from ..gpu import hopper_problem

    rows, vocab = _check_logits(scores, "scores", on_cuda=False)
    device = scores.device
    for name, tensor, dtype in (("tokens", tokens, torch.int64), ("counts", counts, torch.int64),
                                ("done", done, torch.bool), ("positions", positions, torch.int32)):
        check_tensor(name, tensor, (rows,), dtype, device, "one per row of the scores")
    if not (isinstance(history, torch.Tensor) and history.dim() == 2 and history.shape[1] >= 1):
        raise ValueError(f"history must be an int64 tensor [rows, max_new >= 1], got "
                         f"{getattr(history, 'shape', history)}")
    check_tensor("history", history, (rows, history.shape[1]), torch.int64, device, "one row per row of the scores")
    if not (isinstance(eos, torch.Tensor) and eos.dim() == 1 and eos.numel() >= 1):
        raise ValueError(f"eos must be an int64 tensor of at least one id (-1 for none), got {eos!r}")
    check_tensor("eos", eos, tuple(eos.shape), torch.int64, device, "the scores")
    if scores.is_cuda and hopper_problem() is None:
        spec = ArgmaxSpec(records=True)
        argmax_launcher(spec, rows)(scores.contiguous().view(-1), vocab, tokens, history.view(-1), history.shape[1],
                                    counts, done.view(torch.uint8), eos, positions, advance)
        return
    token = scores.argmax(-1)
    tokens.copy_(token)
    history.scatter_(1, counts[:, None], token[:, None])
    counts += 1
    done |= torch.isin(token, eos)
    positions += advance
