"""Runtime policy, decided here once for every stage (training, quantisation, evaluation, generation):

- the device a run computes on (`resolve_device`) and the ops it uses there (`resolve_ops`: "auto" is
  Triton on CUDA and the plain-PyTorch references everywhere else; kernels.modules.select_op then maps
  the resolved kind to the functions);
- the autocast it computes under (`autocast`: bf16 on CUDA only) and the evaluation context
  (`eval_mode`: eval mode with QAT off, both restored);
- the process's place in a torchrun job (`rank_and_world`, `distributed`, `current_context`), the CPU
  thread count (`resolve_cpu_threads`: fixed per machine unless asked) and the deterministic algorithms
  of a CPU run (`reproducible`), which together make two identical CPU runs bitwise equal, and running
  something on rank 0 first;
- the data directory and tokenizer a run reads (`resolve_data`: given paths or the built-in corpus);
- whether a long loop draws a progress bar (`Progress`: an interactive terminal, rank 0).
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from kernels.utils import interpreting

from .errors import SetupError
from .tokenizer import TOKENIZER_FILE

Log = Callable[[str], None]
OPS_CHOICES = ("reference", "triton", "auto")


# --------------------------------------------------------------------------------------------------
# Device and ops

def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it (0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str | None = "auto") -> torch.device:
    """The device a command-line run computes on. "auto" (or None): CUDA when available, else the CPU.
    A CUDA device without an index is this process's GPU: cuda:LOCAL_RANK (cuda:0 outside torchrun).
    Raises SetupError for a name torch cannot parse or for CUDA on a machine without it."""
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SetupError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {name} but no CUDA device is available: use --device cpu (or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank())
    return device


def check_ops(ops) -> None:
    """ValueError unless `ops` is one of OPS_CHOICES or an ops object (see kernels.modules.select_op)."""
    if isinstance(ops, str) and ops not in OPS_CHOICES:
        raise ValueError(f"ops must be one of {OPS_CHOICES} or an object providing the ops, got {ops!r}")


def resolve_ops(ops, device: torch.device | str):
    """The ops kind for inputs on `device`: "auto" is "triton" on CUDA and "reference" elsewhere (on a
    CPU, Triton runs only in its interpreter, which is for tests and far slower than torch). "triton",
    "reference" and ops objects (see kernels.modules.select_op) are returned as they are; "triton" for a
    device other than CUDA without the interpreter is a SetupError (the kernels could not run there)."""
    check_ops(ops)
    if ops == "triton" and torch.device(device).type != "cuda" and not interpreting():
        raise SetupError(f"--ops triton on {torch.device(device)}: the Triton kernels need a CUDA device (on the "
                         f"CPU they run only under TRITON_INTERPRET=1, for tests): use --ops reference or auto")
    if ops != "auto":
        return ops
    return "triton" if torch.device(device).type == "cuda" else "reference"


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, how training, calibration and evaluation compute there (docs/math.md
    §1.12); disabled elsewhere, so CPU runs are exact fp32."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device` without a host sync: a CPU tensor goes to CUDA through pinned memory with a
    non-blocking copy (a blocking copy waits for the stream, and CUDA synchronises before copying from
    pageable memory); the caching host allocator keeps the pinned buffer until the copy is done. Anything
    else is `t.to(device)`. Evaluation and training move every batch (ids, targets, segments) this way."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` with QAT fake-quantisation off inside, so evaluation, calibration and export see
    the real weights. On exit the previous train/eval mode and every module's QAT flag are restored,
    whatever the code inside switched (TTT trains inside it)."""
    was_training = model.training
    qat = {m: m.qat for m in model.modules() if hasattr(m, "qat")}
    model.eval()
    for m in qat:
        m.qat = False
    try:
        yield model
    finally:
        for m, flag in qat.items():
            m.qat = flag
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# torchrun: rank, world, process group

