"""Test set-up: Triton kernels run under the CPU interpreter when no GPU is present; kernel outputs are
NaN-poisoned; the `gpu` marker selects (and without CUDA skips) real-shape bf16 checks."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["KERNELS_POISON_OUTPUTS"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16 at real shapes)")
    config.addinivalue_line("markers", "slow: long-running CPU test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def brotli_or_skip_module():
    """The brotli module, or the calling test module skipped: artifacts are brotli-compressed and the GPU
    machine has no brotli. Any ImportError skips (pytest.importorskip skips only ModuleNotFoundError: a
    brotli that is present but fails to load would be a collection error, and gpu-check would run nothing)."""
    try:
        import brotli
    except ImportError as e:
        pytest.skip(f"artifacts are brotli-compressed: these tests need brotli ({e})", allow_module_level=True)
    return brotli


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64 (NaN if out has NaNs, so poisoned outputs fail)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def correlated_hessian(K: int, n: int = 1024, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """H = XᵀX/n for random activations X (n, K) whose columns are strongly correlated (random mixing
    with a decaying spectrum), the regime where GPTQ beats round-to-nearest by a wide margin. Drawn on
    the CPU (same values on every device), multiplied in float64 on `device`."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) * torch.logspace(0, -2, K, dtype=torch.float64)[:, None]
    x = torch.randn(n, K, generator=g, dtype=torch.float64).to(device) @ mix.to(device)
    return (x.T @ x / n).to(dtype)


SMALL_CRAWLER = dict(vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1, bigram_buckets=32, bigram_dim=8,
                     ve_dim=8, train_seq_len=16)


def filled_crawler(seed: int = 0, **overrides):
    """A small CrawlerGPT (reference ops) with every parameter random and non-degenerate (zero-init
    projections and control vectors filled), standing in for a trained model. `overrides` are
    CrawlerConfig fields on top of SMALL_CRAWLER."""
    from crawler import CrawlerConfig, CrawlerGPT
    torch.manual_seed(seed)
    model = CrawlerGPT(CrawlerConfig.preset("tiny", **{**SMALL_CRAWLER, **overrides}), ops="reference")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.05)
            elif p.dim() <= 1 or name in ("attn_scales", "mlp_scales"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (on a shared 2-core machine ~10x faster than two:
    thread hand-offs dominate); the previous count is restored after the module. Request it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
