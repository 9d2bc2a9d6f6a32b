"""The training stage (docs/math.md §2), one concept a file:

    config.py     TrainConfig (the seed's recipe as defaults, one CLI flag per field), batch arithmetic
    data.py       the checked data directory, tokenizer, validation tokens and the data identity
    stream.py     the rank-aware training stream over the train shards (resumable)
    schedule.py   the progressive crawler-loop schedule (how many loops each step runs)
    qat.py        QAT while training: which weights, which grid, from step 0 or late
    averaging.py  SWA and EMA of the weights
    log.py        the run log and its parameter-golf line formats
    resume.py     what a resume restores (the run's options) and which changes break bit-identity
    loop.py       the training loop: train(), resumable, single process or torchrun DDP

Device, autocast, process group and checkpoint files are decided in crawler.runtime and
crawler.checkpoint. The names below are the stage's public API.
"""
from .config import TrainConfig, check_batch_shape, resolve_grad_accum
from .data import TrainData, prepare_data
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainData", "TrainResult", "check_batch_shape", "prepare_data", "resolve_grad_accum",
           "train"]
