"""Exact resume after SIGKILL: mid-training, and inside a checkpoint write. A resumed run must end bit-identical
(weights, EMA, optimizer and RNG states, logged losses) to an uninterrupted run of the same length."""

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from latentdiff.config import load_train_config
from latentdiff.training.logging import read_log
from latentdiff.training.state import (
    CRASH_ENV,
    TrainCheckpointError,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from latentdiff.training.trainer import Trainer
from tests.tiny import CONFIGS

CONFIG = CONFIGS / "train_tiny_autoencoder.yaml"
STEPS = 6


def overrides(shards: Path) -> list[str]:
    # autoencoder + patch discriminator from step 2: two optimizers, BatchNorm buffers, EMA, sample grids
    return [f"data.shards={shards}", f"steps={STEPS}", "checkpoint_every=2", "sample_every=3", "log_every=1"]


def run_in_process(outdir: Path, shards: Path, resume: str) -> Trainer:
    trainer = Trainer(load_train_config(CONFIG, overrides(shards)), outdir, resume=resume, progress=False)
    trainer.run()
    return trainer


def _victim(outdir: Path, shards: Path, env: dict) -> None:
    os.environ.update(env)
    run_in_process(outdir, shards, resume="none")


def launch(outdir: Path, shards: Path, env: dict) -> mp.Process:
    """A training run in a forked child process (no second torch import), to be killed."""
    process = mp.get_context("fork").Process(target=_victim, args=(outdir, shards, env), daemon=True)
    process.start()
    return process


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def final_state(outdir: Path) -> dict:
    state = load_checkpoint(checkpoint_path(outdir / "checkpoints", STEPS))
    state.pop("elapsed")
    return state


def test_sigkill_resume_is_bit_identical(tmp_path, tiny_shards):
    shards = tiny_shards(32)
    crashed, killed, ref = tmp_path / "crashed", tmp_path / "killed", tmp_path / "ref"
    for d in (crashed, killed):
        d.mkdir()
    # Both victims run as subprocesses while the reference trains here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool; same numerics everywhere
    try:
        p_crash = launch(crashed, shards, {CRASH_ENV: "4"})  # SIGKILLs itself inside the write of checkpoint 4
        p_kill = launch(killed, shards, {})
        deadline = time.time() + 240
        while not checkpoint_path(killed / "checkpoints", 2).exists():  # then SIGKILL it, mid-training
            assert p_kill.is_alive() and time.time() < deadline, "the victim run made no checkpoint"
            time.sleep(0.005)
        os.kill(p_kill.pid, signal.SIGKILL)
        run_in_process(ref, shards, resume="none")
        p_kill.join(60)
        p_crash.join(240)
        assert p_kill.exitcode == -signal.SIGKILL and p_crash.exitcode == -signal.SIGKILL

        # The checkpoint being written when the process died is only a temp file; discovery ignores it.
        ckpts = crashed / "checkpoints"
        assert [s for s, _ in list_checkpoints(ckpts)] == [2]
        assert list(ckpts.glob(".tmp-step_00000004.pt*")), "the crash hook should have left a temp file"
        assert latest_checkpoint(ckpts)[1]["step"] == 2
        assert not (killed / "model.safetensors").exists()

        reference = final_state(ref)
        ref_losses = [(r["step"], r["loss"]) for r in read_log(ref / "log.jsonl")]
        for outdir in (crashed, killed):
            trainer = run_in_process(outdir, shards, resume="auto")
            assert trainer.resumed_from is not None and trainer.step == STEPS
            assert_identical(final_state(outdir), reference, outdir.name)
            assert [(r["step"], r["loss"]) for r in read_log(outdir / "log.jsonl")] == ref_losses
            assert not list((outdir / "checkpoints").glob(".tmp-*"))
            assert (outdir / "model.safetensors").is_file()
    finally:
        torch.set_num_threads(threads)


def test_half_written_checkpoint_is_never_loaded(tmp_path, capsys, tiny_shards):
    shards = tiny_shards(16)
    outdir = tmp_path / "run"
    cfg = load_train_config(CONFIG, overrides(shards) + ["steps=2", "sample_every=0"])
    Trainer(cfg, outdir, resume="none", progress=False).run()
    ckpts = outdir / "checkpoints"
    good = checkpoint_path(ckpts, 2).read_bytes()
    checkpoint_path(ckpts, 9).write_bytes(good[: len(good) // 2])  # truncated file under a final name
    (ckpts / ".tmp-step_00000010.pt.abcd").write_bytes(good)  # leftover of a killed write
    path, state = latest_checkpoint(ckpts)
    assert path == checkpoint_path(ckpts, 2) and state["step"] == 2
    assert "skipping" in capsys.readouterr().err
    with pytest.raises(TrainCheckpointError, match="unreadable"):
        load_checkpoint(checkpoint_path(ckpts, 9))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(cfg, outdir, resume="none", progress=False)
