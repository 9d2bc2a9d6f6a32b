"""Document isolation (docs/evaluation.md "Document isolation"): where the documents of a packed batch
begin and end, in the form the model's ops take.

FineWeb shards and the built-in corpus are streams of `[BOS] + document` back to back (BOS_ID, from
crawler.tokenizer). A (B, T) batch cut from such a stream is read, with isolation on, as segments: one
starts at every row start and at every BOS, and runs to the next start. So a document longer than T is
cut into row pieces, and every row boundary is a segment boundary. `document_segments` turns a batch
into a `Documents`: `cu_seqlens` over the flattened B·T tokens for varlen attention, `max_seqlen` = T
(no segment is longer than a row), and `bos_id` for the embedding (no BigramHash pair or SmearGate
term across a BOS). Given to `CrawlerGPT.forward(..., documents)`, no token sees another document.

Isolation needs data whose documents are marked: a tokenizer without a BOS (SentencePiece bos_id -1) has
none, and id BOS_ID is an ordinary piece in its data. `check_tokenizer_bos` refuses such a tokenizer where
a run loads its data (crawler.data.load_eval_data), and `document_segments` refuses a negative bos_id.

Under torch.compile the segment count must not change the graph: `cu_seqlens` is padded with repeated
ends (empty segments, which the attention op skips) to a fixed capacity, `segment_capacity(B)`.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from kernels.modules import select_op
from kernels.reference import document_starts
from kernels.utils import check_cu_seqlens

from .errors import SetupError
from .runtime import to_device
from .tokenizer import BOS_ID

# The padded capacity allows this many segments per row on average: FineWeb's documents average about
# 1,000 tokens, so a micro-batch of T = 2048 rows holds ~3 per row. kernels/build_check.py plans the
# same capacity (8·B + 1 offsets) for the doc-isolated step.
SEGMENTS_PER_ROW = 8


class Documents(NamedTuple):
    """The document segments of a (B, T) batch: `cu_seqlens` int32 (capacity + 1,) offsets into the
    flattened B·T tokens (0 first, B·T last, trailing repeated ends = empty segments), `max_seqlen` the
    longest a segment can be (T), `bos_id` the id that starts a document."""
    cu_seqlens: torch.Tensor
    max_seqlen: int
    bos_id: int

    def to(self, device: torch.device | str) -> Documents:
        """The same segments with `cu_seqlens` on `device`."""
        return self._replace(cu_seqlens=to_device(self.cu_seqlens, device))


def segment_capacity(rows: int) -> int:
    """The fixed number of segments a micro-batch of `rows` rows is padded to under torch.compile."""
    return SEGMENTS_PER_ROW * rows


def check_tokenizer_bos(bos_id: int, tokenizer: str) -> None:
    """SetupError unless data encoded with the tokenizer `tokenizer` (a path, for the message), whose
    SentencePiece bos_id() is `bos_id`, marks its documents with BOS_ID, where isolation cuts them."""
    if bos_id < 0:
        raise SetupError(f"document isolation (--doc-isolated) needs a BOS, and tokenizer {tokenizer!r} has none "
                         f"(SentencePiece bos_id {bos_id}): nothing marks where its documents start, and id "
                         f"{BOS_ID} is an ordinary piece there; run without --doc-isolated")
    if bos_id != BOS_ID:
        raise SetupError(f"document isolation (--doc-isolated) cuts documents at id {BOS_ID}, but tokenizer "
                         f"{tokenizer!r} has its BOS at id {bos_id}: run without --doc-isolated")


def document_segments(ids: torch.Tensor, *, bos_id: int = BOS_ID, capacity: int | None = None) -> Documents:
    """The segments of a batch `ids` (B, T) int: one starts at each row start and each `bos_id`.

    `capacity` None: exactly the segments there are. An int: `cu_seqlens` is padded with repeated ends
    to `capacity` segments; a batch with more segments doubles the capacity until they fit (so a
    compiled model sees a new shape at most once per doubling, never per batch). `cu_seqlens` is on
    `ids`' device (derive it on the CPU batch and move it with `Documents.to` to avoid a device sync). The
    offsets are checked here (kernels.utils.check_cu_seqlens), once, not by each attention call.
    Raises ValueError for ids that are not a (B, T) integer tensor, a bos_id that is not an id (a
    tokenizer without a BOS has bos_id -1), or a capacity < 1.
    """
    if isinstance(bos_id, bool) or not isinstance(bos_id, int) or bos_id < 0:
        raise ValueError(f"bos_id: expected the token id that starts a document (an int >= 0), got {bos_id!r}: "
                         f"a tokenizer without a BOS (bos_id -1) cannot isolate documents")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids: expected a (B, T) integer tensor, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"capacity: expected None or an int >= 1, got {capacity!r}")
    total = ids.numel()
    starts = document_starts(ids, bos_id).reshape(-1).nonzero()[:, 0]
    n = starts.numel()
    if capacity is None:
        capacity = n
    while capacity < n:
        capacity *= 2
    cu = torch.full((capacity + 1,), total, dtype=torch.int32, device=ids.device)
    cu[:n] = starts
    # The one check of the offsets' values: the attention op reads none (a host sync per call).
    check_cu_seqlens(cu, total)
    return Documents(cu_seqlens=cu, max_seqlen=ids.shape[1], bos_id=bos_id)


def ops_isolate_documents(ops) -> bool:
    """Whether an ops kind runs document-isolated: "reference", "triton" and "auto" do; an ops object
    (e.g. bench's SEED_OPS) only if its `attention` takes `cu_seqlens` and its `embed` takes `bos_id`."""
    if isinstance(ops, str):
        return True
    try:
        return all(arg in inspect.signature(select_op(ops, name)).parameters
                   for name, arg in (("attention", "cu_seqlens"), ("embed", "bos_id")))
    except (AttributeError, TypeError, ValueError):     # a missing op, or one without a signature
        return False
