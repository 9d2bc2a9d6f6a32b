"""The artifact container (docs/math.md §4): quantised weights in safetensors, byte-shuffled, brotli-11'd, behind
a small header of our own. No pickle anywhere: loading a hostile file parses bytes and JSON only.

File layout (all integers little-endian; docs/artifact.md has the full description):

    offset  size  field
    0       8     magic b"CRWLART\\0"
    8       4     format version (uint32), currently 2
    12      8     payload length in bytes (uint64)
    20      8     decompressed payload length in bytes (uint64)
    28      32    SHA-256 of bytes 0-27 (the fields above) followed by the payload
    60      ...   payload = brotli(byte_shuffle(safetensors_bytes, stride=2)), quality 11

Every later version keeps bytes 0-11 and the rule "the last 32 header bytes are the SHA-256 of the header
before them, then the payload", so a damaged version field reads as corrupt, never as "written by a newer
version". Format 1 (a 52-byte header without the decompressed length, the SHA-256 of the payload only, no
tokenizer identity) still loads, with an UnverifiedWarning. Decompression stops at the declared length
and never goes past MAX_PAYLOAD_BYTES (format 1, which declares none: FORMAT_1_MAX_PAYLOAD_BYTES, what a
budget-sized artifact can hold); the model config is validated (CrawlerConfig's size bounds)
before any tensor is parsed.

The safetensors metadata holds one entry, "crawler": a JSON object with `format_version`, `config` (the
CrawlerConfig dict), `schemes` (tensor name -> scheme) and, when known, `tokenizer` (the identity
{"sha256", "vocab_size"} of the tokenizer the weights were trained with). One entry, because safetensors
writes its metadata map in hash order: several entries would make the file bytes (and size) vary between
runs. A quantised tensor `name` is stored as `name.q` (int8 codes, one per byte) and `name.scale` (fp16
per-row scales), scheme "int{bits}_{method}"; a passthrough tensor is stored under its own name in the
dtype its scheme names ("fp32", "fp16" or "bf16").

What counts against the 16,000,000-byte budget (artifact bytes + code bytes) is crawler.budget's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import kernels

from .config import CrawlerConfig
from .errors import MissingFileError, SetupError, UnverifiedWarning
from .fileio import write_bytes
from .model import CrawlerGPT, load_state_into

MAGIC = b"CRWLART\0"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sI")                 # magic, format version: the same in every version
_HEADER = struct.Struct("<8sIQQ32s")            # + payload length, decompressed length, SHA-256
HEADER_BYTES = _HEADER.size                     # 60
_DIGESTED_HEADER_BYTES = HEADER_BYTES - 32      # the header bytes the SHA-256 covers
_HEADER_V1 = struct.Struct("<8sIQ32s")          # format 1: magic, version, payload length, SHA-256 of the payload
# The largest decompressed payload any reader accepts: far above a 16 MB artifact's (pr1579: ~45 MB),
# far below what a crafted few-hundred-byte brotli stream could otherwise expand to.
MAX_PAYLOAD_BYTES = 1 << 30
MAX_FILE_BYTES = 1 << 30
# Format 1 declares no decompressed size, so it is bounded by what a budget-sized artifact can hold: the
# 16,000,000-byte budget (crawler.budget.BUDGET_BYTES) of brotli over int6 codes stored one per byte, which
# decompresses about 3x (pr1579 at the budget: ~45 MB). 4x the budget leaves room, and a crafted
# few-hundred-byte format-1 file costs tens of MB before it is refused, not gigabytes.
FORMAT_1_MAX_PAYLOAD_BYTES = 4 * 16_000_000
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24                          # brotli's largest window: the payload is tens of MB
SHUFFLE_STRIDE = 2
METADATA_KEY = "crawler"

PASSTHROUGH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANT_METHODS = ("gptq", "rtn")            # how the codes were chosen; decoding is the same for both
_QUANT_SCHEME = re.compile(r"^int([2-8])_(gptq|rtn)$")


class ArtifactError(SetupError):
    """A file that is not a readable crawler artifact; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# In-memory form

