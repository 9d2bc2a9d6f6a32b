"""The challenge's baseline train_gpt.py family (openai/parameter-golf's root script and scripts that keep
its model code): SDPA on (B, H, T, D) tensors, per-head q_gain, relu² MLP, the tied softcapped head and
its cross-entropy inside GPT.forward.

Swaps (docs/porting.md has the numbers):
  attention          CausalSelfAttention.forward: q, k, v stay (B, T, H, D) views of the projections (no
                     transposes, no copy of the output), the script's RMS norms and RoPE (its cos/sin tables
                     viewed in that layout), then `attention` with q_gain folded into the softmax scale.
  MLP                MLP.forward: `relu2_mlp` (relu² in the up-projection's epilogue).
  embedding + loss   GPT.forward: `embed` without BigramHash or SmearGate (the gather and its rms_norm in
                     one pass), the script's blocks and U-Net skips, its final norm, then
                     `softcapped_cross_entropy` on the hidden states (no logits in memory).
"""
from __future__ import annotations

import torch.nn.functional as F

from .swap import Swap, op_name, patch_ops

FAMILY = "baseline train_gpt.py (SDPA, (B, H, T, D))"
# Digests (kernels.patch.source) of the baseline's methods that the swaps reproduce.
KNOWN = {
    "CausalSelfAttention.forward": "8a08cae09a7896aa",
    "Rotary.forward": "d70c62b11b79bef1",
    "apply_rotary_emb": "e009b417fe7401a0",
    "MLP.forward": "d038c79520eff9a6",
    "GPT.forward": "66b014d722ee00cf",
}
KEPT = {
    "RoPE (Rotary, apply_rotary_emb) and the q/k RMS norms": "no fused op of ours: the script's torch code runs",
    "CastedLinear projections, Block.forward (residual mixing and scales)": "plain matmuls and elementwise "
                                                                            "ops, nothing to fuse with ours",
    "Muon, data loading, int8 quantisation, eval_val": "not model forwards",
}


def matches(script) -> bool:
    """The script defines the baseline's model classes and its GPT computes the loss without a
    forward_logits (the varlen records have one)."""
    return (all(hasattr(script, name) for name in ("GPT", "Block", "CausalSelfAttention", "MLP", "Rotary"))
            and not hasattr(script.GPT, "forward_logits"))


def swaps(script, ops) -> list[Swap]:
    """The baseline's swaps for `script` with the ops of kind `ops` (installed where its code is KNOWN)."""
    attention, relu2_mlp, embed, cross_entropy = patch_ops(ops)

    def attention_forward(self, x):
        B, T, d = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = F.rms_norm(q, (self.head_dim,))
        k = F.rms_norm(k, (self.head_dim,))
        # The script's tables are (1, 1, T, D/2) for (B, H, T, D); viewed as (1, T, 1, D/2) for (B, T, H, D).
        cos, sin = (t.transpose(1, 2) for t in self.rotary(T, x.device, q.dtype))
        q = script.apply_rotary_emb(q, cos, sin)
        k = script.apply_rotary_emb(k, cos, sin)
        # Under autocast the norms may leave q, k in fp32 while v is bf16: the op takes one dtype.
        y = attention(q.to(v.dtype), k.to(v.dtype), v, causal=True, q_gain=self.q_gain)
        return self.proj(y.reshape(B, T, d))

    def mlp_forward(self, x):
        return relu2_mlp(x, self.fc.weight, self.proj.weight)

    def gpt_forward(self, input_ids, target_ids):
        x = embed(input_ids, self.tok_emb.weight, None, None, None)
        x0, skips = x, []
        for block in self.blocks[:self.num_encoder_layers]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers:]):
            if skips:
                x = x + self.skip_weights[i].to(dtype=x.dtype)[None, None, :] * skips.pop()
            x = block(x, x0)
        hidden = self.final_norm(x).reshape(-1, x.size(-1))
        head = self.tok_emb.weight if self.tie_embeddings else self.lm_head.weight
        return cross_entropy(hidden, head, target_ids.reshape(-1), self.logit_softcap)

    return [
        Swap("attention", f"{op_name(ops, 'attention')}, q_gain folded into the softmax scale, (B, T, H, D) "
                          f"without transposes", {"CausalSelfAttention.forward": attention_forward},
             {name: KNOWN[name] for name in ("CausalSelfAttention.forward", "Rotary.forward", "apply_rotary_emb")}),
        Swap("MLP", f"{op_name(ops, 'relu2_mlp')} (relu² fused into the up-projection)",
             {"MLP.forward": mlp_forward}, {"MLP.forward": KNOWN["MLP.forward"]}),
        Swap("embedding + loss", f"{op_name(ops, 'embed')} (no BigramHash, no SmearGate) and "
                                 f"{op_name(ops, 'softcapped_cross_entropy')} on the hidden states",
             {"GPT.forward": gpt_forward}, {"GPT.forward": KNOWN["GPT.forward"]}),
    ]
