"""The artifact container (docs/math.md §4): bit-exact round trip, byte shuffle, the four distinct load errors,
atomic writes, strict dequantisation into a model (the size budget: tests/test_submission.py)."""
import struct

import pytest
import torch
from conftest import brotli_or_skip_module

from crawler.artifact import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    Artifact,
    ArtifactError,
    QuantizedTensor,
    byte_shuffle,
    byte_unshuffle,
    decode_artifact,
    dequantize_into,
    encode_artifact,
    frame_payload,
    load_artifact,
    save_artifact,
)
from crawler.config import CrawlerConfig
from crawler.model import CrawlerGPT

brotli = brotli_or_skip_module()


def _random_quantized(rows, cols, bits, method, gen):
    r = 2 ** (bits - 1) - 1
    codes = torch.randint(-r, r + 1, (rows, cols), generator=gen, dtype=torch.int8)
    scales = (torch.rand(rows, generator=gen) * 0.01 + 1e-4).half()
    return QuantizedTensor(codes, scales, bits, method)


def _sample_artifact(seed=0) -> Artifact:
    gen = torch.Generator().manual_seed(seed)
    return Artifact(
        config=CrawlerConfig.preset("tiny").to_dict(),
        tensors={
            "blocks.w": _random_quantized(48, 64, 6, "gptq", gen),
            "emb.w": _random_quantized(33, 16, 8, "rtn", gen),
            "small": torch.randn(7, 5, generator=gen).half(),
            "control": torch.randn(3, 2, 4, generator=gen),
            "scalar": torch.tensor(0.5),
            "table": torch.randn(9, 4, generator=gen).to(torch.bfloat16),
        })


def _assert_bit_exact(a: Artifact, b: Artifact):
    assert a.config == b.config
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        if isinstance(t, QuantizedTensor):
            assert isinstance(u, QuantizedTensor) and (u.bits, u.method) == (t.bits, t.method), name
            assert torch.equal(u.codes, t.codes) and u.codes.dtype == torch.int8, name
            # fp16 scales compared bit for bit
            assert torch.equal(u.scales.view(torch.int16), t.scales.view(torch.int16)), name
        else:
            assert u.dtype == t.dtype and u.shape == t.shape, name
            assert torch.equal(u.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_round_trip_is_bit_exact(tmp_path):
    art = _sample_artifact()
    path = tmp_path / "model.crawl"
    size = save_artifact(art, path)
    assert size == path.stat().st_size
    back = load_artifact(path)
    _assert_bit_exact(art, back)
    assert back.schemes() == {"blocks.w": "int6_gptq", "emb.w": "int8_rtn", "small": "fp16",
                              "control": "fp32", "scalar": "fp32", "table": "bf16"}
    assert path.read_bytes()[:8] == MAGIC
    assert not [p for p in tmp_path.iterdir() if p.name != "model.crawl"], "temporary file left behind"


def test_encoding_is_deterministic():
    # same tensors, same bytes (the safetensors metadata map is written in hash order: one entry only)
    assert len({encode_artifact(_sample_artifact()) for _ in range(4)}) == 1


def test_byte_shuffle_layout_and_inverse():
    data = bytes(range(11))
    assert byte_shuffle(data) == bytes([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9])
    for n in (0, 1, 2, 5, 64, 1001):
        blob = torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes()
        assert byte_unshuffle(byte_shuffle(blob)) == blob


def test_flipped_byte_is_corrupt():
    blob = bytearray(encode_artifact(_sample_artifact()))
    blob[HEADER_BYTES + 10] ^= 0x40
    with pytest.raises(ArtifactError, match="corrupt: SHA-256"):
        decode_artifact(bytes(blob))


def test_truncated_file_names_both_sizes(tmp_path):
    blob = encode_artifact(_sample_artifact())
    path = tmp_path / "cut.crawl"
    path.write_bytes(blob[:-100])
    with pytest.raises(ArtifactError, match=rf"truncated: expected {len(blob)} bytes, got {len(blob) - 100}"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="truncated"):
        decode_artifact(blob[:20])


def test_wrong_magic_is_not_an_artifact(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3)}, path)       # a pickle-based checkpoint must be refused unread
    with pytest.raises(ArtifactError, match="not a crawler artifact"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="not a crawler artifact"):
        decode_artifact(b"")


