"""Post-training quantisation of a CrawlerGPT to an int6 artifact (docs/math.md §3), one concept a file:

    plan.py         which scheme each tensor gets (RoleSpec, QuantPlan, PLANS)
    hessians.py     calibration windows and layer-input Hessians, collected once per model (Calibration)
    gptq_driver.py  GPTQ / round to nearest per tensor, batched GPTQ, loop-aware two-phase GPTQ
    prune.py        selective ±1 pruning to a byte target
    pipeline.py     quantise -> tied-embedding upgrade -> prune -> write -> round-trip score

The command line is `python -m crawler.quantize`. The names below are the stage's public API.
"""
from .gptq_driver import QuantizeResult, quantize_model, quantize_state_dict, quantize_tensor
from .hessians import DEFAULT_N_SEQS, Calibration, calibration_tokens, collect_hessians, hessian_groups
from .pipeline import build_artifact, evaluate_artifact, quantize_and_evaluate
from .plan import PLANS, ROLES, QuantPlan, RoleSpec, get_plan, plan_schemes, tensor_role
from .prune import PruneResult, prune_to_fit

__all__ = ["DEFAULT_N_SEQS", "PLANS", "ROLES", "Calibration", "PruneResult", "QuantPlan", "QuantizeResult",
           "RoleSpec", "build_artifact", "calibration_tokens", "collect_hessians", "evaluate_artifact",
           "get_plan", "hessian_groups", "plan_schemes", "prune_to_fit", "quantize_and_evaluate",
           "quantize_model", "quantize_state_dict", "quantize_tensor", "tensor_role"]
