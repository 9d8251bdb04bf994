"""The input of image-to-image: a PIL image as a tensor for the autoencoder, and the sampler step that a
denoising ``strength`` starts from (diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``).

    x = image_to_tensor(Image.open("cat.png"), height=512, width=512)   # (1, 3, 512, 512) in [-1, 1]
    k = start_step(steps=25, strength=0.75)                             # 7: skip 7 steps, run 18
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def check_strength(strength: float) -> float:
    """``strength`` as a float in (0, 1], else ValueError."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r} must be a number in (0, 1] (1 = noised to the first step)")
    return float(strength)


def start_step(steps: int, strength: float) -> int:
    """k, the steps of a ``steps``-step run that img2img skips: k = steps - min(int(steps · strength), steps), as
    diffusers' ``get_timesteps`` (so strength 0.75 of 25 steps runs int(18.75) = 18). ValueError when no step
    would run."""
    strength = check_strength(strength)
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength={strength:g} with steps={steps} runs no sampling step "
                         f"(int(steps * strength) = 0); raise the strength or the steps")
    return steps - run


def fitted_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(height, width) of ``image`` rounded down to a multiple of ``multiple`` (at least ``multiple``)."""
    _check_image(image)
    width, height = image.size
    return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A PIL image -> (1, 3, height, width) float32 in [-1, 1], RGB; resized with Lanczos (diffusers'
    ``VaeImageProcessor`` default) when its size differs."""
    _check_image(image)
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0  # (1, 3, H, W) in [-1, 1]


def _check_image(image) -> None:
    if not isinstance(image, Image.Image):
        raise ValueError(f"init_image must be a PIL image, got {type(image).__name__}")
