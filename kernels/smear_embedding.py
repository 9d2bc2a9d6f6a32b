"""Fused record-line embedding: token embedding + SmearGate v3 (input-dependent, BOS-masked) + rms_norm,
forward and backward (docs/math.md §1.6, §7.5). `smear_embed` is a drop-in for
`kernels.reference.smear_embed`.

With x_t = tok_emb[ids_t], the gate of token t is g_t = m_t·λ·σ(s_t), s_t = W·x_t[:w], where m_t = 0 at a
document start (position 0 of every row and, with bos_id, a BOS position: the BOS fix of PR #1851) and 1
elsewhere; y_t = x_t + g_t·x_{t−1} (the previous token's embedding as gathered, not its y) and, with
norm, out_t = y_t·r_t, r_t = rsqrt(mean(y_t²) + eps), eps = finfo(float32).eps. fp32 math throughout.

Forward, one program per block of tokens: the gate needs only the first w columns of x_t, so it is
computed first; the model dim is then walked in column chunks, twice with norm (pass 1 sums y², pass 2
writes y·r). x_{t−1} is a second gather of the previous token's row (it hits cache), so no tile has to be
shifted by one row. Saved for the backward: r_t (4 bytes per token); x and y are recomputed from the
table.

Backward (given dout), one row kernel, then a segment sum, deterministic (no float atomics):
    dy_t  = r_t·dout_t − r_t³·(dout_t·y_t)/d · y_t              (rms_norm backward; dy = dout without norm)
    dg_t  = dy_t·x_{t−1} = r_t·(dout_t·x_{t−1}) − r_t³·(dout_t·y_t)/d · (y_t·x_{t−1})
    dλ   += m_t·σ(s_t)·dg_t,  ds_t = m_t·λ·σ(s_t)(1 − σ(s_t))·dg_t,  dW += ds_t·x_t[:w]
    dx_t  = dy_t + g_{t+1}·dy_{t+1} + [c < w]·ds_t·W_c
dy_{t+1} needs token t+1's row reduction, which the program computes itself (a second gather of the next
rows and of dout_{t+1}, cache hits again), so pass 1 yields every reduction and pass 2 writes dx. dx
(in tok_emb's dtype, like `kernels.embed`'s) then goes through the embedding's sorted segment sum into
dtok_emb; dW and dλ are per-program fp32 partials summed in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .embedding import NO_BOS, _load_rows, _segment_sum
from .utils import (
    KERNEL_DTYPES,
    check_smear_embed_inputs,
    check_tensor,
    check_token_ids,
    check_triton_device,
    empty_output,
    gpu_or_interpreter,
)

# Launch parameters, fixed (no autotuning: the backward's partial-sum buffers depend on BLOCK_T, and one
# config is one the GPU test covers). The interpreter takes small blocks so the tests' shapes cross several.
# Compiled offline for sm_90 (Triton 3.9, d 512, bf16 table): forward 48 registers, backward 112 (norm) / 54,
# no spills; 256-column chunks on 4 warps spilled 160 bytes in the backward. Speed not measured (no GPU).
BLOCK_T = gpu_or_interpreter(32, 16)        # tokens per program
MAX_BLOCK_D = gpu_or_interpreter(128, 32)   # columns per chunk of the model dim
NUM_WARPS = 8


@triton.jit
def _smear_gate(tok_ptr, ids, valid, w_ptr, W, D, BLOCK_W: tl.constexpr):
    """(σ(s), s = W·x[:W]) per token, fp32 (BLOCK_T,): x = tok_emb[ids], 0 where not `valid`."""
    wc = tl.arange(0, BLOCK_W)
    w_ok = wc < W
    x = _load_rows(tok_ptr, ids, valid, wc, D, w_ok)
    wv = tl.load(w_ptr + wc, mask=w_ok, other=0.0).to(tl.float32)
    return 1.0 / (1.0 + tl.exp(-tl.sum(x * wv[None, :], axis=1)))


@triton.jit
def _neighbours(ids_ptr, tok, valid, T, bos):
    """(id_t, has_prev, id_{t−1}, has_next, id_{t+1}) of flat token indices `tok` (int64 ids): has_prev
    when t is not a document start (the gate m_t), has_next when t+1 is in the same row and no start."""
    cur = tl.load(ids_ptr + tok, mask=valid, other=0).to(tl.int64)
    in_row = valid & (tok % T != 0)
    has_prev = in_row & (cur != bos)
    # Loaded wherever it exists (in_row): has_prev masks every read of it, and a mask computed from loaded
    # ids fails Triton 3.6's compile (as in kernels/embedding.py's forward).
    prev = tl.load(ids_ptr + tok - 1, mask=in_row, other=0).to(tl.int64)
    next_in_row = valid & ((tok + 1) % T != 0)
    nxt = tl.load(ids_ptr + tok + 1, mask=next_in_row, other=0).to(tl.int64)
    return cur, has_prev, prev, next_in_row & (nxt != bos), nxt


@triton.jit
def _smear_fwd_kernel(ids_ptr, tok_ptr, w_ptr, lam_ptr, out_ptr, rstd_ptr, N, T, D, W, eps, bos,
                      NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tok < N
    cur, has_prev, prev, _, _ = _neighbours(ids_ptr, tok, valid, T, bos)
    lam = tl.load(lam_ptr).to(tl.float32)
    g = tl.where(has_prev, lam * _smear_gate(tok_ptr, cur, valid, w_ptr, W, D, BLOCK_W), 0.0)[:, None]

    if NORM:    # pass 1: sum of squares of y per token
        ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            y = _load_rows(tok_ptr, cur, valid, cols, D, col_ok) + g * _load_rows(tok_ptr, prev, has_prev, cols,
                                                                                   D, col_ok)
            ssq += tl.sum(y * y, axis=1)
        rstd = tl.rsqrt(ssq / D + eps)
        tl.store(rstd_ptr + tok, rstd, mask=valid)
    else:
        rstd = tl.full([BLOCK_T], 1.0, tl.float32)

    for c0 in range(0, D, BLOCK_D):     # pass 2: recompute y, write y·r
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        y = _load_rows(tok_ptr, cur, valid, cols, D, col_ok) + g * _load_rows(tok_ptr, prev, has_prev, cols, D,
                                                                               col_ok)
        tl.store(out_ptr + tok[:, None] * D + cols[None, :], (y * rstd[:, None]).to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _smear_bwd_kernel(dout_ptr, ids_ptr, tok_ptr, w_ptr, lam_ptr, rstd_ptr, dx_ptr, dw_part_ptr, dlam_part_ptr,
                      N, T, D, W, bos, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tok < N
    cur, has_prev, prev, has_next, nxt = _neighbours(ids_ptr, tok, valid, T, bos)
    lam = tl.load(lam_ptr).to(tl.float32)
    sig = _smear_gate(tok_ptr, cur, valid, w_ptr, W, D, BLOCK_W)
    g = tl.where(has_prev, lam * sig, 0.0)
    g_next = tl.where(has_next, lam * _smear_gate(tok_ptr, nxt, has_next, w_ptr, W, D, BLOCK_W), 0.0)
    if NORM:
        rstd = tl.load(rstd_ptr + tok, mask=valid, other=0.0)
        rstd_next = tl.load(rstd_ptr + tok + 1, mask=has_next, other=0.0)

    # Pass 1: the per-token reductions dout·x_{t−1} and, with norm, dout·y, y·x_{t−1}, dout_{t+1}·y_{t+1}.
    dout_xp = tl.zeros([BLOCK_T], dtype=tl.float32)
    dout_y = tl.zeros([BLOCK_T], dtype=tl.float32)
    y_xp = tl.zeros([BLOCK_T], dtype=tl.float32)
    dout_y_next = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        xp = _load_rows(tok_ptr, prev, has_prev, cols, D, col_ok)
        do = _load_rows(dout_ptr, tok, valid, cols, D, col_ok)
        dout_xp += tl.sum(do * xp, axis=1)
        if NORM:
            x = _load_rows(tok_ptr, cur, valid, cols, D, col_ok)
            y = x + g[:, None] * xp
            y_next = _load_rows(tok_ptr, nxt, has_next, cols, D, col_ok) + g_next[:, None] * x
            dout_y += tl.sum(do * y, axis=1)
            y_xp += tl.sum(y * xp, axis=1)
            dout_y_next += tl.sum(_load_rows(dout_ptr, tok + 1, has_next, cols, D, col_ok) * y_next, axis=1)
    if NORM:
        k = rstd * rstd * rstd * dout_y / D
        k_next = rstd_next * rstd_next * rstd_next * dout_y_next / D
        dg = rstd * dout_xp - k * y_xp
    else:
        dg = dout_xp
    dg = tl.where(has_prev, dg, 0.0)
    tl.store(dlam_part_ptr + pid, tl.sum(sig * dg, axis=0))
    ds = lam * sig * (1.0 - sig) * dg
    wc = tl.arange(0, BLOCK_W)
    w_ok = wc < W
    tl.store(dw_part_ptr + pid * BLOCK_W + wc,
             tl.sum(ds[:, None] * _load_rows(tok_ptr, cur, valid, wc, D, w_ok), axis=0))

    # Pass 2: dx_t = dy_t + g_{t+1}·dy_{t+1} + [c < w]·ds_t·W_c.
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        do = _load_rows(dout_ptr, tok, valid, cols, D, col_ok)
        do_next = _load_rows(dout_ptr, tok + 1, has_next, cols, D, col_ok)
        if NORM:
            x = _load_rows(tok_ptr, cur, valid, cols, D, col_ok)
            y = x + g[:, None] * _load_rows(tok_ptr, prev, has_prev, cols, D, col_ok)
            y_next = _load_rows(tok_ptr, nxt, has_next, cols, D, col_ok) + g_next[:, None] * x
            dy = rstd[:, None] * do - k[:, None] * y
            dy_next = rstd_next[:, None] * do_next - k_next[:, None] * y_next
        else:
            dy = do
            dy_next = do_next
        wv = tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(tl.float32)
        dx = dy + g_next[:, None] * dy_next + ds[:, None] * wv[None, :]
        tl.store(dx_ptr + tok[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=valid[:, None] & col_ok[None, :])


def _launch(d: int, w: int) -> dict:
    return {"BLOCK_T": BLOCK_T, "BLOCK_D": min(MAX_BLOCK_D, triton.next_power_of_2(d)),
            "BLOCK_W": triton.next_power_of_2(w), "num_warps": NUM_WARPS}


@torch.library.custom_op("crawler_kernels::smear_embed_forward", mutates_args=())
def _smear_forward(ids: torch.Tensor, tok_emb: torch.Tensor, smear_weight: torch.Tensor, smear_lambda: torch.Tensor,
                   bos: int, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, T, d) in tok_emb.dtype, rstd (B·T,) fp32, or (0,) without norm). Inputs contiguous; `bos`
    the BOS id (NO_BOS: documents start at row starts only)."""
    B, T = ids.shape
    N, d = B * T, tok_emb.shape[1]
    out = empty_output((B, T, d), tok_emb.dtype, ids.device)
    rstd = empty_output((N if norm else 0,), torch.float32, ids.device)
    if N == 0:
        return out, rstd
    # Here, in the eagerly-run custom op, even under torch.compile; on the device, no host sync.
    check_token_ids(ids, tok_emb.shape[0])
    w = smear_weight.shape[1]
    _smear_fwd_kernel[(triton.cdiv(N, BLOCK_T),)](ids, tok_emb, smear_weight, smear_lambda, out, rstd, N, T, d, w,
                                                  torch.finfo(torch.float32).eps, bos, NORM=norm, **_launch(d, w))
    return out, rstd


