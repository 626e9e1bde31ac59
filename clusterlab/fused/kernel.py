"""The fused decode-attention kernel: one launch per step, one cluster per KV head or part of its query heads.

The phases, their owners and the DSMEM exchanges are drawn in :mod:`clusterlab.fused.plan`; the
simulator model of the same dataflow is :mod:`clusterlab.fused.simulated`, phase for phase.

Inside a block (``warps`` warps), each streaming phase issues every 16-byte load of a step before
using any of them:

- **qkv / o proj** (matrix-vector): a warp step covers ``rows_per_step`` weight rows; a row's
  segment is read by ``lanes_per_row`` lanes, ``chunks_per_lane`` 16-byte chunks each. The lane
  multiplies its chunks by the activation (float32 in shared memory) for every sequence of the
  batch, then the warp reduces: a butterfly that halves the rows each level (reduce-scatter), so
  it costs about one shuffle per row instead of log2(32).
- **attention**: warps split the batch (``warps // batch`` per sequence), then the positions.
  ``head_dim/8`` lanes hold one key (8 dims each), ``32/(head_dim/8)`` keys per warp load; a
  step loads ``keys_per_lane`` keys and values, scores them against the cluster's query heads,
  and folds them into an online softmax (base-2: q is pre-scaled by ``log2(e)/sqrt(head_dim)``).

Nothing streams from device memory while a cluster exchanges partial results, so each streaming
phase's first loads are issued *before* the exchange that precedes it, into registers: the first
cached keys/values (they need no q) before barrier B1, the first W_o step (it needs no o) before
B3. Registers are capped at 128 a thread (16 warps an SM: two blocks of 8 warps or four of 4, see
:attr:`KernelSpec.min_blocks_per_sm`) and every register array is indexed by constants after
unrolling; ``tests/test_fused_kernel.py`` checks the PTX has no local memory and ptxas no spills.

The finish is spread over the cluster ranks: block ``rank`` of every cluster adds into the same
output rows, and the last of those blocks (one per cluster) to arrive converts them (one counter per rank).

Shared memory (float32 words, one dynamic array; the same offsets in every block, so ``mapa``
reaches the peer's copy of a region)::

    xs      [batch, k_slice]              h * norm on this block's hidden slice
    partial [batch, rows + 1]             qkv partial dots; the last column is sum(h^2)
    qkv     [batch, rows]                 q (scaled), k, v after RoPE, pushed by their owners
    scratch m, l [groups, G], acc [groups, G, head_dim]   per key-group softmax states
    state   m, l [batch, G], acc [batch, G, head_dim]     the block's softmax state
    o       [batch, G * head_dim]         merged attention output, pushed by its owners
    red     [warps, batch]                block reduction of sum(h^2)
"""

from __future__ import annotations

import inspect
import math
import textwrap
from dataclasses import dataclass

import numpy as np
from numba import cuda, float32, int32, uint32

from .. import ptx
from .config import AttentionConfig
from .plan import (
    HOPPER,
    DeviceLimits,
    cached_range,
    check_cluster_size,
    check_head_split,
    new_token_rank,
    qkv_row,
    rope_pair,
)

FULL_MASK = 0xFFFFFFFF
#: Stands for -inf in softmax states: exp2(NEG - m) is 0 for any real m, and exp2(NEG - NEG) = 1
#: multiplies a state that is still all zeros.
NEG = np.float32(-1e30)
#: Most 16-byte loads a lane keeps in flight in a matrix-vector step.
LOADS_PER_STEP = 16
#: Registers a thread may use: 16 warps an SM (65536 / (16 * 32)).
REGISTERS_PER_THREAD = 128
#: Most (row, chunk, sequence) dot products one matrix-vector step unrolls; beyond it the
#: compiler leaves loops rolled and register arrays go to local memory.
UNROLLED_DOTS = 32
#: Most float32 accumulators a lane keeps for one matrix-vector step.
ACCUMULATORS = 16


