"""Int6 inference (docs/math.md §5): the model built from an artifact computes on codes only, matches the
dequantised CrawlerGPT, decodes incrementally with a KV cache exactly like full recomputation (also the
device-side step a CUDA graph replays, and, on a GPU, graphed decoding equals eager), fails clearly on
bad artifacts and on lengths the model or memory cannot hold; the generate CLI; the Triton int6_linear path
under the interpreter."""
import dataclasses

import pytest
import torch
from conftest import SMALL_CRAWLER as SMALL
from conftest import filled_crawler, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import crawler.decoding
import kernels
from crawler.artifact import Artifact, ArtifactError, QuantizedTensor, model_from_artifact, save_artifact
from crawler.config import CrawlerConfig
from crawler.decoding import Decoder, KVCache, generate, sample_next
from crawler.evaluate import val_bpb
from crawler.generate import main as generate_main
from crawler.inference import Int6MLP, Int8Linear, QuantEmbedding, load_int6_model, quantized_linear
from crawler.model import CrawlerGPT
from crawler.quant import PLANS, RoleSpec, quantize_state_dict
from kernels.modules import Int6Linear

RTN = RoleSpec("rtn")
# Round to nearest (no Hessians: fast), small-tensor passthrough off so every matrix is quantised.
PLAN_ALL_INT6 = dataclasses.replace(PLANS["rtn_seed_floor"], name="all_int6", block=RTN, tok_emb=RTN,
                                    bigram_table=RTN, bigram_proj=RTN, ve_table=RTN, ve_proj=RTN, small_numel=0)
PLAN_INT8_EMB = dataclasses.replace(PLAN_ALL_INT6, name="int8_tok_emb", tok_emb=RoleSpec("rtn", bits=8, k=20.0))
PLAN_PASSTHROUGH = dataclasses.replace(PLAN_ALL_INT6, name="small_fp16", small_numel=1024)   # small: fp16


def random_model(seed=0, **overrides) -> CrawlerGPT:
    """A small random crawler standing in for a trained one, with logits large enough that the softcap
    matters."""
    model = filled_crawler(seed, **overrides)
    with torch.no_grad():
        model.tok_emb.weight.mul_(400)      # logits of a few units up to ~30
    return model


def make_artifact(plan=PLAN_ALL_INT6, seed=0, **overrides) -> Artifact:
    model = random_model(seed, **overrides)
    return quantize_state_dict(model.state_dict(), model.config, plan=plan, log=None).artifact