@_smear_forward.register_fake
def _(ids, tok_emb, smear_weight, smear_lambda, bos, norm):
    N = ids.shape[0] * ids.shape[1]
    return (tok_emb.new_empty((*ids.shape, tok_emb.shape[1])),
            tok_emb.new_empty((N if norm else 0,), dtype=torch.float32))


@torch.library.custom_op("crawler_kernels::smear_embed_backward", mutates_args=())
def _smear_backward(grad_out: torch.Tensor, ids: torch.Tensor, tok_emb: torch.Tensor, smear_weight: torch.Tensor,
                    smear_lambda: torch.Tensor, rstd: torch.Tensor, bos: int, norm: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dtok_emb, dsmear_weight, dsmear_lambda), each in its input's dtype and shape."""
    B, T = ids.shape
    N, d = B * T, tok_emb.shape[1]
    w = smear_weight.shape[1]
    if N == 0:
        return torch.zeros_like(tok_emb), torch.zeros_like(smear_weight), torch.zeros_like(smear_lambda)
    launch = _launch(d, w)
    n_blocks = triton.cdiv(N, BLOCK_T)
    dx = empty_output((N, d), tok_emb.dtype, ids.device)
    dw_part = empty_output((n_blocks, launch["BLOCK_W"]), torch.float32, ids.device)
    dlam_part = empty_output((n_blocks,), torch.float32, ids.device)
    _smear_bwd_kernel[(n_blocks,)](grad_out, ids, tok_emb, smear_weight, smear_lambda, rstd, dx, dw_part, dlam_part,
                                   N, T, d, w, bos, NORM=norm, **launch)
    dtok = _segment_sum(dx, ids.reshape(-1), tok_emb.shape[0], tok_emb.dtype)
    return (dtok, dw_part[:, :w].sum(0).reshape(1, w).to(smear_weight.dtype),
            dlam_part.sum().reshape(smear_lambda.shape).to(smear_lambda.dtype))


