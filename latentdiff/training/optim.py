"""The optimizer (``optim.optimizer``) and its learning-rate schedule: linear warmup, then constant or cosine decay.

Optimizers (state per parameter of n elements, besides the parameter itself):

    adamw      torch.optim.AdamW (Loshchilov & Hutter 2019), fused kernel when possible: 2n float32 moments
    adamw8bit  bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
               the same update with both moments in 8 bits, one scale per block of 256 values (2n bytes; tensors
               under 4096 elements keep float32 moments); needs the optional bitsandbytes package
    adafactor  torch.optim.Adafactor (Shazeer & Stern 2018): no first moment, the second moment factored over a
               tensor's last two axes into row and column means (n + m values for an n x m matrix; conv kernels,
               whose last axes are 3 x 3, save less); the step is relative, min(lr, 1/√t) times the parameter's
               RMS, so ``lr`` is the largest relative step (torch's default 1e-2)

Measured on a 34 M-parameter U-Net (model_channels 64), state after one step: adamw 8.0, adamw8bit 2.06,
adafactor 2.17 bytes per parameter.

Learning-rate multiplier at optimizer step s (``lr_lambda``), with W warmup steps and S total steps:

    warmup    s < W:   (s + 1) / W                       (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
    constant  s ≥ W:   1
    cosine    s ≥ W:   m + (1 − m) · ½ (1 + cos(π · p))   (SGDR, Loshchilov & Hutter 2017), m = ``min_lr_ratio``,
                       p = (s − W) / (S − W) with ``decay_over: steps``

``decay_over: time`` (for runs under a wall-clock budget T, ``--max-minutes``, whose step count is not known in
advance) makes p the share of the budget spent since the warmup ended instead: p = (t − t_W) / (T − t_W), t the
seconds this call has trained, t_W those at step W (or at the first step of a call that resumed past W), measured
after each step and used for the next (``Trainer.decay_progress``). So the LR reaches m · lr when the budget ends,
however many steps fit. The clock restarts with each call: a run resumed with a new budget decays again from lr
over it. Without a budget, p is step-based as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn


def lr_lambda(step: int, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float,
              progress: float | None = None) -> float:
    """The multiplier at optimizer step ``step``; ``progress`` (the decay's p, given by a time-based schedule)
    replaces the step-based one."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if progress is None:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def build_optimizer(params: list[nn.Parameter], optim_cfg, lr: float | None = None,
                    betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    """``optim_cfg.optimizer`` over ``params``; weight decay (decoupled) skips 1-D tensors (biases, norm scales), as
    is customary. ``lr`` and ``betas`` override the config's (a discriminator's own).

    AdamW uses the fused kernel (one pass over all tensors, CPU and CUDA) when every parameter allows it: on the
    CPU the default per-tensor loop costs as much as a small model's backward pass.
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": optim_cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    lr = optim_cfg.lr if lr is None else lr
    betas = tuple(optim_cfg.betas) if betas is None else betas
    kind = getattr(optim_cfg, "optimizer", "adamw")
    if kind == "adamw":
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=optim_cfg.eps, fused=fused or None)
    if kind == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(groups, lr=lr, betas=betas, eps=optim_cfg.eps)
    if kind == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    raise ValueError(f"optim.optimizer={kind!r} is not one of {list(OPTIMIZERS)}")


def _bitsandbytes():
    """The bitsandbytes module, or a ValueError that says how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError(f"optim.optimizer=adamw8bit needs the bitsandbytes package ({e}): pip install "
                         f"bitsandbytes (version 0.50.2 runs on the CPU too), or set optim.optimizer=adamw") from None
    return bitsandbytes


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int,
                    progress: Callable[[], float] | None = None):
    """LambdaLR with :func:`lr_lambda`; ``progress``, when given, is read at every step for the decay's p."""
    fn = partial(lr_lambda, warmup_steps=optim_cfg.warmup_steps, total_steps=total_steps,
                 decay=optim_cfg.decay, min_lr_ratio=optim_cfg.min_lr_ratio)
    if progress is not None:
        step_fn = fn

        def fn(step: int) -> float:
            return step_fn(step, progress=progress())
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
