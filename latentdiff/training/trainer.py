"""The training loop shared by every model kind: AMP, gradient accumulation and clipping, EMA, DDP or FSDP,
checkpoints, logging, sample grids and the final export.

One optimizer step at step s (``grad_accum`` = A micro-batches per rank, R ranks):

1. For each micro-batch: loss = objective(batch, s) under autocast; backward of scaler.scale(loss / A). DDP
   all-reduces gradients on the last micro-batch only (``no_sync`` before); FSDP (``distributed.strategy: fsdp``,
   :mod:`latentdiff.training.sharding`) reduce-scatters them to the ranks' shards there instead.
2. Guard, on the device (:mod:`latentdiff.training.guard`: no host sync per step): gradients are unscaled and
   clipped per optimizer; a step whose loss (mean over ranks) or gradient norm is not finite is skipped inside
   the fused AdamW kernels. A non-finite loss is fatal; so is a non-finite gradient, except under fp16, where it
   is an overflow that lowers GradScaler's scale (``MAX_SKIPPED_STEPS`` of those in a row are fatal). After a
   fatal step every update is skipped.
3. Optimizers and LR schedulers step, the scaler updates, the EMA updates; s ← s + 1.
4. Sync point, when the step logs, draws a sample grid, checkpoints or is the last: a fatal step raises
   :class:`NonFiniteError` naming it, before anything is written (the first such step after it, so at most
   ``log_every`` − 1 steps later; each step's metrics stay on the device until then).
   Rank 0 logs, draws sample grids and writes checkpoints (all ranks meet in the RNG gather and a barrier).

Randomness: every rank seeds model initialisation with ``seed`` (identical weights) and training with
``seed + 1 + rank`` (different noise, timesteps and dropout per rank). Checkpoints carry every rank's RNG
states, so a resumed run continues bit-identically on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from latentdiff.config import save_config
from latentdiff.devices import resolve_precision
from latentdiff.io.checkpoint import save_model_file
from latentdiff.locks import FolderLock, FolderLockedError
from latentdiff.training import checkpointing
from latentdiff.training.distributed import DistContext
from latentdiff.training.ema import EMA
from latentdiff.training.feed import BatchFeed
from latentdiff.training.guard import MAX_SKIPPED_STEPS, NonFiniteError, NonFiniteGuard, step_unless
from latentdiff.training.logging import LossLog, save_image_grid
from latentdiff.training.objectives import build_objective
from latentdiff.training.optim import build_optimizer, build_scheduler
from latentdiff.training.sharding import clip_grad_norm, full_state_dicts, no_gradient_sync, shard_trainable, use_fsdp
from latentdiff.training.state import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temp_files,
    seed_everything,
)

__all__ = ["MAX_SKIPPED_STEPS", "NonFiniteError", "Trainer", "seed_everything"]


class Trainer:
    """``Trainer(cfg, outdir, dist).run()``; ``resume`` is ``auto`` (newest complete checkpoint in ``outdir``, if
    any), ``none`` (fresh; refuses an ``outdir`` that has checkpoints) or a checkpoint path. ``max_steps`` stops
    the run early (the LR schedule still spans ``cfg.steps``); so does ``max_minutes``, a wall-clock budget for
    this process's training loop (checked after every step; rank 0 decides for all ranks), after which the run
    logs, samples, checkpoints and exports as at its last step; with ``optim.decay_over: time`` the LR decay spans
    that budget instead of ``cfg.steps`` (:meth:`decay_progress`). The run holds ``outdir``'s lock
    (:mod:`latentdiff.locks`) from construction to the end of :meth:`run` (or :meth:`close`): a second trainer on
    the same folder raises :class:`~latentdiff.locks.FolderLockedError` before writing anything."""

    def __init__(self, cfg, outdir: str | Path, dist: DistContext | None = None, resume: str = "auto",
                 max_steps: int | None = None, progress: bool = True, max_minutes: float | None = None):
        self.cfg = cfg
        self.dist = dist = dist or DistContext()
        self.device = dist.device
        self.outdir = Path(outdir)
        self.ckpt_dir = self.outdir / "checkpoints"
        self.stop_step = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.stopped_by_time = False
        self._spent = 0.0  # share of max_seconds this call has trained, measured after the last step
        self._spent_at_warmup: float | None = None  # the same when the warmup ended (or at resume past it)
        self.progress = progress and dist.is_main
        self._lock = self._lock_outdir()  # before anything is written into outdir
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _lock_outdir(self) -> FolderLock | None:
        """One writer per run folder: rank 0 locks ``outdir`` (held until :meth:`close`, which :meth:`run` calls at
        its end); a refusal stops every rank."""
        lock, refused = None, None
        if self.dist.is_main:
            try:
                lock = FolderLock(self.outdir, "training run").acquire()
            except (FolderLockedError, OSError) as e:  # OSError: outdir is a file, not writable, ...
                refused = (isinstance(e, FolderLockedError), str(e))
        refused = self.dist.broadcast_object(refused)
        if refused is not None:
            raise (FolderLockedError if refused[0] else ValueError)(refused[1])
        return lock

    def close(self) -> None:
        """Give the run folder's lock back (idempotent)."""
        if self._lock is not None:
            self._lock.release()

    def _setup(self, cfg, resume: str) -> None:
        dist = self.dist
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.objective = build_objective(cfg)
        if cfg.init_from:  # a resumed run then overwrites the trained networks with its checkpoint
            loaded = self.objective.init_from_file(cfg.init_from)
            if dist.is_main:
                print(f"initialised {', '.join(loaded)} from {cfg.init_from}", file=sys.stderr)
        self.objective.to(self.device)
        if cfg.compile:
            for module in self.objective.trainable.values():
                module.compile()
        self.model = self.objective
        self.sharded = use_fsdp(cfg, dist)  # FSDP2 shards the trainable networks in place; the objective stays
        if self.sharded:
            shard_trainable(self.objective, self.amp_dtype, cfg.distributed, self.device)
        elif dist.enabled:
            self.model = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.objective.find_unused_parameters)
        self.optimizers, self.schedulers = {}, {}
        by_time = cfg.optim.decay_over == "time" and self.max_seconds is not None
        for name, (params, overrides) in self.objective.optimizer_params().items():
            self.optimizers[name] = build_optimizer(params, cfg.optim, **overrides)
            self.schedulers[name] = build_scheduler(self.optimizers[name], cfg.optim, cfg.steps,
                                                    self.decay_progress if by_time else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        ema_modules = {n: self.objective.trainable[n] for n in self.objective.ema_names}
        self.ema = EMA(ema_modules, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.enabled else None
        self.feed = BatchFeed(cfg.data, dist.rank, dist.world_size, pin_memory=self.device.type == "cuda")
        self.log = LossLog(self.outdir / "log.jsonl", self.outdir / "loss.png", 30.0, self.outdir / "tensorboard")
        self.step = 0
        self.samples = 0  # samples seen by all ranks
        self.elapsed = 0.0  # training seconds before this process
        self.skipped = 0
        self.resumed_from: Path | None = self._resume(resume)
        if self.resumed_from is None:
            seed_everything(cfg.seed + 1 + dist.rank)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _resume(self, resume: str) -> Path | None:
        if resume == "none":
            if list_checkpoints(self.ckpt_dir):
                raise ValueError(f"{self.outdir} already holds checkpoints; resume with --resume auto, or pick "
                                 f"another --outdir")
            return None
        if resume == "auto":
            found = latest_checkpoint(self.ckpt_dir) if self.dist.is_main else None
            path = self.dist.broadcast_object(str(found[0]) if found else None)
            if path is None:
                return None
            state = found[1] if self.dist.is_main else load_checkpoint(Path(path))
        else:
            path = resume
            state = load_checkpoint(Path(path))
        self._load_state(state, Path(path))
        if self.dist.is_main:
            self._set_aside_newer_checkpoints()
        return Path(path)

    def _set_aside_newer_checkpoints(self) -> None:
        """After resuming an older checkpoint, newer ones belong to an abandoned history: rename them (kept, but
        never picked by ``--resume auto``)."""
        for step, path in list_checkpoints(self.ckpt_dir):
            if step > self.step:
                path.rename(path.with_name(f"abandoned-{path.name}"))
                print(f"note: {path.name} is newer than the resumed step {self.step}; renamed to "
                      f"abandoned-{path.name}", file=sys.stderr)

    def _load_state(self, state: dict, path: Path) -> None:
        checkpointing.restore(self, state, path)

    def save_checkpoint(self) -> None:
        """Every rank calls this: a file from rank 0 (ddp), or a sharded ``.dcp`` folder from all ranks (fsdp)."""
        checkpointing.save(self)

    def export(self) -> Path:
        """Write ``model.safetensors`` (EMA weights when enabled), readable by ``load_pipeline``/``load_model_file``,
        and the objective's other exports (a LoRA run's ``lora.safetensors``). Sharded runs call it on every rank:
        the sharded networks' whole weights are gathered to rank 0's CPU, which writes the same file as DDP."""
        path = self.outdir / "model.safetensors"
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            model_cfg, modules = self.objective.export()
            if self.sharded:
                modules = {**modules, **full_state_dicts({n: modules[n] for n in self.objective.trainable
                                                           if n in modules})}
                if not self.dist.is_main:
                    return path
            save_model_file(path, model_cfg, modules, overwrite=True,
                            extra_metadata={"name": self.outdir.name, "step": str(self.step),
                                            "ema": str(self.ema is not None).lower()})
            self.objective.export_files(self.outdir)
        return path

    # -- the loop -----------------------------------------------------------------------------------------------
    def _no_sync(self):
        """Accumulate gradients locally (no all-reduce / reduce-scatter) for a micro-batch that is not the last."""
        return no_gradient_sync(self.objective.trainable.values()) if self.sharded else self.model.no_sync()

    def _autocast(self):
        enabled = self.amp_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    def _next_batch(self) -> dict:
        """The next batch on the device (asynchronous copy); the host seconds spent waiting for the reader add up
        in ``_data_wait`` (logged as ``data_wait_s``)."""
        start = time.perf_counter()
        batch = next(self.feed)
        self._data_wait += time.perf_counter() - start
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step (steps 1-3 of the module docstring); returns the step's metrics."""
        cfg, A = self.cfg, self.cfg.grad_accum
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i in range(A):
            batch = self._next_batch()
            if self._sample_batch is None:  # fixed inputs of this process's sample grids
                self._sample_batch = {k: v[:16] for k, v in batch.items()}
            if self._fresh_start:
                self.objective.prepare(batch, self.dist)
                self._fresh_start = False
            sync = self.dist.enabled and i < A - 1
            with self._no_sync() if sync else contextlib.nullcontext():
                with self._autocast():
                    loss, logs = self.model(batch, self.step)
                self.scaler.scale(loss / A).backward()
            loss_sum += loss.detach().float()
            for k, v in logs.items():
                terms[k] = terms.get(k, 0.0) + v.float() / A
            self.samples += len(batch["caption"]) * self.dist.world_size
        # 2. guard, on the device: the loss (mean over ranks, so every rank decides alike) and the gradient norms
        loss_mean = self.dist.all_reduce_sum(loss_sum / A) / self.dist.world_size
        grad_norms = {}
        for name, opt in self.optimizers.items():
            self.scaler.unscale_(opt)  # fp16: also records GradScaler's found_inf for scaler.update()
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
            grad_norms[name] = (clip_grad_norm(params, max_norm) if params
                                else torch.zeros((), device=self.device))
        skip = self.guard.record(self.step, loss_mean, list(grad_norms.values()))
        # 3. update (skipped on the device when the guard says so)
        for opt in self.optimizers.values():
            step_unless(opt, skip)
        self.scaler.update()
        for sched in self.schedulers.values():
            sched.step()
        if self.ema is not None and (self.step + 1) % cfg.ema.every == 0:
            self.ema.update()
        self.step += 1
        return {"loss": loss_mean, **terms, **{f"grad_norm_{k}": v for k, v in grad_norms.items()}}

    def run(self) -> dict:
        """Train until ``stop_step`` and export; returns the last logged record. Gives the folder's lock back at
        the end, also on an error."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.outdir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.outdir / "config.yaml")
            remove_stale_temp_files(self.ckpt_dir)
            self.log.truncate_after(self.step)
        self._begin_loop()
        bar = tqdm(total=self.stop_step, initial=self.step, unit="step", dynamic_ncols=True, disable=not self.progress)
        acc: dict[str, list] = {}  # metric -> [sum, count] over the log interval
        t_log, s_log, record = time.perf_counter(), self.samples, {}
        while self.step < self.stop_step:
            metrics = self.train_step()
            for k, v in metrics.items():
                acc.setdefault(k, [0.0, 0])
                acc[k][0] += v
                acc[k][1] += 1
            bar.update(1)
            last = self.step == self.stop_step or self._out_of_time()
            log, ckpt = self.step % cfg.log_every == 0 or last, self.step % cfg.checkpoint_every == 0 or last
            sample = bool(cfg.sample_every) and (self.step % cfg.sample_every == 0 or last)
            if log or ckpt or sample:  # the sync point (every rank alike): a fatal step raises here
                self.skipped = self.guard.check()
            if log:
                record = self._log_record(acc, t_log, s_log)
                acc, t_log, s_log = {}, time.perf_counter(), self.samples
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
            if (dist.is_main or self.sharded) and sample:  # sharded: every rank runs the networks
                self.save_samples(self._sample_batch)
            if ckpt:
                self.save_checkpoint()
        bar.close()
        if dist.is_main:
            self.log.plot(force=True)
        if dist.is_main or self.sharded:  # sharded: every rank takes part in gathering the weights
            self.export()
        dist.barrier()
        return record

    def _begin_loop(self) -> None:
        """The state :meth:`train_step` needs: the device-side non-finite guard (resumed skip count), the data-wait
        clock, the sample grids' batch, the loop's start time."""
        self._fresh_start = self.resumed_from is None
        self._sample_batch: dict | None = None
        self._data_wait = 0.0  # host seconds in next(feed) since the last log record
        self.guard = NonFiniteGuard(self.device, list(self.optimizers), self.scaler.is_enabled(), self.skipped)
        self._t_start = time.perf_counter()

    def decay_progress(self) -> float:
        """The LR decay's progress p under ``optim.decay_over: time`` (training/optim.py): the share of the budget
        spent since the warmup ended (or since the first step of a call that resumed past it), as measured after
        the last step; 0 before that."""
        if self._spent_at_warmup is None:
            return 0.0
        return (self._spent - self._spent_at_warmup) / max(1e-9, 1.0 - self._spent_at_warmup)

    def _out_of_time(self) -> bool:
        if self.max_seconds is None:
            return False
        spent = (time.perf_counter() - self._t_start) / self.max_seconds
        if self.dist.enabled:  # every rank must stop after the same step (and decay the LR alike)
            spent = float(self.dist.broadcast_object(spent))
        self._spent = spent
        if self._spent_at_warmup is None and self.step >= self.cfg.optim.warmup_steps:
            self._spent_at_warmup = spent
        over = spent >= 1.0
        if over:
            self.stopped_by_time = True
            self.stop_step = self.step
        return over

    def _log_record(self, acc: dict, t_log: float, s_log: int) -> dict:
        """Average the interval's metrics over steps and ranks; rank 0 appends them to the log and the plot."""
        keys = sorted(acc)
        values = torch.stack([torch.as_tensor(acc[k][0], dtype=torch.float64, device=self.device) / acc[k][1]
                              for k in keys] + [torch.tensor(self._data_wait, dtype=torch.float64, device=self.device)])
        *values, data_wait = (self.dist.all_reduce_sum(values) / self.dist.world_size).tolist()
        seconds = time.perf_counter() - t_log
        self._data_wait = 0.0
        record = {"step": self.step, "epoch": self.feed.epoch, "samples": self.samples, **dict(zip(keys, values)),
                  "lr": self.schedulers["main"].get_last_lr()[0],
                  "samples_per_s": (self.samples - s_log) / max(seconds, 1e-9),
                  "data_wait_s": data_wait, "data_wait_share": data_wait / max(seconds, 1e-9),
                  "elapsed_s": self.elapsed + time.perf_counter() - self._t_start,
                  "data_errors": self.feed.stats.sample_errors}
        if self.scaler.is_enabled():
            record["grad_scale"] = self.scaler.get_scale()
        if self.dist.is_main:
            self.log.append(record)
            self.log.plot()
        return record

    def save_samples(self, batch: dict) -> Path:
        """Sample grid at the current step (EMA weights when enabled), without touching any RNG stream. Sharded runs
        call it on every rank (the networks' forward gathers weights from all of them); rank 0 writes the grid."""
        path = self.outdir / "samples" / f"step_{self.step:08d}.png"
        devices = [self.device.index] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._autocast():
            with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
                images, cols = self.objective.sample_images(batch)
        self.objective.train()
        grid = save_image_grid(images.float(), path, cols=cols) if self.dist.is_main else None
        return self.log.add_image_grid(self.step, grid) if grid is not None else path  # + TensorBoard
