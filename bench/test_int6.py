"""Int6: kernels.int6_linear on packed 6-bit weights vs cuBLAS bf16 F.linear on the dequantised weight,
and int6 vs bf16 decoding tok/s.

Layer shapes of the pr1579 preset (attention q/out, k/v, MLP fc and proj, the tied embedding as an int6
LM head) and the squares 4096² and 8192², for M (rows of x) = 1, 8, 64, 2048; bf16 activations, fp16
per-row scales, random codes in [-31, 31]. Both ops run on the same inputs; do_bench flushes the L2
cache before every call, so the weights come from HBM. Weight GB/s = bytes of the weight each op reads
(0.75 B per int6 code + the row scales; 2 B per bf16 element) / time; the ideal speed-up at M = 1 is
2 / 0.75 = 2.67×.
Decoding: greedy, batch 1, 128 new tokens after a 128-token prompt, of the pr1579 model with random
weights quantised round-to-nearest: the int6 model (crawler.inference, packed weights) vs the same weights
dequantised into a bf16 model, both through a crawler.decoding.Decoder, i.e. both with the one-token step
as a CUDA graph on a static KV cache (captured in the untimed first call, replayed for every token after
the first two; flash-decoding attention). At this model size an eager step is bound by kernel launches,
not by weight bytes, so only graphed steps can show what the int6 weights save. Time per generation
(prompt included, ms), tok/s, and the steps replayed from the graph.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench.harness import first_call, rel_err
from crawler import CrawlerConfig
from kernels import int6_linear, pack_int6

ROWS = (1, 8, 64, 2048)
SQUARES = (4096, 8192)
LAYERS = ("attn.c_q / attn.proj", "attn.c_k / attn.c_v", "mlp.fc", "mlp.proj", "lm_head (tok_emb)",
          *(f"square {n}" for n in SQUARES))
SMOKE_MAX_ROWS = 8          # the interpreter's budget in a smoke run (squares are left out there too)
TOLERANCE = 1e-2


def layer_shape(preset: str, layer: str) -> tuple[int, int]:
    """(K = in features, N = out features) of one int6 matrix of the preset, or a square."""
    if layer.startswith("square"):
        n = int(layer.split()[1])
        return n, n
    c = CrawlerConfig.preset(preset)
    d = c.model_dim
    return {"attn.c_q / attn.proj": (d, d), "attn.c_k / attn.c_v": (d, c.kv_dim), "mlp.fc": (d, c.mlp_hidden),
            "mlp.proj": (c.mlp_hidden, d), "lm_head (tok_emb)": (d, c.vocab_size)}[layer]


@pytest.fixture(scope="module")
def int6_weights(bench):
    """weights(layer) -> (packed uint8 (N, 3K/4), fp16 scales (N,), the dequantised weight in the
    benchmark dtype (N, K)), cached per layer."""

    @functools.cache
    def weights(layer: str):
        K, N = layer_shape(bench.shapes.preset, layer)
        g = bench.generator(K * 100_003 + N)
        codes = torch.randint(-31, 32, (N, K), dtype=torch.int8, device=bench.device, generator=g)
        scales = (torch.rand(N, device=bench.device, generator=g) * 0.01 + 1e-3).half()
        return pack_int6(codes), scales, (codes.float() * scales.float()[:, None]).to(bench.dtype)

    yield weights
    weights.cache_clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("layer, M, impl", [(layer, M, impl) for layer in LAYERS for M in ROWS
                                            for impl in ("int6", "bf16")])
def test_int6_linear(benchmark, bench, int6_weights, layer, M, impl):
    if bench.smoke and (M > SMOKE_MAX_ROWS or layer.startswith("square")):
        pytest.skip("smoke run: beyond the interpreter's size budget")
    K, N = layer_shape(bench.shapes.preset, layer)
    packed, scales, w_dense = int6_weights(layer)
    x = bench.randn(M, K, generator=bench.generator(M))
    ours = lambda: int6_linear(x, packed, scales)
    cublas = lambda: F.linear(x, w_dense)
    fn, label, role = ((ours, "ours: int6_linear (packed int6)", "ours") if impl == "int6" else
                       (cublas, "cuBLAS bf16 F.linear (dequantised weight)", "baseline"))
    out = first_call(fn, impl=label, role=role)
    err = rel_err(out, cublas() if impl == "int6" else ours())
    weight_bytes = packed.numel() + scales.numel() * scales.element_size() if impl == "int6" else 2 * N * K
    bench.run(benchmark, fn, group=f"{layer} K={K} N={N} M={M}", impl=label, role=role, flops=2.0 * M * N * K,
              bytes_moved=weight_bytes, memory=False, metrics={"rel_err_int6_vs_bf16": err})
    assert err < TOLERANCE, f"{layer} M={M}: int6_linear and the bf16 F.linear disagree by {err:.2e}"


@pytest.fixture(scope="module")
def decode_models(bench):
    """(int6 model, bf16 model) with the same random, round-to-nearest-quantised weights of the preset."""
    from crawler import CrawlerGPT
    from crawler.artifact import model_from_artifact
    from crawler.inference import load_int6_model
    from crawler.quant import quantize_state_dict
    torch.manual_seed(0)
    config = CrawlerConfig.preset(bench.shapes.preset)
    state = CrawlerGPT(config, ops="reference").state_dict()
    for name, t in state.items():       # zero-init projections carry no signal: give every matrix values
        if t.dim() == 2 and name.endswith("proj.weight"):
            t.normal_(0, 0.02)
    artifact = quantize_state_dict(state, config, plan="rtn_seed_floor", log=None).artifact
    int6 = load_int6_model(artifact, device=bench.device, ops="auto")
    dense = model_from_artifact(artifact, device=bench.device, ops="auto").to(bench.dtype)
    yield {"int6": int6, "bf16": dense}
    torch.cuda.empty_cache()


@pytest.mark.cost_s(60)
@pytest.mark.parametrize("impl", ["int6", "bf16"])
def test_decode(benchmark, bench, decode_models, impl):
    from crawler.decoding import Decoder
    s = bench.shapes
    model = decode_models[impl]
    prompt = torch.randint(0, model.config.vocab_size, (1, s.decode_prompt), device=bench.device,
                           generator=bench.generator(2))
    label, role = (("ours: int6 model (packed weights), CUDA graph", "ours") if impl == "int6" else
                   ("bf16 model (dequantised weights), CUDA graph", "baseline"))
    decoder = Decoder(model, 1, s.decode_prompt + s.decode_new_tokens)     # a CUDA graph wherever one runs
    assert decoder.cuda_graph == (bench.device.type == "cuda")
    fn = lambda: decoder.generate(prompt, s.decode_new_tokens, temperature=0.0)
    first_call(fn, impl=label, role=role)       # warm-up step and capture: outside the timings
    bench.run(benchmark, fn, group=f"{s.preset} decode, batch 1, {s.decode_new_tokens} new tokens", impl=label,
              role=role, memory=False, min_runs=3, rates={"tok/s": s.decode_new_tokens},
              metrics={"graph_replays": decoder.replays})
    if decoder.cuda_graph:
        assert decoder.replays == s.decode_new_tokens - 1       # every step: captured in the first call