@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A row-quantised matrix: weight ≈ codes · scales[:, None].

    codes (rows, cols) int8 in [-R, R] with R = 2^(bits-1) - 1; scales (rows,) fp16; method "gptq" or
    "rtn" (per-row round to nearest) records how the codes were chosen.
    """
    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    method: str

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise ValueError(f"method must be one of {QUANT_METHODS}, got {self.method!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2:
            raise ValueError(f"codes: expected a 2-D int8 tensor, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        if self.scales.dtype != torch.float16 or self.scales.shape != self.codes.shape[:1]:
            raise ValueError(f"scales: expected fp16 of shape ({self.codes.shape[0]},), got "
                             f"{self.scales.dtype} {tuple(self.scales.shape)}")

    @property
    def clip_range(self) -> int:
        return kernels.reference.quant_max(self.bits)

    @property
    def scheme(self) -> str:
        return f"int{self.bits}_{self.method}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(rows, cols) codes · scales in float32, cast to `dtype`."""
        return (self.codes.float() * self.scales.float()[:, None]).to(dtype)


@dataclasses.dataclass
class Artifact:
    """What the container holds: the model config (CrawlerConfig.to_dict()), one entry per state-dict
    tensor, either a QuantizedTensor or a passthrough tensor in fp32 / fp16 / bf16, and the identity
    {"sha256", "vocab_size"} of the tokenizer the weights were trained with (None when unknown)."""
    config: dict
    tensors: dict[str, QuantizedTensor | torch.Tensor]
    tokenizer: dict | None = None

    def scheme(self, name: str) -> str:
        t = self.tensors[name]
        if isinstance(t, QuantizedTensor):
            return t.scheme
        for scheme, dtype in PASSTHROUGH_DTYPES.items():
            if t.dtype == dtype:
                return scheme
        raise ValueError(f"tensor {name!r}: passthrough dtype must be one of "
                         f"{sorted(PASSTHROUGH_DTYPES)}, got {t.dtype}")

    def schemes(self) -> dict[str, str]:
        return {name: self.scheme(name) for name in self.tensors}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The dequantised state dict (quantised matrices in float32; passthrough tensors as stored)."""
        return {name: t.dequantize() if isinstance(t, QuantizedTensor) else t
                for name, t in self.tensors.items()}


def dequantize_into(model: torch.nn.Module, artifact: Artifact, device=None) -> torch.nn.Module:
    """Load the artifact's dequantised weights into `model` (a CrawlerGPT of the artifact's config) via
    `load_state_into`: strict, cast to each parameter's dtype, `device` for a meta-device model."""
    return load_state_into(model, artifact.state_dict(), device)


def model_from_artifact(artifact: Artifact | str | os.PathLike, *, device="cpu", ops="auto") -> CrawlerGPT:
    """A CrawlerGPT of the artifact's config holding its dequantised weights, on `device`, in eval mode.

    `artifact` is an Artifact or a file path (read with `load_artifact`). Built on the meta device, so no
    weight is initialised only to be overwritten. Raises FileNotFoundError (no such file) or ArtifactError
    (not an artifact, truncated, corrupt, or a config/tensors that do not make a CrawlerGPT), naming it.
    """
    where = "artifact" if isinstance(artifact, Artifact) else f"artifact {str(artifact)!r}"
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    try:
        with torch.device("meta"):
            model = CrawlerGPT(CrawlerConfig.from_dict(artifact.config), ops=ops)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: invalid model config ({e})") from None
    try:
        dequantize_into(model, artifact, device=device)
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Encoding

def byte_shuffle(data: bytes, stride: int = SHUFFLE_STRIDE) -> bytes:
    """All bytes at offsets ≡ 0 (mod stride), then ≡ 1, ...: groups the high and low bytes of fp16
    values (and of the safetensors header) so brotli sees more regular streams."""
    return b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(data: bytes, stride: int = SHUFFLE_STRIDE) -> bytes:
    """Exact inverse of byte_shuffle for the same stride."""
    n = len(data)
    out = bytearray(n)
    start = 0
    for i in range(stride):
        count = (n - i + stride - 1) // stride      # offsets i, i + stride, ... below n
        out[i::stride] = data[start:start + count]
        start += count
    return bytes(out)


