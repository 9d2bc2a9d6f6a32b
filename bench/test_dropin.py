"""Drop-in entry points against the code the Parameter Golf scripts run today, in the same process on the
same inputs; and a training step of each script, patched (kernels.patch) vs as it is.

Shapes: the varlen record's (PR #1530: d 512, 8 query / 4 KV heads of 64, vocabulary 8192, softcap 30,
sequences of 2048; one GPU's micro-batch of its 8-GPU run is 786,432 / 8 = 98,304 tokens) and, for the
baseline's attention and step, the baseline's (vocabulary 1024, sequences of 1024, 524,288 / 8 = 65,536
tokens); bf16. The script's own path of each case ("baseline" role):
  flash_attn_func        q·q_gain, FA3's flash_attn_func (SDPA where flash_attn_interface does not
                         import), the record's XSA (CausalSelfAttention._xsa_efficient), compiled as the
                         record compiles its model; ours: kernels.flash_attn_interface.flash_attn_func
                         with xsa=True and q_gain (the FA3-compatible entry point)
  flash_attn_varlen_func the same on the packed (total, H, D) rows with the record's padded cu_seqlens
                         (documents cut at 2048 tokens, 64-entry buckets with repeated ends)
  attention bhtd         the baseline's q·q_gain and SDPA (is_causal, native GQA) on (B, H, T, D),
                         compiled; ours: kernels.attention(..., q_gain=, layout="bhtd")
  cross-entropy          per-token losses (reduction="none", what evaluation and TTT need): the scripts'
                         head softcap·tanh(h·Wᵀ/softcap), .float() and F.cross_entropy, compiled; ours:
                         softcapped_cross_entropy(reduction="none"); from logits: forward_ttt's tail on
                         given logits vs softcapped_cross_entropy_from_logits
  embedding              the scripts' rms_norm(tok_emb(ids)), compiled, vs kernels.embed without
                         BigramHash or SmearGate; the record line's SmearGate v3 (BOS-masked; no script
                         here has it, so its torch form is kernels.reference.smear_embed, compiled) vs
                         kernels.smear_embed
  step                   one micro-batch forward+backward of each script's GPT as its main() sets it up
                         (bf16 weights, fp32 control tensors, bf16 autocast, torch.compile(dynamic=False,
                         fullgraph=True)), unpatched vs patched_train_gpt'd; the record in its looping
                         phase, on its packed varlen batch
The reference scripts come from shared/reference/pg/ beside the checkout (or $PG_REFERENCE_DIR); the
cases that need them skip, saying so, without them.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.harness import PASSES, REPO, compiled, first_call, pass_fn, rel_err
from bench.test_attention import document_pieces
from kernels.patch import load_script, patch_train_gpt
from kernels.patch.scripts import REFERENCE_SCRIPTS, find_reference_scripts, sdpa_flash_attn_interface

TOLERANCE = 2e-2          # bf16: a provider above this computes something else (~4e-3 expected)
HAS_FA3 = importlib.util.find_spec("flash_attn_interface") is not None
FA3_LABEL = "FA3" if HAS_FA3 else "SDPA (FA3 not installed)"
PG_DIR = find_reference_scripts(REPO)
NO_SCRIPTS = "the reference train_gpt.py scripts are not here (shared/reference/pg/ or PG_REFERENCE_DIR)"
BUCKET = 64               # the record's cu_seqlens are padded to a multiple of 64 entries


@dataclass(frozen=True)
class DropinShapes:
    """The record's and the baseline's sizes (`real`), or tiny ones for the interpreter (`smoke`)."""
    tokens: int              # record: packed tokens of one micro-batch (also batch × seq_len of the dense cases)
    seq_len: int
    base_batch: int          # baseline: sequences of seq_len_base tokens
    seq_len_base: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    vocab: int
    vocab_base: int
    softcap: float
    mean_document_len: float

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    @classmethod
    def for_bench(cls, smoke: bool) -> DropinShapes:
        if smoke:
            return cls(tokens=128, seq_len=64, base_batch=2, seq_len_base=64, model_dim=32, num_heads=4,
                       num_kv_heads=2, vocab=64, vocab_base=64, softcap=30.0, mean_document_len=16.0)
        return cls(tokens=98_304, seq_len=2048, base_batch=64, seq_len_base=1024, model_dim=512, num_heads=8,
                   num_kv_heads=4, vocab=8192, vocab_base=1024, softcap=30.0, mean_document_len=1000.0)


@pytest.fixture(scope="module")
def shapes(bench) -> DropinShapes:
    return DropinShapes.for_bench(bench.smoke)


@functools.cache
def reference_script(name: str):
    """The reference script `name` loaded once (FA3 where it imports, else the SDPA stand-in); skips
    without the scripts."""
    if PG_DIR is None:
        pytest.skip(NO_SCRIPTS)
    return load_script(PG_DIR / name)


def record_xsa():
    """The record's own XSA when its script is here, else the same formula as torch ops (y, v) -> z."""
    if PG_DIR is None:
        return lambda y, v: kernels.reference.exclusive_self_attention(y, v)
    return functools.partial(reference_script(REFERENCE_SCRIPTS[1]).CausalSelfAttention._xsa_efficient, None)


