"""Int6 inference (docs/math.md §5): a CrawlerGPT that computes on an artifact's codes.

`load_int6_model(artifact, device, ops)` builds an `Int6CrawlerGPT` straight from an artifact: the model
is constructed on the meta device, every quantised matrix's module is swapped for a code-holding one, and
only then are tensors allocated, so no full-precision copy of a quantised weight ever exists:
  * block Linears, bigram.proj (and ve.proj when quantised) -> `kernels.modules.Int6Linear`, the package's
    one int6 linear: buffers `packed` uint8 (N, 3K/4) + `scales` fp16 (N,); forward = int6_linear;
  * tok_emb, bigram.table, ve.table -> `QuantEmbedding` around the same module, whose rows are gathered
    (only the looked-up rows are dequantised); tok_emb's matrix also serves as the tied LM head.
Codes the int6 packing cannot hold, those of a 7- or 8-bit plan (e.g. tok_emb int8 k=20) or of a matrix
whose K is not a multiple of 4, go to `Int8Linear` instead: int8 `codes` (N, K) multiplied 256 rows at a
time (like kernels.reference.int6_linear), never dequantised whole. It lives here, not in kernels, because
which codes exist beyond int6 is the artifact's business (the quantisation plan's bits), and no kernel
serves them. Passthrough tensors load as in the float model. Everything else is CrawlerGPT's own code
(blocks, attention, schedule); only the modules differ. Generation, for this model and the float one
alike, is crawler.decoding's.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

import kernels
from kernels.modules import Int6Linear, autocast_input
from kernels.reference import bigram_hash, document_starts, relu2, rms_norm, smear

from .artifact import Artifact, ArtifactError, QuantizedTensor, load_artifact
from .config import CrawlerConfig
from .documents import Documents
from .model import CastedLinear, CrawlerGPT, load_state_into
from .runtime import resolve_ops

INT6_MAX_BITS = 6                                    # codes of up to 6 bits fit the packed int6 layout
ROW_TILE = kernels.reference.INT6_REF_ROW_TILE       # weight rows dequantised at a time on the int8 path


class Int8Linear(nn.Module):
    """Bias-free Linear on int8 codes, for the codes `Int6Linear` cannot pack (see the module docstring):
    buffers `codes` int8 (out, in), `scales` fp16 (out,). forward(x (..., in)) -> (..., out) in x's dtype
    (the autocast dtype under autocast), 256 weight rows dequantised at a time; `weight_rows(idx)` and
    `codes_state(codes, scales)` as Int6Linear's."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16))

    @staticmethod
    def codes_state(codes: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": codes, "scales": scales.to(torch.float16)}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 codes"

    def weight_rows(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1).long()
        return kernels.reference.dequantize(self.codes[flat], self.scales[flat]).view(*idx.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for n0 in range(0, self.out_features, ROW_TILE):
            tile = slice(n0, n0 + ROW_TILE)
            out[..., tile] = x @ kernels.reference.dequantize(self.codes[tile], self.scales[tile]).to(x.dtype).T
        return out


def quantized_linear(in_features: int, out_features: int, bits: int, ops: str) -> Int6Linear | Int8Linear:
    """The module that holds a quantised (out, in) matrix of `bits`-bit codes: Int6Linear (on `ops`,
    "triton" or "reference") when the int6 packing can hold them (bits <= 6, in % 4 == 0), else Int8Linear."""
    if bits <= INT6_MAX_BITS and in_features % 4 == 0:
        return Int6Linear(in_features, out_features, ops=ops)
    return Int8Linear(in_features, out_features)


class QuantEmbedding(nn.Module):
    """Embedding table on codes: `matrix` (Int6Linear or Int8Linear, see `quantized_linear`) holds the
    (num_embeddings, embedding_dim) table. forward(ids (...)) -> rows (..., dim) in `dtype` (the float
    model's table dtype, config.embed_dtype), dequantised per gathered row; `linear(x)` gives the tied
    head's x @ tableᵀ."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, ops: str, dtype: torch.dtype):
        super().__init__()
        self.matrix = quantized_linear(embedding_dim, num_embeddings, bits, ops)
        self.dtype = dtype

    def codes_state(self, codes: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"matrix.{n}": t for n, t in self.matrix.codes_state(codes, scales).items()}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix.weight_rows(ids).to(self.dtype)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x)


def _code_matrix(module: nn.Module) -> nn.Module:
    """The module that holds a quantised matrix's codes (an embedding's `matrix`)."""
    return module.matrix if isinstance(module, QuantEmbedding) else module


class Int6MLP(nn.Module):
    """The block MLP with code-holding fc / proj: proj(relu2(fc(h))) (the float MLP hands its weights to
    the fused relu2_mlp op instead, which a quantised weight cannot feed)."""

    def __init__(self, fc: nn.Module, proj: nn.Module, negative_slope: float):
        super().__init__()
        self.fc, self.proj, self.negative_slope = fc, proj, negative_slope

    def forward(self, h: torch.Tensor, ops: str) -> torch.Tensor:
        return self.proj(relu2(self.fc(h), self.negative_slope))


class Int6CrawlerGPT(CrawlerGPT):
    """CrawlerGPT whose quantised matrices are code-holding modules (see the module docstring).

    `quantized` maps state-dict names of quantised weights to their bits, e.g.
    {"flat_blocks.0.attn.c_q.weight": 6, "tok_emb.weight": 8}. The model is created on the meta device
    with those modules swapped in; fill it with `load_int6_model` (or `load_state_into` with the
    modules' `codes_state` output and the passthrough tensors). `ops` is the model's (as CrawlerGPT's);
    its int6 matmuls run on `resolve_ops(ops, device)` for the `device` the model is to be loaded on
    (Triton on CUDA under "auto"). Inference only (no autograd through codes).
    """

    def __init__(self, config: CrawlerConfig, quantized: dict[str, int], ops: str = "auto", device="cpu"):
        with torch.device("meta"):       # nothing is allocated: the weights come from the artifact
            super().__init__(config, ops)
            matmul_ops = resolve_ops(ops, device)
            names = set(self.state_dict())
            unknown = sorted(set(quantized) - names)
            if unknown:
                raise ValueError(f"quantised tensors {unknown[:5]} are not in the config's model")
            for name, bits in quantized.items():
                path, _, attr = name.rpartition(".")
                module = self.get_submodule(path)
                if attr != "weight" or not isinstance(module, (CastedLinear, nn.Embedding)):
                    raise ValueError(f"{name}: only Linear and embedding weights can be quantised")
                rows, cols = module.weight.shape
                if isinstance(module, nn.Embedding):
                    new = QuantEmbedding(rows, cols, bits, matmul_ops, module.weight.dtype)
                else:
                    new = quantized_linear(cols, rows, bits, matmul_ops)
                parent, _, child = path.rpartition(".")
                setattr(self.get_submodule(parent), child, new)
            for block in [*self.flat_blocks, *self.crawler_blocks]:
                if not (isinstance(block.mlp.fc, CastedLinear) and isinstance(block.mlp.proj, CastedLinear)):
                    block.mlp = Int6MLP(block.mlp.fc, block.mlp.proj, block.mlp.negative_slope)

    def embed_input(self, input_ids: torch.Tensor, ops: str, bos_id: int | None = None) -> torch.Tensor:
        """x0 = smear(rms_norm(tok_emb[ids] + bigram(ids))) from gathered rows, in float32 as the fused
        op computes it (autocast off), returned in the table dtype; `bos_id` as in CrawlerGPT."""
        with torch.autocast(input_ids.device.type, enabled=False):
            tok = self.tok_emb(input_ids)
            rows = self.bigram.table(bigram_hash(input_ids, self.config.bigram_buckets, bos_id))
            cd = torch.float64 if tok.dtype == torch.float64 else torch.float32
            x = tok.to(cd) + self.bigram.proj(rows.to(cd))
            starts = None if bos_id is None else document_starts(input_ids, bos_id)
            return smear(rms_norm(x), self.smear.gate.to(cd), starts).to(tok.dtype)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Softcapped tied head on tok_emb's codes: softcap · tanh(int6_linear(hidden) / softcap)."""
        if not isinstance(self.tok_emb, QuantEmbedding):
            return super().head_logits(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(self.tok_emb.linear(hidden) / cap)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor,
                documents: Documents | None = None) -> torch.Tensor:
        """Mean cross-entropy (0-d float32) over all targets, on float32 logits of the int6 head;
        `documents` as in CrawlerGPT.forward_hidden."""
        if target_ids.shape != input_ids.shape:
            raise ValueError(f"target_ids: expected shape {tuple(input_ids.shape)}, got {tuple(target_ids.shape)}")
        return self.token_nll(input_ids, target_ids, documents).mean()


def _codes_state(module: nn.Module, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The buffers (name relative to `module` -> tensor) that hold the artifact entry `q` in `module`,
    a quantised matrix's module of Int6CrawlerGPT."""
    matrix = module.matrix if isinstance(module, QuantEmbedding) else module
    shape = (matrix.out_features, matrix.in_features)
    if tuple(q.codes.shape) != shape:
        raise ValueError(f"quantised tensor int{q.bits} {tuple(q.codes.shape)} does not fit its module's "
                         f"shape {shape}")
    return module.codes_state(q.codes, q.scales)


def load_int6_model(artifact: Artifact | str | os.PathLike, device="cpu", ops: str = "auto") -> Int6CrawlerGPT:
    """An Int6CrawlerGPT in eval mode on `device` from an artifact file (or a decoded Artifact).

    Quantised weights are packed to int6 (or kept as int8 codes above 6 bits) and moved to `device`;
    passthrough tensors load into their parameters (cast to the parameters' dtypes). Raises
    crawler.artifact.ArtifactError (a ValueError) for an unreadable file and for tensors that do not
    match its config's model, naming the file and the problem.
    """
    where = "artifact" if isinstance(artifact, Artifact) else f"artifact {str(artifact)!r}"
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    try:
        config = CrawlerConfig.from_dict(artifact.config)
        quantized = {n: t for n, t in artifact.tensors.items() if isinstance(t, QuantizedTensor)}
        model = Int6CrawlerGPT(config, {n: q.bits for n, q in quantized.items()}, ops, device)
        state: dict[str, torch.Tensor] = {}
        for name, t in artifact.tensors.items():
            if name in quantized:
                path = name.rsplit(".", 1)[0]
                try:
                    buffers = _codes_state(model.get_submodule(path), t)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                state.update({f"{path}.{b}": v for b, v in buffers.items()})
            else:
                state[name] = t
        return load_state_into(model, state, device).eval()
    except ArtifactError:
        raise
    except ValueError as e:
        raise ArtifactError(f"{where}: {e}") from None
