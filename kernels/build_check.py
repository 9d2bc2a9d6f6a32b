"""Offline Hopper build check: compile every Triton kernel × every GPU config a pr1579 run could launch (and
the package's other ops at the shapes their users run: the record line's smear_embed, cross-entropy from
logits, embed without BigramHash), for sm_90, on a machine without a GPU, and report what each compilation
costs the chip.

    python -m kernels.build_check [--all | --subset] [--jobs N] [--json PATH] [--target sm_90]
                                  [--cache-dir DIR] [--list]

How the launches are derived. Each op's own host launcher (the Python body of its torch.library custom op;
for int6_linear, `_launch` for every candidate of `_candidates`) runs on meta tensors of the real shapes
(`workloads()`; attention in the model's layout: heads zero-padded to 48 columns, q_gain) inside
`kernels.utils.planning_for(the GPU's SM count)`, so every grid, block-size choice,
split and stride is the one a GPU run computes, from the same code. Each `kernel[grid](...)` launch is
recorded instead of run. A launch of an autotuned kernel stands for every config of its (pruned) list; a
plain launch for itself. Launches with equal Triton specialisations (argument dtypes, 16-byte alignment,
integers equal to 1 or divisible by 16, constexpr values) are one compilation.

How each compilation is made and measured. `JITFunction.warmup`, Triton's normal JIT path without the
launch, for the target (`GPUTarget("cuda", 90, 32)`, or the local GPU's architecture when there is one),
named to Triton by a stand-in driver so that no process needs a GPU context. The compilation is the one a
real launch makes (the same source, specialisation, target and options), so on a GPU machine it lands in
the Triton cache that tests and benchmarks then load; without a GPU it goes to a fresh temporary cache.
From the result: registers and stack-frame (spill) bytes from the cubin's resource usage (`cuobjdump`,
shipped in Triton's wheel), shared memory from the kernel's metadata, blocks and warps per SM from those
and the Hopper limits, the tensor-core instructions from the SASS (`cuobjdump -sass`: HGMMA = Hopper
warpgroup MMA, HMMA = the older warp MMA), and the compile time as CPU seconds of one core (Triton +
ptxas; `--jobs` runs that many compilations in parallel processes, each warmed up by one trivial
compilation first).

Global memory access widths, from the PTX: every ld.global / st.global / atomic (bytes per instruction =
vector length x element size), cp.async (its copy size) and TMA bulk copy (cp.async.bulk), each attributed
to the kernel's pointer arguments its address is computed from (registers followed back to the pointer
parameters) and marked when it sits in an innermost loop (a label and the branch back to it): the table's
"global B x instr" column, and per argument the hot-loop load widths ("hot q/k/v B" for the attention
and decoding kernels; `hot_loop_loads` in --json).

Exit status 1 on a compile failure, a spill, shared memory over the 227 KiB a block may use, a kernel
with a bf16 tl.dot whose SASS has no bf16 tensor-core MMA, or an attention or decoding kernel with a
hot-loop load of q, k or v narrower than MIN_HOT_LOAD_BYTES; 0 otherwise, also when this Triton lacks a piece the check
needs (it says SKIPPED and why).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import triton

from . import cross_entropy, embedding, gptq, int6, mlp, smear_embedding, utils

# The modules, not the functions: kernels/__init__ exports the ops `attention` and `attention_decode` under
# the modules' names.
attention = importlib.import_module(".attention", __package__)
attention_decode = importlib.import_module(".attention_decode", __package__)

# The pr1579 shapes (crawler.config's preset; kernels/ does not import crawler/): 32 × 2048 tokens per GPU
# per micro-batch (524,288 tokens per step over 8 GPUs), d 736, 16 query / 8 KV heads of dim 46, MLP 2944,
# vocabulary 8192, BigramHash 10240 × 128, softcap 30; bf16 activations and embeddings (autocast). The
# attention ops see the heads as the model lays them out: zero-padded to padded_head_dim(46) = 48 columns,
# softmax_scale 1/sqrt(46), the per-head q_gain (H,) fp32 folded into the kernels' scale.
PR1579 = dict(T=2048, d=736, H=16, Hkv=8, D=46, hidden=2944, V=8192, NB=10240, k=128, softcap=30.0)
TRAIN_BATCHES = (32, 4)
# pr1579 decoding (crawler.decoding.Decoder): batch 1 and a few, KV caches of 256 (the int6 decode
# benchmark's prompt + new tokens) and 2048 (the training context) rows; each step a device step (lengths
# read on the device from the cache's position, one value expanded over the batch), split over the keys as
# attention_decode.decode_splits decides.
DECODE_BATCHES = (1, 4)
DECODE_CACHE_ROWS = (256, 2048)
# The record line's embedding (kernels.smear_embed, PR #1667 on): d 512, vocabulary 8192, a 12-wide gate,
# bf16 table, fp32 gate weight and lambda; 786,432 tokens per step over 8 GPUs = 48 × 2048 per GPU.
RECORD = dict(B=48, T=2048, d=512, V=8192, gate=12)
# Int6 inference: every quantised matrix (K, N) of the model plus the tied head, at decode (1 and 16
# rows) and prefill (2048) sizes; GPTQ at every quantised matrix shape (N, K).
INT6_SHAPES = ((736, 736), (736, 368), (736, 2944), (2944, 736), (736, 8192))
INT6_ROWS = (1, 16, 2048)
GPTQ_SHAPES = ((736, 736), (368, 736), (2944, 736), (736, 2944), (8192, 736))

# Hopper (H100 SXM / H200) per-SM limits, for blocks per SM.
SM90 = dict(multiprocessors=132, regs=65536, max_warps=64, max_blocks=32, smem_per_sm=233472,
            smem_per_block=232448, smem_reserved_per_block=1024, reg_alloc_unit=256)
FIRST_STEP = "train B=32"      # the workload whose compilations the first training step pays for


class Skip(Exception):
    """This Triton / torch lacks something the check needs; the message says what."""


# ----------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: object            # triton Autotuner or JITFunction
    grid: object
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def recording_launches():
    """Within the block every `kernel[grid](*args, **kwargs)` is appended to the yielded list instead of
    being launched."""
    from triton.runtime.jit import KernelInterface
    launches: list[Launch] = []
    original = KernelInterface.__getitem__

    def record(kernel, grid):
        return lambda *args, **kwargs: launches.append(Launch(kernel, grid, args, kwargs))

    KernelInterface.__getitem__ = record
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


def _body(custom_op):
    """The Python function behind a torch.library custom op (on meta tensors the dispatcher would run
    its fake implementation instead)."""
    fn = getattr(custom_op, "_init_fn", None)
    if fn is None:
        raise Skip(f"torch {torch.__version__}: torch.library custom ops have no _init_fn to call the launcher")
    return fn


def _meta(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


# ----------------------------------------------------------------------------------------------
# Workloads: what a pr1579 run launches
# ----------------------------------------------------------------------------------------------

def _embedding(B, bos=embedding.NO_BOS):
    p = PR1579
    ids = _meta((B, p["T"]), torch.int64)
    tok, table = _meta((p["V"], p["d"])), _meta((p["NB"], p["k"]))
    proj, gate = _meta((p["d"], p["k"]), torch.float32), _meta((p["d"],), torch.float32)
    x0, rstd, buckets = _body(embedding._embed_forward)(ids, tok, table, proj, gate, bos)
    _body(embedding._embed_backward)(torch.empty_like(x0), ids, tok, table, proj, gate, rstd, buckets, bos)


def _embedding_without_bigram(B, smear):
    """`embed` at the pr1579 width without BigramHash (with or without SmearGate): a drop-in's embedding."""
    p = PR1579
    ids, tok = _meta((B, p["T"]), torch.int64), _meta((p["V"], p["d"]))
    gate = _meta((p["d"],), torch.float32) if smear else None
    x0, rstd, buckets = _body(embedding._embed_forward)(ids, tok, None, None, gate, embedding.NO_BOS)
    _body(embedding._embed_backward)(torch.empty_like(x0), ids, tok, None, None, gate, rstd, buckets,
                                     embedding.NO_BOS)


