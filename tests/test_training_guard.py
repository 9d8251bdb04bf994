"""The trainer's hot path without host syncs (latentdiff/training/guard.py): a non-finite step is skipped on the
device and stops the run at the next sync point (log, sample, checkpoint, last step), naming the bad step; fp16
loss scaling still skips overflows and lowers its scale; log records carry the data-wait time."""

import math
import time

import pytest
import torch

from latentdiff.config import load_train_config
from latentdiff.training import guard
from latentdiff.training.logging import read_log
from latentdiff.training.state import list_checkpoints
from latentdiff.training.trainer import NonFiniteError, Trainer
from tests.tiny import CONFIGS

AE_CONFIG = CONFIGS / "train_tiny_autoencoder.yaml"


def _trainer(tmp_path, shards, extra=()) -> Trainer:
    cfg = load_train_config(AE_CONFIG, [f"data.shards={shards}", "sample_every=0", "objective.disc_weight=0",
                                        *extra])
    return Trainer(cfg, tmp_path / "run", resume="none", progress=False)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.objective.autoencoder.named_parameters()}


def _poison_loss(trainer, bad_steps) -> None:
    forward = trainer.objective.forward

    def poisoned(batch, step):
        loss, logs = forward(batch, step)
        return (loss * math.nan if step in bad_steps else loss), logs

    trainer.objective.forward = poisoned


class _NoSync:
    """Counts reads of tensor values back to Python (each a host sync on a GPU) while active."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _name=name, _original=original):
                self.calls.append(_name)
                return _original(t, *args)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_train_step_reads_nothing_back(tmp_path, tiny_shards, monkeypatch):
    trainer = _trainer(tmp_path, tiny_shards(16), ["objective.disc_weight=0.5", "objective.disc_start=0"])
    trainer._begin_loop()
    trainer.train_step()  # the first step prepares (reads its batch statistics once)
    spy = _NoSync(monkeypatch)
    for _ in range(2):
        metrics = trainer.train_step()
    assert spy.calls == []
    assert set(metrics) >= {"loss", "grad_norm_main", "grad_norm_discriminator"} and torch.is_tensor(metrics["loss"])


def test_nonfinite_loss_between_sync_points_skips_every_later_update(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards(16), ["steps=4", "log_every=4", "checkpoint_every=4"])
    _poison_loss(trainer, {1})
    trainer._begin_loop()
    trainer.train_step()
    after_first = _weights(trainer)
    for _ in range(3):
        trainer.train_step()  # steps 1 (NaN loss), 2, 3: no error yet, no update applied
    for name, value in _weights(trainer).items():
        assert torch.equal(value, after_first[name]), name
    with pytest.raises(NonFiniteError, match="the loss became nan at step 1"):
        trainer.guard.check()


def test_run_stops_at_the_next_sync_point_and_saves_nothing_after_the_bad_step(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards(16), ["steps=6", "log_every=2", "checkpoint_every=2"])
    _poison_loss(trainer, {2})  # the third step; the sync after step index 3 (log and checkpoint 4) raises
    with pytest.raises(NonFiniteError, match="the loss became nan at step 2"):
        trainer.run()
    assert [s for s, _ in list_checkpoints(trainer.outdir / "checkpoints")] == [2]
    assert [r["step"] for r in read_log(trainer.outdir / "log.jsonl")] == [2]
    assert trainer.step == 4 and not (trainer.outdir / "model.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in trainer.objective.autoencoder.parameters())


def _fp16_scaler(trainer) -> None:
    """fp16 autocast is refused on the CPU; GradScaler's logic is device-independent, so enable it alone."""
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)


def test_fp16_scaler_skips_overflows_and_lowers_the_scale(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards(16))
    _fp16_scaler(trainer)
    trainer._begin_loop()
    overflow = {"on": True}
    weight = trainer.objective.autoencoder.decoder.conv_out.weight
    weight.register_hook(lambda g: g * math.inf if overflow["on"] else g)
    before = _weights(trainer)
    for _ in range(2):
        trainer.train_step()
    assert trainer.guard.check() == 2  # two skipped in a row, not fatal
    assert trainer.scaler.get_scale() == 2.0**10 * 0.5**2
    for name, value in _weights(trainer).items():
        assert torch.equal(value, before[name]), name
    overflow["on"] = False
    trainer.train_step()
    assert trainer.guard.check() == 0
    assert not torch.equal(weight, before["decoder.conv_out.weight"])  # training goes on
    assert all(torch.isfinite(p).all() for p in trainer.objective.autoencoder.parameters())


def test_fp16_too_many_skips_in_a_row_stop(tmp_path, tiny_shards, monkeypatch):
    monkeypatch.setattr(guard, "MAX_SKIPPED_STEPS", 3)
    trainer = _trainer(tmp_path, tiny_shards(16), ["steps=6", "log_every=4", "checkpoint_every=4"])
    _fp16_scaler(trainer)
    trainer.objective.autoencoder.decoder.conv_out.weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm .* at step 2 \(3 steps skipped in a row"):
        trainer.run()
    assert list_checkpoints(trainer.outdir / "checkpoints") == []


class _SlowFeed:
    """The trainer's feed, each batch delayed by ``delay`` seconds (a slow reader)."""

    def __init__(self, feed, delay: float):
        self.feed, self.delay = feed, delay

    def __next__(self):
        time.sleep(self.delay)
        return next(self.feed)

    def __getattr__(self, name):
        return getattr(self.feed, name)


def test_log_records_the_data_wait(tmp_path, tiny_shards):
    trainer = _trainer(tmp_path, tiny_shards(16), ["steps=2", "log_every=1", "checkpoint_every=2"])
    delay = 0.05
    trainer.feed = _SlowFeed(trainer.feed, delay)
    trainer.run()
    records = read_log(trainer.outdir / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # one batch of 4 waited for per interval; the share is of the interval's wall time
        assert r["data_wait_s"] >= delay
        assert 0 < r["data_wait_share"] <= 1
        assert math.isclose(r["data_wait_share"], r["data_wait_s"] * r["samples_per_s"] / 4, rel_tol=1e-6)
