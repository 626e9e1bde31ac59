"""The MLA decode step's cluster dataflow (``docs/mla-decode-design.md``) as simulator programs, on the CPU.

One generator per grid phase of the planned kernel; the design's grid barriers are the
boundaries between :func:`~clusterlab.simulator.launch` rounds over all clusters, and what crosses
them lives in "global memory", the dict ``gm`` of float32 NumPy arrays (the simulator does not
model global memory). Inside a cluster every exchange goes through the simulator's DSMEM, so a
missing cluster barrier or a wrong owner raises a :class:`~clusterlab.simulator.Hazard` or gives a
wrong answer. Notation: ``B`` batch, ``H`` hidden size, ``C`` blocks a cluster, ``r =
kv_lora_rank``, ``d_n``/``d_r``/``d_v`` the nope/rope/value head sizes, ``L = r + d_r`` the latent
row, ``A`` the attention phase's clusters a sequence, ``G = A*C`` their blocks::

    launch 1, cluster h = query head h (heads clusters):          projections_block
      # -- 1 projections  block k: hidden slice k (h = hidden + residual, xs = h * norm, sum h^2),
                          partial dots with q_proj's d_n + d_r rows of head h and 1/heads of the
                          kv_a_proj_with_mqa rows                         -> own smem `partial`
         cluster barrier
                          owners (row i: block i mod C) sum the C partials through DSMEM and
                          normalise: kv_a rows -> gm kv_raw (raw)
      # -- 2 absorb       (absorb) the same owners' q rows: q_pe pairs rotated -> gm q_pe, q_nope
                          pushed into every block (DSMEM gather)
         cluster barrier
                          block k: its columns (latent_columns) of q_lat[h] = q_nope @ W_UK[h] -> gm q_lat
    == grid barrier 1 ==
    launch 2, A clusters a sequence (A*B):                         attention_block
      # -- 3 attention    every block: its chunk of the sequence's cache positions (block g =
                          a*C + rank of G, plan.cached_range), all heads, online softmax (base 2);
                          the last block (new_row_block) also normalises + rotates the new latent
                          row (from gm kv_raw), folds it in and appends it to the cache;
                          cluster barrier; owners merge the C states of their latent columns
                          through DSMEM -> gm state_m/state_l/state_acc [B, A, heads(, r)];
                          cluster barrier
    == grid barrier 2 ==
    launch 3, cluster h = head h:                                  output_block
      # -- 4 output       block k: merges head h's A states on its latent columns,
                          partial o = o_lat[cols] @ W_UV[h][cols] -> own smem; cluster barrier;
                          sums the C partials through DSMEM; cluster barrier; out rows of slice
                          k += o @ o_proj[rows, head h's columns].T (red.add into gm out_acc)
    # -- 5 finish         (simulated_mla_step) out_acc and the residual converted to the model
                          dtype, the new rows rounded into the cache

With the query LoRA (``q_lora_rank``), ``q = q_b_proj @ RMSNorm(q_a_proj @ n)`` needs all of
``q_a`` before any head's query row, so the query takes a launch of its own::

    launch 1, cluster h (heads clusters):                          projections_block
      # -- 1 projections  as above with 1/heads of the q_a_proj rows instead of head h's q rows;
                          owners -> gm q_a_raw (raw) and gm kv_raw; cluster barrier
    == grid barrier ==
    launch 1b, cluster h = query head h (heads clusters):         query_block
      # -- 1b query       block k: the whole q_a_raw row's RMS, its slice k of q_a_raw * q_a_layernorm
                          (q_lora_rank / C columns), partial dots with q_b_proj's rows of head h
         cluster barrier
      # -- 2 absorb       as above (absorb), the partials times q_a's 1/RMS
    == grid barrier 1 ==  launches 2 and 3 as above

The kernel's one launch a step (``kernel_options={"one_launch": True}``) runs the same three programs as
roles of one grid, a cluster's role the ticket it takes as it starts, and waits in device memory where
the launches end here; the rounds below, every cluster of a role after all those of the role before, are
one schedule its tickets can give.

Arithmetic is float32; the only roundings to the model dtype are the outputs and the cache row
(written rounded). The new token's own score uses its unrounded row, as the float64 reference does
(one of the design's open choices). ``softmax_scale * log2(e)`` is applied to the scores in phase 3.
Who owns what (``kv_a_rows``, ``q_a_rows``, ``latent_columns``, ``attention_range``,
``new_row_block``) is :mod:`clusterlab.fused.plan`'s, shared with the kernels
(:mod:`clusterlab.fused.mla_kernel`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import simulator
from .config import is_int
from .mla import (
    LATENT_RMS_EPS,
    LatentCache,
    MLAConfig,
    MLAWeights,
    check_mla_activations,
    check_mla_weights,
    mla_rope_table,
)
from .plan import attention_range, kv_a_rows, latent_columns, new_row_block, q_a_rows
from .simulated import NEG, norm_inputs
from .validate import check_range, sequence_positions

F32 = np.float32


# ---------------------------------------------------------------------------------------------- plan


def rope_pairs(config: MLAConfig, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elements ``(a, b)`` of a ``d_r`` vector that RoPE pair ``i`` rotates together (angle ``i``)."""
    if config.rope_interleaved:
        return 2 * pairs, 2 * pairs + 1
    return pairs, pairs + config.qk_rope_head_dim // 2


