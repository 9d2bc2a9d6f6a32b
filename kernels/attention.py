"""Fused causal GQA attention with Exclusive Self Attention (XSA), forward + backward (docs/math.md §1.9,
§7.1-7.2), dense or varlen (packed documents), with queries that may trail a longer key sequence.

Sequences. A program works on one *sequence* of query rows and the key rows they attend to:
  * dense: batch row b of q (B, Tq, H, D) over k/v (B, Tk, Hkv, D), Tq <= Tk. The queries sit at the last
    Tq key positions (query i at position Tk - Tq + i: the new tokens after a KV cache), so causal masking
    is aligned bottom-right; XSA uses the values at the queries' own positions.
  * varlen: segment s = the packed rows [cu_seqlens[s], cu_seqlens[s+1]) of q (1, total, H, D) and k/v
    (1, total, Hkv, D) (FA3's convention); a segment attends to itself only. The grid covers
    (query block < max_seqlen) x (segment·head), folded into grid dimension x (`launch_grid`: any
    segment count launches); each program walks its segment's query blocks in a grid-stride loop
    (blocks pid, pid + blocks per segment, ...), so a program whose first block starts past its
    segment's end does no work, and a document of n rows costs ~n²/2 (not total²/2) whatever the other
    segments are. The loop also makes max_seqlen a grid size only, never a correctness condition: an
    under-estimate serialises the longer segments' blocks instead of leaving rows unwritten. Empty
    segments (trailing repeated ends: fixed-capacity cu_seqlens) cost one load each.
    Why a grid with early exit rather than a precomputed block schedule: the grid needs no extra kernel
    and no data-dependent size (so no host sync and nothing to recompile when cu_seqlens changes), and
    its empty programs cost two loads each.

Forward (one program per (query block, sequence·query head)): online softmax in the exp2 domain over the
key blocks the query block can see (causal blocks above the diagonal are never visited), query head h
reads KV head h // G in place (no expanded K/V), its scores scaled by softmax_scale · q_gain[h] (one
multiply, the gain folded into the scale). Epilogue: y = acc / l, lse = m + log l; with XSA it
loads the value rows at the query positions, v̂ = v / max(‖v‖, 1e-12), c = y·v̂, z = y − c v̂. It stores
z (in q's dtype), lse and c (fp32).

Backward, three kernels, no float atomics (deterministic):
1. preprocess, one program per (row block, batch·KV head), looping over the G query heads of the group:
   Δ = dz·z (= dy·y), and with XSA dy = dz − (dz·v̂) v̂ and XSA's own gradient into v, summed over the
   group: dv_xsa = P⊥(Σ_g −(c·dz + (dz·v̂) y)) / max(‖v‖, 1e-12) with y = z + c v̂. It is row-wise, so
   it needs no sequence bounds: a varlen batch is one row of `total` rows to it.
2. dK/dV, one program per (key block, sequence·KV head), looping over the G query heads and (causal) the
   query blocks that can see the key block; adds dv_xsa before the store.
3. dQ, one program per (query block, sequence·query head), looping over the visible key blocks; with
   q_gain it also writes the program's share of d q_gain[h] (scale · Σ q · Σ_j dS K) to its own slot,
   which the host sums in a fixed order.

Inputs may be any strided view (the model passes views of linear outputs): kernels take every stride,
so q/k/v/dz are never copied. Head dims that are not powers of two run in the next power-of-two tile
(at least 16, the smallest tl.dot size) with masked loads. Matmuls accumulate in fp32; their operand
dtype and precision follow the one rule of `kernels.utils.dot_args` (bf16/fp16 on tensor cores, fp32 as
exact as torch's float32 matmul setting, fp32 operands under the interpreter).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (
    KERNEL_DTYPES,
    autotune,
    autotune_configs,
    check_attention_inputs,
    check_triton_device,
    dot_args,
    empty_output,
    pow2_tile,
)

LOG2E = math.log2(math.e)   # softmax runs on exp2 with the scale folded into one multiply
_LOG2E = tl.constexpr(LOG2E)
_V_NORM_EPS = tl.constexpr(1e-12)   # F.normalize's eps for v̂ (docs/math.md §1.9)


def _configs(gpu, interp_blocks):
    """Autotune configs from (block sizes, num_warps, num_stages) rows, or the interpreter's one config."""
    return autotune_configs([triton.Config(blocks, num_warps=w, num_stages=s) for blocks, w, s in gpu],
                            triton.Config(interp_blocks, num_warps=1, num_stages=1))


def _dense_and_varlen(dense, varlen, interp_blocks):
    """autotune() arguments (configs + prune_configs_by) for a kernel whose dense and varlen specialisations
    need different lists (the varlen segment loop costs registers, so a tile that fits dense can spill
    varlen): the autotuner holds the union and the prune keeps the rows of the launch's own case (VARLEN)."""
    def row(c):
        return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages
    rows = {False: {row(c) for c in _configs(dense, interp_blocks)},
            True: {row(c) for c in _configs(varlen, interp_blocks)}}
    union = list({row(c): c for c in _configs(dense + varlen, interp_blocks)}.values())

    def prune(configs, named_args, **kwargs):
        case = bool({**named_args, **kwargs}["VARLEN"])
        return [c for c in configs if row(c) in rows[case]]
    return {"configs": union, "prune_configs_by": {"early_config_prune": prune}}


