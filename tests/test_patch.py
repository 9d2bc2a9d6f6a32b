"""kernels.patch on the two real Parameter Golf scripts: the challenge's baseline train_gpt.py and PR #1530's
varlen record, imported from shared/reference/pg/ beside the repository (skipped, saying so, where they
are not: a clean clone in CI may lack them).

Each script is built at a tiny width; one copy is patched, another is not, both start from the same state
dict, and their losses, logits and every parameter gradient are compared:
  * float64, ops="reference": to round-off. The scripts cast the logits to float32 before their
    cross-entropy, so the unpatched side's loss is the script's own hidden states and head in float64
    without that cast (the patched side is float64 throughout);
  * float32, ops="triton" under the interpreter: the patched model's error against the unpatched float64
    model must stay within the unpatched script's own float32-vs-float64 spread.
FlashAttention-3 is the SDPA stand-in of kernels.patch.scripts (exact softmax attention); the record's
Triton MLP needs CUDA and TMA, so its unpatched copies run the script's eager MLP (`use_fused = False`,
the same math).
"""
from __future__ import annotations

import copy
import io
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import kernels
from kernels import flash_attn_interface
from kernels.patch import PatchReport, baseline, load_script, patch_train_gpt, sdpa_flash_attn_interface, varlen_record
from kernels.patch.scripts import REFERENCE_SCRIPTS, find_reference_scripts

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BASELINE, RECORD = REFERENCE_SCRIPTS
VOCAB, BATCH, SEQ = 64, 2, 16
ROUND_OFF = 1e-12
# float32 (interpreter): the patched model's error vs float64 may be this many times the script's own.
SPREAD_FACTOR = 4.0
LOSS_ROUNDING = 8 * torch.finfo(torch.float32).eps   # 8 ulps: a scalar loss's float32 rounding, not a difference


PG_DIR = find_reference_scripts(ROOT)
needs_scripts = pytest.mark.skipif(PG_DIR is None, reason="the Parameter Golf scripts are not here: no "
                                   "shared/reference/pg/ beside the repository (set PG_REFERENCE_DIR)")


def script(name: str, path: Path | None = None) -> types.ModuleType:
    """A fresh module object of the script (FA3 = the SDPA stand-in)."""
    return load_script(path or PG_DIR / name, flash_attn=sdpa_flash_attn_interface())


def baseline_model(module, *, tie: bool = True):
    return module.GPT(vocab_size=VOCAB, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                      tie_embeddings=tie, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                      qk_gain_init=1.5)


def record_hyperparameters(module, **overrides):
    """The record's Hyperparameters at a tiny width: 5 layers (XSA on the last 3), GQA 4/2 with head dim 8,
    partial RoPE, one extra pass over layers 1-2 when looping, parallel lanes from layer 3, skip gates."""
    h = module.Hyperparameters()
    tiny = dict(vocab_size=VOCAB, num_layers=5, xsa_last_n=3, model_dim=32, embedding_dim=32, num_heads=4,
                num_kv_heads=2, mlp_mult=2.0, rope_dims=4, num_loops=1, loop_start=1, loop_end=2,
                parallel_start_layer=3, train_seq_len=SEQ)
    for key, value in {**tiny, **overrides}.items():
        setattr(h, key, value)
    return h


def record_model(module, h, *, looping: bool = True):
    model = module.GPT(h)
    model.looping_active = looping
    for block in model.blocks:
        block.mlp.use_fused = False   # the script's Triton MLP needs CUDA (a patched MLP ignores the flag)
    return model


def filled(model, seed: int = 0):
    """Every parameter moved off its initialisation (zero-init projections and gates included) so that
    each one carries a gradient; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def twins(plain_module, patched_module, build, dtype=torch.float64):
    """(unpatched model, patched model): `build(module)` of each module, same filled state dict, in `dtype`."""
    plain, patched = build(plain_module).to(dtype), build(patched_module).to(dtype)
    patched.load_state_dict(filled(plain).state_dict())
    return plain, patched


def record_builder(**overrides):
    """build(module) -> the record's tiny model (record_model) with `overrides` of its hyperparameters."""
    return lambda module, **kw: record_model(module, record_hyperparameters(module, **overrides), **kw)


