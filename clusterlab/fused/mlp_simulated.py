"""The fused MLP kernel's cluster dataflow as a simulator program: runs on the CPU, checks every DSMEM access.

:func:`mlp_block` is what one block of the kernel in :mod:`clusterlab.fused.mlp_kernel` does,
phase for phase (the numbered comments match), with the block's threads folded into NumPy
statements; every cross-block exchange goes through the simulator's DSMEM, so a missing barrier
or a wrong owner shows up as a :class:`~clusterlab.simulator.DataRace` or a wrong answer.
Arithmetic is float32 as in the kernel, with the same roundings to the model dtype; the order of
float sums differs, so results agree to rounding, not bit for bit.

Global memory is not simulated: :func:`simulated_mlp_step` holds the inputs and ``out_acc`` as
NumPy arrays, runs the clusters one after another, and converts ``out_acc`` at the end as the
kernel's last blocks do.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import simulator
from .mlp import MLPConfig, MLPWeights
from .plan import owned_quads
from .simulated import norm_inputs, quad_items

F32 = np.float32


def mlp_block(b: simulator.Block, cluster: int, config: MLPConfig, batch: int, clusters: int, gm: dict,
              rounded):
    """One block of cluster ``cluster``; ``gm`` holds the "global memory" arrays.

    ``gm``: float32 ``hidden``/``residual`` ``[batch, H]``, ``norm`` ``[H]``, ``gate``/``up`` ``[I,
    H]``, ``down`` ``[H, I]``; outputs ``residual_out`` and ``out_acc`` ``[batch, H]``.
    ``rounded(x)``: ``x`` rounded to the model dtype (float32 in, float32 out). Names as in the
    kernel: ``H, I, C``, ``inter_slice``, ``rows``, ``k_slice``, ``out_rows``, ``k0``, ``j``.
    """
    C, rank = b.cluster_size, b.cluster_rank
    H = config.hidden_size
    inter_slice = config.intermediate_size // clusters
    rows, k_slice, out_rows = 2 * inter_slice, H // C, H // C
    partial = b.shared_array("partial", (batch, rows + 1), F32)
    act = b.shared_array("act", (batch, inter_slice), F32)
    mine = slice(cluster * inter_slice, (cluster + 1) * inter_slice)

    # -- 1 gate_up: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2); partial dots -----
    b.step("1 gate_up")
    k0 = rank * k_slice
    h, xs = norm_inputs(gm, k0, k_slice, cluster == 0)
    partial[:, :inter_slice] = xs @ gm["gate"][mine, k0 : k0 + k_slice].T
    partial[:, inter_slice:rows] = xs @ gm["up"][mine, k0 : k0 + k_slice].T
    partial[:, rows] = (h * h).sum(axis=1, dtype=F32)
    yield b.cluster_sync()  # B1: every block's partials are complete

    # -- 2 act: owners sum the partials, normalise, a = silu(gate) * up, push a to every block ------------
    b.step("2 act")
    j = quad_items(rank + C * np.arange(owned_quads(inter_slice, rank, C)))
    peers = [b.map_shared(partial, c) for c in range(C)]
    gate = sum(peer[:, j] for peer in peers)
    up = sum(peer[:, inter_slice + j] for peer in peers)
    ss = sum(peer[:, rows] for peer in peers)
    inv_rms = (F32(1) / np.sqrt(ss / F32(H) + F32(config.rms_eps))).astype(F32)[:, None]
    gate, up = rounded(gate * inv_rms), rounded(up * inv_rms)
    a = rounded(rounded(gate / (F32(1) + np.exp(-gate))) * up)
    for c in range(C):
        b.map_shared(act, c)[:, j] = a
    yield b.cluster_sync()  # B2: a is complete in every block; no DSMEM access after this

    # -- 3 down: this block's output rows, the cluster's intermediate columns, added into out_acc ---------
    b.step("3 down")
    r0 = rank * out_rows
    gm["out_acc"][:, r0 : r0 + out_rows] += act[:, :] @ gm["down"][r0 : r0 + out_rows, mine].T


def simulated_mlp_step(config: MLPConfig, weights: MLPWeights, hidden: torch.Tensor, residual: torch.Tensor,
                       cluster_size: int, clusters: int, traces: list | None = None, handoff: bool = False):
    """One step on the simulator: ``(out, hidden + residual)`` in the weights' dtype.

    CPU tensors, shapes as for :class:`~clusterlab.fused.mlp.DecodeMLP`; ``clusters`` simulated
    clusters of ``cluster_size`` blocks, each one's :class:`~clusterlab.simulator.Trace` appended
    to ``traces`` when a list is given. ``handoff``: as the kernel's
    (:attr:`~clusterlab.fused.mlp_kernel.MLPSpec.handoff`), ``hidden`` may be float32 sums, read
    rounded to the weights' dtype, and ``out`` is ``out_acc`` itself, float32, unconverted.
    """
    batch, dtype = hidden.shape[0], weights.gate.dtype
    hidden = hidden.to(dtype)

    def f32(t):
        return t.detach().to(torch.float32).numpy()

    def rounded(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=F32)).to(dtype).to(torch.float32).numpy()

    gm = {
        "hidden": f32(hidden), "residual": f32(residual), "norm": f32(weights.norm), "gate": f32(weights.gate),
        "up": f32(weights.up), "down": f32(weights.down),
        "residual_out": np.full((batch, config.hidden_size), np.nan, F32),
        "out_acc": np.zeros((batch, config.hidden_size), F32),
    }
    for cluster in range(clusters):
        trace = simulator.launch(mlp_block, cluster_size, cluster, config, batch, clusters, gm, rounded,
                                 title=f"MLP step, cluster {cluster}")
        if traces is not None:
            traces.append(trace)
    # -- 4 finish: the last block (one a cluster) to add into this block's output rows converts them ------
    # Here once for all rows, after every cluster has added into out_acc (with a hand-off nobody converts).
    out = torch.from_numpy(gm["out_acc"])
    return (out if handoff else out.to(dtype)), torch.from_numpy(gm["residual_out"]).to(dtype)
