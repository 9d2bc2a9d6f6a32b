"""The kernels' launch policy, in one place: where a Triton op may run, which configs it launches, which
operand dtype and precision its tl.dot sees, its tile sizes, and how its inputs are validated. Every op in
kernels/ calls these helpers; none codes one of these decisions itself.

Where the Triton ops run. On a CUDA device, or on the CPU under the Triton interpreter
(TRITON_INTERPRET=1, set before `kernels` is imported; tests/conftest.py does it). Every public op calls
`check_triton_device` after validating its contract, so a plain CPU tensor gets one clear error naming the
CPU reference instead of a failure inside Triton.

Configs. `gpu_or_interpreter(gpu, interpreter)` is the one place a launch parameter is chosen for the
interpreter, which runs every program in Python; `autotune_configs(gpu, interpreter)` gives an autotuned
kernel its GPU list, or exactly one config under the interpreter (so CPU tests compile and run each shape
once). Each GPU list sits next to its kernel with a comment saying what `python -m kernels.build_check`
measured for it. `autotune` is `triton.autotune` with the tuning results persisted on disk, so a second
process on the same machine times nothing; `token_bucket` turns a token count into an autotune key that
changes once per power of two. Hand-written tuners (int6_linear's) persist through `PersistentChoices`.
`launch_candidates` lists the configs a launch would time and `forced_config` runs exactly one of them
(the build check compiles, and the GPU tests check, every candidate).
`multiprocessor_count` is the GPU size that launch decisions (how far to split work) are made for.

tl.dot operands and precision: ONE rule, `dot_args(dtype)`, for every op.
  * 16-bit inputs (bf16, fp16): the operands stay in that dtype (tensor cores), accumulation in fp32.
  * fp32 inputs: as exact as the torch matmul the op replaces. torch.get_float32_matmul_precision() is
    "highest" by default, and the dot then runs in IEEE fp32; after
    torch.set_float32_matmul_precision("high") or ("medium") it runs in TF32, as torch's own matmuls do.
  * fp64 inputs (only the ops that document them): computed in fp32 tiles by the fp32 rule.
  * under the interpreter: fp32 operands, IEEE (the interpreter has no bf16 dot).
Ops that round an fp32 operand to a 16-bit one first (the embedding's projection, cast to its table's
dtype like the seed's CastedLinear) then follow the 16-bit rule.

Tiles. `pow2_tile` (the next power of two, at least tl.dot's 16), `pow2_divisor` (alignment of a length),
`grouped_tile` and `tile_matmul` for the matmul-with-epilogue kernels.

Validation. `check_tensor` and one `check_<op>_inputs` per op contract, shared by the op and its reference
in kernels/reference.py, so the reference rejects what the op rejects (the reference also admits float64,
in which the tests evaluate it). `empty_output` allocates kernel outputs, NaN-poisoned under test so an
element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re
import tempfile
import warnings
from numbers import Real
from pathlib import Path

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The dtypes the Triton kernels take, and Triton's name for each.
TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
KERNEL_DTYPES = tuple(TRITON_DTYPES)


# ----------------------------------------------------------------------------------------------
# Where the Triton ops run
# ----------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_device(op: str, name: str, t: torch.Tensor, *, reference: str | None = None) -> None:
    """Raise ValueError unless tensor `t` (argument `name` of public op `op`) can feed a Triton kernel: a
    CUDA tensor, or any tensor under the interpreter. The message names the CPU alternative, by default
    kernels.reference.<op>."""
    if t.device.type == "cuda" or interpreting():
        return
    reference = reference or f"kernels.reference.{op}"
    raise ValueError(f"{op}: {name} is on {t.device}; the Triton ops need a CUDA tensor (or TRITON_INTERPRET=1 "
                     f"for the CPU interpreter); use {reference} on CPU")


# Under the interpreter launch decisions are made for a small GPU, so that the tests' tiny shapes still
# take the paths meant for filling a big one (e.g. the cross-entropy's vocabulary split).
INTERPRETER_MULTIPROCESSORS = 2
_planned_multiprocessors: int | None = None


def multiprocessor_count(device: torch.device) -> int:
    """The number of SMs launch decisions are made for: the CUDA device's own; for the meta tensors that
    kernels.build_check runs the host launchers on, that of the GPU it plans for (`planning_for`);
    INTERPRETER_MULTIPROCESSORS otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta" and _planned_multiprocessors is not None:
        return _planned_multiprocessors
    return INTERPRETER_MULTIPROCESSORS