def _safetensors_bytes(artifact: Artifact) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for name, t in artifact.tensors.items():
        if isinstance(t, QuantizedTensor):
            tensors[f"{name}.q"] = t.codes.detach().cpu().contiguous()
            tensors[f"{name}.scale"] = t.scales.detach().cpu().contiguous()
        else:
            artifact.scheme(name)  # validates the passthrough dtype
            tensors[name] = t.detach().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "config": artifact.config, "schemes": artifact.schemes()}
    if artifact.tokenizer is not None:
        meta["tokenizer"] = artifact.tokenizer
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    return safetensors_save(tensors, metadata=metadata)


def frame_payload(payload: bytes, decompressed_bytes: int, version: int = FORMAT_VERSION) -> bytes:
    """A file's contents: the header (version `version`) + `payload`, the brotli stream of
    `decompressed_bytes` bytes; the header's SHA-256 covers the header fields and the payload."""
    fields = _PREFIX.pack(MAGIC, version) + struct.pack("<QQ", len(payload), decompressed_bytes)
    return fields + hashlib.sha256(fields + payload).digest() + payload


def brotli_module():
    """The brotli module, imported only where an artifact (or the code size) is compressed or read, so
    that the model and the kernels import without it (the GPU machine has no brotli). SetupError naming
    the fix when it is missing."""
    try:
        import brotli
    except ImportError as e:
        raise SetupError(f"brotli is not installed ({e}): artifacts are brotli-compressed; pip install brotli "
                         f"(without network, carry its wheel: `make gpu-wheels`, docs/benchmarks.md)") from None
    return brotli


def encode_artifact(artifact: Artifact, quality: int = BROTLI_QUALITY) -> bytes:
    """The complete file contents (header + compressed payload) for `artifact`. `quality` is brotli's
    (11, the format's, by default; lower values only for quick previews: sizes are not comparable)."""
    raw = byte_shuffle(_safetensors_bytes(artifact))
    return frame_payload(brotli_module().compress(raw, quality=quality, lgwin=BROTLI_LGWIN), len(raw))


def save_artifact(artifact: Artifact, path: str | os.PathLike) -> int:
    """Write `artifact` to `path` atomically (a temporary file replaces `path` only when complete).
    Returns the file size in bytes; crawler.fileio.WriteError when the file cannot be written."""
    blob = encode_artifact(artifact)
    write_bytes(path, blob)
    return len(blob)


# --------------------------------------------------------------------------------------------------
# Decoding (never executes anything: struct, hashlib, brotli, JSON and the safetensors parser only)

def _parse_header_json(raw: bytes, where: str) -> dict:
    """The safetensors JSON header, read by hand so its metadata is checked before any tensor."""
    if len(raw) < 8:
        raise ArtifactError(f"{where}: corrupt: payload too short for a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ArtifactError(f"{where}: corrupt: safetensors header length {n} exceeds the payload")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{where}: corrupt: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: corrupt: safetensors header is not a JSON object")
    return header


def _decompress(payload: bytes, limit: int, where: str) -> bytes:
    """The brotli stream `payload` decompressed; refused as corrupt as soon as the output grows past
    `limit` bytes (so it never allocates much beyond it) or the stream ends early."""
    brotli = brotli_module()
    decoder = brotli.Decompressor()
    parts, total, pending = [], 0, payload
    try:
        while True:
            part = decoder.process(pending, output_buffer_limit=limit - total + 1)
            pending = b""
            parts.append(part)
            total += len(part)
            if total > limit:
                raise ArtifactError(f"{where}: corrupt: the payload decompresses to more than {limit:,} bytes")
            if decoder.is_finished():
                return b"".join(parts)
            if decoder.can_accept_more_data():
                raise ArtifactError(f"{where}: corrupt: the payload's brotli stream ends early")
    except TypeError:   # brotli < 1.2 has no output_buffer_limit
        raise ArtifactError(f"{where}: brotli {brotli.__version__} cannot bound decompression "
                            f"(output_buffer_limit): install brotli>=1.2") from None
    except brotli.error as e:
        raise ArtifactError(f"{where}: corrupt: payload does not decompress ({e})") from None


