"""Varlen attention (packed documents, `cu_seqlens`) against the per-segment float64 reference: forward and
dq/dk/dv on ragged segment lengths, document isolation, bad cu_seqlens, torch.compile without recompiling
when cu_seqlens changes. Triton runs under the interpreter on CPU (conftest), outputs NaN-poisoned.

Interpreter blocks: 32 query rows per forward / dQ program (16-key steps), 32 keys per dK/dV program
(16-row steps); the segment lengths below straddle those boundaries."""
import pytest
import torch
import triton
import triton.language as tl
from conftest import rel_err
from torch._dynamo.testing import CompileCounterWithBackend

import kernels
from kernels import reference
from kernels.attention import GRID_X_LIMIT, _program_ids, attention, launch_grid

BOUNDS = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2)}


def cu(lengths) -> torch.Tensor:
    """cu_seqlens (int32) of segments with these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def packed_inputs(total, H, Hkv, D, dtype=torch.float32, seed=0):
    """Fresh random packed q (total, H, D), k/v (total, Hkv, D), as strided views of one qkv projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, H + 2 * Hkv, D, generator=g).to(dtype)
    return qkv.split([H, Hkv, Hkv], dim=1)


def run(fn, q, k, v, dz, **kw):
    """fn's output and (dq, dk, dv) for upstream gradient dz."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    return out, torch.autograd.grad(out, (q, k, v), dz.to(out.dtype))


def check(q, k, v, cu_seqlens, **kw):
    """Triton vs the float64 reference: forward and all three gradients within the dtype's bounds."""
    dz = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.device)
    out, grads = run(attention, q, k, v, dz, cu_seqlens=cu_seqlens, **kw)
    ref, ref_grads = run(reference.attention, *(t.double() for t in (q, k, v)), dz.double(),
                         cu_seqlens=cu_seqlens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    fwd_bound, grad_bound = BOUNDS[q.dtype]
    assert rel_err(out, ref) < fwd_bound, f"forward rel err {rel_err(out, ref):.2e}"
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and g.dtype == q.dtype
        assert rel_err(g, r) < grad_bound, f"d{name} rel err {rel_err(g, r):.2e}"


@pytest.mark.parametrize("lengths, xsa", [
    ([45], True),                                   # one segment
    ([1, 33, 17, 1, 15], True),                     # length 1, lengths straddling the 32/16 blocks
    ([3, 1, 4, 1, 5, 2, 6, 2, 3], False),           # many short segments
    ([20, 25, 0, 0, 0], True),                      # empty tail (fixed-capacity padding)
    ([0, 9, 0, 16], False),                         # empty segments first and in the middle
])
def test_matches_reference(lengths, xsa):
    q, k, v = packed_inputs(sum(lengths), 4, 2, 16, seed=len(lengths))
    check(q, k, v, cu(lengths), xsa=xsa)


def test_head_dim_46_non_causal_and_leading_batch_dim():
    """D = 46 in a 64 tile, causal=False within segments, the (1, total, H, D) form."""
    q, k, v = packed_inputs(40, 4, 2, 46, seed=3)
    check(q[None], k[None], v[None], cu([7, 33]), xsa=True, causal=False)


def test_bf16():
    q, k, v = packed_inputs(50, 4, 2, 16, torch.bfloat16, seed=4)
    check(q, k, v, cu([18, 32]), xsa=True)


def test_q_gain_and_log_sum_exp():
    """Per-head gains inside the varlen kernels (forward, dq/dk/dv and d q_gain) and the (H, total) lse."""
    q, k, v = packed_inputs(50, 4, 2, 16, seed=13)
    gain = torch.tensor([1.5, 5.0, 0.5, 2.5])
    offsets = cu([20, 25, 5, 0])
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gain)]
    out, lse = attention(*leaves[:3], q_gain=leaves[3], cu_seqlens=offsets, xsa=True, return_lse=True)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, gain)]
    ref, ref_lse = reference.attention(*ref_in[:3], q_gain=ref_in[3], cu_seqlens=offsets, xsa=True,
                                       return_lse=True)
    dz = torch.randn(q.shape, generator=torch.Generator().manual_seed(14))
    assert lse.shape == (4, 50) and rel_err(lse, ref_lse) < 1e-6 and rel_err(out, ref) < 1e-5
    for g, r in zip(torch.autograd.grad(out, leaves, dz), torch.autograd.grad(ref, ref_in, dz.double())):
        assert rel_err(g, r) < 1e-5


def test_max_seqlen_below_the_longest_segment_is_still_correct():
    """max_seqlen only sizes the grid: programs loop over their segment's remaining query/key blocks."""
    q, k, v = packed_inputs(70, 4, 2, 16, seed=5)
    check(q, k, v, cu([3, 67]), xsa=True, max_seqlen=8)


