"""Inpainting: repaint the white part of a mask and keep the rest, as diffusers' ``StableDiffusionInpaintPipeline``.

Two kinds of latent-diffusion model are served:

- **inpainting U-Nets** (``unet.in_channels = 2C + 1``: Stable Diffusion 1.5/2 inpainting). Each model call gets
  the concatenation [x_t (C), m (1), z_masked (C)] on the channel dimension, m the mask at latent size and z_masked
  the latents of the image with its masked pixels set to 0 (grey), (N, 2C + 1, h, w); guidance doubles the
  batch of all three. Without a mask (text-to-image or img2img on such a model) m = 1 everywhere and the masked
  image is all grey, as AUTOMATIC1111 does.
- **ordinary U-Nets** (``in_channels = C``): after every sampler step the known region is put back (diffusers'
  legacy inpainting for a 4-channel U-Net; AUTOMATIC1111 blends the same way):
  x ← m · x + (1 - m) · (√ᾱ' z0 + √(1 - ᾱ') ε), with ᾱ' the noise level of the next step, z0 the init image's
  latents and ε the image's own x_T noise; after the last step the known region is z0 itself.

The mask (white = repaint) follows diffusers' ``VaeImageProcessor(do_binarize=True, do_convert_grayscale=True)``:
resized with Lanczos to the image size, greyscale, scaled to [0, 1] and binarised (>= 0.5 -> 1); the latent mask
is that resized to the latent size by nearest neighbour. An optional blur (AUTOMATIC1111's "Mask blur": a Gaussian
of standard deviation R pixels over 2·int(2.5 R + 0.5) + 1 taps, edges mirrored) is applied to the greyscale mask
at its own size, before the resize.

    m = mask_to_tensor(Image.open("mask.png"), height=512, width=512, blur=4)   # (1, 1, 512, 512) in {0, 1}
    model, hook = inpainting(pipe, model, image, m, z_init, noise, "euler_a", steps=25)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from latentdiff.diffusion.timesteps import run_sigmas


def is_inpainting_unet(config) -> bool:
    """Whether a latent-diffusion config's U-Net takes the mask and masked-image latents (in_channels 2C + 1)."""
    return config.unet.in_channels == 2 * config.autoencoder.embed_dim + 1


def check_mask_blur(blur) -> float:
    """``blur`` as a float >= 0 (pixels), else ValueError."""
    if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not math.isfinite(blur) or blur < 0:
        raise ValueError(f"mask_blur={blur!r} must be a number of pixels >= 0")
    return float(blur)


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """AUTOMATIC1111's mask blur of a greyscale (``L``) mask: ``cv2.GaussianBlur`` along x then along y with σ =
    ``radius`` and 2·int(2.5 σ + 0.5) + 1 taps, edges reflected without repeating the edge pixel (OpenCV's
    BORDER_REFLECT_101), rounded back to 8 bits after each pass."""
    radius = check_mask_blur(radius)
    if radius == 0:
        return mask
    half = int(2.5 * radius + 0.5)
    taps = np.exp(-np.arange(-half, half + 1, dtype=np.float64) ** 2 / (2 * radius**2))
    taps /= taps.sum()  # (2·half + 1,)
    arr = np.asarray(mask.convert("L"), dtype=np.float64)  # (H, W)
    for axis in (1, 0):  # x, then y
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        padded = _reflect101(arr, pad)
        n = arr.shape[axis]
        arr = sum(w * np.take(padded, np.arange(j, j + n), axis=axis) for j, w in enumerate(taps))
        arr = np.clip(np.round(arr), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def _reflect101(arr: np.ndarray, pad: list[tuple[int, int]]) -> np.ndarray:
    """np.pad(mode="reflect") (BORDER_REFLECT_101), also for pads wider than the array: reflected repeatedly; an
    axis of length 1 is repeated."""
    for axis, (before, _) in enumerate(pad):
        if before and arr.shape[axis] == 1:
            return np.pad(arr, pad, mode="edge")
    return np.pad(arr, pad, mode="reflect")


def mask_to_tensor(mask_image: Image.Image, height: int, width: int, blur: float = 0.0) -> torch.Tensor:
    """A PIL mask (white = repaint; any mode that converts to greyscale) -> (1, 1, height, width) float32 in
    {0, 1}: blurred (``blur`` pixels, :func:`blur_mask`), resized with Lanczos when its size differs, greyscale,
    /255 and binarised at 0.5 (diffusers' mask processor). ValueError for a non-image or a mode with no greyscale
    conversion."""
    if not isinstance(mask_image, Image.Image):
        raise ValueError(f"mask_image must be a PIL image, got {type(mask_image).__name__}")
    blur = check_mask_blur(blur)
    try:
        mask_image.convert("L")
    except ValueError as e:
        raise ValueError(f"mask_image of mode {mask_image.mode} cannot be converted to greyscale ({e})") from None
    if blur > 0:
        mask_image = blur_mask(mask_image.convert("L"), blur)
    if mask_image.size != (width, height):
        mask_image = mask_image.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(mask_image.convert("L"), dtype=np.float32) / 255.0  # (H, W) in [0, 1]
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]  # (1, 1, H, W)