def fa3_module():
    if HAS_FA3:
        import flash_attn_interface
        return flash_attn_interface
    return sdpa_flash_attn_interface()


def record_cu_seqlens(shapes: DropinShapes, device) -> tuple[torch.Tensor, int]:
    """cu_seqlens of the record's loader for one packed micro-batch: log-normal documents cut at seq_len,
    padded with repeated ends to a multiple of BUCKET entries; and the longest segment."""
    pieces = document_pieces(1, shapes.tokens, shapes.mean_document_len)
    cut = [min(left, shapes.seq_len) for piece in pieces
           for left in range(piece, 0, -shapes.seq_len)]
    bounds = [0, *torch.tensor(cut).cumsum(0).tolist()]
    padded = bounds + [shapes.tokens] * ((-len(bounds)) % BUCKET)
    return torch.tensor(padded, dtype=torch.int32, device=device), max(cut)


@pytest.fixture(scope="module")
def attention_inputs(bench, shapes):
    """q, k, v (1, tokens, H|Hkv, D) and the upstream gradient, requires_grad; q_gain (H,) near 5."""
    s = shapes
    g = bench.generator(24)
    q, k, v = (bench.randn(1, s.tokens, h, s.head_dim, generator=g, requires_grad=True)
               for h in (s.num_heads, s.num_kv_heads, s.num_kv_heads))
    dz = bench.randn(1, s.tokens, s.num_heads, s.head_dim, generator=g)
    q_gain = (5.0 + 0.1 * torch.randn(s.num_heads, generator=torch.Generator().manual_seed(0))).to(bench.device)
    return q, k, v, dz, q_gain.requires_grad_(True)


def _script_attention(varlen: bool, cu_seqlens=None, max_seqlen=None):
    """The record's attention path after its projections: q·q_gain, FA3 (or SDPA), its XSA; compiled."""
    fa3, xsa = fa3_module(), record_xsa()

    def call(q, k, v, q_gain):
        q = q * q_gain.to(q.dtype)[None, None, :, None]
        if varlen:
            y = fa3.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                           causal=True)
        else:
            y = fa3.flash_attn_func(q, k, v, causal=True)
        y = y[0] if isinstance(y, tuple) else y   # some FA3 versions also return the LSE
        return xsa(y[None] if varlen else y, v)

    return compiled(call)


def _dense(t: torch.Tensor, shapes: DropinShapes) -> torch.Tensor:
    return t.view(shapes.batch, shapes.seq_len, *t.shape[2:])


