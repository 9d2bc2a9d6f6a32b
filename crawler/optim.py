"""Optimisers and schedules of the seed's recipe (docs/math.md §2): Muon for the block matrices, two AdamW
groups (token tables, scalars/vectors), the wall-clock or iteration LR multiplier, Muon momentum warm-up.

Embedding tables stored in bf16 (`embed_dtype="bfloat16"`, the pr1579 preset) are stepped by AdamW as
they are, with bf16 moments and no fp32 master copy: that is what the seed does (torch's AdamW handles
bf16 parameters; the tables are gathered, so a bf16 master is what the forward pass reads anyway).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .runtime import rank_and_world

# Newton-Schulz quintic coefficients: the fixed tuple of the seed (Keller Jordan's Muon) ...
NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 5
# ... and Polar Express's per-iteration coefficients (PR #1344 -> PR #1787), an option.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
TOKEN_PARAM_NAMES = ("tok_emb.weight", "bigram.table.weight", "ve.table.weight")
MUON_EXTRA_NAMES = ("bigram.proj.weight", "ve.proj.weight")
BLOCK_PREFIXES = ("flat_blocks.", "crawler_blocks.")


def orthogonalize(g: torch.Tensor, steps: int = 5, coeffs=NS_COEFFS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the orthogonal polar factor of a 2-D `g` by `steps` Newton-Schulz iterations in
    `dtype` (bf16, the seed's): X = g / (‖g‖_F + eps), transposed when rows > cols (so X Xᵀ is the small
    Gram matrix), then `A = X Xᵀ; X = a X + (b A + c A²) X` per iteration. Returns g's shape in `dtype`."""
    if g.dim() != 2:
        raise ValueError(f"g: expected a 2-D matrix, got shape {tuple(g.shape)}")
    if len(coeffs) < steps:
        raise ValueError(f"steps={steps} but only {len(coeffs)} coefficient triples were given")
    x = g.to(dtype)
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for a, b, c in coeffs[:steps]:
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (docs/math.md §2), for 2-D parameters.

    Per parameter: `buf = μ·buf + g`; `g' = g + μ·buf` (Nesterov) or `buf`; optionally each row of g'
    divided by its L2 norm (`row_normalize`, MuonEq-R); `u = orthogonalize(g') · sqrt(max(1, rows/cols))`;
    `p -= lr·u; p *= 1 - lr·weight_decay`.

    With torch.distributed initialised, parameter i of a group is orthogonalised by rank i mod world and
    the updates are exchanged in one flat buffer all-reduced with SUM. The momentum buffers are
    updated on every rank (elementwise, cheap next to Newton-Schulz), so the optimiser state is the same
    everywhere and rank 0's state_dict is a complete checkpoint. Gradients must already be averaged
    across ranks (DDP does that).

    `compute_dtype` is the Newton-Schulz and update-exchange dtype: bf16 (docs/math.md §2) by default; float32
    is for CPUs, whose bf16 matmuls run ~20x slower than fp32 when they lack bf16 units.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 weight_decay: float = 0.0, row_normalize: bool = False, polar_express: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or backend_steps < 1:
            raise ValueError(f"Muon: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, backend_steps >= 1; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"backend_steps={backend_steps}")
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                        weight_decay=weight_decay, row_normalize=row_normalize, polar_express=polar_express,
                        compute_dtype=compute_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon: parameters must be 2-D matrices, got shape {tuple(p.shape)}")
            if group["backend_steps"] > 5 and group["polar_express"]:
                raise ValueError("Muon: Polar Express has coefficients for 5 steps; use backend_steps <= 5")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = rank_and_world()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            coeffs = POLAR_EXPRESS_COEFFS if group["polar_express"] else NS_COEFFS
            flat = torch.zeros(sum(p.numel() for p in params), dtype=group["compute_dtype"],
                               device=params[0].device)
            offset = 0
            for i, p in enumerate(params):
                n = p.numel()
                if p.grad is not None:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf.mul_(mu).add_(p.grad)
                    if i % world == rank:
                        g = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                        if group["row_normalize"]:
                            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-7)
                        u = orthogonalize(g, group["backend_steps"], coeffs, dtype=group["compute_dtype"])
                        u = u * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                        flat[offset:offset + n] = u.reshape(-1)
                offset += n
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                n = p.numel()
                if p.grad is not None:
                    p.add_(flat[offset:offset + n].view_as(p).to(p.dtype), alpha=-lr)
                    if wd:
                        p.mul_(1.0 - lr * wd)
                offset += n
        return loss


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable parameters of a CrawlerGPT in the seed's three groups (docs/math.md §2), as (name, param):
    "muon": every 2-D matrix of the blocks + bigram.proj + ve.proj; "token": tok_emb, bigram.table,
    ve.table; "scalar": everything else that trains (q_gain, per-position vectors, skip_weights,
    smear.gate, ve.scales; alpha only when config.train_alpha). Frozen parameters are left out."""
    groups: dict[str, list] = {"muon": [], "token": [], "scalar": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in TOKEN_PARAM_NAMES:
            groups["token"].append((name, p))
        elif name in MUON_EXTRA_NAMES or (name.startswith(BLOCK_PREFIXES) and p.dim() == 2):
            groups["muon"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    return groups


def build_optimizers(model: nn.Module, *, matrix_lr: float = 0.02, tied_embed_lr: float = 0.02,
                     scalar_lr: float = 0.01, muon_momentum: float = 0.99, muon_backend_steps: int = 5,
                     muon_weight_decay: float = 0.085, adam_weight_decay: float = 0.085,
                     adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                     muon_row_normalize: bool = False, muon_polar_express: bool = False,
                     muon_dtype: torch.dtype = torch.bfloat16,
                     fused: bool | None = None) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW "token", AdamW "scalar"] over `split_parameters(model)`, with the seed's defaults.
    Every group records its `base_lr`; `set_lr_multiplier` scales from it. `fused` selects torch's fused
    AdamW (default: on CUDA)."""
    groups = split_parameters(model)
    if fused is None:
        fused = next(model.parameters()).is_cuda
    muon = Muon([p for _, p in groups["muon"]], lr=matrix_lr, momentum=muon_momentum,
                backend_steps=muon_backend_steps, weight_decay=muon_weight_decay,
                row_normalize=muon_row_normalize, polar_express=muon_polar_express, compute_dtype=muon_dtype)
    adam = dict(betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay, fused=fused)
    token = torch.optim.AdamW([p for _, p in groups["token"]], lr=tied_embed_lr, **adam)
    scalar = torch.optim.AdamW([p for _, p in groups["scalar"]], lr=scalar_lr, **adam)
    optimizers = [muon, token, scalar]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, elapsed_ms: float, *, iterations: int, max_wallclock_ms: float | None,
                  warmdown_frac: float = 0.6, warmdown_iters: int = 0) -> float:
    """The LR multiplier of docs/math.md §2: 1 until the last `warmdown_frac` of the budget, then linear to 0.

    The budget is the wall clock (`elapsed_ms / max_wallclock_ms`) when `max_wallclock_ms` is set, else
    the iteration count (`step / iterations`, `step` = steps done before this one). Without a wall clock,
    `warmdown_iters` > 0 is the seed's WARMDOWN_ITERS instead: linear to 0 over the last warmdown_iters
    steps, (iterations - step) / warmdown_iters from step iterations - warmdown_iters on."""
    if not 0 < warmdown_frac <= 1:
        raise ValueError(f"warmdown_frac must be in (0, 1], got {warmdown_frac}")
    if warmdown_iters > 0 and not max_wallclock_ms:
        return min(max((iterations - step) / warmdown_iters, 0.0), 1.0)
    frac = elapsed_ms / max_wallclock_ms if max_wallclock_ms else step / iterations
    if frac < 1.0 - warmdown_frac:
        return 1.0
    return max((1.0 - frac) / warmdown_frac, 0.0)


def muon_momentum_at(step: int, *, start: float = 0.85, end: float = 0.99, warmup_steps: int = 500) -> float:
    """Muon momentum warmed linearly from `start` to `end` over `warmup_steps` steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


def set_lr_multiplier(optimizers, multiplier: float) -> None:
    """lr = base_lr · multiplier for every group of every optimiser from `build_optimizers`."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier
