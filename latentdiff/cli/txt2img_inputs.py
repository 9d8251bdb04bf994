"""What txt2img reads besides its flags: the settings of a --from-png PNG, a --from-file list of prompts, the
--init-image and --mask pictures, and the LoRAs of --lora and of <lora:NAME:SCALE> prompt tags. Each exits 2 with
one message (latentdiff.cli.common.fail) when its input cannot be used."""

from __future__ import annotations

import argparse
import sys

from latentdiff.cli.common import fail


def load_loras(pipe, args: argparse.Namespace, prompts: list[str]) -> list[str]:
    """Load the --lora files into ``pipe``, check every prompt's <lora:NAME:SCALE> tags (their files are loaded
    once, then per prompt when it is generated) and return the prompts to encode, without their tags; exits 2 with
    one message for a file that is missing or fits no layer of the model."""
    from latentdiff.pipelines.lora import lora_spec, split_lora_tags

    try:
        tagged = [split_lora_tags(p)[1] for p in prompts]
        if (args.lora or any(tagged)) and not hasattr(pipe, "load_lora"):
            raise ValueError("LoRAs (--lora, <lora:...> tags) apply to latent-diffusion models only")
        for spec in args.lora:
            path, scale = lora_spec(spec)
            pipe.load_lora(path, scale)
        for name in sorted({name for tags in tagged for name, _ in tags}):  # fail before any image is made
            pipe.use_prompt_loras(f"<lora:{name}>", args.lora_dir)
        if any(tagged):
            pipe.use_prompt_loras("", args.lora_dir)
    except ValueError as e:
        fail(str(e))
    return [split_lora_tags(p)[0] for p in prompts]


def tag_names(prompts: list[str]) -> set[str]:
    from latentdiff.pipelines.lora import split_lora_tags

    return {name for p in prompts for name, _ in split_lora_tags(p)[1]}


# Options a --from-png PNG supplies unless given on the command line (args attribute names).
PNG_OPTIONS = ("negative_prompt", "steps", "sampler", "scale", "seed", "H", "W", "eta", "strength", "truncation",
               "mask_blur", "clip_skip", "guidance_rescale", "guidance_interval", "deepcache", "deepcache_branch")


def apply_png(args: argparse.Namespace, explicit: set[str], parser: argparse.ArgumentParser) -> dict:
    """Fill ``args`` from the --from-png PNG's settings where the command line left them out (``explicit``: the
    option names given there); each value goes through its flag's type in ``parser``, as if typed on the command
    line (a PNG saying "CFG scale: nan" is refused like --scale nan). Returns the settings (``from_png``: the
    option names taken from the PNG). Exits 2 with one message when the PNG cannot be used."""
    from latentdiff.io.images import png_settings

    types = {a.dest: a.type for a in parser._actions if a.type is not None}

    def take(key, value):
        try:
            if key not in types:
                setattr(args, key, value)
            elif isinstance(value, tuple):  # a flag of several values (--guidance-interval LO HI)
                setattr(args, key, [types[key](str(v)) for v in value])
            else:
                setattr(args, key, types[key](str(value)))
        except (argparse.ArgumentTypeError, ValueError) as e:
            fail(f"--from-png {args.from_png}: its {key} {value!r} cannot be used: {e}")

    if args.from_file is not None:
        fail("--from-png and --from-file cannot be combined")
    try:
        png = png_settings(args.from_png)
    except ValueError as e:
        fail(f"--from-png {args.from_png}: {e}")
    png["from_png"] = {key for key in PNG_OPTIONS if key in png and key not in explicit}
    for key in png["from_png"]:
        take(key, png[key])
    if not args.prompt:
        args.prompt = [png["prompt"]]
    if "mask_blur" in png and args.mask is None:
        fail(f"--from-png {args.from_png} was made by inpainting (Mask blur {png['mask_blur']:g}) and its init image "
             "and mask are not in the PNG: give them with --init-image and --mask")
    if "strength" in png and args.init_image is None:
        fail(f"--from-png {args.from_png} was made by img2img (Denoising strength {png['strength']:g}) and its init "
             "image is not in the PNG: give it with --init-image")
    if png.get("batch_size", 1) > 1:  # VQ-Diffusion: one random stream per batch; regenerate the whole batch
        for key, value in (("n_samples", png["batch_size"]), ("batch_size", png["batch_size"])):
            if key not in explicit:
                take(key, value)
        print(f"note: {args.from_png} is image {png.get('batch_pos', 0) + 1} of a batch of {png['batch_size']} "
              "(one random stream per batch): the whole batch is made again", file=sys.stderr)
    return png


def check_png_against(png: dict, pipe, args: argparse.Namespace) -> None:
    """Warn when the --from-png PNG names another model; drop the PNG's settings that the loaded model has no use
    for (a VQ-Diffusion truncation on a latent-diffusion model; a clip skip, guidance rescale or guidance interval
    on a VQ-Diffusion model), and read a VQ-Diffusion sampler's recorded name ("VQ-Diffusion purity" -> vq_purity)."""
    from latentdiff.diffusion.samplers import SAMPLERS

    if png["model"] and png["model"] != pipe.name:
        print(f"warning: {args.from_png} was made with model {png['model']!r}, not the loaded {pipe.name!r}: the "
              "image will differ", file=sys.stderr)
    vq = pipe.config.type == "vq_diffusion"
    if "truncation" in png["from_png"] and not vq:
        args.truncation = None
    if "clip_skip" in png["from_png"] and vq:
        args.clip_skip = 1
    if "guidance_rescale" in png["from_png"] and vq:
        args.guidance_rescale = 0.0
    if "guidance_interval" in png["from_png"] and vq:
        args.guidance_interval = None
    if "sampler" in png["from_png"] and args.sampler not in SAMPLERS:
        if not vq:
            fail(f"--from-png {args.from_png}: sampler {args.sampler!r} is not one of ours "
                 f"({', '.join(sorted(SAMPLERS))}); choose one with --sampler")
        from latentdiff.pipelines.vq import vq_sampler_id

        args.sampler = vq_sampler_id(args.sampler)  # None (the model's own) for a name it does not know


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of the --from-file text file; exits 2 with one message when it is not UTF-8 text or
    has none."""
    from latentdiff.io.text_lines import read_lines

    try:
        prompts = read_lines(path)
    except ValueError as e:
        fail(f"--from-file {path}: {e}")
    if not prompts:
        fail(f"--from-file {path}: has no prompts (no non-empty line)")
    return prompts


def read_image(path: str, flag: str = "--init-image", mode: str = "RGB"):
    """The --init-image (or --mask, ``mode`` "L") as a fully read PIL image of ``mode``; exits 2 with one message
    when it cannot be read or converted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        kind = "not a readable image" if mode == "RGB" else "not a readable greyscale image"
        fail(f"{flag} {path}: {kind} ({e})")