def _rotate(xa, xb, cos, sin):
    return xa * cos - xb * sin, xb * cos + xa * sin


# -------------------------------------------------------------------------------------- grid phase 1


def projections_block(b: simulator.Block, cluster: int, config: MLAConfig, batch: int, gm: dict,
                      positions: list[int]):
    """One block of projection cluster ``cluster`` (query head ``cluster``); phases 1 and 2, or with the
    query LoRA phase 1 alone (its query rows are ``q_a_proj``'s, not head ``cluster``'s).

    ``gm`` in: float32 ``hidden``/``residual`` ``[B, H]``, ``norm`` ``[H]``, ``q_proj`` ``[heads*(d_n+d_r),
    H]`` (or ``q_a`` ``[q_lora_rank, H]``), ``kv_a`` ``[L, H]``, ``w_uk`` ``[heads, d_n, r]``, ``rope``
    ``[capacity, 2, d_r/2]``. Out: ``residual_out`` ``[B, H]`` (cluster 0), ``kv_raw`` ``[B, L]`` (kv_a rows
    before the latent norm and RoPE), and ``q_lat`` ``[B, heads, r]``, ``q_pe`` ``[B, heads, d_r]`` (rotated),
    or with the query LoRA ``q_a_raw`` ``[B, q_lora_rank]`` (before its norm).
    """
    C, rank = b.cluster_size, b.cluster_rank
    H, d_n, d_r = config.hidden_size, config.qk_nope_head_dim, config.qk_rope_head_dim
    lora = config.q_lora_rank is not None
    if lora:
        q0, q1 = q_a_rows(config, cluster)
        query = gm["q_a"][q0:q1]
    else:
        q0 = cluster * (d_n + d_r)
        query = gm["q_proj"][q0 : q0 + d_n + d_r]
    q_width = len(query)
    kv0, kv1 = kv_a_rows(config, cluster)
    rows = q_width + kv1 - kv0  # the query rows, then the kv_a rows
    k_slice = H // C
    partial = b.shared_array("partial", (batch, rows + 1), F32)
    q_nope = None if lora else b.shared_array("q_nope", (batch, d_n), F32)

    # -- 1 projections: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2); partial dots --
    b.step("1 projections")
    k0 = rank * k_slice
    h, xs = norm_inputs(gm, k0, k_slice, cluster == 0)
    partial[:, :q_width] = xs @ query[:, k0 : k0 + k_slice].T
    partial[:, q_width:rows] = xs @ gm["kv_a"][kv0:kv1, k0 : k0 + k_slice].T
    partial[:, rows] = (h * h).sum(axis=1, dtype=F32)
    yield b.cluster_sync()  # every block's partials are complete

    # owners (row i: block i mod C) sum the C partials through DSMEM and normalise
    b.step("1 projections")
    peers = [b.map_shared(partial, c) for c in range(C)]
    ss = sum(peer[:, rows] for peer in peers)
    inv_rms = (F32(1) / np.sqrt(ss / F32(H) + F32(config.rms_eps))).astype(F32)[:, None]
    i = np.arange(rank, kv1 - kv0, C)  # kv_a rows
    gm["kv_raw"][:, kv0 + i] = sum(peer[:, q_width + i] for peer in peers) * inv_rms
    if lora:
        i = np.arange(rank, q_width, C)  # q_a rows
        gm["q_a_raw"][:, q0 + i] = sum(peer[:, i] for peer in peers) * inv_rms
        yield b.cluster_sync()  # no block leaves while a peer reads its partials
    else:
        yield from absorb(b, cluster, config, gm, positions, peers, inv_rms, q_nope)


