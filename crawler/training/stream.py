"""The training stream (docs/math.md §2): the sorted train shards read sequentially, wrapping around,
every rank advancing identically and keeping its own span of each batch; its position is part of a
checkpoint, so a resumed run sees exactly the batches of an uninterrupted one."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data import list_shards, read_shard_array, shard_length


class DistributedTokenLoader:
    """The sequential training stream of docs/math.md §2 over the sorted `fineweb_train_*.bin` shards of
    `data_dir`, wrapping around at the end.

    Every rank constructs it with the same data and advances it identically; each `next_batch` call
    consumes `(local_tokens + 1) * world_size` contiguous tokens (across shard boundaries) and rank `r`
    keeps span `r`. Only the shard being read is held in memory. `state_dict()` / `load_state_dict()`
    capture the position (shard index + offset) so a resumed run sees exactly the same batches.
    With `vocab_size`, each shard's ids are checked to be below it when the shard is read (once per
    shard, not per batch; SetupError naming the shard).
    """

    def __init__(self, data_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size, self.vocab_size = rank, world_size, vocab_size
        self.files = list_shards(data_dir, "train")
        # Validating every header up front turns a corrupt shard into an error at start-up, not hours
        # into a run; the lengths also let the stream skip other ranks' spans without reading them.
        self._lengths = [shard_length(p) for p in self.files]
        if sum(self._lengths) == 0:
            raise ValueError(f"train shards in {str(Path(data_dir))!r} hold no tokens")
        self._shard, self._offset = 0, 0
        self._loaded_index, self._loaded = -1, None

    def _tokens(self) -> np.ndarray:
        if self._loaded_index != self._shard:
            self._loaded = None  # drop the previous shard before reading the next one
            self._loaded = read_shard_array(self.files[self._shard], self.vocab_size)
            self._loaded_index = self._shard
        return self._loaded

    def _advance(self, n: int, out: np.ndarray | None = None) -> None:
        """Move the stream `n` tokens forward, copying them into `out` when given."""
        done = 0
        while done < n:
            if self._offset >= self._lengths[self._shard]:
                self._shard, self._offset = (self._shard + 1) % len(self.files), 0
                continue
            k = min(n - done, self._lengths[self._shard] - self._offset)
            if out is not None:
                out[done:done + k] = self._tokens()[self._offset:self._offset + k]
            self._offset += k
            done += k

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y): int64 CPU tensors of shape (local_tokens // seq_len, seq_len), with
        y the next-token targets of x (y[i, j] = the token after x[i, j] in the stream)."""
        if not (isinstance(seq_len, int) and seq_len > 0 and isinstance(local_tokens, int)
                and local_tokens > 0 and local_tokens % seq_len == 0):
            raise ValueError(f"local_tokens must be a positive multiple of seq_len, got "
                             f"local_tokens={local_tokens}, seq_len={seq_len}")
        span = local_tokens + 1
        buf = np.empty(span, dtype=np.uint16)
        self._advance(self.rank * span)
        self._advance(span, buf)
        self._advance((self.world_size - 1 - self.rank) * span)
        t = torch.from_numpy(buf.astype(np.int64))
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)

    def state_dict(self) -> dict:
        """The stream position: {"shard": index into the sorted shards, "offset": tokens into it,
        "shards": the shard file names (checked on load)}. Same on every rank."""
        return {"shard": self._shard, "offset": self._offset, "shards": [p.name for p in self.files]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from `state_dict()`. Raises ValueError if the shard list differs or the
        position is outside it (the checkpoint belongs to other data)."""
        names = [p.name for p in self.files]
        if list(state["shards"]) != names:
            raise ValueError(f"loader state was saved over shards {list(state['shards'])}, "
                             f"but the data directory has {names}")
        shard, offset = int(state["shard"]), int(state["offset"])
        if not (0 <= shard < len(names) and 0 <= offset <= self._lengths[shard]):
            raise ValueError(f"loader state position (shard {shard}, offset {offset}) is outside the data")
        self._shard, self._offset = shard, offset