@pytest.mark.cost_s(30)
@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in ("ours", "script")])
def test_flash_attn_func(benchmark, bench, shapes, attention_inputs, pass_, key):
    from kernels import flash_attn_interface as ours_fa3
    leaves = attention_inputs[:3] + attention_inputs[4:]
    q, k, v, dz, q_gain = (_dense(t, shapes) if t.dim() == 4 else t for t in attention_inputs)
    if key == "ours":
        label, role = "ours: kernels.flash_attn_interface.flash_attn_func(xsa=True, q_gain=)", "ours"
        fn = functools.partial(ours_fa3.flash_attn_func, causal=True, xsa=True)
        call = lambda: fn(q, k, v, q_gain=q_gain)   # noqa: E731
    else:
        label, role = f"{FA3_LABEL} flash_attn_func + the record's XSA, compiled", "baseline"
        script = _script_attention(varlen=False)
        call = lambda: script(q, k, v, q_gain)   # noqa: E731
    _run_attention(benchmark, bench, shapes, call, pass_, label, role, leaves, dz,
                   lambda: ours_fa3.flash_attn_func(q, k, v, causal=True, xsa=True, q_gain=q_gain),
                   group=f"flash_attn_func XSA q_gain {pass_}", n2=shapes.batch * shapes.seq_len ** 2)


@pytest.mark.cost_s(30)
@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in ("ours", "script")])
def test_flash_attn_varlen_func(benchmark, bench, shapes, attention_inputs, pass_, key):
    from kernels import flash_attn_interface as ours_fa3
    q, k, v, dz, q_gain = attention_inputs
    cu, longest = record_cu_seqlens(shapes, bench.device)
    max_seqlen = shapes.seq_len   # what the record passes (its training sequence length)

    def ours():
        return ours_fa3.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_seqlen, max_seqlen, causal=True,
                                               xsa=True, q_gain=q_gain)[None]

    if key == "ours":
        label, role, call = "ours: kernels.flash_attn_interface.flash_attn_varlen_func(xsa=True, q_gain=)", "ours", ours
    else:
        label, role = f"{FA3_LABEL} flash_attn_varlen_func + the record's XSA, compiled", "baseline"
        script = _script_attention(varlen=True, cu_seqlens=cu, max_seqlen=max_seqlen)
        call = lambda: script(q, k, v, q_gain)   # noqa: E731
    lengths = (cu[1:] - cu[:-1]).double()
    _run_attention(benchmark, bench, shapes, call, pass_, label, role, (q, k, v, q_gain), dz, ours,
                   group=f"flash_attn_varlen_func XSA q_gain {pass_}", n2=float((lengths ** 2).sum()),
                   metrics={"segments": int((lengths > 0).sum()), "longest": longest})


@pytest.mark.cost_s(30)
@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in ("ours", "script")])
def test_attention_bhtd(benchmark, bench, shapes, pass_, key):
    """The baseline's layout: (B, H, T, D) from its transposes, q_gain 1.5, no XSA."""
    s = shapes
    g = bench.generator(25)
    q, k, v = (bench.randn(s.base_batch, h, s.seq_len_base, s.head_dim, generator=g, requires_grad=True)
               for h in (s.num_heads, s.num_kv_heads, s.num_kv_heads))
    dz = bench.randn(s.base_batch, s.num_heads, s.seq_len_base, s.head_dim, generator=g)
    q_gain = torch.full((s.num_heads,), 1.5, device=bench.device, requires_grad=True)

    def ours():
        return kernels.attention(q, k, v, q_gain=q_gain, layout="bhtd")

    if key == "ours":
        label, role, call = 'ours: kernels.attention(q_gain=, layout="bhtd")', "ours", ours
    else:
        label, role = "the baseline's q·q_gain + SDPA (B, H, T, D), compiled", "baseline"
        sdpa = compiled(lambda q, k, v, gain: F.scaled_dot_product_attention(
            q * gain.to(q.dtype)[None, :, None, None], k, v, is_causal=True, enable_gqa=True))
        call = lambda: sdpa(q, k, v, q_gain)   # noqa: E731
    _run_attention(benchmark, bench, shapes, call, pass_, label, role, (q, k, v, q_gain), dz, ours,
                   group=f"attention bhtd q_gain {pass_}", n2=s.base_batch * s.seq_len_base ** 2)