def query_block(b: simulator.Block, cluster: int, config: MLAConfig, batch: int, gm: dict, positions: list[int]):
    """With the query LoRA, one block of query cluster ``cluster`` (query head ``cluster``); phases 1b and 2.

    ``gm`` in: ``q_a_raw`` ``[B, q_lora_rank]`` (launch 1), ``q_a_norm`` ``[q_lora_rank]``, ``q_b``
    ``[heads*(d_n+d_r), q_lora_rank]``, ``w_uk``, ``rope``. Out: ``q_lat``, ``q_pe`` as
    :func:`projections_block` without the LoRA.
    """
    C, rank = b.cluster_size, b.cluster_rank
    d_n, d_r, R = config.qk_nope_head_dim, config.qk_rope_head_dim, config.q_lora_rank
    q_width, a_slice = d_n + d_r, R // C
    partial = b.shared_array("partial", (batch, q_width), F32)
    q_nope = b.shared_array("q_nope", (batch, d_n), F32)

    # -- 1b query: head h's q_b_proj rows on this block's slice of RMSNorm(q_a) -----------------------
    b.step("1b query")
    q_a = gm["q_a_raw"]  # [B, R]: every block reads the whole row for its norm (R values a sequence)
    inv_rms = (F32(1) / np.sqrt((q_a * q_a).mean(axis=1, dtype=F32) + F32(LATENT_RMS_EPS))).astype(F32)[:, None]
    a0 = rank * a_slice
    xs = q_a[:, a0 : a0 + a_slice] * gm["q_a_norm"][a0 : a0 + a_slice]
    q0 = cluster * q_width
    partial[:, :] = xs @ gm["q_b"][q0 : q0 + q_width, a0 : a0 + a_slice].T
    yield b.cluster_sync()  # every block's partials are complete

    peers = [b.map_shared(partial, c) for c in range(C)]
    yield from absorb(b, cluster, config, gm, positions, peers, inv_rms, q_nope)


