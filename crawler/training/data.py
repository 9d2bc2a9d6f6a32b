"""What training reads (docs/math.md §2, §6): the checked data directory and tokenizer, the validation
tokens and byte LUTs every evaluation of the run shares, and the data identity a checkpoint records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import list_shards, load_eval_data, read_shard, shard_length
from ..errors import MissingFileError, SetupError
from ..runtime import DATA_DIR_HINT
from ..tokenizer import load_tokenizer, tokenizer_identity


@dataclass
class TrainData:
    """What training and evaluation read: the shard directory, the tokenizer and its byte LUTs, the
    validation tokens, `identity` (tokenizer hash, shard names and sizes) that a checkpoint records
    so a resume on other data is refused, `tokenizer` (crawler.tokenizer.tokenizer_identity) that
    the final model and the artifact record so evaluation can check it, `bos_id`, the tokenizer's BOS
    (SentencePiece's bos_id(), -1 for none), where document isolation cuts, and whether the run accepts
    weights trained with another tokenizer (`allow_tokenizer_mismatch`, for --init-from)."""
    data_dir: Path
    tokenizer_path: Path
    tokenizer_vocab_size: int
    luts: tuple
    val_tokens: torch.Tensor
    identity: dict
    tokenizer: dict
    bos_id: int
    allow_tokenizer_mismatch: bool = False

    def train_token_counts(self, vocab_size: int, max_tokens: int | None = None) -> torch.Tensor:
        """Occurrences of each id (int64, length vocab_size) in the train shards, in order, stopping
        after `max_tokens` tokens when given (FineWeb's train split is billions of tokens)."""
        counts = torch.zeros(vocab_size, dtype=torch.int64)
        seen = 0
        for path in list_shards(self.data_dir, "train"):
            tokens = read_shard(path, vocab_size).to(torch.int64)
            if max_tokens is not None:
                tokens = tokens[: max_tokens - seen]
            counts += torch.bincount(tokens, minlength=vocab_size)[:vocab_size]
            seen += tokens.numel()
            if max_tokens is not None and seen >= max_tokens:
                break
        return counts


def prepare_data(data_dir, tokenizer_path, vocab_size: int, *, val_max_tokens: int | None = None,
                 min_val_tokens: int = 2, allow_tokenizer_mismatch: bool = False,
                 doc_isolated: bool = False) -> TrainData:
    """Check and load a FineWeb-format data directory and its SentencePiece tokenizer for a model of
    `vocab_size`. `val_max_tokens` keeps only the first validation tokens (quick evaluations); fewer than
    `min_val_tokens` (one window: train_seq_len + 1) are refused. Every train shard's header and size
    is checked here (its ids when the stream reads it), the tokenizer and validation tokens by
    `crawler.data.load_eval_data` (`allow_tokenizer_mismatch` accepts a tokenizer smaller than the
    vocabulary; `doc_isolated` requires a tokenizer with a BOS). Raises SetupError (saying what to do) for a
    missing directory, missing or damaged shards, train shards without a token, a missing, invalid or
    mismatched tokenizer (or one without a BOS for a `doc_isolated` run) or too few validation tokens: the
    run's one data check (`train` trusts data prepared for its model's vocab_size)."""
    data_dir, tokenizer_path = Path(data_dir), Path(tokenizer_path)
    try:
        train_shards = list_shards(data_dir, "train")
        val_shards = list_shards(data_dir, "val")
        # a damaged shard fails now, not when the stream reaches it
        train_tokens = sum(shard_length(path) for path in train_shards)
    except MissingFileError as e:
        raise SetupError(f"{e}: {DATA_DIR_HINT}") from None
    if train_tokens == 0:
        raise SetupError(f"the train shards of {str(data_dir)!r} hold no tokens ({len(train_shards)} shard(s), all "
                         f"empty): {DATA_DIR_HINT}")
    try:
        val_tokens, luts = load_eval_data(data_dir, tokenizer_path, vocab_size, max_tokens=val_max_tokens,
                                          allow_mismatch=allow_tokenizer_mismatch, doc_isolated=doc_isolated)
    except SetupError as e:
        raise SetupError(f"{e} (options --data-dir, --tokenizer, --vocab-size)") from None
    if val_tokens.numel() < min_val_tokens:
        raise SetupError(f"the validation shards of {str(data_dir)!r} give {val_tokens.numel()} tokens (after "
                         f"--val-max-tokens), fewer than one evaluation window needs ({min_val_tokens} = "
                         f"sequence length + 1): use more validation data or a shorter --train-seq-len")
    sp = load_tokenizer(tokenizer_path)
    tokenizer = tokenizer_identity(tokenizer_path, sp)
    identity = {"tokenizer_sha256": tokenizer["sha256"], "tokenizer_vocab_size": tokenizer["vocab_size"],
                "train_shards": [[p.name, p.stat().st_size] for p in train_shards],
                "val_shards": [[p.name, p.stat().st_size] for p in val_shards]}
    return TrainData(data_dir=data_dir, tokenizer_path=tokenizer_path, tokenizer_vocab_size=tokenizer["vocab_size"],
                     luts=luts, val_tokens=val_tokens, identity=identity, tokenizer=tokenizer, bos_id=sp.bos_id(),
                     allow_tokenizer_mismatch=allow_tokenizer_mismatch)
