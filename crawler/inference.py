"""Int6 inference (docs/math.md §5): a CrawlerGPT that computes on an artifact's codes, and generation.

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
(blocks, attention, schedule); only the modules differ.

Generation. `Decoder(model, batch, max_len)` decodes incrementally with a per-schedule-position KV cache
(crawler.model.KVCache) and works for the float and the int6 model alike; on CUDA with Triton ops its
one-token step is a CUDA graph on a static cache. `generate(model, prompt_ids, ...)` is one generation
with a decoder of its own.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

import kernels
from kernels.modules import Int6Linear, autocast_input
from kernels.reference import bigram_hash, document_starts, relu2, rms_norm, smear

from .artifact import Artifact, ArtifactError, QuantizedTensor, load_artifact, load_state_into
from .config import CrawlerConfig
from .documents import Documents
from .errors import SetupError
from .model import CastedLinear, CrawlerGPT, KVCache
from .runtime import autocast, eval_mode, resolve_ops

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


# --------------------------------------------------------------------------------------------------
# Generation

# RoPE positions are float32 (kernels.reference.rope_cos_sin): integers are exact up to 2^24, so that many
# positions are the most a sequence can hold and still tell its tokens apart.
MAX_POSITIONS = 2 ** 24


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation on `device` can take now: free CUDA memory plus what torch's caching
    allocator holds unused; on a CPU, MemAvailable of /proc/meminfo; None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def kv_cache_bytes(model: CrawlerGPT, batch: int, max_len: int, device: torch.device) -> int:
    """Bytes of a KVCache of `model` for batch × max_len tokens on `device`: k and v at every schedule
    position in the dtype attention sees under crawler.runtime.autocast (its dtype where it is on, else
    the model's float dtype), plus the int64 token ids."""
    with autocast(device):
        on = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if on else next(
            p.dtype for p in model.parameters() if p.is_floating_point())
    c = model.config
    per_token = 2 * c.num_positions * c.kv_dim * dtype.itemsize + 8
    return batch * max_len * per_token


def check_decode_length(model: CrawlerGPT, batch: int, max_len: int, device: torch.device,
                        asked: str | None = None) -> None:
    """SetupError unless a KV cache of batch × max_len tokens fits the model and the device, checked before
    anything is allocated: at most MAX_POSITIONS positions, and kv_cache_bytes within available_memory.
    `asked` says what the caller asked for, for the message (default: max_len)."""
    asked = asked or f"max_len {max_len:,}"
    if max_len > MAX_POSITIONS:
        raise SetupError(f"{asked}: {max_len:,} positions, more than the {MAX_POSITIONS:,} the model's "
                         f"float32 RoPE positions can tell apart (it was trained on {model.config.train_seq_len:,}); "
                         f"ask for fewer tokens")
    need, have = kv_cache_bytes(model, batch, max_len, device), available_memory(device)
    if have is not None and need > have:
        raise SetupError(f"{asked}: the KV cache of {batch} x {max_len:,} tokens needs {need / 2**30:,.2f} GiB, "
                         f"{device} has {have / 2**30:,.2f} GiB available; ask for fewer tokens")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax for temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (all when top_k is None)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _prompt_batch(prompt_ids) -> tuple[torch.Tensor, bool]:
    """(ids (B, T), whether the prompt was 1-D), or ValueError naming prompt_ids."""
    ids = torch.as_tensor(prompt_ids)
    squeeze = ids.dim() == 1
    ids = ids[None] if squeeze else ids
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"prompt_ids: expected (T,) or (B, T) int ids with T >= 1, got {ids.dtype} "
                         f"{tuple(torch.as_tensor(prompt_ids).shape)}")
    return ids, squeeze