def absorb(b: simulator.Block, cluster: int, config: MLAConfig, gm: dict, positions: list[int], peers: list,
           inv_rms: np.ndarray, q_nope: np.ndarray):
    """Phase 2 of query head ``cluster``, after the cluster barrier that completes the partials:
    owners sum the C ``peers``' partial query rows (``d_n`` nope, then ``d_r`` rope) times
    ``inv_rms`` ``[B, 1]``; q_pe pairs rotated -> gm ``q_pe``; q_nope pushed into every block's
    ``q_nope`` ``[B, d_n]`` (DSMEM gather); then this block's columns of ``q_lat[h] = q_nope @ W_UK[h]``
    -> gm ``q_lat``."""
    C, rank = b.cluster_size, b.cluster_rank
    d_n, d_r = config.qk_nope_head_dim, config.qk_rope_head_dim

    # -- 2 absorb: owners sum the partials and normalise; q_pe out; q_nope to every block -----------------
    b.step("2 absorb")
    j = np.arange(rank, d_n, C)  # q_nope elements
    x = sum(peer[:, j] for peer in peers) * inv_rms
    for c in range(C):
        b.map_shared(q_nope, c)[:, j] = x
    pair = np.arange(rank, d_r // 2, C)  # q_pe pairs
    ra, rb = rope_pairs(config, pair)
    xa = sum(peer[:, d_n + ra] for peer in peers) * inv_rms
    xb = sum(peer[:, d_n + rb] for peer in peers) * inv_rms
    position = np.array(positions)[:, None]
    cos, sin = gm["rope"][position, 0, pair], gm["rope"][position, 1, pair]
    xa, xb = _rotate(xa, xb, cos, sin)
    gm["q_pe"][:, cluster, ra] = xa
    gm["q_pe"][:, cluster, rb] = xb
    yield b.cluster_sync()  # q_nope is complete in every block; no DSMEM access after this

    b.step("2 absorb")
    col = np.arange(*latent_columns(config, rank, C))  # this block's columns of q_lat[h]
    gm["q_lat"][:, cluster, col] = q_nope[:, :] @ gm["w_uk"][cluster][:, col]


# -------------------------------------------------------------------------------------- grid phase 2


def attention_block(b: simulator.Block, cluster: int, config: MLAConfig, clusters: int, gm: dict,
                    positions: list[int], rounded):
    """One block of attention cluster ``cluster``: cluster ``a = cluster % clusters`` of sequence
    ``seq = cluster // clusters`` (``clusters`` a sequence); phase 3.

    ``gm`` in: ``q_lat``, ``q_pe``, ``kv_raw`` (launch 1), ``kv_norm`` ``[r]``, ``latent`` ``[B, capacity,
    L]`` (the cache, float32), ``rope``. Out: ``state_m``/``state_l`` ``[B, A, heads]`` (base-2 max and
    sum), ``state_acc`` ``[B, A, heads, r]`` (unnormalised), and row ``positions[seq]`` of ``latent``
    (the new row, ``rounded`` to the cache dtype).
    """
    C, rank = b.cluster_size, b.cluster_rank
    heads, r, d_r = config.heads, config.kv_lora_rank, config.qk_rope_head_dim
    seq, a = divmod(cluster, clusters)
    scale = F32(config.softmax_scale * math.log2(math.e))
    state_m = b.shared_array("state_m", (heads,), F32)
    state_l = b.shared_array("state_l", (heads,), F32)
    state_acc = b.shared_array("state_acc", (heads, r), F32)  # 32 KB at DeepSeek-V2-Lite's shapes

    # -- 3 attention: this block's positions of the sequence, all heads; the states merged in the cluster ----
    b.step("3 attention")
    start, end = attention_range(positions[seq], a, rank, clusters, C)
    rows = gm["latent"][seq, start:end]
    if (a, rank) == new_row_block(clusters, C):  # the new row: normalised, rotated, folded in and appended
        raw = gm["kv_raw"][seq]
        inv_rms = F32(1) / np.sqrt((raw[:r] * raw[:r]).mean(dtype=F32) + F32(LATENT_RMS_EPS))
        pair = np.arange(d_r // 2)
        ra, rb = rope_pairs(config, pair)
        cos, sin = gm["rope"][positions[seq], 0, pair], gm["rope"][positions[seq], 1, pair]
        k_pe = np.empty(d_r, F32)
        k_pe[ra], k_pe[rb] = _rotate(raw[r + ra], raw[r + rb], cos, sin)
        new_row = np.concatenate([raw[:r] * inv_rms * gm["kv_norm"], k_pe]).astype(F32)  # unrounded
        rows = np.vstack([rows, new_row])
        gm["latent"][seq, positions[seq]] = rounded(new_row)  # the one block that appends
    if len(rows) == 0:
        state_m[:] = NEG
        state_l[:] = 0
        state_acc[:, :] = 0
    else:
        q = np.concatenate([gm["q_lat"][seq], gm["q_pe"][seq]], axis=1) * scale  # [heads, L]
        scores = q @ rows.T  # [heads, n], base-2 logits
        m = scores.max(axis=1)
        p = np.exp2(scores - m[:, None])
        state_m[:] = m
        state_l[:] = p.sum(axis=1)
        state_acc[:, :] = p @ rows[:, :r]
    yield b.cluster_sync()  # every block's softmax state is complete

    b.step("3 attention")
    col = np.arange(*latent_columns(config, rank, C))  # this block's latent columns in the merge
    m_c = np.stack([b.map_shared(state_m, c)[:] for c in range(C)])  # [C, heads]
    l_c = np.stack([b.map_shared(state_l, c)[:] for c in range(C)])
    a_c = np.stack([b.map_shared(state_acc, c)[:, col] for c in range(C)])  # [C, heads, cols]
    m_max = m_c.max(axis=0)
    w = np.exp2(m_c - m_max)
    if rank == 0:
        gm["state_m"][seq, a] = m_max
        gm["state_l"][seq, a] = (w * l_c).sum(axis=0)
    gm["state_acc"][seq, a][:, col] = (w[..., None] * a_c).sum(axis=0)
    yield b.cluster_sync()  # no block leaves while a peer reads its state


# -------------------------------------------------------------------------------------- grid phase 3


def output_block(b: simulator.Block, cluster: int, config: MLAConfig, batch: int, clusters: int, gm: dict):
    """One block of output cluster ``cluster`` (head ``cluster``); phase 4.

    ``gm`` in: the states of launch 2, ``w_uv`` ``[heads, r, d_v]``, ``o_proj`` ``[H, heads*d_v]``; out:
    ``out_acc`` ``[B, H]`` (added into).
    """
    C, rank = b.cluster_size, b.cluster_rank
    H, d_v = config.hidden_size, config.v_head_dim
    out_rows = H // C
    partial_o = b.shared_array("partial_o", (batch, d_v), F32)

    # -- 4 output: merge head h's states over the clusters, o_lat @ W_UV[h] (partial), o_proj columns ------
    b.step("4 output")
    col = np.arange(*latent_columns(config, rank, C))
    m_c = gm["state_m"][:, :, cluster]  # [B, A]
    m_max = m_c.max(axis=1, keepdims=True)
    w = np.exp2(m_c - m_max)
    l_tot = (w * gm["state_l"][:, :, cluster]).sum(axis=1)  # [B]
    acc = gm["state_acc"][:, :, cluster][:, :, col]  # [B, A, cols]
    o_lat = (w[:, :, None] * acc).sum(axis=1) / l_tot[:, None]  # [B, cols]
    partial_o[:, :] = o_lat @ gm["w_uv"][cluster][col]
    yield b.cluster_sync()  # every block's partial o is complete

    b.step("4 output")
    o = sum(b.map_shared(partial_o, c)[:, :] for c in range(C))  # [B, d_v]
    yield b.cluster_sync()  # no DSMEM access after this

    b.step("4 output")
    r0 = rank * out_rows
    columns = slice(cluster * d_v, (cluster + 1) * d_v)
    gm["out_acc"][:, r0 : r0 + out_rows] += o @ gm["o_proj"][r0 : r0 + out_rows, columns].T


# ---------------------------------------------------------------------------------------------- step


def check_mla_cluster_size(config: MLAConfig, cluster_size: int) -> None:
    """The clusters of launches 1 and 3: 1..16 blocks that split the hidden size (phase 1's slices,
    phase 4's output rows), ``kv_lora_rank`` (:func:`latent_columns`) and the query LoRA
    ``q_lora_rank`` (phase 1b's slices) evenly."""
    _check_divides(config, cluster_size, "cluster_size", ("hidden_size", "kv_lora_rank", "q_lora_rank"))


def check_mla_attention_cluster_size(config: MLAConfig, attention_cluster_size: int) -> None:
    """Launch 2's clusters: 1..16 blocks that split ``kv_lora_rank`` (the merge's columns) evenly."""
    _check_divides(config, attention_cluster_size, "attention_cluster_size", ("kv_lora_rank",))


def _check_divides(config: MLAConfig, cluster_size: int, name: str, dims: tuple[str, ...]) -> None:
    """``cluster_size`` (the parameter ``name``) an int in 1..16 that divides each of ``config``'s
    ``dims`` it has (``q_lora_rank`` is None without a query LoRA)."""
    if not (is_int(cluster_size) and 1 <= cluster_size <= simulator.MAX_CLUSTER_SIZE):
        raise ValueError(f"{name} must be an int in 1..{simulator.MAX_CLUSTER_SIZE}, got {cluster_size!r}")
    for dim in dims:
        size = getattr(config, dim)
        if size is not None and size % cluster_size:
            raise ValueError(f"{name} {cluster_size} does not divide {dim} {size}")


def simulated_mla_step(
    config: MLAConfig,
    weights: MLAWeights,
    hidden: torch.Tensor,
    residual: torch.Tensor,
    cache: LatentCache,
    positions,
    cluster_size: int,
    clusters_for_attention: int | None = None,
    traces: list | None = None,
    attention_cluster_size: int | None = None,
):
    """One MLA decode step on the simulator: ``(out, new_residual)`` ``[B, H]`` in the inputs' dtype,
    and row ``positions[b]`` of ``cache.latent`` written (the new latent row, rounded).

    CPU tensors, shapes and dtypes as for :func:`~clusterlab.fused.mla_reference.mla_reference_step`
    (float16 or bfloat16 for the kernel; float32 works too); ``positions`` an int or one per
    sequence. Clusters of ``cluster_size`` blocks: ``heads`` for the projections and the output;
    ``clusters_for_attention`` a sequence (default ``heads``) of ``attention_cluster_size`` blocks
    (default ``cluster_size``) for the attention. Each launch's
    :class:`~clusterlab.simulator.Trace` is appended to ``traces`` when a list is given (launch 1's
    clusters, then with the query LoRA launch 1b's, then launch 2's, sequence after sequence, then
    launch 3's).
    """
    check_mla_weights(config, weights)
    check_mla_activations(config, weights, hidden, residual, cache)
    check_mla_cluster_size(config, cluster_size)
    attention_cluster_size = cluster_size if attention_cluster_size is None else attention_cluster_size
    check_mla_attention_cluster_size(config, attention_cluster_size)
    heads = config.heads
    clusters = heads if clusters_for_attention is None else clusters_for_attention
    if not (is_int(clusters) and clusters >= 1):
        raise ValueError(f"clusters_for_attention must be a positive int, got {clusters!r}")
    batch, dtype = hidden.shape[0], hidden.dtype
    positions = sequence_positions(positions, batch)
    check_range(positions, cache.capacity)
    r, L = config.kv_lora_rank, config.latent_width

    def f32(t):
        return t.detach().to(torch.float32).numpy()

    def rounded(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=F32)).to(dtype).to(torch.float32).numpy()

    w_uk, w_uv = weights.absorbed(config)
    lora = config.q_lora_rank is not None
    if lora:
        query = {"q_a": f32(weights.q_a_proj), "q_a_norm": f32(weights.q_a_layernorm), "q_b": f32(weights.q_b_proj),
                 "q_a_raw": np.full((batch, config.q_lora_rank), np.nan, F32)}
    else:
        query = {"q_proj": f32(weights.q_proj)}
    gm = query | {
        "hidden": f32(hidden), "residual": f32(residual), "norm": f32(weights.input_layernorm),
        "kv_a": f32(weights.kv_a_proj_with_mqa),
        "kv_norm": f32(weights.kv_a_layernorm), "w_uk": f32(w_uk), "w_uv": f32(w_uv), "o_proj": f32(weights.o_proj),
        "latent": f32(cache.latent).copy(), "rope": mla_rope_table(config, cache.capacity).numpy(),
        "residual_out": np.full((batch, config.hidden_size), np.nan, F32),
        "q_lat": np.full((batch, heads, r), np.nan, F32),
        "q_pe": np.full((batch, heads, config.qk_rope_head_dim), np.nan, F32),
        "kv_raw": np.full((batch, L), np.nan, F32),
        "state_m": np.full((batch, clusters, heads), np.nan, F32),
        "state_l": np.full((batch, clusters, heads), np.nan, F32),
        "state_acc": np.full((batch, clusters, heads, r), np.nan, F32),
        "out_acc": np.zeros((batch, config.hidden_size), F32),
    }

    def run(program, count, *args, title, size=cluster_size):
        for cluster in range(count):
            trace = simulator.launch(program, size, cluster, *args, title=f"{title}, cluster {cluster}")
            if traces is not None:
                traces.append(trace)

    run(projections_block, heads, config, batch, gm, positions, title="MLA projections")
    if lora:
        # grid barrier: q_a_raw complete in global memory
        run(query_block, heads, config, batch, gm, positions, title="MLA query")
    # grid barrier 1: q_lat, q_pe and kv_raw complete in global memory
    run(attention_block, clusters * batch, config, clusters, gm, positions, rounded, title="MLA attention",
        size=attention_cluster_size)
    # grid barrier 2: one softmax state per attention cluster in global memory
    run(output_block, heads, config, batch, clusters, gm, title="MLA output")
    # -- 5 finish: the last block to add into out_acc converts it; the cache row as phase 3 wrote it -----
    rows = torch.arange(batch)
    pos = torch.tensor(positions)
    cache.latent[rows, pos] = torch.from_numpy(gm["latent"][rows.numpy(), pos.numpy()]).to(dtype)
    return torch.from_numpy(gm["out_acc"]).to(dtype), torch.from_numpy(gm["residual_out"]).to(dtype)
