"""CrawlerGPT: the crawler transformer of PR #1579 ("3f+2cx2"), exactly per docs/math.md §1.

Parameter and module names follow PR #1579 so its `final_model.pt` state dict loads with strict=True.
The ops (attention, embedding, MLP, head loss) come from `kernels`: the plain-PyTorch references or
the Triton kernels, picked by `ops` ("reference" | "triton" | "auto" = Triton on CUDA, reference on CPU).
With `documents` (crawler.documents) the forward is document-isolated: attention runs varlen over the
batch's segments and the embedding starts a document at every BOS.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.attention import padded_head_dim
from kernels.modules import BIGRAM_TABLE_STD, select_op
from kernels.reference import quant_max, rms_norm, rope

from .config import PASSTHROUGH_NUMEL, QAT_BITS, CrawlerConfig
from .documents import Documents, ops_isolate_documents
from .runtime import check_ops, resolve_ops

if TYPE_CHECKING:        # the KV cache is decoding's (crawler.decoding); a training or scoring run never loads it
    from .decoding import KVCache


def fake_quantize(w: torch.Tensor, bits: int = QAT_BITS) -> torch.Tensor:
    """QAT straight-through fake quantisation on the seed's grid (docs/math.md §2): forward sees
    clamp(round(w/s), -R-1, R)·s with R = 2^(bits-1) - 1 and the row scale s = max(amax_row|w| / R, 1e-8)
    ([-32, 31] for int6); the gradient passes to w unchanged. w (out, in), any float dtype."""
    R = quant_max(bits)
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / R).clamp_min(1e-8)
    w_q = torch.clamp(torch.round(w.detach() / scale), -R - 1, R) * scale
    return w + (w_q - w).detach()


class CastedLinear(nn.Linear):
    """Bias-free Linear with an fp32 master weight cast to the input's dtype at the matmul (the seed's
    CastedLinear). With `qat` on and `qat_bits` set (CrawlerGPT.configure_qat), the weight is
    fake-quantised on a `qat_bits` grid (STE)."""

    def __init__(self, in_features: int, out_features: int, *, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.qat = False        # QAT switched on now (set_qat; crawler.runtime.eval_mode turns it off)
        self.qat_bits = 0       # the grid QAT uses for this weight; 0: QAT never touches it

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass multiplies by: fake-quantised under QAT, else the weight."""
        if self.qat and self.qat_bits:
            return fake_quantize(self.weight, self.qat_bits)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype))


class BigramHash(nn.Module):
    """BigramHash v1 (docs/math.md §1.5): `table` (buckets, k) and `proj` k -> d (zero-init)."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.table = nn.Embedding(buckets, dim)
        self.proj = CastedLinear(dim, model_dim, zero_init=True)


class SmearGate(nn.Module):
    """SmearGate v2 (docs/math.md §1.6): one gate per channel, init 0 (σ = 0.5)."""

    def __init__(self, model_dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(model_dim))


class ValueEmbedding(nn.Module):
    """Value embedding (docs/math.md §1.7): `table` (V, ve_dim), `proj` ve_dim -> Hkv·D, one scale per position."""

    def __init__(self, vocab_size: int, ve_dim: int, kv_dim: int, num_positions: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, ve_dim)
        self.proj = CastedLinear(ve_dim, kv_dim)
        self.scales = nn.ParameterList([nn.Parameter(torch.tensor(1.0)) for _ in range(num_positions)])
        self.register_load_state_dict_pre_hook(lambda module, state, prefix, *_: seed_scale_shapes(state, prefix))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> unscaled value embedding (B, T, Hkv·D); positions multiply their own scale."""
        return self.proj(self.table(ids))


def seed_scale_shapes(state: dict[str, torch.Tensor], prefix: str = "ve.") -> dict[str, torch.Tensor]:
    """`state` with PR #1579's value-embedding scales made 0-d, in place: the seed stores each
    `ve.scales.{i}` with shape (1,), this model as a 0-d tensor (docs/math.md §1.11). `prefix` names
    the value embedding in `state` ("ve." in a whole model's state dict)."""
    for name in [n for n in state if n.startswith(prefix + "scales.")]:
        if state[name].shape == (1,):
            state[name] = state[name].reshape(())
    return state


