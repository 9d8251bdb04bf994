"""AdamW and its learning-rate schedule: linear warmup, then constant or cosine decay.

Learning-rate multiplier at optimizer step s (``lr_lambda``), with W warmup steps and S total steps:

    warmup    s < W:   (s + 1) / W                       (Goyal et al. 2017, "Accurate, Large Minibatch SGD")
    constant  s ≥ W:   1
    cosine    s ≥ W:   m + (1 − m) · ½ (1 + cos(π · (s − W) / (S − W)))   (SGDR, Loshchilov & Hutter 2017),
                       m = ``min_lr_ratio``
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn


def lr_lambda(step: int, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[nn.Parameter], optim_cfg, lr: float | None = None,
                    betas: tuple[float, float] | None = None) -> torch.optim.AdamW:
    """AdamW over ``params``; weight decay skips 1-D tensors (biases, norm scales), as is customary.

    Uses the fused kernel (one pass over all tensors, CPU and CUDA) when every parameter allows it: on the CPU
    the default per-tensor loop costs as much as a small model's backward pass.
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim_cfg.lr if lr is None else lr,
                             betas=tuple(optim_cfg.betas) if betas is None else betas, eps=optim_cfg.eps,
                             fused=fused or None)


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, total_steps: int):
    fn = partial(lr_lambda, warmup_steps=optim_cfg.warmup_steps, total_steps=total_steps,
                 decay=optim_cfg.decay, min_lr_ratio=optim_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
