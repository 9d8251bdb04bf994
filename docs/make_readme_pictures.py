"""Make the README's inpainting picture with the embedded default model:

    python docs/make_readme_pictures.py --out docs/images/inpaint_default.png

The init image is the horse the model makes for "a photo of a horse" (seed 3, DDIM, 25 steps: the img2img
picture's input, docs/images/img2img_input.png). Each row repaints the white part of one mask with "a photo of a
horse" and shows: the input, the input with the repainted part in grey, then six results (seeds 0-5, the model's own
sampler and steps, strength 1; every step guided at scale 5: the defaults of v1.3, which made the picture; v1.4 has
the same weights). Row 1: the top 12 pixel rows (the background behind the horse); row 2: the right
half (its head and forelegs). Tiles are 32x32 pixels enlarged by --zoom with nearest neighbour, 2 pixels apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROWS = [("a photo of a horse", (slice(0, 12), slice(None))), ("a photo of a horse", (slice(None), slice(16, None)))]
SEEDS = 6
GAP = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the PNG to write (refused if it exists, unless --overwrite)")
    p.add_argument("--zoom", type=int, default=4, help="enlargement factor (nearest neighbour)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (the picture in the README was made on the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"{out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.zoom < 1:
        print(f"--zoom must be a positive integer, got {args.zoom}", file=sys.stderr)
        return 2

    import torch

    from latentdiff import load_pipeline
    from latentdiff.atomic import atomic_write

    pipe = load_pipeline("default", device=torch.device(args.device))
    v13 = {"scale": 5.0, "guidance_interval": (0.0, float("inf"))}  # the picture was made with v1.3's defaults
    horse = pipe("a photo of a horse", seed=3, sampler="ddim", steps=25, **v13)[0]
    size = horse.size[0]
    rows = []
    for prompt, region in ROWS:
        mask = np.zeros((size, size), np.uint8)
        mask[region] = 255
        mask = Image.fromarray(mask)
        images = pipe(prompt, init_image=horse, mask_image=mask, seed=0, num_images_per_prompt=SEEDS, **v13)
        shown = Image.composite(Image.new("RGB", horse.size, (128, 128, 128)), horse, mask)  # masked part grey
        rows.append([horse, shown, *images])
    step = size + GAP
    strip = Image.new("RGB", (len(rows[0]) * step - GAP, len(rows) * step - GAP), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            strip.paste(image, (c * step, r * step))
    strip = strip.resize((strip.width * args.zoom, strip.height * args.zoom), Image.NEAREST)
    with atomic_write(out, "wb", overwrite=args.overwrite) as f:
        strip.save(f, format="PNG", optimize=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
