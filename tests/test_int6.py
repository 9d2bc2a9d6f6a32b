"""Int6 packing and the weight-only int6 matmul (docs/math.md §5): exact round trip, the documented byte layout,
the Triton op against a float64 dense product on every path (decode FMA / decode tl.dot, split-K or not,
GEMM either operand order, K tails), input validation, torch.compile tracing; real shapes on a GPU."""
import pytest
import torch
from conftest import rel_err

from kernels import int6 as int6_mod
from kernels import int6_linear, pack_int6, reference, unpack_int6

# Output rounding bounds. The interpreter rounds fp32 -> bf16 by truncation (about twice the error of
# the GPU's round-to-nearest), which the bf16 bound covers.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def random_codes(n, k, gen=None):
    return torch.randint(-32, 32, (n, k), dtype=torch.int8, generator=gen)


def random_scales(n, dtype=torch.float16, device="cpu"):
    return (torch.rand(n) * 0.01 + 1e-3).to(dtype).to(device)


def dense_reference(x, codes, scales):
    """x @ (codes * scales).T in float64: the dequantised weight exists here, in the test only."""
    w = codes.double() * scales.double()[:, None]
    return x.double() @ w.T.to(x.device)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [4, 736, 2944])
def test_pack_round_trip_every_code(K):
    N = 64 // K + 3
    codes = random_codes(N, K)
    codes.view(-1)[:64] = torch.arange(-32, 32, dtype=torch.int8)   # every code value appears
    packed = pack_int6(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N, 3 * K // 4)
    assert packed.numel() == 0.75 * codes.numel()                      # exactly 0.75 B / weight
    assert torch.equal(unpack_int6(packed, K), codes)


def test_pack_layout_is_the_documented_one():
    # one row, K = 8 (K4 = 2); biased codes u = c + 32
    codes = torch.tensor([[-32, 31, 0, -1, 5, -17, 20, 7]], dtype=torch.int8)
    u = [c + 32 for c in codes[0].tolist()]       # quarters: (u0,u1) (u2,u3) (u4,u5) (u6,u7)
    q = [u[0:2], u[2:4], u[4:6], u[6:8]]
    expect = ([(q[0][j] & 15) | ((q[1][j] & 15) << 4) for j in range(2)]
              + [(q[2][j] & 15) | ((q[3][j] & 15) << 4) for j in range(2)]
              + [sum((q[i][j] >> 4) << (2 * i) for i in range(4)) for j in range(2)])
    assert pack_int6(codes)[0].tolist() == expect


def test_pack_non_contiguous_codes():
    codes = random_codes(8, 12).t()   # (12, 8) view
    assert torch.equal(unpack_int6(pack_int6(codes), 8), codes)


def test_pack_unpack_errors():
    with pytest.raises(TypeError, match="codes"):
        pack_int6(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="codes"):
        pack_int6(torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_int6(torch.zeros(2, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-32, 31\]"):
        pack_int6(torch.full((2, 4), 32, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-32, 31\]"):
        pack_int6(torch.full((2, 4), -33, dtype=torch.int8))
    packed = pack_int6(random_codes(2, 8))
    with pytest.raises(TypeError, match="packed"):
        unpack_int6(packed.to(torch.int8), 8)
    with pytest.raises(ValueError, match="packed"):
        unpack_int6(packed, 12)
    with pytest.raises(ValueError, match="k"):
        unpack_int6(packed, 6)


# ----------------------------------------------------------------------------------------------
# The matmul
# ----------------------------------------------------------------------------------------------

def test_reference_matches_dense_float64():
    # N > INT6_REF_ROW_TILE so the reference's row tiling is exercised
    N, K = reference.INT6_REF_ROW_TILE + 44, 96
    codes, scales = random_codes(N, K), random_scales(N, torch.float32)
    x = torch.randn(2, 3, K, dtype=torch.float64)
    out = reference.int6_linear(x, pack_int6(codes), scales.double())
    assert out.shape == (2, 3, N) and out.dtype == torch.float64
    assert rel_err(out, dense_reference(x, codes, scales)) < 1e-12


LEAD = {1: (1, 1), 3: (3, 1), 16: (2, 8), 17: (17, 1), 128: (4, 32)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 128])
@pytest.mark.parametrize("K,batched", [(96, False), (100, False), (96, True)])
def test_int6_linear_matches_reference(dtype, M, K, batched):
    N = 48
    gen = torch.Generator().manual_seed(1000 * M + K)
    codes = random_codes(N, K, gen)
    scales = random_scales(N, torch.float16 if dtype != torch.float32 else torch.float32)
    shape = (*LEAD[M], K) if batched else (M, K)
    x = torch.randn(shape, generator=gen).to(dtype)
    out = int6_linear(x, pack_int6(codes), scales)
    assert out.shape == (*shape[:-1], N) and out.dtype == dtype
    assert rel_err(out, dense_reference(x, codes, scales)) < TOL[dtype]


C = int6_mod._Config
PATH_CONFIGS = [  # every kernel path and corner, whatever the tuner would pick
    (1, C("decode", 1, 16, 16, SPLIT_K=1)),
    (1, C("decode", 1, 16, 16, SPLIT_K=3)),        # K4 = 25: tiles 16 + 9, the third split is empty
    (5, C("decode", 16, 16, 16, SPLIT_K=1)),
    (5, C("decode", 16, 32, 16, SPLIT_K=2)),
    (40, C("gemm", 16, 16, 16, GROUP_M=1)),
    (40, C("gemm", 16, 32, 16, GROUP_M=2, W_FIRST=True)),
    (40, C("gemm", 32, 16, 32, GROUP_M=3)),       # BQ > K4 tail only
]


@pytest.mark.parametrize("M,cfg", PATH_CONFIGS, ids=lambda v: str(v) if isinstance(v, int) else
                         f"{v.path}-BM{v.BM}-BN{v.BN}-BQ{v.BQ}-S{v.SPLIT_K}-G{v.GROUP_M}-W{int(v.W_FIRST)}")
def test_every_kernel_path(M, cfg):
    N, K = 40, 100
    codes, scales = random_codes(N, K), random_scales(N)
    x = torch.randn(M, K, dtype=torch.float16)
    out = int6_mod._launch(x, pack_int6(codes), scales, cfg)
    assert rel_err(out, dense_reference(x, codes, scales)) < TOL[torch.float16]


def test_int6_linear_strided_x_and_empty():
    N, K = 20, 32
    codes, scales = random_codes(N, K), random_scales(N)
    packed = pack_int6(codes)
    x = torch.randn(K, 6).t()          # last dim not contiguous
    assert rel_err(int6_linear(x, packed, scales), dense_reference(x, codes, scales)) < TOL[torch.float32]
    assert int6_linear(torch.randn(0, K), packed, scales).shape == (0, N)
    empty = int6_linear(torch.randn(3, 0), pack_int6(random_codes(N, 0)), scales)
    assert empty.shape == (3, N) and not empty.any()


def test_int6_linear_errors():
    N, K = 8, 16
    packed, scales, x = pack_int6(random_codes(N, K)), random_scales(N), torch.randn(2, K)
    for op in (int6_linear, reference.int6_linear):
        with pytest.raises(ValueError, match="packed"):
            op(torch.randn(2, K + 4), packed, scales)
        with pytest.raises(ValueError, match="multiple of 4"):
            op(torch.randn(2, 10), packed, scales)
        with pytest.raises(ValueError, match="scales"):
            op(x, packed, scales[:-1])
        with pytest.raises(TypeError, match="scales"):
            op(x, packed, scales.to(torch.int32))
        with pytest.raises(TypeError, match="packed"):
            op(x, packed.to(torch.int8), scales)
        with pytest.raises(ValueError, match="contiguous"):
            op(x, pack_int6(random_codes(2 * N, K))[::2], scales)
        with pytest.raises(TypeError, match="x"):
            op(x.to(torch.int32), packed, scales)
        with pytest.raises(ValueError, match="expected a tensor on cpu"):
            op(x, packed.to("meta"), scales)
    with pytest.raises(TypeError, match="x"):
        int6_linear(x.double(), packed, scales)   # float64 only in the reference


def test_int6_linear_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    N, K = 8, 16
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        int6_linear(torch.randn(2, K), pack_int6(random_codes(N, K)), random_scales(N))


def test_int6_linear_compiles_fullgraph():
    N, K = 24, 32
    codes, scales = random_codes(N, K), random_scales(N)
    packed = pack_int6(codes)

    def f(x):
        return int6_linear(torch.relu(x), packed, scales) * 2

    x = torch.randn(3, K)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


# ----------------------------------------------------------------------------------------------
# GPU: the model's shapes in bf16
# ----------------------------------------------------------------------------------------------

MODEL_SHAPES = [(736, 736), (736, 368), (736, 2944), (2944, 736)]   # (K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", MODEL_SHAPES)
@pytest.mark.parametrize("M", [1, 16, 2048, 65536])
def test_int6_linear_gpu_model_shapes(K, N, M):
    gen = torch.Generator().manual_seed(M + K + N)
    codes = random_codes(N, K, gen)
    scales = random_scales(N, device="cuda")
    packed = pack_int6(codes).cuda()
    x = torch.randn(M, K, generator=gen).to("cuda", torch.bfloat16)
    out = int6_linear(x, packed, scales)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert rel_err(out, dense_reference(x, codes.cuda(), scales)) < 4e-3
    assert torch.equal(int6_linear(x, packed, scales), out)     # deterministic (no float atomics)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 7, 300])
def test_int6_linear_gpu_other_dtypes(dtype, M):
    N, K = 368, 736
    codes, scales = random_codes(N, K), random_scales(N, torch.float32, "cuda")
    x = torch.randn(M, K, device="cuda").to(dtype)
    out = int6_linear(x, pack_int6(codes).cuda(), scales)
    assert rel_err(out, dense_reference(x, codes.cuda(), scales)) < TOL[dtype]