@_smear_backward.register_fake
def _(grad_out, ids, tok_emb, smear_weight, smear_lambda, rstd, bos, norm):
    return torch.empty_like(tok_emb), torch.empty_like(smear_weight), torch.empty_like(smear_lambda)


def _setup_context(ctx, inputs, output):
    ids, tok_emb, smear_weight, smear_lambda, bos, norm = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(ids, tok_emb, smear_weight, smear_lambda, output[1])
    ctx.bos, ctx.norm = bos, norm


def _backward(ctx, grad_out, _grad_rstd):
    ids, tok_emb, smear_weight, smear_lambda, rstd = ctx.saved_tensors
    grads = torch.ops.crawler_kernels.smear_embed_backward(grad_out.contiguous(), ids, tok_emb, smear_weight,
                                                           smear_lambda, rstd, ctx.bos, ctx.norm)
    return (None, *grads, None, None)


_smear_forward.register_autograd(_backward, setup_context=_setup_context)


def smear_embed(ids: torch.Tensor, tok_emb: torch.Tensor, smear_weight: torch.Tensor, smear_lambda: torch.Tensor,
                *, bos_id: int | None = None, norm: bool = True) -> torch.Tensor:
    """The record line's input embedding x0 = rms_norm(y), y_t = x_t + λ·σ(W·x_t[:w])·x_{t−1}·m_t with
    x = tok_emb[ids] and m_t = 0 at position 0 of every row and (with bos_id) where ids_t == bos_id, else 1
    (SmearGate v3 of PR #1667 with the BOS fix of PR #1851; no BigramHash), fused; same contract as
    `kernels.reference.smear_embed`.

    ids (B, T) int16/uint16/int32/int64 in [0, V) (checked on the device: a CUDA device-side assert, a
    ValueError on the CPU); tok_emb (V, d); smear_weight W (1, w), 1 <= w <= d (the records' gate is a
    Linear(12, 1) on the first 12 channels); smear_lambda λ, shape () or (1,); float32/float16/bfloat16
    (mixed allowed), on one CUDA device (or the CPU under TRITON_INTERPRET=1). norm=True (what the records
    do next) applies rms_norm (eps = finfo(float32).eps); norm=False returns y. Math in float32; returns
    (B, T, d) in tok_emb.dtype. Differentiable in tok_emb, smear_weight and smear_lambda; the backward is
    deterministic (no float atomics).
    """
    check_smear_embed_inputs(ids, tok_emb, smear_weight, smear_lambda, bos_id=bos_id)
    for name, t in (("tok_emb", tok_emb), ("smear_weight", smear_weight), ("smear_lambda", smear_lambda)):
        check_tensor(name, t, dtypes=KERNEL_DTYPES)
    check_triton_device("smear_embed", "ids", ids)
    out, _ = torch.ops.crawler_kernels.smear_embed_forward(ids.contiguous(), tok_emb.contiguous(),
                                                           smear_weight.contiguous(), smear_lambda.contiguous(),
                                                           NO_BOS if bos_id is None else int(bos_id), bool(norm))
    return out
