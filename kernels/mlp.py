"""Fused up-projection + relu² MLP (the fusion of PR #1530, docs/math.md §1.4): mlp(h) = φ(h @ W_fcᵀ) @ W_projᵀ with
φ(p) = relu(p)², or leaky_relu(p, s)² when negative_slope s != 0.

Forward: a Triton matmul h @ W_fcᵀ whose epilogue applies φ and stores post = φ(pre) (plus pre itself for the
leaky variant); the down-projection post @ W_projᵀ stays a cuBLAS matmul (it has no epilogue to fuse).
Backward: a Triton matmul g @ W_proj whose epilogue multiplies by φ'(pre) and stores dpre; the three weight/
input products (dh = dpre @ W_fc, dW_fc = dpreᵀ @ h, dW_proj = gᵀ @ post) are cuBLAS matmuls.

What is saved for backward: for relu², only `post`, which the down-projection needs anyway, because
φ'(p) = 2·relu(p) = 2·sqrt(post). For the leaky variant the sign of p is lost in post, so `pre` is saved too.
The eager chain keeps three (tokens × hidden) tensors instead (pre, relu(pre) and its square).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    autotune,
    autotune_configs,
    check_mlp_inputs,
    check_triton_device,
    dot_args,
    empty_output,
    grouped_tile,
    tile_matmul,
    token_bucket,
)

# GPU lists, as `python -m kernels.build_check` measured them (sm_90, Triton 3.9, pr1579: 65,536 tokens,
# 736 -> 2944, bf16): none spills. The 4-warp 128 x 128 tile needed 192 (up) and 255 (dpre) registers and
# spilled in dpre for the leaky variant; 256 x 128 spilled in dpre; 128 x 256 needs 252 in dpre, so it
# stays in the up-projection only (183 / 215 registers with SAVE_PRE; 241 on Triton 3.6). 8 warps on
# 128 x 128 need 112-160.
# Speed is not measured yet (no GPU): each list keeps two shapes for the autotuner to time.
_UP_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
], triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}))
# dpre also holds the pre/post tile it multiplies by: 128 and 160 (leaky) registers, 128 for 64 x 128.
_DPRE_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
], triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}))


# TOKENS_BUCKET (token_bucket(M)) is an autotune key only: the kernels never read it.
@autotune(_UP_CONFIGS, key=["H", "D", "SAVE_PRE", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _mlp_up_kernel(h_ptr, fc_ptr, post_ptr, pre_ptr, M, H, D, stride_hm, stride_hd, stride_fh, stride_fd,
                   stride_om, stride_oh, negative_slope, TOKENS_BUCKET, SAVE_PRE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """post = φ(h @ fc.T) (and pre = h @ fc.T when SAVE_PRE) for one (BLOCK_M × BLOCK_N) tile."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(H, BLOCK_N), 8)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pre = tile_matmul(h_ptr, stride_hm, stride_hd, fc_ptr, stride_fd, stride_fh, rows % M, cols % H, D,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    act = tl.where(pre > 0, pre, pre * negative_slope)
    offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_oh
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    tl.store(post_ptr + offs, (act * act).to(post_ptr.dtype.element_ty), mask=mask)
    if SAVE_PRE:
        tl.store(pre_ptr + offs, pre.to(pre_ptr.dtype.element_ty), mask=mask)


