"""kernels.modules: each nn.Module equals the functional reference op on its own parameters (the Triton
path under the interpreter on CPU, compared in float64), owns the parameters / buffers it documents, and
the modules compose into a small model that trains (the docs/ops.md example)."""
import pytest
import torch
import torch.nn as nn
from conftest import correlated_hessian, rel_err

import kernels
from kernels import reference
from kernels.modules import Attention, FusedEmbedding, Int6Linear, ReLU2MLP, SoftcappedCrossEntropyLoss, XSAAttention


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every parameter by fresh random values (the zero-init ones would hide terms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def grads(out: torch.Tensor, tensors, seed: int = 1):
    dz = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, tensors, dz)


@pytest.mark.parametrize("module, xsa", [(Attention(), False), (XSAAttention(), True)])
def test_attention_modules_equal_the_reference_op(module, xsa):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 19, n, 16, generator=g).requires_grad_() for n in (4, 2, 2))
    out = module(q, k, v)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ins, xsa=xsa)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(grads(out, (q, k, v)), grads(ref, ins)):
        assert rel_err(a, b) < 1e-5
    offsets = torch.tensor([0, 5, 19, 38], dtype=torch.int32)
    packed = [t.detach().reshape(38, *t.shape[2:]) for t in (q, k, v)]
    assert rel_err(module(*packed, cu_seqlens=offsets),
                   reference.attention(*(t.double() for t in packed), xsa=xsa, cu_seqlens=offsets)) < 1e-5


def test_fused_embedding_init_and_equality_with_the_reference_op():
    emb = FusedEmbedding(300, 24, 64, 16, bos_id=0)
    assert {n: tuple(p.shape) for n, p in emb.named_parameters()} == {
        "tok_emb": (300, 24), "bigram_table": (64, 16), "bigram_proj": (24, 16), "smear_gate": (24,)}
    assert abs(emb.tok_emb.std().item() - 0.005) < 5e-4 and abs(emb.bigram_table.std().item() - 0.01) < 1e-3
    assert not emb.bigram_proj.any() and not emb.smear_gate.any()
    randomise_(emb)
    ids = torch.randint(1, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    ids[0, 9] = 0
    out = emb(ids)
    params = [p.detach().double().requires_grad_() for p in emb.parameters()]
    ref = reference.embed(ids, *params, bos_id=0)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(grads(out, list(emb.parameters())), grads(ref, params)):
        assert rel_err(a, b) < 1e-5


def test_relu2_mlp_module_equals_the_reference_op():
    mlp = ReLU2MLP(24, 64, negative_slope=0.5)
    assert not mlp.proj_weight.any()
    assert torch.allclose(mlp.fc_weight.T @ mlp.fc_weight, torch.eye(24), atol=1e-5)      # orthogonal
    randomise_(mlp)
    h = torch.randn(2, 5, 24, requires_grad=True)
    out = mlp(h)
    ins = [t.detach().double().requires_grad_() for t in (h, mlp.fc_weight, mlp.proj_weight)]
    ref = reference.relu2_mlp(*ins, 0.5)
    assert out.shape == h.shape and rel_err(out, ref) < 1e-5
    for a, b in zip(grads(out, (h, mlp.fc_weight, mlp.proj_weight)), grads(ref, ins)):
        assert rel_err(a, b) < 1e-5


def test_softcapped_loss_module_equals_the_reference_op():
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 7, 16, generator=g).requires_grad_(), torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (2, 7), generator=g)
    loss = SoftcappedCrossEntropyLoss(15.0)(hidden, weight, targets)
    ref = reference.softcapped_cross_entropy(hidden.detach().double().reshape(14, 16), weight.double(),
                                             targets.reshape(14), 15.0)
    assert loss.shape == () and rel_err(loss, ref) < 1e-6
    with pytest.raises(ValueError, match="targets: expected shape"):
        SoftcappedCrossEntropyLoss()(hidden, weight, targets[:, :3])


def test_int6_linear_from_linear_holds_packed_weights_only():
    torch.manual_seed(5)
    linear = nn.Linear(32, 12)
    q = Int6Linear.from_linear(linear)
    assert dict(q.named_buffers()).keys() == {"packed", "scales", "bias"} and not list(q.parameters())
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (12, 24) and q.scales.dtype == torch.float16
    scales = reference.sdclip_scales(linear.weight.detach())
    codes = reference.quantize_rtn(linear.weight.detach(), scales)
    assert torch.equal(q.packed, kernels.pack_int6(codes)) and torch.equal(q.scales, scales)
    x = torch.randn(3, 5, 32)
    y = q(x)
    expect = reference.int6_linear(x.double(), q.packed, q.scales) + linear.bias.detach().double()
    assert y.shape == (3, 5, 12) and rel_err(y, expect) < 1e-6
    # Round-to-nearest on the SDClip step s = 12.85·std/31 errs by s/√12 ≈ 0.12·std per weight.
    assert rel_err(y - linear.bias, linear(x) - linear.bias) < 0.2


def test_int6_linear_from_linear_with_a_hessian_runs_gptq():
    torch.manual_seed(6)
    linear = nn.Linear(32, 8, bias=False)
    H = correlated_hessian(32)
    q = Int6Linear.from_linear(linear, hessian=H, ops="reference")
    codes, scales = reference.gptq_quantize(linear.weight.detach(), H)
    assert q.bias is None and torch.equal(q.packed, kernels.pack_int6(codes)) and torch.equal(q.scales, scales)
    x = torch.randn(4, 32, dtype=torch.float64)
    assert rel_err(q(x), reference.int6_linear(x, q.packed, q.scales)) < 1e-12


def test_int6_linear_from_codes_and_bad_arguments():
    codes = torch.randint(-32, 32, (6, 8), dtype=torch.int8)
    scales = torch.rand(6) + 0.1
    q = Int6Linear.from_codes(codes, scales, ops="reference")
    assert torch.equal(kernels.unpack_int6(q.packed, 8), codes)
    # rows of W without the rest (a tied embedding's look-up), and nn.Linear's dtype under autocast
    idx = torch.tensor([[5], [0]])
    assert torch.equal(q.weight_rows(idx), reference.dequantize(codes, q.scales)[idx])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(torch.randn(3, 8)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="codes: number of columns"):
        Int6Linear.from_codes(codes[:, :6], scales)
    with pytest.raises(ValueError, match="scales: expected shape"):
        Int6Linear.from_codes(codes, scales[:5])
    with pytest.raises(ValueError, match="in_features"):
        Int6Linear(6, 4)
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        Int6Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="ops: expected one of"):
        Attention(ops="auto")


class TinyLM(nn.Module):
    """The docs/ops.md example: someone else's model built from the modules."""

    def __init__(self, vocab=64, d=32, heads=2, kv_heads=1, ops="triton"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.embed = FusedEmbedding(vocab, d, 32, 8, bos_id=1, ops=ops)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.attn = XSAAttention(ops=ops)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp = ReLU2MLP(d, 4 * d, ops=ops)
        self.loss = SoftcappedCrossEntropyLoss(30.0, ops=ops)

    def forward(self, ids, targets, cu_seqlens=None):
        x = self.embed(ids)                                         # (B, T, d)
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        if cu_seqlens is not None:                                  # packed documents: B = 1
            q, k, v = q[0], k[0], v[0]
        x = x + self.out(self.attn(q, k, v, cu_seqlens=cu_seqlens).reshape(B, T, d))
        x = x + self.mlp(nn.functional.rms_norm(x, (d,)))
        return self.loss(nn.functional.rms_norm(x, (d,)), self.embed.tok_emb, targets)


def test_modules_compose_into_a_model_that_trains():
    """Two steps of the example model on packed documents: every parameter gets a gradient, the Triton
    and reference module sets agree, and the loss moves."""
    torch.manual_seed(7)
    ids = torch.randint(2, 64, (1, 24))
    ids[0, [0, 10, 17]] = 1                                                      # BOS at each document
    offsets = torch.tensor([0, 10, 17, 24], dtype=torch.int32)
    model = randomise_(TinyLM(), seed=8)
    twin = TinyLM(ops="reference")
    twin.load_state_dict(model.state_dict())
    targets = torch.randint(0, 64, (1, 24))
    assert rel_err(model(ids, targets, offsets), twin(ids, targets, offsets)) < 1e-5
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(2):
        loss = model(ids, targets, offsets)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.any() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
