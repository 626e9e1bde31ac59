"""The fused decode-attention kernel: one launch per step, one cluster per KV head or part of one (heads or positions).

The phases, their owners and the DSMEM exchanges are drawn in :mod:`clusterlab.fused.plan`; the
simulator model of the same dataflow is :func:`clusterlab.fused.simulated.decode_block`, phase for
phase: both mark them ``# -- 1 qkv`` .. ``# -- 6 finish`` and use the same names. The kernel's
constants are the words of :class:`KernelSpec` upper-cased::

    H, D, G, C               hidden_size, head_dim, group (query heads of a cluster), cluster_size
    HEADS, KV_HEADS          heads, kv_heads
    HEAD_SPLIT, BATCH        head_split (clusters per KV head), batch (sequences of a batch part)
    BATCH_PARTS              batch_parts: sets of clusters the step's batch is split over
    PARTS, QUERY_SPLIT       parts, query_split: the clusters of a KV head split its cached positions
                             (PARTS = HEAD_SPLIT) or its query heads (QUERY_SPLIT = HEAD_SPLIT)
    ROWS                     rows: the cluster's W_qkv rows, slots 0..G-1 query heads, G key, G+1 value
    K_SLICE, OUT_ROWS        k_slice, out_rows: a block's slice of the hidden size and of W_o's rows
    ATTN_WIDTH               attn_width = G * D: the cluster's attention output, its W_o columns
    WARPS, THREADS           warps, threads of a block
    KEYS_PER_STEP            keys_per_step: cached keys (and values) a warp step of attention loads
    WARPS_PER_SEQUENCE       warps // batch: the warps that attend for one sequence
    GROUPS_PER_SEQUENCE      the softmax states those warps leave for the block merge
    NEW_TOKEN_PART, NEW_TOKEN_RANK   plan.new_row_block(PARTS, C): the part and block folding in the new token
    XS, PARTIAL, QKV, ...    offsets of smem_layout()'s regions (the simulator's shared arrays)

and the variables of a block read as in the simulator: ``cluster``, ``kv_head``, ``part``, ``query_block``,
``rank``, ``k0`` (its hidden slice), ``seq`` (a sequence of the batch), ``head``, ``slot``, ``ra, rb, angle`` (a
RoPE pair), ``start, end`` (its cached positions), ``e`` (an element of ``o``), ``m_max``,
``l_tot``, ``a_tot``.

Inside a block (``warps`` warps), each streaming phase issues every 16-byte load of a step before
using any of them:

- **qkv / o proj** (matrix-vector): a warp step covers ``rows_per_step`` weight rows; a row's
  segment is read by ``lanes_per_row`` lanes, ``chunks_per_lane`` 16-byte chunks each. The lane
  multiplies its chunks by the activation (float32 in shared memory) for every sequence of the
  batch, then the warp reduces: a butterfly that halves the rows each level (reduce-scatter), so
  it costs about one shuffle per row instead of log2(32). From a batch of :data:`MMA_BATCH` on,
  the steps run on the tensor cores instead (``mma.m16n8k16``, the sequences as B's eight
  columns): reading the float32 activations once per weight word for every sequence had made
  shared memory, not the weights, the limit (see :func:`make_gemv`).
- **attention**: warps split the batch (``warps // batch`` per sequence), then the positions,
  ``keys_per_step`` keys and values a step, scored against the cluster's query heads and folded
  into an online softmax (base-2: q is pre-scaled by ``log2(e)/sqrt(head_dim)``). With one query
  head a cluster on the CUDA cores (``head_dim/8`` lanes hold one key, 8 dims each, and sum their
  dots with shuffles); with 2 to 8, on the tensor cores, FlashAttention-2's way: one ``mma``
  scores 16 keys (its rows) against the heads (its columns), and the scores, rounded to 16 bits,
  become an operand of the ``mma`` that sums the values (see :func:`_make_mma_attention`).

Nothing streams from device memory while a cluster exchanges partial results, so each streaming
phase's first loads are issued *during* the barrier that precedes it, into registers: the first
cached keys/values (they need no q) between barrier B1's arrive and its wait (on the CUDA cores; the
tensor-core steps load at the top of each step, or in blocks of 4 warps their values there and their
keys while the step before is folded, see :attr:`KernelSpec.pipelined_kv`), the first W_o step (it
needs no o) between B3's. Not before the arrive: its release waits for every load and store of the
thread in flight (``MEMBAR.ALL.GPU``). Registers are capped at 128 a thread (16 warps an SM: two
blocks of 8 warps or four of 4), or at 168 with the pipelined keys (three blocks of 4, see
:attr:`KernelSpec.min_blocks_per_sm`), and every register array is indexed by constants after
unrolling; ``tests/test_fused_kernel.py`` checks the PTX has no local memory and how much ptxas
spills (a few bytes of block indices in some shapes, none in most).

The finish is spread over the cluster ranks: block ``rank`` of every cluster adds into the same
output rows, and the last of those blocks (one per cluster) to arrive converts them (one counter per rank).

Shared memory (float32 words, one dynamic array; the same offsets in every block, so ``mapa``
reaches the peer's copy of a region). ``xs``, ``partial`` and ``red`` (until B2), ``scratch`` (B2
to the block merge) and ``o`` (from B3) live at different times and share the same words (see
:meth:`KernelSpec.smem_layout`): at batch 8 that is what lets two blocks of Llama-3-8B's clusters
of 16 share an SM, and all their clusters run at once::

    xs      [batch, k_slice]              h * norm on this block's hidden slice
    partial [batch, rows + 4]             qkv partial dots; column ``rows`` is sum(h^2)
    qkv     [batch, rows]                 q (scaled), k, v after RoPE, pushed by their owners
    scratch m, l [groups, G], acc [groups, G, head_dim]   per key-group softmax states
    foreign_q [warps, G * head_dim]       work queue: the published query of a warp's other cluster's chunks
    state   m, l [batch, G], acc [batch, G, head_dim]     the block's softmax state
    o       [batch, G * head_dim]         merged attention output, pushed by its owners
    red     [batch, norm_shares]          shares of sum(h^2), one for each 256 elements of the slice
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import cuda, float32, int32, int64, uint32, uint64
from numba.cuda import libdevice

from .. import ptx
from . import plan
from .config import AttentionConfig
from .plan import (
    HOPPER,
    QUAD,
    QUEUE_ROWS,
    QUEUE_SLOTS,
    DeviceLimits,
    check_cluster_size,
    check_head_split,
    new_row_block,
)

FULL_MASK = 0xFFFFFFFF
#: Stands for -inf in softmax states: exp2(NEG - m) is 0 for any real m, and exp2(NEG - NEG) = 1
#: multiplies a state that is still all zeros.
NEG = np.float32(-1e30)
#: Longest a block waits for blocks of other clusters (:func:`wait_until`), in nanoseconds, before it fails
#: the launch: far past any wait of a launch whose clusters all run at once, also under compute-sanitizer.
WAIT_LIMIT_NS = 30_000_000_000
#: Most 16-byte loads a lane keeps in flight in a matrix-vector step.
LOADS_PER_STEP = 16
#: Registers a thread may use: 16 warps an SM (65536 / (16 * 32)).
REGISTERS_PER_THREAD = 128
#: Registers a thread may use where tensor-core attention keeps the next step's keys in flight
#: (:attr:`KernelSpec.pipelined_kv`): three blocks of 4 warps an SM (65536 / (3 * 128), rounded
#: down to a multiple of 8).
PIPELINE_REGISTERS = 168
#: Most (row, chunk, sequence) dot products one matrix-vector step unrolls; beyond it the
#: compiler leaves loops rolled and register arrays go to local memory.
UNROLLED_DOTS = 32
#: Most float32 accumulators a lane keeps for one matrix-vector step.
ACCUMULATORS = 16
#: The smallest batch whose matrix-vector steps run on the tensor cores (``mma``): one sequence
#: would use one column of eight, and the CUDA cores keep up with the memory there.
MMA_BATCH = 2
#: The fewest query heads a cluster (``group``) whose attention over the cache runs on the tensor
#: cores (``mma``, the heads as A's rows): one head would use one row of sixteen.
MMA_GROUP = 2
#: The work queue's ticket word: chunks handed out in the low bits, states taken above them
TICKET_BITS = 24

#: What a timeline kernel (``KernelSpec.timeline``) times: stamp ``i`` ends phase ``i - 1`` of
#: this list, stamp 0 is the block's start. Thread 0 stamps, so a boundary inside a phase ("W_qkv
#: stream", "rope + push", "block merge") is where warp 0 got to.
TIMELINE_PHASES = ("inputs", "W_qkv stream", "B1 wait", "rope + push", "B2 wait", "attention", "block merge",
                   "B3 wait", "o merge + B4", "W_o stream + red.add", "fence + arrive", "finish")
TIMELINE_STAMPS = len(TIMELINE_PHASES) + 1


class BlockShape:
    """What a cluster kernel's spec derives from its ``hidden_size``, ``cluster_size`` and ``warps``
    (the attention, MLP and MLA specs): block ``rank`` reads the hidden slice ``rank * k_slice ..``
    and writes the output rows ``rank * out_rows ..``."""

    @property
    def k_slice(self) -> int:
        return self.hidden_size // self.cluster_size

    @property
    def out_rows(self) -> int:
        return self.hidden_size // self.cluster_size

    @property
    def threads(self) -> int:
        return 32 * self.warps


@dataclass(frozen=True)
class KernelSpec(BlockShape):
    """Everything the kernel is specialised on (each distinct spec is one compilation).

    The fields after ``limits`` are switches for measurement (:mod:`clusterlab.bench.fused_ablation`,
    :mod:`clusterlab.bench.fused_timeline`); their defaults are the kernel that
    :class:`~clusterlab.fused.DecodeAttention` runs, and :meth:`of` leaves them so; a variant is
    ``dataclasses.replace(spec, kv_stream=False)``. ``attention_mma``, ``kv_pipeline`` and
    ``registers`` choose how attention over the cache runs and the launch bound, with correct
    outputs either way (:data:`~clusterlab.fused.plan.KERNEL_CHOICES`: a layer takes them as
    ``kernel_options``); a switched-off stream issues no loads and computes nothing from them, so
    the outputs of such a variant are wrong by construction.
    """

    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    neox: bool
    bf16: bool
    rms_eps: float
    batch: int
    cluster_size: int
    warps: int
    head_split: int
    bias: bool = False
    limits: DeviceLimits = HOPPER
    #: attention over the cache on the tensor cores (True) or the CUDA cores (False); None: on the
    #: tensor cores from :data:`MMA_GROUP` query heads a cluster (see :attr:`mma_attention`)
    attention_mma: bool | None = None
    #: stream W_qkv (False: no qkv projection steps)
    qkv_stream: bool = True
    #: stream the cached keys and values (False: attention over the new token only)
    kv_stream: bool = True
    #: stream W_o (False: no o projection steps, nothing added into out_acc)
    o_stream: bool = True
    #: the last block of each rank converts out_acc into out and resets its counter (False: the
    #: blocks arrive, nobody converts; out_acc and the counters are left dirty)
    finish: bool = True
    #: tensor-core attention loads the next step's keys while it folds a step (True) or each
    #: step's keys and values at its top (False); None: see :attr:`pipelined_kv`
    kv_pipeline: bool | None = None
    #: registers a thread the launch bound allows; None: see :attr:`register_bound`
    registers: int | None = None
    #: regions whose lifetimes do not meet share shared memory (see :meth:`smem_layout`; False: each
    #: has its own words)
    overlay: bool = True
    #: the W_qkv steps on the CUDA cores read ``h * norm`` in :func:`input_word`'s interleaved order
    #: (see :attr:`inputs_interleaved`)
    interleave_inputs: bool = False
    #: the ``head_split`` clusters of a KV head split its cached positions, each with all its query
    #: heads, instead of its query heads (see :attr:`parts`)
    split_positions: bool = False
    #: with ``split_positions``, the parts share out the query projection instead of each projecting all
    #: the KV head's query heads, and hand their queries to each other through device memory (see
    #: :attr:`projected_group`)
    shared_queries: bool = False
    #: sets of clusters the step's sequences are split over, ``batch`` sequences each but the last,
    #: which may have fewer (see :attr:`step_batch`, :attr:`clusters`)
    batch_parts: int = 1
    #: sequences of the whole step where the last set has fewer than ``batch`` (0: ``batch *
    #: batch_parts``; see :attr:`uneven`)
    sequences: int = 0
    #: hand the output on as float32 sums (see :func:`build_kernel`): ``hidden`` is the float32 sums
    #: of the kernel before (read rounded to the model dtype), the output is left in ``out_acc`` for
    #: the kernel after, and no block converts it (:class:`~clusterlab.fused.DecodeAttention`'s
    #: :meth:`~clusterlab.fused.DecodeAttention.handoff`)
    handoff: bool = False
    #: where clusters split a KV head's query heads, the first projects its key rows and the second
    #: its value rows, the others neither, each reading what it lacks from the cache (True), or each
    #: projects both (False); None: from a split of :data:`~clusterlab.fused.plan.KV_ROWS_SPLIT_FROM`
    #: where the grid fits the GPU at once (see :attr:`kv_rows_split`)
    split_kv_rows: bool | None = None
    #: record a timeline: two more kernel arguments, ``stamps`` and ``sms`` (see :func:`build_kernel`)
    timeline: bool = False
    #: a KV head's cached positions taken in chunks from a counter in device memory by whichever warp
    #: is free, its own cluster's first, then any other's (see :attr:`queue_words`)
    work_queue: bool = False
    #: cached positions of one chunk of the work queue
    queue_rows: int = QUEUE_ROWS

    @classmethod
    def of(cls, config: AttentionConfig, bf16: bool, batch: int, cluster_size: int, warps: int,
           head_split: int = 1, limits: DeviceLimits = HOPPER, **switches) -> KernelSpec:
        """The spec of one launch shape on a GPU with ``limits``, the fields after ``limits`` set as
        ``switches`` give them (a layer's ``kernel_options``; raises where it cannot be built).
        ``batch``: the step's sequences; with ``batch_parts`` each set of clusters takes
        ``plan.set_batch(batch, batch_parts)`` of them (the spec's ``batch``), the last set the rest."""
        check_cluster_size(config, cluster_size)
        check_head_split(config, head_split, switches.get("split_positions", False))
        batch_parts = switches.get("batch_parts", 1)
        plan.check_batch_parts(batch, batch_parts)
        if batch % batch_parts:
            switches["sequences"] = batch
        batch = plan.set_batch(batch, batch_parts)
        if warps < batch:
            raise ValueError(f"warps ({warps}) must be at least batch ({batch}): attention gives each sequence a warp")
        spec = cls(config.hidden_size, config.heads, config.kv_heads, config.head_dim,
                   config.rope_style == "neox", bf16, float(config.rms_eps), batch, cluster_size, warps, head_split,
                   config.qkv_bias, limits, **switches)
        spec.qkv_tile()  # raises if the hidden slice has no valid tiling
        spec.o_tile()
        spec.mma_attention  # raises where the switches ask what this shape cannot do
        if spec.work_queue:
            plan.check_work_queue(spec.head_split, spec.split_positions)
        if spec.shared_queries:
            plan.check_shared_queries(config, spec.head_split, spec.split_positions)
        plan.check_kernel_options({"queue_rows": spec.queue_rows})
        if spec.shared_bytes > limits.shared_bytes_per_block:
            raise ValueError(
                f"a block of this shape needs {spec.shared_bytes} bytes of shared memory; the GPU allows "
                f"{limits.shared_bytes_per_block} (use a larger cluster or fewer sequences)"
            )
        return spec

    @property
    def parts(self) -> int:
        """Clusters a KV head's cached positions are split over: the ``head_split`` with
        ``split_positions``, else 1. Each part's cluster attends over its share with all ``group``
        query heads and leaves its softmax state in device memory; the last of them to arrive (at
        each rank) merges the states and projects with W_o (see :func:`build_kernel`). Unlike a
        split of the query heads, no cached row is read twice, and W_q's rows are read ``parts``
        times (the repeats mostly from L2) while W_o's columns are read by the last part alone."""
        return self.head_split if self.split_positions else 1

    @property
    def query_split(self) -> int:
        """Clusters a KV head's query heads are split over: the ``head_split`` unless the positions are split."""
        return self.head_split // self.parts

    @property
    def group(self) -> int:
        """Query heads one cluster owns (of the ``heads // kv_heads`` sharing its KV head)."""
        return self.heads // self.kv_heads // self.query_split

    @property
    def projection_split(self) -> int:
        """Clusters a KV head's W_qkv rows are shared out over: its :attr:`query_split`, or with
        ``shared_queries`` its :attr:`parts`."""
        return self.parts if self.shared_queries else self.query_split

    @property
    def projected_group(self) -> int:
        """Query heads one cluster projects (and projects with W_o): its :attr:`group`, or with
        ``shared_queries`` a ``parts``-th of it. With ``shared_queries`` part ``p`` of a KV head
        projects its query heads ``p * projected_group ..``, leaves them (rotated, for every sequence)
        in device memory after B2 and takes the others' from there, so that it attends over its
        share of the positions with all ``group`` heads as a part does; after phase 4 it waits for
        every part's state and merges its own heads' alone, and projects their W_o columns. The
        clusters wait for each other: the grid must be resident at once (:attr:`waits_across_clusters`)."""
        return self.group // self.parts if self.shared_queries else self.group

    @property
    def waits_across_clusters(self) -> bool:
        """Whether a cluster waits for others (:attr:`kv_rows_split`, ``shared_queries``): the grid
        must then be resident at once, which the launcher checks before the first launch."""
        return self.kv_rows_split or self.shared_queries

    @property
    def step_batch(self) -> int:
        """Sequences of the whole step: ``batch`` in each of the ``batch_parts`` sets of clusters, or
        ``sequences`` where the last set has fewer."""
        return self.sequences or self.batch * self.batch_parts

    @property
    def uneven(self) -> bool:
        """Whether the last set of clusters steps fewer sequences than ``batch`` (a batch of 7 in
        sets of 2, 2, 2 and 1). Its grid is the others', and it runs as they do with the sequences
        it lacks as phantoms: their inputs read as zeros, their positions as out of range (so they
        attend to nothing, write no cache row and read no RoPE angle), and nothing of theirs is
        written to device memory (see :func:`build_kernel`)."""
        return self.step_batch < self.batch * self.batch_parts

    @property
    def part_clusters(self) -> int:
        """Clusters of one set, the step of ``batch`` sequences: ``head_split`` a KV head."""
        return self.kv_heads * self.head_split

    @property
    def clusters(self) -> int:
        """Clusters of the grid: :attr:`part_clusters` for each of the ``batch_parts`` sets."""
        return self.part_clusters * self.batch_parts

    @property
    def rows(self) -> int:
        """Rows of the new token's q, k and v a cluster attends with: G query heads, one key head, one
        value head."""
        return (self.group + 2) * self.head_dim

    @property
    def projected_rows(self) -> int:
        """W_qkv rows one cluster owns: :attr:`projected_group` query heads, one key head, one value head
        (:attr:`rows` unless ``shared_queries``)."""
        return (self.projected_group + 2) * self.head_dim

    @property
    def kv_rows_split(self) -> bool:
        """Whether the clusters of a KV head share out its key and value heads instead of each
        projecting both: ``split_kv_rows`` where its projection is split over clusters (a
        :attr:`projection_split` of 2 or more) of two blocks or more. Without it each of the
        ``head_split`` clusters reads the KV head's key and value rows of W_qkv, a quarter to two
        thirds of its W_qkv stream. With it cluster ``j = cluster % head_split`` of the KV head
        projects its query heads and, for ``j`` 0, the key (rotated and appended to the cache) or,
        for ``j`` 1, the value (appended), in slot ``G``; after B2 those two raise their flags in
        ``arrivals`` (by ``head_split - 1``, the clusters that read the head), and the block of each
        cluster that folds in the new token waits for the flags of the heads it lacks, reads those
        heads back from the cache and counts each flag down by one. The clusters wait for each other: the
        grid must be resident at once, which the launcher checks before the first launch
        (``co_resident``). With ``shared_queries`` no flags: the clusters wait for each other's
        queries after B2 (:attr:`projected_group`), by which time the cache rows are written.

        ``split_kv_rows`` None (the rule) shares them out with ``shared_queries``, and from a query
        split of :data:`~clusterlab.fused.plan.KV_ROWS_SPLIT_FROM` where the grid fits the GPU at
        once (:attr:`fits_at_once`)."""
        if self.projection_split < 2 or self.cluster_size < 2:
            return False
        if self.split_kv_rows is None:
            return self.shared_queries or (self.query_split >= plan.KV_ROWS_SPLIT_FROM and self.fits_at_once)
        return self.split_kv_rows

    @property
    def fits_at_once(self) -> bool:
        """Whether every block of the grid is resident at once by the plan's count: the launch bound's
        :attr:`min_blocks_per_sm` blocks on each of the ``limits.sms_for(cluster_size)`` SMs that
        clusters of this size fill at one block an SM. That undercounts where blocks share SMs (a GPC
        of ``n`` SMs holds ``floor(k * n / C)`` clusters of ``k`` blocks an SM, at least ``k`` times
        ``floor(n / C)``), never overcounts; the launcher's occupancy query is exact."""
        return self.fits_at(self.register_bound)

    def fits_at(self, registers_per_thread: int) -> bool:
        """:attr:`fits_at_once` with the blocks an SM that ``registers_per_thread`` registers allow."""
        blocks = self.limits.blocks_per_sm(self.shared_bytes, self.threads, registers_per_thread)
        return self.clusters * self.cluster_size <= blocks * self.limits.sms_for(self.cluster_size)

    @property
    def attn_width(self) -> int:
        """Width of the cluster's attention output (its query heads side by side)."""
        return self.group * self.head_dim

    @property
    def projected_width(self) -> int:
        """Width of the ``o`` a cluster projects with W_o: its :attr:`projected_group` heads side by side."""
        return self.projected_group * self.head_dim

    @property
    def pipelined_kv(self) -> bool:
        """Whether attention keeps the next step's keys in flight while it folds a step (see
        ``fold_ahead`` in :func:`_make_mma_attention`): ``kv_pipeline`` where given, else on the
        tensor cores in blocks of 4 warps (batches up to 4), where the extra registers cost a
        block an SM (:attr:`register_bound`), in larger blocks that shared memory holds to one
        an SM, whose launch bound leaves the registers free (Llama-3-8B at batch 8 without
        :attr:`overlay`), and in the query projection's shared split (``shared_queries``), whose
        blocks of 8 warps at two an SM were level to 26% slower than at one with it (Qwen2.5-7B,
        batches 2-7, 4K-32K, v82), where its grid still fits the GPU at once at one block an SM (its
        clusters wait for each other: Llama-3-8B's split in 2 at batch 5 in three sets, 48 clusters of 4,
        fits only at two). Blocks of 8 warps two an SM (Llama-3.2-1B at batch 8) lost with it
        (``docs/fused-decode-notes.md``, v10)."""
        if self.kv_pipeline is None:
            alone = self.limits.blocks_per_sm(self.shared_bytes, self.threads, REGISTERS_PER_THREAD) == 1
            shared = self.shared_queries and self.fits_at(PIPELINE_REGISTERS)
            return self.mma_attention and (self.warps == 4 or alone or shared)
        return self.kv_pipeline and self.mma_attention

    @property
    def register_bound(self) -> int:
        """Registers a thread is planned at, from which :attr:`min_blocks_per_sm` (the launch bound)
        follows: ``registers`` where given, else :data:`PIPELINE_REGISTERS` with :attr:`pipelined_kv`
        (under 128 ptxas spilled 288-368 bytes for it) and :data:`REGISTERS_PER_THREAD` without. A
        block that shared memory holds alone on its SM gets a launch bound of one block whatever
        this says, which leaves ptxas what one block may have (255 a thread in blocks of 8 warps)."""
        if self.registers is None:
            return PIPELINE_REGISTERS if self.pipelined_kv else REGISTERS_PER_THREAD
        return self.registers

    @property
    def min_blocks_per_sm(self) -> int:
        """The launch bound: as many blocks as fit an SM at :attr:`register_bound` registers a thread
        (128 registers: 16 warps, two blocks of 8 or four of 4; 168: three blocks of 4) and in its
        shared memory, so that the GPU can place every cluster at once."""
        return self.limits.blocks_per_sm(self.shared_bytes, self.threads, self.register_bound)

    def qkv_tile(self):
        return gemv_tile("qkv projection", self.k_slice // 8, self.head_dim, self.batch)

    def o_tile(self):
        return gemv_tile("output projection", self.projected_width // 8, self.out_rows, self.batch)

    @property
    def inputs_interleaved(self) -> bool:
        """Whether ``xs`` lies in :func:`input_word`'s interleaved order: ``interleave_inputs`` where
        the W_qkv steps run on the CUDA cores (a :class:`GemvTile`); tensor-core steps read it as is."""
        return self.interleave_inputs and isinstance(self.qkv_tile(), GemvTile)

    @property
    def mma_attention(self) -> bool:
        """Whether attention over the cache runs on the tensor cores (:func:`_make_mma_attention`):
        ``attention_mma`` where given, else from :data:`MMA_GROUP` to 8 query heads a cluster (the
        heads are the columns of ``mma``'s B, eight of them)."""
        if self.attention_mma is None:
            return MMA_GROUP <= self.group <= 8
        if self.attention_mma and self.group > 8:
            raise ValueError(f"attention on the tensor cores takes at most 8 query heads a cluster, got {self.group} "
                             "(use a head split)")
        return self.attention_mma

    @property
    def keys_per_lane(self) -> int:
        """CUDA-core attention: keys (and values) one lane group loads per step, fewer when G heads
        share them, and half as many for G >= 2 beyond batch 2 (under 128 registers ptxas spilled
        16-96 bytes at G = 2, batch 3 and 4, with 4 keys)."""
        keys = max(2, min(8, 8 // self.group))
        return max(2, keys // 2) if self.group >= 2 and self.batch > 2 else keys

    @property
    def key_groups(self) -> int:
        """CUDA-core attention: lane groups per warp (each holds one key per load)."""
        return 32 // (self.head_dim // 8)

    @property
    def key_tiles(self) -> int:
        """Tensor-core attention: tiles of 16 keys a warp step (a tile costs a lane ``head_dim / 8``
        16-byte loads, keys and values; a step up to :data:`LOADS_PER_STEP`)."""
        return max(1, LOADS_PER_STEP // (self.head_dim // 8))

    @property
    def keys_per_step(self) -> int:
        """Cached keys (and values) one warp step of attention loads."""
        return 16 * self.key_tiles if self.mma_attention else self.key_groups * self.keys_per_lane

    @property
    def attention_groups(self) -> int:
        """Softmax states a warp leaves for the block merge: one per key group on the CUDA cores,
        one on the tensor cores."""
        return 1 if self.mma_attention else self.key_groups

    @property
    def partial_stride(self) -> int:
        """Words of a sequence's row of ``partial``: the cluster's rows, then ``sum(h^2)``, padded to
        a whole quad (16 bytes) so that the exchange pulls 16-byte-aligned quads."""
        return self.projected_rows + QUAD

    def smem_sizes(self) -> dict[str, int]:
        """Words (float32) of each shared region (see the module docstring)."""
        g, d, b = self.group, self.head_dim, self.batch
        groups = self.warps * self.attention_groups + b  # + one group per sequence for its new token
        return {"xs": b * self.k_slice, "partial": b * self.partial_stride, "red": b * norm_shares(self.k_slice),
                "qkv": b * self.rows, "state_m": b * g, "state_l": b * g, "state_acc": b * g * d,
                "scratch_m": groups * g, "scratch_l": groups * g, "scratch_acc": groups * g * d,
                "foreign_q": self.warps * g * d if self.work_queue else 0,
                "o": b * self.projected_width}

    def smem_layout(self) -> dict[str, int]:
        """Offsets (float32 words) of each shared region, and ``"total"``.

        With :attr:`overlay`, regions whose lifetimes do not meet share words. ``xs``, ``partial``
        and ``red`` are dead once B2 has passed (``partial``, the last, is read by the peers before
        they arrive there); ``scratch`` is written after B2 and read for the last time by the block
        merge, before this block arrives at B3; ``o`` is pushed by the peers after B3. So the three
        start at word 0, and ``qkv`` (pushed after B1, read by attention) and ``state`` (read by the
        peers until B4) follow them. Without it every region has its own words.
        """
        sizes = self.smem_sizes()
        if not self.overlay:
            return region_offsets(sizes)
        phases = [region_offsets({name: sizes[name] for name in names}) for names in
                  (("xs", "partial", "red"), ("scratch_m", "scratch_l", "scratch_acc", "foreign_q"), ("o",))]
        start = max(phase.pop("total") for phase in phases)
        offsets = region_offsets({name: sizes[name] for name in ("qkv", "state_m", "state_l", "state_acc")}, start)
        for phase in phases:
            offsets.update(phase)
        return offsets

    @property
    def shared_bytes(self) -> int:
        return 4 * self.smem_layout()["total"]

    @property
    def arrival_words(self) -> int:
        """Arrival counters (int32) of one set of clusters: the finish's, one a rank, then the parts'
        of each (KV head, rank), then with ``shared_queries`` the queries' of each KV head."""
        return self.cluster_size * (1 + self.kv_heads) + (self.kv_heads if self.shared_queries else 0)

    @property
    def queue_pairs(self) -> int:
        """With :attr:`work_queue`: the (sequence, KV head) pairs of the whole step, ``pair = seq *
        kv_heads + kv_head``."""
        return self.step_batch * self.kv_heads

    @property
    def queue_words(self) -> int:
        """Words (int32) of the work queue in device memory, after every set's :attr:`arrival_words`,
        zero on entry and left zero (none without :attr:`work_queue`): of each pair, ``ticket``
        (chunks handed out in its low 24 bits, states of other clusters' warps in the high 8), then
        ``done`` (chunks folded) and ``flag`` (1 once its query is published); then ``left``, the
        blocks that are done with the queue."""
        return plan.queue_words(self.queue_pairs) if self.work_queue else 0

    @property
    def queue_state_words(self) -> int:
        """Words (float32) of the work queue's states in device memory, after every set's
        :meth:`part_state_words` (none without :attr:`work_queue`): the published query of each
        pair, ``[pairs, attn_width]``, then :data:`QUEUE_SLOTS` softmax states of each pair, ``[pairs,
        QUEUE_SLOTS, 2 * group + attn_width]`` (``m [group]``, ``l [group]``, ``acc [attn_width]``)."""
        return plan.queue_state_words(self.queue_pairs, self.group, self.head_dim) if self.work_queue else 0

    def part_state_words(self) -> int:
        """Words (float32) of the parts' softmax states in device memory of one set of clusters (one
        word where :attr:`parts` is 1): ``acc [kv_heads, parts, batch, attn_width]``, then ``m`` and
        ``l`` ``[kv_heads, parts, batch, group]`` each, then with ``shared_queries`` the queries
        ``[kv_heads, batch, attn_width]``."""
        if self.parts == 1:
            return 1
        queries = self.kv_heads * self.batch * self.attn_width if self.shared_queries else 0
        return self.kv_heads * self.parts * self.batch * (self.attn_width + 2 * self.group) + queries


def region_offsets(sizes: dict[str, int], at: int = 0) -> dict[str, int]:
    """Offsets (float32 words) of shared regions of ``sizes`` words laid out in order from word
    ``at``, each 16-byte aligned, and ``"total"`` (the word after the last): a kernel's one dynamic
    shared array, the same in every block."""
    offsets = {}
    for name, size in sizes.items():
        offsets[name] = at
        at += (size + 3) // 4 * 4  # keep every region 16-byte aligned
    offsets["total"] = at
    return offsets


class GemvTile(NamedTuple):
    """A matrix-vector step on the CUDA cores (see :func:`make_gemv`): ``lanes`` lanes read a row,
    ``chunks_per_lane`` 16-byte chunks each, ``rows_per_lane`` rows a lane, ``batch_chunk``
    sequences at a time."""

    lanes: int
    chunks_per_lane: int
    rows_per_lane: int
    batch_chunk: int

    @property
    def step_rows(self) -> int:
        """Rows one warp step covers."""
        return 32 // self.lanes * self.rows_per_lane


class MmaTile(NamedTuple):
    """A matrix-vector step on the tensor cores (see :func:`make_gemv`): ``row_blocks`` blocks of
    16 rows; a row's columns in ``parts`` parts of ``spans`` spans of 32 columns (two 16-byte
    loads a lane for each row block and span), loaded one after the other into the same registers."""

    row_blocks: int
    spans: int
    parts: int

    @property
    def step_rows(self) -> int:
        return 16 * self.row_blocks


def gemv_tile(what: str, chunks: int, rows: int, batch: int, batch_chunk: int = 2) -> GemvTile | MmaTile:
    """The tile of a warp step over rows of ``chunks`` 16-byte chunks: an :class:`MmaTile` for a
    batch of at least :data:`MMA_BATCH` where :func:`mma_tile` has one, else a :class:`GemvTile`.

    On the CUDA cores, a row is read by the largest power of two of lanes (up to 32) that divides
    its chunks (Qwen2.5-7B's 448-wide slices: 56 chunks, 8 lanes of 7). Rows per lane grow while a
    step stays within :data:`LOADS_PER_STEP` loads (all issued before use), then the batch is
    taken ``batch_chunk`` sequences at a time (2, or the ``batch_chunk`` given, where
    :data:`ACCUMULATORS` and :data:`UNROLLED_DOTS` allow and ``batch`` is even, else 1); the
    loaded words serve every chunk. A warp step's rows must tile ``rows`` (a head for the qkv projection, so a step
    never straddles two heads' rows of W_qkv).
    """
    if batch >= MMA_BATCH:
        try:
            return mma_tile(what, chunks, rows)
        except ValueError:
            pass
    lanes = 32
    while chunks % lanes:
        lanes //= 2
    per_lane = chunks // lanes
    if per_lane > LOADS_PER_STEP:
        raise ValueError(
            f"{what}: a row of {chunks} 16-byte chunks needs {per_lane} loads a lane "
            f"(at most {LOADS_PER_STEP}); use a larger cluster"
        )
    rows_per_lane = 1
    while (
        rows_per_lane * 2 <= lanes
        and 2 * rows_per_lane * per_lane <= LOADS_PER_STEP
        and 2 * rows_per_lane <= ACCUMULATORS
        and 2 * rows_per_lane * per_lane <= UNROLLED_DOTS
        and rows % (32 // lanes * rows_per_lane * 2) == 0
    ):
        rows_per_lane *= 2
    if rows % (32 // lanes * rows_per_lane):
        raise ValueError(f"{what}: {rows} rows do not split into warp steps of {32 // lanes * rows_per_lane}")
    chunk = 2 if (batch_chunk == 2 and batch % 2 == 0 and 2 * rows_per_lane <= ACCUMULATORS
                  and 2 * rows_per_lane * per_lane <= UNROLLED_DOTS) else 1
    return GemvTile(lanes, per_lane, rows_per_lane, chunk)


def mma_tile(what: str, chunks: int, rows: int) -> MmaTile:
    """The tensor-core tile of rows of ``chunks`` 16-byte chunks (raises ``ValueError`` where none fits).

    The columns go in spans of 32 (4 chunks), so ``chunks`` must be a multiple of 4 and ``rows``
    of 16. A part is the most spans, up to 4, that divide a row (or the whole row where that is
    one span and the row fits in one part); with one part a step may issue
    :data:`LOADS_PER_STEP` loads a lane, with more half as many each (the registers of two
    parts' loads and their activations made ptxas spill, so a part waits for its loads while
    the block's other warps stream). Where that would make more than 4 parts, a part is instead
    the most spans, up to 8, that divide a row (up to :data:`LOADS_PER_STEP` loads a lane): fewer
    waits a step. On the H200 that took Qwen2.5-7B's 896-wide W_o slices (4 parts of 7 spans, not 7
    of 4) 7-10% faster at batches 4 and 8, its W_qkv in clusters of 4 and 8 and the MLP's gate/up
    rows 3-13%, Llama-2-7B's W_qkv at batch 8 up to 2% (``docs/fused-decode-notes.md``, v26 and v27).
    A step takes two row blocks where they fit its loads and tile ``rows``: one read of the
    activations then serves twice the rows.
    """
    if chunks % 4 or rows % 16:
        raise ValueError(f"{what}: tensor-core steps need rows of a multiple of 32 columns and a multiple of 16 "
                         f"rows, got {8 * chunks} columns and {rows} rows")
    spans = chunks // 4
    per_part = max(s for s in range(1, LOADS_PER_STEP // 4 + 1) if spans % s == 0)
    if per_part == 1 and 2 * spans <= LOADS_PER_STEP:
        per_part = spans  # a prime number of spans (Llama-3-8B's 224-wide MLP slices: 7) in one part
    wide = spans // per_part > 4
    if wide:
        per_part = max(s for s in range(1, LOADS_PER_STEP // 2 + 1) if spans % s == 0)
    parts = spans // per_part
    loads = LOADS_PER_STEP if parts == 1 or wide else LOADS_PER_STEP // 2  # a lane's loads a part may issue
    row_blocks = 2 if 4 * per_part <= loads and rows % 32 == 0 else 1
    return MmaTile(row_blocks, per_part, parts)


def input_word(chunk, element, columns: int, interleaved: bool):
    """Word of activation ``8 * chunk + element`` (``element`` < 8: the columns of 16-byte chunk
    ``chunk`` of a weight row) of a sequence's ``columns`` in shared memory: ``8 * chunk +
    element``, or with ``interleaved`` ``element * (columns / 8) + chunk``, where the eight
    activations of a chunk lie a row of chunks apart. A CUDA-core step whose row is read by 32
    lanes, chunk ``c`` by lane ``c % 32``, reads 32 consecutive words a load that way (one
    shared-memory wavefront) instead of words 8 apart (four banks, an 8-way conflict)."""
    return element * (columns // 8) + chunk if interleaved else 8 * chunk + element


#: :func:`input_word` in device code.
device_input_word = cuda.jit(device=True, inline=True)(input_word)


def scales_inputs(tile: GemvTile | MmaTile, bf16: bool) -> bool:
    """Whether steps of ``tile`` take ``h * norm`` divided by ``2^e`` (``scale_inputs`` of
    :func:`make_norm_inputs`): float16 on the tensor cores, whose 16-bit activations could
    overflow where ``h`` is near the float16 limit (bfloat16 has float32's range)."""
    return isinstance(tile, MmaTile) and not bf16


def _log2(n: int) -> int:
    assert n & (n - 1) == 0, n
    return n.bit_length() - 1


@cuda.jit(device=True, inline=True)
def wait_until(words, word, count, sleep_ns, limit_ns):
    """One thread: wait until ``words[word]`` (device memory, written by blocks of other clusters) is
    ``count`` or more, polling it with atomic reads (served by L2) and sleeping ``sleep_ns`` between
    them (0: none). Such a wait ends only where every cluster it waits for runs at once, which the
    launcher checks (``co_resident``); should one still never come, the thread traps after
    ``limit_ns`` nanoseconds of the GPU's timer (:data:`WAIT_LIMIT_NS`), so the launch fails with an
    error instead of holding the GPU forever. The caller fences after it (acquire)."""
    deadline = ptx.global_timer() + uint64(limit_ns)  # unsigned: no float64 from uint64 + int64
    while cuda.atomic.add(words, word, 0) < count:
        if sleep_ns:
            cuda.nanosleep(sleep_ns)
        if ptx.global_timer() > deadline:
            ptx.trap()


@cuda.jit(device=True, inline=True)
def slice_exponent(sum_squares, inv_columns):
    """``e`` with ``2^e`` within a factor 2 of the root mean square ``sqrt(sum_squares * inv_columns)``:
    half the exponent of the mean square, read from its bits (-64 for zeros)."""
    return (((libdevice.float_as_int(sum_squares * inv_columns) >> 23) & 0xFF) - 127) >> 1


@cuda.jit(device=True, inline=True)
def power_of_two(e):
    """``2^e`` for ``-126 <= e <= 127``, from its bits: scaling by it is exact."""
    return libdevice.int_as_float((127 + e) << 23)


def make_gemv(batch: int, bf16: bool, tile: GemvTile | MmaTile, x_stride: int, out_stride: int, atomic: bool,
              norms: tuple[int, int] | None = None, clamped: bool = False, interleaved: bool = False,
              select_past_batch: bool = True, bounded: bool = False):
    """Device functions for one warp step of a matrix-vector product over ``tile.step_rows`` rows.

    ``gemv_load(w, w0, row_stride, lane, wv)`` issues the step's first 16-byte loads into the
    register array ``wv``: the 16-bit row segments ``w[w0 + r*row_stride : ...]`` for
    ``r < step_rows``. ``gemv_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane)``, with the
    same ``w, w0, row_stride``, dots the rows with ``smem[x0 + b*x_stride : ...]`` (float32) for each
    sequence ``b`` and writes the sums to ``dst[out0 + b*out_stride + r]`` (float32), or adds them
    there atomically where ``atomic`` (into a global array). Splitting the two lets a caller issue
    a step's loads before a barrier and use them after it.

    A :class:`GemvTile` step runs on the CUDA cores: each lane multiplies its chunks of a row by
    the float32 activations, ``batch_chunk`` sequences at a time (every register array indexed by
    constants once the loops are unrolled), then the row's lanes reduce. An :class:`MmaTile` step
    runs on the tensor cores: ``mma`` multiplies 16 rows by 16 columns of the activations of up to
    8 sequences (one column of B each; those beyond ``batch`` are zeros), the activations rounded to
    16 bits as PyTorch's would be. Where ``norms`` is given, ``(offset, stride)``, the activations
    are ``h * norm`` and ``smem[offset + b*stride]`` holds ``sum(h^2)`` on the slice of
    ``x_stride`` columns: in float16 (``h`` itself may be near its limit) the tensor-core steps
    expect them divided by ``2^e`` of :func:`slice_exponent` (``scale_inputs`` of
    :func:`make_norm_inputs`) and multiply the sums back, both exactly.

    ``clamped`` (tensor cores only): a step of fewer real rows than ``tile.step_rows``, the rest
    padding. ``gemv_load`` and ``gemv_finish`` then take one more argument, ``last_row``: rows past
    it are loaded from row ``last_row`` instead (no read beyond the matrix), and their sums, which
    nobody should read, still go to ``dst``.

    ``interleaved`` (CUDA cores only): the activations lie in :func:`input_word`'s interleaved
    order (``make_norm_inputs(interleaved=True)`` writes them so).

    ``select_past_batch`` (tensor cores only): where a part of a step takes more than half a step's
    loads, the lanes past the batch load activations too and select zeros (see
    :func:`_make_mma_gemv`); False keeps them behind a branch everywhere (MLA's kernels: with it
    their output kernel spills 36-60 bytes under its 128 registers).

    ``bounded`` (not with ``clamped``): ``gemv_finish`` takes one more argument, ``seqs``,
    and writes the sums of the first ``seqs`` sequences only (the others are phantoms of an uneven set
    of clusters, :attr:`KernelSpec.uneven`, whose rows of ``dst`` do not exist).

    Returns ``(gemv_load, gemv_finish, words)``, ``words`` the length of ``wv`` (uint32).
    """
    if isinstance(tile, MmaTile):
        if interleaved:
            raise ValueError("interleaved activations are read by CUDA-core steps only (a GemvTile)")
        if clamped and bounded:
            raise ValueError("a clamped step is not bounded: it writes every sequence's sums")
        return _make_mma_gemv(batch, bf16, tile, x_stride, out_stride, atomic, norms, clamped, select_past_batch,
                              bounded)
    if clamped:
        raise ValueError("clamped steps run on the tensor cores only (an MmaTile)")
    lanes, per_lane, rows_per_lane, chunk = tile
    groups = 32 // lanes  # rows one warp load covers
    log_rows, log_lanes = _log2(rows_per_lane), _log2(lanes)
    words = rows_per_lane * per_lane * 4
    accumulators = rows_per_lane * chunk
    x_values = 2 * chunk
    unpack = ptx.bf16x2_to_f32x2 if bf16 else ptx.f16x2_to_f32x2

    @cuda.jit(device=True, inline=True)
    def gemv_load(w, w0, row_stride, lane, wv):
        group, sub = lane // lanes, lane % lanes
        for i in range(rows_per_lane):
            for j in range(per_lane):
                t = ptx.ld_global_nc_v4_no_allocate(w, w0 + (group + i * groups) * row_stride + (sub + j * lanes) * 8)
                for e in range(4):
                    wv[(i * per_lane + j) * 4 + e] = t[e]

    @cuda.jit(device=True, inline=True)
    def finish_rows(wv, w, w0, row_stride, smem, x0, dst, out0, lane, seqs):
        group, sub = lane // lanes, lane % lanes
        # With interleaved activations, from a view that starts at the lane's chunk `sub` (input_word
        # is linear in the chunk), indexed by constants once unrolled: one base register and immediate
        # offsets, as in the default layout. Made once, so that the loops stay small enough to unroll.
        xl = smem[x0 + sub:]
        for b0 in range(0, batch, chunk):
            acc = cuda.local.array(accumulators, float32)
            for k in range(accumulators):
                acc[k] = float32(0.0)
            xv = cuda.local.array(x_values, float32)
            for j in range(per_lane):
                for e in range(4):
                    for b in range(chunk):
                        if interleaved:
                            xb = (b0 + b) * x_stride
                            xv[2 * b] = xl[xb + device_input_word(j * lanes, 2 * e, x_stride, True)]
                            xv[2 * b + 1] = xl[xb + device_input_word(j * lanes, 2 * e + 1, x_stride, True)]
                        else:
                            xb = x0 + (b0 + b) * x_stride + (sub + j * lanes) * 8 + 2 * e
                            xv[2 * b] = smem[xb]
                            xv[2 * b + 1] = smem[xb + 1]
                    for i in range(rows_per_lane):
                        lo, hi = unpack(wv[(i * per_lane + j) * 4 + e])
                        for b in range(chunk):
                            acc[i * chunk + b] += lo * xv[2 * b] + hi * xv[2 * b + 1]
            # Reduce-scatter over the row's lanes: each level halves the rows a lane holds.
            for level in range(log_rows):
                half = rows_per_lane >> (level + 1)
                offset = lanes >> (level + 1)
                upper = (lane & offset) != 0
                for k in range(rows_per_lane // 2):
                    if k < half:
                        for b in range(chunk):
                            low, high = acc[k * chunk + b], acc[(k + half) * chunk + b]
                            keep = high if upper else low
                            send = low if upper else high
                            acc[k * chunk + b] = keep + cuda.shfl_xor_sync(FULL_MASK, send, offset)
            for level in range(log_rows, log_lanes):
                offset = lanes >> (level + 1)
                for b in range(chunk):
                    acc[b] += cuda.shfl_xor_sync(FULL_MASK, acc[b], offset)
            # Lane `sub` now holds row (sub >> (log_lanes - log_rows)) of its group, summed.
            if sub % (lanes // rows_per_lane) == 0:
                row = group + (sub >> (log_lanes - log_rows)) * groups
                for b in range(chunk):
                    if b0 + b < seqs and atomic:
                        cuda.atomic.add(dst, out0 + (b0 + b) * out_stride + row, acc[b])
                    elif b0 + b < seqs:
                        dst[out0 + (b0 + b) * out_stride + row] = acc[b]

    if bounded:
        @cuda.jit(device=True, inline=True)
        def gemv_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, seqs):
            finish_rows(wv, w, w0, row_stride, smem, x0, dst, out0, lane, seqs)
    else:
        @cuda.jit(device=True, inline=True)
        def gemv_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane):
            finish_rows(wv, w, w0, row_stride, smem, x0, dst, out0, lane, batch)

    return gemv_load, gemv_finish, words


def _make_mma_gemv(batch: int, bf16: bool, tile: MmaTile, x_stride: int, out_stride: int, atomic: bool,
                   norms: tuple[int, int] | None, clamped: bool, select_past_batch: bool, bounded: bool):
    """:func:`make_gemv` on the tensor cores (see :func:`clusterlab.ptx.mma_f16_m16n8k16` for the lanes).

    Lane ``(g, t)`` (``lane = 4g + t``) of a step loads, for each row block ``r`` and span ``p``,
    16 bytes of row ``16r + g`` and of row ``16r + g + 8``: columns ``32p + 8t .. + 8``. Those
    eight columns are ``k`` = 2t, 2t+1, 2t+8, 2t+9 of one ``mma`` and the same of the next, and
    the lane brings the same eight columns of sequence ``g``'s activations as B. The sums come
    out as ``mma`` leaves them: rows ``16r + g`` and ``+ 8``, sequences ``2t`` and ``2t + 1``.
    """
    row_blocks, spans, parts = tile
    part_words = 8 * row_blocks * spans
    words = part_words
    accumulators = 4 * row_blocks
    mma = ptx.mma_bf16_m16n8k16 if bf16 else ptx.mma_f16_m16n8k16
    pack = ptx.f32x2_to_bf16x2 if bf16 else ptx.f32x2_to_f16x2
    scaled = norms is not None and scales_inputs(tile, bf16)
    norms_at, norms_stride = norms if scaled else (0, 0)
    inv_columns = np.float32(1.0 / x_stride)
    # Lanes of sequences past the batch (g >= batch) take zeros for B. Where a part's weight loads
    # are more than half a step's, every lane loads activations (the last sequence's, a broadcast)
    # and selects the zeros: under ``if g < batch`` ptxas kept the shared loads behind branches and
    # issued the next part's weight loads only halfway through this part's mma (Qwen2.5-7B's
    # batches 2 and 4 up to 20% slower). Where parts take half a step's loads, ptxas issues several
    # parts' loads at once from behind the branches; the branch-free form spread them one part
    # ahead, and Llama-3-8B's clusters of 8 ran up to 9% slower (docs/fused-decode-notes.md, v57).
    every_lane_loads = select_past_batch and 2 * row_blocks * spans > LOADS_PER_STEP // 2

    @cuda.jit(device=True, inline=True)
    def load_part(w, w0, row_stride, lane, wv, part, last_row):
        """Part ``part``'s loads into ``wv`` (rows past ``last_row`` from it, where ``clamped``)."""
        g, t = lane // 4, lane % 4
        for r in range(row_blocks):
            for half in range(2):
                row = min(16 * r + 8 * half + g, last_row) if clamped else 16 * r + 8 * half + g
                for p in range(spans):
                    v = ptx.ld_global_nc_v4_no_allocate(w, w0 + row * row_stride + (part * spans + p) * 32 + 8 * t)
                    for e in range(4):
                        wv[((2 * r + half) * spans + p) * 4 + e] = v[e]

    @cuda.jit(device=True, inline=True)
    def multiply_part(wv, part, smem, x0, xb, acc, lane):
        """acc += the rows in ``wv`` times part ``part`` of the activations."""
        g, t = lane // 4, lane % 4
        live = g < batch
        # past the batch, the last sequence's row where every lane loads; the lane's own otherwise
        row = x0 + (min(g, batch - 1) if every_lane_loads else g) * x_stride
        for p in range(spans):
            for q in range(2):  # B of sequence g: the lane's columns 4q .. 4q+3 (zeros past the batch)
                if every_lane_loads or live:
                    at = ptx.shared_address(smem, row + (part * spans + p) * 32 + 8 * t + 4 * q)
                    x_0, x_1, x_2, x_3 = ptx.ld_shared_v4_f32(at)
                    xb[2 * q] = pack(x_0, x_1) if live else uint32(0)
                    xb[2 * q + 1] = pack(x_2, x_3) if live else uint32(0)
                else:
                    xb[2 * q] = uint32(0)
                    xb[2 * q + 1] = uint32(0)
            for r in range(row_blocks):
                for q in range(2):
                    lo = ((2 * r) * spans + p) * 4 + 2 * q  # row 16r + g, columns 4q .. 4q+3
                    hi = ((2 * r + 1) * spans + p) * 4 + 2 * q  # row 16r + g + 8
                    acc[4 * r], acc[4 * r + 1], acc[4 * r + 2], acc[4 * r + 3] = mma(
                        wv[lo], wv[hi], wv[lo + 1], wv[hi + 1], xb[2 * q], xb[2 * q + 1],
                        acc[4 * r], acc[4 * r + 1], acc[4 * r + 2], acc[4 * r + 3])

    @cuda.jit(device=True, inline=True)
    def step_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, last_row, seqs):
        g, t = lane // 4, lane % 4
        acc = cuda.local.array(accumulators, float32)
        for i in range(accumulators):
            acc[i] = float32(0.0)
        xb = cuda.local.array(4, uint32)
        for part in range(parts):
            if part > 0:
                load_part(w, w0, row_stride, lane, wv, part, last_row)
            multiply_part(wv, part, smem, x0, xb, acc, lane)
        for s in range(2):
            seq = 2 * t + s
            if seq < seqs:
                scale = power_of_two(slice_exponent(smem[norms_at + seq * norms_stride], inv_columns)) if scaled \
                    else float32(1.0)
                for r in range(row_blocks):
                    for half in range(2):
                        at = out0 + seq * out_stride + 16 * r + 8 * half + g
                        if atomic:
                            cuda.atomic.add(dst, at, acc[4 * r + 2 * half + s] * scale)
                        else:
                            dst[at] = acc[4 * r + 2 * half + s] * scale

    if clamped:
        @cuda.jit(device=True, inline=True)
        def gemv_load(w, w0, row_stride, lane, wv, last_row):
            load_part(w, w0, row_stride, lane, wv, 0, last_row)

        @cuda.jit(device=True, inline=True)
        def gemv_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, last_row):
            step_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, last_row, batch)
    else:
        @cuda.jit(device=True, inline=True)
        def gemv_load(w, w0, row_stride, lane, wv):
            load_part(w, w0, row_stride, lane, wv, 0, 0)

        if bounded:
            @cuda.jit(device=True, inline=True)
            def gemv_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, seqs):
                step_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, 0, seqs)
        else:
            @cuda.jit(device=True, inline=True)
            def gemv_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane):
                step_finish(wv, w, w0, row_stride, smem, x0, dst, out0, lane, 0, batch)

    return gemv_load, gemv_finish, words


def norm_shares(k_slice: int) -> int:
    """Words a sequence's ``sum(h^2)`` over a hidden slice of ``k_slice`` elements is left in by
    :func:`make_norm_inputs` (one a warp's 32 lanes of 16-byte chunks, 256 elements), the size of a
    sequence's row of the kernels' ``red`` region."""
    return -(-k_slice // 256)


def make_norm_inputs(batch: int, hidden_size: int, k_slice: int, threads: int, bf16: bool,
                     interleaved: bool = False, float32_hidden: bool = False, phantoms: bool = False):
    """Device functions of the first phase of a kernel that starts from ``RMSNorm(hidden + residual)``.

    ``norm_inputs(hidden, residual, norm, residual_out, smem, xs, red, k0, writes_residual, seqs, tid)``:
    the block's threads add ``hidden + residual`` (16-bit ``[batch, hidden_size]``) on the hidden
    slice ``k0 .. k0 + k_slice``, write the sums to ``residual_out`` where ``writes_residual``,
    keep ``h * norm`` (float32) at ``smem[xs + seq*k_slice + k]`` (element ``k`` of the slice; with
    ``interleaved`` at :func:`input_word` of its chunk and element instead) and the shares of
    ``sum(h^2)`` at ``smem[red + seq*norm_shares(k_slice) + i]`` (:func:`norm_shares`). After a
    ``syncthreads``, ``sum_squares(smem, red, dst, stride, tid)`` adds up the shares: sequence
    ``seq``'s ``sum(h^2)`` at ``smem[dst + seq*stride]``. The normalisation itself,
    ``rsqrt(mean(h^2) + eps)``, is left to whoever sums the dots of ``h * norm``. After another
    ``syncthreads``, ``scale_inputs(smem, xs, dst, stride, tid)`` divides each sequence's
    ``h * norm`` by ``2^e`` of :func:`slice_exponent` (for float16 tensor-core steps, see
    :func:`make_gemv`); a ``syncthreads`` later they are ready.

    ``float32_hidden``: ``hidden`` is the float32 sums another kernel added up (a hand-off, see
    :attr:`KernelSpec.handoff`), each rounded to the model dtype as it is read: the values the
    16-bit tensor that kernel would have converted them into holds.

    ``phantoms``: the sequences from ``seqs`` on are phantoms of an uneven set of clusters
    (:attr:`KernelSpec.uneven`): they read nothing, write nothing and take zeros for ``h * norm``.
    Without it every one of the ``batch`` sequences is read (``seqs`` is ``batch``).
    """
    unpack = ptx.bf16x2_to_f32x2 if bf16 else ptx.f16x2_to_f32x2
    to_bits = ptx.f32_to_bf16 if bf16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if bf16 else ptx.f16_to_f32
    inv_columns = np.float32(1.0 / k_slice)

    @cuda.jit(device=True, inline=True)
    def rounded_word(word):
        """A float32's bits, rounded to the model dtype."""
        return to_f32(to_bits(libdevice.int_as_float(int32(word))))

    # The threads take the (sequence, chunk) pairs of the whole batch in turn, so that every
    # sequence's loads go out at once, and where the pairs take the block's threads several rounds
    # (`loads_first`), every round's loads go out before the first round's sums: one memory round trip
    # for all of them (a round's stores to residual_out, which the compiler cannot tell from hidden,
    # would otherwise hold the next round's loads back). In one round a pair's loads go out within its
    # own step, in a loop of at most one pass: the form of before the loads-first change, whose kernels
    # ptxas lays out 7-8% faster where it matters (Llama-3-8B at 4K, batches 4 and 8; v83 of
    # docs/fused-decode-notes.md). A sequence's chunks are padded to `span` pairs, a power of two
    # up to 32 or a multiple of 32, so that a segment of `segment` lanes of a warp holds chunks of one
    # sequence only: shuffles within the segment add up its share of sum(h^2), and its first lane
    # stores it in the segment's own word.
    chunks = k_slice // 8  # 16-byte chunks of a sequence's slice
    shares = norm_shares(k_slice)
    span = 1 << (chunks - 1).bit_length() if chunks <= 32 else shares * 32
    segment = min(span, 32)
    levels = segment.bit_length() - 1  # shuffle levels of a segment: offsets segment/2 .. 1 (none for one lane)
    pairs = batch * span
    warp_pairs = -(-pairs // 32) * 32  # a warp's lanes all take a pair or none (the shuffles)
    rounds = -(-warp_pairs // threads)  # of the block's threads over the pairs
    # a pair's words: its chunk of hidden (16-bit: 4 words; float32: 8), of residual and of norm
    residual_word = 8 if float32_hidden else 4
    pair_words = residual_word + 8
    loads_first = rounds > 1

    @cuda.jit(device=True, inline=True)
    def load_pair(hidden, residual, norm, words, r, at, k0, c):
        """A pair's 16-byte chunks of hidden (at ``at``), residual and the gain into ``words[r]``."""
        words[r, 0], words[r, 1], words[r, 2], words[r, 3] = ptx.ld_global_nc_v4_no_allocate(hidden, at)
        if float32_hidden:
            words[r, 4], words[r, 5], words[r, 6], words[r, 7] = ptx.ld_global_nc_v4_no_allocate(hidden, at + 4)
        (words[r, residual_word], words[r, residual_word + 1], words[r, residual_word + 2],
         words[r, residual_word + 3]) = ptx.ld_global_nc_v4_no_allocate(residual, at)
        (words[r, residual_word + 4], words[r, residual_word + 5], words[r, residual_word + 6],
         words[r, residual_word + 7]) = ptx.ld_global_nc_v4_no_allocate(norm, k0 + c * 8)

    @cuda.jit(device=True, inline=True)
    def fold_pair(hidden, residual, norm, residual_out, smem, xs, red, k0, writes_residual, seqs, lane, words, r,
                  item):
        """Pair ``item`` of the block's round ``r``: ``h = hidden + residual`` to ``residual_out``, ``h * norm``
        to ``xs`` and the segment's share of ``sum(h^2)`` to ``red``, from ``words[r]`` (loaded here
        unless ``loads_first``)."""
        seq, c = item // span, item % span
        ss = float32(0.0)
        if phantoms and item < pairs and c < chunks and seq >= seqs:  # a phantom's h * norm
            for e in range(8):
                if interleaved:
                    smem[xs + seq * k_slice + device_input_word(c, e, k_slice, True)] = float32(0.0)
                else:
                    smem[xs + seq * k_slice + c * 8 + e] = float32(0.0)
        elif item < pairs and c < chunks:
            at = seq * hidden_size + k0 + c * 8
            if not loads_first:
                load_pair(hidden, residual, norm, words, r, at, k0, c)
            for e in range(4):
                if float32_hidden:
                    h_lo, h_hi = rounded_word(words[r, 2 * e]), rounded_word(words[r, 2 * e + 1])
                else:
                    h_lo, h_hi = unpack(words[r, e])
                r_lo, r_hi = unpack(words[r, residual_word + e])
                n_lo, n_hi = unpack(words[r, residual_word + 4 + e])
                s_lo, s_hi = h_lo + r_lo, h_hi + r_hi
                if writes_residual:
                    residual_out[at + 2 * e] = to_bits(s_lo)
                    residual_out[at + 2 * e + 1] = to_bits(s_hi)
                ss += s_lo * s_lo + s_hi * s_hi
                if interleaved:
                    smem[xs + seq * k_slice + device_input_word(c, 2 * e, k_slice, True)] = s_lo * n_lo
                    smem[xs + seq * k_slice + device_input_word(c, 2 * e + 1, k_slice, True)] = s_hi * n_hi
                else:
                    smem[xs + seq * k_slice + c * 8 + 2 * e] = s_lo * n_lo
                    smem[xs + seq * k_slice + c * 8 + 2 * e + 1] = s_hi * n_hi
        for level in range(levels):
            ss += cuda.shfl_xor_sync(FULL_MASK, ss, segment >> (level + 1))
        if lane % segment == 0 and item < pairs:
            smem[red + item // segment] = ss  # = seq * shares + c // 32

    @cuda.jit(device=True, inline=True)
    def norm_inputs(hidden, residual, norm, residual_out, smem, xs, red, k0, writes_residual, seqs, tid):
        lane = tid % 32
        words = cuda.local.array((rounds, pair_words), uint32)
        if loads_first:
            for r in range(rounds):
                item = tid + uint32(r * threads)
                seq, c = item // span, item % span
                if item < pairs and c < chunks and not (phantoms and seq >= seqs):
                    load_pair(hidden, residual, norm, words, r, seq * hidden_size + k0 + c * 8, k0, c)
            for r in range(rounds):
                item = tid + uint32(r * threads)
                if item >= warp_pairs:  # a whole warp stops here (warp_pairs and threads are multiples of 32)
                    break
                fold_pair(hidden, residual, norm, residual_out, smem, xs, red, k0, writes_residual, seqs, lane,
                          words, r, item)
        else:
            for item in range(tid, warp_pairs, threads):  # at most once
                fold_pair(hidden, residual, norm, residual_out, smem, xs, red, k0, writes_residual, seqs, lane,
                          words, 0, item)

    @cuda.jit(device=True, inline=True)
    def sum_squares(smem, red, dst, stride, tid):
        if tid < batch:
            total = float32(0.0)
            for i in range(shares):
                total += smem[red + tid * shares + i]
            smem[dst + tid * stride] = total

    @cuda.jit(device=True, inline=True)
    def scale_inputs(smem, xs, dst, stride, tid):  # tensor-core steps: never interleaved
        for i in range(tid, batch * k_slice, threads):
            seq = i // k_slice
            smem[xs + i] *= power_of_two(-slice_exponent(smem[dst + seq * stride], inv_columns))

    return norm_inputs, sum_squares, scale_inputs


def steps_in_flight(tile, words_per_step: int, steps: int, warps: int) -> int:
    """Warp steps of a matrix-vector product whose loads a warp keeps in flight: 2 where the warps take
    more than one step each and two steps' loads stay within :data:`LOADS_PER_STEP` a lane (the next
    step is loaded before this one is summed), else 1. A tensor-core step of several parts loads them
    one after another (``words_per_step`` is a part's): it counts all its parts' loads. Small steps
    with one in flight leave a warp waiting a memory round trip a step: MLA's query and latent rows at
    batch 1, 57 steps of 4 loads a lane over 8 warps."""
    loads = words_per_step // 4 * (tile.parts if isinstance(tile, MmaTile) else 1)
    return 2 if steps > warps and 2 * loads <= LOADS_PER_STEP else 1


def make_input_projection(batch: int, hidden_size: int, k_slice: int, warps: int, bf16: bool, tile, rows: int,
                          first_rows: int, xs: int, partial: int, partial_stride: int, red: int,
                          second_rows: int | None = None, interleaved: bool = False, float32_hidden: bool = False,
                          select_past_batch: bool = True):
    """Phase 1 of a kernel that projects ``RMSNorm(hidden + residual)`` with rows of two matrices
    (the MLP's gate and up rows, MLA's query and latent rows), on a block's hidden slice.

    ``project(hidden, residual, norm, residual_out, w_first, first0, w_second, second0, smem, k0,
    writes_residual, tid)``: :func:`make_norm_inputs`'s phase on the slice ``k0 .. k0 + k_slice``
    (``h * norm`` at ``smem[xs ..]``, the shares of ``sum(h^2)`` at ``smem[red ..]``), then the warps
    take the :func:`make_gemv` steps of ``tile`` over ``rows`` slots in turn: slot ``s <
    first_rows`` is row ``first0 + s`` of ``w_first``, slot ``s >= first_rows`` row ``second0 + s -
    first_rows`` of ``w_second`` (16-bit ``[*, hidden_size]`` each); a step's slots never straddle
    the two (``tile`` tiles both parts). Sequence ``b``'s partial dot of slot ``s`` lands at
    ``smem[partial + b*partial_stride + s]`` and its ``sum(h^2)`` at column ``rows``. Each warp's
    first step (two, where :func:`steps_in_flight` says so) is loaded once the inputs are in, before
    the block waits for them. The partials are complete in the block after a barrier (a cluster
    barrier, for its peers).

    ``second_rows``: the second matrix's rows, where fewer than its ``rows - first_rows`` slots
    (tensor-core steps of 16 rows over 36, say): the slots past them are padding, their loads
    clamped to the last real row (:func:`make_gemv`'s ``clamped``) and their sums left unread.

    ``interleaved``: ``h * norm`` in :func:`input_word`'s interleaved order (CUDA-core steps only);
    ``float32_hidden``: ``hidden`` is float32 sums, read rounded (see :func:`make_norm_inputs`);
    ``select_past_batch``: :func:`make_gemv`'s.
    """
    threads = 32 * warps
    step_rows = tile.step_rows
    steps = rows // step_rows
    scaled = scales_inputs(tile, bf16)
    gemv = functools.partial(make_gemv, batch, bf16, tile, x_stride=k_slice, out_stride=partial_stride, atomic=False,
                             norms=(partial + rows, partial_stride), interleaved=interleaved,
                             select_past_batch=select_past_batch)
    load, finish, words_per_step = gemv()
    two_ahead = steps_in_flight(tile, words_per_step, steps, warps) == 2
    padded = second_rows is not None and second_rows < rows - first_rows
    load_padded, finish_padded, _ = gemv(clamped=True) if padded else (None, None, 0)
    norm_inputs, sum_squares, scale_inputs = make_norm_inputs(batch, hidden_size, k_slice, threads, bf16, interleaved,
                                                              float32_hidden)

    @cuda.jit(device=True, inline=True)
    def step_load(w_first, first0, w_second, second0, step, k0, lane, words):
        """Loads of warp step ``step``."""
        slot = step * step_rows
        if slot < first_rows:
            load(w_first, (first0 + slot) * hidden_size + k0, hidden_size, lane, words)
        elif padded:
            load_padded(w_second, (second0 + slot - first_rows) * hidden_size + k0, hidden_size, lane, words,
                        second_rows - 1 - (slot - first_rows))
        else:
            load(w_second, (second0 + slot - first_rows) * hidden_size + k0, hidden_size, lane, words)

    @cuda.jit(device=True, inline=True)
    def step_finish(w_first, first0, w_second, second0, step, k0, lane, words, smem):
        """The dots of warp step ``step`` into its slots of the partials."""
        slot = step * step_rows
        first = slot < first_rows
        w = w_first if first else w_second
        row = first0 + slot if first else second0 + slot - first_rows
        if padded:
            if first:
                finish(words, w, row * hidden_size + k0, hidden_size, smem, xs, smem, partial + slot, lane)
            else:
                finish_padded(words, w, row * hidden_size + k0, hidden_size, smem, xs, smem, partial + slot, lane,
                              second_rows - 1 - (slot - first_rows))
        else:
            finish(words, w, row * hidden_size + k0, hidden_size, smem, xs, smem, partial + slot, lane)

    @cuda.jit(device=True, inline=True)
    def project(hidden, residual, norm, residual_out, w_first, first0, w_second, second0, smem, k0,
                writes_residual, tid):
        lane, warp = tid % 32, tid // 32
        norm_inputs(hidden, residual, norm, residual_out, smem, xs, red, k0, writes_residual, batch, tid)
        words = cuda.local.array(words_per_step, uint32)
        later = cuda.local.array(words_per_step if two_ahead else 1, uint32)  # the warp's next step, if two_ahead
        step = warp
        if step < steps:
            step_load(w_first, first0, w_second, second0, step, k0, lane, words)
        if two_ahead and step + warps < steps:
            step_load(w_first, first0, w_second, second0, step + warps, k0, lane, later)
        cuda.syncthreads()
        sum_squares(smem, red, partial + rows, partial_stride, tid)
        if scaled:  # see scales_inputs
            cuda.syncthreads()
            scale_inputs(smem, xs, partial + rows, partial_stride, tid)
            cuda.syncthreads()
        while step < steps:  # a step is loaded, with two_ahead the next one too; load the one after
            step_finish(w_first, first0, w_second, second0, step, k0, lane, words, smem)
            if two_ahead:
                if step + 2 * warps < steps:
                    step_load(w_first, first0, w_second, second0, step + 2 * warps, k0, lane, words)
                step += warps
                if step < steps:
                    step_finish(w_first, first0, w_second, second0, step, k0, lane, later, smem)
                    if step + 2 * warps < steps:
                        step_load(w_first, first0, w_second, second0, step + 2 * warps, k0, lane, later)
            step += warps
            if not two_ahead and step < steps:
                step_load(w_first, first0, w_second, second0, step, k0, lane, words)

    return project


def make_exchange(cluster_size: int):
    """Device functions of the exchanges between a cluster's blocks (phases 2 and 4; the MLP's phase 2).

    An exchange sums (or merges) a quad of float32 (:data:`~clusterlab.fused.plan.QUAD`, 16 bytes)
    over the ``C`` blocks and hands the result back to all of them. ``C`` consecutive lanes share a
    quad, one peer block each: lane ``peer = lane % C`` pulls the peer's copy with one 16-byte DSMEM
    load (``pull(smem, at, peer)``: :func:`clusterlab.ptx.remote_load_v4_f32`), ``peer_sum(x)`` /
    ``peer_max(x)`` combine a value over the ``C`` lanes with xor-shuffles (every lane gets the
    result), and the lane pushes the result to its peer with one 16-byte store (``push(smem, at,
    peer, x0, x1, x2, x3)``: :func:`clusterlab.ptx.remote_store_v4_f32`). One thread pulling ``C``
    scalars and pushing ``C`` made four times the DSMEM requests, one after another.

    ``exchange_lanes(units)``: the lanes of a block a loop over ``units`` quads runs, rounded up to
    whole warps: every lane of a warp takes part in the shuffles, those past ``units * C`` with
    nothing to pull or push (a quad's ``C`` lanes are in one warp, ``C`` divides 32).
    """
    C = cluster_size
    LOG_C = _log2(C)

    @cuda.jit(device=True, inline=True)
    def exchange_lanes(units):
        return (units * C + 31) // 32 * 32

    @cuda.jit(device=True, inline=True)
    def peer_sum(x):
        for level in range(LOG_C):
            x += cuda.shfl_xor_sync(FULL_MASK, x, C >> (level + 1))
        return x

    @cuda.jit(device=True, inline=True)
    def peer_max(x):
        for level in range(LOG_C):
            x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, C >> (level + 1)))
        return x

    return exchange_lanes, ptx.remote_load_v4_f32, ptx.remote_store_v4_f32, peer_sum, peer_max


def make_stamp(timeline: bool, stamps_per_block: int):
    """``stamp(stamps, tid, i)``: with ``timeline``, thread 0 stores ``clock64`` and ``globaltimer`` as
    stamp ``i`` of its block (``stamps``: uint64 ``[blocks * stamps_per_block * 2]``); without it
    nothing, and numba compiles the call away. ``record_sm(sms, tid)`` likewise stores the block's SM."""

    @cuda.jit(device=True, inline=True)
    def stamp(stamps, tid, i):
        if timeline:
            if tid == 0:
                stamps[(cuda.blockIdx.x * stamps_per_block + i) * 2] = ptx.clock64()
                stamps[(cuda.blockIdx.x * stamps_per_block + i) * 2 + 1] = ptx.global_timer()

    @cuda.jit(device=True, inline=True)
    def record_sm(sms, tid):
        if timeline:
            if tid == 0:
                sms[cuda.blockIdx.x] = ptx.sm_id()

    return stamp, record_sm


def make_clear(batch: int, hidden_size: int, threads: int):
    """``clear(sums, tid)``: the block's share of ``sums`` (float32 ``[batch, hidden_size]``) set to
    zero, the grid's blocks taking ``threads`` consecutive elements in turn: the finish of a kernel
    that hands its sums on (:attr:`KernelSpec.handoff`), which leaves the buffer it adds into to
    the next kernel and clears the one the kernel before it read."""

    @cuda.jit(device=True, inline=True)
    def clear(sums, tid):
        for i in range(cuda.blockIdx.x * threads + tid, batch * hidden_size, cuda.gridDim.x * threads):
            sums[i] = float32(0.0)

    return clear


def make_finish(batch: int, hidden_size: int, out_rows: int, threads: int, bf16: bool):
    """Device functions of the finish of a kernel whose blocks add into one float32 accumulator.

    Every block of rank ``rank`` adds (``red.add``) into the same ``out_rows`` rows of ``out_acc``
    ``[batch, hidden_size]`` (float32, zero on entry), rows ``rank*out_rows ..``; then
    ``finish_arrive(arrivals, counter, blocks, last, tid)`` fences the block's adds (and every
    other write of it) and counts it in on ``arrivals[counter]`` (here ``counter = rank``; the
    attention kernel's parts of a split cache count in on counters of their own the same way):
    ``last[0]`` (a shared int32) becomes 1 in the ``blocks``-th block to arrive, 0 in the others.
    That block alone calls ``finish_convert(out, out_acc, arrivals, rank, seqs, tid)``: it converts
    the rows of the first ``seqs`` sequences (all ``batch`` but in an uneven set of clusters,
    :attr:`KernelSpec.uneven`) into ``out`` (16-bit, the model dtype) and leaves them and
    ``arrivals[rank]`` zero for the next step.
    """
    to_bits = ptx.f32_to_bf16 if bf16 else ptx.f32_to_f16
    # out_acc elements a thread loads at once: up to 16, no more than the rows need (the loop below is
    # unrolled, and a finish that runs once a step should not carry code for loads it never makes)
    loads = min(16, -(-batch * out_rows // threads))

    @cuda.jit(device=True, inline=True)
    def finish_arrive(arrivals, counter, blocks, last, tid):
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            last[0] = 1 if cuda.atomic.add(arrivals, counter, 1) == blocks - 1 else 0
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def finish_convert(out, out_acc, arrivals, rank, seqs, tid):
        # Every red.add is ordered before its block's arrival, and this block never read out_acc
        # before, so plain loads after the fence see the sums. `loads` loads a thread are issued
        # before any is used: one round trip per loads * threads elements.
        cuda.threadfence()
        vals = cuda.local.array(loads, float32)
        for base in range(0, batch * out_rows, loads * threads):
            for u in range(loads):
                e = base + u * threads + tid
                at = e // out_rows * hidden_size + rank * out_rows + e % out_rows
                vals[u] = out_acc[at] if e < seqs * out_rows else float32(0.0)
            for u in range(loads):
                e = base + u * threads + tid
                if e < seqs * out_rows:
                    at = e // out_rows * hidden_size + rank * out_rows + e % out_rows
                    out[at] = to_bits(vals[u])
                    out_acc[at] = float32(0.0)
        if tid == 0:
            arrivals[rank] = 0

    return finish_arrive, finish_convert


class AttentionSteps(NamedTuple):
    """Device functions of one warp's attention over a range of cached positions (one sequence).

    ``start(m, l_sum, acc)`` empties the softmax state: register arrays ``m``, ``l_sum``
    (``states`` float32 each) and ``acc`` (``accumulators`` float32). ``load(k_cache, v_cache,
    cache_row0, t0, end, lane, kv)`` loads the ``keys_per_step`` keys and values of positions
    ``t0 ..`` (clamped to ``end - 1``) of the head whose row 0 is ``cache_row0`` into ``kv`` (uint32,
    ``words``). ``fold(kv, smem, q0, t0, end, m, l_sum, acc, lane)`` scores them against the G query
    heads at ``smem[q0 + head*head_dim ..]`` (float32, pre-scaled) and folds those before ``end``
    into the state. ``store(smem, warp, m, l_sum, acc, lane)`` leaves the warp's state as softmax
    states ``warp * attention_groups ..`` of the scratch regions, one per (group, head): ``m`` and
    ``l`` a float32 each, ``acc`` ``head_dim`` float32. ``publish(out, at, m, l_sum, acc, lane)``
    writes it merged into one softmax state, ``m [G]``, ``l [G]``, ``acc [G, head_dim]`` (float32)
    from ``out[at]`` on (the work queue's state slots in device memory). On the tensor cores also
    ``load_keys(k_cache, cache_row0, t0, end, lane, kv)`` (the keys of ``load``) and ``fold_ahead(kv,
    smem, q0, t0, end, m, l_sum, acc, lane, k_cache, v_cache, cache_row0, ahead)``, which loads the
    step's values, folds, and loads the keys of positions ``ahead ..`` as soon as the scores are in
    (:attr:`KernelSpec.pipelined_kv`).
    """

    start: object
    load: object
    fold: object
    store: object
    publish: object
    words: int
    states: int
    accumulators: int
    fold_ahead: object = None
    load_keys: object = None


def _make_attention(spec: KernelSpec) -> AttentionSteps:
    """The :class:`AttentionSteps` of ``spec``: on the tensor cores or the CUDA cores (:attr:`KernelSpec.mma_attention`)."""
    return _make_mma_attention(spec) if spec.mma_attention else _make_cuda_core_attention(spec)


def _make_cuda_core_attention(spec: KernelSpec) -> AttentionSteps:
    """Attention on the CUDA cores: a key group (``head_dim/8`` lanes) holds one key a load, 8 dims a
    lane, and a step ``keys_per_lane`` keys ``t0 + key_group, t0 + key_group + key_groups, ..``.
    Each lane dots its dims with every query head, the group's lanes sum the dots (shuffles),
    and each group keeps its own softmax state: ``m``, ``l_sum`` ``[G]``, ``acc`` ``[G*8]`` (its 8
    dims of each head)."""
    G, D, KEYS_PER_LANE, KEY_GROUPS = spec.group, spec.head_dim, spec.keys_per_lane, spec.key_groups
    LANES_PER_KEY = D // 8
    LOG_LANES_PER_KEY, LOG_KEY_GROUPS = _log2(LANES_PER_KEY), _log2(KEY_GROUPS)
    SCORES = KEYS_PER_LANE * G
    layout = spec.smem_layout()
    SCRATCH_M, SCRATCH_L, SCRATCH_ACC = layout["scratch_m"], layout["scratch_l"], layout["scratch_acc"]
    unpack = ptx.bf16x2_to_f32x2 if spec.bf16 else ptx.f16x2_to_f32x2

    @cuda.jit(device=True, inline=True)
    def start(m, l_sum, acc):
        for head in range(G):
            m[head] = NEG
            l_sum[head] = float32(0.0)
            for e in range(8):
                acc[head * 8 + e] = float32(0.0)

    @cuda.jit(device=True, inline=True)
    def load(k_cache, v_cache, cache_row0, t0, end, lane, kv):
        key_group, key_lane = lane // LANES_PER_KEY, lane % LANES_PER_KEY
        for j in range(KEYS_PER_LANE):
            t = min(t0 + key_group + j * KEY_GROUPS, end - 1)
            kw = ptx.ld_global_nc_v4_no_allocate(k_cache, (cache_row0 + t) * D + key_lane * 8)
            vw = ptx.ld_global_nc_v4_no_allocate(v_cache, (cache_row0 + t) * D + key_lane * 8)
            for e in range(4):
                kv[j * 8 + e] = kw[e]
                kv[j * 8 + 4 + e] = vw[e]

    @cuda.jit(device=True, inline=True)
    def fold(kv, smem, q0, t0, end, m, l_sum, acc, lane):
        key_group, key_lane = lane // LANES_PER_KEY, lane % LANES_PER_KEY
        first = t0 + key_group
        s = cuda.local.array(SCORES, float32)
        for head in range(G):
            qb = q0 + head * D + key_lane * 8
            for j in range(KEYS_PER_LANE):
                dot = float32(0.0)
                for e in range(4):
                    k_lo, k_hi = unpack(kv[j * 8 + e])
                    dot += k_lo * smem[qb + 2 * e] + k_hi * smem[qb + 2 * e + 1]
                s[j * G + head] = dot
        for k in range(SCORES):
            for level in range(LOG_LANES_PER_KEY):
                s[k] += cuda.shfl_xor_sync(FULL_MASK, s[k], LANES_PER_KEY >> (level + 1))
        for head in range(G):
            m_new = m[head]
            for j in range(KEYS_PER_LANE):
                if first + j * KEY_GROUPS < end:
                    m_new = max(m_new, s[j * G + head])
            scale = math.exp2(m[head] - m_new)
            m[head] = m_new
            l_sum[head] *= scale
            for e in range(8):
                acc[head * 8 + e] *= scale
            for j in range(KEYS_PER_LANE):
                p = math.exp2(s[j * G + head] - m_new) if first + j * KEY_GROUPS < end else float32(0.0)
                s[j * G + head] = p
                l_sum[head] += p
        for j in range(KEYS_PER_LANE):
            for e in range(4):
                v_lo, v_hi = unpack(kv[j * 8 + 4 + e])
                for head in range(G):
                    acc[head * 8 + 2 * e] += s[j * G + head] * v_lo
                    acc[head * 8 + 2 * e + 1] += s[j * G + head] * v_hi

    @cuda.jit(device=True, inline=True)
    def store(smem, warp, m, l_sum, acc, lane):
        key_group, key_lane = lane // LANES_PER_KEY, lane % LANES_PER_KEY
        group = warp * KEY_GROUPS + key_group
        for head in range(G):
            if key_lane == 0:
                smem[SCRATCH_M + group * G + head] = m[head]
                smem[SCRATCH_L + group * G + head] = l_sum[head]
            for e in range(8):
                smem[SCRATCH_ACC + (group * G + head) * D + key_lane * 8 + e] = acc[head * 8 + e]

    @cuda.jit(device=True, inline=True)
    def group_sum(x):
        """``x`` summed over the key groups' lanes of the same dims (a butterfly of shuffles)."""
        for level in range(LOG_KEY_GROUPS):
            x += cuda.shfl_xor_sync(FULL_MASK, x, LANES_PER_KEY << level)
        return x

    @cuda.jit(device=True, inline=True)
    def publish(out, at, m, l_sum, acc, lane):
        key_group, key_lane = lane // LANES_PER_KEY, lane % LANES_PER_KEY
        for head in range(G):
            m_max = m[head]
            for level in range(LOG_KEY_GROUPS):
                m_max = max(m_max, cuda.shfl_xor_sync(FULL_MASK, m_max, LANES_PER_KEY << level))
            w = math.exp2(m[head] - m_max)
            l_tot = group_sum(w * l_sum[head])
            for e in range(8):
                a = group_sum(w * acc[head * 8 + e])
                if key_group == 0:
                    out[at + 2 * G + head * D + key_lane * 8 + e] = a
            if lane == 0:
                out[at + head] = m_max
                out[at + G + head] = l_tot

    return AttentionSteps(start, load, fold, store, publish, KEYS_PER_LANE * 8, G, G * 8)


def _make_mma_attention(spec: KernelSpec) -> AttentionSteps:
    """Attention on the tensor cores, 16 keys a tile (``key_tiles`` tiles a step), both products
    transposed so that keys and dims fill ``mma``'s 16 rows and the G query heads (at most 8) its
    columns: no accumulator holds an empty row.

    Lane ``(g, t)`` (``lane = 4g + t``, see :func:`clusterlab.ptx.mma_f16_m16n8k16`) keeps the
    softmax states of heads ``2t`` and ``2t + 1``:

    - **scores** ``S^T = K Q^T``: A is the tile's keys, rows ``g`` and ``g + 8`` straight from the
      lane's 16-byte loads (its chunks ``t, t + 4, ..`` of 8 dims, each serving two ``mma`` as in
      :func:`make_gemv`); B is the same 8 dims of head ``g``'s query (from shared memory, rounded
      to 16 bits; zeros beyond G). The lane gets the scores of keys ``g`` and ``8 + g`` for heads
      ``2t, 2t + 1``.
    - **softmax**: each head's maximum over the tile's keys (three shuffles across ``g``), the
      state rescaled, ``p = exp2(s - m)``; each lane sums its own ``p`` (``store`` adds the lanes').
    - **values** ``O^T += V^T P^T``: B is ``P^T`` (k the key, n the head): lane ``(g, t)`` needs
      head ``g`` of keys ``2t, 2t + 1, 8 + 2t, 9 + 2t``, which lanes ``8t + g//2`` and ``8t + 4 +
      g//2`` hold, packed: four shuffles and a byte permute. A is ``V^T`` (rows are dims, k the
      key): lane ``(g, t)`` loads keys ``2t, 2t + 1, 8 + 2t, 9 + 2t`` at chunk ``g`` (and ``g + 8``
      for 128 dims) and pairs their halves (:func:`clusterlab.ptx.permute_bytes`); ``mma`` ``v``
      takes dims ``8g + value_offset(v, 0)`` and ``8g + value_offset(v, 1)`` as rows ``g`` and ``g +
      8``. The lane accumulates ``acc[4v + 2*half + c]``: dim ``8g + value_offset(v, half)`` of head ``2t + c``.
    """
    G, D, KEY_TILES = spec.group, spec.head_dim, spec.key_tiles
    K_CHUNKS = D // 32  # 16-byte chunks of a key a lane loads (four lanes a key)
    V_CHUNKS = D // 64  # 16-byte chunks of a value a lane loads per key: g (and g + 8)
    VALUE_MMAS = D // 16  # mma of a tile's values: 16 dims each
    K_WORDS = KEY_TILES * 2 * K_CHUNKS * 4
    WORDS = K_WORDS + KEY_TILES * 4 * V_CHUNKS * 4
    SCORES = 4 * KEY_TILES  # s[4i + 2*half + c]: key 16i + 8*half + g, head 2t + c
    ACC = 4 * VALUE_MMAS
    layout = spec.smem_layout()
    SCRATCH_M, SCRATCH_L, SCRATCH_ACC = layout["scratch_m"], layout["scratch_l"], layout["scratch_acc"]
    mma = ptx.mma_bf16_m16n8k16 if spec.bf16 else ptx.mma_f16_m16n8k16
    pack = ptx.f32x2_to_bf16x2 if spec.bf16 else ptx.f32x2_to_f16x2
    EMPTY = uint32(0)

    @cuda.jit(device=True, inline=True)
    def value_key(i, u, t):
        """Key ``u`` (of 4) that lanes ``(*, t)`` bring to tile ``i``'s values: ``2t, 2t+1, 8+2t, 9+2t``."""
        return 16 * i + 2 * t + (u & 1) + 8 * (u >> 1)

    @cuda.jit(device=True, inline=True)
    def value_offset(v, half):
        """The dim that row ``g + 8*half`` of value ``mma`` ``v`` stands for, less ``8g``: element ``v``
        of chunk ``g + 8*half`` (128 dims), element ``v + 4*half`` of chunk ``g`` (64 dims)."""
        return 64 * half + v if V_CHUNKS == 2 else v + 4 * half

    @cuda.jit(device=True, inline=True)
    def value_word(i, u, v, half):
        """The word of ``kv`` that holds dim ``8g + value_offset(v, half)`` of tile ``i``'s value key ``u``."""
        tile = K_WORDS + 4 * i * V_CHUNKS * 4
        if V_CHUNKS == 2:
            return tile + (u * V_CHUNKS + half) * 4 + v // 2
        return tile + u * 4 + (v + 4 * half) // 2

    @cuda.jit(device=True, inline=True)
    def start(m, l_sum, acc):
        for c in range(2):
            m[c] = NEG
            l_sum[c] = float32(0.0)
        for e in range(ACC):
            acc[e] = float32(0.0)

    @cuda.jit(device=True, inline=True)
    def load_keys(k_cache, cache_row0, t0, end, lane, kv):
        g, t = lane // 4, lane % 4
        for i in range(KEY_TILES):
            for half in range(2):
                key = min(t0 + 16 * i + 8 * half + g, end - 1)
                for j in range(K_CHUNKS):
                    w = ptx.ld_global_nc_v4_no_allocate(k_cache, (cache_row0 + key) * D + 8 * (t + 4 * j))
                    for e in range(4):
                        kv[((2 * i + half) * K_CHUNKS + j) * 4 + e] = w[e]

    @cuda.jit(device=True, inline=True)
    def load_values(v_cache, cache_row0, t0, end, lane, kv):
        g, t = lane // 4, lane % 4
        for i in range(KEY_TILES):
            for u in range(4):
                key = min(t0 + value_key(i, u, t), end - 1)
                for r in range(V_CHUNKS):
                    w = ptx.ld_global_nc_v4_no_allocate(v_cache, (cache_row0 + key) * D + 8 * (g + 8 * r))
                    for e in range(4):
                        kv[K_WORDS + ((4 * i + u) * V_CHUNKS + r) * 4 + e] = w[e]

    @cuda.jit(device=True, inline=True)
    def load(k_cache, v_cache, cache_row0, t0, end, lane, kv):
        load_keys(k_cache, cache_row0, t0, end, lane, kv)
        load_values(v_cache, cache_row0, t0, end, lane, kv)

    @cuda.jit(device=True, inline=True)
    def score(kv, smem, q0, s, lane):
        """Scores ``S^T = K Q^T`` of the step's keys into ``s``."""
        g, t = lane // 4, lane % 4
        for k in range(SCORES):
            s[k] = float32(0.0)
        q = cuda.local.array(4, uint32)
        for j in range(K_CHUNKS):
            if g < G:
                at = q0 + g * D + 8 * (t + 4 * j)
                x0, x1, x2, x3 = ptx.ld_shared_v4_f32(ptx.shared_address(smem, at))
                x4, x5, x6, x7 = ptx.ld_shared_v4_f32(ptx.shared_address(smem, at + 4))
                q[0], q[1], q[2], q[3] = pack(x0, x1), pack(x2, x3), pack(x4, x5), pack(x6, x7)
            else:
                for e in range(4):
                    q[e] = EMPTY
            for i in range(KEY_TILES):
                for h in range(2):
                    low = ((2 * i) * K_CHUNKS + j) * 4 + 2 * h  # key 16i + g, dims 8(t + 4j) + 4h ..
                    high = low + K_CHUNKS * 4  # key 16i + 8 + g
                    s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3] = mma(
                        kv[low], kv[high], kv[low + 1], kv[high + 1], q[2 * h], q[2 * h + 1],
                        s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3])

    @cuda.jit(device=True, inline=True)
    def softmax(s, t0, end, m, l_sum, acc, lane):
        """Online softmax of heads ``2t, 2t + 1`` over the step's keys before ``end``: ``s`` becomes ``p``."""
        g = lane // 4
        for c in range(2):
            m_new = m[c]
            for k in range(c, SCORES, 2):
                if t0 + 8 * (k // 2) + g < end:  # key 16i + 8*half + g
                    m_new = max(m_new, s[k])
            for offset in (4, 8, 16):
                m_new = max(m_new, cuda.shfl_xor_sync(FULL_MASK, m_new, offset))
            scale = math.exp2(m[c] - m_new)
            m[c] = m_new
            l_sum[c] *= scale
            for e in range(c, ACC, 2):
                acc[e] *= scale
            for k in range(c, SCORES, 2):
                s[k] = math.exp2(s[k] - m_new) if t0 + 8 * (k // 2) + g < end else float32(0.0)
                l_sum[c] += s[k]

    @cuda.jit(device=True, inline=True)
    def add_values(kv, s, acc, lane):
        """``O^T += V^T P^T`` of the step's values and probabilities ``s``."""
        g, t = lane // 4, lane % 4
        source = 8 * t + g // 2  # holds keys 2t (for b0) and 8 + 2t (b1) of heads 2(g//2), 2(g//2) + 1
        selector = ptx.HIGH_HALVES if g % 2 else ptx.LOW_HALVES  # head g of the pair
        for i in range(KEY_TILES):
            p_low = int32(pack(s[4 * i], s[4 * i + 1]))  # key g: heads 2t, 2t + 1 (int32: shuffles take no uint32)
            p_high = int32(pack(s[4 * i + 2], s[4 * i + 3]))  # key 8 + g
            b0 = ptx.permute_bytes(cuda.shfl_sync(FULL_MASK, p_low, source),
                                   cuda.shfl_sync(FULL_MASK, p_low, source + 4), selector)
            b1 = ptx.permute_bytes(cuda.shfl_sync(FULL_MASK, p_high, source),
                                   cuda.shfl_sync(FULL_MASK, p_high, source + 4), selector)
            for v in range(VALUE_MMAS):
                pairs = ptx.HIGH_HALVES if v % 2 else ptx.LOW_HALVES  # element v of each pair of words
                a = cuda.local.array(4, uint32)
                for half in range(2):
                    for k in range(2):  # keys 2t, 2t + 1 (k = 0), 8 + 2t, 9 + 2t (k = 1)
                        a[2 * k + half] = ptx.permute_bytes(kv[value_word(i, 2 * k, v, half)],
                                                            kv[value_word(i, 2 * k + 1, v, half)], pairs)
                acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3] = mma(
                    a[0], a[1], a[2], a[3], b0, b1, acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3])

    @cuda.jit(device=True, inline=True)
    def fold(kv, smem, q0, t0, end, m, l_sum, acc, lane):
        s = cuda.local.array(SCORES, float32)
        score(kv, smem, q0, s, lane)
        softmax(s, t0, end, m, l_sum, acc, lane)
        add_values(kv, s, acc, lane)

    @cuda.jit(device=True, inline=True)
    def fold_ahead(kv, smem, q0, t0, end, m, l_sum, acc, lane, k_cache, v_cache, cache_row0, ahead):
        """``fold`` of a step whose keys are in ``kv`` already: its values load first, and once the
        scores have used the keys, the keys of positions ``ahead ..`` (``ahead < 0``: none) load into
        their place, so that the warp has loads in flight while it computes."""
        load_values(v_cache, cache_row0, t0, end, lane, kv)
        s = cuda.local.array(SCORES, float32)
        score(kv, smem, q0, s, lane)
        if ahead >= 0:
            load_keys(k_cache, cache_row0, ahead, end, lane, kv)
        softmax(s, t0, end, m, l_sum, acc, lane)
        add_values(kv, s, acc, lane)

    @cuda.jit(device=True, inline=True)
    def write_state(out, m_at, l_at, acc_at, m, l_sum, acc, lane):
        """The warp's state as ``out[m_at + head]``, ``out[l_at + head]`` and ``out[acc_at + head * D ..]``."""
        g, t = lane // 4, lane % 4
        row = acc_at + 2 * t * D + 8 * g  # head 2t's dims 8g + value_offset(v, half)
        for c in range(2):
            l_tot = l_sum[c]
            for offset in (4, 8, 16):
                l_tot += cuda.shfl_xor_sync(FULL_MASK, l_tot, offset)
            if 2 * t + c < G:
                if g == 0:
                    out[m_at + 2 * t + c] = m[c]
                    out[l_at + 2 * t + c] = l_tot
                for v in range(VALUE_MMAS):
                    for half in range(2):
                        out[row + c * D + value_offset(v, half)] = acc[4 * v + 2 * half + c]

    @cuda.jit(device=True, inline=True)
    def store(smem, warp, m, l_sum, acc, lane):
        write_state(smem, SCRATCH_M + warp * G, SCRATCH_L + warp * G, SCRATCH_ACC + warp * G * D, m, l_sum, acc, lane)

    @cuda.jit(device=True, inline=True)
    def publish(out, at, m, l_sum, acc, lane):
        write_state(out, at, at + G, at + 2 * G, m, l_sum, acc, lane)

    return AttentionSteps(start, load, fold, store, publish, WORDS, 2, ACC, fold_ahead, load_keys)


def build_kernel(spec: KernelSpec):
    """The kernel for ``spec``, ready for ``cuda.jit`` compilation (see :func:`kernel_signature`).

    Arguments (16-bit tensors passed as flat int16 views, row-major)::

        hidden, residual  [step_batch * hidden_size]   inputs
        norm              [hidden_size]
        w_qkv             [qkv_rows * hidden_size]
        qkv_bias          [qkv_rows] (read only when spec.bias)
        w_o               [hidden_size * heads * head_dim]
        k_cache, v_cache  [step_batch * kv_heads * capacity * head_dim]   row positions[b] of sequence b written
        rope              [capacity * 2 * head_dim/2] float32        cos, sin per position
        out, residual_out [step_batch * hidden_size]   outputs
        out_acc           [step_batch * hidden_size] float32  zero on entry, left zero on exit
        arrivals          [batch_parts * arrival_words] int32   zero on entry, left zero on exit: of each
                          set of clusters [0, C) the finish's, then the parts' of each (KV head, rank)
                          (with ``spec.kv_rows_split``, word ``C * (1 + kv_head) + r`` of a set counts
                          down the clusters yet to read KV head ``kv_head``'s key (r 0) or value (r 1))
        part_states       [batch_parts * part_state_words()] float32   the parts' softmax states (split positions)
        positions         [step_batch] int32             each sequence's new token
        capacity          int32

    (``step_batch = batch * batch_parts``, or fewer: :attr:`KernelSpec.uneven`.) With ``spec.batch_parts > 1``
    the grid is that many sets of ``spec.part_clusters`` clusters, set ``p`` the step of sequences ``p *
    batch ..`` alone: it sees its slice of every argument that has a batch (and its own counters and
    states), as a launch of ``batch`` sequences would, and shares the weights and the RoPE table with
    the other sets. Where the last set has fewer sequences (``seqs``), those past them are phantoms:
    their inputs read as zeros and their positions as out of range, and the guards ``seq < seqs``
    keep every access of theirs to device memory (inputs, positions, the residual, the output sums and
    the work queue) out of the slices, which end with the step's last sequence.

    and, with ``spec.timeline``, two more::

        stamps            [blocks * TIMELINE_STAMPS * 2] uint64   per block and stamp: clock64, globaltimer
        sms               [blocks] uint32                         the SM each block ran on

    With ``spec.parts > 1`` (:attr:`KernelSpec.parts`) the clusters of a KV head split its cached
    positions: phase 4 writes each cluster's merged state (unnormalised: a part with no positions
    has ``l = 0``) to ``part_states`` instead of pushing ``o``, and after B4 every block counts
    itself in on its (KV head, rank) counter; the last of the ``parts`` to arrive merges their
    states into ``o`` and runs phase 5 and the finish, the others are done. No cluster waits for
    another, so the grid needs no co-residency.

    With ``spec.kv_rows_split`` (:attr:`KernelSpec.kv_rows_split`) the clusters of a KV head share out
    its key and value heads: the first projects the key into slot ``G`` (rotated, appended to the
    cache), the second the value, the others neither; after B2 the rank 0 of each of the first two
    fences and adds ``QUERY_SPLIT - 1`` to its head's flag; in the block that folds in the new token,
    each sequence's warp waits for the flags of the heads it lacks to be up and reads them back from
    the cache, into slots ``G`` (key) and ``G + 1`` (value), and once all have, thread 0 counts each
    flag down by one. The launcher refuses a grid that does not fit at once.

    With ``spec.shared_queries`` (:attr:`KernelSpec.projected_group`) the parts of a KV head's positions
    share out its query heads: part ``p`` projects ``PG = G / PARTS`` of them (its ``partial`` rows, RoPE
    pairs and W_qkv steps those and the K/V rows it owns), and phase 2 pushes them into their slots
    among the ``G`` of ``qkv``. After B2 each block leaves its share of the cluster's heads in
    ``part_states`` (after the parts' states, ``[KV_HEADS, BATCH, G * D]``), counts itself in on the KV
    head's word after the set's others in ``arrivals``, waits for the ``PARTS * C`` blocks of its KV
    head and reads the other parts' heads into ``qkv`` (the K/V rows it lacks, written before the
    count, come back from the cache as with ``kv_rows_split``, without flags). Phase 4 leaves the
    part's state as with the positions split; then every block counts itself in on its (KV head,
    rank) word, waits for all ``PARTS``, merges its own ``PG`` heads' ``o`` from the states and
    projects their W_o columns. The last of each word's second round of counts resets it. The
    launcher refuses a grid that does not fit at once.

    With ``spec.work_queue`` (:attr:`KernelSpec.work_queue`, one cluster a KV head) a KV head's cached
    positions are not split by rank but taken in chunks of ``queue_rows`` from a ticket counter in
    device memory, after the sets' ``arrivals`` (:attr:`KernelSpec.queue_words`). After B2, warp 0 of
    rank 0 publishes the set's queries of its KV head after the sets' ``part_states``
    (:attr:`KernelSpec.queue_state_words`) and raises their flags (fence, ``atom.exch``). Each warp
    takes chunks of its own sequence while they last (the next ticket in flight while it folds a
    chunk), leaves that state for the block merge as before, then looks for any pair (sequence, KV
    head) of the step whose flag is up with chunks left: it takes the first chunk and a state slot in
    one compare-and-swap, copies the published query to shared memory, folds chunks until that pair
    is exhausted, and writes the run's state to its slot (fence) before it counts the chunks done.
    After B3 the owners wait until every chunk of their sequences is counted, and phase 4 merges
    the slots' states beside the blocks'. A block waits only for chunks that running warps have
    taken and fold without waiting, so the grid needs no co-residency. After B4 each block counts
    itself out; the grid's last resets the queue's words for the next step.

    With ``spec.handoff`` three arguments change: ``hidden`` is float32 sums ``[batch *
    hidden_size]`` (another kernel's output before its conversion, read rounded to the model
    dtype), ``out`` is a float32 ``[batch * hidden_size]`` that the step sets to zero (the buffer
    the kernel before read), and ``out_acc`` is left holding the step's output sums for the kernel
    after (zero on entry); nothing counts in on ``arrivals`` (the flags of ``kv_rows_split`` aside).
    Nobody converts: the finish is the clearing.

    A position outside ``0 .. capacity-1`` makes its sequence attend to nothing, write no cache
    row and read no RoPE angle: its q, k and v are NaN, and so are its outputs.

    The measurement switches of ``spec`` are Python constants here: a stream switched off has no
    steps (its loops run to 0), the conversion is never reached without ``finish`` (see
    ``CONVERTS``), and without ``timeline`` numba compiles the stamps away. With the defaults the
    kernel is the one :class:`~clusterlab.fused.DecodeAttention` launches.
    """
    H, HEADS, KV_HEADS, D, HEAD_SPLIT = spec.hidden_size, spec.heads, spec.kv_heads, spec.head_dim, spec.head_split
    BATCH_PARTS, PART_BLOCKS = spec.batch_parts, spec.part_clusters * spec.cluster_size  # sets, blocks a set
    STEP_BATCH, UNEVEN = spec.step_batch, spec.uneven  # the last set may step fewer than BATCH sequences
    ARRIVAL_WORDS, PART_STATE_WORDS = spec.arrival_words, spec.part_state_words()  # of a set
    PARTS, QUERY_SPLIT = spec.parts, spec.query_split  # HEAD_SPLIT = PARTS * QUERY_SPLIT
    SPLIT = PARTS > 1
    # With shared_queries each part projects PG of the G query heads (and its W_o columns), PROJ_SPLIT
    # clusters a KV head's projection; else PG = G and the projection's split is the query heads'
    SHARED, PG, PROJ_SPLIT = spec.shared_queries, spec.projected_group, spec.projection_split
    G, ROWS, C, BATCH, WARPS, THREADS = spec.group, spec.rows, spec.cluster_size, spec.batch, spec.warps, spec.threads
    K_SLICE, OUT_ROWS, ATTN_WIDTH = spec.k_slice, spec.out_rows, spec.attn_width
    NEOX, BF16, BIAS = spec.neox, spec.bf16, spec.bias
    KV_STREAM, TIMELINE, HANDOFF = spec.kv_stream, spec.timeline, spec.handoff
    # The last block's flag is 1. Without spec.finish the flag that converts is 2, which no block
    # gets: the conversion stays in the code, unreached, so that everything else compiles exactly as
    # in the full kernel and the ablation times the conversion alone.
    CONVERTS = 1 if spec.finish else 2
    NAN = np.float32(np.nan)
    EPS = np.float32(spec.rms_eps)
    INV_H = np.float32(1.0 / H)
    Q_SCALE = np.float32(math.log2(math.e) / math.sqrt(D))
    HALF = D // 2  # RoPE angles a position has
    KV_SPLIT = spec.kv_rows_split  # the clusters of a KV head share out its key and value heads
    PROJ_ROWS, PROJ_WIDTH = spec.projected_rows, spec.projected_width  # W_qkv rows, W_o columns a cluster
    PAIRS = PROJ_ROWS // 2  # RoPE pairs of the cluster's rows (those of the value head are not rotated)
    PARTIAL_STRIDE = spec.partial_stride
    KEYS_PER_STEP = spec.keys_per_step
    # Where a step's cached keys and values are loaded: on the CUDA cores while the step before it is
    # folded (the first during B1); on the tensor cores at the top of the step, or with pipelined_kv
    # its values there and its keys while the step before it is folded (the first after B2).
    KV_AHEAD = not spec.mma_attention
    KV_PIPELINE = spec.pipelined_kv
    WARPS_PER_SEQUENCE = WARPS // BATCH
    GROUPS_PER_SEQUENCE = WARPS_PER_SEQUENCE * spec.attention_groups  # softmax states a sequence's warps leave
    NEW_TOKEN_PART, NEW_TOKEN_RANK = new_row_block(PARTS, C)
    # part_states: acc [KV_HEADS, PARTS, BATCH, ATTN_WIDTH], then m and l [KV_HEADS, PARTS, BATCH, G]
    PART_STRIDE = BATCH * ATTN_WIDTH  # words of one part's acc
    PART_M = KV_HEADS * PARTS * PART_STRIDE
    PART_L = PART_M + KV_HEADS * PARTS * BATCH * G
    PART_Q = PART_L + KV_HEADS * PARTS * BATCH * G  # shared_queries: the queries [KV_HEADS, BATCH, ATTN_WIDTH]
    QUERIES = C * (1 + KV_HEADS)  # shared_queries: arrivals[QUERIES + kv_head] counts the blocks that handed theirs
    NEW_TOKEN_GROUP = WARPS * spec.attention_groups  # scratch groups NEW_TOKEN_GROUP + seq: sequence seq's new token
    layout = spec.smem_layout()
    XS, PARTIAL, QKV = layout["xs"], layout["partial"], layout["qkv"]
    SCRATCH_M, SCRATCH_L, SCRATCH_ACC = layout["scratch_m"], layout["scratch_l"], layout["scratch_acc"]
    STATE_M, STATE_L, STATE_ACC = layout["state_m"], layout["state_l"], layout["state_acc"]
    O, RED = layout["o"], layout["red"]
    # The work queue (spec.work_queue): units are chunks of U cached positions of a pair (sequence of the
    # step, KV head); its words follow every set's arrivals, its states every set's part states.
    QUEUE, U = spec.work_queue, spec.queue_rows
    PAIRS_ALL, GRID_BLOCKS = spec.queue_pairs, spec.clusters * C
    TICKET, DONE, FLAG, LEFT = 0, PAIRS_ALL, 2 * PAIRS_ALL, 3 * PAIRS_ALL  # of the queue words
    CHUNK_MASK, SLOT_ONE = (1 << TICKET_BITS) - 1, 1 << TICKET_BITS
    GD = G * D  # the published query of a pair
    SLOT_WORDS = 2 * G + GD  # a state in device memory: m [G], l [G], acc [G, D]
    SLOTS = PAIRS_ALL * GD  # the states, after the published queries
    FOREIGN_Q = layout["foreign_q"]
    qkv_tile, o_tile = spec.qkv_tile(), spec.o_tile()
    QKV_STEP_ROWS = qkv_tile.step_rows  # W_qkv rows a warp step covers
    QKV_STREAM = spec.qkv_stream
    QKV_STEPS = PROJ_ROWS // QKV_STEP_ROWS if QKV_STREAM else 0
    O_STEP_ROWS = o_tile.step_rows  # W_o rows a warp step covers
    O_STEPS = OUT_ROWS // O_STEP_ROWS if spec.o_stream else 0
    QKV_SCALED = scales_inputs(qkv_tile, BF16)

    to_bits = ptx.f32_to_bf16 if BF16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if BF16 else ptx.f16_to_f32
    qkv_load, qkv_finish, QKV_WORDS = make_gemv(BATCH, BF16, qkv_tile, x_stride=K_SLICE,
                                                out_stride=PARTIAL_STRIDE, atomic=False,
                                                norms=(PARTIAL + PROJ_ROWS, PARTIAL_STRIDE),
                                                interleaved=spec.inputs_interleaved)
    o_load, o_finish, O_WORDS = make_gemv(BATCH, BF16, o_tile, x_stride=PROJ_WIDTH, out_stride=H, atomic=True,
                                          bounded=True)
    (kv_start, kv_load, kv_fold, kv_store, kv_publish, KV_WORDS, STATES, LANE_ACC, kv_fold_ahead,
     kv_load_keys) = _make_attention(spec)
    norm_inputs, sum_squares, scale_inputs = make_norm_inputs(BATCH, H, K_SLICE, THREADS, BF16,
                                                              spec.inputs_interleaved, HANDOFF, UNEVEN)
    finish_arrive, finish_convert = make_finish(BATCH, H, OUT_ROWS, THREADS, BF16)
    clear = make_clear(STEP_BATCH, H, THREADS)  # the whole step's buffer
    qkv_row = cuda.jit(device=True, inline=True)(plan.qkv_row)
    rope_pair = cuda.jit(device=True, inline=True)(plan.rope_pair)
    cached_range = cuda.jit(device=True, inline=True)(plan.cached_range)
    owned_quads = cuda.jit(device=True, inline=True)(plan.owned_quads)
    exchange_lanes, pull, push, peer_sum, peer_max = make_exchange(C)
    stamp, record_sm = make_stamp(TIMELINE, TIMELINE_STAMPS)

    @cuda.jit(device=True, inline=True)
    def weight_row(query_block, row, kv_shift):
        """W_qkv's row of the cluster's local ``row`` (of its ``PROJ_ROWS``); ``kv_shift`` is ``D`` where the
        cluster's slot PG holds the value head's rows (:attr:`KernelSpec.kv_rows_split`), else 0."""
        return qkv_row(HEADS, KV_HEADS, D, PROJ_SPLIT, query_block, row + kv_shift if row >= PG * D else row)

    @cuda.jit(device=True, inline=True)
    def o_rows(rank, step, query_block):
        """Where W_o's rows of the block's warp step ``step`` of phase 5 start, at the columns of the
        cluster's ``PG`` heads (``query_block * PROJ_WIDTH ..``)."""
        return (rank * OUT_ROWS + step * O_STEP_ROWS) * (HEADS * D) + query_block * PROJ_WIDTH

    @cuda.jit(device=True, inline=True)
    def cached_rows(positions, seq, seqs, capacity):
        """Sequence ``seq``'s cached rows (its position), or -1 where the position is out of range or
        the sequence is a phantom of an uneven set (``seq >= seqs``; its position is not read)."""
        if UNEVEN and seq >= seqs:
            return -1
        position = positions[seq]
        return position if 0 <= position < capacity else -1

    @cuda.jit(device=True, inline=True)
    def merge_parts(part_states, smem, kv_head, head0, tid):
        """``o`` in shared memory, ``[BATCH, PROJ_WIDTH]``, from the ``PARTS`` states of KV head
        ``kv_head``'s query heads ``head0 .. head0 + PG`` (every element, as phase 4 merges a cluster's
        blocks: the states weighted by ``exp2(m - m_max)``)."""
        for o in range(tid, BATCH * PROJ_WIDTH, THREADS):
            e = o // PROJ_WIDTH * ATTN_WIDTH + head0 * D + o % PROJ_WIDTH  # of the states' [BATCH, ATTN_WIDTH]
            state = e // ATTN_WIDTH * G + e % ATTN_WIDTH // D  # (sequence, head)
            first = kv_head * PARTS
            m_max = NEG
            for p in range(first, first + PARTS):
                m_max = max(m_max, part_states[PART_M + p * BATCH * G + state])
            l_tot = float32(0.0)
            a_tot = float32(0.0)
            for p in range(first, first + PARTS):
                w = math.exp2(part_states[PART_M + p * BATCH * G + state] - m_max)
                l_tot += w * part_states[PART_L + p * BATCH * G + state]
                a_tot += w * part_states[p * PART_STRIDE + e]
            smem[O + o] = a_tot / l_tot

    @cuda.jit(device=True, inline=True)
    def wait_for_parts(arrivals, word, parts):
        """One thread of a block: counts the block in on ``arrivals[word]`` (a fence first: what the
        block wrote before is visible to whoever sees the count), waits until ``parts`` blocks have,
        and counts itself in again once past; the last of ``2 * parts`` sets the word back to zero,
        when every block has passed. A fence after the wait orders what follows after the others'
        writes."""
        cuda.threadfence()  # release
        cuda.atomic.add(arrivals, word, 1)
        wait_until(arrivals, word, parts, 64, WAIT_LIMIT_NS)
        cuda.threadfence()  # acquire
        if cuda.atomic.add(arrivals, word, 1) == 2 * parts - 1:
            arrivals[word] = 0

    @cuda.jit(device=True, inline=True)
    def hand_queries(part_states, arrivals, smem, kv_head, part, rank, tid):
        """``shared_queries``: after B2, the block leaves its share (elements ``rank * THREADS + tid``
        on, every ``C * THREADS``-th) of the cluster's ``PG`` query heads of every sequence in
        ``part_states`` (the queries, ``[KV_HEADS, BATCH, ATTN_WIDTH]``), waits until every block of
        the KV head's ``PARTS`` clusters has, and reads the other parts' heads into ``qkv``."""
        queries = PART_Q + kv_head * (BATCH * ATTN_WIDTH)
        for e in range(rank * THREADS + tid, BATCH * PROJ_WIDTH, C * THREADS):
            at = e // PROJ_WIDTH * ATTN_WIDTH + part * PROJ_WIDTH + e % PROJ_WIDTH  # (sequence, query element)
            part_states[queries + at] = smem[QKV + at // ATTN_WIDTH * ROWS + at % ATTN_WIDTH]
        cuda.syncthreads()
        if tid == 0:
            wait_for_parts(arrivals, QUERIES + kv_head, PARTS * C)
        cuda.syncthreads()
        for at in range(tid, BATCH * ATTN_WIDTH, THREADS):
            if at % ATTN_WIDTH // PROJ_WIDTH != part:
                smem[QKV + at // ATTN_WIDTH * ROWS + at % ATTN_WIDTH] = part_states[queries + at]
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def queue_chunks(positions, seq, seqs, capacity):
        """Work queue: chunks of sequence ``seq``'s cached rows (none where its position is out of range
        or ``seq >= seqs``: see :func:`cached_rows`)."""
        return (max(cached_rows(positions, seq, seqs, capacity), 0) + U - 1) // U if KV_STREAM else 0

    @cuda.jit(device=True, inline=True)
    def open_pair(flag, word, chunks):
        """Work queue: whether a pair of ``chunks`` chunks, its ``flag`` and ticket ``word`` read, can
        start another cluster's run: its query published, a chunk and a state slot left."""
        return flag != 0 and (word & CHUNK_MASK) < chunks and (word >> TICKET_BITS) < QUEUE_SLOTS

    @cuda.jit(device=True, inline=True)
    def slot_at(pair, slot):
        """Work queue: where state ``slot`` of ``pair`` starts in ``published`` (``SLOT_WORDS`` words)."""
        return SLOTS + (pair * QUEUE_SLOTS + slot) * SLOT_WORDS

    @cuda.jit(device=True, inline=True)
    def take(queue, pair, lane):
        """Work queue: lane 0 takes ``pair``'s next chunk (a ticket, perhaps past its last chunk); the
        other lanes get 0. Nobody waits for it until a lane reads it from lane 0."""
        ticket = 0
        if lane == 0:
            ticket = cuda.atomic.add(queue, TICKET + pair, 1) & CHUNK_MASK
        return ticket

    @cuda.jit(device=True, inline=True)
    def find_pair(queue, positions, capacity, start, lane):
        """Work queue: a pair whose query is published and that has a chunk and a state slot left, its
        words read by the warp's lanes at once (a round trip for 32 pairs) from pair ``start`` on; -1
        where none has."""
        for r in range(0, PAIRS_ALL, 32):
            j = r + lane
            pair = (start + j) % PAIRS_ALL
            is_open = False
            if j < PAIRS_ALL:
                chunks = queue_chunks(positions, pair // KV_HEADS, STEP_BATCH, capacity)
                if chunks > 0:
                    word = cuda.atomic.add(queue, TICKET + pair, 0)
                    flag = cuda.atomic.add(queue, FLAG + pair, 0)  # in flight beside the word's read
                    is_open = open_pair(flag, word, chunks)
            ballot = cuda.ballot_sync(FULL_MASK, is_open)
            if ballot != 0:
                return cuda.shfl_sync(FULL_MASK, pair, cuda.clz(cuda.brev(ballot)))  # the first such lane's
        return -1

    @cuda.jit(device=True, inline=True)
    def take_first(queue, pair, chunks, lane):
        """Work queue: lane 0 takes the first chunk of another cluster's ``pair`` and a state slot, if its
        query is published and a chunk and a slot are left (one compare-and-swap of the ticket word, so a
        slot is never taken without a chunk): ``(chunk, slot)``, or ``(-1, 0)``, in every lane."""
        chunk, slot = -1, 0
        if lane == 0 and chunks > 0:
            flag = cuda.atomic.add(queue, FLAG + pair, 0)
            word = cuda.atomic.add(queue, TICKET + pair, 0)  # in flight beside the flag's read
            while open_pair(flag, word, chunks):
                old = cuda.atomic.cas(queue, TICKET + pair, word, word + SLOT_ONE + 1)
                if old == word:
                    chunk, slot = word & CHUNK_MASK, word >> TICKET_BITS
                    break
                word = old
            cuda.threadfence()  # acquire: the query, published before the flag
        return cuda.shfl_sync(FULL_MASK, chunk, 0), cuda.shfl_sync(FULL_MASK, slot, 0)

    @cuda.jit(device=True, inline=True)
    def attend_chunks(queue, pair, first, chunks, k_cache, v_cache, cache_row0, end, smem, q0, m, l_sum, acc, kv,
                      lane):
        """Work queue: folds chunk ``first`` of ``pair`` (rows ``cache_row0 + U * first ..``, ``end``
        rows in all) and every further chunk the warp takes of it into the warp's softmax state, each
        next chunk taken while the one before is folded; returns the chunks folded."""
        ticket = take(queue, pair, lane)
        folded = 1
        t0 = first * U
        if KV_PIPELINE:
            kv_load_keys(k_cache, cache_row0, t0, end, lane, kv)
        elif KV_AHEAD:
            kv_load(k_cache, v_cache, cache_row0, t0, end, lane, kv)
        while t0 >= 0:
            ahead = t0 + KEYS_PER_STEP
            if ahead % U == 0 or ahead >= end:  # the chunk is done: on to the ticket's
                k = cuda.shfl_sync(FULL_MASK, ticket, 0)
                ahead = -1
                if k < chunks:
                    ahead = k * U
                    folded += 1
                    ticket = take(queue, pair, lane)
            if KV_PIPELINE:
                kv_fold_ahead(kv, smem, q0, t0, end, m, l_sum, acc, lane, k_cache, v_cache, cache_row0, ahead)
            else:
                if not KV_AHEAD:
                    kv_load(k_cache, v_cache, cache_row0, t0, end, lane, kv)
                kv_fold(kv, smem, q0, t0, end, m, l_sum, acc, lane)
                if KV_AHEAD and ahead >= 0:
                    kv_load(k_cache, v_cache, cache_row0, ahead, end, lane, kv)
            t0 = ahead
        return folded

    @cuda.jit(device=True, inline=True)
    def decode_step(hidden, residual, norm, w_qkv, qkv_bias, w_o, k_cache, v_cache, rope, out, residual_out,
                    out_acc, arrivals, part_states, positions, capacity, stamps, sms):
        """One block's step: the kernel's body (``stamps``, ``sms``: None unless ``spec.timeline``)."""
        smem = cuda.shared.array(0, float32)
        last = cuda.shared.array(1, int32)
        # Thread and block numbers unsigned: the compiler then knows that every index made from them
        # is non-negative, and compiles // and % without Python's sign fix-ups and array indices
        # without the wrap-around of negative ones (a fifth of the code; docs/fused-decode-notes.md, v54).
        tid = uint32(cuda.threadIdx.x)
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        block = uint32(cuda.blockIdx.x)  # of its set of clusters
        # The work queue's words and states (empty without spec.work_queue), and what another
        # cluster's chunks need: every sequence's position and cache rows
        queue = arrivals[BATCH_PARTS * ARRIVAL_WORDS:]
        published = part_states[BATCH_PARTS * PART_STATE_WORDS:]
        all_positions, all_k, all_v = positions, k_cache, v_cache
        seq0 = uint32(0)  # the set's first sequence in the step
        seqs = uint32(BATCH)  # the set's sequences: those from seqs on are phantoms (see spec.uneven)
        if BATCH_PARTS > 1:  # the set's BATCH sequences: their slices of the arguments, the set's counters and states
            p, block = block // PART_BLOCKS, block % PART_BLOCKS
            seq0 = p * BATCH
            if UNEVEN:  # the slices of the last set end with the step's last sequence
                seqs = uint32(min(BATCH, STEP_BATCH - seq0))
            rows = slice(p * BATCH * H, (p + 1) * BATCH * H)
            hidden, residual, residual_out, out_acc = hidden[rows], residual[rows], residual_out[rows], out_acc[rows]
            if not HANDOFF:  # a hand-off's out is cleared by the whole grid
                out = out[rows]
            cache_words = int64(BATCH * KV_HEADS * D) * capacity
            k_cache = k_cache[p * cache_words:(p + 1) * cache_words]
            v_cache = v_cache[p * cache_words:(p + 1) * cache_words]
            arrivals = arrivals[p * ARRIVAL_WORDS:(p + 1) * ARRIVAL_WORDS]
            part_states = part_states[p * PART_STATE_WORDS:(p + 1) * PART_STATE_WORDS]
            positions = positions[p * BATCH:(p + 1) * BATCH]
        cluster = block // C
        kv_head = cluster // HEAD_SPLIT
        part = cluster % HEAD_SPLIT if SPLIT else 0  # of the KV head's cached positions
        # its projected query heads query_block*PG .., W_o columns query_block*PROJ_WIDTH ..
        query_block = kv_head if SPLIT and not SHARED else cluster
        new_token = part == NEW_TOKEN_PART and rank == NEW_TOKEN_RANK  # folds in the new token
        # With KV_SPLIT the cluster's role: 0 projects the key into slot PG, 1 the value, 2 neither
        # (its rows, pairs and W_qkv steps are the query heads' alone); without it, 0 and slot PG + 1 too.
        role = min(cluster % PROJ_SPLIT, 2) if KV_SPLIT else 0
        kv_shift = D if role == 1 else 0
        qkv_steps = QKV_STEPS
        pairs = PAIRS
        if KV_SPLIT:
            projected = PG * D + (D if role < 2 else 0)
            qkv_steps = projected // QKV_STEP_ROWS if QKV_STREAM else 0
            pairs = projected // 2
        flags = C * (1 + kv_head)  # KV_SPLIT: arrivals[flags + r] counts down the readers of role r's head
        k0 = rank * K_SLICE
        stamp(stamps, tid, 0)
        record_sm(sms, tid)

        # -- 1 qkv: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2) ----------------
        norm_inputs(hidden, residual, norm, residual_out, smem, XS, RED, k0, cluster == 0, seqs, tid)
        # The first W_qkv step's loads go out once the input slice is in, not ahead of it: the
        # input loads would queue behind the weights' and hold up the whole phase.
        qkv_words = cuda.local.array(QKV_WORDS, uint32)
        step = warp
        if step < qkv_steps:
            qkv_load(w_qkv, weight_row(query_block, step * QKV_STEP_ROWS, kv_shift) * H + k0, H,
                     lane, qkv_words)
        cuda.syncthreads()
        sum_squares(smem, RED, PARTIAL + PROJ_ROWS, PARTIAL_STRIDE, tid)
        if QKV_SCALED:  # see scales_inputs
            cuda.syncthreads()
            scale_inputs(smem, XS, PARTIAL + PROJ_ROWS, PARTIAL_STRIDE, tid)
            cuda.syncthreads()
        stamp(stamps, tid, 1)  # inputs
        while step < qkv_steps:
            w0 = weight_row(query_block, step * QKV_STEP_ROWS, kv_shift) * H + k0
            qkv_finish(qkv_words, w_qkv, w0, H, smem, XS, smem, PARTIAL + step * QKV_STEP_ROWS, lane)
            step += WARPS
            if step < qkv_steps:
                qkv_load(w_qkv, weight_row(query_block, step * QKV_STEP_ROWS, kv_shift) * H + k0, H,
                         lane, qkv_words)
        # First attention loads (cached keys need no q), during B1: warps split the batch,
        # WARPS_PER_SEQUENCE each, and take steps of KEYS_PER_STEP positions in turn.
        att_seq = warp // WARPS_PER_SEQUENCE  # the sequence this warp attends for
        cached = cached_rows(positions, att_seq, seqs, capacity) if att_seq < BATCH else 0
        start, end = cached_range(max(cached, 0), part * C + rank, PARTS * C)
        cache_row0 = (att_seq * KV_HEADS + kv_head) * capacity
        static = KV_STREAM and att_seq < BATCH and not QUEUE  # the work queue's chunks are taken after B2
        kv_steps = (end - start + KEYS_PER_STEP - 1) // KEYS_PER_STEP if static else 0
        step = warp % WARPS_PER_SEQUENCE
        kv = cuda.local.array(KV_WORDS, uint32)
        stamp(stamps, tid, 2)  # W_qkv stream
        ptx.cluster_arrive_release()
        if KV_AHEAD and step < kv_steps:
            kv_load(k_cache, v_cache, cache_row0, start + step * KEYS_PER_STEP, end, lane, kv)
        ptx.cluster_wait_acquire()  # B1: every block's partials are complete
        stamp(stamps, tid, 3)  # B1 wait

        # -- 2 rope: owners sum the partials, normalise, rotate, push q/k/v, append k/v ------------------
        # A unit is a quad of RoPE pairs of one sequence; its C lanes pull one block's partials each
        # (two 16-byte loads: the quad's rows `ra ..` and `rb ..` under NeoX, `ra .. ra + 7` under
        # GPT-J) and push the rotated values back to it (see make_exchange).
        units = owned_quads(pairs, rank, C) * BATCH
        queries_at = part * PG * D if SHARED else 0  # the cluster's first query head among the G of qkv
        for lane_of_block in range(tid, exchange_lanes(units), THREADS):
            unit, peer = uint32(lane_of_block) // C, lane % C  # unsigned: see tid
            active = unit < units
            quad = rank + (unit // BATCH) * C
            seq = unit % BATCH
            position = cached_rows(positions, seq, seqs, capacity)
            row = uint32(max(position, 0))  # where a valid position reads its angles and writes its cache row
            ra, rb, angle = rope_pair(D, NEOX, QUAD * quad)  # the quad's first pair; the others follow
            slot = ra // D
            kind = slot + 1 if role == 1 and slot == PG else slot  # the slot of these rows in W_qkv's terms
            first, second = (ra, rb) if NEOX else (ra, ra + QUAD)
            partial = PARTIAL + seq * PARTIAL_STRIDE
            # where they go in qkv: a query head of the cluster's to its slot among the G, k and v to G, G + 1
            to_qkv = QKV + seq * ROWS + (queries_at if slot < PG else (G - PG) * D)
            xa = cuda.local.array(QUAD, float32)
            xb = cuda.local.array(QUAD, float32)
            ss = float32(0.0)
            lo0, lo1, lo2, lo3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            hi0, hi1, hi2, hi3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            if active:
                lo0, lo1, lo2, lo3 = pull(smem, partial + first, peer)
                hi0, hi1, hi2, hi3 = pull(smem, partial + second, peer)
                ss = ptx.remote_load(smem, partial + PROJ_ROWS, peer)
            if NEOX:  # pair i: rows ra + i, rb + i
                xa[0], xa[1], xa[2], xa[3] = lo0, lo1, lo2, lo3
                xb[0], xb[1], xb[2], xb[3] = hi0, hi1, hi2, hi3
            else:  # pair i: rows ra + 2i, ra + 2i + 1
                xa[0], xa[1], xa[2], xa[3] = lo0, lo2, hi0, hi2
                xb[0], xb[1], xb[2], xb[3] = lo1, lo3, hi1, hi3
            inv_rms = float32(1.0) / math.sqrt(peer_sum(ss) * INV_H + EPS)
            valid = position >= 0
            for i in range(QUAD):
                xa[i] = peer_sum(xa[i]) * inv_rms
                xb[i] = peer_sum(xb[i]) * inv_rms
                row_a, row_b = (ra + i, rb + i) if NEOX else (ra + 2 * i, ra + 2 * i + 1)
                if BIAS and active:
                    xa[i] += to_f32(qkv_bias[weight_row(query_block, row_a, kv_shift)])
                    xb[i] += to_f32(qkv_bias[weight_row(query_block, row_b, kv_shift)])
                if not valid:
                    xa[i], xb[i] = NAN, NAN
                if kind <= PG and valid:  # query and key heads are rotated
                    cos = rope[(row * 2) * HALF + angle + i]
                    sin = rope[(row * 2 + 1) * HALF + angle + i]
                    xa[i], xb[i] = xa[i] * cos - xb[i] * sin, xb[i] * cos + xa[i] * sin
                if slot < PG:
                    xa[i] *= Q_SCALE
                    xb[i] *= Q_SCALE
                if active and peer == 0 and kind >= PG and (KV_SPLIT or cluster % HEAD_SPLIT == 0) and valid:
                    # the first cluster of the KV head appends (with KV_SPLIT each cluster its own head)
                    cache_row = ((seq * KV_HEADS + kv_head) * uint32(capacity) + row) * D
                    if kind == PG:
                        k_cache[cache_row + row_a % D] = to_bits(xa[i])
                        k_cache[cache_row + row_b % D] = to_bits(xb[i])
                    else:
                        v_cache[cache_row + row_a % D] = to_bits(xa[i])
                        v_cache[cache_row + row_b % D] = to_bits(xb[i])
            if active:
                if NEOX:
                    push(smem, to_qkv + first, peer, xa[0], xa[1], xa[2], xa[3])
                    push(smem, to_qkv + second, peer, xb[0], xb[1], xb[2], xb[3])
                else:
                    push(smem, to_qkv + first, peer, xa[0], xb[0], xa[1], xb[1])
                    push(smem, to_qkv + second, peer, xa[2], xb[2], xa[3], xb[3])
        stamp(stamps, tid, 4)  # rope + push
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B2: q, k, v of the new token are in every block
        if KV_SPLIT and not SHARED and role < 2 and rank == 0 and tid == 0:  # every block's share of its row written
            cuda.threadfence()
            cuda.atomic.add(arrivals, flags + role, QUERY_SPLIT - 1)
        if SHARED:
            hand_queries(part_states, arrivals, smem, kv_head, part, rank, tid)
        stamp(stamps, tid, 5)  # B2 wait (and the queries' hand-off)

        # -- 3 attention over this block's cached positions (online softmax) -----------------------------
        m = cuda.local.array(STATES, float32)
        l_sum = cuda.local.array(STATES, float32)
        acc = cuda.local.array(LANE_ACC, float32)
        kv_start(m, l_sum, acc)
        if QUEUE:
            if rank == 0 and warp == 0:  # publish the set's queries of this KV head, then raise their flags
                for e in range(lane, seqs * GD, 32):
                    seq = e // GD
                    published[((seq0 + seq) * KV_HEADS + kv_head) * GD + e % GD] = smem[QKV + seq * ROWS + e % GD]
                cuda.syncwarp()
                if lane == 0:
                    cuda.threadfence()  # release: the queries before the flags
                    for seq in range(seqs):
                        cuda.atomic.exch(queue, FLAG + (seq0 + seq) * KV_HEADS + kv_head, 1)
            # The warp's own sequence (i = 0: its chunks while they last, its state for the block merge),
            # then other pairs' chunks, wherever the query is published and chunks are left (a state each
            # in device memory). One call site of the attention steps: an inlined copy costs registers.
            for i in range(2 * PAIRS_ALL + 1):  # a pair is left exhausted by a run on it; a lost race costs a turn
                if i == 0:
                    seq = seq0 + att_seq
                    pair = seq * KV_HEADS + kv_head
                    chunks = queue_chunks(positions, att_seq, seqs, capacity) if att_seq < BATCH else 0
                    first = cuda.shfl_sync(FULL_MASK, take(queue, pair, lane), 0) if chunks > 0 else 0
                    slot = 0
                    q0 = QKV + att_seq * ROWS
                else:
                    spread = (uint32(cuda.blockIdx.x) * WARPS + warp) % PAIRS_ALL  # where the warp starts looking
                    pair = find_pair(queue, all_positions, capacity, spread, lane)
                    if pair < 0:
                        break
                    seq = pair // KV_HEADS
                    chunks = queue_chunks(all_positions, seq, STEP_BATCH, capacity)
                    first, slot = take_first(queue, pair, chunks, lane)
                    if first < 0:
                        first = chunks
                    else:
                        cuda.syncwarp()  # lane 0's acquire orders the query's loads of every lane
                        for e in range(lane, GD, 32):
                            smem[FOREIGN_Q + warp * GD + e] = published[pair * GD + e]
                        cuda.syncwarp()
                    q0 = FOREIGN_Q + warp * GD
                kv_start(m, l_sum, acc)
                folded = 0
                if first < chunks:
                    folded = attend_chunks(queue, pair, first, chunks, all_k, all_v, int64(pair) * capacity,
                                           cached_rows(all_positions, seq, STEP_BATCH, capacity), smem, q0, m,
                                           l_sum, acc, kv,
                                           lane)
                if i == 0:
                    kv_store(smem, warp, m, l_sum, acc, lane)
                    if lane == 0 and folded > 0:  # its state reaches the merge through DSMEM: no fence
                        cuda.atomic.add(queue, DONE + pair, folded)
                elif folded > 0:  # the run's state from registers to its slot
                    kv_publish(published, slot_at(pair, slot), m, l_sum, acc, lane)
                    cuda.syncwarp()
                    if lane == 0:
                        cuda.threadfence()  # release: the state before its chunks are counted
                        cuda.atomic.add(queue, DONE + pair, folded)
        else:  # the block's share of its sequences' positions (start .. end), in steps taken in turn
            if KV_PIPELINE and step < kv_steps:
                kv_load_keys(k_cache, cache_row0, start + step * KEYS_PER_STEP, end, lane, kv)
            while step < kv_steps:
                t0 = start + step * KEYS_PER_STEP
                if KV_PIPELINE:
                    ahead = t0 + WARPS_PER_SEQUENCE * KEYS_PER_STEP if step + WARPS_PER_SEQUENCE < kv_steps else -1
                    kv_fold_ahead(kv, smem, QKV + att_seq * ROWS, t0, end, m, l_sum, acc, lane, k_cache, v_cache,
                                  cache_row0, ahead)
                else:
                    if not KV_AHEAD:
                        kv_load(k_cache, v_cache, cache_row0, t0, end, lane, kv)
                    kv_fold(kv, smem, QKV + att_seq * ROWS, t0, end, m, l_sum, acc, lane)
                step += WARPS_PER_SEQUENCE
                if KV_AHEAD and step < kv_steps:
                    kv_load(k_cache, v_cache, cache_row0, t0 + WARPS_PER_SEQUENCE * KEYS_PER_STEP, end, lane, kv)
            kv_store(smem, warp, m, l_sum, acc, lane)
        if new_token and warp < BATCH:  # the new token of sequence `warp`, from shared memory
            seq = warp
            if KV_SPLIT:  # the heads this cluster lacks, from the cache once their flags are up
                if lane == 0 and not SHARED:  # (SHARED: the hand-off waited for every cluster of the KV head)
                    for r in range(2):
                        if r != role:  # the flag: 0 until role r's head is cached, then its readers count it down
                            wait_until(arrivals, flags + r, 1, 0, WAIT_LIMIT_NS)
                    cuda.threadfence()
                cuda.syncwarp()
                position = cached_rows(positions, seq, seqs, capacity)
                at = ((seq * KV_HEADS + kv_head) * capacity + max(position, 0)) * D
                for i in range(lane, D, 32):  # slots G, G + 1: the key and the value
                    own = smem[QKV + seq * ROWS + G * D + i]
                    key = own if role == 0 else (to_f32(k_cache[at + i]) if position >= 0 else NAN)
                    value = own if role == 1 else (to_f32(v_cache[at + i]) if position >= 0 else NAN)
                    smem[QKV + seq * ROWS + G * D + i] = key
                    smem[QKV + seq * ROWS + (G + 1) * D + i] = value
                cuda.syncwarp()
            for head in range(G):
                dot = float32(0.0)
                for i in range(lane, D, 32):
                    dot += smem[QKV + seq * ROWS + head * D + i] * smem[QKV + seq * ROWS + G * D + i]
                for offset in (16, 8, 4, 2, 1):
                    dot += cuda.shfl_xor_sync(FULL_MASK, dot, offset)
                if lane == 0:
                    smem[SCRATCH_M + (NEW_TOKEN_GROUP + seq) * G + head] = dot
                    smem[SCRATCH_L + (NEW_TOKEN_GROUP + seq) * G + head] = float32(1.0)
                for i in range(lane, D, 32):
                    smem[SCRATCH_ACC + ((NEW_TOKEN_GROUP + seq) * G + head) * D + i] = smem[
                        QKV + seq * ROWS + (G + 1) * D + i]
        cuda.syncthreads()
        if KV_SPLIT and not SHARED and new_token and tid == 0:  # each sequence's warp read what it lacked: count down
            for r in range(2):
                if r != role:
                    cuda.atomic.sub(arrivals, flags + r, 1)
        stamp(stamps, tid, 6)  # attention
        # Block merge: sequence seq's state is its warps' GROUPS_PER_SEQUENCE states (+ its new token).
        for element in range(tid, BATCH * G * D, THREADS):
            e = uint32(element)  # a range's counter is signed (see tid)
            seq, head, dim = e // (G * D), e // D % G, e % D
            first_group = seq * GROUPS_PER_SEQUENCE
            m_max = NEG
            for q in range(first_group, first_group + GROUPS_PER_SEQUENCE):
                m_max = max(m_max, smem[SCRATCH_M + q * G + head])
            if new_token:
                m_max = max(m_max, smem[SCRATCH_M + (NEW_TOKEN_GROUP + seq) * G + head])
            l_tot = float32(0.0)
            a_tot = float32(0.0)
            for q in range(first_group, first_group + GROUPS_PER_SEQUENCE):
                w = math.exp2(smem[SCRATCH_M + q * G + head] - m_max)
                l_tot += w * smem[SCRATCH_L + q * G + head]
                a_tot += w * smem[SCRATCH_ACC + (q * G + head) * D + dim]
            if new_token:
                w = math.exp2(smem[SCRATCH_M + (NEW_TOKEN_GROUP + seq) * G + head] - m_max)
                l_tot += w
                a_tot += w * smem[SCRATCH_ACC + ((NEW_TOKEN_GROUP + seq) * G + head) * D + dim]
            smem[STATE_ACC + e] = a_tot
            if dim == 0:
                smem[STATE_M + seq * G + head] = m_max
                smem[STATE_L + seq * G + head] = l_tot
        # First o-proj loads (weights need no o), during B3: this block's output rows, the cluster's
        # columns (with the positions split, once the block knows it is the part that projects).
        o_words = cuda.local.array(O_WORDS, uint32)
        step = warp
        stamp(stamps, tid, 7)  # block merge
        ptx.cluster_arrive_release()
        if (SHARED or not SPLIT) and step < O_STEPS:
            o_load(w_o, o_rows(rank, step, query_block), HEADS * D, lane, o_words)
        ptx.cluster_wait_acquire()  # B3: every block's softmax state is complete
        stamp(stamps, tid, 8)  # B3 wait

        # -- 4 merge: owners combine the C states of their elements of o and push them (or, with the ----
        # positions split, leave the cluster's state for the last part to arrive)
        # A unit is a quad of elements (of one head); its C lanes pull one block's state each (m, l
        # and 16 bytes of acc) and push the merged quad back to it (see make_exchange).
        if QUEUE:  # every chunk of the set's sequences folded, by whichever warps took them
            if tid < seqs:
                pair = (seq0 + tid) * KV_HEADS + kv_head
                chunks = queue_chunks(positions, tid, seqs, capacity)
                wait_until(queue, DONE + pair, chunks, 256, WAIT_LIMIT_NS)  # sleeps: L2 to the warps still folding
                cuda.threadfence()  # acquire: the other clusters' states
            cuda.syncthreads()
        units = owned_quads(BATCH * ATTN_WIDTH, rank, C)
        for lane_of_block in range(tid, exchange_lanes(units), THREADS):
            unit, peer = uint32(lane_of_block) // C, lane % C  # unsigned: see tid
            active = unit < units
            e = QUAD * (rank + unit * C)
            seq, hd = e // ATTN_WIDTH, e % ATTN_WIDTH
            state = seq * G + hd // D  # (sequence, head) in the state arrays
            m = NEG
            l_sum = float32(0.0)
            a0, a1, a2, a3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            if active:
                m = ptx.remote_load(smem, STATE_M + state, peer)
                l_sum = ptx.remote_load(smem, STATE_L + state, peer)
                a0, a1, a2, a3 = pull(smem, STATE_ACC + e, peer)
            # and the other clusters' states, lane `peer` every C-th (a phantom's pair has none)
            if QUEUE and active and (not UNEVEN or seq < seqs):
                pair = (seq0 + seq) * KV_HEADS + kv_head
                for slot in range(peer, queue[TICKET + pair] >> TICKET_BITS, C):
                    at = slot_at(pair, slot)
                    m_slot = published[at + hd // D]
                    m_new = max(m, m_slot)
                    w, w_slot = math.exp2(m - m_new), math.exp2(m_slot - m_new)
                    l_sum = l_sum * w + published[at + G + hd // D] * w_slot
                    a0 = a0 * w + published[at + 2 * G + hd] * w_slot
                    a1 = a1 * w + published[at + 2 * G + hd + 1] * w_slot
                    a2 = a2 * w + published[at + 2 * G + hd + 2] * w_slot
                    a3 = a3 * w + published[at + 2 * G + hd + 3] * w_slot
                    m = m_new
            m_max = peer_max(m)
            w = math.exp2(m - m_max)
            l_tot = peer_sum(w * l_sum)
            a0, a1, a2, a3 = peer_sum(w * a0), peer_sum(w * a1), peer_sum(w * a2), peer_sum(w * a3)
            if active and SPLIT:  # unnormalised: a part with no positions has l = 0
                if peer == 0:
                    at = (kv_head * PARTS + part) * PART_STRIDE + e
                    part_states[at], part_states[at + 1], part_states[at + 2], part_states[at + 3] = a0, a1, a2, a3
                    if hd % D == 0:
                        at = (kv_head * PARTS + part) * BATCH * G + state
                        part_states[PART_M + at] = m_max
                        part_states[PART_L + at] = l_tot
            elif active:
                inv_l = float32(1.0) / l_tot
                push(smem, O + e, peer, a0 * inv_l, a1 * inv_l, a2 * inv_l, a3 * inv_l)
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B4: o (or the cluster's state) is complete; no DSMEM access after this
        if QUEUE and tid == 0:  # the block is done with the queue; the grid's last to be resets it
            cuda.threadfence()
            if cuda.atomic.add(queue, LEFT, 1) == GRID_BLOCKS - 1:
                for i in range(LEFT + 1):
                    queue[i] = 0
        stamp(stamps, tid, 9)  # o merge + B4

        # -- 5 o proj: this block's output rows, the cluster's heads' columns ----------------------------
        projects = True
        if SHARED:  # every part, once all have left their states (at this rank), merges its own heads'
            if tid == 0:
                wait_for_parts(arrivals, C + kv_head * C + rank, PARTS)
            cuda.syncthreads()
            merge_parts(part_states, smem, kv_head, part * PG, tid)
            cuda.syncthreads()
        elif SPLIT:  # the last of the KV head's parts to arrive (at this rank) merges their states
            finish_arrive(arrivals, C + kv_head * C + rank, PARTS, last, tid)
            projects = last[0] == 1
            if projects:
                cuda.threadfence()  # acquire: the other parts' states, written before their arrivals
                if step < O_STEPS:
                    o_load(w_o, o_rows(rank, step, query_block), HEADS * D, lane, o_words)
                merge_parts(part_states, smem, kv_head, 0, tid)
                if tid == 0:
                    arrivals[C + kv_head * C + rank] = 0
                cuda.syncthreads()
        while projects and step < O_STEPS:
            o_finish(o_words, w_o, o_rows(rank, step, query_block), HEADS * D, smem, O, out_acc,
                     rank * OUT_ROWS + step * O_STEP_ROWS, lane, seqs)
            step += WARPS
            if step < O_STEPS:
                o_load(w_o, o_rows(rank, step, query_block), HEADS * D, lane, o_words)
        stamp(stamps, tid, 10)  # W_o stream + red.add

        # -- 6 finish: the last block (one a cluster) to add into this block's output rows converts them -
        # (handing the sums on instead: the grid clears `out`, the buffer the kernel before read)
        if HANDOFF:
            clear(out, tid)
            stamp(stamps, tid, 11)
        elif projects:
            finish_arrive(arrivals, rank, KV_HEADS * PROJ_SPLIT, last, tid)
            stamp(stamps, tid, 11)  # fence + arrive
            if last[0] == CONVERTS:
                finish_convert(out, out_acc, arrivals, rank, seqs, tid)
        stamp(stamps, tid, 12)  # finish

    if TIMELINE:
        def fused_decode_attention_timeline(hidden, residual, norm, w_qkv, qkv_bias, w_o, k_cache, v_cache, rope, out,
                                            residual_out, out_acc, arrivals, part_states, positions, capacity, stamps,
                                            sms):
            decode_step(hidden, residual, norm, w_qkv, qkv_bias, w_o, k_cache, v_cache, rope, out, residual_out,
                        out_acc, arrivals, part_states, positions, capacity, stamps, sms)

        return fused_decode_attention_timeline

    def fused_decode_attention(hidden, residual, norm, w_qkv, qkv_bias, w_o, k_cache, v_cache, rope, out,
                               residual_out, out_acc, arrivals, part_states, positions, capacity):
        decode_step(hidden, residual, norm, w_qkv, qkv_bias, w_o, k_cache, v_cache, rope, out, residual_out,
                    out_acc, arrivals, part_states, positions, capacity, None, None)

    return fused_decode_attention


def kernel_signature(spec: KernelSpec | None = None):
    """Numba argument types of :func:`build_kernel`'s kernel for ``spec`` (None: the default spec's)."""
    from numba import types

    h, f = types.int16[::1], types.float32[::1]
    io = f if spec is not None and spec.handoff else h  # hidden and out (see build_kernel)
    signature = (io, h, h, h, h, h, h, h, f, io, h, f, types.int32[::1], f, types.int32[::1], types.int32)
    if spec is not None and spec.timeline:
        signature += (types.uint64[::1], types.uint32[::1])
    return signature
