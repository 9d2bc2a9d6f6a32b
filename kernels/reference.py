"""Plain-PyTorch reference of every op: the spec (docs/math.md) in code.

Readability first: these functions are what the Triton kernels are tested against (in float64) and what
the model runs on a CPU. Each public op validates its inputs exactly like its fast counterpart.
Math is carried out in float32 (float64 when the inputs are float64) and the result is cast back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .utils import (
    FLOAT_DTYPES,
    check_attention_inputs,
    check_class_indices,
    check_cross_entropy_inputs,
    check_cu_seqlens,
    check_embed_inputs,
    check_gptq_args,
    check_gptq_inputs,
    check_gptq_values,
    check_int6_linear_inputs,
    check_logits_cross_entropy_inputs,
    check_mlp_inputs,
    check_smear_embed_inputs,
    check_tensor,
    check_token_ids,
)

BIGRAM_HASH_MULTIPLIER = 92821


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (tests); every other float dtype is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over the last dim, no learned gain, torch's default eps (finfo(x.dtype).eps)."""
    return F.rms_norm(x, (x.shape[-1],))


# ----------------------------------------------------------------------------------------------
# RoPE (docs/math.md §1.8): the seed's partial layout
# ----------------------------------------------------------------------------------------------

def rope_rotary_dims(head_dim: int) -> int:
    """Number of leading head dims the seed rotates: R = 2 * ((D // 2) // 2) (22 for D = 46)."""
    return 2 * ((head_dim // 2) // 2)


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None, offset: int = 0,
                 freq_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq_len, R/2) in float32 for θ_i = base^(-2i/D), i < R/2, at positions
    offset .. offset + seq_len - 1. `freq_dtype` rounds the θ_i to that dtype first (bfloat16: what the
    seed's model, cast with .bfloat16() and back, rotates with; docs/math.md §1.8)."""
    half = rope_rotary_dims(head_dim) // 2
    inv_freq = base ** (-torch.arange(0, half, dtype=torch.float32, device=device) * 2.0 / head_dim)
    inv_freq = inv_freq.to(freq_dtype).to(torch.float32)
    positions = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rope(x: torch.Tensor, base: float = 10000.0, offset: int = 0,
         freq_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotary embedding on x (B, T, H, D): dims [:R] rotate in rotate-half layout, dims [R:] pass through.

    x1 = x[..., :R/2], x2 = x[..., R/2:R] -> cat(x1*cos + x2*sin, -x1*sin + x2*cos). cos/sin are computed
    in float32 and cast to x.dtype (docs/math.md §1.8). Row t sits at position offset + t (offset > 0: the new
    tokens of an incremental decoding step). `freq_dtype` as in rope_cos_sin. Returns a tensor of x's
    shape and dtype.
    """
    B, T, H, D = x.shape
    R = rope_rotary_dims(D)
    half = R // 2
    cos, sin = rope_cos_sin(T, D, base, device=x.device, offset=offset, freq_dtype=freq_dtype)
    cos = cos.to(x.dtype)[None, :, None, :]
    sin = sin.to(x.dtype)[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:R], x[..., R:]
    return torch.cat((x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest), dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention with XSA (docs/math.md §1.4, §1.9): dense, with a KV-cache query offset, and varlen
# ----------------------------------------------------------------------------------------------

def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exclusive Self Attention: remove from each head's output its component along its own value.

    y (B, T, H, D) attention output, v (B, T, Hkv, D) values; query head h uses KV head h // (H/Hkv).
    z = y - (y · v̂) v̂ with v̂ = v / max(‖v‖, 1e-12). Returns (B, T, H, D) in y.dtype.
    """
    G = y.shape[2] // v.shape[2]
    v_hat = F.normalize(v, dim=-1, eps=1e-12).repeat_interleave(G, dim=2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


def _dense_attention(q, k, v, causal: bool, xsa: bool, scale: float, q_gain) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, H, D) at the last Tq of the Tk positions of k, v (B, Tk, Hkv, D): query i sits at
    position Tk - Tq + i and (causal) sees keys 0 .. Tk - Tq + i; XSA uses the queries' own values.
    Returns (y (B, Tq, H, D) in q.dtype, lse (B, H, Tq) in the compute dtype)."""
    Tq, H = q.shape[1:3]
    Tk, Hkv = k.shape[1:3]
    cd = _compute_dtype(q)
    qf, kf, vf = (t.to(cd).transpose(1, 2) for t in (q, k, v))        # (B, heads, T, D)
    if q_gain is not None:
        qf = qf * q_gain.to(cd)[:, None, None]                         # score = scale · q_gain[h] · q·k
    kf, vf = kf.repeat_interleave(H // Hkv, dim=1), vf.repeat_interleave(H // Hkv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale                      # (B, H, Tq, Tk)
    if causal:
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    y = (scores.softmax(dim=-1) @ vf).transpose(1, 2)                 # (B, Tq, H, D)
    if xsa:
        y = exclusive_self_attention(y, v[:, Tk - Tq:].to(cd))
    return y.to(q.dtype), scores.logsumexp(dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              xsa: bool = False, softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None, q_gain: torch.Tensor | None = None, layout: str = "bthd",
              return_lse: bool = False):
    """Softmax attention with grouped KV heads and optional XSA (the contract of `kernels.attention`).

    Dense: q (B, Tq, H, D), k/v (B, Tk, Hkv, D), Tq <= Tk, the queries being the last Tq positions (a KV
    cache's new tokens: causal masking aligned bottom-right, XSA with v[:, Tk - Tq:]); layout="bhtd"
    takes and returns SDPA's (B, H, T, D) instead. Varlen (`cu_seqlens` int32 (num_docs + 1,), 0 = cu[0]
    <= ... <= cu[-1] = total): q (total, H, D), k/v (total, Hkv, D) (or with a leading 1), each segment
    [cu[i], cu[i+1]) attending to itself alone (the values are checked here: this reference reads them
    anyway); max_seqlen is validated and otherwise unused here.
    H % Hkv == 0, D even and <= 128; float32/16/bf16/64. Query head h attends with KV head h // (H/Hkv).
    Scores are softmax_scale (default 1/sqrt(D)) · q_gain[h] (q_gain (H,), default 1) · q·k, masked
    causally when `causal`; with `xsa` the output is projected off its own normalised value (see
    `exclusive_self_attention`). Returns q's shape in q.dtype, differentiable in q, k, v and q_gain; with
    `return_lse` also the log-sum-exp of each row's scaled scores, (B, H, Tq) (varlen: (H, total), or
    (1, H, total) for 4-D inputs) in float32 (float64 for float64 inputs), not differentiable.
    """
    check_attention_inputs(q, k, v, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                           q_gain=q_gain, layout=layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if cu_seqlens is None:
        if layout == "bhtd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out, lse = _dense_attention(q, k, v, causal, xsa, scale, q_gain)
        if layout == "bhtd":
            out = out.transpose(1, 2)
    else:
        # Varlen: the dense reference on each segment on its own, which is isolation by construction.
        packed = q.dim() == 3
        q, k, v = (t[None] if packed else t for t in (q, k, v))
        check_cu_seqlens(cu_seqlens, q.shape[1])
        bounds = cu_seqlens.tolist()
        pieces = [_dense_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal, xsa, scale, q_gain)
                  for a, b in zip(bounds, bounds[1:])]
        out, lse = torch.cat([y for y, _ in pieces], dim=1), torch.cat([s for _, s in pieces], dim=2)
        if packed:
            out, lse = out[0], lse[0]
    if not return_lse:
        return out
    return out, lse.detach().to(torch.float64 if lse.dtype == torch.float64 else torch.float32)


# ----------------------------------------------------------------------------------------------
# Embedding: token + BigramHash, rms_norm, SmearGate (docs/math.md §1.5, §1.6)
# ----------------------------------------------------------------------------------------------

def document_starts(ids: torch.Tensor, bos_id: int | None = None) -> torch.Tensor:
    """(B, T) bool, True where a document starts: position 0 of every row and, with `bos_id`, every
    position holding it (packed `[BOS] + document` streams). ids (B, T) int."""
    starts = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    starts[:, :1] = True
    return starts if bos_id is None else starts | (ids == bos_id)


def bigram_hash(ids: torch.Tensor, buckets: int, bos_id: int | None = None) -> torch.Tensor:
    """Bucket of each (previous, current) token pair: (prev * 92821 + id) mod buckets, in int64.

    ids (B, T) int; prev = 0 at every document start (position 0 of each row, and each `bos_id`
    position). int64 because prev * 92821 overflows int32 for ids >= 23,136. Returns (B, T) int64 in
    [0, buckets).
    """
    ids = ids.long()
    prev = F.pad(ids[:, :-1], (1, 0), value=0).masked_fill(document_starts(ids, bos_id), 0)
    return (prev * BIGRAM_HASH_MULTIPLIER + ids) % buckets


def smear(x: torch.Tensor, gate: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """SmearGate v2: (1 - σ(gate)) * x_t + σ(gate) * x_prev_t with x_prev_t = x_{t-1}, and 0 at position 0
    of every row and wherever `starts` (B, T) bool marks a document start (see `document_starts`).

    x (B, T, d), gate (d,). Returns (B, T, d) in x's dtype.
    """
    g = torch.sigmoid(gate.to(x.dtype))
    x_prev = F.pad(x[:, :-1], (0, 0, 1, 0))
    if starts is not None:
        x_prev = x_prev.masked_fill(starts[..., None], 0.0)
    return (1 - g) * x + g * x_prev


def embed(ids: torch.Tensor, tok_emb: torch.Tensor, bigram_table: torch.Tensor | None,
          bigram_proj: torch.Tensor | None, smear_gate: torch.Tensor | None, *,
          bos_id: int | None = None) -> torch.Tensor:
    """The crawler's input embedding x0 = smear(rms_norm(tok_emb[ids] + bigram_table[h] @ bigram_proj.T)).

    ids (B, T) int in [0, V); tok_emb (V, d); bigram_table (NB, k) and bigram_proj (d, k), or both None
    (no BigramHash term); smear_gate (d,), or None (no SmearGate: x0 = rms_norm(tok_emb[ids] + ...), the
    baseline's embedding when BigramHash is off too); bos_id None or an id in [0, V) whose positions start
    a document like position 0 does (BigramHash previous id 0, SmearGate previous embedding 0): nothing
    crosses a BOS. The rms_norm's eps is that of the compute dtype (`rms_norm`). Math in float32
    (float64 for float64 inputs); returns (B, T, d) in tok_emb.dtype. Differentiable in every float input.
    """
    check_embed_inputs(ids, tok_emb, bigram_table, bigram_proj, smear_gate, bos_id=bos_id)
    check_token_ids(ids, tok_emb.shape[0])
    cd = _compute_dtype(tok_emb)
    x = tok_emb.to(cd)[ids.long()]
    if bigram_table is not None:
        h = bigram_hash(ids, bigram_table.shape[0], bos_id)
        x = x + bigram_table.to(cd)[h] @ bigram_proj.to(cd).T
    xn = rms_norm(x)
    if smear_gate is None:
        return xn.to(tok_emb.dtype)
    starts = None if bos_id is None else document_starts(ids, bos_id)
    return smear(xn, smear_gate.to(cd), starts).to(tok_emb.dtype)


def smear_v3(x: torch.Tensor, smear_weight: torch.Tensor, smear_lambda: torch.Tensor,
             starts: torch.Tensor) -> torch.Tensor:
    """SmearGate v3 (the record line's, docs/math.md §1.6, §7.5): y_t = x_t + λ·σ(W·x_t[:w])·x_{t−1}, with the
    previous-token term 0 wherever `starts` (B, T) bool marks a document start (position 0 of every row,
    and BOS positions: the records' BOS fix). x_{t−1} is the previous token's *input* x (not its y).

    x (B, T, d); smear_weight W (1, w), w <= d; smear_lambda λ one element. Returns (B, T, d) in x's dtype.
    """
    gate = smear_lambda.to(x.dtype).reshape(()) * torch.sigmoid(x[..., :smear_weight.shape[1]]
                                                                 @ smear_weight.to(x.dtype).T)
    x_prev = F.pad(x[:, :-1], (0, 0, 1, 0))
    return x + gate.masked_fill(starts[..., None], 0.0) * x_prev


def smear_embed(ids: torch.Tensor, tok_emb: torch.Tensor, smear_weight: torch.Tensor, smear_lambda: torch.Tensor,
                *, bos_id: int | None = None, norm: bool = True) -> torch.Tensor:
    """The record line's input embedding: rms_norm(smear_v3(tok_emb[ids])) (PR #1667 with PR #1851's BOS
    fix, docs/math.md §1.6, §7.5), no BigramHash.

    ids (B, T) int in [0, V); tok_emb (V, d); smear_weight (1, w) with w <= d (the gate's Linear(w, 1)
    weight: 12 in the records); smear_lambda one element (shape () or (1,)); bos_id None or an id in
    [0, V): with it, a BOS position takes nothing from the token before it (without it only position 0 of
    each row does not). norm=True applies the rms_norm the records apply next (`rms_norm`, in the compute dtype);
    norm=False returns the smeared embedding itself. Math in float32 (float64 for float64 inputs); returns
    (B, T, d) in tok_emb.dtype. Differentiable in tok_emb, smear_weight and smear_lambda.
    """
    check_smear_embed_inputs(ids, tok_emb, smear_weight, smear_lambda, bos_id=bos_id)
    check_token_ids(ids, tok_emb.shape[0])
    cd = _compute_dtype(tok_emb)
    y = smear_v3(tok_emb.to(cd)[ids.long()], smear_weight.to(cd), smear_lambda.to(cd),
                 document_starts(ids, bos_id))
    return (rms_norm(y) if norm else y).to(tok_emb.dtype)


# ----------------------------------------------------------------------------------------------
# MLP and the tied, softcapped head
# ----------------------------------------------------------------------------------------------

def relu2(x: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """relu(x)² (the seed's activation), or leaky_relu(x, negative_slope)² when negative_slope > 0."""
    act = F.relu(x) if negative_slope == 0.0 else F.leaky_relu(x, negative_slope)
    return act.square()


def relu2_mlp(h: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
              negative_slope: float = 0.0) -> torch.Tensor:
    """mlp(h) = relu2(h @ fc_weight.T) @ proj_weight.T.

    h (..., d) float; fc_weight (hidden, d); proj_weight (d, hidden); negative_slope finite (validated like
    kernels.relu2_mlp). Weights are cast to h.dtype (the seed's CastedLinear). Returns (..., d) in h.dtype.
    """
    check_mlp_inputs(h, fc_weight, proj_weight, negative_slope)
    hidden = relu2(F.linear(h, fc_weight.to(h.dtype)), negative_slope)
    return F.linear(hidden, proj_weight.to(h.dtype))


def softcapped_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float) -> torch.Tensor:
    """Tied head: softcap * tanh((hidden @ weight.T) / softcap).

    hidden (..., d); weight (V, d) (the token embedding). Returns (..., V) in hidden.dtype.
    """
    logits = F.linear(hidden, weight.to(hidden.dtype))
    return softcap * torch.tanh(logits / softcap)


def softcapped_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, *,
                             reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of the softcapped tied head: F.cross_entropy(softcapped_logits(hidden, weight,
    softcap), targets) on float32 logits (float64 for float64 inputs) (docs/math.md §1.3, §1.12).

    hidden (N, d) float, N >= 1; weight (V, d); targets (N,) int64/int32, each in [0, V) or equal to
    ignore_index; softcap > 0; reduction "mean" (over the targets that are not ignore_index: NaN when all
    are), "sum", or "none" ((N,) per-token losses, 0 at ignored positions), exactly as F.cross_entropy.
    Returns float32, float64 for float64 hidden (the dtype the loss is computed in).
    """
    check_cross_entropy_inputs(hidden, weight, targets, softcap, reduction=reduction, ignore_index=ignore_index)
    check_class_indices(targets, weight.shape[0], ignore_index=ignore_index)
    logits = softcapped_logits(hidden, weight, softcap)
    return F.cross_entropy(logits.to(_compute_dtype(logits)), targets.long(), reduction=reduction,
                           ignore_index=ignore_index)


def softcapped_cross_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, softcap: float, *,
                                         reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(softcap·tanh(logits / softcap), targets) with the softcap applied in float32
    (float64 for float64 logits): `softcapped_cross_entropy` for a head computed elsewhere.

    logits (N, V) float, raw (before the softcap); targets, softcap, reduction, ignore_index and the
    result's dtype as `softcapped_cross_entropy`. Differentiable in logits.
    """
    check_logits_cross_entropy_inputs(logits, targets, softcap, reduction=reduction, ignore_index=ignore_index)
    check_class_indices(targets, logits.shape[1], ignore_index=ignore_index)
    z = logits.to(_compute_dtype(logits))
    return F.cross_entropy(softcap * torch.tanh(z / softcap), targets.long(), reduction=reduction,
                           ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------
# Quantisation: SDClip scales, round-to-nearest, GPTQ (docs/math.md §3)
# ----------------------------------------------------------------------------------------------

SDCLIP_SCALE_FLOOR = 1e-10
# fp16 cannot hold 1e-10 (it rounds to 0, and w / 0 is NaN for an all-zero row), so stored scales are
# also floored at the smallest positive fp16 value, 2^-24 (a subnormal).
FP16_SMALLEST = 2.0 ** -24
CHOLESKY_RETRIES = 5


def quant_max(bits: int) -> int:
    """Largest code magnitude R = 2^(bits-1) - 1 of the symmetric grid (31 for int6, 127 for int8)."""
    return 2 ** (bits - 1) - 1


def sdclip_scales(weight: torch.Tensor, bits: int = 6, clip_sigmas: float = 12.85) -> torch.Tensor:
    """SDClip per-row scales s_r = clip_sigmas * std(W_r) / R (torch.std, unbiased), as fp16.

    weight (..., N, K) float, K >= 2. The std is taken in float64 whatever the weight's dtype, so the
    fp16 scale does not depend on the compute precision (the reference and the Triton path agree bit for
    bit). The scale is floored at 1e-10 and, once stored as fp16, at 2^-24 so that it is never 0.
    Deliberately not floored at 1/R (PR #1579's floor, which coarsens every row with std < 1/clip_sigmas).
    Returns (..., N) float16.
    """
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    check_gptq_args(bits, clip_sigmas)
    if weight.dim() < 1 or weight.shape[-1] < 2:
        raise ValueError(f"weight: expected a last dim of at least 2 (row std), got shape {tuple(weight.shape)}")
    std = weight.double().std(dim=-1)
    scales = (clip_sigmas * std / quant_max(bits)).clamp_min(SDCLIP_SCALE_FLOOR)
    return scales.to(torch.float16).clamp_min(FP16_SMALLEST)


def _check_codes_scales(codes_name: str, rows: torch.Tensor, scales: torch.Tensor) -> None:
    """scales must be float with shape rows.shape[:-1] on rows' device."""
    check_tensor("scales", scales, dtypes=FLOAT_DTYPES, device=rows.device)
    if tuple(scales.shape) != tuple(rows.shape[:-1]):
        raise ValueError(f"scales: expected shape {tuple(rows.shape[:-1])} (one per row of {codes_name}), "
                         f"got {tuple(scales.shape)}")


def quantize_rtn(weight: torch.Tensor, scales: torch.Tensor, bits: int = 6) -> torch.Tensor:
    """Per-row round-to-nearest: codes = clamp(round(w / s), -R, R) (round half to even).

    weight (..., N, K) float; scales (..., N) (used as their float values, e.g. fp16 from
    `sdclip_scales`). Returns int8 codes of weight's shape.
    """
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    check_gptq_args(bits, 1.0)
    _check_codes_scales("weight", weight, scales)
    cd = _compute_dtype(weight)
    R = quant_max(bits)
    return torch.clamp(torch.round(weight.to(cd) / scales.to(cd)[..., None]), -R, R).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Ŵ = codes * scales (per row). codes (..., N, K) int8; scales (..., N). Returns float32
    (float64 when scales are float64)."""
    check_tensor("codes", codes, dtypes=(torch.int8,))
    _check_codes_scales("codes", codes, scales)
    cd = _compute_dtype(scales)
    return codes.to(cd) * scales.to(cd)[..., None]


def quantization_proxy_loss(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor,
                            scales: torch.Tensor) -> torch.Tensor:
    """GPTQ's quality measure tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64 (docs/math.md §3), Ŵ = dequantize(codes, scales).

    weight (N, K), hessian (K, K) (the undamped one), codes (N, K) int8, scales (N,). Returns a 0-d
    float64 tensor.
    """
    diff = weight.double() - dequantize(codes, scales).double()
    return ((diff @ hessian.double()) * diff).sum()


def inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """U = cholesky(cholesky_inverse(cholesky(H)), upper=True), the upper Cholesky factor of H⁻¹.

    hessian (..., K, K), already damped. Where a factorisation fails, 0.1·mean(diag H) is added to that
    matrix's diagonal and it is retried, up to CHOLESKY_RETRIES times; then ValueError. Returns U of
    hessian's shape and dtype.
    """
    H = hessian.clone()
    for _ in range(CHOLESKY_RETRIES + 1):
        L, info_h = torch.linalg.cholesky_ex(H)
        U, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        failed = (info_h != 0) | (info_inv != 0) | ~torch.isfinite(U).flatten(-2).all(-1)
        if not bool(failed.any()):
            return U
        diag = H.diagonal(dim1=-2, dim2=-1)
        diag.add_(torch.where(failed[..., None], 0.1 * diag.mean(-1, keepdim=True), 0.0))
    raise ValueError(f"hessian: Cholesky of H (or of H⁻¹) still fails after adding 0.1·mean(diag H) "
                     f"{CHOLESKY_RETRIES} times; H is far from positive definite")


def gptq_prepare(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, clip_sigmas: float,
                 act_order: bool, damp: float):
    """Everything GPTQ does before its column walk (docs/math.md §3), for (..., N, K) weights and (..., K, K)
    Hessians (a leading batch of matrices is allowed; the Triton version batches same-shape matrices).

    1. SDClip scales from the weight as given (fp16).
    2. Dead columns (H_jj = 0): H_jj = 1 and W[:, j] = 0.
    3. Damping: H += damp · mean(diag H) · I (the mean includes the dead columns' 1s, as the seed does).
    4. Act-order: perm = argsort(diag H, descending) (stable, so ties keep their order; identity
       when act_order is False); W's columns and H's rows and columns permuted.
    5. U = upper Cholesky factor of H⁻¹ (see `inverse_cholesky_upper`).
    Returns (W permuted working copy, U, scales fp16 (..., N), perm (..., K) int64); W and U in float32
    (float64 for a float64 weight).
    """
    cd = _compute_dtype(weight)
    scales = sdclip_scales(weight, bits, clip_sigmas)
    W = weight.to(cd).clone()
    H = hessian.to(cd).clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    W.masked_fill_(dead.unsqueeze(-2), 0.0)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    else:
        perm = torch.arange(W.shape[-1], device=W.device).expand(diag.shape)
    # W[..., :, perm] and H[..., perm][..., :, perm] for every matrix of the batch.
    W = W.gather(-1, perm.unsqueeze(-2).expand(W.shape))
    H = H.gather(-2, perm.unsqueeze(-1).expand(H.shape)).gather(-1, perm.unsqueeze(-2).expand(H.shape))
    return W, inverse_cholesky_upper(H), scales, perm


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 6, clip_sigmas: float = 12.85,
                  block_size: int = 128, act_order: bool = True, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022) with SDClip per-row scales, one column at a time (docs/math.md §3).

    weight (N, K) float, hessian (K, K) float (XᵀX/n of the layer's inputs), same device, finite.
    After `gptq_prepare`, for each block of block_size columns and each column j in it:
    q = clamp(round(w_j / s), -R, R) with the fp16-rounded scales (so dequantising with
    codes * scales.float() gives exactly what GPTQ compensated), e = (w_j - s·q) / U_jj, and the rest
    of the block W[:, j+1:end] -= e ⊗ U[j, j+1:end]; after the block W[:, end:] -= E_blk @ U[blk, end:].
    Codes are un-permuted at the end. Math in float32 (float64 for a float64 weight).
    Returns (codes int8 (N, K) in [-R, R], scales float16 (N,)), R = 2^(bits-1) - 1.
    """
    check_gptq_inputs(weight, hessian)
    check_gptq_values(weight, hessian)
    check_gptq_args(bits, clip_sigmas, block_size, damp)
    W, U, scales, perm = gptq_prepare(weight, hessian, bits=bits, clip_sigmas=clip_sigmas,
                                      act_order=act_order, damp=damp)
    return gptq_column_walk(W, U, scales, perm, bits=bits, block_size=block_size), scales


def gptq_column_walk(W: torch.Tensor, U: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor, *,
                     bits: int, block_size: int = 128) -> torch.Tensor:
    """GPTQ's sequential part on prepared inputs (`gptq_prepare`): W (N, K) act-order-permuted weight
    (updated in place), U (K, K) upper inverse-Cholesky factor, scales (N,) per-row scales, perm (K,)
    the act-order permutation. Per column j of each block: q = clamp(round(w_j/s), -R, R),
    e = (w_j - s·q)/U_jj, W[:, j+1:end] -= e ⊗ U[j, j+1:end]; after the block
    W[:, end:] -= E_blk @ U[blk, end:]. Returns the un-permuted int8 codes (N, K) in [-R, R]."""
    R = quant_max(bits)
    s = scales.to(W.dtype)
    N, K = W.shape
    codes = torch.empty((N, K), dtype=torch.int8, device=W.device)
    for start in range(0, K, block_size):
        end = min(start + block_size, K)
        err = torch.empty((N, end - start), dtype=W.dtype, device=W.device)
        for j in range(start, end):
            w = W[:, j]
            q = torch.clamp(torch.round(w / s), -R, R)
            codes[:, j] = q.to(torch.int8)
            e = (w - s * q) / U[j, j]
            W[:, j + 1:end] -= e[:, None] * U[j, j + 1:end]
            err[:, j - start] = e
        W[:, end:] -= err @ U[start:end, end:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, perm] = codes
    return unpermuted


# ----------------------------------------------------------------------------------------------
# Int6 weights at inference (docs/math.md §5): packing and the weight-only matmul
# ----------------------------------------------------------------------------------------------

INT6_MIN, INT6_MAX = -32, 31
INT6_REF_ROW_TILE = 256   # rows of the weight the reference dequantises at a time (never the whole weight)


def pack_int6(codes: torch.Tensor) -> torch.Tensor:
    """Pack int6 codes 4-in-3-bytes (layout documented at the top of kernels/int6.py).

    codes (N, K) int8 in [-32, 31], K % 4 == 0 -> packed (N, 3K/4) uint8. With u = code + 32 and row
    quarters Q_q = u[:, q*K/4:(q+1)*K/4], each row holds [Q0 | Q1 << 4 (low nibbles), Q2 | Q3 << 4
    (low nibbles), the four quarters' top 2 bits at bit offsets 0, 2, 4, 6]. Plain torch: runs once.
    """
    check_tensor("codes", codes, ndim=2, dtypes=(torch.int8,))
    N, K = codes.shape
    if K % 4 != 0:
        raise ValueError(f"codes: number of columns K must be a multiple of 4, got {K}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < INT6_MIN or hi > INT6_MAX:
            raise ValueError(f"codes: expected values in [{INT6_MIN}, {INT6_MAX}], got range [{lo}, {hi}]")
    u = (codes.to(torch.int16) - INT6_MIN).to(torch.uint8).reshape(N, 4, K // 4)
    q0, q1, q2, q3 = u.unbind(1)
    lo01 = (q0 & 15) | ((q1 & 15) << 4)
    lo23 = (q2 & 15) | ((q3 & 15) << 4)
    hi = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)
    return torch.cat((lo01, lo23, hi), dim=1)


def unpack_int6(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Exact inverse of `pack_int6`: packed (N, 3k/4) uint8 -> codes (N, k) int8 in [-32, 31]."""
    check_tensor("packed", packed, ndim=2, dtypes=(torch.uint8,))
    if not isinstance(k, int) or k < 0 or k % 4 != 0:
        raise ValueError(f"k: expected a non-negative multiple of 4, got {k!r}")
    if packed.shape[1] != 3 * k // 4:
        raise ValueError(f"packed: expected shape (N, {3 * k // 4}) = (N, 3k/4) for k = {k}, "
                         f"got {tuple(packed.shape)}")
    lo01, lo23, hi = packed.split(k // 4, dim=1)
    q0 = (lo01 & 15) | ((hi & 3) << 4)
    q1 = (lo01 >> 4) | (((hi >> 2) & 3) << 4)
    q2 = (lo23 & 15) | (((hi >> 4) & 3) << 4)
    q3 = (lo23 >> 4) | ((hi >> 6) << 4)
    return (torch.cat((q0, q1, q2, q3), dim=1).to(torch.int16) + INT6_MIN).to(torch.int8)


def int6_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x @ (codes * scales[:, None]).T with codes = unpack_int6(packed, K).

    x (..., K) float32/16/bf16 (float64 too, for tests); packed (N, 3K/4) uint8; scales (N,) float16/32.
    Math in float32 (float64 for float64 x); dequantises INT6_REF_ROW_TILE weight rows at a time, so no
    dequantised copy of the whole weight exists. Returns (..., N) in x.dtype.
    """
    check_int6_linear_inputs(x, packed, scales, allow_float64=True)
    cd = _compute_dtype(x)
    K, N = x.shape[-1], packed.shape[0]
    xc = x.to(cd)
    out = torch.empty(*x.shape[:-1], N, dtype=cd, device=x.device)
    for n0 in range(0, N, INT6_REF_ROW_TILE):
        rows = slice(n0, n0 + INT6_REF_ROW_TILE)
        w = unpack_int6(packed[rows], K).to(cd) * scales[rows, None].to(cd)
        out[..., rows] = xc @ w.T
    return out.to(x.dtype)