def tokens(seed: int = 0, shape=(BATCH, SEQ)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, shape, generator=g), torch.randint(0, VOCAB, shape, generator=g)


def head_loss(hidden, model, targets):
    """The script's tied/untied softcapped head and cross-entropy in the hidden states' dtype (the script
    casts its logits to float32 first)."""
    weight = model.tok_emb.weight if model.tie_embeddings else model.lm_head.weight
    logits = model.logit_softcap * torch.tanh(F.linear(hidden, weight) / model.logit_softcap)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def baseline_loss_without_cast(model, ids, targets):
    """The unpatched baseline's loss in the model's dtype: its own trunk (final_norm's output, taken by a
    hook) and head, without the float32 cast of its logits."""
    captured = []
    handle = model.final_norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(ids, targets)
    finally:
        handle.remove()
    return head_loss(captured[0], model, targets)


def logits_loss(model, ids, targets, **documents):
    """Mean cross-entropy of the record's forward_logits in their dtype (the script's forward casts them to
    float32 first)."""
    return F.cross_entropy(model.forward_logits(ids, **documents).reshape(-1, VOCAB), targets.reshape(-1))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


def assert_grads_close(plain, patched, bound: float):
    g0, g1 = grads(plain), grads(patched)
    assert g0.keys() == g1.keys()
    errors = {name: rel_err(g1[name], g0[name]) for name in g0 if g0[name] is not None and g0[name].norm() > 0}
    assert len(errors) == sum(1 for g in g0.values() if g is not None), "a parameter has no gradient"
    worst = max(errors, key=errors.get)
    assert errors[worst] < bound, f"{worst}: gradient differs by {errors[worst]:.2e}"


def assert_same_loss_and_grads(plain, patched, expected, loss):
    """The unpatched model's loss `expected` and the patched model's `loss` agree to round-off, and so do
    the gradients they leave on every parameter."""
    assert rel_err(loss, expected) < ROUND_OFF
    expected.backward()
    loss.backward()
    assert_grads_close(plain, patched, ROUND_OFF)


@pytest.fixture(scope="module")
def modules():
    """{name: fresh module} per (script, state): one patched with each ops kind, one left alone."""
    if PG_DIR is None:
        pytest.skip("the Parameter Golf scripts are not here")
    out = {}
    for name in (BASELINE, RECORD):
        out[name, "plain"] = script(name)
        for ops in ("reference", "triton"):
            out[name, ops] = script(name)
            out[name, ops + " report"] = patch_train_gpt(out[name, ops], ops=ops)
    return out


# ----------------------------------------------------------------------------------------------
# The report, the state dict, bad input
# ----------------------------------------------------------------------------------------------

@needs_scripts
def test_reports_say_what_was_patched_and_what_was_kept(modules):
    base, record = modules[BASELINE, "triton report"], modules[RECORD, "triton report"]
    assert isinstance(base, PatchReport) and base.ops == "triton"
    assert set(base.patched) == {"CausalSelfAttention.forward", "MLP.forward", "GPT.forward"}
    assert "kernels.attention" in base.patched["CausalSelfAttention.forward"]
    assert set(record.patched) >= {"CausalSelfAttention.forward", "MLP.forward", "GPT.forward", "GPT.forward_logits"}
    assert any("forward_ttt" in what for what in record.kept)
    assert modules[RECORD, "triton"].flash_attn_3_func is flash_attn_interface.flash_attn_func
    assert "flash_attn_3_func" not in modules[RECORD, "reference report"].patched
    assert "baseline" in str(base) and "left in torch" in str(record)
    # A second call changes nothing and returns the first report.
    assert patch_train_gpt(modules[RECORD, "triton"], ops="triton") is record


