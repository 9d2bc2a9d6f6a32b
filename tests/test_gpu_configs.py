"""Every candidate checked (issue 23 part 3): for each op, every config its autotuner could pick at the
launches of a small problem, and every candidate of int6_linear's own tuner, runs exactly
(`kernels.utils.forced_config`) and is compared with the float64 reference. The candidates are read from the
kernels at run time (the op's launches recorded, then `kernels.utils.launch_candidates`), so a config
added to a list is checked without editing this file, and none can win the autotuner untested. An op whose
kernels launch one fixed config each (smear_embed, cross-entropy from logits) runs that config.

The shapes are small but keep the real launches' specialisation (head counts, attention in the model's
layout: heads padded from 46 to 48 columns with q_gain; model and MLP widths, vocabulary, dtypes, sizes
divisible by 16), so on the GPU machine the build check's Triton cache serves the compilations and this
stage mostly runs kernels. The first test checks the mechanism itself on the CPU under the interpreter; the
others need a GPU (the case builders take device="cpu" for a dry run under the interpreter)."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import correlated_hessian, rel_err

import kernels
from kernels import int6 as int6_mod
from kernels import reference, utils
from kernels.attention import padded_head_dim
from kernels.build_check import recording_launches

D_MODEL, HIDDEN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 736, 2944, 8192, 16, 8, 46
SOFTMAX_SCALE = HEAD_DIM ** -0.5           # the model's: the head's own width, not the padded one
RECORD_D_MODEL, SMEAR_GATE_WIDTH = 512, 12  # the record line's embedding (kernels.smear_embed)
INT6_SHAPES = ((736, 736), (736, 368), (736, 2944), (2944, 736), (736, 8192))     # (K, N) of the model


@dataclasses.dataclass
class Case:
    """An op on fixed inputs: `run` calls it through its public API and returns its outputs (and input
    gradients); `check(outputs)` returns what is wrong with them against the reference, or None."""
    run: Callable[[], list[torch.Tensor]]
    check: Callable[[list[torch.Tensor]], str | None]


def within(expected: list[torch.Tensor], bounds: list[float]):
    """A Case.check: each output's ‖out − ref‖/‖ref‖ (float64) under its bound."""
    def check(got):
        errs = [rel_err(g, e) for g, e in zip(got, expected, strict=True)]
        bad = [f"output {i}: rel err {e:.2e} >= {b:.0e}" for i, (e, b) in enumerate(zip(errs, bounds)) if not e < b]
        return "; ".join(bad) or None
    return check


def run_with_grads(op, inputs: list[torch.Tensor], grad_out: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """[op(*inputs), d/d inputs] for upstream gradient grad_out (in the output's dtype), on fresh leaves."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = op(*leaves, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def reference_case(op, ref_op, inputs, grad_out, bounds, **kwargs) -> Case:
    """The op and its float64 reference on the same inputs and upstream gradient."""
    expected = run_with_grads(ref_op, [t.double() for t in inputs], grad_out.double(), **kwargs)
    return Case(lambda: run_with_grads(op, inputs, grad_out, **kwargs), within(expected, bounds))


def randn(*shape, seed, dtype=torch.bfloat16, device="cuda", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def model_heads(x: torch.Tensor) -> torch.Tensor:
    """x (..., heads, HEAD_DIM) as the model hands heads to attention: zero-padded to padded_head_dim (48)
    columns, contiguous (crawler.model.pad_heads)."""
    return F.pad(x, (0, padded_head_dim(x.shape[-1]) - x.shape[-1]))


def q_gain(device="cuda") -> torch.Tensor:
    """Per-head score gains (H,) fp32 around the model's initial 1.5."""
    return randn(HEADS, seed=17, dtype=torch.float32, device=device, scale=0.1) + 1.5


# ----------------------------------------------------------------------------------------------
# The cases: each op at small pr1579-like shapes (device "cuda"; a CPU dry run under the interpreter
# may pass "cpu")
# ----------------------------------------------------------------------------------------------

def attention_case(device="cuda", *, xsa: bool, varlen: bool) -> Case:
    """Causal GQA attention, 16 / 8 heads, bf16, in the model's layout (heads of 46 zero-padded to 48,
    softmax_scale 1/sqrt(46), q_gain; the upstream gradient zero in the pad, as the model's is): dense
    (2 x 128) or packed documents of 100, 1, 83, 72 tokens. Gradients of q, k, v and q_gain."""
    lengths = [100, 1, 83, 72]
    rows = (1, sum(lengths)) if varlen else (2, 128)
    qkv = randn(*rows, HEADS + 2 * KV_HEADS, HEAD_DIM, seed=11 + 2 * xsa + varlen, device=device)
    q, k, v = (model_heads(t) for t in qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=2))
    kwargs = dict(causal=True, xsa=xsa, softmax_scale=SOFTMAX_SCALE)
    if varlen:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        kwargs.update(cu_seqlens=cu, max_seqlen=max(lengths))

    def with_gain(impl):
        return lambda q, k, v, gain, **kw: impl(q, k, v, q_gain=gain, **kw)
    dz = model_heads(randn(*rows, HEADS, HEAD_DIM, seed=5, device=device))
    return reference_case(with_gain(kernels.attention), with_gain(reference.attention), [q, k, v, q_gain(device)],
                          dz, [1e-2, 2e-2, 2e-2, 2e-2, 2e-2], **kwargs)


