"""``latentdiff <command> [args]``: dispatch to a subcommand; ``latentdiff`` alone lists them.

    latentdiff txt2img "a photo of a cat"
    latentdiff fid samples/ PATH/TO/cifar10-test.tar.gz
    latentdiff train --config configs/cifar10_ldm.yaml --outdir runs/cifar10_ldm

Only the chosen subcommand's module is imported, so ``latentdiff --help`` answers without loading torch.
An unknown command prints the list and exits with status 2, as argparse does for an unknown flag.
"""

from __future__ import annotations

import errno
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
    "rfid": ("latentdiff.cli.rfid", "reconstruction floor of autoencoders: rFID, PSNR, codebook use"),
    "clip-score": ("latentdiff.cli.clip_score", "CLIP score of image-caption pairs"),
    "eval-t2i": ("latentdiff.cli.eval_t2i", "generate from captions, then FID, CLIP score and class accuracy"),
    "sampler-sweep": ("latentdiff.cli.sampler_sweep", "FID and class accuracy per sampler and step count"),
    "train-classifier": ("latentdiff.cli.train_classifier", "train the CIFAR-10 classifier used as a judge"),
    "judge": ("latentdiff.cli.judge", "class accuracy of generated image folders by the CIFAR-10 classifier"),
    "serve": ("latentdiff.cli.serve", "HTTP server with AUTOMATIC1111's API, batching, a web page, Ray Serve"),
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
    prog = prog or f"latentdiff {command}"
    try:
        return module.main(argv[1:], prog=prog) or 0
    except (MemoryError, OSError, RuntimeError) as e:
        message = resource_error_message(e, command)
        if message is not None:
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.errno in PATH_ERRORS and e.filename:  # a path the user gave is unusable
            print(f"{prog}: error: {e.filename}: {e.strerror}", file=sys.stderr)
            return 2
        raise


# What to change when a command runs out of memory.
OOM_HINTS = {
    "txt2img": "a smaller --batch-size, a smaller --H/--W, or --precision fp16/bf16 on a GPU",
    "train": "a smaller data.batch_size with a larger grad_accum (--set data.batch_size=8 --set grad_accum=4), "
             "precision bf16 or fp16, gradient_checkpointing=true, or a smaller data.image_size",
    "eval-t2i": "a smaller --batch-size or --fid-batch-size, or --precision fp16/bf16 on a GPU",
    "sampler-sweep": "a smaller --batch-size or --fid-batch-size, or --precision fp16/bf16 on a GPU",
    "fid": "a smaller --batch-size", "clip-score": "a smaller --batch-size",
    "rfid": "a smaller --batch-size or --fid-batch-size",
    "train-classifier": "a smaller --batch-size or narrower --widths",
    "judge": "a smaller --batch-size",
    "serve": "a smaller --max-batch or a smaller size limit",
}
PATH_ERRORS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
               errno.ENAMETOOLONG, errno.ELOOP}
NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file is too large for this system",
            errno.EDQUOT: "the disk quota is exceeded"}


def resource_error_message(e: BaseException, command: str) -> str | None:
    """One message for running out of memory or disk space (what failed, what to change), or None for any other
    error. Files are written atomically, so a failed write leaves the previous complete file and no partial one."""
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _is_oom(str(e))):
        hint = OOM_HINTS.get(command, "smaller inputs or batches")
        return f"out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); try {hint}"
    os_error = next((c for c in _chain(e) if isinstance(c, OSError) and c.errno in NO_SPACE), None)
    if os_error is not None:  # torch.save raises a RuntimeError from the OSError of a full disk
        where = f" writing {os_error.filename}" if os_error.filename else ""
        return (f"{NO_SPACE[os_error.errno]}{where}; free space or write elsewhere. The file being written was "
                "discarded: an earlier complete file of that name is intact")
    return None


def _chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while e is not None and all(e is not c for c in out):
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_oom(text: str) -> bool:
    text = text.lower()
    return "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text


def run_tool(command: str) -> int:
    """Entry of ``tools/<command>.py``: the same subcommand, with the script's name in its messages."""
    return main([command, *sys.argv[1:]], prog=Path(sys.argv[0]).name)


def console_main() -> None:
    """The ``latentdiff`` console script (pyproject.toml ``[project.scripts]``)."""
    sys.exit(main())
