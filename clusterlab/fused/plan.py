"""How one decode step is split over clusters and blocks, shared by the kernel and its simulator model.

One cluster per KV head ``g`` — or, with ``head_split = S > 1``, ``S`` clusters per KV head, each
taking ``G/S`` of its ``G`` query heads; its ``C`` blocks split every dimension that has to be
streamed from device memory, and exchange partial results through distributed shared memory
(DSMEM)::

    grid: kv_heads * S clusters x C blocks   (Llama-2-7B: 32 x 8; Llama-3-8B: 16 x 16, S = 2; see launch_shape)

    cluster c owns  W_qkv rows of query heads c*Gc .. c*Gc+Gc-1 (Gc = G/S, G = heads / kv_heads),
                    key head g = c // S and value head g ("slots" 0..Gc-1, Gc, Gc+1), the KV
                    cache of head g, and the W_o columns of its query heads

With S > 1 the S clusters of a KV head each compute its new key and value (the same numbers, from
the same rows) and each read its cache; the first of them appends the row. The second reads
come mostly from L2, and the split doubles or quadruples the clusters a GQA model has to spread
over the SMs (Llama-3-8B: 8 KV heads).

Or the S clusters split the KV head's cached positions instead (``split_positions``, the parts
``s = c % S``): each owns all G query heads, its blocks attend over positions of blocks ``s*C +
rank`` of ``S*C`` (:func:`attention_range`), and phase 4 leaves each part's softmax state in device
memory; whichever part arrives last (at each rank, counted on a counter) merges the S states and
runs phase 5 with the W_o columns of all G heads. Nothing is read twice but W_q's rows
(``docs/gqa-position-split-design.md``). S need not divide G then: any of 1 to :data:`MAX_PARTS`.
With ``shared_queries`` the parts (then a divisor of G) share out the query projection: part ``s``
projects the query heads ``s*G/S ..``, hands them to the others through device memory after B2 and
takes theirs, and after phase 4 every part waits for all the states and merges and projects its
own heads (:func:`shares_queries`: the rule's choice at long caches of a model with few KV heads, and at batch 2
from 4K rows).

And the batch may be split too (``batch_parts = P``): the grid is P sets of those clusters, set
``p`` the step of sequences ``p*b .. (p+1)*b - 1`` alone, ``b = ceil(B/P)`` (:func:`set_batch`; the
last set takes what is left), with their inputs, cache rows, outputs and counters, as if P launches
ran at once. Every set streams the same weights (the repeats mostly
from L2) and its own sequences' cache rows: twice the blocks where one set leaves SMs idle, or
clusters half the size where the large ones do not all fit at once.

                  hidden slice          cached positions          W_o rows (outputs)
    block 0    x[0    : H/C ]        t in [0,      n/C)          out[0    : H/C ]
    block 1    x[H/C  : 2H/C]        t in [n/C,   2n/C)          out[H/C  : 2H/C]
      ...
    block C-1  x[.. : H]             t in [.., n) + new token      out[.. : H]

    phase        every block                                       DSMEM                     cluster barrier
    -----------  ------------------------------------------------  ------------------------  ---------------
    1 qkv        h = x + r on its slice, sum(h^2) partial,         -
                 partial[row] = W_qkv[row, slice] . (h*norm)[slice]
                                                                                             B1
    2 rope       for its quads of pairs 4q .. 4q+3, q = rank,      pull partial[row] of all
                 rank+C, ...: sum over blocks,                     C blocks; push q, k, v
                 * rsqrt(mean h^2 + eps), RoPE;                    to all C blocks
                 k, v of the new token -> KV cache
                                                                                             B2
    3 attention  online softmax of q . K[t] over its positions     -
                 -> state (m, l, acc[head_dim]) per (batch, head)
                                                                                             B3
    4 merge      for its quads of elements 4q .. 4q+3, q = rank,   pull states of all C;
                 rank+C, ...:
                 o[e] = sum_c acc_c e^(m_c-M) / sum_c l_c e^(m_c-M) push o to all C blocks
                                                                                             B4
    5 o proj     out_acc[rows] += W_o[rows, cols of c] . o         -  (global red.add.f32)
    6 finish     the last block of each rank to arrive: out[rows] = out_acc[rows] in the
                 activation dtype, out_acc[rows] = 0 for the next step

The exchanges own their items in quads (:data:`QUAD` consecutive float32, see :func:`owned_quads`)
so that a pull or a push is one 16-byte DSMEM access: a quad of RoPE pairs rotates two quads of rows
(NeoX: rows i .. i+3 and i + head_dim/2 .., GPT-J: rows 2i .. 2i+7).

Only inputs, weights, the KV cache (read, and one row appended), ``out_acc`` and the outputs
touch device memory. Phase 1 splits the hidden (reduction) dimension, so its partial sums must be
reduced across the cluster; phase 5 splits output rows, so it needs every block to hold all of
``o``; the cross-head sum of phase 5 goes through float32 atomics because heads live in
different clusters, which share no memory.

The functions below are plain integer arithmetic; the kernel compiles the same functions as
device functions, so the simulator program and the kernel cannot disagree on who owns what.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from typing import TYPE_CHECKING

from .config import MAX_BATCH, AttentionConfig, check_batch, is_int

if TYPE_CHECKING:
    from .mla import MLAConfig


#: Cluster sizes the kernel is built for (16 needs the non-portable cluster-size opt-in).
CLUSTER_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class DeviceLimits:
    """What a launch shape depends on: the SM count, shared memory, registers and L2 of one GPU, and
    ``cluster_sms``: for each of :data:`CLUSTER_SIZES`, the SMs its clusters fill at once at one block
    an SM (GPCs hold whole clusters: :func:`clusterlab.launch.cluster_sms`)."""

    sm_count: int
    shared_bytes_per_sm: int
    shared_bytes_per_block: int
    reserved_shared_bytes_per_block: int
    registers_per_sm: int
    l2_bytes: int
    cluster_sms: tuple[int, ...]

    def __post_init__(self):
        for name, value in vars(self).items():
            least = 0 if name == "reserved_shared_bytes_per_block" else 1
            if name != "cluster_sms" and not (is_int(value) and value >= least):
                raise ValueError(f"DeviceLimits.{name} must be an int >= {least}, got {value!r}")
        sms = self.cluster_sms
        if not (isinstance(sms, tuple) and len(sms) == len(CLUSTER_SIZES)
                and all(is_int(n) and 1 <= n <= self.sm_count for n in sms)):
            raise ValueError(f"DeviceLimits.cluster_sms must be a tuple of {len(CLUSTER_SIZES)} ints in "
                             f"1..sm_count ({self.sm_count}), one for each cluster size of {CLUSTER_SIZES}, "
                             f"got {sms!r}")

    @classmethod
    def of(cls, device) -> DeviceLimits:
        """Read from CUDA device ``device`` (a ``torch.device`` or an index), once a device in a process
        (every layer built on it asks)."""
        return _read_limits(device if isinstance(device, int) else (device.index or 0))

    def sms_for(self, cluster_size: int) -> int:
        """SMs clusters of ``cluster_size`` (one of :data:`CLUSTER_SIZES`) fill at once at one block an SM."""
        check_one_of("cluster_size", cluster_size, CLUSTER_SIZES)
        return self.cluster_sms[CLUSTER_SIZES.index(cluster_size)]

    def blocks_per_sm(self, shared_bytes: int, threads: int, registers_per_thread: int = 128) -> int:
        """Blocks of ``threads`` threads using ``shared_bytes`` that fit one SM at ``registers_per_thread``."""
        by_smem = self.shared_bytes_per_sm // (shared_bytes + self.reserved_shared_bytes_per_block)
        return max(1, min(by_smem, self.registers_per_sm // (threads * registers_per_thread)))


@functools.cache
def _read_limits(index: int) -> DeviceLimits:
    """:meth:`DeviceLimits.of` device ``index``: the driver's limits and the occupancy query's SMs a cluster size."""
    from numba import cuda

    from ..gpu import device_limits
    from ..launch import cluster_sms

    limits = {name: int(value) for name, value in device_limits(index).items()}
    with cuda.gpus[index]:
        return DeviceLimits(**limits, cluster_sms=tuple(cluster_sms(size) for size in CLUSTER_SIZES))


#: An H100 SXM or H200 (the same SM): 132 SMs, 228 KiB of shared memory an SM (227 KiB for one
#: block, 1 KiB reserved per block), 64K registers an SM, an H100's 50 MiB of L2 (an H200 has 60 MiB),
#: clusters of 1 and 2 on all 132 SMs, of 4 and 8 on 120, of 16 on 112
#: (``benchmarks/results/placement_h200.json``). The simulator backend plans for it.
HOPPER = DeviceLimits(sm_count=132, shared_bytes_per_sm=233472, shared_bytes_per_block=232448,
                      reserved_shared_bytes_per_block=1024, registers_per_sm=65536, l2_bytes=50 * 2**20,
                      cluster_sms=(132, 132, 120, 120, 112))

#: Warps a block of the fused kernels may have.
WARP_COUNTS = (4, 8, 16)
#: Most clusters a KV head's cached positions may be split over (``split_positions``): beyond, each
#: holds a few rows of a long cache, and the layer keeps the parts' softmax states for as many.
MAX_PARTS = 16
#: Most sets of clusters a step's batch may be split over (``batch_parts``): one a sequence.
MAX_BATCH_PARTS = MAX_BATCH
#: Cached positions a chunk of the work queue has by default (``KernelSpec.work_queue``), and what
#: its ``queue_rows`` may be: multiples of ``QUEUE_ROWS_STEP``, which every attention step's keys divide
QUEUE_ROWS = 128
QUEUE_ROWS_STEP = 64
MAX_QUEUE_ROWS = 4096
#: States in device memory a (sequence, KV head) of the work queue takes at most from other clusters' warps
QUEUE_SLOTS = 32


def queue_words(pairs: int) -> int:
    """Words (int32) of the work queue of ``pairs`` (sequence, KV head) pairs: each pair's ticket,
    done and flag words, then ``left`` (``KernelSpec.queue_words``)."""
    return 3 * pairs + 1


def queue_state_words(pairs: int, group: int, head_dim: int) -> int:
    """Words (float32) of the work queue's states of ``pairs`` pairs of ``group`` query heads: the
    published queries ``[pairs, group * head_dim]``, then ``QUEUE_SLOTS`` softmax states a pair
    (``m [group]``, ``l [group]``, ``acc [group * head_dim]``; ``KernelSpec.queue_state_words``)."""
    width = group * head_dim
    return pairs * (width + QUEUE_SLOTS * (2 * group + width))


#: From ``LONG_CACHE[batch - 1]`` rows attended (the longest sequence's cache and its new token), a
#: GQA step of ``batch`` sequences reads each KV head's rows with one cluster of 8-warp blocks
#: instead of splitting its query heads over several (:func:`launch_shape`): where the cache, not the
#: weights, is most of a step's bytes, reading it once pays more than spreading the weights over
#: twice the blocks. A batch's cache grows with its sequences, the weights do not, so from a batch
#: of 3 that happens at half the length (measured on the H200: ``docs/fused-decode-notes.md``, v18).
LONG_CACHE = (8192, 8192) + (4096,) * (MAX_BATCH - 2)
#: From a batch of this many sequences (an even count) a step that takes the long-cache shape of its
#: own choosing splits the batch over two sets of clusters (``batch_parts``, :func:`batch_sets`).
BATCH_SETS_FROM = 4
#: From this many rows attended, such a step splits the batch over sets of two sequences instead (a batch
#: of 2 over two sets of one), each set's grid of 4-warp blocks, two an SM (:func:`paired_sets`; measured
#: on the H200 at 4K, 8K and 16K: ``docs/fused-decode-notes.md``, v23 to v25).
PAIRS_FROM = 16384
#: The fewest clusters a KV head's query heads are split over from which the rule shares out its key
#: and value heads among them (:attr:`clusterlab.fused.kernel.KernelSpec.kv_rows_split`), each K and V
#: row of W_qkv being read that many times otherwise. Qwen2.5-7B's split of 7 (4 KV heads), each
#: cluster projecting both -> shared out, µs at 1K / 2K on an H100 (``docs/fused-decode-notes.md``,
#: v78): batch 1 35.8 / 38.6 -> 34.0 / 35.8, batch 4 50.0 / 58.3 -> 42.8 / 50.7, batch 8 68.5 / 86.2
#: -> 60.9 / 77.6; on an H200 (v34) 3-9% faster at batches 1 and 2, 1K and 4K. Splits of 2
#: (Llama-3-8B, and Llama-3.2-1B up to batch 4) gain too little or lose: -1 to +3% at Llama-3-8B,
#: 5-8% slower at Llama-3.2-1B, whose 12.6 MB W_qkv stream takes 3 µs, less than the flags' round
#: trips and the rows read back cost.
KV_ROWS_SPLIT_FROM = 3
#: From this many sequences (so at every batch), steps from :data:`SHARED_QUERIES_ROWS` of a GQA model with few KV
#: heads run the positions split with the query projection shared out (:func:`shares_queries`), its next keys in flight
#: (:attr:`~clusterlab.fused.kernel.KernelSpec.pipelined_kv`). Qwen2.5-7B's long-cache shape -> 4 x 8 warps
#: x 7 parts shared, µs at 4K / 16K / 32K on an H200 (``docs/fused-decode-notes.md``, v82): batch 2 at 16K /
#: 32K 64.3 / 83.9 -> 54.2 / 69.4; 3 51.8 / 78.8 / 108.0 -> 45.9 / 65.6 / 91.2; 5 67.9 / 103.0 / 147.8 -> 60.3 /
#: 95.4 / 143.3; 7 80.2 / 129.4 / 188.1 -> 68.4 / 111.6 / 168.8. The pipeline alone, batch 4: 51.9 / 79.2 /
#: 115.0 -> 50.4 / 74.5 / 106.3. On an H100 (v81) the split without it (two blocks an SM) lost to the
#: long-cache shape at batches 5-7. Batch 1 at 8K / 16K / 32K: 41.2 / 47.8 / 60.4 -> 37.7 / 42.8 / 49.8 on an
#: H200 (v84), 43.8 / 50.8 / 64.5 -> 43.3 / 49.4 / 59.3 on an H100 (v83). Set past ``MAX_BATCH``, no batch shares.
SHARED_QUERIES_FROM = 1
#: From ``SHARED_QUERIES_ROWS[batch - 1]`` rows attended such a step shares out the query projection: the long-cache
#: rows (:data:`LONG_CACHE`) but at batch 2, where the split already wins from 4K against the short-cache shape (8
#: clusters of 8 x 4 warps a KV head, each reading the head's rows): Qwen2.5-7B on an H100 (v85), µs at 3K / 3.5K /
#: 4K / 6K, 44.6 / 46.0 / 47.7 / 56.1 -> 45.1 / 47.1 / 45.8 / 48.5. Batch 1 stays at 8K: level from 5K to 7K there
#: (40.8 / 43.2 / 44.8 -> 41.2 / 42.9 / 44.6), 4K 39.3 -> 41.1.
SHARED_QUERIES_ROWS = (LONG_CACHE[0], 4096) + LONG_CACHE[2:]
#: Blocks and warps a cluster of that split (``(cluster_size, warps)``).
SHARED_QUERIES_SHAPE = (4, 8)
#: The most sequences a step runs in blocks of 4 warps: attention gives each sequence at least one warp,
#: so a batch of more takes blocks of 8 (or 16) warps (:func:`launch_shape`).
FOUR_WARPS_UP_TO = 4
#: Below this many rows attended, a step of more than :data:`FOUR_WARPS_UP_TO` sequences whose grid is clusters of
#: 16 blocks of 8 warps runs the same blocks as clusters of 8 with twice the head split (:func:`launch_shape`):
#: clusters of 8 reach more SMs, and the KV rows each head's second cluster reads again are few. On an H100
#: (``docs/fused-decode-notes.md``, v89), float16, µs 16 x 8 x 1 -> 8 x 8 x 2 at 1K / 2K: Llama-3.2-1B batch 5
#: 28.2 / 31.9 -> 25.5 / 31.2, 8 35.2 / 40.5 -> 31.7 / 39.6; Llama-3-8B batch 5 57.2 / 64.5 -> 57.0 / 67.4, 6
#: 62.5 / 71.2 -> 61.0 / 73.5, 8 73.8 / 83.6 -> 69.8 / 85.9 (v86 alike).
HALF_CLUSTERS_BELOW = 2048
#: A block's cached-position range starts on a multiple of this many positions.
POSITION_ALIGN = 16
#: The exchanges (phases 2 and 4) hand out their items in quads of this many consecutive float32,
#: one 16-byte DSMEM access each.
QUAD = 4


def qkv_row(heads: int, kv_heads: int, head_dim: int, head_split: int, cluster: int, row: int) -> int:
    """Row of ``W_qkv`` holding ``cluster``'s local ``row`` (slot-major: ``row = slot*head_dim + i``)."""
    group = heads // kv_heads // head_split
    kv_head = cluster // head_split
    slot, i = row // head_dim, row % head_dim
    if slot < group:
        return (cluster * group + slot) * head_dim + i
    if slot == group:
        return (heads + kv_head) * head_dim + i
    return (heads + kv_heads + kv_head) * head_dim + i