def _check_sampling(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")


class Decoder:
    """Incremental decoding of `model` (the float or the int6 CrawlerGPT) for `batch` sequences of up to
    `max_len` tokens each (prompt + new ones), with one KV cache reused by every generation.

    The prompt runs once (its keys and values cached at every schedule position), then each new token
    costs one single-token step. With Triton ops the cache is static (KVCache(on_device=True)) and a
    step after the first two tokens keeps its position on the device; on CUDA (`cuda_graph` None or
    True) that step is captured once as a CUDA graph, after one eager warm-up step (autotuning and lazy
    allocations happen there, never inside the capture), and replayed for every later token of this and
    later generations: one launch a token instead of one per kernel. `cuda_graph=False` runs every step
    eagerly on the same cache and kernels, so graphed and eager decoding compute the same numbers and
    pick the same tokens. Elsewhere (CPU, reference ops) every step is eager over views of the cache.
    `max_len` is checked against the model's positions and the device's memory before anything is
    allocated (`check_decode_length`, a SetupError). `replays` counts the steps of the last generation
    that ran from the graph.
    """

    def __init__(self, model: CrawlerGPT, batch: int, max_len: int, *, cuda_graph: bool | None = None,
                 asked: str | None = None):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        self.model = model
        self.device = next(model.parameters()).device
        check_decode_length(model, batch, max_len, self.device, asked)
        device_steps = model.resolve_ops(self.device) == "triton"
        can_graph = device_steps and self.device.type == "cuda"
        if cuda_graph and not can_graph:
            raise ValueError(f"cuda_graph: a CUDA graph needs a model on a CUDA device running Triton ops, got "
                             f"{self.device} with ops {model.ops!r}")
        self.cuda_graph = can_graph if cuda_graph is None else bool(cuda_graph)
        self.batch = batch
        self.cache = KVCache(model.config, max_len, on_device=device_steps)
        self.replays = 0
        self._warmed_up = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids: torch.Tensor | None = None         # the captured step's input (B, 1) and output (B, V)
        self._logits: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the last of ids' (B, T) tokens, after the cached ones (which ids then join)."""
        return self.model.head_logits(self.model.forward_hidden(ids, self.cache)[:, -1])

    def _warm_up(self, ids: torch.Tensor) -> torch.Tensor:
        """One eager step on a side stream (as CUDA graph capture wants: lazy initialisation off the
        capture stream)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            logits = self._forward(ids)
        current.wait_stream(side)
        self._warmed_up = True
        return logits

    def _capture(self, ids: torch.Tensor) -> None:
        """Record the one-token step on the static input self._ids; nothing runs while capturing."""
        self._ids = ids.clone()
        graph = torch.cuda.CUDAGraph()
        length = self.cache.length
        kind = self.device.type
        # autocast's cast cache off: a cast cached outside the graph could be freed while the graph reads it
        with torch.cuda.graph(graph), torch.autocast(kind, dtype=torch.get_autocast_dtype(kind),
                                                     enabled=torch.is_autocast_enabled(kind), cache_enabled=False):
            self._logits = self._forward(self._ids)
        self.cache.length = length      # the host count the capture advanced: the step is still to run
        self._graph = graph

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of one new token per sequence, ids (B, 1): from the graph once it exists."""
        if not (self.cuda_graph and self.cache.device_step(1)):
            return self._forward(ids)
        if not self._warmed_up:
            return self._warm_up(ids)
        if self._graph is None:
            self._capture(ids)
        self._ids.copy_(ids)
        self._graph.replay()
        self.cache.length += 1          # the replay advanced the device-side position; the host count follows
        self.replays += 1
        return self._logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0, *, eos_id: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
        """Sample a continuation of `prompt_ids` (T,) or (B, T) int (B = the decoder's batch, T >= 1,
        T + max_new_tokens <= max_len); arguments and result as `generate`'s."""
        ids, squeeze = _prompt_batch(prompt_ids)
        _check_sampling(max_new_tokens, temperature, top_k)
        if ids.shape[0] != self.batch:
            raise ValueError(f"prompt_ids: batch {ids.shape[0]} differs from the decoder's {self.batch}")
        if ids.shape[1] + max_new_tokens > self.cache.max_len:
            raise ValueError(f"max_new_tokens: {max_new_tokens} after a prompt of {ids.shape[1]} exceed the "
                             f"decoder's max_len {self.cache.max_len}")
        ids = ids.long().to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache.reset()
        self.replays = 0
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        out = [ids]
        with eval_mode(self.model), autocast(self.device):
            # the head runs on the last position only: a prompt's other logits are never used
            logits = self._forward(ids) if max_new_tokens else None
            for i in range(max_new_tokens):
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = float("-inf")
                new = sample_next(logits, temperature, top_k, generator)
                if eos_id is not None:
                    new = new.masked_fill(done, eos_id)
                    done |= new == eos_id
                out.append(new[:, None])
                if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                    break
                logits = self._step(new[:, None])
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result


def generate(model: CrawlerGPT, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, *, eos_id: int | None = None,
             vocab_limit: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Sample a continuation of `prompt_ids` with incremental (KV-cached) decoding (a `Decoder` of its own).

    prompt_ids (T,) or (B, T) int, T >= 1. temperature 0 = greedy; otherwise softmax sampling at that
    temperature over the top_k logits, seeded by `seed` (a generator on the model's device: the same
    seed, device and model give the same tokens). With `eos_id`, a sequence that emits it is finished
    (later positions repeat eos_id) and decoding stops once all are. `vocab_limit` masks ids >= it (model
    rows a tokenizer cannot decode). `cuda_graph` as Decoder's (None: a CUDA graph where one can run).
    A request the model's positions or the device's memory cannot hold is a SetupError, raised before
    anything is allocated. Returns prompt + new ids, (T + n,) or (B, T + n) int64 on the model's device,
    n <= max_new_tokens. Runs in crawler.runtime's eval_mode and autocast (restored afterwards; bf16 on
    CUDA) like evaluation.
    """
    ids, _ = _prompt_batch(prompt_ids)
    _check_sampling(max_new_tokens, temperature, top_k)
    B, T = ids.shape
    decoder = Decoder(model, B, T + max_new_tokens, cuda_graph=cuda_graph,
                      asked=f"max_new_tokens {max_new_tokens:,} after a prompt of {T} tokens")
    return decoder.generate(prompt_ids, max_new_tokens, temperature, top_k, seed, eos_id=eos_id,
                            vocab_limit=vocab_limit)
