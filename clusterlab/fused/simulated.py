"""The fused kernel's cluster dataflow as a simulator program: runs on the CPU, checks every DSMEM access.

:func:`decode_block` is what one block of the kernel in :mod:`clusterlab.fused.kernel` does,
phase for phase (the numbered comments match), with the block's threads folded into NumPy
statements. Work splits come from the same functions of :mod:`clusterlab.fused.plan` that the
kernel compiles, and every cross-block exchange goes through the simulator's DSMEM, so a
missing barrier or a wrong owner shows up here as a :class:`~clusterlab.simulator.DataRace` or a
wrong answer, at sizes small enough for CI. Arithmetic is float32 as in the kernel; the order of
float sums differs (NumPy's versus warp shuffles), so results agree to rounding, not bit for bit.

What the simulator does not model is global memory: :func:`simulated_step` holds the inputs,
the cache and ``out_acc`` as NumPy arrays, runs one simulated cluster per KV head (or per part of
one), and converts ``out_acc`` at the end as the kernel's last block does. Clusters run one after
the other, so where a KV head's positions are split (``split_positions``) its last part is the
last to arrive, and merges the parts' states as whichever cluster arrives last does in the kernel.
Where the parts also share out the query projection (``shared_queries``), whose clusters wait for
each other twice, each cluster runs in three launches, one for each stretch between the waits
(:data:`SHARED_STAGES`), and every cluster of a set runs a stretch before any runs the next.
Where the batch is split over sets of clusters (``batch_parts``), each set runs on its sequences'
rows of those arrays (:func:`batch_part`), as its slices of the kernel's arguments; a last set with
fewer sequences than the others runs as a step of those alone (the kernel's phantoms, which read and
write nothing, are not modelled).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from .. import simulator
from .config import AttentionConfig, AttentionWeights, KVCache, rope_table
from .plan import (
    QUAD,
    QUEUE_ROWS,
    QUEUE_SLOTS,
    cached_range,
    check_batch_parts,
    check_cluster_size,
    check_head_split,
    check_shared_queries,
    check_work_queue,
    new_row_block,
    owned_quads,
    qkv_row,
    rope_pair,
    set_batch,
)
from .reference import sequence_positions

NEG = np.float32(-1e30)  # the kernel's stand-in for -inf
F32 = np.float32


def quad_items(quads: np.ndarray) -> np.ndarray:
    """The items of an exchange's ``quads``, in order: ``QUAD*q .. QUAD*q + QUAD - 1`` for each ``q``."""
    return (QUAD * quads[:, None] + np.arange(QUAD)).ravel()


def norm_inputs(gm: dict, k0: int, k_slice: int, writes_residual: bool):
    """The first phase's inputs on the hidden slice ``k0 .. k0 + k_slice``: ``(h, xs)`` with ``h =
    hidden + residual`` (written to ``gm["residual_out"]`` where ``writes_residual``) and ``xs = h *
    norm`` (the kernels' :func:`~clusterlab.fused.kernel.make_norm_inputs`)."""
    h = gm["hidden"][:, k0 : k0 + k_slice] + gm["residual"][:, k0 : k0 + k_slice]
    if writes_residual:
        gm["residual_out"][:, k0 : k0 + k_slice] = h
    return h, h * gm["norm"][k0 : k0 + k_slice]


#: The stretches of a step between the waits across clusters of ``shared_queries``, each a launch of its own here
SHARED_STAGES = ("project", "attend", "o proj")


