"""Convert checkpoints between the Stable Diffusion single-file layout, diffusers folders and latentdiff's format.

Examples (from the repository root)::

    latentdiff convert v1-5-pruned.safetensors sd15-diffusers --to diffusers
    latentdiff convert v1-5-pruned.ckpt sd15.safetensors --to latentdiff --half --no-ema
    latentdiff convert stable-diffusion-2-1 sd21.safetensors --to sd
    latentdiff convert 768-v-ema.safetensors sd2-768-v --to diffusers --prediction-type v_prediction
    latentdiff convert model.safetensors model-diffusers --to diffusers --overwrite

The source format is detected (a folder with model_index.json: diffusers; a .safetensors file with latentdiff
metadata: latentdiff; any other .safetensors/.ckpt: Stable Diffusion single file). Single files with EMA weights
give their EMA U-Net unless --no-ema. The output is written atomically and an existing output is never replaced
unless --overwrite. Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from latentdiff.cli.common import ArgumentParser, fail

FORMATS = ("sd", "diffusers", "latentdiff")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("src", help="source: SD single file (.safetensors/.ckpt), diffusers folder or latentdiff file")
    p.add_argument("dst", help="destination: a .safetensors file (--to sd|latentdiff) or a folder (--to diffusers)")
    p.add_argument("--to", required=True, choices=FORMATS, help="output format")
    p.add_argument("--from", dest="fmt", default="auto", choices=("auto", *FORMATS),
                   help="source format (auto: detect; a mismatch with what is found is an error)")
    p.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="take the EMA U-Net of a single file (error if it has none); default: EMA when present")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False,
                     help="take the non-EMA U-Net of a single file")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="what the U-Net predicts (SD 2.x 768-v: v_prediction); default: the source's, or epsilon "
                        "with a warning when an SD 2.x single file cannot tell")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the inferred config, e.g. unet.num_head_channels=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from latentdiff.io.checkpoint import CheckpointError
    from latentdiff.io.export import convert_checkpoint

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show  # one readable line per warning; restored on exit
        try:
            out = convert_checkpoint(args.src, args.dst, args.to, fmt=args.fmt, half_precision=args.half,
                                     use_ema=args.use_ema, overwrite=args.overwrite,
                                     prediction_type=args.prediction_type, overrides=args.overrides)
        except (CheckpointError, ValueError, FileExistsError, OSError) as e:
            fail(str(e))
    print(out)
    return 0

