"""Convolutional encoder and decoder of the Stable Diffusion autoencoders.

The stacks of "Taming Transformers" (Esser et al., 2021, Fig. 2) as used by "High-Resolution Image Synthesis with
Latent Diffusion Models" (Rombach et al., 2022, Sec. 3.1 and App. G): ResNet blocks (the DDPM residual block of
Ho et al., 2020, App. B, without a time embedding), stride-2 convolutions down, nearest-neighbour x2 then a
convolution up, and single-head self-attention in the middle (and optionally at chosen resolutions).

Parameter names are exactly those of CompVis ``ldm/modules/diffusionmodules/model.py`` so that Stable Diffusion
checkpoints load without renaming:

    encoder: conv_in, down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample.conv, mid.block_1, mid.attn_1,
             mid.block_2, norm_out, conv_out
    decoder: conv_in, mid.*, up.{i}.block.{j} (num_res_blocks + 1 per level), up.{i}.attn.{j},
             up.{i}.upsample.conv, norm_out, conv_out

Level ``i`` works at downsampling factor ``2**i`` in both stacks (the decoder runs its levels in reverse order).
``attn_resolutions`` lists such factors (1 = input resolution). Used by the KL autoencoder (autoencoder_kl.py)
and the VQ autoencoder (vqvae.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentdiff.models.attention import attention

# the submodules of either autoencoder that map latents to pixels (the rest, encoder, quant_conv and a VQ codebook,
# defines the latents): a decoder fine-tune trains only these
DECODER_SIDE = ("post_quant_conv", "decoder")


def Normalize(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the eps (1e-6) of the CompVis autoencoders."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))), with a 1x1 ``nin_shortcut`` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, *, norm_num_groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm outputs are fresh tensors, so SiLU may overwrite them (GroupNorm's backward needs only its input).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))  # (B, C_out, H, W)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: x + proj_out(softmax(q kᵀ / √C) v).

    ``q``, ``k``, ``v`` and ``proj_out`` are 1x1 convolutions, as in the CompVis checkpoints. They are applied as
    matrix products on the token layout (a 1x1 convolution is one), so the normalised feature map is transposed
    once instead of once per projection.
    """

    def __init__(self, channels: int, *, norm_num_groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, norm_num_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    @staticmethod
    def _project(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, conv.weight.flatten(1), conv.bias)  # (B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c").contiguous()  # (B, H*W, C)
        q, k, v = (self._project(conv, tokens) for conv in (self.q, self.k, self.v))  # (B, H*W, C) each
        h = self._project(self.proj_out, attention(q, k, v, heads=1))  # (B, H*W, C)
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one (the asymmetric "SAME" padding of TensorFlow), 3x3 conv, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class _Level(nn.Module):
    """One resolution level: ResNet blocks, each optionally followed by attention, then an optional resampler."""

    def __init__(self, channels: list[int], *, use_attn: bool, norm_num_groups: int, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in, c_out, norm_num_groups=norm_num_groups, dropout=dropout)
            for c_in, c_out in zip(channels[:-1], channels[1:]))
        out = channels[-1]
        self.attn = nn.ModuleList(
            AttnBlock(out, norm_num_groups=norm_num_groups) for _ in self.block) if use_attn else nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    """block_1, attn_1 (None when ``mid_attention`` is off), block_2, all at the lowest resolution."""

    def __init__(self, channels: int, *, mid_attention: bool, norm_num_groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_num_groups=norm_num_groups, dropout=dropout)
        self.attn_1 = AttnBlock(channels, norm_num_groups=norm_num_groups) if mid_attention else None
        self.block_2 = ResnetBlock(channels, channels, norm_num_groups=norm_num_groups, dropout=dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.block_1(h)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h)


def _check_attn_resolutions(attn_resolutions: list[int], num_levels: int) -> set[int]:
    factors = {2**i for i in range(num_levels)}
    for r in attn_resolutions:
        if r not in factors:
            raise ValueError(f"attn_resolutions entry {r!r} is not a downsampling factor of this stack "
                             f"(one of {sorted(factors)})")
    return set(attn_resolutions)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent moments (B, 2*z_channels if double_z else z_channels, H/f, W/f),
    f = 2**(len(ch_mult) - 1)."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], z_channels: int, double_z: bool, norm_num_groups: int = 32,
                 dropout: float = 0.0, mid_attention: bool = True):
        super().__init__()
        attn = _check_attn_resolutions(attn_resolutions, len(ch_mult))
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            level = _Level([block_in] + [block_out] * num_res_blocks, use_attn=2**i in attn,
                           norm_num_groups=norm_num_groups, dropout=dropout)
            level.downsample = Downsample(block_out) if i != len(ch_mult) - 1 else None
            self.down.append(level)
            block_in = block_out
        self.mid = _Mid(block_in, mid_attention=mid_attention, norm_num_groups=norm_num_groups, dropout=dropout)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, (2*)z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f), f = 2**(len(ch_mult) - 1)."""

    def __init__(self, *, out_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], z_channels: int, norm_num_groups: int = 32, dropout: float = 0.0,
                 mid_attention: bool = True):
        super().__init__()
        attn = _check_attn_resolutions(attn_resolutions, len(ch_mult))
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in, mid_attention=mid_attention, norm_num_groups=norm_num_groups, dropout=dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):  # built lowest resolution first, stored so that up[i] is level i
            block_out = ch * ch_mult[i]
            level = _Level([block_in] + [block_out] * (num_res_blocks + 1), use_attn=2**i in attn,
                           norm_num_groups=norm_num_groups, dropout=dropout)
            level.upsample = Upsample(block_out) if i != 0 else None
            levels.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, out_channels, h*f, w*f)
