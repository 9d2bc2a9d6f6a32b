"""Fused record-line embedding: token embedding + SmearGate v3 (input-dependent, BOS-masked) + rms_norm,
forward and backward (docs/math.md §1.6, §7.5). `smear_embed` is a drop-in for
`kernels.reference.smear_embed`.
"""
from __future__ import annotations

import torch

from .utils import check_smear_embed_inputs, check_triton_device


def smear_embed(ids: torch.Tensor, tok_emb: torch.Tensor, smear_weight: torch.Tensor, smear_lambda: torch.Tensor,
                *, bos_id: int | None = None, norm: bool = True) -> torch.Tensor:
    """The record line's input embedding x0 = rms_norm(y), y_t = x_t + λ·σ(W·x_t[:w])·x_{t−1}·m_t with
    x = tok_emb[ids] and m_t = 0 at position 0 of every row and (with bos_id) where ids_t == bos_id, else 1
    (SmearGate v3 of PR #1667 with the BOS fix of PR #1851; no BigramHash); same contract as
    `kernels.reference.smear_embed`.

    ids (B, T) int16/uint16/int32/int64 in [0, V) (checked on the device: a CUDA device-side assert, a
    ValueError on the CPU); tok_emb (V, d); smear_weight W (1, w), 1 <= w <= d (the records' gate is a
    Linear(12, 1) on the first 12 channels); smear_lambda λ, shape () or (1,); float32/float16/bfloat16,
    on one CUDA device (or the CPU under TRITON_INTERPRET=1). norm=True (the records' next step) applies
    rms_norm (eps = finfo(float32).eps); norm=False returns y. Math in float32; returns (B, T, d) in
    tok_emb.dtype. Differentiable in tok_emb, smear_weight and smear_lambda; deterministic backward.
    """
    check_smear_embed_inputs(ids, tok_emb, smear_weight, smear_lambda, bos_id=bos_id)
    check_triton_device("smear_embed", "ids", ids)
    raise NotImplementedError("smear_embed: the Triton kernels land in the next commit; use "
                              "kernels.reference.smear_embed meanwhile")
