"""Fused causal GQA attention with Exclusive Self Attention (XSA), forward + backward (SPEC §1.9, §7.1-7.2).

Forward (one program per (query block, batch·query head)): online softmax in the exp2 domain over the
key blocks the query block can see (causal blocks above the diagonal are never visited), query head h
reads KV head h // G in place (no expanded K/V). Epilogue: y = acc / l, lse = m + log l; with XSA it
loads the value rows at the query positions, v̂ = v / max(‖v‖, 1e-12), c = y·v̂, z = y − c v̂. It stores
z (in q's dtype), lse and c (fp32).

Backward, three kernels, no float atomics (deterministic):
1. preprocess, one program per (row block, batch·KV head), looping over the G query heads of the group:
   Δ = dz·z (= dy·y), and with XSA dy = dz − (dz·v̂) v̂ and XSA's own gradient into v, summed over the
   group: dv_xsa = P⊥(Σ_g −(c·dz + (dz·v̂) y)) / max(‖v‖, 1e-12) with y = z + c v̂.
2. dK/dV, one program per (key block, batch·KV head), looping over the G query heads and (causal) the
   query blocks at or after the key block; adds dv_xsa before the store.
3. dQ, one program per (query block, batch·query head), looping over the visible key blocks.

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
_V_NORM_EPS = tl.constexpr(1e-12)   # F.normalize's eps for v̂ (SPEC §1.9)


def _configs(gpu, interp_blocks):
    """Autotune configs from (block sizes, num_warps, num_stages) rows, or the interpreter's one config."""
    return autotune_configs([triton.Config(blocks, num_warps=w, num_stages=s) for blocks, w, s in gpu],
                            triton.Config(interp_blocks, num_warps=1, num_stages=1))


