"""kernels.smear_embed (the record line's embedding: SmearGate v3, BOS-masked, + rms_norm) against
kernels.reference.smear_embed, and the reference against the records' formula written out token by token.

CPU: the Triton kernels run under the interpreter at small shapes (d spans two column chunks, B·T several
token blocks) and are compared in float64: the forward and the gradients of tok_emb, smear_weight and
smear_lambda, with and without bos_id and rms_norm, on packed documents. GPU (`-m gpu`): bf16 at a record's
shape, and bitwise run-to-run determinism.
"""
import pytest
import test_embedding as embedding_tests
import torch
from conftest import rel_err

import kernels
from kernels import reference

FLOAT_INPUTS = ("tok_emb", "smear_weight", "smear_lambda")
BOS = 1
GATE_WIDTH = 12          # the records' smear gate reads the first 12 channels


def make_inputs(B, T, V, d, *, w=GATE_WIDTH, ids=None, dtype=torch.float32, scale=1.0, device="cpu", seed=0):
    """Random ids in [2, V) (BOS = 1 placed by the caller) and parameters, none of them zero: λ large
    enough that the smear term is a sizeable part of every output."""
    g = torch.Generator().manual_seed(seed)
    if ids is None:
        ids = torch.randint(2, V, (B, T), generator=g)
    params = {"tok_emb": (scale * torch.randn(V, d, generator=g)).to(dtype),
              "smear_weight": torch.randn(1, w, generator=g) / w ** 0.5,
              "smear_lambda": torch.tensor(0.7)}
    return ids.to(device), {n: p.to(device) for n, p in params.items()}


def run(fn, ids, params, grad_out, cast=None, **kw):
    """fn's output and the gradients of its three float inputs for the upstream gradient grad_out."""
    return embedding_tests.run(fn, ids, params, grad_out, cast, names=FLOAT_INPUTS, **kw)


def check_against_reference(ids, params, *, tol=2e-6, **kw):
    """Forward and the three gradients of kernels.smear_embed within `tol` of the float64 reference; the
    gate's gradients (W, λ: sums over every token of terms of both signs, whose fp32 error is relative to
    Σ|term|, not to the sum) within 50·tol."""
    return embedding_tests.check_against_reference(
        ids, params, tol=tol, grad_tol={"smear_weight": 50 * tol, "smear_lambda": 50 * tol},
        op=kernels.smear_embed, ref_op=reference.smear_embed, names=FLOAT_INPUTS, **kw)


def records_formula(ids, tok_emb, W, lam, bos_id, norm):
    """The records' SmearGate v3 with the BOS fix, one token at a time in float64: for t >= 1,
    x_t + λ·σ(W·x_t[:w])·x_{t−1}·[ids_t != BOS]; position 0 unchanged; then rms_norm (F.rms_norm's eps)."""
    x = tok_emb.double()[ids]
    y = x.clone()
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if bos_id is None or ids[b, t] != bos_id:
                gate = float(lam) * torch.sigmoid(x[b, t, :W.shape[1]] @ W.double()[0])
                y[b, t] = x[b, t] + gate * x[b, t - 1]
    return torch.nn.functional.rms_norm(y, (y.shape[-1],)) if norm else y


@pytest.mark.parametrize("bos_id, norm", [(BOS, True), (None, False)], ids=["bos-norm", "nobos-raw"])
def test_reference_is_the_records_formula(bos_id, norm):
    ids, params = make_inputs(2, 9, 20, 16)
    ids[0, 4] = ids[1, 0] = BOS
    tok, W, lam = (params[n].double() for n in FLOAT_INPUTS)
    expect = records_formula(ids, tok, W, lam, bos_id, norm)
    assert rel_err(reference.smear_embed(ids, tok, W, lam, bos_id=bos_id, norm=norm), expect) < 1e-12


# BOS on the interpreter's block edges (16 tokens per program: flat tokens 15, 16, 32), twice in a row, at
# the last position of a row and at a row start; rows of 25 tokens so documents and blocks straddle rows.
BOS_POSITIONS = [(0, 0), (0, 5), (0, 6), (0, 15), (0, 24), (1, 7), (2, 0)]


@pytest.mark.parametrize("bos_id, norm", [(BOS, True), (None, False)], ids=["bos-norm", "nobos-raw"])
def test_matches_reference(bos_id, norm):
    ids, params = make_inputs(3, 25, 30, 40)
    for b, t in BOS_POSITIONS:
        ids[b, t] = BOS
    check_against_reference(ids, params, bos_id=bos_id, norm=norm)


def test_bos_isolates_packed_documents():
    """One packed row of three documents: changing the first document's tokens leaves every output from
    the second BOS on unchanged, and an upstream gradient on the later documents alone reaches none of
    the first document's token rows (the smear's g_{t+1}·dy_{t+1} term stops at the BOS)."""
    ids, params = make_inputs(1, 36, 40, 24, ids=torch.randint(2, 20, (1, 36), generator=torch.Generator()
                                                               .manual_seed(3)))
    ids[0, [0, 13, 25]] = BOS
    tables = [params[n] for n in FLOAT_INPUTS]
    changed = ids.clone()
    changed[0, 1:13] += 20                                  # ids 22..39: used by the first document only
    out, out_changed = kernels.smear_embed(ids, *tables, bos_id=BOS), kernels.smear_embed(changed, *tables,
                                                                                          bos_id=BOS)
    assert torch.equal(out[0, 13:], out_changed[0, 13:]) and not torch.equal(out[0, :13], out_changed[0, :13])
    grad_out = torch.randn(1, 36, 24)
    grad_out[0, :13] = 0.0
    _, grads = run(kernels.smear_embed, changed, params, grad_out, bos_id=BOS)
    assert not grads["tok_emb"][22:].any() and grads["tok_emb"][2:20].any()
    _, leaky = run(kernels.smear_embed, changed, params, grad_out)        # without bos_id it leaks back
    assert leaky["tok_emb"][22:].any()