# GPU lists, as `python -m kernels.build_check` measured them (sm_90, the pr1579 shapes: D = 46 in a
# 64-wide tile, bf16, with and without XSA, dense and varlen; Triton 3.9, and 3.6 as on the GPU machine): no
# config spills on either version; the ones that spilled (forward 128/32 w4 with XSA, dK/dV N128/M64, dQ 128/32
# w4; varlen: forward 128/64 w16, dK/dV 64/32 w8 with XSA, dQ 64/64 w4; on 3.6 every 4-warp 32-key dK/dV tile)
# or sat at 244-255 registers (every 128-row dK/dV tile; with XSA every forward tile of 16 query rows per warp)
# are gone. Speed is not measured yet (no GPU): each list keeps two shapes for the autotuner to time.
# Forward: BLOCK_M query rows per program, BLOCK_N keys per step (BLOCK_M % BLOCK_N == 0, so the causal
# diagonal is a whole number of key steps). 8 query rows per warp (each 64-row HGMMA's columns are split
# over two warpgroups): 128 registers with XSA dense. Varlen with XSA: 64/32 needs 219 registers on Triton
# 3.6, 64/64 242 on 3.9 and 254 on 3.6 (no spill; every 4-warp or 128-row varlen tile spilled or sat at 255).
# The interpreter config keeps BLOCK_M != BLOCK_N so the CPU tests exercise the multi-step diagonal.
_FWD_TUNING = _dense_and_varlen(
    [({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3), ({"BLOCK_M": 128, "BLOCK_N": 64}, 16, 3)],
    [({"BLOCK_M": 64, "BLOCK_N": 32}, 8, 3), ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3)],
    {"BLOCK_M": 32, "BLOCK_N": 16})
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per step (BLOCK_N % BLOCK_M == 0). It holds k, v,
# dk, dv for the whole group loop.
_DKDV_TUNING = _dense_and_varlen(
    [({"BLOCK_N": 64, "BLOCK_M": 32}, 8, 3), ({"BLOCK_N": 64, "BLOCK_M": 16}, 8, 3)],
    [({"BLOCK_N": 64, "BLOCK_M": 16}, 8, 3), ({"BLOCK_N": 32, "BLOCK_M": 16}, 8, 3),
     ({"BLOCK_N": 32, "BLOCK_M": 32}, 8, 3)],
    {"BLOCK_N": 32, "BLOCK_M": 16})
# dQ: BLOCK_M query rows per program, BLOCK_N keys per step (BLOCK_M % BLOCK_N == 0).
_DQ_TUNING = _dense_and_varlen(
    [({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 3), ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3)],
    [({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 3), ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3)],
    {"BLOCK_M": 32, "BLOCK_N": 16})
