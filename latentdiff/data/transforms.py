"""Sample tensors: image bytes -> float tensor (3, H, W) in [-1, 1]; latent ``.npy`` bytes -> float tensor.

Images are decoded with PIL and converted to RGB, resized so that the shorter side is ``image_size`` (bicubic;
PIL widens the filter when shrinking, i.e. antialiases), cropped to ``image_size`` square (center, or at a
random offset) and optionally flipped left-right with probability 1/2. Randomness comes from the ``rng`` the
caller passes (one per sample, see reader.py), so augmentations are reproducible.

Decoding failures raise :class:`latentdiff.data.decode.DecodeError`; bugs in the transform itself are not masked.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from latentdiff.data.decode import decode_array, decode_image

CROPS = ("center", "random")


def latent_tensor(data: bytes) -> torch.Tensor:
    """A ``.npy`` latent as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(decode_array(data), dtype=np.float32))


class ImageTransform:
    """Decode, resize (shorter side), crop, flip, scale to [-1, 1]."""

    def __init__(self, image_size: int, crop: str = "center", random_flip: bool = False):
        if crop not in CROPS:
            raise ValueError(f"crop={crop!r} is not one of {list(CROPS)}")
        self.image_size = image_size
        self.crop = crop
        self.random_flip = random_flip

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        img = decode_image(data)
        S = self.image_size
        W, H = img.size
        scale = S / min(W, H)
        if scale != 1:
            size = (max(S, round(W * scale)), max(S, round(H * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
            W, H = img.size
        if self.crop == "random":
            left, top = rng.randint(0, W - S), rng.randint(0, H - S)
        else:
            left, top = (W - S) // 2, (H - S) // 2
        if (W, H) != (S, S):
            img = img.crop((left, top, left + S, top + S))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
        return x.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W) in [-1, 1]