def _unframe(blob: bytes, where: str) -> tuple[int, bytes, int]:
    """(format version, payload, the most bytes it may decompress to) of a whole file's bytes, once the
    magic, the size and the checksum are checked."""
    if len(blob) < len(MAGIC) or blob[:len(MAGIC)] != MAGIC:
        raise ArtifactError(f"{where}: not a crawler artifact (bad magic {bytes(blob[:len(MAGIC)])!r}, "
                            f"expected {MAGIC!r})")
    version = _PREFIX.unpack_from(blob)[1] if len(blob) >= _PREFIX.size else None
    if version == 1:
        return _unframe_v1(blob, where)
    if len(blob) < HEADER_BYTES:
        raise ArtifactError(f"{where}: truncated: expected at least {HEADER_BYTES} bytes of header, "
                            f"got {len(blob)}")
    _, _, length, decompressed, digest = _HEADER.unpack_from(blob)
    expected = HEADER_BYTES + length
    if len(blob) < expected:
        raise ArtifactError(f"{where}: truncated: expected {expected} bytes, got {len(blob)}")
    if len(blob) > expected:
        raise ArtifactError(f"{where}: corrupt: {len(blob) - expected} trailing bytes after the "
                            f"{expected}-byte artifact")
    payload = blob[HEADER_BYTES:]
    if hashlib.sha256(blob[:_DIGESTED_HEADER_BYTES] + payload).digest() != digest:
        raise ArtifactError(f"{where}: corrupt: SHA-256 of the header and payload does not match the "
                            f"header's")
    if version > FORMAT_VERSION:   # the checksum holds, so the version is what the writer wrote
        raise ArtifactError(f"{where}: written by a newer version (artifact format {version}; this reader "
                            f"supports up to {FORMAT_VERSION}); upgrade crawler-kernels")
    if version < 1:
        raise ArtifactError(f"{where}: corrupt: invalid format version {version}")
    if decompressed > MAX_PAYLOAD_BYTES:
        raise ArtifactError(f"{where}: corrupt: the header declares {decompressed:,} decompressed bytes, "
                            f"more than the {MAX_PAYLOAD_BYTES:,} any artifact may hold")
    return version, payload, decompressed


def _unframe_v1(blob: bytes, where: str) -> tuple[int, bytes, int]:
    """Format 1: the checksum covers the payload only and the decompressed size is not declared, so it
    is bounded by FORMAT_1_MAX_PAYLOAD_BYTES, what a budget-sized artifact can hold."""
    if len(blob) < _HEADER_V1.size:
        raise ArtifactError(f"{where}: truncated: expected at least {_HEADER_V1.size} bytes of header, "
                            f"got {len(blob)}")
    _, _, length, digest = _HEADER_V1.unpack_from(blob)
    expected = _HEADER_V1.size + length
    if len(blob) < expected:
        raise ArtifactError(f"{where}: truncated: expected {expected} bytes, got {len(blob)}")
    if len(blob) > expected:
        raise ArtifactError(f"{where}: corrupt: {len(blob) - expected} trailing bytes after the "
                            f"{expected}-byte artifact")
    payload = blob[_HEADER_V1.size:]
    if hashlib.sha256(payload).digest() != digest:
        raise ArtifactError(f"{where}: corrupt: SHA-256 of the payload does not match the header")
    warnings.warn(f"{where} is artifact format 1 (its header is not covered by the checksum and it records "
                  f"no tokenizer): it loads; re-export it with python -m crawler.quantize to upgrade",
                  UnverifiedWarning, stacklevel=4)
    return 1, payload, FORMAT_1_MAX_PAYLOAD_BYTES


