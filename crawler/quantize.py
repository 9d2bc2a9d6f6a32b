"""Post-training quantisation of a CrawlerGPT to an int6 artifact (SPEC §3): calibration data, Hessian
collection, the per-role quantisation plan, the GPTQ / round-to-nearest driver, loop-aware two-phase
GPTQ, selective ±1 pruning to a byte target, and the dequantised round trip (val_bpb before and after).

Stages, each usable on its own (train.py calls `quantize_and_evaluate`, which chains them):
    calibration_tokens(data_dir, ...)       -> (n_seqs, T+1) int64 token windows
    collect_hessians(model, calib, ...)     -> {weight name: H = Σ XᵀX / n_seqs}
    quantize_model(model, calib, plan, ...) -> QuantizeResult (an Artifact + timings + per-tensor stats)
    prune_to_fit(artifact, target, ...)     -> PruneResult (the encoded file bytes that fit)
    evaluate_artifact(artifact, ...)        -> (val_loss, val_bpb) of the dequantised model

CLI: python -m crawler.quantize --checkpoint C --out A [--plan default|seed|rtn_seed_floor]
     [--loop-aware] [--data-dir D] [--target-bytes N] ...   (--help lists everything)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

import kernels

from .artifact import (BUDGET_BYTES, Artifact, QuantizedTensor, decode_artifact, encode_artifact,
                       load_state_into, model_from_artifact, size_report)
from .config import CrawlerConfig
from .data import HEADER_BYTES, _shard_length, list_shards
from .evaluate import val_bpb
from .fileio import atomic_open
from .model import CrawlerGPT

Log = Callable[[str], None]

SMALL_NUMEL = 65_536               # tensors with at most this many elements are passed through (fp16)
DEFAULT_N_SEQS = 64
# Control tensors (gains, mixes, gates, alpha, VE scales) stay fp32 whatever their size (SPEC §1.12).
_CONTROL = re.compile(r"(^|\.)(attn_scales|mlp_scales|resid_mixes|skip_weights|q_gain|gate)$|"
                      r"^crawler_residual_scales\.\d+$|^ve\.scales\.\d+$")
_BLOCK = re.compile(r"^(flat_blocks|crawler_blocks)\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$")
_NAMED_ROLES = {"tok_emb.weight": "tok_emb", "bigram.table.weight": "bigram_table",
                "bigram.proj.weight": "bigram_proj", "ve.table.weight": "ve_table", "ve.proj.weight": "ve_proj"}
# Roles whose layer input we can observe, hence the only ones GPTQ can serve (bigram.proj's input is
# a gathered table row inside the fused embedding op; the tables are lookups, not matmuls).
HESSIAN_ROLES = ("block", "tok_emb", "ve_proj")


# --------------------------------------------------------------------------------------------------
# The plan

@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """How one role is quantised: method "gptq" (needs a Hessian) or "rtn" (per-row round to nearest),
    `bits` (R = 2^(bits-1) - 1), SDClip `k` (s_r = k·std(W_r)/R), and the scale floor: "eps" (1e-10,
    SPEC §3) or "inv_range" (1/R, PR #1579's floor, for reproducing the seed)."""
    method: str = "gptq"
    bits: int = 6
    k: float = 12.85
    floor: str = "eps"

    def __post_init__(self):
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"RoleSpec.method must be 'gptq' or 'rtn', got {self.method!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"RoleSpec.bits must be an int in 2..8, got {self.bits!r}")
        if not (math.isfinite(self.k) and self.k > 0):
            raise ValueError(f"RoleSpec.k must be > 0, got {self.k!r}")
        if self.floor not in ("eps", "inv_range"):
            raise ValueError(f"RoleSpec.floor must be 'eps' or 'inv_range', got {self.floor!r}")

    def describe(self) -> str:
        floor = ", floor 1/R" if self.floor == "inv_range" else ""
        return f"int{self.bits} {self.method} k={self.k:g}{floor}"


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """Which scheme each role of the state dict gets (SPEC §3, "What gets what"). Roles: `block` (the
    six matrices of every flat and crawler block), `tok_emb` (the tied embedding, GPTQ'd as the LM head),
    `bigram_table`, `bigram_proj`, `ve_table`, `ve_proj`. Control tensors are always fp32 and any other
    tensor of at most `small_numel` elements fp16; those two rules come before the roles.
    `tok_emb_upgrades`: more precise schemes for the tied embedding, tried in order by `build_artifact`;
    the first whose artifact fits the byte target without pruning replaces `tok_emb` (SPEC §3: int7 k=15
    or int8 k=20 "only where the budget allows"). The tied embedding is both the input table and the LM
    head, so its error reaches every token twice: on the tiny demo it is two thirds of the int6 gap."""
    name: str
    block: RoleSpec
    tok_emb: RoleSpec
    bigram_table: RoleSpec
    bigram_proj: RoleSpec
    ve_table: RoleSpec
    ve_proj: RoleSpec
    small_numel: int = SMALL_NUMEL
    tok_emb_upgrades: tuple[RoleSpec, ...] = ()

    def __post_init__(self):
        for role in ROLES:
            spec = getattr(self, role)
            if spec.method == "gptq" and role not in HESSIAN_ROLES:
                raise ValueError(f"plan {self.name!r}: role {role!r} cannot use GPTQ (no layer input to "
                                 f"build a Hessian from); use 'rtn'")

    def spec(self, role: str) -> RoleSpec | None:
        """The RoleSpec of a quantised role; None for the passthrough roles "control" and "small"."""
        return None if role in ("control", "small") else getattr(self, role)

    def with_role(self, role: str, spec: RoleSpec) -> "QuantPlan":
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        # An explicit tied-embedding scheme is the one used: no budget-driven upgrade replaces it.
        extra = {"tok_emb_upgrades": ()} if role == "tok_emb" else {}
        return dataclasses.replace(self, **{role: spec}, **extra)

    def needs_hessians(self) -> bool:
        return any(getattr(self, r).method == "gptq" for r in ROLES)

    def describe(self) -> str:
        upgrades = "".join(f"; tok_emb if it fits: {u.describe()}" for u in self.tok_emb_upgrades)
        return f"plan {self.name}: " + "; ".join(f"{r} {getattr(self, r).describe()}" for r in ROLES) + upgrades


ROLES = ("block", "tok_emb", "bigram_table", "bigram_proj", "ve_table", "ve_proj")
_RTN = RoleSpec("rtn")
_RTN_FLOOR = RoleSpec("rtn", floor="inv_range")
PLANS = {
    # Ours: GPTQ on every matrix that has a Hessian (the embedding as the LM head), SDClip floor 1e-10.
    # The tied embedding goes to int8 k=20, else int7 k=15, when the artifact still fits the budget.
    "default": QuantPlan("default", block=RoleSpec("gptq"), tok_emb=RoleSpec("gptq"), bigram_table=_RTN,
                         bigram_proj=_RTN, ve_table=_RTN, ve_proj=_RTN,
                         tok_emb_upgrades=(RoleSpec("gptq", 8, 20.0), RoleSpec("gptq", 7, 15.0))),
    # PR #1579's submitted scheme: GPTQ on block matrices, per-row SDClip elsewhere, scales floored at 1/31.
    "seed": QuantPlan("seed", block=RoleSpec("gptq", floor="inv_range"), tok_emb=_RTN_FLOOR,
                      bigram_table=_RTN_FLOOR, bigram_proj=_RTN_FLOOR, ve_table=_RTN_FLOOR, ve_proj=_RTN_FLOOR),
    # Baseline (a): round to nearest everywhere with the seed's 1/31 floor.
    "rtn_seed_floor": QuantPlan("rtn_seed_floor", block=_RTN_FLOOR, tok_emb=_RTN_FLOOR,
                                bigram_table=_RTN_FLOOR, bigram_proj=_RTN_FLOOR, ve_table=_RTN_FLOOR,
                                ve_proj=_RTN_FLOOR),
}


def get_plan(plan: str | QuantPlan) -> QuantPlan:
    if isinstance(plan, QuantPlan):
        return plan
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; choose one of {sorted(PLANS)}")
    return PLANS[plan]


def tensor_role(name: str, tensor: torch.Tensor, small_numel: int = SMALL_NUMEL) -> str:
    """The role of a state-dict tensor: "control", "small", or one of ROLES. Raises ValueError for a
    large tensor no role covers (a model this module does not know)."""
    if _CONTROL.search(name):
        return "control"
    if tensor.numel() <= small_numel:
        return "small"
    role = "block" if _BLOCK.match(name) else _NAMED_ROLES.get(name)
    if role is None or tensor.dim() != 2:
        raise ValueError(f"tensor {name!r} {tuple(tensor.shape)}: no quantisation role for it")
    return role


def plan_schemes(state_dict: dict[str, torch.Tensor], plan: str | QuantPlan = "default") -> dict[str, str]:
    """{name: scheme} the plan gives each tensor, e.g. "int6_gptq", "int6_rtn", "fp16", "fp32"."""
    plan = get_plan(plan)
    out = {}
    for name, t in state_dict.items():
        role = tensor_role(name, t, plan.small_numel)
        spec = plan.spec(role)
        out[name] = {"control": "fp32", "small": "fp16"}[role] if spec is None else f"int{spec.bits}_{spec.method}"
    return out


# --------------------------------------------------------------------------------------------------
# Calibration data and Hessians

def calibration_tokens(data_dir, n_seqs: int = DEFAULT_N_SEQS, seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """`n_seqs` windows of seq_len + 1 tokens at random offsets of random train shards (SPEC §3).

    Deterministic given the seed: for each sequence a shard is drawn uniformly among the sorted
    `fineweb_train_*.bin` shards that hold at least seq_len + 1 tokens, then an offset uniformly in
    [0, len - (seq_len + 1)]. Only the windows are read (memory-mapped), not whole shards.
    Returns (n_seqs, seq_len + 1) int64.
    """
    if n_seqs < 1 or seq_len < 1:
        raise ValueError(f"n_seqs and seq_len must be >= 1, got {n_seqs} and {seq_len}")
    shards = list_shards(data_dir, "train")
    lengths = np.array([_shard_length(p) for p in shards])      # validates each header and size
    usable = np.flatnonzero(lengths > seq_len)
    if usable.size == 0:
        raise ValueError(f"no train shard in {str(data_dir)!r} holds {seq_len + 1} tokens")
    rng = np.random.default_rng(seed)
    which = usable[rng.integers(0, usable.size, size=n_seqs)]
    offsets = rng.integers(0, lengths[which] - seq_len)      # high is exclusive: last start len - T - 1
    out = torch.empty(n_seqs, seq_len + 1, dtype=torch.int64)
    for i, (s, off) in enumerate(zip(which.tolist(), offsets.tolist())):
        tokens = np.memmap(shards[s], dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(int(lengths[s]),))
        out[i] = torch.from_numpy(tokens[off:off + seq_len + 1].astype(np.int64))
    return out


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (as training and evaluation run), nothing on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def hessian_groups(model: CrawlerGPT) -> dict[str, list[str]]:
    """{group: weight names sharing one Hessian}: c_q, c_k and c_v of a block read the same input."""
    groups: dict[str, list[str]] = {}
    for kind, blocks in (("flat_blocks", model.flat_blocks), ("crawler_blocks", model.crawler_blocks)):
        for i in range(len(blocks)):
            p = f"{kind}.{i}"
            groups[f"{p}.attn.qkv"] = [f"{p}.attn.{m}.weight" for m in ("c_q", "c_k", "c_v")]
            for m in ("attn.proj", "mlp.fc", "mlp.proj"):
                groups[f"{p}.{m}"] = [f"{p}.{m}.weight"]
    if model.ve is not None:
        groups["ve.proj"] = ["ve.proj.weight"]
    groups["lm_head"] = ["tok_emb.weight"]
    return groups


@torch.no_grad()
def collect_hessians(model: CrawlerGPT, calib: torch.Tensor, *, names=None, batch_seqs: int = 8,
                     log: Log | None = None) -> dict[str, torch.Tensor]:
    """H = (1/n_seqs) Σ XᵀX of the input X of every Linear, over the calibration windows (SPEC §3).

    calib (n_seqs, T+1) int token ids (the model reads the first T of each). Forward pre-hooks catch
    each layer's input; a crawler block runs once per loop and every pass adds to its one Hessian.
    The MLP's fused op hides the hidden activation, so `mlp.proj`'s input relu²(h·W_fcᵀ) is recomputed
    from the MLP input. The tied embedding gets the Hessian of the final rms_norm output (the LM head's
    input). `names` limits the work to those weight names (default: all). Products are fp32 matmuls
    summed in fp64; returns {weight name: (K, K) float32 on the model's device}, c_q/c_k/c_v sharing
    one tensor. The model runs in eval mode under bf16 autocast on CUDA, with QAT off.
    """
    if calib.dim() != 2 or calib.shape[1] < 2:
        raise ValueError(f"calib: expected (n_seqs, T+1) token ids, got shape {tuple(calib.shape)}")
    groups = {g: ws for g, ws in hessian_groups(model).items() if names is None or set(ws) & set(names)}
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}

    def accumulate(group: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        if group in sums:
            sums[group] += xtx
        else:
            sums[group] = xtx

    def on_input(group):
        return lambda module, args: accumulate(group, args[0])

    def on_mlp(prefix):
        def hook(mlp, args):
            h = args[0]
            if f"{prefix}.mlp.fc" in groups:
                accumulate(f"{prefix}.mlp.fc", h)
            if f"{prefix}.mlp.proj" in groups:
                accumulate(f"{prefix}.mlp.proj", kernels.reference.relu2(
                    F.linear(h, mlp.fc.effective_weight().to(h.dtype)), mlp.negative_slope))
        return hook

    handles = []
    for kind, blocks in (("flat_blocks", model.flat_blocks), ("crawler_blocks", model.crawler_blocks)):
        for i, block in enumerate(blocks):
            p = f"{kind}.{i}"
            if f"{p}.attn.qkv" in groups:
                handles.append(block.attn.register_forward_pre_hook(on_input(f"{p}.attn.qkv")))
            if f"{p}.attn.proj" in groups:
                handles.append(block.attn.proj.register_forward_pre_hook(on_input(f"{p}.attn.proj")))
            if f"{p}.mlp.fc" in groups or f"{p}.mlp.proj" in groups:
                handles.append(block.mlp.register_forward_pre_hook(on_mlp(p)))
    if "ve.proj" in groups:
        handles.append(model.ve.proj.register_forward_pre_hook(on_input("ve.proj")))

    n_seqs = calib.shape[0]
    t0 = time.perf_counter()
    with _eval_mode(model):
        try:
            for start in range(0, n_seqs, batch_seqs):
                x = calib[start:start + batch_seqs, :-1].to(device)
                with _autocast(device):
                    hidden = model.forward_hidden(x)
                if "lm_head" in groups:
                    accumulate("lm_head", hidden)
        finally:
            for h in handles:
                h.remove()
    if log:
        log(f"hessians: {len(sums)} groups from {n_seqs} sequences x {calib.shape[1] - 1} tokens in "
            f"{time.perf_counter() - t0:.2f}s")
    out = {}
    for group, weights in groups.items():
        H = (sums[group] / n_seqs).float()
        out.update({w: H for w in weights})
    return out


@contextlib.contextmanager
def _eval_mode(model: CrawlerGPT) -> Iterator[None]:
    """Eval mode with QAT off (export sees the real weights); both restored afterwards."""
    was_training = model.training
    qat = {m: m.qat for m in model.modules() if hasattr(m, "qat")}
    model.eval()
    model.set_qat(False)
    try:
        yield
    finally:
        for m, flag in qat.items():
            m.qat = flag
        model.train(was_training)


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load `values` (name -> tensor) into the model's parameters; restore on exit."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v.to(params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


# --------------------------------------------------------------------------------------------------
# Quantising tensors

def _floored_scales(weight: torch.Tensor, spec: RoleSpec) -> torch.Tensor:
    """SDClip scales (fp16) of the spec, with PR #1579's 1/R floor when spec.floor == "inv_range"."""
    scales = kernels.reference.sdclip_scales(weight, spec.bits, spec.k)
    if spec.floor == "inv_range":
        scales = scales.clamp_min(1.0 / kernels.reference.quant_max(spec.bits))
    return scales


def _gptq_op(device: torch.device):
    """The Triton GPTQ on CUDA when exported; the torch reference otherwise (the interpreter is far
    slower than torch on CPU)."""
    if device.type == "cuda" and hasattr(kernels, "gptq_quantize"):
        return kernels.gptq_quantize
    return kernels.reference.gptq_quantize


def _gptq_fixed_scales(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, bits: int,
                       block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ's column walk with given scales (only for PR #1579's 1/R-floored scales, which the public
    op cannot take): the op's own preparation (dead columns, damping, act-order, inverse Cholesky),
    then the same walk as kernels.reference.gptq_quantize. Returns int8 codes (N, K)."""
    W, U, _, perm = kernels.reference.gptq_prepare(weight, hessian, bits=bits, clip_sigmas=1.0,
                                                   act_order=True, damp=damp)
    return kernels.reference.gptq_column_walk(W, U, scales, perm, bits=bits, block_size=block_size)


def quantize_tensor(weight: torch.Tensor, spec: RoleSpec, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantise one (N, K) matrix per `spec`; GPTQ needs the layer's (K, K) Hessian. Runs in fp32 on
    the weight's device; returns CPU int8 codes and fp16 scales."""
    w = weight.detach().float()
    if spec.method == "gptq":
        if hessian is None:
            raise ValueError("quantize_tensor: GPTQ needs a Hessian")
        H = hessian.to(w.device, torch.float32)
        if spec.floor == "eps":
            codes, scales = _gptq_op(w.device)(w, H, bits=spec.bits, clip_sigmas=spec.k)
        else:
            scales = _floored_scales(w, spec)
            codes = _gptq_fixed_scales(w, H, scales, spec.bits)
    else:
        scales = _floored_scales(w, spec)
        codes = kernels.reference.quantize_rtn(w, scales, spec.bits)
    return QuantizedTensor(codes.cpu(), scales.cpu(), spec.bits, spec.method)


def _relative_error(w: torch.Tensor, q: QuantizedTensor, hessian: torch.Tensor | None) -> float:
    """tr(E H Eᵀ)/tr(W H Wᵀ) with a Hessian (GPTQ's proxy loss, relative), else ‖E‖²/‖W‖²."""
    w = w.detach().double()
    e = w - q.dequantize(torch.float64).to(w.device)
    if hessian is None:
        return float((e * e).sum() / (w * w).sum().clamp_min(1e-300))
    H = hessian.double().to(w.device)
    return float(((e @ H) * e).sum() / ((w @ H) * w).sum().clamp_min(1e-300))


@dataclasses.dataclass
class QuantizeResult:
    """The artifact plus what it cost: per-tensor rows (name, scheme, k, shape, seconds, rel_error: the
    proxy loss tr(EHEᵀ)/tr(WHWᵀ) where a Hessian exists, else ‖E‖²/‖W‖²) and stage times."""
    artifact: Artifact
    plan: QuantPlan
    loop_aware: bool
    stats: list[dict]
    hessian_seconds: float
    quantize_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.hessian_seconds + self.quantize_seconds


def _batched_gptq(weights: list[torch.Tensor], hessians: list[torch.Tensor], spec: RoleSpec) -> list[QuantizedTensor]:
    """GPTQ of same-shape matrices in one batched Triton pass (one launch per column block)."""
    codes, scales = kernels.gptq_quantize_batched(torch.stack([w.detach().float() for w in weights]),
                                                  torch.stack([h.float() for h in hessians]),
                                                  bits=spec.bits, clip_sigmas=spec.k)
    return [QuantizedTensor(c.cpu(), s.cpu(), spec.bits, spec.method) for c, s in zip(codes, scales)]


def _quantize_entries(state: dict[str, torch.Tensor], names, plan: QuantPlan, hessians: dict[str, torch.Tensor],
                      stats: list[dict], log: Log) -> dict[str, QuantizedTensor | torch.Tensor]:
    """Artifact entries for `names` of `state`, in that order; one stats row per quantised tensor.

    On CUDA, GPTQ'd matrices of one shape and spec (e.g. the five blocks' mlp.fc) go through the batched
    Triton op together; elsewhere each matrix is quantised on its own. Progress: one line per group."""
    out: dict[str, QuantizedTensor | torch.Tensor] = {}
    groups: dict[tuple, list[str]] = {}
    for name in names:
        t = state[name]
        role = tensor_role(name, t, plan.small_numel)
        spec = plan.spec(role)
        if spec is None:
            out[name] = t.detach().cpu().to(torch.float32 if role == "control" else torch.float16)
            continue
        if spec.method == "gptq" and name not in hessians:
            raise ValueError(f"{name}: plan {plan.name!r} quantises it with GPTQ but no Hessian was given")
        batchable = (t.is_cuda and spec.method == "gptq" and spec.floor == "eps"
                     and hasattr(kernels, "gptq_quantize_batched"))
        groups.setdefault((tuple(t.shape), spec, name if not batchable else None), []).append(name)
    done = 0
    quantised = sum(len(g) for g in groups.values())
    for (shape, spec, _), members in groups.items():
        t0 = time.perf_counter()
        if len(members) > 1:
            results = _batched_gptq([state[n] for n in members], [hessians[n] for n in members], spec)
        else:
            results = [quantize_tensor(state[members[0]], spec, hessians.get(members[0]) if spec.method == "gptq"
                                       else None)]
        dt = time.perf_counter() - t0
        errors = []
        for name, q in zip(members, results):
            out[name] = q
            errors.append(_relative_error(state[name], q, hessians.get(name)))
            stats.append({"name": name, "scheme": q.scheme, "k": spec.k, "shape": list(shape),
                          "seconds": dt / len(members), "rel_error": errors[-1]})
        done += len(members)
        what = members[0] if len(members) == 1 else f"{len(members)} x {members[0].split('.', 2)[-1]}"
        log(f"quantize: [{done}/{quantised}] {what} {shape} {spec.describe()} {dt:.2f}s "
            f"rel_err {max(errors):.3e}{' (max)' if len(members) > 1 else ''}")
    return {n: out[n] for n in names}


def _summarise(stats: list[dict], n_tensors: int, t_hess: float, log: Log) -> float:
    t_quant = sum(row["seconds"] for row in stats)
    log(f"quantize: {len(stats)} tensors quantised, {n_tensors - len(stats)} passed through; "
        f"hessians {t_hess:.2f}s + quantisation {t_quant:.2f}s = {t_hess + t_quant:.2f}s")
    return t_quant


def quantize_state_dict(state: dict[str, torch.Tensor], config: CrawlerConfig, *,
                        plan: str | QuantPlan = "default", hessians: dict[str, torch.Tensor] | None = None,
                        log: Log | None = print) -> QuantizeResult:
    """Quantise a CrawlerGPT state dict per `plan` into an Artifact (SPEC §3). GPTQ roles need their
    Hessians ({weight name: (K, K)}, e.g. from `collect_hessians`); plans without GPTQ need none."""
    plan, log = get_plan(plan), log or (lambda _: None)
    log(plan.describe())
    stats: list[dict] = []
    tensors = _quantize_entries(state, list(state), plan, hessians or {}, stats, log)
    t_quant = _summarise(stats, len(tensors), 0.0, log)
    return QuantizeResult(Artifact(config.to_dict(), tensors), plan, False, stats, 0.0, t_quant)


def quantize_model(model: CrawlerGPT, calib: torch.Tensor | None = None, *, plan: str | QuantPlan = "default",
                   loop_aware: bool = False, batch_seqs: int = 8, log: Log | None = print) -> QuantizeResult:
    """Collect the Hessians the plan needs on `calib` and quantise `model` into an Artifact; the model
    is left unchanged.

    calib (n_seqs, T+1) token windows (from `calibration_tokens`) are required when the plan uses GPTQ.
    `loop_aware` (PR #1535's two-phase GPTQ): phase 1 collects all Hessians and quantises every
    non-crawler tensor; phase 2 swaps those for their quantised values, re-collects the crawler
    blocks' Hessians (the crawler then sees the activations it will really get) and quantises the
    crawler; the original weights are restored. Progress goes to `log` (one line per tensor).
    """
    plan, log = get_plan(plan), log or (lambda _: None)
    state = model.state_dict()
    gptq_names = {n for n, t in state.items()
                  if (spec := plan.spec(tensor_role(n, t, plan.small_numel))) is not None and spec.method == "gptq"}
    if gptq_names and calib is None:
        raise ValueError(f"plan {plan.name!r} uses GPTQ: calibration tokens (calib) are required")
    log(plan.describe() + (" (loop-aware)" if loop_aware else ""))
    device = next(model.parameters()).device
    t_hess = 0.0
    stats: list[dict] = []

    def hessians_for(names) -> dict[str, torch.Tensor]:
        nonlocal t_hess
        if not names:
            return {}
        t0 = time.perf_counter()
        out = collect_hessians(model, calib, names=names, batch_seqs=batch_seqs, log=log)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_hess += time.perf_counter() - t0
        return out

    names = list(state)
    if loop_aware:
        crawler = [n for n in names if n.startswith("crawler_blocks.")]
        rest = [n for n in names if n not in crawler]
        tensors = _quantize_entries(state, rest, plan, hessians_for(gptq_names & set(rest)), stats, log)
        swapped = {n: t.dequantize() if isinstance(t, QuantizedTensor) else t for n, t in tensors.items()}
        log(f"loop-aware: phase 2 with {len(swapped)} non-crawler tensors swapped for their quantised values")
        with swapped_weights(model, swapped):
            crawler_hessians = hessians_for(gptq_names & set(crawler))
        tensors.update(_quantize_entries(state, crawler, plan, crawler_hessians, stats, log))
        tensors = {n: tensors[n] for n in names}    # state-dict order
    else:
        tensors = _quantize_entries(state, names, plan, hessians_for(gptq_names), stats, log)
    t_quant = _summarise(stats, len(tensors), t_hess, log)
    return QuantizeResult(Artifact(model.config.to_dict(), tensors), plan, loop_aware, stats, t_hess, t_quant)


# --------------------------------------------------------------------------------------------------
# Selective ±1 pruning

@dataclasses.dataclass
class PruneResult:
    """The artifact after pruning, its encoded file bytes (so nothing is compressed twice), how many ±1
    codes were zeroed out of how many candidates, and how many encodings the search took."""
    artifact: Artifact
    blob: bytes
    pruned: int
    candidates: int
    probes: int
    seconds: float


def _pm1_candidates(artifact: Artifact):
    """Every code equal to ±1, ordered by its row's s² ascending (stable: tensor order, then position).
    Returns (names, tensor index per candidate, flat index per candidate)."""
    names = [n for n, t in artifact.tensors.items() if isinstance(t, QuantizedTensor)]
    which, flat, keys = [], [], []
    for i, n in enumerate(names):
        q = artifact.tensors[n]
        idx = torch.nonzero(q.codes.abs().view(-1) == 1).view(-1)
        rows = idx // q.codes.shape[1]
        which.append(torch.full_like(idx, i))
        flat.append(idx)
        keys.append(q.scales.float()[rows] ** 2)
    if not names:
        return names, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    order = torch.argsort(torch.cat(keys), stable=True)
    return names, torch.cat(which)[order], torch.cat(flat)[order]


def _zero_first(artifact: Artifact, names, which, flat, n: int) -> Artifact:
    tensors = dict(artifact.tensors)
    for i, name in enumerate(names):
        sel = flat[:n][which[:n] == i]
        if sel.numel():
            q = tensors[name]
            codes = q.codes.clone()
            codes.view(-1)[sel] = 0
            tensors[name] = dataclasses.replace(q, codes=codes)
    return Artifact(artifact.config, tensors)


def prune_to_fit(artifact: Artifact, target_bytes: int, *, code_bytes: int = 0, tolerance: float = 1e-3,
                 log: Log | None = print) -> PruneResult:
    """Zero the fewest ±1 codes (lowest row s² first, SPEC §3) so that encoded artifact + code_bytes
    <= target_bytes (decimal). Searches the count over a bracket that always holds a fitting upper
    end, by secant steps (with a bisection step when one end keeps moving), until the bracket is
    within `tolerance` of the candidate count; the answer is the smallest count measured to fit.
    Raises ValueError when even zeroing every candidate does not fit."""
    log = log or (lambda _: None)
    t0 = time.perf_counter()
    limit = target_bytes - code_bytes
    blob = encode_artifact(artifact)
    if len(blob) <= limit:
        log(f"prune: artifact {len(blob):,} B + code {code_bytes:,} B fits {target_bytes:,} B; nothing pruned")
        return PruneResult(artifact, blob, 0, 0, 1, time.perf_counter() - t0)
    names, which, flat = _pm1_candidates(artifact)
    total = which.numel()

    def probe(n: int) -> tuple[int, bytes, Artifact]:
        art = _zero_first(artifact, names, which, flat, n)
        b = encode_artifact(art)
        log(f"prune: zeroing {n:,} of {total:,} ±1 codes -> {len(b):,} B (limit {limit:,} B)")
        return len(b), b, art

    lo, size_lo = 0, len(blob)
    size_hi, blob_hi, art_hi = probe(total)
    probes = 2
    if size_hi > limit:
        raise ValueError(f"cannot fit {target_bytes:,} B: even with all {total:,} ±1 codes zeroed the artifact "
                         f"is {size_hi:,} B + code {code_bytes:,} B; lower the bits or raise k of a role")
    hi = total
    moved: list[str] = []          # which end of the bracket each probe replaced
    bisected = False
    while hi - lo > max(1, int(tolerance * total)):
        # Size falls almost linearly in the count, so a secant guess usually lands close; when the same
        # end moved twice in a row the guesses are lopsided, so one bisection step follows.
        bisected = (len(moved) >= 2 and moved[-1] == moved[-2] and not bisected) or size_lo <= size_hi
        if bisected:
            mid = (lo + hi) // 2
        else:
            mid = lo + round((size_lo - limit) / (size_lo - size_hi) * (hi - lo))
        mid = min(max(mid, lo + 1), hi - 1)
        size, b, art = probe(mid)
        probes += 1
        if size <= limit:
            hi, size_hi, blob_hi, art_hi = mid, size, b, art
            moved.append("hi")
        else:
            lo, size_lo = mid, size
            moved.append("lo")
    dt = time.perf_counter() - t0
    log(f"prune: zeroed {hi:,} of {total:,} ±1 codes -> {size_hi:,} B in {probes} encodings, {dt:.1f}s")
    return PruneResult(art_hi, blob_hi, hi, total, probes, dt)


# --------------------------------------------------------------------------------------------------
# Round trip

def evaluate_artifact(artifact: Artifact, val_tokens: torch.Tensor, luts, *, seq_len: int, device="cpu",
                      ops: str = "auto", batch_seqs: int = 8) -> tuple[float, float]:
    """(val_loss, val_bpb) of the dequantised artifact (non-overlapping windows, crawler.evaluate)."""
    model = model_from_artifact(artifact, device=device, ops=ops)
    return val_bpb(model, val_tokens, luts, seq_len=seq_len, batch_seqs=batch_seqs)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _upgrade_tok_emb(model: CrawlerGPT, calib: torch.Tensor | None, result: QuantizeResult, byte_room: int,
                     batch_seqs: int, log: Log) -> tuple[Artifact, str]:
    """The plan's first `tok_emb_upgrades` scheme whose artifact fits in `byte_room` bytes, else the
    artifact as quantised. Returns (artifact, the tied embedding's scheme description)."""
    artifact, name = result.artifact, "tok_emb.weight"
    current = artifact.tensors.get(name)
    if not isinstance(current, QuantizedTensor):
        return artifact, "passthrough"
    base = result.plan.tok_emb
    upgrades = result.plan.tok_emb_upgrades
    if any(spec.method == "gptq" for spec in upgrades):
        hessian = collect_hessians(model, calib, names={name}, batch_seqs=batch_seqs, log=log)[name]
    weight = model.state_dict()[name].float()
    for spec in upgrades:
        candidate = Artifact(artifact.config, {**artifact.tensors,
                                               name: quantize_tensor(weight, spec, hessian if spec.method == "gptq" else None)})
        size = len(encode_artifact(candidate))
        fits = size <= byte_room
        log(f"tied embedding {spec.describe()}: artifact {size:,} B {'fits' if fits else 'does not fit'} "
            f"in {byte_room:,} B")
        if fits:
            return candidate, spec.describe()
    return artifact, base.describe()


def build_artifact(model: CrawlerGPT, calib: torch.Tensor | None, *, plan: str | QuantPlan = "default",
                   loop_aware: bool = False, target_bytes: int = BUDGET_BYTES, out_path=None,
                   batch_seqs: int = 8, log: Log | None = print) -> tuple[Artifact, dict]:
    """Quantise (`quantize_model`), prune ±1 codes until artifact + code bytes <= target_bytes, write the
    file atomically to `out_path` (when given) and decode the written bytes back.

    Returns (the decoded artifact, a JSON-ready summary: plan, loop_aware, artifact_bytes, code_bytes,
    code_bytes_brotli, total_bytes, budget (16,000,000), fits, pruned, prune_candidates,
    hessian_seconds, quantize_seconds, quantize_total_seconds, compress_seconds, artifact_path).
    """
    log = log or (lambda _: None)
    result = quantize_model(model, calib, plan=plan, loop_aware=loop_aware, batch_seqs=batch_seqs, log=log)
    sizes = size_report(0)
    artifact, tok_emb_scheme = _upgrade_tok_emb(model, calib, result, target_bytes - sizes.code_bytes,
                                                batch_seqs, log)
    pruned = prune_to_fit(artifact, target_bytes, code_bytes=sizes.code_bytes, log=log)
    if out_path is not None and _rank() == 0:    # every rank builds the same bytes; one writes them
        with atomic_open(out_path) as f:
            f.write(pruned.blob)
    # Evaluate what was written: decode the file's bytes, not the in-memory tensors.
    artifact = decode_artifact(pruned.blob, where=str(out_path or "<artifact>"))
    sizes = dataclasses.replace(sizes, artifact_bytes=len(pruned.blob))
    log(sizes.summary())
    return artifact, {
        "plan": result.plan.name, "loop_aware": loop_aware, "tok_emb_scheme": tok_emb_scheme,
        "artifact_bytes": sizes.artifact_bytes, "code_bytes": sizes.code_bytes,
        "code_bytes_brotli": sizes.code_bytes_brotli, "total_bytes": sizes.total, "budget": sizes.budget,
        "fits": sizes.fits, "pruned": pruned.pruned, "prune_candidates": pruned.candidates,
        "hessian_seconds": result.hessian_seconds, "quantize_seconds": result.quantize_seconds,
        "quantize_total_seconds": result.total_seconds, "compress_seconds": pruned.seconds,
        "artifact_path": str(out_path) if out_path is not None else None,
    }


def quantize_and_evaluate(model: CrawlerGPT, data_dir, luts, val_tokens: torch.Tensor, *,
                          plan: str | QuantPlan = "default", loop_aware: bool = False, out_path=None,
                          target_bytes: int = BUDGET_BYTES, n_seqs: int = DEFAULT_N_SEQS,
                          calib_seq_len: int | None = None, eval_seq_len: int | None = None, seed: int = 0,
                          batch_seqs: int = 8, pre_quant: tuple[float, float] | None = None,
                          log: Log | None = print) -> dict:
    """The train -> artifact -> score stage for train.py: pre-quant val_bpb (unless `pre_quant` =
    (val_loss, val_bpb) is given), calibration windows from `data_dir`'s train shards, `build_artifact`
    (Hessians, quantisation per `plan`, pruning to `target_bytes`, the file at `out_path`), and the
    round-trip val_bpb of the dequantised artifact on `val_tokens` (non-overlapping windows of
    eval_seq_len, default the config's train_seq_len).

    Returns build_artifact's summary plus pre_quant_val_loss / _bpb, quant_val_loss / _bpb and
    quant_gap_bpb (round trip minus pre-quant).

    Under torch.distributed every rank must call it (val_bpb shards windows and all-reduces): each rank
    quantises the same weights on the same calibration windows, and rank 0 alone writes the file.
    """
    log = log or (lambda _: None)
    plan = get_plan(plan)
    device = next(model.parameters()).device
    T = eval_seq_len or model.config.train_seq_len
    if pre_quant is None:
        pre_quant = val_bpb(model, val_tokens, luts, seq_len=T, batch_seqs=batch_seqs)
        log(f"pre-quant: val_loss {pre_quant[0]:.4f} val_bpb {pre_quant[1]:.4f}")
    calib = None
    if plan.needs_hessians():
        calib = calibration_tokens(data_dir, n_seqs, calib_seq_len or model.config.train_seq_len, seed)
    artifact, summary = build_artifact(model, calib, plan=plan, loop_aware=loop_aware, target_bytes=target_bytes,
                                       out_path=out_path, batch_seqs=batch_seqs, log=log)
    q_loss, q_bpb = evaluate_artifact(artifact, val_tokens, luts, seq_len=T, device=device, ops=model.ops,
                                      batch_seqs=batch_seqs)
    gap = q_bpb - pre_quant[1]
    log(f"round trip ({plan.name}{', loop-aware' if loop_aware else ''}): val_loss {q_loss:.4f} "
        f"val_bpb {q_bpb:.4f} (pre-quant {pre_quant[1]:.4f}, gap {gap:+.4f})")
    return {**summary, "pre_quant_val_loss": pre_quant[0], "pre_quant_val_bpb": pre_quant[1],
            "quant_val_loss": q_loss, "quant_val_bpb": q_bpb, "quant_gap_bpb": gap}


# --------------------------------------------------------------------------------------------------
# CLI

def load_checkpoint(path, preset: str | None = None) -> tuple[CrawlerConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a trainer file (checkpoint.pt or final_model.pt: the state dict under
    "model" and the config under "model_config" as JSON, or under "config" as a dict) or from a plain
    state dict plus `preset`. Read with torch.load(weights_only=True): no code runs. Prefixes added by
    torch.compile ("_orig_mod.") and DDP ("module.") are removed."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {str(path)!r}: expected a dict, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
        config = ckpt.get("model_config", ckpt.get("config"))
        if isinstance(config, str):
            config = json.loads(config)
        if isinstance(config, dict):
            config = CrawlerConfig.from_dict(config)
        elif preset:
            config = CrawlerConfig.preset(preset)
        else:
            raise ValueError(f"checkpoint {str(path)!r} has no model config; pass --preset")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if not preset:
            raise ValueError(f"checkpoint {str(path)!r} is a plain state dict; pass --preset")
        state, config = ckpt, CrawlerConfig.preset(preset)
    else:
        raise ValueError(f"checkpoint {str(path)!r}: expected a trainer checkpoint (keys 'model', "
                         f"'model_config') or a state dict of tensors, got keys {sorted(ckpt)[:8]}")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}
    return config, state


def _parse_role(text: str) -> tuple[str, RoleSpec]:
    """"ROLE=METHOD[:BITS[:K[:FLOOR]]]", e.g. "tok_emb=gptq:8:20" or "block=rtn:6:12.85:inv_range"."""
    try:
        role, rest = text.split("=", 1)
        method, *more = rest.split(":")
        bits, k, floor = (more + [None] * 3)[:3]
        spec = RoleSpec(method, int(bits or 6), float(k or 12.85), floor or "eps")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROLE=METHOD[:BITS[:K[:FLOOR]]] ({e})") from None
    return role, spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crawler.quantize", description=(
        "Quantise a CrawlerGPT checkpoint to an int6 artifact (GPTQ + SDClip, SPEC §3) and report its "
        "size against the 16,000,000-byte budget; with --eval also the val_bpb before and after."))
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint or plain state dict (torch.save)")
    ap.add_argument("--out", required=True, help="artifact file to write")
    ap.add_argument("--preset", help="config preset for a checkpoint without a config (pr1579, tiny)")
    ap.add_argument("--plan", default="default", choices=sorted(PLANS),
                    help="quantisation plan: default (ours), seed (PR #1579's), rtn_seed_floor (baseline)")
    ap.add_argument("--role", action="append", default=[], type=_parse_role, metavar="ROLE=METHOD[:BITS[:K[:FLOOR]]]",
                    help=f"override one role of the plan, e.g. tok_emb=gptq:8:20 (METHOD gptq|rtn, FLOOR "
                         f"eps|inv_range); roles: {', '.join(ROLES)}")
    ap.add_argument("--small-numel", type=int, default=SMALL_NUMEL,
                    help="tensors with at most this many elements pass through as fp16")
    ap.add_argument("--loop-aware", action="store_true", help="two-phase loop-aware GPTQ (PR #1535)")
    ap.add_argument("--data-dir", help="directory of fineweb_{train,val}_*.bin shards (default: the "
                                       "built-in corpus at the model's vocab size)")
    ap.add_argument("--tokenizer", help="SentencePiece model for --eval (default: DATA_DIR/tokenizer.model)")
    ap.add_argument("--target-bytes", type=int, default=BUDGET_BYTES,
                    help="prune ±1 codes until artifact + code bytes fit this (decimal bytes)")
    ap.add_argument("--n-seqs", type=int, default=DEFAULT_N_SEQS, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, help="calibration/eval sequence length (default: config's)")
    ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    ap.add_argument("--batch-seqs", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--eval", action="store_true", help="also measure val_bpb before and after quantisation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default="auto", choices=("auto", "reference", "triton"))
    ap.add_argument("--json", help="write the summary as JSON here")
    args = ap.parse_args(argv)

    plan = dataclasses.replace(get_plan(args.plan), small_numel=args.small_numel)
    for role, spec in args.role:
        plan = plan.with_role(role, spec)
    config, state = load_checkpoint(args.checkpoint, args.preset)
    with torch.device("meta"):       # no initialisation: every weight comes from the checkpoint
        model = CrawlerGPT(config, ops=args.ops)
    load_state_into(model, state, device=args.device)
    seq_len = args.seq_len or config.train_seq_len

    data_dir, tokenizer = args.data_dir, args.tokenizer
    if data_dir is None and (plan.needs_hessians() or args.eval):
        from .data import build_builtin_corpus
        info = build_builtin_corpus(vocab_size=config.vocab_size)
        data_dir, tokenizer = info.data_dir, tokenizer or info.tokenizer_path

    if args.eval:
        from .data import load_validation_tokens
        from .tokenizer import byte_luts, load_tokenizer
        sp = load_tokenizer(tokenizer or Path(data_dir) / "tokenizer.model")
        luts = byte_luts(sp, config.vocab_size)
        summary = quantize_and_evaluate(model, data_dir, luts, load_validation_tokens(data_dir), plan=plan,
                                        loop_aware=args.loop_aware, out_path=args.out,
                                        target_bytes=args.target_bytes, n_seqs=args.n_seqs,
                                        calib_seq_len=seq_len, eval_seq_len=seq_len, seed=args.seed,
                                        batch_seqs=args.batch_seqs)
    else:
        calib = calibration_tokens(data_dir, args.n_seqs, seq_len, args.seed) if plan.needs_hessians() else None
        _, summary = build_artifact(model, calib, plan=plan, loop_aware=args.loop_aware,
                                    target_bytes=args.target_bytes, out_path=args.out, batch_seqs=args.batch_seqs)
    if args.json:
        with atomic_open(args.json) as f:
            f.write(json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    return 0 if summary["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
