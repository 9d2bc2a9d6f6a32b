"""CrawlerGPT and CrawlerConfig against docs/math.md §1."""
import dataclasses

import pytest
import torch

from crawler import CrawlerConfig, CrawlerGPT
from crawler.model import fake_quantize

SMALL = dict(vocab_size=96, model_dim=64, num_heads=4, num_kv_heads=2, bigram_buckets=37, bigram_dim=8,
             ve_dim=8, train_seq_len=16)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CrawlerGPT(CrawlerConfig.preset("tiny", **{**SMALL, **overrides}), ops="reference")


def pr1579_state_dict_shapes():
    """Names and shapes of PR #1579's GPT state dict (d=736, SP8192), written out from docs/math.md §1.11 and
    the seed's hyper-parameters, independently of our model code."""
    d, kv, hid, P = 736, 368, 2944, 7
    shapes = {"tok_emb.weight": (8192, d), "bigram.table.weight": (10240, 128), "bigram.proj.weight": (d, 128),
              "smear.gate": (d,), "ve.table.weight": (8192, 128), "ve.proj.weight": (kv, 128),
              "ve.scales.0": (), "ve.scales.1": (), "crawler_residual_scales.0": (),
              "crawler_residual_scales.1": (), "attn_scales": (P, d), "mlp_scales": (P, d),
              "resid_mixes": (P, 2, d), "skip_weights": (3, d)}
    for group, n in (("flat_blocks", 3), ("crawler_blocks", 2)):
        for i in range(n):
            p = f"{group}.{i}."
            shapes.update({p + "attn.c_q.weight": (d, d), p + "attn.c_k.weight": (kv, d),
                           p + "attn.c_v.weight": (kv, d), p + "attn.proj.weight": (d, d),
                           p + "attn.q_gain": (16,), p + "mlp.fc.weight": (hid, d),
                           p + "mlp.proj.weight": (d, hid)})
    return shapes


def test_pr1579_parameter_count_and_names():
    torch.manual_seed(0)
    model = CrawlerGPT(CrawlerConfig.preset("pr1579"))
    assert sum(p.numel() for p in model.parameters()) == 38_346_836
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == pr1579_state_dict_shapes()


def test_pr1579_checkpoint_loads_strict_and_gives_finite_loss(tmp_path):
    torch.manual_seed(1)
    sd = {}
    for name, shape in pr1579_state_dict_shapes().items():
        tables = ("tok_emb.weight", "bigram.table.weight", "ve.table.weight")
        dtype = torch.bfloat16 if name in tables else torch.float32
        sd[name] = (torch.randn(shape) * 0.02).to(dtype)
    path = tmp_path / "final_model.pt"
    torch.save(sd, path)
    model = CrawlerGPT(CrawlerConfig.preset("pr1579"), ops="reference")
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert torch.equal(model.state_dict()["attn_scales"], sd["attn_scales"])
    ids = torch.randint(0, 8192, (1, 32))
    with torch.no_grad():
        loss = model(ids, ids.roll(-1, 1))
    assert torch.isfinite(loss)


def test_schedule_xsa_and_ve_positions():
    c = CrawlerConfig.preset("pr1579")
    assert c.schedule() == [("flat", 0, 0), ("crawler", 0, 0), ("crawler", 1, 0), ("crawler", 0, 1),
                            ("crawler", 1, 1), ("flat", 1, 0), ("flat", 2, 0)]
    assert c.xsa_positions() == frozenset(range(7))
    assert dataclasses.replace(c, xsa="pr1579").xsa_positions() == frozenset({0, 1, 2, 3, 4})
    assert dataclasses.replace(c, xsa="none").xsa_positions() == frozenset()
    assert dataclasses.replace(c, xsa=(2, 6)).xsa_positions() == frozenset({2, 6})
    assert c.ve_positions() == (5, 6)
    assert c.num_skip_weights == 3 and c.head_dim == 46


def test_xsa_flag_reaches_attention(monkeypatch):
    model = small_model(xsa="pr1579")
    seen = []
    import kernels.reference as ref
    real = ref.attention

    def spy(q, k, v, **kwargs):
        seen.append(kwargs["xsa"])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(ref, "attention", spy)
    ids = torch.randint(0, 96, (1, 8))
    model(ids, ids)
    assert seen == [True, True, True, True, True, False, False]


@pytest.mark.parametrize("field,value,match", [
    ("model_dim", 66, "divisible by num_heads"),
    ("model_dim", 12, "must be even"),
    ("num_kv_heads", 3, "multiple of num_kv_heads"),
    ("xsa", "some", "xsa must be one of"),
    ("xsa", (9,), "xsa positions"),
    ("ve_last_n", 9, "ve_last_n"),
    ("vocab_size", 0, "vocab_size must be a positive int"),
])
def test_config_validation(field, value, match):
    overrides = {"model_dim": 64, "num_heads": 4, "num_kv_heads": 2, field: value}
    if field == "model_dim" and value == 12:
        overrides["num_heads"] = 4          # head dim 3: odd
    with pytest.raises(ValueError, match=match):
        CrawlerConfig.preset("tiny", **overrides)