@needs_scripts
@pytest.mark.parametrize("name", [BASELINE, RECORD])
def test_state_dict_and_init_unchanged(name):
    build = baseline_model if name == BASELINE else record_builder()
    module, other = script(name), script(name)
    torch.manual_seed(0)
    before_model = build(module)
    before = {k: (v.clone(), v.data_ptr()) for k, v in before_model.state_dict().items()}
    patch_train_gpt(module, ops="reference")
    after = before_model.state_dict()
    assert after.keys() == before.keys()
    for key, (value, pointer) in before.items():
        assert torch.equal(after[key], value) and after[key].data_ptr() == pointer, key
    # A model built after the patch initialises exactly like the unpatched script's (banks included).
    torch.manual_seed(1)
    patched_init = build(module).state_dict()
    torch.manual_seed(1)
    plain_init = build(other).state_dict()
    assert patched_init.keys() == plain_init.keys()
    for key in plain_init:
        assert patched_init[key].shape == plain_init[key].shape and torch.equal(patched_init[key], plain_init[key]), key
    if name == RECORD:
        assert {k: v.dim() for k, v in plain_init.items() if k.endswith("_bank")} == {
            "qo_bank": 3, "kv_bank": 3, "mlp_up_bank": 3, "mlp_down_bank": 3}


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="script"):
        patch_train_gpt("train_gpt.py")
    with pytest.raises(ValueError, match="script: .* not a train_gpt.py of a known family"):
        patch_train_gpt(types.ModuleType("not_a_script"))
    with pytest.raises(ValueError, match="ops"):
        patch_train_gpt(types.ModuleType("not_a_script"), ops="cuda")
    with pytest.raises(FileNotFoundError, match="path"):
        load_script(ROOT / "no_such_train_gpt.py")


def test_sdpa_stand_in_for_fa3_is_exact():
    """The FA3 stand-in the unpatched record runs on here: FA3's two calls as the record makes them equal the
    reference attention in float64 (GQA 4/2, packed rows with repeated cu_seqlens ends); what it does not
    implement is refused by name."""
    fa3 = sdpa_flash_attn_interface()
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, SEQ, heads, 8, generator=g, dtype=torch.float64) for heads in (4, 2, 2))
    assert rel_err(fa3.flash_attn_func(q, k, v, causal=True), kernels.reference.attention(q, k, v)) < ROUND_OFF
    cu = torch.tensor([0, 5, 16, 21, 32, 32], dtype=torch.int32)
    packed = [t.reshape(2 * SEQ, *t.shape[2:]) for t in (q, k, v)]
    out = fa3.flash_attn_varlen_func(*packed, cu, cu, SEQ, SEQ, causal=True, window_size=(-1, -1))
    assert rel_err(out, kernels.reference.attention(*packed, cu_seqlens=cu)) < ROUND_OFF
    with pytest.raises(NotImplementedError, match="window_size"):
        fa3.flash_attn_func(q, k, v, causal=True, window_size=(8, 0))
    with pytest.raises(NotImplementedError, match="cu_seqlens_q == cu_seqlens_k"):
        fa3.flash_attn_varlen_func(*packed, cu, cu.flip(0), SEQ, SEQ, causal=True)


# ----------------------------------------------------------------------------------------------
# float64, reference ops: to round-off
# ----------------------------------------------------------------------------------------------

@needs_scripts
@pytest.mark.parametrize("tie", [True, False])
def test_baseline_float64_matches_unpatched(modules, tie):
    plain, patched = twins(modules[BASELINE, "plain"], modules[BASELINE, "reference"],
                           lambda m: baseline_model(m, tie=tie))
    ids, targets = tokens()
    expected = baseline_loss_without_cast(plain, ids, targets)
    loss = patched(ids, targets)
    assert loss.dtype == torch.float64
    # The script's own float32-cast loss differs from both by float32 rounding only.
    assert rel_err(plain(ids, targets).detach(), expected) < 1e-6
    assert_same_loss_and_grads(plain, patched, expected, loss)


@needs_scripts
@pytest.mark.parametrize("looping, embedding_dim", [(True, 32), (False, 24)])
def test_record_float64_matches_unpatched(modules, looping, embedding_dim):
    """Dense, with depth recurrence and parallel lanes; and without looping, with the embedding and head
    projections of embedding_dim != model_dim."""
    build = record_builder(embedding_dim=embedding_dim)
    plain, patched = twins(modules[RECORD, "plain"], modules[RECORD, "reference"],
                           lambda m: build(m, looping=looping))
    ids, targets = tokens()
    logits = patched.forward_logits(ids)
    expected_logits = plain.forward_logits(ids)
    assert rel_err(logits, expected_logits) < ROUND_OFF
    expected = F.cross_entropy(expected_logits.reshape(-1, VOCAB), targets.reshape(-1))
    loss = patched(ids, targets)
    assert_same_loss_and_grads(plain, patched, expected, loss)


