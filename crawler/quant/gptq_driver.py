"""Quantising tensors and models per a plan (docs/math.md §3): GPTQ with SDClip scales or per-row round
to nearest for each matrix, same-shape GPTQ matrices batched through one Triton pass on CUDA, the seed's
1/R-floored variant, and loop-aware two-phase GPTQ (PR #1535) for the crawler blocks.

    quantize_tensor(weight, spec, hessian)        -> QuantizedTensor
    quantize_state_dict(state, config, plan, ...) -> QuantizeResult (Hessians given by the caller)
    quantize_model(model, calib, plan, ...)       -> QuantizeResult (Hessians from a Calibration)
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import torch

import kernels

from ..artifact import Artifact, QuantizedTensor
from ..config import CrawlerConfig
from ..model import CrawlerGPT
from ..runtime import Progress, resolve_ops
from .hessians import Calibration, collect_hessians
from .plan import QuantPlan, RoleSpec, get_plan, tensor_role

Log = Callable[[str], None]


def _floored_scales(weight: torch.Tensor, spec: RoleSpec) -> torch.Tensor:
    """SDClip scales (fp16) of the spec, with PR #1579's 1/R floor when spec.floor == "inv_range"."""
    scales = kernels.reference.sdclip_scales(weight, spec.bits, spec.k)
    if spec.floor == "inv_range":
        scales = scales.clamp_min(1.0 / kernels.reference.quant_max(spec.bits))
    return scales


def _gptq_fixed_scales(weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, bits: int,
                       block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ's column walk with given scales (only for PR #1579's 1/R-floored scales, which the public
    op cannot take): the op's own preparation (dead columns, damping, act-order, inverse Cholesky),
    then the same walk as kernels.reference.gptq_quantize. Returns int8 codes (N, K)."""
    W, U, _, perm = kernels.reference.gptq_prepare(weight, hessian, bits=bits, clip_sigmas=1.0,
                                                   act_order=True, damp=damp)
    return kernels.reference.gptq_column_walk(W, U, scales, perm, bits=bits, block_size=block_size)


def quantize_tensor(weight: torch.Tensor, spec: RoleSpec, hessian: torch.Tensor | None = None, *,
                    ops: str = "auto") -> QuantizedTensor:
    """Quantise one (N, K) matrix per `spec`; GPTQ needs the layer's (K, K) Hessian and runs the ops
    `ops` resolves to on the weight's device (crawler.runtime: Triton on CUDA for "auto"). Runs in fp32
    on the weight's device; returns CPU int8 codes and fp16 scales."""
    w = weight.detach().float()
    if spec.method == "gptq":
        if hessian is None:
            raise ValueError("quantize_tensor: GPTQ needs a Hessian")
        H = hessian.to(w.device, torch.float32)
        if spec.floor == "eps":
            gptq = kernels.gptq_quantize if resolve_ops(ops, w.device) == "triton" else kernels.reference.gptq_quantize
            codes, scales = gptq(w, H, bits=spec.bits, clip_sigmas=spec.k)
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
    proxy loss tr(EHEᵀ)/tr(WHWᵀ) where a Hessian exists, else ‖E‖²/‖W‖²) and stage times.
    `hessian_seconds` is the Hessian collection this call ran (0 when it reused a Calibration's)."""
    artifact: Artifact
    plan: QuantPlan
    loop_aware: bool
    stats: list[dict]
    hessian_seconds: float
    quantize_seconds: float
    hessians_reused: bool = False

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
                      stats: list[dict], log: Log, ops: str) -> dict[str, QuantizedTensor | torch.Tensor]:
    """Artifact entries for `names` of `state`, in that order; one stats row per quantised tensor.

    Where `ops` resolves to Triton (CUDA), GPTQ'd matrices of one shape and spec (e.g. the five blocks'
    mlp.fc) go through the batched op together; elsewhere each matrix is quantised on its own.
    Progress: one log line per group, and a bar on an interactive terminal."""
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
        batchable = spec.method == "gptq" and spec.floor == "eps" and resolve_ops(ops, t.device) == "triton"
        groups.setdefault((tuple(t.shape), spec, name if not batchable else None), []).append(name)
    done = 0
    quantised = sum(len(g) for g in groups.values())
    with Progress(quantised, f"quantise ({plan.name})", unit="tensor", log=log) as progress:
        for (shape, spec, _), members in groups.items():
            t0 = time.perf_counter()
            if len(members) > 1:
                results = _batched_gptq([state[n] for n in members], [hessians[n] for n in members], spec)
            else:
                hessian = hessians.get(members[0]) if spec.method == "gptq" else None
                results = [quantize_tensor(state[members[0]], spec, hessian, ops=ops)]
            dt = time.perf_counter() - t0
            errors = []
            for name, q in zip(members, results):
                out[name] = q
                errors.append(_relative_error(state[name], q, hessians.get(name)))
                stats.append({"name": name, "scheme": q.scheme, "k": spec.k, "shape": list(shape),
                              "seconds": dt / len(members), "rel_error": errors[-1]})
            done += len(members)
            what = members[0] if len(members) == 1 else f"{len(members)} x {members[0].split('.', 2)[-1]}"
            progress.write(f"quantize: [{done}/{quantised}] {what} {shape} {spec.describe()} {dt:.2f}s "
                           f"rel_err {max(errors):.3e}{' (max)' if len(members) > 1 else ''}")
            progress.update(len(members))
    return {n: out[n] for n in names}


