"""Make the README's pictures with the embedded models:

    python docs/make_readme_pictures.py --out docs/images/inpaint_default.png
    python docs/make_readme_pictures.py --picture samples --out docs/images/default_grid.png
    python docs/make_readme_pictures.py --picture samples-vq --out docs/images/default_vq_grid.png

``inpaint`` (the default): the init image is the horse the model makes for "a photo of a horse" (seed 3, DDIM, 25
steps: the img2img picture's input, docs/images/img2img_input.png). Each row repaints the white part of one mask
with "a photo of a horse" and shows: the input, the input with the repainted part in grey, then six results (seeds
0-5, the model's own sampler and steps, strength 1; every step guided at scale 5: the defaults of v1.3, which made
the picture; v1.4 and v1.5 have the same weights). Row 1: the top 12 pixel rows (the background behind the horse);
row 2: the right half (its head and forelegs). Tiles are 32x32 pixels enlarged by --zoom (default 4) with nearest
neighbour, 2 pixels apart.

``samples`` / ``samples-vq``: the default / VQ-Diffusion model's sample grid, one row per CIFAR-10 class with its
training caption ("a photo of a ..."), seeds 0-7, the model's own sampling defaults (the VQ-Diffusion model in 25
steps): row c is what ``latentdiff txt2img "a photo of a <class c>" --n_samples 8 --seed 0`` (``--ckpt default-vq
--steps 25``) writes, tiled as its grid PNG (2 pixels apart) and enlarged by --zoom (default 2).
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
    p.add_argument("--picture", choices=("inpaint", "samples", "samples-vq"), default="inpaint",
                   help="which picture (default: inpaint)")
    p.add_argument("--out", required=True, help="the PNG to write (refused if it exists, unless --overwrite)")
    p.add_argument("--zoom", type=int, default=None,
                   help="enlargement factor (nearest neighbour; default: 4 for inpaint, 2 for the sample grids)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (the picture in the README was made on the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"{out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    zoom = args.zoom if args.zoom is not None else (4 if args.picture == "inpaint" else 2)
    if zoom < 1:
        print(f"--zoom must be a positive integer, got {zoom}", file=sys.stderr)
        return 2

    import torch

    from latentdiff import load_pipeline
    from latentdiff.atomic import atomic_write

    model = "default-vq" if args.picture == "samples-vq" else "default"
    pipe = load_pipeline(model, device=torch.device(args.device))
    picture = inpaint_strip(pipe) if args.picture == "inpaint" else sample_grid(pipe, args.picture == "samples-vq")
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    with atomic_write(out, "wb", overwrite=args.overwrite) as f:
        picture.save(f, format="PNG", optimize=True)
    print(out)
    return 0


def sample_grid(pipe, vq: bool) -> Image.Image:
    """One row of 8 images (seeds 0-7) per CIFAR-10 class caption, as txt2img's grid PNG tiles them."""
    from latentdiff.io.images import make_grid
    from latentdiff.metrics.t2i import CIFAR10_CLASSES, class_prompts

    captions = class_prompts(CIFAR10_CLASSES, len(CIFAR10_CLASSES)).captions  # the training captions
    images = [im for caption in captions
              for im in pipe(caption, seed=0, num_images_per_prompt=8, **({"steps": 25} if vq else {}))]
    return make_grid(images, cols=8)


def inpaint_strip(pipe) -> Image.Image:
    """The inpainting picture: two rows of input, masked input and six repaintings."""
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
    return strip


if __name__ == "__main__":
    sys.exit(main())
