"""Importing a Parameter Golf train_gpt.py as a module object (the thing `patch_train_gpt` takes), on
machines with or without FlashAttention-3.

The record scripts import `flash_attn_interface` (FA3, Hopper only) at their top. Where it does not
import, `load_script` gives them `sdpa_flash_attn_interface()`: FA3's two calls as the record scripts make
them, computed by PyTorch SDPA (exact softmax attention in the inputs' dtype, any device), so the unpatched
script runs its own math on a CPU or on a GPU without FA3. Arguments the stand-in does not implement are
refused by name.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

_FRESH = itertools.count()
# The two scripts this package is tested and benchmarked on (MIT, see the LICENSE beside them).
REFERENCE_SCRIPTS = ("baseline_train_gpt.py", "varlen_record_1530_train_gpt.py")


def find_reference_scripts(start) -> Path | None:
    """The folder holding REFERENCE_SCRIPTS: $PG_REFERENCE_DIR when set (FileNotFoundError if they are not
    there), else the first `shared/reference/pg` in `start` or a folder above it (a checkout's ../shared, a
    worktree's ../../shared); None if there is none."""
    def complete(folder: Path) -> bool:
        return all((folder / name).is_file() for name in REFERENCE_SCRIPTS)

    if os.environ.get("PG_REFERENCE_DIR"):
        folder = Path(os.environ["PG_REFERENCE_DIR"])
        if not complete(folder):
            raise FileNotFoundError(f"PG_REFERENCE_DIR: expected {', '.join(REFERENCE_SCRIPTS)} in {folder}")
        return folder
    start = Path(start).resolve()
    return next((folder / "shared" / "reference" / "pg" for folder in (start, *start.parents)
                 if complete(folder / "shared" / "reference" / "pg")), None)


def _is_default(value) -> bool:
    """Whether an FA3 argument is at a value that asks for nothing beyond plain causal attention."""
    return value is None or (isinstance(value, (bool, int, float, tuple)) and value in (False, 0, (-1, -1)))


def _refuse(call: str, arguments: dict) -> None:
    used = sorted(name for name, value in arguments.items() if not _is_default(value))
    if used:
        raise NotImplementedError(f"{call}: the SDPA stand-in for FA3 does not implement {used}")


def _sdpa(q, k, v, softmax_scale, causal):
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D) by SDPA (GQA when Hkv < H)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **unsupported):
    """FA3's dense call: q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D), by SDPA."""
    _refuse("flash_attn_func", dict(unsupported, window_size=tuple(window_size), softcap=softcap))
    return _sdpa(q, k, v, softmax_scale, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), softcap=0.0, **unsupported):
    """FA3's varlen call on packed rows: q (total, H, D), k/v (total, Hkv, D), cu_seqlens int32 (self-
    attention: q and k share them; repeated ends are empty segments) -> (total, H, D), by SDPA per segment."""
    _refuse("flash_attn_varlen_func", dict(unsupported, window_size=tuple(window_size), softcap=softcap))
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("flash_attn_varlen_func: the SDPA stand-in needs cu_seqlens_q == cu_seqlens_k")
    bounds = cu_seqlens_q.tolist()
    return torch.cat([_sdpa(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
                      for a, b in zip(bounds, bounds[1:]) if b > a], dim=0)


def sdpa_flash_attn_interface() -> types.ModuleType:
    """A `flash_attn_interface` module whose two functions run SDPA (see the module docstring)."""
    module = types.ModuleType("flash_attn_interface", "SDPA stand-in for FlashAttention-3 (kernels.patch.scripts)")
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def load_script(path, *, flash_attn: types.ModuleType | None = None) -> types.ModuleType:
    """Import the train_gpt.py at `path` as a new module object (a fresh copy on every call: its classes
    are its own, so one copy can be patched and another not). `flash_attn` is the module its
    `import flash_attn_interface` gets: default FA3 where it imports, else `sdpa_flash_attn_interface()`.
    The script's top level runs (its Hyperparameters read the environment then); `main()` does not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no train_gpt.py script at {path}")
    if flash_attn is None:
        try:
            import flash_attn_interface as flash_attn
        except ImportError:
            flash_attn = sdpa_flash_attn_interface()
    name = f"train_gpt_{path.stem}_{next(_FRESH)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("flash_attn_interface")
    sys.modules["flash_attn_interface"] = flash_attn
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        if saved is None:
            del sys.modules["flash_attn_interface"]
        else:
            sys.modules["flash_attn_interface"] = saved
    return module