@contextlib.contextmanager
def planning_for(multiprocessors: int):
    """Within the block, host launchers given meta tensors decide as on a GPU with `multiprocessors`
    SMs (kernels.build_check derives a GPU run's exact launches this way, on a machine without one)."""
    global _planned_multiprocessors
    previous, _planned_multiprocessors = _planned_multiprocessors, multiprocessors
    try:
        yield
    finally:
        _planned_multiprocessors = previous


# ----------------------------------------------------------------------------------------------
# Configs and their tuning
# ----------------------------------------------------------------------------------------------

def gpu_or_interpreter(gpu, interpreter):
    """`interpreter` under the Triton interpreter, else `gpu`: the one place where a launch parameter (a
    config list, a block size) is chosen for the interpreter, whose programs run one by one in Python."""
    return interpreter if interpreting() else gpu


def autotune_configs(gpu: list, interpreter) -> list:
    """The GPU list, or [interpreter] alone under the interpreter. Any candidate type (triton.Config or
    an op's own description of a launch)."""
    return gpu_or_interpreter(list(gpu), [interpreter])


_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs: list, key: list[str], **kwargs):
    """triton.autotune(configs, key) whose timings are kept in the Triton cache dir (its cache_results),
    so a second process on the same machine times nothing and compiles only the chosen config. Triton
    adds the dtype of every tensor argument to the key itself."""
    if _CACHE_RESULTS:
        kwargs["cache_results"] = True
    elif not interpreting():
        warnings.warn(f"triton {triton.__version__} has no autotune cache_results: tuning is redone in "
                      f"every process", stacklevel=2)
    return triton.autotune(configs=configs, key=key, **kwargs)


def launch_candidates(kernel, named_args: dict) -> list:
    """The configs autotuned `kernel` would time for a launch with `named_args` (its arguments and
    constexprs by name): its list after its early prune. kernels.build_check compiles exactly these;
    the GPU tests run each of them (`forced_config`)."""
    kernel.nargs = named_args                  # what an early_config_prune reads, as during a launch
    try:
        return list(kernel.prune_configs(named_args))
    finally:
        kernel.nargs = None


@contextlib.contextmanager
def forced_config(tuner, config):
    """Within the block `tuner` runs exactly `config`, timing nothing: an autotuned kernel (`autotune`)
    launches it every time; a hand-written tuner (`PersistentChoices`) picks it for every problem whose
    candidates include it (ValueError for one whose candidates do not). What the tuners chose before the
    block is kept. The one way to run a chosen candidate, so a test can check every config of every list
    against the reference and no untested config can win the autotuner on some GPU."""
    if isinstance(tuner, PersistentChoices):
        previous, tuner._forced = tuner._forced, config
        try:
            yield
        finally:
            tuner._forced = previous
        return
    if not any(str(c) == str(config) for c in tuner.configs):
        raise ValueError(f"forced_config: {config} is not one of the configs of {tuner.fn}")
    previous = tuner.configs
    tuner.configs = [config]                   # one config: the autotuner launches it without timing
    try:
        yield
    finally:
        tuner.configs = previous


def token_bucket(n: int) -> int:
    """Autotune key of a token count: its next power of two, so a kernel keyed on it retunes once per
    bucket rather than at every new count (passed as an argument the kernel itself never reads)."""
    return triton.next_power_of_2(max(1, int(n)))


