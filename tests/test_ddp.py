"""DistributedDataParallel on the CPU: two gloo ranks (forked processes) read disjoint samples, take the same
number of steps and hold bit-identical weights (and EMA) after every step; rank 0 alone writes the checkpoint,
which carries both ranks' RNG states."""

import hashlib
import multiprocessing as mp
import os
import socket
from pathlib import Path

import torch

from latentdiff.config import load_train_config
from latentdiff.training.state import latest_checkpoint
from tests.tiny import CONFIGS

WORLD = 2
RUNS = {  # autoencoder + discriminator (two optimizers, D idle at step 0) and latent diffusion (text encoder)
    "ae": ("train_tiny_autoencoder.yaml", ["objective.disc_start=1", "grad_accum=2"]),
    "ldm": ("train_tiny_ldm.yaml", []),
}


def _digest(trainer) -> str:
    h = hashlib.sha256()
    for module in trainer.objective.trainable.values():
        for t in module.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in trainer.ema.shadow.values():
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


def _rank(rank: int, port: int, tmp: Path, shards: Path, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from latentdiff.training.distributed import init_distributed
    from latentdiff.training.trainer import Trainer

    dist = init_distributed("cpu")
    out = {}
    for name, (config, extra) in RUNS.items():
        cfg = load_train_config(CONFIGS / config,
                                [f"data.shards={shards}", "steps=3", "sample_every=0", "log_every=1"] + extra)
        trainer = Trainer(cfg, tmp / name, dist, resume="none", progress=False)
        keys, digests = [], []
        next_batch, train_step = trainer._next_batch, trainer.train_step

        def spy_batch(next_batch=next_batch, keys=keys):
            batch = next_batch()
            keys[-1].extend(batch["key"])
            return batch

        def spy_step(train_step=train_step, keys=keys, digests=digests, trainer=trainer):
            keys.append([])
            metrics = train_step()
            digests.append(_digest(trainer))
            return metrics

        trainer._next_batch, trainer.train_step = spy_batch, spy_step
        trainer.run()
        out[name] = (keys, digests, trainer.step)
    dist.close()
    queue.put((rank, out))


def test_two_gloo_ranks_stay_in_lockstep(tmp_path, tiny_shards):
    shards = tiny_shards(32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked ranks must not inherit a busy OpenMP pool
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, tmp_path, shards, queue), daemon=True) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        torch.set_num_threads(threads)
        for p in procs:
            if p.is_alive():
                p.kill()
    for name, (_, extra) in RUNS.items():
        (keys0, digests0, steps0), (keys1, digests1, steps1) = results[0][name], results[1][name]
        assert steps0 == steps1 == 3 and len(digests0) == len(digests1) == 3
        assert digests0 == digests1, f"{name}: ranks' weights differ after a step"
        assert len(set(digests0)) == 3, f"{name}: weights did not change"
        accum = 2 if "grad_accum=2" in extra else 1
        for k0, k1 in zip(keys0, keys1):
            assert len(k0) == len(k1) == 4 * accum
            assert not set(k0) & set(k1), f"{name}: ranks read the same sample in one step"
        # 32 samples, 2 ranks: an epoch is 16 samples per rank, and no sample is read twice within it
        n = 16 // (4 * accum)
        epoch0 = [k for ks in keys0[:n] + keys1[:n] for k in ks]
        assert len(epoch0) == len(set(epoch0))
        _, state = latest_checkpoint(tmp_path / name / "checkpoints")
        assert state["step"] == 3 and state["world_size"] == WORLD and len(state["rng"]) == WORLD
        assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
        assert (tmp_path / name / "model.safetensors").is_file()
