"""Selective ±1 pruning (docs/math.md §3): zero the fewest ±1 codes, those of the rows with the smallest
scale first, until the encoded artifact plus the code bytes fits the byte target."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from ..artifact import Artifact, QuantizedTensor, encode_artifact

Log = Callable[[str], None]


@dataclasses.dataclass
class PruneResult:
    """The artifact after pruning, its encoded file bytes (so nothing is compressed twice), how many ±1
    codes were zeroed out of how many candidates, and how many encodings the search took."""
    artifact: Artifact
    blob: bytes
    pruned: int
    candidates: int
    probes: int
    seconds: float


def _pm1_candidates(artifact: Artifact):
    """Every code equal to ±1, ordered by its row's s² ascending (stable: tensor order, then position).
    Returns (names, tensor index per candidate, flat index per candidate)."""
    names = [n for n, t in artifact.tensors.items() if isinstance(t, QuantizedTensor)]
    which, flat, keys = [], [], []
    for i, n in enumerate(names):
        q = artifact.tensors[n]
        idx = torch.nonzero(q.codes.abs().view(-1) == 1).view(-1)
        rows = idx // q.codes.shape[1]
        which.append(torch.full_like(idx, i))
        flat.append(idx)
        keys.append(q.scales.float()[rows] ** 2)
    if not names:
        return names, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    order = torch.argsort(torch.cat(keys), stable=True)
    return names, torch.cat(which)[order], torch.cat(flat)[order]


def _zero_first(artifact: Artifact, names, which, flat, n: int) -> Artifact:
    tensors = dict(artifact.tensors)
    for i, name in enumerate(names):
        sel = flat[:n][which[:n] == i]
        if sel.numel():
            q = tensors[name]
            codes = q.codes.clone()
            codes.view(-1)[sel] = 0
            tensors[name] = dataclasses.replace(q, codes=codes)
    return dataclasses.replace(artifact, tensors=tensors)


def prune_to_fit(artifact: Artifact, target_bytes: int, *, code_bytes: int = 0, tolerance: float = 1e-3,
                 blob: bytes | None = None, log: Log | None = print) -> PruneResult:
    """Zero the fewest ±1 codes (lowest row s² first, docs/math.md §3) so that encoded artifact + code_bytes
    <= target_bytes (decimal). Searches the count over a bracket that always holds a fitting upper
    end, by secant steps (with a bisection step when one end keeps moving), until the bracket is
    within `tolerance` of the candidate count; the answer is the smallest count measured to fit.
    `blob` is the artifact's encoding when the caller already has it (one brotli pass saved).
    Raises ValueError when even zeroing every candidate does not fit."""
    log = log or (lambda _: None)
    t0 = time.perf_counter()
    limit = target_bytes - code_bytes
    blob = blob if blob is not None else encode_artifact(artifact)
    if len(blob) <= limit:
        log(f"prune: artifact {len(blob):,} B + code {code_bytes:,} B fits {target_bytes:,} B; nothing pruned")
        return PruneResult(artifact, blob, 0, 0, 1, time.perf_counter() - t0)
    names, which, flat = _pm1_candidates(artifact)
    total = which.numel()

    def probe(n: int) -> tuple[int, bytes, Artifact]:
        art = _zero_first(artifact, names, which, flat, n)
        b = encode_artifact(art)
        log(f"prune: zeroing {n:,} of {total:,} ±1 codes -> {len(b):,} B (limit {limit:,} B)")
        return len(b), b, art

    lo, size_lo = 0, len(blob)
    size_hi, blob_hi, art_hi = probe(total)
    probes = 2
    if size_hi > limit:
        raise ValueError(f"cannot fit {target_bytes:,} B: even with all {total:,} ±1 codes zeroed the artifact "
                         f"is {size_hi:,} B + code {code_bytes:,} B; lower the bits or raise k of a role")
    hi = total
    moved: list[str] = []          # which end of the bracket each probe replaced
    bisected = False
    while hi - lo > max(1, int(tolerance * total)):
        # Size falls almost linearly in the count, so a secant guess usually lands close; when the same
        # end moved twice in a row the guesses are lopsided, so one bisection step follows.
        bisected = (len(moved) >= 2 and moved[-1] == moved[-2] and not bisected) or size_lo <= size_hi
        if bisected:
            mid = (lo + hi) // 2
        else:
            mid = lo + round((size_lo - limit) / (size_lo - size_hi) * (hi - lo))
        mid = min(max(mid, lo + 1), hi - 1)
        size, b, art = probe(mid)
        probes += 1
        if size <= limit:
            hi, size_hi, blob_hi, art_hi = mid, size, b, art
            moved.append("hi")
        else:
            lo, size_lo = mid, size
            moved.append("lo")
    dt = time.perf_counter() - t0
    log(f"prune: zeroed {hi:,} of {total:,} ±1 codes -> {size_hi:,} B in {probes} encodings, {dt:.1f}s")
    return PruneResult(art_hi, blob_hi, hi, total, probes, dt)
