"""Decoding sample members without torch: image bytes -> RGB PIL image, ``.npy`` bytes -> numpy array.

Any failure to decode (corrupt or truncated bytes, a non-image, a pickled array) raises :class:`DecodeError`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class DecodeError(ValueError):
    """The bytes are not a decodable image or array."""


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes to an RGB PIL image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def decode_array(data: bytes) -> np.ndarray:
    """A ``.npy`` array, loaded without pickles."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # ValueError, OSError, EOFError on malformed headers or short data
        raise DecodeError(f"{type(e).__name__}: {e}") from None
