"""Flash-decoding: attention of ONE query row per sequence (a decoding step after a KV cache), split over
the keys so that a step fills the GPU (docs/ops.md `attention_decode`).

Why a kernel of its own. At Tq = 1 the flash-attention grid of `kernels.attention` has one program per
(sequence, head): B·H programs (16 for a batch-1 pr1579 step) on a GPU of 132 SMs, each walking all Tk keys
alone. Here the keys of each (sequence, head) are cut into `num_splits` chunks:
1. split kernel, one program per (sequence·head, split): online softmax of the one query row over its
   chunk of keys, in the exp2 domain; it stores the chunk's unnormalised output acc (D,), its running
   max m and its sum l (fp32 partials, (B·H·S, D) and (B·H·S,) each).
2. combine kernel, one program per sequence·head: M = max_s m_s, w_s = 2^(m_s − M),
   y = Σ_s w_s acc_s / Σ_s w_s l_s, then (XSA) z = y − (y·v̂) v̂ with v̂ the normalised value at the
   query's own position (docs/math.md §1.9), stored in q's dtype. With one split (a batch whose
   sequences·heads fill the GPU alone) the split kernel finishes y = acc / l itself: one launch.
A chunk past the sequence's keys stores m = −inf, l = 0, acc = 0 and weighs nothing in the combine.

Semantics: exactly `kernels.reference.attention(q, k[:, :L], v[:, :L], causal=..., xsa=...)` per sequence,
with L = Tk, or L = cache_seqlens[b] for sequence b: the query sits at key position L − 1, so it sees
keys 0 .. L − 1 whether or not the attention is causal (the causal mask of one bottom-right-aligned query
row hides nothing), and XSA projects off v[b, L − 1]. `cache_seqlens` lets a static KV cache buffer of
Tk rows hold fewer valid keys: the lengths are read on the device, so a decoding step has no host-side
value or shape that changes from token to token and can be captured once in a CUDA graph
(crawler.decoding.Decoder). The chunks follow from L, not Tk (chunk = ceil(ceil(L / S) / BLOCK_N)
BLOCK_N keys), so a step over a buffer of capacity Tk does exactly the work, and computes exactly the
numbers, of the same step over a view of its first L rows.

Forward only: no autograd (decoding runs under no_grad). `kernels.attention` hands it a dense Tq = 1 call
whose inputs need no gradient (`is_decode_step`); anything that needs one stays on the training kernels.
No tl.dot: one query row has no matrix product worth a tensor-core tile, so scores and the weighted sum
are fp32 multiply-and-reduce (inputs of any float dtype are loaded and widened to fp32), as exact as
IEEE fp32.
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
    check_tensor,
    check_triton_device,
    empty_output,
    multiprocessor_count,
    pow2_tile,
    token_bucket,
)

LOG2E = math.log2(math.e)
_V_NORM_EPS = tl.constexpr(1e-12)   # F.normalize's eps for v̂ (docs/math.md §1.9)

# How far to split: enough programs for two waves of the GPU's SMs, at most MAX_SPLITS chunks and at
# least MIN_SPLIT_KEYS keys a chunk (fewer keys would cost more in the combine than they save).
MAX_SPLITS = 64
MIN_SPLIT_KEYS = 64
WAVES = 2
GRID_Y_MAX = 65_535      # CUDA's grid limit in y (splits); x (sequences·heads) goes to 2^31 − 1

# Split kernel configs: BLOCK_N keys per step of a (BLOCK_N, 64) fp32 tile (D = 46 runs in a 64-wide tile).
# Not measured on a GPU yet (none this round): two tile lengths for the autotuner to time. The interpreter
# config keeps BLOCK_N small so that the CPU tests' short caches still span several steps and chunks.
SPLIT_CONFIGS = autotune_configs([triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=2),
                                  triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)],
                                 triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1))


@triton.jit
def _key_count(SEQLENS, b, stride_l, T_K, HAS_SEQLENS: tl.constexpr):
    """Keys of sequence b: cache_seqlens[b] (clamped to the buffer's T_K rows, so a wrong length can
    never read past it) or all T_K."""
    if HAS_SEQLENS:
        n = tl.minimum(tl.load(SEQLENS + b * stride_l), T_K)
    else:
        n = T_K
    return n


@triton.jit
def _store_output(y, V, SEQLENS, O, b, h, G, stride_vb, stride_vt, stride_vh, stride_vd, stride_l,
                  stride_ob, stride_oh, stride_od, T_K, offs_d, d_ok, XSA: tl.constexpr, HAS_SEQLENS: tl.constexpr):
    """Store head h of sequence b's attention output y (BLOCK_D,) fp32 in O's dtype; with XSA first
    z = y − (y·v̂) v̂, v̂ the normalised value at the query's own key position."""
    if XSA:
        own = _key_count(SEQLENS, b, stride_l, T_K, HAS_SEQLENS) - 1
        v = tl.load(V + b * stride_vb + own.to(tl.int64) * stride_vt + (h // G) * stride_vh + offs_d * stride_vd,
                    mask=d_ok, other=0.0).to(tl.float32)
        v_hat = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), _V_NORM_EPS)
        y = y - tl.sum(y * v_hat, axis=0) * v_hat
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, y.to(O.dtype.element_ty), mask=d_ok)