def test_documents_are_isolated():
    """Changing one segment's q, k, v leaves every other segment's output and gradients bitwise equal."""
    lengths = [11, 21, 8]
    q, k, v = packed_inputs(sum(lengths), 4, 2, 16, seed=6)
    dz = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    seg = slice(11, 32)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[seg] = torch.randn(t[seg].shape, generator=torch.Generator().manual_seed(8))
    out, grads = run(attention, q, k, v, dz, cu_seqlens=cu(lengths), xsa=True)
    out2, grads2 = run(attention, q2, k2, v2, dz, cu_seqlens=cu(lengths), xsa=True)
    others = torch.tensor([t not in range(11, 32) for t in range(sum(lengths))])
    assert not torch.equal(out[seg], out2[seg])
    assert torch.equal(out[others], out2[others])
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g[others], g2[others])


def test_equals_dense_attention_on_equal_length_documents():
    """Documents of one length T packed back to back are a dense (B, T) batch."""
    q, k, v = packed_inputs(3 * 20, 4, 2, 16, seed=10)
    dense = attention(*(t.reshape(3, 20, *t.shape[1:]) for t in (q, k, v)), xsa=True)
    assert torch.equal(attention(q, k, v, xsa=True, cu_seqlens=cu([20, 20, 20])), dense.reshape(q.shape))


def _bad(cu_seqlens, **kw):
    return dict(cu_seqlens=cu_seqlens, **kw)


