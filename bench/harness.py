"""The measurement every benchmark in bench/ makes, in one place.

A benchmark test gets two fixtures: pytest-benchmark's `benchmark` and our `bench` (a `Bench`, built by
bench/conftest.py). `bench.run(benchmark, fn, ...)` times `fn` twice over:
  1. `triton.testing.do_bench` (CUDA events, the L2 cache flushed before every call, warm-up first):
     its 20/50/80 % quantiles are the numbers the ratios and bench/RESULTS.md use;
  2. pytest-benchmark rounds (`benchmark.pedantic`) on a clock that synchronises the device before it
     reads the host timer (`synchronized_clock`, installed on every benchmark by conftest), so the JSON
     that `pytest bench --benchmark-json=...` writes holds real device times and `--benchmark-compare`
     compares like with like across commits.
It then stores one record (a flat dict: benchmark, group, impl, role, device, quantiles, metrics) in
`benchmark.extra_info`, so the JSON carries it, and in `bench.records` for the CSV, the plot and the
summary table (bench/report.py). Speed-ups are always baseline / ours of one group measured in the same
run (`report.speedups`).

`Shapes` holds every problem size the benchmarks use: the pr1579 preset's per-GPU micro-batch on a GPU,
tiny sizes in a `--bench-smoke` run (the CPU rehearsal of the benchmark code under TRITON_INTERPRET=1,
whose wall-clock numbers are never results).
"""
from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REP_MS = 100.0       # do_bench measuring time per case (ms); `--bench-rep-ms` / BENCH_REP_MS
QUANTILES = (0.2, 0.5, 0.8)
MAX_ROUNDS = 50              # pytest-benchmark rounds per case (each synchronised)


def smoke_run() -> bool:
    """Whether this process rehearses the benchmarks on the CPU (`--bench-smoke`, which sets BENCH_SMOKE=1)."""
    return os.environ.get("BENCH_SMOKE") == "1"


def compiled(fn, **options):
    """torch.compile(fn, **options) for every compiled baseline and model. A smoke run traces with Dynamo
    (graph breaks under fullgraph=True fail there as on the GPU) but skips Inductor's code generation
    (backend="eager"), whose CPU compile times would swamp the rehearsal."""
    return torch.compile(fn, backend="eager", **options) if smoke_run() else torch.compile(fn, **options)


def synchronized_clock() -> float:
    """Host seconds after all queued device work has finished: pytest-benchmark's timer for GPU work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def source_commit() -> str:
    """The commit being measured: $BENCH_COMMIT (the GPU machine receives a copy of the tree without
    its git metadata, so the caller names it), else `git rev-parse --short HEAD`, else "unknown"."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (set BENCH_COMMIT)"


def plot_if_possible(records: list[dict], path: Path) -> str:
    """bench_plots.png of `records` (bench.report.plot), or, where matplotlib is missing (a bare GPU image),
    no plot; returns the line saying which (the records stay in bench.csv and the JSON either way)."""
    from bench import report
    try:
        return f"wrote {path}" if report.plot(records, path) else "no plot: no group has ours and a baseline"
    except ImportError as e:
        return f"no plot ({e}): `make gpu-wheels GPU_WHEELS=matplotlib` prepares its wheel"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN if out has NaNs)."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


@dataclass(frozen=True)
class Shapes:
    """Problem sizes of every benchmark: `Shapes.real()` on a GPU, `Shapes.smoke()` on a CPU rehearsal."""
    preset: str                  # crawler preset of the step-time and decode benchmarks
    batch: int                   # sequences per micro-batch
    seq_len: int                 # tokens per sequence
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_hidden: int
    kv_dim: int
    vocab_size: int
    bigram_buckets: int
    bigram_dim: int
    logit_softcap: float
    mean_document_len: float     # log-normal mean of the varlen benchmark's documents (tokens)
    decode_prompt: int           # decode benchmark: prompt tokens, then new tokens
    decode_new_tokens: int
    gptq_blocks: int             # blocks of the GPTQ benchmark (6 matrices each)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @classmethod
    def real(cls) -> Shapes:
        """The pr1579 preset, one GPU's micro-batch of its 8-GPU run (524,288 tokens / 8 = 32 × 2048)."""
        from crawler import CrawlerConfig
        c = CrawlerConfig.preset("pr1579")
        return cls(preset="pr1579", batch=c.train_batch_tokens // 8 // c.train_seq_len, seq_len=c.train_seq_len,
                   model_dim=c.model_dim, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                   mlp_hidden=c.mlp_hidden, kv_dim=c.kv_dim,
                   vocab_size=c.vocab_size, bigram_buckets=c.bigram_buckets, bigram_dim=c.bigram_dim,
                   logit_softcap=c.logit_softcap, mean_document_len=1000.0, decode_prompt=128, decode_new_tokens=128,
                   gptq_blocks=c.num_flat_blocks + c.num_crawler_blocks)

    @classmethod
    def smoke(cls) -> Shapes:
        """Sizes small enough for the Triton interpreter on a CPU (code paths only, never results)."""
        from crawler import CrawlerConfig
        c = CrawlerConfig.preset("tiny")
        return cls(preset="tiny", batch=2, seq_len=64, model_dim=c.model_dim, num_heads=2, num_kv_heads=1,
                   mlp_hidden=c.mlp_hidden, kv_dim=c.kv_dim, vocab_size=c.vocab_size,
                   bigram_buckets=c.bigram_buckets, bigram_dim=c.bigram_dim, logit_softcap=c.logit_softcap,
                   mean_document_len=16.0, decode_prompt=8, decode_new_tokens=4, gptq_blocks=1)


