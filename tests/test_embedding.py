"""kernels.embed (fused token + BigramHash + rms_norm + SmearGate) against kernels.reference.embed.

CPU: the Triton kernels run under the interpreter at small shapes and are compared with the reference
evaluated in float64 (forward and the gradients of all four float inputs), with and without `bos_id`
document starts, and without BigramHash and/or SmearGate. GPU (`-m gpu`): bf16 at the pr1579 shape and
bitwise run-to-run determinism.
"""
import pytest
import torch
from conftest import rel_err

import kernels
from kernels import reference

FLOAT_INPUTS = ("tok_emb", "bigram_table", "bigram_proj", "smear_gate")


def make_inputs(B, T, V, d, NB, k, *, ids=None, table_dtype=torch.float32, scale=1.0, device="cpu", seed=0):
    """Random ids and parameters (never zeros). Unit-scale tables keep rms_norm's eps negligible, so
    the float64 reference (eps = finfo(float64).eps) is a fair target for float32 math."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if ids is None:
        ids = torch.randint(0, V, (B, T), generator=g)
    params = {
        "tok_emb": scale * torch.randn(V, d, generator=g),
        "bigram_table": scale * torch.randn(NB, k, generator=g),
        "bigram_proj": torch.randn(d, k, generator=g) / k ** 0.5,
        "smear_gate": torch.randn(d, generator=g),
    }
    params["tok_emb"] = params["tok_emb"].to(table_dtype)
    params["bigram_table"] = params["bigram_table"].to(table_dtype)
    return ids.to(device), {n: p.to(device).requires_grad_() for n, p in params.items()}


def run(fn, ids, params, grad_out, cast=None, *, names=FLOAT_INPUTS, **kw):
    """fn's output and the gradients of its float inputs `names` (in fn's argument order, after ids) for
    the upstream gradient grad_out."""
    leaves = {n: (p.detach().to(cast) if cast else p.detach()).requires_grad_() for n, p in params.items()}
    out = fn(ids, *(leaves[n] for n in names), **kw)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(out.dtype))
    return out, dict(zip(names, grads))


def check_against_reference(ids, params, *, tol=2e-6, grad_tol=None, op=kernels.embed, ref_op=reference.embed,
                            names=FLOAT_INPUTS, **kw):
    """Forward and the gradients of every float input of `op` (kernels.embed) within `tol` of its float64
    reference; grad_tol (a number, or a dict by input name) overrides tol for the gradients."""
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*ids.shape, params["tok_emb"].shape[1], generator=g).to(ids.device)
    out, grads = run(op, ids, params, grad_out, names=names, **kw)
    ref, ref_grads = run(ref_op, ids, params, grad_out.double(), cast=torch.float64, names=names, **kw)
    assert out.dtype == params["tok_emb"].dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, f"forward rel err {rel_err(out, ref):.3g}"
    for name in names:
        assert grads[name].dtype == params[name].dtype and grads[name].shape == params[name].shape
        err = rel_err(grads[name], ref_grads[name])
        bound = grad_tol.get(name, tol) if isinstance(grad_tol, dict) else grad_tol or tol
        assert err < bound, f"d{name} rel err {err:.3g}"
    return out, grads


@pytest.mark.parametrize("shape", [
    (3, 23, 50, 40, 37, 24),     # several rows; d spans two column chunks, k not a power of two
    (2, 40, 64, 16, 96, 16),     # more buckets than tokens: most table rows get no gradient
])
def test_matches_reference(shape):
    ids, params = make_inputs(*shape)
    check_against_reference(ids, params)


def test_heavy_repetition_and_bucket_collisions():
    """Three token ids over 90 positions and 5 buckets: long runs in both segment sums."""
    ids = torch.randint(0, 3, (3, 30), generator=torch.Generator().manual_seed(3))
    ids, params = make_inputs(3, 30, 12, 24, 5, 16, ids=ids)
    check_against_reference(ids, params)


def test_large_ids_hash_in_int64():
    """ids near V = 40000, where prev * 92821 overflows int32: buckets and outputs match the reference."""
    V, NB = 40000, 1021
    ids = torch.randint(V - 64, V, (2, 24), generator=torch.Generator().manual_seed(4))
    ids[0, :4] = torch.tensor([V - 1, V - 1, 0, V - 1])
    ids, params = make_inputs(2, 24, V, 16, NB, 16, ids=ids)
    _, _, buckets = torch.ops.crawler_kernels.embed_forward(ids, *(params[n].detach() for n in FLOAT_INPUTS))
    assert torch.equal(buckets.long(), reference.bigram_hash(ids, NB).reshape(-1))
    check_against_reference(ids, params)


def test_single_position_rows():
    """T = 1: every token is a row start (no bigram predecessor, nothing to smear)."""
    ids, params = make_inputs(20, 1, 30, 24, 17, 16)
    check_against_reference(ids, params)


def test_no_leakage_across_rows():
    """Each row of a batch equals that row embedded on its own (hash and smear restart per row)."""
    ids, params = make_inputs(4, 9, 30, 24, 17, 16)
    tables = [params[n].detach() for n in FLOAT_INPUTS]
    batched = kernels.embed(ids, *tables)
    for b in range(ids.shape[0]):
        alone = kernels.embed(ids[b:b + 1], *tables)
        assert torch.allclose(batched[b:b + 1], alone, rtol=1e-6, atol=1e-6)


BOS = 0


def bos_ids(B, T, V, positions, seed=6):
    """Random ids in [1, V) with BOS (id 0) at the given (row, position) pairs."""
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))
    for b, t in positions:
        ids[b, t] = BOS
    return ids


def test_bos_document_starts_match_reference():
    """BOS at position 0, twice in a row, on the interpreter's block edges (15 outputs per forward
    program, 16 rows per backward program: tokens 15, 16, 30, 32), at the last position, and a row
    without one."""
    positions = [(0, 0), (0, 5), (0, 6), (0, 15), (0, 30), (0, 39), (1, 16), (1, 32)]
    ids, params = make_inputs(3, 40, 30, 24, 17, 16, ids=bos_ids(3, 40, 30, positions))
    check_against_reference(ids, params, bos_id=BOS)


def test_bos_isolates_documents():
    """Changing the tokens before a BOS leaves every output from the BOS on unchanged (forward), and an
    upstream gradient on the BOS's document alone reaches no token before it (backward: the smear's
    dx0_{t+1} term stops at the BOS)."""
    ids = bos_ids(2, 30, 20, [(0, 11), (1, 7)])
    ids, params = make_inputs(2, 30, 40, 24, 17, 16, ids=ids)
    tables = [params[n].detach() for n in FLOAT_INPUTS]
    changed = ids.clone()
    changed[0, :11], changed[1, :7] = ids[0, :11] + 20, ids[1, :7] + 20      # ids 21..39: unseen after
    for fn in (kernels.embed, reference.embed):
        out, out_changed = fn(ids, *tables, bos_id=BOS), fn(changed, *tables, bos_id=BOS)
        assert torch.equal(out[0, 11:], out_changed[0, 11:]) and torch.equal(out[1, 7:], out_changed[1, 7:])
        assert not torch.equal(out[0, :11], out_changed[0, :11])
    grad_out = torch.randn(2, 30, 24)
    grad_out[0, :11], grad_out[1, :7] = 0.0, 0.0
    _, grads = run(kernels.embed, changed, params, grad_out, bos_id=BOS)
    assert not grads["tok_emb"][21:].any() and grads["tok_emb"][1:20].any()
    _, leaky = run(kernels.embed, changed, params, grad_out)        # without bos_id the smear leaks back
    assert leaky["tok_emb"][21:].any()


def test_bos_id_absent_from_ids_changes_nothing():
    ids, params = make_inputs(2, 20, 40, 24, 29, 16)
    tables = [params[n].detach() for n in FLOAT_INPUTS]
    ids = ids.clamp_min(1)
    assert torch.equal(kernels.embed(ids, *tables, bos_id=0), kernels.embed(ids, *tables))


def test_bf16_tables_with_fp32_proj_and_gate():
    """The model's dtypes: bf16 tables, fp32 projection and gate; output and table grads in bf16.
    The bound is loose because the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest)."""
    ids, params = make_inputs(2, 20, 40, 24, 29, 16, table_dtype=torch.bfloat16)
    check_against_reference(ids, params, tol=1e-2, grad_tol=2e-2)


def test_rms_norm_eps_is_float32s():
    """At the model's init scale (std 0.005) eps is not negligible: the fp32 reference (eps =
    finfo(float32).eps) must match tightly; a float64-eps kernel would be ~0.2% off."""
    ids, params = make_inputs(2, 20, 40, 24, 29, 16, scale=0.005)
    tables = [params[n].detach() for n in FLOAT_INPUTS]
    out, ref = kernels.embed(ids, *tables), reference.embed(ids, *tables)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint16])
def test_id_dtypes(dtype):
    ids, params = make_inputs(2, 20, 40, 24, 29, 16)
    tables = [params[n].detach() for n in FLOAT_INPUTS]
    assert torch.equal(kernels.embed(ids.to(dtype), *tables), kernels.embed(ids, *tables))


def test_gradients_identical_run_to_run():
    ids = torch.randint(0, 4, (3, 30), generator=torch.Generator().manual_seed(5))
    ids, params = make_inputs(3, 30, 12, 24, 7, 16, ids=ids)
    grad_out = torch.randn(3, 30, 24)
    first, second = run(kernels.embed, ids, params, grad_out), run(kernels.embed, ids, params, grad_out)
    assert torch.equal(first[0], second[0])
    for name in FLOAT_INPUTS:
        assert torch.equal(first[1][name], second[1][name]), name


def assert_compiles_to_the_same_bits(op, ids, params, *, names=FLOAT_INPUTS, **kw):
    """op under torch.compile(fullgraph=True) gives the eager op's output and gradients, bit for bit."""
    grad_out = torch.randn(*ids.shape, params["tok_emb"].shape[1])
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    out, grads = run(compiled, ids, params, grad_out, names=names, **kw)
    eager_out, eager_grads = run(op, ids, params, grad_out, names=names, **kw)
    assert torch.equal(out, eager_out)
    for name in names:
        assert torch.equal(grads[name], eager_grads[name]), name