def triton_cache_dir() -> Path:
    """Triton's cache directory (TRITON_CACHE_DIR, default ~/.triton/cache)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return Path(knobs.cache.dir)
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


class PersistentChoices:
    """The choices of a hand-written tuner (one op's), remembered in memory and in one JSON file per
    device name under the Triton cache dir (<cache>/crawler_kernels/<op>-<device>.json), so a second
    process on the same machine times nothing. A stored choice is used only while it is still one of
    the candidates; a missing or unreadable file just means timing again."""

    def __init__(self, op: str):
        self.op = op
        self._chosen: dict[tuple[str, str], object] = {}
        self._forced = None                   # set by `forced_config`

    def path(self, device_name: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name)
        return triton_cache_dir() / "crawler_kernels" / f"{self.op}-{safe}.json"

    def _stored(self, device_name: str) -> dict:
        try:
            stored = json.loads(self.path(device_name).read_text())
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def pick(self, key: str, device_name: str, candidates: list, time_candidate):
        """The candidate chosen for `key` on `device_name`: remembered, else stored, else the fastest by
        time_candidate(candidate) -> seconds (then stored). Candidates are matched by repr."""
        by_repr = {repr(c): c for c in candidates}
        if self._forced is not None:
            if repr(self._forced) not in by_repr:
                raise ValueError(f"forced_config: {self._forced!r} is not a candidate of {self.op} for {key}")
            return by_repr[repr(self._forced)]
        if (device_name, key) in self._chosen:
            return self._chosen[(device_name, key)]
        choice = by_repr.get(self._stored(device_name).get(key))
        if choice is None:
            times = [time_candidate(c) for c in candidates]
            choice = candidates[min(range(len(candidates)), key=times.__getitem__)]
            stored = self._stored(device_name)
            stored[key] = repr(choice)
            path = self.path(device_name)
            path.parent.mkdir(parents=True, exist_ok=True)
            # temp file + rename: a concurrent reader sees the old file or the new one, never half of one
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                json.dump(stored, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        self._chosen[(device_name, key)] = choice
        return choice


# ----------------------------------------------------------------------------------------------
# tl.dot operands and precision, tiles
# ----------------------------------------------------------------------------------------------

def dot_args(dtype: torch.dtype) -> dict:
    """{"DOT_DTYPE": operand dtype, "PRECISION": input_precision} of every tl.dot of an op whose inputs
    are `dtype`, by the module docstring's rule (kernels pass both to tl.dot; PRECISION only matters for
    fp32 operands)."""
    if interpreting():
        return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
    if dtype in (torch.float16, torch.bfloat16):
        return {"DOT_DTYPE": TRITON_DTYPES[dtype], "PRECISION": "tf32"}
    exact = torch.get_float32_matmul_precision() == "highest"
    return {"DOT_DTYPE": tl.float32, "PRECISION": "ieee" if exact else "tf32"}


def pow2_tile(n: int, minimum: int = 16) -> int:
    """Tile length for a dimension of n: the next power of two, at least `minimum` (16: tl.dot's
    smallest operand dimension). Tiles wider than n are masked."""
    return max(minimum, triton.next_power_of_2(n))


def pow2_divisor(v: int, cap: int = 16) -> int:
    """Largest power of two dividing v, at most cap (cap for v == 0): the widest aligned access along
    a length v."""
    return cap if v == 0 else min(cap, v & -v)


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. With KERNELS_POISON_OUTPUTS=1 (set by the test suite) floating outputs
    are filled with NaN and integer outputs with their minimum value, so unwritten elements show up."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("KERNELS_POISON_OUTPUTS", "0") == "1":
        if dtype.is_floating_point:
            out.fill_(math.nan)
        elif dtype != torch.bool:
            out.fill_(torch.iinfo(dtype).min)
    return out


# ----------------------------------------------------------------------------------------------
# Input validation: the op contracts, shared by each op and its reference
# ----------------------------------------------------------------------------------------------

def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None,
                 contiguous: bool = False) -> None:
    """Raise TypeError/ValueError naming `name` unless `t` is a tensor with the expected rank, dtype,
    device and (optionally) contiguity."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")


