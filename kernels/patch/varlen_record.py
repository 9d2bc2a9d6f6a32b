"""The varlen-record train_gpt.py family (PR #1530 and the records built on its code): FlashAttention-3
dense and varlen on (B, T, H, D), XSA after it in torch, per-head q_gain, a Triton LeakyReLU(0.5)² MLP,
3-D weight banks (qo_bank, kv_bank, mlp_up_bank, mlp_down_bank) sliced per layer, depth recurrence,
parallel residual lanes and the tied softcapped head in forward_logits.

Swaps (docs/porting.md has the numbers):
  attention + XSA    CausalSelfAttention.forward: the script's projections from the bank slices, RMS norms
                     and partial RoPE, then `attention` with XSA fused in its epilogue (only where the
                     layer's use_xsa is set), q_gain folded into the softmax scale, dense or varlen on the
                     packed (1, total, H, D) rows with the script's padded cu_seqlens as they are. During
                     GPTQ calibration it keeps the input of the output projection, as the script does.
  MLP                MLP.forward: `relu2_mlp` with negative_slope 0.5, in training and evaluation; during
                     calibration (which reads the hidden activations) the script's own forward runs.
  embedding + loss   GPT.forward / GPT.forward_logits: `embed` without BigramHash or SmearGate, the
                     script's blocks, banks, loops, skip gates and parallel lanes in its order, its final
                     norm and head projection; then `softcapped_cross_entropy` on the hidden states
                     (training) or the softcapped logits as before (forward_logits, for evaluation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import softcapped_logits
from .swap import Swap, op_name, patch_ops

FAMILY = "varlen record train_gpt.py (PR #1530: FA3 varlen, XSA, weight banks)"
# Digests (kernels.patch.source) of PR #1530's methods that the swaps reproduce.
KNOWN = {
    "CausalSelfAttention.forward": "5b3f0c292192d669",
    "CausalSelfAttention._xsa_efficient": "5ab7a890185744f5",
    "MLP.forward": "4823691b60513764",
    "GPT.forward": "4b4cf49b9040739e",
    "GPT.forward_logits": "f5fb13c9cacd4dab",
}
KEPT = {
    "RoPE (Rotary, apply_rotary_emb with rope_dims) and the q/k RMS norms": "no fused op of ours: the "
                                                                           "script's torch code runs",
    "GPT.forward_ttt (LoRA test-time training)": "its LoRA projections, XSA and per-token loss are inline in "
                                                 "GPT._block_with_lora and forward_ttt (with ops='triton' its "
                                                 "FA3 calls are kernels.flash_attn_interface's)",
    "Block.forward, GPT._parallel_block (residual mixing, lanes, scales)": "elementwise ops around the "
                                                                          "swapped attention and MLP",
    "Muon, GPTQ, data loading, the evaluation loops": "not model forwards (they call the swapped ones)",
}


def matches(script) -> bool:
    """The script's GPT slices per-layer weights out of banks and has a forward_logits."""
    gpt = getattr(script, "GPT", None)
    return (gpt is not None and hasattr(gpt, "forward_logits") and hasattr(gpt, "_bank_weights")
            and all(hasattr(script, name) for name in ("CausalSelfAttention", "MLP", "apply_rotary_emb")))


def _trunk(model, input_ids, cu_seqlens, max_seqlen, embed):
    """The hidden states the head reads, (B, T, embedding_dim): forward_logits up to its head, with the
    token embedding and its norm from `embed`."""
    x = embed(input_ids, model.tok_emb.weight, None, None, None)
    if model.embed_proj is not None:
        x = model.embed_proj(x)
    x0, skips, lanes = x, [], None
    if model.looping_active:
        encoder, decoder = model.encoder_indices, model.decoder_indices
    else:
        encoder = range(model.num_encoder_layers)
        decoder = range(model.num_encoder_layers, model.num_encoder_layers + model.num_decoder_layers)
    documents = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    for i in encoder:
        x = model.blocks[i](x, x0, *model._bank_weights(i), **documents)
        skips.append(x)
    for j, i in enumerate(decoder):
        parallel = model.parallel_start_layer > 0 and i >= model.parallel_start_layer
        if parallel and lanes is None:
            lanes = (x, x)
        stream = lanes[0] if parallel else x     # the skip joins lane 0 once the lanes have split
        if j < model.num_skip_weights and skips:
            skip = model.skip_weights[j].to(dtype=stream.dtype)[None, None, :] * skips.pop()
            if model.skip_gates is None:
                stream = stream + skip
            else:
                gate = torch.sigmoid(model.skip_gates[j].to(dtype=stream.dtype))[None, None, :]
                stream = torch.lerp(skip, stream, gate)
        if parallel:
            lanes = model._parallel_block(i, stream, lanes[1], x0, *model._bank_weights(i), **documents)
        else:
            x = model.blocks[i](stream, x0, *model._bank_weights(i), **documents)
    if lanes is not None:
        x = model._final_parallel_hidden(*lanes)
    x = model.final_norm(x)
    return x if model.head_proj is None else model.head_proj(x)


