"""The reference ops against independent, hand-written formulas (they are the spec in code)."""
import math

import pytest
import torch
from conftest import rel_err

from kernels import reference as ref


def test_bigram_hash_hand_computed_including_position_zero_and_large_ids():
    ids = torch.tensor([[5, 7, 60000], [40000, 1, 2]])
    h = ref.bigram_hash(ids, 10240)
    expect = [[(0 * 92821 + 5) % 10240, (5 * 92821 + 7) % 10240, (7 * 92821 + 60000) % 10240],
              [(0 * 92821 + 40000) % 10240, (40000 * 92821 + 1) % 10240, (1 * 92821 + 2) % 10240]]
    assert h.tolist() == expect
    assert h.dtype == torch.int64
    # 40000 * 92821 overflows int32: an int32 hash would differ here.
    assert (40000 * 92821) > 2**31


def test_smear_hand_computed():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    gate = torch.tensor([0.0, math.log(3.0)])            # σ = 0.5 and 0.75
    out = ref.smear(x, gate)
    expect = torch.tensor([[[0.5, 0.5], [2.0, 2.5], [4.0, 4.5]]])
    assert torch.allclose(out, expect)


def test_embed_matches_composition():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9))
    tok, table = torch.randn(50, 16, dtype=torch.float64), torch.randn(13, 4, dtype=torch.float64)
    proj, gate = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    x = tok[ids] + table[ref.bigram_hash(ids, 13)] @ proj.T
    x = x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float64).eps).sqrt()
    g = torch.sigmoid(gate)
    expect = (1 - g) * x + g * torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1)
    assert rel_err(ref.embed(ids, tok, table, proj, gate), expect) < 1e-12


@pytest.mark.parametrize("D", [46, 64])
def test_rope_against_direct_rotation(D):
    torch.manual_seed(1)
    B, T, H, base = 2, 7, 3, 10000.0
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    R = 2 * ((D // 2) // 2)
    half = R // 2
    out = ref.rope(x, base)
    expect = x.clone()
    for t in range(T):
        for i in range(half):
            theta = t * base ** (-2 * i / D)
            a, b = x[:, t, :, i], x[:, t, :, half + i]
            c, s = math.cos(theta), math.sin(theta)
            expect[:, t, :, i] = a * c + b * s
            expect[:, t, :, half + i] = -a * s + b * c
    # cos/sin come from float32 tables (docs/math.md §1.8), hence the float32-level bound.
    assert rel_err(out, expect) < 1e-6
    assert torch.equal(out[..., R:], x[..., R:])
    assert R == {46: 22, 64: 32}[D]


def naive_attention(q, k, v, xsa, causal=True):
    """Loops over every query: query t of Tq sits at key position Tk - Tq + t."""
    B, T, H, D = q.shape
    Tk = k.shape[1]
    G = H // k.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            g = h // G
            for t in range(T):
                pos = Tk - T + t
                keys = range(pos + 1) if causal else range(Tk)
                s = torch.stack([q[b, t, h] @ k[b, j, g] for j in keys]) / math.sqrt(D)
                p = torch.softmax(s, 0)
                y = sum(p[i] * v[b, j, g] for i, j in enumerate(keys))
                if xsa:
                    vh = v[b, pos, g] / v[b, pos, g].norm()
                    y = y - (y @ vh) * vh
                out[b, t, h] = y
    return out


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("xsa", [False, True])
def test_attention_against_naive_loop(H, Hkv, xsa):
    torch.manual_seed(2)
    B, T, D = 2, 5, 6
    q, k, v = (torch.randn(B, T, n, D, dtype=torch.float64) for n in (H, Hkv, Hkv))
    out = ref.attention(q, k, v, xsa=xsa)
    assert rel_err(out, naive_attention(q, k, v, xsa)) < 1e-12
    if xsa:  # each head's output is orthogonal to its own KV head's value at that position
        own_v = v.repeat_interleave(H // Hkv, dim=2)
        assert (out * own_v).sum(-1).abs().max() < 1e-10
    assert rel_err(ref.attention(q, k, v, causal=False, xsa=xsa),
                   naive_attention(q, k, v, xsa, causal=False)) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_queries_after_a_cache_against_naive_loop(causal):
    torch.manual_seed(4)
    q = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    k, v = torch.randn(2, 7, 2, 6, dtype=torch.float64), torch.randn(2, 7, 2, 6, dtype=torch.float64)
    assert rel_err(ref.attention(q, k, v, xsa=True, causal=causal), naive_attention(q, k, v, True, causal)) < 1e-12


@pytest.mark.parametrize("xsa", [False, True])
def test_varlen_attention_is_block_diagonal_attention(xsa):
    """The per-segment reference against one masked attention over all packed rows: query i sees key j
    iff both are in one segment (and j <= i); empty segments are allowed."""
    torch.manual_seed(5)
    lengths = [3, 0, 5, 1, 4, 0]
    total, H, Hkv, D = sum(lengths), 4, 2, 6
    q = torch.randn(total, H, D, dtype=torch.float64)
    k, v = torch.randn(total, Hkv, D, dtype=torch.float64), torch.randn(total, Hkv, D, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(total)
    visible = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    kf, vf = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, kf) / math.sqrt(D)
    y = torch.einsum("hij,jhd->ihd", scores.masked_fill(~visible, float("-inf")).softmax(-1), vf)
    if xsa:
        vh = torch.nn.functional.normalize(vf, dim=-1)
        y = y - (y * vh).sum(-1, keepdim=True) * vh
    out = ref.attention(q, k, v, xsa=xsa, cu_seqlens=cu_seqlens)
    assert out.shape == q.shape and rel_err(out, y) < 1e-12
    assert rel_err(ref.attention(q[None], k[None], v[None], xsa=xsa, cu_seqlens=cu_seqlens)[0], y) < 1e-12


def test_document_starts_bigram_hash_and_smear_with_bos_hand_computed():
    ids = torch.tensor([[1, 5, 0, 7, 0, 0, 9]])
    starts = ref.document_starts(ids, bos_id=0)
    assert starts.tolist() == [[True, False, True, False, True, True, False]]
    assert ref.document_starts(ids).tolist() == [[True] + [False] * 6]
    prev = [0, 1, 0, 0, 0, 0, 0]          # the previous id, 0 at every start (the BOS positions)
    expect = [(p * 92821 + i) % 1000 for p, i in zip(prev, ids[0].tolist())]
    assert ref.bigram_hash(ids, 1000, bos_id=0)[0].tolist() == expect
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0]]])
    out = ref.smear(x, torch.zeros(1), starts)       # σ(0) = 0.5: the mean with the previous row, or half
    assert out[0, :, 0].tolist() == [0.5, 1.5, 1.5, 3.5, 2.5, 3.0, 6.5]