@pytest.mark.parametrize("op", [attention, reference.attention], ids=["triton", "reference"])
@pytest.mark.parametrize("kwargs, exc, match", [
    (_bad(torch.tensor([0, 5, 12])), TypeError, "cu_seqlens: expected dtype"),
    (_bad(torch.tensor([0, 5, 12], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens: expected a tensor on"),
    (_bad(torch.tensor([[0, 5, 12]], dtype=torch.int32)), ValueError, "cu_seqlens: expected a 1-D"),
    (_bad(torch.tensor([0], dtype=torch.int32)), ValueError, "cu_seqlens: expected num_docs"),
    (_bad(torch.tensor([0, 12], dtype=torch.int32), max_seqlen=0), ValueError, "max_seqlen"),
    (_bad(torch.tensor([0, 12], dtype=torch.int32), max_seqlen=True), ValueError, "max_seqlen"),
])
def test_bad_cu_seqlens(op, kwargs, exc, match):
    q, k, v = packed_inputs(12, 4, 2, 16)
    with pytest.raises(exc, match=match):
        op(q, k, v, **kwargs)


@pytest.mark.parametrize("offsets, match", [
    ([0, 5, 3, 12], "cu_seqlens: expected non-decreasing"),
    ([0, 5, 11], "cu_seqlens: expected to end at .* 12"),
    ([0, -1, 12], "cu_seqlens: expected non-negative"),
    ([2, 5, 12], "cu_seqlens: expected to start at 0"),
])
def test_bad_offsets_are_refused_by_the_reference(offsets, match):
    """The values are checked where they are read anyway (the reference) and where segments are built
    (crawler.documents), never by the Triton op (a host sync per call)."""
    q, k, v = packed_inputs(12, 4, 2, 16)
    with pytest.raises(ValueError, match=match):
        reference.attention(q, k, v, cu_seqlens=torch.tensor(offsets, dtype=torch.int32))


def test_offsets_past_the_rows_are_clamped():
    """The Triton op reads offsets on the device only: one past the packed rows is clamped to them, so
    nothing outside the tensors is read or written."""
    q, k, v = packed_inputs(12, 4, 2, 16, seed=15)
    clamped = attention(q, k, v, xsa=True, cu_seqlens=torch.tensor([0, 7, 100, 100], dtype=torch.int32))
    assert torch.equal(clamped, attention(q, k, v, xsa=True, cu_seqlens=cu([7, 5])))


@pytest.mark.parametrize("op", [attention, reference.attention], ids=["triton", "reference"])
def test_bad_packed_shapes(op):
    q, k, v = packed_inputs(12, 4, 2, 16)
    offsets = cu([5, 7])
    with pytest.raises(ValueError, match=r"q: with cu_seqlens, expected packed rows"):
        op(q.reshape(2, 6, 4, 16), k.reshape(2, 6, 2, 16), v.reshape(2, 6, 2, 16), cu_seqlens=offsets)
    with pytest.raises(ValueError, match="k: expected shape"):
        op(q, k[:10], v[:10], cu_seqlens=offsets)
    with pytest.raises(ValueError, match="max_seqlen: only meaningful with cu_seqlens"):
        op(q[None], k[None], v[None], max_seqlen=12)
    with pytest.raises(ValueError, match="layout: 'bhtd' is for dense"):
        op(q[None], k[None], v[None], cu_seqlens=offsets, layout="bhtd")


def test_compiles_fullgraph_without_recompiling_for_new_offsets():
    """torch.compile(fullgraph=True) traces the varlen op (fake + autograd registered) and new cu_seqlens
    values of the same capacity (empty tail) reuse the graph (max_seqlen absent: the grid covers the
    packed rows). Forward and gradients bitwise equal to eager."""
    q, k, v = packed_inputs(40, 4, 2, 16, seed=11)

    def f(q, k, v, cu_seqlens):
        return attention(q, k, v, xsa=True, cu_seqlens=cu_seqlens).square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for lengths in ([40, 0, 0, 0], [12, 3, 25, 0], [1, 1, 1, 37]):
        offsets = cu(lengths)
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        eager = f(*ins, offsets)
        eager_grads = torch.autograd.grad(eager, ins)
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out = compiled(*ins, offsets)
        assert torch.equal(out, eager)
        for a, b in zip(torch.autograd.grad(out, ins), eager_grads):
            assert torch.equal(a, b)
    assert counter.frame_count == 1


# pr1579: T = 2048, 16 query / 8 KV heads, micro-batches of 32 rows (dense) or their 65,536 tokens packed with
# the doc-isolated trainer's capacity of 8 segments per row; and 10,000 segments. Every block size a config
# may pick (16 .. 128 rows).
GRID_CASES = [(2048, 32, 16), (2048, 32, 8), (2048, 8 * 32, 16), (2048, 8 * 32, 8), (2048, 10_000, 16),
              (2048, 10_000, 8), (1, 10_000, 16)]


@pytest.mark.parametrize("rows, sequences, heads", GRID_CASES)
def test_launch_grid_stays_within_cuda_limits(rows, sequences, heads):
    """Every attention launch is one grid dimension x of blocks x sequences x heads programs (limit 2^31 - 1):
    10,000 segments of 16 heads (160,000 > 65,535, the limit of dimension y that held them before)."""
    for block in (16, 32, 64, 128):
        grid = launch_grid(rows, block, sequences, heads)
        assert len(grid) == 1 and grid[0] <= GRID_X_LIMIT
        assert grid[0] == -(-rows // block) * sequences * heads
    with pytest.raises(ValueError, match="exceed CUDA's grid limit"):
        launch_grid(2**20, 16, 2**20, 16)


@triton.jit
def _record_program_ids(OUT, ROWS, BLOCK: tl.constexpr):
    block, sh, blocks = _program_ids(ROWS, BLOCK)
    tl.store(OUT + tl.program_id(0), sh * blocks + block)


def test_program_ids_cover_every_block_of_every_sequence_head_once():
    """The kernels' split of a launch_grid program id: each (block, sequence·head) exactly once, the blocks
    of one sequence·head consecutive."""
    rows, block, sequences, heads = 37, 16, 5, 3
    grid = launch_grid(rows, block, sequences, heads)
    out = torch.full(grid, -1, dtype=torch.int64)
    _record_program_ids[grid](out, rows, BLOCK=block)
    assert torch.equal(out, torch.arange(3 * sequences * heads))


def test_op_registration():
    """torch.library's checks of the varlen forward op: schema, fake tensors, autograd registration."""
    q, k, v = (t[None].requires_grad_() for t in packed_inputs(20, 4, 2, 16, seed=12))
    torch.library.opcheck(torch.ops.crawler_kernels.attention_fwd.default,
                          (q, k, v, cu([5, 15, 0]), 15, True, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_exported_from_kernels():
    assert kernels.attention is attention


# ----------------------------------------------------------------------------------------------
# GPU: FineWeb-like document lengths at the crawler's shape, bf16, and determinism
# ----------------------------------------------------------------------------------------------

def _document_lengths(total, seed, piece=2048):
    """Log-normal document lengths (mean ~1,000 tokens), cut into pieces of at most `piece` tokens as
    the records do, filling `total` rows exactly."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        n = min(max(1, int(torch.empty(1).log_normal_(6.4, 1.0, generator=g))), total - sum(lengths))
        lengths += [piece] * (n // piece) + ([n % piece] if n % piece else [])
    return lengths


@pytest.mark.gpu
def test_gpu_bf16_document_lengths():
    lengths = _document_lengths(8 * 2048, seed=0)
    q, k, v = (t.cuda() for t in packed_inputs(sum(lengths), 16, 8, 46, torch.bfloat16, seed=0))
    check(q, k, v, cu(lengths).cuda(), xsa=True, max_seqlen=max(lengths))


@pytest.mark.gpu
def test_gpu_ten_thousand_segments_launch():
    """10,000 segments x 16 heads (more than the 65,535 programs grid dimension y holds): forward and
    backward launch and match the reference (float32, short segments, so the reference is quick)."""
    lengths = [1 + i % 3 for i in range(10_000)]
    q, k, v = (t.cuda() for t in packed_inputs(sum(lengths), 16, 8, 16, seed=2))
    check(q, k, v, cu(lengths).cuda(), xsa=True, max_seqlen=3)


@pytest.mark.gpu
def test_gpu_gradients_bitwise_deterministic():
    lengths = _document_lengths(8 * 2048, seed=1)
    q, k, v = (t.cuda() for t in packed_inputs(sum(lengths), 16, 8, 64, torch.bfloat16, seed=1))
    dz = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    offsets = cu(lengths).cuda()
    first = run(attention, q, k, v, dz, cu_seqlens=offsets, xsa=True)
    again = run(attention, q, k, v, dz, cu_seqlens=offsets, xsa=True)
    assert torch.equal(first[0], again[0])
    for a, b in zip(first[1], again[1]):
        assert torch.equal(a, b)
