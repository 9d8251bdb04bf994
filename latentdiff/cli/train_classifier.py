"""Train the small CIFAR-10 classifier used as the offline text-alignment judge of ``latentdiff eval-t2i``.

Examples (from the repository root)::

    latentdiff train-classifier --shards data/cifar10-train-shards --test-shards data/cifar10-test-shards \\
        --out classifier.safetensors
    latentdiff train-classifier --shards data/cifar10-train-shards --test-shards data/cifar10-test-shards \\
        --out classifier.safetensors --epochs 8 --widths 32 64 128 --threads 4 --overwrite

Labels come from each sample's ``{key}.json`` ``class``; the class order is the shard manifest's ``classes``
(sorted), stored in the file's metadata with the architecture, the training settings and the test accuracy.
The file is written atomically and never replaces an existing one unless ``--overwrite`` is given.
The defaults made latentdiff/assets/cifar10_classifier.safetensors: 77.9% test accuracy (flip-averaged), 0.3 MB,
about 15 minutes of one busy CPU core (longer on a crowded machine); wider nets and more epochs do better.
Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from latentdiff.cli.common import BATCH, POSITIVE, POSITIVE_FLOAT, SEED, THREADS, ArgumentParser, Int, fail


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("--shards", required=True, help="training shards: folder, brace pattern, glob or file")
    p.add_argument("--test-shards", default=None, help="held-out shards to report accuracy on (same classes)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--epochs", type=POSITIVE_FLOAT, default=2.5,
                   help="passes over the training set (fractions allowed)")
    p.add_argument("--batch-size", type=BATCH, default=128, help="training batch size")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=0.15, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--widths", type=Int(1, 4096), nargs="+", default=[16, 32, 64], help="channels of the conv blocks")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (initialisation, order, augmentation)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="use only the first N training samples")
    p.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        fail(f"--out must end in .safetensors, got {out}")
    if out.exists() and not args.overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--threads", args.threads)):
        if value is not None and value <= 0:
            fail(f"{flag} must be a positive integer, got {value}")
    if args.epochs <= 0 or args.lr <= 0 or any(w <= 0 for w in args.widths):
        fail(f"--epochs, --lr and --widths must be positive, got {args.epochs}, {args.lr}, {args.widths}")

    import torch

    from latentdiff.metrics.classifier import (
        TrainSettings,
        evaluate_classifier,
        load_labelled_shards,
        save_classifier,
        train_classifier,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    try:
        train = load_labelled_shards(args.shards, limit=args.limit, progress=not args.quiet)
        test = (load_labelled_shards(args.test_shards, class_names=train.class_names, progress=not args.quiet)
                if args.test_shards else None)
    except ValueError as e:
        fail(str(e))
    size = train.images.shape[-1]
    if size - 1 < 2 ** len(args.widths):
        fail(f"{size}x{size} images are too small for {len(args.widths)} blocks (each halves the size); "
             f"pass fewer --widths")
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, widths=tuple(args.widths),
                             seed=args.seed)
    model = train_classifier(train, settings, progress=not args.quiet)
    metadata = {"train": {**vars(settings), "shards": args.shards, "samples": len(train)},
                "train_seconds": round(time.time() - start, 1)}
    if test is not None:
        report = evaluate_classifier(model, test, progress=not args.quiet)
        metadata["test"] = {"shards": args.test_shards, "samples": len(test), **report}
        print(f"test accuracy {report['accuracy']:.4f} on {len(test)} images")
        for name, acc in report["per_class"].items():
            print(f"  {name:>12s} {acc:.4f}" if acc is not None else f"  {name:>12s} -")
    try:
        save_classifier(model, out, metadata=metadata, overwrite=args.overwrite)
    except FileExistsError as e:
        fail(str(e))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {time.time() - start:.0f} s)")
    return 0