def _summarise(stats: list[dict], n_tensors: int, t_hess: float, log: Log) -> float:
    t_quant = sum(row["seconds"] for row in stats)
    log(f"quantize: {len(stats)} tensors quantised, {n_tensors - len(stats)} passed through; "
        f"hessians {t_hess:.2f}s + quantisation {t_quant:.2f}s = {t_hess + t_quant:.2f}s")
    return t_quant


def quantize_state_dict(state: dict[str, torch.Tensor], config: CrawlerConfig, *,
                        plan: str | QuantPlan = "default", hessians: dict[str, torch.Tensor] | None = None,
                        ops: str = "auto", log: Log | None = print) -> QuantizeResult:
    """Quantise a CrawlerGPT state dict per `plan` into an Artifact (docs/math.md §3). GPTQ roles need
    their Hessians ({weight name: (K, K)}, e.g. from `collect_hessians`); plans without GPTQ need none."""
    plan, log = get_plan(plan), log or (lambda _: None)
    log(plan.describe())
    stats: list[dict] = []
    tensors = _quantize_entries(state, list(state), plan, hessians or {}, stats, log, ops)
    t_quant = _summarise(stats, len(tensors), 0.0, log)
    return QuantizeResult(Artifact(config.to_dict(), tensors), plan, False, stats, 0.0, t_quant)


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


def as_calibration(model: CrawlerGPT, calib, batch_seqs: int = 8, log: Log | None = None) -> Calibration | None:
    """`calib` as a Calibration of `model`: token windows (n_seqs, T+1) are wrapped in a new one; a
    Calibration must belong to `model` (ValueError otherwise); None stays None."""
    if calib is None or isinstance(calib, Calibration):
        if calib is not None and calib.model is not model:
            raise ValueError("calib: this Calibration holds another model's Hessians")
        return calib
    return Calibration(model, calib, batch_seqs=batch_seqs, log=log)


def quantize_model(model: CrawlerGPT, calib: torch.Tensor | Calibration | None = None, *,
                   plan: str | QuantPlan = "default", loop_aware: bool = False, batch_seqs: int = 8,
                   ops: str = "auto", log: Log | None = print) -> QuantizeResult:
    """Quantise `model` per `plan` into an Artifact; the model is left unchanged.

    `calib` is required when the plan uses GPTQ: a Calibration of this model (its Hessians are collected
    once and shared with other calls) or its (n_seqs, T+1) token windows (from `calibration_tokens`).
    `loop_aware` (PR #1535's two-phase GPTQ): phase 1 quantises every non-crawler tensor with the shared
    Hessians; phase 2 swaps those for their quantised values, collects the crawler blocks' Hessians
    again (the crawler then sees the activations it will really get) and quantises the crawler; the
    original weights are restored. `ops` picks the GPTQ implementation (crawler.runtime.resolve_ops:
    "auto" is the Triton kernel on CUDA, the reference elsewhere). Progress goes to `log`.
    """
    plan, log = get_plan(plan), log or (lambda _: None)
    calib = as_calibration(model, calib, batch_seqs, log)
    state = model.state_dict()
    gptq_names = {n for n, t in state.items()
                  if (spec := plan.spec(tensor_role(n, t, plan.small_numel))) is not None and spec.method == "gptq"}
    if gptq_names and calib is None:
        raise ValueError(f"plan {plan.name!r} uses GPTQ: calibration tokens (calib) are required")
    log(plan.describe() + (" (loop-aware)" if loop_aware else ""))
    reused = bool(gptq_names) and calib.collected
    t_hess = 0.0
    shared: dict[str, torch.Tensor] = {}
    if gptq_names:
        t0 = time.perf_counter()
        every = calib.hessians()
        t_hess = time.perf_counter() - t0
        # Only the GPTQ'd matrices get theirs: a round-to-nearest tensor's error stays ‖E‖²/‖W‖².
        shared = {n: every[n] for n in gptq_names}
        if reused:
            log("hessians: reusing the ones collected earlier for these weights")
    stats: list[dict] = []
    names = list(state)
    if loop_aware:
        crawler = [n for n in names if n.startswith("crawler_blocks.")]
        rest = [n for n in names if n not in crawler]
        tensors = _quantize_entries(state, rest, plan, shared, stats, log, ops)
        swapped = {n: t.dequantize() if isinstance(t, QuantizedTensor) else t for n, t in tensors.items()}
        log(f"loop-aware: phase 2 with {len(swapped)} non-crawler tensors swapped for their quantised values")
        crawler_hessians: dict[str, torch.Tensor] = {}
        if gptq_names & set(crawler):
            t0 = time.perf_counter()
            with swapped_weights(model, swapped):
                crawler_hessians = collect_hessians(model, calib.tokens, names=gptq_names & set(crawler),
                                                    batch_seqs=calib.batch_seqs, log=log)
            if next(model.parameters()).is_cuda:
                torch.cuda.synchronize()
            t_hess += time.perf_counter() - t0
        tensors.update(_quantize_entries(state, crawler, plan, crawler_hessians, stats, log, ops))
        tensors = {n: tensors[n] for n in names}    # state-dict order
    else:
        tensors = _quantize_entries(state, names, plan, shared, stats, log, ops)
    t_quant = _summarise(stats, len(tensors), t_hess, log)
    return QuantizeResult(Artifact(model.config.to_dict(), tensors), plan, loop_aware, stats, t_hess, t_quant,
                          hessians_reused=reused)
