"""Vector quantizer and VQ autoencoder: images <-> grids of code indices for VQ-Diffusion.

VQ-VAE (van den Oord et al. 2017): the encoder output z_e is replaced by its nearest codebook entry e_k (Eq. 1-2);
gradients pass straight through (Sec. 3.2) and the loss adds ||sg[z_e] - e||² (codebook) + β ||z_e - sg[e]||²
(commitment, β = 0.25) (Eq. 3). With ``ema=True`` the codebook term is replaced by exponential-moving-average
k-means updates (App. A.1; Razavi et al. 2019), and dead codes can be re-seeded with encoder outputs
(Dhariwal et al. 2020, "Jukebox", Sec. 2.2). The encoder/decoder are the Taming-Transformers stacks of
autoencoder_blocks.py; parameter names follow CompVis/taming (``quantize.embedding.weight``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from latentdiff.config import VQModelConfig
from latentdiff.models.autoencoder_blocks import Decoder, Encoder


class Quantized(NamedTuple):
    z_q: torch.Tensor  # (B, C, H, W) quantized vectors, straight-through gradient to z
    codes: torch.Tensor  # (B, H, W) long
    loss: torch.Tensor  # scalar codebook + commitment loss
    stats: dict[str, torch.Tensor]  # detached: usage (fraction of codes used in the batch), perplexity


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of z (B, dim, H, W) against ``num_codes`` vectors of size ``dim``.

    ``ema``: codebook updated as e_k = m_k / N_k with N_k, m_k EMAs (rate ``decay``) of assignment counts and sums
    of assigned vectors (Laplace-smoothed counts); the loss is then the commitment term only.
    ``restart_dead_codes``: in training, codes whose EMA assignment count falls below ``dead_code_threshold``
    are replaced by randomly chosen encoder outputs of the batch. Statistics are all-reduced under DDP and the
    re-seeded vectors come from rank 0, so every rank keeps the same codebook.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 restart_dead_codes: bool = False, dead_code_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())  # m_k, (K, dim)
        if ema or restart_dead_codes:
            self.register_buffer("cluster_size", torch.ones(num_codes))  # N_k, EMA of assignments per step

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codebook vectors, flat z (M, dim) -> (M,) long; ||z||² - 2 z·e + ||e||²."""
        e = self.embedding.weight.float()
        z = z.float()
        dist2 = torch.addmm((e * e).sum(1)[None, :], z, e.t(), alpha=-2.0)  # (M, K), ||z||² omitted (constant)
        return dist2.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> codebook vectors (B, dim, H, W)."""
        return rearrange(self.embedding(codes), "b h w c -> b c h w")

    def forward(self, z: torch.Tensor) -> Quantized:
        B, C, H, W = z.shape
        z_flat = rearrange(z, "b c h w -> (b h w) c")  # (M, C)
        codes = self.nearest_codes(z_flat.detach())  # (M,)
        counts = torch.bincount(codes, minlength=self.num_codes).float()  # (K,) in this batch
        if self.training and (self.ema or self.restart_dead_codes):
            self._update_codebook(z_flat.detach().float(), codes, counts)
        e = self.embedding(codes).to(z.dtype)  # (M, C), after any EMA update, as in Sonnet's VQ-VAE-EMA
        commitment = F.mse_loss(z_flat, e.detach())
        loss = self.beta * commitment if self.ema else F.mse_loss(e, z_flat.detach()) + self.beta * commitment
        z_q = z_flat + (e - z_flat).detach()  # straight-through estimator
        probs = counts / counts.sum()
        stats = {"usage": (counts > 0).float().mean(),
                 "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum())}
        z_q = rearrange(z_q, "(b h w) c -> b c h w", b=B, h=H, w=W)
        return Quantized(z_q, codes.view(B, H, W), loss, stats)

    @torch.no_grad()
    def _update_codebook(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA k-means step (VQ-VAE App. A.1, Eq. 6-8) and/or dead-code restarts. z: (M, dim) float32.

        1. N_k ← γ N_k + (1-γ) n_k  (n_k: assignments in this batch, summed over ranks);
        2. with ``ema``: m_k ← γ m_k + (1-γ) Σ_{j: k(j)=k} z_j and e_k = m_k / Ñ_k, Ñ the Laplace-smoothed N;
        3. with ``restart_dead_codes``: codes with N_k < threshold get a random z_j, N_k reset to the threshold.
        """
        counts = _all_reduce_sum(counts.clone())
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # step 1
        if self.ema:  # step 2
            sums = _all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, codes, z))  # (K, dim)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            self.embedding.weight.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_dead_codes:  # step 3
            dead = self.cluster_size < self.dead_code_threshold  # (K,), identical on every rank
            if dead.any():
                seeds = z[torch.randint(0, z.shape[0], (self.num_codes,), device=z.device)]  # (K, dim)
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(seeds, src=0)
                self.embedding.weight[dead] = seeds[dead].to(self.embedding.weight.dtype)
                self.cluster_size[dead] = self.dead_code_threshold
                if self.ema:
                    self.embed_sum[dead] = seeds[dead] * self.dead_code_threshold


class VQAutoencoder(nn.Module):
    """Image (B, in_channels, H, W) in [-1, 1] <-> codes (B, H/f, W/f), f = 2**(len(ch_mult) - 1).

    encoder -> quant_conv -> quantize -> post_quant_conv -> decoder (the layout of taming's VQModel and
    diffusers' VQModel).
    """

    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        self.cfg = cfg
        stack = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                     attn_resolutions=cfg.attn_resolutions, z_channels=cfg.z_channels,
                     norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout, mid_attention=cfg.mid_attention)
        self.encoder = Encoder(in_channels=cfg.in_channels, double_z=False, **stack)
        self.decoder = Decoder(out_channels=cfg.out_channels, **stack)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.quantize = VectorQuantizer(cfg.num_codes, cfg.embed_dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay,
                                        restart_dead_codes=cfg.restart_dead_codes,
                                        dead_code_threshold=cfg.dead_code_threshold)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> unquantized vectors z_e (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def encode_to_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> codes (B, H/f, W/f) long."""
        z = self.encode(x)
        B, C, h, w = z.shape
        return self.quantize.nearest_codes(rearrange(z, "b c h w -> (b h w) c")).view(B, h, w)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized vectors (B, embed_dim, h, w) -> image (B, out_channels, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) long -> image (B, out_channels, h*f, w*f)."""
        return self.decode(self.quantize.lookup(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training pass: image -> (reconstruction, VQ loss (codebook + commitment), stats)."""
        q = self.quantize(self.encode(x))
        return self.decode(q.z_q), q.loss, q.stats