def pad_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (..., D) zero-padded to (..., width): heads laid out with an aligned stride (padded_head_dim)."""
    return F.pad(x, (0, width - x.shape[-1])) if width != x.shape[-1] else x


class CausalSelfAttention(nn.Module):
    """q/k/v projections, per-head q/k rms_norm, partial RoPE, q_gain, GQA attention (+ XSA), out proj.

    The attention op sees every head zero-padded from D to padded_head_dim(D) columns (46 -> 48), so each
    head's rows start 16-byte aligned and the kernels load q/k/v/dz with 16-byte vectors; zeros change no
    score, output or gradient (the softmax scale stays 1/sqrt(D)), and the weights keep their shapes
    (docs/math.md §1.4, docs/ops.md "Head dims")."""

    def __init__(self, config: CrawlerConfig):
        super().__init__()
        d, kv = config.model_dim, config.kv_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rope_base, self.rope_freq_dtype = config.rope_base, getattr(torch, config.rope_freq_dtype)
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, kv)
        self.c_v = CastedLinear(d, kv)
        self.proj = CastedLinear(d, d, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((config.num_heads,), config.qk_gain_init))

    def forward(self, n: torch.Tensor, ve: torch.Tensor | None, use_xsa: bool, ops: str,
                cache: KVCache | None = None, position: int = 0,
                documents: Documents | None = None) -> torch.Tensor:
        """n (B, T, d) normalised input; ve (B, T, Hkv·D) or None. With a `cache`, n holds the tokens
        after the cached ones and schedule `position` selects the cache's k, v. With `documents`, the
        B·T tokens attend as the packed segments of `documents.cu_seqlens`. Returns (B, T, d)."""
        B, T, d = n.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.c_q(n).view(B, T, H, D)
        k = self.c_k(n).view(B, T, Hkv, D)
        v = self.c_v(n)
        if ve is not None:
            v = v + ve.to(v.dtype)
        v = v.view(B, T, Hkv, D)
        offset = cache.rope_offset(T) if cache is not None else 0
        # Under CUDA autocast rms_norm may run in fp32 while v stays bf16: attention takes one dtype.
        q = rope(rms_norm(q), self.rope_base, offset, self.rope_freq_dtype)
        k = rope(rms_norm(k), self.rope_base, offset, self.rope_freq_dtype).to(v.dtype)
        # Our ops fold q_gain into the kernel's score scale; an ops object (e.g. the seed's SDPA set) gets
        # q · q_gain, as the seed computes it.
        gain = {"q_gain": self.q_gain} if isinstance(ops, str) else {}
        if not gain:
            q = q * self.q_gain.to(q.dtype)[:, None]
        width = padded_head_dim(D)
        q, k, v = (pad_heads(t, width) for t in (q.to(v.dtype), k, v))
        attention = select_op(ops, "attention")
        kw = dict(causal=True, xsa=use_xsa, softmax_scale=1.0 / math.sqrt(D), **gain)
        if cache is not None:
            # Every key and value cached so far at this position, this step's last: the attention op
            # places the T queries at the last T key positions (causal bottom-right, XSA on their own v).
            y = cache.attend(position, q, k, v, ops, **kw)
        elif documents is None:
            y = attention(q, k, v, **kw)
        else:
            # (1, B·T, heads, width) views: the rows are one packed stream whose segments never cross a row.
            q, k, v = (t.reshape(1, B * T, t.shape[2], width) for t in (q, k, v))
            y = attention(q, k, v, cu_seqlens=documents.cu_seqlens, max_seqlen=documents.max_seqlen, **kw)
        # Dropping the pad copies y once; its gradient comes back zero-padded, so dz is aligned too.
        return self.proj(y[..., :D].reshape(B, T, d))


class MLP(nn.Module):
    """mlp(h) = proj(relu2(fc(h))) with relu² (or LeakyReLU(0.5)², a config option)."""

    def __init__(self, config: CrawlerConfig):
        super().__init__()
        self.fc = CastedLinear(config.model_dim, config.mlp_hidden)
        self.proj = CastedLinear(config.mlp_hidden, config.model_dim, zero_init=True)
        self.negative_slope = 0.5 if config.mlp_activation == "leaky_relu2" else 0.0

    def forward(self, h: torch.Tensor, ops: str) -> torch.Tensor:
        return select_op(ops, "relu2_mlp")(h, self.fc.effective_weight(), self.proj.effective_weight(),
                                           self.negative_slope)


class Block(nn.Module):
    """One transformer block (docs/math.md §1.4). Its per-position control vectors live on the model and are
    passed in, because the crawler blocks run at several schedule positions with different vectors."""

    def __init__(self, config: CrawlerConfig):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, x0, attn_scale, mlp_scale, resid_mix, ve, use_xsa: bool, ops: str,
                cache: KVCache | None = None, position: int = 0, documents: Documents | None = None):
        """x, x0 (B, T, d); attn_scale, mlp_scale (d,); resid_mix (2, d); ve (B, T, Hkv·D) or None;
        `cache` and schedule `position` for incremental decoding, `documents` for document-isolated
        attention (see CausalSelfAttention)."""
        mix = resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + attn_scale.to(x.dtype) * self.attn(rms_norm(x), ve, use_xsa, ops, cache, position, documents)
        return x + mlp_scale.to(x.dtype) * self.mlp(rms_norm(x), ops)


class CrawlerGPT(nn.Module):
    """The crawler transformer (docs/math.md §1): flat encoder blocks, `crawler_loops` passes over the shared
    crawler blocks (loop >= 1 damped by alpha), flat decoder blocks with a U-Net skip, tied softcapped head.

    forward(input_ids (B,T) int64, target_ids (B,T) int64, documents=None) -> 0-d mean loss (float32).
    forward_logits(input_ids) -> (B, T, V) softcapped logits.
    `set_active_loops(n)` runs n of the crawler loops (a progressive loop schedule); all by default.
    `documents` (crawler.documents.document_segments of input_ids) makes every forward document-isolated.
    """

    def __init__(self, config: CrawlerConfig, ops: str = "auto"):
        super().__init__()
        check_ops(ops)
        self.config, self.ops = config, ops
        self.isolates_documents = ops_isolate_documents(ops)   # decided once: forward only reads the flag
        c = config
        P = c.num_positions

        self.tok_emb = nn.Embedding(c.vocab_size, c.model_dim)
        self.bigram = BigramHash(c.bigram_buckets, c.bigram_dim, c.model_dim)
        self.smear = SmearGate(c.model_dim)
        self.ve = ValueEmbedding(c.vocab_size, c.ve_dim, c.kv_dim, c.ve_last_n) if c.ve_enabled else None
        self.flat_blocks = nn.ModuleList(Block(c) for _ in range(c.num_flat_blocks))
        self.crawler_blocks = nn.ModuleList(Block(c) for _ in range(c.num_crawler_blocks))
        # alpha (one per loop; alpha[0] never read): frozen while training unless train_alpha
        # (docs/math.md §1.3); set_active_loops keeps exactly the alphas of the running loops trainable.
        self.crawler_residual_scales = nn.ParameterList(
            nn.Parameter(torch.tensor(c.crawler_alpha_init)) for _ in range(c.crawler_loops))
        self.attn_scales = nn.Parameter(torch.ones(P, c.model_dim))
        self.mlp_scales = nn.Parameter(torch.ones(P, c.model_dim))
        self.resid_mixes = nn.Parameter(torch.stack((torch.ones(P, c.model_dim), torch.zeros(P, c.model_dim)), 1))
        self.skip_weights = nn.Parameter(torch.ones(c.num_skip_weights, c.model_dim))
        self._init_weights()
        self.set_active_loops(c.crawler_loops)
        self.configure_qat()

    def _init_weights(self) -> None:
        """docs/math.md §1.10: orthogonal Linears (× 1/sqrt(2P) for names ending in .proj), zero-init projections,
        N(0, tied_embed_init_std²) token embedding, N(0, 0.01²) bigram/VE tables."""
        nn.init.normal_(self.tok_emb.weight, std=self.config.tied_embed_init_std)
        nn.init.normal_(self.bigram.table.weight, std=BIGRAM_TABLE_STD)
        if self.ve is not None:
            nn.init.normal_(self.ve.table.weight, std=0.01)
        proj_scale = 1.0 / math.sqrt(2 * self.config.num_positions)
        for name, module in self.named_modules():
            if not isinstance(module, CastedLinear):
                continue
            if module.zero_init:
                nn.init.zeros_(module.weight)
            elif min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)
                if name.endswith(".proj"):
                    with torch.no_grad():
                        module.weight.mul_(proj_scale)
        embed_dtype = getattr(torch, self.config.embed_dtype)
        for table in self.embedding_tables():
            table.data = table.data.to(embed_dtype)

    def embedding_tables(self) -> list[nn.Parameter]:
        """The gathered tables (tok_emb, bigram.table, ve.table), stored in config.embed_dtype."""
        tables = [self.tok_emb.weight, self.bigram.table.weight]
        return tables + ([self.ve.table.weight] if self.ve is not None else [])

    def set_active_loops(self, loops: int) -> None:
        """Run `loops` of the config's crawler loops from now on (CrawlerConfig.loop_variant: the schedule,
        XSA and value-embedding positions of a model built with that many loops, as the seed's progressive
        schedule does). Exactly the alphas the running loops read (loops 1 .. loops-1) train when
        config.train_alpha, so DDP never sees a parameter that takes no part in the step."""
        variant = self.config.loop_variant(loops)
        self.active_loops = loops
        self.schedule = variant.schedule()
        self.xsa_positions = variant.xsa_positions()
        self.ve_positions = variant.ve_positions()
        for loop, alpha in enumerate(self.crawler_residual_scales):
            alpha.requires_grad_(self.config.train_alpha and 1 <= loop < loops)

    def configure_qat(self, *, bits: int = QAT_BITS, mlp_bits: int = 0, small_numel: int = PASSTHROUGH_NUMEL) -> int:
        """Which weights QAT fake-quantises, on which grid (the seed's QAT_BITS / QAT_MLP_BITS rule): every
        CastedLinear with more than `small_numel` elements, at `mlp_bits` for the MLP matrices (mlp.fc,
        mlp.proj) when mlp_bits > 0 and at `bits` otherwise. QAT itself is switched by `set_qat`.
        Returns the number of weights QAT acts on."""
        count = 0
        for name, module in self.named_modules():
            if isinstance(module, CastedLinear):
                is_mlp = name.endswith(("mlp.fc", "mlp.proj"))
                module.qat_bits = (mlp_bits if is_mlp and mlp_bits > 0 else bits) \
                    if module.weight.numel() > small_numel else 0
                count += module.qat_bits > 0
        return count

    def set_qat(self, enabled: bool) -> None:
        """Turn QAT fake-quantisation on or off for every CastedLinear (on while training, off for eval);
        `configure_qat` decides which weights it touches."""
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.qat = enabled

    def resolve_ops(self, device: torch.device) -> str:
        """The ops kind this model runs with for inputs on `device` (crawler.runtime.resolve_ops)."""
        return resolve_ops(self.ops, device)

    def embed_input(self, input_ids: torch.Tensor, ops: str, bos_id: int | None = None) -> torch.Tensor:
        """x0 (B, T, d) = smear(rms_norm(tok_emb[ids] + bigram(ids))) (docs/math.md §1.3, §1.5-1.6); with
        `bos_id`, every BOS starts a document (no bigram pair or smear across it)."""
        embed = select_op(ops, "embed")
        args = (input_ids, self.tok_emb.weight, self.bigram.table.weight, self.bigram.proj.effective_weight(),
                self.smear.gate)
        return embed(*args) if bos_id is None else embed(*args, bos_id=bos_id)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Softcapped tied-head logits (..., V) in hidden's dtype (exact reference head)."""
        return kernels.reference.softcapped_logits(hidden, self.tok_emb.weight, self.config.logit_softcap)

    def forward_hidden(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                       documents: Documents | None = None) -> torch.Tensor:
        """input_ids (B, T) int -> final rms_norm'd hidden states (B, T, d).

        With a `cache` (incremental decoding), input_ids are the tokens after the cached ones: attention
        also reads the cached keys and values, and the new ones are added to the cache. With `documents`
        (crawler.documents.document_segments(input_ids)), no token attends to or embeds another
        document's; not with a cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, T), got shape {tuple(input_ids.shape)}")
        if documents is not None:
            if cache is not None:
                raise ValueError("documents: document isolation is not supported with a KV cache")
            if not self.isolates_documents:
                raise ValueError(f"documents: the ops {type(self.ops).__name__} cannot isolate documents "
                                 f"(their attention takes no cu_seqlens or their embed no bos_id); use "
                                 f"ops='triton' or 'reference', or run without document isolation")
        ops = self.resolve_ops(input_ids.device)
        c = self.config
        if cache is not None:
            cache.check_step(input_ids)
        context = cache.context(input_ids.shape[1]) if cache is not None else None
        if context is None:
            x = self.embed_input(input_ids, ops, documents.bos_id if documents is not None else None)
        else:
            # BigramHash and SmearGate look one token back: re-embedding the last two cached tokens in
            # front makes the new tokens' x0 exact (the first context token's own x0 is not needed).
            x = self.embed_input(torch.cat((context, input_ids), dim=1), ops)[:, context.shape[1]:]
        x0 = x
        ve_base = self.ve(input_ids) if self.ve is not None else None
        first_ve = len(self.schedule) - c.ve_last_n
        skips: list[torch.Tensor] = []
        for p, (kind, i, loop) in enumerate(self.schedule):
            ve = self.ve.scales[p - first_ve] * ve_base if p in self.ve_positions else None
            args = (self.attn_scales[p], self.mlp_scales[p], self.resid_mixes[p], ve, p in self.xsa_positions, ops,
                    cache, p, documents)
            if kind == "crawler":
                out = self.crawler_blocks[i](x, x0, *args)
                # loop 0 replaces the stream; later loops interpolate towards the block's output.
                x = out if loop == 0 else x + self.crawler_residual_scales[loop].to(x.dtype) * (out - x)
            elif i < c.num_encoder_blocks:
                x = self.flat_blocks[i](x, x0, *args)
                skips.append(x)
            else:
                if skips:  # U-Net skip, LIFO, added before the decoder block runs
                    x = x + self.skip_weights[i - c.num_encoder_blocks].to(x.dtype) * skips.pop()
                x = self.flat_blocks[i](x, x0, *args)
        if cache is not None:
            cache.advance(input_ids)
        return rms_norm(x)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor,
                documents: Documents | None = None) -> torch.Tensor:
        """Mean cross-entropy (0-d float32) of the softcapped tied head over all B·T targets;
        `documents` as in forward_hidden."""
        if target_ids.shape != input_ids.shape:
            raise ValueError(f"target_ids: expected shape {tuple(input_ids.shape)}, got {tuple(target_ids.shape)}")
        hidden = self.forward_hidden(input_ids, documents=documents)
        loss_fn = select_op(self.resolve_ops(input_ids.device), "softcapped_cross_entropy")
        return loss_fn(hidden.reshape(-1, hidden.shape[-1]), self.tok_emb.weight, target_ids.reshape(-1),
                       self.config.logit_softcap)

    def forward_logits(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                       documents: Documents | None = None) -> torch.Tensor:
        """Softcapped logits (B, T, V) in the hidden dtype (exact reference head); `cache` and
        `documents` as in forward_hidden."""
        return self.head_logits(self.forward_hidden(input_ids, cache, documents))

    def token_nll(self, input_ids: torch.Tensor, target_ids: torch.Tensor,
                  documents: Documents | None = None) -> torch.Tensor:
        """Per-token cross-entropy (B, T) in float32 nats, on float32 logits (evaluation); `documents`
        as in forward_hidden."""
        logits = self.forward_logits(input_ids, documents=documents).float()
        return F.cross_entropy(logits.transpose(1, 2), target_ids.long(), reduction="none")


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], device=None) -> torch.nn.Module:
    """Load `state` into `model` strictly (same names and shapes), casting each value to the parameter's
    own dtype. A model built on the meta device (no initialisation cost) gets the values assigned on
    `device`, which is then required; otherwise values go to each parameter's device. Returns the model."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state does not match the model: missing {missing}, unexpected {unexpected}")
    for name, value in state.items():
        if value.shape != own[name].shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(own[name].shape)}")
    on_meta = any(t.is_meta for t in own.values())
    if on_meta and device is None:
        raise ValueError("model is on the meta device: pass the device to load onto")
    model.load_state_dict({n: v.to(dtype=own[n].dtype, device=device if device is not None else own[n].device)
                           for n, v in state.items()}, strict=True, assign=on_meta)
    return model