def decode_case(device="cuda", *, xsa: bool, num_splits: int | None) -> Case:
    """A decoding step as crawler.decoding.Decoder runs it: one query row per sequence over KV caches of
    1,000 rows holding 1, 517 and 1,000 valid keys (cache_seqlens), the model's layout (padded heads,
    1/sqrt(46), q_gain); split as decode_splits picks (num_splits None) or in one piece. Forward only."""
    lengths = [1, 517, 1000]
    q = model_heads(randn(3, 1, HEADS, HEAD_DIM, seed=18, device=device))
    k, v = (model_heads(randn(3, 1000, KV_HEADS, HEAD_DIM, seed=s, device=device)) for s in (19, 20))
    gain, seqlens = q_gain(device), torch.tensor(lengths, dtype=torch.int32, device=device)
    kwargs = dict(xsa=xsa, softmax_scale=SOFTMAX_SCALE)
    expected = torch.cat([reference.attention(q[b:b + 1].double(), k[b:b + 1, :n].double(), v[b:b + 1, :n].double(),
                                              q_gain=gain.double(), **kwargs) for b, n in enumerate(lengths)])

    def run():
        with torch.no_grad():
            return [kernels.attention_decode(q, k, v, cache_seqlens=seqlens, num_splits=num_splits, q_gain=gain,
                                             **kwargs)]
    return Case(run, within([expected], [1e-2]))