def decode_block(b: simulator.Block, cluster: int, config: AttentionConfig, batch: int, gm: dict,
                 positions: list[int], head_split: int = 1, split_positions: bool = False, queue: dict | None = None,
                 stage: str | None = None):
    """One block of cluster ``cluster`` (KV head ``cluster // head_split``); ``gm`` holds the "global memory" arrays.

    The ``head_split`` clusters of a KV head split its query heads, or with ``split_positions`` its
    cached positions (part ``cluster % head_split`` of them, each cluster with all the query heads):
    then phase 4 leaves each cluster's softmax state in ``gm`` (``part_m``, ``part_l``, ``part_acc``,
    unnormalised), and phase 5 runs in the block of each rank that arrives last (``gm["arrivals"]``
    counts them), which merges the parts' states into ``o`` first.

    ``gm``: float32 ``hidden``/``residual`` ``[batch, H]``, ``norm`` ``[H]``, ``qkv`` ``[rows, H]``,
    ``qkv_bias`` ``[rows]`` (zeros without a bias), ``o`` ``[H, heads*d]``, ``k``/``v`` ``[batch,
    kv_heads, capacity, d]``, ``rope`` ``[capacity, 2, d/2]``; outputs ``residual_out``,
    ``out_acc`` ``[batch, H]``, and ``new_k`` / ``new_v`` ``[batch, kv_heads, d]`` (the cache row,
    before rounding to the cache dtype). ``positions[seq]``: sequence ``seq``'s new token.

    ``queue`` (the kernel's ``work_queue``): who folds which chunks of ``queue["rows"]`` cached
    positions, as :func:`queue_claims` draws them: ``queue[seq]["own"][rank]`` the chunks of sequence
    ``seq`` this cluster's block ``rank`` takes, ``queue[seq]["runs"]`` those other clusters' warps
    take, each run a state in ``gm["slots"]``. Block 0 publishes the queries after B2 (``gm["q_pub"]``,
    at the step's sequence ``queue["first"] + seq``) and, since the simulator runs one cluster at a
    time, folds the other clusters' runs from them there (:func:`fold_run`, device memory only);
    phase 4 merges those states with the blocks'.

    ``stage`` (the kernel's ``shared_queries``, with ``split_positions``): one of
    :data:`SHARED_STAGES`, the stretch of the step between the waits across clusters, run as a
    launch of its own. ``"project"``: phases 1 and 2 with part ``p`` projecting the ``G / parts``
    query heads ``p * PG ..`` (and both K/V heads, as every cluster here), pushed into their slots
    of ``qkv``, then after B2 the block's share of the part's heads handed to ``gm["queries"]``;
    ``"attend"``: ``qkv`` from the handed queries and the new K/V row (what the kernel's block holds
    after its wait), phases 3 and 4 as a part of the positions split; ``"o proj"``: phase 5 with the
    part's own heads merged from every part's state and projected with their W_o columns.
    Names as in the kernel (its module docstring lists them): ``H, D, G, C``, ``rows``,
    ``k_slice``, ``out_rows``, ``attn_width``, ``kv_head``, ``seq``, ``head``, ``slot``.
    """
    C, rank = b.cluster_size, b.cluster_rank
    parts = head_split if split_positions else 1  # clusters a KV head's cached positions are split over
    query_split = head_split // parts  # clusters its query heads are split over
    H, D, G = config.hidden_size, config.head_dim, config.group_size // query_split
    kv_head, part = cluster // head_split, cluster % head_split if split_positions else 0
    # the query heads the cluster projects (W_qkv's query rows, W_o's columns): PG of them from query_block * PG
    PG, proj_split = (G // parts, parts) if stage else (G, query_split)
    query_block = kv_head if split_positions and not stage else cluster
    rows, out_rows = (G + 2) * D, H // C
    proj_rows, proj_width = (PG + 2) * D, PG * D
    # partial (read by the peers until B2) and o (pushed by them from B3 on) are never alive at
    # once, so they share words as in the kernel (KernelSpec.overlay): views of one region, which
    # the simulator checks as the same bytes.
    exchange = b.shared_array("exchange", (batch * max(proj_rows + 1, proj_width),), F32)
    partial = b.shared_view("partial", exchange, (batch, proj_rows + 1), F32)
    qkv = b.shared_array("qkv", (batch, rows), F32)
    state_m = b.shared_array("state_m", (batch, G), F32)
    state_l = b.shared_array("state_l", (batch, G), F32)
    state_acc = b.shared_array("state_acc", (batch, G, D), F32)
    o = b.shared_view("o", exchange, (batch, proj_width), F32)
    if stage in (None, "project"):
        yield from project(b, cluster, config, batch, gm, positions, head_split, part, G, PG, proj_split,
                           query_block, partial, qkv)
    if stage == "project":  # hand the part's query heads to the others: the block's share of them
        b.step("2 hand-off")
        share = np.arange(rank, batch * proj_width, C)
        seq, column = share // proj_width, part * proj_width + share % proj_width
        gm["queries"][kv_head, seq, column] = qkv[seq, column]
        return
    if stage == "attend":  # what the block holds after its wait: every part's heads, the new K/V row
        b.step("2 hand-off")
        qkv[:, : G * D] = gm["queries"][kv_head]
        qkv[:, G * D : (G + 1) * D] = gm["new_k"][:, kv_head]
        qkv[:, (G + 1) * D :] = gm["new_v"][:, kv_head]
    if stage in (None, "attend"):
        yield from attend(b, kv_head, part, parts, G, D, batch, gm, positions, queue, qkv, state_m, state_l,
                          state_acc, o, split_positions)
    if stage in (None, "o proj"):
        project_o(b, kv_head, part, parts, G, PG, D, batch, gm, out_rows, query_block, o, split_positions, stage)


def project(b: simulator.Block, cluster: int, config: AttentionConfig, batch: int, gm: dict, positions: list[int],
            head_split: int, part: int, G: int, PG: int, proj_split: int, query_block: int, partial, qkv):
    """Phases 1 and 2 of :func:`decode_block`: the cluster's ``PG`` query heads (``query_block * PG
    ..``), its key and value heads, normalised, rotated and pushed into ``qkv``, the query heads to
    slots ``part * PG ..`` where ``PG`` is a share of the ``G`` (``shared_queries``), K and V to ``G``
    and ``G + 1``; the first cluster of the KV head appends the cache row."""
    C, rank = b.cluster_size, b.cluster_rank
    H, D = config.hidden_size, config.head_dim
    kv_head = cluster // head_split
    proj_rows = (PG + 2) * D
    q_scale = F32(math.log2(math.e) / math.sqrt(D))

    # -- 1 qkv: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2) --------------------
    b.step("1 qkv")
    k_slice = H // C
    k0 = rank * k_slice
    h, xs = norm_inputs(gm, k0, k_slice, cluster == 0)
    w_rows = [qkv_row(config.heads, config.kv_heads, D, proj_split, query_block, row) for row in range(proj_rows)]
    partial[:, :proj_rows] = xs @ gm["qkv"][w_rows, k0 : k0 + k_slice].T
    partial[:, proj_rows] = (h * h).sum(axis=1, dtype=F32)
    yield b.cluster_sync()  # B1: every block's partials are complete

    # -- 2 rope: owners sum the partials, normalise, rotate, push q/k/v, append k/v ----------------------
    b.step("2 rope")
    quads = rank + C * np.arange(owned_quads(proj_rows // 2, rank, C))  # of pairs: QUAD*q .. QUAD*q + QUAD - 1
    pairs = [rope_pair(D, config.rope_style == "neox", pair) for pair in quad_items(quads)]
    ra = np.array([p[0] for p in pairs], dtype=np.int64)
    rb = np.array([p[1] for p in pairs], dtype=np.int64)
    angle = np.array([p[2] for p in pairs], dtype=np.int64)
    peers = [b.map_shared(partial, c) for c in range(C)]
    xa = sum(peer[:, ra] for peer in peers)
    xb = sum(peer[:, rb] for peer in peers)
    ss = sum(peer[:, proj_rows] for peer in peers)
    inv_rms = (F32(1) / np.sqrt(ss / F32(H) + F32(config.rms_eps))).astype(F32)[:, None]
    xa = xa * inv_rms + gm["qkv_bias"][[w_rows[r] for r in ra]]
    xb = xb * inv_rms + gm["qkv_bias"][[w_rows[r] for r in rb]]
    slot = ra // D
    position = np.array(positions)[:, None]  # each sequence's own angle
    cos, sin = gm["rope"][position, 0, angle], gm["rope"][position, 1, angle]
    rotate = slot <= PG  # query and key heads
    xa, xb = np.where(rotate, xa * cos - xb * sin, xa), np.where(rotate, xb * cos + xa * sin, xb)
    xa, xb = np.where(slot < PG, xa * q_scale, xa), np.where(slot < PG, xb * q_scale, xb)
    to_qkv = np.where(slot < PG, part * PG * D if PG < G else 0, (G - PG) * D)  # where the rows go in qkv
    for c in range(C):
        peer = b.map_shared(qkv, c)
        peer[:, ra + to_qkv] = xa
        peer[:, rb + to_qkv] = xb
    for kv_slot, name in ((PG, "new_k"), (PG + 1, "new_v")) if cluster % head_split == 0 else ():
        mine = slot == kv_slot  # the first cluster of the KV head appends
        gm[name][:, kv_head, ra[mine] - kv_slot * D] = xa[:, mine]
        gm[name][:, kv_head, rb[mine] - kv_slot * D] = xb[:, mine]
    yield b.cluster_sync()  # B2: q, k, v of the new token are in every block


def attend(b: simulator.Block, kv_head: int, part: int, parts: int, G: int, D: int, batch: int, gm: dict,
           positions: list[int], queue: dict | None, qkv, state_m, state_l, state_acc, o, split_positions: bool):
    """Phases 3 and 4 of :func:`decode_block`: attention over the block's cached positions with the
    ``G`` query heads of ``qkv``, and the cluster's merge, into ``o`` or (``split_positions``) the
    part's state in ``gm``."""
    C, rank = b.cluster_size, b.cluster_rank
    attn_width = G * D

    # -- 3 attention over this block's cached positions (online softmax) ---------------------------------
    b.step("3 attention")
    if queue is not None and rank == 0:  # publish the queries; the other clusters' runs read them
        for seq in range(batch):
            pair = (queue["first"] + seq, kv_head)
            gm["q_pub"][pair] = qkv[seq, : G * D]
            gm["slots"][pair] = [fold_run(gm["q_pub"][pair], gm["k"][seq, kv_head], gm["v"][seq, kv_head],
                                          run, queue["rows"], positions[seq]) for run in queue[seq]["runs"]]
    for seq in range(batch):
        start, end = cached_range(positions[seq], part * C + rank, parts * C)
        q = qkv[seq, : G * D].reshape(G, D)
        rows = np.arange(start, end)
        if queue is not None:  # the chunks the block's warps took
            rows = chunk_rows(queue[seq]["own"][rank], queue["rows"], positions[seq])
        keys = gm["k"][seq, kv_head, rows]
        values = gm["v"][seq, kv_head, rows]
        if (part, rank) == new_row_block(parts, C):
            keys = np.vstack([keys, qkv[seq, G * D : (G + 1) * D]])
            values = np.vstack([values, qkv[seq, (G + 1) * D :]])
        if len(keys) == 0:
            state_m[seq] = NEG
            state_l[seq] = 0
            state_acc[seq] = 0
            continue
        scores = q @ keys.T  # base-2 logits: q carries log2(e)/sqrt(d)
        m = scores.max(axis=1)
        p = np.exp2(scores - m[:, None])
        state_m[seq] = m
        state_l[seq] = p.sum(axis=1)
        state_acc[seq] = p @ values
    yield b.cluster_sync()  # B3: every block's softmax state is complete

    # -- 4 merge: owners combine the C states of their elements of o and push them (or, with the ----------
    # positions split, leave the cluster's state for the last part to arrive)
    b.step("4 merge")
    e = quad_items(rank + C * np.arange(owned_quads(batch * attn_width, rank, C)))
    seq, hd = e // attn_width, e % attn_width
    head, dim = hd // D, hd % D
    m_c = np.stack([b.map_shared(state_m, c)[seq, head] for c in range(C)])
    l_c = np.stack([b.map_shared(state_l, c)[seq, head] for c in range(C)])
    a_c = np.stack([b.map_shared(state_acc, c)[seq, head, dim] for c in range(C)])
    if queue is not None:  # and the states of the other clusters' runs, from device memory
        runs = max(len(queue[s]["runs"]) for s in range(batch))
        empty = (np.full(G, NEG), np.zeros(G, F32), np.zeros((G, D), F32))  # weighs nothing in the merge
        slots = [gm["slots"][queue["first"] + s, kv_head] + [empty] * (runs - len(queue[s]["runs"]))
                 for s in range(batch)]
        for r in range(runs):
            m_c = np.vstack([m_c, [slots[s][r][0][h] for s, h in zip(seq, head)]])
            l_c = np.vstack([l_c, [slots[s][r][1][h] for s, h in zip(seq, head)]])
            a_c = np.vstack([a_c, [slots[s][r][2][h, d] for s, h, d in zip(seq, head, dim)]])
    m_max = m_c.max(axis=0)
    w = np.exp2(m_c - m_max)
    l_tot, a_tot = (w * l_c).sum(axis=0), (w * a_c).sum(axis=0)
    if split_positions:  # unnormalised: a part with no positions has l = 0
        gm["part_acc"][kv_head, part, seq, hd] = a_tot
        gm["part_m"][kv_head, part, seq, head] = m_max
        gm["part_l"][kv_head, part, seq, head] = l_tot
    else:
        for c in range(C):
            b.map_shared(o, c)[seq, hd] = a_tot / l_tot
    yield b.cluster_sync()  # B4: o (or the cluster's state) is complete; no DSMEM access after this


def project_o(b: simulator.Block, kv_head: int, part: int, parts: int, G: int, PG: int, D: int, batch: int,
              gm: dict, out_rows: int, query_block: int, o, split_positions: bool, stage: str | None):
    """Phase 5 of :func:`decode_block`: ``o`` (of the cluster's ``PG`` heads) times the block's output
    rows of W_o's columns of those heads, added into ``out_acc``; with the positions split, ``o``
    merged from the parts' states first, by the last part to arrive or (``stage``, shared queries)
    by every part for its own heads."""
    rank = b.cluster_rank

    # -- 5 o proj: this block's output rows, the cluster's heads' columns --------------------------------
    b.step("5 o proj")
    if stage:  # every part, once all have left their states, merges its own heads'
        heads = slice(part * PG, (part + 1) * PG)
        m_p = gm["part_m"][kv_head][:, :, heads]  # [parts, batch, PG]
        w = np.exp2(m_p - m_p.max(axis=0))
        l_tot = (w * gm["part_l"][kv_head][:, :, heads]).sum(axis=0)
        a_parts = gm["part_acc"][kv_head].reshape(parts, batch, G, D)[:, :, heads]
        a_tot = (w[..., None] * a_parts).sum(axis=0)
        o[:, :] = (a_tot / l_tot[..., None]).reshape(batch, PG * D)
    elif split_positions:  # the last of the KV head's parts to arrive (at this rank) merges their states
        gm["arrivals"][kv_head, rank] += 1
        if gm["arrivals"][kv_head, rank] < parts:
            return
        gm["arrivals"][kv_head, rank] = 0
        m_p = gm["part_m"][kv_head]  # [parts, batch, G]
        w = np.exp2(m_p - m_p.max(axis=0))
        l_tot = (w * gm["part_l"][kv_head]).sum(axis=0)
        a_tot = (w[..., None] * gm["part_acc"][kv_head].reshape(parts, batch, G, D)).sum(axis=0)
        o[:, :] = (a_tot / l_tot[..., None]).reshape(batch, G * D)
    r0 = rank * out_rows
    columns = slice(query_block * PG * D, (query_block + 1) * PG * D)
    gm["out_acc"][:, r0 : r0 + out_rows] += o[:, :] @ gm["o"][r0 : r0 + out_rows, columns].T


def chunk_rows(chunks, rows: int, cached: int) -> np.ndarray:
    """The cached positions of ``chunks`` (chunk ``k``: ``rows * k ..``, cut at ``cached``), in the order given."""
    return np.concatenate([np.arange(k * rows, min((k + 1) * rows, cached)) for k in chunks] + [np.arange(0)])


def fold_run(q: np.ndarray, keys: np.ndarray, values: np.ndarray, chunks, rows: int, cached: int):
    """A run of the work queue, as a warp of another cluster folds it: the softmax state ``(m [G], l [G],
    acc [G, D])`` of the published query ``q`` ``[G * D]`` over ``chunks`` of a KV head's ``keys`` and
    ``values`` ``[capacity, D]``, unnormalised (the kernel's ``publish`` of a run)."""
    at = chunk_rows(chunks, rows, cached)
    d = keys.shape[1]
    scores = q.reshape(-1, d) @ keys[at].T  # base-2 logits: q carries log2(e)/sqrt(d)
    m = scores.max(axis=1)
    p = np.exp2(scores - m[:, None])
    return m.astype(F32), p.sum(axis=1, dtype=F32), (p @ values[at]).astype(F32)


def queue_claims(positions: list[int], cluster_size: int, rows: int, seed: int) -> list[dict]:
    """One order in which a step's warps could take the work queue's chunks, drawn from ``seed``: for
    each sequence, its chunks of ``rows`` cached positions (``positions[seq]`` of them) split between
    the blocks of its own cluster (``"own"``: a list of chunks a rank) and runs of other clusters'
    warps (``"runs"``: at most :data:`~clusterlab.fused.plan.QUEUE_SLOTS`, each a list of chunks, none empty).
    The kernel's merge must give the same step whatever the order; :func:`simulated_step` draws one."""
    rng = np.random.default_rng(seed)
    claims = []
    for cached in positions:
        chunks = rng.permutation(-(-max(cached, 0) // rows))
        foreign = rng.random(len(chunks)) < rng.random()  # a share of the chunks to other clusters
        runs = [list(run) for run in np.array_split(chunks[foreign], rng.integers(1, QUEUE_SLOTS + 1)) if len(run)]
        owner = rng.integers(0, cluster_size, len(chunks))
        claims.append({"own": [list(chunks[~foreign & (owner == r)]) for r in range(cluster_size)], "runs": runs})
    return claims


#: The arrays of ``gm`` that hold a row a sequence (the batch their first axis; ``part_*`` their third).
SEQUENCE_ARRAYS = ("hidden", "residual", "k", "v", "residual_out", "out_acc", "new_k", "new_v")
PART_ARRAYS = ("part_acc", "part_m", "part_l")


def batch_part(gm: dict, first: int, last: int) -> dict:
    """``gm`` as a set of clusters sees it: sequences ``first .. last - 1``'s rows (views) of the
    arrays with a batch, the others shared, and counters of its own (the slices the kernel's
    ``decode_step`` takes first where ``batch_parts > 1``)."""
    part = dict(gm)
    for name in SEQUENCE_ARRAYS:
        part[name] = gm[name][first:last]
    for name in PART_ARRAYS:
        if name in gm:
            part[name] = gm[name][:, :, first:last]
    if "queries" in gm:  # [kv_heads, batch, G * D]
        part["queries"] = gm["queries"][:, first:last]
    if "arrivals" in gm:
        part["arrivals"] = np.zeros_like(gm["arrivals"])
    return part


def simulated_step(
    config: AttentionConfig,
    weights: AttentionWeights,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    cache: KVCache,
    positions,
    cluster_size: int,
    traces: list | None = None,
    head_split: int = 1,
    handoff: bool = False,
    split_positions: bool = False,
    batch_parts: int = 1,
    work_queue: bool = False,
    queue_rows: int = QUEUE_ROWS,
    claim_seed: int = 0,
    shared_queries: bool = False,
):
    """One decode step on the simulator: ``(out, new_residual)``, and cache row ``positions[b]`` of each sequence appended.

    CPU tensors, shapes as for :class:`~clusterlab.fused.layer.DecodeAttention`; ``positions`` an
    int for the whole batch or one per sequence (list or CPU tensor). One simulated
    cluster per KV head, or ``head_split`` per KV head each with a part of its query heads; each
    cluster's :class:`~clusterlab.simulator.Trace` is appended to ``traces`` when a list is given.
    ``split_positions``: the ``head_split`` clusters of a KV head split its cached positions instead
    of its query heads (the kernel's :attr:`~clusterlab.fused.kernel.KernelSpec.split_positions`).
    ``batch_parts``: that many sets of those clusters, each the step of ``ceil(batch / batch_parts)``
    of the sequences, the last of those left (the kernel's
    :attr:`~clusterlab.fused.kernel.KernelSpec.batch_parts`; :func:`~clusterlab.fused.plan.set_batch`).
    ``handoff``: as the kernel's (:attr:`~clusterlab.fused.kernel.KernelSpec.handoff`), ``hidden``
    may be float32 sums, read rounded to the weights' dtype, and ``out`` is ``out_acc`` itself,
    float32, unconverted.
    ``work_queue``: the kernel's (:attr:`~clusterlab.fused.kernel.KernelSpec.work_queue`), the chunks
    of ``queue_rows`` positions taken in the order :func:`queue_claims` draws from ``claim_seed``.
    ``shared_queries``: the kernel's (:attr:`~clusterlab.fused.kernel.KernelSpec.shared_queries`, with
    ``split_positions``): the parts share out the query projection; each cluster of a set runs in
    three launches, one for each stretch between the waits across clusters (:data:`SHARED_STAGES`),
    every cluster of the set through one before any starts the next, with what the kernel's
    blocks carry over a wait (the part's state, the handed queries, the new K/V row) in ``gm``.
    """
    check_cluster_size(config, cluster_size)
    check_head_split(config, head_split, split_positions)
    if shared_queries:
        check_shared_queries(config, head_split, split_positions)
    batch, dtype = hidden.shape[0], weights.qkv.dtype
    check_batch_parts(batch, batch_parts)
    positions = sequence_positions(positions, batch)

    def f32(t):
        return t.detach().to(torch.float32).numpy()

    gm = {
        "hidden": f32(hidden.to(dtype)), "residual": f32(residual), "norm": f32(weights.norm),
        "qkv": f32(weights.qkv), "o": f32(weights.o), "k": f32(cache.k), "v": f32(cache.v),
        "qkv_bias": np.zeros(config.qkv_rows, F32) if weights.qkv_bias is None else f32(weights.qkv_bias),
        "rope": rope_table(config, cache.capacity).numpy(),
        "residual_out": np.full((batch, config.hidden_size), np.nan, F32),
        "out_acc": np.zeros((batch, config.hidden_size), F32),
        "new_k": np.full((batch, config.kv_heads, config.head_dim), np.nan, F32),
        "new_v": np.full((batch, config.kv_heads, config.head_dim), np.nan, F32),
    }
    if split_positions:
        kv, group = config.kv_heads, config.group_size
        gm["arrivals"] = np.zeros((kv, cluster_size), np.int64)
        gm["part_acc"] = np.full((kv, head_split, batch, group * config.head_dim), np.nan, F32)
        gm["part_m"] = np.full((kv, head_split, batch, group), np.nan, F32)
        gm["part_l"] = np.full((kv, head_split, batch, group), np.nan, F32)
    if shared_queries:
        gm["queries"] = np.full((config.kv_heads, batch, config.group_size * config.head_dim), np.nan, F32)
    if work_queue:
        check_work_queue(head_split, split_positions)
        claims = [queue_claims(positions, cluster_size, queue_rows, claim_seed * config.kv_heads + g)
                  for g in range(config.kv_heads)]
        gm["q_pub"] = np.full((batch, config.kv_heads, config.group_size * config.head_dim), np.nan, F32)
        gm["slots"] = {}
    for first in range(0, batch, set_batch(batch, batch_parts)):
        share = min(set_batch(batch, batch_parts), batch - first)  # sequences this set of clusters steps
        part_gm = batch_part(gm, first, first + share)
        for stage, cluster in itertools.product(SHARED_STAGES if shared_queries else [None],
                                                range(config.kv_heads * head_split)):
            title = f"decode step, KV head {cluster // head_split}"
            if head_split > 1:
                title += f" {'positions' if split_positions else 'part'} {cluster % head_split}"
            if batch_parts > 1:
                title += f", sequences {first}..{first + share - 1}"
            if stage:
                title += f", {stage}"
            queue = None
            if work_queue:
                queue = {"first": first, "rows": queue_rows, **dict(enumerate(claims[cluster][first:first + share]))}
            trace = simulator.launch(decode_block, cluster_size, cluster, config, share, part_gm,
                                     positions[first:first + share], head_split, split_positions, queue, stage,
                                     title=title)
            if traces is not None:
                traces.append(trace)
    # -- 6 finish: the last block (one a cluster) to add into this block's output rows converts them -
    # Here once for all rows, after every cluster has added into out_acc (with a hand-off nobody
    # converts); the cache rows, which the kernel's phase 2 writes, are rounded to the cache dtype here too.
    rows = torch.arange(batch)
    cache.k[rows, :, positions] = torch.from_numpy(gm["new_k"]).to(dtype)
    cache.v[rows, :, positions] = torch.from_numpy(gm["new_v"]).to(dtype)
    out = torch.from_numpy(gm["out_acc"])
    return (out if handoff else out.to(dtype)), torch.from_numpy(gm["residual_out"]).to(dtype)