@needs_scripts
def test_record_varlen_float64_matches_unpatched(modules):
    """The record's packed (1, total) batch with padded cu_seqlens (repeated ends), as its loader builds it."""
    plain, patched = twins(modules[RECORD, "plain"], modules[RECORD, "reference"], record_builder())
    ids, targets = tokens(shape=(1, BATCH * SEQ))
    cu_seqlens = torch.tensor([0, 5, 16, 21, 32, 32, 32, 32], dtype=torch.int32)
    expected = logits_loss(plain, ids, targets, cu_seqlens=cu_seqlens, max_seqlen=SEQ)
    loss = patched(ids, targets, cu_seqlens=cu_seqlens, max_seqlen=SEQ)
    assert_same_loss_and_grads(plain, patched, expected, loss)


@needs_scripts
def test_patched_model_trains_and_saves_like_unpatched(modules):
    """One optimiser step on each twin leaves the same weights; the patched model's saved state dict loads
    strictly into the unpatched script's model and gives the same loss."""
    build = record_builder()
    plain, patched = twins(modules[RECORD, "plain"], modules[RECORD, "reference"], build)
    ids, targets = tokens(1)
    for model, loss_fn in ((plain, lambda: logits_loss(plain, ids, targets)),
                           (patched, lambda: patched(ids, targets))):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        loss_fn().backward()
        optimizer.step()
    for (name, p0), p1 in zip(plain.named_parameters(), patched.parameters()):
        assert rel_err(p1, p0) < ROUND_OFF, name
    buffer = io.BytesIO()
    torch.save(patched.state_dict(), buffer)
    buffer.seek(0)
    reloaded = build(modules[RECORD, "plain"]).double()
    reloaded.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    ids, targets = tokens(2)
    with torch.no_grad():
        assert rel_err(patched(ids, targets), logits_loss(reloaded, ids, targets)) < ROUND_OFF


@needs_scripts
def test_record_gptq_calibration_unchanged(modules):
    """The record's collect_hessians (hooks on the attention and MLP modules and the final norm, the
    `_calib` flags) collects the same Hessians from a patched model."""

    class Batches:   # the one loader method collect_hessians calls
        def next_batch(self, _tokens, _steps):
            return tokens(7)

    plain, patched = twins(modules[RECORD, "plain"], modules[RECORD, "reference"], record_builder())
    h = record_hyperparameters(modules[RECORD, "plain"])
    expected = modules[RECORD, "plain"].collect_hessians(plain, Batches(), h, "cpu", n_calibration_batches=1)
    hessians = modules[RECORD, "reference"].collect_hessians(patched, Batches(), h, "cpu", n_calibration_batches=1)
    assert hessians.keys() == expected.keys() and len(expected) > 20
    for name in expected:   # the hooks cast activations to float32: equal up to that rounding
        assert rel_err(hessians[name], expected[name]) < 1e-6, name


# ----------------------------------------------------------------------------------------------
# Each swap alone, float64
# ----------------------------------------------------------------------------------------------

SWAPS = {BASELINE: ("attention", "MLP", "embedding + loss"), RECORD: ("attention + XSA", "MLP", "embedding + loss")}


def patched_with(name: str, ops: str, swaps=None) -> types.ModuleType:
    """A fresh copy of script `name` with only the swaps named in `swaps` installed (None: all of them)."""
    module = script(name)
    family = baseline if name == BASELINE else varlen_record
    report = PatchReport(family.FAMILY, ops)
    for swap in family.swaps(module, ops):
        if swaps is None or swap.name in swaps:
            assert swap.apply(module, report), report.kept
    return module


