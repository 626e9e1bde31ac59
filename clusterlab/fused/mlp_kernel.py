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
    XS, PARTIAL, ACT, RED    offsets of smem_layout()'s regions (the simulator's shared arrays);
    HELP                     with ``share_down``, the region helping warps copy another cluster's a into
    SHARED_STEPS, BLOCKS     shared_steps (a block's W_down steps any warp may claim), clusters * C

and the variables read as in the simulator: ``cluster``, ``rank``, ``k0``, ``seq``, ``slot``
(a row of the cluster's W_gate / W_up rows), ``j`` (an element of the cluster's intermediate
slice), ``gate``, ``up``, ``a``.

The two matrix-vector phases are the attention kernel's (:func:`~clusterlab.fused.kernel.make_gemv`:
each warp step issues all its 16-byte loads before using any), and so is the finish
(:func:`~clusterlab.fused.kernel.make_finish`). The first W_down step of every warp is loaded
before barrier B1, so nothing waits on memory across the two exchanges.

Shared memory (float32 words, one dynamic array, the same offsets in every block)::

    xs      [batch, k_slice]              h * norm on this block's hidden slice
    partial [batch, rows + 4]             gate/up partial dots; column ``rows`` is sum(h^2)
    act     [batch, inter_slice]          a = silu(gate) * up of the cluster's slice, pushed by its owners
    red     [warps, batch]                block reduction of sum(h^2)
    help    [warps, batch, inter_slice]   (share_down) each warp's copy of the a of a cluster it helps
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, int32, uint32

from .. import ptx
from . import plan
from .kernel import (FULL_MASK, REGISTERS_PER_THREAD, BlockShape, GemvTile, gemv_tile, make_clear, make_exchange,
                     make_finish, make_gemv, make_input_projection, make_stamp, region_offsets)
from .mlp import MLPConfig
from .plan import HOPPER, QUAD, DeviceLimits


#: Bit 31 of a block's word of ``claims`` (see :func:`build_mlp_kernel`): its cluster's ``a`` is published.
PUBLISHED = np.int32(-(1 << 31))
#: What a claim from the back adds to a word of ``claims``.
BACK = np.int32(1 << 16)

#: What a timeline kernel (``MLPSpec.timeline``) times, as
#: :data:`~clusterlab.fused.kernel.TIMELINE_PHASES` for the attention kernel: stamp ``i`` ends phase
#: ``i - 1``, stamp 0 is the block's start, thread 0 stamps.
TIMELINE_PHASES = ("inputs + W_gate/W_up stream", "B1 wait", "act + push", "B2 wait", "W_down stream + red.add",
                   "fence + arrive", "finish")