@pytest.mark.parametrize("bos_id", [None, 3])
def test_compiles_fullgraph_without_graph_breaks(bos_id):
    ids, params = make_inputs(2, 20, 40, 24, 29, 16)
    ids[:, 7] = 3
    assert_compiles_to_the_same_bits(kernels.embed, ids, params, bos_id=bos_id)


def test_op_registration():
    """torch.library's own checks of the forward op: schema, fake tensor, autograd registration."""
    ids, params = make_inputs(2, 10, 20, 16, 13, 16)
    ids[0, 4] = 2
    args = (ids, *(params[n] for n in FLOAT_INPUTS), 2)
    torch.library.opcheck(torch.ops.crawler_kernels.embed_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("absent", [("bigram_table", "bigram_proj"), ("smear_gate",),
                                    ("bigram_table", "bigram_proj", "smear_gate")],
                         ids=["no-bigram", "no-smear", "neither"])
def test_without_bigram_or_smear_matches_reference(absent):
    """The switches: no BigramHash (x = tok_emb[ids]), no SmearGate (x0 = rms_norm(x)), neither (the
    baseline's embedding); forward and the gradients of the inputs given, in float64, with BOS starts on
    the block edges (the smear's halo rows); without BigramHash also compiled (fullgraph) to the same bits."""
    ids, params = make_inputs(3, 40, 30, 40, 17, 16, ids=bos_ids(3, 40, 30, [(0, 5), (0, 15), (1, 16)]))
    present = [n for n in FLOAT_INPUTS if n not in absent]
    grad_out = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(2))

    def run_given(fn, cast=None):
        leaves = {n: (params[n].detach().to(cast) if cast else params[n].detach()).requires_grad_() for n in present}
        out = fn(ids, **{n: leaves.get(n) for n in FLOAT_INPUTS}, bos_id=BOS)
        return (out, *torch.autograd.grad(out, [leaves[n] for n in present], grad_out.to(out.dtype)))

    got, ref = run_given(kernels.embed), run_given(reference.embed, torch.float64)
    for name, a, b in zip(["out", *present], got, ref):
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))
    if absent == ("bigram_table", "bigram_proj"):     # None tensors through the custom op's schema, once
        compiled = run_given(torch.compile(kernels.embed, fullgraph=True, backend="aot_eager"))
        assert all(torch.equal(a, b) for a, b in zip(compiled, got))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(bigram_proj=None), ValueError, "bigram_table, bigram_proj: expected both tensors"),
    (lambda a: a.update(ids=a["ids"].float()), TypeError, "ids"),
    (lambda a: a.update(ids=a["ids"][0]), ValueError, "ids"),
    (lambda a: a.update(ids=a["ids"] + 40), ValueError, r"ids: expected token ids in \[0, 40\)"),
    (lambda a: a.update(bigram_proj=a["bigram_proj"][:, :8]), ValueError, "bigram_proj"),
    (lambda a: a.update(smear_gate=a["smear_gate"][:5]), ValueError, "smear_gate"),
    (lambda a: a.update(tok_emb=a["tok_emb"].double()), TypeError, "tok_emb"),
    (lambda a: a.update(bigram_table=[[1.0]]), TypeError, "bigram_table"),
    (lambda a: a.update(bos_id=40), ValueError, r"bos_id: expected None or a token id in \[0, 40\)"),
    (lambda a: a.update(bos_id=-1), ValueError, "bos_id"),
    (lambda a: a.update(bos_id=True), ValueError, "bos_id"),
    (lambda a: a.update(bos_id=1.0), ValueError, "bos_id"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    ids, params = make_inputs(2, 8, 40, 16, 13, 16)
    args = {"ids": ids, **{n: p.detach() for n, p in params.items()}}
    change(args)
    with pytest.raises(error, match=match):
        kernels.embed(**args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    ids, params = make_inputs(2, 8, 40, 16, 13, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.embed(ids, *(params[n].detach() for n in FLOAT_INPUTS))


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at the pr1579 shape (B·T = 65,536, V = 8192, d = 736, buckets 10240 × 128)
# ----------------------------------------------------------------------------------------------

def pr1579_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Zipf-like ids: frequent tokens give long segments in the table-gradient sums.
    weights = 1.0 / torch.arange(1, 8193, dtype=torch.float64)
    ids = torch.multinomial(weights, 32 * 2048, replacement=True, generator=g).reshape(32, 2048)
    return make_inputs(32, 2048, 8192, 736, 10240, 128, ids=ids, table_dtype=torch.bfloat16, device="cuda",
                       seed=seed)


@pytest.mark.gpu
def test_gpu_bf16_pr1579_shape_matches_reference():
    ids, params = pr1579_inputs()
    check_against_reference(ids, params, tol=1e-2, grad_tol=2e-2)


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    ids, params = pr1579_inputs(seed=1)
    grad_out = torch.randn(32, 2048, 736, device="cuda")
    first, second = run(kernels.embed, ids, params, grad_out), run(kernels.embed, ids, params, grad_out)
    assert torch.equal(first[0], second[0])
    for name in FLOAT_INPUTS:
        assert torch.equal(first[1][name], second[1][name]), name