def test_config_round_trip_and_unknown_preset():
    c = CrawlerConfig.preset("tiny")
    assert CrawlerConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown preset"):
        CrawlerConfig.preset("huge")


def test_alpha_semantics_and_skip_order():
    """Loop 0 replaces the stream with the crawler block output; loop >= 1 interpolates by alpha after
    each crawler block; the decoder flat block sees x + skip_weights[0] * flat0 output."""
    model = small_model(seed=3)
    with torch.no_grad():
        model.crawler_residual_scales[1].fill_(0.3)
        for p in model.parameters():          # non-trivial control vectors
            if p.dim() >= 1 and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    calls = []

    def record(name):
        def hook(module, args, out):
            calls.append((name, args[0].detach().clone(), out.detach().clone()))
        return hook

    model.flat_blocks[0].register_forward_hook(record("f0"))
    model.flat_blocks[1].register_forward_hook(record("f1"))
    for i, b in enumerate(model.crawler_blocks):
        b.register_forward_hook(record(f"c{i}"))
    ids = torch.randint(0, 96, (2, 8))
    model(ids, ids)
    names = [c[0] for c in calls]
    assert names == ["f0", "c0", "c1", "c0", "c1", "f1"]
    (_, _, f0), (_, i1, o1), (_, i2, o2), (_, i3, o3), (_, i4, o4), (_, i5, _) = calls
    a = 0.3
    assert torch.equal(i1, f0)                       # the encoder output flows into the crawler
    assert torch.equal(i2, o1) and torch.equal(i3, o2)   # loop 0: replace
    x3 = i3 + a * (o3 - i3)
    assert torch.allclose(i4, x3, atol=1e-6)             # loop 1: interpolate after each block
    x4 = x3 + a * (o4 - x3)
    assert torch.allclose(i5, x4 + model.skip_weights[0] * f0, atol=1e-6)


def test_gradients_reach_every_parameter_but_alpha():
    model = small_model(seed=4)
    ids = torch.randint(0, 96, (2, 12))
    model(ids, ids.roll(-1, 1)).backward()
    for name, p in model.named_parameters():
        if name.startswith("crawler_residual_scales"):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None, name
    # alpha becomes trainable on request (TTT)
    trainable = small_model(train_alpha=True)
    trainable(ids, ids).backward()
    assert trainable.crawler_residual_scales[1].grad is not None


def test_init_rules():
    model = small_model(seed=5)
    for blocks in (model.flat_blocks, model.crawler_blocks):
        for b in blocks:
            assert b.attn.proj.weight.abs().sum() == 0 and b.mlp.proj.weight.abs().sum() == 0
            w = b.attn.c_q.weight
            assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-4)      # orthogonal
    assert model.bigram.proj.weight.abs().sum() == 0
    assert torch.all(model.resid_mixes[:, 0] == 1) and torch.all(model.resid_mixes[:, 1] == 0)
    assert float(model.crawler_residual_scales[1]) == 0.5
    assert torch.all(model.flat_blocks[0].attn.q_gain == 1.5)


def test_qat_fake_quant_rounds_onto_grid_and_passes_gradient():
    torch.manual_seed(6)
    w = torch.randn(8, 16, requires_grad=True)
    wq = fake_quantize(w)
    s = w.detach().abs().amax(1, keepdim=True) / 31
    codes = wq.detach() / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -32 and codes.max() <= 31
    (wq * torch.arange(16.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(16.0).expand(8, 16))


def test_ops_argument():
    with pytest.raises(ValueError, match="ops must be one of"):
        CrawlerGPT(CrawlerConfig.preset("tiny", **SMALL), ops="fast")
    model = small_model()
    assert model.resolve_ops(torch.device("cpu")) == "reference"


def test_ops_object_supplies_the_ops():
    """An object with the op functions as attributes (how benchmarks plug in a baseline set) is used."""
    import types

    import kernels.reference as ref
    calls = []

    def counting_attention(*args, **kwargs):
        calls.append(1)
        return ref.attention(*args, **kwargs)

    ops = types.SimpleNamespace(attention=counting_attention, embed=ref.embed, relu2_mlp=ref.relu2_mlp,
                                softcapped_cross_entropy=ref.softcapped_cross_entropy)
    ids = torch.randint(0, 96, (1, 8))
    expect = small_model(seed=7)(ids, ids)
    model = small_model(seed=7)
    model.ops = ops
    assert torch.equal(model(ids, ids), expect)
    assert len(calls) == 7
