"""Attention: kernels.attention (causal GQA, XSA fused) vs SDPA flash / cuDNN, FlexAttention and FA3
varlen, each + compiled XSA; dense causal and document-isolated (varlen).

Every case starts from the same q, k, v (B, T, H|Hkv, D) and per-head q_gain (H,) fp32 (the model's
trained score gains, around 1.5; its gradient is computed in the backward) and returns (B, T, H, D). Ours
runs as the model calls it (crawler.model.CausalSelfAttention): heads zero-padded to
padded_head_dim(D) columns (46 -> 48, the 16-byte-aligned layout), softmax_scale 1/sqrt(D), q_gain folded
into the kernel's score scale, the pad dropped from the output; the pad and the slice are in the timed
call. The baselines compute the seed's math: q · q_gain per head, then the attention with scale 1/sqrt(D).

Dense causal, at the pr1579 micro-batch (B 32, T 2048, H 16, Hkv 8) with head dim 46 (the model's) and
64, bf16, forward and forward+backward:
  ours                   kernels.attention(..., xsa=True, q_gain=...) in the model's layout: XSA fused
  ours, no XSA           the same without XSA: the attention kernel alone
  SDPA flash (+ XSA)     SDPA with the flash backend pinned (native GQA), XSA compiled (bench.baselines)
  SDPA cuDNN + XSA       the cuDNN backend pinned, XSA compiled
  FlexAttention + XSA    compiled FlexAttention with a causal block mask, XSA compiled
Varlen (document-isolated), the same tensors cut into documents of log-normal lengths (mean 1,000
tokens, sigma 1, seeded; documents are cut at the 2048-token sequence ends, as the records do), head
dim 46, XSA:
  ours                   kernels.attention on the packed (B·T, H, D) view with cu_seqlens, model's layout
  SDPA + mask            SDPA mem-efficient (k/v expanded) with a block-diagonal causal bool mask
  FlexAttention          compiled FlexAttention with the document block mask
  FA3 varlen             flash_attn_interface.flash_attn_varlen_func, when it imports
Head dims flash/cuDNN/FA3 reject (46 is not a multiple of 8) are zero-padded to 48 inside the timed
call, as ours is; the label says so. FLOPs count the true D: a causal forward 4·H·D·Σ n²/2 over the
segments (n = T for dense), backward 2.5× that, so forward+backward = 3.5× the forward.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math

import pytest
import torch

import kernels
from bench import baselines
from bench.harness import PASSES, first_call, pass_fn, rel_err
from crawler import CrawlerConfig
from crawler.model import pad_heads
from kernels.attention import padded_head_dim

PR1579 = CrawlerConfig.preset("pr1579")
HEAD_DIMS = (PR1579.head_dim, 64)   # the model's (46), and 64 for comparison
TOLERANCE = 2e-2           # rel. error vs ours above which a provider computes something else (bf16 ~ 4e-3)
VARLEN_SUPPORTED = "cu_seqlens" in inspect.signature(kernels.attention).parameters
NO_VARLEN = "kernels.attention does not accept cu_seqlens= in this version: varlen cases not run"

# key -> (label, xsa, role); the labels of ours and SDPA gain "(D padded to 48)" where padding happens.
DENSE = {
    "ours": ("ours (fused XSA)", True, "ours"),
    "ours_noxsa": ("ours, no XSA", False, "ours"),
    "sdpa_flash": ("SDPA flash + XSA", True, "baseline"),
    "sdpa_flash_noxsa": ("SDPA flash, no XSA", False, "baseline"),
    "sdpa_cudnn": ("SDPA cuDNN + XSA", True, "baseline"),
    "flex": ("FlexAttention + XSA", True, "baseline"),
}
VARLEN = {
    "ours": ("ours varlen (cu_seqlens, fused XSA)", "ours"),
    "sdpa_mask": ("SDPA mem-efficient + block-diagonal mask + XSA", "baseline"),
    "flex_doc": ("FlexAttention document mask + XSA", "baseline"),
    "fa3": ("FA3 varlen + XSA", "baseline"),
}


def padded_label(label: str, D: int) -> str:
    P = padded_head_dim(D)
    return f"{label} (D padded to {P})" if P != D else label


@pytest.fixture(scope="module")
def attention_inputs(bench):
    """inputs(D) -> q, k, v (B, T, H|Hkv, D), q_gain (H,) fp32 around the model's initial 1.5, dz: random,
    requires_grad, cached per head dim."""
    s = bench.shapes

    @functools.cache
    def inputs(D: int):
        g = bench.generator(D)
        shape = (s.batch, s.seq_len)
        q, k, v = (bench.randn(*shape, h, D, generator=g, requires_grad=True)
                   for h in (s.num_heads, s.num_kv_heads, s.num_kv_heads))
        gain = (PR1579.qk_gain_init + bench.randn(s.num_heads, generator=g, std=0.1, dtype=torch.float32)
                ).requires_grad_()
        dz = bench.randn(*shape, s.num_heads, D, generator=g)
        return q, k, v, gain, dz

    yield inputs
    inputs.cache_clear()
    torch.cuda.empty_cache()


def ours_in_the_models_layout(q, k, v, gain, **kwargs) -> torch.Tensor:
    """kernels.attention as the model calls it: heads zero-padded to padded_head_dim(D), softmax_scale
    1/sqrt(D), q_gain folded into the kernel; the pad dropped from the output (B, T, H, D)."""
    D = q.shape[-1]
    P = padded_head_dim(D)
    y = kernels.attention(pad_heads(q, P), pad_heads(k, P), pad_heads(v, P), softmax_scale=1.0 / math.sqrt(D),
                          q_gain=gain, **kwargs)
    return y[..., :D]


def seed_q(q: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The seed's q_gain: q (B, T, H, D) scaled per head before the attention."""
    return q * gain.to(q.dtype)[:, None]


