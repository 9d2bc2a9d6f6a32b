"""The training loop of the seed's recipe (docs/math.md §2): single process or torchrun DDP, resumable.

`train(model_config, train_config, data)` -> TrainResult (the trained model, weights averaged, QAT off;
a summary dict). Per step: `grad_accum_steps` micro-batches (bf16 autocast on GPU, DDP syncing only the
last), Muon momentum warm-up, LR multiplier on the wall-clock (or iteration) budget, global grad clip,
the three optimisers, then SWA collection / EMA update, logging, the wall-clock stop and checkpoints.
Every rank takes the same decisions: the elapsed time that drives the LR, SWA and the stop is
all-reduced (MAX).

QAT (crawler.training.qat) is on from step 0 or switches on late; a progressive loop schedule
(crawler.training.schedule) runs fewer crawler loops early on, each variant compiled in the warm-up.

Checkpoints (crawler.checkpoint) hold only tensors and plain containers and are written atomically. A
run resumed from a checkpoint produces the same weights as the uninterrupted run (iteration budget,
same world size and thread count, deterministic device such as the CPU); under a wall-clock budget the
LR follows the restored elapsed time. Options that differ from the checkpoint's are logged, those that
change training named (crawler.training.resume). `init_from` instead starts a new run from a weights
file with fresh optimisers (the seed's RESUME_FROM).
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

from ..checkpoint import TRAINING_FORMAT, TRAINING_VERSION, read_checkpoint, save_checkpoint, save_model
from ..config import CrawlerConfig
from ..documents import document_segments, segment_capacity
from ..errors import SetupError
from ..evaluate import val_bpb
from ..fileio import WriteError, write_json
from ..model import CrawlerGPT, load_state_into
from ..optim import build_optimizers, lr_multiplier, muon_momentum_at, set_lr_multiplier
from ..runtime import DistContext, autocast, current_context, to_device
from ..tokenizer import check_tokenizer_identity
from .averaging import EMA, WeightAverager
from .config import TrainConfig, check_batch_shape, resolve_grad_accum
from .data import TrainData
from .log import (
    RunLogger,
    model_params_line,
    peak_memory_line,
    progress_line,
    score_line,
    step_line,
    stopping_early_line,
)
from .qat import QATSwitch
from .resume import RUN_OPTIONS_KEY, architecture_differences, restore_training_state
from .schedule import LoopSchedule
from .stream import DistributedTokenLoader


@dataclass
class TrainResult:
    """`model`: the trained CrawlerGPT (SWA/EMA weights loaded, QAT off, eval mode, on the training
    device); `summary`: what summary.json holds; `data`: the TrainData it was trained and scored on."""
    model: CrawlerGPT
    summary: dict
    data: TrainData


class _Trainer:
    def __init__(self, model_config, tc, data, out_dir, ops, ctx, log, init_from=None, run_options=None):
        self.mc, self.tc, self.data, self.ctx, self.log = model_config, tc, data, ctx, log
        self.out_dir, self.run_options = out_dir, run_options
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
        if init_from is not None:
            self.load_initial_weights(init_from)
        self.qat = QATSwitch(tc, self.model)
        # The optimisers see every parameter the full schedule trains; set_active_loops below may freeze
        # the alphas of loops that do not run yet (they train once their loop does).
        self.optimizers = build_optimizers(
            self.model, matrix_lr=tc.matrix_lr, tied_embed_lr=tc.tied_embed_lr, scalar_lr=tc.scalar_lr,
            muon_momentum=tc.muon_momentum, muon_backend_steps=tc.muon_backend_steps,
            muon_weight_decay=tc.muon_weight_decay, adam_weight_decay=tc.adam_weight_decay,
            adam_betas=(tc.adam_beta1, tc.adam_beta2), adam_eps=tc.adam_eps,
            muon_row_normalize=tc.muon_row_normalize, muon_polar_express=tc.muon_polar_express,
            muon_dtype=getattr(torch, tc.muon_dtype))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.loops = LoopSchedule.parse(tc.progressive_schedule, model_config.crawler_loops)
        self.loader = DistributedTokenLoader(data.data_dir, rank=ctx.rank, world_size=ctx.world_size,
                                             vocab_size=model_config.vocab_size)
        self.swa = WeightAverager()
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema else None
        self.step, self.train_time_ms = 0, 0.0
        self.history = {"train_loss": [], "val": []}

        use_compile = tc.compiles(self.device, ops)
        # A compiled model needs one cu_seqlens shape: pad to a fixed capacity. Eager runs take the exact
        # segments (the reference attention loops over them).
        self.segment_capacity = segment_capacity(self.local_tokens // self.seq_len) if use_compile else None
        # One compiled module for every loop / QAT variant: each variant's graph is compiled on first
        # use (guarded by the model's attributes) and cached, so the warm-up compiles them all.
        self.compiled_model = torch.compile(self.model, dynamic=False, fullgraph=True) if use_compile else self.model
        self.compiled, self.module = use_compile, None
        self.set_loops(self.loops.loops_at(0))

    def set_loops(self, loops: int) -> None:
        """Run `loops` crawler loops from the next step on, and (re)wrap the module in DDP, whose set of
        parameters taking part in a step is fixed when it is built (train_alpha's alphas depend on the
        variant)."""
        if self.module is not None and loops == self.model.active_loops:
            return
        self.model.set_active_loops(loops)
        module = self.compiled_model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.module = None      # the previous wrapper's gradient hooks go before the new one's come
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DDP(module, device_ids=ids, broadcast_buffers=False)
        self.module = module

    def depth(self) -> int:
        """Schedule positions of the variant running now."""
        return len(self.model.schedule)

    def load_initial_weights(self, path) -> None:
        """Start from the weights of `path` (a plain state dict such as the seed's final_model.pt, our
        final_model.pt, or a trainer checkpoint's weights) with fresh optimisers at step 0: the seed's
        RESUME_FROM. Checked as --resume and evaluation check theirs: SetupError if the file's own config
        has another architecture, it records another tokenizer than the run's (unless the run allows a
        mismatch), or its tensors do not fit the model."""
        ckpt = read_checkpoint(path)
        detail = architecture_differences(ckpt.config, self.mc) if ckpt.config is not None else None
        if detail:
            raise SetupError(f"--init-from {str(path)!r}: its model config differs ({detail})")
        check_tokenizer_identity(self.data.tokenizer_path, self.data.tokenizer, ckpt.tokenizer,
                                 allow_mismatch=self.data.allow_tokenizer_mismatch, source=f"--init-from {str(path)!r}")
        try:
            load_state_into(self.model, ckpt.state_dict)
        except ValueError as e:
            raise SetupError(f"--init-from {str(path)!r}: {e}") from None
        self.log(f"resuming_from:{path}")
        self.log("resume:loaded model weights (optimizer states reset)")

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
                "loader": self.loader.state_dict(), "rng": rng, "history": self.history,
                "qat_active": self.qat.active, RUN_OPTIONS_KEY: self.run_options}

    # -- one optimiser step ----------------------------------------------------------------------
    def train_step(self, step: int, multiplier: float) -> torch.Tensor:
        """One optimiser step at LR multiplier `multiplier`; returns the mean micro-batch loss (0-d,
        this rank's, not synchronised)."""
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch(self.local_tokens, self.seq_len)
            # Segments from the CPU batch: no device sync.
            documents = (document_segments(x, bos_id=self.data.bos_id, capacity=self.segment_capacity).to(self.device)
                         if self.tc.doc_isolated else None)
            x, y = to_device(x, self.device), to_device(y, self.device)
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
        shared among the variants the run will use (each crawler-loop count of a progressive schedule;
        QAT off and on when it switches on late), at least one step each; then put model, optimisers,
        loader and variant back as they were."""
        tc = self.tc
        if tc.warmup_steps <= 0:
            return
        t0 = time.perf_counter()
        model_state = copy.deepcopy(self.model.state_dict())
        opt_states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        loader_state = self.loader.state_dict()
        loops_now, qat_now = self.model.active_loops, self.qat.active
        later = [loops for loops in self.loops.variants() if loops != loops_now]
        qat_states = [qat_now, True] if tc.qat and not qat_now else [qat_now]
        variants = [(loops, qat) for loops in [loops_now, *later] for qat in qat_states]
        steps = 0
        for loops, qat in variants:
            self.set_loops(loops)
            self.model.set_qat(qat)
            if len(variants) > 1:
                self.log(f"warmup:precompile variant={loops} loops, depth={self.depth()}, qat {'on' if qat else 'off'}")
            for _ in range(max(1, tc.warmup_steps // len(variants))):
                self.train_step(self.step + steps, 1.0)
                steps += 1
        self.model.load_state_dict(model_state, strict=True)
        for opt, sd in zip(self.optimizers, opt_states):
            opt.load_state_dict(sd)
        self.loader.load_state_dict(loader_state)
        self.set_loops(loops_now)
        self.qat.set_active(qat_now)
        self._sync()
        self.log(f"warmup: {steps} compile warm-up steps in {time.perf_counter() - t0:.1f}s (state restored)")

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

    def _multiplier(self, step: int, elapsed_ms: float) -> float:
        tc = self.tc
        return lr_multiplier(step, elapsed_ms, iterations=tc.iterations, max_wallclock_ms=self.max_wallclock_ms,
                             warmdown_frac=tc.warmdown_frac, warmdown_iters=tc.warmdown_iters)

    def _save(self, path: Path, state: dict | None = None) -> None:
        if self.ctx.is_main and self.out_dir is not None:
            save_checkpoint(path, state if state is not None else self.checkpoint_state())

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        tc, log = self.tc, self.log
        self.start_step, self.start_time_ms = self.step, self.train_time_ms
        if self.loops.enabled:
            log(f"progressive:enabled schedule={list(self.loops.switches)} starting with "
                f"{self.model.active_loops} crawler loop(s), depth={self.depth()}")
        self.compile_warmup()
        stop_after: int | None = None
        ckpt_path = self.out_dir / "checkpoint.pt" if self.out_dir is not None else None
        self.module.train()
        self._sync()
        t0 = time.perf_counter()
        multiplier = self._multiplier(self.step, self.train_time_ms)
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
                if stop_after is not None and step < tc.iterations:
                    log(stopping_early_line(step, tc.iterations, self.train_time_ms))
                break

            self.qat.update(step, multiplier, log)
            loss = self.train_step(step, multiplier)
            self.step = step = step + 1
            loops = self.loops.loops_at(step)
            if loops != self.model.active_loops:
                self.set_loops(loops)
                log(f"progressive:step {step} -> {loops} crawler loops, depth={self.depth()}")
            if self.ema is not None:
                self.ema.update(self.model)
            # SWA uses the multiplier this step ran at, as the seed does.
            if tc.swa and multiplier < tc.swa_start_mult and step % tc.swa_every == 0:
                self.swa.collect(self.model)

            elapsed = self._agree_max(self.train_time_ms + 1000.0 * (time.perf_counter() - t0))
            multiplier = self._multiplier(step, elapsed)
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
        memory = peak_memory_line(self.device)
        if memory is not None:
            log(memory)
        if ckpt_path is None:
            return self._finish()
        # The final model is written before the last checkpoint, so a disk that fills up at the end
        # cannot cost the trained weights; the checkpoint keeps the weights before averaging.
        state = self.checkpoint_state() if self.ctx.is_main else None
        if state is not None:
            state["model"] = {k: v.detach().to("cpu", copy=True) for k, v in state["model"].items()}
        summary = self._finish()
        try:
            self._save(ckpt_path, state)
        except WriteError as e:
            raise WriteError(f"{e}; the trained model is safe in {str(self.out_dir / 'final_model.pt')!r}, only "
                             f"the resumable checkpoint of the last step is missing") from None
        return summary

    def _finish(self) -> dict:
        tc, log = self.tc, self.log
        last_val = self.history["val"][-1]
        if self.model.active_loops != self.mc.crawler_loops:
            self.model.set_active_loops(self.mc.crawler_loops)
            log(f"eval:restored full crawler loops={self.mc.crawler_loops}, depth={self.depth()}")
        averaged = None
        if self.ema is not None:
            log("ema:loading averaged weights")
            self.model.load_state_dict(self.ema.average(self.model.state_dict()), strict=True)
            averaged = "ema"
        elif tc.swa and self.swa.count > 0:
            log(f"swa:averaging {self.swa.count} checkpoints")
            self.model.load_state_dict(self.swa.average(self.model.state_dict()), strict=True)
            averaged = f"swa ({self.swa.count} snapshots)"
        final_loss, final_bpb = last_val["val_loss"], last_val["val_bpb"]
        if averaged is not None:
            t0 = time.perf_counter()
            final_loss, final_bpb = self.evaluate()
            log(score_line(f"{averaged.split()[0]}_eval", final_loss, final_bpb,
                           eval_ms=1000.0 * (time.perf_counter() - t0)))
        self.qat.set_active(False)
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
            save_model(self.out_dir / "final_model.pt", self.mc, self.model.state_dict(),
                       tokenizer=self.data.tokenizer)
            write_json(self.out_dir / "summary.json", summary)
        return summary


def train(model_config: CrawlerConfig, tc: TrainConfig, data: TrainData, *, out_dir=None, ops: str = "auto",
          resume=None, init_from=None, run_options: dict | None = None, ctx: DistContext | None = None,
          log=None) -> TrainResult:
    """Train a CrawlerGPT of `model_config` with `tc` on `data` (from `prepare_data`).

    `out_dir` (created) receives train.log, checkpoint.pt (every `checkpoint_every` steps and at the
    end), final_model.pt (the averaged weights) and summary.json; None writes nothing. `resume` is a
    checkpoint path to continue from (SetupError if its model config or data differ); `init_from` a
    weights file to start a new run from, with fresh optimisers (the seed's RESUME_FROM; not with
    `resume`). `run_options` (JSON-ready) is recorded in every checkpoint, for a later resume to restore
    (crawler.training.resume). `ctx` defaults to the current process group (or a single process). Runs on
    every rank of a torchrun job. Returns a TrainResult whose model is ready for evaluation/quantisation.
    """
    tc.validate()
    if resume is not None and init_from is not None:
        raise SetupError("--resume continues a run, --init-from starts a new one from weights: give one of them")
    ctx = ctx or current_context()
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = log or RunLogger(out_dir, enabled=ctx.is_main)
    ckpt = read_checkpoint(resume, expect="training") if resume is not None else None
    trainer = _Trainer(model_config, tc, data, out_dir, ops, ctx, log, init_from=init_from, run_options=run_options)
    if ckpt is not None:
        restore_training_state(trainer, ckpt)
        del ckpt
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(model_params_line(n_params))
    log(f"model: {n_params:,} parameters, {model_config.num_positions} schedule positions, ops "
        f"{trainer.model.resolve_ops(ctx.device)}, device {ctx.device}, world {ctx.world_size}, "
        f"grad_accum {trainer.grad_accum}, batch {model_config.train_batch_tokens} tokens "
        f"(seq {trainer.seq_len}), compile {trainer.compiled}{', documents isolated' if tc.doc_isolated else ''}")
    for line in trainer.qat.describe():
        log(line)
    summary = trainer.run()
    return TrainResult(model=trainer.model, summary=summary, data=data)