def random_ids(shape, vocab=SMALL["vocab_size"], seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run many small ops: on a shared 2-core machine one intra-op thread is ~10x
    faster than two (thread hand-offs dominate). Restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def artifact():
    return make_artifact()


# -- the int6 model equals the dequantised one ----------------------------------------------------------

@pytest.mark.parametrize("plan", [PLAN_ALL_INT6, PLAN_INT8_EMB, PLAN_PASSTHROUGH], ids=lambda p: p.name)
def test_int6_model_matches_the_dequantised_model(plan):
    art = make_artifact(plan)
    deq = model_from_artifact(art, ops="reference")
    int6 = load_int6_model(art, ops="reference")
    ids, targets = random_ids((2, 24)), random_ids((2, 24), seed=2)
    with torch.no_grad():
        loss_deq, loss_int6 = deq(ids, targets), int6(ids, targets)
        assert abs(loss_int6.item() - loss_deq.item()) <= 1e-4 * loss_deq.item()
        assert rel_err(int6.forward_logits(ids), deq.forward_logits(ids)) < 1e-5
    # bits per byte through crawler.evaluate (the path `python -m crawler.evaluate` takes)
    tokens = random_ids((16 * 6 + 1,), seed=3)
    g = torch.Generator().manual_seed(4)
    luts = (torch.randint(1, 4, (64,), generator=g, dtype=torch.int16), torch.rand(64, generator=g) < 0.5,
            torch.rand(64, generator=g) < 0.1)
    (l_deq, b_deq), (l_int6, b_int6) = (val_bpb(m, tokens, luts, seq_len=16, batch_seqs=4) for m in (deq, int6))
    assert abs(b_int6 - b_deq) <= 1e-4 * b_deq and abs(l_int6 - l_deq) <= 1e-4 * l_deq
    # every quantised tensor became a code-holding module: kernels' Int6Linear, or int8 codes above 6 bits
    for name, t in art.tensors.items():
        if isinstance(t, QuantizedTensor):
            module = int6.get_submodule(name.rsplit(".", 1)[0])
            matrix = module.matrix if isinstance(module, QuantEmbedding) else module
            assert type(matrix) is (Int6Linear if t.bits <= 6 else Int8Linear), name
    assert isinstance(int6.tok_emb, QuantEmbedding) and isinstance(int6.flat_blocks[0].mlp, Int6MLP)


def test_no_float_copy_of_a_quantised_matrix_is_ever_made(artifact, tmp_path):
    path = tmp_path / "a.art"
    save_artifact(artifact, path)
    shapes = {tuple(t.codes.shape) for t in artifact.tensors.values() if isinstance(t, QuantizedTensor)}
    shapes |= {s[::-1] for s in shapes}

    class FloatMatrices(TorchDispatchMode):
        """Records every real (non-meta) floating tensor an op produces with a quantised matrix's shape."""
        def __init__(self):
            super().__init__()
            self.hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.hits += [(str(func), tuple(t.shape)) for t in tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta
                          and t.dim() >= 2 and tuple(t.shape[-2:]) in shapes]
            return out

    with FloatMatrices() as watch:
        model = load_int6_model(path, ops="reference")
    assert watch.hits == []
    with FloatMatrices() as control:          # the dequantised load does make them: the check can fail
        model_from_artifact(artifact, ops="reference")
    assert len(control.hits) >= len(shapes) // 2

    quantised = {n.rsplit(".", 1)[0] for n, t in artifact.tensors.items() if isinstance(t, QuantizedTensor)}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not (t.is_floating_point() and t.dim() >= 2 and tuple(t.shape[-2:]) in shapes), name
        if name.rsplit(".", 1)[0].removesuffix(".matrix") in quantised:
            assert (t.dtype, t.dim()) in ((torch.uint8, 2), (torch.float16, 1)), (name, t.dtype)
    float_bytes = sum(t.codes.numel() * 4 for t in artifact.tensors.values() if isinstance(t, QuantizedTensor))
    held = sum(b.numel() * b.element_size() for n, b in model.named_buffers())
    assert held < 0.25 * float_bytes      # 0.75 B per weight + an fp16 scale per row, vs 4 B per weight


# -- KV-cache decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("xsa", ["all", "pr1579"])
def test_kv_cache_logits_equal_full_recomputation(xsa):
    art = make_artifact(xsa=xsa)
    for model in (load_int6_model(art, ops="reference"), model_from_artifact(art, ops="reference")):
        ids = random_ids((2, 20), seed=5)
        with torch.no_grad():
            full = model.forward_logits(ids)
            cache = KVCache(model.config, ids.shape[1])
            steps, start = [], 0
            for n in (1, 4, 1, 1, 6, 7):          # a 1-token start, chunks and single tokens
                steps.append(model.forward_logits(ids[:, start:start + n], cache))
                start += n
        assert cache.length == ids.shape[1]
        assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_greedy_generation_equals_full_recomputation(artifact):
    model = load_int6_model(artifact, ops="reference")
    prompt = random_ids((2, 5), seed=6)
    out = generate(model, prompt, 12, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat((ids, model.forward_logits(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert out.shape == (2, 17) and torch.equal(out, ids)
    assert torch.equal(generate(model, prompt[0], 12, temperature=0), ids[0])            # 1-D prompt


def test_kv_cache_refuses_overflow_and_batch_change(artifact):
    model = load_int6_model(artifact, ops="reference")
    cache = KVCache(model.config, 6)
    with torch.no_grad():
        model.forward_hidden(random_ids((2, 4)), cache)
        with pytest.raises(ValueError, match="overflow the cache's max_len 6"):
            model.forward_hidden(random_ids((2, 3)), cache)
        with pytest.raises(ValueError, match="batch 1 differs from the cache's 2"):
            model.forward_hidden(random_ids((1, 1)), cache)


def test_device_side_decode_steps_give_the_reference_tokens(artifact, monkeypatch):
    """The step a CUDA graph captures, run eagerly (under the interpreter here): a Decoder of a model on
    Triton ops keeps its cache static and, after two tokens, steps on the device-side position, attending
    over the whole buffers with kernels.attention_decode and the lengths read on the device. Its greedy
    tokens are the reference model's, and stay so when the decoder is reused with another prompt. Two
    consecutive device steps dispatch the same ops on the same shapes and host-side values, with no read
    of a tensor to the host: a graph captured from one replays as the next."""
    calls, real = [], kernels.attention_decode

    def spy(q, k, v, **kw):
        calls.append((k.shape[1], kw.get("cache_seqlens") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention_decode", spy)
    shallow = make_artifact(num_flat_blocks=2, num_crawler_blocks=1, crawler_loops=1)   # 3 positions (time)
    ref = load_int6_model(shallow, ops="reference")
    tri = load_int6_model(shallow, ops="reference")
    tri.ops = "triton"           # attention on Triton; the int6 matmuls stay on the reference (time)
    decoder = Decoder(tri, 2, 7, cuda_graph=False)
    assert decoder.cache.on_device and not decoder.cuda_graph
    for prompt, n in ((random_ids((2, 2), seed=12), 4), (random_ids((2, 4), seed=13), 2)):
        assert torch.equal(decoder.generate(prompt, n, temperature=0), generate(ref, prompt, n, temperature=0))
    assert calls == [(7, True)] * (3 * (3 + 1))       # every step of both generations, on the whole buffer

    class Dispatched(TorchDispatchMode):
        """Every op a step dispatches, with its tensors' shapes and strides and its other arguments."""
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((str(func), [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                                         for a in tree_leaves((args, kwargs))]))
            return func(*args, **(kwargs or {}))

    steps = []
    with torch.no_grad():
        for new in random_ids((2, 2), seed=14).T:        # two more tokens after the second generation's 5
            with Dispatched() as trace:
                decoder._forward(new[:, None])
            steps.append(trace.ops)
    assert steps[0] == steps[1] and "crawler_kernels.attention_decode.default" in {op for op, _ in steps[0]}
    assert not any("_local_scalar_dense" in op for op, _ in steps[0])


def test_sampling_is_seeded_and_respects_top_k_eos_and_vocab_limit(artifact):
    model = load_int6_model(artifact, ops="reference")
    prompt = random_ids((3, 4), seed=7)
    a = generate(model, prompt, 10, temperature=1.0, seed=11)
    assert torch.equal(a, generate(model, prompt, 10, temperature=1.0, seed=11))
    assert not torch.equal(a, generate(model, prompt, 10, temperature=1.0, seed=12))
    assert torch.equal(generate(model, prompt, 10, temperature=2.0, top_k=1, seed=3),
                       generate(model, prompt, 10, temperature=0))
    limited = generate(model, prompt, 10, temperature=5.0, seed=1, vocab_limit=8)
    assert int(limited[:, 4:].max()) < 8 and torch.equal(limited[:, :4], prompt)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(200, 1)
    draws = sample_next(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2}                           # top_k=2 keeps exactly ids 1 and 2
    # eos: the first greedy token is made the eos id, so every sequence stops after one new token
    first = generate(model, prompt, 1, temperature=0)[:, -1]
    eos = int(first[0])
    out = generate(model, prompt[:1], 10, temperature=0, eos_id=eos)
    assert out.shape == (1, 5) and int(out[0, -1]) == eos
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 2)
    # a Decoder serves several generations of its batch and length, each as a fresh generate would
    decoder = Decoder(model, 3, 14)
    assert not decoder.cuda_graph and not decoder.cache.on_device          # reference ops: eager over views
    assert torch.equal(decoder.generate(prompt, 10, temperature=1.0, seed=11), a)
    assert torch.equal(decoder.generate(prompt[:, :2], 3, temperature=0), generate(model, prompt[:, :2], 3,
                                                                                   temperature=0))
    with pytest.raises(ValueError, match="batch 1 differs from the decoder's 3"):
        decoder.generate(prompt[:1], 2)
    with pytest.raises(ValueError, match="exceed the decoder's max_len 14"):
        decoder.generate(prompt, 11)
    with pytest.raises(ValueError, match="cuda_graph: a CUDA graph needs a model on a CUDA device"):
        Decoder(model, 3, 14, cuda_graph=True)


# -- bad artifacts --------------------------------------------------------------------------------

def test_corrupt_or_mismatched_artifacts_fail_clearly(artifact, tmp_path):
    path = tmp_path / "a.art"
    save_artifact(artifact, path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "corrupt.art"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="corrupt.art.*corrupt: SHA-256"):
        load_int6_model(bad)
    short = tmp_path / "short.art"
    short.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_int6_model(short)
    with pytest.raises(FileNotFoundError, match="missing.art"):
        load_int6_model(tmp_path / "missing.art")
    # decodable, but the tensors do not fit the config's model
    wrong_shape = dict(artifact.tensors)
    q = wrong_shape["flat_blocks.0.attn.c_q.weight"]
    wrong_shape["flat_blocks.0.attn.c_q.weight"] = QuantizedTensor(q.codes[:, :16].contiguous(), q.scales, 6, "rtn")
    with pytest.raises(ValueError, match=r"flat_blocks\.0\.attn\.c_q\.weight: quantised tensor int6 \(32, 16\)"):
        load_int6_model(Artifact(artifact.config, wrong_shape))
    extra = {**artifact.tensors, "lm_head.weight": q}
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_int6_model(Artifact(artifact.config, extra))
    missing = {n: t for n, t in artifact.tensors.items() if n != "smear.gate"}
    with pytest.raises(ValueError, match="missing.*smear.gate"):
        load_int6_model(Artifact(artifact.config, missing))
    control_quantised = {**artifact.tensors, "attn_scales": q}
    with pytest.raises(ValueError, match="attn_scales: only Linear and embedding weights"):
        load_int6_model(Artifact(artifact.config, control_quantised))


# -- the code-holding modules -------------------------------------------------------------------------

@pytest.mark.parametrize("bits,cols", [(6, 40), (5, 40), (8, 40), (6, 42)])
def test_quant_matrix_linear_and_gather(bits, cols):
    """Packed int6 for <= 6 bits and K % 4 == 0; int8 codes otherwise (8-bit plans, odd K). Both equal
    the dequantised matrix, the int8 one also across row tiles (300 rows > 256)."""
    g = torch.Generator().manual_seed(bits + cols)
    R = 2 ** (bits - 1) - 1
    q = QuantizedTensor(torch.randint(-R, R + 1, (300, cols), generator=g, dtype=torch.int8),
                        (torch.rand(300, generator=g) * 0.01 + 1e-3).half(), bits, "rtn")
    m = quantized_linear(cols, 300, bits, "reference")
    m.load_state_dict(m.codes_state(q.codes, q.scales))
    assert type(m) is (Int6Linear if bits <= 6 and cols % 4 == 0 else Int8Linear)
    w = q.dequantize(torch.float64)
    x = torch.randn(3, 5, cols, generator=g)
    assert rel_err(m(x), x.double() @ w.T) < 1e-6
    idx = torch.tensor([[0, 299, 17], [256, 3, 3]])
    assert torch.equal(m.weight_rows(idx), w.float()[idx])
    emb = QuantEmbedding(300, cols, bits, "reference", torch.bfloat16)
    emb.load_state_dict(emb.codes_state(q.codes, q.scales))
    assert torch.equal(emb(idx), w.bfloat16()[idx]) and rel_err(emb.linear(x), x.double() @ w.T) < 1e-6


def test_triton_int6_linear_path_under_the_interpreter(artifact):
    """The int6 model with its matmuls on kernels.int6_linear (Triton; the interpreter on CPU) gives the
    reference int6 model's logits."""
    if not kernels.utils.interpreting() and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = load_int6_model(artifact, device=device, ops="reference")
    tri = load_int6_model(artifact, device=device, ops="reference")
    for m in tri.modules():
        if isinstance(m, Int6Linear):
            m.ops = "triton"
    ids = random_ids((1, 8), seed=8).to(device)
    with torch.no_grad():
        assert rel_err(tri.forward_logits(ids), ref.forward_logits(ids)) < 1e-5
        # one decode step (M = 1 rows: the GEMV path)
        cache = KVCache(tri.config, 9)
        tri.forward_hidden(ids, cache)
        step = tri.forward_logits(ids[:, :1], cache)
        full = ref.forward_logits(torch.cat((ids, ids[:, :1]), dim=1))[:, -1:]
    assert rel_err(step, full) < 1e-5


# -- the generate CLI ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A small artifact with a 400-piece vocab and a tokenizer trained on 20 built-in documents."""
    from crawler.corpus import builtin_documents
    from crawler.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("cli")
    train_tokenizer(builtin_documents(max_documents=20), d / "tok.model", 400)
    save_artifact(make_artifact(vocab_size=400), d / "model.art")
    return d


def test_generate_cli(cli_files, capsys):
    args = ["--artifact", str(cli_files / "model.art"), "--tokenizer", str(cli_files / "tok.model"),
            "--prompt", "Return the", "--max-new-tokens", "8", "--ops", "reference", "--no-stop"]
    outputs = []
    for extra in (["--seed", "3"], ["--seed", "3"], ["--temperature", "0"]):
        assert generate_main(args + extra) == 0
        captured = capsys.readouterr()
        assert captured.out.startswith("Return the") and "generated 8 tokens" in captured.err
        outputs.append(captured.out)
    assert outputs[0] == outputs[1]                  # seeded
    assert generate_main(["--artifact", str(cli_files / "nope.art"), "--tokenizer",
                          str(cli_files / "tok.model")]) == 2
    assert "nope.art" in capsys.readouterr().err
    # a tokenizer larger than the model's vocab is refused with the reason
    small = cli_files / "small.art"
    save_artifact(make_artifact(), small)
    assert generate_main(["--artifact", str(small), "--tokenizer", str(cli_files / "tok.model")]) == 2
    assert "tokenizer has 400 pieces" in capsys.readouterr().err


def test_generate_refuses_a_length_the_model_or_memory_cannot_hold(cli_files, capsys, monkeypatch):
    """--max-new-tokens beyond the model's positions, or a KV cache beyond the device's memory: one
    `error:` line and exit status 2, decided before any cache is allocated (10**12 tokens would be ~1 PB)."""
    args = ["--artifact", str(cli_files / "model.art"), "--tokenizer", str(cli_files / "tok.model"),
            "--prompt", "Return the", "--ops", "reference", "--max-new-tokens"]

    def error_line(argv):
        assert generate_main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    line = error_line(args + [str(10 ** 12)])
    assert line.startswith("python -m crawler.generate: error: max_new_tokens 1,000,000,000,000 after a prompt "
                           "of") and "more than the 16,777,216" in line, line
    monkeypatch.setattr(crawler.decoding, "available_memory", lambda device: 1 << 20)   # 1 MiB left
    line = error_line(args + ["5000"])
    assert "the KV cache of 1 x 5,00" in line and line.endswith("GiB, cpu has 0.00 GiB available; ask for "
                                                                 "fewer tokens"), line
    assert generate_main(args + ["4"]) == 0                                     # a short one still fits
    with pytest.raises(ValueError, match="max_new_tokens 10,000 after a prompt of 1 tokens: the KV cache"):
        generate(load_int6_model(cli_files / "model.art", ops="reference"), [1], 10_000)


# -- GPU ------------------------------------------------------------------------------------------------

def random_pr1579_artifact() -> Artifact:
    """The pr1579 preset's tensors with random codes / values under the default plan's schemes (no
    quantisation run: only shapes, dtypes and the memory they take matter here)."""
    config = CrawlerConfig.preset("pr1579")
    with torch.device("meta"):
        state = CrawlerGPT(config, ops="reference").state_dict()
    g = torch.Generator().manual_seed(0)
    from crawler.quant import plan_schemes
    tensors = {}
    for name, scheme in plan_schemes(state, "default").items():
        shape = state[name].shape
        if scheme.startswith("int"):
            tensors[name] = QuantizedTensor(torch.randint(-31, 32, shape, generator=g, dtype=torch.int8),
                                            (torch.rand(shape[0], generator=g) * 2e-3 + 1e-3).half(), 6, "gptq")
        else:
            dtype = torch.float32 if scheme == "fp32" else torch.float16
            tensors[name] = (torch.randn(shape, generator=g) * 0.1 + (1.0 if name.endswith("scales") else 0)).to(dtype)
    return Artifact(config.to_dict(), tensors)


@pytest.mark.gpu
def test_gpu_int6_model_memory_and_outputs_at_pr1579():
    art = random_pr1579_artifact()
    float_bytes = sum(t.codes.numel() * 4 for t in art.tensors.values() if isinstance(t, QuantizedTensor))
    largest = max(t.codes.numel() * 4 for t in art.tensors.values() if isinstance(t, QuantizedTensor))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_int6_model(art, device="cuda", ops="reference")
    for m in model.modules():           # the Triton int6 matmul; the rest of the model on reference ops
        if isinstance(m, Int6Linear):
            m.ops = "triton"
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated() - base
    assert torch.cuda.max_memory_allocated() - base < 1.2 * loaded < 0.3 * float_bytes
    ids = random_ids((1, 64), vocab=8192).cuda()
    with torch.no_grad():
        # warm-up: the int6_linear autotuner's do_bench allocates its own L2-flush buffer once per shape
        generate(model, ids, 4, temperature=0)
        model.forward_logits(ids)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = generate(model, ids, 4, temperature=0)
        logits = model.forward_logits(ids)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base - loaded < largest / 2    # no dequantised matrix
    ref = load_int6_model(art, device="cuda", ops="reference")
    with torch.no_grad():
        assert rel_err(logits, ref.forward_logits(ids)) < 2e-2
    assert out.shape == (1, 68)


@pytest.mark.gpu
def test_gpu_int6_model_under_autocast_matches_the_dequantised_model(artifact):
    deq = model_from_artifact(artifact, device="cuda", ops="reference")
    int6 = load_int6_model(artifact, device="cuda", ops="reference")
    for m in int6.modules():
        if isinstance(m, Int6Linear):
            m.ops = "triton"
    ids, targets = random_ids((4, 32)).cuda(), random_ids((4, 32), seed=2).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = deq(ids, targets), int6(ids, targets)
    assert abs(a.item() - b.item()) < 2e-2 * a.item()


@pytest.mark.gpu
def test_gpu_graphed_decoding_equals_eager(artifact):
    """On CUDA with Triton ops the one-token step runs from a CUDA graph, captured once and replayed for
    every later token of this and later generations; it picks exactly the tokens of the same steps run
    eagerly (greedy and sampled), for the int6 model and for the float model (bf16). The float model's
    capture needs an `embed` without a host sync (issue 23, part 5)."""
    prompt, n = random_ids((2, 5), seed=14).cuda(), 24
    for model in (load_int6_model(artifact, device="cuda"), model_from_artifact(artifact, device="cuda")):
        graphed, eager = Decoder(model, 2, 5 + n), Decoder(model, 2, 5 + n, cuda_graph=False)
        assert graphed.cuda_graph and graphed.cache.on_device and eager.cache.on_device
        for i, kw in enumerate((dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3))):
            tokens = graphed.generate(prompt, n, **kw)
            assert graphed.replays == (n - 2 if i == 0 else n - 1)    # the first step warms up, the second captures
            assert torch.equal(tokens, eager.generate(prompt, n, **kw)) and eager.replays == 0
        assert torch.equal(generate(model, prompt, n, temperature=0), graphed.generate(prompt, n, temperature=0))
