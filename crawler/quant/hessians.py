"""Calibration and Hessians (docs/math.md §3): token windows from the train shards, and for every
quantised matrix the Hessian H = (1/n_seqs) Σ XᵀX of its layer's input over them.

`Calibration` holds one model's windows and collects the Hessians of all its matrices once, on first
use; every plan quantised from the same weights and the tied-embedding upgrade then share them.
Loop-aware GPTQ's second phase runs on swapped weights, so it collects its own (`collect_hessians`).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import kernels

from ..data import HEADER_BYTES, check_token_range, list_shards, shard_length
from ..errors import SetupError
from ..model import CrawlerGPT
from ..runtime import autocast, eval_mode

Log = Callable[[str], None]
DEFAULT_N_SEQS = 64


def calibration_tokens(data_dir, n_seqs: int = DEFAULT_N_SEQS, seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """`n_seqs` windows of seq_len + 1 tokens at random offsets of random train shards (docs/math.md §3).

    Deterministic given the seed: for each sequence a shard is drawn uniformly among the sorted
    `fineweb_train_*.bin` shards that hold at least seq_len + 1 tokens, then an offset uniformly in
    [0, len - (seq_len + 1)]. Only the windows are read (memory-mapped), not whole shards.
    Returns (n_seqs, seq_len + 1) int64.
    """
    if n_seqs < 1 or seq_len < 1:
        raise ValueError(f"n_seqs and seq_len must be >= 1, got {n_seqs} and {seq_len}")
    shards = list_shards(data_dir, "train")
    lengths = np.array([shard_length(p) for p in shards])      # validates each header and size
    usable = np.flatnonzero(lengths > seq_len)
    if usable.size == 0:
        raise SetupError(f"no train shard in {str(data_dir)!r} holds {seq_len + 1} tokens (one calibration window)")
    rng = np.random.default_rng(seed)
    which = usable[rng.integers(0, usable.size, size=n_seqs)]
    offsets = rng.integers(0, lengths[which] - seq_len)      # high is exclusive: last start len - T - 1
    out = torch.empty(n_seqs, seq_len + 1, dtype=torch.int64)
    for i, (s, off) in enumerate(zip(which.tolist(), offsets.tolist())):
        tokens = np.memmap(shards[s], dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(int(lengths[s]),))
        out[i] = torch.from_numpy(tokens[off:off + seq_len + 1].astype(np.int64))
    return out


def hessian_groups(model: CrawlerGPT) -> dict[str, list[str]]:
    """{group: weight names sharing one Hessian}: c_q, c_k and c_v of a block read the same input."""
    groups: dict[str, list[str]] = {}
    for kind, blocks in (("flat_blocks", model.flat_blocks), ("crawler_blocks", model.crawler_blocks)):
        for i in range(len(blocks)):
            p = f"{kind}.{i}"
            groups[f"{p}.attn.qkv"] = [f"{p}.attn.{m}.weight" for m in ("c_q", "c_k", "c_v")]
            for m in ("attn.proj", "mlp.fc", "mlp.proj"):
                groups[f"{p}.{m}"] = [f"{p}.{m}.weight"]
    if model.ve is not None:
        groups["ve.proj"] = ["ve.proj.weight"]
    groups["lm_head"] = ["tok_emb.weight"]
    return groups


@torch.no_grad()
def collect_hessians(model: CrawlerGPT, calib: torch.Tensor, *, names=None, batch_seqs: int = 8,
                     log: Log | None = None) -> dict[str, torch.Tensor]:
    """H = (1/n_seqs) Σ XᵀX of the input X of every Linear, over the calibration windows (docs/math.md §3).

    calib (n_seqs, T+1) int token ids (the model reads the first T of each). Forward pre-hooks catch
    each layer's input; a crawler block runs once per loop and every pass adds to its one Hessian.
    The MLP's fused op hides the hidden activation, so `mlp.proj`'s input relu²(h·W_fcᵀ) is recomputed
    from the MLP input. The tied embedding gets the Hessian of the final rms_norm output (the LM head's
    input). `names` limits the work to those weight names (default: all). Products are fp32 matmuls
    summed in fp64; returns {weight name: (K, K) float32 on the model's device}, c_q/c_k/c_v sharing
    one tensor. The model runs in crawler.runtime's eval_mode and autocast (bf16 on CUDA, QAT off).
    Each group's sum is the same whichever other groups are collected with it.
    """
    if calib.dim() != 2 or calib.shape[1] < 2:
        raise ValueError(f"calib: expected (n_seqs, T+1) token ids, got shape {tuple(calib.shape)}")
    groups = {g: ws for g, ws in hessian_groups(model).items() if names is None or set(ws) & set(names)}
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}

    def accumulate(group: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        if group in sums:
            sums[group] += xtx
        else:
            sums[group] = xtx

    def on_input(group):
        return lambda module, args: accumulate(group, args[0])

    def on_mlp(prefix):
        def hook(mlp, args):
            h = args[0]
            if f"{prefix}.mlp.fc" in groups:
                accumulate(f"{prefix}.mlp.fc", h)
            if f"{prefix}.mlp.proj" in groups:
                accumulate(f"{prefix}.mlp.proj", kernels.reference.relu2(
                    F.linear(h, mlp.fc.effective_weight().to(h.dtype)), mlp.negative_slope))
        return hook

    handles = []
    for kind, blocks in (("flat_blocks", model.flat_blocks), ("crawler_blocks", model.crawler_blocks)):
        for i, block in enumerate(blocks):
            p = f"{kind}.{i}"
            if f"{p}.attn.qkv" in groups:
                handles.append(block.attn.register_forward_pre_hook(on_input(f"{p}.attn.qkv")))
            if f"{p}.attn.proj" in groups:
                handles.append(block.attn.proj.register_forward_pre_hook(on_input(f"{p}.attn.proj")))
            if f"{p}.mlp.fc" in groups or f"{p}.mlp.proj" in groups:
                handles.append(block.mlp.register_forward_pre_hook(on_mlp(p)))
    if "ve.proj" in groups:
        handles.append(model.ve.proj.register_forward_pre_hook(on_input("ve.proj")))

    n_seqs = calib.shape[0]
    t0 = time.perf_counter()
    with eval_mode(model):
        try:
            for start in range(0, n_seqs, batch_seqs):
                x = calib[start:start + batch_seqs, :-1].to(device)
                with autocast(device):
                    hidden = model.forward_hidden(x)
                if "lm_head" in groups:
                    accumulate("lm_head", hidden)
        finally:
            for h in handles:
                h.remove()
    if log:
        log(f"hessians: {len(sums)} groups from {n_seqs} sequences x {calib.shape[1] - 1} tokens in "
            f"{time.perf_counter() - t0:.2f}s")
    out = {}
    for group, weights in groups.items():
        H = (sums[group] / n_seqs).float()
        out.update({w: H for w in weights})
    return out


class Calibration:
    """Calibration windows of one model and the Hessians of its weights on them, collected on first use
    of `hessians()` (all matrices in one pass) and then shared by every plan and by the tied-embedding
    upgrade. They belong to the weights the model had then: make a new Calibration when they change.

    tokens (n_seqs, T+1) int token ids, e.g. from `calibration_tokens`; `seconds` is the time the
    collection took (0 until it ran).
    """

    def __init__(self, model: CrawlerGPT, tokens: torch.Tensor, *, batch_seqs: int = 8, log: Log | None = None):
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"calib: expected (n_seqs, T+1) token ids, got shape {tuple(tokens.shape)}")
        self.model, self.tokens, self.batch_seqs, self.log = model, tokens, batch_seqs, log
        self.seconds = 0.0
        self._hessians: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_data(cls, model: CrawlerGPT, data_dir, *, n_seqs: int = DEFAULT_N_SEQS, seq_len: int | None = None,
                  seed: int = 0, batch_seqs: int = 8, log: Log | None = None) -> Calibration:
        """Windows drawn from `data_dir`'s train shards (`calibration_tokens`); seq_len defaults to the
        model's train_seq_len. SetupError when an id does not fit the model's vocabulary."""
        tokens = calibration_tokens(data_dir, n_seqs, seq_len or model.config.train_seq_len, seed)
        check_token_range(tokens.numpy(), model.config.vocab_size, f"the train shards of {str(data_dir)!r}")
        return cls(model, tokens, batch_seqs=batch_seqs, log=log)

    @property
    def collected(self) -> bool:
        return self._hessians is not None

    def hessians(self) -> dict[str, torch.Tensor]:
        """{weight name: (K, K) float32} for every matrix of the model (`collect_hessians`), collected on
        the first call and returned as they are afterwards."""
        if self._hessians is None:
            t0 = time.perf_counter()
            self._hessians = collect_hessians(self.model, self.tokens, batch_seqs=self.batch_seqs, log=self.log)
            if next(self.model.parameters()).is_cuda:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - t0
        return self._hessians