def latent_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The pixel mask (1, 1, H, W) at latent size (1, 1, h, w), by nearest neighbour (diffusers'
    ``prepare_mask_latents``)."""
    return F.interpolate(mask, size=(h, w))


def with_mask_channels(model, mask: torch.Tensor, masked_latents: torch.Tensor):
    """``model(x_t, t, context)`` of an inpainting U-Net, called as a C-channel model: x_t (B, C, h, w) gets the
    latent mask (1, 1, h, w) and the masked image's latents (1, C, h, w) appended on the channel dimension,
    repeated over the batch (which guidance doubles): the U-Net sees (B, 2C + 1, h, w)."""
    extra = torch.cat([mask, masked_latents], dim=1)  # (1, C + 1, h, w)

    def conditioned(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        return model(torch.cat([x_t, extra.to(x_t).expand(B, -1, -1, -1)], dim=1), t, context)  # (B, 2C + 1, h, w)

    return conditioned


def known_region_hook(z_init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, alpha_bars: list[float]):
    """The sampler's ``step_hook`` for an ordinary U-Net: after step i, x ← m · x + (1 - m) · x_known with x_known
    = √ᾱ_{i+1} z0 + √(1 - ᾱ_{i+1}) ε (q(x_t|x0), Eq. 4 of DDPM) at the next step's noise level, and z0 after the
    last step. z_init (1 or N, C, h, w), noise (N, C, h, w), mask (1, 1, h, w) in {0, 1} (1 = repaint);
    ``alpha_bars``: ᾱ of each step of the run (as :func:`latentdiff.diffusion.samplers.noise_to_step` gives it)."""
    keep = 1.0 - mask  # (1, 1, h, w)

    def hook(i: int, x: torch.Tensor) -> torch.Tensor:
        known = z_init
        if i + 1 < len(alpha_bars):
            a = alpha_bars[i + 1]
            known = math.sqrt(a) * z_init + math.sqrt(1.0 - a) * noise  # (N, C, h, w)
        return keep.to(x) * known.to(x) + mask.to(x) * x

    return hook


@torch.inference_mode()
def inpainting(pipe, model, image: torch.Tensor | None, mask: torch.Tensor | None, z_init: torch.Tensor | None,
               noise: torch.Tensor, sampler: str, steps: int):
    """``(model, step_hook)`` for a run of ``pipe`` (a latent-diffusion pipeline) that inpaints.

    ``model(x_t, t, context)`` is the pipeline's U-Net call; ``image`` (1, 3, H, W) in [-1, 1] and ``z_init`` its
    latents (1, C, h, w) (None for text-to-image on an inpainting U-Net); ``mask`` (1, 1, H, W) in {0, 1} from
    :func:`mask_to_tensor` (None: repaint everything); ``noise`` (N, C, h, w) the x_T of each image. An inpainting
    U-Net gets its extra channels (:func:`with_mask_channels`) and no hook; an ordinary one keeps ``model`` and gets
    :func:`known_region_hook` (it needs ``image`` and ``mask``)."""
    N, C, h, w = noise.shape
    device, dtype = pipe.device, pipe.dtype
    if not is_inpainting_unet(pipe.config):
        if image is None or mask is None:
            raise ValueError("inpainting with an ordinary model needs init_image and mask_image")
        s = pipe.config.schedule
        sigmas = run_sigmas(pipe.schedule, sampler, steps, s.timestep_spacing, s.steps_offset)[1]
        alpha_bars = (1.0 / (sigmas**2 + 1.0)).tolist()
        return model, known_region_hook(z_init, noise, latent_mask(mask, h, w).to(device), alpha_bars)
    H, W = h * pipe.config.autoencoder.downsample_factor, w * pipe.config.autoencoder.downsample_factor
    if mask is None:
        mask = torch.ones(1, 1, H, W)
    if image is None:
        image = torch.zeros(1, 3, H, W)
    masked = image.to(device, dtype) * (mask < 0.5).to(device, dtype)  # (1, 3, H, W): masked pixels grey (0)
    masked_latents = pipe.encode_images(masked).float()  # (1, C, h, w), tiled like the init image when large
    return with_mask_channels(model, latent_mask(mask, h, w).to(device), masked_latents), None