def _smear_embedding(bos):
    """The record line's smear_embed with rms_norm, forward and backward (bos: 1 with PR #1851's BOS fix,
    NO_BOS before it)."""
    r = RECORD
    ids, tok = _meta((r["B"], r["T"]), torch.int64), _meta((r["V"], r["d"]))
    weight, lam = _meta((1, r["gate"]), torch.float32), _meta((1,), torch.float32)
    out, rstd = _body(smear_embedding._smear_forward)(ids, tok, weight, lam, bos, True)
    _body(smear_embedding._smear_backward)(torch.empty_like(out), ids, tok, weight, lam, rstd, bos, True)


def _attention_layout(rows: tuple, keys: tuple) -> tuple:
    """(q, k, v, q_gain, softmax_scale) as crawler.model's attention passes them: q (*rows, H, 48), k/v
    (*keys, Hkv, 48) bf16 contiguous (heads zero-padded from 46), q_gain (H,) fp32, scale 1/sqrt(46)."""
    p = PR1579
    D = attention.padded_head_dim(p["D"])
    q, k, v = _meta((*rows, p["H"], D)), _meta((*keys, p["Hkv"], D)), _meta((*keys, p["Hkv"], D))
    return q, k, v, _meta((p["H"],), torch.float32), 1.0 / math.sqrt(p["D"])


def _attention(B, xsa, varlen=False):
    """Dense causal (B, T, ·, D), or varlen: the micro-batch packed as (1, B·T, ·, D) with cu_seqlens padded
    to a fixed capacity (the document-isolated trainer's layout) and max_seqlen = T; the model's layout
    (`_attention_layout`)."""
    p = PR1579
    rows = (1, B * p["T"]) if varlen else (B, p["T"])
    q, k, v, gain, scale = _attention_layout(rows, rows)
    cu, max_seqlen = (_meta((8 * B + 1,), torch.int32), p["T"]) if varlen else (None, None)
    o, lse, c = _body(attention._attention_fwd_op)(q, k, v, cu, max_seqlen, True, xsa, scale, gain)
    _body(attention._attention_bwd_op)(torch.empty_like(o), q, k, v, o, lse, c, cu, max_seqlen, True, xsa, scale,
                                       gain)


def _decode(B, cache_rows):
    """One pr1579 decoding step (XSA at every position) over a KV cache of `cache_rows` rows: split and
    combine kernels."""
    q, k, v, gain, scale = _attention_layout((B, 1), (B, cache_rows))
    lengths = _meta((1,), torch.int32).expand(B)
    splits = attention_decode.decode_splits(B * PR1579["H"], cache_rows, q.device)
    _body(attention_decode._attention_decode_op)(q, k, v, lengths, gain, True, scale, splits)


def _mlp(B, negative_slope):
    p = PR1579
    h = _meta((B * p["T"], p["d"]))
    fc, proj = _meta((p["hidden"], p["d"])), _meta((p["d"], p["hidden"]))
    out, post, pre = _body(mlp._mlp_forward)(h, fc, proj, negative_slope)
    _body(mlp._mlp_backward)(torch.empty_like(out), h, fc, proj, post, pre, negative_slope)


