"""Decoding sample members without torch: image bytes -> RGB PIL image, ``.npy`` bytes -> numpy array.

Any failure to decode (corrupt or truncated bytes, a non-image, a pickled array) raises :class:`DecodeError`.
:data:`IMAGE_EXTS` is the one list of image file extensions the package reads (shard writing, shard reading and
evaluation alike): the formats this decoder (Pillow) handles.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # lower case, without the dot


class DecodeError(ValueError):
    """The bytes are not a decodable image or array."""


def is_image_name(name: str) -> bool:
    """Whether a file name (or path) ends in one of :data:`IMAGE_EXTS`, any case; hidden files (``.x.png``) never."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and "." in base and base.rsplit(".", 1)[1].lower() in IMAGE_EXTS


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes to an RGB PIL image (text chunks such as a PNG's ``parameters`` stay in ``.info``)."""
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
