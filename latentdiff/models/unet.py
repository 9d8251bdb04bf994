"""Cross-attention U-Net of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", Sec. 3.3 and App. E), in the Stable Diffusion 1.x/2.x (CompVis ``openaimodel``) parameter layout.

Stable Diffusion checkpoints load by name: take the ``model.diffusion_model.*`` entries, strip the prefix
(:func:`latentdiff.io.convert_unet.extract_unet_state_dict`) and ``load_state_dict(strict=True)``.

Layout for ``channel_mult`` of length n and ``num_res_blocks`` = R:

    input_blocks.0            conv_in (in_channels -> model_channels)
    input_blocks.{1+l(R+1)+r} ResBlock [+ SpatialTransformer]           level l < n, r < R
    input_blocks.{(l+1)(R+1)} Downsample                                level l < n-1
    middle_block              ResBlock, SpatialTransformer, ResBlock
    output_blocks.{b(R+1)+r}  ResBlock [+ SpatialTransformer] [+ Upsample on r = R]   b = n-1-l, r <= R
    out                       GroupNorm, SiLU, conv_out

With ``patch_size`` p > 1, conv_in reads p x p patches (``F.pixel_unshuffle``: in_channels * p² channels at 1/p
of the latent's resolution) and conv_out writes out_channels * p² channels that ``F.pixel_shuffle`` puts back.

A level has transformers when its downsampling factor 2^l is in ``attention_resolutions``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentdiff.config import UNetConfig
from latentdiff.models.attention import SpatialTransformer, fuse_qkv, unfuse_qkv


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


def transformer_heads(cfg: UNetConfig, channels: int) -> tuple[int, int]:
    """(heads, dim_head) of the transformers at width ``channels``: a fixed head count (``num_heads``, SD 1.x)
    or a fixed head width (``num_head_channels``, SD 2.x)."""
    if cfg.num_head_channels is not None:
        if channels % cfg.num_head_channels:
            raise ValueError(f"unet.num_head_channels={cfg.num_head_channels} does not divide a transformer "
                             f"width of {channels} channels")
        return channels // cfg.num_head_channels, cfg.num_head_channels
    if channels % cfg.num_heads:
        raise ValueError(f"unet.num_heads={cfg.num_heads} does not divide a transformer width of {channels} channels")
    return cfg.num_heads, channels // cfg.num_heads


class UNetModel(nn.Module):
    """ε/v/x0-prediction U-Net with timestep embedding and cross-attention to a context sequence.

    forward(x_t: (B, in_channels, h, w), t: (B,) or scalar, context: (B, L, context_dim)) -> (B, out_channels, h, w).
    h and w must be multiples of ``cfg.downsample_factor``. Computes in the parameters' dtype and returns
    x_t's dtype.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        levels = len(cfg.channel_mult)
        for mult in cfg.channel_mult:
            if (mc * mult) % cfg.norm_num_groups:
                raise ValueError(f"unet.norm_num_groups={cfg.norm_num_groups} does not divide level width "
                                 f"{mc * mult} (model_channels * channel_mult)")

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, cfg.dropout, cfg.norm_num_groups)

        def transformer(ch: int) -> SpatialTransformer:
            heads, dim_head = transformer_heads(cfg, ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.context_dim, cfg.transformer_depth,
                                      cfg.use_linear_in_transformer, cfg.dropout, cfg.norm_num_groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        p2 = cfg.patch_size ** 2
        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels * p2, mc, 3, padding=1))])
        skip_channels = [mc]  # widths of the features handed to the output blocks
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            attend = 2**level in cfg.attention_resolutions
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if attend:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level < levels - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = UNetBlock(res(ch, ch), transformer(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            attend = 2**level in cfg.attention_resolutions
            for r in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if attend:
                    layers.append(transformer(ch))
                if level > 0 and r == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_num_groups, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels * p2, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.cfg
        if x_t.dim() != 4 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"x_t must have shape (B, {cfg.in_channels}, h, w), got {tuple(x_t.shape)}")
        B, _, H, W = x_t.shape
        f = cfg.downsample_factor
        if H % f or W % f:
            raise ValueError(f"x_t spatial size {H}x{W} must be a multiple of the U-Net downsampling factor {f}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != B):
            raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
        if context is None or context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must have shape ({B}, L, {cfg.context_dim}), got {got}")

    def _inputs(self, x_t: torch.Tensor, t: torch.Tensor | float,
                context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked inputs in the weights' dtype: (h, emb, context) with emb the (B, 4*mc) timestep embedding."""
        t = torch.as_tensor(t, device=x_t.device)
        self._check_inputs(x_t, t, context)
        dtype = self.out[2].weight.dtype
        emb = timestep_embedding(t.expand(x_t.shape[0]), self.cfg.model_channels).to(dtype)  # (B, mc)
        h = x_t.to(dtype)
        if self.cfg.patch_size > 1:
            h = F.pixel_unshuffle(h, self.cfg.patch_size)  # (B, in_channels * p², h / p, w / p)
        return h, self.time_embed(emb), context.to(dtype)

    def _head(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The output layers (and the patches put back): (B, C, h / p, w / p) -> (B, out_channels, h, w)."""
        h = self.out(h)
        if self.cfg.patch_size > 1:
            h = F.pixel_shuffle(h, self.cfg.patch_size)
        return h.to(dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        h, emb, context = self._inputs(x_t, t, context)
        use_checkpoint = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()

        def run(block: UNetBlock, h: torch.Tensor) -> torch.Tensor:
            if use_checkpoint:
                return checkpoint(block, h, emb, context, use_reentrant=False)
            return block(h, emb, context)

        skips = []
        for block in self.input_blocks:
            h = run(block, h)
            skips.append(h)
        h = run(self.middle_block, h)
        for block in self.output_blocks:
            h = run(block, torch.cat([h, skips.pop()], dim=1))  # (B, C + C_skip, H', W')
        return self._head(h, x_t.dtype)  # (B, out_channels, h, w)

    # -- fast paths (#13): step caching (DeepCache) and fused attention projections ---------------------------
    def forward_deepcache(self, x_t: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, branch: int,
                          deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward of DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free", Sec. 3.2):
        ``(output, deep)``.

        Skip branch ``branch`` = k in [0, len(input_blocks)) joins input block k to output block K - 1 - k (K the
        number of input blocks). ``deep`` is the feature entering output block K - 1 - k from below (before its
        concatenation with skip k): everything deeper than branch k, the middle block included.
        - ``deep`` None (a full step): the whole U-Net, the same operations as :meth:`forward` (equal outputs);
          returns the deep feature for later steps.
        - ``deep`` given (a shallow step): only input blocks 0..k and output blocks K - 1 - k..K - 1 run, the
          cached ``deep`` standing in for the deeper part; returns ``deep`` unchanged.
        x_t: (B, in_channels, h, w); deep: (B, C_k, h_k, w_k) -> (B, out_channels, h, w), deep.
        """
        K = len(self.input_blocks)
        if not 0 <= branch < K:
            raise ValueError(f"DeepCache branch {branch} must be between 0 and {K - 1} (this U-Net's skip branches)")
        h, emb, context = self._inputs(x_t, t, context)
        B = x_t.shape[0]
        skips = []
        for block in self.input_blocks[:K if deep is None else branch + 1]:
            h = block(h, emb, context)
            skips.append(h)
        if deep is None:
            h = self.middle_block(h, emb, context)
            for block in self.output_blocks[:K - 1 - branch]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # (B, C + C_skip, H', W')
            deep = h  # (B, C_k, h_k, w_k)
        elif deep.shape[0] != B:
            raise ValueError(f"DeepCache: cached features of batch {deep.shape[0]} for an input of batch {B}")
        h = deep.to(h.dtype)
        for block in self.output_blocks[K - 1 - branch:]:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # (B, C + C_skip, H', W')
        return self._head(h, x_t.dtype), deep  # (B, out_channels, h, w)

    def fuse_qkv(self) -> int:
        """Fuse the attention projections (:func:`latentdiff.models.attention.fuse_qkv`); returns how many."""
        return fuse_qkv(self)

    def unfuse_qkv(self) -> int:
        """Split fused projections back into to_q, to_k, to_v (:func:`latentdiff.models.attention.unfuse_qkv`)."""
        return unfuse_qkv(self)