def test_newer_format_version_is_refused():
    blob = encode_artifact(_sample_artifact())
    payload = blob[HEADER_BYTES:]
    raw = struct.unpack_from("<Q", blob, 20)[0]
    with pytest.raises(ArtifactError, match="written by a newer version"):
        decode_artifact(frame_payload(payload, raw, version=FORMAT_VERSION + 1))
    # the same number written over a valid file's version field is damage, not a newer writer
    flipped = bytearray(blob)
    struct.pack_into("<I", flipped, 8, FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match="corrupt: SHA-256 of the header"):
        decode_artifact(bytes(flipped))


def test_trailing_bytes_and_undecodable_payload_are_corrupt():
    blob = encode_artifact(_sample_artifact())
    with pytest.raises(ArtifactError, match="corrupt: 3 trailing bytes"):
        decode_artifact(blob + b"abc")
    # A well-formed header with a matching checksum around garbage: still refused, without executing it.
    payload = b"\x80\x03cos\nsystem\n" * 10
    with pytest.raises(ArtifactError, match="corrupt"):
        decode_artifact(frame_payload(payload, 1000))
    # A genuine safetensors payload without our metadata (someone else's file in our wrapper).
    from safetensors.torch import save
    raw = byte_shuffle(save({"w": torch.zeros(2)}))
    with pytest.raises(ArtifactError, match="corrupt: no readable 'crawler' metadata"):
        decode_artifact(frame_payload(brotli.compress(raw), len(raw)))


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "a.crawl"
    save_artifact(_sample_artifact(0), path)
    before = path.read_bytes()
    bad = _sample_artifact(1)
    bad.tensors["ids"] = torch.arange(4)          # int64 is no passthrough scheme
    with pytest.raises(ValueError, match="passthrough dtype"):
        save_artifact(bad, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.crawl"]


def test_quantized_tensor_validates():
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor(torch.zeros(2, 3), torch.zeros(2).half(), 6, "gptq")
    with pytest.raises(ValueError, match="scales"):
        QuantizedTensor(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3).half(), 6, "gptq")
    with pytest.raises(ValueError, match="method"):
        QuantizedTensor(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2).half(), 6, "magic")


def test_dequantize_into_model_is_strict():
    config = CrawlerConfig.preset("tiny", vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1,
                                  bigram_buckets=32, bigram_dim=8, ve_dim=8)
    model = CrawlerGPT(config, ops="reference")
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, p in model.state_dict().items():
        if p.dim() == 2 and p.numel() >= 1024:
            tensors[name] = _random_quantized(p.shape[0], p.shape[1], 6, "rtn", gen)
        else:
            tensors[name] = torch.randn(p.shape, generator=gen).half()
    art = decode_artifact(encode_artifact(Artifact(config.to_dict(), tensors)))
    dequantize_into(model, art)
    for name, p in model.state_dict().items():
        t = tensors[name]
        want = t.dequantize() if isinstance(t, QuantizedTensor) else t.float()
        assert torch.equal(p.float(), want.to(p.dtype).float()), name
    with torch.device("meta"):
        empty = CrawlerGPT(config, ops="reference")
    with pytest.raises(ValueError, match="meta device"):
        dequantize_into(empty, art)
    dequantize_into(empty, art, device="cpu")
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in empty.state_dict().items())
    del art.tensors["smear.gate"]
    with pytest.raises(ValueError, match=r"missing \['smear.gate'\]"):
        dequantize_into(model, art)