def test_embed_with_bos_matches_composition():
    torch.manual_seed(6)
    ids = torch.randint(1, 50, (2, 9))
    ids[0, 4], ids[1, 0], ids[1, 5] = 0, 0, 0
    tok, table = torch.randn(50, 16, dtype=torch.float64), torch.randn(13, 4, dtype=torch.float64)
    proj, gate = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    starts = ref.document_starts(ids, bos_id=0)
    x = tok[ids] + table[ref.bigram_hash(ids, 13, bos_id=0)] @ proj.T
    x = x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float64).eps).sqrt()
    g = torch.sigmoid(gate)
    x_prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), 1) * ~starts[..., None]
    assert rel_err(ref.embed(ids, tok, table, proj, gate, bos_id=0), (1 - g) * x + g * x_prev) < 1e-12


def test_attention_and_embed_validate_inputs():
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ref.attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="head dim must be even"):
        ref.attention(torch.randn(1, 4, 4, 7), torch.randn(1, 4, 2, 7), torch.randn(1, 4, 2, 7))
    with pytest.raises(ValueError, match="k and v"):
        ref.attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8))
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        ref.attention(None, q, q)
    tok, table, proj, gate = torch.randn(10, 8), torch.randn(5, 2), torch.randn(8, 2), torch.randn(8)
    with pytest.raises(ValueError, match="ids: expected token ids in"):
        ref.embed(torch.tensor([[3, 10]]), tok, table, proj, gate)
    with pytest.raises(ValueError, match="bigram_proj: expected shape"):
        ref.embed(torch.tensor([[3, 1]]), tok, table, torch.randn(2, 8), gate)


def test_relu2_mlp_and_softcap_head():
    torch.manual_seed(3)
    h, fc, proj = torch.randn(5, 8), torch.randn(32, 8), torch.randn(8, 32)
    assert torch.allclose(ref.relu2_mlp(h, fc, proj), (torch.relu(h @ fc.T) ** 2) @ proj.T, atol=1e-5)
    leaky = torch.nn.functional.leaky_relu(h @ fc.T, 0.5) ** 2 @ proj.T
    assert torch.allclose(ref.relu2_mlp(h, fc, proj, 0.5), leaky, atol=1e-5)
    w, y = torch.randn(11, 8) * 10, torch.randint(0, 11, (5,))
    logits = 30 * torch.tanh(h @ w.T / 30)
    assert logits.abs().max() < 30
    expect = -torch.log_softmax(logits, -1)[torch.arange(5), y].mean()
    assert torch.allclose(ref.softcapped_cross_entropy(h, w, y, 30.0), expect, atol=1e-5)
