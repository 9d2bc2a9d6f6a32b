"""kernels.attention_decode (flash-decoding, one query row split over the keys): equal to the reference
attention of that row over its sequence's keys (float64 reference, NaN-poisoned outputs, odd key counts,
GQA, XSA on and off, several split counts, per-sequence lengths into a buffer whose unused rows hold
NaN); kernels.attention hands it exactly the calls it should; bad arguments are named; the grids stay
within CUDA's limits; on a GPU every split config at the pr1579 head shape."""
import importlib

import pytest
import torch
from conftest import rel_err

import kernels
from kernels import attention_decode, reference
from kernels.utils import planning_for

decode = importlib.import_module("kernels.attention_decode")
attention_module = importlib.import_module("kernels.attention")


def _inputs(B, Tk, H, Hkv, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for T, h in ((1, H), (Tk, Hkv), (Tk, Hkv)))
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _reference(q, k, v, lengths, **kw):
    """The reference attention of each sequence's query row over its first lengths[b] keys, in float64."""
    return torch.cat([reference.attention(q[b:b + 1].double(), k[b:b + 1, :n].double(), v[b:b + 1, :n].double(),
                                          **kw) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("B, Hkv, xsa, split_counts", [(1, 4, True, (1, 8)), (2, 2, False, (3,)),
                                                        (1, 1, True, (2, 8))])
def test_decode_equals_the_reference(B, Hkv, xsa, split_counts):
    """GQA groups 1, 2, 4; an odd Tk (37) that fills no chunk or block evenly; one split (the split kernel
    finishes alone), a few, and more chunks than the keys fill (8 chunks of whole 16-key blocks: 3 used,
    5 empty); D = 46 in a 64-wide tile; a non-default scale."""
    q, k, v = _inputs(B, 37, 4, Hkv, 46, seed=Hkv)
    ref = _reference(q, k, v, [37] * B, xsa=xsa, softmax_scale=0.3)
    for splits in split_counts:
        out = attention_decode(q, k, v, xsa=xsa, softmax_scale=0.3, num_splits=splits)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        assert rel_err(out, ref) < 1e-6, splits


def test_cache_lengths_read_only_the_valid_keys():
    """cache_seqlens (B,) into a buffer whose rows past each length hold NaN: every sequence attends its
    own first L_b keys (L_b = 1, a middle value, the whole buffer), XSA on v[b, L_b − 1]; and the numbers
    are bitwise those of the same step over a view of the first L_b rows (the chunks follow from L_b)."""
    q, k, v = _inputs(3, 40, 4, 2, 46, seed=7)
    lengths = [1, 23, 40]
    for b, n in enumerate(lengths):
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = attention_decode(q, k, v, xsa=True, cache_seqlens=seqlens, num_splits=3)
    assert rel_err(out, _reference(q, k, v, lengths, xsa=True)) < 1e-6
    for b, n in enumerate(lengths):
        view = attention_decode(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], xsa=True, num_splits=3)
        assert torch.equal(out[b:b + 1], view), b


def test_attention_hands_decode_steps_to_the_split_kernel(monkeypatch):
    """kernels.attention with one query row and no gradient wanted runs attention_decode (same result as
    the reference, causal or not); a row that needs a gradient, or Tq > 1, stays on the training kernels."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return attention_decode(*args, **kwargs)

    monkeypatch.setattr(attention_module, "attention_decode", spy)
    q, k, v = _inputs(2, 19, 4, 2, 16, seed=3)
    for causal in (True, False):
        with torch.no_grad():
            out = kernels.attention(q, k, v, causal=causal, xsa=True)
        assert rel_err(out, _reference(q, k, v, [19, 19], xsa=True)) < 1e-6
    assert calls == [q.shape, q.shape]
    out = kernels.attention(q.requires_grad_(True), k, v, xsa=True)       # training: the differentiable path
    assert out.requires_grad and len(calls) == 2
    with torch.no_grad():
        kernels.attention(q[:, :1].expand(2, 2, 4, 16), k, v)
    assert len(calls) == 2


def test_per_head_gains_and_the_sdpa_layout_reach_the_split_kernel(monkeypatch):
    """q_gain (H,) scales each head's scores inside the split kernel, as kernels.attention folds it (the
    model's decode steps pass it), and a layout="bhtd" call is handed over in (B, T, H, D) and returned in
    (B, H, T, D); both equal the float64 reference."""
    q, k, v = _inputs(2, 29, 4, 2, 48, seed=11)
    gain = torch.rand(4, generator=torch.Generator().manual_seed(5)) * 4 + 0.5
    ref = _reference(q, k, v, [29, 29], xsa=True, softmax_scale=46 ** -0.5, q_gain=gain)
    for splits in (1, 3):
        out = attention_decode(q, k, v, xsa=True, softmax_scale=46 ** -0.5, q_gain=gain, num_splits=splits)
        assert rel_err(out, ref) < 1e-6, splits
    calls = []
    monkeypatch.setattr(attention_module, "attention_decode",
                        lambda *a, **kw: calls.append(a[0].shape) or attention_decode(*a, **kw))
    with torch.no_grad():
        out = kernels.attention(*(t.transpose(1, 2) for t in (q, k, v)), xsa=True, softmax_scale=46 ** -0.5,
                                q_gain=gain, layout="bhtd")
    assert calls == [q.shape] and out.shape == (2, 4, 1, 48)
    assert rel_err(out.transpose(1, 2), ref) < 1e-6
    with pytest.raises(ValueError, match="forward-only"):
        attention_decode(q, k, v, q_gain=gain.clone().requires_grad_(True))


def test_bad_arguments_are_named():
    q, k, v = _inputs(2, 9, 4, 2, 16)
    with pytest.raises(ValueError, match=r"q: attention_decode takes one query row"):
        attention_decode(torch.cat((q, q), dim=1), k, v)
    with pytest.raises(ValueError, match="forward-only"):
        attention_decode(q.requires_grad_(True), k, v)
    q = q.detach()
    with pytest.raises(TypeError, match="cache_seqlens: expected dtype"):
        attention_decode(q, k, v, cache_seqlens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"cache_seqlens: expected shape \(2,\)"):
        attention_decode(q, k, v, cache_seqlens=torch.tensor([3], dtype=torch.int32))
    for bad in (0, True, 2.0, decode.GRID_Y_MAX + 1):
        with pytest.raises(ValueError, match="num_splits"):
            attention_decode(q, k, v, num_splits=bad)
    with pytest.raises(TypeError, match="float64"):
        attention_decode(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="k and v"):
        attention_decode(q, k, v[:, :3])


def test_split_count_and_grids_stay_within_limits():
    """The default split count fills two waves of a 132-SM GPU, bounded by the keys and MAX_SPLITS; the
    grids put sequences·heads in x, so any batch launches, and splits (<= 65,535) in y."""
    meta = torch.device("meta")
    with planning_for(132):
        assert decode.decode_splits(16, 4096, meta) == 17            # 16 × 17 = 272 programs >= 2 × 132
        assert decode.decode_splits(16, 100, meta) == 2              # at least 64 keys a chunk
        assert decode.decode_splits(1, 1 << 20, meta) == decode.MAX_SPLITS
        assert decode.decode_splits(10_000, 1 << 20, meta) == 1
        assert decode.decode_splits(16, 1, meta) == 1
    split, combine = decode.decode_grids(100_000, 16, decode.MAX_SPLITS)
    assert split == (1_600_000, decode.MAX_SPLITS) and combine == (1_600_000,)
    assert split[1] <= decode.GRID_Y_MAX and split[0] < 2 ** 31
    with pytest.raises(ValueError, match="num_splits"):
        decode.decode_grids(1, 16, decode.GRID_Y_MAX + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("config", decode.SPLIT_CONFIGS, ids=str)
def test_gpu_every_split_config(config):
    """Each config of the autotuner's list, launched directly, at the pr1579 head shape (16 heads over 8 KV
    heads, D = 46, bf16) with split counts from one to many, with and without cache lengths and XSA."""
    q, k, v = _inputs(3, 1000, 16, 8, 46, torch.bfloat16, "cuda", seed=11)
    lengths = [1, 517, 1000]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    for xsa in (False, True):
        full = _reference(q, k, v, [1000] * 3, xsa=xsa)
        cached = _reference(q, k, v, lengths, xsa=xsa)
        for splits in (1, 3, decode.decode_splits(48, 1000, q.device), decode.MAX_SPLITS):
            scale = 1 / 46 ** 0.5
            out = decode._decode_forward(q, k, v, None, xsa, scale, splits, config)
            assert rel_err(out, full) < 1e-2, (xsa, splits)
            out = decode._decode_forward(q, k, v, seqlens, xsa, scale, splits, config)
            assert rel_err(out, cached) < 1e-2, (xsa, splits)
    torch.cuda.synchronize()