@needs_scripts
@pytest.mark.parametrize("name, swap", [(name, swap) for name in SWAPS for swap in SWAPS[name]])
def test_each_swap_alone_float64(name, swap):
    """One swap installed, the rest of the script as it is: loss and every gradient to round-off."""
    build = baseline_model if name == BASELINE else record_builder()
    plain, patched = twins(script(name), patched_with(name, "reference", {swap}), build)
    ids, targets = tokens(6)

    def loss_of(model):
        if model is patched and swap == "embedding + loss":
            return model(ids, targets)
        if name == BASELINE:
            return baseline_loss_without_cast(model, ids, targets)
        return logits_loss(model, ids, targets)

    expected, loss = loss_of(plain), loss_of(patched)
    assert_same_loss_and_grads(plain, patched, expected, loss)


# ----------------------------------------------------------------------------------------------
# An edited script: the unknown part stays in torch, the rest is patched
# ----------------------------------------------------------------------------------------------

# An input-dependent SmearGate (the record line's v3 form) added to the record: (anchor, lines after it).
SMEAR_EDITS = (
    ("        self.tok_emb = nn.Embedding(h.vocab_size, h.embedding_dim)\n",
     "        self.smear_gate = CastedLinear(12, 1, bias=False)\n"
     "        self.smear_lambda = nn.Parameter(torch.zeros(1))\n"),
    ("    def forward_logits(self, input_ids, cu_seqlens=None, max_seqlen=0):\n        x = self.tok_emb(input_ids)\n",
     "        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :12]))\n"
     "        x = torch.cat((x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]), dim=1)\n"),
)


@needs_scripts
def test_unknown_smear_gate_variant_is_left_in_torch(tmp_path):
    """A record edited with an input-dependent SmearGate in forward_logits: the embedding and loss stay the
    script's (the report names the attributes it does not know), attention and MLP are still patched, and
    the patched model equals the unpatched one."""
    source = (PG_DIR / RECORD).read_text(encoding="utf-8")
    for anchor, added in SMEAR_EDITS:
        assert source.count(anchor) == 1, "the record script changed: update this test's edit"
        source = source.replace(anchor, anchor + added)
    path = tmp_path / "train_gpt.py"
    path.write_text(source, encoding="utf-8")
    variant = script(RECORD, path)
    report = patch_train_gpt(variant, ops="reference")
    assert {"CausalSelfAttention.forward", "MLP.forward"} <= set(report.patched)
    assert "GPT.forward" not in report.patched and "GPT.forward_logits" not in report.patched
    why = report.kept["embedding + loss"]
    assert "GPT.forward_logits" in why and "self.smear_gate" in why and "self.smear_lambda" in why
    plain, patched = twins(script(RECORD, path), variant, record_builder())
    ids, targets = tokens()
    expected, loss = (logits_loss(m, ids, targets)
                      for m in (plain, patched))
    assert_same_loss_and_grads(plain, patched, expected, loss)


# ----------------------------------------------------------------------------------------------
# float32, Triton kernels under the interpreter: within the script's own float32 spread
# ----------------------------------------------------------------------------------------------

