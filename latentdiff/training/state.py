"""Training checkpoints: atomic writes, newest-complete discovery, pruning, and the RNG states they carry.

A checkpoint is one file ``<outdir>/checkpoints/step_<step:08d>.pt`` written by ``torch.save`` of plain
containers and tensors, so it loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling). It holds
the trainable modules, the EMA, optimizers, LR schedulers, the AMP grad scaler, the step, every rank's RNG
states and the data position. It is written through :func:`latentdiff.atomic.atomic_write`: the final
name appears only once the file is complete (temp file, fsync, rename), so a kill at any moment leaves either
the previous checkpoints or a stray ``.tmp-*`` file that discovery ignores. Discovery also validates each
candidate by loading it and falls back to the next older one, so even a truncated file under a final name
(copied by hand, or a disk fault) is never used.

Sharded runs (``distributed.strategy: fsdp``) write a folder ``step_<step:08d>.dcp`` instead: the tensors (trainable
modules, optimizer state, EMA; each rank writes its own shards) through ``torch.distributed.checkpoint`` (DCP),
and the rest (the same non-tensor entries as a file checkpoint: config, step, every rank's RNG states, data
position, schedulers, scaler, ...) in ``trainer_state.pt`` inside it, a ``weights_only``-loadable file. The folder is
built as ``.tmp-step_*.dcp.*`` beside its final name and renamed by rank 0 after every rank finished writing
(:func:`latentdiff.atomic.atomic_folder`), so discovery, pruning and the stale-temp cleanup treat both forms alike.
DCP reads a folder into any world size (it reshards); see :mod:`latentdiff.training.sharding`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from latentdiff.atomic import atomic_folder, atomic_write

FORMAT = "latentdiff-train"
VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.(pt|dcp)$")
SHARDED_STATE = "trainer_state.pt"  # the non-tensor state inside a .dcp checkpoint folder
# Test hook: kill this process (SIGKILL) inside the write of the checkpoint of this step, after its bytes went
# to the temp file and before the rename, to prove that a half-written checkpoint is never loaded (.dcp: every rank
# dies after all shards went into the temp folder, before rank 0 renames it).
CRASH_ENV = "LATENTDIFF_TEST_CRASH_IN_CHECKPOINT"


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing, incomplete or does not fit the run; the message says which."""


def checkpoint_path(folder: Path, step: int, sharded: bool = False) -> Path:
    return Path(folder) / f"step_{step:08d}.{'dcp' if sharded else 'pt'}"


def is_sharded(path: Path) -> bool:
    """True for a sharded (DCP folder) checkpoint path."""
    return Path(path).suffix == ".dcp"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _prune(folder: Path, keep: int) -> None:
    for _, old in list_checkpoints(folder)[keep:]:
        _remove(old)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every file or .dcp folder with a final checkpoint name, newest first (temp files and
    folders are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``, then delete all but the newest ``keep``."""
    path = checkpoint_path(folder, step)
    payload = {"format": FORMAT, "version": VERSION, "step": step, **state}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)
        if os.environ.get(CRASH_ENV) == str(step):
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    _prune(folder, keep)
    return path


def save_sharded_checkpoint(folder: Path, step: int, tensors: dict, state: dict, keep: int, dist) -> Path:
    """Write a ``.dcp`` checkpoint folder (every rank calls this): rank 0 makes the temp folder and tells the others,
    every rank writes its shards of ``tensors`` (DCP; rank 0 also its metadata), rank 0 adds ``state`` (the
    non-tensor entries), and after a barrier renames the folder to its final name and prunes to ``keep``."""
    import torch.distributed.checkpoint as dcp

    path = checkpoint_path(folder, step, sharded=True)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_folder(path, overwrite=True)) if dist.is_main else None
        tmp = Path(dist.broadcast_object(str(tmp) if tmp is not None else None))
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not dist.enabled)
        if dist.is_main:
            with atomic_write(tmp / SHARDED_STATE, "wb") as f:
                torch.save({"format": FORMAT, "version": VERSION, "step": step, "sharded": True, **state}, f)
        dist.barrier()  # every rank's shards are on disk
        if os.environ.get(CRASH_ENV) == str(step):  # every rank dies before the rename (see CRASH_ENV)
            os.kill(os.getpid(), signal.SIGKILL)
    if dist.is_main:
        _prune(folder, keep)
    dist.barrier()  # no rank goes on before the final name exists
    return path


def load_checkpoint(path: Path) -> dict:
    """Load and validate one checkpoint file, or the non-tensor state of a ``.dcp`` folder (its tensors are read by
    :func:`latentdiff.training.sharding.load_tensor_state`); raises :class:`TrainCheckpointError` when it is not
    usable."""
    path = Path(path)
    file = path / SHARDED_STATE if is_sharded(path) else path
    if not file.is_file() or (is_sharded(path) and not (path / ".metadata").is_file()):
        what = "does not exist" if not path.exists() else "is incomplete (no trainer_state.pt or .metadata)"
        raise TrainCheckpointError(f"checkpoint {path} {what}")
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused, I/O error: all mean "not a usable checkpoint"
        raise TrainCheckpointError(f"checkpoint {path} is unreadable (incomplete or corrupt?): "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainCheckpointError(f"{path} is not a latentdiff training checkpoint")
    if state.get("version") != VERSION:
        raise TrainCheckpointError(f"{path} has checkpoint version {state.get('version')!r}, expected {VERSION}")
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != state.get("step"):
        raise TrainCheckpointError(f"{path} holds step {state.get('step')!r}, not the step in its name")
    return state


def latest_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads and validates, or ``None``; broken ones are reported."""
    for _, path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except TrainCheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete leftovers of writes that were killed before their rename, files and ``.dcp`` folders (only the trainer
    writes here)."""
    folder = Path(folder)
    stale = sorted([*folder.glob(".tmp-step_*"), *folder.glob(".old-step_*")]) if folder.is_dir() else []
    for p in stale:
        _remove(p)
    return stale


# ----------------------------------------------------------------------------------------------------------------
# RNG states as tensors and plain lists (weights_only-loadable)
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python ``random`` and NumPy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """This process's torch (CPU and CUDA), Python ``random`` and NumPy generator states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
