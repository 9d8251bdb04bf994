"""airbench94's training recipe for the CIFAR-10 judge (Keller Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds on
a single GPU", arXiv:2404.00498, file airbench94.py), on :class:`~latentdiff.metrics.classifier.CifarClassifier`:

    clf = train_airbench(data, AirbenchSettings(), device="cuda")     # airbench94: 94 % in 9.9 epochs (its paper)

Where it differs from :func:`latentdiff.metrics.classifier.train_classifier` (the small CPU recipe):

- network: widths 64/256/256, plain blocks (no residual addition), logits × 1/9, convolutions initialised with the
  identity (Dirac) on their first c_in output channels, BatchNorm scales frozen at 1 (only shifts learn) and
  running statistics updated as r ← 0.6 r + 0.4 batch (torch ``momentum=0.4``);
- loss: label-smoothed cross entropy (0.2) *summed* over the batch;
- SGD, Nesterov momentum μ = 0.85. airbench's units: with s = 1024 (1 + 1/(1 − μ)) (a "kilostep scale"), the step
  size is lr/s (``lr`` = 11.5) for the weights and the whitening shift, 64× that for BatchNorm shifts; decay is
  ``weight_decay`` · batch/s per step (0.0153), the same for all, i.e. ``weight_decay`` of a group = that / its lr;
- schedule: step-size multiplier linear from 0.2 to 1 over the first 23 % of the steps, then linear to 0.07;
  the whitening shift learns only for the first ``whiten_bias_epochs`` (3) epochs;
- flips alternate: each image is flipped at random in epoch 0, then flipped and not in turn (derandomised);
  translations by up to 2 px (reflect padding) as before;
- Lookahead (Zhang et al., 2019) every 5 steps: θ̄ ← α θ̄ + (1 − α) θ, then θ ← θ̄ (parameters and BatchNorm
  statistics), α_k = 0.95⁵ (k / K)³ over the K steps, and θ ← θ̄ at the end;
- evaluation: mirror and 1-px translation test-time augmentation (``tta=2`` in the saved file);
- batch 1024, 9.9 epochs; bfloat16 autocast (airbench: float16) on CUDA and on CPUs with native bfloat16
  (``precision="auto"``; AVX-512 BF16 / AMX), float32 elsewhere; channels-last memory while training (on a 2-core
  AVX-512 CPU, bfloat16 + channels-last trains 2.6× faster than float32 + contiguous); the trained network is
  returned in the default layout, as a saved file loads, so its test accuracy is the file's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from latentdiff.metrics.classifier import CifarClassifier, LabelledImages, augment, init_whitening

LOGIT_SCALE = 1 / 9
BN_MOMENTUM = 0.6  # airbench's: running ← 0.6 running + 0.4 batch
WARMUP = 0.23  # share of the steps with a rising step size
LR_START, LR_END = 0.2, 0.07  # step-size multiplier at the first and the last step
LOOKAHEAD_EVERY = 5
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class AirbenchSettings:
    """airbench94's hyperparameters (``hyp`` of airbench94.py); ``lr`` and ``weight_decay`` in its units."""

    epochs: float = 9.9
    batch_size: int = 1024
    lr: float = 11.5
    momentum: float = 0.85
    weight_decay: float = 0.0153
    bias_scaler: float = 64.0
    label_smoothing: float = 0.2
    whiten_bias_epochs: float = 3.0
    widths: tuple[int, ...] = (64, 256, 256)
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32: the autocast dtype of the forward pass

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {PRECISIONS}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size}, lr={self.lr} must be positive "
                             f"and momentum={self.momentum} in [0, 1)")


def airbench_model(class_names: list[str], widths: tuple[int, ...], image_size: int) -> CifarClassifier:
    """airbench's network: plain blocks, logits × 1/9, TTA level 2, Dirac-initialised convolutions, BatchNorm
    scales frozen at 1."""
    model = CifarClassifier(class_names, widths, image_size, block="plain", logit_scale=LOGIT_SCALE, tta=2)
    for module in model.blocks.modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight  # (c_out, c_in, 3, 3)
            nn.init.dirac_(w.data[:w.size(1)])  # the first c_in outputs start as the identity
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.requires_grad_(False)
            module.momentum = 1 - BN_MOMENTUM
    return model


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for ``"bf16"``, and for ``"auto"`` on CUDA or a CPU with native bfloat16; None: float32."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    native = device.type == "cpu" and torch.backends.mkldnn.is_available() \
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else None


