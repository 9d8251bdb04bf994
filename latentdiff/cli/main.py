"""``latentdiff <command> [args]``: dispatch to a subcommand; ``latentdiff`` alone lists them.

    latentdiff txt2img "a photo of a cat"
    latentdiff fid samples/ PATH/TO/cifar10-test.tar.gz
    latentdiff train --config configs/cifar10_ldm.yaml --outdir runs/cifar10_ldm

Only the chosen subcommand's module is imported, so ``latentdiff --help`` answers without loading torch.
An unknown command prints the list and exits with status 2, as argparse does for an unknown flag.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from latentdiff.version import __version__

# command -> (module under latentdiff/cli/, one line of help)
COMMANDS = {
    "txt2img": ("latentdiff.cli.txt2img", "text-to-image with the embedded models or any supported checkpoint"),
    "train": ("latentdiff.cli.train", "train an autoencoder, latent diffusion or VQ-Diffusion model (YAML config)"),
    "make-shards": ("latentdiff.cli.make_shards", "pack an image folder or archive into webdataset shards"),
    "validate-shards": ("latentdiff.cli.validate_shards", "check shards against their manifest, sample by sample"),
    "convert": ("latentdiff.cli.convert", "convert between SD single files, diffusers folders and latentdiff files"),
    "pack-model": ("latentdiff.cli.pack_model", "pack a trained model file for shipping (fp16, vocabulary, decoder)"),
    "fid": ("latentdiff.cli.fid", "Frechet Inception Distance between two image sources"),
    "clip-score": ("latentdiff.cli.clip_score", "CLIP score of image-caption pairs"),
    "eval-t2i": ("latentdiff.cli.eval_t2i", "generate from captions, then FID, CLIP score and class accuracy"),
    "sampler-sweep": ("latentdiff.cli.sampler_sweep", "FID and class accuracy per sampler and step count"),
    "train-classifier": ("latentdiff.cli.train_classifier", "train the CIFAR-10 classifier used as a judge"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: latentdiff <command> [options]   (latentdiff <command> --help for its options)",
             "", "latent and text-conditioned image diffusion, version " + __version__, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run ``argv`` (default: ``sys.argv[1:]``); ``prog`` names the program in the subcommand's messages
    (default ``latentdiff <command>``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"latentdiff {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\nlatentdiff: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(argv[1:], prog=prog or f"latentdiff {command}") or 0


def run_tool(command: str) -> int:
    """Entry of ``tools/<command>.py``: the same subcommand, with the script's name in its messages."""
    return main([command, *sys.argv[1:]], prog=Path(sys.argv[0]).name)


def console_main() -> None:
    """The ``latentdiff`` console script (pyproject.toml ``[project.scripts]``)."""
    sys.exit(main())