@autotune(configs=SPLIT_CONFIGS, key=["HEAD_DIM", "NUM_SPLITS", "KEYS_BUCKET", "HAS_SEQLENS", "HAS_GAIN", "XSA"])
@triton.jit
def _decode_split(Q, K, V, SEQLENS, GAIN, PART_O, PART_M, PART_L, O,
                  stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
                  stride_vb, stride_vt, stride_vh, stride_vd, stride_l, stride_ob, stride_oh, stride_od,
                  T_K, H, G, qk_scale, KEYS_BUCKET,
                  NUM_SPLITS: tl.constexpr, XSA: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_GAIN: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (sequence·head, split): the chunk's (acc, m, l) partials (module docstring); with
    one split, the output itself (no combine launch)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n_keys = _key_count(SEQLENS, b, stride_l, T_K, HAS_SEQLENS)
    chunk = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # the softmax scale, the head's q_gain and log2(e) folded into q once: scores come out in the exp2 domain
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_GAIN:
        q = q * (qk_scale * tl.load(GAIN + h).to(tl.float32))
    else:
        q = q * qk_scale
    Kh = K + b * stride_kb + (h // G) * stride_kh
    Vh = V + b * stride_vb + (h // G) * stride_vh
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        mask = n_ok[:, None] & d_ok[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(Kh + rows * stride_kt + offs_d[None, :] * stride_kd, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(n_ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(Vh + rows * stride_vt + offs_d[None, :] * stride_vd, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if NUM_SPLITS == 1:
        _store_output(acc / l_i, V, SEQLENS, O, b, h, G, stride_vb, stride_vt, stride_vh, stride_vd, stride_l,
                      stride_ob, stride_oh, stride_od, T_K, offs_d, d_ok, XSA, HAS_SEQLENS)
    else:
        row = bh.to(tl.int64) * NUM_SPLITS + split
        tl.store(PART_O + row * HEAD_DIM + offs_d, acc, mask=d_ok)
        tl.store(PART_M + row, m_i)
        tl.store(PART_L + row, l_i)


@triton.jit
def _decode_combine(PART_O, PART_M, PART_L, V, SEQLENS, O,
                    stride_vb, stride_vt, stride_vh, stride_vd, stride_l, stride_ob, stride_oh, stride_od,
                    T_K, H, G, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, XSA: tl.constexpr,
                    HAS_SEQLENS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per sequence·head: the splits' partials merged, normalised, XSA, stored (module
    docstring)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    rows = bh.to(tl.int64) * NUM_SPLITS + offs_s
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(PART_M + rows, mask=s_ok, other=float("-inf"))
    l_s = tl.load(PART_L + rows, mask=s_ok, other=0.0)
    acc = tl.load(PART_O + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))               # empty chunks: 2^(−inf) = 0
    y = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    _store_output(y, V, SEQLENS, O, b, h, G, stride_vb, stride_vt, stride_vh, stride_vd, stride_l,
                  stride_ob, stride_oh, stride_od, T_K, offs_d, d_ok, XSA, HAS_SEQLENS)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def decode_splits(sequence_heads: int, keys: int, device: torch.device) -> int:
    """Chunks per sequence·head for `keys` keys (a buffer's capacity Tk, an upper bound of the valid
    keys): enough programs for WAVES waves of the device's SMs (kernels.utils.multiprocessor_count), at
    most MAX_SPLITS and at least MIN_SPLIT_KEYS keys a chunk; at least 1."""
    wanted = triton.cdiv(WAVES * multiprocessor_count(device), max(1, sequence_heads))
    return max(1, min(MAX_SPLITS, wanted, triton.cdiv(keys, MIN_SPLIT_KEYS)))


def decode_grids(batch: int, heads: int, num_splits: int) -> tuple[tuple[int, int], tuple[int]]:
    """(split grid, combine grid): sequences·heads in grid x (up to 2^31 − 1), splits in y (<= 65,535)."""
    if not 1 <= num_splits <= GRID_Y_MAX:
        raise ValueError(f"num_splits: expected an int in [1, {GRID_Y_MAX}], got {num_splits}")
    return (batch * heads, num_splits), (batch * heads,)


def _decode_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_seqlens: torch.Tensor | None,
                    xsa: bool, softmax_scale: float, num_splits: int, config: triton.Config | None = None,
                    q_gain: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the split and combine kernels; `config` (one of SPLIT_CONFIGS) bypasses the autotuner (the
    GPU tests launch every config this way)."""
    B, _, H, D = q.shape
    T_K, Hkv = k.shape[1], k.shape[2]
    o = empty_output((B, 1, H, D), q.dtype, q.device)
    if o.numel() == 0:
        return o
    block_d = pow2_tile(D)
    rows = B * H * num_splits if num_splits > 1 else 0      # one split writes the output directly
    part_o = empty_output((rows, D), torch.float32, q.device)
    part_m = empty_output((rows,), torch.float32, q.device)
    part_l = empty_output((rows,), torch.float32, q.device)
    has_seqlens = cache_seqlens is not None
    # Unread pointers (no lengths, no gains; no partials with one split) get `o`, so that none is a null pointer.
    seqlens = cache_seqlens if has_seqlens else o
    gains = o if q_gain is None else q_gain.contiguous()
    stride_l = cache_seqlens.stride(0) if has_seqlens else 0
    parts = (part_o, part_m, part_l) if num_splits > 1 else (o, o, o)
    split_grid, combine_grid = decode_grids(B, H, num_splits)
    out_strides = (o.stride(0), o.stride(2), o.stride(3))
    args = (q, k, v, seqlens, gains, *parts, o, q.stride(0), q.stride(2), q.stride(3), *k.stride(), *v.stride(),
            stride_l, *out_strides, T_K, H, H // Hkv, softmax_scale * LOG2E, token_bucket(T_K))
    consts = dict(NUM_SPLITS=num_splits, XSA=xsa, HAS_SEQLENS=has_seqlens, HAS_GAIN=q_gain is not None, HEAD_DIM=D,
                  BLOCK_D=block_d)
    if config is None:
        _decode_split[split_grid](*args, **consts)
    else:
        _decode_split.fn[split_grid](*args, **consts, **config.all_kwargs())
    if num_splits > 1:
        _decode_combine[combine_grid](part_o, part_m, part_l, v, seqlens, o, *v.stride(), stride_l, *out_strides,
                                      T_K, H, H // Hkv, NUM_SPLITS=num_splits,
                                      BLOCK_S=triton.next_power_of_2(num_splits), XSA=xsa, HAS_SEQLENS=has_seqlens,
                                      HEAD_DIM=D, BLOCK_D=block_d, num_warps=1)
    return o


@torch.library.custom_op("crawler_kernels::attention_decode", mutates_args=())
def _attention_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_seqlens: torch.Tensor | None,
                         q_gain: torch.Tensor | None, xsa: bool, softmax_scale: float, num_splits: int
                         ) -> torch.Tensor:
    """q (B,1,H,D), k/v (B,Tk,Hkv,D), cache_seqlens int32 (B,) or None, q_gain (H,) or None -> z (B,1,H,D)
    in q.dtype."""
    return _decode_forward(q, k, v, cache_seqlens, xsa, softmax_scale, num_splits, q_gain=q_gain)


@_attention_decode_op.register_fake
def _(q, k, v, cache_seqlens, q_gain, xsa, softmax_scale, num_splits):
    return q.new_empty(q.shape)


def is_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                   q_gain: torch.Tensor | None = None) -> bool:
    """Whether `kernels.attention` hands its call to `attention_decode`: dense, one query row
    (q (B, 1, H, D)), and no input that needs a gradient (training keeps the differentiable kernels)."""
    return (cu_seqlens is None and q.dim() == 4 and q.shape[1] == 1
            and not (torch.is_grad_enabled() and _needs_grad(q, k, v, q_gain)))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, xsa: bool = False,
                     softmax_scale: float | None = None, cache_seqlens: torch.Tensor | None = None,
                     num_splits: int | None = None, q_gain: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query row per sequence over its KV cache, split over the keys (flash-decoding).

    q (B, 1, H, D); k, v (B, Tk, Hkv, D), any strides (a cache buffer is read in place). Sequence b uses
    keys 0 .. L_b − 1 with L_b = Tk, or cache_seqlens[b] when given (int32 (B,) on q's device, any stride,
    values in [1, Tk]: read on the device, never checked on the host; a value above Tk counts as Tk, a
    value below 1 gives NaN). The result equals `kernels.reference.attention(q[b:b+1], k[b:b+1, :L_b],
    v[b:b+1, :L_b], xsa=xsa, softmax_scale=softmax_scale)` for each b, causal or not (one query row at
    the last position sees every key either way): query head h attends with KV head h // (H/Hkv), scores
    are scaled by softmax_scale (default 1/sqrt(D)) times q_gain[h] (an (H,) float tensor of per-head
    gains, as `kernels.attention` takes it; default 1), and with `xsa` the output is projected off the
    normalised v[b, L_b − 1]. `num_splits` (>= 1) chunks per sequence·head; default `decode_splits`.
    H % Hkv == 0, D even <= 128; float32/float16/bfloat16, on CUDA (or the CPU under TRITON_INTERPRET=1).
    Returns a contiguous (B, 1, H, D) tensor in q.dtype. Forward only: inputs that require a gradient
    (with grad mode on) are refused; `kernels.attention` trains.
    """
    check_attention_inputs(q, k, v, softmax_scale=softmax_scale, q_gain=q_gain)
    if q.shape[1] != 1:
        raise ValueError(f"q: attention_decode takes one query row per sequence, (B, 1, H, D), got shape "
                         f"{tuple(q.shape)}; use kernels.attention")
    if torch.is_grad_enabled() and _needs_grad(q, k, v, q_gain):
        raise ValueError("q, k, v, q_gain: attention_decode is forward-only (no autograd) and one requires grad; "
                         "use kernels.attention to train, or call it under torch.no_grad()")
    if cache_seqlens is not None:
        check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
        if cache_seqlens.shape[0] != q.shape[0]:
            raise ValueError(f"cache_seqlens: expected shape ({q.shape[0]},) (one length per sequence), got "
                             f"{tuple(cache_seqlens.shape)}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= GRID_Y_MAX):
        raise ValueError(f"num_splits: expected None or an int in [1, {GRID_Y_MAX}], got {num_splits!r}")
    check_triton_device("attention_decode", "q", q, reference="kernels.reference.attention")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: the Triton attention takes float32, float16 or bfloat16, got {q.dtype} "
                        f"(kernels.reference.attention handles float64)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    B, _, H, _ = q.shape
    splits = decode_splits(B * H, k.shape[1], q.device) if num_splits is None else num_splits
    return _attention_decode_op(q, k, v, cache_seqlens, q_gain, bool(xsa), scale, splits)
