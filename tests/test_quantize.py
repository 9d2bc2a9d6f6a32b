"""Quantisation (docs/math.md §3): SDClip floors, the per-role plan on PR #1579's state dict, Hessian collection
(both crawler passes, the LM head), calibration windows, GPTQ vs round to nearest through the driver,
loop-aware GPTQ, ±1 pruning, a PR #1579-shaped state dict, the round trip and the CLI."""
import dataclasses

import pytest
import torch
from conftest import SMALL_CRAWLER as SMALL
from conftest import filled_crawler, rel_err
from test_model import pr1579_state_dict_shapes

import kernels
from crawler.artifact import QuantizedTensor, decode_artifact, encode_artifact, load_artifact
from crawler.config import CrawlerConfig
from crawler.data import write_shard
from crawler.model import CrawlerGPT
from crawler.quant import (
    PLANS,
    Calibration,
    QuantPlan,
    RoleSpec,
    build_artifact,
    calibration_tokens,
    collect_hessians,
    plan_schemes,
    prune_to_fit,
    quantize_and_evaluate,
    quantize_model,
    quantize_state_dict,
    quantize_tensor,
    tensor_role,
)
from crawler.quant.gptq_driver import _gptq_fixed_scales
from crawler.quantize import main


def small_model(seed=0) -> CrawlerGPT:
    """A small random crawler standing in for a trained model."""
    return filled_crawler(seed)


def all_quantised(name: str) -> QuantPlan:
    """A named plan with the small-tensor passthrough off, so a small model's matrices are quantised."""
    return dataclasses.replace(PLANS[name], small_numel=0)


def random_tokens(n, vocab=64, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "fineweb_train_000000.bin", random_tokens(400, seed=1))
    write_shard(d / "fineweb_train_000001.bin", random_tokens(10, seed=2))     # shorter than a window
    write_shard(d / "fineweb_train_000002.bin", random_tokens(300, seed=3))
    write_shard(d / "fineweb_val_000000.bin", random_tokens(200, seed=4))
    return d


# -- SDClip scales and the plan ------------------------------------------------------------------------

def test_sdclip_scale_floor_ours_vs_seed():
    g = torch.Generator().manual_seed(0)
    std = torch.tensor([0.01, 0.03, 0.2, 0.0])[:, None]
    w = torch.randn(4, 256, generator=g) * std
    ours = quantize_tensor(w, RoleSpec("rtn"))
    seed = quantize_tensor(w, RoleSpec("rtn", floor="inv_range"))
    sdclip = (12.85 * w.double().std(dim=1) / 31)
    assert torch.equal(ours.scales[:3], sdclip[:3].half())
    assert ours.scales[3] > 0 and not ours.codes[3].any()                       # floor 1e-10, never 0
    assert torch.equal(seed.scales, torch.maximum(sdclip, torch.tensor(1 / 31)).half())
    # rows with std < 1/12.85 are coarsened by the seed's floor: fewer distinct codes, larger error
    assert seed.scales[0] == torch.tensor(1 / 31).half() and seed.scales[2] == ours.scales[2]
    err = lambda q: (w[:2] - q.dequantize()[:2]).pow(2).sum()
    assert err(seed) > 4 * err(ours)