def _run_attention(benchmark, bench, shapes, call, pass_, label, role, leaves, dz, ours, *, group, n2,
                   metrics=None):
    """Check `call` against ours, then time it. n2: Σ segment length² (causal FLOPs are 4·H·D·n2/2)."""
    with torch.no_grad():
        out = first_call(call, impl=label, role=role)
        err = rel_err(out, ours())
    fwd_flops = 4 * shapes.num_heads * shapes.head_dim * n2 / 2
    bench.run(benchmark, pass_fn(call, pass_, dz), grad_to_none=leaves, group=group, impl=label, role=role,
              flops=fwd_flops * (1 if pass_ == "fwd" else 3.5), metrics={"rel_err_vs_ours": err, **(metrics or {})})
    assert err < TOLERANCE, f"{label}: output differs from ours by {err:.2e}"


@pytest.fixture(scope="module")
def head_inputs(bench, shapes):
    """hidden (N, d), the tied embedding (V, d), raw logits (N, V), targets (N,) with 1 % ignored (-100)."""
    s = shapes
    g = bench.generator(26)
    hidden = bench.randn(s.tokens, s.model_dim, generator=g, requires_grad=True)
    weight = bench.randn(s.vocab, s.model_dim, generator=g, std=0.5, requires_grad=True)
    logits = bench.randn(s.tokens, s.vocab, generator=g, std=10.0, requires_grad=True)
    targets = torch.randint(0, s.vocab, (s.tokens,), generator=g, device=bench.device)
    targets[torch.rand(s.tokens, generator=g, device=bench.device) < 0.01] = -100
    return hidden, weight, logits, targets


def _script_head_nll(hidden, weight, targets, softcap):
    logits = softcap * torch.tanh(F.linear(hidden, weight) / softcap)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _script_logits_nll(logits, targets, softcap):
    return F.cross_entropy((softcap * torch.tanh(logits / softcap)).float(), targets, reduction="none")


@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in ("ours", "script")])
@pytest.mark.parametrize("variant", ["hidden", "logits"])
def test_cross_entropy_per_token(benchmark, bench, shapes, head_inputs, variant, pass_, key):
    hidden, weight, logits, targets = head_inputs
    c = shapes.softcap
    if variant == "hidden":
        ours = lambda: kernels.softcapped_cross_entropy(hidden, weight, targets, c, reduction="none")   # noqa: E731
        script, leaves = compiled(_script_head_nll), (hidden, weight)
        call_script = lambda: script(hidden, weight, targets, c)   # noqa: E731
        flops = 2 * shapes.tokens * shapes.model_dim * shapes.vocab * (1 if pass_ == "fwd" else 3)
    else:
        ours = lambda: kernels.softcapped_cross_entropy_from_logits(logits, targets, c, reduction="none")   # noqa: E731
        script, leaves, flops = compiled(_script_logits_nll), (logits,), None
        call_script = lambda: script(logits, targets, c)   # noqa: E731
    label, role, call = (("ours: kernels.softcapped_cross_entropy" + ("" if variant == "hidden" else "_from_logits")
                          + '(reduction="none")', "ours", ours) if key == "ours" else
                         ("the scripts' softcapped head, .float(), F.cross_entropy, compiled", "baseline", call_script))
    with torch.no_grad():
        err = rel_err(first_call(call, impl=label, role=role), ours())
    grad = torch.rand(shapes.tokens, device=bench.device)
    bench.run(benchmark, pass_fn(call, pass_, grad), grad_to_none=leaves, impl=label, role=role,
              group=f"per-token CE from {variant} {pass_} N={shapes.tokens} V={shapes.vocab}", flops=flops,
              metrics={"rel_err_vs_ours": err})
    assert err < TOLERANCE, f"{label}: per-token losses differ from ours by {err:.2e}"