def _check_tokenizer_entry(entry, where: str) -> None:
    """ArtifactError unless the metadata's tokenizer identity is absent or {"sha256": hex, "vocab_size": int}."""
    if entry is None:
        return
    if not (isinstance(entry, dict) and set(entry) == {"sha256", "vocab_size"}
            and isinstance(entry["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            and type(entry["vocab_size"]) is int and entry["vocab_size"] > 0):
        raise ArtifactError(f"{where}: corrupt: metadata 'tokenizer' must be {{'sha256': 64 hex digits, "
                            f"'vocab_size': a positive int}}, got {str(entry)[:120]}")


def decode_artifact(blob: bytes, where: str = "<bytes>") -> Artifact:
    """Parse a whole artifact file's bytes. Raises ArtifactError naming `where` and the problem:
    "not a crawler artifact" (bad magic), "written by a newer version", "truncated: expected N bytes,
    got M", "corrupt" (checksum mismatch, an undecodable or oversized payload, metadata or tensors
    that do not fit), "invalid model config" (outside CrawlerConfig's bounds, checked before any
    tensor is parsed)."""
    version, payload, limit = _unframe(blob, where)
    raw = _decompress(payload, limit, where)
    if version >= 2 and len(raw) != limit:
        raise ArtifactError(f"{where}: corrupt: the payload decompresses to {len(raw):,} bytes, the header "
                            f"declares {limit:,}")
    raw = byte_unshuffle(raw)

    meta = (_parse_header_json(raw, where).get("__metadata__") or {}).get(METADATA_KEY)
    try:
        meta = json.loads(meta)
    except (TypeError, json.JSONDecodeError):
        raise ArtifactError(f"{where}: corrupt: no readable {METADATA_KEY!r} metadata entry") from None
    if not isinstance(meta, dict) or meta.get("format_version") != version:
        raise ArtifactError(f"{where}: corrupt: inner format version "
                            f"{meta.get('format_version') if isinstance(meta, dict) else None!r} disagrees "
                            f"with the header's {version}")
    config, schemes = meta.get("config"), meta.get("schemes")
    if not isinstance(config, dict) or not isinstance(schemes, dict):
        raise ArtifactError(f"{where}: corrupt: metadata 'config' and 'schemes' must be JSON objects")
    try:   # bounded sizes (CrawlerConfig.validate) before a tensor is parsed or a module built
        CrawlerConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: invalid model config ({e})") from None
    _check_tokenizer_entry(meta.get("tokenizer"), where)
    try:
        stored = safetensors_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{where}: corrupt: safetensors payload ({e})") from None

    tensors: dict[str, QuantizedTensor | torch.Tensor] = {}
    used: set[str] = set()
    for name, scheme in schemes.items():
        m = _QUANT_SCHEME.match(str(scheme))
        if m:
            keys = (f"{name}.q", f"{name}.scale")
            if any(k not in stored for k in keys):
                raise ArtifactError(f"{where}: tensor {name!r} ({scheme}) lacks {keys[0]!r} or {keys[1]!r}")
            try:
                q = QuantizedTensor(stored[keys[0]], stored[keys[1]], int(m.group(1)), m.group(2))
            except ValueError as e:
                raise ArtifactError(f"{where}: tensor {name!r}: {e}") from None
            if q.codes.numel() and int(q.codes.abs().max()) > q.clip_range:
                raise ArtifactError(f"{where}: tensor {name!r}: codes outside [-{q.clip_range}, "
                                    f"{q.clip_range}] for {scheme}")
            tensors[name] = q
            used.update(keys)
        elif scheme in PASSTHROUGH_DTYPES:
            if name not in stored or stored[name].dtype != PASSTHROUGH_DTYPES[scheme]:
                raise ArtifactError(f"{where}: tensor {name!r} missing or not stored as {scheme}")
            tensors[name] = stored[name]
            used.add(name)
        else:
            raise ArtifactError(f"{where}: tensor {name!r} has unknown scheme {scheme!r}")
    extra = sorted(set(stored) - used)
    if extra:
        raise ArtifactError(f"{where}: corrupt: stored tensors without a scheme: {extra[:5]}")
    return Artifact(config=config, tensors=tensors, tokenizer=meta.get("tokenizer"))


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and validate an artifact file (see decode_artifact for the errors). Raises MissingFileError
    (a FileNotFoundError) when it does not exist, and ArtifactError when it is not a readable file or is
    larger than MAX_FILE_BYTES (checked before reading it)."""
    path = Path(path)
    where = f"artifact {str(path)!r}"
    try:
        if path.exists() and not path.is_file():
            raise ArtifactError(f"{where} is not a file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ArtifactError(f"{where} is {size:,} bytes, more than any artifact may be "
                                f"({MAX_FILE_BYTES:,}): not an artifact")
        blob = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{where} does not exist") from None
    except OSError as e:
        raise ArtifactError(f"{where} cannot be read ({e.strerror or e})") from None
    return decode_artifact(blob, where=where)