TIMELINE_STAMPS = len(TIMELINE_PHASES) + 1


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
    #: share the W_down stream between the blocks (see :func:`build_mlp_kernel`): every block's
    #: first round of steps stays its own, the others are claimed one at a time, and a warp whose
    #: block has none left takes steps from the back of the block with the most left, so that the
    #: blocks on SMs with a smaller share of the memory system do not decide when the step ends
    share_down: bool = False
    #: hand the output on as float32 sums, as :attr:`~clusterlab.fused.kernel.KernelSpec.handoff`
    #: (see :func:`build_mlp_kernel`; :meth:`~clusterlab.fused.DecodeMLP.handoff`)
    handoff: bool = False
    #: record a timeline: two more kernel arguments, ``stamps`` and ``sms`` (see :func:`build_mlp_kernel`)
    timeline: bool = False

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
        spec.gate_up_tile()  # raise if a slice has no valid tiling
        spec.down_tile()
        if spec.shared_bytes > limits.shared_bytes_per_block:
            raise ValueError(f"a block of this shape needs {spec.shared_bytes} bytes of shared memory; the GPU "
                             f"allows {limits.shared_bytes_per_block} (use a larger cluster)")
        return spec

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
        return gemv_tile("gate/up projection", self.k_slice // 8, self.inter_slice, self.batch)

    def down_tile(self):
        # One sequence at a time: the first step's words stay in registers across the act phase,
        # and with two sequences a step ptxas spilled (8B shape, batch 4 and 8).
        return gemv_tile("down projection", self.inter_slice // 8, self.out_rows, self.batch, batch_chunk=1)

    @property
    def shared_steps(self) -> int:
        """The W_down steps of a block that any warp may claim (``share_down``): all but the first
        round, one step a warp, which stays the block's own."""
        steps = self.out_rows // self.down_tile().step_rows
        return max(steps - self.warps, 0) if self.share_down else 0

    @property
    def partial_stride(self) -> int:
        """Words of a sequence's row of ``partial``: gate rows, up rows, then ``sum(h^2)``, padded to a
        whole quad (16 bytes) so that the exchange pulls 16-byte-aligned quads."""
        return self.rows + QUAD

    def smem_layout(self) -> dict[str, int]:
        """Offsets (float32 words) of each shared region, and ``"total"``."""
        b = self.batch
        sizes = {"xs": b * self.k_slice, "partial": b * self.partial_stride, "act": b * self.inter_slice,
                 "red": self.warps * b}
        if self.share_down:  # each warp's copy of the a it helps with
            sizes["help"] = self.warps * b * self.inter_slice
        return region_offsets(sizes)

    @property
    def shared_bytes(self) -> int:
        return 4 * self.smem_layout()["total"]


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
        claims            [blocks] int32                 zero on entry, left zero on exit (``share_down``)
        act_out           [batch * intermediate_size] float32   a, published for helping warps (``share_down``)

    (without ``spec.share_down`` the kernel does not touch ``claims`` and ``act_out``), and, with ``spec.timeline``, two more (without it numba compiles the stamps away)::

        stamps            [blocks * TIMELINE_STAMPS * 2] uint64   per block and stamp: clock64, globaltimer
        sms               [blocks] uint32                         the SM each block ran on

    Shared W_down steps (``spec.share_down``). Block ``v = cluster * C + rank`` owns the steps of
    its output rows as without sharing; the first round (step ``warp`` of every warp, loaded before
    B1) stays its own and the other ``spec.shared_steps`` are claimed on ``claims[v]`` (each warp's
    claim of its next step goes out a step ahead): its low 16
    bits count the steps taken from the front (by the block's own warps, in order), bits 16-30 those
    taken from the back (by other blocks' warps), and bit 31 says that the block's cluster has
    published its ``a`` in ``act_out``. A claim is one atomic add that returns both counts, so every
    step is taken once: the claim is good while the two counts it saw add up to fewer than
    ``shared_steps``. The owners write ``a`` to ``act_out`` with the push of phase 2 and fence it;
    after B2 each block sets its bit. A warp whose block has no step left reads every block's word,
    picks the one with the most steps left (at least a round, one a warp: with fewer, the block's own
    warps finish them first), copies that cluster's ``a`` into its own slice
    of the ``help`` region and takes steps from the back, adding into the same rows of ``out_acc``;
    it stops when no published block has that many left (it never waits). Every block then counts
    in on ``arrivals[0]``; the last of all converts every row (or, handing off, converts nothing)
    and sets ``claims`` back to zero.

    With ``spec.handoff``, as the attention kernel's (:func:`~clusterlab.fused.kernel.build_kernel`):
    ``hidden`` is float32 sums, read rounded to the model dtype; ``out`` is a float32 buffer the
    step sets to zero; ``out_acc`` is left holding the output sums; ``arrivals`` is not touched
    but for ``share_down``'s count.
    """
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
    SHARE, SHARED_STEPS, BLOCKS = spec.share_down, spec.shared_steps, CLUSTERS * C
    HELP = layout.get("help", 0)
    A_WORDS = BATCH * INTER_SLICE  # a cluster's a, all sequences

    to_bits = ptx.f32_to_bf16 if BF16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if BF16 else ptx.f16_to_f32
    # the cluster's slots: its gate rows, then its up rows
    gate_up = make_input_projection(BATCH, H, K_SLICE, WARPS, BF16, spec.gate_up_tile(), ROWS, INTER_SLICE, XS,
                                    PARTIAL, PARTIAL_STRIDE, RED, interleaved=spec.inputs_interleaved,
                                    float32_hidden=HANDOFF)
    down_load, down_finish, DOWN_WORDS = make_gemv(BATCH, BF16, down_tile, x_stride=INTER_SLICE, out_stride=H,
                                                   atomic=True)
    finish_arrive, finish_convert = make_finish(BATCH, H, OUT_ROWS, THREADS, BF16)
    _, convert_all = make_finish(BATCH, H, H, THREADS, BF16)  # share_down: the last block converts every row
    HELP_MIN = WARPS  # steps a block must have left to be helped: a round of its own warps
    clear = make_clear(BATCH, H, THREADS)
    owned_quads = cuda.jit(device=True, inline=True)(plan.owned_quads)
    exchange_lanes, pull, push, peer_sum, _ = make_exchange(C)
    stamp, record_sm = make_stamp(spec.timeline, TIMELINE_STAMPS)

    @cuda.jit(device=True, inline=True)
    def down_w0(rank, cluster, step):
        """Where block (``cluster``, ``rank``)'s W_down step ``step`` starts: its output rows, the cluster's columns."""
        return (rank * OUT_ROWS + step * DOWN_STEP_ROWS) * I + cluster * INTER_SLICE

    @cuda.jit(device=True, inline=True)
    def claim(claims, v, amount, lane):
        """Lane 0 adds ``amount`` to ``claims[v]`` (1: a step from the front, BACK: from the back) and
        returns the word before (the other lanes 0): the claim goes out now, its answer is used later."""
        old = int32(0)
        if lane == 0:
            old = cuda.atomic.add(claims, v, amount)
        return old

    @cuda.jit(device=True, inline=True)
    def counts(word):
        """``(front, back)``: the steps a word of ``claims`` says were taken from each end."""
        return word & 0xFFFF, (word >> 16) & 0x7FFF

    @cuda.jit(device=True, inline=True)
    def busiest(claims, lane):
        """The published block with the most shared steps left, at least HELP_MIN (-1: none), for the
        whole warp: each lane reads every 32nd word (coherent loads: the words change under it)."""
        best, most = int32(-1), int32(HELP_MIN - 1)
        for v in range(lane, BLOCKS, 32):
            word = ptx.ld_relaxed_gpu_b32(claims, v)
            front, back = counts(word)
            if word < 0 and SHARED_STEPS - front - back > most:
                best, most = int32(v), int32(SHARED_STEPS - front - back)
        for offset in (16, 8, 4, 2, 1):
            other_best = cuda.shfl_xor_sync(FULL_MASK, best, offset)
            other_most = cuda.shfl_xor_sync(FULL_MASK, most, offset)
            if other_most > most or (other_most == most and other_best > best):
                best, most = other_best, other_most
        return best

    @cuda.jit(device=True, inline=True)
    def help_others(claims, act_out, w_down, out_acc, smem, words, warp, lane):
        """A warp whose block has no shared step left takes steps from the back of the busiest
        block's, with that cluster's ``a`` copied into the warp's slice of ``help``, until no
        published block has HELP_MIN steps left."""
        slot = HELP + warp * A_WORDS
        victim = int32(-1)
        while True:
            if victim < 0:
                victim = busiest(claims, lane)
                if victim < 0:
                    return
                cuda.threadfence()  # its bit was set after its cluster's a was written: read a after
                cuda.syncwarp(FULL_MASK)  # the last step's reads of the slot are done
                for i in range(lane, A_WORDS, 32):
                    smem[slot + i] = act_out[victim // C * A_WORDS + i]
                cuda.syncwarp(FULL_MASK)
            front, back = counts(cuda.shfl_sync(FULL_MASK, claim(claims, victim, BACK, lane), 0))
            if front + back < SHARED_STEPS:
                v_cluster, v_rank, step = victim // C, victim % C, DOWN_STEPS - 1 - back
                down_load(w_down, down_w0(v_rank, v_cluster, step), I, lane, words)
                down_finish(words, w_down, down_w0(v_rank, v_cluster, step), I, smem[slot:], 0, out_acc,
                            v_rank * OUT_ROWS + step * DOWN_STEP_ROWS, lane)
            if SHARED_STEPS - front - back - 1 < HELP_MIN:
                victim = -1  # taken, or too few left to be worth it: look again

    @cuda.jit(device=True, inline=True)
    def rounded(x):
        """``x`` rounded to the model dtype, as a PyTorch op that returns a 16-bit tensor rounds."""
        return to_f32(to_bits(x))

    @cuda.jit(device=True, inline=True)
    def mlp_step(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, claims, act_out,
                 stamps, sms):
        """One block's step: the kernel's body (``stamps``, ``sms``: None unless ``spec.timeline``)."""
        smem = cuda.shared.array(0, float32)
        last = cuda.shared.array(1, int32)
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        cluster = cuda.blockIdx.x // C  # its intermediate slice cluster*INTER_SLICE ..
        k0 = rank * K_SLICE
        stamp(stamps, tid, 0)
        record_sm(sms, tid)

        # -- 1 gate_up: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2); partial dots -
        gate_up(hidden, residual, norm, residual_out, w_gate, cluster * INTER_SLICE, w_up, cluster * INTER_SLICE, smem,
                k0, cluster == 0, tid)
        # First W_down loads (weights need no a): this block's output rows, the cluster's columns.
        down_words = cuda.local.array(DOWN_WORDS, uint32)
        step = warp
        if step < DOWN_STEPS:
            down_load(w_down, down_w0(rank, cluster, step), I, lane, down_words)
        own = cluster * C + rank  # this block's word of `claims`
        # share_down: each warp's claim of its next step goes out a step ahead (this one: the barriers ahead)
        ahead = claim(claims, own, 1, lane) if SHARE else int32(0)
        stamp(stamps, tid, 1)  # inputs + W_gate/W_up stream
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B1: every block's partials are complete
        stamp(stamps, tid, 2)  # B1 wait

        # -- 2 act: owners sum the partials, normalise, a = silu(gate) * up, push a to every block --------
        # A unit is a quad of columns j .. j + 3 of one sequence; its C lanes pull one block's
        # partials each (gate and up: two 16-byte loads) and push the quad of a to it (see make_exchange).
        units = owned_quads(INTER_SLICE, rank, C) * BATCH
        for lane_of_block in range(tid, exchange_lanes(units), THREADS):
            unit, peer = lane_of_block // C, lane % C
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
                g = rounded(peer_sum(gate[i]) * inv_rms)
                u = rounded(peer_sum(up[i]) * inv_rms)
                a[i] = rounded(rounded(g / (float32(1.0) + math.exp(-g))) * u)
            if active:
                push(smem, ACT + seq * INTER_SLICE + j, peer, a[0], a[1], a[2], a[3])
                if SHARE and peer == 0:  # published for the warps of other blocks that help with ours
                    for i in range(QUAD):
                        act_out[cluster * A_WORDS + seq * INTER_SLICE + j + i] = a[i]
                    cuda.threadfence()
        stamp(stamps, tid, 3)  # act + push
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B2: a is complete in every block; no DSMEM access after this
        stamp(stamps, tid, 4)  # B2 wait

        # -- 3 down: this block's output rows, the cluster's intermediate columns, added into out_acc -----
        if SHARE and tid == 0:
            cuda.threadfence()
            cuda.atomic.or_(claims, own, PUBLISHED)  # a is in act_out: other blocks may take our steps
        while step < DOWN_STEPS:
            claimed = claim(claims, own, 1, lane) if SHARE else int32(0)  # the step after the next
            down_finish(down_words, w_down, down_w0(rank, cluster, step), I, smem, ACT, out_acc,
                        rank * OUT_ROWS + step * DOWN_STEP_ROWS, lane)
            if SHARE:  # the claim of a step ago: claims only fail once the steps are gone, none is lost
                front, back = counts(cuda.shfl_sync(FULL_MASK, ahead, 0))
                step = WARPS + front if front + back < SHARED_STEPS else DOWN_STEPS
                ahead = claimed
            else:
                step += WARPS
            if step < DOWN_STEPS:
                down_load(w_down, down_w0(rank, cluster, step), I, lane, down_words)
        if SHARE:
            help_others(claims, act_out, w_down, out_acc, smem, down_words, warp, lane)
        stamp(stamps, tid, 5)  # W_down stream + red.add

        # -- 4 finish: the last block (one a cluster) to add into this block's output rows converts them --
        # (handing the sums on instead: the grid clears `out`, the buffer the kernel before read)
        if HANDOFF:
            clear(out, tid)
        if SHARE:  # helpers add into any block's rows: the last block of all converts them all
            finish_arrive(arrivals, 0, BLOCKS, last, tid)
            stamp(stamps, tid, 6)  # fence + arrive
            if last[0] == 1:
                for v in range(tid, BLOCKS, THREADS):
                    claims[v] = int32(0)
                if HANDOFF:
                    if tid == 0:
                        arrivals[0] = int32(0)
                else:
                    convert_all(out, out_acc, arrivals, 0, tid)  # every row; leaves arrivals[0] zero
        elif HANDOFF:
            stamp(stamps, tid, 6)
        else:
            finish_arrive(arrivals, rank, CLUSTERS, last, tid)
            stamp(stamps, tid, 6)  # fence + arrive
            if last[0] == 1:
                finish_convert(out, out_acc, arrivals, rank, tid)
        stamp(stamps, tid, 7)  # finish

    if spec.timeline:
        def fused_mlp_timeline(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals,
                               claims, act_out, stamps, sms):
            mlp_step(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, claims,
                     act_out, stamps, sms)

        return fused_mlp_timeline

    def fused_mlp(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, claims, act_out):
        mlp_step(hidden, residual, norm, w_gate, w_up, w_down, out, residual_out, out_acc, arrivals, claims, act_out,
                 None, None)

    return fused_mlp


def mlp_kernel_signature(spec: MLPSpec | None = None):
    """Numba argument types of :func:`build_mlp_kernel`'s kernel for ``spec`` (None: the default spec's)."""
    from numba import types

    h, f = types.int16[::1], types.float32[::1]
    io = f if spec is not None and spec.handoff else h  # hidden and out (see build_mlp_kernel)
    signature = (io, h, h, h, h, h, io, h, f, types.int32[::1], types.int32[::1], f)
    if spec is not None and spec.timeline:
        signature += (types.uint64[::1], types.uint32[::1])
    return signature
