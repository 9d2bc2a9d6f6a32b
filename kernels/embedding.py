"""Fused input embedding: token + BigramHash + rms_norm + SmearGate, forward and backward (docs/math.md
§1.5, §1.6, §7.3). `embed` is a drop-in for `kernels.reference.embed`.

Forward, one program per block of tokens, fp32 math throughout:
    h_t  = (prev_t * 92821 + ids_t) mod NB           int64; prev_t = ids_{t-1}, 0 at a document start
    x_t  = tok_emb[ids_t] + bigram_table[h_t] @ bigram_proj.T      (tl.dot: projected rows never hit memory)
    xn_t = x_t * rstd_t,  rstd_t = rsqrt(mean(x_t²) + eps),  eps = finfo(float32).eps (F.rms_norm)
    y_t  = (1 - σ(gate)) * xn_t + σ(gate) * xn_prev_t              xn_prev_t = xn_{t-1}, 0 at a document start
A document starts at the first position of every row and, with `bos_id`, at every position whose id is
bos_id (packed `[BOS] + document` streams), so nothing of one document reaches the next one.
BigramHash and SmearGate are optional: the constexprs HAS_BIGRAM / HAS_SMEAR compile them out (their loads,
dots and gradients), so the crawler's full variant is the same code it always was and the others pay nothing
for it (no BigramHash: x_t = tok_emb[ids_t]; no SmearGate: y_t = xn_t).
The model dim is walked in column chunks (the d×k projection is streamed chunk by chunk through shared
memory; at d = 736, k = 128 it is too big to hold whole), so a row's rms needs two passes: pass 1 sums
x² over the chunks, pass 2 recomputes x and writes the output. The smear needs xn of the previous token:
a tile cannot be shifted by one row cheaply in Triton, so pass 2 computes the previous tokens' rows
directly (a second gather, which hits cache, and a second dot on the same shared-memory proj chunk); their
rms comes from pass 1, which also covers one halo row (the token before the block), so only a vector
has to be shifted. Cost: 3 projection dots per chunk instead of 1 (cheap bf16 tensor-core work next to
the gathers), in exchange for no N×d scratch and a single launch.

What the forward saves for the backward: the per-token rstd (fp32) and bucket id (int32), 8 bytes per
token. x is recomputed from the tables in the backward (one more gather of the token rows and one dot)
rather than stored: saving x or xn would cost an N×d activation (96 MB per 32×2048 bf16 micro-batch)
written in the forward and read back, more traffic than the recompute and a lot more memory.

Dot precision: with 16-bit tables the bigram dot runs in the table's dtype with fp32 accumulation, the
projection rounded to that dtype once per call (as the seed's CastedLinear does), which adds an error of
the order of the 16-bit output's own rounding and halves the proj's on-chip traffic. fp32 tables follow
the fp32 rule of `kernels.utils.dot_args` (IEEE unless torch's float32 matmul precision allows TF32). The
interpreter always computes in fp32.

Backward (given dy), deterministic, no float atomics:
  1. a row kernel recomputes xn, forms dxn_t = (1-σ) dy_t + σ dy_{t+1} (dy_{t+1} read from memory, so no
     tile shift; 0 when t+1 starts a document, whose smear did not read xn_t), per-program partial sums
     of the gate gradient Σ_t xn_t (dy_{t+1} - dy_t) σ(1-σ) (the same masked dy_{t+1}), and
     da_t = (dxn_t - xn_t mean(dxn_t xn_t)) rstd_t, which it writes (in tok_emb's dtype) together with
     g_t = da_t @ bigram_proj (fp32, k wide: the table gradient before its scatter). x is rebuilt in
     both passes (the row reduction needs all chunks before da), so 3 dots per chunk here too;
  2. dtok_emb / dbigram_table are sorted segment sums: a stable sort of the ids / buckets, then one
     program per run of equal keys sums its tokens' rows in sorted order (fp32) and writes the table row.
     Autograd needs dense gradients of the tables' shapes, so the grad tensors themselves (in the tables'
     dtypes) are zero-filled for the rows no token hits; there is no fp32 table-sized scratch. (Writing
     every row from a program per table row would skip that fill, but launches a program per table row
     whether used or not.)
  3. dbigram_proj = Σ_t da_tᵀ table[h_t], a gathered matmul split over token ranges whose fp32 partials
     (splits × d × k) are summed in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import BIGRAM_HASH_MULTIPLIER
from .utils import (
    KERNEL_DTYPES,
    autotune,
    autotune_configs,
    check_embed_inputs,
    check_tensor,
    check_token_ids,
    check_triton_device,
    dot_args,
    empty_output,
    gpu_or_interpreter,
    pow2_tile,
    token_bucket,
)

# Tokens per program. Not autotuned: the forward's grid and the backward's partial-sum buffers depend on
# it. tl.dot needs at least 16 rows; the interpreter uses the minimum so small tests cross many blocks.
BLOCK_T = gpu_or_interpreter(64, 16)
SEGMENT_ROWS = gpu_or_interpreter(32, 16)        # rows summed per step by the segment-sum kernel
MAX_PROJ_SPLITS = 16                             # token splits of the projection-gradient matmul
NO_BOS = -1                                      # the kernels' bos_id=None: no id equals it
_HASH_MULTIPLIER = tl.constexpr(BIGRAM_HASH_MULTIPLIER)

# Row kernels' GPU list, as `python -m kernels.build_check` measured it (sm_90, Triton 3.9 and 3.6, pr1579: 65,536
# tokens, d 736, k 128, bf16 tables; and d 736 without BigramHash, with and without SmearGate): at most 176
# registers, no spills. The backward holds the g accumulator (BLOCK_T x k) across the chunk loop: its 4-warp
# 64- and 128-column chunks spilled (64-616 bytes), as did 128 columns on 8 warps; 32 columns on 4 warps
# spilled 8 bytes in the forward without BigramHash (Triton 3.9), so 32-column chunks run on 8 warps. Speed is
# not measured yet (no GPU).
_ROW_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s) for bd, w, s in ((64, 8, 2), (32, 8, 2))],
    triton.Config({"BLOCK_D": 32}, num_warps=4, num_stages=1))


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bucket(ids_ptr, tok, valid, T, NB, bos):
    """(BigramHash bucket, id) of flat token indices `tok` (int64) where `valid`, both int64.

    The previous id is 0 at a document start (the first position of each row, or an id equal to `bos`;
    bos = -1 matches no id); int64 because prev * 92821 overflows int32 for ids >= 23,136. Operands are
    non-negative, so Triton's truncating % is torch's floor-mod."""
    cur = tl.load(ids_ptr + tok, mask=valid, other=0).to(tl.int64)
    prev = tl.load(ids_ptr + tok - 1, mask=valid & (tok % T != 0) & (cur != bos), other=0).to(tl.int64)
    return (prev * _HASH_MULTIPLIER + cur) % NB, cur


@triton.jit
def _load_rows(ptr, rows, valid, cols, width, col_ok):
    """fp32 tile ptr[rows, cols] of a row-major (*, width) tensor; 0 where masked."""
    return tl.load(ptr + rows[:, None] * width + cols[None, :],
                   mask=valid[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _bigram_rows(table_ptr, h, valid, kk, K, k_ok, DOT_DTYPE: tl.constexpr, HAS_BIGRAM: tl.constexpr):
    """bigram_table[h, :] (BLOCK_T, BLOCK_K) in the dot's operand dtype; nothing (0.0) without BigramHash."""
    rows = 0.0
    if HAS_BIGRAM:
        rows = _load_rows(table_ptr, h, valid, kk, K, k_ok).to(DOT_DTYPE)
    return rows