def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run and the device it computes on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_context() -> DistContext:
    """The context of an already initialised process group (NCCL: this rank's current GPU, else the
    CPU), or a single process on CUDA when available."""
    if dist.is_available() and dist.is_initialized():
        dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
               else torch.device("cpu"))
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank(), dev)
    return DistContext(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[DistContext]:
    """The run's DistContext on `device` (from `resolve_device`). Under torchrun (WORLD_SIZE > 1) the
    default process group is initialised (NCCL on CUDA, gloo on the CPU) unless it already is, and
    destroyed on exit only if it was created here; one process initialises nothing."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), env_world_size()
        if world > 1:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    device_id=device if device.type == "cuda" else None)
            created = True
    try:
        yield DistContext(rank=rank, world_size=world, local_rank=local_rank(), device=device)
        if created:
            # Every rank past its last collective before any rank tears down: gloo torn down while a
            # peer's work is still in flight aborts the process ("terminate called without an active
            # exception", SIGABRT). Only on success: after an error a peer may never reach the barrier.
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def rank0_first(fn: Callable[[], object]):
    """`fn()` on rank 0, then on the other ranks once rank 0 is done (a cache is built once)."""
    rank, world = rank_and_world()
    if rank == 0:
        out = fn()
    if world > 1:
        dist.barrier()
    if rank != 0:
        out = fn()
    return out


def broadcast_object(value):
    """Rank 0's `value` on every rank (a picklable object; no-op for one process)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _per_local_rank(cores: int) -> int:
    """`cores` shared by the torchrun ranks on this machine (LOCAL_WORLD_SIZE), at least 1."""
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_cpu_threads() -> int:
    """Intra-op threads for a CPU run: the machine's cores shared by the torchrun ranks on it. A count
    fixed per machine, so two identical runs compute bitwise the same (reductions are split by the
    thread count; a count that followed the load would not repeat)."""
    return _per_local_rank(os.cpu_count() or 1)


def idle_cpu_threads() -> int:
    """Intra-op threads on the cores not already busy (1-minute load average), shared by the torchrun
    ranks on this machine: faster on a shared machine, where OpenMP threads competing for busy cores
    slow every op down many times over, but not bit-reproducible from run to run."""
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return _per_local_rank(min(cores, cores - busy))


@contextlib.contextmanager
def reproducible(device: torch.device | str) -> Iterator[None]:
    """On a CPU `device`, PyTorch's deterministic algorithms for the block (restored on exit), so two runs
    with the same options and thread count compute bitwise the same. Measured: with 2 threads the gradient
    of an indexed lookup (the embedding's `tok_emb[ids]`, `bigram_table[h]`: index_put_ with accumulate)
    adds rows in a racy order and two identical runs drift apart from the first step; the deterministic
    kernel adds them in order, no slower (tiny preset, 2 threads: 112 vs 115 ms per forward + backward,
    medians of interleaved runs). Other devices are left as they are (CUDA runs are not bitwise
    reproducible)."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def resolve_cpu_threads(threads: int | str | None) -> int:
    """The intra-op thread count of a CPU run for `--threads`: a count as given, "idle" for
    `idle_cpu_threads`, None for the fixed `default_cpu_threads`. ValueError for anything else."""
    if threads is None:
        return default_cpu_threads()
    if threads == "idle":
        return idle_cpu_threads()
    if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
        return threads
    raise ValueError(f"threads: expected a count >= 1, 'idle' or None, got {threads!r}")


# --------------------------------------------------------------------------------------------------
# Data directory and tokenizer

DATA_DIR_HINT = ("point --data-dir at a directory of parameter-golf FineWeb shards (fineweb_train_*.bin and "
                 "fineweb_val_*.bin), or leave it out to use the built-in corpus")


def resolve_data(data_dir, tokenizer, vocab_size: int, *, cache_dir=None, need_tokenizer: bool = True,
                 log: Log | None = print) -> tuple[Path, Path | None]:
    """(data directory, tokenizer model path) a run reads.

    With `data_dir`: that directory and `tokenizer`, by default `data_dir/tokenizer.model` (None when
    the run does not `need_tokenizer` and none was given). Without: the built-in corpus at `vocab_size`
    in `cache_dir` (crawler.corpus; built on rank 0 first, then reused by the other ranks), whose own
    tokenizer is the only one its shards fit. Raises SetupError for a missing directory, a missing
    default tokenizer, or a tokenizer given without a data directory.
    """
    if data_dir is None:
        if tokenizer is not None:
            raise SetupError("--tokenizer without --data-dir: give both (FineWeb shards and their tokenizer), "
                             "or neither (built-in corpus)")
        from .corpus import build_builtin_corpus  # only runs without a data directory build it
        quiet = log is None or rank_and_world()[0] != 0
        info = rank0_first(lambda: build_builtin_corpus(cache_dir, vocab_size, log=(lambda _: None) if quiet else log))
        return info.data_dir, info.tokenizer_path
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SetupError(f"data directory {str(data_dir)!r} does not exist: {DATA_DIR_HINT}")
    if tokenizer is not None or not need_tokenizer:
        return data_dir, Path(tokenizer) if tokenizer is not None else None
    tokenizer = data_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise SetupError(f"no --tokenizer given and {str(tokenizer)!r} does not exist: pass --tokenizer with "
                         f"the SentencePiece .model the shards of {str(data_dir)!r} were encoded with")
    return data_dir, tokenizer


# --------------------------------------------------------------------------------------------------
# Progress bars

def show_progress() -> bool:
    """Whether long loops draw progress bars: only on rank 0 and when stderr is an interactive
    terminal, so CI logs, redirected output and the other ranks stay free of them."""
    return rank_and_world()[0] == 0 and sys.stderr.isatty()


class Progress:
    """A tqdm bar over `total` steps of a long loop, drawn on stderr where `show_progress()` allows
    and a no-op elsewhere. `write(msg)` hands `msg` to `log` with the bar cleared around it, so log lines
    and the bar do not overwrite each other. Use as a context manager (the bar is removed on exit)."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", log: Log | None = None):
        self.log = log
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                        disable=not show_progress())

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.log is None:
            return
        if self.bar.disable:
            self.log(msg)
            return
        with tqdm.external_write_mode():
            self.log(msg)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