# The layouts `attention` takes its dense q/k/v in: ours and FlashAttention's, and SDPA's.
ATTENTION_LAYOUTS = {"bthd": "(B, T, H, D)", "bhtd": "(B, H, T, D)"}


def _dense_shape_problem(q_shape, k_shape, gain_len, layout: str) -> str | None:
    """What is wrong with dense q (B, Tq, H, D) / k (B, Tk, Hkv, D) shapes read in `layout` (dims 1 and 2
    swapped for "bhtd"), or None when they make one attention problem."""
    def read(shape):
        return tuple(shape) if layout == "bthd" else (shape[0], shape[2], shape[1], shape[3])

    def show(b, t, h, d):
        return "(" + ", ".join(map(str, (b, t, h, d) if layout == "bthd" else (b, h, t, d))) + ")"
    B, Tq, H, D = read(q_shape)
    Bk, Tk, Hkv, Dk = read(k_shape)
    if Bk != B or Tk < Tq or Dk != D:
        return (f"k: expected shape {show(B, 'Tk', 'Hkv', D)} with Tk >= {Tq} to match q {tuple(q_shape)} "
                f"(Tk > Tq: the queries are the last Tq positions), got {tuple(k_shape)}")
    return _heads_problem(H, Hkv, gain_len)


def _heads_problem(H: int, Hkv: int, gain_len: int | None) -> str | None:
    """What is wrong with H query heads over Hkv KV heads and a q_gain of gain_len entries, or None."""
    if H % Hkv != 0:
        return f"q/k: number of query heads {H} must be a multiple of KV heads {Hkv}"
    if gain_len is not None and gain_len != H:
        return f"q_gain: expected shape ({H},) (one gain per query head), got ({gain_len},)"
    return None


