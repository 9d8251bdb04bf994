"""Training: one loop for every model kind, with its checkpoints, EMA, DDP and logs.

    from latentdiff.config import load_train_config
    from latentdiff.training.trainer import Trainer

    cfg = load_train_config("configs/cifar10_ldm.yaml", ["optim.lr=1e-4"])
    Trainer(cfg, "runs/cifar10_ldm", resume="auto").run()      # what tools/train.py does

Modules: ``trainer`` (the loop), ``objectives/`` (what is trained: ``autoencoder_kl``, ``latent_diffusion``,
registered by ``objective.type``), ``state`` (atomic training checkpoints, RNG states), ``feed`` (resumable
batches), ``ema``, ``optim`` (AdamW + warmup/cosine), ``distributed`` (torchrun process groups), ``logging``
(JSONL log, loss plot, sample grids).
"""
