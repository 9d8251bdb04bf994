"""Sharded data parallelism (distributed.strategy=fsdp, FSDP2) on the CPU with forked gloo ranks, against DDP as the
reference: the same losses and exported model, sharded .dcp checkpoints that survive SIGKILL and resume exactly,
resharding to another world size, and an unsharded one-process run with a warning."""

import multiprocessing as mp
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from latentdiff.config import load_train_config
from latentdiff.io.checkpoint import read_safetensors
from latentdiff.training.logging import read_log
from latentdiff.training.state import CRASH_ENV, latest_checkpoint, list_checkpoints
from latentdiff.training.trainer import Trainer
from tests.tiny import CONFIGS, close

WORLD = 2
STEPS = 4


def overrides(shards: Path, strategy: str, sample: bool = False) -> list[str]:
    # tiny LDM (U-Net + trained text encoder, frozen autoencoder), EMA, checkpoints at steps 2 and 4, gradients
    # clipped at every step (their norm is about 0.2), a sample grid at the end when asked (every rank runs the
    # sharded networks)
    return [f"data.shards={shards}", f"steps={STEPS}", "log_every=1", f"distributed.strategy={strategy}",
            "optim.grad_clip=0.1", f"sample_every={STEPS if sample else 0}"]


def _rank(rank: int, port: int, jobs: list, shards: Path, env: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
    from latentdiff.training.distributed import init_distributed

    dist = init_distributed("cpu")
    for outdir, strategy, resume in jobs:
        cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml", overrides(shards, strategy, outdir.name == "fsdp"))
        Trainer(cfg, outdir, dist, resume=resume, progress=False).run()
    dist.close()


def launch(jobs: list, shards: Path, env: dict | None = None) -> list[int]:
    """Run ``jobs`` ((outdir, strategy, resume), one after the other) on two forked gloo ranks; their exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, jobs, shards, env or {}), daemon=True) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        return [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards):
    """DDP and FSDP runs of the same config; an FSDP run SIGKILLed (every rank) inside the write of its last
    checkpoint, then resumed on two ranks."""
    shards, tmp = tiny_shards(32), tmp_path_factory.mktemp("fsdp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked ranks must not inherit a busy OpenMP pool; same numerics everywhere
    try:
        assert launch([(tmp / "ddp", "ddp", "none"), (tmp / "fsdp", "fsdp", "none")], shards) == [0, 0]
        assert launch([(tmp / "crashed", "fsdp", "none")], shards, {CRASH_ENV: str(STEPS)}) == [-signal.SIGKILL] * 2
        ckpts = tmp / "crashed" / "checkpoints"
        crash_left = ([s for s, _ in list_checkpoints(ckpts)], sorted(p.name[:22] for p in ckpts.glob(".tmp-*")))
        assert launch([(tmp / "crashed", "fsdp", "auto")], shards) == [0, 0]
    finally:
        torch.set_num_threads(threads)
    return tmp, shards, crash_left


def tensors_of(checkpoint: Path, tmp: Path) -> dict:
    """A .dcp folder read independently of the trainer (DCP's own converter to one torch.save file)."""
    out = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=True)


def test_fsdp_matches_ddp(runs):
    tmp, _, _ = runs
    ddp, fsdp = read_log(tmp / "ddp" / "log.jsonl"), read_log(tmp / "fsdp" / "log.jsonl")
    assert [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for key in ("loss", "mse", "grad_norm_main"):  # same data, noise and updates: the same trajectory
        close([r[key] for r in fsdp], [r[key] for r in ddp], rtol=1e-4, atol=1e-6, msg=key)
    assert [p.name for _, p in list_checkpoints(tmp / "fsdp" / "checkpoints")] == ["step_00000004.dcp",
                                                                                   "step_00000002.dcp"]
    assert [p.name for p in (tmp / "fsdp" / "samples").iterdir()] == ["step_00000004.png"]  # written by rank 0
    (a, meta_a), (b, meta_b) = (read_safetensors(tmp / d / "model.safetensors") for d in ("ddp", "fsdp"))
    assert sorted(a) == sorted(b) and meta_a["config"] == meta_b["config"] and meta_b["ema"] == "true"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # the exported EMA weights are the checkpoint's EMA (gathered from the shards), not the live weights
    final = tensors_of(tmp / "fsdp" / "checkpoints" / "step_00000004.dcp", tmp)
    assert torch.equal(b["unet.out.2.weight"], final["ema"]["unet.out.2.weight"])
    assert not torch.equal(b["unet.out.2.weight"], final["modules"]["unet"]["out.2.weight"])


def test_sigkill_inside_sharded_checkpoint_resumes_bit_identically(runs):
    tmp, _, (steps_left, temps_left) = runs
    assert steps_left == [2] and temps_left == [".tmp-step_00000004.dcp"]  # half-written folder never renamed
    assert not list((tmp / "crashed" / "checkpoints").glob(".tmp-*")), "the resumed run removes stale temp folders"
    # Same world, every rank's RNG, data position, optimizer state and EMA restored: bit-identical on the CPU
    # (gloo's reductions run in a fixed order)
    ref = tensors_of(tmp / "fsdp" / "checkpoints" / "step_00000004.dcp", tmp)
    got = tensors_of(tmp / "crashed" / "checkpoints" / "step_00000004.dcp", tmp)
    assert sorted(got) == sorted(ref)
    for section in ("modules", "optimizers", "ema"):
        flat_ref, flat_got = _flatten(ref[section]), _flatten(got[section])
        assert flat_ref.keys() == flat_got.keys() and flat_ref, section
        assert all(torch.equal(flat_ref[k], flat_got[k]) for k in flat_ref), section
    assert [r["loss"] for r in read_log(tmp / "crashed" / "log.jsonl")] == \
        [r["loss"] for r in read_log(tmp / "fsdp" / "log.jsonl")]
    a, _ = read_safetensors(tmp / "fsdp" / "model.safetensors")
    b, _ = read_safetensors(tmp / "crashed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix: tree} if isinstance(tree, torch.Tensor) else {}


def test_resume_two_ranks_on_one(runs, tmp_path, capsys):
    tmp, shards, _ = runs
    outdir = tmp_path / "one"
    shutil.copytree(tmp / "fsdp" / "checkpoints" / "step_00000002.dcp", outdir / "checkpoints" / "step_00000002.dcp")
    cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml", overrides(shards, "fsdp"))
    trainer = Trainer(cfg, outdir, resume="auto", progress=False)
    err = capsys.readouterr().err
    assert "one process: training unsharded" in err and "written by 2 rank(s)" in err
    # DCP resharded the two ranks' shards into whole tensors: weights, EMA and Adam moments exactly as saved
    saved = tensors_of(outdir / "checkpoints" / "step_00000002.dcp", tmp_path)
    assert trainer.step == 2 and trainer.ema.num_updates == 2
    for name, module in trainer.objective.trainable.items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, saved["modules"][name][k]), k
    assert all(torch.equal(trainer.ema.shadow[k], v) for k, v in saved["ema"].items())
    opt_state = trainer.optimizers["main"].state_dict()["state"]
    assert len(opt_state) == len(saved["optimizers"]["main"]["state"])
    assert all(int(s["step"]) == 2 for s in opt_state.values())
    trainer.run()
    assert trainer.step == STEPS and (outdir / "model.safetensors").is_file()
    assert latest_checkpoint(outdir / "checkpoints")[1]["world_size"] == 1


def test_fsdp_on_one_process_warns_and_trains(tmp_path, tiny_shards, capsys):
    outdir = tmp_path / "run"
    cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml",
                            overrides(tiny_shards(32), "fsdp") + ["steps=2", "checkpoint_every=1",
                                                                  "keep_checkpoints=1"])
    trainer = Trainer(cfg, outdir, resume="none", progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "strategy=fsdp" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:")
    assert not trainer.sharded
    trainer.run()
    ckpts = outdir / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_00000002.dcp"]  # step 1's folder pruned (keep 1), no temp
    assert latest_checkpoint(ckpts)[1]["world_size"] == 1
    assert (outdir / "model.safetensors").is_file()


def test_fsdp_refuses_what_it_cannot_shard():
    from latentdiff.training.distributed import DistContext
    from latentdiff.training.sharding import use_fsdp

    two = DistContext(rank=0, world_size=2)
    cfg = load_train_config(CONFIGS / "train_tiny_autoencoder.yaml", ["distributed.strategy=fsdp"])
    with pytest.raises(ValueError, match="objective.type='autoencoder_kl'.*use distributed.strategy=ddp"):
        use_fsdp(cfg, two)
    assert not use_fsdp(load_train_config(CONFIGS / "train_tiny_ldm.yaml", []), two)  # ddp is the default
    if hasattr(cfg.optim, "optimizer"):  # optim.optimizer (adamw | adamw8bit | adafactor)
        cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml",
                                ["distributed.strategy=fsdp", "optim.optimizer=adafactor"])
        with pytest.raises(ValueError, match="optim.optimizer=adamw only"):
            use_fsdp(cfg, two)
    with pytest.raises(ValueError, match="cpu_offload=true needs distributed.strategy=fsdp"):
        load_train_config(CONFIGS / "train_tiny_ldm.yaml", ["distributed.cpu_offload=true"])
    with pytest.raises(ValueError, match="distributed.strategy='zero' is not one of"):
        load_train_config(CONFIGS / "train_tiny_ldm.yaml", ["distributed.strategy=zero"])
