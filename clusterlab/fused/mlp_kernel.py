"""The fused MLP kernel: one launch per step, one cluster per slice of the intermediate size.

The dataflow and who owns what are in :mod:`clusterlab.fused.mlp`; the simulator model of the
same dataflow is :func:`clusterlab.fused.mlp_simulated.mlp_block`, phase for phase: both mark
them ``# -- 1 gate_up`` .. ``# -- 4 finish`` and use the same names. The kernel's constants are
the words of :class:`MLPSpec` upper-cased::

    H, I, C, CLUSTERS        hidden_size, intermediate_size, cluster_size, clusters
    INTER_SLICE              inter_slice = I / clusters: the cluster's gate rows, up rows, down columns
    ROWS                     rows = 2 * inter_slice: the cluster's slots, gate rows then up rows
    K_SLICE, OUT_ROWS        k_slice, out_rows: a block's slice of the hidden size and of W_down's rows
    BATCH, WARPS, THREADS    sequences, warps and threads of a block
    XS, PARTIAL, ACT, RED    offsets of smem_layout()'s regions (the simulator's shared arrays)

and the variables read as in the simulator: ``cluster``, ``rank``, ``k0``, ``seq``, ``slot``
(a row of the cluster's W_gate / W_up rows), ``j`` (an element of the cluster's intermediate
slice), ``gate``, ``up``, ``a``.

The two matrix-vector phases are the attention kernel's (:func:`~clusterlab.fused.kernel.make_gemv`:
each warp step issues all its 16-byte loads before using any), and so is the finish
(:func:`~clusterlab.fused.kernel.make_finish`). The first W_down step of every warp is loaded
during barrier B1 (between its arrive and its wait: a release waits for the loads in flight before
it), so nothing waits on memory across the two exchanges.

With ``MLPSpec.work_queue`` (batch 1) the same block runs without clusters:
:func:`build_mlp_queue_kernel` (its docstring has its dataflow).

Shared memory (float32 words, one dynamic array, the same offsets in every block)::

    xs      [batch, k_slice]              h * norm on this block's hidden slice
    partial [batch, rows + 4]             gate/up partial dots; column ``rows`` is sum(h^2)
    act     [batch, inter_slice]          a = silu(gate) * up of the cluster's slice, pushed by its owners
    red     [batch, norm_shares]          shares of sum(h^2), one for each 256 elements of the slice
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, int32, uint32
from numba.cuda import libdevice

from .. import ptx
from . import plan
from .kernel import (FULL_MASK, REGISTERS_PER_THREAD, BlockShape, GemvTile, gemv_tile, make_clear, make_exchange,
                     make_finish, make_gemv, make_input_projection, make_norm_inputs, make_stamp, norm_shares,
                     region_offsets)
from .mlp import MLPConfig
from .plan import HOPPER, QUAD, DeviceLimits


#: What a timeline kernel (``MLPSpec.timeline``) times, as
#: :data:`~clusterlab.fused.kernel.TIMELINE_PHASES` for the attention kernel: stamp ``i`` ends phase
#: ``i - 1``, stamp 0 is the block's start, thread 0 stamps.
TIMELINE_PHASES = ("inputs + W_gate/W_up stream", "B1 wait", "act + push", "B2 wait", "W_down stream + red.add",
                   "fence + arrive", "finish")
TIMELINE_STAMPS = len(TIMELINE_PHASES) + 1

#: Warps of a block of the work-queue kernel (``MLPSpec.work_queue``): one block an SM at 128 registers.
QUEUE_WARPS = 16
#: Widths of W_down's column segments the work-queue kernel tries, widest first (see ``MLPSpec.queue_segment``).
QUEUE_SEGMENTS = (512, 256, 128, 64, 32, 16, 8)
#: Counters the work-queue kernel hands its units out from: warp ``w`` asks counter ``w % QUEUE_SHARDS``,
#: which hands out units ``shard, shard + QUEUE_SHARDS, ..``. One counter for all took at most about 300
#: units a microsecond on the H200 (atomics on one address queue up in L2), which held the step.
QUEUE_SHARDS = 8
#: Words of ``arrivals`` between two counters (a 128-byte line each): shard ``s`` counts at
#: ``QUEUE_STRIDE * (1 + s)``; word 0 counts the blocks in for the finish.
QUEUE_STRIDE = 32
#: Words of ``arrivals`` the work-queue kernel uses.
QUEUE_ARRIVALS = QUEUE_STRIDE * (1 + QUEUE_SHARDS)
#: A word of the work-queue kernel's ``act`` not written yet this step: no float32 a rounded activation
#: has (the conversions from 16 bits give NaN as 0x7FFFFFFF).
UNWRITTEN = 0xFFFFFFFF
#: :data:`UNWRITTEN` as the int32 array ``act`` holds it.
UNWRITTEN_INT32 = UNWRITTEN - 2**32


@dataclass(frozen=True)
class MLPSpec(BlockShape):
    """Everything the MLP kernel is specialised on (each distinct spec is one compilation)."""

    hidden_size: int
    intermediate_size: int
    rms_eps: float
    bf16: bool
    batch: int
    cluster_size: int
    clusters: int
    warps: int
    limits: DeviceLimits = HOPPER
    #: the gate/up steps on the CUDA cores read ``h * norm`` in
    #: :func:`~clusterlab.fused.kernel.input_word`'s interleaved order, each warp load 32 consecutive
    #: words instead of eight-way bank conflicts (see :attr:`inputs_interleaved`)
    interleave_inputs: bool = True
    #: hand the output on as float32 sums, as :attr:`~clusterlab.fused.kernel.KernelSpec.handoff`
    #: (see :func:`build_mlp_kernel`; :meth:`~clusterlab.fused.DecodeMLP.handoff`)
    handoff: bool = False
    #: record a timeline: two more kernel arguments, ``stamps`` and ``sms`` (see :func:`build_mlp_kernel`)
    timeline: bool = False
    #: batch 1 without clusters: a block on every SM takes units of work from a counter, gate/up
    #: rows then W_down tiles (:func:`build_mlp_queue_kernel`; made by :meth:`queue`, not :meth:`of`)
    work_queue: bool = False

    @classmethod
    def of(cls, config: MLPConfig, bf16: bool, batch: int, cluster_size: int, clusters: int, warps: int,
           limits: DeviceLimits = HOPPER) -> MLPSpec:
        """The spec of one launch shape (raises ``ValueError`` where it cannot be built)."""
        if config.intermediate_size % clusters or (config.intermediate_size // clusters) % 8:
            raise ValueError(f"clusters ({clusters}) must split intermediate_size {config.intermediate_size} into "
                             "slices of a multiple of 8")
        if config.hidden_size % (8 * cluster_size):
            raise ValueError(f"cluster_size ({cluster_size}) must split hidden_size {config.hidden_size} into "
                             "slices of a multiple of 8")
        spec = cls(config.hidden_size, config.intermediate_size, float(config.rms_eps), bf16, batch, cluster_size,
                   clusters, warps, limits)
        return spec.checked(" (use a larger cluster)")

    @classmethod
    def queue(cls, config: MLPConfig, bf16: bool, batch: int, limits: DeviceLimits = HOPPER) -> MLPSpec:
        """The work-queue spec (``work_queue``): one block of :data:`QUEUE_WARPS` warps on each of the
        GPU's SMs, no clusters (``cluster_size`` 1, ``clusters`` the blocks). Raises ``ValueError``
        where it cannot be built: a batch other than 1, a hidden row of more than
        :data:`~clusterlab.fused.kernel.LOADS_PER_STEP` loads a lane, too much shared memory."""
        if batch != 1:
            raise ValueError(f"work_queue runs batch 1 only, got batch {batch}")
        spec = cls(config.hidden_size, config.intermediate_size, float(config.rms_eps), bf16, batch, 1,
                   limits.sm_count, QUEUE_WARPS, limits, work_queue=True)
        return spec.checked("")

    def checked(self, remedy: str) -> MLPSpec:
        """This spec, once its tiles and its shared memory are known to work: raises ``ValueError`` where a
        slice or row has no tiling, or a block needs more shared memory than the GPU allows (``remedy``
        appended to that message)."""
        self.gate_up_tile()
        self.down_tile()
        if self.shared_bytes > self.limits.shared_bytes_per_block:
            raise ValueError(f"a block of this shape needs {self.shared_bytes} bytes of shared memory; the GPU "
                             f"allows {self.limits.shared_bytes_per_block}{remedy}")
        return self

    @property
    def queue_segment(self) -> int:
        """Columns of W_down (elements of ``a``) a work-queue tile spans: the widest of
        :data:`QUEUE_SEGMENTS` that divides ``intermediate_size`` and tiles a row of 16-byte chunks."""
        for segment in QUEUE_SEGMENTS:
            if self.intermediate_size % segment == 0:
                try:
                    gemv_tile("down projection", segment // 8, self.hidden_size, self.batch, batch_chunk=1)
                except ValueError:
                    continue
                return segment
        raise ValueError(f"intermediate_size {self.intermediate_size} has no segment of {QUEUE_SEGMENTS} a "
                         f"work-queue tile of {self.hidden_size} rows can span")

    @property
    def inter_slice(self) -> int:
        return self.intermediate_size // self.clusters

    @property
    def rows(self) -> int:
        return 2 * self.inter_slice

    @property
    def min_blocks_per_sm(self) -> int:
        return self.limits.blocks_per_sm(self.shared_bytes, self.threads, REGISTERS_PER_THREAD)

    @property
    def inputs_interleaved(self) -> bool:
        """``interleave_inputs`` where the gate/up steps run on the CUDA cores (a ``GemvTile``)."""
        return self.interleave_inputs and isinstance(self.gate_up_tile(), GemvTile)

    def gate_up_tile(self):
        # A warp step's rows divide inter_slice: a step never straddles the gate and up rows.
        # The work queue's steps read whole hidden rows (k_slice: cluster_size 1) of any of them.
        rows = self.intermediate_size if self.work_queue else self.inter_slice
        return gemv_tile("gate/up projection", self.k_slice // 8, rows, self.batch)

    def down_tile(self):
        # One sequence at a time: the first step's words stay in registers across the act phase,
        # and with two sequences a step ptxas spilled (8B shape, batch 4 and 8).
        if self.work_queue:  # a tile: a segment of the columns, rows of all of W_down
            return gemv_tile("down projection", self.queue_segment // 8, self.hidden_size, self.batch, batch_chunk=1)
        return gemv_tile("down projection", self.inter_slice // 8, self.out_rows, self.batch, batch_chunk=1)

    @property
    def partial_stride(self) -> int:
        """Words of a sequence's row of ``partial``: gate rows, up rows, then ``sum(h^2)``, padded to a
        whole quad (16 bytes) so that the exchange pulls 16-byte-aligned quads."""
        return self.rows + QUAD

    def smem_layout(self) -> dict[str, int]:
        """Offsets (float32 words) of each shared region, and ``"total"`` (the work queue's: see
        :func:`build_mlp_queue_kernel`)."""
        b = self.batch
        if self.work_queue:
            return region_offsets({"xs": self.hidden_size, "red": norm_shares(self.hidden_size), "sums": QUAD,
                                   "dots": self.warps * 2 * self.gate_up_tile().step_rows,
                                   "act": self.warps * self.queue_segment})
        sizes = {"xs": b * self.k_slice, "partial": b * self.partial_stride, "act": b * self.inter_slice,
                 "red": b * norm_shares(self.k_slice)}
        return region_offsets(sizes)

    @property
    def shared_bytes(self) -> int:
        return 4 * self.smem_layout()["total"]


def make_act(bf16: bool):
    """``(normalised, act)``: ``g = normalised(dot, inv_rms)``, a gate (or up) row's dot with ``h *
    norm`` times ``inv_rms = rsqrt(mean(h^2) + eps)``, and ``a = act(g, u) = silu(g) * u``; ``g``,
    ``u``, ``silu(g)`` and ``a`` each rounded to the model dtype, as PyTorch's separate ops round
    (float32 values)."""
    to_bits = ptx.f32_to_bf16 if bf16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if bf16 else ptx.f16_to_f32

    @cuda.jit(device=True, inline=True)
    def rounded(x):
        """``x`` rounded to the model dtype, as a PyTorch op that returns a 16-bit tensor rounds."""
        return to_f32(to_bits(x))

    @cuda.jit(device=True, inline=True)
    def normalised(dot, inv_rms):
        return rounded(dot * inv_rms)

    @cuda.jit(device=True, inline=True)
    def act(g, u):
        return rounded(rounded(g / (float32(1.0) + math.exp(-g))) * u)

    return normalised, act


def build_mlp_kernel(spec: MLPSpec):
    """The kernel for ``spec``, ready for ``cuda.jit`` compilation (see :func:`mlp_kernel_signature`).

    Arguments (16-bit tensors passed as flat int16 views, row-major)::

        hidden, residual  [batch * hidden_size]        inputs (the attention's output and residual)
        norm              [hidden_size]                the post-attention RMSNorm's gain
        w_gate, w_up      [intermediate_size * hidden_size]
        w_down            [hidden_size * intermediate_size]
        out, residual_out [batch * hidden_size]        outputs
        out_acc           [batch * hidden_size] float32  zero on entry, left zero on exit
        arrivals          [cluster_size] int32           zero on entry, left zero on exit

    and, with ``spec.timeline``, two more (without it numba compiles the stamps away)::

        stamps            [blocks * TIMELINE_STAMPS * 2] uint64   per block and stamp: clock64, globaltimer
        sms               [blocks] uint32                         the SM each block ran on

    With ``spec.handoff``, as the attention kernel's (:func:`~clusterlab.fused.kernel.build_kernel`):
    ``hidden`` is float32 sums, read rounded to the model dtype; ``out`` is a float32 buffer the
    step sets to zero; ``out_acc`` is left holding the output sums; ``arrivals`` is not touched.

    With ``spec.work_queue``: :func:`build_mlp_queue_kernel`'s kernel.
    """
    if spec.work_queue:
        return build_mlp_queue_kernel(spec)
    H, I, C, CLUSTERS = spec.hidden_size, spec.intermediate_size, spec.cluster_size, spec.clusters
    INTER_SLICE, ROWS, K_SLICE, OUT_ROWS = spec.inter_slice, spec.rows, spec.k_slice, spec.out_rows
    PARTIAL_STRIDE = spec.partial_stride
    BATCH, WARPS, THREADS, BF16, HANDOFF = spec.batch, spec.warps, spec.threads, spec.bf16, spec.handoff
    EPS = np.float32(spec.rms_eps)
    INV_H = np.float32(1.0 / H)
    layout = spec.smem_layout()
    XS, PARTIAL, ACT, RED = layout["xs"], layout["partial"], layout["act"], layout["red"]
    down_tile = spec.down_tile()
    DOWN_STEP_ROWS = down_tile.step_rows  # W_down rows a warp step covers
    DOWN_STEPS = OUT_ROWS // DOWN_STEP_ROWS

    normalised, act = make_act(BF16)
    # the cluster's slots: its gate rows, then its up rows
    gate_up = make_input_projection(BATCH, H, K_SLICE, WARPS, BF16, spec.gate_up_tile(), ROWS, INTER_SLICE, XS,
                                    PARTIAL, PARTIAL_STRIDE, RED, interleaved=spec.inputs_interleaved,
                                    float32_hidden=HANDOFF)
    down_load, down_finish, DOWN_WORDS = make_gemv(BATCH, BF16, down_tile, x_stride=INTER_SLICE, out_stride=H,
                                                   atomic=True)
    finish_arrive, finish_convert = make_finish(BATCH, H, OUT_ROWS, THREADS, BF16)
    clear = make_clear(BATCH, H, THREADS)
    owned_quads = cuda.jit(device=True, inline=True)(plan.owned_quads)
    exchange_lanes, pull, push, peer_sum, _ = make_exchange(C)
    stamp, record_sm = make_stamp(spec.timeline, TIMELINE_STAMPS)

    @cuda.jit(device=True, inline=True)
    def mlp_step(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, stamps, sms):
        """One block's step: the kernel's body (``stamps``, ``sms``: None unless ``spec.timeline``)."""
        smem = cuda.shared.array(0, float32)
        last = cuda.shared.array(1, int32)
        tid = uint32(cuda.threadIdx.x)  # unsigned indices: see the attention kernel's decode_step
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        cluster = uint32(cuda.blockIdx.x) // C  # its intermediate slice cluster*INTER_SLICE ..
        k0 = rank * K_SLICE
        stamp(stamps, tid, 0)
        record_sm(sms, tid)

        # -- 1 gate_up: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2); partial dots -
        gate_up(hidden, residual, norm, residual_out, w_gate, cluster * INTER_SLICE, w_up, cluster * INTER_SLICE, smem,
                k0, cluster == 0, tid)
        # First W_down loads (weights need no a), during B1 (a release waits for the loads in flight
        # before it): this block's output rows, the cluster's columns.
        down_words = cuda.local.array(DOWN_WORDS, uint32)
        step = warp
        stamp(stamps, tid, 1)  # inputs + W_gate/W_up stream
        ptx.cluster_arrive_release()
        if step < DOWN_STEPS:
            down_load(w_down, (rank * OUT_ROWS + step * DOWN_STEP_ROWS) * I + cluster * INTER_SLICE, I, lane,
                      down_words)
        ptx.cluster_wait_acquire()  # B1: every block's partials are complete
        stamp(stamps, tid, 2)  # B1 wait

        # -- 2 act: owners sum the partials, normalise, a = silu(gate) * up, push a to every block --------
        # A unit is a quad of columns j .. j + 3 of one sequence; its C lanes pull one block's
        # partials each (gate and up: two 16-byte loads) and push the quad of a to it (see make_exchange).
        units = owned_quads(INTER_SLICE, rank, C) * BATCH
        for lane_of_block in range(tid, exchange_lanes(units), THREADS):
            unit, peer = uint32(lane_of_block) // C, lane % C  # unsigned: see tid
            active = unit < units
            j = QUAD * (rank + (unit // BATCH) * C)
            seq = unit % BATCH
            partial = PARTIAL + seq * PARTIAL_STRIDE
            gate = cuda.local.array(QUAD, float32)
            up = cuda.local.array(QUAD, float32)
            ss = float32(0.0)
            for i in range(QUAD):
                gate[i] = float32(0.0)
                up[i] = float32(0.0)
            if active:
                gate[0], gate[1], gate[2], gate[3] = pull(smem, partial + j, peer)
                up[0], up[1], up[2], up[3] = pull(smem, partial + INTER_SLICE + j, peer)
                ss = ptx.remote_load(smem, partial + ROWS, peer)
            inv_rms = float32(1.0) / math.sqrt(peer_sum(ss) * INV_H + EPS)
            a = cuda.local.array(QUAD, float32)
            for i in range(QUAD):
                g = normalised(peer_sum(gate[i]), inv_rms)
                u = normalised(peer_sum(up[i]), inv_rms)
                a[i] = act(g, u)
            if active:
                push(smem, ACT + seq * INTER_SLICE + j, peer, a[0], a[1], a[2], a[3])
        stamp(stamps, tid, 3)  # act + push
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B2: a is complete in every block; no DSMEM access after this
        stamp(stamps, tid, 4)  # B2 wait

        # -- 3 down: this block's output rows, the cluster's intermediate columns, added into out_acc -----
        while step < DOWN_STEPS:
            w0 = (rank * OUT_ROWS + step * DOWN_STEP_ROWS) * I + cluster * INTER_SLICE
            down_finish(down_words, w_down, w0, I, smem, ACT, out_acc, rank * OUT_ROWS + step * DOWN_STEP_ROWS, lane)
            step += WARPS
            if step < DOWN_STEPS:
                down_load(w_down, (rank * OUT_ROWS + step * DOWN_STEP_ROWS) * I + cluster * INTER_SLICE, I, lane,
                          down_words)
        stamp(stamps, tid, 5)  # W_down stream + red.add

        # -- 4 finish: the last block (one a cluster) to add into this block's output rows converts them --
        # (handing the sums on instead: the grid clears `out`, the buffer the kernel before read)
        if HANDOFF:
            clear(out, tid)
            stamp(stamps, tid, 6)
        else:
            finish_arrive(arrivals, rank, CLUSTERS, last, tid)
            stamp(stamps, tid, 6)  # fence + arrive
            if last[0] == 1:
                finish_convert(out, out_acc, arrivals, rank, BATCH, tid)
        stamp(stamps, tid, 7)  # finish

    if spec.timeline:
        def fused_mlp_timeline(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals,
                               stamps, sms):
            mlp_step(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, stamps, sms)

        return fused_mlp_timeline

    def fused_mlp(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals):
        mlp_step(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, None, None)

    return fused_mlp


def build_mlp_queue_kernel(spec: MLPSpec):
    """The work-queue kernel of ``spec`` (``spec.work_queue``: batch 1, no clusters), ready for
    ``cuda.jit`` compilation. Arguments: :func:`build_mlp_kernel`'s (no timeline), then::

        act               [intermediate_size] int32    a's float32 bits; UNWRITTEN on entry, left so on exit

    and ``arrivals`` (:data:`QUEUE_ARRIVALS` words, zero on entry and left zero) holds the counter of
    the blocks in for the finish (word 0) and the :data:`QUEUE_SHARDS` counters that hand out the
    units of work.

    The cluster kernel gives each cluster one slice of the intermediate size, so its step lasts as
    long as its slowest SM streams the slice; here every block (one an SM, all alike) takes a unit
    at a time from the counter, so blocks on SMs that stream faster take more. Per step::

        1 inputs    every block: h = hidden + residual over the whole hidden size, xs = h * norm
                    (float32, shared memory), sum(h^2) (block 0 writes residual_out)
        2 gate_up   units 0 .. UNITS_A - 1, unit u is a's elements j0 = u * SA .. j0 + SA - 1: a warp
                    step of gate rows, one of up rows (whole rows, dotted with xs), then
                    a = silu(g) * u of make_act, stored to ``act`` (strong stores)
        3 down      the next units are tiles of TILE_ROWS rows and SEGMENT columns of W_down, segment
                    by segment (so the first tiles need the first a): the warp copies the segment of
                    ``act`` into shared memory, waiting on each quad until no word is UNWRITTEN,
                    and adds its dots into ``out_acc`` (red.add)
        4 finish    the last block in converts out_acc into out (hand-off: the grid clears ``out``,
                    out_acc keeps the sums) and resets ``act`` and the counters

    Warp ``w`` takes its units from counter ``w % QUEUE_SHARDS`` (units ``shard + QUEUE_SHARDS * k``,
    ``k`` the counter's count): every block holds warps of every counter, so the counters hand out
    their units at about the same pace, in order. A warp asks for its next unit while it works on
    the current one (lane 0's atomic in flight), and issues the next unit's first loads before it
    computes a or adds its dots, as the cluster kernel's steps do. Nothing can wait forever, whatever runs beside it: a warp in phase 3 waits
    only for a's elements of units handed out before its own, to warps that are running and that
    wait for nothing in phase 2, and every counter has a warp in each running block to hand its
    remaining units of phase 2 out.

    Shared memory (float32 words)::

        xs    [hidden_size]          h * norm (interleaved as the cluster kernel's, see MLPSpec.inputs_interleaved)
        red   [norm_shares]          shares of sum(h^2)
        sums  [4]                    sum(h^2) in word 0
        dots  [warps, 2, SA]         each warp's gate dots, then its up dots
        act   [warps, SEGMENT]       each warp's copy of the segment of a its tile spans
    """
    if spec.timeline:
        raise ValueError("the work-queue kernel records no timeline")
    H, I, BLOCKS = spec.hidden_size, spec.intermediate_size, spec.clusters
    THREADS, BF16, HANDOFF = spec.threads, spec.bf16, spec.handoff
    EPS = np.float32(spec.rms_eps)
    INV_H = np.float32(1.0 / H)
    layout = spec.smem_layout()
    XS, RED, SUMS, DOTS, ACT = layout["xs"], layout["red"], layout["sums"], layout["dots"], layout["act"]
    gate_up_tile, down_tile = spec.gate_up_tile(), spec.down_tile()
    SA = gate_up_tile.step_rows  # a's elements a gate/up unit computes
    UNITS_A = I // SA
    SEGMENT = spec.queue_segment
    SEGMENT_QUADS = SEGMENT // QUAD
    TILE_ROWS = down_tile.step_rows
    TILES_PER_SEGMENT = H // TILE_ROWS
    UNITS = UNITS_A + I // SEGMENT * TILES_PER_SEGMENT

    norm_inputs, sum_squares, _ = make_norm_inputs(1, H, H, THREADS, BF16, spec.inputs_interleaved, HANDOFF)
    gate_up_load, gate_up_finish, GATE_UP_WORDS = make_gemv(1, BF16, gate_up_tile, x_stride=H, out_stride=0,
                                                            atomic=False, interleaved=spec.inputs_interleaved)
    down_load, down_finish, DOWN_WORDS = make_gemv(1, BF16, down_tile, x_stride=SEGMENT, out_stride=H, atomic=True)
    WORDS = max(GATE_UP_WORDS, DOWN_WORDS)
    normalised, act_of = make_act(BF16)
    finish_arrive, finish_convert = make_finish(1, H, H, THREADS, BF16)
    clear = make_clear(1, H, THREADS)

    @cuda.jit(device=True, inline=True)
    def unit_load(w_gate, w_down, unit, lane, words):
        """The first loads of ``unit``: its gate rows, or its tile of W_down (none past the last unit)."""
        if unit < UNITS_A:
            gate_up_load(w_gate, unit * SA * H, H, lane, words)
        elif unit < UNITS:
            tile = unit - UNITS_A
            down_load(w_down, tile % TILES_PER_SEGMENT * TILE_ROWS * I + tile // TILES_PER_SEGMENT * SEGMENT, I,
                      lane, words)
        else:  # none: words nobody reads, set so that every path defines them (they stay in registers)
            for i in range(WORDS):
                words[i] = uint32(0)

    @cuda.jit(device=True, inline=True)
    def next_unit(arrivals, shard, ticket, lane):
        """``(unit, ticket)``: lane 0's ``ticket`` of counter ``shard`` as the warp's unit, and lane 0's
        request for the one after it in flight (none once the units are out)."""
        unit = shard + QUEUE_SHARDS * cuda.shfl_sync(FULL_MASK, ticket, 0)
        if lane == 0 and unit < UNITS:
            ticket = cuda.atomic.add(arrivals, QUEUE_STRIDE * (1 + shard), 1)
        return unit, ticket

    def fused_mlp_queue(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, act):
        smem = cuda.shared.array(0, float32)
        last = cuda.shared.array(1, int32)
        tid = uint32(cuda.threadIdx.x)  # unsigned indices: see the attention kernel's decode_step
        lane, warp = tid % 32, tid // 32
        dots = DOTS + warp * 2 * SA  # the warp's gate dots, then its up dots
        copy = ACT + warp * SEGMENT  # the warp's copy of a segment of a
        shard = warp % QUEUE_SHARDS
        ticket = int32(0)
        if lane == 0:
            ticket = cuda.atomic.add(arrivals, QUEUE_STRIDE * (1 + shard), 1)

        # -- 1 inputs: h = hidden + residual; xs = h * norm; sum(h^2); the first unit's loads ------------
        norm_inputs(hidden, residual, norm, residual_out, smem, XS, RED, 0, cuda.blockIdx.x == 0, 1, tid)
        unit, ticket = next_unit(arrivals, shard, ticket, lane)
        words = cuda.local.array(WORDS, uint32)
        unit_load(w_gate, w_down, unit, lane, words)
        cuda.syncthreads()
        sum_squares(smem, RED, SUMS, 0, tid)
        cuda.syncthreads()
        inv_rms = float32(1.0) / math.sqrt(smem[SUMS] * INV_H + EPS)

        # -- 2 gate_up: a's elements j0 .. j0 + SA - 1 from their gate and up rows ---------------------------
        while unit < UNITS_A:
            j0 = unit * SA
            gate_up_finish(words, w_gate, j0 * H, H, smem, XS, smem, dots, lane)
            gate_up_load(w_up, j0 * H, H, lane, words)
            gate_up_finish(words, w_up, j0 * H, H, smem, XS, smem, dots + SA, lane)
            following, ticket = next_unit(arrivals, shard, ticket, lane)
            unit_load(w_gate, w_down, following, lane, words)
            cuda.syncwarp()
            if lane < SA:
                a = act_of(normalised(smem[dots + lane], inv_rms), normalised(smem[dots + SA + lane], inv_rms))
                cuda.atomic.exch(act, j0 + lane, libdevice.float_as_int(a))
            cuda.syncwarp()
            unit = following

        # -- 3 down: a tile of W_down's rows and a segment of its columns, added into out_acc --------------
        while unit < UNITS:
            tile = unit - UNITS_A
            segment, row0 = tile // TILES_PER_SEGMENT, tile % TILES_PER_SEGMENT * TILE_ROWS
            for q in range(lane, SEGMENT_QUADS, 32):
                at = segment * SEGMENT + q * QUAD
                got = ptx.ld_relaxed_gpu_v4(act, at)
                while got[0] == UNWRITTEN or got[1] == UNWRITTEN or got[2] == UNWRITTEN or got[3] == UNWRITTEN:
                    got = ptx.ld_relaxed_gpu_v4(act, at)
                for e in range(QUAD):
                    smem[copy + q * QUAD + e] = libdevice.int_as_float(int32(got[e]))
            cuda.syncwarp()
            following, ticket = next_unit(arrivals, shard, ticket, lane)
            down_finish(words, w_down, row0 * I + segment * SEGMENT, I, smem, copy, out_acc, row0, lane)
            unit_load(w_gate, w_down, following, lane, words)
            cuda.syncwarp()  # every lane is done with the copy before the next segment's is written
            unit = following

        # -- 4 finish: the last block in converts the sums and leaves act and the counters for the next step -
        if HANDOFF:
            clear(out, tid)
        finish_arrive(arrivals, 0, BLOCKS, last, tid)
        if last[0] == 1:
            if HANDOFF:
                if tid == 0:
                    arrivals[0] = 0
            else:
                finish_convert(out, out_acc, arrivals, 0, 1, tid)
            for j in range(tid, I, THREADS):
                act[j] = UNWRITTEN_INT32
            if tid < QUEUE_SHARDS:
                arrivals[QUEUE_STRIDE * (1 + tid)] = 0

    return fused_mlp_queue


def mlp_kernel_signature(spec: MLPSpec | None = None):
    """Numba argument types of :func:`build_mlp_kernel`'s kernel for ``spec`` (None: the default spec's)."""
    from numba import types

    h, f = types.int16[::1], types.float32[::1]
    io = f if spec is not None and spec.handoff else h  # hidden and out (see build_mlp_kernel)
    signature = (io, h, h, h, h, h, io, h, f, types.int32[::1])
    if spec is not None and spec.timeline:
        signature += (types.uint64[::1], types.uint32[::1])
    if spec is not None and spec.work_queue:
        signature += (types.int32[::1],)
    return signature
