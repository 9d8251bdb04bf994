"""Train the CIFAR-10 classifier used as the offline text-alignment judge of ``latentdiff eval-t2i`` and ``judge``.

Examples (from the repository root)::

    latentdiff train-classifier --shards data/cifar10-train-shards --test-shards data/cifar10-test-shards \\
        --out classifier.safetensors --preset airbench94 --half
    latentdiff train-classifier --shards data/cifar10-train-shards --test-shards data/cifar10-test-shards \\
        --out classifier.safetensors --preset airbench94 --device cuda
    latentdiff train-classifier --shards data/cifar10-train-shards --test-shards data/cifar10-test-shards \\
        --out classifier.safetensors --epochs 8 --widths 32 64 128 --threads 4 --overwrite

Presets: "small" (the defaults below: widths 16/32/64, residual blocks, one-cycle SGD, batch 128, 2.5 epochs) and
"airbench94" (Keller Jordan's airbench94 recipe, latentdiff/metrics/classifier_airbench.py: widths 64/256/256,
batch 1024, 9.9 epochs, lr 11.5 and lookahead; 94 % in its paper; bfloat16 autocast where the device has it,
--precision). --epochs, --batch-size, --lr and --widths replace the preset's values (--lr in the preset's units).

Labels come from each sample's ``{key}.json`` ``class``; the class order is the shard manifest's ``classes``
(sorted), stored in the file's metadata with the architecture, the training settings and the test accuracy.
The file is written atomically and never replaces an existing one unless ``--overwrite`` is given.
The first example made the embedded judge, latentdiff/assets/cifar10_classifier.safetensors: 90.5 % test accuracy
(mirror and translation test-time augmentation), 4.0 MB, 21 minutes on 2 CPU cores with AVX-512 BF16 (train and
test). The small preset's defaults made the judge before it (77.9 %, 0.3 MB, about 15 minutes of one CPU core).
Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from latentdiff.cli.common import (
    BATCH,
    POSITIVE,
    POSITIVE_FLOAT,
    SEED,
    THREADS,
    ArgumentParser,
    Int,
    fail,
    resolve_device_dtype,
)

PRESETS = ("small", "airbench94")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("--shards", required=True, help="training shards: folder, brace pattern, glob or file")
    p.add_argument("--test-shards", default=None, help="held-out shards to report accuracy on (same classes)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="network and training recipe")
    p.add_argument("--epochs", type=POSITIVE_FLOAT, default=None,
                   help="passes over the training set (fractions allowed); None: the preset's (2.5, airbench94 9.9)")
    p.add_argument("--batch-size", type=BATCH, default=None, help="training batch size; None: the preset's")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="peak learning rate (small: of the one-cycle schedule, 0.15; airbench94: per 1024 images "
                        "in its units, 11.5); None: the preset's")
    p.add_argument("--widths", type=Int(1, 4096), nargs="+", default=None,
                   help="channels of the conv blocks; None: the preset's (16 32 64, airbench94 64 256 256)")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the file); the network is rounded to them before the "
                        "test, so the recorded accuracy is the file's")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="airbench94 only: autocast dtype (auto: bfloat16 on CUDA and on CPUs with native bfloat16, "
                        "else float32)")
    p.add_argument("--device", default="cpu",
                   help="torch device (auto: cuda if any); airbench94 trains there, small trains on the CPU")
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
    import torch

    from latentdiff.metrics.classifier import (
        TrainSettings,
        evaluate_classifier,
        load_labelled_shards,
        round_to_half,
        save_classifier,
        train_classifier,
    )
    from latentdiff.metrics.classifier_airbench import AirbenchSettings, train_airbench

    device, _ = resolve_device_dtype(args.device, "fp32")
    settings_class = AirbenchSettings if args.preset == "airbench94" else TrainSettings
    chosen = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "widths": None if args.widths is None else tuple(args.widths)}
    if args.precision is not None and args.preset != "airbench94":
        fail("--precision applies to --preset airbench94 only")
    if args.preset == "airbench94":
        chosen["precision"] = args.precision
    settings = settings_class(seed=args.seed, **{k: v for k, v in chosen.items() if v is not None})

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
    if size - 1 < 2 ** len(settings.widths):
        fail(f"{size}x{size} images are too small for {len(settings.widths)} blocks (each halves the size); "
             f"pass fewer --widths")
    if args.preset == "airbench94":
        model = train_airbench(train, settings, device, progress=not args.quiet)
    else:
        model = train_classifier(train, settings, progress=not args.quiet).to(device)
    metadata = {"train": {"preset": args.preset, **vars(settings), "shards": args.shards, "samples": len(train),
                          "device": str(device), "half": args.half},
                "train_seconds": round(time.time() - start, 1)}
    if args.half:
        round_to_half(model)
    if test is not None:
        report = evaluate_classifier(model, test, progress=not args.quiet)
        metadata["test"] = {"shards": args.test_shards, "samples": len(test), **report}
        print(f"test accuracy {report['accuracy']:.4f} on {len(test)} images")
        for name, acc in report["per_class"].items():
            print(f"  {name:>12s} {acc:.4f}" if acc is not None else f"  {name:>12s} -")
    try:
        save_classifier(model, out, metadata=metadata, overwrite=args.overwrite, half=args.half)
    except FileExistsError as e:
        fail(str(e))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {time.time() - start:.0f} s)")
    return 0

