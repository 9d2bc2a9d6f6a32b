"""What training reads (docs/math.md §2, §6): the checked data directory and tokenizer, the validation
tokens and byte LUTs every evaluation of the run shares, and the data identity a checkpoint records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import list_shards, load_validation_tokens, read_shard
from ..errors import SetupError
from ..fileio import file_sha256
from ..runtime import DATA_DIR_HINT
from ..tokenizer import byte_luts, check_vocab, load_tokenizer


@dataclass
class TrainData:
    """What training and evaluation read: the shard directory, the tokenizer and its byte LUTs, the
    validation tokens, and `identity` (tokenizer hash, shard names and sizes) that a checkpoint records
    so a resume on other data is refused."""
    data_dir: Path
    tokenizer_path: Path
    tokenizer_vocab_size: int
    luts: tuple
    val_tokens: torch.Tensor
    identity: dict

    def train_token_counts(self, vocab_size: int, max_tokens: int | None = None) -> torch.Tensor:
        """Occurrences of each id (int64, length vocab_size) in the train shards, in order, stopping
        after `max_tokens` tokens when given (FineWeb's train split is billions of tokens)."""
        counts = torch.zeros(vocab_size, dtype=torch.int64)
        seen = 0
        for path in list_shards(self.data_dir, "train"):
            tokens = read_shard(path).to(torch.int64)
            if max_tokens is not None:
                tokens = tokens[: max_tokens - seen]
            counts += torch.bincount(tokens, minlength=vocab_size)[:vocab_size]
            seen += tokens.numel()
            if max_tokens is not None and seen >= max_tokens:
                break
        return counts


def prepare_data(data_dir, tokenizer_path, vocab_size: int, *, val_max_tokens: int | None = None) -> TrainData:
    """Check and load a FineWeb-format data directory and its SentencePiece tokenizer for a model of
    `vocab_size`. `val_max_tokens` keeps only the first validation tokens (quick evaluations).
    Raises SetupError (saying what to do) for a missing directory, missing shards, a missing or invalid
    tokenizer, or a tokenizer with more pieces than the model's vocabulary: the run's one tokenizer
    check (`train` trusts data prepared for its model's vocab_size)."""
    data_dir, tokenizer_path = Path(data_dir), Path(tokenizer_path)
    try:
        train_shards = list_shards(data_dir, "train")
        val_shards = list_shards(data_dir, "val")
    except FileNotFoundError as e:
        raise SetupError(f"{e}: {DATA_DIR_HINT}") from None
    try:
        sp = load_tokenizer(tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"{e}: pass --tokenizer with the SentencePiece .model the shards were encoded "
                         f"with") from None
    try:
        check_vocab(sp, vocab_size)
    except ValueError as e:
        raise SetupError(f"{e} (option --vocab-size, or --tokenizer)") from None
    try:
        val_tokens = load_validation_tokens(data_dir, max_tokens=val_max_tokens, vocab_size=vocab_size)
    except ValueError as e:
        raise SetupError(f"{e}: {DATA_DIR_HINT}") from None
    identity = {"tokenizer_sha256": file_sha256(tokenizer_path), "tokenizer_vocab_size": sp.vocab_size(),
                "train_shards": [[p.name, p.stat().st_size] for p in train_shards],
                "val_shards": [[p.name, p.stat().st_size] for p in val_shards]}
    return TrainData(data_dir=data_dir, tokenizer_path=tokenizer_path, tokenizer_vocab_size=sp.vocab_size(),
                     luts=byte_luts(sp, vocab_size), val_tokens=val_tokens, identity=identity)
