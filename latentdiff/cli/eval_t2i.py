"""Text-to-image benchmark: generate images from captions, then FID, CLIP score and CIFAR-10 class accuracy.

Examples (from the repository root)::

    latentdiff eval-t2i --ckpt default --captions cifar10 --num-samples 1000 --outdir eval/default-ddim25
    latentdiff eval-t2i --ckpt model.safetensors --sampler dpmpp_2m --steps 25 --scale 3 --captions cifar10 \\
        --num-samples 10000 --batch-size 250 --reference data/cifar10-test-shards --outdir eval/dpm25 --device cuda
    latentdiff eval-t2i --ckpt model.safetensors --captions prompts.txt --num-samples 500 \\
        --reference cifar10-test.npz --clip-weights open_clip_vit_b32.safetensors --outdir eval/prompts

Captions: ``cifar10`` gives "a photo of a {class}" (article fixed, as in the CIFAR-10 training shards) cycling
evenly over the 10 classes; a file gives one caption per line, cycled. Image i uses caption i mod K and seed
``--seed`` + i. The PNGs (with their generation parameters) go to OUTDIR/images, which must not already hold images.

Measures: FID against ``--reference`` (image folder/shards, whose statistics are cached, or an .npz; skipped with a
note when no Inception weights are installed, see `latentdiff fid`); CLIP score when open_clip weights are available
(skipped with a note otherwise); the accuracy of the CIFAR-10 classifier (`latentdiff train-classifier`; default: the
embedded latentdiff/assets/cifar10_classifier.safetensors when present) on images whose caption names one class.
OUTDIR/results.json holds every setting and number; a row is appended to OUTDIR/results.md.

Judging a new decoder (latentdiff.metrics.saved_latents): ``--save-latents`` keeps what the diffusion model
sampled in OUTDIR/latents; ``--from-latents OUTDIR/latents --ckpt other.safetensors`` decodes those same latents
with another model's decoder (same latent channels, or the same VQ codebook size) and scores the images, with the
same --captions, --start and at most the same --num-samples; the sampling flags are then unused and the results
record the saving run's. Seconds instead of minutes per candidate, and no sampling noise between candidates. The
latents folders of runs split by --start merge as their images do (each file is named by its image indices)::

    latentdiff eval-t2i --num-samples 1000 --save-latents --reference cifar10-test.npz --outdir eval/v15
    latentdiff eval-t2i --num-samples 1000 --from-latents eval/v15/latents --ckpt candidate.safetensors \
        --reference cifar10-test.npz --outdir eval/candidate

Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from latentdiff.cli.common import (
    BATCH,
    FINITE,
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    SEED,
    SIGMA,
    UNIT,
    WORKERS,
    ArgumentParser,
    fail,
    guidance_interval_option,
    lock_outdir,
    resolve_device_dtype,
)
from latentdiff.config.model import VQ_SAMPLER_NAMES


def add_common_arguments(p: argparse.ArgumentParser, num_samples=1000,
                         num_samples_help: str = "number of images to generate") -> None:
    """Flags shared with ``latentdiff sampler-sweep``."""
    p.add_argument("--ckpt", "--checkpoint", dest="ckpt", default="default",
                   help="model: 'default' or 'default-vq' (the embedded models), a latentdiff .safetensors, a "
                        "Stable Diffusion file or a diffusers folder")
    p.add_argument("--scale", type=FINITE, default=None, help="guidance scale; default: the model's own")
    p.add_argument("--captions", default="cifar10", help="'cifar10' (class captions) or a text file, one per line")
    p.add_argument("--num-samples", type=POSITIVE, default=num_samples, help=num_samples_help)
    p.add_argument("--batch-size", type=BATCH, default=50, help="images per generation batch")
    p.add_argument("--reference", default="data/cifar10-test-shards",
                   help="FID reference: image folder, tar shards or .npz statistics ('none': no FID)")
    p.add_argument("--reference-samples", type=POSITIVE, default=None,
                   help="use a seeded random subset of the reference")
    p.add_argument("--inception-weights", default=None, help="Inception weights file (default: the torch hub cache)")
    p.add_argument("--cache-dir", default=None,
                   help="reference statistics cache (default: latentdiff/fid in $XDG_CACHE_HOME or ~/.cache)")
    p.add_argument("--classifier", default=None,
                   help="CIFAR-10 classifier .safetensors (default: the embedded one, skipped if absent)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of image 0 (image i uses seed + i)")
    p.add_argument("--outdir", required=True, help="output folder (images/, results.json, results.md)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model precision (auto: bf16 on CUDA if supported, else fp16; fp32 on CPU); the judges "
                        "run in fp32")
    p.add_argument("--fid-batch-size", type=BATCH, default=50, help="images per Inception batch")
    p.add_argument("--num-workers", type=WORKERS, default=0, help="image decoding processes for FID / CLIP")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from latentdiff.diffusion.samplers import SAMPLERS

    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS) + list(VQ_SAMPLER_NAMES),
                   help="sampler (VQ-Diffusion models: vq or vq_purity; a latent-diffusion sampler's name means "
                        "the model's own)")
    p.add_argument("--steps", type=POSITIVE, default=25, help="sampling steps")
    p.add_argument("--eta", type=NON_NEGATIVE_FLOAT, default=0.0, help="DDIM eta")
    p.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    p.add_argument("--truncation", type=UNIT, default=None,
                   help="VQ-Diffusion only: keep the codes covering this much probability at each position, in "
                        "(0, 1]; default: the model's truncation_rate")
    p.add_argument("--guidance-interval", type=SIGMA, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                   default=None, help="latent diffusion only: guide only the steps whose noise level sigma lies "
                                      "in (SIGMA_LO, SIGMA_HI] (Kynkaanniemi et al. 2024; 0 inf: every step); "
                                      "default: the model's own (its config's guidance_interval; none: every step)")
    add_common_arguments(p, num_samples=argparse.SUPPRESS,  # absent: resolved in main
                         num_samples_help="number of images to generate (default: 1000; with --from-latents: "
                                          "every saved image from --start on)")
    p.add_argument("--start", type=NON_NEGATIVE, default=0,
                   help="index of the first image: generate images start..start+N-1 (split a benchmark over runs "
                        "or machines, then merge their images/ folders and run `latentdiff fid` on the whole; latent "
                        "diffusion seeds each image, so the merge equals one run; VQ-Diffusion seeds each batch)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model for the CLIP score")
    p.add_argument("--clip-pretrained", default="laion2b_s34b_b79k", help="open_clip pretrained tag (local cache)")
    p.add_argument("--clip-weights", default=None, help="local open_clip weights file (overrides --clip-pretrained)")
    p.add_argument("--no-clip", action="store_true", help="do not compute the CLIP score")
    p.add_argument("--save-latents", action="store_true",
                   help="also keep the sampled latents (or VQ code grids) in OUTDIR/latents, for --from-latents")
    p.add_argument("--from-latents", metavar="DIR", default=None,
                   help="decode the latents a --save-latents run kept in DIR with --ckpt's decoder instead of "
                        "sampling (the sampling flags are then unused)")
    return p


def check_common(args) -> None:
    """Exit 2 on bad values of the shared flags."""
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                        ("--fid-batch-size", args.fid_batch_size), ("--reference-samples", args.reference_samples)):
        if value is not None and value <= 0:
            fail(f"{flag} must be a positive integer, got {value}")
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.captions != "cifar10" and not Path(args.captions).is_file():
        fail(f"--captions must be 'cifar10' or an existing text file, got {args.captions!r}")
    if args.reference != "none" and "{" not in args.reference and not Path(args.reference).exists():
        fail(f"--reference {args.reference} does not exist (pass 'none' to skip FID)")
    for flag, value in (("--classifier", args.classifier), ("--inception-weights", args.inception_weights)):
        if value is not None and not Path(value).is_file():
            fail(f"{flag} {value} is not a file")
    images = Path(args.outdir) / "images"
    if images.is_dir() and any(images.glob("*.png")):
        fail(f"{images} already holds images; choose a new --outdir")


def load_everything(args, clip: dict | None):
    """(pipe, prompts, judges, device) from the parsed flags; exits 2 with the reason on bad input."""
    from latentdiff.data.image_sources import SourceError
    from latentdiff.metrics.t2i import CIFAR10_CLASSES, class_prompts, file_prompts, load_judges
    from latentdiff.pipelines import load_pipeline

    device, dtype = resolve_device_dtype(args.device, args.precision)
    try:
        pipe = load_pipeline(args.ckpt, device=device, dtype=dtype)
        names = CIFAR10_CLASSES
        start = getattr(args, "start", 0)
        prompts = (class_prompts(names, args.num_samples, start=start) if args.captions == "cifar10"
                   else file_prompts(args.captions, args.num_samples, names, start=start))
        judges = load_judges(None if args.reference == "none" else args.reference, args.classifier, clip,
                             inception_weights=args.inception_weights, reference_samples=args.reference_samples,
                             cache_dir=args.cache_dir or _default_cache(), device=device,
                             fid_batch_size=args.fid_batch_size, num_workers=args.num_workers,
                             progress=not args.quiet)
    except (ValueError, OSError, RuntimeError, SourceError) as e:
        fail(str(e).strip())
    if judges.classifier is not None and judges.classifier.class_names != list(names):
        fail(f"the classifier's classes {judges.classifier.class_names} are not CIFAR-10's {list(names)}")
    return pipe, prompts, judges, device


def _default_cache():
    from latentdiff.metrics.fid import DEFAULT_CACHE_DIR

    return DEFAULT_CACHE_DIR


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if "num_samples" not in vars(args):
        args.num_samples = 1000 if args.from_latents is None else _saved_from(args.from_latents, args.start)
    check_common(args)
    if args.steps <= 0:
        fail(f"--steps must be a positive integer, got {args.steps}")
    if args.start < 0:
        fail(f"--start must be >= 0, got {args.start}")
    if args.from_latents is not None:
        if args.save_latents:
            fail("--save-latents and --from-latents exclude each other (the latents are already saved)")
        if not Path(args.from_latents).is_dir():
            fail(f"--from-latents {args.from_latents} is not a folder (a --save-latents run writes OUTDIR/latents)")
    if args.save_latents and any((Path(args.outdir) / "latents").glob("latents-*.safetensors")):
        fail(f"{Path(args.outdir) / 'latents'} already holds latents; choose a new --outdir")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download CLIP weights from here
    with lock_outdir(args.outdir, "eval-t2i"):  # one writer per --outdir
        return _evaluate(args)


def _saved_from(folder: str, start: int) -> int:
    """How many images --from-latents FOLDER saved from index ``start`` on (exits 2 when none)."""
    from latentdiff.metrics.saved_latents import saved_indices

    count = sum(i >= start for i in saved_indices(folder))
    if count == 0:
        fail(f"--from-latents {folder} holds no latents of images {start} and after")
    return count


def _evaluate(args) -> int:
    from latentdiff.metrics.t2i import BenchmarkSettings, run_benchmark, write_results

    clip = None if args.no_clip else {"model_name": args.clip_model, "pretrained": args.clip_pretrained,
                                      "weights": args.clip_weights}
    pipe, prompts, judges, device = load_everything(args, clip)
    if args.steps > pipe.schedule.num_timesteps:
        fail(f"--steps {args.steps} exceeds the model's {pipe.schedule.num_timesteps} diffusion timesteps")
    vq = pipe.config.type == "vq_diffusion"
    if args.sampler in VQ_SAMPLER_NAMES and not vq:
        fail(f"--sampler {args.sampler} applies to VQ-Diffusion models only")
    if args.truncation is not None and not vq:
        fail("--truncation applies to VQ-Diffusion models only")
    sampler = pipe.default_sampler if vq and args.sampler not in VQ_SAMPLER_NAMES else args.sampler
    settings = BenchmarkSettings(sampler=sampler, steps=args.steps, scale=args.scale, seed=args.seed,
                                 eta=args.eta, batch_size=args.batch_size, negative_prompt=args.negative_prompt,
                                 start=args.start, truncation=args.truncation,
                                 guidance_interval=guidance_interval_option(args.guidance_interval, vq),
                                 save_latents=str(Path(args.outdir) / "latents") if args.save_latents else None,
                                 from_latents=args.from_latents)
    try:
        result = run_benchmark(pipe, prompts, settings, args.outdir, judges, device=device, checkpoint=args.ckpt,
                               progress=not args.quiet)
    except (ValueError, FileExistsError) as e:
        fail(str(e))
    result.update(reference=args.reference, reference_samples=args.reference_samples, device=str(device),
                  precision=args.precision, command=" ".join(sys.argv))
    json_path, md_path = write_results(args.outdir, result)
    for name in ("fid", "clip_score", "class_accuracy"):
        section = result[name]
        value = section.get("value", section.get("accuracy"))
        print(f"{name}: skipped ({section['skipped']})" if "skipped" in section else f"{name}: {value:.4f}")
    print(f"wrote {json_path} and a row in {md_path} ({result['wall_seconds']:.0f} s)")
    return 0

