"""Image files: PNGs that carry generation parameters, never overwriting, and sample grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, PngImagePlugin

from latentdiff.io.atomic import atomic_write


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """Encode a PNG with an optional ``parameters`` tEXt chunk (the AUTOMATIC1111 convention)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png_new(image: Image.Image, outdir: str | Path, parameters: str | None = None, stem: str = "",
                 first_index: int = 0) -> Path:
    """Write ``outdir/NNNNN[-stem].png`` with the next free number (at least ``first_index``); an existing file is
    never overwritten."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, parameters)
    index = max(_next_index(outdir), first_index)
    while True:
        path = outdir / (f"{index:05d}-{stem}.png" if stem else f"{index:05d}.png")
        try:
            with atomic_write(path, "wb", overwrite=False) as f:
                f.write(data)
            return path
        except FileExistsError:
            index += 1


def _next_index(outdir: Path) -> int:
    numbers = [int(p.name[:5]) for p in outdir.glob("*.png") if p.name[:5].isdigit()]
    return max(numbers, default=-1) + 1


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (same size) into a grid, ``cols`` per row (default: about square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