# Preprocess: BLOCK rows per program (elementwise, memory-bound). 16 rows x 4 warps need 150 registers with
# XSA (32 rows needed 255: five fp32 row tiles live across the group loop) and 56 without.
_PRE_CONFIGS = _configs([({"BLOCK": 16}, 4, 1)], {"BLOCK": 16})


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(base, offs_r, stride_r, offs_d, stride_d, n_rows, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile of a (rows, HEAD_DIM) strided matrix; padded dims (and, with
    MASK_ROWS, rows >= n_rows) read as 0."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_ROWS:
        mask = offs_r[:, None] < n_rows
        if BLOCK_D != HEAD_DIM:
            mask = mask & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_rows(base, val, offs_r, stride_r, offs_d, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """Store a (rows, BLOCK_D) tile into a (n_rows, HEAD_DIM) strided matrix, dropping the padding."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    tl.store(ptrs, val.to(base.dtype.element_ty),
             mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _unit_value(V, offs_t, stride_t, offs_d, stride_d, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """v̂ = v / max(‖v‖, eps) (fp32) for the rows offs_t of one KV head, with 1 / max(‖v‖, eps) and
    whether ‖v‖ > eps (F.normalize's clamp: below eps the map is v / eps, with no projection)."""
    v = _load_rows(V, offs_t, stride_t, offs_d, stride_d, T, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    norm = tl.sqrt(tl.sum(v * v, axis=1))
    inv = 1.0 / tl.maximum(norm, _V_NORM_EPS)
    return v * inv[:, None], inv, norm > _V_NORM_EPS


# ----------------------------------------------------------------------------------------------
# Sequences: which rows a program works on (dense batch row or varlen segment)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sequence(CU, seq, T, T_K, VARLEN: tl.constexpr):
    """(batch index, first row, query rows, key rows) of sequence `seq`. Dense: batch row `seq` of the
    (B, T, ·, D) queries and (B, T_K, ·, D) keys, from row 0. Varlen: segment `seq`, the packed rows
    [cu[seq], cu[seq + 1]) of batch 0, for queries and keys alike, clamped to the T packed rows (offsets
    are not checked per call: clamping keeps bad ones from reading or writing outside the tensors)."""
    if VARLEN:
        b = seq.to(tl.int64) * 0
        first = tl.minimum(tl.maximum(tl.load(CU + seq), 0), T)
        len_q = tl.minimum(tl.maximum(tl.load(CU + seq + 1), first), T) - first
        len_k = len_q
        start = first.to(tl.int64)
    else:
        b = seq.to(tl.int64)
        start = b * 0
        len_q = T
        len_k = T_K
    return b, start, len_q, len_k


@triton.jit
def _head_rows(X, b, start, head, stride_b, stride_t, stride_h):
    """Pointer to row `start` of batch b, head `head` of a (B, rows, heads, D) strided tensor."""
    return X + b * stride_b + start * stride_t + head * stride_h


@triton.jit
def _program_ids(GRID_ROWS, BLOCK: tl.constexpr):
    """(block, sequence·head, blocks per sequence·head) of this program in a `launch_grid` grid: the
    blocks of one sequence·head are consecutive program ids."""
    blocks = tl.maximum(tl.cdiv(GRID_ROWS, BLOCK), 1)
    pid = tl.program_id(0)
    return pid % blocks, pid // blocks, blocks


@triton.jit
def _query_program(Q, K, V, CU, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, T, T_K, H, G, GRID_ROWS, VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """What a program of the forward / dQ grid owns: pointers to its sequence's first q row (query head
    h) and k, v rows (KV head h // G), its (B, H, T) row index for lse-like buffers, (batch, first row,
    h) for the other tensors, the sequence's query and key rows, its first query block, the grid's
    blocks per sequence·head (the varlen loop's stride) and its block's position among them (a slot
    index). Heaviest causal blocks (last rows) launch first so the short ones fill the tail."""
    block, sh, blocks = _program_ids(GRID_ROWS, BLOCK_M)
    pid_m = blocks - 1 - block
    h = (sh % H).to(tl.int64)
    b, start, len_q, len_k = _sequence(CU, sh // H, T, T_K, VARLEN)
    Qs = _head_rows(Q, b, start, h, stride_qb, stride_qt, stride_qh)
    Ks = _head_rows(K, b, start, h // G, stride_kb, stride_kt, stride_kh)
    Vs = _head_rows(V, b, start, h // G, stride_vb, stride_vt, stride_vh)
    return Qs, Ks, Vs, (b * H + h) * T + start, b, start, h, len_q, len_k, pid_m, blocks, block


@triton.jit
def _visible_keys(start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block [start_m, start_m + BLOCK_M): keys [0, full_hi) are seen by every row of
    the block (no mask), keys [full_hi, hi) need the causal / sequence-end mask. Query i sits at key
    position i + len_k - len_q and causally sees the keys up to there. full_hi is a whole number of
    BLOCK_N steps."""
    if CAUSAL:
        first_pos = start_m + len_k - len_q          # key position of the block's first row
        full_hi = (first_pos // BLOCK_N) * BLOCK_N
        hi = tl.minimum(first_pos + BLOCK_M, len_k)
    else:
        full_hi = (len_k // BLOCK_N) * BLOCK_N
        hi = len_k
    return full_hi, hi


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, q_pos, offs_d,
               lo, hi, len_k, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi). MASKED steps apply the causal / sequence-end mask
    (q_pos: the query rows' key positions); unmasked steps are the ones every query row of the block
    fully sees. m_i is in log2 units."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kt, offs_d, stride_kd, len_k, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
        if MASKED:
            keep = offs_n[None, :] < len_k
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, offs_n, stride_vt, offs_d, stride_vd, len_k, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_block(Qs, Ks, Vs, Os, LSEs, Cs, stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
               stride_ot, stride_od, start_m, len_q, len_k, qk_scale,
               CAUSAL: tl.constexpr, XSA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block of one sequence and head (pointers at the sequence's first row): z, lse, c."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Qs, offs_m, stride_qt, offs_d, stride_qd, len_q, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_hi, hi = _visible_keys(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    q_pos = offs_m + (len_k - len_q)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, Ks, Vs, stride_kt, stride_kd, stride_vt, stride_vd,
                               q_pos, offs_d, 0, full_hi, len_k, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_DTYPE, PRECISION)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, Ks, Vs, stride_kt, stride_kd, stride_vt, stride_vd,
                               q_pos, offs_d, full_hi, hi, len_k, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_DTYPE, PRECISION)

    y = acc / l_i[:, None]
    row_ok = offs_m < len_q
    tl.store(LSEs + offs_m, (m_i + tl.log2(l_i)) / _LOG2E, mask=row_ok)
    if XSA:
        # The queries' own values: key rows len_k - len_q + i.
        v_hat, _inv, _big = _unit_value(Vs + (len_k - len_q) * stride_vt, offs_m, stride_vt, offs_d,
                                        stride_vd, len_q, HEAD_DIM, BLOCK_D)
        c = tl.sum(y * v_hat, axis=1)
        y = y - c[:, None] * v_hat
        tl.store(Cs + offs_m, c, mask=row_ok)
    _store_rows(Os, y, offs_m, stride_ot, offs_d, stride_od, len_q, HEAD_DIM)


@autotune(**_FWD_TUNING, key=["T", "HEAD_DIM", "CAUSAL", "XSA", "VARLEN"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, C, CU, GAIN,
              stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
              stride_vb, stride_vt, stride_vh, stride_vd, stride_ob, stride_ot, stride_oh, stride_od,
              T, T_K, H, G, GRID_ROWS, qk_scale,
              CAUSAL: tl.constexpr, XSA: tl.constexpr, VARLEN: tl.constexpr, HAS_GAIN: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """T: query rows per batch row (varlen: total), T_K: key rows, GRID_ROWS: the query rows the grid
    covers per sequence·head. LSE and C are (B, H, T); GAIN (H,) the per-head score gains (HAS_GAIN)."""
    Qs, Ks, Vs, row0, b, start, h, len_q, len_k, pid_m, blocks, _ = _query_program(
        Q, K, V, CU, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
        stride_vh, T, T_K, H, G, GRID_ROWS, VARLEN, BLOCK_M)
    if HAS_GAIN:
        qk_scale = qk_scale * tl.load(GAIN + h).to(tl.float32)
    Os = _head_rows(O, b, start, h, stride_ob, stride_ot, stride_oh)
    if VARLEN:
        for start_m in range(pid_m * BLOCK_M, len_q, blocks * BLOCK_M):
            _fwd_block(Qs, Ks, Vs, Os, LSE + row0, C + row0, stride_qt, stride_qd, stride_kt, stride_kd,
                       stride_vt, stride_vd, stride_ot, stride_od, start_m, len_q, len_k, qk_scale, CAUSAL, XSA,
                       HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)
    else:
        _fwd_block(Qs, Ks, Vs, Os, LSE + row0, C + row0, stride_qt, stride_qd, stride_kt, stride_kd,
                   stride_vt, stride_vd, stride_ot, stride_od, pid_m * BLOCK_M, len_q, len_k, qk_scale, CAUSAL,
                   XSA, HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@autotune(_PRE_CONFIGS, key=[])
@triton.jit
def _bwd_preprocess(O, DZ, V, C, DY, DELTA, DVX,
                    stride_ob, stride_ot, stride_oh, stride_od, stride_zb, stride_zt, stride_zh, stride_zd,
                    stride_vb, stride_vt, stride_vh, stride_vd, stride_yb, stride_yt, stride_yh, stride_yd,
                    stride_xb, stride_xt, stride_xh, stride_xd,
                    T, H, G,
                    XSA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """Per (row block, batch·KV head): Δ for each query head of the group; with XSA also dy and the
    group-summed XSA gradient into v (deterministic: one program owns each dv_xsa row)."""
    pid, bkv, _ = _program_ids(T, BLOCK)
    Hkv = H // G
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    offs_t = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    if XSA:
        v_hat, inv, big = _unit_value(V + b * stride_vb + kvh * stride_vh, offs_t, stride_vt, offs_d,
                                      stride_vd, T, HEAD_DIM, BLOCK_D)
        dvhat = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for g in range(G):
        h = kvh * G + g
        row = (b * H + h) * T + offs_t
        dz = _load_rows(DZ + b * stride_zb + h * stride_zh, offs_t, stride_zt, offs_d, stride_zd, T,
                        HEAD_DIM, BLOCK_D, True).to(tl.float32)
        z = _load_rows(O + b * stride_ob + h * stride_oh, offs_t, stride_ot, offs_d, stride_od, T,
                       HEAD_DIM, BLOCK_D, True).to(tl.float32)
        tl.store(DELTA + row, tl.sum(dz * z, axis=1), mask=offs_t < T)
        if XSA:
            c = tl.load(C + row, mask=offs_t < T, other=0.0)
            dz_v = tl.sum(dz * v_hat, axis=1)
            _store_rows(DY + b * stride_yb + h * stride_yh, dz - dz_v[:, None] * v_hat, offs_t, stride_yt,
                        offs_d, stride_yd, T, HEAD_DIM)
            y = z + c[:, None] * v_hat
            dvhat -= c[:, None] * dz + dz_v[:, None] * y
    if XSA:
        # Backward of v̂ = v / max(‖v‖, eps): project off v̂ when ‖v‖ > eps (else the clamp is constant).
        radial = tl.where(big, tl.sum(dvhat * v_hat, axis=1), 0.0)
        dvx = (dvhat - radial[:, None] * v_hat) * inv[:, None]
        _store_rows(DVX + b * stride_xb + kvh * stride_xh, dvx, offs_t, stride_xt, offs_d, stride_xd, T,
                    HEAD_DIM)


@triton.jit
def _dkdv_steps(dk, dv, k, v, Q, DY, LSE, DELTA, stride_qt, stride_qd, stride_yt, stride_yd, key_row, offs_d,
                lo, hi, len_q, qk_scale, gain, MASKED: tl.constexpr, HAS_GAIN: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query rows [lo, hi) of one query head (transposed
    formulation: pᵀ is (keys, queries)). MASKED steps keep query i for key j only if i >= key_row_j
    (key_row: the keys' positions in query rows, j - (len_k - len_q)). Rows past len_q load q = dy = 0
    and lse = +inf, so p = 0 there. qk_scale includes the head's gain; dK's terms are scaled by it
    (HAS_GAIN) here and by softmax_scale at the store."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < len_q
        q = _load_rows(Q, offs_m, stride_qt, offs_d, stride_qd, len_q, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
        lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= key_row[:, None], p_t, 0.0)
        dy = _load_rows(DY, offs_m, stride_yt, offs_d, stride_yd, len_q, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
        dv = tl.dot(p_t.to(DOT_DTYPE), dy, dv, input_precision=PRECISION)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(dy), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_GAIN:
            ds_t = ds_t * gain
        dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_block(Qs, Ks, Vs, DYs, DVXs, DKs, DVs, LSE, DELTA, GAIN, stride_qt, stride_qd, stride_qh, stride_kt,
                stride_kd, stride_vt, stride_vd, stride_yt, stride_yd, stride_yh, stride_gt, stride_gd, row0,
                row_stride_h, kvh, start_n, len_q, len_k, G, qk_scale, sm_scale,
                CAUSAL: tl.constexpr, XSA: tl.constexpr, HAS_GAIN: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """dK, dV of one key block of one sequence and KV head, summed over the G query heads of the group in
    registers (no expanded copies, no atomics). Qs/DYs point at query head 0 of the sequence's first row;
    LSE/DELTA at (head 0, that row), row_stride_h apart per head."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(Ks, offs_n, stride_kt, offs_d, stride_kd, len_k, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
    v = _load_rows(Vs, offs_n, stride_vt, offs_d, stride_vd, len_k, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    key_row = offs_n - (len_k - len_q)               # each key's position in query rows
    # Causal: query rows [lo, full_lo) straddle the block's diagonal (masked steps, rounded up to whole
    # BLOCK_M steps so the two loops never overlap); later rows see every key of the block; earlier rows
    # see none and are skipped. Keys before the first query (a KV cache) are seen by every row.
    if CAUSAL:
        lo = tl.maximum(start_n - (len_k - len_q), 0)
        diag_rows = tl.maximum(start_n + BLOCK_N - (len_k - len_q) - lo, 0)
        full_lo = tl.minimum(lo + ((diag_rows + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, len_q)
    else:
        lo = 0
        full_lo = 0
    for g in range(G):
        h = kvh * G + g
        Qh = Qs + h * stride_qh
        DYh = DYs + h * stride_yh
        row_h = row0 + h * row_stride_h
        gain = 1.0
        if HAS_GAIN:
            gain = tl.load(GAIN + h).to(tl.float32)
        if CAUSAL:
            dk, dv = _dkdv_steps(dk, dv, k, v, Qh, DYh, LSE + row_h, DELTA + row_h, stride_qt, stride_qd,
                                 stride_yt, stride_yd, key_row, offs_d, lo, full_lo, len_q, qk_scale * gain, gain,
                                 True, HAS_GAIN, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_DTYPE, PRECISION)
        dk, dv = _dkdv_steps(dk, dv, k, v, Qh, DYh, LSE + row_h, DELTA + row_h, stride_qt, stride_qd,
                             stride_yt, stride_yd, key_row, offs_d, full_lo, len_q, len_q, qk_scale * gain, gain,
                             False, HAS_GAIN, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_DTYPE, PRECISION)
    if XSA:
        dv += _load_rows(DVXs, offs_n, stride_gt, offs_d, stride_gd, len_k, HEAD_DIM, BLOCK_D, True)
    _store_rows(DKs, dk * sm_scale, offs_n, stride_gt, offs_d, stride_gd, len_k, HEAD_DIM)
    _store_rows(DVs, dv, offs_n, stride_gt, offs_d, stride_gd, len_k, HEAD_DIM)


@autotune(**_DKDV_TUNING, key=["T", "HEAD_DIM", "CAUSAL", "G", "XSA", "VARLEN"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DY, LSE, DELTA, DVX, DK, DV, CU, GAIN,
                   stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                   stride_vb, stride_vt, stride_vh, stride_vd, stride_yb, stride_yt, stride_yh, stride_yd,
                   stride_gb, stride_gt, stride_gh, stride_gd,
                   T, T_K, H, G, GRID_ROWS, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, XSA: tl.constexpr, VARLEN: tl.constexpr, HAS_GAIN: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One program per (key block, sequence·KV head); GRID_ROWS: the key rows the grid covers per
    sequence·KV head. DK, DV and DVX (B, T_K, Hkv, D) share the strides stride_g*; DVX is 0 at keys no
    query sits on (a KV cache's rows)."""
    pid_n, skv, blocks = _program_ids(GRID_ROWS, BLOCK_N)
    Hkv = H // G
    kvh = (skv % Hkv).to(tl.int64)
    b, start, len_q, len_k = _sequence(CU, skv // Hkv, T, T_K, VARLEN)
    Qs = _head_rows(Q, b, start, 0, stride_qb, stride_qt, stride_qh)
    Ks = _head_rows(K, b, start, kvh, stride_kb, stride_kt, stride_kh)
    Vs = _head_rows(V, b, start, kvh, stride_vb, stride_vt, stride_vh)
    DYs = _head_rows(DY, b, start, 0, stride_yb, stride_yt, stride_yh)
    G_base = b * stride_gb + start * stride_gt + kvh * stride_gh
    row0 = b * H * T + start
    if VARLEN:
        for start_n in range(pid_n * BLOCK_N, len_k, blocks * BLOCK_N):
            _dkdv_block(Qs, Ks, Vs, DYs, DVX + G_base, DK + G_base, DV + G_base, LSE, DELTA, GAIN, stride_qt,
                        stride_qd, stride_qh, stride_kt, stride_kd, stride_vt, stride_vd, stride_yt, stride_yd,
                        stride_yh, stride_gt, stride_gd, row0, T, kvh, start_n, len_q, len_k, G, qk_scale, sm_scale,
                        CAUSAL, XSA, HAS_GAIN, HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, BLOCK_N, BLOCK_M)
    else:
        _dkdv_block(Qs, Ks, Vs, DYs, DVX + G_base, DK + G_base, DV + G_base, LSE, DELTA, GAIN, stride_qt, stride_qd,
                    stride_qh, stride_kt, stride_kd, stride_vt, stride_vd, stride_yt, stride_yd, stride_yh,
                    stride_gt, stride_gd, row0, T, kvh, pid_n * BLOCK_N, len_q, len_k, G, qk_scale, sm_scale,
                    CAUSAL, XSA, HAS_GAIN, HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION, BLOCK_N, BLOCK_M)


@triton.jit
def _dq_steps(dq, q, dy, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, q_pos, offs_d,
              lo, hi, len_k, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
              PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi) (q_pos: the rows' key positions)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kt, offs_d, stride_kd, len_k, HEAD_DIM, BLOCK_D, MASKED).to(DOT_DTYPE)
        v = _load_rows(V, offs_n, stride_vt, offs_d, stride_vd, len_k, HEAD_DIM, BLOCK_D, MASKED).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            keep = offs_n[None, :] < len_k
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= q_pos[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(dy, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_block(Qs, Ks, Vs, DYs, DQs, LSEs, DELTAs, stride_qt, stride_qd, stride_kt, stride_kd, stride_vt, stride_vd,
              stride_yt, stride_yd, stride_gt, stride_gd, start_m, len_q, len_k, qk_scale, dq_scale,
              CAUSAL: tl.constexpr, HAS_GAIN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ = dq_scale · Σ_j dS K of one query block of one sequence and head (dq_scale = softmax_scale ·
    the head's gain). Returns the rows' q · Σ_j dS K (BLOCK_M,) (with HAS_GAIN: their share of the
    gain's gradient, over softmax_scale; else 0)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < len_q
    q = _load_rows(Qs, offs_m, stride_qt, offs_d, stride_qd, len_q, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
    dy = _load_rows(DYs, offs_m, stride_yt, offs_d, stride_yd, len_q, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
    lse2 = tl.load(LSEs + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTAs + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_hi, hi = _visible_keys(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    q_pos = offs_m + (len_k - len_q)
    dq = _dq_steps(dq, q, dy, lse2, delta, Ks, Vs, stride_kt, stride_kd, stride_vt, stride_vd, q_pos, offs_d,
                   0, full_hi, len_k, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_DTYPE, PRECISION)
    dq = _dq_steps(dq, q, dy, lse2, delta, Ks, Vs, stride_kt, stride_kd, stride_vt, stride_vd, q_pos, offs_d,
                   full_hi, hi, len_k, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_DTYPE, PRECISION)
    _store_rows(DQs, dq * dq_scale, offs_m, stride_gt, offs_d, stride_gd, len_q, HEAD_DIM)
    dgain = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GAIN:
        dgain = tl.sum(q.to(tl.float32) * dq, axis=1)
    return dgain


# dQ has no XSA switch, but with XSA it reads the projected dy from a dense (B, H, T, D) buffer instead of
# dz's (B, T, H, D) rows: its row stride stride_yt (D vs H·D) keys that case apart.
@autotune(**_DQ_TUNING, key=["T", "HEAD_DIM", "CAUSAL", "stride_yt", "VARLEN"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DY, LSE, DELTA, DQ, CU, GAIN, DGAIN,
                 stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_vb, stride_vt, stride_vh, stride_vd, stride_yb, stride_yt, stride_yh, stride_yd,
                 stride_gb, stride_gt, stride_gh, stride_gd,
                 T, T_K, H, G, GRID_ROWS, qk_scale, sm_scale, gain_slots,
                 CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_GAIN: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, sequence·query head). With HAS_GAIN each program also writes its
    share of the gain's gradient to DGAIN[sequence·head, its block] (gain_slots per row; the host sums
    them, deterministically)."""
    Qs, Ks, Vs, row0, b, start, h, len_q, len_k, pid_m, blocks, block = _query_program(
        Q, K, V, CU, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
        stride_vh, T, T_K, H, G, GRID_ROWS, VARLEN, BLOCK_M)
    DYs = _head_rows(DY, b, start, h, stride_yb, stride_yt, stride_yh)
    DQs = _head_rows(DQ, b, start, h, stride_gb, stride_gt, stride_gh)
    dq_scale = sm_scale
    if HAS_GAIN:
        gain = tl.load(GAIN + h).to(tl.float32)
        qk_scale = qk_scale * gain
        dq_scale = sm_scale * gain
    if VARLEN:
        dgain = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_m in range(pid_m * BLOCK_M, len_q, blocks * BLOCK_M):
            dgain += _dq_block(Qs, Ks, Vs, DYs, DQs, LSE + row0, DELTA + row0, stride_qt, stride_qd, stride_kt,
                               stride_kd, stride_vt, stride_vd, stride_yt, stride_yd, stride_gt, stride_gd, start_m,
                               len_q, len_k, qk_scale, dq_scale, CAUSAL, HAS_GAIN, HEAD_DIM, BLOCK_D, DOT_DTYPE,
                               PRECISION, BLOCK_M, BLOCK_N)
    else:
        dgain = _dq_block(Qs, Ks, Vs, DYs, DQs, LSE + row0, DELTA + row0, stride_qt, stride_qd, stride_kt, stride_kd,
                          stride_vt, stride_vd, stride_yt, stride_yd, stride_gt, stride_gd, pid_m * BLOCK_M, len_q,
                          len_k, qk_scale, dq_scale, CAUSAL, HAS_GAIN, HEAD_DIM, BLOCK_D, DOT_DTYPE, PRECISION,
                          BLOCK_M, BLOCK_N)
    if HAS_GAIN:
        sh = tl.program_id(0) // blocks
        tl.store(DGAIN + sh.to(tl.int64) * gain_slots + block, tl.sum(dgain) * sm_scale)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _sequences(B: int, T: int, T_K: int, cu_seqlens: torch.Tensor | None,
               max_seqlen: int | None) -> tuple[int, int, int]:
    """(sequences, query rows, key rows) the grids cover: dense (B, T, T_K); varlen (segments,
    max_seqlen, max_seqlen), max_seqlen being the packed row count T when not given (no segment is
    longer, and reading the longest from cu_seqlens would be a host sync)."""
    if cu_seqlens is None:
        return B, T, T_K
    rows = T if max_seqlen is None else min(max_seqlen, T)
    return cu_seqlens.numel() - 1, rows, rows


def padded_head_dim(head_dim: int) -> int:
    """The head width to lay q/k/v out with for full-width loads: head_dim rounded up to a multiple of 8
    elements (16 bytes in bf16/fp16), e.g. 46 -> 48. Heads zero-padded to it, with softmax_scale kept at
    1/sqrt(head_dim), give the same attention padded with zeros (docs/ops.md "Head dims")."""
    return head_dim + (-head_dim) % 8


# CUDA's grid limits: dimension x holds up to 2^31 - 1 programs, y and z 65,535 each.
GRID_X_LIMIT = 2**31 - 1


def launch_grid(rows: int, block: int, sequences: int, heads: int) -> tuple[int]:
    """The grid of an attention kernel: max(1, ⌈rows / block⌉) blocks for each (sequence, head), all in
    grid dimension x (limit 2^31 - 1), so any segment count launches (in dimension y, limited to 65,535,
    sequences·heads failed past 4,095 segments of 16 heads). The kernels split a program id back into
    (block, sequence·head) with `_program_ids`."""
    programs = max(1, triton.cdiv(rows, block)) * sequences * heads
    if programs > GRID_X_LIMIT:
        raise ValueError(f"attention: {programs} programs ({sequences} sequences x {heads} heads x "
                         f"{max(1, triton.cdiv(rows, block))} blocks of {block} rows) exceed CUDA's grid limit "
                         f"{GRID_X_LIMIT}")
    return (programs,)


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                       max_seqlen: int | None, causal: bool, xsa: bool, softmax_scale: float,
                       q_gain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (z, lse, c) as documented on the custom op below."""
    B, T, H, D = q.shape
    T_K, Hkv = k.shape[1], k.shape[2]
    o = empty_output((B, T, H, D), q.dtype, q.device)
    lse = empty_output((B, H, T), torch.float32, q.device)
    c = empty_output((B, H, T) if xsa else (0,), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse, c
    seqs, q_rows, _ = _sequences(B, T, T_K, cu_seqlens, max_seqlen)
    grid = lambda meta: launch_grid(q_rows, meta["BLOCK_M"], seqs, H)  # noqa: E731
    # Without XSA, C is never touched, nor CU when dense, nor GAIN without q_gain: pass lse so no kernel
    # argument is an empty (null) pointer.
    _attn_fwd[grid](q, k, v, o, lse, c if xsa else lse, lse if cu_seqlens is None else cu_seqlens,
                    lse if q_gain is None else q_gain,
                    *q.stride(), *k.stride(), *v.stride(), *o.stride(), T, T_K, H, H // Hkv, q_rows,
                    softmax_scale * LOG2E, CAUSAL=causal, XSA=xsa, VARLEN=cu_seqlens is not None,
                    HAS_GAIN=q_gain is not None, HEAD_DIM=D, BLOCK_D=pow2_tile(D), **dot_args(q.dtype))
    return o, lse, c


def _smallest_block(tuning: dict, name: str) -> int:
    """The smallest value of block size `name` over a kernel's configs (sizes per-program buffers)."""
    return min(c.kwargs[name] for c in tuning["configs"])


def _attention_backward(dz, q, k, v, o, lse, c, cu_seqlens, max_seqlen, causal: bool, xsa: bool,
                        softmax_scale: float, q_gain):
    """Launch preprocess, dK/dV and dQ kernels for upstream gradient dz (B, T, H, D): (dq, dk, dv, dgain)."""
    B, T, H, D = q.shape
    T_K, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    dq = empty_output((B, T, H, D), q.dtype, q.device)
    dk = empty_output((B, T_K, Hkv, D), k.dtype, k.device)
    dv = empty_output((B, T_K, Hkv, D), v.dtype, v.device)
    no_gain = q.new_empty((0,), dtype=torch.float32)
    if dq.numel() == 0:          # no query: keys, values and gains get no gradient
        return dq, dk.zero_(), dv.zero_(), no_gain if q_gain is None else torch.zeros_like(q_gain)
    block_d = pow2_tile(D)
    delta = empty_output((B, H, T), torch.float32, q.device)
    cached = T_K - T             # keys before the first query (dense only): a KV cache
    if xsa:
        # dy = (I − v̂v̂ᵀ) dz feeds the flash backward; stored (B, H, T, D) so each head's rows are dense.
        dy = empty_output((B, H, T, D), q.dtype, q.device)
        dy_strides = (dy.stride(0), dy.stride(2), dy.stride(1), dy.stride(3))
        # dv_xsa lives on the queries' own key rows; cached rows get none.
        dvx = (torch.zeros if cached else empty_output)((B, T_K, Hkv, D), dtype=torch.float32, device=q.device)
        v_own, dvx_own = v[:, cached:], dvx[:, cached:]
    else:
        dy, dy_strides, dvx = dz, dz.stride(), delta      # no XSA: dy is dz itself; c and dvx unused
        c, v_own, dvx_own = delta, v, delta
    # dk, dv and dv_xsa are fresh contiguous (B, T_K, Hkv, D) tensors: one set of strides serves all three.
    # The preprocess is row-wise: it sees a varlen batch as one row of `total` rows.
    grid_pre = lambda meta: launch_grid(T, meta["BLOCK"], B, Hkv)  # noqa: E731
    _bwd_preprocess[grid_pre](o, dz, v_own, c, dy, delta, dvx_own, *o.stride(), *dz.stride(), *v_own.stride(),
                              *dy_strides, *dk.stride(), T, H, G, XSA=xsa, HEAD_DIM=D, BLOCK_D=block_d)
    seqs, q_rows, k_rows = _sequences(B, T, T_K, cu_seqlens, max_seqlen)
    cu = lse if cu_seqlens is None else cu_seqlens
    gain = lse if q_gain is None else q_gain
    common = dict(CAUSAL=causal, VARLEN=cu_seqlens is not None, HAS_GAIN=q_gain is not None, HEAD_DIM=D,
                  BLOCK_D=block_d, **dot_args(q.dtype))
    qk_scale = softmax_scale * LOG2E
    grid_kv = lambda meta: launch_grid(k_rows, meta["BLOCK_N"], seqs, Hkv)  # noqa: E731
    _attn_bwd_dkdv[grid_kv](q, k, v, dy, lse, delta, dvx, dk, dv, cu, gain, *q.stride(), *k.stride(), *v.stride(),
                            *dy_strides, *dk.stride(), T, T_K, H, G, k_rows, qk_scale, softmax_scale, XSA=xsa,
                            **common)
    # The gain's gradient: one partial sum per dQ program, in slots sized for the smallest BLOCK_M (so any
    # config's grid fits), zero where a config launches fewer programs; summed here in a fixed order.
    gain_slots = max(1, triton.cdiv(q_rows, _smallest_block(_DQ_TUNING, "BLOCK_M"))) if q_gain is not None else 0
    dgain_parts = torch.zeros((seqs * H * gain_slots,), dtype=torch.float32, device=q.device)
    grid_q = lambda meta: launch_grid(q_rows, meta["BLOCK_M"], seqs, H)  # noqa: E731
    _attn_bwd_dq[grid_q](q, k, v, dy, lse, delta, dq, cu, gain, dgain_parts if q_gain is not None else lse,
                         *q.stride(), *k.stride(), *v.stride(), *dy_strides, *dq.stride(), T, T_K, H, G, q_rows,
                         qk_scale, softmax_scale, gain_slots, **common)
    if q_gain is None:
        return dq, dk, dv, no_gain
    return dq, dk, dv, dgain_parts.view(seqs, H, gain_slots).sum((0, 2)).to(q_gain.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile(fullgraph=True) traces through) and the public op
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("crawler_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                      max_seqlen: int | None, causal: bool, xsa: bool, softmax_scale: float,
                      q_gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B,T,H,D), k/v (B,T_K,Hkv,D) (varlen: B = 1 and cu_seqlens int32), q_gain None or (H,) ->
    (z (B,T,H,D) in q.dtype, lse (B,H,T) fp32, c (B,H,T) fp32 with xsa else an empty fp32 tensor). Output
    shapes never depend on cu_seqlens' values or max_seqlen, so new values of either need no new graph."""
    return _attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, xsa, softmax_scale, q_gain)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, xsa, softmax_scale, q_gain=None):
    B, T, H, D = q.shape
    return (q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty((B, H, T) if xsa else (0,), dtype=torch.float32))


@torch.library.custom_op("crawler_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(dz: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, c: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None,
                      causal: bool, xsa: bool, softmax_scale: float, q_gain: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dgain): contiguous, in the dtypes of q, k, v; dgain (H,) in q_gain's dtype (an empty
    fp32 tensor without q_gain)."""
    return _attention_backward(dz, q, k, v, o, lse, c, cu_seqlens, max_seqlen, causal, xsa, softmax_scale, q_gain)


@_attention_bwd_op.register_fake
def _(dz, q, k, v, o, lse, c, cu_seqlens, max_seqlen, causal, xsa, softmax_scale, q_gain=None):
    dgain = q.new_empty((0,), dtype=torch.float32) if q_gain is None else q_gain.new_empty(q_gain.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgain


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, xsa, softmax_scale, *gain = inputs
    o, lse, c = output
    ctx.save_for_backward(q, k, v, o, lse, c, cu_seqlens, gain[0] if gain else None)
    ctx.max_seqlen, ctx.causal, ctx.xsa, ctx.softmax_scale = max_seqlen, causal, xsa, softmax_scale
    ctx.mark_non_differentiable(lse, c)


def _backward(ctx, dz, _dlse, _dc):
    q, k, v, o, lse, c, cu_seqlens, q_gain = ctx.saved_tensors
    dq, dk, dv, dgain = _attention_bwd_op(dz, q, k, v, o, lse, c, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.xsa,
                                          ctx.softmax_scale, q_gain)
    return dq, dk, dv, None, None, None, None, None, None if q_gain is None else dgain


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, xsa: bool = False,
              softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None, q_gain: torch.Tensor | None = None, layout: str = "bthd",
              return_lse: bool = False):
    """Fused softmax attention with grouped KV heads, optional XSA and per-head score gains (Triton; same
    math and contract as `kernels.reference.attention`, see docs/ops.md).

    Dense: q (B, Tq, H, D), k/v (B, Tk, Hkv, D) with Tq <= Tk; the queries are the last Tq positions
    (Tq < Tk: new tokens after a KV cache; causal masking is aligned bottom-right and XSA uses
    v[:, Tk - Tq:]). layout="bhtd" takes SDPA's (B, H, T, D) instead and returns that layout (a transposed
    view of a contiguous (B, T, H, D) result, so `.transpose(1, 2).reshape(B, T, H * D)` copies nothing);
    in the default layout a call whose shapes fit only (B, H, T, D) is refused, naming the layout.
    Varlen (`cu_seqlens` given): q (total, H, D), k/v (total, Hkv, D), or the same with a leading 1;
    cu_seqlens int32 (num_docs + 1,) on q's device, 0 = cu[0] <= ... <= cu[-1] = total (trailing
    repeated ends = empty segments, for fixed-capacity padding); each segment attends to itself only.
    `max_seqlen` (varlen only) sizes the grid: at least the longest segment for full parallelism (a
    smaller value is still correct, only slower); when absent, the packed row count (correct, but with
    many segments most programs then start past their segment's end: pass it, e.g. the sequence length).
    No call reads a tensor's values (no host sync): cu_seqlens' values are the caller's to get right
    (crawler.documents checks them where it builds them); offsets outside [0, total] are clamped.
    H % Hkv == 0, D even and <= 128; float32, float16 or bfloat16, one dtype, one device (CUDA, or CPU
    under TRITON_INTERPRET=1). Any strides are accepted (views are read in place, never copied). Query
    head h attends with KV head h // (H/Hkv); scores are softmax_scale (> 0, default 1/sqrt(D)) ·
    q_gain[h] (an (H,) float tensor, default 1; folded into the kernels' scale, not a pass over q) · q·k,
    masked causally when `causal`; with `xsa` the output is projected off its own normalised value
    (docs/math.md §1.9). Returns a tensor of q's shape in q.dtype, differentiable in q, k, v and q_gain
    (deterministic backward, no float atomics); with `return_lse`, (out, lse): lse the log-sum-exp of each
    row's scaled scores, float32 (B, H, Tq) (varlen: (H, total), or (1, H, total) for 4-D inputs), not
    differentiable.
    """
    check_attention_inputs(q, k, v, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                           q_gain=q_gain, layout=layout)
    check_triton_device("attention", "q", q)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: the Triton attention takes float32, float16 or bfloat16, got {q.dtype} "
                        f"(kernels.reference.attention handles float64)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if layout == "bhtd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    packed = cu_seqlens is not None and q.dim() == 3
    if packed:
        q, k, v = q[None], k[None], v[None]
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    out, lse, _ = _attention_fwd_op(q, k, v, cu_seqlens, max_seqlen, bool(causal), bool(xsa), scale, q_gain)
    if packed:
        out, lse = out[0], lse[0]
    if layout == "bhtd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
