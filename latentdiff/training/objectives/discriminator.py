"""Patch discriminator and the adversarial terms of autoencoder training (taming-transformers / LDM recipe).

- :class:`PatchDiscriminator`: the PatchGAN of pix2pix (Isola et al., 2017, Sec. 3.2.2), a stack of strided
  4x4 convolutions whose output is one real/fake logit per overlapping image patch.
- :func:`hinge_d_loss`: the hinge loss of Lim & Ye (2017) / Miyato et al. (2018, Eq. 16).
- :func:`adaptive_weight`: λ = ‖∇_L L_rec‖ / (‖∇_L L_G‖ + δ) at the decoder's last layer L (Esser et al., 2021,
  "Taming Transformers", Eq. 7), so the adversarial gradient never dominates the reconstruction gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images -> (B, 1, h, w) patch logits; ``layers`` stride-2 convolutions, then two stride-1.

    The discriminator only ever runs in training, so its batch norms always use batch statistics and keep no
    running averages (which would otherwise drift apart between DDP ranks).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(channels * mult, track_running_stats=False), nn.LeakyReLU(0.2, True)]
        blocks.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.layers = layers
        self.apply(_init_weights)

    def min_input_size(self) -> int:
        """The smallest image side that leaves at least one patch logit."""
        return 3 * 2**self.layers  # `layers` halvings, then two 4x4 stride-1 convs (each: side - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """N(0, 0.02) convolutions and N(1, 0.02) norm scales (DCGAN, Radford et al., 2016, Sec. 4)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """λ = ‖∇_L rec_loss‖ / (‖∇_L g_loss‖ + δ), clamped to [0, max_weight] and detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + delta)
    return weight.clamp(0.0, max_weight).detach()
