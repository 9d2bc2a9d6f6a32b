"""The quantisation plan (docs/math.md §3, "What gets what"): which scheme each tensor of a CrawlerGPT
state dict gets. A tensor's role comes from its name (`tensor_role`); a plan maps every role to a
RoleSpec (GPTQ or round to nearest, bits, SDClip k, scale floor). Control tensors stay fp32 and any other
tensor of at most `small_numel` elements (the seed's 65,536, config.PASSTHROUGH_NUMEL) passes through
as fp16, before any role applies. `PLANS` holds ours ("default"), the seed's ("seed") and the
round-to-nearest baseline ("rtn_seed_floor").
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from ..config import PASSTHROUGH_NUMEL

# Control tensors (gains, mixes, gates, alpha, VE scales) stay fp32 whatever their size (docs/math.md §1.12).
_CONTROL = re.compile(r"(^|\.)(attn_scales|mlp_scales|resid_mixes|skip_weights|q_gain|gate)$|"
                      r"^crawler_residual_scales\.\d+$|^ve\.scales\.\d+$")
_BLOCK = re.compile(r"^(flat_blocks|crawler_blocks)\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))\.weight$")
_NAMED_ROLES = {"tok_emb.weight": "tok_emb", "bigram.table.weight": "bigram_table",
                "bigram.proj.weight": "bigram_proj", "ve.table.weight": "ve_table", "ve.proj.weight": "ve_proj"}
# Roles whose layer input we can observe, hence the only ones GPTQ can serve (bigram.proj's input is
# a gathered table row inside the fused embedding op; the tables are lookups, not matmuls).
HESSIAN_ROLES = ("block", "tok_emb", "ve_proj")


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """How one role is quantised: method "gptq" (needs a Hessian) or "rtn" (per-row round to nearest),
    `bits` (R = 2^(bits-1) - 1), SDClip `k` (s_r = k·std(W_r)/R), and the scale floor: "eps" (1e-10,
    docs/math.md §3) or "inv_range" (1/R, PR #1579's floor, for reproducing the seed)."""
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
    """Which scheme each role of the state dict gets (docs/math.md §3, "What gets what"). Roles: `block` (the
    six matrices of every flat and crawler block), `tok_emb` (the tied embedding, GPTQ'd as the LM head),
    `bigram_table`, `bigram_proj`, `ve_table`, `ve_proj`. Control tensors are always fp32 and any other
    tensor of at most `small_numel` elements fp16; those two rules come before the roles.
    `tok_emb_upgrades`: more precise schemes for the tied embedding, tried in order by `build_artifact`;
    the first whose artifact fits the byte target without pruning replaces `tok_emb` (docs/math.md §3: int7 k=15
    or int8 k=20 "only where the budget allows"). The tied embedding is both the input table and the LM
    head, so its error reaches every token twice: on the tiny demo it is two thirds of the int6 gap."""
    name: str
    block: RoleSpec
    tok_emb: RoleSpec
    bigram_table: RoleSpec
    bigram_proj: RoleSpec
    ve_table: RoleSpec
    ve_proj: RoleSpec
    small_numel: int = PASSTHROUGH_NUMEL
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

    def with_role(self, role: str, spec: RoleSpec) -> QuantPlan:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        # An explicit tied-embedding scheme is the one used: no budget-driven upgrade replaces it.
        extra = {"tok_emb_upgrades": ()} if role == "tok_emb" else {}
        return dataclasses.replace(self, **{role: spec}, **extra)

    def needs_hessians(self) -> bool:
        """Whether any role or tied-embedding upgrade uses GPTQ (and so calibration data)."""
        return any(spec.method == "gptq" for spec in (*(getattr(self, r) for r in ROLES), *self.tok_emb_upgrades))

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


def tensor_role(name: str, tensor: torch.Tensor, small_numel: int = PASSTHROUGH_NUMEL) -> str:
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