def _float32_errors(models, loss_fn) -> dict[str, dict[str, float]]:
    """{"plain" | "patched": {"loss" | parameter name: rel. error of the float32 model vs float64}}: models
    = (float64 unpatched, float32 unpatched, float32 patched), same weights; parameters the configuration
    does not use (no gradient in float64) are left out."""
    truth, plain32, patched32 = models
    results = {}
    for key, model in (("truth", truth), ("plain", plain32), ("patched", patched32)):
        loss = loss_fn(model)
        loss.backward()
        results[key] = {"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
    used = [name for name, value in results["truth"].items() if value is not None]
    return {key: {name: rel_err(results[key][name], results["truth"][name]) for name in used}
            for key in ("plain", "patched")}


def _assert_within_spread(errors):
    """Each float32 error of the patched model below SPREAD_FACTOR × the unpatched script's own: for the
    loss (a scalar: its error is a few float32 ulps either way, so at least LOSS_ROUNDING), for the
    gradients their largest."""
    plain, patched = errors["plain"], errors["patched"]
    loss_spread = max(plain["loss"], LOSS_ROUNDING)
    assert patched["loss"] < SPREAD_FACTOR * loss_spread, (
        f"loss: float32 error {patched['loss']:.2e} vs the script's own {plain['loss']:.2e}")
    grads = {name: e for name, e in patched.items() if name != "loss"}
    spread = max(e for name, e in plain.items() if name != "loss")
    worst = max(grads, key=grads.get)
    assert grads[worst] < SPREAD_FACTOR * spread, (
        f"{worst}: float32 gradient error {grads[worst]:.2e} vs the script's own largest {spread:.2e}")


def float32_errors(name: str, swaps=None, ops_module=None):
    """_float32_errors of script `name` with `swaps` (swap names; None: every swap) under ops="triton":
    the baseline's tiny model, or the record on two layers (the second with XSA, no loop or lanes: that
    torch code is checked in float64) on a varlen batch. Returns (errors, (truth, plain32, patched32))."""
    patched_module = ops_module or patched_with(name, "triton", swaps)
    if name == BASELINE:
        build, (ids, targets), documents = baseline_model, tokens(3), {}
    else:
        build = record_builder(num_layers=2, xsa_last_n=1, num_loops=0, parallel_start_layer=0)
        ids, targets = tokens(4, shape=(1, BATCH * SEQ))
        documents = dict(cu_seqlens=torch.tensor([0, 9, 16, 30, 32, 32], dtype=torch.int32), max_seqlen=SEQ)
    plain_module = script(name)
    torch.manual_seed(0)   # the same initial weights whatever ran before (the rows of main() compare)
    truth, patched32 = twins(plain_module, patched_module, build)
    plain32, patched32 = build(plain_module).float(), patched32.float()
    plain32.load_state_dict(truth.state_dict())

    def loss_fn(model):
        if model is not truth:
            return model(ids, targets, **documents)
        if name == BASELINE:
            return baseline_loss_without_cast(model, ids, targets)
        return logits_loss(model, ids, targets, **documents)

    models = (truth, plain32, patched32)
    return _float32_errors(models, loss_fn), models


@needs_scripts
def test_baseline_float32_triton_within_script_spread(modules):
    errors, _ = float32_errors(BASELINE, ops_module=modules[BASELINE, "triton"])
    _assert_within_spread(errors)


@needs_scripts
def test_record_float32_triton_within_script_spread(modules):
    """Training loss and gradients on a varlen batch; then forward_ttt (LoRA test-time training), whose
    code stays the script's but whose FA3 calls are now ours."""
    errors, (truth, plain32, patched32) = float32_errors(RECORD, ops_module=modules[RECORD, "triton"])
    _assert_within_spread(errors)
    lora = modules[RECORD, "plain"].BatchedTTTLoRA(1, truth, 2).double()
    filled(lora, seed=1)
    ids, targets = tokens(5, shape=(1, SEQ))
    with torch.no_grad():
        nll = {key: model.forward_ttt(ids, targets, lora if model is truth else copy.deepcopy(lora).float())
               for key, model in (("truth", truth), ("plain", plain32), ("patched", patched32))}
    errors = {key: rel_err(nll[key], nll["truth"]) for key in ("plain", "patched")}
    assert errors["patched"] < SPREAD_FACTOR * max(errors["plain"], LOSS_ROUNDING), errors


def main() -> None:
    """Print the float32 errors of each swap alone and of all together (the numbers docs/porting.md
    quotes): `PYTHONPATH=. python tests/test_patch.py` (the interpreter on a CPU; minutes)."""
    torch.set_num_threads(1)
    print("| script | swaps | script's own loss / largest gradient error | patched |\n|---|---|---|---|")
    for name in (BASELINE, RECORD):
        for swap in (*SWAPS[name], None):
            errors, _ = float32_errors(name, None if swap is None else {swap})
            cells = [f"{e['loss']:.1e} / {max(v for k, v in e.items() if k != 'loss'):.1e}"
                     for e in (errors["plain"], errors["patched"])]
            print(f"| {name} | {swap or 'all'} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    if PG_DIR is None:
        raise SystemExit("the Parameter Golf scripts are not here (shared/reference/pg/ or PG_REFERENCE_DIR)")
    main()
