"""The training loop of the seed's recipe (docs/math.md §2): single process or torchrun DDP, resumable.

`train(model_config, train_config, data)` -> TrainResult (the trained model, weights averaged, QAT off;
a summary dict). Per step: `grad_accum_steps` micro-batches (bf16 autocast on GPU, DDP syncing only the
last), Muon momentum warm-up, LR multiplier on the wall-clock (or iteration) budget, global grad clip,
the three optimisers, then SWA collection / EMA update, logging, the wall-clock stop and checkpoints.
Every rank takes the same decisions: the elapsed time that drives the LR, SWA and the stop is
all-reduced (MAX).

Checkpoints (crawler.checkpoint) hold only tensors and plain containers and are written atomically. A
run resumed from a checkpoint produces the same weights as the uninterrupted run (iteration budget,
same world size, deterministic device such as the CPU); under a wall-clock budget the LR follows the
restored elapsed time.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import TRAINING_FORMAT, TRAINING_VERSION, Checkpoint, read_checkpoint, save_checkpoint, save_model
from ..config import CrawlerConfig
from ..documents import document_segments, segment_capacity
from ..errors import SetupError
from ..evaluate import val_bpb
from ..fileio import write_json
from ..model import CrawlerGPT
from ..optim import build_optimizers, lr_multiplier, muon_momentum_at, set_lr_multiplier
from ..runtime import DistContext, autocast, current_context
from .averaging import EMA, WeightAverager
from .config import TrainConfig, check_batch_shape, resolve_grad_accum
from .data import TrainData
from .log import RunLogger, progress_line, step_line
from .stream import DistributedTokenLoader

# Config fields that describe how a run feeds data, not the model: they may differ on resume.
_NON_ARCH_FIELDS = ("train_seq_len", "train_batch_tokens")


def check_resume_compatible(ckpt: Checkpoint, model_config: CrawlerConfig, data: TrainData) -> list[str]:
    """SetupError unless the checkpoint's model architecture and data/tokenizer match this run's.
    Returns warnings for fields that may differ (batch size, sequence length)."""
    path, state = ckpt.path, ckpt.contents
    saved = ckpt.config.to_dict()
    now = model_config.to_dict()
    arch_diff = {k: (saved[k], now[k]) for k in now if k not in _NON_ARCH_FIELDS and saved[k] != now[k]}
    if arch_diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in
                           ((k, *v) for k, v in sorted(arch_diff.items())))
        raise SetupError(f"cannot resume {str(path)!r}: its model config differs ({detail}); rerun with the "
                         f"same --preset and model options as the run that wrote it")
    if state["data"] != data.identity:
        diff = sorted(k for k in data.identity if state["data"].get(k) != data.identity[k])
        raise SetupError(f"cannot resume {str(path)!r}: it was trained on other data or another tokenizer "
                         f"(differs in: {', '.join(diff)}); rerun with the same --data-dir and --tokenizer")
    return [f"resume: {k} was {saved[k]!r}, now {now[k]!r}" for k in _NON_ARCH_FIELDS if saved[k] != now[k]]


@dataclass
class TrainResult:
    """`model`: the trained CrawlerGPT (SWA/EMA weights loaded, QAT off, eval mode, on the training
    device); `summary`: what summary.json holds; `data`: the TrainData it was trained and scored on."""
    model: CrawlerGPT
    summary: dict
    data: TrainData


class _Trainer:
    def __init__(self, model_config, tc, data, out_dir, ops, ctx, log):
        self.mc, self.tc, self.data, self.ctx, self.log = model_config, tc, data, ctx, log
        self.out_dir = out_dir
        self.device = ctx.device
        self.seq_len = model_config.train_seq_len
        self.grad_accum = resolve_grad_accum(tc, ctx.world_size)
        self.local_tokens = check_batch_shape(model_config.train_batch_tokens, self.seq_len, ctx.world_size,
                                              self.grad_accum)
        self.max_wallclock_ms = 1000.0 * tc.max_wallclock_seconds if tc.max_wallclock_seconds > 0 else None

        torch.manual_seed(tc.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(tc.seed)
        self.model = CrawlerGPT(model_config, ops=ops).to(self.device)
        self.model.set_qat(tc.qat)
        self.optimizers = build_optimizers(
            self.model, matrix_lr=tc.matrix_lr, tied_embed_lr=tc.tied_embed_lr, scalar_lr=tc.scalar_lr,
            muon_momentum=tc.muon_momentum, muon_backend_steps=tc.muon_backend_steps,
            muon_weight_decay=tc.muon_weight_decay, adam_weight_decay=tc.adam_weight_decay,
            adam_betas=(tc.adam_beta1, tc.adam_beta2), adam_eps=tc.adam_eps,
            muon_row_normalize=tc.muon_row_normalize, muon_polar_express=tc.muon_polar_express,
            muon_dtype=getattr(torch, tc.muon_dtype))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.loader = DistributedTokenLoader(data.data_dir, rank=ctx.rank, world_size=ctx.world_size)
        self.swa = WeightAverager()
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema else None
        self.step, self.train_time_ms = 0, 0.0
        self.history = {"train_loss": [], "val": []}

        use_compile = tc.compile if tc.compile is not None else self.device.type == "cuda"
        # A compiled model needs one cu_seqlens shape: pad to a fixed capacity. Eager runs take the exact
        # segments (the reference attention loops over them).
        self.segment_capacity = segment_capacity(self.local_tokens // self.seq_len) if use_compile else None
        module = torch.compile(self.model, dynamic=False, fullgraph=True) if use_compile else self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DDP(module, device_ids=ids, broadcast_buffers=False)
        self.module, self.compiled = module, use_compile

    # -- state ---------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Everything a resume restores, as crawler.checkpoint's "training" kind."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": TRAINING_FORMAT, "version": TRAINING_VERSION,
                "model_config": self.mc.to_json(), "train_config": dataclasses.asdict(self.tc),
                "data": self.data.identity, "world_size": self.ctx.world_size,
                "step": self.step, "train_time_ms": self.train_time_ms,
                "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "swa": self.swa.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "loader": self.loader.state_dict(), "rng": rng, "history": self.history}

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a "training" checkpoint (checked against this run's model and data first)."""
        state, path = ckpt.contents, ckpt.path
        for warning in check_resume_compatible(ckpt, self.mc, self.data):
            self.log(warning)
        if state["world_size"] != self.ctx.world_size:
            self.log(f"resume: checkpoint was written with world size {state['world_size']}, now "
                     f"{self.ctx.world_size}; the data order differs from an uninterrupted run")
        saved_tc = state["train_config"]
        changed = sorted(k for k, v in dataclasses.asdict(self.tc).items() if saved_tc.get(k) != v)
        if changed:
            self.log("resume: training options changed: " +
                     ", ".join(f"{k} {saved_tc.get(k)!r} -> {getattr(self.tc, k)!r}" for k in changed))
        self.model.load_state_dict(ckpt.state_dict, strict=True)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            # load_state_dict also restores the saved hyper-parameters; this run's options win.
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(sd)
            for group, hyper in zip(opt.param_groups, current):
                group.update(hyper)
        self.swa.load_state_dict(state["swa"])
        if self.ema is not None:
            if state["ema"] is None:
                self.log("resume: EMA was off in the checkpoint; starting it from the current weights")
            else:
                self.ema.load_state_dict(state["ema"])
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise SetupError(f"cannot resume {str(path)!r}: {e}") from None
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.train_time_ms = int(state["step"]), float(state["train_time_ms"])
        self.history = state["history"]
        self.log(f"resume: continuing {str(path)!r} at step {self.step}, train_time {self.train_time_ms:.0f}ms")

    # -- one optimiser step ----------------------------------------------------------------------
    def train_step(self, step: int, multiplier: float) -> torch.Tensor:
        """One optimiser step at LR multiplier `multiplier`; returns the mean micro-batch loss (0-d,
        this rank's, not synchronised)."""
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch(self.local_tokens, self.seq_len)
            # Segments from the CPU batch: no device sync.
            documents = (document_segments(x, capacity=self.segment_capacity).to(self.device)
                         if self.tc.doc_isolated else None)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro-batch (no_sync covers forward + backward).
            sync = (self.module.no_sync() if self.ctx.distributed and micro < self.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast(self.device):
                    loss = self.module(x, y, documents)
                (loss / self.grad_accum).backward()
            total += loss.detach()
        tc = self.tc
        momentum = muon_momentum_at(step, start=tc.muon_momentum_warmup_start, end=tc.muon_momentum,
                                    warmup_steps=tc.muon_momentum_warmup_steps)
        for group in self.optimizers[0].param_groups:
            group["momentum"] = momentum
        set_lr_multiplier(self.optimizers, multiplier)
        if tc.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, tc.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total / self.grad_accum

    def compile_warmup(self) -> None:
        """Run `warmup_steps` steps so compilation (and autotuning) happens before the clock starts,
        then put model, optimisers and loader back as they were."""
        if self.tc.warmup_steps <= 0:
            return
        t0 = time.perf_counter()
        model_state = copy.deepcopy(self.model.state_dict())
        opt_states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        loader_state = self.loader.state_dict()
        for i in range(self.tc.warmup_steps):
            self.train_step(self.step + i, 1.0)
        self.model.load_state_dict(model_state, strict=True)
        for opt, sd in zip(self.optimizers, opt_states):
            opt.load_state_dict(sd)
        self.loader.load_state_dict(loader_state)
        self._sync()
        self.log(f"warmup: {self.tc.warmup_steps} compile warm-up steps in {time.perf_counter() - t0:.1f}s "
                 f"(state restored)")

    # -- helpers ---------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _agree_max(self, value: float) -> float:
        """The maximum of `value` over ranks (every rank then takes the same time-based decisions)."""
        if not self.ctx.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _mean_over_ranks(self, t: torch.Tensor) -> float:
        if self.ctx.distributed:
            t = t.detach().clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.ctx.world_size
        return float(t.item())

    def evaluate(self) -> tuple[float, float]:
        """(val_loss, val_bpb) of the current weights on all ranks (val_bpb turns QAT off inside)."""
        return val_bpb(self.model, self.data.val_tokens, self.data.luts, seq_len=self.seq_len,
                       batch_seqs=self.tc.val_batch_seqs, doc_isolated=self.tc.doc_isolated)

    def _step_line(self, step: int, rest: str, time_ms: float) -> str:
        return step_line(step, self.tc.iterations, rest, time_ms)

    def _progress_line(self, step: int, time_ms: float) -> str:
        return progress_line(step, self.tc.iterations, done=step - self.start_step,
                             session_ms=time_ms - self.start_time_ms, time_ms=time_ms,
                             batch_tokens=self.mc.train_batch_tokens, max_wallclock_ms=self.max_wallclock_ms)

    def _save(self, path: Path) -> None:
        if self.ctx.is_main and self.out_dir is not None:
            save_checkpoint(path, self.checkpoint_state())

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        tc, log = self.tc, self.log
        self.start_step, self.start_time_ms = self.step, self.train_time_ms
        self.compile_warmup()
        stop_after: int | None = None
        ckpt_path = self.out_dir / "checkpoint.pt" if self.out_dir is not None else None
        self.module.train()
        self._sync()
        t0 = time.perf_counter()
        multiplier = lr_multiplier(self.step, self.train_time_ms, iterations=tc.iterations,
                                   max_wallclock_ms=self.max_wallclock_ms, warmdown_frac=tc.warmdown_frac)
        while True:
            step = self.step
            last = step >= tc.iterations or (stop_after is not None and step >= stop_after)
            validated = any(v["step"] == step for v in self.history["val"])
            periodic = tc.val_every > 0 and step % tc.val_every == 0
            if (last or periodic or (step == 0 and tc.val_at_start)) and not validated:
                self._sync()
                self.train_time_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, bpb = self.evaluate()
                self.history["val"].append({"step": step, "val_loss": val_loss, "val_bpb": bpb,
                                            "train_time_ms": self.train_time_ms})
                log(self._step_line(step, f"val_loss:{val_loss:.4f} val_bpb:{bpb:.4f}", self.train_time_ms))
                self._sync()
                t0 = time.perf_counter()
            if last:
                break

            loss = self.train_step(step, multiplier)
            self.step = step = step + 1
            if self.ema is not None:
                self.ema.update(self.model)
            # SWA uses the multiplier this step ran at, as the seed does.
            if tc.swa and multiplier < tc.swa_start_mult and step % tc.swa_every == 0:
                self.swa.collect(self.model)

            elapsed = self._agree_max(self.train_time_ms + 1000.0 * (time.perf_counter() - t0))
            multiplier = lr_multiplier(step, elapsed, iterations=tc.iterations,
                                       max_wallclock_ms=self.max_wallclock_ms, warmdown_frac=tc.warmdown_frac)
            if stop_after is None and self.max_wallclock_ms is not None and elapsed >= self.max_wallclock_ms:
                stop_after = step
            if tc.log_every > 0 and (step <= 10 or step % tc.log_every == 0 or stop_after == step):
                mean_loss = self._mean_over_ranks(loss)
                self.history["train_loss"].append([step, mean_loss])
                log(self._step_line(step, f"train_loss:{mean_loss:.4f}", elapsed))
                if step % tc.log_every == 0 or stop_after == step:
                    log(self._progress_line(step, elapsed))
            if ckpt_path is not None and tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
                self._sync()
                self.train_time_ms += 1000.0 * (time.perf_counter() - t0)
                self._save(ckpt_path)
                t0 = time.perf_counter()
        if ckpt_path is not None:
            self._save(ckpt_path)
        return self._finish()

    def _finish(self) -> dict:
        tc, log = self.tc, self.log
        last_val = self.history["val"][-1]
        averaged = None
        if self.ema is not None:
            self.model.load_state_dict(self.ema.average(self.model.state_dict()), strict=True)
            averaged = "ema"
        elif tc.swa and self.swa.count > 0:
            self.model.load_state_dict(self.swa.average(self.model.state_dict()), strict=True)
            averaged = f"swa ({self.swa.count} snapshots)"
        final_loss, final_bpb = last_val["val_loss"], last_val["val_bpb"]
        if averaged is not None:
            t0 = time.perf_counter()
            final_loss, final_bpb = self.evaluate()
            log(f"{averaged.split()[0]}: averaged weights val_loss:{final_loss:.4f} val_bpb:{final_bpb:.4f} "
                f"({averaged}; eval {time.perf_counter() - t0:.1f}s)")
        self.model.set_qat(False)
        self.model.eval()
        steps_run = self.step - self.start_step
        run_ms = self.train_time_ms - self.start_time_ms
        first_val = self.history["val"][0]
        summary = {
            "model_config": self.mc.to_dict(), "train_config": dataclasses.asdict(tc),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.ctx.world_size, "grad_accum_steps": self.grad_accum,
            "device": str(self.device), "compiled": self.compiled,
            "steps": self.step, "steps_this_session": steps_run, "resumed_from_step": self.start_step,
            "train_time_ms": self.train_time_ms,
            "step_avg_ms": self.train_time_ms / self.step if self.step else None,   # as in the log lines
            "tokens_per_s": steps_run * self.mc.train_batch_tokens / (run_ms / 1000.0) if run_ms > 0 else None,
            "train_tokens": self.step * self.mc.train_batch_tokens,
            "initial_val_bpb": first_val["val_bpb"] if first_val["step"] == 0 else None,
            "last_step_val_loss": last_val["val_loss"], "last_step_val_bpb": last_val["val_bpb"],
            "averaging": averaged, "final_val_loss": final_loss, "final_val_bpb": final_bpb,
            "val_tokens": int(self.data.val_tokens.numel()), "history": self.history,
        }
        if self.ctx.is_main and self.out_dir is not None:
            save_model(self.out_dir / "final_model.pt", self.mc, self.model.state_dict())
            write_json(self.out_dir / "summary.json", summary)
        return summary


def train(model_config: CrawlerConfig, tc: TrainConfig, data: TrainData, *, out_dir=None, ops: str = "auto",
          resume=None, ctx: DistContext | None = None, log=None) -> TrainResult:
    """Train a CrawlerGPT of `model_config` with `tc` on `data` (from `prepare_data`).

    `out_dir` (created) receives train.log, checkpoint.pt (every `checkpoint_every` steps and at the
    end), final_model.pt (the averaged weights) and summary.json; None writes nothing. `resume` is a
    checkpoint path to continue from (SetupError if its model config or data differ). `ctx` defaults to
    the current process group (or a single process). Runs on every rank of a torchrun job.
    Returns a TrainResult whose model is ready for evaluation/quantisation.
    """
    tc.validate()
    ctx = ctx or current_context()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = log or RunLogger(out_dir, enabled=ctx.is_main)
    ckpt = read_checkpoint(resume, expect="training") if resume is not None else None
    trainer = _Trainer(model_config, tc, data, out_dir, ops, ctx, log)
    if ckpt is not None:
        trainer.restore(ckpt)
        del ckpt
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"model: {n_params:,} parameters, {model_config.num_positions} schedule positions, ops "
        f"{trainer.model.resolve_ops(ctx.device)}, device {ctx.device}, world {ctx.world_size}, "
        f"grad_accum {trainer.grad_accum}, batch {model_config.train_batch_tokens} tokens "
        f"(seq {trainer.seq_len}), compile {trainer.compiled}{', documents isolated' if tc.doc_isolated else ''}")
    summary = trainer.run()
    return TrainResult(model=trainer.model, summary=summary, data=data)