@dataclass
class Timing:
    """Quantiles (ms) of one measured function."""
    q20_ms: float
    median_ms: float
    q80_ms: float


@dataclass
class Bench:
    """The `bench` fixture: device, dtype, sizes, repetition budget, and the records of this session."""
    smoke: bool
    rep_ms: float
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.device = torch.device("cpu" if self.smoke else "cuda")
        # The interpreter has no bf16 tl.dot and CPU bf16 is slow: the rehearsal runs in float32.
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.shapes = Shapes.smoke() if self.smoke else Shapes.real()
        self.device_name = (f"CPU smoke run ({platform.machine()}, interpreter)" if self.smoke
                            else torch.cuda.get_device_name(self.device))

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on the benchmark device (same inputs for every implementation)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape: int, generator: torch.Generator, std: float = 1.0, dtype: torch.dtype | None = None,
              requires_grad: bool = False) -> torch.Tensor:
        """Seeded N(0, std²) values of `shape` on the benchmark device, in `dtype` (default: the benchmark's)."""
        t = (std * torch.randn(*shape, generator=generator, device=self.device)).to(dtype or self.dtype)
        return t.requires_grad_(requires_grad)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, *, grad_to_none=(), min_runs: int = 5, wall_clock: bool = False, warmup: bool = True) -> Timing:
        """Quantiles of fn's time, after one untimed call (compilation and autotuning stay out; warmup=False
        skips it where there is nothing to warm, e.g. host-side reference code).

        Device work: do_bench over max(rep_ms, min_runs × one call), a quarter of that as warm-up.
        wall_clock (host work, and every case of a smoke run): the synchronised wall clock over
        max(1, min(min_runs, rep_ms / one call)) calls."""
        if warmup:
            fn()
        start = synchronized_clock()
        fn()
        one_ms = (synchronized_clock() - start) * 1e3
        if wall_clock or self.smoke:
            runs = [one_ms]
            for _ in range(1, max(1, min(min_runs, int(self.rep_ms / max(one_ms, 1e-3))))):
                start = synchronized_clock()
                fn()
                runs.append((synchronized_clock() - start) * 1e3)
            q = statistics.quantiles(runs, n=10) if len(runs) > 1 else runs * 9
            return Timing(q[1], statistics.median(runs), q[7])
        from triton.testing import do_bench
        rep = max(self.rep_ms, min_runs * one_ms)
        q20, q50, q80 = do_bench(fn, warmup=max(rep / 4, one_ms), rep=rep, grad_to_none=list(grad_to_none) or None,
                                 quantiles=list(QUANTILES))
        return Timing(q20, q50, q80)

    def peak_mib(self, fn, *, grad_to_none=()) -> float | None:
        """Device memory (MiB) one call of fn allocates above what was allocated before it (None on CPU)."""
        if self.device.type != "cuda":
            return None
        for t in grad_to_none:
            t.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        for t in grad_to_none:
            t.grad = None
        return peak

    def run(self, benchmark, fn, *, group: str, impl: str, role: str, grad_to_none=(), flops: float | None = None,
            bytes_moved: float | None = None, rates: dict | None = None, metrics: dict | None = None,
            memory: bool = True, min_runs: int = 5) -> dict:
        """Time fn (do_bench, then synchronised pytest-benchmark rounds), measure its peak memory, record.

        group: what is compared (one `ours` and its baselines, same inputs); impl: this implementation's
        label; role: "ours" or "baseline"; flops / bytes_moved: the work of one call, for TFLOP/s and
        GB/s; rates: {name: items per call} -> name = items per second (e.g. {"tok/s": 128});
        metrics: anything else worth keeping (errors, counts). Returns the record."""
        timing = self.time(fn, grad_to_none=grad_to_none, min_runs=min_runs)
        extra = dict(metrics or {})
        if memory:
            extra["peak_MiB"] = self.peak_mib(fn, grad_to_none=grad_to_none)
        if flops is not None:
            extra["TFLOP/s"] = flops / timing.median_ms * 1e-9
        if bytes_moved is not None:
            extra["GB/s"] = bytes_moved / timing.median_ms * 1e-6
        for name, items in (rates or {}).items():
            extra[name] = items / timing.median_ms * 1e3
        self.pedantic(benchmark, fn, group=group, grad_to_none=grad_to_none, median_ms=timing.median_ms)
        return self.record(benchmark, group=group, impl=impl, role=role, timing=timing, metrics=extra)

    def pedantic(self, benchmark, fn, *, group: str, grad_to_none=(), median_ms: float,
                 rounds: int | None = None) -> None:
        """The pytest-benchmark rounds of fn, grouped like our records, grads reset before each: about
        rep_ms in all (3 to MAX_ROUNDS rounds after one warm-up), or exactly `rounds` without warm-up (for
        seconds-long host-driven references)."""
        benchmark.group = f"{benchmark_name(benchmark)}: {group}"

        def reset_grads():
            for t in grad_to_none:
                t.grad = None

        warmup_rounds = 0 if self.smoke or rounds else 1
        if self.smoke:
            rounds = 1
        elif rounds is None:
            rounds = int(min(MAX_ROUNDS, max(3, self.rep_ms / max(median_ms, 1e-3))))
        benchmark.pedantic(fn, setup=reset_grads, rounds=rounds, warmup_rounds=warmup_rounds)

    def record(self, benchmark, *, group: str, impl: str, role: str, timing: Timing, metrics: dict) -> dict:
        """Store one result in benchmark.extra_info (the JSON) and in self.records (CSV, plot, summary)."""
        import triton
        if role not in ("ours", "baseline"):
            raise ValueError(f"role: expected 'ours' or 'baseline', got {role!r}")
        rec = dict(benchmark=benchmark_name(benchmark), group=group, impl=impl, role=role,
                   device=self.device_name, device_kind=self.device.type, smoke=self.smoke,
                   torch=torch.__version__, triton=triton.__version__, rep_ms=self.rep_ms,
                   median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, metrics=metrics)
        benchmark.extra_info.update(rec)
        self.records.append(rec)
        return rec