def dense_impl(key: str, D: int, bench):
    """fn(q, k, v, q_gain) -> (B, T, H, D) of one dense provider."""
    from torch.nn.attention import SDPBackend
    _, xsa, _ = DENSE[key]
    if key.startswith("ours"):
        return lambda q, k, v, gain: ours_in_the_models_layout(q, k, v, gain, xsa=xsa)
    if key.startswith("sdpa"):
        backend = SDPBackend.CUDNN_ATTENTION if key == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        return lambda q, k, v, gain: baselines.sdpa_attention(seed_q(q, gain), k, v, backend=backend, xsa=xsa,
                                                              xsa_fn=baselines.compiled_xsa())
    from torch.nn.attention.flex_attention import create_block_mask
    T = bench.shapes.seq_len
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, B=None, H=None, Q_LEN=T, KV_LEN=T,
                                   device=bench.device)
    return lambda q, k, v, gain: baselines.flex_attention_xsa(seed_q(q, gain), k, v, block_mask)


@pytest.mark.cost_s(30)
@pytest.mark.parametrize("D, pass_, key", [(D, p, key) for D in HEAD_DIMS for p in PASSES for key in DENSE])
def test_dense(benchmark, bench, attention_inputs, D, pass_, key):
    label, xsa, role = DENSE[key]
    s = bench.shapes
    q, k, v, gain, dz = attention_inputs(D)
    fn = dense_impl(key, D, bench)
    with torch.no_grad():
        out = first_call(lambda: fn(q, k, v, gain), impl=label, role=role)
        err = rel_err(out, ours_in_the_models_layout(q, k, v, gain, xsa=xsa))
    fwd_flops = 4 * s.batch * s.num_heads * D * s.seq_len ** 2 / 2
    bench.run(benchmark, pass_fn(lambda: fn(q, k, v, gain), pass_, dz), grad_to_none=(q, k, v, gain),
              group=f"dense D={D} {'XSA' if xsa else 'no XSA'} {pass_}",
              impl=padded_label(label, D) if key.startswith(("ours", "sdpa")) else label, role=role,
              flops=fwd_flops * (1 if pass_ == "fwd" else 3.5), metrics={"rel_err_vs_ours": err})
    assert err < TOLERANCE, f"{label}: output differs from kernels.attention by {err:.2e}"


