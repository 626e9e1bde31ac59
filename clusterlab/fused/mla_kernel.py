"""The MLA decode kernels: three cluster launches a step, or one, the dataflow of ``docs/mla-decode-design.md``.

The simulator programs of the same dataflow are in :mod:`clusterlab.fused.mla_simulated`, launch
for launch and phase for phase (``# -- 1 projections`` .. ``# -- 5 finish``, the same names). The
constants are :class:`MLASpec`'s words upper-cased::

    H, HEADS, R, L           hidden_size, heads, kv_lora_rank, latent_width = R + D_R
    D_N, D_R, D_V            qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    Q_WIDTH                  q_width = D_N + D_R: a head's query rows
    KV_ROWS                  kv_rows = L / HEADS: the kv_a_proj_with_mqa rows a projection cluster owns
    SLOTS                    slots = Q_WIDTH + kv_slots: a projection cluster's rows, query first, the
                             kv_a rows padded to whole tensor-core steps from 2 sequences on
    C, A                     cluster_size (launches 1 and 3; launch 2: attention_cluster_size), attention_clusters
    K_SLICE, OUT_ROWS        a block's slice of the hidden size (launch 1) and of o_proj's rows (launch 3)
    COLS                     cols = R / C: the latent columns a block owns (launches 1 and 3; launch 2:
                             attention_cols)
    BATCH, WARPS, THREADS    sequences, warps and threads of a block

Launch 1 (``HEADS`` clusters, cluster h = query head h): ``h * norm`` on the block's hidden slice,
partial dots with head h's ``q_proj`` rows and the cluster's ``KV_ROWS`` rows of
``kv_a_proj_with_mqa``; barrier; owners of quads (16 bytes: :func:`~clusterlab.fused.kernel.make_exchange`)
sum the partials and normalise: ``kv_raw`` and the rotated ``q_pe`` to global memory, ``q_nope``
pushed into every block (the ClusterGather); barrier; the block's ``COLS`` columns of ``q_lat[h]
= q_nope @ W_UK[h]`` (rows of ``W_UK[h]^T``, a copy the layer keeps) to global memory.

Launch 2 (``A`` clusters a sequence of ``attention_cluster_size`` blocks, by default ``C``, and ``R / 64``
warps a block): the block's chunk of the
sequence's cached positions (and, in the last block, the new row) for every head on the tensor
cores. The copy engine brings the rows into shared memory (``cp.async.bulk``, a row a lane, each
warp its share of a tile), a tile of :data:`ATTENTION_TILE` rows at a time through a ring of
:data:`ATTENTION_STAGES` tiles, an mbarrier a stage; the warps share out the dims of the tile's
scores for all heads (the heads are ``mma``'s 16 rows), the threads add up their partial sums in
shared memory, every warp runs the same online softmax and sums the values of its own 64 latent dims
(see :func:`build_attention_kernel`). The block that folds in the new row
first normalises and rotates it (from ``kv_raw``) and appends it to the cache, rounded, where the
ring then finds it. Barrier; owners of the block's latent columns merge the ``C`` states through
DSMEM into the cluster's state in global memory; barrier.

Launch 3 (``HEADS`` clusters, cluster h = head h): the block merges head h's ``A`` states on its
latent columns into ``o_lat``, multiplies by its columns of ``W_UV[h]`` (rows of ``kv_b_proj``)
into a partial ``o[h]``; barrier; owners of ``o``'s quads sum the partials and push ``o`` into
every block (a gather); barrier; the block's rows of ``o_proj`` times ``o[h]`` added into
``out_acc``, converted by the last block of each rank (:func:`~clusterlab.fused.kernel.make_finish`).

Each launch's body is a device function of its cluster's number, named as the simulator's program of the
same phase (``projections_block``, ``attention_block``, ``output_block``). :func:`build_step_kernel` runs the
three as roles of one launch: a cluster takes a ticket from a counter in device memory as it starts, and the
ticket says its role; attention clusters wait until every projection block has counted itself in, output
clusters until every attention block has, each with its first loads already in flight.

The matrix-vector steps, the input phase, the exchanges and the finish are the Llama block's
(:mod:`clusterlab.fused.kernel`); the kernels keep float32 between launches. With ``MLASpec.timeline`` every
kernel takes two more arguments, ``stamps`` and ``roles``, and records when each block crosses the phases of
:data:`MLA_TIMELINE_PHASES` (:func:`make_mla_stamp`; :mod:`clusterlab.bench.fused_timeline`, ``--layer mla``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, int32, uint32

from .. import ptx
from . import plan
from .config import is_int
from .kernel import (FULL_MASK, NEG, REGISTERS_PER_THREAD, WAIT_LIMIT_NS, BlockShape, MmaTile, gemv_tile, make_exchange,
                     make_finish, make_gemv, make_input_projection, make_stamp, norm_shares, region_offsets, wait_until)
from .mla import LATENT_RMS_EPS, MLAConfig
from .plan import HOPPER, QUAD, DeviceLimits, new_row_block

#: Launch 2 runs on the tensor cores with the heads as ``mma``'s 16 rows: at most this many heads.
MMA_HEADS = 16
#: Launch 2 brings the cache into shared memory a tile of this many rows at a time (two ``mma``
#: of 8 columns for the scores, one ``mma``'s k for the values) ...
ATTENTION_TILE = 16
#: ... through a ring of this many tiles: while the block folds one, the next ones are in flight.
ATTENTION_STAGES = 4
#: Launch 3 merges a head's ``A`` softmax states this many at a time, each group's loads in flight together:
#: batch 1's one-block-an-SM grid of 15 clusters in one group; 16 would spill 20-40 bytes beside the
#: tensor-core ``W_UV`` loads from batch 2 on.
MERGE_GROUP_STATES = 15
#: The words of ``step_words``, the one-launch step's counters in device memory (int32, zero on entry and
#: left zero): clusters take their roles from ``TICKET`` in the order they start, projection blocks count
#: themselves in on ``QUERIES_DONE`` and attention blocks on ``STATES_DONE``, every block on ``LEFT`` as it
#: leaves (the last one sets all four back to zero). See :func:`build_step_kernel`.
TICKET, QUERIES_DONE, STATES_DONE, LEFT = range(4)
STEP_WORDS = 4
#: What a timeline kernel (``MLASpec.timeline``) times, the same in every role of both forms: stamp ``i``
#: ends phase ``i - 1``, stamp 0 is the block's start. "ticket": the one launch's ticket and cluster
#: barrier (nothing in the three launches); "loads + wait": the loads a role puts in flight before its
#: inputs exist and its wait for them (the one launch's attention and output roles; launch 3's first
#: ``W_UV`` loads); "work": the role's phases; "count in + finish": the one launch's count and leave, the
#: output's finish. See :mod:`clusterlab.bench.fused_timeline` (``--layer mla``).
MLA_TIMELINE_PHASES = ("ticket", "loads + wait", "work", "count in + finish")
MLA_TIMELINE_STAMPS = len(MLA_TIMELINE_PHASES) + 1


@cuda.jit(device=True, inline=True)
def count_in(words, counter, tid):
    """Count the block in on ``words[counter]`` (device memory) after every write it made: a block that sees
    the count with :func:`wait_for` sees the writes."""
    cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        cuda.atomic.add(words, counter, 1)


@cuda.jit(device=True, inline=True)
def wait_for(words, counter, count, tid):
    """Wait until ``count`` blocks have counted themselves in on ``words[counter]`` (:func:`count_in`):
    thread 0 polls the word (atomic reads, served by L2) and fences, then the block passes a barrier, so that
    every thread's later loads see what the counted blocks wrote."""
    if tid == 0:
        wait_until(words, counter, count, 0, WAIT_LIMIT_NS)
        cuda.threadfence()
    cuda.syncthreads()


def check_one_launch(kv_lora_rank: int, warps: int, cluster_size: int, attention_cluster_size: int) -> None:
    """One launch a step (:func:`build_step_kernel`) runs the three launches' blocks as roles of one grid, so
    their threads and clusters must agree: ``warps`` (launches 1 and 3) must be launch 2's, ``kv_lora_rank /
    64``, and ``attention_cluster_size`` must be ``cluster_size``."""
    if warps != kv_lora_rank // 64:
        raise ValueError(f"one_launch needs warps={kv_lora_rank // 64} (launch 2's: kv_lora_rank / 64), "
                         f"got warps={warps}")
    if attention_cluster_size != cluster_size:
        raise ValueError(f"one_launch needs attention_cluster_size={cluster_size} (the cluster_size of the grid's "
                         f"other roles), got attention_cluster_size={attention_cluster_size}")