def swaps(script, ops) -> list[Swap]:
    """The varlen record's swaps for `script` with the ops of kind `ops` (installed where its code is
    KNOWN; with ops="triton" also the FA3 calls left in forward_ttt)."""
    attention, relu2_mlp, embed, cross_entropy = patch_ops(ops)
    script_mlp_forward = script.MLP.forward

    def attention_forward(self, x, q_w, k_w, v_w, out_w, cu_seqlens=None, max_seqlen=0):
        B, T, d = x.shape
        q = F.linear(x, q_w.to(x.dtype)).view(B, T, self.num_heads, self.head_dim)
        k = F.linear(x, k_w.to(x.dtype)).view(B, T, self.num_kv_heads, self.head_dim)
        v = F.linear(x, v_w.to(x.dtype)).view(B, T, self.num_kv_heads, self.head_dim)
        q = F.rms_norm(q, (self.head_dim,))
        k = F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(T, x.device, q.dtype)
        q = script.apply_rotary_emb(q, cos, sin, self.rope_dims)
        k = script.apply_rotary_emb(k, cos, sin, self.rope_dims)
        # Under autocast the norms may leave q, k in fp32 while v is bf16: the op takes one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cu_seqlens is None:
            y = attention(q, k, v, causal=True, xsa=self.use_xsa, q_gain=self.q_gain)
        else:   # (1, total, H, D) rows; max_seqlen sizes the grid (0: read from cu_seqlens)
            y = attention(q, k, v, causal=True, xsa=self.use_xsa, q_gain=self.q_gain, cu_seqlens=cu_seqlens,
                          max_seqlen=max_seqlen or None)
        y = y.reshape(B, T, d)
        self._last_proj_input = y.detach() if getattr(self, "_calib", False) else None   # GPTQ's Hessians
        return F.linear(y, out_w.to(x.dtype))

    def mlp_forward(self, x, up_w, down_w):
        if getattr(self, "_calib", False):   # GPTQ calibration reads the hidden activations
            return script_mlp_forward(self, x, up_w, down_w)
        return relu2_mlp(x, up_w, down_w, 0.5)

    def head_weight(self):
        return self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight

    def forward_logits(self, input_ids, cu_seqlens=None, max_seqlen=0):
        hidden = _trunk(self, input_ids, cu_seqlens, max_seqlen, embed)
        return softcapped_logits(hidden, head_weight(self), self.logit_softcap)

    def forward(self, input_ids, target_ids, cu_seqlens=None, max_seqlen=0):
        hidden = _trunk(self, input_ids, cu_seqlens, max_seqlen, embed)
        return cross_entropy(hidden.reshape(-1, hidden.size(-1)), head_weight(self), target_ids.reshape(-1),
                             self.logit_softcap)

    swaps = [
        Swap("attention + XSA", f"{op_name(ops, 'attention')}, XSA fused where use_xsa, q_gain folded into "
                                f"the softmax scale, dense or varlen (cu_seqlens as given)",
             {"CausalSelfAttention.forward": attention_forward},
             {name: KNOWN[name] for name in ("CausalSelfAttention.forward", "CausalSelfAttention._xsa_efficient")}),
        Swap("MLP", f"{op_name(ops, 'relu2_mlp')}, negative_slope 0.5 (the script's forward during GPTQ "
                    f"calibration)", {"MLP.forward": mlp_forward}, {"MLP.forward": KNOWN["MLP.forward"]}),
        Swap("embedding + loss", f"{op_name(ops, 'embed')} (no BigramHash, no SmearGate); training loss "
                                 f"{op_name(ops, 'softcapped_cross_entropy')} on the hidden states, "
                                 f"forward_logits the softcapped head in torch",
             {"GPT.forward": forward, "GPT.forward_logits": forward_logits},
             {name: KNOWN[name] for name in ("GPT.forward", "GPT.forward_logits")}, helpers=(_trunk, head_weight)),
    ]
    if ops == "triton":
        # What is left calling FA3 (forward_ttt's blocks) gets the FA3-compatible entry points: same
        # arguments, layouts and returns, so no source needs to be known.
        from .. import flash_attn_interface
        swaps.append(Swap("FA3 calls (forward_ttt)", "kernels.flash_attn_interface (the XSA after it stays torch)",
                          {"flash_attn_3_func": flash_attn_interface.flash_attn_func,
                           "flash_attn_varlen_func": flash_attn_interface.flash_attn_varlen_func}, {}))
    return swaps
