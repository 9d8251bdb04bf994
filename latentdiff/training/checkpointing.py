"""What a training checkpoint holds, and putting it back: the trainer's side of :mod:`latentdiff.training.state`.

Two forms (``distributed.strategy``): ``ddp`` writes one file from rank 0 (whole state dicts); ``fsdp`` writes a
``.dcp`` folder from every rank (DCP: each rank its shards of the modules, optimizer state and EMA) plus the
non-tensor entries. Either form resumes under either strategy and any world size: a ``.dcp`` folder is resharded
by DCP on reading; a file checkpoint is refused by a sharded run (its optimizer state is keyed by position, not by
parameter name) with a message naming the way out. A changed world size keeps weights, optimizer and EMA exactly;
only the per-rank random streams are reseeded (warning) and the data order is that of the new world (warning).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from latentdiff.config import config_to_json, to_dict
from latentdiff.training.sharding import load_tensor_state, tensor_state
from latentdiff.training.state import (
    TrainCheckpointError,
    capture_rng,
    is_sharded,
    restore_rng,
    save_checkpoint,
    save_sharded_checkpoint,
    seed_everything,
)


def save(trainer) -> None:
    """Write the checkpoint of ``trainer.step`` (every rank calls this: RNG states are gathered, shards written)."""
    t, dist = trainer, trainer.dist
    rngs = dist.all_gather_object(capture_rng())
    common = {
        "config": config_to_json(t.cfg), "world_size": dist.world_size,
        "schedulers": {n: s.state_dict() for n, s in t.schedulers.items()},
        "scaler": t.scaler.state_dict(), "rng": rngs, "data": t.feed.state_dict(),
        "objective": t.objective.extra_state(), "samples": t.samples,
        "elapsed": t.elapsed + time.perf_counter() - t._t_start, "skipped": t.skipped,
    }
    if t.cfg.distributed.strategy == "fsdp":
        tensors, empty = tensor_state(t.objective.trainable, t.optimizers, t.ema)
        common.update(ema_updates=t.ema.num_updates if t.ema is not None else None, empty_optimizers=empty)
        save_sharded_checkpoint(t.ckpt_dir, t.step, tensors, common, t.cfg.keep_checkpoints, dist)
        return
    if dist.is_main:
        state = {**common, "modules": {n: m.state_dict() for n, m in t.objective.trainable.items()},
                 "ema": t.ema.state_dict() if t.ema is not None else None,
                 "optimizers": {n: o.state_dict() for n, o in t.optimizers.items()}}
        save_checkpoint(t.ckpt_dir, t.step, state, t.cfg.keep_checkpoints)
    dist.barrier()


def restore(trainer, state: dict, path: Path) -> None:
    """Put checkpoint ``state`` (from :func:`~latentdiff.training.state.load_checkpoint`) into ``trainer``; a
    ``.dcp`` path also reads its tensors (every rank)."""
    t, dist = trainer, trainer.dist
    saved = json.loads(state["config"])
    for section in ("model", "objective"):
        if saved[section] != to_dict(t.cfg)[section]:
            raise TrainCheckpointError(f"{path} was trained with a different {section} config; resume it with "
                                       f"its own config (saved in {t.outdir / 'config.yaml'})")
    if is_sharded(path):
        if t.ema is not None and state["ema_updates"] is None:
            raise TrainCheckpointError(f"{path} has no EMA weights but ema.enabled is true")
        try:
            load_tensor_state(path, t.objective.trainable, t.optimizers, t.ema, state["empty_optimizers"])
        except (ValueError, RuntimeError) as e:  # DCP's errors name the tensor that does not fit
            raise TrainCheckpointError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None
        if t.ema is not None:
            t.ema.num_updates = int(state["ema_updates"])
    elif t.sharded:
        raise TrainCheckpointError(f"{path} is a single-file checkpoint (distributed.strategy=ddp); a sharded run "
                                   f"cannot read its optimizer state: resume it with distributed.strategy=ddp")
    else:
        for name, module in t.objective.trainable.items():
            module.load_state_dict(state["modules"][name])
        for name, opt in t.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if t.ema is not None:
            if state["ema"] is None:
                raise TrainCheckpointError(f"{path} has no EMA weights but ema.enabled is true")
            t.ema.load_state_dict(state["ema"])
    for name, sched in t.schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    t.scaler.load_state_dict(state["scaler"])
    t.objective.load_extra_state(state["objective"])
    t.feed.load_state_dict(state["data"])
    t.step, t.samples = int(state["step"]), int(state["samples"])
    t.elapsed, t.skipped = float(state["elapsed"]), int(state["skipped"])
    rngs = state["rng"]
    if len(rngs) == dist.world_size:
        restore_rng(rngs[dist.rank])
    else:
        print(f"warning: {path} was written by {len(rngs)} rank(s), this run has {dist.world_size}; "
              f"random streams are reseeded", file=sys.stderr)
        seed_everything(t.cfg.seed + 1 + dist.rank + 7919 * t.step)
