"""Training: one loop for every model kind, with its checkpoints, EMA, DDP and logs.

    from latentdiff.config import load_train_config
    from latentdiff.training.trainer import Trainer

    cfg = load_train_config("configs/cifar10_ldm.yaml", ["optim.lr=1e-4"])
    Trainer(cfg, "runs/cifar10_ldm", resume="auto").run()      # what tools/train.py does

Modules: ``trainer`` (the loop), ``objectives/`` (what is trained: ``autoencoder_kl``, ``latent_diffusion``,
``vqvae``, ``vq_diffusion``, registered by ``objective.type``), ``state`` (atomic training checkpoints: files and
.dcp folders, RNG states), ``checkpointing`` (what a checkpoint holds, restore), ``guard`` (the on-device non-finite
guard), ``feed`` (resumable batches), ``ema``, ``optim`` (AdamW, 8-bit AdamW, Adafactor + warmup/cosine),
``distributed`` (torchrun process groups), ``sharding`` (FSDP2), ``logging`` (JSONL log, loss plot, sample grids,
TensorBoard).
"""