def check_attention_inputs(q, k, v, *, softmax_scale=None, cu_seqlens=None, max_seqlen=None, q_gain=None,
                           layout="bthd") -> None:
    """Validate the `attention` contract (docs/ops.md).

    Dense: q (B, Tq, H, D), k/v (B, Tk, Hkv, D) with Tq <= Tk, or with layout="bhtd" q (B, H, Tq, D), k/v
    (B, Hkv, Tk, D). A dense call whose shapes fit only the other layout is refused with a message naming
    it. Varlen (cu_seqlens given, layout "bthd" only): q (total, H, D) or (1, total, H, D), k/v of q's
    rank with total rows and Hkv heads; cu_seqlens a 1-D int32 tensor of >= 2 offsets on q's device;
    max_seqlen None or an int >= 1 (varlen only). Always: H % Hkv == 0, D even and <= 128, one float dtype,
    softmax_scale None or a finite number > 0, q_gain None or a float (H,) tensor on q's device.
    Reads no tensor's values (no host sync): cu_seqlens' values are checked where segments are built
    (`check_cu_seqlens`), not per attention call.
    """
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(map(repr, ATTENTION_LAYOUTS))}, got {layout!r}")
    varlen = cu_seqlens is not None
    if varlen and layout != "bthd":
        raise ValueError(f"layout: {layout!r} is for dense {ATTENTION_LAYOUTS[layout]} tensors; with cu_seqlens "
                         f"q/k/v are packed (total, H, D) rows (layout='bthd')")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=None if varlen else 4, dtypes=FLOAT_DTYPES,
                     device=q.device if name != "q" else None)
    if k.shape != v.shape:
        raise ValueError(f"k and v: expected equal shapes, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q_gain is not None:
        check_tensor("q_gain", q_gain, ndim=1, dtypes=FLOAT_DTYPES, device=q.device)
    gain_len = None if q_gain is None else q_gain.shape[0]
    D = q.shape[-1]
    if varlen:
        H = q.shape[-2]
        if q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[0] != 1):
            raise ValueError(f"q: with cu_seqlens, expected packed rows (total, H, D) or (1, total, H, D), "
                             f"got shape {tuple(q.shape)}")
        if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != D:
            raise ValueError(f"k: expected shape ({', '.join(map(str, q.shape[:-2]))}, Hkv, {D}) to match q "
                             f"{tuple(q.shape)} (one packed row per query row), got {tuple(k.shape)}")
        problem = _heads_problem(H, k.shape[-2], gain_len)
        if problem is not None:
            raise ValueError(problem)
    else:
        problem = _dense_shape_problem(q.shape, k.shape, gain_len, layout)
        if problem is not None:
            other = "bhtd" if layout == "bthd" else "bthd"
            if _dense_shape_problem(q.shape, k.shape, gain_len, other) is None:
                problem += (f"; these shapes fit {ATTENTION_LAYOUTS[other]} tensors, not {ATTENTION_LAYOUTS[layout]}: "
                            f"pass layout={other!r} (or transpose dims 1 and 2)")
            raise ValueError(problem)
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only meaningful with cu_seqlens (varlen attention)")
    if D % 2 != 0 or D > 128:
        raise ValueError(f"q: head dim must be even and <= 128, got {D}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and not
                                          isinstance(softmax_scale, bool) and 0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale: expected a finite positive number, got {softmax_scale!r}")
    if varlen:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
        if cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens: expected num_docs + 1 >= 2 offsets, got {cu_seqlens.numel()}")
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))
                                       or max_seqlen < 1):
            raise ValueError(f"max_seqlen: expected an int >= 1 (the longest segment), got {max_seqlen!r}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> int:
    """Validate cu_seqlens' values, once, where segments are built (crawler.documents) or read anyway (the
    reference): 0 = cu[0] <= cu[1] <= ... <= cu[-1] = total. Reads the values (a host sync for a CUDA
    tensor: never call it per attention call). Returns the longest segment."""
    bounds = cu_seqlens.tolist()
    if min(bounds) < 0:
        raise ValueError(f"cu_seqlens: expected non-negative offsets, got {min(bounds)}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {bounds[0]}")
    steps = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(steps) < 0:
        i = steps.index(min(steps))
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {bounds[i]} then {bounds[i + 1]} "
                         f"at index {i}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens: expected to end at the number of packed rows {total}, got {bounds[-1]}")
    return max(steps)


ID_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint16)