def _cross_entropy(B):
    p = PR1579
    hidden, weight = _meta((B * p["T"], p["d"])), _meta((p["V"], p["d"]))
    targets = _meta((B * p["T"],), torch.int64)
    _, lse = _body(cross_entropy._ce_forward)(hidden, weight, targets, p["softcap"])
    _body(cross_entropy._ce_backward)(_meta((), torch.float32), hidden, weight, targets, lse, p["softcap"])


def _cross_entropy_from_logits(B):
    """Cross-entropy from bf16 logits (N = B·T tokens, V 8192, softcap 30): forward and backward."""
    p = PR1579
    logits, targets = _meta((B * p["T"], p["V"])), _meta((B * p["T"],), torch.int64)
    _, lse = _body(cross_entropy._ce_logits_forward)(logits, targets, p["softcap"], -100)
    _body(cross_entropy._ce_logits_backward)(_meta((B * p["T"],), torch.float32), logits, targets, lse,
                                             p["softcap"], -100)


def _train_step(B):
    """One pr1579 training micro-batch (XSA at every position, relu², bf16): forward and backward."""
    _embedding(B)
    _attention(B, xsa=True)
    _mlp(B, 0.0)
    _cross_entropy(B)


def _int6(M):
    for K, N in INT6_SHAPES:
        x, packed, scales = _meta((M, K)), _meta((N, 3 * K // 4), torch.uint8), _meta((N,), torch.float16)
        for cfg in int6._candidates(M, N, K // 4, x.device):
            int6._launch(x, packed, scales, cfg)


def _gptq():
    for N, K in GPTQ_SHAPES:
        gptq._column_walk(_meta((1, N, K), torch.float32), _meta((1, K, K), torch.float32),
                          _meta((1, N), torch.float16), _meta((1, K), torch.int64), bits=6, block_size=128)


def workloads() -> dict:
    """name -> function launching what that part of a pr1579 run launches. FIRST_STEP is the first
    training step; the others are what later steps, other options, inference and decoding add, then the
    ops other models use (embed without BigramHash, the record line's smear_embed, cross-entropy from
    logits)."""
    out = {f"train B={B}": (lambda B=B: _train_step(B)) for B in TRAIN_BATCHES}
    out.update({f"attention no-XSA B={B}": (lambda B=B: _attention(B, xsa=False)) for B in TRAIN_BATCHES})
    out.update({f"doc-isolated B={B}": (lambda B=B: (_attention(B, xsa=True, varlen=True), _embedding(B, bos=1)))
                for B in TRAIN_BATCHES})
    out.update({f"mlp leaky B={B}": (lambda B=B: _mlp(B, 0.5)) for B in TRAIN_BATCHES})
    out.update({f"int6 M={M}": (lambda M=M: _int6(M)) for M in INT6_ROWS})
    out["gptq"] = _gptq
    out.update({f"decode B={B} cache={rows}": (lambda B=B, rows=rows: _decode(B, rows))
                for B in DECODE_BATCHES for rows in DECODE_CACHE_ROWS})
    out["embed no-BigramHash B=32"] = lambda: _embedding_without_bigram(32, smear=True)
    out["embed no-BigramHash no-SmearGate B=32"] = lambda: _embedding_without_bigram(32, smear=False)
    out.update({f"smear_embed {'BOS' if bos == 1 else 'no-BOS'}": (lambda bos=bos: _smear_embedding(bos))
                for bos in (1, embedding.NO_BOS)})
    out["cross-entropy from logits B=32"] = lambda: _cross_entropy_from_logits(32)
    return out


# ----------------------------------------------------------------------------------------------
# The plan: distinct compilations
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Unit:
    """One compilation: a kernel, a config, a specialisation, and the workloads that launch it."""
    name: str
    config: str
    spec: str
    jit_fn: object
    args: tuple
    kwargs: dict              # launch kwargs with the config's (num_warps, num_stages, blocks) merged in
    programs: int
    num_warps: int
    workloads: list

    def row(self) -> dict:
        """The table row's description part (compile results are added to it)."""
        return {"kernel": self.name, "module": self.jit_fn.fn.__module__, "config": self.config, "spec": self.spec,
                "workloads": self.workloads, "programs": self.programs, "num_warps": self.num_warps}

    def pointer_args(self) -> list[str]:
        """The names of the kernel's tensor arguments in order: its PTX's pointer parameters."""
        bound = dict(zip(self.jit_fn.arg_names, self.args)) | self.kwargs
        return [name for name in self.jit_fn.arg_names if isinstance(bound.get(name), torch.Tensor)]


def _jit_fn(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        if not hasattr(fn, "fn"):
            raise Skip(f"triton {triton.__version__}: cannot find the JITFunction behind {kernel!r}")
        fn = fn.fn
    return fn


def _short(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, bool):
        return str(int(v))
    return str(v)


def _specialisation(jit_fn, args: tuple, kwargs: dict) -> tuple:
    """The launch as Triton tells compilations apart (its documented specialisation: tensor dtype and
    16-byte alignment, integers equal to 1 or divisible by 16 unless do_not_specialize, i32 vs i64;
    constexpr values)."""
    params = {p.name: p for p in jit_fn.params}
    bound = dict(zip(jit_fn.arg_names, args)) | kwargs
    key = []
    for name, value in sorted(bound.items()):
        param = params.get(name)
        if param is None or param.is_constexpr:
            key.append((name, repr(value)))
        elif isinstance(value, torch.Tensor):
            key.append((name, value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            key.append((name, type(value).__name__))
        elif isinstance(value, int):
            wide = not -2**31 <= value < 2**31
            key.append((name, wide) if param.do_not_specialize else (name, wide, value == 1, value % 16 == 0))
        else:
            key.append((name, repr(value)))
    return tuple(key)


def _describe(launch_kwargs: dict, config) -> tuple[str, str]:
    """(config, specialisation) strings of a compilation for the table: the autotune config (or a plain
    launch's own constexprs), and the constexprs the host passes (the tl.dot operand dtype as dot=)."""
    dot = launch_kwargs.get("DOT_DTYPE")
    passed = {k: v for k, v in launch_kwargs.items() if k not in ("DOT_DTYPE", "PRECISION")}
    if config is not None:
        blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
        cfg = f"{blocks} w{config.num_warps} s{config.num_stages}"
        spec = " ".join(f"{k}={_short(v)}" for k, v in passed.items())
    else:
        tiles = " ".join(f"{k}={_short(v)}" for k, v in passed.items() if k not in ("num_warps", "num_stages"))
        cfg = f"{tiles} w{passed.get('num_warps', 4)} s{passed.get('num_stages', 3)}"
        spec = ""
    return cfg.strip(), (spec + (f" dot={dot}" if dot is not None else "")).strip()


def _programs(grid, meta: dict) -> int:
    g = grid(meta) if callable(grid) else grid
    return math.prod(int(x) for x in g)


def build_plan(multiprocessors: int = SM90["multiprocessors"]) -> list[Unit]:
    """Every distinct compilation the workloads launch on a GPU with that many SMs, in a fixed order."""
    if utils.interpreting():
        raise SystemExit("build_check: unset TRITON_INTERPRET (the interpreter's single configs are not "
                         "what a GPU compiles)")
    units: dict[tuple, Unit] = {}
    for wname, workload in workloads().items():
        with utils.planning_for(multiprocessors), recording_launches() as launches:
            workload()
        for launch in launches:
            jit_fn = _jit_fn(launch.kernel)
            nargs = dict(zip(launch.kernel.arg_names, launch.args))
            if isinstance(launch.kernel, triton.runtime.Autotuner):
                configs = utils.launch_candidates(launch.kernel, nargs | launch.kwargs)
            else:
                configs = [None]
            for config in configs:
                kwargs = dict(launch.kwargs) | (config.all_kwargs() if config is not None else {})
                key = (jit_fn.__name__, _specialisation(jit_fn, launch.args, kwargs))
                if key in units:
                    if wname not in units[key].workloads:
                        units[key].workloads.append(wname)
                    continue
                cfg, spec = _describe(launch.kwargs, config)
                units[key] = Unit(jit_fn.__name__, cfg, spec, jit_fn, launch.args, kwargs,
                                  _programs(launch.grid, nargs | kwargs), kwargs.get("num_warps", 4), [wname])
    return list(units.values())


def subset(plan: list[Unit]) -> list[Unit]:
    """One compilation per kernel: the first config of its list at the first workload that launches it
    (train B=32, then int6 and GPTQ), so every kernel's code is compiled and checked once."""
    seen, out = set(), []
    for unit in plan:
        if unit.name not in seen:
            seen.add(unit.name)
            out.append(unit)
    return out


# ----------------------------------------------------------------------------------------------
# Compiling one unit and reading its resource usage
# ----------------------------------------------------------------------------------------------

class _TargetDriver:
    """What JITFunction.warmup asks a driver for, without a GPU: a device, a stream, the target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _tool(name: str) -> str:
    """Path of a CUDA binary utility shipped in Triton's wheel (else on PATH)."""
    import triton.backends.nvidia as nvidia
    path = Path(nvidia.__file__).parent / "bin" / name
    if path.exists():
        return str(path)
    from shutil import which
    found = which(name)
    if found is None:
        raise Skip(f"triton {triton.__version__}: no {name} in its wheel or on PATH")
    return found


_MMA = re.compile(r"\b((?:HGMMA|HMMA|QGMMA|IMMA)\.[\w.]+)")
_BF16_DOT = re.compile(r"tt\.dot\b[^\n]*tensor<[^>]*xbf16")


def _inspect_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {"registers": int(fields.get("REG", 0)), "spill_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0)), "static_smem": int(fields.get("SHARED", 0)),
            "mma": dict(collections.Counter(_MMA.findall(sass))),
            "spill_instructions": len(re.findall(r"\b(?:STL|LDL)\b", sass))}


# ----------------------------------------------------------------------------------------------
# Global memory access widths, read from the PTX
# ----------------------------------------------------------------------------------------------

# The load-width rule (issue 23): in the attention kernels (training and decoding), every global load of q,
# k or v inside an innermost loop (the loop over key or query blocks, the hot loop) moves at least this many
# bytes per instruction. Head dim 46 with a 46-element head stride proves only 2-byte alignment: scalar bf16
# loads; the model's heads padded to 48 columns load as 16-byte vectors.
HOT_LOAD_MODULES = ("kernels.attention", "kernels.attention_decode")
HOT_LOAD_OPERANDS = ("Q", "K", "V")
MIN_HOT_LOAD_BYTES = 8

_PTX_POINTER_PARAM = re.compile(r"\.param\s+\.u64\s+\.ptr\b[^,\n)]*?\s(\w+_param_(\d+))")
_PTX_LABEL = re.compile(r"^(\$[\w.]+):")
_PTX_REGISTER = re.compile(r"%[a-z]+\d+")


@dataclasses.dataclass(frozen=True)
class GlobalAccess:
    """One global-memory instruction of a kernel's PTX: kind "ld", "st", "atom" (read-modify-write),
    "cp.async" (an asynchronous copy into shared memory) or "tma.ld" / "tma.st" (a tensor-memory-accelerator
    bulk copy, whose box size the PTX does not show: bytes None); the bytes one thread moves; the kernel's
    pointer arguments its address derives from; whether it sits in an innermost loop."""
    kind: str
    bytes: int | None
    operands: tuple[str, ...]
    hot: bool


def _ptx_instructions(ptx: str) -> list[str]:
    """The PTX body's instructions (comments, directives and blank lines dropped), labels kept as `$L:`."""
    out = []
    for line in ptx.splitlines():
        line = line.split("//", 1)[0].strip()
        label = _PTX_LABEL.match(line)
        if label:
            out.append(label.group(1) + ":")
            line = line[label.end():].strip()
        parts = (part.strip().lstrip("{}").strip() for part in line.split(";"))
        out.extend(part for part in parts if part and not part.startswith("."))
    return out


def _opcode_and_operands(instruction: str) -> tuple[str, str]:
    """("ld.global.v4.b32", "{ %r1, ... }, [ %rd2 + 0 ]") of one instruction, its guard predicate dropped."""
    words = instruction.split(None, 1)
    if words and words[0].startswith("@"):
        words = words[1].split(None, 1) if len(words) > 1 else []
    return (words[0], words[1].strip() if len(words) > 1 else "") if words else ("", "")


def _innermost_loops(instructions: list[str]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every innermost loop: a label and the last branch back to it,
    with no other such loop inside."""
    labels = {ins[:-1]: i for i, ins in enumerate(instructions) if ins.endswith(":")}
    loops: dict[int, int] = {}
    for i, ins in enumerate(instructions):
        opcode, target = _opcode_and_operands(ins)
        start = labels.get(target) if opcode.startswith("bra") else None
        if start is not None and start < i:
            loops[start] = max(loops.get(start, i), i)
    spans = sorted(loops.items())
    return [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]


def _element_bytes(opcode: str) -> int:
    """Bytes one ld/st/atom instruction moves: its vector length times its element type's size."""
    parts = opcode.split(".")
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next(int(m.group(1)) for p in reversed(parts) if (m := re.fullmatch(r"(?:b|f|s|u|bf)(8|16|32|64|128)", p)))
    return vector * bits // 8


def ptx_global_accesses(ptx: str, pointer_args: list[str]) -> list[GlobalAccess]:
    """Every global load, store, atomic and asynchronous copy of a kernel's PTX. `pointer_args` names its
    tensor arguments in order (the PTX's pointer parameters, Triton's scratch pointers after them); an
    access's operands are the arguments whose pointer its address is computed from (a register's sources
    followed through arithmetic, not through loaded values)."""
    params = sorted(_PTX_POINTER_PARAM.findall(ptx), key=lambda p: int(p[1]))
    names = {param: arg for (param, _), arg in zip(params, pointer_args)}
    instructions = _ptx_instructions(ptx)
    hot = _innermost_loops(instructions)
    parsed = [_opcode_and_operands(ins) for ins in instructions]
    # Which pointer arguments each register may hold an address into: a fixpoint over the (non-SSA) PTX.
    sources: dict[str, set[str]] = collections.defaultdict(set)
    defs = []
    for opcode, operands in parsed:
        if not operands or operands.startswith("[") or opcode.startswith(("st.", "bra", "cp.", "red.", "bar")):
            continue
        head, _, rest = operands.partition(",")
        if head.strip().startswith("{"):            # a vector destination: "{ %r1, %r2 }, ..."
            head, _, rest = operands.partition("}")
            rest = rest.lstrip(",")
        dests = _PTX_REGISTER.findall(head)
        if opcode.startswith("ld.param"):
            param = re.search(r"\[\s*(\w+)", rest)
            if param and param.group(1) in names:
                for d in dests:
                    sources[d].add(names[param.group(1)])
        elif not opcode.startswith(("ld.", "atom.", "tensormap")):   # loaded values are data, not addresses
            defs.append((dests, _PTX_REGISTER.findall(rest)))
    changed = True
    while changed:
        changed = False
        for dests, srcs in defs:
            union = set().union(*(sources.get(s, ()) for s in srcs)) if srcs else set()
            for d in dests:
                if not union <= sources[d]:
                    sources[d] |= union
                    changed = True

    def operands_of(address: str) -> tuple[str, ...]:
        return tuple(sorted(set().union(*(sources.get(r, ()) for r in _PTX_REGISTER.findall(address)))))

    out = []
    for i, (opcode, operands) in enumerate(parsed):
        in_loop = any(a <= i <= b for a, b in hot)
        addresses = re.findall(r"\[[^\]]*\]", operands)
        if opcode.startswith("cp.async.bulk") and ".global" in opcode:
            kind = "tma.ld" if ".shared" in opcode.split(".global")[0] else "tma.st"
            out.append(GlobalAccess(kind, None, operands_of(addresses[0 if kind == "tma.st" else 1]), in_loop))
        elif opcode.startswith("cp.async.") and ".global" in opcode and len(addresses) >= 2:
            size = operands.split("]")[2].split(",")[1].strip() if operands.count("]") >= 2 else ""
            nbytes = int(size, 0) if re.fullmatch(r"(0x)?[0-9a-fA-F]+", size) else None
            out.append(GlobalAccess("cp.async", nbytes, operands_of(addresses[1]), in_loop))
        elif opcode.startswith(("ld.global", "st.global", "atom.global", "red.global")) and addresses:
            kind = {"ld": "ld", "st": "st"}.get(opcode.split(".")[0], "atom")
            out.append(GlobalAccess(kind, _element_bytes(opcode), operands_of(addresses[0]), in_loop))
    return out


def memory_widths(accesses: list[GlobalAccess]) -> dict:
    """The table's and JSON's view of a kernel's global accesses: per kind, {bytes per instruction: count};
    the mean bytes per load instruction (ld and cp.async); and per pointer argument, the widths of its
    loads in innermost loops ("TMA" for bulk copies)."""
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    hot: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for a in accesses:
        width = "TMA" if a.bytes is None else a.bytes
        by_kind[a.kind][width] += 1
        if a.hot and a.kind in ("ld", "cp.async", "tma.ld"):
            for name in a.operands:
                hot[name][width] += 1
    sized = [(w, n) for kind in ("ld", "cp.async") for w, n in by_kind.get(kind, {}).items() if w != "TMA"]
    count = sum(n for _, n in sized)

    def widest_first(counter):
        return {str(w): n for w, n in sorted(counter.items(), key=lambda wn: -1 if wn[0] == "TMA" else -wn[0])}

    return {"accesses": {k: widest_first(c) for k, c in sorted(by_kind.items())},
            "load_bytes_mean": round(sum(w * n for w, n in sized) / count, 1) if count else None,
            "hot_loop_loads": {k: widest_first(c) for k, c in sorted(hot.items())}}


def narrow_hot_loads(row: dict) -> dict[str, int]:
    """{operand: narrowest bytes} of the load-width rule's operands whose hot-loop loads are narrower than
    MIN_HOT_LOAD_BYTES, for a kernel of HOT_LOAD_MODULES ({} for any other kernel; TMA copies are wide)."""
    if row.get("module") not in HOT_LOAD_MODULES:
        return {}
    out = {}
    for name in HOT_LOAD_OPERANDS:
        widths = [int(w) for w in row.get("hot_loop_loads", {}).get(name, {}) if w != "TMA"]
        if widths and min(widths) < MIN_HOT_LOAD_BYTES:
            out[name] = min(widths)
    return out


def _occupancy(registers: int, smem: int, num_warps: int) -> int:
    """Blocks of this kernel that fit on one Hopper SM at once."""
    per_warp = math.ceil(max(registers, 1) * 32 / SM90["reg_alloc_unit"]) * SM90["reg_alloc_unit"]
    by_regs = (SM90["regs"] // per_warp) // num_warps
    by_smem = SM90["smem_per_sm"] // (smem + SM90["smem_reserved_per_block"])
    by_warps = SM90["max_warps"] // num_warps
    return max(0, min(by_regs, by_smem, by_warps, SM90["max_blocks"]))


def _problems(row: dict) -> list[str]:
    out = []
    if row["status"] != "ok":
        return [row["status"]]
    if row["spill_bytes"] or row["spill_instructions"]:
        out.append(f"spills ({row['spill_bytes']} B stack, {row['spill_instructions']} LDL/STL)")
    if row["smem_bytes"] > SM90["smem_per_block"]:
        out.append(f"shared memory {row['smem_bytes']} B > {SM90['smem_per_block']} B")
    if row["bf16_dot"] and not any("BF16" in m for m in row["mma"]):
        out.append("bf16 tl.dot without bf16 tensor-core MMA")
    narrow = narrow_hot_loads(row)
    if narrow:
        out.append("hot-loop loads of " + ", ".join(f"{k} {b} B" for k, b in narrow.items())
                   + f" (< {MIN_HOT_LOAD_BYTES} B)")
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): one core's compile time, which
    other work on a shared machine does not inflate the way it inflates wall time."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@triton.jit
def _warm_up_kernel(x_ptr):
    triton.language.store(x_ptr, 1.0)


_WORKER: dict = {}


def _compile(index: int, use_subset: bool, target_arch: int, multiprocessors: int) -> dict:
    """Compile unit `index` of the plan (rebuilt in this process: meta tensors do not pickle with their
    offsets) and return its table row."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    if "plan" not in _WORKER:
        plan = build_plan(multiprocessors)
        _WORKER["plan"] = subset(plan) if use_subset else plan
        from triton.backends.compiler import GPUTarget
        triton.runtime.driver.set_active(_TargetDriver(GPUTarget("cuda", target_arch, 32)))
        # The first compilation in a process also loads the compiler: pay that outside the measurements.
        _warm_up_kernel.warmup(torch.empty(1, device="meta"), grid=(1,))
        _WORKER["startup_s"] = _cpu_seconds()     # this process so far: imports, the plan, the warm-up
    unit = _WORKER["plan"][index]
    row = unit.row()
    row["worker_startup_s"] = round(_WORKER["startup_s"], 2)
    log = io.StringIO()
    t0 = _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            compiled = unit.jit_fn.warmup(*unit.args, grid=(1,), **unit.kwargs)
    except Exception as e:                       # a compile failure is a row of the table, not a crash
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row.update(status=f"compile failed: {type(e).__name__}: {first[:200]}", compile_s=_cpu_seconds() - t0)
        return row
    t1 = _cpu_seconds()
    row["compile_s"] = t1 - t0
    row.update(_inspect_cubin(compiled.asm["cubin"]))
    row["smem_bytes"] = int(compiled.metadata.shared) + row.pop("static_smem")
    row["blocks_per_sm"] = _occupancy(row["registers"], row["smem_bytes"], unit.num_warps)
    row["warps_per_sm"] = row["blocks_per_sm"] * unit.num_warps
    row["bf16_dot"] = bool(_BF16_DOT.search(compiled.asm["ttir"]))
    row.update(memory_widths(ptx_global_accesses(compiled.asm["ptx"], unit.pointer_args())))
    row["notes"] = sorted({m for m in re.findall(r"\(C\d+\) Potential Performance Loss: ([^.]*)", log.getvalue())})
    row["inspect_s"] = _cpu_seconds() - t1       # reading the cubin (cuobjdump) and the PTX: not compiling
    row["status"] = "ok"
    return row


# ----------------------------------------------------------------------------------------------
# Running, reporting
# ----------------------------------------------------------------------------------------------

def _mma_summary(mma: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(mma.items())) or "-"


def _widths_summary(row: dict) -> str:
    """A row's global accesses as "ld 2x96 cp16x36; st 16x16": bytes per instruction x instructions."""
    acc = row.get("accesses", {})

    def cells(kind, prefix=""):
        return [f"{prefix}{w}x{n}" for w, n in acc.get(kind, {}).items()]

    loads = cells("ld") + cells("cp.async", "cp") + cells("tma.ld")
    stores = cells("st") + cells("tma.st") + cells("atom", "atom")
    return "; ".join(part for part in ("ld " + " ".join(loads) if loads else "",
                                       "st " + " ".join(stores) if stores else "") if part) or "-"


def _hot_summary(row: dict) -> str:
    """The narrowest hot-loop load of each operand of the load-width rule ("K 2 V 2"), for its kernels."""
    if row.get("module") not in HOT_LOAD_MODULES:
        return "-"
    hot = row.get("hot_loop_loads", {})
    return " ".join(f"{name} {min(hot[name], key=lambda w: 10**9 if w == 'TMA' else int(w))}"
                    for name in HOT_LOAD_OPERANDS if hot.get(name)) or "none"


def format_table(rows: list[dict], compiled: bool = True) -> str:
    """The rows as an aligned text table (`compiled=False`: the plan only, before compiling)."""
    head = ("kernel", "config", "spec", "programs")
    if compiled:
        head += ("regs", "spill B", "smem KiB", "blk/SM", "warps/SM", "MMA (SASS)", "global B x instr",
                 "hot q/k/v B", "compile s", "status")
    head += ("workloads",)
    lines = []
    for r in rows:
        cells = (r["kernel"], r["config"], r["spec"], str(r["programs"]))
        if compiled:
            ok = r["status"] == "ok"
            problems = r.get("problems") or []
            notes = " (" + "; ".join(r["notes"]) + ")" if ok and r["notes"] else ""
            cells += tuple(x if ok else "-" for x in (
                str(r.get("registers")), str(r.get("spill_bytes")), f"{r.get('smem_bytes', 0) / 1024:.1f}",
                str(r.get("blocks_per_sm")), str(r.get("warps_per_sm")), _mma_summary(r.get("mma", {})),
                _widths_summary(r), _hot_summary(r)))
            cells += (f"{r['compile_s']:.1f}", "; ".join(problems) if problems else "ok" + notes)
        lines.append(cells + (", ".join(r["workloads"]),))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    worst = max(ok, key=lambda r: r["registers"], default=None)

    def seconds(pred):
        picked = [r for r in rows if pred(r)]
        return {"compilations": len(picked), "compile_s": round(sum(r["compile_s"] for r in picked), 1)}

    return {
        "compilations": len(rows),
        "kernels": len({r["kernel"] for r in rows}),
        "failures": sum(r["status"] != "ok" for r in rows),
        "spilling": sum(bool(r["spill_bytes"] or r["spill_instructions"]) for r in ok),
        "over_shared_memory": sum(r["smem_bytes"] > SM90["smem_per_block"] for r in ok),
        "bf16_dot_without_bf16_mma": sum(r["bf16_dot"] and not any("BF16" in m for m in r["mma"]) for r in ok),
        "with_problems": sum(bool(r["problems"]) for r in rows),
        "max_registers": worst["registers"] if worst else None,
        "max_registers_at": f"{worst['kernel']} {worst['config']} {worst['spec']}".strip() if worst else None,
        "at_least_247_registers": sum(r["registers"] >= 247 for r in ok),
        "narrow_hot_loads": sum(bool(narrow_hot_loads(r)) for r in ok),
        "first_training_step": seconds(lambda r: FIRST_STEP in r["workloads"]),
        "int6_inference": seconds(lambda r: any(w.startswith("int6") for w in r["workloads"])),
        "total_compile_s": round(sum(r["compile_s"] for r in rows), 1),
        "total_inspect_s": round(sum(r.get("inspect_s", 0.0) for r in rows), 1),
    }


def _target(arg: str | None) -> tuple[int, int, bool, str]:
    """(architecture, SM count launch decisions are made for, whether that is the local GPU, description).
    The local GPU when there is one (and --target does not name another architecture), else sm_90."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        local = 10 * major + minor
        if arg is None or int(arg.removeprefix("sm_")) == local:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            return local, sms, True, f"sm_{local} (the local {torch.cuda.get_device_name()}, {sms} SMs)"
    arch = int((arg or "sm_90").removeprefix("sm_"))
    sms = SM90["multiprocessors"]
    return arch, sms, False, f"sm_{arch} (no GPU used; launches planned for {sms} SMs)"


def _compile_plan(use_subset: bool, jobs: int, arch: int, sms: int, target_text: str
                  ) -> tuple[list[dict], float, float]:
    """Compile every planned unit in `jobs` spawned processes (they read TRITON_CACHE_DIR from the
    environment); return the rows in plan order, the start time, and the CPU seconds this process took
    to start (imports, the plan)."""
    plan = build_plan(sms)
    plan = subset(plan) if use_subset else plan
    startup_s = _cpu_seconds()
    print(f"build_check: {len(plan)} compilations for {target_text}, triton {triton.__version__}, "
          f"{jobs} job(s)", file=sys.stderr, flush=True)
    rows: list[dict | None] = [None] * len(plan)
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_compile, i, use_subset, arch, sms): i for i in range(len(plan))}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            row = future.result()
            row["problems"] = _problems(row)
            rows[futures[future]] = row
            print(f"[{n}/{len(plan)}] {row['kernel']} {row['config']} {row['compile_s']:.1f}s "
                  f"{'; '.join(row['problems']) or 'ok'}", file=sys.stderr, flush=True)
    return rows, t0, startup_s


@contextlib.contextmanager
def _environ(name: str, value: str):
    """Set an environment variable for the duration of a block (the compile processes inherit it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run(use_subset: bool, jobs: int, target: str | None, cache_dir: str | None) -> dict:
    """Compile the plan, return {"rows", "summary", "environment"}."""
    from triton.runtime import driver
    if not hasattr(driver, "set_active"):
        raise Skip(f"triton {triton.__version__}: no triton.runtime.driver.set_active for a stand-in driver")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        raise Skip(f"triton {triton.__version__}: no triton.backends.compiler.GPUTarget") from e
    _tool("cuobjdump")
    arch, sms, local, target_text = _target(target)
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if cache_dir is None and not local:
            # Without a GPU nothing would reuse these cubins: a fresh cache (removed afterwards) makes every
            # time a compile time.
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="build_check_cache_"))
        if cache_dir is not None:
            stack.enter_context(_environ("TRITON_CACHE_DIR", str(cache_dir)))
        rows, t0, main_startup_s = _compile_plan(use_subset, jobs, arch, sms, target_text)
    # A start-up in CPU seconds (this process's, then a compile process's before its first compilation):
    # what the run costs beyond its compilations, which, unlike wall time, other work on a shared machine
    # does not inflate.
    startup_s = main_startup_s + max((r["worker_startup_s"] for r in rows), default=0.0)
    return {"rows": rows, "summary": summarize(rows),
            "environment": {"triton": triton.__version__, "torch": torch.__version__, "target": target_text,
                            "jobs": jobs, "wall_s": round(time.perf_counter() - t0, 1),
                            "startup_s": round(startup_s, 1),
                            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                            "subset": use_subset, "date": datetime.date.today().isoformat(),
                            "command": " ".join(["python -m kernels.build_check", *sys.argv[1:]])}}


def compile_seconds(result: dict) -> dict:
    """The compact record of what compiling costs (`--seconds`, committed as bench/compile_seconds.json, from
    which `python -m bench.gpu_check` sizes its stages): per kernel its compilations and their single-core
    compile seconds, the total, the CPU seconds spent reading the compilations (cuobjdump, the PTX: the check's
    own cost beyond compiling), the start-up in CPU seconds (`run`'s startup_s), and, for the reader, the
    run's wall time with its job count and the machine's 1-minute load average before and after (wall
    time on a shared machine grows with the load)."""
    kernels: dict[str, dict] = {}
    for r in result["rows"]:
        k = kernels.setdefault(r["kernel"], {"compilations": 0, "compile_s": 0.0})
        k["compilations"] += 1
        k["compile_s"] = round(k["compile_s"] + r["compile_s"], 2)
    env = result["environment"]
    return {"triton": env["triton"], "target": env["target"], "date": env["date"], "subset": env["subset"],
            "jobs": env["jobs"], "wall_s": env["wall_s"], "load_average": env["load_average"],
            "startup_s": env["startup_s"], "total_compile_s": result["summary"]["total_compile_s"],
            "total_inspect_s": result["summary"]["total_inspect_s"], "kernels": kernels}


def _write_json(path: str, result: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--all", action="store_true", help="every compilation (the default)")
    scope.add_argument("--subset", action="store_true", help="one compilation per kernel (the CI test's)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and summary as JSON")
    parser.add_argument("--seconds", metavar="PATH", help="also write the compile seconds per kernel as JSON "
                        "(bench/compile_seconds.json, which sizes the stages of `make gpu-check`)")
    parser.add_argument("--target", metavar="sm_XY", help="architecture (default: the local GPU, else sm_90)")
    parser.add_argument("--list", action="store_true", help="list the compilations (kernel, config, "
                        "specialisation, programs, workloads) without compiling")
    parser.add_argument("--cache-dir", metavar="DIR", help="Triton cache to compile into (default: the normal "
                        "one with a GPU, a fresh temporary one without)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected a positive number, got {args.jobs}")
    if args.target is not None and not re.fullmatch(r"sm_\d+", args.target):
        parser.error(f"--target: expected sm_XY (e.g. sm_90), got {args.target!r}")
    if args.list:
        plan = build_plan(_target(args.target)[1])
        plan = subset(plan) if args.subset else plan
        rows = [unit.row() for unit in plan]
        print(format_table(rows, compiled=False))
        print(f"\n{len(rows)} compilations of {len({r['kernel'] for r in rows})} kernels; "
              f"{sum(FIRST_STEP in r['workloads'] for r in rows)} in the first training step ({FIRST_STEP})")
        if args.json:
            _write_json(args.json, {"rows": rows})
        return 0
    try:
        result = run(args.subset, args.jobs, args.target, args.cache_dir)
    except Skip as e:
        print(f"build_check: SKIPPED: {e}")
        return 0
    print(format_table(result["rows"]))
    s = result["summary"]
    print(f"\n{s['compilations']} compilations of {s['kernels']} kernels for {result['environment']['target']}, "
          f"triton {triton.__version__}: {s['failures']} failed, {s['spilling']} spill, "
          f"{s['over_shared_memory']} over shared memory, {s['bf16_dot_without_bf16_mma']} bf16 dots without "
          f"bf16 MMA; max {s['max_registers']} registers ({s['max_registers_at']}), "
          f"{s['at_least_247_registers']} at >= 247; {s['narrow_hot_loads']} with hot-loop q/k/v loads under "
          f"{MIN_HOT_LOAD_BYTES} B")
    first, i6 = s["first_training_step"], s["int6_inference"]
    print(f"first pr1579 training step ({FIRST_STEP}): {first['compilations']} compilations, "
          f"{first['compile_s']} s single-core compile time")
    print(f"int6 inference shapes: {i6['compilations']} compilations, {i6['compile_s']} s single-core")
    print(f"all: {s['total_compile_s']} s single-core (+ {s['total_inspect_s']} s reading cubins and PTX), "
          f"{result['environment']['wall_s']} s wall with {args.jobs} job(s)")
    if args.json:
        _write_json(args.json, result)
    if args.seconds:
        _write_json(args.seconds, compile_seconds(result))
    return 1 if s["with_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