def document_pieces(batch: int, seq_len: int, mean_len: float, seed: int = 0) -> list[int]:
    """Lengths of the segments of `batch` packed sequences of `seq_len` tokens: documents with log-normal
    lengths (sigma 1, mean `mean_len`, at least 1 token, seeded), each cut where a sequence ends. The
    pieces of sequence b sum to seq_len, in order."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean_len) - sigma ** 2 / 2          # log-normal mean = exp(mu + sigma²/2)
    pieces, left_in_doc = [], 0
    for _ in range(batch):
        t = 0
        while t < seq_len:
            if left_in_doc == 0:
                left_in_doc = max(1, round(float(torch.empty(1).log_normal_(mu, sigma, generator=g))))
            take = min(left_in_doc, seq_len - t)
            pieces.append(take)
            t += take
            left_in_doc -= take
    return pieces


@pytest.fixture(scope="module")
def documents(bench):
    """The varlen layout: cu_seqlens (int32, device), max_seqlen, piece index per token (B, T) int32."""
    s = bench.shapes
    pieces = document_pieces(s.batch, s.seq_len, s.mean_document_len)
    lengths = torch.tensor(pieces)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    piece_of_token = torch.repeat_interleave(torch.arange(len(pieces), dtype=torch.int32), lengths)
    return dict(cu_seqlens=cu_seqlens.to(bench.device), max_seqlen=max(pieces), lengths=lengths,
                piece=piece_of_token.view(s.batch, s.seq_len).to(bench.device))


def varlen_impl(key: str, bench, docs):
    """fn(q, k, v, q_gain) on (B, T, H|Hkv, D) tensors -> (B, T, H, D): every provider sees the same
    tensors (ours and FA3 read their packed (B·T, ·, D) views)."""
    from torch.nn.attention import SDPBackend
    B, T = bench.shapes.batch, bench.shapes.seq_len
    piece, cu, max_seqlen = docs["piece"], docs["cu_seqlens"], docs["max_seqlen"]

    def packed(t):
        return t.reshape(B * T, *t.shape[2:])

    if key == "ours":
        return lambda q, k, v, gain: ours_in_the_models_layout(packed(q), packed(k), packed(v), gain, xsa=True,
                                                               cu_seqlens=cu, max_seqlen=max_seqlen).reshape(q.shape)
    if key == "fa3":
        return lambda q, k, v, gain: baselines.fa3_varlen_attention(packed(seed_q(q, gain)), packed(k), packed(v), cu,
                                                                    max_seqlen).view(q.shape)
    if key == "sdpa_mask":
        causal = torch.ones(T, T, dtype=torch.bool, device=bench.device).tril()
        mask = ((piece[:, :, None] == piece[:, None, :]) & causal)[:, None]            # (B, 1, T, T)
        # mem-efficient is the fused SDPA backend that takes a mask (the CPU rehearsal has only math).
        backend = SDPBackend.EFFICIENT_ATTENTION if bench.device.type == "cuda" else SDPBackend.MATH
        return lambda q, k, v, gain: baselines.sdpa_attention(seed_q(q, gain), k, v, backend=backend, xsa=True,
                                                              attn_mask=mask, expand_kv=True,
                                                              xsa_fn=baselines.compiled_xsa())
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q_idx, kv_idx):
        return (piece[b, q_idx] == piece[b, kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, B=B, H=None, Q_LEN=T, KV_LEN=T, device=bench.device)
    return lambda q, k, v, gain: baselines.flex_attention_xsa(seed_q(q, gain), k, v, block_mask)


@pytest.mark.cost_s(30)
@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in VARLEN])
def test_varlen(benchmark, bench, attention_inputs, documents, pass_, key):
    if not VARLEN_SUPPORTED:
        pytest.skip(NO_VARLEN)
    if key == "fa3" and importlib.util.find_spec("flash_attn_interface") is None:
        pytest.skip("FA3 varlen: flash_attn_interface is not installed on this machine")
    label, role = VARLEN[key]
    D = HEAD_DIMS[0]
    s = bench.shapes
    q, k, v, gain, dz = attention_inputs(D)
    fn = varlen_impl(key, bench, documents)
    expected = varlen_impl("ours", bench, documents)
    with torch.no_grad():
        out = first_call(lambda: fn(q, k, v, gain), impl=label, role=role)
        err = rel_err(out, expected(q, k, v, gain))
    lengths = documents["lengths"].double()
    fwd_flops = 4 * s.num_heads * D * float((lengths ** 2).sum()) / 2
    bench.run(benchmark, pass_fn(lambda: fn(q, k, v, gain), pass_, dz), grad_to_none=(q, k, v, gain),
              group=f"varlen D={D} XSA {pass_}",
              impl=padded_label(label, D) if key in ("ours", "sdpa_mask", "fa3") else label, role=role,
              flops=fwd_flops * (1 if pass_ == "fwd" else 3.5),
              metrics={"rel_err_vs_ours": err, "segments": len(lengths), "mean_segment": float(lengths.mean()),
                       "max_seqlen": documents["max_seqlen"]})
    assert err < TOLERANCE, f"{label}: output differs from kernels.attention varlen by {err:.2e}"