def test_fixed_scale_gptq_walk_matches_the_reference():
    """The seed's GPTQ (given, floored scales) runs the reference's walk: with the reference's own
    SDClip scales it must give exactly the reference's codes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)
    H = x.T @ x / 512
    w = torch.randn(40, 96, generator=g) * 0.02
    ref_codes, ref_scales = kernels.reference.gptq_quantize(w, H)
    assert torch.equal(_gptq_fixed_scales(w, H, ref_scales, 6), ref_codes)
    seed = quantize_tensor(w, RoleSpec("gptq", floor="inv_range"), H)
    rtn = quantize_tensor(w, RoleSpec("rtn", floor="inv_range"))
    assert torch.equal(seed.scales, rtn.scales) and bool((seed.scales == torch.tensor(1 / 31).half()).all())
    proxy = lambda q: kernels.reference.quantization_proxy_loss(w, H, q.codes, q.scales)
    assert proxy(seed) < proxy(rtn)


def test_plan_assigns_each_pr1579_tensor_its_scheme():
    state = {n: torch.empty(s) for n, s in pr1579_state_dict_shapes().items()}
    blocks = {n for n in state if n.startswith(("flat_blocks.", "crawler_blocks.")) and n.endswith(".weight")}
    control = {n for n in state if n.endswith("q_gain")} | {
        "attn_scales", "mlp_scales", "resid_mixes", "skip_weights", "smear.gate", "ve.scales.0", "ve.scales.1",
        "crawler_residual_scales.0", "crawler_residual_scales.1"}
    assert len(blocks) == 30 and len(control) == 14
    expected = {n: "int6_gptq" for n in blocks} | {n: "fp32" for n in control} | {
        "tok_emb.weight": "int6_gptq", "bigram.table.weight": "int6_rtn", "bigram.proj.weight": "int6_rtn",
        "ve.table.weight": "int6_rtn", "ve.proj.weight": "fp16"}                    # 47,104 elements
    assert plan_schemes(state, "default") == expected
    assert plan_schemes(state, "seed") == expected | {"tok_emb.weight": "int6_rtn"}
    assert plan_schemes(state, "rtn_seed_floor") == {n: s.replace("gptq", "rtn") for n, s in expected.items()}
    int8_emb = PLANS["default"].with_role("tok_emb", RoleSpec("gptq", bits=8, k=20.0))
    assert plan_schemes(state, int8_emb)["tok_emb.weight"] == "int8_gptq"
    with pytest.raises(ValueError, match="no quantisation role"):
        tensor_role("lm_head.weight", torch.empty(1000, 100))
    with pytest.raises(ValueError, match="cannot use GPTQ"):
        PLANS["default"].with_role("bigram_table", RoleSpec("gptq"))


# -- Hessians and calibration ------------------------------------------------------------------------------

def test_hessians_accumulate_both_crawler_passes_and_the_lm_head():
    model = small_model()
    calib = random_tokens(5 * 17, seed=5).view(5, 17)
    seen: dict[str, list[torch.Tensor]] = {}

    def record(key):
        return lambda module, args: seen.setdefault(key, []).append(args[0].detach().clone())

    handles = [model.crawler_blocks[1].attn.register_forward_pre_hook(record("c1.attn")),
               model.crawler_blocks[1].mlp.register_forward_pre_hook(record("c1.mlp")),
               model.flat_blocks[2].attn.proj.register_forward_pre_hook(record("f2.proj"))]
    H = collect_hessians(model, calib, batch_seqs=2)             # batches of 2, 2, 1 sequences
    for h in handles:
        h.remove()
    assert len(seen["c1.attn"]) == 2 * 3 and len(seen["f2.proj"]) == 3   # two passes per batch

    def manual(xs):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        return x.T @ x / 5                                          # normalised by sequences, not passes

    c = "crawler_blocks.1."
    assert rel_err(H[c + "attn.c_q.weight"], manual(seen["c1.attn"])) < 1e-6
    assert H[c + "attn.c_k.weight"] is H[c + "attn.c_q.weight"] is H[c + "attn.c_v.weight"]
    assert rel_err(H[c + "mlp.fc.weight"], manual(seen["c1.mlp"])) < 1e-6
    fc = model.crawler_blocks[1].mlp.fc.weight
    hidden_acts = [kernels.reference.relu2(h @ fc.T) for h in seen["c1.mlp"]]
    assert rel_err(H[c + "mlp.proj.weight"], manual(hidden_acts)) < 1e-6
    assert rel_err(H["flat_blocks.2.attn.proj.weight"], manual(seen["f2.proj"])) < 1e-6
    with torch.no_grad():
        final = model.forward_hidden(calib[:, :-1])
    assert rel_err(H["tok_emb.weight"], manual([final])) < 1e-6
    assert H["tok_emb.weight"].shape == (32, 32) and H["tok_emb.weight"].dtype == torch.float32
    only = collect_hessians(model, calib, names={"tok_emb.weight"}, batch_seqs=2)
    assert set(only) == {"tok_emb.weight"} and torch.equal(only["tok_emb.weight"], H["tok_emb.weight"])


def test_calibration_windows_are_seeded_and_contiguous(data_dir):
    from crawler.data import read_shard
    a = calibration_tokens(data_dir, n_seqs=6, seq_len=16, seed=3)
    assert a.shape == (6, 17) and a.dtype == torch.int64
    assert torch.equal(a, calibration_tokens(data_dir, n_seqs=6, seq_len=16, seed=3))
    assert not torch.equal(a, calibration_tokens(data_dir, n_seqs=6, seq_len=16, seed=4))
    shards = [read_shard(data_dir / f"fineweb_train_00000{i}.bin").long() for i in (0, 2)]
    for row in a:
        assert any(any(torch.equal(row, s[o:o + 17]) for o in range(s.numel() - 16)) for s in shards)
    with pytest.raises(ValueError, match="holds 1001 tokens"):
        calibration_tokens(data_dir, n_seqs=2, seq_len=1000)


# -- the driver ----------------------------------------------------------------------------------------------

def test_gptq_plan_beats_round_to_nearest_on_the_proxy_loss():
    model = small_model()
    calib = random_tokens(8 * 17, seed=6).view(8, 17)
    gptq = quantize_model(model, calib, plan=all_quantised("default"), log=None)
    rtn = quantize_model(model, calib, plan=all_quantised("default").with_role("block", RoleSpec("rtn"))
                         .with_role("tok_emb", RoleSpec("rtn")), log=None)
    H = collect_hessians(model, calib)
    state = model.state_dict()
    names = [n for n in H if n != "ve.proj.weight"]
    proxy = lambda art, n: float(kernels.reference.quantization_proxy_loss(
        state[n], H[n], art.tensors[n].codes, art.tensors[n].scales))
    assert sum(proxy(gptq.artifact, n) for n in names) < 0.8 * sum(proxy(rtn.artifact, n) for n in names)
    schemes = gptq.artifact.schemes()
    assert schemes["crawler_blocks.0.mlp.proj.weight"] == "int6_gptq" and schemes["tok_emb.weight"] == "int6_gptq"
    assert schemes["attn_scales"] == "fp32" and schemes["bigram.table.weight"] == "int6_rtn"
    assert {r["name"] for r in gptq.stats} == {n for n, s in schemes.items() if s.startswith("int")}
    # the file round trip keeps every tensor bit for bit
    back = decode_artifact(encode_artifact(gptq.artifact))
    for n, t in gptq.artifact.tensors.items():
        u = back.tensors[n]
        assert torch.equal(u.codes, t.codes) and torch.equal(u.scales, t.scales) \
            if isinstance(t, QuantizedTensor) else torch.equal(u, t)


def test_loop_aware_requantises_only_the_crawler_and_restores_weights():
    model = small_model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    calib = random_tokens(6 * 17, seed=7).view(6, 17)
    plain = quantize_model(model, calib, plan=all_quantised("default"), log=None)
    lines = []
    aware = quantize_model(model, calib, plan=all_quantised("default"), loop_aware=True, log=lines.append)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert any("phase 2" in line for line in lines)
    differs = {n for n, t in plain.artifact.tensors.items()
               if isinstance(t, QuantizedTensor) and not torch.equal(t.codes, aware.artifact.tensors[n].codes)}
    assert differs and all(n.startswith("crawler_blocks.") for n in differs)
    assert list(aware.artifact.tensors) == list(plain.artifact.tensors)


def test_one_calibration_collects_the_hessians_once_for_every_plan(monkeypatch):
    """Plans and the tied-embedding upgrade share one Calibration: one collection in all, and every
    artifact is bit for bit the one the plan gives with its own freshly collected Hessians."""
    import crawler.quant.hessians as hessians_mod
    model = small_model()
    calib = random_tokens(4 * 17, seed=11).view(4, 17)
    fresh = {name: build_artifact(model, calib, plan=all_quantised(name), log=None)[0] for name in ("seed", "default")}
    calls = []
    original = hessians_mod.collect_hessians
    monkeypatch.setattr(hessians_mod, "collect_hessians", lambda *a, **k: calls.append(1) or original(*a, **k))
    shared = Calibration(model, calib)
    for name in ("rtn_seed_floor", "seed", "default"):
        artifact, summary = build_artifact(model, shared, plan=all_quantised(name), log=None)
        assert summary["hessians_reused"] == (name == "default")
        if name in fresh:
            for n, t in artifact.tensors.items():
                u = fresh[name].tensors[n]
                assert torch.equal(t.codes, u.codes) and torch.equal(t.scales, u.scales) \
                    if isinstance(t, QuantizedTensor) else torch.equal(t, u)
    assert len(calls) == 1 and summary["tok_emb_scheme"] == "int8 gptq k=20"
    with pytest.raises(ValueError, match="another model"):
        build_artifact(small_model(seed=1), shared, plan=all_quantised("default"), log=None)


def test_plans_need_calibration_only_for_gptq():
    model = small_model()
    with pytest.raises(ValueError, match="calibration tokens"):
        quantize_model(model, None, plan=all_quantised("default"), log=None)
    result = quantize_model(model, None, plan=all_quantised("rtn_seed_floor"), log=None)
    assert result.hessian_seconds == 0 and all(r["scheme"] == "int6_rtn" for r in result.stats)


# -- pruning ---------------------------------------------------------------------------------------------------

def test_pruning_reaches_the_target_and_zeroes_only_pm1_codes():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(96, 256, generator=g) * torch.logspace(-3, -1, 96)[:, None]
    art = quantize_state_dict({"flat_blocks.0.mlp.fc.weight": w, "smear.gate": torch.randn(8, generator=g)},
                              CrawlerConfig.preset("tiny", **SMALL), plan=all_quantised("default")
                              .with_role("block", RoleSpec("rtn")), log=None).artifact
    full = len(encode_artifact(art))
    assert prune_to_fit(art, full, log=None).pruned == 0
    result = prune_to_fit(art, full - 400, code_bytes=100, log=None)
    assert len(result.blob) + 100 <= full - 400 and result.pruned > 0
    assert decode_artifact(result.blob).tensors["flat_blocks.0.mlp.fc.weight"].codes.equal(
        result.artifact.tensors["flat_blocks.0.mlp.fc.weight"].codes)
    old, new = (a.tensors["flat_blocks.0.mlp.fc.weight"] for a in (art, result.artifact))
    changed = old.codes != new.codes
    assert int(changed.sum()) == result.pruned
    assert bool((old.codes[changed].abs() == 1).all()) and not new.codes[changed].any()
    # smallest row scales first: every pruned row's s² <= every s² of a row that still has ±1 codes
    s2 = old.scales.float() ** 2
    pruned_rows = changed.any(1)
    kept_rows = (new.codes.abs() == 1).any(1)
    assert float(s2[pruned_rows].max()) <= float(s2[kept_rows].min())
    with pytest.raises(ValueError, match="cannot fit"):
        prune_to_fit(art, 100, log=None)


# -- PR #1579 shape, round trip, CLI -----------------------------------------------------------------------

def test_pr1579_shaped_random_state_dict_quantises(capsys):
    """Random values in PR #1579's shapes (no trained weights are available here), round to nearest for
    speed; encoded at brotli quality 1 to keep the test fast (the real, quality-11 size is smaller)."""
    g = torch.Generator().manual_seed(9)
    state = {n: (torch.randn(s, generator=g) * (0.03 if len(s) == 2 else 1.0)) for n, s in
             pr1579_state_dict_shapes().items()}
    plan = PLANS["default"].with_role("block", RoleSpec("rtn")).with_role("tok_emb", RoleSpec("rtn"))
    result = quantize_state_dict(state, CrawlerConfig.preset("pr1579"), plan=plan, log=None)
    art = result.artifact
    quantised = [n for n, t in art.tensors.items() if isinstance(t, QuantizedTensor)]
    # everything but ve.proj (47,104, fp16) and the control tensors (23,636 elements, fp32)
    assert len(quantised) == 34 and sum(art.tensors[n].codes.numel() for n in quantised) == 38_346_836 - 47_104 - 23_636
    assert max(r["rel_error"] for r in result.stats) < 0.016     # uniform rounding: (12.85/31)²/12 = 0.0143
    blob = encode_artifact(art, quality=1)
    back = decode_artifact(blob)
    assert torch.equal(back.tensors["tok_emb.weight"].codes, art.tensors["tok_emb.weight"].codes)
    with capsys.disabled():
        print(f"\npr1579-shaped random state dict: {len(blob):,} B at brotli quality 1")


def test_quantize_and_evaluate_round_trip(data_dir, tmp_path):
    model = small_model()
    luts = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    val = random_tokens(200, seed=4)
    out = tmp_path / "model.crawl"
    summary = quantize_and_evaluate(model, data_dir, luts, val, plan=all_quantised("default"), out_path=out,
                                    n_seqs=4, log=None)
    assert out.stat().st_size == summary["artifact_bytes"] and summary["fits"] and summary["pruned"] == 0
    assert summary["total_bytes"] == summary["artifact_bytes"] + summary["code_bytes"]
    assert summary["quant_gap_bpb"] == pytest.approx(summary["quant_val_bpb"] - summary["pre_quant_val_bpb"])
    assert 0 < abs(summary["quant_gap_bpb"]) < 0.2
    assert summary["quantize_total_seconds"] >= summary["hessian_seconds"] > 0
    assert load_artifact(out).schemes()["crawler_blocks.1.attn.c_v.weight"] == "int6_gptq"


def test_tied_embedding_upgrade_only_where_the_budget_allows(data_dir):
    model = small_model()
    calib = calibration_tokens(data_dir, n_seqs=4, seq_len=16, seed=0)
    plan = all_quantised("default")
    artifact, roomy = build_artifact(model, calib, plan=plan, log=None)
    assert roomy["tok_emb_scheme"] == "int8 gptq k=20" and artifact.tensors["tok_emb.weight"].bits == 8
    # With room for the int6 artifact only, the embedding stays int6 and nothing is pruned.
    base = build_artifact(model, calib, plan=dataclasses.replace(plan, tok_emb_upgrades=()), log=None)[1]
    tight = build_artifact(model, calib, plan=plan, target_bytes=base["total_bytes"], log=None)[1]
    assert tight["tok_emb_scheme"] == "int6 gptq k=12.85" and tight["pruned"] == 0
    assert tight["artifact_bytes"] == base["artifact_bytes"] < roomy["artifact_bytes"]
    # A scheme given explicitly for the embedding is the one used.
    assert plan.with_role("tok_emb", RoleSpec("gptq", 7, 15.0)).tok_emb_upgrades == ()


def test_cli_quantises_a_trainer_checkpoint_and_a_plain_state_dict(data_dir, tmp_path, capsys):
    model = small_model()
    ckpt = tmp_path / "ckpt.pt"
    # the trainer's final_model.pt layout
    torch.save({"format": "crawler-model", "model_config": model.config.to_json(), "model": model.state_dict()}, ckpt)
    out = tmp_path / "a.crawl"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--data-dir", str(data_dir), "--n-seqs", "4",
                 "--small-numel", "0", "--device", "cpu", "--role", "tok_emb=gptq:8:20"]) == 0
    art = load_artifact(out)
    assert art.schemes()["flat_blocks.0.attn.c_q.weight"] == "int6_gptq"
    assert art.schemes()["tok_emb.weight"] == "int8_gptq"
    assert '"fits": true' in capsys.readouterr().out

    with torch.device("meta"):
        shapes = CrawlerGPT(CrawlerConfig.preset("tiny"), ops="reference").state_dict()
    plain = tmp_path / "plain.pt"                    # as torch.compile names them
    torch.save({"_orig_mod." + n: torch.randn(t.shape) * 0.05 for n, t in shapes.items()}, plain)
    capsys.readouterr()
    assert main(["--checkpoint", str(plain), "--out", str(out)]) == 2          # one line, no traceback
    assert "pass --preset" in capsys.readouterr().err
    assert main(["--checkpoint", str(plain), "--out", str(out), "--preset", "tiny", "--plan", "rtn_seed_floor",
                 "--device", "cpu"]) == 0
    assert load_artifact(out).config == CrawlerConfig.preset("tiny").to_dict()


@pytest.mark.gpu
def test_gpu_batched_gptq_matches_the_per_matrix_reference():
    """On CUDA the driver batches same-shape matrices through kernels.gptq_quantize_batched; each result
    must be as good (GPTQ proxy loss) as the reference run on that matrix alone with the same Hessian."""
    model = small_model().cuda()
    calib = random_tokens(8 * 17, seed=10).view(8, 17)
    result = quantize_model(model, calib, plan=all_quantised("default"), log=None)
    H = collect_hessians(model, calib)
    state = model.state_dict()
    for name, h in H.items():
        q = result.artifact.tensors[name]
        if q.method != "gptq":
            continue
        ref_codes, ref_scales = kernels.reference.gptq_quantize(state[name].float(), h)
        ours = kernels.reference.quantization_proxy_loss(state[name], h, q.codes.cuda(), q.scales.cuda())
        ref = kernels.reference.quantization_proxy_loss(state[name], h, ref_codes, ref_scales)
        assert torch.equal(q.scales.cuda(), ref_scales), name
        assert float(ours) <= 1.02 * float(ref) + 1e-12, name