@triton.jit
def _proj_chunk(proj_ptr, cols, col_ok, kk, k_ok, K, DOT_DTYPE: tl.constexpr, HAS_BIGRAM: tl.constexpr):
    """bigram_proj[cols, :] transposed to (BLOCK_K, BLOCK_D), in the dot's operand dtype; nothing (0.0)
    without BigramHash."""
    p = 0.0
    if HAS_BIGRAM:
        p = tl.load(proj_ptr + cols[None, :] * K + kk[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
    return p


@triton.jit
def _gate_sigmoid(gate_ptr, cols, col_ok):
    """σ(smear_gate[cols]) in fp32 (written out: tl.sigmoid is far slower under the interpreter)."""
    return 1.0 / (1.0 + tl.exp(-tl.load(gate_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)))


@triton.jit
def _pre_norm(tok_ptr, ids, valid, cols, col_ok, D, bigram_rows, proj_t, PRECISION: tl.constexpr,
              HAS_BIGRAM: tl.constexpr):
    """x = tok_emb[ids, cols] (+ bigram_rows @ proj_t with BigramHash): the un-normalised embedding,
    (BLOCK_T, BLOCK_D) fp32, 0 in rows that are not `valid` (their bigram rows were loaded as 0)."""
    x = _load_rows(tok_ptr, ids, valid, cols, D, col_ok)
    if HAS_BIGRAM:
        x = tl.dot(bigram_rows, proj_t, acc=x, input_precision=PRECISION)
    return x


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

# TOKENS_BUCKET (token_bucket(N)) is an autotune key only: the kernels never read it.
@autotune(_ROW_CONFIGS, key=["D", "K", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _embed_fwd_kernel(ids_ptr, tok_ptr, table_ptr, proj_ptr, gate_ptr, out_ptr, rstd_ptr, bucket_ptr,
                      N, T, D, K, NB, eps, bos, TOKENS_BUCKET,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, HAS_BIGRAM: tl.constexpr,
                      HAS_SMEAR: tl.constexpr):
    rows = tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    # Row r holds token start - 1 + r. Row 0 is a halo (the previous block's last token): its rms is
    # what row 1 smears with. Rows 1.. are this program's BLOCK_T - 1 outputs.
    tok = tl.program_id(0).to(tl.int64) * (BLOCK_T - 1) - 1 + rows
    valid = (tok >= 0) & (tok < N)
    owned = valid & (rows > 0)
    h, cur = _bucket(ids_ptr, tok, valid, T, NB, bos)
    in_row = valid & (tok % T != 0)
    has_prev = in_row & (cur != bos)                         # not a document start: smear the previous
    # The previous ids are loaded wherever they exist (in_row), not only where they are used (has_prev, which
    # masks every read of them): with a mask computed from loaded ids, Triton 3.6 fails to compile the
    # SmearGate-without-BigramHash forward ("mask type matches ptr type", RemoveLayoutConversions).
    h_prev, prev = _bucket(ids_ptr, tok - 1, in_row, T, NB, bos)
    b = _bigram_rows(table_ptr, h, valid, kk, K, k_ok, DOT_DTYPE, HAS_BIGRAM)

    # Pass 1: sum of squares per row.
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        p = _proj_chunk(proj_ptr, cols, col_ok, kk, k_ok, K, DOT_DTYPE, HAS_BIGRAM)
        x = _pre_norm(tok_ptr, cur, valid, cols, col_ok, D, b, p, PRECISION, HAS_BIGRAM)
        ssq += tl.sum(x * x, axis=1)
    rstd = tl.rsqrt(ssq / D + eps)
    # rstd of row r - 1 at row r: a one-row shift of a vector as a masked reduction (BLOCK_T² work).
    rstd_prev = tl.sum(tl.where(rows[None, :] == rows[:, None] - 1, rstd[None, :], 0.0), axis=1)
    tl.store(rstd_ptr + tok, rstd, mask=owned)
    if HAS_BIGRAM:
        tl.store(bucket_ptr + tok, h.to(tl.int32), mask=owned)

    # Pass 2: recompute x for the rows and for their previous tokens, normalise, smear, store.
    b_prev = _bigram_rows(table_ptr, h_prev, has_prev, kk, K, k_ok, DOT_DTYPE, HAS_BIGRAM)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        p = _proj_chunk(proj_ptr, cols, col_ok, kk, k_ok, K, DOT_DTYPE, HAS_BIGRAM)
        y = _pre_norm(tok_ptr, cur, valid, cols, col_ok, D, b, p, PRECISION, HAS_BIGRAM) * rstd[:, None]
        if HAS_SMEAR:
            x_prev = _pre_norm(tok_ptr, prev, has_prev, cols, col_ok, D, b_prev, p, PRECISION, HAS_BIGRAM)
            s = _gate_sigmoid(gate_ptr, cols, col_ok)[None, :]
            y = (1.0 - s) * y + s * (x_prev * rstd_prev[:, None])
        tl.store(out_ptr + tok[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=owned[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@autotune(_ROW_CONFIGS, key=["D", "K", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _embed_bwd_rows_kernel(dy_ptr, ids_ptr, tok_ptr, table_ptr, proj_ptr, gate_ptr, rstd_ptr, bucket_ptr,
                           da_ptr, g_ptr, dgate_part_ptr, N, T, D, K, bos, TOKENS_BUCKET,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, HAS_BIGRAM: tl.constexpr,
                           HAS_SMEAR: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    tok = pid.to(tl.int64) * BLOCK_T + rows
    valid = tok < N
    # dy_{t+1} reaches token t only inside its own row (N = B·T, so this also keeps t + 1 < N) and
    # document: a BOS at t + 1 did not smear token t in.
    has_next = valid & ((tok + 1) % T != 0)
    has_next = has_next & (tl.load(ids_ptr + tok + 1, mask=has_next, other=0).to(tl.int64) != bos)
    cur = tl.load(ids_ptr + tok, mask=valid, other=0).to(tl.int64)
    h = tl.load(bucket_ptr + tok, mask=valid & HAS_BIGRAM, other=0).to(tl.int64)
    rstd = tl.load(rstd_ptr + tok, mask=valid, other=0.0)        # 0 zeroes xn and da of masked rows
    b = _bigram_rows(table_ptr, h, valid, kk, K, k_ok, DOT_DTYPE, HAS_BIGRAM)

    # Pass 1: Σ_c dxn·xn per row, and this block's share of the gate gradient.
    dot_dxn_xn = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        p = _proj_chunk(proj_ptr, cols, col_ok, kk, k_ok, K, DOT_DTYPE, HAS_BIGRAM)
        xn = _pre_norm(tok_ptr, cur, valid, cols, col_ok, D, b, p, PRECISION, HAS_BIGRAM) * rstd[:, None]
        dxn = _load_rows(dy_ptr, tok, valid, cols, D, col_ok)
        if HAS_SMEAR:
            dy = dxn
            dy_next = _load_rows(dy_ptr, tok + 1, has_next, cols, D, col_ok)
            s = _gate_sigmoid(gate_ptr, cols, col_ok)
            dxn = (1.0 - s[None, :]) * dy + s[None, :] * dy_next
            dgate = tl.sum(xn * (dy_next - dy), axis=0) * s * (1.0 - s)
            tl.store(dgate_part_ptr + pid * D + cols, dgate, mask=col_ok)
        dot_dxn_xn += tl.sum(dxn * xn, axis=1)
    mean_dxn_xn = dot_dxn_xn / D

    # Pass 2: da = (dxn - xn·mean(dxn·xn)) · rstd, stored, and g = da @ proj accumulated over chunks.
    g = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        p = _proj_chunk(proj_ptr, cols, col_ok, kk, k_ok, K, DOT_DTYPE, HAS_BIGRAM)
        xn = _pre_norm(tok_ptr, cur, valid, cols, col_ok, D, b, p, PRECISION, HAS_BIGRAM) * rstd[:, None]
        dxn = _load_rows(dy_ptr, tok, valid, cols, D, col_ok)
        if HAS_SMEAR:
            dy_next = _load_rows(dy_ptr, tok + 1, has_next, cols, D, col_ok)
            s = _gate_sigmoid(gate_ptr, cols, col_ok)[None, :]
            dxn = (1.0 - s) * dxn + s * dy_next
        da = ((dxn - xn * mean_dxn_xn[:, None]) * rstd[:, None]).to(da_ptr.dtype.element_ty)
        tl.store(da_ptr + tok[:, None] * D + cols[None, :], da, mask=valid[:, None] & col_ok[None, :])
        if HAS_BIGRAM:
            g = tl.dot(da.to(DOT_DTYPE), tl.trans(p), acc=g, input_precision=PRECISION)
    if HAS_BIGRAM:
        tl.store(g_ptr + tok[:, None] * K + kk[None, :], g, mask=valid[:, None] & k_ok[None, :])


@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, sorted_keys_ptr, seg_start_ptr, out_ptr, W,
                        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program i sums the rows src[order[j]] of the i-th run of equal keys, j in [seg_start[i],
    seg_start[i+1]), in fp32 and in sorted order, and writes the sum to out[key]. Programs past the last
    run find it empty and write nothing."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < W
    lo = tl.load(seg_start_ptr + i)
    hi = tl.load(seg_start_ptr + i + 1)
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for j in range(lo, hi, BLOCK_R):
        idx = j + tl.arange(0, BLOCK_R)
        in_run = idx < hi
        src_rows = tl.load(order_ptr + idx, mask=in_run, other=0)
        acc += _load_rows(src_ptr, src_rows, in_run, cols, W, col_ok)
    key = tl.load(sorted_keys_ptr + tl.minimum(lo, hi - 1))     # hi >= 1: N > 0
    tl.store(out_ptr + key * W + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty),
             mask=cols < tl.where(lo < hi, W, 0))


# (`python -m kernels.build_check`, sm_90, Triton 3.9, pr1579: 100 / 114 registers, no spills)
@autotune(autotune_configs([triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=3),
                            triton.Config({"BLOCK_D": 128}, num_warps=8, num_stages=3)],
                           triton.Config({"BLOCK_D": 16}, num_warps=4, num_stages=1)),
          key=["D", "K", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _proj_grad_kernel(da_ptr, table_ptr, bucket_ptr, part_ptr, N, D, K, TOKENS_PER_SPLIT, TOKENS_BUCKET,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """part[split, cols, :] = Σ_t da[t, cols]ᵀ table[h_t, :] over the split's token range."""
    split = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    for t0 in range(0, TOKENS_PER_SPLIT, BLOCK_T):
        tok = split * TOKENS_PER_SPLIT + t0 + tl.arange(0, BLOCK_T)
        valid = tok < N
        h = tl.load(bucket_ptr + tok, mask=valid, other=0).to(tl.int64)
        b = _load_rows(table_ptr, h, valid, kk, K, k_ok).to(DOT_DTYPE)
        da = _load_rows(da_ptr, tok, valid, cols, D, col_ok).to(DOT_DTYPE)
        acc = tl.dot(tl.trans(da), b, acc=acc, input_precision=PRECISION)
    tl.store(part_ptr + (split * D + cols[:, None]) * K + kk[None, :], acc,
             mask=col_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _dot_setup(tok_emb: torch.Tensor, bigram_table: torch.Tensor | None, bigram_proj: torch.Tensor | None):
    """(table, proj as the dot reads it, launch arguments) for the bigram dots: `dot_args` of the table's
    dtype; with a 16-bit table on the GPU proj is rounded to that dtype once here. Without BigramHash,
    tok_emb stands in for both pointers (never read: HAS_BIGRAM is off) and k = 1."""
    if bigram_table is None:
        return tok_emb, tok_emb, {**dot_args(tok_emb.dtype), "HAS_BIGRAM": False, "BLOCK_K": pow2_tile(1)}
    args = dot_args(bigram_table.dtype)
    if args["DOT_DTYPE"] != tl.float32:
        bigram_proj = bigram_proj.to(bigram_table.dtype).contiguous()
    return bigram_table, bigram_proj, {**args, "HAS_BIGRAM": True, "BLOCK_K": pow2_tile(bigram_table.shape[1])}


def _absent_grad(t: torch.Tensor) -> torch.Tensor:
    """What the backward op returns for an input that is absent (None): custom ops return tensors only
    (and never the same one twice), so a new empty one, turned back into None for autograd."""
    return t.new_empty((0,))


@torch.library.custom_op("crawler_kernels::embed_forward", mutates_args=())
def _embed_forward(ids: torch.Tensor, tok_emb: torch.Tensor, bigram_table: torch.Tensor | None,
                   bigram_proj: torch.Tensor | None, smear_gate: torch.Tensor | None, bos: int = NO_BOS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 (B,T,d) in tok_emb.dtype, rstd (B·T,) fp32, bucket ids (B·T,) int32, (0,) without BigramHash).
    Inputs contiguous; `bos` the BOS id (NO_BOS: documents start at row starts only)."""
    B, T = ids.shape
    N, d = B * T, tok_emb.shape[1]
    out = empty_output((B, T, d), tok_emb.dtype, ids.device)
    rstd = empty_output((N,), torch.float32, ids.device)
    buckets = empty_output((N if bigram_table is not None else 0,), torch.int32, ids.device)
    if N == 0:
        return out, rstd, buckets
    # Here, in the eagerly-run custom op, even under torch.compile; on the device, no host sync: an
    # out-of-range id stops the process (CUDA) before the kernel reads past the table.
    check_token_ids(ids, tok_emb.shape[0])
    table, proj, launch = _dot_setup(tok_emb, bigram_table, bigram_proj)
    grid = (triton.cdiv(N, BLOCK_T - 1),)
    _embed_fwd_kernel[grid](ids, tok_emb, table, proj, tok_emb if smear_gate is None else smear_gate, out, rstd,
                            buckets, N, T, d, table.shape[1], table.shape[0], torch.finfo(torch.float32).eps, bos,
                            token_bucket(N), BLOCK_T=BLOCK_T, HAS_SMEAR=smear_gate is not None, **launch)
    return out, rstd, buckets


@_embed_forward.register_fake
def _(ids, tok_emb, bigram_table, bigram_proj, smear_gate, bos=NO_BOS):
    N = ids.shape[0] * ids.shape[1]
    return (tok_emb.new_empty((*ids.shape, tok_emb.shape[1])),
            tok_emb.new_empty((N,), dtype=torch.float32),
            tok_emb.new_empty((N if bigram_table is not None else 0,), dtype=torch.int32))


def _segment_sum(src: torch.Tensor, keys: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(num_rows, W) in `dtype`: row r is the fp32 sum of the rows of src (N, W) whose key is r, 0 if none.

    Deterministic: a stable sort fixes the order of every sum. One program per run of equal keys; the
    number of runs is data-dependent, so min(N, num_rows) programs are launched (no host sync) and the
    rows no token hits keep the zeros of the output's fill."""
    N, W = src.shape
    sorted_keys, order = torch.sort(keys.long(), stable=True)
    is_head = torch.ones_like(sorted_keys, dtype=torch.bool)
    is_head[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run_of_pos = torch.cumsum(is_head, 0) - 1                    # non-decreasing run index per position
    runs = min(N, num_rows)
    run_start = torch.searchsorted(run_of_pos, torch.arange(runs + 1, device=src.device))
    out = torch.zeros((num_rows, W), dtype=dtype, device=src.device)
    block_w = min(256, triton.next_power_of_2(W))
    _segment_sum_kernel[(runs, triton.cdiv(W, block_w))](
        src, order, sorted_keys, run_start, out, W, BLOCK_R=SEGMENT_ROWS, BLOCK_W=block_w, num_warps=4)
    return out


@torch.library.custom_op("crawler_kernels::embed_backward", mutates_args=())
def _embed_backward(grad_out: torch.Tensor, ids: torch.Tensor, tok_emb: torch.Tensor,
                    bigram_table: torch.Tensor | None, bigram_proj: torch.Tensor | None,
                    smear_gate: torch.Tensor | None, rstd: torch.Tensor, buckets: torch.Tensor, bos: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dtok_emb, dbigram_table, dbigram_proj, dsmear_gate), each in its input's dtype; an empty
    tensor for an absent input."""
    B, T = ids.shape
    N, d = B * T, tok_emb.shape[1]
    dev = ids.device
    has_bigram, has_smear = bigram_table is not None, smear_gate is not None
    if N == 0:
        return tuple(_absent_grad(tok_emb) if t is None else torch.zeros_like(t)
                     for t in (tok_emb, bigram_table, bigram_proj, smear_gate))
    table, proj, launch = _dot_setup(tok_emb, bigram_table, bigram_proj)
    k = table.shape[1]
    n_blocks = triton.cdiv(N, BLOCK_T)
    da = empty_output((N, d), tok_emb.dtype, dev)
    g = empty_output((N if has_bigram else 0, k), torch.float32, dev)
    dgate_part = empty_output((n_blocks if has_smear else 0, d), torch.float32, dev)
    _embed_bwd_rows_kernel[(n_blocks,)](grad_out, ids, tok_emb, table, proj, smear_gate if has_smear else tok_emb,
                                        rstd, buckets, da, g, dgate_part, N, T, d, k, bos, token_bucket(N),
                                        BLOCK_T=BLOCK_T, HAS_SMEAR=has_smear, **launch)
    dtok = _segment_sum(da, ids.reshape(-1), tok_emb.shape[0], tok_emb.dtype)
    dgate = dgate_part.sum(0).to(smear_gate.dtype) if has_smear else _absent_grad(tok_emb)
    if not has_bigram:
        return dtok, _absent_grad(tok_emb), _absent_grad(tok_emb), dgate
    dtable = _segment_sum(g, buckets, bigram_table.shape[0], bigram_table.dtype)
    splits = min(MAX_PROJ_SPLITS, n_blocks)
    tokens_per_split = triton.cdiv(n_blocks, splits) * BLOCK_T
    splits = triton.cdiv(N, tokens_per_split)
    dproj_part = empty_output((splits, d, k), torch.float32, dev)
    launch.pop("HAS_BIGRAM")
    _proj_grad_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), splits)](
        da, bigram_table, buckets, dproj_part, N, d, k, tokens_per_split, token_bucket(N), BLOCK_T=BLOCK_T, **launch)
    return dtok, dtable, dproj_part.sum(0).to(bigram_proj.dtype), dgate


@_embed_backward.register_fake
def _(grad_out, ids, tok_emb, bigram_table, bigram_proj, smear_gate, rstd, buckets, bos):
    return tuple(_absent_grad(tok_emb) if t is None else torch.empty_like(t)
                 for t in (tok_emb, bigram_table, bigram_proj, smear_gate))


def _setup_context(ctx, inputs, output):
    ids, tok_emb, bigram_table, bigram_proj, smear_gate, bos = inputs
    _, rstd, buckets = output
    ctx.mark_non_differentiable(rstd, buckets)
    ctx.save_for_backward(ids, tok_emb, bigram_table, bigram_proj, smear_gate, rstd, buckets)
    ctx.bos = bos
    ctx.present = (bigram_table is not None, bigram_proj is not None, smear_gate is not None)


def _backward(ctx, grad_out, _grad_rstd, _grad_buckets):
    ids, tok_emb, bigram_table, bigram_proj, smear_gate, rstd, buckets = ctx.saved_tensors
    dtok, *grads = torch.ops.crawler_kernels.embed_backward(grad_out.contiguous(), ids, tok_emb, bigram_table,
                                                            bigram_proj, smear_gate, rstd, buckets, ctx.bos)
    return (None, dtok, *(g if present else None for g, present in zip(grads, ctx.present)), None)


_embed_forward.register_autograd(_backward, setup_context=_setup_context)


def embed(ids: torch.Tensor, tok_emb: torch.Tensor, bigram_table: torch.Tensor | None,
          bigram_proj: torch.Tensor | None, smear_gate: torch.Tensor | None, *,
          bos_id: int | None = None) -> torch.Tensor:
    """The crawler's input embedding x0 = smear(rms_norm(tok_emb[ids] + bigram_table[h] @ bigram_proj.T)),
    fused (docs/math.md §1.5, §1.6); same contract as `kernels.reference.embed`.

    ids (B, T) int16/uint16/int32/int64 in [0, V) (checked on the device: a CUDA device-side assert, a
    ValueError on the CPU); tok_emb (V, d); bigram_table (NB, k) and bigram_proj (d, k), or both None (no
    BigramHash); smear_gate (d,), or None (no SmearGate); float tensors float32/float16/bfloat16 (mixed
    allowed), all on one CUDA device (or the CPU under TRITON_INTERPRET=1). `bos_id` (an id in [0, V)):
    positions holding it start a document like position 0 does (BigramHash previous id 0, SmearGate previous
    embedding 0), so packed documents do not see each other. Math in float32; returns (B, T, d) in
    tok_emb.dtype. Differentiable in every float input given; the backward is deterministic (no float
    atomics).
    """
    check_embed_inputs(ids, tok_emb, bigram_table, bigram_proj, smear_gate, bos_id=bos_id)
    for name, t in (("tok_emb", tok_emb), ("bigram_table", bigram_table), ("bigram_proj", bigram_proj),
                    ("smear_gate", smear_gate)):
        if t is not None:
            check_tensor(name, t, dtypes=KERNEL_DTYPES)
    check_triton_device("embed", "ids", ids)
    out, _, _ = torch.ops.crawler_kernels.embed_forward(
        ids.contiguous(), tok_emb.contiguous(), *(None if t is None else t.contiguous()
                                                  for t in (bigram_table, bigram_proj, smear_gate)),
        NO_BOS if bos_id is None else int(bos_id))
    return out