@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in ("ours", "script")])
@pytest.mark.parametrize("variant", ["plain", "smear_v3"])
def test_embedding(benchmark, bench, shapes, variant, pass_, key):
    s = shapes
    g = bench.generator(27)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq_len), generator=g, device=bench.device)
    ids[:, ::97] = 1                                               # BOS tokens (id 1) inside the rows
    tok_emb = bench.randn(s.vocab, s.model_dim, generator=g, std=0.5, requires_grad=True)
    if variant == "plain":
        ours = lambda: kernels.embed(ids, tok_emb, None, None, None)   # noqa: E731
        script = compiled(lambda ids, w: F.rms_norm(F.embedding(ids, w), (w.shape[1],)))
        call_script, leaves = (lambda: script(ids, tok_emb)), (tok_emb,)
        script_label = "the scripts' rms_norm(tok_emb(ids)), compiled"
    else:
        smear_w = bench.randn(1, 12, generator=g, std=0.3, requires_grad=True)
        smear_lambda = bench.randn(1, generator=g, std=0.5, requires_grad=True)
        ours = lambda: kernels.smear_embed(ids, tok_emb, smear_w, smear_lambda, bos_id=1)   # noqa: E731
        script = compiled(functools.partial(kernels.reference.smear_embed, bos_id=1))
        call_script, leaves = (lambda: script(ids, tok_emb, smear_w, smear_lambda)), (tok_emb, smear_w, smear_lambda)
        script_label = "SmearGate v3 + BOS fix in torch (kernels.reference.smear_embed), compiled"
    label, role, call = (f"ours: kernels.{'embed' if variant == 'plain' else 'smear_embed'}", "ours", ours) \
        if key == "ours" else (script_label, "baseline", call_script)
    with torch.no_grad():
        err = rel_err(first_call(call, impl=label, role=role), ours())
    grad = bench.randn(s.batch, s.seq_len, s.model_dim, generator=g)
    bytes_moved = s.tokens * s.model_dim * tok_emb.element_size() * (2 if pass_ == "fwd" else 5)
    bench.run(benchmark, pass_fn(call, pass_, grad), grad_to_none=leaves, impl=label, role=role,
              group=f"embedding {variant} {pass_}", bytes_moved=bytes_moved, metrics={"rel_err_vs_ours": err})
    assert err < TOLERANCE, f"{label}: embedding differs from ours by {err:.2e}"


# ----------------------------------------------------------------------------------------------
# A training step of each script, unpatched vs patched
# ----------------------------------------------------------------------------------------------

def _baseline_step_model(module, shapes: DropinShapes, smoke: bool):
    if smoke:
        model = module.GPT(vocab_size=shapes.vocab_base, num_layers=2, model_dim=shapes.model_dim,
                           num_heads=shapes.num_heads, num_kv_heads=shapes.num_kv_heads, mlp_mult=2,
                           tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=shapes.softcap,
                           rope_base=10000.0, qk_gain_init=1.5)
        return model
    a = module.Hyperparameters()
    model = module.GPT(vocab_size=a.vocab_size, num_layers=a.num_layers, model_dim=a.model_dim,
                       num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, mlp_mult=a.mlp_mult,
                       tie_embeddings=a.tie_embeddings, tied_embed_init_std=a.tied_embed_init_std,
                       logit_softcap=a.logit_softcap, rope_base=a.rope_base, qk_gain_init=a.qk_gain_init)
    model = model.cuda().bfloat16()
    for m in model.modules():       # the baseline main()'s precision set-up
        if isinstance(m, module.CastedLinear):
            m.float()
    module.restore_low_dim_params_to_fp32(model)
    return model