@autotune(_DPRE_CONFIGS, key=["H", "D", "FROM_POST", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _mlp_dpre_kernel(g_ptr, proj_ptr, aux_ptr, dpre_ptr, M, H, D, stride_gm, stride_gd, stride_pd, stride_ph,
                     stride_am, stride_ah, stride_om, stride_oh, negative_slope, TOKENS_BUCKET,
                     FROM_POST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dpre = (g @ proj) ⊙ φ'(pre) for one tile; aux is post (relu², φ' = 2·sqrt(post)) or pre (leaky)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(H, BLOCK_N), 8)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dpost = tile_matmul(g_ptr, stride_gm, stride_gd, proj_ptr, stride_pd, stride_ph, rows % M, cols % H, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)
    aux = tl.load(aux_ptr + rows64[:, None] * stride_am + cols[None, :] * stride_ah, mask=mask,
                  other=0.0).to(tl.float32)
    if FROM_POST:
        deriv = 2.0 * tl.sqrt(aux)
    else:
        deriv = tl.where(aux > 0, 2.0 * aux, (2.0 * negative_slope * negative_slope) * aux)
    tl.store(dpre_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_oh,
             (dpost * deriv).to(dpre_ptr.dtype.element_ty), mask=mask)


def _grid(M: int, H: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(H, meta["BLOCK_N"]),)


@torch.library.custom_op("crawler_kernels::relu2_mlp", mutates_args=())
def _mlp_forward(h: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
                 negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (M, d), post (M, hidden), pre (M, hidden), or (0,) for relu²); post/pre are saved for backward."""
    M, D = h.shape
    H = fc_weight.shape[0]
    fc, proj = fc_weight.to(h.dtype), proj_weight.to(h.dtype)
    save_pre = negative_slope != 0.0
    post = empty_output((M, H), h.dtype, h.device)
    pre = empty_output((M, H) if save_pre else (0,), h.dtype, h.device)
    if post.numel():
        # Without SAVE_PRE the pre pointer is never written: `post` stands in for the empty tensor's
        # (possibly null) pointer.
        _mlp_up_kernel[_grid(M, H)](h, fc, post, pre if save_pre else post, M, H, D, h.stride(0), h.stride(1),
                                    fc.stride(0), fc.stride(1), post.stride(0), post.stride(1), negative_slope,
                                    token_bucket(M), SAVE_PRE=save_pre, **dot_args(h.dtype))
    return post @ proj.T, post, pre


@_mlp_forward.register_fake
def _(h, fc_weight, proj_weight, negative_slope):
    M, H = h.shape[0], fc_weight.shape[0]
    return (h.new_empty((M, proj_weight.shape[0])), h.new_empty((M, H)),
            h.new_empty((M, H) if negative_slope != 0.0 else (0,)))


@torch.library.custom_op("crawler_kernels::relu2_mlp_backward", mutates_args=())
def _mlp_backward(grad: torch.Tensor, h: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
                  post: torch.Tensor, pre: torch.Tensor,
                  negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh in h.dtype, d fc_weight in its dtype, d proj_weight in its dtype) for the upstream `grad` (M, d)."""
    M, D = h.shape
    H = fc_weight.shape[0]
    fc, proj = fc_weight.to(h.dtype), proj_weight.to(h.dtype)
    grad = grad.to(h.dtype)
    from_post = negative_slope == 0.0
    aux = post if from_post else pre
    dpre = empty_output((M, H), h.dtype, h.device)
    if dpre.numel():
        _mlp_dpre_kernel[_grid(M, H)](grad, proj, aux, dpre, M, H, D, grad.stride(0), grad.stride(1),
                                      proj.stride(0), proj.stride(1), aux.stride(0), aux.stride(1),
                                      dpre.stride(0), dpre.stride(1), negative_slope, token_bucket(M),
                                      FROM_POST=from_post, **dot_args(h.dtype))
    d_fc = (dpre.T @ h).to(fc_weight.dtype)
    d_proj = (grad.T @ post).to(proj_weight.dtype)
    return dpre @ fc, d_fc, d_proj


@_mlp_backward.register_fake
def _(grad, h, fc_weight, proj_weight, post, pre, negative_slope):
    return torch.empty_like(h), torch.empty_like(fc_weight), torch.empty_like(proj_weight)


def _setup_context(ctx, inputs, output):
    h, fc_weight, proj_weight, negative_slope = inputs
    _, post, pre = output
    ctx.save_for_backward(h, fc_weight, proj_weight, post, pre)
    ctx.negative_slope = negative_slope


def _backward(ctx, grad_out, _grad_post, _grad_pre):
    h, fc_weight, proj_weight, post, pre = ctx.saved_tensors
    dh, d_fc, d_proj = torch.ops.crawler_kernels.relu2_mlp_backward(grad_out, h, fc_weight, proj_weight,
                                                                    post, pre, ctx.negative_slope)
    return dh, d_fc, d_proj, None


_mlp_forward.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the reference's F.linear calls run in bf16 (the seed's autocast dtype); casting the inputs
# the same way keeps both paths on the same precision and output dtype.
for _device_type in ("cuda", "cpu"):
    torch.library.register_autocast("crawler_kernels::relu2_mlp", _device_type, torch.bfloat16)


def relu2_mlp(h: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
              negative_slope: float = 0.0) -> torch.Tensor:
    """mlp(h) = φ(h @ fc_weight.T) @ proj_weight.T with φ = relu² (negative_slope 0) or
    leaky_relu(·, negative_slope)², the activation fused into the up-projection's epilogue.

    h (..., d) fp32/fp16/bf16/fp64 (fp64 up-projection tiles are computed in fp32), on a CUDA device (or
    the CPU under TRITON_INTERPRET=1); fc_weight (hidden, d) and proj_weight (d, hidden) float, cast to
    h.dtype like the reference (pass the fake-quantised weight under QAT; its gradient flows through).
    Returns (..., d) in h.dtype; differentiable in h, fc_weight and proj_weight. Under autocast the float
    inputs are cast to bf16 first, as the reference's F.linear would be.
    """
    check_mlp_inputs(h, fc_weight, proj_weight, negative_slope)
    check_triton_device("relu2_mlp", "h", h)
    D = h.shape[-1]
    out, _, _ = torch.ops.crawler_kernels.relu2_mlp(h.reshape(-1, D), fc_weight, proj_weight,
                                                    float(negative_slope))
    return out.reshape(h.shape)