# GPU lists, as `python -m kernels.build_check` measured them (sm_90, the pr1579 shapes: D = 46 in a
# 64-wide tile, bf16, with and without XSA; Triton 3.9, and 3.6 as on the GPU machine): no config spills and
# none needs more than 230 registers; the ones that spilled (forward 128/32 w4 with XSA, dK/dV N128/M64,
# dQ 128/32 w4) or sat at 244-255 registers (every 128-row dK/dV tile; with XSA every forward tile of 16
# query rows per warp, on Triton 3.6 even 64/64 w4) are gone. Speed is not measured yet (no GPU): each
# list keeps two shapes for the autotuner to time.
# Forward: BLOCK_M query rows per program, BLOCK_N keys per step (BLOCK_M % BLOCK_N == 0, so the causal
# diagonal is a whole number of key steps). 8 query rows per warp (each 64-row HGMMA's columns are split
# over two warpgroups): 122-144 registers with XSA. The interpreter config keeps BLOCK_M != BLOCK_N so the CPU
# tests exercise the multi-step diagonal.
_FWD_CONFIGS = _configs([({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 3), ({"BLOCK_M": 128, "BLOCK_N": 64}, 16, 3)],
                        {"BLOCK_M": 32, "BLOCK_N": 16})
# dK/dV: BLOCK_N keys per program, BLOCK_M query rows per step (BLOCK_N % BLOCK_M == 0). It holds k, v,
# dk, dv for the whole group loop: 214 and 227 registers with XSA.
_DKDV_CONFIGS = _configs([({"BLOCK_N": 64, "BLOCK_M": 32}, 8, 3), ({"BLOCK_N": 64, "BLOCK_M": 16}, 4, 3)],
                         {"BLOCK_N": 32, "BLOCK_M": 16})
# dQ: BLOCK_M query rows per program, BLOCK_N keys per step (BLOCK_M % BLOCK_N == 0): 157 and 168 registers.
_DQ_CONFIGS = _configs([({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 3), ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3)],
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
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_steps(acc, m_i, l_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
               lo, hi, T, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi). MASKED steps apply the causal / sequence-end mask;
    unmasked steps are the ones every query row of the block fully sees. m_i is in log2 units."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kt, offs_d, stride_kd, T, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
        if MASKED:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, offs_n, stride_vt, offs_d, stride_vd, T, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_block(H, G, BLOCK_M: tl.constexpr):
    """The (query block, batch·query head) a program of the forward / dQ grid owns: (bh, batch b, query
    head h, KV head h // G, first row, row offsets). Heaviest causal blocks (last rows) launch first so
    the short ones fill the tail of the grid."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // G).to(tl.int64)
    start_m = pid_m * BLOCK_M
    return bh, b, h.to(tl.int64), kvh, start_m, start_m + tl.arange(0, BLOCK_M)


@autotune(_FWD_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "XSA"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, C,
              stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
              stride_vb, stride_vt, stride_vh, stride_vd, stride_ob, stride_ot, stride_oh, stride_od,
              T, H, G, qk_scale,
              CAUSAL: tl.constexpr, XSA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, b, h, kvh, start_m, offs_m = _query_block(H, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    Qb = Q + b * stride_qb + h * stride_qh
    Kb = K + b * stride_kb + kvh * stride_kh
    Vb = V + b * stride_vb + kvh * stride_vh
    q = _load_rows(Qb, offs_m, stride_qt, offs_d, stride_qd, T, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CAUSAL:
        # Keys before start_m are visible to every row of the block; the diagonal block needs the mask.
        full_hi = start_m
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, 0, full_hi, T, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_DTYPE, PRECISION)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, full_hi, hi, T, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_DTYPE, PRECISION)

    y = acc / l_i[:, None]
    row_ok = offs_m < T
    bh_row = bh.to(tl.int64) * T + offs_m
    tl.store(LSE + bh_row, (m_i + tl.log2(l_i)) / _LOG2E, mask=row_ok)
    if XSA:
        v_hat, _inv, _big = _unit_value(Vb, offs_m, stride_vt, offs_d, stride_vd, T, HEAD_DIM, BLOCK_D)
        c = tl.sum(y * v_hat, axis=1)
        y = y - c[:, None] * v_hat
        tl.store(C + bh_row, c, mask=row_ok)
    _store_rows(O + b * stride_ob + h * stride_oh, y, offs_m, stride_ot, offs_d, stride_od, T, HEAD_DIM)


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
    pid = tl.program_id(0)
    bkv = tl.program_id(1)
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
def _dkdv_steps(dk, dv, k, v, Q, DY, LSE, DELTA, stride_qt, stride_qd, stride_yt, stride_yd, offs_n, offs_d,
                lo, hi, T, qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head (transposed
    formulation: pᵀ is (keys, queries)). Rows past T load q = dy = 0 and lse = +inf, so p = 0 there."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = _load_rows(Q, offs_m, stride_qt, offs_d, stride_qd, T, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
        lse2 = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dy = _load_rows(DY, offs_m, stride_yt, offs_d, stride_yd, T, HEAD_DIM, BLOCK_D, True).to(DOT_DTYPE)
        dv = tl.dot(p_t.to(DOT_DTYPE), dy, dv, input_precision=PRECISION)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(dy), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=PRECISION)
    return dk, dv


@autotune(_DKDV_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "G", "XSA"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DY, LSE, DELTA, DVX, DK, DV,
                   stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                   stride_vb, stride_vt, stride_vh, stride_vd, stride_yb, stride_yt, stride_yh, stride_yd,
                   stride_gb, stride_gt, stride_gh, stride_gd,
                   T, H, G, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, XSA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """One program per (key block, batch·KV head): dK, dV summed over the G query heads of the group in
    registers (no expanded copies, no atomics). DK, DV and DVX share the strides stride_g*."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    Hkv = H // G
    b = (bkv // Hkv).to(tl.int64)
    kvh = (bkv % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, offs_n, stride_kt, offs_d, stride_kd, T, HEAD_DIM,
                   BLOCK_D, True).to(DOT_DTYPE)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, offs_n, stride_vt, offs_d, stride_vd, T, HEAD_DIM,
                   BLOCK_D, True).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Causal: query rows in [start_n, start_n + BLOCK_N) straddle the diagonal (masked steps); later rows
    # see every key of the block; earlier rows see none and are skipped.
    full_lo = tl.minimum(start_n + BLOCK_N, T) if CAUSAL else 0
    for g in range(G):
        h = kvh * G + g
        Qh = Q + b * stride_qb + h * stride_qh
        DYh = DY + b * stride_yb + h * stride_yh
        row0 = (b * H + h) * T
        if CAUSAL:
            dk, dv = _dkdv_steps(dk, dv, k, v, Qh, DYh, LSE + row0, DELTA + row0, stride_qt, stride_qd,
                                 stride_yt, stride_yd, offs_n, offs_d, start_n, full_lo, T, qk_scale, True,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, DOT_DTYPE, PRECISION)
        dk, dv = _dkdv_steps(dk, dv, k, v, Qh, DYh, LSE + row0, DELTA + row0, stride_qt, stride_qd,
                             stride_yt, stride_yd, offs_n, offs_d, full_lo, T, T, qk_scale, False,
                             HEAD_DIM, BLOCK_D, BLOCK_M, DOT_DTYPE, PRECISION)
    G_base = b * stride_gb + kvh * stride_gh
    if XSA:
        dv += _load_rows(DVX + G_base, offs_n, stride_gt, offs_d, stride_gd, T, HEAD_DIM, BLOCK_D, True)
    _store_rows(DK + G_base, dk * sm_scale, offs_n, stride_gt, offs_d, stride_gd, T, HEAD_DIM)
    _store_rows(DV + G_base, dv, offs_n, stride_gt, offs_d, stride_gd, T, HEAD_DIM)


@triton.jit
def _dq_steps(dq, q, dy, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
              lo, hi, T, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
              PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kt, offs_d, stride_kd, T, HEAD_DIM, BLOCK_D, MASKED).to(DOT_DTYPE)
        v = _load_rows(V, offs_n, stride_vt, offs_d, stride_vd, T, HEAD_DIM, BLOCK_D, MASKED).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(dy, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)
    return dq


# dQ has no XSA switch, but with XSA it reads the projected dy from a dense (B, H, T, D) buffer instead of
# dz's (B, T, H, D) rows: its row stride stride_yt (D vs H·D) keys that case apart.
@autotune(_DQ_CONFIGS, key=["T", "HEAD_DIM", "CAUSAL", "stride_yt"])
@triton.jit
def _attn_bwd_dq(Q, K, V, DY, LSE, DELTA, DQ,
                 stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_vb, stride_vt, stride_vh, stride_vd, stride_yb, stride_yt, stride_yh, stride_yd,
                 stride_gb, stride_gt, stride_gh, stride_gd,
                 T, H, G, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, batch·query head): dQ = scale · Σ_j dS K."""
    bh, b, h, kvh, start_m, offs_m = _query_block(H, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, stride_qd, T, HEAD_DIM,
                   BLOCK_D, True).to(DOT_DTYPE)
    dy = _load_rows(DY + b * stride_yb + h * stride_yh, offs_m, stride_yt, offs_d, stride_yd, T, HEAD_DIM,
                    BLOCK_D, True).to(DOT_DTYPE)
    row = bh.to(tl.int64) * T + offs_m
    lse2 = tl.load(LSE + row, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    Kb = K + b * stride_kb + kvh * stride_kh
    Vb = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        full_hi = start_m
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        hi = T
    dq = _dq_steps(dq, q, dy, lse2, delta, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                   0, full_hi, T, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_DTYPE, PRECISION)
    dq = _dq_steps(dq, q, dy, lse2, delta, Kb, Vb, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
                   full_hi, hi, T, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_DTYPE, PRECISION)
    _store_rows(DQ + b * stride_gb + h * stride_gh, dq * sm_scale, offs_m, stride_gt, offs_d, stride_gd, T,
                HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, xsa: bool,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (z, lse, c) as documented on the custom op below."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    o = empty_output((B, T, H, D), q.dtype, q.device)
    lse = empty_output((B, H, T), torch.float32, q.device)
    c = empty_output((B, H, T) if xsa else (0,), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse, c
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    # Without XSA, C is never touched: pass lse so no kernel argument is an empty (null) pointer.
    _attn_fwd[grid](q, k, v, o, lse, c if xsa else lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    T, H, G, softmax_scale * LOG2E, CAUSAL=causal, XSA=xsa, HEAD_DIM=D,
                    BLOCK_D=pow2_tile(D), **dot_args(q.dtype))
    return o, lse, c


def _attention_backward(dz, q, k, v, o, lse, c, causal: bool, xsa: bool, softmax_scale: float):
    """Launch preprocess, dK/dV and dQ kernels for upstream gradient dz (B, T, H, D): (dq, dk, dv)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    dq = empty_output((B, T, H, D), q.dtype, q.device)
    dk = empty_output((B, T, Hkv, D), k.dtype, k.device)
    dv = empty_output((B, T, Hkv, D), v.dtype, v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    block_d = pow2_tile(D)
    delta = empty_output((B, H, T), torch.float32, q.device)
    if xsa:
        # dy = (I − v̂v̂ᵀ) dz feeds the flash backward; stored (B, H, T, D) so each head's rows are dense.
        dy = empty_output((B, H, T, D), q.dtype, q.device)
        dy_strides = (dy.stride(0), dy.stride(2), dy.stride(1), dy.stride(3))
        dvx = empty_output((B, T, Hkv, D), torch.float32, q.device)
    else:
        dy, dy_strides, dvx = dz, dz.stride(), delta      # no XSA: dy is dz itself; c and dvx unused
        c = delta
    # dk, dv and dv_xsa are fresh contiguous (B, T, Hkv, D) tensors: one set of strides serves all three.
    grid_pre = lambda meta: (triton.cdiv(T, meta["BLOCK"]), B * Hkv)  # noqa: E731
    _bwd_preprocess[grid_pre](o, dz, v, c, dy, delta, dvx, *o.stride(), *dz.stride(), *v.stride(), *dy_strides,
                              *dk.stride(), T, H, G, XSA=xsa, HEAD_DIM=D, BLOCK_D=block_d)
    common = dict(CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, **dot_args(q.dtype))
    qk_scale = softmax_scale * LOG2E
    grid_kv = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)  # noqa: E731
    _attn_bwd_dkdv[grid_kv](q, k, v, dy, lse, delta, dvx, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                            *dy_strides, *dk.stride(), T, H, G, qk_scale, softmax_scale, XSA=xsa, **common)
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq[grid_q](q, k, v, dy, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *dy_strides,
                         *dq.stride(), T, H, G, qk_scale, softmax_scale, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile(fullgraph=True) traces through) and the public op
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("crawler_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, xsa: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z (B,T,H,D) in q.dtype, lse (B,H,T) fp32, c (B,H,T) fp32 with xsa else an empty fp32 tensor)."""
    return _attention_forward(q, k, v, causal, xsa, softmax_scale)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, xsa, softmax_scale):
    B, T, H, D = q.shape
    return (q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32),
            q.new_empty((B, H, T) if xsa else (0,), dtype=torch.float32))


@torch.library.custom_op("crawler_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(dz: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, c: torch.Tensor, causal: bool, xsa: bool,
                      softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    return _attention_backward(dz, q, k, v, o, lse, c, causal, xsa, softmax_scale)


@_attention_bwd_op.register_fake
def _(dz, q, k, v, o, lse, c, causal, xsa, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, xsa, softmax_scale = inputs
    o, lse, c = output
    ctx.save_for_backward(q, k, v, o, lse, c)
    ctx.causal, ctx.xsa, ctx.softmax_scale = causal, xsa, softmax_scale
    ctx.mark_non_differentiable(lse, c)


def _backward(ctx, dz, _dlse, _dc):
    q, k, v, o, lse, c = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dz, q, k, v, o, lse, c, ctx.causal, ctx.xsa, ctx.softmax_scale)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, xsa: bool = False,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Fused softmax attention with grouped KV heads and optional XSA (Triton; same math as
    `kernels.reference.attention`).

    q (B, T, H, D), k/v (B, T, Hkv, D) with H % Hkv == 0, D even and <= 128; float32, float16 or
    bfloat16, one dtype, one device (CUDA, or CPU under TRITON_INTERPRET=1). Any strides are accepted
    (views are read in place, never copied). Query head h attends with KV head h // (H/Hkv); scores are
    scaled by softmax_scale (> 0, default 1/sqrt(D)) and masked causally when `causal`; with `xsa` the
    output is projected off its own normalised value (SPEC §1.9). Returns a contiguous (B, T, H, D)
    tensor in q.dtype; differentiable in q, k, v (deterministic backward).
    """
    check_attention_inputs(q, k, v)
    check_triton_device("attention", "q", q)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: the Triton attention takes float32, float16 or bfloat16, got {q.dtype} "
                        f"(kernels.reference.attention handles float64)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not scale > 0.0 or math.isinf(scale):
        raise ValueError(f"softmax_scale: expected a finite positive number, got {softmax_scale}")
    return _attention_fwd_op(q, k, v, bool(causal), bool(xsa), scale)[0]
