"""Text-to-image from the command line.

Examples (from the repository root)::

    latentdiff txt2img "a photo of a cat"                      # embedded default model
    latentdiff txt2img "a photo of a ship" --ckpt default-vq   # embedded VQ-Diffusion model
    latentdiff txt2img "a photo of a ship" --n_samples 8 --steps 50 --scale 4 --seed 1 --sampler dpmpp_2m
    latentdiff txt2img "a castle" --ckpt v1-5-pruned-emaonly.safetensors --H 512 --W 512 --device cuda \\
        --precision bf16 --negative-prompt "blurry"
    latentdiff txt2img "a castle" --ckpt path/to/diffusers-folder --outdir outputs/castle
    latentdiff txt2img "a watercolor castle" --init-image castle.png --strength 0.6   # img2img
    latentdiff txt2img "a red door" --init-image house.png --mask door-mask.png --mask-blur 4   # inpainting
    latentdiff txt2img "a castle <lora:ink:0.6>" --lora-dir loras --lora detail.safetensors:0.5   # LoRAs
    latentdiff txt2img --from-png outputs/txt2img/00000.png --seed 7   # that image's settings, another seed
    latentdiff txt2img --from-file prompts.txt --n_samples 4           # 4 images per line of prompts.txt
    latentdiff txt2img "a (red:1.3) castle, [fog] BREAK a lake" --clip-skip 2   # AUTOMATIC1111 prompt syntax

Each image is written as a new PNG in ``--outdir`` (existing files are never overwritten) with the generation
parameters in a ``parameters`` text chunk (the AUTOMATIC1111 format), plus a grid when several images (at most
GRID_MAX) are made. Images are generated ``--batch-size`` at a time and written as each batch finishes, so any
``--n_samples`` runs in bounded memory. Bad input (size, steps, sampler, non-finite numbers, checkpoint, an
``--outdir`` that is a file) prints one message and exits with status 2 before anything is written.

With ``--init-image`` (latent-diffusion models only) each image starts from that picture, resized to --H x --W,
encoded and noised to the step that ``--strength`` selects (as diffusers' img2img: of --steps 25 at strength 0.75,
the last int(25 * 0.75) = 18 steps run; at strength 1 all of them run, from the picture noised to the first step).
With ``--mask`` as well (white = repaint; resized to the image, blurred by ``--mask-blur`` pixels first) only the
masked part is repainted, as diffusers' inpainting pipeline does: an inpainting checkpoint (a U-Net with 2C + 1
input channels, e.g. SD 1.5 inpainting) sees the mask and the masked picture at every step; an ordinary model gets
the unmasked part put back after every step. --strength then defaults to 1 (pure noise in the masked part).

Prompts are read as AUTOMATIC1111 reads them (docs/prompts.md): ``(word)``, ``(word:1.3)``, ``[word]``, ``\\(``,
BREAK, and any length (encoded in chunks of the text encoder's context length).

``--from-png FILE`` takes the prompt, negative prompt, steps, sampler, CFG scale, seed, size, eta, img2img strength,
clip skip and VQ-Diffusion truncation from the ``parameters`` chunk of a PNG latentdiff wrote; flags given on the
command line override them, and the same --ckpt, device and precision regenerate the image bit for bit (an img2img
PNG needs its --init-image again and an inpainting PNG its --init-image and --mask, as pictures are not stored in
the PNG, only the mask blur; a VQ-Diffusion image's whole batch is made again, as its sampling is one random stream
per batch).
``--from-file FILE`` makes --n_samples images per non-empty line of a UTF-8 text file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from latentdiff.cli.common import (
    BATCH,
    FINITE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    SEED,
    SIGMA,
    UNIT,
    ArgumentParser,
    Float,
    Int,
    fail,
    guidance_interval_option,
    report_error,
    resolve_device_dtype,
)
from latentdiff.cli.fast_flags import add_fast_arguments, apply_fast_arguments
from latentdiff.cli.txt2img_inputs import apply_png, check_png_against, load_loras, read_image, read_prompts, tag_names
from latentdiff.config.model import VQ_SAMPLER_NAMES

GRID_MAX = 64  # images in a grid at most; larger runs write none
SIDE = Int(1, 16384)  # --H, --W in pixels
FRACTION = Float(0.0, 1.0)  # [0, 1]: --guidance-rescale


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
    p.add_argument("--steps", type=POSITIVE, default=None,
                   help="number of sampling steps; default: the model's own (its config's steps: 10 for the "
                        "embedded model, 25 for Stable Diffusion; VQ-Diffusion: its whole chain)")
    p.add_argument("--scale", type=FINITE, default=None,
                   help="classifier-free guidance scale (1 = no guidance); default: the model's own "
                        "(its config's guidance_scale: 7.5 for SD 1.x and 2.x base, 9 for SD 2.x 768-v)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS) + list(VQ_SAMPLER_NAMES),
                   help="sampler; default: the model's own (its config's sampler: euler_a for the embedded model, "
                        "ddim for Stable Diffusion, vq for VQ-Diffusion). VQ-Diffusion models take vq (the reverse "
                        "chain) or vq_purity (purity sampling) and run their own for a latent-diffusion sampler's "
                        "name")
    p.add_argument("--eta", type=NON_NEGATIVE_FLOAT, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance-rescale", type=FRACTION, default=0.0, metavar="PHI",
                   help="guidance rescale in [0, 1] (Lin et al. 2024; diffusers' guidance_rescale; 0.7 for "
                        "zero-terminal-SNR models), latent diffusion only; recorded as 'CFG Rescale phi'")
    p.add_argument("--guidance-interval", type=SIGMA, nargs=2, default=None,
                   metavar=("SIGMA_LO", "SIGMA_HI"),
                   help="guide only the steps whose noise level sigma = sqrt((1 - alphabar) / alphabar) lies in "
                        "(SIGMA_LO, SIGMA_HI], the others unguided (Kynkaanniemi et al. 2024; 0 inf: every step, "
                        "overriding a model's own interval), latent diffusion only; default: the model's own (its "
                        "config's guidance_interval; none: every step); recorded as 'Guidance interval'")
    p.add_argument("--truncation", type=UNIT, default=None,
                   help="VQ-Diffusion models only: keep the most likely codes covering this probability, in (0, 1]; "
                        "default: the model's truncation_rate")
    p.add_argument("--seed", type=SEED, default=None,
                   help="random seed (latent diffusion: image i has its own random stream seeded with seed+i, for "
                        "its starting noise and the step noise of euler_a, ddpm and ddim with --eta, whatever the "
                        "batch size; VQ-Diffusion: one random stream per batch, seeded with its first image's seed); "
                        "default: random")
    p.add_argument("--n_samples", type=POSITIVE, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=BATCH, default=8,
                   help="images generated at once (memory grows with it); each batch is written when done")
    p.add_argument("--H", type=SIDE, default=None, help="image height in pixels; default: the model's size")
    p.add_argument("--W", type=SIDE, default=None, help="image width in pixels; default: the model's size")
    p.add_argument("--init-image", default=None, metavar="PATH",
                   help="img2img: start from this image (resized to --H x --W) instead of pure noise")
    p.add_argument("--strength", type=UNIT, default=None,
                   help="img2img denoising strength in (0, 1]: how much of the image is replaced by noise "
                        "(1 = all); default 0.75 (1 with --mask); only with --init-image")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting: repaint the white part of this greyscale mask (resized to the image), keep "
                        "the black part; only with --init-image")
    p.add_argument("--mask-blur", type=NON_NEGATIVE_FLOAT, default=None, metavar="R",
                   help="blur the mask by a Gaussian of R pixels first (AUTOMATIC1111's mask blur); default 0; "
                        "only with --mask")
    p.add_argument("--clip-skip", type=POSITIVE, default=1, metavar="N",
                   help="condition on the text encoder's output N - 1 blocks before its own output layer "
                        "(AUTOMATIC1111's Clip skip; 1 = the model's own); latent-diffusion models only")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply this LoRA (kohya/AUTOMATIC1111 or diffusers .safetensors) at SCALE (default 1); "
                        "repeatable; latent-diffusion models only")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="folder where a prompt's <lora:NAME:SCALE> tags find NAME.safetensors (the tags are removed "
                        "from the text that is encoded and kept in the recorded prompt)")
    p.add_argument("--outdir", default="outputs/txt2img", help="folder for the PNGs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights/compute precision (auto: bf16 on CUDA if supported, else fp16; fp32 on CPU)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="override the prediction type of a Stable Diffusion checkpoint (e.g. SD 2.x 768-v)")
    add_fast_arguments(p)
    p.add_argument("--no-grid", action="store_true", help=f"do not write a grid image (none for more than {GRID_MAX})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)  # every number is checked by its flag's type (and a --from-png value by the same)
    png = apply_png(args, _explicit_options(argv, prog), parser) if args.from_png is not None else None
    if args.from_file is not None:
        if args.prompt:
            fail("--from-file cannot be combined with a prompt on the command line")
        prompts = read_prompts(args.from_file)
    else:
        prompts = [" ".join(args.prompt).strip()]
        if not prompts[0]:
            fail("the prompt is empty")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        fail(f"--outdir {outdir} exists and is not a folder")
    if args.strength is not None and args.init_image is None:
        fail("--strength applies only with --init-image")
    if args.mask is not None and args.init_image is None:
        fail("--mask applies only with --init-image (the picture to inpaint)")
    if args.mask_blur is not None and args.mask is None:
        fail("--mask-blur applies only with --mask")
    mask_blur = 0.0 if args.mask_blur is None else args.mask_blur
    strength = (0.75 if args.mask is None else 1.0) if args.strength is None else args.strength
    init_image = read_image(args.init_image) if args.init_image is not None else None
    mask = read_image(args.mask, "--mask", "L") if args.mask is not None else None

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
        check_png_against(png, pipe, args)
    height = args.H or pipe.config.image_size
    width = args.W or pipe.config.image_size
    scale = args.scale if args.scale is not None else pipe.default_scale
    vq_kwargs = {}
    if args.sampler in VQ_SAMPLER_NAMES and pipe.config.type != "vq_diffusion":
        fail(f"--sampler {args.sampler} applies to VQ-Diffusion models only")
    if args.truncation is not None:
        if pipe.config.type != "vq_diffusion":
            fail("--truncation applies to VQ-Diffusion models only")
        vq_kwargs["truncation"] = args.truncation
    prompt_kwargs = {}
    if pipe.config.type == "vq_diffusion":
        if args.clip_skip != 1:
            fail("--clip-skip applies to latent-diffusion models only")
    else:
        try:
            pipe.text_encoder.blocks_skipped(args.clip_skip)
        except ValueError as e:
            fail(f"--clip-skip: {e}")
        prompt_kwargs["clip_skip"] = args.clip_skip
    if args.guidance_rescale:  # --guidance-rescale
        if pipe.config.type == "vq_diffusion":
            fail("--guidance-rescale applies to latent-diffusion models only")
        prompt_kwargs["guidance_rescale"] = args.guidance_rescale
    interval = guidance_interval_option(args.guidance_interval, pipe.config.type == "vq_diffusion")
    if interval is not None:
        prompt_kwargs["guidance_interval"] = interval
    apply_fast_arguments(pipe, args)
    encoded_prompts = load_loras(pipe, args, prompts)
    loaded = {n for n, _, _ in getattr(pipe, "loras", ())}  # VQ-Diffusion pipelines have none
    if png is not None and set(png.get("loras", ())) - loaded - tag_names(prompts):
        print(f"warning: {args.from_png} was made with LoRAs {png['loras']}: give them again with --lora (those "
              "named by <lora:...> tags in its prompt are loaded from --lora-dir)", file=sys.stderr)
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
            if mask is not None:
                img2img.update(mask_image=mask, mask_blur=mask_blur)
    except ValueError as e:
        fail(str(e))
    if init_image is not None and init_image.size != (width, height):
        print(f"note: --init-image {init_image.size[0]}x{init_image.size[1]} resized to {width}x{height}",
              file=sys.stderr)
    if mask is not None and mask.size != (width, height):
        print(f"note: --mask {mask.size[0]}x{mask.size[1]} resized to {width}x{height}", file=sys.stderr)

    batches = [(start, min(args.batch_size, args.n_samples - start))
               for start in range(0, args.n_samples, args.batch_size)]
    bar = tqdm(total=run_steps * len(batches) * len(prompts), desc="sampling", unit="step", disable=args.quiet)

    def progress(i, n, *_):
        bar.update(1)

    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    lost = []  # seeds of images not written
    try:
        for j, prompt in enumerate(prompts):
            kept = []  # images for this prompt's grid
            line_seed = seed + j * args.n_samples
            if encoded_prompts != prompts:  # this line's <lora:...> tags, the previous line's unloaded
                pipe.use_prompt_loras(prompt, args.lora_dir)
            for start, count in batches:
                with warnings.catch_warnings():  # a non-finite image: reported below in one line
                    warnings.simplefilter("ignore", UserWarning)
                    images = pipe(encoded_prompts[j], negative_prompt=args.negative_prompt, steps=steps,
                                  scale=scale, sampler=args.sampler, seed=line_seed + start, height=height,
                                  width=width, eta=args.eta, num_images_per_prompt=count, callback=progress,
                                  **vq_kwargs, **img2img, **prompt_kwargs)
                for k, im in enumerate(images):
                    if im is None:  # NaN or inf pixels even decoded in float32 (Pipeline.__call__): never written
                        lost.append(line_seed + start + k)
                        print(f"warning: the image with seed {lost[-1]} has NaN or inf pixels even decoded in "
                              "float32: not written", file=sys.stderr)
                        continue
                    if encoded_prompts[j] != prompt:  # AUTOMATIC1111 records the prompt with its <lora:...> tags
                        im.info["parameters"] = prompt + im.info["parameters"][len(encoded_prompts[j]):]
                    print(save_png_new(im, outdir, im.info["parameters"]), flush=True)
                if args.n_samples <= GRID_MAX:
                    kept += [im for im in images if im is not None]
            if len(kept) > 1 and not args.no_grid:
                grid = make_grid(kept)
                print(save_png_new(grid, outdir, kept[0].info["parameters"], stem="grid"), flush=True)
    except ValueError as e:  # a combination only the sampler can judge (e.g. eta with a non-DDIM sampler)
        fail(str(e))
    finally:
        bar.close()
    if lost:
        return report_error(f"{len(lost)} image(s) not written (NaN or inf pixels; seeds {lost}): try --precision "
                            "fp32 or bf16, or other seeds", code=1)
    return 0


def _explicit_options(argv: list[str] | None, prog: str | None) -> set[str]:
    """The option names (args attributes) given on the command line, whatever their values."""
    parser = build_parser(prog)
    for action in parser._actions:
        if action.option_strings:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0])) - {"prompt"}
