"""U-Net building blocks: timestep embedding, ResBlock, Downsample, Upsample and the block container.

Parameter names follow the CompVis ``openaimodel`` layout used by Stable Diffusion checkpoints
(``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``, ``op``, ``conv``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.models.attention import SpatialTransformer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first (Stable Diffusion layout).

    "Attention Is All You Need" Sec. 3.5 with frequencies ω_i = max_period^(-i/half), i < half = dim // 2:
    emb = [cos(t ω), sin(t ω)] (zero-padded when dim is odd). Computed in float32.
    t: (B,) -> (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020, App. B; Dhariwal & Nichol 2021).

    h = conv(silu(norm(x))); h += linear(silu(emb)); h = conv(dropout(silu(norm(h)))); return skip(x) + h.
    x: (B, C_in, H, W), emb: (B, emb_channels) -> (B, C_out, H, W).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0,
                 norm_num_groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(norm_num_groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(norm_num_groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, H, W)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution ``op``: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution ``conv``: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetBlock(nn.Sequential):
    """A sequence of U-Net layers (CompVis ``TimestepEmbedSequential``): ResBlocks get the timestep embedding,
    SpatialTransformers the context, other layers the features only."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x