@dataclass(frozen=True)
class KernelSpec:
    """Everything the kernel is specialised on (each distinct spec is one compilation)."""

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

    @classmethod
    def of(cls, config: AttentionConfig, bf16: bool, batch: int, cluster_size: int, warps: int,
           head_split: int = 1, limits: DeviceLimits = HOPPER) -> KernelSpec:
        """The spec of one launch shape on a GPU with ``limits`` (raises where it cannot be built)."""
        check_cluster_size(config, cluster_size)
        check_head_split(config, head_split)
        if warps < batch:
            raise ValueError(f"warps ({warps}) must be at least batch ({batch}): attention gives each sequence a warp")
        spec = cls(config.hidden_size, config.heads, config.kv_heads, config.head_dim,
                   config.rope_style == "neox", bf16, float(config.rms_eps), batch, cluster_size, warps, head_split,
                   config.qkv_bias, limits)
        spec.qkv_tile()  # raises if the hidden slice has no valid tiling
        spec.o_tile()
        if spec.shared_bytes > limits.shared_bytes_per_block:
            raise ValueError(
                f"a block of this shape needs {spec.shared_bytes} bytes of shared memory; the GPU allows "
                f"{limits.shared_bytes_per_block} (use a larger cluster or fewer sequences)"
            )
        return spec

    @property
    def group(self) -> int:
        """Query heads one cluster owns (of the ``heads // kv_heads`` sharing its KV head)."""
        return self.heads // self.kv_heads // self.head_split

    @property
    def clusters(self) -> int:
        return self.kv_heads * self.head_split

    @property
    def rows(self) -> int:
        """W_qkv rows one cluster owns: G query heads, one key head, one value head."""
        return (self.group + 2) * self.head_dim

    @property
    def k_slice(self) -> int:
        return self.hidden_size // self.cluster_size

    @property
    def out_rows(self) -> int:
        return self.hidden_size // self.cluster_size

    @property
    def attn_width(self) -> int:
        """Width of the cluster's attention output (its query heads side by side)."""
        return self.group * self.head_dim

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def min_blocks_per_sm(self) -> int:
        """The launch bound: as many blocks as fit an SM at :data:`REGISTERS_PER_THREAD` registers a
        thread (16 warps: 1, 8 warps: 2, 4 warps: 4) and in its shared memory, so that the GPU can
        place every cluster at once."""
        return self.limits.blocks_per_sm(self.shared_bytes, self.threads, REGISTERS_PER_THREAD)

    def _tile(self, what: str, chunks: int, rows: int):
        """``(lanes_per_row, chunks_per_lane, rows_per_lane, batch_chunk)`` for rows of ``chunks``
        16-byte chunks.

        A row is read by the largest power of two of lanes (up to 32) that divides its chunks
        (Qwen2.5-7B's 448-wide slices: 56 chunks, 8 lanes of 7). Rows per lane grow while a step
        stays within :data:`LOADS_PER_STEP` loads (all issued before use), then the batch is
        taken ``batch_chunk`` sequences at a time (2 where :data:`ACCUMULATORS` and
        :data:`UNROLLED_DOTS` allow and the batch is even, else 1); the loaded words serve every
        chunk. A warp step's rows must tile ``rows`` (a head for the qkv projection, so a step
        never straddles two heads' rows of W_qkv).
        """
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
        chunk = 2 if (self.batch % 2 == 0 and 2 * rows_per_lane <= ACCUMULATORS
                      and 2 * rows_per_lane * per_lane <= UNROLLED_DOTS) else 1
        return lanes, per_lane, rows_per_lane, chunk

    def qkv_tile(self):
        return self._tile("qkv projection", self.k_slice // 8, self.head_dim)

    def o_tile(self):
        return self._tile("output projection", self.attn_width // 8, self.out_rows)

    @property
    def keys_per_lane(self) -> int:
        """Keys (and values) one lane group loads per attention step: fewer when G heads share them,
        and half as many for G >= 2 beyond batch 2 (under 128 registers ptxas spilled 16-96 bytes
        at G = 2, batch 3 and 4, with 4 keys)."""
        keys = max(2, min(8, 8 // self.group))
        return max(2, keys // 2) if self.group >= 2 and self.batch > 2 else keys

    @property
    def key_groups(self) -> int:
        """Lane groups per warp in attention (each holds one key per load)."""
        return 32 // (self.head_dim // 8)

    def smem_layout(self) -> dict[str, int]:
        """Offsets (float32 words) of each shared region, and ``"total"``."""
        g, d, b = self.group, self.head_dim, self.batch
        groups = self.warps * self.key_groups + b  # + one group per sequence for its new token
        sizes = {
            "xs": b * self.k_slice,
            "partial": b * (self.rows + 1),
            "qkv": b * self.rows,
            "scratch_m": groups * g,
            "scratch_l": groups * g,
            "scratch_acc": groups * g * d,
            "state_m": b * g,
            "state_l": b * g,
            "state_acc": b * g * d,
            "o": b * self.attn_width,
            "red": self.warps * b,
        }
        offsets, at = {}, 0
        for name, size in sizes.items():
            offsets[name] = at
            at += (size + 3) // 4 * 4  # keep every region 16-byte aligned
        offsets["total"] = at
        return offsets

    @property
    def shared_bytes(self) -> int:
        return 4 * self.smem_layout()["total"]


def _log2(n: int) -> int:
    assert n & (n - 1) == 0, n
    return n.bit_length() - 1


def _make_gemv(spec: KernelSpec, tile, x_stride: int, out_stride: int, atomic: bool):
    """Device functions for one warp step of a matrix-vector product over ``rows_per_step`` rows.

    ``gemv_load(w, w0, row_stride, lane, wv)`` issues the step's 16-byte loads into the register
    array ``wv``: for ``r < rows_per_step`` the 16-bit row segment
    ``w[w0 + r*row_stride : ... + 8*chunks]``. ``gemv_finish(wv, smem, x0, dst, out0, lane)`` dots
    the rows with ``smem[x0 + b*x_stride : ...]`` for each sequence ``b`` and writes the sums to
    ``dst[out0 + b*out_stride + r]`` (float32), or adds them there atomically where ``atomic``
    (into a global array). Splitting the two lets a caller issue a step's loads
    before a barrier and use them after it. The batch is processed ``batch_chunk`` sequences at
    a time, so every register array is indexed by constants once the loops are unrolled.
    Returns ``(gemv_load, gemv_finish, words)``, ``words`` the length of ``wv`` (uint32).
    """
    lanes, per_lane, rows_per_lane, chunk = tile
    batch, bf16 = spec.batch, spec.bf16
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
    def gemv_finish(wv, smem, x0, dst, out0, lane):
        group, sub = lane // lanes, lane % lanes
        for b0 in range(0, batch, chunk):
            acc = cuda.local.array(accumulators, float32)
            for k in range(accumulators):
                acc[k] = float32(0.0)
            xv = cuda.local.array(x_values, float32)
            for j in range(per_lane):
                for e in range(4):
                    for b in range(chunk):
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
                    if atomic:
                        cuda.atomic.add(dst, out0 + (b0 + b) * out_stride + row, acc[b])
                    else:
                        dst[out0 + (b0 + b) * out_stride + row] = acc[b]

    return gemv_load, gemv_finish, words


def _make_attention(spec: KernelSpec):
    """Device functions for one attention step of a lane group (``head_dim/8`` lanes, one key each load).

    ``kv_load(k_cache, v_cache, row0, t0, end, sub, kv)`` loads keys and values ``t0, t0 + KG, ...``
    (``keys_per_lane`` of them, clamped to ``end - 1``) of the head whose row 0 is ``row0``, 8
    dims at ``sub*8`` each, into the register array ``kv``. ``kv_fold(kv, smem, q0, t0, end, m,
    l_sum, acc)`` scores them against the G query heads at ``smem[q0 + h*head_dim + sub*8 ...]``
    and folds keys ``< end`` into the online softmax state ``m``, ``l_sum`` ``[G]``, ``acc``
    ``[G*8]``. Returns ``(kv_load, kv_fold, words)``.
    """
    G, D, NK, KG = spec.group, spec.head_dim, spec.keys_per_lane, spec.key_groups
    LPK = D // 8
    LOG_LPK = _log2(LPK)
    SCORES = NK * G
    unpack = ptx.bf16x2_to_f32x2 if spec.bf16 else ptx.f16x2_to_f32x2

    @cuda.jit(device=True, inline=True)
    def kv_load(k_cache, v_cache, row0, t0, end, sub, kv):
        for j in range(NK):
            t = min(t0 + j * KG, end - 1)
            kw = ptx.ld_global_nc_v4_no_allocate(k_cache, (row0 + t) * D + sub * 8)
            vw = ptx.ld_global_nc_v4_no_allocate(v_cache, (row0 + t) * D + sub * 8)
            for e in range(4):
                kv[j * 8 + e] = kw[e]
                kv[j * 8 + 4 + e] = vw[e]

    @cuda.jit(device=True, inline=True)
    def kv_fold(kv, smem, q0, t0, end, m, l_sum, acc, sub):
        s = cuda.local.array(SCORES, float32)
        for h in range(G):
            qb = q0 + h * D + sub * 8
            for j in range(NK):
                dot = float32(0.0)
                for e in range(4):
                    k_lo, k_hi = unpack(kv[j * 8 + e])
                    dot += k_lo * smem[qb + 2 * e] + k_hi * smem[qb + 2 * e + 1]
                s[j * G + h] = dot
        for k in range(SCORES):
            for level in range(LOG_LPK):
                s[k] += cuda.shfl_xor_sync(FULL_MASK, s[k], LPK >> (level + 1))
        for h in range(G):
            m_new = m[h]
            for j in range(NK):
                if t0 + j * KG < end:
                    m_new = max(m_new, s[j * G + h])
            scale = math.exp2(m[h] - m_new)
            m[h] = m_new
            l_sum[h] *= scale
            for e in range(8):
                acc[h * 8 + e] *= scale
            for j in range(NK):
                p = math.exp2(s[j * G + h] - m_new) if t0 + j * KG < end else float32(0.0)
                s[j * G + h] = p
                l_sum[h] += p
        for j in range(NK):
            for e in range(4):
                v_lo, v_hi = unpack(kv[j * 8 + 4 + e])
                for h in range(G):
                    acc[h * 8 + 2 * e] += s[j * G + h] * v_lo
                    acc[h * 8 + 2 * e + 1] += s[j * G + h] * v_hi

    return kv_load, kv_fold, NK * 8


def build_kernel(spec: KernelSpec):
    """The kernel for ``spec``, ready for ``cuda.jit`` compilation (see :func:`kernel_signature`).

    Arguments (16-bit tensors passed as flat int16 views, row-major)::

        hidden, residual  [batch * hidden_size]        inputs
        norm              [hidden_size]
        w_qkv             [qkv_rows * hidden_size]
        qkv_bias          [qkv_rows] (read only when spec.bias)
        w_o               [hidden_size * heads * head_dim]
        k_cache, v_cache  [batch * kv_heads * capacity * head_dim]   row positions[b] of sequence b written
        rope              [capacity * 2 * head_dim/2] float32        cos, sin per position
        out, residual_out [batch * hidden_size]        outputs
        out_acc           [batch * hidden_size] float32  zero on entry, left zero on exit
        arrivals          [cluster_size] int32           zero on entry, left zero on exit
        positions         [batch] int32                  each sequence's new token
        capacity          int32

    A position outside ``0 .. capacity-1`` makes its sequence attend to nothing, write no cache
    row and read no RoPE angle: its q, k and v are NaN, and so are its outputs.
    """
    H, NQ, NKV, D, S = spec.hidden_size, spec.heads, spec.kv_heads, spec.head_dim, spec.head_split
    G, ROWS, C, B, W, T = spec.group, spec.rows, spec.cluster_size, spec.batch, spec.warps, spec.threads
    KS, OUT_ROWS, AW = spec.k_slice, spec.out_rows, spec.attn_width
    NEOX, BF16, BIAS = spec.neox, spec.bf16, spec.bias
    NAN = np.float32(np.nan)
    EPS = np.float32(spec.rms_eps)
    INV_H = np.float32(1.0 / H)
    Q_SCALE = np.float32(math.log2(math.e) / math.sqrt(D))
    HALF = D // 2
    PAIRS = ROWS // 2
    LPK = D // 8  # lanes per key
    KG = spec.key_groups
    KEYS_PER_STEP = KG * spec.keys_per_lane
    GROUPS = W * KG
    WPB = W // B  # attention warps per sequence
    NEW_RANK = new_token_rank(C)
    NEW_GROUP = GROUPS  # groups NEW_GROUP + b hold sequence b's new token
    L = spec.smem_layout()
    XS, PART, QKV = L["xs"], L["partial"], L["qkv"]
    SC_M, SC_L, SC_ACC = L["scratch_m"], L["scratch_l"], L["scratch_acc"]
    ST_M, ST_L, ST_ACC = L["state_m"], L["state_l"], L["state_acc"]
    O, RED = L["o"], L["red"]
    qkv_tile, o_tile = spec.qkv_tile(), spec.o_tile()
    QKV_STEP = (32 // qkv_tile[0]) * qkv_tile[2]  # rows a warp step covers
    QKV_STEPS = ROWS // QKV_STEP
    O_STEP = (32 // o_tile[0]) * o_tile[2]
    O_STEPS = OUT_ROWS // O_STEP

    unpack = ptx.bf16x2_to_f32x2 if BF16 else ptx.f16x2_to_f32x2
    to_bits = ptx.f32_to_bf16 if BF16 else ptx.f32_to_f16
    to_f32 = ptx.bf16_to_f32 if BF16 else ptx.f16_to_f32
    qkv_load, qkv_finish, QKV_WORDS = _make_gemv(spec, qkv_tile, x_stride=KS, out_stride=ROWS + 1, atomic=False)
    o_load, o_finish, O_WORDS = _make_gemv(spec, o_tile, x_stride=AW, out_stride=H, atomic=True)
    kv_load, kv_fold, KV_WORDS = _make_attention(spec)
    ACC_N = G * 8
    TAIL = 16  # out_acc elements a thread of the last block loads at once
    row_of = cuda.jit(device=True, inline=True)(qkv_row)
    pair_of = cuda.jit(device=True, inline=True)(rope_pair)
    range_of = cuda.jit(device=True, inline=True)(cached_range)

    @cuda.jit(device=True, inline=True)
    def cached_rows(positions, b, capacity):
        """Sequence ``b``'s cached rows (its position), or -1 where the position is out of range."""
        position = positions[b]
        return position if 0 <= position < capacity else -1

    def fused_decode_attention(hidden, residual, norm, w_qkv, qkv_bias, w_o, k_cache, v_cache, rope,
                               out, residual_out, out_acc, arrivals, positions, capacity):
        smem = cuda.shared.array(0, float32)
        last = cuda.shared.array(1, int32)
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        rank = ptx.cluster_rank()
        c_id = cuda.blockIdx.x // C  # this cluster: its query heads c_id*G .., W_o columns c_id*AW ..
        g = c_id // S  # its KV head
        k0 = rank * KS

        # -- 1 qkv: h = hidden + residual on this block's slice; xs = h * norm; sum(h^2) ----------
        for b in range(B):
            ss = float32(0.0)
            for c in range(tid, KS // 8, T):
                at = b * H + k0 + c * 8
                hx = ptx.ld_global_nc_v4_no_allocate(hidden, at)
                rx = ptx.ld_global_nc_v4_no_allocate(residual, at)
                nx = ptx.ld_global_nc_v4_no_allocate(norm, k0 + c * 8)
                for e in range(4):
                    h_lo, h_hi = unpack(hx[e])
                    r_lo, r_hi = unpack(rx[e])
                    n_lo, n_hi = unpack(nx[e])
                    s_lo, s_hi = h_lo + r_lo, h_hi + r_hi
                    if c_id == 0:
                        residual_out[at + 2 * e] = to_bits(s_lo)
                        residual_out[at + 2 * e + 1] = to_bits(s_hi)
                    ss += s_lo * s_lo + s_hi * s_hi
                    smem[XS + b * KS + c * 8 + 2 * e] = s_lo * n_lo
                    smem[XS + b * KS + c * 8 + 2 * e + 1] = s_hi * n_hi
            for offset in (16, 8, 4, 2, 1):
                ss += cuda.shfl_xor_sync(FULL_MASK, ss, offset)
            if lane == 0:
                smem[RED + warp * B + b] = ss
        # The first W_qkv step's loads go out once the input slice is in, not ahead of it: the
        # input loads would queue behind the weights' and hold up the whole phase.
        wq = cuda.local.array(QKV_WORDS, uint32)
        step = warp
        if step < QKV_STEPS:
            qkv_load(w_qkv, row_of(NQ, NKV, D, S, c_id, step * QKV_STEP) * H + k0, H, lane, wq)
        cuda.syncthreads()
        if tid < B:
            total = float32(0.0)
            for w in range(W):
                total += smem[RED + w * B + tid]
            smem[PART + tid * (ROWS + 1) + ROWS] = total
        while step < QKV_STEPS:
            qkv_finish(wq, smem, XS, smem, PART + step * QKV_STEP, lane)
            step += W
            if step < QKV_STEPS:
                qkv_load(w_qkv, row_of(NQ, NKV, D, S, c_id, step * QKV_STEP) * H + k0, H, lane, wq)
        # First attention loads (cached keys need no q): warps split the batch, WPB per sequence.
        kg, sub = lane // LPK, lane % LPK
        b_att = warp // WPB
        cached = cached_rows(positions, b_att, capacity) if b_att < B else 0
        start, end = range_of(max(cached, 0), rank, C)
        row0 = (b_att * NKV + g) * capacity
        kv_steps = (end - start + KEYS_PER_STEP - 1) // KEYS_PER_STEP if b_att < B else 0
        step = warp % WPB
        kv = cuda.local.array(KV_WORDS, uint32)
        if step < kv_steps:
            kv_load(k_cache, v_cache, row0, start + step * KEYS_PER_STEP + kg, end, sub, kv)
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B1: every block's partials are complete

        # -- 2 rope: owners sum the partials, normalise, rotate, push q/k/v, append k/v -----------
        for item in range(tid, ((PAIRS - rank + C - 1) // C) * B, T):
            pair = rank + (item // B) * C
            b = item % B
            position = cached_rows(positions, b, capacity)
            ra, rb, angle = pair_of(D, NEOX, pair)
            slot = ra // D
            xa = float32(0.0)
            xb = float32(0.0)
            ss = float32(0.0)
            base = PART + b * (ROWS + 1)
            for c in range(C):
                xa += ptx.remote_load(smem, base + ra, c)
                xb += ptx.remote_load(smem, base + rb, c)
                ss += ptx.remote_load(smem, base + ROWS, c)
            inv_rms = float32(1.0) / math.sqrt(ss * INV_H + EPS)
            xa *= inv_rms
            xb *= inv_rms
            if BIAS:
                xa += to_f32(qkv_bias[row_of(NQ, NKV, D, S, c_id, ra)])
                xb += to_f32(qkv_bias[row_of(NQ, NKV, D, S, c_id, rb)])
            valid = position >= 0
            if not valid:
                xa, xb, position = NAN, NAN, 0
            if slot <= G:  # query and key heads are rotated
                cos = rope[(position * 2) * HALF + angle]
                sin = rope[(position * 2 + 1) * HALF + angle]
                xa, xb = xa * cos - xb * sin, xb * cos + xa * sin
            if slot < G:
                xa *= Q_SCALE
                xb *= Q_SCALE
            for c in range(C):
                ptx.remote_store(smem, QKV + b * ROWS + ra, c, xa)
                ptx.remote_store(smem, QKV + b * ROWS + rb, c, xb)
            if slot >= G and c_id % S == 0 and valid:  # the first cluster of the KV head appends its row
                row = ((b * NKV + g) * capacity + position) * D - slot * D
                if slot == G:
                    k_cache[row + ra] = to_bits(xa)
                    k_cache[row + rb] = to_bits(xb)
                else:
                    v_cache[row + ra] = to_bits(xa)
                    v_cache[row + rb] = to_bits(xb)
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B2: q, k, v of the new token are in every block

        # -- 3 attention over this block's cached positions (online softmax per key group) ------
        m = cuda.local.array(G, float32)
        l_sum = cuda.local.array(G, float32)
        acc = cuda.local.array(ACC_N, float32)
        for h in range(G):
            m[h] = NEG
            l_sum[h] = float32(0.0)
            for e in range(8):
                acc[h * 8 + e] = float32(0.0)
        while step < kv_steps:
            t0 = start + step * KEYS_PER_STEP + kg
            kv_fold(kv, smem, QKV + b_att * ROWS, t0, end, m, l_sum, acc, sub)
            step += WPB
            if step < kv_steps:
                kv_load(k_cache, v_cache, row0, t0 + WPB * KEYS_PER_STEP, end, sub, kv)
        group = warp * KG + kg
        for h in range(G):
            if sub == 0:
                smem[SC_M + group * G + h] = m[h]
                smem[SC_L + group * G + h] = l_sum[h]
            for e in range(8):
                smem[SC_ACC + (group * G + h) * D + sub * 8 + e] = acc[h * 8 + e]
        if rank == NEW_RANK and warp < B:  # the new token of sequence `warp`, from shared memory
            b = warp
            for h in range(G):
                dot = float32(0.0)
                for i in range(lane, D, 32):
                    dot += smem[QKV + b * ROWS + h * D + i] * smem[QKV + b * ROWS + G * D + i]
                for offset in (16, 8, 4, 2, 1):
                    dot += cuda.shfl_xor_sync(FULL_MASK, dot, offset)
                if lane == 0:
                    smem[SC_M + (NEW_GROUP + b) * G + h] = dot
                    smem[SC_L + (NEW_GROUP + b) * G + h] = float32(1.0)
                for i in range(lane, D, 32):
                    smem[SC_ACC + ((NEW_GROUP + b) * G + h) * D + i] = smem[QKV + b * ROWS + (G + 1) * D + i]
        cuda.syncthreads()
        # Block merge: sequence b's state is its WPB warps' key groups (+ its new token).
        for e in range(tid, B * G * D, T):
            b, h, dim = e // (G * D), e // D % G, e % D
            q0 = b * WPB * KG
            m_max = NEG
            for q in range(q0, q0 + WPB * KG):
                m_max = max(m_max, smem[SC_M + q * G + h])
            if rank == NEW_RANK:
                m_max = max(m_max, smem[SC_M + (NEW_GROUP + b) * G + h])
            l_tot = float32(0.0)
            a_tot = float32(0.0)
            for q in range(q0, q0 + WPB * KG):
                wgt = math.exp2(smem[SC_M + q * G + h] - m_max)
                l_tot += wgt * smem[SC_L + q * G + h]
                a_tot += wgt * smem[SC_ACC + (q * G + h) * D + dim]
            if rank == NEW_RANK:
                wgt = math.exp2(smem[SC_M + (NEW_GROUP + b) * G + h] - m_max)
                l_tot += wgt
                a_tot += wgt * smem[SC_ACC + ((NEW_GROUP + b) * G + h) * D + dim]
            smem[ST_ACC + e] = a_tot
            if dim == 0:
                smem[ST_M + b * G + h] = m_max
                smem[ST_L + b * G + h] = l_tot
        # First o-proj loads (weights need no o).
        wo = cuda.local.array(O_WORDS, uint32)
        step = warp
        if step < O_STEPS:
            o_load(w_o, (rank * OUT_ROWS + step * O_STEP) * (NQ * D) + c_id * AW, NQ * D, lane, wo)
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B3: every block's softmax state is complete

        # -- 4 merge: owners combine the C states of their elements of o and push them ------------
        for k in range(tid, (B * AW - rank + C - 1) // C, T):
            e = rank + k * C
            b, hd = e // AW, e % AW
            bh = b * G + hd // D
            m_max = NEG
            for c in range(C):
                m_max = max(m_max, ptx.remote_load(smem, ST_M + bh, c))
            l_tot = float32(0.0)
            a_tot = float32(0.0)
            for c in range(C):
                wc = math.exp2(ptx.remote_load(smem, ST_M + bh, c) - m_max)
                l_tot += wc * ptx.remote_load(smem, ST_L + bh, c)
                a_tot += wc * ptx.remote_load(smem, ST_ACC + b * AW + hd, c)
            result = a_tot / l_tot
            for c in range(C):
                ptx.remote_store(smem, O + e, c, result)
        ptx.cluster_arrive_release()
        ptx.cluster_wait_acquire()  # B4: o is complete in every block; no DSMEM access after this

        # -- 5 o proj: this block's output rows, the cluster's heads' columns --------------------
        while step < O_STEPS:
            o_finish(wo, smem, O, out_acc, rank * OUT_ROWS + step * O_STEP, lane)
            step += W
            if step < O_STEPS:
                o_load(w_o, (rank * OUT_ROWS + step * O_STEP) * (NQ * D) + c_id * AW, NQ * D, lane, wo)

        # -- 6 finish: the last of the blocks (one a cluster) adding into rows [rank * OUT_ROWS, ...) converts them
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            last[0] = 1 if cuda.atomic.add(arrivals, rank, 1) == NKV * S - 1 else 0
        cuda.syncthreads()
        if last[0] == 1:
            # Every red.add is ordered before its block's arrival, and this block never read
            # out_acc before, so plain loads after the fence see the sums. TAIL loads a thread
            # are issued before any is used: one round trip per TAIL * T elements.
            cuda.threadfence()
            vals = cuda.local.array(TAIL, float32)
            for base in range(0, B * OUT_ROWS, TAIL * T):
                for u in range(TAIL):
                    e = base + u * T + tid
                    at = e // OUT_ROWS * H + rank * OUT_ROWS + e % OUT_ROWS
                    vals[u] = out_acc[at] if e < B * OUT_ROWS else float32(0.0)
                for u in range(TAIL):
                    e = base + u * T + tid
                    if e < B * OUT_ROWS:
                        at = e // OUT_ROWS * H + rank * OUT_ROWS + e % OUT_ROWS
                        out[at] = to_bits(vals[u])
                        out_acc[at] = float32(0.0)
            if tid == 0:
                arrivals[rank] = 0

    return fused_decode_attention


def kernel_variant(edits):
    """:func:`build_kernel` recompiled from its own source with ``edits`` applied: for measurement.

    ``edits``: ``(old, new)`` pairs of source text; each ``old`` must occur exactly once in
    ``build_kernel``'s source (an ``AssertionError`` says which did not), so a change to the kernel
    breaks the variant loudly instead of measuring something else. The edited source compiles in
    this module's namespace. The ablations of :mod:`clusterlab.bench.fused_ablation` and the
    timestamps of :mod:`clusterlab.bench.fused_timeline` are such edits.
    """
    source = textwrap.dedent(inspect.getsource(build_kernel))
    for old, new in edits:
        assert source.count(old) == 1, f"kernel source changed: {old!r} is not found exactly once"
        source = source.replace(old, new)
    namespace = dict(globals())
    exec(compile(source, __file__, "exec"), namespace)
    return namespace["build_kernel"]


def kernel_signature():
    """Numba argument types of :func:`build_kernel`'s kernel."""
    from numba import types

    h = types.int16[::1]
    return (h, h, h, h, h, h, h, h, types.float32[::1], h, h, types.float32[::1], types.int32[::1],
            types.int32[::1], types.int32)