def rope_pair(head_dim: int, neox: bool, pair: int):
    """Local rows ``(a, b)`` rotated together by RoPE pair ``pair``, and its angle index.

    Pairs run over all slots: ``slot = pair // (head_dim/2)``. NeoX rotates ``(i, i + head_dim/2)``,
    GPT-J ``(2i, 2i + 1)``; either way the angle index is ``i``.
    """
    half = head_dim // 2
    slot, i = pair // half, pair % half
    if neox:
        return slot * head_dim + i, slot * head_dim + i + half, i
    return slot * head_dim + 2 * i, slot * head_dim + 2 * i + 1, i


def owned_quads(items: int, rank: int, cluster_size: int) -> int:
    """How many quads of an exchange's ``items`` values (a multiple of :data:`QUAD`: head dims are
    multiples of 8) block ``rank`` owns: quads ``rank, rank + C, ..`` of ``items // QUAD`` (quad
    ``q`` is items ``QUAD*q .. QUAD*q + QUAD - 1``)."""
    return (items // QUAD - rank + cluster_size - 1) // cluster_size


def cached_range(cached: int, rank: int, cluster_size: int):
    """Positions ``[start, end)`` of the ``cached`` old KV rows that block ``rank`` attends over.

    Blocks take equal chunks rounded up to :data:`POSITION_ALIGN`, so the last blocks may get
    fewer (or none); the last block also takes the new token (see :func:`new_token_rank`).
    """
    chunk = (cached + cluster_size - 1) // cluster_size
    chunk = (chunk + POSITION_ALIGN - 1) // POSITION_ALIGN * POSITION_ALIGN
    start = min(rank * chunk, cached)
    return start, min(start + chunk, cached)


def new_token_rank(cluster_size: int) -> int:
    """The block that folds the new token's key and value into its softmax state."""
    return cluster_size - 1


def check_one_of(name: str, value, allowed, note: str = "") -> None:
    """``value`` is an int among ``allowed`` (not a bool or a float that equals one): ValueError naming
    ``name``, the values allowed (and ``note`` on why) and ``value`` otherwise."""
    if not (is_int(value) and value in allowed):
        raise ValueError(f"{name} must be one of {allowed}{note}, got {value!r}")


def check_cluster_size(config: AttentionConfig, cluster_size: int) -> None:
    """``cluster_size`` is one of :data:`CLUSTER_SIZES` and splits the hidden size into 16-byte rows."""
    check_one_of("cluster_size", cluster_size, CLUSTER_SIZES)
    if config.hidden_size % (8 * cluster_size):
        raise ValueError(
            f"cluster_size {cluster_size} does not split hidden_size {config.hidden_size} into slices "
            f"of whole 16-byte chunks (hidden_size must be a multiple of {8 * cluster_size})"
        )


def check_head_split(config: AttentionConfig, head_split: int, split_positions: bool = False) -> None:
    """``head_split`` divides the query heads of a KV head (1: one cluster per KV head); with
    ``split_positions``, where its clusters split the positions instead, it is any of 1 to
    :data:`MAX_PARTS`."""
    if split_positions:
        if not (is_int(head_split) and 1 <= head_split <= MAX_PARTS):
            raise ValueError(f"head_split with split_positions (the clusters a KV head's cached positions are split "
                             f"over) must be an int from 1 to {MAX_PARTS}, got {head_split!r}")
        return
    if not (is_int(head_split) and head_split >= 1 and config.group_size % head_split == 0):
        raise ValueError(
            f"head_split must divide the {config.group_size} query heads of a KV head "
            f"(one of {[s for s in range(1, config.group_size + 1) if config.group_size % s == 0]}), "
            f"got {head_split!r}"
        )


#: The :class:`~clusterlab.fused.kernel.KernelSpec` switches that choose how a step runs, with correct
#: outputs either way (the others switch parts of a step off, for ``clusterlab.bench.fused_ablation``):
#: what ``DecodeAttention(kernel_options=...)`` and ``clusterlab bench fused --spec`` take, and their values.
KERNEL_CHOICES = {
    "attention_mma": "None, True or False: attention over the cache on the tensor cores (None: the rule's)",
    "kv_pipeline": "None, True or False: tensor-core attention keeps the next step's keys in flight (None: the rule's)",
    "registers": "None or an int from 32 to 255: registers a thread the launch bound is planned at (None: the rule's)",
    "overlay": "True or False: shared regions that are never live at once share words (True: the default)",
    "interleave_inputs": "True or False: the CUDA-core W_qkv steps read h * norm interleaved in shared memory, "
                         "32 consecutive words a load (False: the default)",
    "split_positions": "True or False: the head split's clusters (then any number from 1 to 16) split a KV head's "
                       "cached positions, each with all its query heads (False: its query heads; the default)",
    "shared_queries": "True or False: with split_positions, the parts (then a divisor of the query heads a KV head) "
                      "share out the query projection and hand each other their queries through device memory "
                      "(False: each projects all of them; the default)",
    "split_kv_rows": "None, True or False: where clusters split a KV head's query heads, the first projects its "
                     "key, the second its value, the others neither, each reading what it lacks from the cache "
                     f"(None: the rule's, from a split of {KV_ROWS_SPLIT_FROM} where the grid fits the GPU at once)",
    "batch_parts": f"None or an int from 1 to {MAX_BATCH}: sets of clusters the batch's sequences are split over, "
                   "each set a whole step's clusters for ceil(batch / batch_parts) of the sequences, the last "
                   "for the rest, which must be one or more (None: the rule's)",
    "work_queue": "True or False: with a cluster a KV head, its cached positions are taken in chunks from a counter "
                  "in device memory by whichever warp is free, its own cluster's first (False: the default)",
    "queue_rows": f"an int, a multiple of {QUEUE_ROWS_STEP} from {QUEUE_ROWS_STEP} to {MAX_QUEUE_ROWS}: cached "
                  f"positions a chunk of the work queue (default {QUEUE_ROWS})",
}

#: The same for :class:`~clusterlab.fused.mlp_kernel.MLPSpec`: what ``DecodeMLP(kernel_options=...)``
#: and ``clusterlab bench mlp --spec`` take.
MLP_KERNEL_CHOICES = {
    "interleave_inputs": "True or False: the CUDA-core gate/up steps read h * norm interleaved in shared memory, "
                         "32 consecutive words a load (True: the default)",
    "work_queue": "True or False: at batch 1, a block on every SM and no clusters, each taking gate/up rows and "
                  "then W_down tiles from a counter in global memory (False: the default)",
}

#: The :class:`~clusterlab.fused.mla_layer.DecodeMLA` switches (its ``kernel_options``), as :data:`KERNEL_CHOICES`.
MLA_KERNEL_CHOICES = {
    "one_launch": "True or False: the three launches of a step as one, each cluster taking its role from a ticket "
                  "as it starts (False: the default)",
    "attention_cluster_size": f"None or one of {CLUSTER_SIZES}: blocks a cluster of launch 2, the attention (None: "
                              "the rule's by batch, 8 or 4 under launches of 8; with one_launch, cluster_size, "
                              "the only one it takes)",
}

#: Choices that are True or False only (the others also take None, the rule's choice, or an int).
SWITCHES = ("overlay", "interleave_inputs", "split_positions", "shared_queries", "work_queue", "one_launch")


def check_kernel_options(options, choices: dict = KERNEL_CHOICES) -> dict:
    """``options`` (a mapping of ``choices`` names to values, or None) as a new dict; raises
    ``ValueError`` naming the first unknown name or value out of range."""
    if options is None:
        return {}
    if not hasattr(options, "items"):
        raise TypeError(f"kernel_options must be a mapping or None, got {type(options).__name__}")
    for name, value in options.items():
        if name not in choices:
            raise ValueError(f"kernel_options: unknown name {name!r}; allowed: {', '.join(choices)}")
        if name == "registers":
            ok = value is None or (is_int(value) and 32 <= value <= 255)
        elif name == "batch_parts":
            ok = value is None or (is_int(value) and 1 <= value <= MAX_BATCH_PARTS)
        elif name == "attention_cluster_size":
            ok = value is None or (is_int(value) and value in CLUSTER_SIZES)
        elif name == "queue_rows":
            ok = is_int(value) and value % QUEUE_ROWS_STEP == 0 and QUEUE_ROWS_STEP <= value <= MAX_QUEUE_ROWS
        elif name in SWITCHES:
            ok = isinstance(value, bool)
        else:
            ok = value is None or isinstance(value, bool)
        if not ok:
            raise ValueError(f"kernel_options: {name}={value!r}; allowed: {choices[name]}")
    return dict(options)


def reaches_long_cache(batch: int, longest: int | None) -> bool:
    """Whether a step of ``batch`` sequences, the longest attending to ``longest`` rows (None: not
    told), attends to ``LONG_CACHE[batch - 1]`` rows or more."""
    return longest is not None and longest >= LONG_CACHE[batch - 1]


def long_cache(config: AttentionConfig, batch: int, longest: int | None, head_split: int | None = None) -> bool:
    """Whether a step of ``batch`` sequences, the longest attending to ``longest`` rows (None: not
    told), reads each KV head's rows with one cluster (:func:`launch_shape`): a GQA model from
    ``LONG_CACHE[batch - 1]`` rows, unless a head split is given."""
    return reaches_long_cache(batch, longest) and config.group_size > 1 and head_split is None


def set_batch(batch: int, sets: int) -> int:
    """Sequences each of ``sets`` sets of clusters steps of a batch of ``batch`` (``batch_parts``):
    an equal share rounded up; the last set steps the ``batch - (sets - 1) * set_batch`` left."""
    return -(-batch // sets)


def shares_queries(config: AttentionConfig, batch: int, longest: int | None, limits: DeviceLimits = HOPPER) -> bool:
    """Whether the rule runs a step of ``batch`` sequences, the longest attending to ``longest`` rows, as a
    positions split whose parts share out the query projection (``split_positions`` and ``shared_queries`` in
    :data:`SHARED_QUERIES_SHAPE` clusters, a part a query head of each KV head: :func:`shared_queries_shape`)
    instead of :func:`launch_shape`'s: from ``SHARED_QUERIES_ROWS[batch - 1]`` rows (:data:`SHARED_QUERIES_ROWS`:
    the long-cache rows, 4K at batch 2) from a batch of :data:`SHARED_QUERIES_FROM`, where one cluster of 16 a KV
    head fills at most half of the GPU's SMs (Qwen2.5-7B's 4 KV heads: 64 blocks on 132), the query heads of a KV
    head are 2 to 8 (attention on the tensor cores takes them all), and the split's clusters all fit at once at one
    block an SM on the SMs such clusters fill (Qwen2.5-7B: 28 clusters of 4, 112 blocks on 120 SMs), since its
    clusters wait for each other. Where the KV heads already fill the GPU (Llama-3-8B, Llama-3.2-1B: 128 blocks) the
    split was level or slower (``docs/fused-decode-notes.md``, v79). For the launch rule's own shape only: a layer
    given a launch shape, ``batch_parts`` or the options asks for none of this."""
    size, _ = SHARED_QUERIES_SHAPE
    group = config.group_size
    return (longest is not None and longest >= SHARED_QUERIES_ROWS[batch - 1] and batch >= SHARED_QUERIES_FROM
            and 2 <= group <= 8
            and config.kv_heads * max(CLUSTER_SIZES) <= limits.sm_count // 2
            and config.kv_heads * group * size <= limits.sms_for(size))


def shared_queries_shape(config: AttentionConfig) -> tuple[int, int, int]:
    """``(cluster_size, warps, head_split)`` of :func:`shares_queries`'s split: :data:`SHARED_QUERIES_SHAPE`,
    a part a query head of each KV head."""
    return (*SHARED_QUERIES_SHAPE, config.group_size)


def set_sequences(batch: int = MAX_BATCH) -> int:
    """Most sequences the sets of clusters of a step of up to ``batch`` sequences hold together,
    phantoms included: ``batch_parts`` sets of :func:`set_batch` each, over every split that
    :func:`check_batch_parts` allows (9 for 8: a batch of 7 or 8 in three sets of 3). What a buffer
    with a slice for each sequence of every set must hold."""
    return max(set_batch(b, s) * s for b in range(1, batch + 1) for s in range(1, b + 1)
               if (s - 1) * set_batch(b, s) < b)


def check_work_queue(head_split: int, split_positions: bool) -> None:
    """The work queue takes a cluster a KV head: ``head_split`` 1, the positions not split."""
    if head_split != 1 or split_positions:
        raise ValueError(f"work_queue takes a cluster a KV head (head_split 1, no split_positions), got head_split "
                         f"{head_split!r}, split_positions {split_positions!r}")


def check_shared_queries(config: AttentionConfig, head_split: int, split_positions: bool) -> None:
    """``shared_queries`` shares a KV head's query heads out evenly over the parts of its positions:
    ``split_positions``, and a ``head_split`` of 2 or more that divides them."""
    if not split_positions or head_split < 2 or config.group_size % head_split:
        allowed = [s for s in range(2, config.group_size + 1) if config.group_size % s == 0]
        raise ValueError(f"shared_queries takes split_positions and a head_split that divides the {config.group_size} "
                         f"query heads of a KV head (one of {allowed}), got head_split {head_split!r}, "
                         f"split_positions {split_positions!r}")


def check_batch_parts(batch: int, batch_parts) -> None:
    """``batch_parts`` sets of clusters each step at least one of ``batch`` sequences (:func:`set_batch`)."""
    if not (is_int(batch_parts) and 1 <= batch_parts <= batch
            and (batch_parts - 1) * set_batch(batch, batch_parts) < batch):
        allowed = [p for p in range(1, batch + 1) if (p - 1) * set_batch(batch, p) < batch]
        raise ValueError(f"batch_parts must leave each set of clusters at least one of the batch's {batch} sequences "
                         f"(sets of ceil({batch} / batch_parts), the last the rest): one of {allowed}, "
                         f"got {batch_parts!r}")


def batch_sets(config: AttentionConfig, batch: int, longest: int | None = None, cluster_size: int | None = None,
               head_split: int | None = None, sm_count: int = HOPPER.sm_count,
               l2_bytes: int = HOPPER.l2_bytes) -> int:
    """Sets of clusters the rule splits a step's batch over (``batch_parts``), where the step takes
    the long-cache shape of its own choosing (no cluster size or head split given): from
    :data:`PAIRS_FROM` rows one set a pair of sequences and at least two (a batch of 2: two sets of
    one; :func:`paired_sets`), below that two from a batch of :data:`BATCH_SETS_FROM`; else one. An
    odd batch, whose last set steps one sequence fewer, is split so in sets of pairs from a batch of 5;
    below :data:`PAIRS_FROM` rows, and at batch 3, only where one set of the long-cache shape leaves
    half of the ``sm_count`` SMs idle or where the weights each set streams fit in half of the
    ``l2_bytes`` of L2 (the cached rows stream through the other half).

    One set of the long-cache shape leaves SMs idle where the KV heads are few (Qwen2.5-7B: 4 KV
    heads, 64 blocks of 8 warps on 132 SMs), or has clusters of 16 that do not all fit at once
    (Llama-3-8B at batch 8: 7 of its 8; the eighth runs on SMs the others hold). Two sets, each the
    grid within half the SMs (:func:`launch_shape`), stream the weights twice (mostly from L2) and
    each cached row once. On the H200 (``docs/fused-decode-notes.md``, v22), µs at 16K / 32K:
    Qwen2.5-7B batch 4 123.9 / 180.3 -> 110.0 / 151.9, batch 8 189.9 / 293.5 -> 164.1 / 247.8
    (clusters of 16 x 8 warps); Llama-3-8B batch 8 227.1 / 387.2 -> 218.3 / 374.8 (two sets of
    clusters of 8), batch 4 level (130.9 / 209.8 -> 130.5 / 208.0). Sets of pairs at 16K / 32K (v23):
    Llama-3-8B batch 8 217.8 / 374.0 -> 206.8 / 341.8 (four sets of 8 x 4 warps), batch 4 129.8 /
    207.6 -> 128.5 / 201.7 (two sets of 16 x 4); Llama-3.2-1B batch 8 110.0 / 190.8 -> 100.2 / 167.2,
    batch 4 66.0 / 105.7 -> 62.1 / 99.4; at 4K they lost (Llama-3-8B 73.0 -> 75.1 at batch 4, 101.4 ->
    106.1 at batch 8), at 8K Llama-3.2-1B gained 5-6%, Llama-3-8B nothing and Qwen2.5-7B lost 9%
    (batch 8 122.2 -> 133.2; v24, v25). A batch of 2 in two sets of one from 16K / 32K (v25):
    Qwen2.5-7B 83.6 / 110.8 -> 79.8 / 99.5, Llama-3.2-1B 43.0 / 63.1 -> 41.9 / 60.0, Llama-3-8B 83.9 /
    123.5 -> 86.0 / 122.8; at 8K Llama-3-8B lost (63.2 -> 78.4). Sets of one at batches 4 and 8 lost
    or tied everywhere (v25).

    Odd batches on an H100 (v68), one set -> the sets above, µs at 4K / 8K / 16K / 32K: Qwen2.5-7B
    (64 blocks a set) batch 5 75.4 / 98.3 / 145.1 / 234.8 -> 72.9 / 88.1 / 119.4 / 172.7, batch 7
    98.6 / 126.9 / 183.9 / 297.9 -> 86.4 / 106.5 / 151.9 / 230.6, batch 3 at 16K / 32K 92.6 / 139.9 ->
    87.9 / 123.0. With 128 blocks a set the sets' repeated weights and the short last set cost about
    what they save: Llama-3-8B batch 5 80.3 / 111.6 / 175.8 / 302.7 -> 85.7 / 117.6 / 177.6 / 288.6,
    batch 3 at 16K 116.0 -> 121.7 (84 MB of weights, over the 50 MiB L2); Llama-3.2-1B (21 MB) 1-8%
    faster. On the H200 (60 MiB of L2, v69), one set -> sets: Llama-3.2-1B batch 7 at 4K / 32K 44.0 /
    167.7 -> 41.8 / 144.3, batch 3 at 32K 84.5 -> 76.8; Llama-3-8B's sets of pairs at 16K / 32K batch 5
    159.3 / 272.1 -> 153.4 / 243.3, batch 7 192.8 / 330.4 -> 183.7 / 298.4, batch 3 102.3 / 163.5 ->
    104.4 / 159.2; its two sets below 16K lost up to 11% (batch 5 at 4K 73.8 -> 81.2)."""
    if cluster_size is not None or batch == 1 or not long_cache(config, batch, longest, head_split):
        return 1
    pairs = batch > BATCH_SETS_FROM and longest >= PAIRS_FROM
    if batch % 2 and not pairs and 2 * config.weight_bytes() > l2_bytes:
        size, _, split = launch_shape(config, batch, sm_count, longest=longest, batch_parts=1)
        if 2 * config.kv_heads * size * split > sm_count:
            return 1
    if longest >= PAIRS_FROM:
        return max(2, set_batch(batch, 2))
    return 2 if batch >= BATCH_SETS_FROM else 1


def wide_blocks(config: AttentionConfig, batch: int, longest: int | None) -> bool:
    """Whether a step of ``batch`` sequences, the longest attending to ``longest`` rows, runs blocks
    of 16 warps, one every other SM (:func:`launch_shape`): an MHA model (one query head a KV head)
    with a batch of 5 to 8, which needs 8-warp blocks, from ``LONG_CACHE[batch - 1]`` rows.

    Llama-2-7B's 8-warp grid is 32 clusters of 4, 128 blocks, but clusters of 4 reach only 120 of
    the 132 SMs: two clusters run on SMs that already hold a block, and at long caches the step waits
    for them (batch 8 at 16K on the H200: 559.8 µs of attention on those 8 SMs, 502.4 on the others).
    32 clusters of 2 x 16 warps all run at once, each block on an SM of its own. Against 4 x 8, µs at
    4K / 16K (``docs/fused-decode-notes.md``, v24): batch 5 173.3 / 478.7 -> 163.5 / 408.4, batch 6
    197.4 / 563.4 -> 188.3 / 499.8, batch 7 207.5 / 586.6 -> 208.6 / 574.6, batch 8 215.1 / 628.5 ->
    212.5 / 596.6 (32K: 1167.6 -> 1103.3); at 1K the 16-warp blocks lost (v23)."""
    return reaches_long_cache(batch, longest) and config.group_size == 1 and batch > FOUR_WARPS_UP_TO


def shape_boundaries(batch: int) -> tuple[int, ...]:
    """Rows attended at which the rule's launch shape or sets for a step of ``batch`` sequences may
    change (:func:`launch_shape`, :func:`batch_sets`, :func:`shares_queries`), ascending:
    ``SHARED_QUERIES_ROWS[batch - 1]``, ``LONG_CACHE[batch - 1]`` and ``PAIRS_FROM``, each once, and
    beyond :data:`FOUR_WARPS_UP_TO` sequences :data:`HALF_CLUSTERS_BELOW`. Between two of them, and
    below the first, every length gets the same shape."""
    check_batch(batch)
    rows = {SHARED_QUERIES_ROWS[batch - 1], LONG_CACHE[batch - 1], PAIRS_FROM}
    if batch > FOUR_WARPS_UP_TO:
        rows.add(HALF_CLUSTERS_BELOW)
    return tuple(sorted(rows))


def paired_sets(config: AttentionConfig, batch: int, longest: int | None, sets: int,
                head_split: int | None = None) -> bool:
    """Whether a long-cache step of :data:`PAIRS_FROM` rows or more, split over ``sets`` sets of
    clusters, steps at most two sequences a set: then each set's grid is planned for blocks of 4
    warps, two an SM, as a short-cache step of a small batch (:func:`launch_shape`). Where the cache
    is most of the bytes, twice the blocks keep more of its loads in flight on every SM."""
    return (sets > 1 and set_batch(batch, sets) <= 2 and long_cache(config, batch, longest, head_split)
            and longest >= PAIRS_FROM)


def launch_shape(config: AttentionConfig, batch: int, sm_count: int, cluster_size: int | None = None,
                 head_split: int | None = None, longest: int | None = None, batch_parts: int | None = None,
                 l2_bytes: int = HOPPER.l2_bytes, warps: int | None = None):
    """``(cluster_size, warps, head_split)`` for one step: a grid that spreads over the SMs, 8 warps an SM.

    The grid of ``kv_heads x head_split x cluster_size`` blocks is the largest within ``2 x
    sm_count`` blocks of 4 warps (batch up to 4), else within ``sm_count`` blocks of 8 warps (a
    batch of 5 to 8 needs 8 warps: attention gives each sequence at least one); among equal grids
    the smallest head split (the fewest repeated K/V reads); where that 4-warp grid needs clusters of
    16, the same clusters run as 8 blocks of 8 warps, one an SM (below), unless a cluster size, head
    split or ``warps`` (the warps the caller runs) is given. Given values are kept; the warps follow
    the same rule. On 132 SMs: Llama-2-7B 32 clusters x 8 blocks x 4 warps up to batch 4, 32 x 4 x 8
    beyond; Llama-3-8B 16 x 8 x 8 (head split 2) up to batch 4, 8 x 16 x 8 beyond, but for fewer than
    :data:`HALF_CLUSTERS_BELOW` rows (``longest`` known), where the 8-warp grid's clusters of 16 run as
    twice as many clusters of 8 with twice the head split (16 x 8 x 8), unless anything is given.

    ``longest``: the most rows a sequence of the step attends to (its cached rows and the new one),
    where the host knows it; from ``LONG_CACHE[batch - 1]`` rows (:data:`LONG_CACHE`: 8192 at
    batches 1 and 2, 4096 beyond) a GQA model takes no head split (unless one is given) and the
    largest grid of 8-warp blocks within ``sm_count`` (Llama-3-8B, Llama-3.2-1B and Qwen2.5-7B: one
    cluster of 16 a KV head), so that each KV head's rows are read once. The shape depends on
    ``longest`` only through whether it reaches that; every shape computes the same step, so a
    wrong ``longest`` costs time, never correctness.

    ``batch_parts``: the sets of clusters the batch is split over (None: :func:`batch_sets`'s for
    ``sm_count`` SMs and ``l2_bytes`` of L2); the
    grids of all the sets together keep within the limit, so one set's is within half of it with two.
    Sets of at most two sequences from :data:`PAIRS_FROM` rows take the limit of two 4-warp blocks an
    SM (:func:`paired_sets`): Llama-3-8B at batch 8 four sets of 8 clusters of 8 x 4 warps, at batch 4
    two sets of 8 clusters of 16 x 4, at batch 2 two sets of one sequence in 8 clusters of 16 x 4 (Qwen2.5-7B:
    4 clusters of 16 x 8, 128 blocks, one an SM). An MHA batch of 5 to 8 from the same ``LONG_CACHE`` rows takes
    the largest grid of 16-warp blocks within ``sm_count / 2`` (:func:`wide_blocks`; Llama-2-7B: 32
    clusters of 2 x 16 warps, all at once, where 32 clusters of 4 x 8 do not fit the SMs).

    Why not one block of 8 warps an SM everywhere: a GPC holds only whole clusters, so larger
    clusters reach fewer of the SMs (on an H200 clusters of 16 at most 116 of its 132, of 8 or 4
    at most 124, of 2 all: ``python -m clusterlab.bench.placement``), and a grid of one block an
    SM puts the clusters that do not fit on SMs that already hold a block; the step waits for the
    slowest cluster. Blocks half the
    size, two an SM, spread the same work over more SMs in finer pieces, but not in clusters of 16:
    they fill 112 of an H100's SMs (116 of an H200's), so 256 blocks crowd three on a quarter of them,
    where the same clusters as 8 blocks of 8 warps fill 120 (124), 15 of the 16 one block an SM. On an
    H100 (v86), µs 16 x 4 x 2 -> 8 x 8 x 2, float16: Llama-3.2-1B at batch 1 and 1K / 2K / 4K / 6K
    18.6 / 19.3 / 21.1 / 22.7 -> 17.7 / 18.5 / 20.4 / 22.3, Llama-3-8B 40.9 / 42.6 / 45.9 / 49.2 -> 39.9
    / 41.8 / 45.4 / 48.9; at 1K and batches 2 / 3 / 4 20.0 / 22.6 / 24.4 -> 19.7 / 21.8 / 23.8 and 45.6 /
    50.3 / 54.3 -> 43.9 / 47.4 / 51.6; bfloat16 alike; the one loss Llama-3.2-1B at batch 2 and 4K, 25.8
    -> 26.2. At long caches the head
    split's repeated cache reads outweigh that (Llama-3-8B batch 4 at 16K: 132 µs with one cluster
    of 16 x 8 warps a KV head, 156 µs with two of 16 x 4; Qwen2.5-7B batch 8 at 16K: 173 µs against
    350 µs with seven clusters of 4 x 8, each reading the KV head's rows). The measurements behind this rule (where
    the blocks ran, the launch shape sweeps, v16's long caches) are in ``docs/fused-decode-notes.md``,
    their results under ``benchmarks/results/``.
    """
    check_batch(batch)
    long = long_cache(config, batch, longest, head_split)
    sets = batch_parts or batch_sets(config, batch, longest, cluster_size, head_split, sm_count, l2_bytes)
    two_an_sm = (batch <= FOUR_WARPS_UP_TO and not long) or paired_sets(config, batch, longest, sets, head_split)
    wide = sets == 1 and wide_blocks(config, batch, longest)
    limit = (2 * sm_count if two_an_sm else sm_count // 2 if wide else sm_count) // sets
    splits = [1] if long else [s for s in range(1, config.group_size + 1) if config.group_size % s == 0]
    sizes = [c for c in CLUSTER_SIZES if config.hidden_size % (8 * c) == 0]
    best = None  # (blocks, cluster_size, head_split)
    for split in splits if head_split is None else [head_split]:
        for size in sizes if cluster_size is None else [cluster_size]:
            blocks = config.kv_heads * split * size
            if (best is None or blocks > best[0]) and blocks <= limit:
                best = (blocks, size, split)
    if best is None:  # even the smallest grid is over the limit: one block a cluster, no split
        size, split = cluster_size or 1, head_split or 1
        best = (config.kv_heads * split * size, size, split)
    blocks, size, split = best
    block_warps = 4 if two_an_sm and sets * blocks > sm_count else 16 if wide and 2 * blocks <= sm_count else 8
    chosen = all(v is None for v in (cluster_size, head_split, warps))
    if block_warps == 4 and size == 16 and not long and chosen:
        return 8, 8, split  # the same clusters and warps in halves, which fill more SMs
    if (batch > FOUR_WARPS_UP_TO and not long and block_warps == 8 and size == 16 and sets == 1
            and longest is not None and longest < HALF_CLUSTERS_BELOW and config.group_size % (2 * split) == 0
            and chosen):
        return 8, 8, 2 * split  # the same blocks in clusters half the size: more SMs, few rows read twice
    return size, block_warps, split


# -- multi-head latent attention (docs/mla-decode-design.md; clusterlab.fused.mla_simulated, mla_kernel) --


def head_chunk(rows: int, cluster: int, heads: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``rows`` that cluster ``cluster`` (of ``heads``) projects: equal chunks
    rounded up, the last clusters may get fewer (or none)."""
    chunk = -(-rows // heads)
    start = min(cluster * chunk, rows)
    return start, min(start + chunk, rows)


def kv_a_rows(config: MLAConfig, cluster: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``kv_a_proj_with_mqa`` that projection cluster ``cluster`` computes."""
    return head_chunk(config.latent_width, cluster, config.heads)


def q_a_rows(config: MLAConfig, cluster: int) -> tuple[int, int]:
    """With the query LoRA: rows ``[start, end)`` of ``q_a_proj`` that projection cluster ``cluster`` computes."""
    return head_chunk(config.q_lora_rank, cluster, config.heads)


def latent_columns(config: MLAConfig, rank: int, cluster_size: int) -> tuple[int, int]:
    """Latent columns ``[start, end)`` block ``rank`` owns, ``kv_lora_rank / C`` of them: of ``q_lat[h]``
    (launch 1), of the merged softmax states (launch 2), of ``o_lat`` (launch 3); contiguous, so that
    a block's columns of ``W_UK[h]`` and ``W_UV[h]`` are whole rows of their transposes."""
    cols = config.kv_lora_rank // cluster_size
    return rank * cols, (rank + 1) * cols


def attention_range(cached: int, cluster: int, rank: int, clusters: int, cluster_size: int) -> tuple[int, int]:
    """Cached positions ``[start, end)`` of block ``rank`` of attention cluster ``cluster`` (of a
    sequence's ``clusters``): their ``clusters * cluster_size`` blocks split the sequence's ``cached``
    old rows as :func:`cached_range` does."""
    return cached_range(cached, cluster * cluster_size + rank, clusters * cluster_size)


def new_row_block(clusters: int, cluster_size: int) -> tuple[int, int]:
    """``(cluster, rank)`` of the attention block that folds in the new row and appends it to the cache."""
    g = new_token_rank(clusters * cluster_size)
    return g // cluster_size, g % cluster_size