def benchmark_name(benchmark) -> str:
    """"attention" for a test in bench/test_attention.py (the benchmark a record belongs to)."""
    return Path(benchmark.fullname.split("::")[0]).stem.removeprefix("test_")


BASELINE_ERRORS = (RuntimeError, NotImplementedError, ImportError)   # what "this backend cannot run here" raises


def first_call(fn, *, impl: str, role: str):
    """fn() once (compiles, autotunes) and its result. A baseline this torch / GPU cannot run is skipped
    with its error (a missing backend is a fact about the machine); ours must run."""
    import pytest
    try:
        return fn()
    except BASELINE_ERRORS as e:
        if role == "ours":
            raise
        message = (str(e).strip().splitlines() or [""])[0][:200]
        pytest.skip(f"{impl}: unavailable on this machine ({type(e).__name__}: {message})")


PASSES = ("fwd", "fwd+bwd")


def pass_fn(call, pass_: str, grad: torch.Tensor | None = None):
    """What a case times: `call()` without autograd ("fwd"), or `call().backward(grad)` ("fwd+bwd"; pass
    the leaves as grad_to_none so gradients do not accumulate across calls)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {PASSES}, got {pass_!r}")
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return call()
        return forward
    return lambda: call().backward(grad)


# A fused op against the two ways to run its plain-PyTorch reference: key -> (label, role).
FUSED_VS_TORCH = {
    "ours": ("ours (Triton)", "ours"),
    "eager": ("eager torch ops (kernels.reference)", "baseline"),
    "compiled": ("torch.compile of the eager ops", "baseline"),
}


def fused_vs_torch(key: str, ours, reference):
    """(op, label, role) of FUSED_VS_TORCH[key]: `ours`, `reference`, or torch.compile(reference)."""
    label, role = FUSED_VS_TORCH[key]
    op = {"ours": ours, "eager": reference}.get(key) or compiled(reference, fullgraph=True)
    return op, label, role
