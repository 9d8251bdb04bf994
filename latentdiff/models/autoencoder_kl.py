"""KL-regularised autoencoder: the Stable Diffusion VAE (Rombach et al., 2022, Sec. 3.1, "KL-reg.").

The encoder predicts a diagonal Gaussian posterior q(z|x) = N(μ, σ²) per latent pixel; training adds a small KL
penalty towards N(0, I) (Kingma & Welling, 2014). The diffusion model sees the latent after ``(z - shift_factor) *
scaling_factor`` (Rombach et al., 2022, App. G: the scale gives the latents roughly unit variance); both factors
live in :class:`~latentdiff.config.AutoencoderKLConfig` and are applied inside :meth:`AutoencoderKL.encode` and
undone inside :meth:`AutoencoderKL.decode`.

    vae = AutoencoderKL(AutoencoderKLConfig())
    z = vae.encode(x)              # x: (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8), scaled
    x_rec = vae.decode(z)          # -> (B, 3, H, W), not clamped

Parameter names follow CompVis ``ldm/models/autoencoder.py`` (encoder.*, decoder.*, quant_conv, post_quant_conv).
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import nn

from latentdiff.config import AutoencoderKLConfig
from latentdiff.models.autoencoder_blocks import Decoder, Encoder

# Re-exported: the autoencoder building blocks are part of this module's public surface.
__all__ = ["AutoencoderKL", "Decoder", "DiagonalGaussian", "Encoder"]


class DiagonalGaussian:
    """N(mean, exp(logvar)) per element, from moments (B, 2C, h, w) = [mean | logvar] along channels.

    logvar is clamped to [-30, 20] (as in CompVis) so that exp() stays finite in float16/float32.
    """

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @cached_property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @cached_property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ε, ε ~ N(0, I) (the reparameterisation trick, Kingma & Welling, 2014, Sec. 2.4)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, I)) summed over C, h, w -> (B,): ½ Σ (μ² + σ² − 1 − log σ²)
        (Kingma & Welling, 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """−log N(x; μ, σ²) summed over C, h, w -> (B,): ½ Σ (log 2π + log σ² + (x − μ)² / σ²)."""
        return 0.5 * (math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Image (B, in_channels, H, W) <-> latent (B, embed_dim, H/f, W/f), f = ``cfg.downsample_factor``."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        self.cfg = cfg
        common = dict(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                      attn_resolutions=list(cfg.attn_resolutions), z_channels=cfg.z_channels,
                      norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout, mid_attention=cfg.mid_attention)
        self.encoder = Encoder(in_channels=cfg.in_channels, double_z=True, **common)
        self.decoder = Decoder(out_channels=cfg.out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.cfg.embed_dim

    def encode_posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for images x (B, in_channels, H, W); unscaled (no shift/scale applied)."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"autoencoder input must have shape (B, {self.cfg.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        B, C, H, W = x.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"autoencoder input height and width must be multiples of {f}, got {H}x{W}")
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, H/f, W/f)
        return DiagonalGaussian(moments)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents for the diffusion model: (z − shift_factor) · scaling_factor, z the posterior mode (or a
        sample when ``sample``) -> (B, embed_dim, H/f, W/f)."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion-model latents (B, embed_dim, h, w): undo scale and shift, then decode ->
        (B, out_channels, h*f, w*f). The output is not clamped."""
        if z.dim() != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"latents must have shape (B, {self.cfg.embed_dim}, h, w), got {tuple(z.shape)}")
        return self._decode_unscaled(z / self.cfg.scaling_factor + self.cfg.shift_factor)

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, out_channels, h*f, w*f)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass on raw (unscaled) latents: returns (reconstruction (B, out_channels, H, W), posterior)."""
        posterior = self.encode_posterior(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self._decode_unscaled(z), posterior