def make_mla_stamp(timeline: bool):
    """``(stamp, record_role)``: ``stamp(stamps, tid, i)`` stores stamp ``i`` of the block (``clock64`` and
    ``globaltimer``; ``stamps``: uint64 ``[blocks * MLA_TIMELINE_STAMPS * 2]``, see
    :func:`clusterlab.fused.kernel.make_stamp`); ``record_role(roles, tid, ticket)`` stores the block's SM and
    its cluster's ticket (the three launches: its cluster's number) in ``roles`` (uint32 ``[blocks * 2]``).
    Without ``timeline`` both are nothing, and numba compiles the calls away."""
    stamp, _ = make_stamp(timeline, MLA_TIMELINE_STAMPS)

    @cuda.jit(device=True, inline=True)
    def record_role(roles, tid, ticket):
        if timeline:
            if tid == 0:
                roles[2 * cuda.blockIdx.x] = ptx.sm_id()
                roles[2 * cuda.blockIdx.x + 1] = ticket

    return stamp, record_role


@dataclass(frozen=True)
class MLASpec(BlockShape):
    """Everything the three MLA kernels are specialised on (each distinct spec is one compilation)."""

    hidden_size: int
    heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    interleaved: bool
    rms_eps: float
    softmax_scale: float
    bf16: bool
    batch: int
    cluster_size: int
    attention_clusters: int
    #: blocks a cluster of launch 2 (launches 1 and 3 have ``cluster_size``; the one launch takes one size)
    attention_cluster_size: int
    warps: int
    limits: DeviceLimits = HOPPER
    #: record a timeline: two more kernel arguments, ``stamps`` and ``roles`` (see :func:`make_mla_stamp`);
    #: :meth:`of` leaves it off, a variant is ``dataclasses.replace(spec, timeline=True)``
    timeline: bool = False

    @classmethod
    def of(cls, config: MLAConfig, bf16: bool, batch: int, cluster_size: int, attention_clusters: int, warps: int,
           limits: DeviceLimits = HOPPER, attention_cluster_size: int | None = None) -> MLASpec:
        """The spec of one launch shape (raises ``ValueError`` naming what does not fit);
        ``attention_cluster_size`` None: ``cluster_size``."""
        if config.q_lora_rank is not None:
            raise ValueError(f"the MLA kernels take no query LoRA yet (q_lora_rank={config.q_lora_rank}); "
                             "the simulator backend does")
        plan.check_one_of("cluster_size", cluster_size, plan.CLUSTER_SIZES)
        if attention_cluster_size is None:
            attention_cluster_size = cluster_size
        plan.check_one_of("attention_cluster_size", attention_cluster_size, plan.CLUSTER_SIZES)
        if not (is_int(attention_clusters) and attention_clusters >= 1):
            raise ValueError(f"attention_clusters must be a positive int, got {attention_clusters!r}")
        plan.check_one_of("warps", warps, plan.WARP_COUNTS)
        h, r, d_r, heads = config.hidden_size, config.kv_lora_rank, config.qk_rope_head_dim, config.heads
        needs = [
            (h % (8 * cluster_size) == 0, f"hidden_size {h} must split into {cluster_size} slices of whole 16-byte "
                                          "chunks"),
            (config.latent_width % (QUAD * heads) == 0, f"the latent row ({config.latent_width}) must split over the "
                                                       f"{heads} heads in quads"),
            (r % 256 == 0 and r <= 512, f"kv_lora_rank {r} must be 256 or 512 (launch 2 has a warp for each 64 "
                                        "latent dims, 4 or 8)"),
            (d_r % 32 == 0 and d_r <= 64, f"qk_rope_head_dim {d_r} must be 32 or 64 (the scores' mma take a row "
                                          "32 dims at a time)"),
            (r % (8 * cluster_size) == 0, f"kv_lora_rank {r} must split into {cluster_size} column slices of whole "
                                          "16-byte chunks"),
            (r % (8 * attention_cluster_size) == 0, f"kv_lora_rank {r} must split into attention_cluster_size="
                                                    f"{attention_cluster_size} column slices of whole 16-byte chunks"),
            (config.qk_nope_head_dim % 8 == 0 and config.v_head_dim % 8 == 0,
             "qk_nope_head_dim and v_head_dim must be multiples of 8"),
            (heads <= MMA_HEADS, f"{heads} heads do not fit launch 2's mma tile of {MMA_HEADS} rows"),
        ]
        for ok, why in needs:
            if not ok:
                raise ValueError(why)
        spec = cls(h, heads, r, config.qk_nope_head_dim, d_r, config.v_head_dim, config.rope_interleaved,
                   float(config.rms_eps), float(config.softmax_scale), bf16, batch, cluster_size, attention_clusters,
                   attention_cluster_size, warps, limits)
        for tile in (spec.projections_tile, spec.absorb_tile, spec.value_tile, spec.o_tile):
            tile()  # raises where a slice has no valid tiling
        for name, layout in (("projections", spec.projections_layout), ("attention", spec.attention_layout),
                             ("output", spec.output_layout)):
            need = 4 * layout()["total"]
            if need > limits.shared_bytes_per_block:
                raise ValueError(f"a block of the {name} launch needs {need} bytes of shared memory; the GPU allows "
                                 f"{limits.shared_bytes_per_block}")
        return spec

    @property
    def q_width(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kv_rows(self) -> int:
        """Rows of ``kv_a_proj_with_mqa`` one projection cluster owns."""
        return self.latent_width // self.heads

    @property
    def cols(self) -> int:
        """Latent columns one block owns: of ``q_lat`` (launch 1) and of ``o_lat`` (launch 3)."""
        return self.kv_lora_rank // self.cluster_size

    @property
    def attention_cols(self) -> int:
        """Latent columns one block of launch 2 owns in the merge of its cluster's states."""
        return self.kv_lora_rank // self.attention_cluster_size

    def cluster_blocks(self, kernel: str) -> int:
        """Blocks a cluster of ``kernel`` (as :meth:`launch_bounds` names them)."""
        return self.attention_cluster_size if kernel == "attention" else self.cluster_size

    @property
    def kv_slots(self) -> int:
        """Slots of launch 1's partials for the cluster's ``kv_a`` rows: ``kv_rows``, or on the tensor
        cores as many as whole 16-row steps take (36 -> 48; the padding's sums are never read)."""
        return -(-self.kv_rows // 16) * 16 if isinstance(self.projections_tile(), MmaTile) else self.kv_rows

    @property
    def slots(self) -> int:
        """Slots of a sequence's row of launch 1's partials: the query rows, then :attr:`kv_slots`."""
        return self.q_width + self.kv_slots

    @property
    def partial_stride(self) -> int:
        """Words of a sequence's row of launch 1's ``partial``: its slots, ``sum(h^2)``, padded to a quad."""
        return self.slots + QUAD

    def projections_tile(self):
        """A warp step never straddles the query rows and the ``kv_a`` rows. From ``MMA_BATCH``
        sequences on, the ``kv_a`` rows are padded to whole ``mma`` steps where that puts the
        projections on the tensor cores."""
        chunks = self.k_slice // 8
        padded = gemv_tile("MLA projections", chunks, math.gcd(self.q_width, -(-self.kv_rows // 16) * 16), self.batch)
        if isinstance(padded, MmaTile):
            return padded
        return gemv_tile("MLA projections", chunks, math.gcd(self.q_width, self.kv_rows), self.batch)

    def absorb_tile(self):
        return gemv_tile("absorbed query", self.qk_nope_head_dim // 8, self.cols, self.batch)

    def value_tile(self):
        return gemv_tile("value absorption", self.cols // 8, self.v_head_dim, self.batch)

    def o_tile(self):
        return gemv_tile("output projection", self.v_head_dim // 8, self.out_rows, self.batch)

    def projections_layout(self) -> dict[str, int]:
        b = self.batch
        return region_offsets({"xs": b * self.k_slice, "partial": b * self.partial_stride,
                               "q_nope": b * self.qk_nope_head_dim,
                               "red": b * norm_shares(self.k_slice)})

    @property
    def attention_warps(self) -> int:
        """Warps of a launch 2 block: one for each 64 latent dims of the output."""
        return self.kv_lora_rank // 64

    @property
    def ring_row_words(self) -> int:
        """Words from one row of launch 2's ring to the next (a 16-bit cache row is ``latent_width /
        2`` words), odd rows 4 words further: the least stride of at least a row and 4 words that is
        12 modulo 32. Then rows ``2q`` and ``2q + 1`` start 16 banks apart and rows ``0, 2, 4, 6`` 8
        banks apart, so that both ways the ``mma`` operands read a tile (eight lanes a 16-byte load:
        two rows' four chunks for the scores, four rows' two chunks for the values) touch each of
        the 32 banks once."""
        least = self.latent_width // 2 + 4
        return least + (12 - least) % 32

    def attention_layout(self) -> dict[str, int]:
        """Launch 2's regions; the states' sums ``[heads, R]`` take the ring's place (``"ring"``)
        once the block's rows are folded; ``"full"``: an mbarrier (two words) a ring stage, which
        the copy engine completes when the stage's rows have landed; ``"query"``: the scaled
        queries as the scores' ``mma`` A fragments (``L / 32`` steps of two halves of ``[32 lanes,
        4 words]``); ``"scores"``: each warp's partial scores of a tile, ``[warps, 2, 32, 4]`` (a
        lane's eight accumulators as two 16-byte halves, lanes contiguous); ``"sums"``: the tile's
        scores, ``[2, 32, 4]`` the same way."""
        row = self.ring_row_words
        ring = max(ATTENTION_STAGES * ATTENTION_TILE * row, self.heads * self.kv_lora_rank)
        return region_offsets({"ring": ring, "full": 2 * ATTENTION_STAGES, "query": 8 * self.latent_width,
                               "scores": self.attention_warps * 8 * 32, "sums": 8 * 32, "new_row": self.latent_width,
                               "state_m": self.heads, "state_l": self.heads, "red": self.attention_warps})

    def launch_bounds(self, kernel: str) -> tuple[int, int]:
        """``(threads, min_blocks_per_sm)`` of ``kernel`` (``"projections"``, ``"attention"``, ``"output"``,
        or ``"step"``: the three as one launch, :func:`build_step_kernel`)."""
        threads = 32 * self.attention_warps if kernel == "attention" else self.threads
        return threads, self.limits.blocks_per_sm(4 * self.shared_words(kernel), threads, REGISTERS_PER_THREAD)

    def shared_words(self, kernel: str) -> int:
        """Words of dynamic shared memory a block of ``kernel`` takes (as :meth:`launch_bounds`): one launch
        a step takes its largest role's."""
        layouts = {"projections": self.projections_layout, "attention": self.attention_layout,
                   "output": self.output_layout}
        if kernel == "step":
            return max(layout()["total"] for layout in layouts.values())
        return layouts[kernel]()["total"]

    @property
    def step_clusters(self) -> int:
        """Clusters of one launch a step: the projections' ``heads``, the attention's ``attention_clusters *
        batch``, the output's ``heads``."""
        return 2 * self.heads + self.attention_clusters * self.batch

    def output_layout(self) -> dict[str, int]:
        b, d_v = self.batch, self.v_head_dim
        return region_offsets({"o_lat": b * self.cols, "partial_o": b * d_v, "o": b * d_v})


def make_projections(spec: MLASpec):
    """Phases 1 and 2 as the device function ``projections_block(cluster, <launch 1's arguments>)`` of one
    block of the cluster of query head ``cluster`` (uint32): launch 1's body (:func:`build_projections_kernel`)
    and the projection clusters' of one launch a step (:func:`build_step_kernel`)."""
    H, HEADS, R, L, C, BATCH, WARPS, THREADS, BF16 = (spec.hidden_size, spec.heads, spec.kv_lora_rank,
                                                      spec.latent_width, spec.cluster_size, spec.batch, spec.warps,
                                                      spec.threads, spec.bf16)
    D_N, D_R, Q_WIDTH = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.q_width
    KV_ROWS, SLOTS = spec.kv_rows, spec.slots
    K_SLICE, COLS, PARTIAL_STRIDE, INTERLEAVED = spec.k_slice, spec.cols, spec.partial_stride, spec.interleaved
    HALF = D_R // 2
    NOPE_QUADS, PE_QUADS = D_N // QUAD, HALF // QUAD  # a quad of q_pe is four RoPE pairs
    UNITS = NOPE_QUADS + PE_QUADS + KV_ROWS // QUAD  # quads of one sequence in phase 2
    EPS, INV_H, NAN = np.float32(spec.rms_eps), np.float32(1.0 / H), np.float32(np.nan)
    layout = spec.projections_layout()
    XS, PARTIAL, Q_NOPE, RED = layout["xs"], layout["partial"], layout["q_nope"], layout["red"]
    absorb_tile = spec.absorb_tile()
    ABSORB_STEP_ROWS = absorb_tile.step_rows
    ABSORB_STEPS = COLS // ABSORB_STEP_ROWS
    # the cluster's rows: head h's query rows, then its kv_a rows
    projections = make_input_projection(BATCH, H, K_SLICE, WARPS, BF16, spec.projections_tile(), SLOTS, Q_WIDTH, XS,
                                        PARTIAL, PARTIAL_STRIDE, RED, second_rows=KV_ROWS, select_past_batch=False)
    absorb_load, absorb_finish, ABSORB_WORDS = make_gemv(BATCH, BF16, absorb_tile, x_stride=D_N,
                                                         out_stride=HEADS * R, atomic=False, select_past_batch=False)
    exchange_lanes, pull, push, peer_sum, _ = make_exchange(C)
    owned_quads = cuda.jit(device=True, inline=True)(plan.owned_quads)
    stamp, _ = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, forceinline=True)
    def projections_block(cluster, hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity,
                          residual_out, q_lat, q_pe, kv_raw, stamps):
        smem = cuda.shared.array(0, float32)
        tid = uint32(cuda.threadIdx.x)  # unsigned indices: see the attention kernel's decode_step
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        k0 = rank * K_SLICE  # query head `cluster`, kv_a rows cluster*KV_ROWS ..
        stamp(stamps, tid, 2)  # loads + wait: none

        # -- 1 projections: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2); partial dots --
        projections(hidden, residual, norm, residual_out, q_proj, cluster * Q_WIDTH, kv_a, cluster * KV_ROWS, smem, k0,
                    cluster == 0, tid)
        # First W_UK^T loads (weights need no q_nope): this block's columns of q_lat[h].
        absorb_words = cuda.local.array(ABSORB_WORDS, uint32)
        step = warp
        ptx.cluster_arrive_release()
        if step < ABSORB_STEPS:  # during the barrier: its release waits for the loads in flight before it
            absorb_load(w_uk_t, (cluster * R + rank * COLS + step * ABSORB_STEP_ROWS) * D_N, D_N, lane, absorb_words)
        ptx.cluster_wait_acquire()  # every block's partials are complete

        # owners (quad q: block q mod C) sum the C partials through DSMEM and normalise
        # -- 2 absorb: kv_a rows -> kv_raw, q_pe rotated -> q_pe, q_nope pushed into every block --------------
        # A unit is one sequence's quad: of q_nope (rows 4q ..), of q_pe (four RoPE pairs: rows `first ..`
        # and `second ..`), or of the kv_a rows; its C lanes pull one block's partials each.
        units = owned_quads(UNITS * QUAD, rank, C) * BATCH
        for lane_of_block in range(tid, exchange_lanes(units), THREADS):
            unit, peer = uint32(lane_of_block) // C, lane % C  # unsigned: see tid
            active = unit < units
            quad = rank + (unit // BATCH) * C
            seq = unit % BATCH
            partial = PARTIAL + seq * PARTIAL_STRIDE
            position = positions[seq]
            valid = 0 <= position < capacity
            pair = QUAD * (quad - NOPE_QUADS)  # the quad's first RoPE pair, where it is one of q_pe
            if quad < NOPE_QUADS:
                first = QUAD * quad
            elif quad < NOPE_QUADS + PE_QUADS:
                first = D_N + 2 * pair if INTERLEAVED else D_N + pair
            else:
                first = Q_WIDTH + QUAD * (quad - NOPE_QUADS - PE_QUADS)
            second = first + QUAD if INTERLEAVED else first + HALF
            lo0, lo1, lo2, lo3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            hi0, hi1, hi2, hi3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            ss = float32(0.0)
            if active:
                lo0, lo1, lo2, lo3 = pull(smem, partial + first, peer)
                if NOPE_QUADS <= quad < NOPE_QUADS + PE_QUADS:
                    hi0, hi1, hi2, hi3 = pull(smem, partial + second, peer)
                ss = ptx.remote_load(smem, partial + SLOTS, peer)
            inv_rms = float32(1.0) / math.sqrt(peer_sum(ss) * INV_H + EPS)
            lo0, lo1, lo2, lo3 = peer_sum(lo0) * inv_rms, peer_sum(lo1) * inv_rms, peer_sum(lo2) * inv_rms, \
                peer_sum(lo3) * inv_rms
            hi0, hi1, hi2, hi3 = peer_sum(hi0) * inv_rms, peer_sum(hi1) * inv_rms, peer_sum(hi2) * inv_rms, \
                peer_sum(hi3) * inv_rms
            if active and quad < NOPE_QUADS:
                if not valid:
                    lo0, lo1, lo2, lo3 = NAN, NAN, NAN, NAN
                push(smem, Q_NOPE + seq * D_N + first, peer, lo0, lo1, lo2, lo3)
            elif active and quad < NOPE_QUADS + PE_QUADS and peer == 0:
                xa = cuda.local.array(QUAD, float32)
                xb = cuda.local.array(QUAD, float32)
                if INTERLEAVED:  # pair i: rows 2i, 2i + 1
                    xa[0], xa[1], xa[2], xa[3] = lo0, lo2, hi0, hi2
                    xb[0], xb[1], xb[2], xb[3] = lo1, lo3, hi1, hi3
                else:  # pair i: rows i, i + D_R/2
                    xa[0], xa[1], xa[2], xa[3] = lo0, lo1, lo2, lo3
                    xb[0], xb[1], xb[2], xb[3] = hi0, hi1, hi2, hi3
                out = (seq * HEADS + cluster) * D_R
                for i in range(QUAD):
                    ya, yb = NAN, NAN
                    if valid:
                        cos = rope[(position * 2) * HALF + pair + i]
                        sin = rope[(position * 2 + 1) * HALF + pair + i]
                        ya, yb = xa[i] * cos - xb[i] * sin, xb[i] * cos + xa[i] * sin
                    da, db = (2 * (pair + i), 2 * (pair + i) + 1) if INTERLEAVED else (pair + i, pair + i + HALF)
                    q_pe[out + da] = ya
                    q_pe[out + db] = yb
            elif active and peer == 0:
                row = seq * L + cluster * KV_ROWS + first - Q_WIDTH
                kv_raw[row] = lo0
                kv_raw[row + 1] = lo1
                kv_raw[row + 2] = lo2
                kv_raw[row + 3] = lo3
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # q_nope is complete in every block; no DSMEM access after this

        while step < ABSORB_STEPS:
            absorb_finish(absorb_words, w_uk_t, (cluster * R + rank * COLS + step * ABSORB_STEP_ROWS) * D_N, D_N,
                          smem, Q_NOPE, q_lat, cluster * R + rank * COLS + step * ABSORB_STEP_ROWS, lane)
            step += WARPS
            if step < ABSORB_STEPS:
                absorb_load(w_uk_t, (cluster * R + rank * COLS + step * ABSORB_STEP_ROWS) * D_N, D_N, lane,
                            absorb_words)
        stamp(stamps, tid, 3)  # work

    return projections_block


def build_projections_kernel(spec: MLASpec):
    """Launch 1: phases 1 and 2 (see the module docstring). Arguments (16-bit tensors as flat int16 views)::

        hidden, residual  [batch * H]                 inputs
        norm              [H]                         input_layernorm
        q_proj            [HEADS * Q_WIDTH * H]
        kv_a              [L * H]                     kv_a_proj_with_mqa
        w_uk_t            [HEADS * R * D_N]           W_UK[h]^T, head after head
        rope              [capacity * 2 * D_R/2] float32   attention factor x cos, sin
        positions         [batch] int32;  capacity int32
        residual_out      [batch * H]                 output: hidden + residual
        q_lat             [batch * HEADS * R] float32 output
        q_pe              [batch * HEADS * D_R] float32   output, rotated
        kv_raw            [batch * L] float32         output: the latent row before its norm and RoPE

    A position outside ``0 .. capacity-1`` makes its sequence's ``q_lat`` and ``q_pe`` NaN.
    """
    projections_block, C = make_projections(spec), spec.cluster_size
    stamp, record_role = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, forceinline=True)
    def launch_1(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, stamps, roles):
        tid, cluster = uint32(cuda.threadIdx.x), uint32(cuda.blockIdx.x) // C
        stamp(stamps, tid, 0)
        record_role(roles, tid, cluster)
        stamp(stamps, tid, 1)  # ticket: none
        projections_block(cluster, hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity,
                          residual_out, q_lat, q_pe, kv_raw, stamps)
        stamp(stamps, tid, 4)  # count in + finish: none

    def mla_projections(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out,
                        q_lat, q_pe, kv_raw):
        launch_1(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, None, None)

    def mla_projections_timeline(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity,
                                 residual_out, q_lat, q_pe, kv_raw, stamps, roles):
        launch_1(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, stamps, roles)

    return mla_projections_timeline if spec.timeline else mla_projections


def make_attention(spec: MLASpec, one_launch: bool = False):
    """Phase 3 as the device function ``attention_block(cluster, <launch 2's arguments>, step_words)`` of one
    block of attention cluster ``cluster`` (uint32): launch 2's body (:func:`build_attention_kernel`), and
    with ``one_launch`` the attention clusters' of one launch a step (:func:`build_step_kernel`), which
    first have the copy engine bring the tiles of cached rows that need no query, then wait until every
    projection block has counted itself in on ``step_words[QUERIES_DONE]`` (int32), and count themselves
    in on ``step_words[STATES_DONE]`` once their states are out; without it ``step_words`` is not read.
    How a tile is folded is :func:`build_attention_kernel`'s docstring.
    """
    HEADS, R, D_R, L, C, A = (spec.heads, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.latent_width,
                              spec.attention_cluster_size, spec.attention_clusters)
    ONE_LAUNCH = one_launch
    BF16, INTERLEAVED, COLS = spec.bf16, spec.interleaved, spec.attention_cols
    WARPS = spec.attention_warps
    THREADS = 32 * WARPS
    HALF = D_R // 2
    TILE, STAGES = ATTENTION_TILE, ATTENTION_STAGES
    ROW = spec.ring_row_words  # words from one ring row to the next (odd rows 4 further: ring_row_words)
    ROW_BYTES = 2 * L  # a cache row, as the copy engine moves it
    STAGE_BYTES = 4 * TILE * ROW
    COPY_ROWS = TILE // WARPS  # the rows of a tile each warp has the copy engine bring
    SCORE_STEPS = L // 32  # 32 dims (four lanes' 16-byte chunks) a step: four mma (two k halves, two n halves)
    FULL_ROUNDS = SCORE_STEPS // WARPS  # steps every warp takes ...
    QUARTERS = 4 * (SCORE_STEPS % WARPS)  # ... and the rest as quarter steps, one mma each, dealt round
    QUARTER_ROUNDS = -(-QUARTERS // WARPS)
    STEP_BYTES = 4 * 2 * 32 * 4  # a step's A fragments: two halves of 32 lanes x 16 bytes
    QUERY_HEADS = MMA_HEADS // WARPS  # the scaled queries' rows a warp fills ...
    QUERY_WORDS = -(-L // 64)  # ... a lane a word (two dims, 16 bits each) of every 32 of a row
    QUERY_DIMS = 2 * QUERY_HEADS * QUERY_WORDS  # the dims a lane holds
    UNITS = HEADS * COLS // QUAD  # merge units of a block: (head, quad of its columns)
    SCALE = np.float32(spec.softmax_scale * math.log2(math.e))  # base-2 scores
    INV_R, LATENT_EPS = np.float32(1.0 / R), np.float32(LATENT_RMS_EPS)
    NEW_CLUSTER, NEW_RANK = new_row_block(A, C)
    layout = spec.attention_layout()
    # the states' sums take the ring's place once the rows are folded
    RING, FULL, QUERY, SCORES, SUMS, NEW_ROW, STATE_M, STATE_L, STATE_ACC, RED = (
        layout["ring"], layout["full"], layout["query"], layout["scores"], layout["sums"], layout["new_row"],
        layout["state_m"], layout["state_l"], layout["ring"], layout["red"])
    to_bits = ptx.f32_to_bf16 if BF16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if BF16 else ptx.f16_to_f32
    pack = ptx.f32x2_to_bf16x2 if BF16 else ptx.f32x2_to_f16x2
    mma = ptx.mma_bf16_m16n8k16 if BF16 else ptx.mma_f16_m16n8k16
    exp2 = ptx.ex2_approx_ftz
    cached_range = cuda.jit(device=True, inline=True)(plan.cached_range)
    exchange_lanes, pull, _, peer_sum, peer_max = make_exchange(C)
    stamp, _ = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, inline=True)
    def ring_row(r):
        """Word of row ``r`` within a ring stage."""
        return r * ROW + 4 * (r & 1)

    @cuda.jit(device=True, inline=True)
    def query_word(head, w):
        """Word of the scaled query's word ``w`` (dims ``2w``, ``2w + 1``) of ``head`` in the query
        region: the ``mma`` A fragments of step ``w // 16``, half ``w // 2 % 2``, lane ``(head % 8,
        w // 4 % 4)``, four words a lane in the order ``mma`` takes them."""
        return (((2 * (w >> 4) + ((w >> 1) & 1)) * 32 + 4 * (head & 7) + ((w >> 2) & 3)) * 4 + 2 * (w & 1)
                + (head >> 3))

    @cuda.jit(device=True, inline=True)
    def issue_tile(latent, first, t0, stop, stage_at, full, warp, lane):
        """Have the copy engine bring the sequence's cache rows ``t0 .. t0 + TILE`` (``first``: its row
        0 in ``latent``) into the ring stage at shared address ``stage_at``, completing mbarrier
        ``full``: warp ``w``'s lanes bring rows ``w``, ``w + WARPS``, .., each warp arriving once
        with the bytes it expects; rows from ``stop`` on repeat row ``stop - 1``."""
        if lane == 0:
            ptx.mbarrier_arrive_expect_tx(full, COPY_ROWS * ROW_BYTES)
        cuda.syncwarp()
        if lane < COPY_ROWS:
            r = warp + WARPS * lane
            row = min(t0 + r, stop - 1)
            ptx.bulk_copy_global_to_shared(stage_at + 4 * ring_row(r), latent, (first + row) * L, ROW_BYTES, full)

    @cuda.jit(device=True, inline=True)
    def tile_scores(query_at, key_at, scores_at, s, warp):
        """The warp's share of the scores of a ring tile into ``s``, stored as its partial sums
        (``scores_at``: the lane's place in warp 0's). ``query_at``: the lane's A fragment of step
        0, ``key_at``: its chunk of row ``g`` (step 0) in the tile."""
        for k in range(8):
            s[k] = float32(0.0)
        for i in range(FULL_ROUNDS):  # steps warp, warp + WARPS, ..
            j = warp + i * WARPS
            a0, a1, a2, a3 = ptx.ld_shared_v4_b32(query_at + j * STEP_BYTES)  # dims 0..3 of the chunks
            b0, b1, b2, b3 = ptx.ld_shared_v4_b32(query_at + j * STEP_BYTES + STEP_BYTES // 2)  # dims 4..7
            for n in range(2):
                k0, k1, k2, k3 = ptx.ld_shared_v4_b32(key_at + 64 * j + 32 * ROW * n)
                s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3] = mma(
                    a0, a1, a2, a3, k0, k1, s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3])
                s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3] = mma(
                    b0, b1, b2, b3, k2, k3, s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3])
        for i in range(QUARTER_ROUNDS):  # the steps left, a quarter (a k half of an n half) a warp
            u = warp + i * WARPS
            if u < QUARTERS:
                j, n, half = FULL_ROUNDS * WARPS + (u >> 2), (u >> 1) & 1, u & 1
                a0, a1, a2, a3 = ptx.ld_shared_v4_b32(query_at + j * STEP_BYTES + half * (STEP_BYTES // 2))
                k0, k1, k2, k3 = ptx.ld_shared_v4_b32(key_at + 64 * j + 32 * ROW * n)
                if half:
                    k0, k1 = k2, k3
                if n == 0:
                    s[0], s[1], s[2], s[3] = mma(a0, a1, a2, a3, k0, k1, s[0], s[1], s[2], s[3])
                else:
                    s[4], s[5], s[6], s[7] = mma(a0, a1, a2, a3, k0, k1, s[4], s[5], s[6], s[7])
        for h in range(2):
            ptx.st_shared_v4_f32(scores_at + 1024 * warp + 512 * h, s[4 * h], s[4 * h + 1], s[4 * h + 2],
                                 s[4 * h + 3])

    @cuda.jit(device=True, inline=True)
    def fold_tile(values_at, sums_at, rows_left, s, tile_max, m, l_sum, acc, t):
        """Fold a ring tile (``values_at``: the lane's chunk of row ``2t``; rows from ``rows_left`` on
        masked) into the softmax states ``m``, ``l_sum`` (heads ``g``, ``g + 8``) and the warp's
        ``acc``, once the tile's scores are at ``sums_at`` (the lane's eight)."""
        for h in range(2):
            s[4 * h], s[4 * h + 1], s[4 * h + 2], s[4 * h + 3] = ptx.ld_shared_v4_f32(sums_at + 512 * h)
        if rows_left < TILE:  # the block's last tile: rows past its end out of the softmax
            for n in range(2):
                for c in range(2):
                    if 8 * n + 2 * t + c >= rows_left:
                        for h in range(2):
                            s[4 * n + 2 * h + c] = NEG
        # -- online softmax of heads g (h = 0) and g + 8 (h = 1); the sums rescaled only when a maximum grew
        grew = False
        for h in range(2):
            m_new = m[h]
            for n in range(2):
                for c in range(2):
                    m_new = max(m_new, s[4 * n + 2 * h + c])
            for offset in (1, 2):
                m_new = max(m_new, cuda.shfl_xor_sync(FULL_MASK, m_new, offset))
            tile_max[h] = m_new
            grew = grew or m_new > m[h]
        if cuda.any_sync(FULL_MASK, grew):
            for h in range(2):
                scale = exp2(m[h] - tile_max[h])
                l_sum[h] *= scale
                for v in range(8):
                    acc[4 * v + 2 * h] *= scale
                    acc[4 * v + 2 * h + 1] *= scale
        for h in range(2):
            m[h] = tile_max[h]
            for n in range(2):
                for c in range(2):
                    p = exp2(s[4 * n + 2 * h + c] - m[h])
                    s[4 * n + 2 * h + c] = p
                    l_sum[h] += p
        # -- values O += P V: A is P as the scores left it; B pairs rows 2t, 2t + 1 (and 8 + 2t, 9 + 2t)
        p0, p1 = pack(s[0], s[1]), pack(s[2], s[3])  # rows 2t, 2t + 1: head g, head g + 8
        p2, p3 = pack(s[4], s[5]), pack(s[6], s[7])  # rows 8 + 2t, 9 + 2t
        a0, a1, a2, a3 = ptx.ld_shared_v4_b32(values_at)
        b0, b1, b2, b3 = ptx.ld_shared_v4_b32(values_at + 4 * (ROW + 4))
        c0, c1, c2, c3 = ptx.ld_shared_v4_b32(values_at + 4 * 8 * ROW)
        d0, d1, d2, d3 = ptx.ld_shared_v4_b32(values_at + 4 * (9 * ROW + 4))
        low = cuda.local.array(4, uint32)  # rows 2t, 2t + 1: word e holds dims 2e, 2e + 1 of the chunk
        high = cuda.local.array(4, uint32)
        low[0], low[1], low[2], low[3] = a0, a1, a2, a3
        high[0], high[1], high[2], high[3] = b0, b1, b2, b3
        low8 = cuda.local.array(4, uint32)  # rows 8 + 2t, 9 + 2t
        high8 = cuda.local.array(4, uint32)
        low8[0], low8[1], low8[2], low8[3] = c0, c1, c2, c3
        high8[0], high8[1], high8[2], high8[3] = d0, d1, d2, d3
        for v in range(8):
            halves = ptx.HIGH_HALVES if v % 2 else ptx.LOW_HALVES  # dim v of the chunk in each row's word
            v0 = ptx.permute_bytes(low[v // 2], high[v // 2], halves)
            v1 = ptx.permute_bytes(low8[v // 2], high8[v // 2], halves)
            acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3] = mma(
                p0, p1, p2, p3, v0, v1, acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3])

    @cuda.jit(device=True, forceinline=True)
    def attention_block(cluster, q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l,
                        state_acc, step_words, stamps):
        smem = cuda.shared.array(0, float32)
        words = cuda.shared.array(0, uint32)  # the same memory, as raw words
        tid = uint32(cuda.threadIdx.x)  # unsigned indices: see the attention kernel's decode_step
        lane, warp = tid % 32, tid // 32
        g, t = lane // 4, lane % 4
        rank = ptx.cluster_rank()
        seq, a = cluster // A, cluster % A  # cluster a of sequence seq
        position = positions[seq]
        cached = position if 0 <= position < capacity else -1
        start, end = cached_range(max(cached, 0), a * C + rank, A * C)
        folds_new = a == NEW_CLUSTER and rank == NEW_RANK and cached >= 0
        stop = end + 1 if folds_new else end  # the new row follows the cached ones in the last block
        if tid == 0:
            for stage in range(STAGES):
                ptx.mbarrier_init(ptx.shared_address(smem, FULL + 2 * stage), WARPS)  # a warp's copies, an arrival
            ptx.fence_mbarrier_init_release_cluster()  # before the copy engine completes them
        # The block's rows pass through the ring of STAGES tiles: tile i is folded while tiles
        # i + 1 .. i + STAGES - 1 are in flight. Shared addresses (bytes) of the ring and its mbarriers:
        ring_at, full_at = ptx.shared_address(smem, RING), ptx.shared_address(smem, FULL)
        first = seq * capacity  # the sequence's row 0
        tiles = (stop - start + TILE - 1) // TILE
        early = 0  # tiles in flight before the queries
        if ONE_LAUNCH:  # the first tiles need no query: in flight while the projections run
            early = min(tiles if not folds_new else (end - start) // TILE, STAGES - 1)  # not the new row's
            cuda.syncthreads()  # the mbarriers are set
            for i in range(early):
                issue_tile(latent, first, start + i * TILE, stop, ring_at + i * STAGE_BYTES, full_at + 8 * i, warp,
                           lane)
            wait_for(step_words, QUERIES_DONE, HEADS * C, tid)  # q_lat, q_pe and kv_raw are out
        stamp(stamps, tid, 2)  # loads + wait

        # -- 3 attention: this block's positions of the sequence, all heads; the states merged in the cluster ----
        # The scaled queries, 16 bits, as the mma A fragments of the scores' steps (query_word; heads >=
        # HEADS zero): warp w fills heads w * QUERY_HEADS .., lane l the words l, l + 32, .. of each:
        # every load first, then the stores (a store between two loads would hold the second load back
        # for the first one's round trip, as the compiler cannot tell the arrays apart).
        q_dims = cuda.local.array(QUERY_DIMS, float32)
        for j in range(QUERY_HEADS):
            head = warp * QUERY_HEADS + j
            for c in range(QUERY_WORDS):
                e = 2 * (lane + 32 * c)  # the word's first dim
                x0, x1 = float32(0.0), float32(0.0)
                if e < L and head < HEADS:
                    q = seq * HEADS + head
                    if e < R:
                        x0, x1 = q_lat[q * R + e], q_lat[q * R + e + 1]
                    else:
                        x0, x1 = q_pe[q * D_R + e - R], q_pe[q * D_R + e - R + 1]
                k = j * QUERY_WORDS + c
                q_dims[2 * k], q_dims[2 * k + 1] = x0, x1
        for j in range(QUERY_HEADS):
            for c in range(QUERY_WORDS):
                if 2 * (lane + 32 * c) < L:
                    k = j * QUERY_WORDS + c
                    words[QUERY + query_word(warp * QUERY_HEADS + j, lane + 32 * c)] = pack(
                        q_dims[2 * k] * SCALE, q_dims[2 * k + 1] * SCALE)
        if folds_new:  # the raw latent's sum of squares, by warp
            ss = float32(0.0)
            for i in range(tid, R, THREADS):
                x = kv_raw[seq * L + i]
                ss += x * x
            for offset in (16, 8, 4, 2, 1):
                ss += cuda.shfl_xor_sync(FULL_MASK, ss, offset)
            if lane == 0:
                smem[RED + warp] = ss
        cuda.syncthreads()
        if folds_new:  # the new row: c = RMSNorm(c_raw) * kv_a_layernorm, k_pe rotated; appended rounded
            ss = float32(0.0)
            for w in range(WARPS):
                ss += smem[RED + w]
            inv_rms = float32(1.0) / math.sqrt(ss * INV_R + LATENT_EPS)
            for i in range(tid, R, THREADS):
                smem[NEW_ROW + i] = kv_raw[seq * L + i] * inv_rms * to_f32(kv_norm[i])
            for i in range(tid, HALF, THREADS):
                ra, rb = (2 * i, 2 * i + 1) if INTERLEAVED else (i, i + HALF)
                xa, xb = kv_raw[seq * L + R + ra], kv_raw[seq * L + R + rb]
                cos = rope[(position * 2) * HALF + i]
                sin = rope[(position * 2 + 1) * HALF + i]
                smem[NEW_ROW + R + ra] = xa * cos - xb * sin
                smem[NEW_ROW + R + rb] = xb * cos + xa * sin
            cuda.syncthreads()
            for i in range(tid, L, THREADS):
                latent[(seq * capacity + position) * L + i] = to_bits(smem[NEW_ROW + i])
            ptx.fence_proxy_async_global()  # the copy engine that brings it into the ring sees it
        cuda.syncthreads()  # the new row is in the cache before the ring copies it; the mbarriers are set
        m = cuda.local.array(2, float32)
        l_sum = cuda.local.array(2, float32)
        tile_max = cuda.local.array(2, float32)
        acc = cuda.local.array(32, float32)
        for h in range(2):
            m[h] = NEG
            l_sum[h] = float32(0.0)
        for e in range(32):
            acc[e] = float32(0.0)
        # Shared addresses (bytes) of the lane's operands:
        query_at = ptx.shared_address(smem, QUERY) + 16 * lane  # its A fragments, step 0
        scores_lane = ptx.shared_address(smem, SCORES) + 16 * lane  # its partial scores, warp 0
        sums_lane = ptx.shared_address(smem, SUMS) + 16 * lane  # its scores
        key_lane = 4 * (ring_row(g) + 4 * t)  # in a stage: its chunk of row g, step 0
        values_lane = 4 * (ring_row(2 * t) + 4 * (8 * warp + g))  # its chunk of row 2t in its 64 dims
        for i in range(early, min(tiles, STAGES - 1)):
            issue_tile(latent, first, start + i * TILE, stop, ring_at + i * STAGE_BYTES, full_at + 8 * i, warp, lane)
        s = cuda.local.array(8, float32)  # s[4n + 2h + c]: head g + 8h, row 8n + 2t + c
        stage, phase = 0, 0
        for i in range(tiles):
            stage_at = ring_at + stage * STAGE_BYTES
            ptx.mbarrier_wait_parity_cta(full_at + 8 * stage, phase)
            tile_scores(query_at, stage_at + key_lane, scores_lane, s, warp)
            cuda.syncthreads()  # every warp's partial scores are in; every warp is done with tile i - 1
            if i + STAGES - 1 < tiles:  # into tile i - 1's stage
                refill = stage - 1 if stage > 0 else STAGES - 1
                issue_tile(latent, first, start + (i + STAGES - 1) * TILE, stop, ring_at + refill * STAGE_BYTES,
                           full_at + 8 * refill, warp, lane)
            for e in range(tid, 8 * 32, THREADS):  # the tile's scores: each thread sums one of them over the warps
                x = float32(0.0)
                for w in range(WARPS):
                    x += smem[SCORES + 8 * 32 * w + e]
                smem[SUMS + e] = x
            cuda.syncthreads()  # the scores are summed; every warp has stored its partial sums
            fold_tile(stage_at + values_lane, sums_lane, stop - start - i * TILE, s, tile_max, m, l_sum, acc, t)
            stage += 1
            if stage == STAGES:
                stage, phase = 0, phase ^ 1
        for h in range(2):  # the lanes' sums of p
            for offset in (1, 2):
                l_sum[h] += cuda.shfl_xor_sync(FULL_MASK, l_sum[h], offset)
        cuda.syncthreads()  # every warp is done with the ring: the states' sums take its place
        for h in range(2):  # the block's state: every warp's m and l are the same, its acc its own dims
            head = g + 8 * h
            if head < HEADS:
                if warp == 0 and t == 0:
                    smem[STATE_M + head] = m[h]
                    smem[STATE_L + head] = l_sum[h]
                for v in range(8):
                    for c in range(2):
                        smem[STATE_ACC + head * R + 64 * warp + 8 * (2 * t + c) + v] = acc[4 * v + 2 * h + c]
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # every block's softmax state is complete

        # Owners merge: a unit is a head and a quad of this block's latent columns; its C lanes pull one
        # block's state each (m, l and 16 bytes of acc).
        for lane_of_block in range(tid, exchange_lanes(UNITS), THREADS):
            unit, peer = uint32(lane_of_block) // C, lane % C  # unsigned: see tid
            active = unit < UNITS
            head, col = unit // (COLS // QUAD), rank * COLS + QUAD * (unit % (COLS // QUAD))
            m_peer, l_peer = NEG, float32(0.0)
            a0, a1, a2, a3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            if active:
                m_peer = ptx.remote_load(smem, STATE_M + head, peer)
                l_peer = ptx.remote_load(smem, STATE_L + head, peer)
                a0, a1, a2, a3 = pull(smem, STATE_ACC + head * R + col, peer)
            m_max = peer_max(m_peer)
            w = math.exp2(m_peer - m_max)
            l_tot = peer_sum(w * l_peer)
            a0, a1, a2, a3 = peer_sum(w * a0), peer_sum(w * a1), peer_sum(w * a2), peer_sum(w * a3)
            if active and peer == 0:
                state = (seq * A + a) * HEADS + head
                state_acc[state * R + col] = a0
                state_acc[state * R + col + 1] = a1
                state_acc[state * R + col + 2] = a2
                state_acc[state * R + col + 3] = a3
                if col == 0:
                    state_m[state] = m_max
                    state_l[state] = l_tot
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # no block leaves while a peer reads its state
        stamp(stamps, tid, 3)  # work
        if ONE_LAUNCH:
            count_in(step_words, STATES_DONE, tid)

    return attention_block


def build_attention_kernel(spec: MLASpec):
    """Launch 2: phase 3 (see the module docstring). Arguments::

        q_lat, q_pe, kv_raw   float32, launch 1's outputs
        kv_norm               [R] int16 view       kv_a_layernorm
        latent                [batch * capacity * L] int16 view   the cache; row positions[b] written
        rope                  [capacity * 2 * D_R/2] float32
        positions             [batch] int32;  capacity int32
        state_m, state_l      [batch * A * HEADS] float32    outputs: each cluster's base-2 max and sum
        state_acc             [batch * A * HEADS * R] float32  output: its unnormalised sums of rows

    The grid is ``batch * A`` clusters of ``attention_cluster_size``: cluster ``a`` of sequence ``seq`` is
    cluster ``seq * A + a``;
    a block has ``R / 64`` warps (:attr:`MLASpec.attention_warps`).

    A tile of ``TILE`` = 16 rows on the tensor cores (``mma.m16n8k16``; lane ``(g, t)``, ``lane = 4g
    + t``, see :func:`clusterlab.ptx.mma_f16_m16n8k16`), the scores' dims shared out over the
    warps, every warp then the same softmax and its own 64 latent dims of the output:

    - **scores** ``S = Q K^T`` (16 x 16: the heads, padded to 16 with zero queries, as A's rows;
      the tile's rows as B's columns, two ``mma`` of 8): A is the scaled queries, rounded to 16
      bits in shared memory as the ``mma`` fragments themselves (one 16-byte load a fragment, no
      register moves); lane ``(g, t)`` brings row ``g`` of each half of the tile at its 16-byte
      chunk ``t + 4j`` of the 576 dims, each load serving two ``mma`` (dims ``8(t + 4j) + 0..3``,
      then ``+ 4..7``, as k). A step ``j`` is 32 dims, four ``mma``: warp ``w`` takes the steps
      ``w, w + warps, ..`` while all warps have one, and the steps left over as quarters (one
      ``mma``: a k half of an n half) dealt round the warps, so that no warp holds the barrier up
      (18 steps over 8 warps: two steps and a quarter each). The warps' partial sums meet in
      shared memory (``"scores"``); after a barrier each thread adds up one of the tile's 256
      scores over the warps (``"sums"``, in the warps' order), and after a second every warp
      loads the lane's eight: the scores of heads ``g``, ``g + 8`` for rows ``2t, 2t + 1`` and
      ``8 + 2t, 9 + 2t``.
    - **softmax**: each head's maximum over the tile (two shuffles across ``t``); only if a maximum
      grew anywhere in the warp are the state and the sums rescaled (``exp2(0)`` is 1: skipping
      changes no bit); ``p = exp2(s - m)`` (:func:`clusterlab.ptx.ex2_approx_ftz`); each lane sums
      its own ``p`` (the lanes' sums are added at the end). Every warp holds the same states.
    - **values** ``O += P V`` (16 heads x 8 dims an ``mma``, k the tile's rows): A is ``P`` as the
      scores left it (no shuffle); B is ``V``: lane ``(g, t)`` loads rows ``2t, 2t + 1, 8 + 2t, 9 +
      2t`` at the warp's chunk ``8w + g`` and pairs their halves (:func:`clusterlab.ptx.permute_bytes`):
      ``mma`` ``v`` takes dim ``64w + 8g + v`` as its column ``g``. The lane accumulates
      ``acc[4v + c]`` (``c`` < 2) for head ``g`` and ``acc[4v + 2 + c]`` for head ``g + 8``, dim
      ``64w + 8(2t + c) + v``.

    The copy engine fills the ring: every warp has it bring ``TILE / warps`` rows of a tile, one
    ``cp.async.bulk`` a row, and arrives once on the stage's mbarrier with the bytes it expects;
    the warps wait on it (CTA scope: only this block's copies complete it). Rows past the block's
    end repeat its last row and are masked out of the softmax. Rows sit
    :attr:`MLASpec.ring_row_words` apart, odd rows 16 bytes further, which keeps both ways of
    reading a tile free of bank conflicts. Two barriers a tile: after the first (the partial
    scores stored), every warp is done with the tile before, whose stage the warps then refill;
    after the second (the scores summed), the next tile's partial scores may overwrite the ones
    just summed, and the next sums are stored only once every warp has passed the next first
    barrier, so after it has loaded these. The loop keeps its stage, phase and shared addresses
    as running values: no division or remainder of the tile's index, whose signed 64-bit forms
    cost more than the fold's sums.
    """
    attention_block, C = make_attention(spec), spec.attention_cluster_size
    stamp, record_role = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, forceinline=True)
    def launch_2(q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l, state_acc, stamps,
                 roles):
        tid, cluster = uint32(cuda.threadIdx.x), uint32(cuda.blockIdx.x) // C
        stamp(stamps, tid, 0)
        record_role(roles, tid, cluster)
        stamp(stamps, tid, 1)  # ticket: none
        attention_block(cluster, q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l,
                        state_acc, None, stamps)
        stamp(stamps, tid, 4)  # count in + finish: none

    def mla_attention(q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l,
                      state_acc):
        launch_2(q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l, state_acc, None,
                 None)

    def mla_attention_timeline(q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l,
                               state_acc, stamps, roles):
        launch_2(q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity, state_m, state_l, state_acc, stamps,
                 roles)

    return mla_attention_timeline if spec.timeline else mla_attention


def make_output(spec: MLASpec, one_launch: bool = False):
    """Phases 4 and 5 as the device function ``output_block(cluster, <launch 3's arguments>, step_words)`` of
    one block of the output cluster of head ``cluster``: launch 3's body (:func:`build_output_kernel`), and with
    ``one_launch`` the output clusters' of one launch a step (:func:`build_step_kernel`), which have their first
    rows of ``W_UV[h]`` in flight before they wait until every attention block has counted itself in on
    ``step_words[STATES_DONE]``; without it ``step_words`` is not read."""
    H, HEADS, R, D_N, D_V, C, A = (spec.hidden_size, spec.heads, spec.kv_lora_rank, spec.qk_nope_head_dim,
                                   spec.v_head_dim, spec.cluster_size, spec.attention_clusters)
    ONE_LAUNCH, ATTENTION_BLOCKS = one_launch, A * spec.batch * spec.attention_cluster_size
    MERGE_GROUP = min(A, MERGE_GROUP_STATES)
    BATCH, WARPS, THREADS, BF16, COLS, OUT_ROWS = (spec.batch, spec.warps, spec.threads, spec.bf16, spec.cols,
                                                   spec.out_rows)
    layout = spec.output_layout()
    O_LAT, PARTIAL_O, O = layout["o_lat"], layout["partial_o"], layout["o"]
    value_tile, o_tile = spec.value_tile(), spec.o_tile()
    VALUE_STEP_ROWS, O_STEP_ROWS = value_tile.step_rows, o_tile.step_rows
    VALUE_STEPS, O_STEPS = D_V // VALUE_STEP_ROWS, OUT_ROWS // O_STEP_ROWS
    value_load, value_finish, VALUE_WORDS = make_gemv(BATCH, BF16, value_tile, x_stride=COLS, out_stride=D_V,
                                                      atomic=False, select_past_batch=False)
    o_load, o_finish, O_WORDS = make_gemv(BATCH, BF16, o_tile, x_stride=D_V, out_stride=H, atomic=True,
                                          select_past_batch=False)
    finish_arrive, finish_convert = make_finish(BATCH, H, OUT_ROWS, THREADS, BF16)
    owned_quads = cuda.jit(device=True, inline=True)(plan.owned_quads)
    exchange_lanes, pull, push, peer_sum, _ = make_exchange(C)
    stamp, _ = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, forceinline=True)
    def output_block(cluster, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals, step_words, stamps):
        smem = cuda.shared.array(0, float32)
        last = cuda.shared.array(1, int32)
        # Signed, unlike the other kernels' (see the attention kernel's decode_step): unsigned, ptxas
        # spills 48 bytes at batch 1 under the 128-register bound.
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        k0 = rank * COLS  # this block's latent columns
        value_row0 = cluster * (D_N + D_V) + D_N  # W_UV[h]^T's first row in kv_b_proj

        # -- 4 output: merge head h's A states on this block's columns, o_lat @ W_UV[h] (partial), o_proj ------
        words = cuda.local.array(VALUE_WORDS, uint32)
        step = warp
        if step < VALUE_STEPS:
            value_load(kv_b, (value_row0 + step * VALUE_STEP_ROWS) * R + k0, R, lane, words)
        if ONE_LAUNCH:
            wait_for(step_words, STATES_DONE, ATTENTION_BLOCKS, tid)  # every attention cluster's states are out
        stamp(stamps, tid, 2)  # loads + wait
        # The states in groups of MERGE_GROUP: a group's loads all go out before any is used (registers
        # indexed by unrolled constants), so a group costs one round trip; the sums are rescaled from one
        # group's maximum to the next.
        m_g = cuda.local.array(MERGE_GROUP, float32)
        l_g = cuda.local.array(MERGE_GROUP, float32)
        acc_g = cuda.local.array(MERGE_GROUP, float32)
        for i in range(tid, BATCH * COLS, THREADS):
            seq, col = i // COLS, i % COLS
            m_run, l_tot, a_tot = NEG, float32(0.0), float32(0.0)
            for a0 in range(0, A, MERGE_GROUP):
                m_max = m_run
                for j in range(MERGE_GROUP):
                    m_g[j], l_g[j], acc_g[j] = NEG, float32(0.0), float32(0.0)
                    if a0 + j < A:
                        state = (seq * A + a0 + j) * HEADS + cluster
                        m_g[j], l_g[j], acc_g[j] = state_m[state], state_l[state], state_acc[state * R + k0 + col]
                    m_max = max(m_max, m_g[j])
                scale = math.exp2(m_run - m_max)
                l_tot, a_tot = l_tot * scale, a_tot * scale
                for j in range(MERGE_GROUP):
                    w = math.exp2(m_g[j] - m_max)
                    l_tot += w * l_g[j]
                    a_tot += w * acc_g[j]
                m_run = m_max
            smem[O_LAT + i] = a_tot / l_tot
        cuda.syncthreads()
        while step < VALUE_STEPS:
            value_finish(words, kv_b, (value_row0 + step * VALUE_STEP_ROWS) * R + k0, R, smem, O_LAT, smem,
                         PARTIAL_O + step * VALUE_STEP_ROWS, lane)
            step += WARPS
            if step < VALUE_STEPS:
                value_load(kv_b, (value_row0 + step * VALUE_STEP_ROWS) * R + k0, R, lane, words)
        # First o_proj loads (weights need no o): this block's output rows, head h's columns.
        o_words = cuda.local.array(O_WORDS, uint32)
        step = warp
        ptx.cluster_arrive_release()
        if step < O_STEPS:  # during the barrier: its release waits for the loads in flight before it
            o_load(o_proj, (rank * OUT_ROWS + step * O_STEP_ROWS) * (HEADS * D_V) + cluster * D_V, HEADS * D_V, lane,
                   o_words)
        ptx.cluster_wait_acquire()  # every block's partial o is complete

        # Owners sum the C partials of a quad of o and push it into every block.
        units = owned_quads(D_V, rank, C) * BATCH
        for lane_of_block in range(tid, exchange_lanes(units), THREADS):
            unit, peer = lane_of_block // C, lane % C
            active = unit < units
            e = QUAD * (rank + (unit // BATCH) * C)
            seq = unit % BATCH
            a0, a1, a2, a3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
            if active:
                a0, a1, a2, a3 = pull(smem, PARTIAL_O + seq * D_V + e, peer)
            a0, a1, a2, a3 = peer_sum(a0), peer_sum(a1), peer_sum(a2), peer_sum(a3)
            if active:
                push(smem, O + seq * D_V + e, peer, a0, a1, a2, a3)
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # o is complete in every block; no DSMEM access after this

        while step < O_STEPS:
            o_finish(o_words, o_proj, (rank * OUT_ROWS + step * O_STEP_ROWS) * (HEADS * D_V) + cluster * D_V,
                     HEADS * D_V, smem, O, out_acc, rank * OUT_ROWS + step * O_STEP_ROWS, lane)
            step += WARPS
            if step < O_STEPS:
                o_load(o_proj, (rank * OUT_ROWS + step * O_STEP_ROWS) * (HEADS * D_V) + cluster * D_V, HEADS * D_V,
                       lane, o_words)

        stamp(stamps, tid, 3)  # work
        # -- 5 finish: the last block (one a cluster) to add into this block's output rows converts them ------
        finish_arrive(arrivals, rank, HEADS, last, tid)
        if last[0] == 1:
            finish_convert(out, out_acc, arrivals, rank, BATCH, tid)

    return output_block


def build_output_kernel(spec: MLASpec):
    """Launch 3: phases 4 and 5 (see the module docstring). Arguments::

        state_m, state_l, state_acc   float32, launch 2's outputs
        kv_b                  [HEADS * (D_N + D_V) * R] int16 view   kv_b_proj: rows D_N .. of head h are W_UV[h]^T
        o_proj                [H * HEADS * D_V] int16 view
        out                   [batch * H]          output
        out_acc               [batch * H] float32  zero on entry, left zero on exit
        arrivals              [cluster_size] int32 zero on entry, left zero on exit
    """
    output_block, C = make_output(spec), spec.cluster_size
    stamp, record_role = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, forceinline=True)
    def launch_3(state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals, stamps, roles):
        tid, cluster = uint32(cuda.threadIdx.x), cuda.blockIdx.x // C
        stamp(stamps, tid, 0)
        record_role(roles, tid, cluster)
        stamp(stamps, tid, 1)  # ticket: none
        output_block(cluster, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals, None, stamps)
        stamp(stamps, tid, 4)  # count in + finish

    def mla_output(state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals):
        launch_3(state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals, None, None)

    def mla_output_timeline(state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals, stamps, roles):
        launch_3(state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals, stamps, roles)

    return mla_output_timeline if spec.timeline else mla_output


def build_step_kernel(spec: MLASpec):
    """The three launches as one: a cluster's role is the ticket it takes as it starts. Arguments: launch 1's
    (:func:`build_projections_kernel`), then ``kv_norm``, ``latent``, ``state_m``, ``state_l``, ``state_acc``
    (launch 2's others), ``kv_b``, ``o_proj``, ``out``, ``out_acc``, ``arrivals`` (launch 3's others) and
    ``step_words`` ``[STEP_WORDS]`` int32, zero on entry, left zero on exit. The grid is
    :attr:`MLASpec.step_clusters` clusters; the block shape one for all roles (:func:`check_one_launch`),
    with the largest role's shared memory::

        start     rank 0: ticket = atom.add(step_words[TICKET], 1); every block reads it after a cluster barrier
        ticket <  HEADS            projections_block(ticket): launch 1; then counted in on QUERIES_DONE
        ticket <  HEADS + A*B      attention_block(ticket - HEADS): its first tiles of cached rows in flight,
                                   then a wait for QUERIES_DONE; launch 2; counted in on STATES_DONE
        otherwise                  output_block(ticket - HEADS - A*B): its first W_UV rows in flight, then a
                                   wait for STATES_DONE; launch 3 (with its finish)
        leave     every block counts itself in on LEFT; the last one sets the four words back to zero

    No co-residency is asked and nothing can wait forever: a ticket is taken by a running cluster, so a
    cluster waits only for clusters of lower tickets, which started before it and wait only for lower ones
    still (``docs/mla-decode-design.md``, "One kernel without a cooperative launch"). The role's order, not
    ``blockIdx``, is what makes this hold: the hardware does not promise to start clusters in index order.
    """
    check_one_launch(spec.kv_lora_rank, spec.warps, spec.cluster_size, spec.attention_cluster_size)
    projections_block = make_projections(spec)
    attention_block = make_attention(spec, one_launch=True)
    output_block = make_output(spec, one_launch=True)
    HEADS, ATTENTION = spec.heads, spec.attention_clusters * spec.batch
    GRID_BLOCKS = spec.step_clusters * spec.cluster_size
    stamp, record_role = make_mla_stamp(spec.timeline)

    @cuda.jit(device=True, forceinline=True)
    def one_step(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, kv_norm, latent, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals,
                 step_words, stamps, roles):
        role = cuda.shared.array(1, int32)
        tid = uint32(cuda.threadIdx.x)
        stamp(stamps, tid, 0)
        if tid == 0 and ptx.cluster_rank() == 0:
            role[0] = cuda.atomic.add(step_words, TICKET, 1)
        ptx.cluster_sync()  # rank 0's ticket is in its shared memory
        ticket = ptx.remote_load(role, 0, 0)
        record_role(roles, tid, ticket)
        stamp(stamps, tid, 1)  # ticket
        if ticket < HEADS:
            projections_block(uint32(ticket), hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity,
                              residual_out, q_lat, q_pe, kv_raw, stamps)
            count_in(step_words, QUERIES_DONE, tid)
        elif ticket < HEADS + ATTENTION:
            attention_block(uint32(ticket - HEADS), q_lat, q_pe, kv_raw, kv_norm, latent, rope, positions, capacity,
                            state_m, state_l, state_acc, step_words, stamps)
        else:
            output_block(ticket - HEADS - ATTENTION, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals,
                         step_words, stamps)
        # -- leave: the last block of the grid sets the step's words back to zero for the next step
        cuda.syncthreads()  # every thread is done with the words
        if tid == 0 and cuda.atomic.add(step_words, LEFT, 1) == GRID_BLOCKS - 1:
            for word in range(STEP_WORDS):
                step_words[word] = 0
        stamp(stamps, tid, 4)  # count in + finish

    def mla_step(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, kv_norm, latent, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals,
                 step_words):
        one_step(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, kv_norm, latent, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals,
                 step_words, None, None)

    def mla_step_timeline(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out,
                          q_lat, q_pe, kv_raw, kv_norm, latent, state_m, state_l, state_acc, kv_b, o_proj, out,
                          out_acc, arrivals, step_words, stamps, roles):
        one_step(hidden, residual, norm, q_proj, kv_a, w_uk_t, rope, positions, capacity, residual_out, q_lat, q_pe,
                 kv_raw, kv_norm, latent, state_m, state_l, state_acc, kv_b, o_proj, out, out_acc, arrivals,
                 step_words, stamps, roles)

    return mla_step_timeline if spec.timeline else mla_step


def mla_kernel_signatures(timeline: bool = False) -> dict:
    """Numba argument types of the kernels: ``projections``, ``attention``, ``output`` (the three launches)
    and ``step`` (the three as one, :func:`build_step_kernel`); with ``timeline`` (``MLASpec.timeline``)
    each takes ``stamps`` and ``roles`` last."""
    from numba import types

    h, f, i = types.int16[::1], types.float32[::1], types.int32[::1]
    projections = (h, h, h, h, h, h, f, i, types.int32, h, f, f, f)
    attention = (f, f, f, h, h, f, i, types.int32, f, f, f)
    output = (f, f, f, h, h, h, f, i)
    step = projections + (h, h, f, f, f, h, h, h, f, i, i)
    stamps = (types.uint64[::1], types.uint32[::1]) if timeline else ()
    return {name: signature + stamps for name, signature in
            (("projections", projections), ("attention", attention), ("output", output), ("step", step))}