def test_identity_at_init_and_float32_eps():
    """The records initialise W and λ to 0: the op is then rms_norm(tok_emb[ids]); at the tied embedding's
    init scale (std 0.005) eps matters, and it is float32's, as in the float32 reference."""
    ids, params = make_inputs(2, 20, 30, 24, scale=0.005)
    zeros = torch.zeros_like(params["smear_weight"]), torch.zeros(1)
    out = kernels.smear_embed(ids, params["tok_emb"], *zeros, bos_id=BOS)
    plain = torch.nn.functional.rms_norm(params["tok_emb"][ids], (24,))
    assert rel_err(out, plain) < 1e-6
    assert rel_err(kernels.smear_embed(ids, *(params[n] for n in FLOAT_INPUTS)),
                   reference.smear_embed(ids, *(params[n] for n in FLOAT_INPUTS))) < 1e-6


def test_gate_width_extremes_bf16_and_int16_ids():
    """w = d (the gate reads every channel) and w = 1; a bf16 table with fp32 gate parameters (the
    records' dtypes; bf16 out and table gradient); int16 ids give the int64 result."""
    ids, params = make_inputs(2, 20, 30, 20, w=20)
    check_against_reference(ids, params, bos_id=BOS)
    ids, params = make_inputs(2, 20, 30, 20, w=1, dtype=torch.bfloat16)
    check_against_reference(ids, params, tol=2e-2)
    tables = [params[n] for n in FLOAT_INPUTS]
    assert torch.equal(kernels.smear_embed(ids.to(torch.int16), *tables), kernels.smear_embed(ids, *tables))


def test_compiles_fullgraph_and_op_registration():
    ids, params = make_inputs(2, 20, 30, 24)
    ids[:, 7] = BOS
    embedding_tests.assert_compiles_to_the_same_bits(kernels.smear_embed, ids, params, names=FLOAT_INPUTS,
                                                     bos_id=BOS)
    args = (ids, *(params[n].detach().requires_grad_() for n in FLOAT_INPUTS), BOS, True)
    torch.library.opcheck(torch.ops.crawler_kernels.smear_embed_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(ids=a["ids"].float()), TypeError, "ids: expected dtype"),
    (lambda a: a.update(ids=a["ids"] + 30), ValueError, r"ids: expected token ids in \[0, 30\), got values"),
    (lambda a: a.update(smear_weight=a["smear_weight"][0]), ValueError, "smear_weight: expected a 2-D"),
    (lambda a: a.update(smear_weight=torch.randn(2, 12)), ValueError, r"smear_weight: expected shape \(1, w\)"),
    (lambda a: a.update(smear_weight=torch.randn(1, 17)), ValueError, "with 1 <= w <= 16"),
    (lambda a: a.update(smear_lambda=torch.ones(2)), ValueError, "smear_lambda: expected one value"),
    (lambda a: a.update(tok_emb=a["tok_emb"].double()), TypeError, "tok_emb: expected dtype"),
    (lambda a: a.update(bos_id=30), ValueError, r"bos_id: expected None or a token id in \[0, 30\)"),
    (lambda a: a.update(smear_lambda=0.5), TypeError, "smear_lambda: expected a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    ids, params = make_inputs(2, 8, 30, 16)
    args = {"ids": ids, **params}
    change(args)
    with pytest.raises(error, match=match):
        kernels.smear_embed(**args)
    if "tok_emb" not in match:                # the reference also takes float64 tables
        with pytest.raises(error, match=match):
            reference.smear_embed(**args)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at a record's shape (one packed row of 16,384 tokens, V = 8192, d = 512, BOS every ~700)
# ----------------------------------------------------------------------------------------------

def record_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, 8193, dtype=torch.float64)             # Zipf-like: long segment sums
    ids = torch.multinomial(weights, 16384, replacement=True, generator=g).reshape(1, 16384)
    ids[0, ::700] = BOS
    ids, params = make_inputs(1, 16384, 8192, 512, ids=ids, dtype=torch.bfloat16, device="cuda", seed=seed)
    return ids, params


@pytest.mark.gpu
def test_gpu_bf16_record_shape_matches_reference():
    ids, params = record_inputs()
    check_against_reference(ids, params, tol=2e-2, bos_id=BOS)


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    ids, params = record_inputs(seed=1)
    grad_out = torch.randn(1, 16384, 512, device="cuda")
    first = run(kernels.smear_embed, ids, params, grad_out, bos_id=BOS)
    second = run(kernels.smear_embed, ids, params, grad_out, bos_id=BOS)
    assert torch.equal(first[0], second[0])
    for name in FLOAT_INPUTS:
        assert torch.equal(first[1][name], second[1][name]), name
