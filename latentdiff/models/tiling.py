"""Tiled decoding and encoding with the KL autoencoder: large images in bounded memory.

The latent (or the image) is cut into overlapping square tiles; each tile goes through the decoder (encoder) on
its own, so the activations held at once are those of one tile; neighbouring tiles are blended over their overlap
with linear ramps, and every tile keeps its first ``tile - overlap`` rows and columns. This is diffusers'
``AutoencoderKL.tiled_decode`` / ``_tiled_encode`` step for step (same tile starts, same ramps ``k / extent``
applied first between the tile above, then between the tile to the left, same crops), with the tile size and the
overlap given in image pixels:

    tile = 512, overlap = 128      # diffusers: tile_sample_min_size = 512, tile_overlap_factor = 0.25

    starts (latent):  0, s, 2s, ...   s = (tile - overlap) / f          (f = the autoencoder's downsampling)
    tile i covers     [i s, i s + tile / f) of the latent, [i s f, i s f + tile) of the image (clipped at the edge)
    blend             out[k] = prev[-e + k] (1 - k / e) + cur[k] k / e,  k < e = overlap (decode, pixels)
                                                                              or overlap / f (encode, latent)

Tiles do not see each other: the decoder's GroupNorm statistics and its mid-block attention are per tile, so the
result is close to, not equal to, the untiled one (tests/test_tiling.py states the tolerance). A latent (image)
that fits in one tile is decoded (encoded) untiled, as diffusers' ``decode`` with tiling enabled does.

:class:`VAETiling` is the pipeline's switch: ``off``, ``on``, or ``auto`` (the default), which tiles when the
image's height or width is above :data:`AUTO_TILE_ABOVE` pixels.

    images = tiled_decode(vae, z, tile=512, overlap=128)         # z: (B, C, h, w) scaled latents -> (B, 3, hf, wf)
    z = tiled_encode(vae, x, tile=512)                           # x: (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentdiff.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian

DEFAULT_TILE = 512  # pixels, diffusers' tile_sample_min_size for Stable Diffusion's VAE
AUTO_TILE_ABOVE = 1024  # pixels: in "auto" mode, images with a side above this are decoded (encoded) in tiles
TILING_MODES = ("off", "auto", "on")


def check_tiling(tile: int, overlap: int | None, factor: int) -> tuple[int, int]:
    """(tile, overlap) in pixels, checked against the autoencoder's downsampling ``factor``: the tile a positive
    multiple of ``factor``, the overlap a multiple of it in [0, tile). ``overlap=None`` is a quarter of the tile
    (diffusers' tile_overlap_factor 0.25), rounded down to a multiple of ``factor``. ValueError otherwise."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0 or tile % factor:
        raise ValueError(f"tile size {tile!r} must be a positive multiple of {factor} pixels "
                         f"(the autoencoder's downsampling), e.g. {DEFAULT_TILE}")
    if overlap is None:
        overlap = tile // 4 // factor * factor
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % factor:
        raise ValueError(f"tile overlap {overlap!r} must be a multiple of {factor} pixels, >= 0")
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    return tile, overlap


def _ramp(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - k / extent, k / extent) for k < extent, computed in float64 and cast (diffusers' Python floats)."""
    k = torch.arange(extent, dtype=torch.float64)
    up = (k / extent).to(like.device, like.dtype)
    down = (1 - k / extent).to(like.device, like.dtype)
    return down, up


def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Blend ``prev``'s last rows (dim 2) or columns (dim 3) into ``cur``'s first ones, in place in ``cur``."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent == 0:
        return cur
    down, up = _ramp(extent, cur)
    shape = (extent, 1) if dim == 2 else (extent,)
    a = prev.narrow(dim, prev.shape[dim] - extent, extent)
    b = cur.narrow(dim, 0, extent)
    b.copy_(a * down.view(shape) + b * up.view(shape))
    return cur


def _tiled(fn, x: torch.Tensor, tile_in: int, stride_in: int, blend: int, keep: int) -> torch.Tensor:
    """``fn`` over overlapping tiles of ``x`` (B, C, H, W): tiles of side ``tile_in`` every ``stride_in``, outputs
    blended over ``blend`` and cropped to ``keep`` rows and columns; two rows of tile outputs are held at once."""
    H, W = x.shape[-2:]
    rows: list[torch.Tensor] = []
    above: list[torch.Tensor] | None = None
    for i in range(0, H, stride_in):
        row: list[torch.Tensor] = []
        for j in range(0, W, stride_in):
            out = fn(x[:, :, i:i + tile_in, j:j + tile_in])
            if above is not None:
                out = _blend(above[len(row)], out, blend, dim=2)
            if row:
                out = _blend(row[-1], out, blend, dim=3)
            row.append(out)
        rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(rows, dim=2)


def tiled_decode(autoencoder: AutoencoderKL, z: torch.Tensor, tile: int = DEFAULT_TILE,
                 overlap: int | None = None) -> torch.Tensor:
    """``autoencoder.decode(z)`` in tiles: diffusion-model latents z (B, C, h, w) -> images (B, 3, h f, w f).
    ``tile`` and ``overlap`` are image pixels (multiples of f = the downsampling; :func:`check_tiling`)."""
    f = autoencoder.downsample_factor
    tile, overlap = check_tiling(tile, overlap, f)
    C = autoencoder.latent_channels
    if z.dim() != 4 or z.shape[1] != C:
        raise ValueError(f"latents must have shape (B, {C}, h, w), got {tuple(z.shape)}")
    if max(z.shape[-2:]) <= tile // f:
        return autoencoder.decode(z)
    cfg = autoencoder.cfg
    z = z / cfg.scaling_factor + cfg.shift_factor  # (B, C, h, w), unscaled
    return _tiled(autoencoder._decode_unscaled, z, tile // f, (tile - overlap) // f, overlap, tile - overlap)


def tiled_encode(autoencoder: AutoencoderKL, x: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int | None = None,
                 sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """``autoencoder.encode(x)`` in tiles: images x (B, 3, H, W) in [-1, 1] -> diffusion-model latents
    (B, C, H/f, W/f). The posterior moments are tiled and blended, then the mode (or a sample) is scaled."""
    f = autoencoder.downsample_factor
    tile, overlap = check_tiling(tile, overlap, f)
    if x.dim() != 4 or max(x.shape[-2:]) <= tile:
        return autoencoder.encode(x, sample=sample, generator=generator)
    B, C, H, W = x.shape
    if C != autoencoder.cfg.in_channels or H % f or W % f:
        autoencoder.encode_posterior(x)  # raises its ValueError for the shape
    moments = _tiled(lambda t: autoencoder.quant_conv(autoencoder.encoder(t)), x, tile, tile - overlap,
                     overlap // f, (tile - overlap) // f)  # (B, 2C, H/f, W/f)
    posterior = DiagonalGaussian(moments)
    z = posterior.sample(generator) if sample else posterior.mode()
    return (z - autoencoder.cfg.shift_factor) * autoencoder.cfg.scaling_factor


@dataclass(frozen=True)
class VAETiling:
    """When a pipeline decodes (encodes) in tiles: ``mode`` "off" never, "on" always (an image that fits in one
    tile is the same either way), "auto" when the image's height or width is above :data:`AUTO_TILE_ABOVE`
    pixels. ``tile`` and ``overlap`` are pixels (:func:`check_tiling`; overlap None: a quarter of the tile)."""

    mode: str = "auto"
    tile: int = DEFAULT_TILE
    overlap: int | None = None

    def __post_init__(self):
        if self.mode not in TILING_MODES:
            raise ValueError(f"tiling mode {self.mode!r} must be one of {TILING_MODES}")

    def applies(self, height: int, width: int) -> bool:
        """Whether an image of height x width pixels is decoded (encoded) in tiles."""
        return self.mode == "on" or (self.mode == "auto" and max(height, width) > AUTO_TILE_ABOVE)

    def decode(self, autoencoder: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, h f, w f), tiled when :meth:`applies`."""
        f = autoencoder.downsample_factor
        if z.dim() == 4 and self.applies(z.shape[-2] * f, z.shape[-1] * f):
            return tiled_decode(autoencoder, z, self.tile, self.overlap)
        return autoencoder.decode(z)

    def encode(self, autoencoder: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> latents (B, C, H/f, W/f) (posterior mode), tiled when :meth:`applies`."""
        if x.dim() == 4 and self.applies(x.shape[-2], x.shape[-1]):
            return tiled_encode(autoencoder, x, self.tile, self.overlap)
        return autoencoder.encode(x)