def embed_case(device="cuda", *, bos_id: int | None) -> Case:
    """The fused embedding at d 736, bigram 10240 x 128, bf16 tables, 2 x 128 ids."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 128), generator=g)
    if bos_id is not None:
        ids[:, ::37] = bos_id
    inputs = [randn(VOCAB, D_MODEL, seed=1, device=device), randn(10240, 128, seed=2, device=device),
              randn(D_MODEL, 128, seed=3, dtype=torch.float32, device=device, scale=0.1),
              randn(D_MODEL, seed=4, dtype=torch.float32, device=device)]
    ids = ids.to(device)

    def with_ids(impl):
        return lambda *params, bos_id: impl(ids, *params, bos_id=bos_id)
    return reference_case(with_ids(kernels.embed), with_ids(reference.embed), inputs,
                          randn(2, 128, D_MODEL, seed=6, dtype=torch.float32, device=device), [1e-2] + [2e-2] * 4,
                          bos_id=bos_id)


def smear_embed_case(device="cuda", *, bos_id: int | None) -> Case:
    """The record line's embedding (SmearGate v3 + rms_norm) at d 512, vocabulary 8192, a 12-wide gate,
    bf16 table, fp32 gate weight and lambda, 2 x 128 ids (BOS every 37 with bos_id)."""
    ids = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(21))
    if bos_id is not None:
        ids[:, ::37] = bos_id
    ids = ids.to(device)
    inputs = [randn(VOCAB, RECORD_D_MODEL, seed=22, device=device),
              randn(1, SMEAR_GATE_WIDTH, seed=23, dtype=torch.float32, device=device, scale=0.3),
              randn(1, seed=24, dtype=torch.float32, device=device, scale=0.5)]

    def with_ids(impl):
        return lambda *params, bos_id: impl(ids, *params, bos_id=bos_id)
    return reference_case(with_ids(kernels.smear_embed), with_ids(reference.smear_embed), inputs,
                          randn(2, 128, RECORD_D_MODEL, seed=25, dtype=torch.float32, device=device),
                          [1e-2] + [2e-2] * 3, bos_id=bos_id)


def mlp_case(device="cuda", *, negative_slope: float) -> Case:
    """relu² (or leaky) MLP 736 -> 2944 -> 736 on 256 bf16 tokens, fp32 weights."""
    inputs = [randn(256, D_MODEL, seed=7, device=device),
              randn(HIDDEN, D_MODEL, seed=8, dtype=torch.float32, device=device, scale=D_MODEL ** -0.5),
              randn(D_MODEL, HIDDEN, seed=9, dtype=torch.float32, device=device, scale=HIDDEN ** -0.5)]
    return reference_case(kernels.relu2_mlp, reference.relu2_mlp, inputs, randn(256, D_MODEL, seed=10, device=device),
                          [2e-2] * 4, negative_slope=negative_slope)


def cross_entropy_case(device="cuda") -> Case:
    """The softcapped tied-head cross-entropy, 256 bf16 tokens, d 736, vocabulary 8192, softcap 30."""
    targets = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(12)).to(device)
    inputs = [randn(256, D_MODEL, seed=13, device=device), randn(VOCAB, D_MODEL, seed=14, device=device, scale=0.05)]

    def with_targets(impl):
        return lambda hidden, weight: impl(hidden, weight, targets, 30.0)
    return reference_case(with_targets(kernels.softcapped_cross_entropy),
                          with_targets(reference.softcapped_cross_entropy), inputs, torch.ones((), device=device),
                          [1e-3, 2e-2, 2e-2])


def cross_entropy_from_logits_case(device="cuda") -> Case:
    """The softcapped cross-entropy from bf16 logits, 256 tokens x vocabulary 8192, softcap 30, a few
    targets ignored (ignore_index)."""
    targets = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(26))
    targets[::50] = -100
    targets = targets.to(device)

    def with_targets(impl):
        return lambda logits: impl(logits, targets, 30.0)
    return reference_case(with_targets(kernels.softcapped_cross_entropy_from_logits),
                          with_targets(reference.softcapped_cross_entropy_from_logits),
                          [randn(256, VOCAB, seed=27, device=device, scale=20.0)], torch.ones((), device=device),
                          [1e-3, 2e-2])


def gptq_case(device="cuda") -> Case:
    """GPTQ int6 of a 64 x 736 weight (the model's input width, one 128-column block walk) against the
    float64 reference: equal scales, at most 0.1 % of codes differing (rounding ties)."""
    weight = randn(64, D_MODEL, seed=15, dtype=torch.float32, device=device, scale=0.037)
    hessian = correlated_hessian(D_MODEL, n=2 * D_MODEL, seed=16, device=device)
    ref_codes, ref_scales = reference.gptq_quantize(weight.double(), hessian.double())

    def check(got):
        codes, scales = got
        if not torch.equal(scales.cpu(), ref_scales.cpu()):
            return "scales differ from the reference"
        mismatch = (codes.cpu() != ref_codes.cpu()).float().mean().item()
        return f"{mismatch:.3%} of codes differ from the reference" if mismatch > 1e-3 else None
    return Case(lambda: list(kernels.gptq_quantize(weight, hessian)), check)


CASES = {
    "attention dense XSA": lambda: attention_case(xsa=True, varlen=False),
    "attention dense": lambda: attention_case(xsa=False, varlen=False),
    "attention varlen XSA": lambda: attention_case(xsa=True, varlen=True),
    "attention varlen": lambda: attention_case(xsa=False, varlen=True),
    "attention_decode": lambda: decode_case(xsa=True, num_splits=None),
    "attention_decode one split": lambda: decode_case(xsa=False, num_splits=1),
    "embed": lambda: embed_case(bos_id=None),
    "embed bos_id": lambda: embed_case(bos_id=1),
    "smear_embed": lambda: smear_embed_case(bos_id=None),
    "smear_embed bos_id": lambda: smear_embed_case(bos_id=1),
    "mlp relu2": lambda: mlp_case(negative_slope=0.0),
    "mlp leaky": lambda: mlp_case(negative_slope=0.5),
    "cross_entropy": cross_entropy_case,
    "cross_entropy from logits": cross_entropy_from_logits_case,
    "gptq": gptq_case,
}


def tuned_launches(case: Case) -> tuple[dict, int]:
    """({autotuned kernel: {config text: config}}, number of launches): the candidates of every autotuned
    launch the op makes on the case's inputs (recorded, not run), in list order, and how many kernel
    launches it makes in all."""
    with recording_launches() as launches:
        case.run()
    tuned: dict = {}
    for launch in launches:
        if isinstance(launch.kernel, triton.runtime.Autotuner):
            named = dict(zip(launch.kernel.arg_names, launch.args)) | launch.kwargs
            for config in utils.launch_candidates(launch.kernel, named):
                tuned.setdefault(launch.kernel, {})[str(config)] = config
    return tuned, len(launches)


def check_every_candidate(case: Case) -> int:
    """Run the case once per candidate of each of its autotuned kernels, that kernel forced to it (the
    others tuning as usual), or once for an op whose kernels all launch one fixed config (their only
    candidate); assert every run matches the reference. Returns the number of runs."""
    tuned, launched = tuned_launches(case)
    assert launched, "the op launched no kernel: nothing would be checked"
    runs = [(f"{kernel.fn.__name__} [{text}]", utils.forced_config(kernel, config))
            for kernel, configs in tuned.items() for text, config in configs.items()]
    failures = []
    for name, forced in runs or [("its fixed configs", contextlib.nullcontext())]:
        with forced:
            problem = case.check(case.run())
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)
    return max(1, len(runs))


# ----------------------------------------------------------------------------------------------
# The mechanism, on the CPU (interpreter)
# ----------------------------------------------------------------------------------------------

def _small_blocks(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]]


@utils.autotune([triton.Config({"BLOCK": 4}), triton.Config({"BLOCK": 8})], key=["n"],
                prune_configs_by={"early_config_prune": _small_blocks})
@triton.jit
def _write_block_size(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.full((BLOCK,), BLOCK, tl.int32), mask=offs < n)


def test_forced_config_runs_exactly_the_candidate_and_restores_the_tuner():
    out = torch.zeros(8, dtype=torch.int32)
    first, second = _write_block_size.configs
    assert [str(c) for c in utils.launch_candidates(_write_block_size, {"out_ptr": out, "n": 6})] == [str(first)]
    assert len(utils.launch_candidates(_write_block_size, {"out_ptr": out, "n": 8})) == 2
    for config, block in ((second, 8), (first, 4)):
        out.zero_()
        with utils.forced_config(_write_block_size, config):
            _write_block_size[(1,)](out, 8)
        assert out.tolist() == [block] * block + [0] * (8 - block)
    assert _write_block_size.configs == [first, second]
    with pytest.raises(ValueError, match="not one of the configs"):
        with utils.forced_config(_write_block_size, triton.Config({"BLOCK": 16})):
            pass

    choices = utils.PersistentChoices("forced_config_test")
    cands = ["a", "b"]
    with utils.forced_config(choices, "b"):
        assert choices.pick("key", "device", cands, lambda c: pytest.fail("timed while forced")) == "b"
        with pytest.raises(ValueError, match="not a candidate"):
            choices.pick("key", "device", ["a"], lambda c: 0.0)
    assert choices._forced is None and not choices._chosen


# ----------------------------------------------------------------------------------------------
# Every config of every list, on a GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_every_autotune_candidate_matches_the_reference(name):
    runs = check_every_candidate(CASES[name]())
    assert runs >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 2048])
def test_every_int6_candidate_matches_the_reference(M):
    """Every candidate int6_linear's tuner may time (decode tiles and their K splits, GEMM tiles) at the
    model's matrix shapes, forced one at a time, against x @ (codes·scales)ᵀ in float64."""
    failures, runs = [], 0
    for K, N in INT6_SHAPES:
        g = torch.Generator().manual_seed(K + N + M)
        codes = torch.randint(-31, 32, (N, K), dtype=torch.int8, generator=g).cuda()
        scales = (torch.rand(N, generator=g) * 0.01 + 1e-3).half().cuda()
        x = randn(M, K, seed=M + K)
        packed = kernels.pack_int6(codes)
        expected = x.double() @ (codes.double() * scales.double()[:, None]).T
        candidates = int6_mod._candidates(M, N, K // 4, x.device)
        assert len(candidates) > 1, "on a GPU the tuner times several candidates"
        for config in candidates:
            with utils.forced_config(int6_mod._CHOICES, config):
                err = rel_err(kernels.int6_linear(x, packed, scales), expected)
            runs += 1
            if not err < 8e-3:
                failures.append(f"K {K} N {N} {config}: rel err {err:.2e}")
    assert not failures, "\n".join(failures)
    assert runs >= 2 * len(INT6_SHAPES)
