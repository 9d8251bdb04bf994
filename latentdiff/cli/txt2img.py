"""Text-to-image from the command line.

Examples (from the repository root)::

    latentdiff txt2img "a photo of a cat"                      # embedded default model
    latentdiff txt2img "a photo of a ship" --ckpt default-vq   # embedded VQ-Diffusion model
    latentdiff txt2img "a photo of a ship" --n_samples 8 --steps 50 --scale 4 --seed 1 --sampler dpmpp_2m
    latentdiff txt2img "a castle" --ckpt v1-5-pruned-emaonly.safetensors --H 512 --W 512 --device cuda \\
        --precision bf16 --negative-prompt "blurry"
    latentdiff txt2img "a castle" --ckpt path/to/diffusers-folder --outdir outputs/castle
    latentdiff txt2img "a watercolor castle" --init-image castle.png --strength 0.6   # img2img
    latentdiff txt2img --from-png outputs/txt2img/00000.png --seed 7   # that image's settings, another seed
    latentdiff txt2img --from-file prompts.txt --n_samples 4           # 4 images per line of prompts.txt

Each image is written as a new PNG in ``--outdir`` (existing files are never overwritten) with the generation
parameters in a ``parameters`` text chunk (the AUTOMATIC1111 format), plus a grid when several images (at most
GRID_MAX) are made. Images are generated ``--batch-size`` at a time and written as each batch finishes, so any
``--n_samples`` runs in bounded memory. Bad input (size, steps, sampler, non-finite numbers, checkpoint, an
``--outdir`` that is a file) prints one message and exits with status 2 before anything is written.

With ``--init-image`` (latent-diffusion models only) each image starts from that picture, resized to --H x --W,
encoded and noised to the step that ``--strength`` selects (as diffusers' img2img: of --steps 25 at strength 0.75,
the last int(25 * 0.75) = 18 steps run; at strength 1 all of them run, from the picture noised to the first step).

``--from-png FILE`` takes the prompt, negative prompt, steps, sampler, CFG scale, seed, size, eta, img2img strength
and VQ-Diffusion truncation from the ``parameters`` chunk of a PNG latentdiff wrote; flags given on the command line
override them, and the same --ckpt, device and precision regenerate the image bit for bit (an img2img PNG needs its
--init-image again: the picture is not in the PNG; a VQ-Diffusion image's whole batch is made again, as its sampling
is one random stream per batch).
``--from-file FILE`` makes --n_samples images per non-empty line of a UTF-8 text file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from latentdiff.cli.common import ArgumentParser, fail, resolve_device_dtype

GRID_MAX = 64  # images in a grid at most; larger runs write none


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from latentdiff.diffusion.samplers import SAMPLERS

    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("prompt", nargs="*", help="prompt text (several positional words are joined with spaces); "
                                             "optional with --from-png, not allowed with --from-file")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="regenerate from the settings in this PNG's parameters chunk (a PNG latentdiff wrote); flags "
                        "given explicitly override them")
    p.add_argument("--from-file", default=None, metavar="FILE",
                   help="one prompt per non-empty line of this UTF-8 text file, --n_samples images each, numbered on; "
                        "with --seed S, line j's images start at seed S + j * n_samples")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (replaces the empty prompt)")
    p.add_argument("--ckpt", "--checkpoint", dest="ckpt", default=None,
                   help="'default' or 'default-vq' (the embedded latent-diffusion and VQ-Diffusion models), a "
                        "latentdiff .safetensors, a Stable Diffusion single file (.safetensors/.ckpt) or a diffusers "
                        "folder; default: the embedded default model")
    p.add_argument("--steps", type=int, default=None,
                   help="number of sampling steps; default: the model's own (its config's steps: 10 for the "
                        "embedded model, 25 for Stable Diffusion; VQ-Diffusion: its whole chain)")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (1 = no guidance); default: the model's own "
                        "(its config's guidance_scale: 7.5 for SD 1.x and 2.x base, 9 for SD 2.x 768-v)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="sampler (latent diffusion; VQ-Diffusion models have their own and ignore it); default: the "
                        "model's own (its config's sampler: euler_a for the embedded model, ddim for Stable "
                        "Diffusion)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--truncation", type=float, default=None,
                   help="VQ-Diffusion models only: keep the most likely codes covering this probability, in (0, 1]; "
                        "default: the model's truncation_rate")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed (latent diffusion: image i has its own random stream seeded with seed+i, for "
                        "its starting noise and the step noise of euler_a, ddpm and ddim with --eta, whatever the "
                        "batch size; VQ-Diffusion: one random stream per batch, seeded with its first image's seed); "
                        "default: random")
    p.add_argument("--n_samples", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images generated at once (memory grows with it); each batch is written when done")
    p.add_argument("--H", type=int, default=None, help="image height in pixels; default: the model's size")
    p.add_argument("--W", type=int, default=None, help="image width in pixels; default: the model's size")
    p.add_argument("--init-image", default=None, metavar="PATH",
                   help="img2img: start from this image (resized to --H x --W) instead of pure noise")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img denoising strength in (0, 1]: how much of the image is replaced by noise "
                        "(1 = all); default 0.75; only with --init-image")
    p.add_argument("--outdir", default="outputs/txt2img", help="folder for the PNGs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights/compute precision (auto: bf16 on CUDA if supported, else fp16; fp32 on CPU)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="override the prediction type of a Stable Diffusion checkpoint (e.g. SD 2.x 768-v)")
    p.add_argument("--no-grid", action="store_true", help=f"do not write a grid image (none for more than {GRID_MAX})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    png = _apply_png(args, argv, prog) if args.from_png is not None else None
    if args.from_file is not None:
        if args.prompt:
            fail("--from-file cannot be combined with a prompt on the command line")
        prompts = _read_prompts(args.from_file)
    else:
        prompts = [" ".join(args.prompt).strip()]
        if not prompts[0]:
            fail("the prompt is empty")
    if args.steps is not None and args.steps <= 0:
        fail(f"--steps must be a positive integer, got {args.steps}")
    if args.n_samples <= 0:
        fail(f"--n_samples must be a positive integer, got {args.n_samples}")
    if args.truncation is not None and not 0 < args.truncation <= 1:
        fail(f"--truncation must be in (0, 1], got {args.truncation}")
    for flag, value in (("--H", args.H), ("--W", args.W), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            fail(f"{flag} must be a positive integer, got {value}")
    for flag, value in (("--scale", args.scale), ("--eta", args.eta), ("--truncation", args.truncation)):
        if value is not None and not math.isfinite(value):
            fail(f"{flag} must be a finite number, got {value}")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        fail(f"--outdir {outdir} exists and is not a folder")
    if args.strength is not None and args.init_image is None:
        fail("--strength applies only with --init-image")
    strength = 0.75 if args.strength is None else args.strength
    if not (math.isfinite(strength) and 0 < strength <= 1):
        fail(f"--strength must be a number in (0, 1], got {strength}")
    init_image = _read_init_image(args.init_image) if args.init_image is not None else None

    import torch
    from tqdm.auto import tqdm

    from latentdiff.io.images import make_grid, save_png_new
    from latentdiff.pipelines import load_pipeline

    device, dtype = resolve_device_dtype(args.device, args.precision)
    extra = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    try:
        pipe = load_pipeline(args.ckpt, device=device, dtype=dtype, **extra)
    except (ValueError, OSError) as e:
        fail(str(e))
    if png is not None:
        _check_png_against(png, pipe, args)
    height = args.H or pipe.config.image_size
    width = args.W or pipe.config.image_size
    scale = args.scale if args.scale is not None else pipe.default_scale
    vq_kwargs = {}
    if args.truncation is not None:
        if pipe.config.type != "vq_diffusion":
            fail("--truncation applies to VQ-Diffusion models only")
        vq_kwargs["truncation"] = args.truncation
    img2img = {}
    steps = args.steps if args.steps is not None else pipe.default_steps
    run_steps = steps
    try:
        pipe.check_size(height, width)
        if steps > pipe.schedule.num_timesteps:
            raise ValueError(f"--steps must be at most {pipe.schedule.num_timesteps}, got {steps}")
        if init_image is not None:
            if pipe.config.type == "vq_diffusion":
                raise ValueError("--init-image: img2img needs a latent-diffusion model; this is a VQ-Diffusion model")
            from latentdiff.pipelines.init_image import start_step

            run_steps = steps - start_step(steps, strength)
            img2img = {"init_image": init_image, "strength": strength}
    except ValueError as e:
        fail(str(e))
    if init_image is not None and init_image.size != (width, height):
        print(f"note: --init-image {init_image.size[0]}x{init_image.size[1]} resized to {width}x{height}",
              file=sys.stderr)

    batches = [(start, min(args.batch_size, args.n_samples - start))
               for start in range(0, args.n_samples, args.batch_size)]
    bar = tqdm(total=run_steps * len(batches) * len(prompts), desc="sampling", unit="step", disable=args.quiet)

    def progress(i, n, *_):
        bar.update(1)

    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    try:
        for j, prompt in enumerate(prompts):
            kept = []  # images for this prompt's grid
            line_seed = seed + j * args.n_samples
            for start, count in batches:
                images = pipe(prompt, negative_prompt=args.negative_prompt, steps=steps, scale=scale,
                              sampler=args.sampler, seed=line_seed + start, height=height, width=width, eta=args.eta,
                              num_images_per_prompt=count, callback=progress, **vq_kwargs, **img2img)
                for im in images:
                    print(save_png_new(im, outdir, im.info["parameters"]), flush=True)
                if args.n_samples <= GRID_MAX:
                    kept += images
            if len(kept) > 1 and not args.no_grid:
                grid = make_grid(kept)
                print(save_png_new(grid, outdir, kept[0].info["parameters"], stem="grid"), flush=True)
    except ValueError as e:  # a combination only the sampler can judge (e.g. eta with a non-DDIM sampler)
        fail(str(e))
    finally:
        bar.close()
    return 0


# Options a --from-png PNG supplies unless given on the command line (args attribute names).
PNG_OPTIONS = ("negative_prompt", "steps", "sampler", "scale", "seed", "H", "W", "eta", "strength", "truncation")


def _explicit_options(argv: list[str] | None, prog: str | None) -> set[str]:
    """The option names (args attributes) given on the command line, whatever their values."""
    parser = build_parser(prog)
    for action in parser._actions:
        if action.option_strings:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0])) - {"prompt"}


def _apply_png(args: argparse.Namespace, argv: list[str] | None, prog: str | None) -> dict:
    """Fill ``args`` from the --from-png PNG's settings where the command line left them out; returns the settings
    (``from_png``: the option names taken from the PNG). Exits 2 with one message when the PNG cannot be used."""
    from latentdiff.io.images import png_settings

    if args.from_file is not None:
        fail("--from-png and --from-file cannot be combined")
    try:
        png = png_settings(args.from_png)
    except ValueError as e:
        fail(f"--from-png {args.from_png}: {e}")
    explicit = _explicit_options(argv, prog)
    png["from_png"] = {key for key in PNG_OPTIONS if key in png and key not in explicit}
    for key in png["from_png"]:
        setattr(args, key, png[key])
    if not args.prompt:
        args.prompt = [png["prompt"]]
    if "strength" in png and args.init_image is None:
        fail(f"--from-png {args.from_png} was made by img2img (Denoising strength {png['strength']:g}) and its init "
             "image is not in the PNG: give it with --init-image")
    if png.get("batch_size", 1) > 1:  # VQ-Diffusion: one random stream per batch; regenerate the whole batch
        for key, value in (("n_samples", png["batch_size"]), ("batch_size", png["batch_size"])):
            if key not in explicit:
                setattr(args, key, value)
        print(f"note: {args.from_png} is image {png.get('batch_pos', 0) + 1} of a batch of {png['batch_size']} "
              "(one random stream per batch): the whole batch is made again", file=sys.stderr)
    return png


def _check_png_against(png: dict, pipe, args: argparse.Namespace) -> None:
    """Warn when the --from-png PNG names another model; drop the PNG's settings that the loaded model has no use
    for (a VQ-Diffusion truncation on a latent-diffusion model, the VQ-Diffusion sampler name)."""
    from latentdiff.diffusion.samplers import SAMPLERS

    if png["model"] and png["model"] != pipe.name:
        print(f"warning: {args.from_png} was made with model {png['model']!r}, not the loaded {pipe.name!r}: the "
              "image will differ", file=sys.stderr)
    vq = pipe.config.type == "vq_diffusion"
    if "truncation" in png["from_png"] and not vq:
        args.truncation = None
    if "sampler" in png["from_png"] and args.sampler not in SAMPLERS:
        if not vq:
            fail(f"--from-png {args.from_png}: sampler {args.sampler!r} is not one of ours "
                 f"({', '.join(sorted(SAMPLERS))}); choose one with --sampler")
        args.sampler = None


def _read_prompts(path: str) -> list[str]:
    """The non-empty lines of the --from-file text file; exits 2 with one message when there are none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--from-file {path}: not a readable UTF-8 text file ({e})")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"--from-file {path}: has no prompts (no non-empty line)")
    return prompts


def _read_init_image(path: str):
    """The --init-image as a fully read RGB PIL image; exits 2 with one message when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        fail(f"--init-image {path}: not a readable image ({e})")
