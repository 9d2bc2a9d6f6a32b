"""The quantisation stage end to end (docs/math.md §3-4): quantise a trained model per a plan, give the
tied embedding more bits where the budget allows, prune ±1 codes to the byte target, write the artifact
atomically and score its round trip.

    build_artifact(model, calib, plan, ...)               -> (decoded artifact, summary)
    quantize_and_evaluate(model, data_dir, luts, val, ...) -> summary with the round-trip gap

A `Calibration` passed to several calls (train.py's four-plan comparison) collects its Hessians once.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..artifact import Artifact, QuantizedTensor, decode_artifact, encode_artifact, model_from_artifact
from ..budget import BUDGET_BYTES, size_report
from ..evaluate import val_bpb
from ..fileio import atomic_open
from ..model import CrawlerGPT
from ..runtime import rank_and_world
from .gptq_driver import QuantizeResult, as_calibration, quantize_model, quantize_tensor
from .hessians import DEFAULT_N_SEQS, Calibration
from .plan import QuantPlan, get_plan
from .prune import prune_to_fit

Log = Callable[[str], None]


def evaluate_artifact(artifact: Artifact, val_tokens: torch.Tensor, luts, *, seq_len: int, device="cpu",
                      ops: str = "auto", batch_seqs: int = 8, doc_isolated: bool = False) -> tuple[float, float]:
    """(val_loss, val_bpb) of the dequantised artifact (non-overlapping windows, crawler.evaluate)."""
    model = model_from_artifact(artifact, device=device, ops=ops)
    return val_bpb(model, val_tokens, luts, seq_len=seq_len, batch_seqs=batch_seqs, doc_isolated=doc_isolated)


def _upgrade_tok_emb(model: CrawlerGPT, calib: Calibration | None, result: QuantizeResult, byte_room: int,
                     log: Log) -> tuple[Artifact, str, bytes | None]:
    """The plan's first `tok_emb_upgrades` scheme whose artifact fits in `byte_room` bytes, else the
    artifact as quantised. GPTQ upgrades use the Calibration's shared Hessian of the LM head's input.
    Returns (artifact, the tied embedding's scheme description, the artifact's encoding when one was
    made here, else None)."""
    artifact, name = result.artifact, "tok_emb.weight"
    current = artifact.tensors.get(name)
    if not isinstance(current, QuantizedTensor):
        return artifact, "passthrough", None
    weight = model.state_dict()[name].float()
    for spec in result.plan.tok_emb_upgrades:
        if spec.method == "gptq" and calib is None:
            raise ValueError(f"plan {result.plan.name!r}: the tied-embedding upgrade {spec.describe()} uses GPTQ: "
                             f"calibration tokens (calib) are required")
        hessian = calib.hessians()[name] if spec.method == "gptq" else None
        candidate = dataclasses.replace(artifact, tensors={**artifact.tensors,
                                                           name: quantize_tensor(weight, spec, hessian)})
        blob = encode_artifact(candidate)
        fits = len(blob) <= byte_room
        log(f"tied embedding {spec.describe()}: artifact {len(blob):,} B {'fits' if fits else 'does not fit'} "
            f"in {byte_room:,} B")
        if fits:
            return candidate, spec.describe(), blob
    return artifact, result.plan.tok_emb.describe(), None


def build_artifact(model: CrawlerGPT, calib: torch.Tensor | Calibration | None, *,
                   plan: str | QuantPlan = "default", loop_aware: bool = False, target_bytes: int = BUDGET_BYTES,
                   out_path=None, batch_seqs: int = 8, tokenizer: dict | None = None,
                   log: Log | None = print) -> tuple[Artifact, dict]:
    """Quantise (`quantize_model`), upgrade the tied embedding where it fits, prune ±1 codes until
    artifact + code bytes <= target_bytes, write the file atomically to `out_path` (when given; rank 0
    alone under torch.distributed) and decode the written bytes back. `calib`: as in quantize_model.
    `tokenizer`: the identity {"sha256", "vocab_size"} of the tokenizer the model was trained with,
    recorded in the artifact (crawler.tokenizer.tokenizer_identity; evaluation checks it).

    Returns (the decoded artifact, a JSON-ready summary: plan, loop_aware, tok_emb_scheme,
    artifact_bytes, code_bytes, code_bytes_source, total_bytes, budget (16,000,000), fits, pruned,
    prune_candidates, hessian_seconds, hessians_reused, quantize_seconds, quantize_total_seconds,
    compress_seconds, artifact_path).
    """
    log = log or (lambda _: None)
    calib = as_calibration(model, calib, batch_seqs, log)
    result = quantize_model(model, calib, plan=plan, loop_aware=loop_aware, batch_seqs=batch_seqs, log=log)
    result = dataclasses.replace(result, artifact=dataclasses.replace(result.artifact, tokenizer=tokenizer))
    sizes = size_report(0)
    artifact, tok_emb_scheme, blob = _upgrade_tok_emb(model, calib, result, target_bytes - sizes.code_bytes, log)
    pruned = prune_to_fit(artifact, target_bytes, code_bytes=sizes.code_bytes, blob=blob, log=log)
    if out_path is not None and rank_and_world()[0] == 0:    # every rank builds the same bytes; one writes them
        with atomic_open(out_path) as f:
            f.write(pruned.blob)
    # Evaluate what was written: decode the file's bytes, not the in-memory tensors.
    artifact = decode_artifact(pruned.blob, where=str(out_path or "<artifact>"))
    sizes = dataclasses.replace(sizes, artifact_bytes=len(pruned.blob))
    log(sizes.summary())
    return artifact, {
        "plan": result.plan.name, "loop_aware": loop_aware, "tok_emb_scheme": tok_emb_scheme,
        "artifact_bytes": sizes.artifact_bytes, "code_bytes": sizes.code_bytes,
        "code_bytes_source": sizes.code_bytes_source, "total_bytes": sizes.total, "budget": sizes.budget,
        "fits": sizes.fits, "pruned": pruned.pruned, "prune_candidates": pruned.candidates,
        "hessian_seconds": result.hessian_seconds, "hessians_reused": result.hessians_reused,
        "quantize_seconds": result.quantize_seconds, "quantize_total_seconds": result.total_seconds,
        "compress_seconds": pruned.seconds, "artifact_path": str(out_path) if out_path is not None else None,
    }


def quantize_and_evaluate(model: CrawlerGPT, data_dir, luts, val_tokens: torch.Tensor, *,
                          plan: str | QuantPlan = "default", loop_aware: bool = False, out_path=None,
                          target_bytes: int = BUDGET_BYTES, calibration: Calibration | None = None,
                          n_seqs: int = DEFAULT_N_SEQS, calib_seq_len: int | None = None,
                          eval_seq_len: int | None = None, seed: int = 0, batch_seqs: int = 8,
                          pre_quant: tuple[float, float] | None = None, tokenizer: dict | None = None,
                          doc_isolated: bool = False,
                          log: Log | None = print) -> dict:
    """The train -> artifact -> score stage for train.py: pre-quant val_bpb (unless `pre_quant` =
    (val_loss, val_bpb) is given), the calibration (`calibration`, shared with earlier calls on the same
    weights; else `n_seqs` windows of calib_seq_len from `data_dir`'s train shards), `build_artifact`
    (quantisation per `plan`, pruning to `target_bytes`, the file at `out_path`), and the round-trip
    val_bpb of the dequantised artifact on `val_tokens` (non-overlapping windows of eval_seq_len,
    default the config's train_seq_len). Document-isolated with `doc_isolated`, as
    `pre_quant` must be. `tokenizer`: the identity the artifact records (build_artifact).

    Returns build_artifact's summary plus pre_quant_val_loss / _bpb, quant_val_loss / _bpb,
    quant_gap_bpb (round trip minus pre-quant) and quant_eval_seconds (the round trip's scoring time).

    Under torch.distributed every rank must call it (val_bpb shards windows and all-reduces): each rank
    quantises the same weights on the same calibration windows, and rank 0 alone writes the file.
    """
    log = log or (lambda _: None)
    plan = get_plan(plan)
    device = next(model.parameters()).device
    T = eval_seq_len or model.config.train_seq_len
    if pre_quant is None:
        pre_quant = val_bpb(model, val_tokens, luts, seq_len=T, batch_seqs=batch_seqs, doc_isolated=doc_isolated)
        log(f"pre-quant: val_loss {pre_quant[0]:.4f} val_bpb {pre_quant[1]:.4f}")
    if calibration is None and plan.needs_hessians():
        calibration = Calibration.from_data(model, data_dir, n_seqs=n_seqs, seq_len=calib_seq_len, seed=seed,
                                            batch_seqs=batch_seqs, log=log)
    artifact, summary = build_artifact(model, calibration, plan=plan, loop_aware=loop_aware,
                                       target_bytes=target_bytes, out_path=out_path, batch_seqs=batch_seqs,
                                       tokenizer=tokenizer, log=log)
    t0 = time.perf_counter()
    q_loss, q_bpb = evaluate_artifact(artifact, val_tokens, luts, seq_len=T, device=device, ops=model.ops,
                                      batch_seqs=batch_seqs, doc_isolated=doc_isolated)
    eval_seconds = time.perf_counter() - t0
    gap = q_bpb - pre_quant[1]
    log(f"round trip ({plan.name}{', loop-aware' if loop_aware else ''}): val_loss {q_loss:.4f} "
        f"val_bpb {q_bpb:.4f} (pre-quant {pre_quant[1]:.4f}, gap {gap:+.4f})")
    return {**summary, "pre_quant_val_loss": pre_quant[0], "pre_quant_val_bpb": pre_quant[1],
            "quant_val_loss": q_loss, "quant_val_bpb": q_bpb, "quant_gap_bpb": gap, "quant_eval_seconds": eval_seconds}