def _record_step_model(module, shapes: DropinShapes, smoke: bool):
    h = module.Hyperparameters()
    if smoke:
        # Three layers, layer 1 looped once, lanes from layer 2: every code path at the interpreter's pace.
        for key, value in dict(vocab_size=shapes.vocab, num_layers=3, xsa_last_n=2, model_dim=shapes.model_dim,
                               embedding_dim=shapes.model_dim, num_heads=shapes.num_heads,
                               num_kv_heads=shapes.num_kv_heads, mlp_mult=2.0, rope_dims=4, num_loops=1,
                               loop_start=1, loop_end=1, parallel_start_layer=2, train_seq_len=shapes.seq_len).items():
            setattr(h, key, value)
    model = module.GPT(h)
    if not smoke:
        model = model.cuda().bfloat16()
        module.restore_fp32_params(model)   # the record main()'s precision set-up
    model.looping_active = True             # the phase after ENABLE_LOOPING_AT (65 % of the steps)
    for block in model.blocks:
        block.mlp.use_fused = not smoke     # the script's Triton MLP needs CUDA (patched: ignored)
    return model


def _step_model(module, name: str, shapes: DropinShapes, bench):
    """The script's GPT for one step, seeded (the same weights for a patched and an unpatched copy)."""
    torch.manual_seed(0)
    build = _record_step_model if name == REFERENCE_SCRIPTS[1] else _baseline_step_model
    return build(module, shapes, bench.smoke).to(bench.device)


@pytest.mark.cost_s(240)
@pytest.mark.parametrize("key", ["patched", "script"])
@pytest.mark.parametrize("name", REFERENCE_SCRIPTS)
def test_script_step(benchmark, bench, shapes, name, key):
    if PG_DIR is None:
        pytest.skip(NO_SCRIPTS)
    s = shapes
    record = name == REFERENCE_SCRIPTS[1]
    g = bench.generator(28)
    vocab = s.vocab if record else s.vocab_base
    shape = (1, s.tokens) if record else (s.base_batch, s.seq_len_base)
    ids, targets = (torch.randint(0, vocab, shape, generator=g, device=bench.device) for _ in range(2))
    kwargs = dict(cu_seqlens=record_cu_seqlens(s, bench.device)[0], max_seqlen=s.seq_len) if record else {}
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=not bench.smoke)
    with torch.no_grad(), autocast:     # the unpatched script's loss, uncompiled: what the patched one must give
        expected = _step_model(reference_script(name), name, s, bench)(ids, targets, **kwargs)
    module = load_script(PG_DIR / name)        # a fresh copy: patching it leaves the cached one alone
    # The SDPA stand-in's varlen loop reads cu_seqlens on the host: a graph break, so not fullgraph there.
    fullgraph = not (record and key == "script" and not HAS_FA3)
    if key == "patched":
        report = patch_train_gpt(module)
        label, role = f"patched ({len(report.patched)} forwards, kernels.patch), compiled", "ours"
    else:
        label, role = f"the script as it is ({FA3_LABEL}), compiled{'' if fullgraph else ' with graph breaks'}", \
            "baseline"
    model = _step_model(module, name, s, bench)
    step_model = compiled(model, dynamic=False, fullgraph=fullgraph)

    def loss():
        with autocast:
            return step_model(ids, targets, **kwargs)

    with torch.no_grad():
        value = first_call(loss, impl=label, role=role)
        err = rel_err(value, expected)
    bench.run(benchmark, pass_fn(loss, "fwd+bwd"), grad_to_none=tuple(model.parameters()), impl=label, role=role,
              group=f"{name.removesuffix('_train_gpt.py')} step fwd+bwd ({shape[0]} x {shape[1]} tokens)",
              rates={"tok/s": math.prod(shape)}, metrics={"loss": float(value), "rel_err_vs_unpatched_eager": err})
    assert err < TOLERANCE, f"{label}: loss {float(value):.5f} vs the unpatched script's {float(expected):.5f}"