def lr_multiplier(step: int, total: int) -> float:
    """The step-size multiplier at ``step`` of ``total``: 0.2 → 1 (first 23 %), then 1 → 0.07."""
    return float(np.interp(step, [0, int(WARMUP * total), total], [LR_START, 1.0, LR_END]))


class Lookahead:
    """Slow weights θ̄ of every floating-point tensor of the state dict (parameters and BatchNorm statistics)."""

    def __init__(self, model: nn.Module):
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """θ̄ ← decay θ̄ + (1 − decay) θ, then θ ← θ̄."""
        state = model.state_dict()
        for k, slow in self.slow.items():
            slow.lerp_(state[k], 1 - decay)
            state[k].copy_(slow)


def train_airbench(data: LabelledImages, settings: AirbenchSettings, device: str | torch.device = "cpu",
                   progress: bool = True) -> CifarClassifier:
    """Train a :class:`CifarClassifier` with airbench94's recipe (module docstring) on uint8 ``data``."""
    torch.manual_seed(settings.seed)
    device = torch.device(device)
    N, C, H, W = data.images.shape
    model = airbench_model(data.class_names, settings.widths, H)
    init_whitening(model, data.images[:5000])
    model.to(device, memory_format=torch.channels_last)
    kilostep_scale = 1024 * (1 + 1 / (1 - settings.momentum))
    lr = settings.lr / kilostep_scale
    decay = settings.weight_decay * settings.batch_size / kilostep_scale
    lr_bias = lr * settings.bias_scaler
    biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]  # BatchNorm shifts
    others = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in biases)
              and p is not model.whiten.bias]
    groups = [dict(params=[model.whiten.bias], lr=lr, weight_decay=decay / lr),
              dict(params=biases, lr=lr_bias, weight_decay=decay / lr_bias),
              dict(params=others, lr=lr, weight_decay=decay / lr)]
    optimizer = torch.optim.SGD(groups, momentum=settings.momentum, nesterov=True)
    base_lrs = [g["lr"] for g in groups]
    steps_per_epoch = math.ceil(N / settings.batch_size)
    total = math.ceil(settings.epochs * steps_per_epoch)
    whiten_steps = math.ceil(settings.whiten_bias_epochs * steps_per_epoch)
    lookahead = Lookahead(model)
    generator = torch.Generator().manual_seed(settings.seed)
    flip_first = torch.rand(N, generator=generator) < 0.5  # epoch 0's flips; later epochs alternate
    images, labels = data.images.to(device), data.labels.to(device)
    dtype = autocast_dtype(settings.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    model.train()
    with tqdm(total=total, unit="step", desc="training classifier (airbench94)", disable=not progress,
              mininterval=5.0) as bar:
        for step in range(total):
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0:
                order = torch.randperm(N, generator=generator)
            idx = order[i * settings.batch_size:(i + 1) * settings.batch_size]
            flips = (flip_first[idx] ^ bool(epoch % 2)).to(device)  # (b,)
            x = images[idx.to(device)].float().div(127.5).sub(1.0)  # (b, 3, H, W)
            x = augment(torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x), generator, flip=False)
            x = x.contiguous(memory_format=torch.channels_last)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_multiplier(step, total)
            if step >= whiten_steps:
                optimizer.param_groups[0]["lr"] = 0.0
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels[idx.to(device)], label_smoothing=settings.label_smoothing,
                                   reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % LOOKAHEAD_EVERY == 0:
                lookahead.update(model, 0.95**5 * ((step + 1) / total) ** 3)
            bar.update()
            bar.set_postfix(loss=f"{loss.item() / len(idx):.3f}", refresh=False)
    lookahead.update(model, 1.0)  # θ ← θ̄
    return model.to(memory_format=torch.contiguous_format).eval()  # as load_classifier gives it: the same outputs
