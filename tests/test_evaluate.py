"""val_bpb on hand-checkable cases (docs/math.md §6)."""
import math

import pytest
import torch

from crawler.bpb import target_bytes
from crawler.evaluate import val_bpb


class ConstantModel(torch.nn.Module):
    """token_nll = ln(2) nats for every target, i.e. exactly 1 bit per token."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def token_nll(self, x, y):
        return torch.full(y.shape, math.log(2.0))


def luts():
    # ids: 0 pad (control), 1 BOS (control), 2 "▁ab" (2 bytes + space), 3 "c" (1 byte), 4 byte-fallback
    base = torch.tensor([0, 0, 2, 1, 1], dtype=torch.int16)
    space = torch.tensor([False, False, True, False, False])
    boundary = torch.tensor([True, True, False, False, False])
    return base, space, boundary


def test_target_bytes_rule():
    x = torch.tensor([1, 2, 3, 2])
    y = torch.tensor([2, 3, 2, 4])
    # y=2 after BOS: no space byte; y=3: 1; y=2 after 3: 2 + 1; y=4: 1
    assert target_bytes(x, y, luts()).tolist() == [2.0, 1.0, 3.0, 1.0]


def test_val_bpb_hand_checked():
    tokens = torch.tensor([1, 2, 3, 2, 4, 1, 3, 3, 2])          # 9 tokens -> 2 windows of 4
    loss, bpb = val_bpb(ConstantModel(), tokens, luts(), seq_len=4, batch_seqs=1)
    # targets: [2,3,2,4] after [1,2,3,2] -> 2+1+3+1 = 7 bytes; [1,3,3,2] after [4,1,3,3] -> 0+1+1+3 = 5
    assert loss == pytest.approx(math.log(2))
    assert bpb == pytest.approx(8 / 12)


def test_val_bpb_needs_enough_tokens():
    with pytest.raises(ValueError, match="need at least seq_len"):
        val_bpb(ConstantModel(), torch.tensor([1, 2, 3]), luts(), seq_len=4)