def check_embed_inputs(ids, tok_emb, bigram_table, bigram_proj, smear_gate, *, bos_id=None) -> None:
    """Validate the `embed` contract: ids (B,T) int, tok_emb (V,d), bigram_table (NB,k) and bigram_proj
    (d,k) both given or both None (no BigramHash), smear_gate (d,) or None (no SmearGate), all on one
    device; bos_id None or an int id in [0, V). Shapes and dtypes only: the ids' range is a value check
    of its own (`check_class_indices`, run where the ids are read, without a host sync)."""
    check_tensor("ids", ids, ndim=2, dtypes=ID_DTYPES)
    dev = ids.device
    check_tensor("tok_emb", tok_emb, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    if (bigram_table is None) != (bigram_proj is None):
        raise ValueError("bigram_table, bigram_proj: expected both tensors (BigramHash) or both None (none), "
                         f"got {'bigram_proj' if bigram_table is None else 'bigram_table'} None alone")
    d = tok_emb.shape[1]
    if bigram_table is not None:
        check_tensor("bigram_table", bigram_table, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
        check_tensor("bigram_proj", bigram_proj, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
        if bigram_proj.shape != (d, bigram_table.shape[1]):
            raise ValueError(f"bigram_proj: expected shape ({d}, {bigram_table.shape[1]}) "
                             f"(model dim, bigram dim), got {tuple(bigram_proj.shape)}")
    if smear_gate is not None:
        check_tensor("smear_gate", smear_gate, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
        if smear_gate.shape != (d,):
            raise ValueError(f"smear_gate: expected shape ({d},), got {tuple(smear_gate.shape)}")
    check_bos_id(bos_id, tok_emb.shape[0])


def check_smear_embed_inputs(ids, tok_emb, smear_weight, smear_lambda, *, bos_id=None) -> None:
    """Validate the `smear_embed` contract: ids (B,T) int, tok_emb (V,d), smear_weight (1,w) with
    1 <= w <= d, smear_lambda one element (shape () or (1,)), floats on ids' device; bos_id None or an
    id in [0, V). Shapes and dtypes only (the ids' range: `check_class_indices`)."""
    check_tensor("ids", ids, ndim=2, dtypes=ID_DTYPES)
    dev = ids.device
    check_tensor("tok_emb", tok_emb, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("smear_weight", smear_weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("smear_lambda", smear_lambda, dtypes=FLOAT_DTYPES, device=dev)
    d = tok_emb.shape[1]
    if smear_weight.shape[0] != 1 or not 1 <= smear_weight.shape[1] <= d:
        raise ValueError(f"smear_weight: expected shape (1, w) with 1 <= w <= {d} (the gate's Linear(w, 1) "
                         f"weight, reading the first w channels), got {tuple(smear_weight.shape)}")
    if tuple(smear_lambda.shape) not in ((), (1,)):
        raise ValueError(f"smear_lambda: expected one value, shape () or (1,), got {tuple(smear_lambda.shape)}")
    check_bos_id(bos_id, tok_emb.shape[0])


def check_bos_id(bos_id, vocab: int) -> None:
    """bos_id must be None or an int token id in [0, vocab)."""
    if bos_id is not None and (isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < vocab):
        raise ValueError(f"bos_id: expected None or a token id in [0, {vocab}), got {bos_id!r}")


def check_mlp_inputs(h, fc_weight, proj_weight, negative_slope) -> None:
    """Validate the `relu2_mlp` contract: h (..., d) float; fc_weight (hidden, d) and proj_weight
    (d, hidden) float on h's device; negative_slope a finite real number."""
    check_tensor("h", h, dtypes=FLOAT_DTYPES)
    check_tensor("fc_weight", fc_weight, ndim=2, dtypes=FLOAT_DTYPES, device=h.device)
    check_tensor("proj_weight", proj_weight, ndim=2, dtypes=FLOAT_DTYPES, device=h.device)
    if h.dim() == 0:
        raise ValueError("h: expected a tensor of shape (..., d), got a 0-d tensor")
    D, H = h.shape[-1], fc_weight.shape[0]
    if fc_weight.shape[1] != D:
        raise ValueError(f"fc_weight: expected shape (hidden, {D}) to match h {tuple(h.shape)}, "
                         f"got {tuple(fc_weight.shape)}")
    if proj_weight.shape != (D, H):
        raise ValueError(f"proj_weight: expected shape ({D}, {H}) (model dim, hidden), "
                         f"got {tuple(proj_weight.shape)}")
    if (isinstance(negative_slope, bool) or not isinstance(negative_slope, Real)
            or not -math.inf < negative_slope < math.inf):
        raise ValueError(f"negative_slope: expected a finite number, got {negative_slope!r}")


TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")


def check_cross_entropy_inputs(hidden, weight, targets, softcap, *, reduction="mean", ignore_index=-100) -> None:
    """Validate the `softcapped_cross_entropy` contract: hidden (N, d) float with N >= 1; weight (V, d)
    float with V >= 1; targets (N,) int64/int32; all on one device; softcap a finite number > 0; reduction
    "mean" | "sum" | "none"; ignore_index an int. The targets' values are a check of their own
    (`check_class_indices`)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    N, D = hidden.shape
    if N == 0:
        raise ValueError("hidden: expected at least one token, got shape (0, d)")
    if weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape (V, {D}) with V >= 1 to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    _check_targets_and_options("hidden", hidden, targets, softcap, reduction, ignore_index)


def check_logits_cross_entropy_inputs(logits, targets, softcap, *, reduction="mean", ignore_index=-100) -> None:
    """Validate the `softcapped_cross_entropy_from_logits` contract: logits (N, V) float with N, V >= 1;
    the rest as `check_cross_entropy_inputs`."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected shape (N, V) with N, V >= 1, got {tuple(logits.shape)}")
    _check_targets_and_options("logits", logits, targets, softcap, reduction, ignore_index)


def _check_targets_and_options(rows_name, rows, targets, softcap, reduction, ignore_index) -> None:
    """The cross-entropy checks both variants share: targets (N,) int on rows' device, softcap, reduction,
    ignore_index."""
    check_tensor("targets", targets, ndim=1, dtypes=TARGET_DTYPES, device=rows.device)
    if targets.shape[0] != rows.shape[0]:
        raise ValueError(f"targets: expected shape ({rows.shape[0]},) to match {rows_name}, "
                         f"got {tuple(targets.shape)}")
    if isinstance(softcap, bool) or not isinstance(softcap, Real) or not (0 < softcap < math.inf):
        raise ValueError(f"softcap: expected a finite number > 0, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")


def check_class_indices(values: torch.Tensor, num_classes: int, *, ignore_index: int | None = None,
                        name: str = "targets", what: str = "class indices") -> None:
    """Check that every value is in [0, num_classes) (or equals ignore_index) without a host sync.

    torch._assert_async does the check where the values live: on CUDA it queues a device-side assert
    (a bad value stops the process before a kernel reads out of bounds, and the host never waits); on the
    CPU it fails at once, re-raised here as a ValueError naming `name`, the expected range and the range
    found. Skipped while torch.compile traces (reading values there would break the graph; the fused ops
    check inside their custom ops, which run eagerly) and for meta tensors, which have no values.
    `values` any integer dtype (uint16 is widened: it has no comparison kernels everywhere)."""
    if torch.compiler.is_compiling() or values.numel() == 0 or values.device.type == "meta":
        return
    v = values.int() if values.dtype == torch.uint16 else values
    bad = (v < 0) | (v >= num_classes)
    if ignore_index is not None:
        bad &= v != ignore_index
    expected = f"{name}: expected {what} in [0, {num_classes})" + (
        "" if ignore_index is None else f" or ignore_index {ignore_index}")
    try:
        torch._assert_async(~bad.any(), expected)
    except RuntimeError:                   # only on the CPU: the values are already on the host
        lo, hi = (int(x) for x in v.aminmax())
        raise ValueError(f"{expected}, got values in [{lo}, {hi}]") from None


def check_token_ids(ids: torch.Tensor, vocab: int) -> None:
    """Every token id in [0, vocab): `check_class_indices` under the embeddings' names (no host sync)."""
    check_class_indices(ids, vocab, name="ids", what="token ids")


def check_gptq_args(bits, clip_sigmas, block_size=None, damp=None) -> None:
    """Validate GPTQ / SDClip settings: bits an int in 2..8 (codes live in int8), clip_sigmas > 0,
    block_size an int > 0, damp >= 0 (each only when given)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an int in 2..8, got {bits!r}")
    if not (isinstance(clip_sigmas, (int, float)) and math.isfinite(clip_sigmas) and clip_sigmas > 0):
        raise ValueError(f"clip_sigmas: expected a finite number > 0, got {clip_sigmas!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size <= 0):
        raise ValueError(f"block_size: expected an int > 0, got {block_size!r}")
    if damp is not None and not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp: expected a finite number >= 0, got {damp!r}")


def check_gptq_inputs(weight, hessian, *, batched: bool = False) -> None:
    """Validate GPTQ input shapes and dtypes: weight (N, K) and hessian (K, K) (with a leading matrix dim
    M when `batched`), floating, on one device, K >= 2 (the row std needs two values). Reads no values
    (see `check_gptq_values`), so it also runs on the fake tensors of torch.compile."""
    lead = 1 if batched else 0
    check_tensor("weight", weight, ndim=2 + lead, dtypes=FLOAT_DTYPES)
    check_tensor("hessian", hessian, ndim=2 + lead, dtypes=FLOAT_DTYPES, device=weight.device)
    K = weight.shape[-1]
    expected = (*weight.shape[:lead], K, K)
    if tuple(hessian.shape) != expected:
        raise ValueError(f"hessian: expected shape {expected} (K = weight.shape[-1] = {K}), "
                         f"got {tuple(hessian.shape)}")
    if K < 2 or weight.shape[-2] < 1:
        raise ValueError(f"weight: expected at least 1 row and 2 columns, got shape {tuple(weight.shape)}")


def check_gptq_values(weight, hessian) -> None:
    """Validate GPTQ input values: both finite, diag(H) >= 0 (H = XᵀX/n is positive semi-definite)."""
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
    if bool((hessian.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise ValueError("hessian: diagonal entries must be >= 0 (H = XᵀX/n is positive semi-definite)")


def check_int6_linear_inputs(x, packed, scales, *, allow_float64: bool = False) -> None:
    """Validate the `int6_linear` contract: x (..., K) float with K % 4 == 0; packed uint8 (N, 3K/4),
    contiguous (its bytes are addressed directly); scales (N,) float16/float32; all on x's device.
    `allow_float64` admits float64 x and scales (the reference, evaluated in float64 by the tests)."""
    x_dtypes = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if allow_float64 else ())
    s_dtypes = (torch.float16, torch.float32) + ((torch.float64,) if allow_float64 else ())
    check_tensor("x", x, dtypes=x_dtypes)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape (..., K), got a 0-d tensor")
    check_tensor("packed", packed, ndim=2, dtypes=(torch.uint8,), device=x.device, contiguous=True)
    check_tensor("scales", scales, ndim=1, dtypes=s_dtypes, device=x.device)
    K = x.shape[-1]
    if K % 4 != 0:
        raise ValueError(f"x: last dim K must be a multiple of 4 (int6 packs 4 codes in 3 bytes), got {K}")
    N = packed.shape[0]
    if packed.shape[1] != 3 * K // 4:
        raise ValueError(f"packed: expected shape (N, {3 * K // 4}) = (N, 3K/4) for x's K = {K}, "
                         f"got {tuple(packed.shape)}")
    if scales.shape[0] != N:
        raise ValueError(f"scales: expected shape ({N},) (one scale per packed row), "
                         f"got {tuple(scales.shape)}")


# ----------------------------------------------------------------------------------------------
# Shared Triton pieces for the matmul-with-a-fused-epilogue kernels (cross_entropy, mlp, int6)
# ----------------------------------------------------------------------------------------------

@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id onto a (row tile, column tile) pair, GROUP_M row tiles at a time, so the
    programs running together share their column operand tiles in L2."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    return pid_m, pid_n


@triton.jit
def tile_matmul(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, rows, cols, K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile A[rows, :] @ B[:, cols] of shape (BLOCK_M, BLOCK_N), looping over K in BLOCK_K steps.

    `rows`/`cols` must be valid indices (callers wrap out-of-range ones with `% M`, so the loads need a
    mask only along K; their results are dropped at the store). Row and column offsets are widened to
    int64 so operands with more than 2**31 elements address correctly. The operands enter tl.dot as
    DOT_DTYPE with PRECISION (`dot_args`).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc
