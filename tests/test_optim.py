"""Muon, the parameter groups and the schedules against docs/math.md §2. (Muon's rank-sharded step is checked
in tests/test_trainer.py, inside the one two-process run of the suite.)"""
import math

import pytest
import torch
from trainer_fixtures import small_config

from crawler.model import CrawlerGPT
from crawler.optim import (
    POLAR_EXPRESS_COEFFS,
    Muon,
    build_optimizers,
    lr_multiplier,
    muon_momentum_at,
    orthogonalize,
    set_lr_multiplier,
    split_parameters,
)

NS = (3.4445, -4.7750, 2.0315)


def hand_muon_update(g, buf, mu):
    """One Muon update written out from docs/math.md §2 in float64: returns (u, new buf)."""
    g, buf = g.double(), buf.double()
    buf = mu * buf + g
    gp = g + mu * buf
    x = gp / (gp.norm() + 1e-7)
    rows, cols = x.shape
    if rows > cols:
        x = x.T
    a, b, c = NS
    for _ in range(5):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    if rows > cols:
        x = x.T
    return x * math.sqrt(max(1.0, rows / cols)), buf


def well_conditioned(rows, cols, seed):
    """A random matrix with singular values in [0.3, 1] (NS reaches its plateau from there in 5 steps)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
    s = torch.linspace(0.3, 1.0, k, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_muon_two_steps_match_hand_written(shape, dtype, tol):
    """Two steps (so momentum and Nesterov matter), with weight decay applied after the update."""
    torch.manual_seed(0)
    lr, mu, wd = 0.05, 0.9, 0.1
    p0 = torch.randn(shape)
    grads = [torch.randn(shape), torch.randn(shape)]
    p = torch.nn.Parameter(p0.clone())
    opt = Muon([p], lr=lr, momentum=mu, weight_decay=wd, compute_dtype=dtype)
    ref, buf = p0.double(), torch.zeros(shape, dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        u, buf = hand_muon_update(g, buf, mu)
        ref = (ref - lr * u) * (1 - lr * wd)
        # compare the update itself (the parameter is dominated by p0)
    delta, ref_delta = (p.detach().double() - p0.double()), (ref - p0.double())
    assert (delta - ref_delta).norm() / ref_delta.norm() < tol
    assert torch.allclose(opt.state[p]["momentum_buffer"].double(), buf, atol=1e-6)


def test_orthogonalize_square_is_close_to_orthogonal_and_scaled_rectangular():
    g = well_conditioned(32, 32, seed=1)
    x = orthogonalize(g).float()
    assert x.dtype == torch.float32 and x.shape == g.shape
    sv = torch.linalg.svdvals(x)
    # the fixed quintic does not converge to exactly 1: it keeps singular values in a band around it
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    assert sv.max() / sv.min() < 2.0          # the input's condition number was 1 / 0.3
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 3.0
    # polar express coefficients land much closer to 1
    sv_pe = torch.linalg.svdvals(orthogonalize(g, coeffs=POLAR_EXPRESS_COEFFS, dtype=torch.float32))
    assert (sv_pe - 1).abs().max() < (sv - 1).abs().max()
    # rectangular: the update is scaled by sqrt(max(1, rows/cols)); tall and wide agree up to transpose
    tall = well_conditioned(48, 12, seed=2)
    p = torch.nn.Parameter(torch.zeros(48, 12))
    p.grad = tall.clone()
    Muon([p], lr=1.0, momentum=0.0, nesterov=False, compute_dtype=torch.float32).step()
    u = -p.detach()
    assert torch.allclose(torch.linalg.svdvals(u) / 2.0, torch.linalg.svdvals(orthogonalize(tall, dtype=torch.float32)),
                          atol=1e-5)
    assert torch.allclose(orthogonalize(tall.T, dtype=torch.float32), orthogonalize(tall, dtype=torch.float32).T,
                          atol=1e-5)


def test_muon_row_normalize_ignores_row_scale():
    g = well_conditioned(16, 24, seed=3)
    scale = torch.linspace(0.1, 10.0, 16)[:, None]
    outs = []
    for grad in (g, g * scale):
        p = torch.nn.Parameter(torch.zeros(16, 24))
        p.grad = grad
        Muon([p], lr=1.0, momentum=0.0, row_normalize=True, compute_dtype=torch.float32).step()
        outs.append(p.detach().clone())
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    p = torch.nn.Parameter(torch.zeros(16, 24))
    p.grad = g * scale
    Muon([p], lr=1.0, momentum=0.0, compute_dtype=torch.float32).step()
    assert not torch.allclose(p.detach(), outs[0], atol=1e-3)


def test_muon_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize(torch.zeros(2, 2, 2))


def test_lr_multiplier_boundaries():
    it = dict(iterations=100, max_wallclock_ms=None, warmdown_frac=0.6)
    assert lr_multiplier(0, 0.0, **it) == 1.0
    assert lr_multiplier(39, 0.0, **it) == 1.0
    assert lr_multiplier(40, 0.0, **it) == pytest.approx(1.0)
    assert lr_multiplier(70, 0.0, **it) == pytest.approx(0.5)
    assert lr_multiplier(99, 0.0, **it) == pytest.approx(1 / 60)
    assert lr_multiplier(100, 0.0, **it) == 0.0
    wc = dict(iterations=100, max_wallclock_ms=1000.0, warmdown_frac=0.6)
    assert lr_multiplier(90, 399.0, **wc) == 1.0          # the wall clock, not the step, is the budget
    assert lr_multiplier(0, 400.0, **wc) == pytest.approx(1.0)
    assert lr_multiplier(0, 700.0, **wc) == pytest.approx(0.5)
    assert lr_multiplier(0, 1000.0, **wc) == 0.0
    assert lr_multiplier(0, 1500.0, **wc) == 0.0          # past the cap: clamped, never negative
    with pytest.raises(ValueError, match="warmdown_frac"):
        lr_multiplier(0, 0.0, iterations=10, max_wallclock_ms=None, warmdown_frac=0.0)


def test_momentum_warmup():
    assert muon_momentum_at(0) == pytest.approx(0.85)
    assert muon_momentum_at(250) == pytest.approx(0.92)
    assert muon_momentum_at(500) == pytest.approx(0.99)
    assert muon_momentum_at(5000) == pytest.approx(0.99)


def test_parameter_groups_and_hyper_parameters():
    model = CrawlerGPT(small_config(), ops="reference")
    groups = {k: {n for n, _ in v} for k, v in split_parameters(model).items()}
    assert groups["token"] == {"tok_emb.weight", "bigram.table.weight", "ve.table.weight"}
    assert {"bigram.proj.weight", "ve.proj.weight", "flat_blocks.0.attn.c_q.weight",
            "crawler_blocks.1.mlp.proj.weight"} <= groups["muon"]
    assert all(n.endswith(".weight") for n in groups["muon"])
    assert {"skip_weights", "resid_mixes", "attn_scales", "mlp_scales", "smear.gate", "ve.scales.0",
            "flat_blocks.0.attn.q_gain"} <= groups["scalar"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups["muon"] | groups["token"] | groups["scalar"] == trainable
    assert sum(map(len, groups.values())) == len(trainable)
    assert not any(n.startswith("crawler_residual_scales") for g in groups.values() for n in g)
    with_alpha = split_parameters(CrawlerGPT(small_config(train_alpha=True), ops="reference"))
    assert "crawler_residual_scales.1" in {n for n, _ in with_alpha["scalar"]}

    muon, token, scalar = build_optimizers(model)
    assert (muon.defaults["lr"], muon.defaults["weight_decay"], muon.defaults["momentum"]) == (0.02, 0.085, 0.99)
    for opt, lr in ((token, 0.02), (scalar, 0.01)):
        g = opt.param_groups[0]
        assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (lr, (0.9, 0.95), 1e-8, 0.085)
    set_lr_multiplier((muon, token, scalar), 0.5)
    assert (muon.param_groups[0]["lr"], scalar.param_groups[0]["lr"]) == (0.01, 0.005)


def test_adamw_steps_bf16_embedding_tables():
    """pr1579 stores the tables in bf16: AdamW steps them in place (bf16 moments, no master copy)."""
    torch.manual_seed(0)
    model = CrawlerGPT(small_config(embed_dtype="bfloat16"), ops="reference")
    opts = build_optimizers(model)
    before = model.tok_emb.weight.detach().clone()
    x = torch.randint(0, 320, (2, 16))
    model(x, x).backward()
    for o in opts:
        o.step()
    w = model.tok_emb.weight
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all() and not torch.equal(w, before)
    assert opts[1].state[w]["exp_avg"].dtype == torch.bfloat16
